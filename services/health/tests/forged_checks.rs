//! Resource checks against a real nats-server with the shipped
//! permissions (two bots, `victim` and `attacker`): the attacker can
//! neither subscribe to the victim's check subject (nor to every agent's)
//! nor publish an answer onto the health service's inbox, so the only
//! answer the health service gets is the victim's own, and the victim's
//! resource stays open, same incarnation, never recycled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warden_shared::messages::{CheckReply, ResourceSuspect};
use warden_shared::resource::{resource_key, Resource, ResourceDecl, ResourceState};
use warden_shared::session::{session_key, Session, SessionState};
use warden_shared::{runtime, subjects, Config};
use warden_testsupport::{accounts_conf_with_bots, eventually, never_within, NatsServer};

fn session() -> Session {
    Session {
        version: 1,
        name: "s-victim".into(),
        bot_id: "victim".into(),
        resource: Some("host-v".into()),
        resources: vec![ResourceDecl {
            name: "host-v".into(),
            kind: "host".into(),
            path: None,
            depends_on: None,
        }],
        agent_instance: "agent-v".into(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
        state: SessionState::Active,
        created_at: Utc::now(),
        last_heartbeat: Utc::now(),
        superseded_by: None,
        leases: Vec::new(),
        ended_at: None,
    }
}

fn reply(passed: bool) -> Vec<u8> {
    serde_json::to_vec(&CheckReply {
        version: 1,
        passed,
        results: Vec::new(),
        error: None,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_bot_cannot_answer_the_victims_check() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, bots) = accounts_conf_with_bots(dir.path(), &["victim", "attacker"]);
    let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let url = nats.url();
    let text = format!(
        "[nats]\nurl = \"{url}\"\nuser = \"warden-service\"\npassword = \"service-pw\"\n[health]\ncheck_timeout = \"2s\"\n"
    );
    let config = Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap());
    let (_service, handles) = runtime::Connect::new(&config, "test")
        .topology_forever()
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(warden_health::run(config, shutdown.clone()));

    // The victim's agent, connected as Warden's worker connects: it says
    // its host is healthy.
    let victim_config = Config::from_parts(
        Some(&format!(
            "[nats]\nurl = \"{url}\"\nnkey_file = \"{}\"\n",
            bots[0].nkey_file.display()
        )),
        Vec::new(),
    )
    .unwrap();
    let victim = runtime::Connect::new(&victim_config, "test")
        .bot("victim")
        .client()
        .await
        .expect("the victim connects");
    let mut checks = victim
        .subscribe(subjects::agent_check_subject("victim"))
        .await
        .unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    let agent = victim.clone();
    tokio::spawn(async move {
        while let Some(msg) = checks.next().await {
            if let Some(to) = msg.reply {
                agent.publish(to, reply(true).into()).await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    victim.flush().await.unwrap();

    // The attacker: its own bot user, listening for the victim's checks
    // and answering "failed" onto every inbox it can name.
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    let seed = std::fs::read_to_string(&bots[1].nkey_file).unwrap();
    let attacker = async_nats::ConnectOptions::with_nkey(seed)
        .custom_inbox_prefix(subjects::bot_inbox_prefix("attacker"))
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(&url)
        .await
        .unwrap();
    let overheard = Arc::new(AtomicUsize::new(0));
    let denied = [
        subjects::agent_check_subject("victim"),
        "warden.agent.*.check".to_string(),
        "warden.agent.>".to_string(),
        "_INBOX.warden-service.>".to_string(),
    ];
    for subject in &denied {
        let mut sub = attacker.subscribe(subject.clone()).await.unwrap();
        let overheard = overheard.clone();
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                overheard.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let forged = [
        "_INBOX.warden-service.guess.1".to_string(),
        format!("{}.guess.1", subjects::bot_inbox_prefix("victim")),
        "_INBOX.guess.1".to_string(),
    ];
    for subject in &forged {
        attacker
            .publish(subject.clone(), reply(false).into())
            .await
            .unwrap();
    }
    attacker.flush().await.unwrap();
    eventually(Duration::from_secs(5), "every attempt refused", || async {
        let errors = errors.lock().unwrap();
        denied
            .iter()
            .chain(&forged)
            .all(|s| {
                errors
                    .iter()
                    .any(|e| e.contains("Permissions Violation") && e.contains(s.as_str()))
            })
            .then_some(())
    })
    .await;

    // The victim's host is registered, suspected, and checked.
    handles
        .sessions
        .put(
            session_key("s-victim"),
            serde_json::to_vec(&session()).unwrap().into(),
        )
        .await
        .unwrap();
    let resource = |handles: subjects::Handles| async move {
        let v = handles
            .resources
            .get(resource_key("host-v"))
            .await
            .unwrap()?;
        Some(serde_json::from_slice::<Resource>(&v).unwrap())
    };
    let before = eventually(Duration::from_secs(15), "host-v open", || async {
        resource(handles.clone())
            .await
            .filter(|r| r.state == ResourceState::Open)
    })
    .await;
    let suspect = ResourceSuspect {
        version: 1,
        resource: "host-v".into(),
        job_id: Uuid::new_v4(),
        attempt: 1,
        detail: "oom".into(),
        leased_at: Some(Utc::now()),
        at: Utc::now(),
    };
    handles
        .js
        .publish(
            subjects::suspect_subject("host-v"),
            serde_json::to_vec(&suspect).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let after = eventually(Duration::from_secs(15), "host-v checked", || async {
        resource(handles.clone())
            .await
            .filter(|r| !r.checks.is_empty())
    })
    .await;
    assert_eq!(after.checks[0].result, "passed", "{after:?}");
    assert_eq!(after.state, ResourceState::Open);
    assert_eq!(after.incarnation, before.incarnation);
    assert!(answered.load(Ordering::SeqCst) >= 1, "the victim answered");
    never_within(
        Duration::from_millis(500),
        "the attacker overheard",
        || async {
            let n = overheard.load(Ordering::SeqCst);
            (n > 0).then_some(n)
        },
    )
    .await;
    shutdown.cancel();
}
