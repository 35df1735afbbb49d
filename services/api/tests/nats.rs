//! The NATS endpoints and [`warden_api::ApiClient`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::Api;
use serde_json::Value;
use warden_api::{ApiClient, ClientError, ListQuery};
use warden_shared::error::ErrorCode;
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
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::UnknownTask),
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

/// A raw request, as the nats CLI would send it: the reply's JSON and the
/// service-error status header (None on success).
async fn raw(
    client: &async_nats::Client,
    subject: &'static str,
    body: &str,
) -> (Value, Option<String>) {
    let reply = client
        .request(subject, body.to_string().into())
        .await
        .expect("reply");
    let v: Value = serde_json::from_slice(&reply.payload).expect("json");
    let status = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|s| s.as_str().to_string());
    (v, status)
}

#[tokio::test]
async fn retry_over_nats_gives_a_shelved_job_a_fresh_budget() {
    let mut api = Api::start().await;
    let client = api.api_client().await;
    let (job, rev) = api.put_job(JobState::Shelved, 4).await;
    let back = client.retry(job.id).await.expect("retry");
    assert_eq!(back.state, JobState::Scheduled);
    assert_eq!((back.attempt, back.budget_from), (4, 4));
    assert!(back.lost_workers.is_empty());
    let last = back.history.last().expect("entry");
    assert_eq!(
        (last.action, last.actor.as_str(), last.from),
        (Action::Retry, "api", Some(JobState::Shelved))
    );
    let stored = api.store().await.get(&job.id).await.unwrap().unwrap();
    assert_eq!(stored.job, back);
    assert!(stored.revision > rev);

    // The raw form: {"id": "..."}.
    let (crashed, _) = api.put_job(JobState::Crashed, 1).await;
    let (v, status) = raw(
        &api.nats_client().await,
        subjects::API_JOB_RETRY,
        &format!(r#"{{"id": "{}"}}"#, crashed.id),
    )
    .await;
    assert_eq!(
        (v["state"].as_str(), status),
        (Some("SCHEDULED"), None),
        "{v}"
    );
    assert_eq!(v["budget_from"], 1, "{v}");
    api.stop().await;
}

#[tokio::test]
async fn illegal_changes_over_nats_are_409_and_change_nothing() {
    let mut api = Api::start().await;
    let client = api.api_client().await;
    let raw_client = api.nats_client().await;
    for (state, action) in [
        (JobState::Finished, "retry"),
        (JobState::Scheduled, "retry"),
        (JobState::Finished, "cancel"),
        (JobState::Shelved, "cancel"),
    ] {
        let (job, rev) = api.put_job(state, 1).await;
        let err = if action == "retry" {
            client.retry(job.id).await.expect_err("illegal")
        } else {
            client
                .cancel(job.id, Some("x".into()))
                .await
                .expect_err("illegal")
        };
        match err {
            ClientError::Api(e) => {
                assert_eq!(e.code, ErrorCode::IllegalTransition);
                assert_eq!(
                    e.message,
                    format!("illegal transition: cannot {action} a {state} job")
                );
            }
            other => panic!("expected an api error, got {other:?}"),
        }
        let subject = if action == "retry" {
            subjects::API_JOB_RETRY
        } else {
            subjects::API_JOB_CANCEL
        };
        let (v, status) = raw(&raw_client, subject, &format!(r#"{{"id": "{}"}}"#, job.id)).await;
        assert_eq!(v["error"]["code"], "illegal_transition", "{v}");
        assert_eq!(status.as_deref(), Some("409"));
        assert_eq!(api.revision(&job.id).await, rev, "{action} {state} wrote");
    }
    api.stop().await;
}

#[tokio::test]
async fn cancel_over_nats_records_the_reason_once() {
    let mut api = Api::start().await;
    let client = api.api_client().await;
    let job = client.create(new_job("build")).await.expect("create");
    let cancelled = client
        .cancel(job.id, Some("no longer wanted".into()))
        .await
        .expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);
    let last = cancelled.history.last().expect("entry");
    assert_eq!(
        (last.action, last.actor.as_str(), last.note.as_deref()),
        (Action::Cancel, "api", Some("no longer wanted"))
    );
    let rev = api.revision(&job.id).await;
    let err = client.cancel(job.id, None).await.expect_err("twice");
    assert_eq!(err.code(), Some("illegal_transition"));
    assert_eq!(api.revision(&job.id).await, rev, "the second cancel wrote");

    // A cancelled job can be retried, over NATS as over HTTP.
    let again = client.retry(job.id).await.expect("retry");
    assert_eq!(again.state, JobState::Scheduled);
    api.stop().await;
}

#[tokio::test]
async fn bad_retry_and_cancel_requests_over_nats() {
    let mut api = Api::start().await;
    let client = api.api_client().await;
    let unknown = uuid::Uuid::new_v4();
    for r in [
        client.retry(unknown).await.map(|_| ()),
        client.cancel(unknown, None).await.map(|_| ()),
    ] {
        assert_eq!(r.expect_err("unknown").code(), Some("not_found"));
    }
    let (job, rev) = api.put_job(JobState::Scheduled, 0).await;
    let id = job.id;
    let long = "x".repeat(1001);
    let raw_client = api.nats_client().await;
    let cases: Vec<(&'static str, String, &str, &str)> = vec![
        (
            subjects::API_JOB_RETRY,
            format!(r#"{{"id": "{unknown}"}}"#),
            "404",
            "not_found",
        ),
        (
            subjects::API_JOB_CANCEL,
            r#"{"id": "nope"}"#.into(),
            "400",
            "invalid_id",
        ),
        (
            subjects::API_JOB_RETRY,
            r#"{"id": "nope"}"#.into(),
            "400",
            "invalid_id",
        ),
        (
            subjects::API_JOB_CANCEL,
            "{oops".into(),
            "400",
            "invalid_json",
        ),
        (
            subjects::API_JOB_RETRY,
            "{oops".into(),
            "400",
            "invalid_json",
        ),
        (subjects::API_JOB_RETRY, "".into(), "400", "invalid_json"),
        (
            subjects::API_JOB_CANCEL,
            "{}".into(),
            "400",
            "invalid_request",
        ),
        (
            subjects::API_JOB_CANCEL,
            format!(r#"{{"id": "{id}", "reasn": "typo"}}"#),
            "400",
            "invalid_request",
        ),
        (
            subjects::API_JOB_RETRY,
            format!(r#"{{"id": "{id}", "force": true}}"#),
            "400",
            "invalid_request",
        ),
        (
            subjects::API_JOB_CANCEL,
            format!(r#"{{"id": "{id}", "reason": "{long}"}}"#),
            "400",
            "invalid_request",
        ),
    ];
    for (subject, body, status, code) in cases {
        let (v, got) = raw(&raw_client, subject, &body).await;
        assert_eq!(v["error"]["code"], code, "{subject} {body}: {v}");
        assert_eq!(got.as_deref(), Some(status), "{subject} {body}");
    }
    assert_eq!(api.revision(&id).await, rev, "nothing changed");
    api.stop().await;
}

async fn connect_as(api: &Api, user: &str, password: &str) -> async_nats::Client {
    // Each user may subscribe only below its own inbox prefix.
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(subjects::role_inbox_prefix(user))
        .connect(api.nats.url())
        .await
        .expect("connect")
}

/// Writes over NATS have no token: the deploy's permissions keep them to
/// the services' user.
#[tokio::test]
async fn only_the_service_user_may_retry_or_cancel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conf, bots) = warden_testsupport::accounts_conf_with_bots(dir.path(), &["bot-1"]);
    let nats = warden_testsupport::NatsServer::start_with_args(&[
        "-c",
        conf.to_str().expect("utf-8 path"),
    ]);
    let mut api = Api::start_on(nats, None, Some(("warden-service", "service-pw"))).await;
    let service = connect_as(&api, "warden-service", "service-pw").await;
    let store = common::store_of(service.clone()).await;
    let (shelved, _) = api.put_job_in(&store, JobState::Shelved, 2).await;
    let (scheduled, _) = api.put_job_in(&store, JobState::Scheduled, 0).await;
    let revision = |id| {
        let store = store.clone();
        async move { store.get(&id).await.unwrap().unwrap().revision }
    };
    let before = (revision(shelved.id).await, revision(scheduled.id).await);

    for (user, password) in [
        ("warden-readonly", "readonly-pw"),
        ("bot-1", ""),
        ("warden-publisher", "publisher-pw"),
        ("warden-executor", "executor-pw"),
    ] {
        let connection = match bots.iter().find(|b| b.bot_id == user) {
            Some(bot) => {
                let seed = std::fs::read_to_string(&bot.nkey_file).expect("seed");
                async_nats::ConnectOptions::with_nkey(seed)
                    .custom_inbox_prefix(subjects::bot_inbox_prefix(user))
                    .connect(api.nats.url())
                    .await
                    .expect("connect as a bot")
            }
            None => connect_as(&api, user, password).await,
        };
        let client = ApiClient::new(connection).with_timeout(std::time::Duration::from_millis(500));
        let retried = client.retry(shelved.id).await;
        assert!(
            matches!(retried, Err(ref e) if e.code().is_none()),
            "{user} retried: {retried:?}"
        );
        let cancelled = client.cancel(scheduled.id, None).await;
        assert!(
            matches!(cancelled, Err(ref e) if e.code().is_none()),
            "{user} cancelled: {cancelled:?}"
        );
    }
    assert_eq!(
        (revision(shelved.id).await, revision(scheduled.id).await),
        before,
        "nothing changed"
    );

    // The read-only user still reads (so the refusals above were the
    // permissions, not a broken connection); the services' user writes.
    let readonly = ApiClient::new(connect_as(&api, "warden-readonly", "readonly-pw").await);
    let seen =
        warden_testsupport::eventually(std::time::Duration::from_secs(10), "read-only get", || {
            let c = readonly.clone();
            async move { c.get(shelved.id).await.ok().flatten() }
        })
        .await;
    assert_eq!(seen.state, JobState::Shelved);
    // An external executor's user reaches the take and state endpoints
    // (here an answer about the missing fencing service and a refusal of
    // a bad token: answers, not permission errors), and reads jobs.
    let executor = connect_as(&api, "warden-executor", "executor-pw").await;
    for (subject, body, code) in [
        (
            subjects::API_EXECUTION_TAKE,
            r#"{"bot_id": "script-1"}"#,
            "unavailable",
        ),
        (
            subjects::API_JOB_STATE,
            r#"{"id": "x", "token": "t", "state": "RUNNING"}"#,
            "invalid_id",
        ),
    ] {
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(15),
            executor.request(subject, body.into()),
        )
        .await
        .expect("an answer in time")
        .expect("an answer");
        let v: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert_eq!(v["error"]["code"], code, "{subject}: {v}");
    }
    let executor = ApiClient::new(executor);
    assert_eq!(
        executor
            .get(shelved.id)
            .await
            .expect("get")
            .expect("job")
            .state,
        JobState::Shelved
    );
    let writer = ApiClient::new(service);
    assert_eq!(
        writer.retry(shelved.id).await.expect("retry").state,
        JobState::Scheduled
    );
    assert_eq!(
        writer
            .cancel(scheduled.id, None)
            .await
            .expect("cancel")
            .state,
        JobState::Cancelled
    );
    api.stop().await;
}

#[tokio::test]
async fn idempotent_create_over_nats() {
    let mut api = Api::start().await;
    let client = api.api_client().await;
    let keyed = |task: &str| NewJob {
        idempotency_key: Some("nats-key-1".into()),
        ..new_job(task)
    };
    let first = client
        .create_replayable(keyed("build"))
        .await
        .expect("create");
    assert!(!first.replayed);
    let again = client
        .create_replayable(keyed("build"))
        .await
        .expect("create");
    assert!(again.replayed, "the second create is a replay");
    assert_eq!(again.job.id, first.job.id);
    assert_eq!(again.job.idempotency_key.as_deref(), Some("nats-key-1"));
    match client.create(keyed("noop")).await {
        Err(e) => assert_eq!(e.code(), Some("idempotency_conflict")),
        Ok(j) => panic!("created {j:?}"),
    }
    // Concurrent creates with one key: one job, one creation.
    let burst = NewJob {
        idempotency_key: Some("nats-burst".into()),
        ..new_job("build")
    };
    let replies =
        futures::future::join_all((0..12).map(|_| client.create_replayable(burst.clone()))).await;
    let replies: Vec<_> = replies.into_iter().map(|r| r.expect("create")).collect();
    assert_eq!(replies.iter().filter(|r| !r.replayed).count(), 1);
    let ids: std::collections::HashSet<_> = replies.iter().map(|r| r.job.id).collect();
    assert_eq!(ids.len(), 1);
    api.stop().await;
}
