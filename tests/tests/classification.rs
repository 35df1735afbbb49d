//! Real failures, classified end to end: a task that runs out of memory
//! under a limit, one that writes to a full device, one whose DNS lookup
//! fails and one that raises a Python exception each end with the right
//! blame and detail; the third-party one is retried per policy, the task
//! one is not and its owners are notified.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use warden_e2e::{cli_ok, entry, Scenario, Stack};

const CONFIG: &str = r#"
[retry]
max_attempts = 2
initial_delay = "200ms"
jitter = 0.0

# Allocates until the address-space limit stops it: Python's MemoryError.
[tasks.hog]
command = ["sh", "-c", "ulimit -v 300000; exec python3 -c 'a = []\nwhile True: a.append(bytearray(10**7))'"]

# /dev/full answers every write with ENOSPC, as a full disk does.
[tasks.fill]
command = ["sh", "-c", "echo 'writing results' && cp /etc/hostname /dev/full"]

# A name in the reserved .invalid domain never resolves.
[tasks.lookup]
command = ["python3", "-c", "import socket; socket.getaddrinfo('koji.nonexistent.invalid', 443)"]

[tasks.buggy]
command = ["python3", "-c", "def check(nvr):\n    return nvr.split('-')[3]\ncheck('bash-5.2')"]
owners = ["qa-team@example.org"]
"#;

async fn ended(s: &Stack, id: &str) -> Value {
    s.wait_job_where(id, "job ended", Duration::from_secs(60), |j| {
        matches!(
            j["state"].as_str(),
            Some("CRASHED" | "SHELVED" | "FINISHED")
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_failures_get_the_right_blame_detail_and_policy() {
    let s = Scenario::new().config(CONFIG).workers(2).up();
    let url = s.url();
    let submit = |task: &str| s.submit(&[task]);
    let (hog, fill, lookup, buggy) = (
        submit("hog"),
        submit("fill"),
        submit("lookup"),
        submit("buggy"),
    );

    for (id, state, blame, detail, attempts) in [
        (&hog, "CRASHED", "system", "oom", 1),
        (&fill, "CRASHED", "system", "disk_full", 1),
        (&lookup, "SHELVED", "third_party", "network", 2),
        (&buggy, "CRASHED", "task", "task_exception", 1),
    ] {
        let job = ended(&s, id).await;
        assert_eq!(job["state"], state, "{job:#}");
        assert_eq!(job["blame"], blame, "{job:#}");
        assert_eq!(job["detail"], detail, "{job:#}");
        assert_eq!(job["attempt"], attempts, "{job:#}");
        let crash = entry(&job, "crash");
        assert!(
            crash["note"].as_str().unwrap().contains("(rule "),
            "the rule that decided is recorded: {crash}"
        );
    }

    // Search and statistics by blame and detail.
    let found: Vec<Value> = serde_json::from_str(&cli_ok(
        &url,
        &[
            "job",
            "list",
            "--blame",
            "task",
            "--detail",
            "task_exception",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["id"], buggy.as_str());
    let http = s.get("/api/v1/jobs?blame=system&limit=10").await;
    assert_eq!(http["total"], 2, "oom and disk_full: {http:#}");
    let stats: Value =
        serde_json::from_str(&cli_ok(&url, &["stats", "--window", "1h", "--json"])).unwrap();
    assert_eq!(stats["jobs"], 4, "{stats:#}");
    assert_eq!(stats["by_blame"]["system"], 2, "{stats:#}");
    assert_eq!(stats["by_detail"]["third_party/network"], 1, "{stats:#}");
    assert_eq!(stats["by_detail"]["task/task_exception"], 1, "{stats:#}");
    assert_eq!(stats["shelved"], 1);
    assert_eq!(stats["retried"], 1);
    let bad = reqwest::get(s.warden.url("/api/v1/stats?window=forever"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad = reqwest::get(s.warden.url("/api/v1/jobs?blame=gremlins"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // The task's owners were told about the task's own bug; operators
    // about the rest; nobody twice.
    let (client, js) = warden_e2e::js(&url).await;
    let stream = js
        .get_stream(warden_shared::subjects::NOTIFY_STREAM)
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "warden.notify.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut notes = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        let n: Value = serde_json::from_slice(&m.payload).unwrap();
        notes.push((m.subject.to_string(), n));
    }
    let owners: Vec<&(String, Value)> = notes
        .iter()
        .filter(|(s, _)| s == "warden.notify.owners")
        .collect();
    assert_eq!(owners.len(), 1, "{notes:#?}");
    assert_eq!(owners[0].1["job_id"], buggy.as_str());
    assert_eq!(
        owners[0].1["recipients"],
        serde_json::json!(["qa-team@example.org"])
    );
    assert_eq!(owners[0].1["detail"], "task_exception");
    // hog, fill, and both attempts of lookup.
    let operators = notes
        .iter()
        .filter(|(s, _)| s == "warden.notify.operators")
        .count();
    assert_eq!(operators, 4, "{notes:#?}");
    drop(client);

    // The scheduler counted each crash it wrote once, under the blame and
    // detail it wrote (lookup crashed twice); details nothing hit are
    // exported at 0.
    let want: Vec<(String, f64)> = [
        ("system", "oom", 1.0),
        ("system", "disk_full", 1.0),
        ("third_party", "network", 2.0),
        ("task", "task_exception", 1.0),
        ("system", "setup_failed", 0.0),
        ("system", "worker_lost", 0.0),
    ]
    .into_iter()
    .map(|(blame, detail, n)| {
        (
            format!("warden_scheduler_crashes_total{{blame=\"{blame}\",detail=\"{detail}\"}}"),
            n,
        )
    })
    .chain([(
        r#"warden_scheduler_job_duration_seconds_count{state="CRASHED"}"#.to_string(),
        5.0,
    )])
    .collect();
    let want: Vec<(&str, f64)> = want.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    s.wait_samples("crashes counted", Duration::from_secs(10), &want)
        .await;
}
