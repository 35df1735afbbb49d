//! Leases, reports and execution tokens against a real nats-server with the
//! shipped permissions (a NATS user per bot): with the attacker bot's
//! credentials alone, nobody takes the victim's work, finishes or hangs its
//! job, or forges its execution token. After every attack the victim's
//! session, lease, job and resources are as before, byte for byte, and its
//! job then finishes passed on its own reports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use uuid::Uuid;
use warden_e2e::{eventually, Scenario, Stack};
use warden_shared::error::ErrorCode;
use warden_shared::messages::{
    AcquireReply, AcquireRequest, CreateSession, LeaseGrant, Report, ReportKind, SessionReply,
};
use warden_shared::subjects;

const VICTIM: &str = "victim";
const ATTACKER: &str = "attacker";
/// The victim's pool: the attacker's session does not serve it.
const POOL: &str = "secure";

/// A session for `bot` serving `pools`, from the fencing service. Asked
/// on the bot's own create subject with its own credentials where the
/// fencing service serves it, else (a fencing service from before bot
/// subjects) on the shared subject by the services' user.
async fn open_session(s: &Stack, bot: &str, pools: &[&str]) -> String {
    let create = CreateSession {
        version: 1,
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: Uuid::new_v4().to_string(),
        pools: pools.iter().map(|p| p.to_string()).collect(),
        capacity: 1,
        agent_version: "test".into(),
        // Longer than the test: nothing expires while it runs.
        timeout_ms: Some(300_000),
    };
    let body = serde_json::to_vec(&create).unwrap();
    let own = s.connect_bot(bot).await;
    let service = s.service_client().await;
    eventually(Duration::from_secs(30), "a session", || {
        let (own, service, body) = (own.clone(), service.clone(), body.clone());
        async move {
            let ask = |c: async_nats::Client, subject: String, body: Vec<u8>| async move {
                let msg =
                    tokio::time::timeout(Duration::from_secs(2), c.request(subject, body.into()))
                        .await
                        .ok()?
                        .ok()?;
                serde_json::from_slice::<SessionReply>(&msg.payload)
                    .ok()?
                    .session
            };
            match ask(own, subjects::session_create_subject(bot), body.clone()).await {
                Some(s) => Some(s),
                None => ask(service, subjects::SESSION_CREATE.to_string(), body).await,
            }
        }
    })
    .await
}

fn acquire_req(session: &str, bot: &str, pools: &[&str]) -> AcquireRequest {
    AcquireRequest {
        version: 1,
        session: session.into(),
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        pools: pools.iter().map(|p| p.to_string()).collect(),
        max: 1,
        wait_ms: 300,
    }
}

/// `req` on `subject` with `client`; `None` when no answer comes (refused
/// by the server's permissions, or nobody serves it).
async fn acquire_on(
    client: &async_nats::Client,
    subject: String,
    req: &AcquireRequest,
) -> Option<AcquireReply> {
    let body = serde_json::to_vec(req).unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), client.request(subject, body.into()))
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&msg.payload).ok()
}

/// The raw jobs, sessions and resources buckets.
async fn state(s: &Stack) -> [BTreeMap<String, Vec<u8>>; 3] {
    [
        s.kv_snapshot(subjects::JOBS_BUCKET).await,
        s.kv_snapshot(subjects::SESSIONS_BUCKET).await,
        s.kv_snapshot(subjects::RESOURCES_BUCKET).await,
    ]
}

fn report(
    job: Uuid,
    session: &str,
    bot: &str,
    epoch: u32,
    secret: Option<String>,
    kind: ReportKind,
) -> Report {
    Report {
        version: 1,
        job_id: job,
        session: session.into(),
        bot_id: bot.into(),
        epoch,
        at: Utc::now(),
        secret,
        kind,
    }
}

fn finished() -> ReportKind {
    ReportKind::Finished {
        outcome: "passed".into(),
        duration_ms: 5,
    }
}

/// Publishes `r` on `subject` with de-duplication id `msg_id`; whether the
/// stream stored it (not: refused by permissions, or a duplicate).
async fn publish(js: &jetstream::Context, subject: String, msg_id: &str, r: &Report) -> bool {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    let body = serde_json::to_vec(r).unwrap();
    let Ok(ack) = js.publish_with_headers(subject, headers, body.into()).await else {
        return false;
    };
    match tokio::time::timeout(Duration::from_secs(3), ack).await {
        Ok(Ok(a)) => !a.duplicate,
        _ => false,
    }
}

/// How many dead letters of the scheduler with `reason` are kept.
async fn dead_letters(s: &Stack, reason: &str) -> u64 {
    use futures::StreamExt;
    let js = jetstream::new(s.service_client().await);
    let Ok(stream) = js.get_stream(subjects::DEADLETTER_STREAM).await else {
        return 0;
    };
    let subject = subjects::deadletter_subject("scheduler", reason);
    let Ok(mut subjects) = stream.info_with_subjects(subject).await else {
        return 0;
    };
    match subjects.next().await {
        Some(Ok((_, n))) => n as u64,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_bot_cannot_take_finish_hang_or_forge_the_victims_work() {
    let s = Scenario::new().secured(&[VICTIM, ATTACKER]).up();
    let id = s.submit(&["noop", "--pool", POOL]);
    let job_id: Uuid = id.parse().unwrap();
    s.wait_job_where(&id, "scheduled", Duration::from_secs(30), |j| {
        j["state"] == "SCHEDULED"
    })
    .await;
    let victim_session = open_session(&s, VICTIM, &[POOL]).await;
    let attacker_session = open_session(&s, ATTACKER, &["default"]).await;
    let attacker = s.connect_bot(ATTACKER).await;
    let victim = s.connect_bot(VICTIM).await;

    // (a) Acquire as the attacker: a made-up session, the victim's
    // session, the victim's bot in the body, a pool it does not serve.
    let before = state(&s).await;
    let mine = subjects::acquire_subject(ATTACKER);
    for (req, code) in [
        (
            acquire_req("made-up", ATTACKER, &[POOL]),
            ErrorCode::UnknownSession,
        ),
        (
            acquire_req(&Uuid::new_v4().to_string(), ATTACKER, &[POOL]),
            ErrorCode::UnknownSession,
        ),
        (
            acquire_req(&victim_session, ATTACKER, &[POOL]),
            ErrorCode::UnknownSession,
        ),
        (
            acquire_req(&victim_session, VICTIM, &[POOL]),
            ErrorCode::BotMismatch,
        ),
        (
            acquire_req(&attacker_session, ATTACKER, &[POOL]),
            ErrorCode::PoolNotAllowed,
        ),
        (
            acquire_req(&attacker_session, ATTACKER, &["default", POOL]),
            ErrorCode::PoolNotAllowed,
        ),
    ] {
        let reply = eventually(Duration::from_secs(20), "the scheduler answers", || {
            acquire_on(&attacker, mine.clone(), &req)
        })
        .await;
        assert!(reply.leases.is_empty(), "{req:?} got {reply:?}");
        assert_eq!(reply.error.map(|e| e.code), Some(code), "{req:?}");
    }
    // The victim's own acquire subject: refused by the server.
    let stolen = acquire_on(
        &attacker,
        subjects::acquire_subject(VICTIM),
        &acquire_req(&victim_session, VICTIM, &[POOL]),
    )
    .await;
    assert!(stolen.is_none(), "{stolen:?}");
    assert_eq!(
        state(&s).await,
        before,
        "an attacker's acquire changed something"
    );

    // The victim takes its job, with the lease secret.
    let grant: LeaseGrant = eventually(Duration::from_secs(20), "the victim's lease", || {
        let victim = victim.clone();
        let req = acquire_req(&victim_session, VICTIM, &[POOL]);
        async move {
            acquire_on(&victim, subjects::acquire_subject(VICTIM), &req)
                .await?
                .leases
                .into_iter()
                .next()
        }
    })
    .await;
    assert_eq!(grant.job_id, job_id);
    let secret = grant.secret.clone().expect("a lease secret");
    let shown = s
        .wait_job_where(&id, "running", Duration::from_secs(20), |j| {
            j["state"] == "RUNNING"
        })
        .await;
    // What anyone who reads the job sees.
    let session = shown["lease"]["session"].as_str().unwrap().to_string();
    let epoch = shown["lease"]["epoch"].as_u64().unwrap() as u32;
    assert_eq!(
        (session.as_str(), epoch),
        (victim_session.as_str(), grant.epoch)
    );
    assert!(
        !shown.to_string().contains(&secret),
        "the job shows the secret"
    );

    // (b) A Finished report with the victim's session and epoch, and
    // (c) reports published ahead with the old and any guessable ids.
    let before = state(&s).await;
    let ajs = jetstream::new(attacker.clone());
    let forged = report(job_id, &session, ATTACKER, epoch, None, finished());
    let as_victim = report(job_id, &session, VICTIM, epoch, None, finished());
    assert!(
        !publish(
            &ajs,
            subjects::bot_report_subject(VICTIM, &job_id),
            &forged.msg_id(),
            &as_victim
        )
        .await,
        "the attacker published on the victim's report subject"
    );
    assert!(
        !publish(
            &ajs,
            subjects::report_subject(&job_id),
            &forged.msg_id(),
            &as_victim
        )
        .await,
        "the attacker published on the old report subject"
    );
    let own = subjects::bot_report_subject(ATTACKER, &job_id);
    assert!(publish(&ajs, own.clone(), &forged.msg_id(), &forged).await);
    assert!(
        publish(
            &ajs,
            own.clone(),
            &format!("{job_id}:{epoch}:finished:x"),
            &as_victim
        )
        .await
    );
    for kind in ["started", "finished", "crashed", "stopped"] {
        for id in [
            format!("{job_id}:{epoch}:{kind}"),
            format!("{job_id}:{epoch}:{kind}:-"),
        ] {
            publish(&ajs, own.clone(), &id, &forged).await;
        }
    }
    eventually(
        Duration::from_secs(20),
        "the forged reports dead-lettered",
        || {
            let s = &s;
            async move {
                (dead_letters(s, "report_from_other_bot").await >= 1
                    && dead_letters(s, "bot_mismatch").await >= 1)
                    .then_some(())
            }
        },
    )
    .await;

    // (d) Execution tokens: the old form built from what the job shows,
    // and the new form with a made-up secret.
    let service = s.service_client().await;
    for token in [
        format!("w1.{job_id}.{epoch}.{session}"),
        format!(
            "w2.{job_id}.{epoch}.{session}.{}",
            warden_shared::lease_secret::generate()
        ),
    ] {
        let body = serde_json::json!({
            "id": id, "token": token, "state": "FINISHED", "outcome": "passed"
        });
        let reply = service
            .request(subjects::API_JOB_STATE, body.to_string().into())
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(v["error"]["code"], "invalid_token", "{token}: {v}");
    }
    // Nothing the attacker did landed: wait a while for any of it to.
    tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if state(&s).await != before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect_err("an attack changed the victim's state");
    assert_eq!(state(&s).await, before);

    // The victim's own reports, with its secret: they land, the job
    // finishes passed.
    let vjs = jetstream::new(victim.clone());
    let mine = subjects::bot_report_subject(VICTIM, &job_id);
    let started = report(
        job_id,
        &session,
        VICTIM,
        epoch,
        Some(secret.clone()),
        ReportKind::Started { resource: None },
    );
    assert!(publish(&vjs, mine.clone(), &started.msg_id(), &started).await);
    let done = report(job_id, &session, VICTIM, epoch, Some(secret), finished());
    assert!(
        publish(&vjs, mine, &done.msg_id(), &done).await,
        "the victim's report was dropped as a duplicate"
    );
    let job = s
        .wait_job_where(&id, "finished", Duration::from_secs(20), |j| {
            j["state"] == "FINISHED"
        })
        .await;
    assert_eq!(job["outcome"], "passed", "{job}");
}
