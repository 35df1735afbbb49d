//! Bot identity and session bounds against a real nats-server with the
//! shipped permissions (deploy/nats/cluster/accounts.conf, each bot its own
//! nkey user as `warden bot add` writes it): one bot's credentials cannot
//! create, renew or close another bot's session, and nothing of the
//! victim's changes, byte for byte; the registry, the create limit, the
//! lease cap and the retention of ended sessions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use warden_shared::bots::{record_key, BotRecord};
use warden_shared::clock::{Clock, ManualClock};
use warden_shared::error::ErrorCode;
use warden_shared::messages::{CloseSession, CreateSession, Heartbeat, HeldLease, SessionReply};
use warden_shared::session::{bot_key, session_key};
use warden_shared::subjects::{self, Handles};
use warden_shared::{runtime, Config};
use warden_testsupport::{accounts_conf_with_bots, eventually, NatsServer, TestBot};

use common::create_request;

struct Secured {
    _dir: tempfile::TempDir,
    nats: NatsServer,
    bots: Vec<TestBot>,
    service: async_nats::Client,
    handles: Handles,
    shutdown: CancellationToken,
    clock: Arc<ManualClock>,
}

impl Drop for Secured {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A server with the shipped accounts and bots `victim` and `attacker`,
/// and the fencing service (services' user, a manual clock) with `extra`
/// config.
async fn secured(extra: &str) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let (conf, bots) = accounts_conf_with_bots(dir.path(), &["victim", "attacker"]);
    let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let config: Arc<Config> = common::config(
        &nats.url(),
        &format!("user = \"warden-service\"\npassword = \"service-pw\"\n{extra}"),
    );
    let (service, handles) = runtime::Connect::new(&config, "test")
        .topology_forever()
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    common::spawn(config, &shutdown, Some(clock.clone() as Arc<dyn Clock>));
    common::answers(&service, Duration::from_secs(10)).await;
    Secured {
        _dir: dir,
        nats,
        bots,
        service,
        handles,
        shutdown,
        clock,
    }
}

/// A bot's client and the permission errors the server sent it.
struct BotClient {
    client: async_nats::Client,
    denied: Arc<Mutex<Vec<String>>>,
}

impl Secured {
    async fn bot(&self, id: &str) -> BotClient {
        let bot = self.bots.iter().find(|b| b.bot_id == id).unwrap();
        let seed = std::fs::read_to_string(&bot.nkey_file).unwrap();
        let denied = Arc::new(Mutex::new(Vec::new()));
        let seen = denied.clone();
        let client = async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
            .custom_inbox_prefix(subjects::bot_inbox_prefix(id))
            .event_callback(move |e| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = e {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(self.nats.url())
            .await
            .unwrap();
        BotClient { client, denied }
    }
}

async fn ask<T: serde::Serialize>(
    client: &async_nats::Client,
    subject: String,
    body: &T,
) -> Option<SessionReply> {
    common::try_request(client, &subject, body).await
}

async fn create_as(b: &BotClient, bot: &str, req: &CreateSession) -> SessionReply {
    ask(&b.client, subjects::session_create_subject(bot), req)
        .await
        .expect("an answer")
}

fn code(r: &SessionReply) -> Option<ErrorCode> {
    r.error.as_ref().map(|e| e.code)
}

/// The raw value and revision of each key (`None`: absent or deleted).
async fn raw(kv: &async_nats::jetstream::kv::Store, keys: &[String]) -> Vec<Option<(Bytes, u64)>> {
    let mut out = Vec::new();
    for k in keys {
        out.push(
            kv.entry(k.clone())
                .await
                .unwrap()
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                .map(|e| (e.value, e.revision)),
        );
    }
    out
}

/// A publish the server refuses: no answer, and a permissions error.
async fn refused_by_the_server<T: serde::Serialize>(b: &BotClient, subject: String, body: &T) {
    let before = b.denied.lock().unwrap().len();
    let r = ask(&b.client, subject.clone(), body).await;
    assert!(r.is_none(), "{subject} answered: {r:?}");
    eventually(
        Duration::from_secs(5),
        "a permissions violation",
        || async {
            let d = b.denied.lock().unwrap();
            d[before..]
                .iter()
                .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(&subject))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_bots_credentials_change_nothing_of_the_victims() {
    let s = secured("").await;
    let victim = s.bot("victim").await;
    let attacker = s.bot("attacker").await;
    let name = create_as(&victim, "victim", &create_request("victim"))
        .await
        .session
        .expect("the victim's session");
    // The victim runs a job.
    let jobs = warden_shared::store::JobStore::new(s.handles.jobs.clone());
    let now = chrono::Utc::now();
    let mut job = warden_shared::Job::builder("noop")
        .pool("default")
        .at(now)
        .build();
    job.state = warden_shared::JobState::Running;
    job.attempt = 1;
    job.lease = Some(warden_shared::job::Lease {
        session: name.clone(),
        bot_id: "victim".into(),
        resource: None,
        resources: Vec::new(),
        epoch: 1,
        leased_at: now,
        started_at: None,
        secret_hash: None,
    });
    jobs.create(&job).await.unwrap();
    let held = vec![HeldLease {
        job_id: job.id,
        epoch: 1,
    }];
    let hb = Heartbeat {
        version: 1,
        session: name.clone(),
        leases: held.clone(),
    };
    let ok = ask(
        &victim.client,
        subjects::session_heartbeat_subject("victim"),
        &hb,
    )
    .await
    .unwrap();
    assert_eq!(code(&ok), None);
    let session_keys = vec![session_key(&name), bot_key("victim"), bot_key("attacker")];
    let job_key = vec![job.id.to_string()];
    let before = (
        raw(&s.handles.sessions, &session_keys).await,
        raw(&s.handles.jobs, &job_key).await,
    );
    assert!(before.0[0].is_some() && before.0[1].is_some() && before.1[0].is_some());

    // (a) The victim's subjects are not the attacker's to publish on.
    refused_by_the_server(
        &attacker,
        subjects::session_create_subject("victim"),
        &create_request("victim"),
    )
    .await;
    refused_by_the_server(
        &attacker,
        subjects::session_heartbeat_subject("victim"),
        &hb,
    )
    .await;
    let close = CloseSession {
        version: 1,
        session: name.clone(),
    };
    refused_by_the_server(&attacker, subjects::session_close_subject("victim"), &close).await;
    refused_by_the_server(
        &attacker,
        subjects::SESSION_CREATE.to_string(),
        &create_request("victim"),
    )
    .await;

    // (b) Its own subject with the victim's id in the body.
    let r = create_as(&attacker, "attacker", &create_request("victim")).await;
    assert_eq!((code(&r), r.session), (Some(ErrorCode::BotMismatch), None));

    // (c) The victim's session named on its own subjects.
    let r = ask(
        &attacker.client,
        subjects::session_heartbeat_subject("attacker"),
        &hb,
    )
    .await
    .unwrap();
    assert_eq!(code(&r), Some(ErrorCode::NotYourSession));
    assert!(r.cancel.is_empty(), "no lease cancelled: {:?}", r.cancel);
    let r = ask(
        &attacker.client,
        subjects::session_close_subject("attacker"),
        &close,
    )
    .await
    .unwrap();
    assert_eq!(code(&r), Some(ErrorCode::NotYourSession));

    // A request on a bare subject (older workers; only the services' user
    // may publish there) names no bot.
    let r = ask(
        &s.service,
        subjects::SESSION_CREATE.to_string(),
        &create_request("victim"),
    )
    .await
    .unwrap();
    assert_eq!(code(&r), Some(ErrorCode::BotUnidentified));
    let r = ask(&s.service, subjects::SESSION_HEARTBEAT.to_string(), &hb)
        .await
        .unwrap();
    assert_eq!(code(&r), Some(ErrorCode::BotUnidentified));

    let after = (
        raw(&s.handles.sessions, &session_keys).await,
        raw(&s.handles.jobs, &job_key).await,
    );
    assert_eq!(
        after, before,
        "the victim's session, pointer and job changed"
    );
    // The victim's session lives on.
    let ok = ask(
        &victim.client,
        subjects::session_heartbeat_subject("victim"),
        &hb,
    )
    .await
    .unwrap();
    assert_eq!((code(&ok), ok.cancel), (None, Vec::new()));
}

async fn register(s: &Secured, bot: &str, pools: &[&str], max_capacity: u32) {
    let record = BotRecord {
        bot_id: bot.into(),
        pools: pools.iter().map(|p| p.to_string()).collect(),
        max_capacity,
        public_key: "U".into(),
        added_at: chrono::Utc::now(),
    };
    s.handles
        .bots
        .put(record_key(bot), serde_json::to_vec(&record).unwrap().into())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_claims_only_what_the_registry_allows() {
    let s = secured("[fencing]\nrequire_registered_bots = true\n").await;
    register(&s, "victim", &["default"], 2).await;
    let victim = s.bot("victim").await;
    let attacker = s.bot("attacker").await;

    let mut gpu = create_request("victim");
    gpu.pools = vec!["default".into(), "gpu".into()];
    let r = create_as(&victim, "victim", &gpu).await;
    assert_eq!(
        (code(&r), r.session),
        (Some(ErrorCode::PoolNotAllowed), None)
    );
    let mut big = create_request("victim");
    big.capacity = 3;
    let r = create_as(&victim, "victim", &big).await;
    assert_eq!(code(&r), Some(ErrorCode::CapacityNotAllowed));
    assert_eq!(
        raw(&s.handles.sessions, &[bot_key("victim")]).await,
        vec![None],
        "nothing written"
    );

    let r = create_as(&attacker, "attacker", &create_request("attacker")).await;
    assert_eq!(code(&r), Some(ErrorCode::BotNotRegistered));
    assert_eq!(
        raw(&s.handles.sessions, &[bot_key("attacker")]).await,
        vec![None]
    );

    let mut fits = create_request("victim");
    fits.capacity = 2;
    assert!(create_as(&victim, "victim", &fits).await.session.is_some());

    // An external executor's session (the API service asks, as the
    // services' user): for an id of its own, never a registered bot's.
    let r = ask(
        &s.service,
        subjects::executor_session_create_subject("script-1"),
        &create_request("script-1"),
    )
    .await
    .unwrap();
    assert!(r.session.is_some(), "{r:?}");
    let before = raw(&s.handles.sessions, &[bot_key("victim")]).await;
    let r = ask(
        &s.service,
        subjects::executor_session_create_subject("victim"),
        &create_request("victim"),
    )
    .await
    .unwrap();
    assert_eq!(code(&r), Some(ErrorCode::BotRegistered));
    assert_eq!(raw(&s.handles.sessions, &[bot_key("victim")]).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_rate_limited_and_heartbeats_capped_at_capacity() {
    let s = secured("[fencing]\nsession_creates_per_minute = 3\n").await;
    let victim = s.bot("victim").await;
    let mut last = String::new();
    for _ in 0..3 {
        last = create_as(&victim, "victim", &create_request("victim"))
            .await
            .session
            .expect("admitted");
    }
    let pointer = raw(&s.handles.sessions, &[bot_key("victim")]).await;
    let r = create_as(&victim, "victim", &create_request("victim")).await;
    assert_eq!((code(&r), r.session), (Some(ErrorCode::RateLimited), None));
    assert_eq!(
        raw(&s.handles.sessions, &[bot_key("victim")]).await,
        pointer,
        "nothing written"
    );
    s.clock.advance(Duration::from_secs(61));
    assert!(create_as(&victim, "victim", &create_request("victim"))
        .await
        .session
        .is_some());
    let _ = last;

    // Capacity 1: a heartbeat listing 5,000 leases (the issue saw 20,000) is refused and renews
    // nothing.
    let name = {
        s.clock.advance(Duration::from_secs(61));
        create_as(&victim, "victim", &create_request("victim"))
            .await
            .session
            .unwrap()
    };
    let before = raw(&s.handles.sessions, &[session_key(&name)]).await;
    let many = Heartbeat {
        version: 1,
        session: name.clone(),
        leases: (0..5_000)
            .map(|n| HeldLease {
                job_id: uuid::Uuid::from_u128(n),
                epoch: 1,
            })
            .collect(),
    };
    let r = ask(
        &victim.client,
        subjects::session_heartbeat_subject("victim"),
        &many,
    )
    .await
    .unwrap();
    assert_eq!(code(&r), Some(ErrorCode::TooManyLeases));
    assert_eq!(
        raw(&s.handles.sessions, &[session_key(&name)]).await,
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_are_deleted_after_the_retention_and_the_pointer_kept_right() {
    let s = secured("[fencing]\nsession_timeout = \"400ms\"\nclosed_session_retention = \"1h\"\n")
        .await;
    let victim = s.bot("victim").await;
    let attacker = s.bot("attacker").await;
    // victim: a closed session (its pointer names it); attacker: one
    // quarantined by a newer one (its pointer names the newer).
    let closed = create_as(&victim, "victim", &create_request("victim"))
        .await
        .session
        .unwrap();
    let r = ask(
        &victim.client,
        subjects::session_close_subject("victim"),
        &CloseSession {
            version: 1,
            session: closed.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(code(&r), None);
    let old = create_as(&attacker, "attacker", &create_request("attacker"))
        .await
        .session
        .unwrap();
    let new = create_as(&attacker, "attacker", &create_request("attacker"))
        .await
        .session
        .unwrap();
    let kv = s.handles.sessions.clone();

    // Within the retention (sweeps run meanwhile): kept.
    s.clock.advance(Duration::from_secs(59 * 60));
    warden_testsupport::never_within(Duration::from_secs(2), "a session deleted early", || {
        let kv = kv.clone();
        let (closed, old) = (closed.clone(), old.clone());
        async move {
            let r = raw(&kv, &[session_key(&closed), session_key(&old)]).await;
            r.iter().any(Option::is_none).then_some(())
        }
    })
    .await;

    s.clock.advance(Duration::from_secs(2 * 60));
    eventually(
        Duration::from_secs(10),
        "both ended sessions deleted",
        || {
            let kv = kv.clone();
            let (closed, old) = (closed.clone(), old.clone());
            async move {
                let r = raw(&kv, &[session_key(&closed), session_key(&old)]).await;
                r.iter().all(Option::is_none).then_some(())
            }
        },
    )
    .await;
    // The victim's pointer named the deleted session: gone with it. The
    // attacker's names its newer session (expired only now, when the
    // clock jumped, so kept for its own hour): kept.
    assert_eq!(raw(&kv, &[bot_key("victim")]).await, vec![None]);
    let pointer = kv.get(bot_key("attacker")).await.unwrap().unwrap();
    assert_eq!(pointer, Bytes::from(new.clone()));
    assert!(raw(&kv, &[session_key(&new)]).await[0].is_some());
    // A bot whose pointer was deleted opens a session again.
    assert!(create_as(&victim, "victim", &create_request("victim"))
        .await
        .session
        .is_some());
}
