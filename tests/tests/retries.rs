//! The retry policy end to end, with real processes: a task that always
//! fails with a retryable third-party fault is retried up to its limit
//! with growing delays, then SHELVED; `warden job retry` gives it a fresh
//! budget. A task-blamed crash is not retried at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;
use warden_e2e::{at, cli, cli_ok, entries, never_within, wait_job_where, Scenario, Warden};

const CONFIG: &str = r#"
[retry]
max_attempts = 3
initial_delay = "1s"
backoff = 2.0
max_delay = "1m"
jitter = 0.0

# What a mirror outage looks like from inside a task: curl cannot resolve
# the host, and the task says so in its status file.
[tasks.mirror]
command = ["sh", "-c", "echo 'curl: (6) Could not resolve host: mirrors.fedoraproject.org' >&2; echo '{\"blame\":\"third_party\",\"detail\":\"network\",\"description\":\"mirror unreachable\"}' > \"$WARDEN_STATUS_FILE\"; exit 3"]

[tasks.broken]
command = ["sh", "-c", "echo '{\"blame\":\"task\",\"detail\":\"task_exception\",\"description\":\"NameError in the test\"}' > \"$WARDEN_STATUS_FILE\"; exit 3"]
"#;

async fn wait_state(w: &Warden, id: &str, state: &str, attempt: u64) -> Value {
    wait_job_where(
        w,
        id,
        &format!("job {state} at attempt {attempt}"),
        Duration::from_secs(60),
        |j| j["state"] == state && j["attempt"] == attempt,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_failures_retry_to_the_limit_then_shelve_and_retry_by_hand() {
    let s = Scenario::new().config(CONFIG).workers(1).up();
    let (url, warden) = (s.url(), &s.warden);

    let id = s.submit(&["mirror"]);
    let job = wait_state(warden, &id, "SHELVED", 3).await;
    assert_eq!(job["blame"], "third_party", "{job:#}");
    assert_eq!(job["detail"], "network");
    assert_eq!(job["description"], "mirror unreachable");
    assert_eq!(entries(&job, "crash").len(), 3, "{job:#}");
    assert_eq!(entries(&job, "dispatch").len(), 3);
    assert_eq!(entries(&job, "shelve").len(), 1);
    let retries = entries(&job, "retry");
    assert_eq!(retries.len(), 2, "exactly up to the limit: {job:#}");
    assert!(retries.iter().all(|r| r["actor"] == "retry-policy"));

    // Each retry waited at least its delay, and the second longer.
    let dispatches = entries(&job, "dispatch");
    let waited: Vec<chrono::Duration> = (0..2)
        .map(|i| at(&dispatches[i + 1]["at"]) - at(&retries[i]["at"]))
        .collect();
    assert!(waited[0] >= chrono::Duration::seconds(1), "{waited:?}");
    assert!(waited[1] >= chrono::Duration::seconds(2), "{waited:?}");
    assert!(waited[1] > waited[0], "delays grow: {waited:?}");
    assert!(retries[1]["note"]
        .as_str()
        .unwrap()
        .contains("retry 2 of 2 in 2.0s"));

    // A person retries it: a fresh budget of three attempts.
    let line = cli_ok(&url, &["job", "retry", &id]);
    assert!(line.contains(&id), "{line}");
    let again = wait_state(warden, &id, "SHELVED", 6).await;
    let by_hand: Vec<&Value> = entries(&again, "retry")
        .into_iter()
        .filter(|r| r["actor"] != "retry-policy")
        .collect();
    assert_eq!(by_hand.len(), 1, "{again:#}");
    assert_eq!(by_hand[0]["from"], "SHELVED");
    assert_eq!(entries(&again, "crash").len(), 6);

    // Retrying a job that is not shelved, crashed or cancelled is refused.
    let noop = cli_ok(&url, &["job", "submit", "noop", "--wait"])
        .lines()
        .next()
        .unwrap()
        .to_string();
    let out = cli(&url, &["job", "retry", &noop]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("illegal transition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let metrics = s.metrics().await;
    for line in [
        "warden_scheduler_retries_total{blame=\"third_party\"} 4",
        "warden_scheduler_shelved_total{reason=\"retries_exhausted\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_blamed_crash_is_not_retried_and_an_opted_out_job_is_not_either() {
    let s = Scenario::new().config(CONFIG).workers(1).up();
    let warden = &s.warden;

    let broken = s.submit(&["broken"]);
    let opted_out = s.submit(&["mirror", "--no-retry"]);
    for id in [&broken, &opted_out] {
        let job = wait_state(warden, id, "CRASHED", 1).await;
        // Stays CRASHED: give the policy time to (wrongly) act.
        never_within(
            Duration::from_millis(1500),
            "a CRASHED job retried",
            || async {
                let j = s.job(id).await;
                (j["state"] != "CRASHED" || j["attempt"] != 1).then_some(j)
            },
        )
        .await;
        let later = s.job(id).await;
        assert_eq!(later["state"], "CRASHED", "{later:#}");
        assert_eq!(later["attempt"], 1);
        assert!(entries(&job, "retry").is_empty());
    }
}
