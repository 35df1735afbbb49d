//! The health service against a real nats-server, with a stand-in agent
//! that answers checks as told: flapping, an agent that never answers, a
//! session that leaves without vanishing, an agent that comes back after
//! its resources were closed (checked, then a new incarnation; closed by
//! hand: only by an operator's check), operators' checks and closes, and
//! bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warden_shared::clock::{self, Clock, ManualClock};
use warden_shared::error::ErrorCode;
use warden_shared::messages::{
    CheckReply, CheckRequest, HealthReply, HealthRequest, ResourceRecycle, ResourceSuspect,
};
use warden_shared::resource::{resource_key, Resource, ResourceDecl, ResourceState};
use warden_shared::session::{session_key, Session, SessionState};
use warden_shared::{runtime, subjects, Config};
use warden_testsupport::{eventually, never_within, NatsServer};

struct Fixture {
    client: async_nats::Client,
    handles: subjects::Handles,
    shutdown: CancellationToken,
    /// What the stand-in agent answers; how many checks it ran.
    healthy: Arc<AtomicBool>,
    answering: Arc<AtomicBool>,
    checks: Arc<AtomicUsize>,
    /// The service's clock: suspect reports are stamped by it.
    clock: Arc<dyn Clock>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(nats: &NatsServer, extra: &str) -> Fixture {
    start_with_clock(nats, extra, clock::system()).await
}

/// A health service reading the time from `clock`.
async fn start_with_clock(nats: &NatsServer, extra: &str, clock: Arc<dyn Clock>) -> Fixture {
    let text = format!(
        "[nats]\nurl = \"{}\"\n[health]\ncheck_timeout = \"1s\"\n{extra}",
        nats.url()
    );
    let config = Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap());
    let (client, handles) = runtime::Connect::new(&config, "test")
        .topology_forever()
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(warden_health::run_with_clock(
        config,
        shutdown.clone(),
        clock.clone(),
    ));
    let f = Fixture {
        client,
        handles,
        shutdown,
        healthy: Arc::new(AtomicBool::new(true)),
        answering: Arc::new(AtomicBool::new(true)),
        checks: Arc::new(AtomicUsize::new(0)),
        clock: clock.clone(),
    };
    // The stand-in agent of bot-1.
    let mut sub = f
        .client
        .subscribe(subjects::agent_check_subject("bot-1"))
        .await
        .unwrap();
    let (client, healthy, answering, checks) = (
        f.client.clone(),
        f.healthy.clone(),
        f.answering.clone(),
        f.checks.clone(),
    );
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let _: CheckRequest = serde_json::from_slice(&msg.payload).unwrap();
            checks.fetch_add(1, Ordering::SeqCst);
            if !answering.load(Ordering::SeqCst) {
                continue;
            }
            let reply = CheckReply {
                version: 1,
                passed: healthy.load(Ordering::SeqCst),
                results: Vec::new(),
                error: None,
            };
            let body = serde_json::to_vec(&reply).unwrap();
            client
                .publish(msg.reply.unwrap(), body.into())
                .await
                .unwrap();
        }
    });
    f
}

fn session(name: &str, state: SessionState, agent: &str) -> Session {
    Session {
        version: 1,
        name: name.into(),
        bot_id: "bot-1".into(),
        resource: Some("host-1".into()),
        resources: vec![
            ResourceDecl {
                name: "host-1".into(),
                kind: "host".into(),
                path: None,
                depends_on: None,
            },
            ResourceDecl {
                name: "host-1/wc".into(),
                kind: "workcopy".into(),
                path: Some("/srv/wc".into()),
                depends_on: Some("host-1".into()),
            },
        ],
        agent_instance: agent.into(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
        state,
        created_at: Utc::now(),
        last_heartbeat: Utc::now(),
        superseded_by: None,
        ended_at: None,
        leases: Vec::new(),
    }
}

impl Fixture {
    async fn put_session(&self, s: &Session) {
        self.handles
            .sessions
            .put(session_key(&s.name), serde_json::to_vec(s).unwrap().into())
            .await
            .unwrap();
    }

    async fn resource(&self, name: &str) -> Option<Resource> {
        let v = self
            .handles
            .resources
            .get(resource_key(name))
            .await
            .unwrap()?;
        Some(serde_json::from_slice(&v).unwrap())
    }

    async fn wait(&self, name: &str, state: ResourceState) -> Resource {
        eventually(
            Duration::from_secs(15),
            &format!("{name} {state}"),
            || async { self.resource(name).await.filter(|r| r.state == state) },
        )
        .await
    }

    async fn suspect(&self, resource: &str, n: u32) {
        self.suspect_leased(resource, n, self.clock.now()).await
    }

    async fn suspect_leased(&self, resource: &str, n: u32, leased_at: chrono::DateTime<Utc>) {
        let s = ResourceSuspect {
            version: 1,
            resource: resource.into(),
            job_id: Uuid::new_v4(),
            attempt: n,
            detail: "oom".into(),
            leased_at: Some(leased_at),
            at: self.clock.now(),
        };
        self.handles
            .js
            .publish(
                subjects::suspect_subject(resource),
                serde_json::to_vec(&s).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn ask(&self, subject: &'static str, resource: &str) -> HealthReply {
        let req = HealthRequest {
            version: 1,
            resource: resource.into(),
            reason: Some("decommissioned".into()),
        };
        let msg = self
            .client
            .request(subject, serde_json::to_vec(&req).unwrap().into())
            .await
            .unwrap();
        serde_json::from_slice(&msg.payload).unwrap()
    }

    /// Recycle events so far, in order.
    async fn recycles(&self) -> Vec<ResourceRecycle> {
        let stream = self
            .handles
            .js
            .get_stream(subjects::NOTIFY_STREAM)
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: format!("{}.>", subjects::RECYCLE_PREFIX),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        while let Some(Ok(m)) = batch.next().await {
            out.push(serde_json::from_slice(&m.payload).unwrap());
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_resource_waits_longer_then_breaks_without_a_check() {
    let nats = NatsServer::start();
    let time = ManualClock::new(Utc::now());
    let f = start_with_clock(
        &nats,
        "flap_limit = 3\nflap_window = \"10m\"\nrecheck_backoff = \"2s\"\n",
        time.shared(),
    )
    .await;
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1", ResourceState::Open).await;

    // First suspicion: checked at once, passes.
    f.suspect("host-1", 1).await;
    let r = eventually(Duration::from_secs(10), "first check passed", || async {
        f.resource("host-1")
            .await
            .filter(|r| r.state == ResourceState::Open && r.checks.len() == 1)
    })
    .await;
    assert_eq!(r.checks[0].result, "passed");

    // An attempt leased before that check passed failing now is the same
    // incident: checked again at once, not counted as flapping.
    f.suspect_leased("host-1", 9, r.since - chrono::Duration::seconds(5))
        .await;
    let r = eventually(Duration::from_secs(10), "rechecked at once", || async {
        f.resource("host-1")
            .await
            .filter(|r| r.state == ResourceState::Open && r.checks.len() == 2)
    })
    .await;
    assert_eq!(r.suspicions.len(), 1, "not a second suspicion: {r:?}");
    let checks = f.checks.load(Ordering::SeqCst);

    // Second, soon after: out of service for the back-off, then checked.
    f.suspect("host-1", 2).await;
    let r = f.wait("host-1", ResourceState::Suspicious).await;
    let due = r.check_after.expect("a back-off");
    assert!(
        due > time.now() + chrono::Duration::milliseconds(1000),
        "{due}"
    );
    // The clock stands still: the back-off never ends by itself.
    never_within(
        Duration::from_millis(800),
        "a check before the back-off",
        || async {
            let n = f.checks.load(Ordering::SeqCst);
            (n != checks).then_some(n)
        },
    )
    .await;
    assert_eq!(
        f.checks.load(Ordering::SeqCst),
        checks,
        "no check before the back-off"
    );
    assert_eq!(
        f.resource("host-1").await.unwrap().state,
        ResourceState::Suspicious
    );
    time.advance(Duration::from_secs(2));
    let r = f.wait("host-1", ResourceState::Open).await;
    assert_eq!(r.checks.len(), 3);

    // Third within the window: broken without asking the agent, recycled.
    let checks = f.checks.load(Ordering::SeqCst);
    f.suspect("host-1", 3).await;
    let r = f.wait("host-1", ResourceState::Closed).await;
    assert!(r.reason.contains("flapping"), "{}", r.reason);
    assert_eq!(f.checks.load(Ordering::SeqCst), checks);
    // Its working copy goes with it.
    let wc = f.wait("host-1/wc", ResourceState::Closed).await;
    assert!(wc.reason.contains("dependency"), "{}", wc.reason);
    let events = f.recycles().await;
    let reasons: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.resource.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [("host-1", "flapping"), ("host-1/wc", "dependency")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_suspects_of_one_incident_are_one_suspicion() {
    let nats = NatsServer::start();
    let f = start(&nats, "flap_limit = 2\n").await;
    f.answering.store(false, Ordering::SeqCst); // the check hangs until we say
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1", ResourceState::Open).await;
    // Four jobs on the host hit the same OOM.
    for n in 1..=4 {
        f.suspect("host-1", n).await;
    }
    let r = f.wait("host-1", ResourceState::Suspicious).await;
    assert_eq!(r.suspicions.len(), 1, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_fails_its_check_and_its_resource_comes_back_once_it_answers() {
    let nats = NatsServer::start();
    let f = start(&nats, "recheck_backoff = \"1s\"\n").await;
    f.answering.store(false, Ordering::SeqCst);
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1/wc", ResourceState::Open).await;
    f.suspect("host-1/wc", 1).await;
    let r = f.wait("host-1/wc", ResourceState::Closed).await;
    assert_eq!(r.checks.last().unwrap().result, "timeout", "{r:?}");
    assert!(r.reason.contains("check_timeout"), "{}", r.reason);
    // Its host is untouched.
    assert_eq!(
        f.resource("host-1").await.unwrap().state,
        ResourceState::Open
    );

    // While its agent stays silent, its return checks time out and it
    // stays closed, a new agent process or not.
    f.put_session(&session("s2", SessionState::Active, "agent-2"))
        .await;
    let r = eventually(
        Duration::from_secs(15),
        "a return check timed out",
        || async {
            f.resource("host-1/wc")
                .await
                .filter(|r| r.checks.iter().any(|c| c.trigger == "return"))
        },
    )
    .await;
    assert_eq!(r.state, ResourceState::Closed);
    assert_eq!(r.checks.last().unwrap().result, "timeout");
    // It answers again: the next return check opens a new incarnation.
    f.answering.store(true, Ordering::SeqCst);
    let r = f.wait("host-1/wc", ResourceState::Open).await;
    assert_eq!(r.incarnation, 2);
    assert!(
        r.changes.iter().any(|c| c.to == ResourceState::Closed),
        "history kept across incarnations: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_close_or_are_superseded_do_not_vanish_their_resources() {
    let nats = NatsServer::start();
    let f = start(&nats, "").await;
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1", ResourceState::Open).await;
    // The bot restarts: its new session arrives, the old one is quarantined.
    f.put_session(&session("s2", SessionState::Active, "agent-2"))
        .await;
    f.put_session(&session("s1", SessionState::Quarantined, "agent-1"))
        .await;
    // Then it stops cleanly.
    f.put_session(&session("s2", SessionState::Closed, "agent-2"))
        .await;
    let r = eventually(Duration::from_secs(10), "sessions gone", || async {
        f.resource("host-1").await.filter(|r| r.sessions.is_empty())
    })
    .await;
    assert_eq!(r.state, ResourceState::Open);
    // An old session expiring later is not a vanishing: it had left.
    f.put_session(&session("s1", SessionState::Expired, "agent-1"))
        .await;
    never_within(
        Duration::from_millis(500),
        "the resource vanishing",
        || async {
            f.resource("host-1")
                .await
                .filter(|r| r.state != ResourceState::Open)
                .map(|r| r.state)
        },
    )
    .await;
    assert_eq!(
        f.resource("host-1").await.unwrap().state,
        ResourceState::Open
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_check_and_close_and_bad_input_gets_a_clear_answer() {
    let nats = NatsServer::start();
    let f = start(&nats, "").await;
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1/wc", ResourceState::Open).await;

    let ok = f.ask(subjects::HEALTH_CHECK, "host-1/wc").await;
    assert!(ok.error.is_none(), "{ok:?}");
    assert!(ok.check.unwrap().passed);
    let r = ok.resource.unwrap();
    assert_eq!(r.state, ResourceState::Open);
    assert_eq!(r.checks.last().unwrap().trigger, "manual");

    let closed = f.ask(subjects::HEALTH_CLOSE, "host-1").await;
    let r = closed.resource.unwrap();
    assert_eq!(r.state, ResourceState::Closed);
    assert!(r.reason.contains("decommissioned"), "{}", r.reason);
    f.wait("host-1/wc", ResourceState::Closed).await;

    let again = f.ask(subjects::HEALTH_CLOSE, "host-1").await;
    assert_eq!(again.error.unwrap().code, ErrorCode::IllegalTransition);
    // Its working copy cannot be checked while its host is closed; the
    // host can, and opens as a new incarnation when it passes.
    let wc_closed = f.ask(subjects::HEALTH_CHECK, "host-1/wc").await;
    assert_eq!(wc_closed.error.unwrap().code, ErrorCode::IllegalTransition);
    let check_closed = f.ask(subjects::HEALTH_CHECK, "host-1").await;
    assert!(check_closed.error.is_none(), "{check_closed:?}");
    let r = check_closed.resource.unwrap();
    assert_eq!((r.state, r.incarnation), (ResourceState::Open, 2), "{r:?}");
    let unknown = f.ask(subjects::HEALTH_CHECK, "nowhere").await;
    assert_eq!(unknown.error.unwrap().code, ErrorCode::NotFound);
    let garbage = f
        .client
        .request(subjects::HEALTH_CHECK, Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    let garbage: HealthReply = serde_json::from_slice(&garbage.payload).unwrap();
    assert_eq!(garbage.error.unwrap().code, ErrorCode::InvalidRequest);

    // An undecodable suspect event is dead-lettered with its reason, and
    // the service goes on.
    f.handles
        .js
        .publish(subjects::suspect_subject("host-1"), "]]".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dead = f
        .handles
        .js
        .get_stream(subjects::DEADLETTER_STREAM)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "dead letter", || {
        let mut dead = dead.clone();
        async move {
            let info = dead.info().await.ok()?;
            (info.state.messages == 1).then_some(())
        }
    })
    .await;
    let ok = f.ask(subjects::HEALTH_CHECK, "nowhere").await;
    assert_eq!(ok.error.unwrap().code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_back_after_its_session_expired_gets_its_resources_back_after_a_check() {
    let nats = NatsServer::start();
    let f = start(&nats, "recheck_backoff = \"1s\"\n").await;
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1/wc", ResourceState::Open).await;
    // Stopped past its session timeout: the host vanished, its working
    // copy went with it.
    f.put_session(&session("s1", SessionState::Expired, "agent-1"))
        .await;
    let host = f.wait("host-1", ResourceState::Closed).await;
    assert!(host.reason.contains("vanished"), "{}", host.reason);
    f.wait("host-1/wc", ResourceState::Closed).await;
    let checks = f.checks.load(Ordering::SeqCst);

    // The same agent process comes back with a new session: each resource
    // is checked on it, then open as a new incarnation.
    f.put_session(&session("s2", SessionState::Active, "agent-1"))
        .await;
    let host = f.wait("host-1", ResourceState::Open).await;
    assert_eq!(host.incarnation, 2, "{host:?}");
    assert!(host.reason.starts_with("returned"), "{}", host.reason);
    let last = host.changes.last().unwrap();
    assert_eq!(
        (last.from, last.to),
        (Some(ResourceState::Closed), ResourceState::Open)
    );
    let check = host.checks.last().unwrap();
    assert_eq!(
        (check.result.as_str(), check.trigger.as_str()),
        ("passed", "return")
    );
    assert_eq!(host.sessions.len(), 1, "{host:?}");
    let wc = f.wait("host-1/wc", ResourceState::Open).await;
    assert_eq!(wc.incarnation, 2, "{wc:?}");
    assert!(f.checks.load(Ordering::SeqCst) >= checks + 2);
    // A second vanishing is a new incarnation's: recycled again.
    f.put_session(&session("s2", SessionState::Expired, "agent-1"))
        .await;
    f.wait("host-1", ResourceState::Closed).await;
    let events = f.recycles().await;
    let host_events: Vec<u32> = events
        .iter()
        .filter(|e| e.resource == "host-1")
        .map(|e| e.incarnation)
        .collect();
    assert_eq!(host_events, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_agent_that_fails_its_check_stays_out_until_it_passes() {
    let nats = NatsServer::start();
    let f = start(&nats, "recheck_backoff = \"1s\"\n").await;
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1", ResourceState::Open).await;
    f.put_session(&session("s1", SessionState::Expired, "agent-1"))
        .await;
    f.wait("host-1", ResourceState::Closed).await;

    f.healthy.store(false, Ordering::SeqCst);
    f.put_session(&session("s2", SessionState::Active, "agent-1"))
        .await;
    // Checked, failed, checked again after a back-off that grows.
    let r = eventually(
        Duration::from_secs(15),
        "two failed return checks",
        || async {
            f.resource("host-1").await.filter(|r| {
                r.checks
                    .iter()
                    .filter(|c| c.trigger == "return" && c.result == "failed")
                    .count()
                    >= 2
            })
        },
    )
    .await;
    assert_eq!(r.state, ResourceState::Closed);
    assert_eq!(r.incarnation, 1);
    let due = r.check_after.expect("a back-off");
    assert!(due > Utc::now(), "{due}");

    // Fixed: it comes back by itself.
    f.healthy.store(true, Ordering::SeqCst);
    let r = f.wait("host-1", ResourceState::Open).await;
    assert_eq!(r.incarnation, 2);
    assert_eq!(r.checks.last().unwrap().result, "passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_closed_by_hand_comes_back_only_by_an_operators_check() {
    let nats = NatsServer::start();
    let time = ManualClock::new(Utc::now());
    let f = start_with_clock(&nats, "recheck_backoff = \"1s\"\n", time.shared()).await;
    f.put_session(&session("s1", SessionState::Active, "agent-1"))
        .await;
    f.wait("host-1/wc", ResourceState::Open).await;
    let closed = f.ask(subjects::HEALTH_CLOSE, "host-1").await;
    assert_eq!(closed.resource.unwrap().state, ResourceState::Closed);
    f.wait("host-1/wc", ResourceState::Closed).await;
    // Neither its live agent nor a new agent process brings it back.
    f.put_session(&session("s2", SessionState::Active, "agent-2"))
        .await;
    let checks = f.checks.load(Ordering::SeqCst);
    // Well past every back-off (1 s, doubling), then several periodic
    // passes (every 200 ms) at that time: none checks it.
    time.advance(Duration::from_millis(2500));
    never_within(
        Duration::from_secs(1),
        "a check of a resource closed by hand",
        || async {
            let n = f.checks.load(Ordering::SeqCst);
            (n != checks).then_some(n)
        },
    )
    .await;
    let r = f.resource("host-1").await.unwrap();
    assert_eq!(
        (r.state, r.incarnation),
        (ResourceState::Closed, 1),
        "{r:?}"
    );
    assert_eq!(f.checks.load(Ordering::SeqCst), checks, "no check asked");
    assert_eq!(
        f.resource("host-1/wc").await.unwrap().state,
        ResourceState::Closed
    );

    // An operator's check that passes does; its working copy follows.
    let ok = f.ask(subjects::HEALTH_CHECK, "host-1").await;
    assert!(ok.error.is_none(), "{ok:?}");
    let r = ok.resource.unwrap();
    assert_eq!((r.state, r.incarnation), (ResourceState::Open, 2), "{r:?}");
    assert_eq!(r.checks.last().unwrap().trigger, "manual");
    let wc = f.wait("host-1/wc", ResourceState::Open).await;
    assert_eq!(wc.incarnation, 2);
}
