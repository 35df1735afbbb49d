use std::path::PathBuf;

use chrono::Duration;
use warden_shared::amqp::CiContact;
use warden_shared::job::{Blame, Lease};
use warden_shared::state::Action;

use super::*;

fn ci() -> CiMessagesConfig {
    CiMessagesConfig {
        enabled: true,
        exchange: "amq.topic".into(),
        topic_prefix: "org.fedoraproject.prod.ci".into(),
        namespace: "warden".into(),
        api_url: "https://warden.example.org/".into(),
        contact: CiContact {
            name: "Warden".into(),
            team: "CI".into(),
            docs: "https://example.org/docs".into(),
            email: "ci@example.org".into(),
            url: None,
            irc: None,
        },
        tasks: BTreeMap::from([(
            "rpmlint".to_string(),
            CiTask {
                artifact: "koji-build".into(),
                category: "static-analysis".into(),
                test_type: None,
                artifact_args: BTreeMap::from([
                    ("id".to_string(), "{build_id}".to_string()),
                    ("nvr".to_string(), "{nvr}".to_string()),
                    ("issuer".to_string(), "{owner}".to_string()),
                    ("component".to_string(), "{name}".to_string()),
                    ("scratch".to_string(), "false".to_string()),
                    ("source".to_string(), "{source}".to_string()),
                ]),
            },
        )]),
        confirm_timeout: std::time::Duration::from_secs(10),
        marker_max_age: std::time::Duration::from_secs(86400),
        marker_max_bytes: 1 << 20,
    }
}

fn job() -> Job {
    Job::builder("rpmlint")
        .arg("build_id", "2345678")
        .arg("nvr", "bash-5.2-1.fc40")
        .arg("owner", "alice")
        .arg("name", "bash")
        .build()
}

fn lease(epoch: u32, at: DateTime<Utc>) -> Lease {
    Lease {
        session: "s".into(),
        bot_id: "b".into(),
        resource: None,
        resources: Vec::new(),
        epoch,
        leased_at: at,
        started_at: Some(at),
        secret_hash: None,
    }
}

fn running(mut j: Job) -> Job {
    j.attempt += 1;
    j.state = JobState::Running;
    j.lease = Some(lease(j.attempt, j.updated_at));
    j
}

fn finished(mut j: Job, outcome: &str) -> Job {
    j.state = JobState::Finished;
    j.outcome = Some(outcome.into());
    j.updated_at += Duration::milliseconds(12_500);
    j
}

fn crashed(mut j: Job, blame: Blame, detail: &str) -> Job {
    j.state = JobState::Crashed;
    j.blame = Some(blame);
    j.detail = Some(detail.into());
    j.description = Some("the kernel killed it".into());
    j
}

fn msg(j: &Job) -> Result<CiMessage, Skip> {
    message_for(j, &ci(), false, Utc::now())
}

#[test]
fn each_state_gives_its_topic_and_status() {
    let q = job();
    let r = running(q.clone());
    let f = finished(r.clone(), "passed");
    let c = crashed(r.clone(), Blame::System, "oom");
    let mut s = c.clone();
    s.state = JobState::Shelved;
    let mut x = q.clone();
    x.cancel_by("alice", Some("not needed"), Utc::now())
        .expect("cancel");
    let p = "org.fedoraproject.prod.ci.warden.koji-build.test";
    for (j, status) in [
        (&q, CiStatus::Queued),
        (&r, CiStatus::Running),
        (&f, CiStatus::Complete),
        (&c, CiStatus::Error),
        (&s, CiStatus::Error),
        (&x, CiStatus::Error),
    ] {
        let m = msg(j).expect("a message");
        assert_eq!(m.status, status, "{}", j.state);
        assert_eq!(m.topic, format!("{p}.{}", status.as_str()));
        assert_eq!(m.body["pipeline"]["id"], json!(j.id.to_string()));
        assert_eq!(m.body["pipeline"]["name"], json!("rpmlint"));
        let url = format!("https://warden.example.org/api/v1/jobs/{}", j.id);
        assert_eq!(m.body["run"], json!({ "url": url, "log": url }));
        assert_eq!(m.body["test"]["namespace"], json!("warden"));
        assert_eq!(m.body["test"]["type"], json!("rpmlint"));
        assert_eq!(m.body["version"], json!("0.2.5"));
        assert_eq!(m.body["contact"]["email"], json!("ci@example.org"));
        let at = m.body["generated_at"].as_str().expect("a string");
        assert!(at.ends_with('Z'), "{at}");
        DateTime::parse_from_rfc3339(at).expect("RFC 3339");
    }
    let fm = msg(&f).expect("complete");
    assert_eq!(fm.body["test"]["result"], json!("passed"));
    assert_eq!(fm.body["test"]["runtime"], json!(12.5));
    assert_eq!(fm.body["test"]["output"], json!("outcome passed"));
    assert_eq!(fm.body["system"], json!([]));
    assert!(msg(&q).expect("queued").body.get("system").is_none());
    assert_eq!(
        msg(&c).expect("error").body["error"]["reason"],
        json!("crashed (blame: system, detail: oom): the kernel killed it")
    );
    assert_eq!(
        msg(&x).expect("error").body["error"]["reason"],
        json!("cancelled: not needed")
    );
    let mut other = q.clone();
    other.task = "noop".into();
    assert_eq!(msg(&other), Err(Skip::TaskNotPublished));
}

#[test]
fn outcomes_map_to_the_result_enum() {
    for (o, r) in [
        ("passed", "passed"),
        ("FAILED", "failed"),
        ("needs_inspection", "needs_inspection"),
        ("info", "info"),
        ("not_applicable", "not_applicable"),
        ("flaky", "needs_inspection"),
        ("", "needs_inspection"),
    ] {
        assert_eq!(result_of(Some(o)), r, "{o}");
    }
    assert_eq!(result_of(None), "needs_inspection");
    let j = finished(running(job()), "weird");
    assert_eq!(
        msg(&j).expect("complete").body["test"]["result"],
        json!("needs_inspection")
    );
}

#[test]
fn a_retried_crash_publishes_nothing_but_the_next_queued() {
    let policy = RetryPolicy {
        retryable: vec!["system/*".into()],
        max_attempts: 3,
        initial_delay: std::time::Duration::from_secs(1),
        backoff: 2.0,
        max_delay: std::time::Duration::from_secs(60),
        jitter: 0.0,
        poison_limit: 0,
    };
    let now = Utc::now() + Duration::seconds(5);
    let c = crashed(running(job()), Blame::System, "oom");
    assert!(will_retry(&c, &policy, now));
    assert_eq!(
        message_for(&c, &ci(), will_retry(&c, &policy, now), now),
        Err(Skip::RetryPending)
    );
    // What the scheduler writes: the retry in the crash's own write.
    let mut next = c.clone();
    assert_eq!(retry::after_crash(&mut next, &policy, now), Fate::Retried);
    let m = message_for(&next, &ci(), will_retry(&next, &policy, now), now).expect("queued");
    assert_eq!(m.status, CiStatus::Queued);
    assert!(should_publish(
        Some(&msg(&running(job())).expect("r").marker),
        &m.marker
    ));
    // Not retryable (task blame): an error.
    let t = crashed(running(job()), Blame::Task, "segfault");
    assert!(!will_retry(&t, &policy, now));
    assert_eq!(
        message_for(&t, &ci(), false, now).map(|m| m.status),
        Ok(CiStatus::Error)
    );
    // Retries off for the job: an error.
    let mut off = c.clone();
    off.retry = false;
    assert!(!will_retry(&off, &policy, now));
}

#[test]
fn artifact_fields_are_typed_and_required() {
    let a = msg(&job()).expect("queued").body["artifact"].clone();
    assert_eq!(
        a,
        json!({
            "type": "koji-build",
            "id": 2345678,
            "nvr": "bash-5.2-1.fc40",
            "issuer": "alice",
            "component": "bash",
            "scratch": false,
        }),
        "optional `source` without an arg is left out"
    );
    let mut j = job();
    j.args.remove("owner");
    assert_eq!(msg(&j), Err(Skip::IncompleteArtifact));
    let mut j = job();
    j.args.insert("owner".into(), "  ".into());
    assert_eq!(msg(&j), Err(Skip::IncompleteArtifact), "an empty value");
    let mut j = job();
    j.args.insert("build_id".into(), "twelve".into());
    assert_eq!(msg(&j), Err(Skip::InvalidArtifact));
    let mut c = ci();
    let t = c.tasks.get_mut("rpmlint").expect("task");
    t.artifact_args.insert("scratch".into(), "{scratch}".into());
    let mut j = job();
    j.args.insert("scratch".into(), "True".into());
    let m = message_for(&j, &c, false, Utc::now()).expect("message");
    assert_eq!(m.body["artifact"]["scratch"], json!(true));
    j.args.insert("scratch".into(), "maybe".into());
    assert_eq!(
        message_for(&j, &c, false, Utc::now()),
        Err(Skip::InvalidArtifact)
    );
    // A type Warden does not know: strings as rendered.
    let t = c.tasks.get_mut("rpmlint").expect("task");
    t.artifact = "fedora-update".into();
    t.artifact_args = BTreeMap::from([("id".to_string(), "{build_id}".to_string())]);
    let m = message_for(&job(), &c, false, Utc::now()).expect("message");
    assert_eq!(
        m.body["artifact"],
        json!({ "type": "fedora-update", "id": "2345678" })
    );
    assert_eq!(
        m.topic,
        "org.fedoraproject.prod.ci.warden.fedora-update.test.queued"
    );
}

#[test]
fn output_and_reason_are_bounded() {
    let mut c = crashed(running(job()), Blame::Task, "x");
    c.description = Some("é".repeat(2000));
    let r = error_reason(&c);
    assert_eq!(r.chars().count(), MAX_OUTPUT_CHARS);
    let mut f = finished(running(job()), "failed");
    f.description = Some("y".repeat(2000));
    let m = msg(&f).expect("complete");
    let out = m.body["test"]["output"].as_str().expect("output");
    assert_eq!(out.chars().count(), MAX_OUTPUT_CHARS);
}

/// A job's life as revisions of the jobs bucket, several of each state
/// (lease updates, heartbeats): created, attempt 1 crashes and is retried,
/// attempt 2 is lost with its worker and requeued, attempt 3 finishes.
fn life() -> Vec<Job> {
    let t0 = Utc::now();
    let mut revs = Vec::new();
    let mut j = job();
    j.queued_at = t0;
    revs.push(j.clone());
    for (attempt, end) in [(1, "retry"), (2, "requeue"), (3, "finish")] {
        j = running(j);
        assert_eq!(j.attempt, attempt);
        revs.push(j.clone());
        j.updated_at += Duration::seconds(1);
        revs.push(j.clone()); // a heartbeat's write
        match end {
            "finish" => {
                j = finished(j, "passed");
                revs.push(j.clone());
            }
            _ => {
                j.state = JobState::Scheduled;
                j.lease = None;
                j.queued_at += Duration::seconds(10 * i64::from(attempt));
                revs.push(j.clone());
                revs.push(j.clone()); // rewritten while it waits
            }
        }
    }
    // A person's retry cannot follow FINISHED; a cancelled queued job can.
    revs
}

/// Every (attempt, stay, status) the life published, in its true order.
fn expected(revs: &[Job]) -> Vec<Marker> {
    let mut out: Vec<Marker> = Vec::new();
    for r in revs {
        let m = msg(r).expect("message").marker;
        if out.last() != Some(&m) {
            out.push(m);
        }
    }
    out
}

#[test]
fn random_orders_publish_each_message_at_most_once_and_never_a_stale_one() {
    let revs = life();
    let all = expected(&revs);
    assert_eq!(
        all.iter().map(|m| m.status.as_str()).collect::<Vec<_>>(),
        ["queued", "running", "queued", "running", "queued", "running", "complete"]
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..2000 {
        let mut order = revs.clone();
        // Fisher-Yates with an xorshift.
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let mut last: Option<Marker> = None;
        let mut published: Vec<Marker> = Vec::new();
        for r in &order {
            let m = msg(r).expect("message").marker;
            if should_publish(last.as_ref(), &m) {
                if let Some(prev) = published.last() {
                    assert!(m.key() > prev.key(), "stale after newer");
                }
                assert!(!published.contains(&m), "published twice");
                published.push(m.clone());
                last = Some(m);
            }
        }
        // Whatever was published is in the life's order, and the last
        // revision's message always goes out.
        let idx: Vec<usize> = published
            .iter()
            .map(|m| all.iter().position(|a| a == m).expect("a real message"))
            .collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(published.last(), all.last());
    }
    // In order, every message goes out exactly once.
    let mut last = None;
    let mut n = 0;
    for r in &revs {
        let m = msg(r).expect("message").marker;
        if should_publish(last.as_ref(), &m) {
            n += 1;
            last = Some(m);
        }
    }
    assert_eq!(n, all.len());
}

#[test]
fn a_cancelled_queued_job_retried_by_hand_queues_again() {
    let q = job();
    let mut x = q.clone();
    x.cancel_by("alice", None, q.queued_at).expect("cancel");
    let mut again = x.clone();
    again
        .retry_by("alice", q.queued_at + Duration::seconds(1))
        .expect("retry");
    assert_eq!(again.history.last().map(|e| e.action), Some(Action::Retry));
    let (mq, mx, ma) = (
        msg(&q).expect("q").marker,
        msg(&x).expect("x").marker,
        msg(&again).expect("a").marker,
    );
    assert!(should_publish(Some(&mq), &mx));
    assert!(should_publish(Some(&mx), &ma));
    assert!(!should_publish(Some(&ma), &mx));
    assert!(!should_publish(Some(&ma), &ma));
}

// --- The body against the ci-messages schemas --------------------------
//
// A small JSON-schema subset (`$ref` to a sibling file or its
// `#properties/x`, `allOf`, `required`, `properties`, `type`, `enum`,
// `items`): enough for the schemas' required fields, their JSON types and
// enums. The full validation (jsonschema, formats) is the e2e test's, with
// the real fedora-messaging consumer.

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ci-messages")
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(schema_dir().join(name)).expect("schema file");
    serde_json::from_str(&text).expect("schema JSON")
}

fn resolve(r: &str) -> Value {
    let (file, frag) = r.split_once('#').unwrap_or((r, ""));
    // The group schemas name the group artifact; a koji-build message
    // carries one build (rpm-build.json), the rest is the same.
    let file = if file == "rpm-build-group.json" {
        "rpm-build.json"
    } else {
        file
    };
    let mut v = load(file);
    for seg in frag.split('/').filter(|s| !s.is_empty()) {
        v = v[seg].clone();
    }
    v
}

fn check(schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        if r.starts_with("notification") || r.starts_with("system") {
            return; // not shipped in the fixtures; optional or empty here
        }
        check(&resolve(r), v, at, errors);
        return;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(s, v, at, errors);
        }
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: not a {t}: {v}"));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for k in req.iter().filter_map(Value::as_str) {
            if v.get(k).is_none() {
                errors.push(format!("{at}: {k} is missing"));
            }
        }
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) {
        for (k, s) in props {
            if let Some(x) = obj.get(k) {
                check(s, x, &format!("{at}.{k}"), errors);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(items, x, &format!("{at}[{i}]"), errors);
        }
    }
}

fn validate(m: &CiMessage) -> Vec<String> {
    let status = m.topic.rsplit('.').next().expect("a status");
    let schema = load(&format!("koji-build-group.test.{status}.json"));
    let mut errors = Vec::new();
    check(&schema, &m.body, "body", &mut errors);
    errors
}

#[test]
fn every_status_validates_against_its_schema() {
    let r = running(job());
    let mut x = job();
    x.cancel_by("alice", None, Utc::now()).expect("cancel");
    for j in [
        job(),
        r.clone(),
        finished(r.clone(), "passed"),
        finished(r.clone(), "oddball"),
        crashed(r.clone(), Blame::ThirdParty, "koji_down"),
        x,
    ] {
        let m = msg(&j).expect("a message");
        assert_eq!(validate(&m), Vec::<String>::new(), "{}", m.topic);
    }
    // The validator does catch what the schema wants.
    let mut bad = msg(&finished(r.clone(), "passed")).expect("complete");
    bad.body["artifact"]["id"] = json!("2345678");
    bad.body["test"]["result"] = json!("ok");
    bad.body.as_object_mut().expect("object").remove("system");
    let errors = validate(&bad);
    assert_eq!(errors.len(), 3, "{errors:?}");
}
