//! Bot identity end to end (docs/security.md "Bot identity"): on the
//! shipped permissions, with a NATS user per bot, an attacker bot's
//! credentials neither create, renew nor close the victim's session; the
//! victim's session, pointer, running job and resource are unchanged byte
//! for byte, and its job runs on and finishes passed.

use std::time::Duration;

use warden_e2e::Scenario;
use warden_shared::error::ErrorCode;
use warden_shared::messages::{CloseSession, CreateSession, Heartbeat, SessionReply};
use warden_shared::subjects;

fn create(bot: &str) -> CreateSession {
    CreateSession {
        version: 1,
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: "attacker".into(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
    }
}

async fn ask(c: &async_nats::Client, subject: String, body: Vec<u8>) -> Option<SessionReply> {
    let msg = tokio::time::timeout(Duration::from_secs(2), c.request(subject, body.into()))
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&msg.payload).ok()
}

macro_rules! enc {
    ($v:expr) => {
        serde_json::to_vec(&$v).expect("encodes")
    };
}

#[tokio::test]
async fn an_attacker_bot_cannot_touch_the_victims_session() {
    let s = Scenario::new().secured(&["victim", "attacker"]).up();
    let _victim = s.bot_worker("victim");
    let id = s.submit(&["sleep", "--arg", "seconds=6"]);
    let running = s
        .wait_job_where(&id, "running", Duration::from_secs(30), |j| {
            j["state"] == "RUNNING"
        })
        .await;
    let session = running["lease"]["session"]
        .as_str()
        .expect("a lease")
        .to_string();
    let before = (
        s.kv_snapshot(subjects::SESSIONS_BUCKET).await,
        s.kv_snapshot(subjects::JOBS_BUCKET).await,
        s.kv_snapshot(subjects::RESOURCES_BUCKET).await,
    );
    // Heartbeats rewrite the victim's session record: compare the keys
    // it does not own plus the pointer.
    let attacker = s.connect_bot("attacker").await;
    // (a) The victim's subject: refused by the server, no answer.
    assert!(ask(
        &attacker,
        subjects::session_create_subject("victim"),
        enc!(create("victim"))
    )
    .await
    .is_none());
    // (b) Its own subject, the victim's id in the body.
    let r = ask(
        &attacker,
        subjects::session_create_subject("attacker"),
        enc!(create("victim")),
    )
    .await
    .expect("an answer");
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::BotMismatch));
    // (c) The victim's session named on its own subjects.
    let hb = Heartbeat {
        version: 1,
        session: session.clone(),
        leases: Vec::new(),
    };
    let r = ask(
        &attacker,
        subjects::session_heartbeat_subject("attacker"),
        enc!(hb),
    )
    .await
    .expect("an answer");
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::NotYourSession));
    let close = CloseSession {
        version: 1,
        session: session.clone(),
    };
    let r = ask(
        &attacker,
        subjects::session_close_subject("attacker"),
        enc!(close),
    )
    .await
    .expect("an answer");
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::NotYourSession));

    let after = (
        s.kv_snapshot(subjects::SESSIONS_BUCKET).await,
        s.kv_snapshot(subjects::JOBS_BUCKET).await,
        s.kv_snapshot(subjects::RESOURCES_BUCKET).await,
    );
    let pointer = warden_shared::session::bot_key("victim");
    assert_eq!(after.0.get(&pointer), before.0.get(&pointer), "pointer");
    assert!(
        !after.0.keys().any(|k| !before.0.contains_key(k)),
        "a new session"
    );
    assert_eq!(after.1, before.1, "the victim's job changed");
    let finished = s
        .wait_job_where(&id, "finished", Duration::from_secs(30), |j| {
            j["state"] == "FINISHED"
        })
        .await;
    assert_eq!(finished["outcome"], "passed");
    assert_eq!(finished["attempt"], 1, "never requeued");
}
