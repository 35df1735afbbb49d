//! nats-server stops and comes back (same data dir) while jobs wait for a
//! delayed retry and others run: no job is lost, run twice or stuck. Every
//! one FINISHES, and each attempt ran exactly once (the task counts its
//! own executions in a file per job). The outage is shorter than the
//! session timeout, so running attempts keep their leases through it and
//! their reports, published while the bus was away, are delivered once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use warden_e2e::{eventually, get_json, never_within, NatsServer, Warden};

/// `flaky` fails twice with a third-party fault, then passes.
fn config(dir: &std::path::Path) -> String {
    format!(
        r#"
[fencing]
session_timeout = "6s"

[worker]
capacity = 4
shutdown_grace = "200ms"

[retry]
initial_delay = "3s"
jitter = 0.0
max_attempts = 5

[tasks.flaky]
command = ["sh", "-c", "f={dir}/$WARDEN_JOB_ID; n=$(cat $f 2>/dev/null || echo 0); echo $((n+1)) > $f; if [ $n -lt 2 ]; then echo '{{\"blame\":\"third_party\",\"detail\":\"network\",\"description\":\"koji hub timed out\"}}' > \"$WARDEN_STATUS_FILE\"; exit 3; fi"]

[tasks.slow]
command = ["sh", "-c", "f={dir}/$WARDEN_JOB_ID; n=$(cat $f 2>/dev/null || echo 0); echo $((n+1)) > $f; sleep 3"]
"#,
        dir = dir.display()
    )
}

async fn submit(client: &reqwest::Client, w: &Warden, task: &str) -> String {
    let resp = client
        .post(w.url("/api/v1/jobs"))
        .json(&json!({ "task": task }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let job: Value = resp.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

fn count(job: &Value, action: &str) -> usize {
    job["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["action"] == action)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_during_delayed_retries_and_running_jobs_loses_nothing() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let runs = tempfile::tempdir().unwrap();
    let warden = Warden::up(&url, &config(runs.path()), 2);
    let client = reqwest::Client::new();

    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(submit(&client, &warden, "flaky").await);
    }
    for _ in 0..6 {
        ids.push(submit(&client, &warden, "slow").await);
    }
    // Wait for both kinds of in-flight work: delayed retries and running.
    let list = warden.url("/api/v1/jobs?limit=100");
    eventually(
        Duration::from_secs(30),
        "jobs waiting for a retry while others run",
        || async {
            let jobs = get_json(&list).await;
            let jobs = jobs["jobs"].as_array()?.clone();
            let delayed = jobs
                .iter()
                .filter(|j| j["state"] == "SCHEDULED" && j["attempt"].as_u64() >= Some(1))
                .count();
            let running = jobs.iter().filter(|j| j["state"] == "RUNNING").count();
            (delayed >= 3 && running >= 2).then_some(())
        },
    )
    .await;
    nats.stop();
    // A 2 s outage: nothing answers on the bus's port all that time.
    let port = nats.port();
    never_within(
        Duration::from_secs(2),
        "the stopped bus listening",
        || async move { std::net::TcpStream::connect(("127.0.0.1", port)).ok() },
    )
    .await;
    nats.start_again();

    let mut finals = Vec::new();
    for id in &ids {
        let url = warden.url(&format!("/api/v1/jobs/{id}"));
        let job = eventually(Duration::from_secs(90), "job FINISHED", || async {
            let r = reqwest::get(&url).await.ok()?;
            let j: Value = r.json().await.ok()?;
            (j["state"] == "FINISHED").then_some(j)
        })
        .await;
        finals.push(job);
    }
    for job in &finals {
        let id = job["id"].as_str().unwrap();
        let attempt = job["attempt"].as_u64().unwrap() as usize;
        let ran: usize = std::fs::read_to_string(runs.path().join(id))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(job["outcome"], "passed", "{job:#}");
        assert_eq!(count(job, "finish"), 1, "{job:#}");
        assert_eq!(count(job, "dispatch"), attempt, "{job:#}");
        assert_eq!(ran, attempt, "each attempt ran exactly once: {job:#}");
        if job["task"] == "flaky" {
            assert_eq!(attempt, 3, "two retries, then it passed: {job:#}");
        } else {
            // The outage (2 s) is shorter than the session timeout: the
            // running attempts kept their leases and their reports landed.
            assert_eq!(attempt, 1, "a running job lost its lease: {job:#}");
        }
    }
}
