//! A finished attempt whose final report waits for the bus (the reports
//! stream took no writes for a while, as when its leader is being
//! elected after a NATS restart) keeps its lease listed in the worker's
//! heartbeats until the report is acknowledged. Before, the worker stopped
//! listing the lease the moment the task ended; the orphan sweep then saw
//! heartbeats without it, took it back as a grant that never arrived, and
//! the job ran a second time while the first run's report was rejected as
//! stale (chaos showed three such jobs after a restart of all three NATS
//! nodes).
//!
//! The services and the worker run in this process; the test makes the
//! reports stream refuse the worker's report by moving the stream off the
//! report subjects, and puts it back after several sweeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{eventually, never_within, InProcess};
use warden_shared::job::Job;
use warden_shared::{subjects, Action, JobState};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_attempt_whose_report_waits_keeps_its_lease() {
    let mut s = InProcess::start(
        "[fencing]\nsession_timeout = \"2s\"\n[worker]\nbot_id = \"slow-reporter\"\n",
    )
    .await;
    s.spawn(warden_fencing::run);
    s.spawn(warden_scheduler::run);
    s.spawn(warden_worker::run);
    let (store, js) = (
        s.store.clone(),
        async_nats::jetstream::new(s.client.clone()),
    );
    let job = Job::builder("sleep").arg("seconds", "1").build();
    store.create(&job).await.unwrap();
    eventually(Duration::from_secs(30), "job RUNNING and started", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state == JobState::Running
                && j.lease.as_ref().is_some_and(|l| l.started_at.is_some()))
            .then_some(())
        }
    })
    .await;

    // The stream stops taking reports: the final one is refused and
    // retried.
    let mut stream = js
        .get_stream(subjects::REPORTS_STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    let subjects_before = stream.subjects.clone();
    stream.subjects = vec![format!("{}-detached.>", subjects::REPORTS_PREFIX)];
    js.update_stream(&stream).await.unwrap();
    let retries = &warden_worker::metrics::metrics().report_retries;
    let before = retries.get();
    eventually(
        Duration::from_secs(30),
        "the final report refused",
        || async { (retries.get() > before).then_some(()) },
    )
    .await;

    // Six session timeouts of heartbeats and three orphan sweeps a
    // timeout: the lease is not taken back.
    never_within(Duration::from_secs(12), "the lease taken back", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state != JobState::Running || j.attempt != 1).then_some(j.state)
        }
    })
    .await;

    stream.subjects = subjects_before;
    js.update_stream(&stream).await.unwrap();
    let done = eventually(Duration::from_secs(30), "job FINISHED", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state == JobState::Finished).then_some(j)
        }
    })
    .await;
    assert_eq!(done.attempt, 1, "{:?}", done.history);
    assert!(
        !done.history.iter().any(|h| h.action == Action::Requeue),
        "{:?}",
        done.history
    );
    s.stop().await;
}
