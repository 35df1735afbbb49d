//! Priorities: 200 low-priority jobs wait, then 5 high-priority ones are
//! submitted; every high one is dispatched before any low one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use warden_e2e::{eventually, get_json, NatsServer, Warden};

const CONFIG: &str = "[worker]\ncapacity = 1\n";

async fn submit(client: &reqwest::Client, w: &Warden, priority: i32) -> String {
    let resp = client
        .post(w.url("/api/v1/jobs"))
        .json(&json!({"task": "noop", "priority": priority}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let job: Value = resp.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

async fn dispatched_at(w: &Warden, id: &str) -> DateTime<Utc> {
    let job = get_json(&w.url(&format!("/api/v1/jobs/{id}"))).await;
    let d = job["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["action"] == "dispatch")
        .unwrap_or_else(|| panic!("never dispatched: {job:#}"));
    d["at"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jobs_overtake_every_waiting_low_one() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("warden.toml");
    std::fs::write(&conf, CONFIG).unwrap();
    let warden = Warden::up(&url, CONFIG, 0);
    let client = reqwest::Client::new();

    let mut low = Vec::new();
    for _ in 0..200 {
        low.push(submit(&client, &warden, 0).await);
    }
    let mut high = Vec::new();
    for _ in 0..5 {
        high.push(submit(&client, &warden, 10).await);
    }
    // One worker, one job at a time: dispatch order is the queue's order.
    let mut worker = warden_e2e::spawn_worker(&url, &conf, "only-bot");
    let finished = warden.url("/api/v1/jobs?state=FINISHED&limit=1");
    eventually(
        Duration::from_secs(120),
        "all 205 jobs FINISHED",
        || async { (get_json(&finished).await["total"] == 205).then_some(()) },
    )
    .await;
    let _ = worker.kill();
    let _ = worker.wait();

    let mut last_high = None;
    for id in &high {
        let t = dispatched_at(&warden, id).await;
        last_high = Some(last_high.map_or(t, |l: DateTime<Utc>| l.max(t)));
    }
    let last_high = last_high.unwrap();
    let mut first_low: Option<DateTime<Utc>> = None;
    for id in &low {
        let t = dispatched_at(&warden, id).await;
        first_low = Some(first_low.map_or(t, |f| f.min(t)));
    }
    let first_low = first_low.unwrap();
    assert!(
        last_high < first_low,
        "last high-priority dispatch {last_high} is not before the first low one {first_low}"
    );
    // Within a priority, oldest first: the low jobs ran in submission order.
    let mut times = Vec::new();
    for id in low.iter().take(20) {
        times.push(dispatched_at(&warden, id).await);
    }
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
}
