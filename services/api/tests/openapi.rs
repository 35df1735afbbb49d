//! The OpenAPI document (`services/api/openapi.json`) against the code:
//! the router's route table, the NATS endpoint list, the error codes the
//! operations return, the request and reply bodies, and what the running
//! API serves. Any route, subject, status, code or field added to one
//! side only fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;
use warden_api::http::{OPENAPI, ROUTES, SHARED_ROUTES};
use warden_api::nats::ENDPOINT_SUBJECTS;
use warden_api::ops::api_status;
use warden_api::types::{
    BotsQuery, BotsReply, CancelBody, Execution, ListQuery, ListReply, ResourcesReply, RetryBody,
    StateReply, StateRequest, StatsQuery, TakeReply, TakeRequest,
};
use warden_api::Stats;
use warden_shared::error::ErrorCode;
use warden_shared::job::{CrashInfo, HistoryEntry, Lease, NewJob, Source};
use warden_shared::messages::HeldLease;
use warden_shared::resource::{Resource, ResourceDecl, ResourceState};
use warden_shared::session::{Session, SessionState};
use warden_shared::{Action, Blame, Job, JobState};

/// The reference, checked by `tests/tests/api_docs.rs` against a live
/// `warden up`; here only for its error table.
const API_MD: &str = include_str!("../../../docs/api.md");

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON")
}

/// `#/components/...` → the value it points at.
fn resolve<'a>(doc: &'a Value, pointer: &str) -> &'a Value {
    let path = pointer
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("{pointer}: only local references"));
    doc.pointer(path)
        .unwrap_or_else(|| panic!("{pointer} does not resolve"))
}

/// Follows a `$ref` if `v` is one.
fn deref<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => deref(doc, resolve(doc, r)),
        None => v,
    }
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            ops.push((method.to_uppercase(), path.clone(), op));
        }
    }
    ops
}

#[test]
fn the_document_is_openapi_3_1_and_its_references_resolve() {
    let doc = doc();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["info"]["title"].is_string());
    let bearer = &doc["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(
        (bearer["type"].as_str(), bearer["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );

    fn walk(doc: &Value, v: &Value, refs: &mut usize) {
        match v {
            Value::Object(o) => {
                if let Some(r) = o.get("$ref") {
                    resolve(doc, r.as_str().expect("$ref is a string"));
                    *refs += 1;
                }
                o.values().for_each(|v| walk(doc, v, refs));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(doc, v, refs)),
            _ => {}
        }
    }
    let mut refs = 0;
    walk(&doc, &doc, &mut refs);
    assert!(refs > 50, "only {refs} references");
    // Operation ids are unique (they are also the metrics' route names).
    let ids: Vec<&str> = operations(&doc)
        .iter()
        .map(|(m, p, op)| {
            op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{m} {p}: no operationId"))
        })
        .collect();
    assert_eq!(
        ids.len(),
        ids.iter().collect::<BTreeSet<_>>().len(),
        "{ids:?}"
    );
}

#[test]
fn the_document_describes_exactly_the_routes_the_router_serves() {
    let doc = doc();
    // (method, path) → (route name, its statuses; none for the shared routes).
    type Served<'a> = BTreeMap<(String, String), (&'a str, Option<&'a [u16]>)>;
    let mut served: Served = BTreeMap::new();
    for r in ROUTES {
        let dup = served.insert(
            (r.method.as_str().to_string(), r.path.to_string()),
            (r.name, Some(r.statuses)),
        );
        assert!(dup.is_none(), "{} {} twice in ROUTES", r.method, r.path);
    }
    for (m, p, name) in SHARED_ROUTES {
        served.insert((m.as_str().to_string(), p.to_string()), (name, None));
    }
    let documented: BTreeMap<(String, String), &Value> = operations(&doc)
        .into_iter()
        .map(|(m, p, op)| ((m, p), op))
        .collect();
    for key in served.keys() {
        assert!(
            documented.contains_key(key),
            "{} {} is served but openapi.json does not describe it",
            key.0,
            key.1
        );
    }
    for key in documented.keys() {
        assert!(
            served.contains_key(key),
            "openapi.json describes {} {}, which the router does not serve",
            key.0,
            key.1
        );
    }

    for ((method, path), (name, statuses)) in &served {
        let op = documented[&(method.clone(), path.clone())];
        let what = format!("{method} {path}");
        assert_eq!(
            op["operationId"], *name,
            "{what}: operationId is the route name"
        );
        let responses = op["responses"].as_object().expect("responses");
        let documented: BTreeSet<u16> = responses
            .keys()
            .map(|k| k.parse().unwrap_or_else(|_| panic!("{what}: response {k}")))
            .collect();
        if let Some(statuses) = statuses {
            let want: BTreeSet<u16> = statuses.iter().copied().collect();
            for s in &want {
                assert!(
                    documented.contains(s),
                    "{what} can answer {s}; openapi.json has no response for it"
                );
            }
            for s in &documented {
                assert!(
                    want.contains(s),
                    "openapi.json documents {s} for {what}, which the route table does not list"
                );
            }
        }
        for (status, response) in responses {
            let response = deref(&doc, response);
            assert!(
                response["description"].is_string(),
                "{what} {status}: no description"
            );
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error",
                    "{what} {status}: an error response is an Error"
                );
            }
        }
        // Writes need the bearer token (401 without), reads never.
        let write = method != "GET";
        let security = op["security"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no security"));
        if write {
            assert_eq!(security, &vec![json!({"bearerAuth": []})], "{what}");
            assert!(responses.contains_key("401"), "{what}: a write can be 401");
        } else {
            assert!(security.is_empty(), "{what}: reads are open");
            assert!(!responses.contains_key("401"), "{what}: reads are open");
        }
        // Path parameters are declared.
        if path.contains("{id}") {
            let params: Vec<&Value> = op["parameters"]
                .as_array()
                .unwrap_or_else(|| panic!("{what}: no parameters"))
                .iter()
                .map(|p| deref(&doc, p))
                .collect();
            assert!(
                params
                    .iter()
                    .any(|p| p["name"] == "id" && p["in"] == "path" && p["required"] == true),
                "{what}: the id parameter is not declared"
            );
        }
    }
}

#[test]
fn every_nats_endpoint_is_documented_on_its_http_operation() {
    let doc = doc();
    let mut by_subject: BTreeMap<String, String> = BTreeMap::new();
    for (method, path, op) in operations(&doc) {
        if let Some(subject) = op.get("x-nats-subject") {
            let subject = subject.as_str().expect("x-nats-subject is a string");
            assert!(
                op["x-nats-request"].is_string(),
                "{method} {path}: x-nats-subject without x-nats-request"
            );
            let before = by_subject.insert(
                subject.to_string(),
                op["operationId"].as_str().unwrap().to_string(),
            );
            assert!(before.is_none(), "{subject} on two operations");
        }
    }
    for (name, subject) in ENDPOINT_SUBJECTS {
        let op = by_subject.get(subject).unwrap_or_else(|| {
            panic!("NATS endpoint {subject} is not named by any operation's x-nats-subject")
        });
        assert_eq!(
            op, name,
            "{subject} is documented on {op}, but the NATS endpoint is {name}"
        );
    }
    let served: BTreeSet<&str> = ENDPOINT_SUBJECTS.iter().map(|(_, s)| *s).collect();
    for subject in by_subject.keys() {
        assert!(
            served.contains(subject.as_str()),
            "openapi.json names {subject}, which the NATS service does not serve"
        );
    }
}

/// Every error code the API returns, with its status: the codes of
/// [`ErrorCode::ALL`] that [`api_status`] gives a status.
fn codes_in_sources() -> BTreeMap<String, u16> {
    ErrorCode::ALL
        .into_iter()
        .filter_map(|c| api_status(c).map(|s| (c.as_str().to_string(), s)))
        .collect()
}

#[test]
fn every_error_code_is_documented_with_its_status() {
    let doc = doc();
    let found = codes_in_sources();
    assert!(found.len() > 20, "the source scan found only {found:?}");
    let schema = &doc["components"]["schemas"]["ErrorCode"];
    let documented: BTreeSet<&str> = schema["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let description = schema["description"].as_str().unwrap();
    for (code, status) in &found {
        assert!(
            documented.contains(code.as_str()),
            "error code {code} is returned but not in openapi.json's ErrorCode"
        );
        assert!(
            description.contains(&format!("- `{code}` ({status})")),
            "ErrorCode's description does not give {code} as {status}"
        );
        assert!(
            API_MD.lines().any(|l| l.starts_with('|')
                && l.contains(&format!("`{code}`"))
                && l.contains(&status.to_string())),
            "docs/api.md's error table has no row for {code} ({status})"
        );
    }
    for code in &documented {
        assert!(
            found.contains_key(*code),
            "openapi.json documents error code {code}, which nothing returns"
        );
    }
}

/// A value of the schema's type, enough for serde to accept the field.
fn sample(doc: &Value, schema: &Value) -> Value {
    let schema = deref(doc, schema);
    if let Some(e) = schema["enum"].as_array() {
        return e[0].clone();
    }
    let ty = match &schema["type"] {
        Value::Array(types) => types[0].clone(),
        t => t.clone(),
    };
    match ty.as_str() {
        Some("string") if schema["format"] == "uuid" => json!(Uuid::new_v4()),
        Some("string") if schema["format"] == "date-time" => json!(Utc::now()),
        Some("string") => json!("x"),
        Some("integer") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        Some("object") => json!({}),
        other => panic!("no sample for {other:?} in {schema}"),
    }
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    &doc["components"]["schemas"][name]
}

fn properties(doc: &Value, name: &str) -> BTreeSet<String> {
    schema(doc, name)["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{name}: no properties"))
        .keys()
        .cloned()
        .collect()
}

/// A request body: every documented field is one the type takes (they
/// reject unknown fields), and every field of the type is documented.
fn request_matches<T: DeserializeOwned + Serialize>(doc: &Value, name: &str, full: &T) {
    let all: serde_json::Map<String, Value> = schema(doc, name)["properties"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), sample(doc, s)))
        .collect();
    if let Err(e) = serde_json::from_value::<T>(Value::Object(all.clone())) {
        panic!("{name}: the documented fields {all:?} are refused: {e}");
    }
    reply_matches(doc, name, full);
}

/// A reply: every field the type writes is documented, and every
/// required field is written.
fn reply_matches<T: Serialize>(doc: &Value, name: &str, value: &T) {
    let props = properties(doc, name);
    let v = serde_json::to_value(value).unwrap();
    let keys: BTreeSet<String> = v.as_object().unwrap().keys().cloned().collect();
    for k in &keys {
        assert!(props.contains(k), "{name}.{k} is sent but not documented");
    }
    for k in &props {
        assert!(
            keys.contains(k),
            "{name}.{k} is documented but the sample does not send it: make the sample complete"
        );
    }
    if let Some(required) = schema(doc, name)["required"].as_array() {
        for r in required {
            assert!(
                props.contains(r.as_str().unwrap()),
                "{name}: required {r} is not a property"
            );
        }
    }
}

/// The fields a minimal value always writes are the schema's `required`.
fn required_matches<T: Serialize>(doc: &Value, name: &str, minimal: &T) {
    let v = serde_json::to_value(minimal).unwrap();
    let keys: BTreeSet<String> = v.as_object().unwrap().keys().cloned().collect();
    let required: BTreeSet<String> = schema(doc, name)["required"]
        .as_array()
        .map(|r| r.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    assert_eq!(keys, required, "{name}: always-present fields vs required");
}

fn full_job() -> Job {
    let now = Utc::now();
    let mut job = Job::builder("build")
        .args(BTreeMap::from([("nvr".to_string(), "a-1-1".to_string())]))
        .pool("builders")
        .priority(3)
        .source(Source {
            message_id: "m-1".into(),
            subject: "org.example.build".into(),
            rule: Some("r".into()),
        })
        .at(now)
        .build();
    job.state = JobState::Crashed;
    job.attempt = 2;
    job.lease = Some(Lease {
        session: "s".into(),
        bot_id: "b".into(),
        resource: Some("host".into()),
        resources: vec!["host".into()],
        epoch: 2,
        leased_at: now,
        started_at: Some(now),
        secret_hash: None,
    });
    job.outcome = Some("passed".into());
    job.blame = Some(Blame::ThirdParty);
    job.detail = Some("network".into());
    job.description = Some("words".into());
    job.crash = Some(CrashInfo {
        exit_code: Some(1),
        signal: Some(9),
        duration_ms: 5,
        log_tail: "tail".into(),
        status_file: Some("{}".into()),
        timed_out: true,
        resources: vec!["host-a".into()],
    });
    job.not_before = Some(now);
    job.history_dropped = 1;
    job.retry = false;
    job.max_attempts = Some(2);
    job.idempotency_key = Some("ci-1".into());
    job.budget_from = 1;
    job.lost_workers = vec!["b".into()];
    job
}

fn session(state: SessionState) -> Session {
    Session {
        version: 1,
        name: "s".into(),
        bot_id: "b".into(),
        resource: Some("host".into()),
        resources: vec![ResourceDecl {
            name: "host".into(),
            kind: "host".into(),
            path: Some("/srv".into()),
            depends_on: Some("other".into()),
        }],
        agent_instance: "a".into(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "v".into(),
        timeout_ms: Some(1000),
        state,
        created_at: Utc::now(),
        last_heartbeat: Utc::now(),
        superseded_by: Some("t".into()),
        ended_at: None,
        leases: vec![HeldLease {
            job_id: Uuid::new_v4(),
            epoch: 1,
        }],
    }
}

#[test]
fn the_schemas_match_the_bodies() {
    let doc = doc();
    let s = || Some("x".to_string());
    request_matches(
        &doc,
        "NewJob",
        &NewJob {
            task: "build".into(),
            args: BTreeMap::from([("a".to_string(), "b".to_string())]),
            pool: s(),
            priority: Some(1),
            retry: Some(false),
            max_attempts: Some(2),
            idempotency_key: s(),
        },
    );
    request_matches(
        &doc,
        "TakeRequest",
        &TakeRequest {
            bot_id: "b".into(),
            pools: vec!["p".into()],
            wait_ms: Some(1),
            timeout: s(),
        },
    );
    request_matches(
        &doc,
        "StateRequest",
        &StateRequest {
            id: s(),
            token: "t".into(),
            state: "CRASHED".into(),
            outcome: s(),
            blame: s(),
            detail: s(),
            description: s(),
        },
    );
    request_matches(&doc, "CancelBody", &CancelBody { reason: s() });
    request_matches(&doc, "RetryBody", &RetryBody {});
    request_matches(
        &doc,
        "ListQuery",
        &ListQuery {
            state: s(),
            task: s(),
            pool: s(),
            blame: s(),
            detail: s(),
            bot_id: s(),
            source_message_id: s(),
            since: s(),
            until: s(),
            q: s(),
            after: s(),
            limit: Some(1),
            offset: Some(1),
        },
    );
    request_matches(&doc, "StatsQuery", &StatsQuery { window: s() });
    request_matches(&doc, "BotsQuery", &BotsQuery { state: s() });

    let job = full_job();
    reply_matches(&doc, "Job", &job);
    reply_matches(&doc, "Lease", job.lease.as_ref().unwrap());
    reply_matches(&doc, "CrashInfo", job.crash.as_ref().unwrap());
    reply_matches(&doc, "Source", job.source.as_ref().unwrap());
    reply_matches(
        &doc,
        "HistoryEntry",
        &HistoryEntry {
            at: Utc::now(),
            action: Action::Crash,
            attempt: 1,
            from: Some(JobState::Running),
            to: Some(JobState::Crashed),
            actor: "s".into(),
            bot_id: s(),
            resource: s(),
            note: s(),
        },
    );
    reply_matches(&doc, "JobSummary", &job.summary());
    let minimal = Job::builder("t")
        .pool("p")
        .actor("api")
        .at(Utc::now())
        .build();
    required_matches(&doc, "Job", &minimal);
    required_matches(&doc, "JobSummary", &minimal.summary());
    reply_matches(
        &doc,
        "JobList",
        &ListReply {
            jobs: vec![job.summary()],
            total: 1,
            total_exact: false,
            next: Some("1764660000000000.00000000-0000-0000-0000-000000000001".into()),
        },
    );
    let execution = Execution {
        token: "w1".into(),
        job_id: job.id,
        epoch: 1,
        task: "t".into(),
        args: BTreeMap::new(),
        pool: "p".into(),
        priority: 0,
        bot_id: "b".into(),
        session: "s".into(),
        timeout_ms: 1,
    };
    reply_matches(&doc, "Execution", &execution);
    required_matches(&doc, "Execution", &execution);
    reply_matches(
        &doc,
        "TakeReply",
        &TakeReply {
            execution: Some(execution),
        },
    );
    reply_matches(
        &doc,
        "StateReply",
        &StateReply {
            applied: true,
            job: job.clone(),
        },
    );
    reply_matches(&doc, "Stats", &Stats::default());
    required_matches(&doc, "Stats", &Stats::default());
    reply_matches(&doc, "Session", &session(SessionState::Active));
    reply_matches(
        &doc,
        "BotList",
        &BotsReply {
            bots: vec![session(SessionState::Closed)],
        },
    );

    let mut resource = Resource::register(
        &ResourceDecl {
            name: "host".into(),
            kind: "host".into(),
            path: Some("/srv".into()),
            depends_on: Some("other".into()),
        },
        1,
        "agent",
        "bot",
        "registered".into(),
        Utc::now(),
    );
    resource.check_after = Some(Utc::now());
    resource.check = Some(warden_shared::resource::PendingCheck {
        by: "h".into(),
        started_at: Utc::now(),
        trigger: "manual".into(),
    });
    resource
        .set_state(ResourceState::Suspicious, "suspect", Utc::now())
        .unwrap();
    // Set while closed only; the sample carries every documented field.
    resource.closed_for = Some("vanished".into());
    let listed = warden_shared::resource::listing(&[resource]);
    reply_matches(&doc, "Resource", &listed[0]);
    reply_matches(&doc, "ResourceList", &ResourcesReply { resources: listed });

    // The enums.
    let enum_of = |name: &str| schema(&doc, name)["enum"].clone();
    let values = |v: Vec<Value>| Value::Array(v);
    assert_eq!(
        enum_of("JobState"),
        values(JobState::ALL.iter().map(|s| json!(s)).collect())
    );
    assert_eq!(
        enum_of("Blame"),
        values(Blame::ALL.iter().map(|b| json!(b)).collect())
    );
    assert_eq!(
        enum_of("Action"),
        values(Action::ALL.iter().map(|a| json!(a)).collect())
    );
    let sessions = [
        SessionState::Active,
        SessionState::Quarantined,
        SessionState::Expired,
        SessionState::Closed,
    ];
    assert_eq!(
        enum_of("SessionState"),
        values(sessions.iter().map(|s| json!(s)).collect())
    );
}

/// The running API serves every route of the table (none is a 404 or
/// 405) and the document itself.
#[tokio::test]
async fn the_api_serves_every_route_and_its_document() {
    let mut api = common::Api::start().await;
    for r in ROUTES {
        let path = r.path.replace("{id}", &Uuid::new_v4().to_string());
        let resp = api
            .http
            .request(r.method.clone(), api.url(&path))
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert!(
            status != 405 && !(status == 404 && body.contains("no such route")),
            "{} {}: {status} {body}",
            r.method,
            r.path
        );
        assert!(
            r.statuses.contains(&status),
            "{} {}: {status} is not in its statuses",
            r.method,
            r.path
        );
    }

    let resp = api
        .http
        .get(api.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let served: Value = resp.json().await.unwrap();
    assert_eq!(served, doc());
    let metrics = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"warden_api_requests_total{route="openapi",status="200"}"#),
        "the document's route is not counted by name"
    );
    api.stop().await;
}
