//! The HTTP API against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Api, MAX_BODY};
use reqwest::StatusCode;
use serde_json::{json, Value};
use warden_shared::{Action, Job, JobState};

async fn create(api: &Api, body: Value) -> Job {
    let r = api
        .http
        .post(api.url("/api/v1/jobs"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json().await.expect("job")
}

/// Asserts the JSON error shape and returns the code.
async fn error_code(r: reqwest::Response, status: StatusCode) -> String {
    assert_eq!(r.status(), status);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("application/json"), "content type {ct}");
    let v: Value = r.json().await.expect("json error body");
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["code"].as_str().expect("code").to_string()
}

#[tokio::test]
async fn create_then_get_with_history() {
    let mut api = Api::start().await;
    let job = create(&api, json!({"task": "build", "args": {"nvr": "a-1-1"}})).await;
    assert_eq!(job.task, "build");
    assert_eq!(job.pool, "builders", "pool defaults from the task");
    assert_eq!(job.priority, 7, "priority defaults from the task");
    assert_eq!(job.state, JobState::Scheduled);
    assert_eq!(job.id.get_version_num(), 4);

    let r = api
        .http
        .get(api.url(&format!("/api/v1/jobs/{}", job.id)))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    let got: Job = r.json().await.expect("job");
    assert_eq!(got.id, job.id);
    assert_eq!(got.args.get("nvr").map(String::as_str), Some("a-1-1"));
    assert_eq!(got.history.len(), 1);
    assert_eq!(got.history[0].action, Action::Create);
    assert_eq!(got.history[0].actor, "api");

    let explicit = create(
        &api,
        json!({"task": "build", "pool": "fast", "priority": -3}),
    )
    .await;
    assert_eq!((explicit.pool.as_str(), explicit.priority), ("fast", -3));
    api.stop().await;
}

#[tokio::test]
async fn list_filters_and_orders_newest_first() {
    let mut api = Api::start().await;
    let mut ids = Vec::new();
    for task in ["build", "noop", "build", "noop", "build"] {
        ids.push(create(&api, json!({"task": task})).await.id);
    }
    let list = |q: &'static str| {
        let url = api.url(&format!("/api/v1/jobs{q}"));
        let http = api.http.clone();
        async move {
            let r = http.get(url).send().await.expect("send");
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<Value>().await.expect("json")
        }
    };
    let page_ids = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["id"].as_str().expect("id").to_string())
            .collect()
    };
    let want = |idx: &[usize]| -> Vec<String> { idx.iter().map(|i| ids[*i].to_string()).collect() };

    // The index follows the bucket asynchronously.
    warden_testsupport::eventually(
        std::time::Duration::from_secs(5),
        "all jobs indexed",
        || async { (list("").await["total"] == 5).then_some(()) },
    )
    .await;
    let all = list("").await;
    assert_eq!(page_ids(&all), want(&[4, 3, 2, 1, 0]));
    assert!(all["jobs"][0].get("history").is_none(), "summaries only");

    let builds = list("?task=build").await;
    assert_eq!(builds["total"], 3);
    assert_eq!(page_ids(&builds), want(&[4, 2, 0]));

    let paged = list("?task=build&limit=1&offset=1").await;
    assert_eq!(paged["total"], 3);
    assert_eq!(page_ids(&paged), want(&[2]));

    let by_pool = list("?pool=builders&state=scheduled").await;
    assert_eq!(by_pool["total"], 3);
    let none = list("?state=RUNNING").await;
    assert_eq!(none["total"], 0);
    // Empty values mean no filter.
    assert_eq!(list("?state=&task=&pool=").await["total"], 5);

    let r = api
        .http
        .get(api.url("/api/v1/jobs?state=done"))
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await,
        "invalid_state"
    );
    let r = api
        .http
        .get(api.url("/api/v1/jobs?limit=lots"))
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await,
        "invalid_query"
    );
    api.stop().await;
}

#[tokio::test]
async fn get_errors() {
    let mut api = Api::start().await;
    let r = api
        .http
        .get(api.url(&format!("/api/v1/jobs/{}", uuid::Uuid::new_v4())))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r, StatusCode::NOT_FOUND).await, "not_found");
    let r = api
        .http
        .get(api.url("/api/v1/jobs/not-a-uuid"))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r, StatusCode::BAD_REQUEST).await, "invalid_id");
    let r = api.http.get(api.url("/nope")).send().await.expect("send");
    assert_eq!(error_code(r, StatusCode::NOT_FOUND).await, "not_found");
    let r = api
        .http
        .delete(api.url("/api/v1/jobs"))
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::METHOD_NOT_ALLOWED).await,
        "method_not_allowed"
    );
    api.stop().await;
}

#[tokio::test]
async fn bad_create_requests_are_4xx_json() {
    let mut api = Api::start().await;
    let post = |body: Vec<u8>| {
        api.http
            .post(api.url("/api/v1/jobs"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post(b"{\"task\": ".to_vec()).await.expect("send");
    assert_eq!(error_code(r, StatusCode::BAD_REQUEST).await, "invalid_json");
    let r = post(b"not json".to_vec()).await.expect("send");
    assert_eq!(error_code(r, StatusCode::BAD_REQUEST).await, "invalid_json");

    let r = post(br#"{"task": "nope"}"#.to_vec()).await.expect("send");
    assert_eq!(error_code(r, StatusCode::BAD_REQUEST).await, "unknown_task");

    let r = post(br#"{"task": "build", "colour": "red"}"#.to_vec())
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await,
        "invalid_request"
    );
    let r = post(br#"{"args": {}}"#.to_vec()).await.expect("send");
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await,
        "invalid_request"
    );
    let r = post(br#"{"task": "build", "args": {"no-dash": "x"}}"#.to_vec())
        .await
        .expect("send");
    assert_eq!(error_code(r, StatusCode::BAD_REQUEST).await, "invalid_args");
    let r = post(br#"{"task": "build", "pool": ""}"#.to_vec())
        .await
        .expect("send");
    assert_eq!(error_code(r, StatusCode::BAD_REQUEST).await, "invalid_pool");

    let big = format!(
        r#"{{"task": "build", "args": {{"x": "{}"}}}}"#,
        "a".repeat(MAX_BODY)
    );
    let r = post(big.into_bytes()).await.expect("send");
    assert_eq!(
        error_code(r, StatusCode::PAYLOAD_TOO_LARGE).await,
        "too_large"
    );

    // curl -d sends form encoding by default; the body is still JSON.
    let r = api
        .http
        .post(api.url("/api/v1/jobs"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"task": "noop"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::CREATED);

    let r = api
        .http
        .get(api.url("/api/v1/jobs"))
        .send()
        .await
        .expect("send");
    let v: Value = r.json().await.expect("json");
    assert!(
        v["total"].as_u64().expect("total") <= 1,
        "nothing else created: {v}"
    );
    api.stop().await;
}

#[tokio::test]
async fn writes_need_the_token_reads_do_not() {
    let mut api = Api::start_with_token(Some("s3cret")).await;
    let body = json!({"task": "build"});
    let r = api
        .http
        .post(api.url("/api/v1/jobs"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::UNAUTHORIZED).await,
        "unauthorized"
    );
    let r = api
        .http
        .post(api.url("/api/v1/jobs"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::UNAUTHORIZED).await,
        "unauthorized"
    );

    // Nothing was created.
    let store = api.store().await;
    let mut keys = store.kv().keys().await.expect("keys");
    assert!(
        futures::StreamExt::next(&mut keys).await.is_none(),
        "no job written"
    );

    let r = api
        .http
        .post(api.url("/api/v1/jobs"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::CREATED);
    let job: Job = r.json().await.expect("job");
    let r = api
        .http
        .get(api.url(&format!("/api/v1/jobs/{}", job.id)))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK, "reads are open");
    api.stop().await;
}

#[tokio::test]
async fn metrics_and_health_on_the_same_address() {
    let mut api = Api::start().await;
    create(&api, json!({"task": "noop"})).await;
    let r = api
        .http
        .get(api.url("/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    let text = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains(r#"warden_api_requests_total{route="job_create",status="201"}"#),
        "{text}"
    );
    assert!(
        text.contains("warden_api_request_duration_seconds"),
        "{text}"
    );
    assert!(text.contains("warden_api_jobs_indexed"), "{text}");
    assert!(text.contains(r#"warden_jobs{state="SCHEDULED"}"#), "{text}");
    api.stop().await;
}

#[tokio::test]
async fn unavailable_when_nats_is_down() {
    let mut api = Api::start().await;
    let job = create(&api, json!({"task": "noop"})).await;
    api.nats.stop();
    let r = api
        .http
        .get(api.url(&format!("/api/v1/jobs/{}", job.id)))
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::SERVICE_UNAVAILABLE).await,
        "unavailable"
    );
    let r = api
        .http
        .post(api.url("/api/v1/jobs"))
        .json(&json!({"task": "noop"}))
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::SERVICE_UNAVAILABLE).await,
        "unavailable"
    );
    // Validation needs no bus: still a 400, not a 503.
    let r = api
        .http
        .post(api.url("/api/v1/jobs"))
        .json(&json!({"task": "nope"}))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r, StatusCode::BAD_REQUEST).await, "unknown_task");
    api.nats.start_again();
    api.stop().await;
}

/// Puts `job` into the bucket in `state`, as the scheduler would have.
async fn set_state(api: &Api, job: &Job, state: JobState, attempt: u32) -> u64 {
    let store = api.store().await;
    let current = store.get(&job.id).await.expect("get").expect("exists");
    let mut j = current.job;
    j.state = state;
    j.attempt = attempt;
    j.lost_workers = vec!["bot-a".into()];
    store.update(&j, current.revision).await.expect("update")
}

async fn post(api: &Api, path: &str, body: Option<&str>) -> reqwest::Response {
    let mut req = api.http.post(api.url(path));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    req.send().await.expect("send")
}

#[tokio::test]
async fn retry_gives_a_shelved_job_a_fresh_budget() {
    let mut api = Api::start().await;
    let job = create(&api, json!({"task": "build"})).await;
    set_state(&api, &job, JobState::Shelved, 4).await;
    let r = post(&api, &format!("/api/v1/jobs/{}/retry", job.id), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let back: Job = r.json().await.expect("job");
    assert_eq!(back.state, JobState::Scheduled);
    assert_eq!(back.budget_from, 4);
    assert!(back.lost_workers.is_empty());
    let last = back.history.last().expect("history");
    assert_eq!((last.action, last.actor.as_str()), (Action::Retry, "api"));
    // What the bucket holds is what was returned.
    let stored = api.store().await.get(&job.id).await.unwrap().unwrap().job;
    assert_eq!(stored, back);
    api.stop().await;
}

#[tokio::test]
async fn illegal_retry_and_cancel_are_409_and_change_nothing() {
    let mut api = Api::start().await;
    let job = create(&api, json!({"task": "build"})).await;
    let rev = set_state(&api, &job, JobState::Finished, 1).await;
    for (path, body) in [
        (format!("/api/v1/jobs/{}/retry", job.id), None),
        (
            format!("/api/v1/jobs/{}/cancel", job.id),
            Some("{\"reason\": \"x\"}"),
        ),
    ] {
        let r = post(&api, &path, body).await;
        assert_eq!(
            error_code(r, StatusCode::CONFLICT).await,
            "illegal_transition",
            "{path}"
        );
    }
    let store = api.store().await;
    assert_eq!(store.get(&job.id).await.unwrap().unwrap().revision, rev);

    // A SCHEDULED job is not retried either.
    let fresh = create(&api, json!({"task": "build"})).await;
    let r = post(&api, &format!("/api/v1/jobs/{}/retry", fresh.id), None).await;
    assert_eq!(
        error_code(r, StatusCode::CONFLICT).await,
        "illegal_transition"
    );
    api.stop().await;
}

#[tokio::test]
async fn cancel_records_the_reason_and_refuses_twice() {
    let mut api = Api::start().await;
    let job = create(&api, json!({"task": "build"})).await;
    let path = format!("/api/v1/jobs/{}/cancel", job.id);
    let r = post(
        &api,
        &path,
        Some(r#"{"reason": "duplicate of another build"}"#),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let cancelled: Job = r.json().await.expect("job");
    assert_eq!(cancelled.state, JobState::Cancelled);
    let last = cancelled.history.last().expect("entry");
    assert_eq!(last.action, Action::Cancel);
    assert_eq!(last.note.as_deref(), Some("duplicate of another build"));
    let r = post(&api, &path, None).await;
    assert_eq!(
        error_code(r, StatusCode::CONFLICT).await,
        "illegal_transition"
    );
    // And a cancelled job can be retried.
    let r = post(&api, &format!("/api/v1/jobs/{}/retry", job.id), Some("{}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    api.stop().await;
}

#[tokio::test]
async fn bad_retry_and_cancel_requests_are_4xx_json() {
    let mut api = Api::start_with_token(Some("s3cret")).await;
    let job = {
        let r = api
            .http
            .post(api.url("/api/v1/jobs"))
            .bearer_auth("s3cret")
            .json(&json!({"task": "build"}))
            .send()
            .await
            .expect("send");
        r.json::<Job>().await.expect("job")
    };
    let store = api.store().await;
    let rev = store.get(&job.id).await.unwrap().unwrap().revision;
    let cancel = format!("/api/v1/jobs/{}/cancel", job.id);

    // No token: 401, nothing changed.
    let r = post(&api, &cancel, None).await;
    assert_eq!(
        error_code(r, StatusCode::UNAUTHORIZED).await,
        "unauthorized"
    );

    let authed = |path: String, body: Option<&'static str>| {
        let mut req = api.http.post(api.url(&path)).bearer_auth("s3cret");
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        req.send()
    };
    let cases: Vec<(String, Option<&'static str>, StatusCode, &str)> = vec![
        (
            cancel.clone(),
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            cancel.clone(),
            Some(r#"{"reasn": "typo"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/api/v1/jobs/not-a-uuid/cancel".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            format!("/api/v1/jobs/{}/retry", uuid::Uuid::new_v4()),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (path, body, status, code) in cases {
        let r = authed(path.clone(), body).await.expect("send");
        assert_eq!(error_code(r, status).await, code, "{path} {body:?}");
    }
    let long = format!("{{\"reason\": \"{}\"}}", "x".repeat(2000));
    let r = api
        .http
        .post(api.url(&cancel))
        .bearer_auth("s3cret")
        .header("content-type", "application/json")
        .body(long)
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await,
        "invalid_request"
    );
    assert_eq!(
        store.get(&job.id).await.unwrap().unwrap().revision,
        rev,
        "nothing changed"
    );
    api.stop().await;
}
