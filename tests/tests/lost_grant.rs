//! A lease the scheduler wrote but whose grant never reached the worker
//! (the acquire reply lost with a connection, or the write acknowledged
//! too late) is taken back once the session's heartbeats show it does
//! not hold it: the job is SCHEDULED again, the attempt not counted.
//! Before, the job stayed RUNNING for as long as the session lived.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{acquire_request, open_session, try_acquire, InProcess};
use warden_shared::job::Job;
use warden_shared::messages::Heartbeat;
use warden_shared::{subjects, JobState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_never_reached_its_worker_is_taken_back() {
    let mut s = InProcess::start("[fencing]\nsession_timeout = \"4s\"\n").await;
    s.spawn(warden_scheduler::run);
    s.spawn(warden_fencing::run);
    let (client, store) = (s.client.clone(), s.store.clone());
    let job = Job::builder("noop").build();
    store.create(&job).await.unwrap();
    let session = open_session(&client, "bot-deaf").await;
    // The scheduler leases the job; the "worker" never learns of it (its
    // reply is dropped here, as a lost connection would).
    let req = acquire_request(&session, "bot-deaf", 1);
    warden_e2e::eventually(Duration::from_secs(20), "the job leased", || async {
        let r = try_acquire(&client, &req).await?;
        (!r.leases.is_empty()).then_some(())
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
                        subjects::session_heartbeat_subject("bot-deaf"),
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
