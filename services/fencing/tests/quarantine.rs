//! BuildGrid's three quarantine scenarios (reference/remoteworkers/
//! BUILDGRID.md) against the real fencing service and a real nats-server:
//! the errors are typed, nothing changes state on a rejected request, and a
//! superseded session's leases go back to the queue through the scheduler.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

mod common;

use tokio_util::sync::CancellationToken;
use warden_shared::clock::{Clock, ManualClock};
use warden_shared::error::ErrorCode;
use warden_shared::messages::{CreateSession, Heartbeat, SessionReply};
use warden_shared::session::{bot_key, session_key, Session, SessionState};
use warden_shared::{runtime, subjects, Config};
use warden_testsupport::{eventually, NatsServer};

async fn request<T: serde::Serialize>(
    client: &async_nats::Client,
    subject: &str,
    body: &T,
) -> SessionReply {
    let msg = client
        .request(
            subject.to_string(),
            serde_json::to_vec(body).unwrap().into(),
        )
        .await
        .unwrap();
    serde_json::from_slice(&msg.payload).unwrap()
}

async fn create(client: &async_nats::Client, bot: &str) -> String {
    let req = CreateSession {
        version: 1,
        bot_id: bot.into(),
        resource: Some("host-1".into()),
        resources: Vec::new(),
        agent_instance: String::new(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
    };
    request(client, &subjects::session_create_subject(bot), &req)
        .await
        .session
        .expect("a session name")
}

async fn heartbeat(client: &async_nats::Client, bot: &str, session: &str) -> SessionReply {
    request(
        client,
        &subjects::session_heartbeat_subject(bot),
        &Heartbeat {
            version: 1,
            session: session.into(),
            leases: Vec::new(),
        },
    )
    .await
}

async fn session(kv: &async_nats::jetstream::kv::Store, name: &str) -> (Session, u64) {
    let e = kv.entry(session_key(name)).await.unwrap().unwrap();
    (serde_json::from_slice(&e.value).unwrap(), e.revision)
}

const TIMEOUT_600MS: &str = "[fencing]\nsession_timeout = \"600ms\"\n";

/// A fencing service on `nats` plus a client, ready to answer.
struct Fixture {
    config: Arc<Config>,
    client: async_nats::Client,
    handles: warden_shared::subjects::Handles,
    shutdown: CancellationToken,
    service: Option<common::Service>,
    /// The service's clock (`None`: the system's).
    clock: Option<Arc<dyn Clock>>,
}

impl Fixture {
    /// `extra` is TOML appended to the config (e.g. a short timeout).
    async fn start(nats: &NatsServer, extra: &str) -> Fixture {
        Fixture::start_with_clock(nats, extra, None).await
    }

    /// [`Fixture::start`] with the service reading the time from `clock`.
    async fn start_with_clock(
        nats: &NatsServer,
        extra: &str,
        clock: Option<Arc<dyn Clock>>,
    ) -> Fixture {
        let config: Arc<Config> = common::config(&nats.url(), extra);
        let (client, handles) = runtime::Connect::new(&config, "test")
            .topology_forever()
            .await
            .unwrap();
        let mut f = Fixture {
            config,
            client,
            handles,
            shutdown: CancellationToken::new(),
            service: None,
            clock,
        };
        f.start_service().await;
        f
    }

    async fn start_service(&mut self) {
        self.shutdown = CancellationToken::new();
        self.service = Some(common::spawn(
            self.config.clone(),
            &self.shutdown,
            self.clock.clone(),
        ));
        common::answers(&self.client, Duration::from_secs(10)).await;
    }

    async fn stop_service(&mut self) {
        self.shutdown.cancel();
        if let Some(s) = self.service.take() {
            s.await.unwrap().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_unknown_sessions_get_typed_errors_and_change_nothing() {
    let nats = NatsServer::start();
    let mut f = Fixture::start(&nats, "").await;
    let (client, handles) = (f.client.clone(), f.handles.clone());
    let kv = handles.sessions.clone();

    // (1) A bot that never registered.
    let r = heartbeat(&client, "bot-1", "no-such-session").await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::UnknownSession));
    assert!(
        kv.entry(session_key("no-such-session"))
            .await
            .unwrap()
            .is_none(),
        "a rejected update created nothing"
    );

    // (2) An old instance whose name no longer matches the one on file.
    let old = create(&client, "bot-1").await;
    assert!(heartbeat(&client, "bot-1", &old).await.error.is_none());
    let new = create(&client, "bot-1").await;
    assert_ne!(old, new);
    let (old_rec, _) = session(&kv, &old).await;
    assert_eq!(old_rec.state, SessionState::Quarantined);
    assert_eq!(old_rec.superseded_by.as_deref(), Some(new.as_str()));
    let (new_before, new_rev) = session(&kv, &new).await;
    // A job leased to the current session: nothing the old one says moves it.
    let jobs = warden_shared::store::JobStore::new(handles.jobs.clone());
    let now = chrono::Utc::now();
    let mut job = warden_shared::Job::builder("noop")
        .pool("default")
        .at(now)
        .build();
    job.state = warden_shared::JobState::Running;
    job.attempt = 1;
    job.lease = Some(warden_shared::job::Lease {
        session: new.clone(),
        bot_id: "bot-1".into(),
        resource: None,
        resources: Vec::new(),
        epoch: 1,
        leased_at: now,
        started_at: None,
        secret_hash: None,
    });
    let job_rev = jobs.create(&job).await.unwrap();
    let claim = Heartbeat {
        version: 1,
        session: old.clone(),
        leases: vec![warden_shared::messages::HeldLease {
            job_id: job.id,
            epoch: 1,
        }],
    };
    let r = request(
        &client,
        &subjects::session_heartbeat_subject("bot-1"),
        &claim,
    )
    .await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::SessionSuperseded));
    let r = heartbeat(&client, "bot-1", &old).await;
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::SessionSuperseded));
    let after = jobs.get(&job.id).await.unwrap().unwrap();
    assert_eq!(
        (after.revision, &after.job),
        (job_rev, &job),
        "the job is untouched"
    );
    let (new_after, new_rev_after) = session(&kv, &new).await;
    assert_eq!(
        (new_before, new_rev),
        (new_after, new_rev_after),
        "the old instance did not touch the new session"
    );
    let (old_after, _) = session(&kv, &old).await;
    assert_eq!(
        old_after.last_heartbeat, old_rec.last_heartbeat,
        "a rejected heartbeat renews nothing"
    );

    // The current session holding it is told nothing to cancel.
    let mine = Heartbeat {
        version: 1,
        session: new.clone(),
        leases: vec![warden_shared::messages::HeldLease {
            job_id: job.id,
            epoch: 1,
        }],
    };
    let r = request(
        &client,
        &subjects::session_heartbeat_subject("bot-1"),
        &mine,
    )
    .await;
    assert!(r.error.is_none() && r.cancel.is_empty(), "{r:?}");
    // A lease for an attempt that is not current must be stopped.
    let stale = Heartbeat {
        version: 1,
        session: new.clone(),
        leases: vec![warden_shared::messages::HeldLease {
            job_id: job.id,
            epoch: 0,
        }],
    };
    assert_eq!(
        request(
            &client,
            &subjects::session_heartbeat_subject("bot-1"),
            &stale
        )
        .await
        .cancel,
        vec![job.id]
    );

    // (3) Two bots with the same id and different names, both updating:
    // only the one on file is accepted, every time.
    let pointer =
        String::from_utf8(kv.get(bot_key("bot-1")).await.unwrap().unwrap().to_vec()).unwrap();
    assert_eq!(pointer, new);
    for _ in 0..3 {
        assert!(heartbeat(&client, "bot-1", &new).await.error.is_none());
        let r = heartbeat(&client, "bot-1", &old).await;
        assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::SessionSuperseded));
    }

    f.stop_service().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sessions_expire_but_not_during_the_grace_after_a_restart() {
    let nats = NatsServer::start();
    let time = ManualClock::new(chrono::Utc::now());
    let mut f = Fixture::start_with_clock(&nats, TIMEOUT_600MS, Some(time.shared())).await;
    let (client, kv) = (f.client.clone(), f.handles.sessions.clone());
    let quiet = create(&client, "quiet").await;
    // Silent: expires after the timeout.
    time.advance(Duration::from_millis(700));
    eventually(Duration::from_secs(10), "the silent session expired", || {
        let kv = kv.clone();
        let quiet = quiet.clone();
        async move { (session(&kv, &quiet).await.0.state == SessionState::Expired).then_some(()) }
    })
    .await;

    // A session that heartbeats, then the fencing service is down for
    // longer than the timeout: after it comes back, the session has a full
    // timeout to heartbeat again and is not expired.
    let busy = create(&client, "busy").await;
    assert!(heartbeat(&client, "busy", &busy).await.error.is_none());
    f.stop_service().await;
    time.advance(Duration::from_millis(1500));
    f.start_service().await;
    // Several sweeps (every 150 ms) at that time: the session keeps its
    // full timeout from the restart.
    common::never_within(
        Duration::from_millis(300),
        "the session expiring",
        || async {
            let (s, _) = session(&kv, &busy).await;
            (s.state != SessionState::Active).then_some(s.state)
        },
    )
    .await;
    let r = eventually(Duration::from_secs(5), "heartbeat after restart", || {
        let client = client.clone();
        let busy = busy.clone();
        async move {
            let msg = client
                .request(
                    subjects::session_heartbeat_subject("busy"),
                    serde_json::to_vec(&Heartbeat {
                        version: 1,
                        session: busy,
                        leases: Vec::new(),
                    })
                    .unwrap()
                    .into(),
                )
                .await
                .ok()?;
            serde_json::from_slice::<SessionReply>(&msg.payload).ok()
        }
    })
    .await;
    assert!(
        r.error.is_none(),
        "healthy session evicted after a fencing outage: {:?}",
        r.error
    );
    assert_eq!(session(&kv, &busy).await.0.state, SessionState::Active);
    f.stop_service().await;
}

/// An external executor's session carries its own, longer timeout: it
/// outlives a worker session that went silent at the same moment, and
/// still expires once its own limit passes. A limit out of range is
/// refused and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_its_own_timeout_expires_by_it() {
    let nats = NatsServer::start();
    let mut f = Fixture::start(&nats, TIMEOUT_600MS).await;
    let (client, kv) = (f.client.clone(), f.handles.sessions.clone());
    let mut req = CreateSession {
        version: 1,
        bot_id: "executor".into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: String::new(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: Some(3000),
    };
    let long = request(&client, &subjects::session_create_subject("executor"), &req)
        .await
        .session
        .expect("a session name");
    let short = create(&client, "worker").await;
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(10), "the worker session expired", || {
        let kv = kv.clone();
        let short = short.clone();
        async move { (session(&kv, &short).await.0.state == SessionState::Expired).then_some(()) }
    })
    .await;
    let (s, _) = session(&kv, &long).await;
    assert_eq!(
        s.state,
        SessionState::Active,
        "expired by the default timeout"
    );
    assert_eq!(s.timeout_ms, Some(3000));
    eventually(Duration::from_secs(10), "the executor session expired", || {
        let kv = kv.clone();
        let long = long.clone();
        async move { (session(&kv, &long).await.0.state == SessionState::Expired).then_some(()) }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "expired after {:?}, before its own 3s",
        started.elapsed()
    );

    for bad in [Some(10), Some(90_000_000)] {
        req.timeout_ms = bad;
        req.bot_id = "bad-timeout".into();
        let r = request(
            &client,
            &subjects::session_create_subject("bad-timeout"),
            &req,
        )
        .await;
        assert!(r.session.is_none(), "{bad:?} accepted");
        assert_eq!(r.error.expect("an error").code, ErrorCode::InvalidRequest);
    }
    assert!(
        kv.get(warden_shared::session::bot_key("bad-timeout"))
            .await
            .unwrap()
            .is_none(),
        "a refused session left a bot pointer"
    );
    f.stop_service().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_longer_than_the_timeout_expires_no_healthy_session() {
    let mut nats = NatsServer::start();
    let mut f = Fixture::start(&nats, TIMEOUT_600MS).await;
    let (client, kv) = (f.client.clone(), f.handles.sessions.clone());
    let name = create(&client, "steady").await;
    // A well-behaved bot: heartbeats every 400 ms (inside the 600 ms
    // timeout) and keeps trying through the outage.
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let beats = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let bot = {
        let (client, name, errors, beats) =
            (client.clone(), name.clone(), errors.clone(), beats.clone());
        tokio::spawn(async move {
            // The bot's heartbeat cadence.
            let mut every = tokio::time::interval(Duration::from_millis(400));
            every.tick().await;
            loop {
                every.tick().await;
                let hb = Heartbeat {
                    version: 1,
                    session: name.clone(),
                    leases: Vec::new(),
                };
                let res = tokio::time::timeout(
                    Duration::from_millis(300),
                    client.request(
                        subjects::session_heartbeat_subject("steady"),
                        serde_json::to_vec(&hb).unwrap().into(),
                    ),
                )
                .await;
                if let Ok(Ok(msg)) = res {
                    match serde_json::from_slice::<SessionReply>(&msg.payload) {
                        Ok(SessionReply { error: Some(e), .. }) => {
                            errors.lock().unwrap().push(e.code)
                        }
                        Ok(_) => {
                            beats.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(_) => {}
                    }
                }
            }
        })
    };
    eventually(Duration::from_secs(5), "two heartbeats", || async {
        (beats.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    nats.stop();
    // Down for more than three timeouts (of real time: the service tells
    // a blind stretch by it).
    common::never_within(Duration::from_secs(2), "the bus answering", || async {
        let read = tokio::time::timeout(Duration::from_millis(200), kv.entry(session_key(&name)));
        read.await.ok()?.ok().map(|_| ())
    })
    .await;
    nats.start_again();
    // The fleet comes back (heartbeats land again), and several sweeps
    // run: the session stays active and no heartbeat is refused.
    let before = beats.load(std::sync::atomic::Ordering::SeqCst);
    eventually(
        Duration::from_secs(10),
        "a heartbeat after the outage",
        || async { (beats.load(std::sync::atomic::Ordering::SeqCst) > before).then_some(()) },
    )
    .await;
    common::never_within(
        Duration::from_secs(2),
        "the session evicted or a heartbeat refused",
        || async {
            let state = session(&kv, &name).await.0.state;
            let errors = errors.lock().unwrap().clone();
            (state != SessionState::Active || !errors.is_empty()).then_some((state, errors))
        },
    )
    .await;
    bot.abort();
    assert_eq!(
        session(&kv, &name).await.0.state,
        SessionState::Active,
        "a healthy session was evicted by the outage"
    );
    assert!(
        errors.lock().unwrap().is_empty(),
        "heartbeats rejected after the outage: {:?}",
        errors.lock().unwrap()
    );
    f.stop_service().await;
}

/// An undecodable record in the bucket is skipped by the sweep: a real
/// session that stops heartbeating still expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_does_not_stop_the_expiry_sweep() {
    let nats = NatsServer::start();
    let mut f = Fixture::start(&nats, TIMEOUT_600MS).await;
    let (client, kv) = (f.client.clone(), f.handles.sessions.clone());
    kv.put(session_key("garbage"), "not a session {".into())
        .await
        .unwrap();
    let quiet = create(&client, "quiet-next-to-garbage").await;
    eventually(Duration::from_secs(10), "the silent session expired", || {
        let kv = kv.clone();
        let quiet = quiet.clone();
        async move { (session(&kv, &quiet).await.0.state == SessionState::Expired).then_some(()) }
    })
    .await;
    let text = warden_shared::metrics::render();
    let corrupt = text
        .lines()
        .find_map(|l| l.strip_prefix("warden_fencing_corrupt_sessions_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(corrupt >= 1, "corrupt record not counted:\n{text}");
    f.stop_service().await;
}
