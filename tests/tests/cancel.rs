//! `warden job cancel` on a running job: CANCELLED at once, the worker is
//! told to stop the task at its next heartbeat, the stopped attempt's
//! report is recorded as the cancelled attempt's (not as a stale bot), and
//! the freed slot runs the next job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use warden_e2e::{cli, cli_ok, entry, eventually, Scenario};

const CONFIG: &str = r#"
[fencing]
session_timeout = "1500ms"

[worker]
capacity = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_its_task_and_frees_the_worker() {
    let s = Scenario::new().config(CONFIG).workers(1).up();
    let url = s.url();

    let id = s.submit(&["sleep", "--arg", "seconds=60"]);
    s.wait_job(&id, "RUNNING", Duration::from_secs(30)).await;
    let cancelled_at = Instant::now();
    let out = cli_ok(
        &url,
        &[
            "job",
            "cancel",
            &id,
            "--reason",
            "superseded by a newer build",
        ],
    );
    assert!(out.contains("CANCELLED"), "{out}");

    // The task is stopped long before its 60 s, and its report recorded.
    let job = eventually(
        Duration::from_secs(15),
        "the stopped attempt's report",
        || async {
            let j = s.job(&id).await;
            let seen = j["history"].as_array()?.iter().any(|h| {
                h["action"] == "reject_report"
                    && h["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("report after cancel"))
            });
            seen.then_some(j)
        },
    )
    .await;
    assert!(cancelled_at.elapsed() < Duration::from_secs(15));
    assert_eq!(job["state"], "CANCELLED", "{job:#}");
    let cancel = entry(&job, "cancel");
    assert_eq!(cancel["from"], "RUNNING");
    assert_eq!(cancel["note"], "superseded by a newer build");

    // The one slot is free again.
    s.assert_noop_passes();

    // Cancelling again is refused and changes nothing.
    let again = cli(&url, &["job", "cancel", &id]);
    assert_eq!(again.status.code(), Some(1));
    let metrics = s.metrics().await;
    // Every rejection reason is exported from the start, all still at 0.
    let rejected: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("warden_scheduler_reports_rejected_total{"))
        .collect();
    assert!(!rejected.is_empty(), "{metrics}");
    assert!(
        rejected.iter().all(|l| l.ends_with(" 0")),
        "a cancelled attempt's report is not a rejection:\n{metrics}"
    );
}
