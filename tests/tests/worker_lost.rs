//! SIGKILL a worker mid-job: its session expires, the job goes back to
//! SCHEDULED as `system/worker_lost` with a retry delay, waits it out (even
//! with another worker idle and asking), runs on that worker and finishes;
//! the history shows both attempts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use warden_e2e::{at, entries, entry, Scenario};

const CONFIG: &str = r#"
[fencing]
session_timeout = "1s"

[retry]
initial_delay = "3s"
jitter = 0.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_waits_its_delay_then_finishes_elsewhere() {
    let s = Scenario::new().config(CONFIG).up();

    let mut a = s.worker("bot-a");
    let id = s.submit(&["sleep", "--arg", "seconds=3"]);
    s.wait_running_on(&id, "bot-a").await;
    a.kill().unwrap();
    a.wait().unwrap();
    let killed = Instant::now();
    // bot-b is idle and asking for work the whole time.
    let b = s.worker("bot-b");

    let waiting = s.wait_job(&id, "SCHEDULED", Duration::from_secs(10)).await;
    // Session timeout 1 s, swept at a fraction of it: well within 3 s.
    assert!(
        killed.elapsed() < Duration::from_secs(4),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(waiting["blame"], "system", "{waiting}");
    assert_eq!(waiting["detail"], "worker_lost", "{waiting}");
    assert_eq!(waiting["lost_workers"], serde_json::json!(["bot-a"]));
    let not_before = at(&waiting["not_before"]);

    let job = s.wait_job(&id, "FINISHED", Duration::from_secs(30)).await;
    drop(b);

    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(job["lease"]["bot_id"], "bot-b", "{job}");
    assert!(
        job.get("blame").is_none(),
        "a new attempt clears the old failure: {job}"
    );
    let requeue = entry(&job, "requeue");
    assert!(
        requeue["note"]
            .as_str()
            .unwrap()
            .starts_with("system/worker_lost: retry 1 of 3 in 3.0s"),
        "{requeue}"
    );
    assert_eq!(requeue["bot_id"], "bot-a");
    let dispatches = entries(&job, "dispatch");
    let to: Vec<&str> = dispatches
        .iter()
        .map(|h| h["bot_id"].as_str().unwrap())
        .collect();
    assert_eq!(to, ["bot-a", "bot-b"]);
    let second = at(&dispatches[1]["at"]);
    assert!(
        second >= not_before,
        "dispatched at {second}, before its retry time {not_before}"
    );
    assert!(
        second - at(&requeue["at"]) >= chrono::Duration::seconds(3),
        "the retry did not wait its delay"
    );

    // The lost worker's attempt is a system crash to the scheduler; the
    // second attempt ended FINISHED; every service of the process has its
    // own connection state.
    let want = [
        (
            r#"warden_scheduler_crashes_total{blame="system",detail="worker_lost"}"#,
            1.0,
        ),
        (
            r#"warden_scheduler_leases_requeued_total{reason="worker_lost"}"#,
            1.0,
        ),
        (r#"warden_scheduler_retries_total{blame="system"}"#, 1.0),
        (
            r#"warden_scheduler_job_duration_seconds_count{state="FINISHED"}"#,
            1.0,
        ),
        (r#"warden_nats_connected{service="scheduler"}"#, 1.0),
        (r#"warden_nats_connected{service="fencing"}"#, 1.0),
    ];
    s.wait_samples("lost worker counted", Duration::from_secs(10), &want)
        .await;
}
