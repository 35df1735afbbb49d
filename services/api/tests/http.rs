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
    // /healthz speaks for every service of the process, and the other
    // tests of this binary start APIs of their own beside this one: 200
    // once none of them is still starting.
    let http = api.http.clone();
    let url = api.url("/healthz");
    warden_testsupport::eventually(std::time::Duration::from_secs(20), "healthz 200", || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.get(&url).send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())
        }
    })
    .await;
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

async fn post(api: &Api, path: &str, body: Option<&str>) -> reqwest::Response {
    post_as(api, None, path, body).await
}

async fn post_as(
    api: &Api,
    token: Option<&str>,
    path: &str,
    body: Option<&str>,
) -> reqwest::Response {
    let mut req = api.http.post(api.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    req.send().await.expect("send")
}

/// Asserts the JSON error shape and returns (code, message).
async fn error_of(r: reqwest::Response, status: StatusCode) -> (String, String) {
    assert_eq!(r.status(), status);
    let v: Value = r.json().await.expect("json error body");
    (
        v["error"]["code"].as_str().expect("code").to_string(),
        v["error"]["message"].as_str().expect("message").to_string(),
    )
}

fn retry_path(id: impl std::fmt::Display) -> String {
    format!("/api/v1/jobs/{id}/retry")
}

fn cancel_path(id: impl std::fmt::Display) -> String {
    format!("/api/v1/jobs/{id}/cancel")
}

#[tokio::test]
async fn retry_gives_a_stopped_job_a_fresh_budget() {
    let mut api = Api::start().await;
    for (state, body) in [
        (JobState::Shelved, None),
        (JobState::Crashed, Some("{}")),
        (JobState::Cancelled, Some("  ")),
    ] {
        let (job, rev) = api.put_job(state, 3).await;
        let r = post(&api, &retry_path(job.id), body).await;
        assert_eq!(r.status(), StatusCode::OK, "{state}");
        let back: Job = r.json().await.expect("job");
        assert_eq!(back.state, JobState::Scheduled, "{state}");
        assert_eq!(back.attempt, 3, "the attempt count is kept");
        assert_eq!(back.budget_from, back.attempt, "a fresh budget");
        assert!(back.lost_workers.is_empty(), "a fresh poison count");
        assert_eq!(back.not_before, None, "due at once");
        let last = back.history.last().expect("history");
        assert_eq!(
            (last.action, last.actor.as_str(), last.from, last.to),
            (Action::Retry, "api", Some(state), Some(JobState::Scheduled))
        );
        assert_eq!(back.history.len(), job.history.len() + 1);
        // What the bucket holds is what was returned, in one new revision.
        let stored = api.store().await.get(&job.id).await.unwrap().unwrap();
        assert_eq!(stored.job, back);
        assert!(stored.revision > rev);
    }
    api.stop().await;
}

#[tokio::test]
async fn illegal_retry_and_cancel_are_409_and_change_nothing() {
    let mut api = Api::start().await;
    let cases = [
        (JobState::Finished, "retry"),
        (JobState::Finished, "cancel"),
        (JobState::Scheduled, "retry"),
        (JobState::Running, "retry"),
        (JobState::Crashed, "cancel"),
        (JobState::Shelved, "cancel"),
        (JobState::Cancelled, "cancel"),
    ];
    for (state, action) in cases {
        let (job, rev) = api.put_job(state, 1).await;
        let path = format!("/api/v1/jobs/{}/{action}", job.id);
        let body = (action == "cancel").then_some(r#"{"reason": "x"}"#);
        let (code, message) = error_of(post(&api, &path, body).await, StatusCode::CONFLICT).await;
        assert_eq!(code, "illegal_transition", "{action} {state}");
        assert_eq!(
            message,
            format!("illegal transition: cannot {action} a {state} job")
        );
        assert_eq!(api.revision(&job.id).await, rev, "{action} {state} wrote");
    }
    api.stop().await;
}

#[tokio::test]
async fn cancel_records_the_reason_and_refuses_twice() {
    let mut api = Api::start().await;
    let job = create(&api, json!({"task": "build"})).await;
    let path = cancel_path(job.id);
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
    assert_eq!(
        (
            last.action,
            last.actor.as_str(),
            last.from,
            last.note.as_deref()
        ),
        (
            Action::Cancel,
            "api",
            Some(JobState::Scheduled),
            Some("duplicate of another build")
        )
    );
    let rev = api.revision(&job.id).await;
    assert_eq!(
        api.store().await.get(&job.id).await.unwrap().unwrap().job,
        cancelled
    );

    let (code, message) = error_of(post(&api, &path, None).await, StatusCode::CONFLICT).await;
    assert_eq!(code, "illegal_transition");
    assert_eq!(message, "illegal transition: cannot cancel a CANCELLED job");
    assert_eq!(api.revision(&job.id).await, rev, "the second cancel wrote");

    // An empty body and `{}` are a cancel without a reason.
    let (other, _) = api.put_job(JobState::Scheduled, 0).await;
    let r = post(&api, &cancel_path(other.id), Some("{}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let j: Job = r.json().await.expect("job");
    assert_eq!(j.history.last().and_then(|h| h.note.clone()), None);
    api.stop().await;
}

#[tokio::test]
async fn cancel_of_a_running_job_keeps_its_lease() {
    let mut api = Api::start().await;
    let (job, _) = api.put_job(JobState::Running, 2).await;
    let r = post(&api, &cancel_path(job.id), Some(r#"{"reason": "stop"}"#)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let j: Job = r.json().await.expect("job");
    assert_eq!(j.state, JobState::Cancelled);
    // The worker learns at its next heartbeat; its late report must still
    // be recognised as this attempt's.
    assert_eq!(j.lease, job.lease);
    let last = j.history.last().expect("entry");
    assert_eq!(
        (last.attempt, last.bot_id.as_deref(), last.from),
        (2, Some("bot-c"), Some(JobState::Running))
    );
    api.stop().await;
}

/// Many cancels of the same jobs at once: every loser of a compare-and-set
/// re-reads and finds the job already CANCELLED, so it answers
/// `illegal_transition`, never `conflict`, and each job is changed once.
/// (Whether a given run races is up to the scheduler of threads; with this
/// many requests, nearly every run does.)
#[tokio::test]
async fn concurrent_cancels_change_each_job_once() {
    const JOBS: usize = 6;
    const PER_JOB: usize = 16;
    let mut api = Api::start().await;
    let mut jobs = Vec::new();
    for _ in 0..JOBS {
        jobs.push(api.put_job(JobState::Scheduled, 0).await.0);
    }
    let requests = jobs.iter().flat_map(|job| {
        let path = cancel_path(job.id);
        (0..PER_JOB).map(move |i| {
            (
                job.id,
                path.clone(),
                format!("{{\"reason\": \"cancel {i}\"}}"),
            )
        })
    });
    let replies = futures::future::join_all(requests.map(|(id, path, body)| {
        let req = api
            .http
            .post(api.url(&path))
            .header("content-type", "application/json")
            .body(body);
        async move { (id, req.send().await.expect("send")) }
    }))
    .await;
    let mut wins = std::collections::HashMap::new();
    for (id, r) in replies {
        if r.status() == StatusCode::OK {
            *wins.entry(id).or_insert(0) += 1;
        } else {
            let (code, message) = error_of(r, StatusCode::CONFLICT).await;
            assert_eq!(code, "illegal_transition", "{message}");
        }
    }
    for job in &jobs {
        assert_eq!(wins.get(&job.id), Some(&1), "exactly one cancel wins");
        let stored = api.store().await.get(&job.id).await.unwrap().unwrap().job;
        let cancels = stored
            .history
            .iter()
            .filter(|h| h.action == Action::Cancel)
            .count();
        assert_eq!(cancels, 1, "{:?}", stored.history);
    }
    api.stop().await;
}

#[tokio::test]
async fn bad_retry_and_cancel_requests_are_4xx_json() {
    let mut api = Api::start().await;
    let (job, rev) = api.put_job(JobState::Scheduled, 0).await;
    let (shelved, shelved_rev) = api.put_job(JobState::Shelved, 2).await;
    let unknown = uuid::Uuid::new_v4();
    let cases: Vec<(String, Option<&str>, StatusCode, &str)> = vec![
        (
            cancel_path(job.id),
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            retry_path(shelved.id),
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            cancel_path(job.id),
            Some(r#"{"reasn": "typo"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            cancel_path(job.id),
            Some(r#"{"reason": 5}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            retry_path(shelved.id),
            Some(r#"{"force": true}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            cancel_path("not-a-uuid"),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            retry_path("not-a-uuid"),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            cancel_path(unknown),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            retry_path(unknown),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (path, body, status, want) in cases {
        let r = post(&api, &path, body).await;
        assert_eq!(error_code(r, status).await, want, "{path} {body:?}");
    }
    let r = api
        .http
        .get(api.url(&retry_path(shelved.id)))
        .send()
        .await
        .expect("send");
    assert_eq!(
        error_code(r, StatusCode::METHOD_NOT_ALLOWED).await,
        "method_not_allowed"
    );

    // The reason is bounded in characters, not bytes.
    let too_long = json!({ "reason": "x".repeat(1001) }).to_string();
    let r = post(&api, &cancel_path(job.id), Some(&too_long)).await;
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await,
        "invalid_request"
    );
    assert_eq!(api.revision(&job.id).await, rev, "nothing changed");
    assert_eq!(
        api.revision(&shelved.id).await,
        shelved_rev,
        "nothing changed"
    );
    assert!(api.store().await.get(&unknown).await.unwrap().is_none());

    let longest = "é".repeat(1000);
    let r = post(
        &api,
        &cancel_path(job.id),
        Some(&json!({ "reason": longest }).to_string()),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let j: Job = r.json().await.expect("job");
    assert_eq!(j.history.last().and_then(|h| h.note.clone()), Some(longest));
    api.stop().await;
}

#[tokio::test]
async fn retry_and_cancel_need_the_token() {
    let mut api = Api::start_with_token(Some("s3cret")).await;
    let (scheduled, scheduled_rev) = api.put_job(JobState::Scheduled, 0).await;
    let (shelved, shelved_rev) = api.put_job(JobState::Shelved, 2).await;
    let cancel = cancel_path(scheduled.id);
    let retry = retry_path(shelved.id);
    for token in [None, Some("wrong"), Some("s3cret2"), Some("")] {
        for path in [&cancel, &retry] {
            let r = post_as(&api, token, path, Some("{}")).await;
            assert_eq!(
                r.headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer")
            );
            assert_eq!(
                error_code(r, StatusCode::UNAUTHORIZED).await,
                "unauthorized",
                "{path} {token:?}"
            );
        }
    }
    // The token is checked before the id or the body: no probing.
    let r = post_as(&api, None, &cancel_path("nope"), Some("{oops")).await;
    assert_eq!(
        error_code(r, StatusCode::UNAUTHORIZED).await,
        "unauthorized"
    );
    assert_eq!(
        api.revision(&scheduled.id).await,
        scheduled_rev,
        "no cancel"
    );
    assert_eq!(api.revision(&shelved.id).await, shelved_rev, "no retry");

    let r = post_as(&api, Some("s3cret"), &cancel, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Job>().await.expect("job").state,
        JobState::Cancelled
    );
    let r = post_as(&api, Some("s3cret"), &retry, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Job>().await.expect("job").state,
        JobState::Scheduled
    );
    api.stop().await;
}

async fn post_create(api: &Api, body: &Value) -> reqwest::Response {
    api.http
        .post(api.url("/api/v1/jobs"))
        .json(body)
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn a_create_retried_with_its_idempotency_key_returns_the_first_job() {
    let mut api = Api::start().await;
    let body = json!({"task": "build", "args": {"nvr": "a-1-1"}, "idempotency_key": "ci-run-17"});
    let first = post_create(&api, &body).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Job = first.json().await.expect("job");
    assert_eq!(first.idempotency_key.as_deref(), Some("ci-run-17"));

    let again = post_create(&api, &body).await;
    assert_eq!(again.status(), StatusCode::OK, "a replay is not a creation");
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let again: Job = again.json().await.expect("job");
    assert_eq!(again.id, first.id);
    assert_eq!(again.history.len(), 1, "nothing written again");

    // Another key is another job; no key is a new job every time.
    let other = create(
        &api,
        json!({"task": "build", "args": {"nvr": "a-1-1"}, "idempotency_key": "ci-run-18"}),
    )
    .await;
    assert_ne!(other.id, first.id);

    // The same key asking for something else is refused, nothing made.
    for different in [
        json!({"task": "noop", "idempotency_key": "ci-run-17"}),
        json!({"task": "build", "args": {"nvr": "a-1-2"}, "idempotency_key": "ci-run-17"}),
        json!({"task": "build", "args": {"nvr": "a-1-1"}, "priority": 1, "idempotency_key": "ci-run-17"}),
        json!({"task": "build", "args": {"nvr": "a-1-1"}, "pool": "other", "idempotency_key": "ci-run-17"}),
    ] {
        let r = post_create(&api, &different).await;
        assert_eq!(
            error_code(r, StatusCode::CONFLICT).await,
            "idempotency_conflict",
            "{different}"
        );
    }
    let got: Job = api
        .http
        .get(api.url(&format!("/api/v1/jobs/{}", first.id)))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("job");
    assert_eq!((got.task.as_str(), got.history.len()), ("build", 1));

    for bad in [json!(""), json!("x".repeat(201)), json!("a\nb")] {
        let r = post_create(&api, &json!({"task": "build", "idempotency_key": bad})).await;
        assert_eq!(
            error_code(r, StatusCode::BAD_REQUEST).await,
            "invalid_idempotency_key"
        );
    }
    api.stop().await;
}

#[tokio::test]
async fn concurrent_creates_with_one_key_make_one_job() {
    let mut api = Api::start().await;
    let body = json!({"task": "build", "idempotency_key": "burst"});
    let replies = futures::future::join_all((0..16).map(|_| post_create(&api, &body))).await;
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for r in replies {
        match r.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            s => panic!("status {s}"),
        }
        let job: Job = r.json().await.expect("job");
        ids.insert(job.id);
    }
    assert_eq!(created, 1, "exactly one create made the job");
    assert_eq!(ids.len(), 1, "every caller got the same job");
    let store = api.store().await;
    let id = ids.into_iter().next().expect("id");
    let v = store.get(&id).await.expect("get").expect("exists");
    assert_eq!(v.job.history.len(), 1);
    api.stop().await;
}
