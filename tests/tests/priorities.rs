//! Priorities: 200 low-priority jobs wait, then 5 high-priority ones are
//! submitted; every high one is dispatched before any low one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use warden_e2e::{entry, eventually, Scenario, Stack};

const CONFIG: &str = "[worker]\ncapacity = 1\n";

async fn submit(client: &reqwest::Client, s: &Stack, priority: i32) -> String {
    let resp = client
        .post(s.warden.url("/api/v1/jobs"))
        .json(&json!({"task": "noop", "priority": priority}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let job: Value = resp.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

async fn dispatched_at(s: &Stack, id: &str) -> DateTime<Utc> {
    let job = s.job(id).await;
    warden_e2e::at(&entry(&job, "dispatch")["at"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jobs_overtake_every_waiting_low_one() {
    let s = Scenario::new().config(CONFIG).up();
    let client = reqwest::Client::new();

    let mut low = Vec::new();
    for _ in 0..200 {
        low.push(submit(&client, &s, 0).await);
    }
    let mut high = Vec::new();
    for _ in 0..5 {
        high.push(submit(&client, &s, 10).await);
    }
    // One worker, one job at a time: dispatch order is the queue's order.
    let worker = s.worker("only-bot");
    eventually(
        Duration::from_secs(120),
        "all 205 jobs FINISHED",
        || async {
            (s.get("/api/v1/jobs?state=FINISHED&limit=1").await["total"] == 205).then_some(())
        },
    )
    .await;
    drop(worker);

    let mut last_high = None;
    for id in &high {
        let t = dispatched_at(&s, id).await;
        last_high = Some(last_high.map_or(t, |l: DateTime<Utc>| l.max(t)));
    }
    let last_high = last_high.unwrap();
    let mut first_low: Option<DateTime<Utc>> = None;
    for id in &low {
        let t = dispatched_at(&s, id).await;
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
        times.push(dispatched_at(&s, id).await);
    }
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
}
