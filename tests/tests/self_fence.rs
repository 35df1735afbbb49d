//! A worker that loses the bus past its session timeout kills its task
//! (self-fencing). Its report reaches the scheduler while the session is
//! still current in the store (the fencing service is down, so nothing
//! expired it): the kill is Warden's, never the task's crash, so the job is
//! retried as `system/worker_lost`, not CRASHED with `unknown` blame.
//!
//! The services run in this process: the fencing service is stopped to cut
//! the worker off (its heartbeats go unanswered), while the scheduler and
//! the reports stream stay reachable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warden_e2e::{eventually, NatsServer};
use warden_shared::job::{Blame, Job};
use warden_shared::session::{bot_key, session_key, Session, SessionState};
use warden_shared::store::JobStore;
use warden_shared::{runtime, Action, Config, JobState};

fn config(nats: &str, extra: &str) -> Arc<Config> {
    warden_e2e::config(
        nats,
        &format!("[retry]\ninitial_delay = \"30s\"\njitter = 0.0\n{extra}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_self_fenced_kill_is_a_lost_worker_not_the_tasks_crash() {
    let nats = NatsServer::start();
    let url = nats.url();
    // The services would wait a minute before expiring the session; the
    // worker fences itself after one second of silence.
    let services = config(&url, "[fencing]\nsession_timeout = \"60s\"\n");
    let worker = config(
        &url,
        "[fencing]\nsession_timeout = \"1s\"\n[worker]\nbot_id = \"fenced-bot\"\n",
    );
    let fencing_stop = CancellationToken::new();
    let stop = CancellationToken::new();
    let fencing = tokio::spawn(warden_fencing::run(services.clone(), fencing_stop.clone()));
    let scheduler = tokio::spawn(warden_scheduler::run(services.clone(), stop.clone()));
    let classifier = tokio::spawn(warden_classifier::service::run(
        services.clone(),
        stop.clone(),
    ));
    let agent = tokio::spawn(warden_worker::run(worker, stop.clone()));

    let (_client, handles) = runtime::Connect::new(&services, "test")
        .topology_forever()
        .await
        .unwrap();
    let store = JobStore::new(handles.jobs.clone());
    let job = Job::builder("sleep").arg("seconds", "120").build();
    store.create(&job).await.unwrap();
    let running = eventually(Duration::from_secs(30), "job RUNNING and started", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state == JobState::Running
                && j.lease.as_ref().is_some_and(|l| l.started_at.is_some()))
            .then_some(j)
        }
    })
    .await;
    let session = running.lease.unwrap().session;

    // Cut the worker off: nobody answers its heartbeats any more.
    fencing_stop.cancel();
    fencing.await.unwrap().unwrap();

    let ended = eventually(Duration::from_secs(30), "job no longer RUNNING", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state != JobState::Running).then_some(j)
        }
    })
    .await;
    // The report came while the session was still current.
    let kv = handles.sessions.clone();
    let rec = kv.get(session_key(&session)).await.unwrap().unwrap();
    let s: Session = serde_json::from_slice(&rec).unwrap();
    assert_eq!(s.state, SessionState::Active);
    let current = kv.get(bot_key("fenced-bot")).await.unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&current).unwrap(), session);

    assert_eq!(ended.state, JobState::Scheduled, "{ended:#?}");
    assert_eq!(
        (ended.blame, ended.detail.as_deref()),
        (Some(Blame::System), Some("worker_lost")),
        "{ended:#?}"
    );
    assert!(ended.not_before.is_some(), "retried after the delay");
    assert_eq!(ended.lost_workers, vec!["fenced-bot".to_string()]);
    assert!(
        !ended.history.iter().any(|h| h.action == Action::Crash),
        "no crash recorded: {:#?}",
        ended.history
    );
    let requeue = ended.history.last().unwrap();
    assert_eq!(
        (requeue.action, requeue.actor.as_str()),
        (Action::Requeue, session.as_str())
    );
    assert!(
        ended
            .description
            .as_deref()
            .is_some_and(|d| d.contains("self_fenced")),
        "{:?}",
        ended.description
    );

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), scheduler).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), classifier).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), agent).await;
}

/// A worker whose heartbeats go unanswered (the fencing service gone,
/// the rest of the bus fine) stops its tasks before its session could
/// expire: within one session timeout of the last heartbeat the fencing
/// service recorded. Stopping only once its own count of silence passed
/// the timeout is too late: it counts from when the answer arrived, and
/// looks only after a heartbeat attempt gave up, so a replica of the
/// fencing service may already have expired the session and the
/// scheduler leased the job again while the task still ran (chaos seed
/// 3865010753: attempt 1 still running 1.5 s after attempt 2 started).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_stops_its_task_before_its_session_could_expire() {
    const TIMEOUT: Duration = Duration::from_secs(8);
    let nats = NatsServer::start();
    let url = nats.url();
    let services = config(&url, "[fencing]\nsession_timeout = \"60s\"\n");
    let worker = config(
        &url,
        "[fencing]\nsession_timeout = \"8s\"\n[worker]\nbot_id = \"cutoff-bot\"\n",
    );
    let fencing_stop = CancellationToken::new();
    let stop = CancellationToken::new();
    let fencing = tokio::spawn(warden_fencing::run(services.clone(), fencing_stop.clone()));
    let scheduler = tokio::spawn(warden_scheduler::run(services.clone(), stop.clone()));
    let classifier = tokio::spawn(warden_classifier::service::run(
        services.clone(),
        stop.clone(),
    ));
    let agent = tokio::spawn(warden_worker::run(worker, stop.clone()));

    let (_client, handles) = runtime::Connect::new(&services, "test")
        .topology_forever()
        .await
        .unwrap();
    let store = JobStore::new(handles.jobs.clone());
    let job = Job::builder("sleep").arg("seconds", "120").build();
    store.create(&job).await.unwrap();
    let running = eventually(Duration::from_secs(30), "job RUNNING and started", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state == JobState::Running
                && j.lease.as_ref().is_some_and(|l| l.started_at.is_some()))
            .then_some(j)
        }
    })
    .await;
    let session = running.lease.unwrap().session;

    fencing_stop.cancel();
    fencing.await.unwrap().unwrap();
    // The last heartbeat the fencing service recorded: a replica of it
    // would expire the session one timeout later.
    let rec = handles
        .sessions
        .get(session_key(&session))
        .await
        .unwrap()
        .unwrap();
    let last_heartbeat = serde_json::from_slice::<Session>(&rec)
        .unwrap()
        .last_heartbeat;

    let ended = eventually(Duration::from_secs(30), "job no longer RUNNING", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state != JobState::Running).then_some(j)
        }
    })
    .await;
    let stopped_at = ended.history.last().unwrap().at;
    let after = (stopped_at - last_heartbeat).to_std().unwrap();
    println!("stopped {after:?} after the last recorded heartbeat (timeout {TIMEOUT:?})");
    assert!(
        after < TIMEOUT,
        "the task was stopped {after:?} after the last recorded heartbeat: \
         the session could have expired {TIMEOUT:?} after it"
    );
    assert!(
        ended
            .description
            .as_deref()
            .is_some_and(|d| d.contains("self_fenced")),
        "{:?}",
        ended.description
    );

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), scheduler).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), classifier).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), agent).await;
}
