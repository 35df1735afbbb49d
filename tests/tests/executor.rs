//! External executors through the API of a live `warden up`: take a job,
//! set RUNNING, FINISHED or CRASHED with blame, under the same fencing as
//! Warden's own workers. A token whose attempt is gone is refused with a
//! clear error and changes nothing but the history's record of a rejected
//! report; so are malformed bodies, unknown jobs and missing bearer tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use warden_e2e::{cli_ok, entries, entry, eventually, get_json, Scenario, Stack};

const TOKEN: &str = "t0ken-for-writes";

const CONFIG: &str = r#"
[http]
token = "t0ken-for-writes"

[fencing]
session_timeout = "2s"

[retry]
max_attempts = 3
initial_delay = "200ms"
backoff = 1.0
max_delay = "1s"
jitter = 0.0

[tasks.koji-build]
command = ["true"]
pool = "external"
"#;

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        auth: bool,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(&url),
            _ => self.http.post(&url),
        };
        if auth {
            req = req.bearer_auth(TOKEN);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        (status, value)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body), true).await
    }

    async fn raw(&self, path: &str, body: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn submit(&self) -> String {
        let (status, job) = self
            .post("/api/v1/jobs", json!({"task": "koji-build"}))
            .await;
        assert_eq!(status, 201, "{job}");
        job["id"].as_str().unwrap().to_string()
    }

    async fn take(&self, bot: &str, extra: Value) -> Value {
        let mut body = json!({"bot_id": bot, "pools": ["external"], "wait_ms": 5000});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, reply) = self.post("/api/v1/executions", body).await;
        assert_eq!(status, 200, "{reply}");
        reply["execution"].clone()
    }

    async fn job(&self, id: &str) -> Value {
        get_json(&format!("{}/api/v1/jobs/{id}", self.base)).await
    }
}

/// A nats-server and `warden up` with no local workers (`/healthz`
/// answers once every service does), and a client of its API.
fn start() -> (Stack, Client) {
    let s = Scenario::new().config(CONFIG).up();
    let c = Client {
        http: reqwest::Client::new(),
        base: s.warden.http.clone(),
    };
    (s, c)
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

/// Everything but the history's bookkeeping of rejected reports.
fn without_history(mut job: Value) -> Value {
    job.as_object_mut().unwrap().remove("history");
    job.as_object_mut().unwrap().remove("updated_at");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_runs_a_job_and_a_crash_it_reports_is_retried_under_fencing() {
    let (s, c) = start();

    // Nothing waiting in the pool: an empty answer, not an error.
    let (status, reply) = c
        .post(
            "/api/v1/executions",
            json!({"bot_id": "buildbot-1", "pools": ["external"]}),
        )
        .await;
    assert_eq!((status, &reply), (200, &json!({"execution": null})));

    let id = c.submit().await;
    let first = c.take("buildbot-1", json!({})).await;
    assert_eq!(first["job_id"], id.as_str());
    assert_eq!(first["epoch"], 1);
    assert_eq!(first["task"], "koji-build");
    let token1 = first["token"].as_str().unwrap().to_string();
    let state_url = format!("/api/v1/jobs/{id}/state");

    let (status, reply) = c
        .post(&state_url, json!({"token": token1, "state": "RUNNING"}))
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["applied"], true);
    assert_eq!(reply["job"]["state"], "RUNNING");
    assert!(reply["job"]["lease"]["started_at"].is_string(), "{reply}");
    assert_eq!(reply["job"]["lease"]["bot_id"], "buildbot-1");

    // The executor blames a third party: classified from its own words,
    // and retried by the policy (third_party/* is retryable).
    let (status, reply) = c
        .post(
            &state_url,
            json!({"token": token1, "state": "CRASHED", "blame": "third_party",
                   "detail": "network", "description": "koji hub did not answer"}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let job = &reply["job"];
    assert_eq!(job["blame"], "third_party", "{job}");
    assert_eq!(job["detail"], "network");
    assert_eq!(job["description"], "koji hub did not answer");
    assert_eq!(job["state"], "SCHEDULED", "retried by the policy: {job}");
    let crash = entry(job, "crash");
    assert_eq!(crash["bot_id"], "buildbot-1");

    // Sending it again (the answer was lost) is the same answer.
    let (status, again) = c
        .post(
            &state_url,
            json!({"token": token1, "state": "CRASHED", "blame": "third_party",
                   "detail": "network", "description": "koji hub did not answer"}),
        )
        .await;
    assert_eq!(status, 200, "{again}");

    // The second attempt goes to another executor.
    let second = eventually(Duration::from_secs(10), "attempt 2 taken", || async {
        let e = c.take("buildbot-2", json!({"wait_ms": 1000})).await;
        (!e.is_null()).then_some(e)
    })
    .await;
    assert_eq!(second["epoch"], 2);
    let token2 = second["token"].as_str().unwrap().to_string();

    // The first executor, stale, reports again: refused, nothing changed
    // but the record of a rejected report.
    let before = without_history(c.job(&id).await);
    let (status, reply) = c
        .post(
            &state_url,
            json!({"token": token1, "state": "FINISHED", "outcome": "PASSED"}),
        )
        .await;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(code(&reply), "stale_execution");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("attempt 2"),
        "{reply}"
    );
    let rejected = eventually(Duration::from_secs(10), "rejection recorded", || async {
        let j = c.job(&id).await;
        let seen = entries(&j, "reject_report").iter().any(|h| {
            h["attempt"] == 1
                && h["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("stale_epoch") || n.contains("rejected"))
        });
        seen.then_some(j)
    })
    .await;
    assert_eq!(
        without_history(rejected),
        before,
        "a stale report changed the job"
    );
    let metrics = s.metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("warden_scheduler_reports_rejected_total")
            && !l.ends_with(" 0")),
        "the stale report is not counted:\n{}",
        metrics.lines().filter(|l| l.contains("rejected")).collect::<Vec<_>>().join("\n")
    );

    // The current executor finishes it.
    let (status, reply) = c
        .post(
            &state_url,
            json!({"token": token2, "state": "FINISHED", "outcome": "PASSED"}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["job"]["state"], "FINISHED");
    assert_eq!(reply["job"]["outcome"], "PASSED");
    assert_eq!(reply["job"]["attempt"], 2);

    // Both executors appear among the bots; their sessions are closed.
    let bots = s.get("/api/v1/bots").await;
    for bot in ["buildbot-1", "buildbot-2"] {
        let mine: Vec<&Value> = bots["bots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["bot_id"] == bot)
            .collect();
        assert!(!mine.is_empty(), "{bot} not listed: {bots}");
        assert!(
            mine.iter().all(|s| s["state"] != "active"),
            "{bot} still active: {bots}"
        );
    }
    let active = s.get("/api/v1/bots?state=active").await;
    assert!(
        active["bots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "active"),
        "{active}"
    );
    let (status, reply) = c
        .call("GET", "/api/v1/bots?state=sleepy", None, false)
        .await;
    assert_eq!((status, code(&reply)), (400, "invalid_state"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_state_switches_get_clear_errors_and_change_nothing() {
    let (_s, c) = start();
    let id = c.submit().await;
    let e = c.take("buildbot-1", json!({})).await;
    let token = e["token"].as_str().unwrap().to_string();
    let state_url = format!("/api/v1/jobs/{id}/state");
    let before = c.job(&id).await;

    let other = c.submit().await;
    let unknown = "0b5e5fb3-8d4c-4e0e-9a4a-3f0d8e7a9c11";
    let cases: Vec<(String, Value, u16, &str)> = vec![
        (
            state_url.clone(),
            json!({"token": token, "state": "DONE"}),
            400,
            "invalid_state",
        ),
        (
            state_url.clone(),
            json!({"token": token, "state": "FINISHED"}),
            400,
            "invalid_outcome",
        ),
        (
            state_url.clone(),
            json!({"token": token, "state": "CRASHED", "detail": "network"}),
            400,
            "invalid_blame",
        ),
        (
            state_url.clone(),
            json!({"token": token, "state": "CRASHED", "blame": "gremlins", "detail": "network"}),
            400,
            "invalid_blame",
        ),
        (
            state_url.clone(),
            json!({"token": token, "state": "CRASHED", "blame": "system"}),
            400,
            "invalid_detail",
        ),
        (
            state_url.clone(),
            json!({"token": token, "state": "RUNNING", "outcome": "PASSED"}),
            400,
            "invalid_request",
        ),
        (
            state_url.clone(),
            json!({"token": "forged", "state": "RUNNING"}),
            400,
            "invalid_token",
        ),
        (
            state_url.clone(),
            json!({"state": "RUNNING"}),
            400,
            "invalid_request",
        ),
        (
            state_url.clone(),
            json!({"token": token, "state": "RUNNING", "colour": "red"}),
            400,
            "invalid_request",
        ),
        (
            format!("/api/v1/jobs/{other}/state"),
            json!({"token": token, "state": "RUNNING"}),
            400,
            "token_mismatch",
        ),
        (
            format!("/api/v1/jobs/{unknown}/state"),
            json!({"token": token.replace(&id, unknown), "state": "RUNNING"}),
            404,
            "not_found",
        ),
        (
            "/api/v1/jobs/not-a-uuid/state".into(),
            json!({"token": token, "state": "RUNNING"}),
            400,
            "invalid_id",
        ),
        (
            "/api/v1/executions".into(),
            json!({"bot_id": ""}),
            400,
            "invalid_bot_id",
        ),
        (
            "/api/v1/executions".into(),
            json!({"bot_id": "b", "pools": ["no spaces"]}),
            400,
            "invalid_pool",
        ),
        (
            "/api/v1/executions".into(),
            json!({"bot_id": "b", "wait_ms": 999999}),
            400,
            "invalid_wait",
        ),
        (
            "/api/v1/executions".into(),
            json!({"bot_id": "b", "timeout": "forever"}),
            400,
            "invalid_timeout",
        ),
    ];
    for (path, body, status, want) in cases {
        let (got, reply) = c.post(&path, body.clone()).await;
        assert_eq!(
            (got, code(&reply)),
            (status, want),
            "POST {path} {body}: {reply}"
        );
        assert!(!reply["error"]["message"].as_str().unwrap().is_empty());
    }
    for (path, text) in [
        (state_url.as_str(), "{\"token\": "),
        ("/api/v1/executions", "{\"bot_id\": \"b"),
    ] {
        let (got, reply) = c.raw(path, text).await;
        assert_eq!(
            (got, code(&reply)),
            (400, "invalid_json"),
            "{path}: {reply}"
        );
    }
    // Without the bearer token: 401, before the body is looked at.
    for path in [state_url.as_str(), "/api/v1/executions"] {
        let (got, reply) = c
            .call(
                "POST",
                path,
                Some(json!({"token": token, "state": "RUNNING", "bot_id": "x"})),
                false,
            )
            .await;
        assert_eq!((got, code(&reply)), (401, "unauthorized"), "{path}");
    }
    assert_eq!(c.job(&id).await, before, "a refused switch changed the job");

    // Cancelled by an operator while the executor holds it: told so, also
    // when it had already said RUNNING (the keep-alive is no repeat of an
    // applied switch once the attempt is gone).
    let (status, reply) = c
        .post(&state_url, json!({"token": token, "state": "RUNNING"}))
        .await;
    assert_eq!((status, &reply["applied"]), (200, &json!(true)), "{reply}");
    let (status, _) = c
        .post(&format!("/api/v1/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    let (got, reply) = c
        .post(&state_url, json!({"token": token, "state": "RUNNING"}))
        .await;
    assert_eq!((got, code(&reply)), (409, "cancelled"), "{reply}");
    assert_eq!(c.job(&id).await["state"], "CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_executor_loses_its_job_and_the_api_answers_over_nats_too() {
    let (s, c) = start();
    let id = c.submit().await;
    // Over NATS: the same take, with a short session of its own.
    let client = async_nats::connect(s.url()).await.unwrap();
    let ask = |subject: &'static str, body: Value| {
        let client = client.clone();
        async move {
            let msg = client
                .request(subject, body.to_string().into())
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&msg.payload).unwrap()
        }
    };
    let reply = ask(
        "warden.api.execution.take",
        json!({"bot_id": "script-1", "pools": ["external"], "wait_ms": 5000, "timeout": "2s"}),
    )
    .await;
    let e = &reply["execution"];
    assert_eq!(e["job_id"], id.as_str(), "{reply}");
    assert_eq!(e["timeout_ms"], 2000);
    let token = e["token"].as_str().unwrap().to_string();
    let reply = ask(
        "warden.api.job.state",
        json!({"id": id, "token": token, "state": "RUNNING"}),
    )
    .await;
    assert_eq!(reply["applied"], true, "{reply}");

    // Then silence: the session expires and the job is taken back, not
    // counted against the task (the executor was lost, not the task).
    let job = eventually(Duration::from_secs(20), "job taken back", || async {
        let j = c.job(&id).await;
        (j["state"] == "SCHEDULED" && j["attempt"] == 1).then_some(j)
    })
    .await;
    assert!(!entries(&job, "requeue").is_empty(), "{job}");
    let reply = ask(
        "warden.api.job.state",
        json!({"id": id, "token": token, "state": "FINISHED", "outcome": "PASSED"}),
    )
    .await;
    let code = reply["error"]["code"].as_str().unwrap_or_default();
    assert!(
        code == "stale_execution" || code == "session_expired",
        "a lost executor's report was accepted: {reply}"
    );
    assert_eq!(c.job(&id).await["state"], "SCHEDULED");

    // Bots and resources over NATS, as over HTTP.
    let bots = ask("warden.api.bots", json!({})).await;
    assert!(
        bots["bots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["bot_id"] == "script-1" && s["state"] == "expired"),
        "{bots}"
    );
    let resources = ask("warden.api.resources", json!(null)).await;
    assert!(resources["resources"].is_array(), "{resources}");
    let bad = ask(
        "warden.api.job.state",
        json!({"token": token, "state": "RUNNING"}),
    )
    .await;
    assert_eq!(bad["error"]["code"], "invalid_request", "{bad}");
    let _ = cli_ok(&s.url(), &["bots"]);
}
