//! A crash's events (notify, suspect) must not be lost when their publish
//! fails after the crash is written: the report is not acked, and its
//! redelivery, recognised as a duplicate of the recorded crash, publishes
//! them again. Here the WARDEN_NOTIFY stream is deleted while the crash is
//! written and recreated afterwards; the suspect event still arrives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::Utc;
use warden_e2e::{eventually, InProcess};
use warden_shared::job::{CrashInfo, HistoryEntry, Job, Lease};
use warden_shared::messages::{Report, ReportKind, ResourceSuspect};
use warden_shared::{runtime, subjects, Action, JobState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspect_event_arrives_after_its_first_publish_failed() {
    let mut s = InProcess::start("").await;
    s.spawn(warden_scheduler::run);
    s.spawn(warden_classifier::service::run);
    let (client, js, store, config) = (
        s.client.clone(),
        s.handles.js.clone(),
        s.store.clone(),
        s.config.clone(),
    );

    // A job running on host-a (with a working copy), attempt 1.
    let now = Utc::now();
    let mut job = Job::builder("sleep").at(now).build();
    job.state = JobState::Running;
    job.attempt = 1;
    job.lease = Some(Lease {
        session: "s1".into(),
        bot_id: "bot-a".into(),
        resource: Some("host-a".into()),
        resources: vec!["host-a".into(), "wc-a".into()],
        epoch: 1,
        leased_at: now,
        started_at: Some(now),
        secret_hash: None,
    });
    job.push_history(HistoryEntry {
        at: now,
        action: Action::Dispatch,
        attempt: 1,
        from: Some(JobState::Scheduled),
        to: Some(JobState::Running),
        actor: "s1".into(),
        bot_id: Some("bot-a".into()),
        resource: Some("host-a".into()),
        note: None,
    });
    store.create(&job).await.unwrap();
    // The scheduler is up (it made its streams) before the stream goes.
    eventually(Duration::from_secs(20), "the scheduler answers", || {
        let client = client.clone();
        async move {
            client
                .request(subjects::SCHED_QUEUE, "{}".into())
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;

    // The events' stream is gone while the crash is written.
    js.delete_stream(subjects::NOTIFY_STREAM).await.unwrap();
    let report = Report {
        version: 1,
        job_id: job.id,
        session: "s1".into(),
        bot_id: "bot-a".into(),
        epoch: 1,
        at: Utc::now(),
        secret: None,
        kind: ReportKind::Crashed {
            crash: CrashInfo {
                exit_code: Some(1),
                log_tail: "write: No space left on device\n".into(),
                duration_ms: 10,
                ..Default::default()
            },
            fault: None,
        },
    };
    runtime::publish_with_id(
        &js,
        subjects::bot_report_subject(&report.bot_id, &job.id),
        &report.msg_id(),
        &report,
    )
    .await
    .unwrap();
    let written = eventually(Duration::from_secs(30), "the crash written", || {
        let store = store.clone();
        async move {
            let j = store.get(&job.id).await.ok()??.job;
            (j.state != JobState::Running).then_some(j)
        }
    })
    .await;
    assert_eq!(written.detail.as_deref(), Some("disk_full"), "{written:#?}");

    // The stream comes back; the suspect of every resource arrives.
    js.create_stream(config.topology().notify_stream())
        .await
        .unwrap();
    for resource in ["host-a", "wc-a"] {
        let suspect = eventually(
            Duration::from_secs(30),
            &format!("the suspect event of {resource}"),
            || {
                let js = js.clone();
                async move {
                    let stream = js.get_stream(subjects::NOTIFY_STREAM).await.ok()?;
                    let msg = stream
                        .get_last_raw_message_by_subject(&subjects::suspect_subject(resource))
                        .await
                        .ok()?;
                    serde_json::from_slice::<ResourceSuspect>(&msg.payload).ok()
                }
            },
        )
        .await;
        assert_eq!(
            (suspect.job_id, suspect.attempt, suspect.detail.as_str()),
            (job.id, 1, "disk_full")
        );
        assert_eq!(suspect.leased_at, Some(now));
    }

    s.stop().await;
}
