//! The scheduler leases only to a session the fencing service created and
//! holds active, and only to that session's own bot: an acquire naming a
//! made-up session (or another bot's) gets `unknown_session` and no job
//! changes; a fresh real session is served at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use uuid::Uuid;
use warden_e2e::InProcess;
use warden_shared::job::Job;
use warden_shared::messages::{AcquireReply, AcquireRequest, CreateSession, SessionReply};
use warden_shared::session::UNKNOWN_SESSION;
use warden_shared::{subjects, JobState};

async fn acquire(client: &async_nats::Client, session: &str, bot: &str) -> AcquireReply {
    let req = AcquireRequest {
        version: 1,
        session: session.into(),
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        pools: vec!["default".into()],
        max: 1,
        wait_ms: 300,
    };
    let reply = client
        .request(subjects::ACQUIRE, serde_json::to_vec(&req).unwrap().into())
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_up_session_gets_no_lease_and_a_real_one_is_served_at_once() {
    let mut s = InProcess::start("").await;
    s.spawn(warden_scheduler::run);
    s.spawn(warden_fencing::run);
    let (client, store) = (s.client.clone(), s.store.clone());
    let job = Job::builder("noop").build();
    store.create(&job).await.unwrap();
    // The scheduler answers once it is up (the queue has the job).
    let made_up = warden_e2e::eventually(Duration::from_secs(20), "the scheduler answers", || {
        let client = client.clone();
        async move {
            let req = AcquireRequest {
                version: 1,
                session: "made-up".into(),
                bot_id: "bot-x".into(),
                resource: None,
                resources: Vec::new(),
                pools: vec!["default".into()],
                max: 1,
                wait_ms: 300,
            };
            let reply = client
                .request(subjects::ACQUIRE, serde_json::to_vec(&req).unwrap().into())
                .await
                .ok()?;
            serde_json::from_slice::<AcquireReply>(&reply.payload).ok()
        }
    })
    .await;
    assert!(made_up.leases.is_empty(), "{made_up:?}");
    assert_eq!(
        made_up.error.as_ref().map(|e| e.code.as_str()),
        Some(UNKNOWN_SESSION),
        "{made_up:?}"
    );
    let v = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!((v.job.state, v.job.attempt), (JobState::Scheduled, 0));

    // A real session, fresh from the fencing service.
    let create = CreateSession {
        version: 1,
        bot_id: "bot-real".into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: Uuid::new_v4().to_string(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
    };
    let reply = warden_e2e::eventually(Duration::from_secs(20), "a session", || {
        let client = client.clone();
        let body = serde_json::to_vec(&create).unwrap();
        async move {
            let msg = client
                .request(subjects::SESSION_CREATE, body.into())
                .await
                .ok()?;
            serde_json::from_slice::<SessionReply>(&msg.payload)
                .ok()?
                .session
        }
    })
    .await;

    let served = acquire(&client, &reply, "bot-real").await;
    assert_eq!(served.error, None);
    assert_eq!(served.leases.len(), 1, "{served:?}");
    assert_eq!(served.leases[0].job_id, job.id);

    // Another bot naming it is refused.
    let other = Job::builder("noop").build();
    store.create(&other).await.unwrap();
    let stolen = acquire(&client, &reply, "bot-x").await;
    assert!(stolen.leases.is_empty(), "{stolen:?}");
    assert_eq!(
        stolen.error.as_ref().map(|e| e.code.as_str()),
        Some(UNKNOWN_SESSION)
    );
    let v = store.get(&other.id).await.unwrap().unwrap();
    assert_eq!((v.job.state, v.job.attempt), (JobState::Scheduled, 0));

    s.stop().await;
}
