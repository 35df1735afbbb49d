//! A lease the scheduler wrote but whose grant never reached the worker
//! (the acquire reply lost with a connection, or the write acknowledged
//! too late) is taken back once the session's heartbeats show it does
//! not hold it: the job is SCHEDULED again, the attempt not counted.
//! Before, the job stayed RUNNING for as long as the session lived.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use uuid::Uuid;
use warden_e2e::InProcess;
use warden_shared::job::Job;
use warden_shared::messages::{
    AcquireReply, AcquireRequest, CreateSession, Heartbeat, SessionReply,
};
use warden_shared::{subjects, JobState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_never_reached_its_worker_is_taken_back() {
    let mut s = InProcess::start("[fencing]\nsession_timeout = \"4s\"\n").await;
    s.spawn(warden_scheduler::run);
    s.spawn(warden_fencing::run);
    let (client, store) = (s.client.clone(), s.store.clone());
    let job = Job::builder("noop").build();
    store.create(&job).await.unwrap();
    let create = CreateSession {
        version: 1,
        bot_id: "bot-deaf".into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: Uuid::new_v4().to_string(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
    };
    let session = warden_e2e::eventually(Duration::from_secs(20), "a session", || {
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
    // The scheduler leases the job; the "worker" never learns of it (its
    // reply is dropped here, as a lost connection would).
    warden_e2e::eventually(Duration::from_secs(20), "the job leased", || {
        let client = client.clone();
        let req = AcquireRequest {
            version: 1,
            session: session.clone(),
            bot_id: "bot-deaf".into(),
            resource: None,
            resources: Vec::new(),
            pools: vec!["default".into()],
            max: 1,
            wait_ms: 300,
        };
        async move {
            let reply = client
                .request(subjects::ACQUIRE, serde_json::to_vec(&req).unwrap().into())
                .await
                .ok()?;
            let r: AcquireReply = serde_json::from_slice(&reply.payload).ok()?;
            (!r.leases.is_empty()).then_some(())
        }
    })
    .await;
    let v = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!((v.job.state, v.job.attempt), (JobState::Running, 1));

    // The session lives on, heartbeating without the lease.
    let beats = {
        let client = client.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            loop {
                every.tick().await;
                let hb = Heartbeat {
                    version: 1,
                    session: session.clone(),
                    leases: Vec::new(),
                };
                let _ = client
                    .request(
                        subjects::SESSION_HEARTBEAT,
                        serde_json::to_vec(&hb).unwrap().into(),
                    )
                    .await;
            }
        })
    };
    let back = warden_e2e::eventually(Duration::from_secs(20), "the lease taken back", || {
        let store = store.clone();
        let id = job.id;
        async move {
            let v = store.get(&id).await.ok()??;
            (v.job.state == JobState::Scheduled).then_some(v.job)
        }
    })
    .await;
    assert_eq!(back.attempt, 1);
    assert_eq!(
        back.budget_from, 1,
        "the undelivered attempt is not counted"
    );
    assert!(
        back.history.iter().any(|e| e
            .note
            .as_deref()
            .is_some_and(|n| n.starts_with("lease_undelivered"))),
        "{:?}",
        back.history
    );
    beats.abort();
    s.stop().await;
}
