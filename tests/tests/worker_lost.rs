//! SIGKILL a worker mid-job: its session expires, the job goes back to
//! SCHEDULED as `system/worker_lost` with a retry delay, waits it out (even
//! with another worker idle and asking), runs on that worker and finishes;
//! the history shows both attempts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use warden_e2e::{cli_ok, eventually, get_json, metrics_text, sample, NatsServer, Warden};

const CONFIG: &str = r#"
[fencing]
session_timeout = "1s"

[retry]
initial_delay = "3s"
jitter = 0.0
"#;

fn at(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_waits_its_delay_then_finishes_elsewhere() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("warden.toml");
    std::fs::write(&conf, CONFIG).unwrap();
    let warden = Warden::up(&url, CONFIG, 0);

    let mut a = warden_e2e::spawn_worker(&url, &conf, "bot-a");
    let id = cli_ok(&url, &["job", "submit", "sleep", "--arg", "seconds=3"])
        .trim()
        .to_string();
    let job_url = warden.url(&format!("/api/v1/jobs/{id}"));
    eventually(Duration::from_secs(30), "job RUNNING on bot-a", || async {
        let j = get_json(&job_url).await;
        (j["state"] == "RUNNING" && j["lease"]["bot_id"] == "bot-a").then_some(())
    })
    .await;
    a.kill().unwrap();
    a.wait().unwrap();
    let killed = Instant::now();
    // bot-b is idle and asking for work the whole time.
    let mut b = warden_e2e::spawn_worker(&url, &conf, "bot-b");

    let waiting = eventually(Duration::from_secs(10), "job back to SCHEDULED", || async {
        let j = get_json(&job_url).await;
        (j["state"] == "SCHEDULED").then_some(j)
    })
    .await;
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

    let job = eventually(Duration::from_secs(30), "job FINISHED on bot-b", || async {
        let j = get_json(&job_url).await;
        (j["state"] == "FINISHED").then_some(j)
    })
    .await;
    b.kill().unwrap();
    let _ = b.wait();

    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(job["lease"]["bot_id"], "bot-b", "{job}");
    assert!(
        job.get("blame").is_none(),
        "a new attempt clears the old failure: {job}"
    );
    let history = job["history"].as_array().unwrap();
    let requeue = history
        .iter()
        .find(|h| h["action"] == "requeue")
        .expect("a requeue entry");
    assert!(
        requeue["note"]
            .as_str()
            .unwrap()
            .starts_with("system/worker_lost: retry 1 of 3 in 3.0s"),
        "{requeue}"
    );
    assert_eq!(requeue["bot_id"], "bot-a");
    let dispatches: Vec<&serde_json::Value> = history
        .iter()
        .filter(|h| h["action"] == "dispatch")
        .collect();
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
    // The counters follow the write the API saw: poll.
    let metrics_url = warden.url("/metrics");
    eventually(Duration::from_secs(10), "lost worker counted", || async {
        let text = metrics_text(&metrics_url).await;
        want.iter()
            .all(|(s, n)| sample(&text, s) == Some(*n))
            .then_some(())
    })
    .await;
}
