//! The scheduler leases only to a session the fencing service created and
//! holds active, and only to that session's own bot: an acquire naming a
//! made-up session (or another bot's) gets `unknown_session` and no job
//! changes; a fresh real session is served at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{acquire_request, open_session, try_acquire, InProcess};
use warden_shared::error::ErrorCode;
use warden_shared::job::Job;
use warden_shared::messages::AcquireReply;
use warden_shared::JobState;

async fn acquire(client: &async_nats::Client, session: &str, bot: &str) -> AcquireReply {
    try_acquire(client, &acquire_request(session, bot, 1))
        .await
        .expect("the scheduler answers")
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
    let req = acquire_request("made-up", "bot-x", 1);
    let made_up = warden_e2e::eventually(Duration::from_secs(20), "the scheduler answers", || {
        try_acquire(&client, &req)
    })
    .await;
    assert!(made_up.leases.is_empty(), "{made_up:?}");
    assert_eq!(
        made_up.error.as_ref().map(|e| e.code),
        Some(ErrorCode::UnknownSession),
        "{made_up:?}"
    );
    let v = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!((v.job.state, v.job.attempt), (JobState::Scheduled, 0));

    // A real session, fresh from the fencing service.
    let reply = open_session(&client, "bot-real").await;

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
        stolen.error.as_ref().map(|e| e.code),
        Some(ErrorCode::UnknownSession)
    );
    let v = store.get(&other.id).await.unwrap().unwrap();
    assert_eq!((v.job.state, v.job.attempt), (JobState::Scheduled, 0));

    s.stop().await;
}
