//! The NATS endpoints and [`warden_api::ApiClient`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::Api;
use serde_json::Value;
use warden_api::{ClientError, ListQuery};
use warden_shared::job::NewJob;
use warden_shared::{subjects, Action, JobState};

fn new_job(task: &str) -> NewJob {
    NewJob {
        task: task.into(),
        args: BTreeMap::from([("seconds".to_string(), "1".to_string())]),
        ..Default::default()
    }
}

#[tokio::test]
async fn client_round_trip() {
    let mut api = Api::start().await;
    let client = api.api_client().await;

    let job = client.create(new_job("build")).await.expect("create");
    assert_eq!((job.pool.as_str(), job.priority), ("builders", 7));
    let other = client.create(new_job("noop")).await.expect("create");

    let got = client.get(job.id).await.expect("get").expect("exists");
    assert_eq!(got.id, job.id);
    assert_eq!(got.history[0].action, Action::Create);
    assert!(client
        .get(uuid::Uuid::new_v4())
        .await
        .expect("get")
        .is_none());

    let page = warden_testsupport::eventually(
        std::time::Duration::from_secs(5),
        "both jobs indexed",
        || async {
            let p = client.list(ListQuery::default()).await.expect("list");
            (p.total == 2).then_some(p)
        },
    )
    .await;
    assert_eq!(page.jobs[0].id, other.id, "newest first");
    let builds = client
        .list(ListQuery {
            task: Some("build".into()),
            state: Some("scheduled".into()),
            ..ListQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(builds.total, 1);
    assert_eq!(builds.jobs[0].id, job.id);
    assert_eq!(builds.jobs[0].state, JobState::Scheduled);
    api.stop().await;
}

#[tokio::test]
async fn error_replies() {
    let mut api = Api::start().await;
    let client = api.api_client().await;
    match client.create(new_job("nope")).await {
        Err(ClientError::Api(e)) => assert_eq!(e.code, "unknown_task"),
        other => panic!("expected unknown_task, got {other:?}"),
    }
    let bad_state = client
        .list(ListQuery {
            state: Some("done".into()),
            ..ListQuery::default()
        })
        .await
        .expect_err("bad state");
    assert_eq!(bad_state.code(), Some("invalid_state"));

    // Raw requests, as the nats CLI would send them.
    let raw = api.nats_client().await;
    let reply = raw
        .request(subjects::API_JOB_GET, r#"{"id": "xyz"}"#.into())
        .await
        .expect("reply");
    let v: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(v["error"]["code"], "invalid_id", "{v}");
    let headers = reply.headers.expect("error headers");
    assert_eq!(
        headers.get("Nats-Service-Error").map(|h| h.as_str()),
        Some("invalid_id")
    );
    let reply = raw
        .request(subjects::API_JOB_CREATE, "{oops".into())
        .await
        .expect("reply");
    let v: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(v["error"]["code"], "invalid_json", "{v}");
    let reply = raw
        .request(subjects::API_JOB_LIST, "".into())
        .await
        .expect("reply");
    let v: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(v["total"], 0, "{v}");
    api.stop().await;
}

#[tokio::test]
async fn no_responders_when_the_api_is_down() {
    let mut api = Api::start().await;
    let client = warden_api::ApiClient::new(api.nats_client().await)
        .with_timeout(std::time::Duration::from_millis(500));
    api.stop().await;
    // The server may see the stopped service's unsubscribe a moment after
    // stop() returns (seen on a loaded CI machine): until then a request
    // can time out, but it must never be answered, and once the interest
    // is gone the answer is "no responders" at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client.list(ListQuery::default()).await {
            Err(ClientError::NoResponders) => break,
            Err(ClientError::Timeout) if std::time::Instant::now() < deadline => continue,
            other => panic!("expected NoResponders, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn retry_and_cancel_over_nats() {
    let mut api = Api::start().await;
    let client = api.api_client().await;
    let job = client.create(new_job("build")).await.expect("create");

    // SCHEDULED cannot be retried: a typed error, nothing changed.
    let err = client.retry(job.id).await.expect_err("illegal");
    assert_eq!(err.code(), Some("illegal_transition"));

    let cancelled = client
        .cancel(job.id, Some("no longer wanted".into()))
        .await
        .expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(
        cancelled.history.last().and_then(|h| h.note.as_deref()),
        Some("no longer wanted")
    );
    let err = client.cancel(job.id, None).await.expect_err("twice");
    assert_eq!(err.code(), Some("illegal_transition"));

    let again = client.retry(job.id).await.expect("retry");
    assert_eq!(again.state, JobState::Scheduled);
    assert_eq!(again.history.last().map(|h| h.action), Some(Action::Retry));

    let err = client
        .retry(uuid::Uuid::new_v4())
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Some("not_found"));

    // A malformed id in a raw request is a typed error too.
    let raw = api.nats_client().await;
    let reply = raw
        .request(subjects::API_JOB_CANCEL, r#"{"id": "nope"}"#.into())
        .await
        .expect("reply");
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(v["error"]["code"], "invalid_id", "{v}");
    api.stop().await;
}
