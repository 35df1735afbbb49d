//! The search index follows writes other services make to the bucket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use chrono::Utc;
use common::Api;
use serde_json::Value;
use warden_shared::job::{HistoryEntry, Lease};
use warden_shared::state::transition;
use warden_shared::{Action, Job};
use warden_testsupport::eventually;

async fn list(api: &Api, q: &str) -> Value {
    let r = api
        .http
        .get(api.url(&format!("/api/v1/jobs{q}")))
        .send()
        .await
        .expect("send");
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.expect("json")
}

fn ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test]
async fn writes_by_other_services_show_up_in_searches() {
    let mut api = Api::start().await;
    let store = api.store().await;

    // A job the trigger made, straight into the bucket.
    let now = Utc::now();
    let job = Job::builder("build")
        .pool("builders")
        .actor("trigger")
        .at(now)
        .build();
    store.create(&job).await.expect("create");
    let id = job.id.to_string();
    eventually(Duration::from_secs(5), "job indexed", || async {
        let v = list(&api, "?state=scheduled").await;
        ids(&v).contains(&id).then_some(())
    })
    .await;

    // The scheduler dispatches it.
    let mut v = store.get(&job.id).await.expect("get").expect("exists");
    let to = transition(v.job.state, Action::Dispatch).expect("legal");
    let at = Utc::now();
    v.job.push_history(HistoryEntry {
        at,
        action: Action::Dispatch,
        attempt: 1,
        from: Some(v.job.state),
        to: Some(to),
        actor: "scheduler".into(),
        bot_id: Some("bot-1".into()),
        resource: None,
        note: None,
    });
    v.job.state = to;
    v.job.attempt = 1;
    v.job.lease = Some(Lease {
        session: "s1".into(),
        bot_id: "bot-1".into(),
        resource: None,
        resources: Vec::new(),
        epoch: 1,
        leased_at: at,
        started_at: None,
        secret_hash: None,
    });
    v.job.updated_at = at;
    store.update(&v.job, v.revision).await.expect("update");

    let running = eventually(Duration::from_secs(5), "state change indexed", || async {
        let v = list(&api, "?state=RUNNING").await;
        ids(&v).contains(&id).then_some(v)
    })
    .await;
    assert_eq!(running["total"], 1);
    assert_eq!(running["jobs"][0]["bot_id"], "bot-1");
    assert_eq!(list(&api, "?state=scheduled").await["total"], 0);

    // Deleted keys leave the index.
    store.kv().delete(&id).await.expect("delete");
    eventually(Duration::from_secs(5), "deletion indexed", || async {
        (list(&api, "").await["total"] == 0).then_some(())
    })
    .await;
    api.stop().await;
}

#[tokio::test]
async fn index_is_rebuilt_from_the_bucket_at_start() {
    let mut api = Api::start().await;
    let store = api.store().await;
    let mut made = Vec::new();
    for i in 0..25 {
        let job = Job::builder(if i % 2 == 0 { "build" } else { "noop" })
            .actor("trigger")
            .build();
        store.create(&job).await.expect("create");
        made.push(job.id.to_string());
    }
    // A second API instance on the same bus starts with a full bucket and
    // must report every job on its first search.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(warden_api::serve(
        api.config.clone(),
        listener,
        shutdown.clone(),
    ));
    let url = format!("http://{addr}/api/v1/jobs?limit=1000");
    let first = eventually(Duration::from_secs(20), "second api answers", || async {
        let r = api.http.get(&url).send().await.ok()?;
        if r.status().is_success() {
            r.json::<Value>().await.ok()
        } else {
            None
        }
    })
    .await;
    assert_eq!(first["total"], 25, "first answer is complete");
    made.reverse();
    assert_eq!(ids(&first), made, "newest first");
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");
    api.stop().await;
}
