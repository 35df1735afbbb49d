//! A session store that is unavailable while the fencing service stays
//! connected (a 3-node cluster that lost quorum) must not evict the fleet
//! once it is back: time during which heartbeats could not be recorded
//! counts against nobody (issue 13).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::never_within;
use common::{create_request, heartbeat_of, try_request as request};
use tokio_util::sync::CancellationToken;
use warden_shared::clock::ManualClock;
use warden_shared::error::ErrorCode;
use warden_shared::messages::SessionReply;
use warden_shared::session::{session_key, Session, SessionState};
use warden_shared::{runtime, subjects};
use warden_testsupport::{eventually, Cluster};

/// The session service on `config`, a client, the sessions bucket and a
/// session of bot `steady` (created within `within`).
struct Started {
    client: async_nats::Client,
    handles: subjects::Handles,
    shutdown: CancellationToken,
    service: common::Service,
    name: String,
}

async fn start(
    config: Arc<warden_shared::Config>,
    clock: Option<Arc<dyn warden_shared::clock::Clock>>,
    within: Duration,
) -> Started {
    let (client, handles) = runtime::Connect::new(&config, "test")
        .topology_forever()
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let service = common::spawn(config, &shutdown, clock);
    let create = create_request("steady");
    let name = eventually(within, "a session", || {
        let client = client.clone();
        let create = create.clone();
        async move {
            request(
                &client,
                &subjects::session_create_subject("steady"),
                &create,
            )
            .await?
            .session
        }
    })
    .await;
    Started {
        client,
        handles,
        shutdown,
        service,
        name,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_quorum_evicts_nobody() {
    let mut cluster = Cluster::start();
    // Everything talks to node 2 only, so the clients stay connected
    // while nodes 0 and 1 are gone.
    let config = common::config(
        &cluster.node_url(2),
        "replicas = 3\n[fencing]\nsession_timeout = \"2s\"\n",
    );
    let Started {
        client,
        handles,
        shutdown,
        service,
        name,
    } = start(config, None, Duration::from_secs(30)).await;
    let kv = handles.sessions.clone();

    // A worker heartbeating every timeout/3, as the real one does.
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let bot = {
        let (client, name, errors) = (client.clone(), name.clone(), errors.clone());
        tokio::spawn(async move {
            // The worker's heartbeat cadence.
            let mut every = tokio::time::interval(Duration::from_millis(666));
            loop {
                every.tick().await;
                let hb = heartbeat_of(&name);
                match request(&client, &subjects::session_heartbeat_subject("steady"), &hb).await {
                    Some(SessionReply { error: Some(e), .. }) => {
                        errors.lock().unwrap().push(e.code.to_string())
                    }
                    Some(_) => {}
                    None => errors.lock().unwrap().push("no answer".into()),
                }
            }
        })
    };
    never_within(Duration::from_secs(2), "a heartbeat refused", || async {
        let e = errors.lock().unwrap().clone();
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );

    // No quorum for longer than the session timeout.
    cluster.kill(0);
    cluster.kill(1);
    // The store fails (heartbeats are refused), and stays down three
    // times the timeout: meanwhile nothing may expire the session.
    eventually(Duration::from_secs(10), "a heartbeat refused", || async {
        (!errors.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    never_within(Duration::from_secs(6), "the session expiring", || async {
        let e = kv.entry(session_key(&name)).await.ok()??;
        let s: Session = serde_json::from_slice(&e.value).unwrap();
        (s.state != SessionState::Active).then_some(s.state)
    })
    .await;
    let during = errors.lock().unwrap().len();
    assert!(during > 0, "the store never failed: the test tests nothing");
    cluster.start_node(0);
    cluster.start_node(1);

    // Back: heartbeats land again, and several timeouts pass.
    let expired_at = Arc::new(std::sync::Mutex::new(None));
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(e)) = kv.entry(session_key(&name)).await {
            let s: Session = serde_json::from_slice(&e.value).unwrap();
            if s.state != SessionState::Active {
                *expired_at.lock().unwrap() = Some((started.elapsed(), s.state));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bot.abort();
    assert_eq!(
        *expired_at.lock().unwrap(),
        None,
        "a heartbeating session was evicted after the store came back (errors: {:?})",
        errors.lock().unwrap()
    );
    let tail: Vec<String> = errors.lock().unwrap()[during..].to_vec();
    let last = request(
        &client,
        &subjects::session_heartbeat_subject("steady"),
        &heartbeat_of(&name),
    )
    .await;
    assert!(
        last.as_ref().is_some_and(|r| r.error.is_none()),
        "heartbeats fail after the store is back: {last:?} (after the outage: {tail:?})"
    );
    shutdown.cancel();
    service.await.unwrap().unwrap();
}

/// The store refuses writes while reads and listings still work (here the
/// bucket's stream is full): heartbeats answer `unavailable` past the
/// timeout while the sweeper sees the bucket fine. Once writes work again
/// the session gets a full timeout to heartbeat and is not expired at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_writes_past_the_timeout_evicts_nobody() {
    let nats = warden_testsupport::NatsServer::start();
    let config = common::config(&nats.url(), "[fencing]\nsession_timeout = \"1s\"\n");
    let time = ManualClock::new(chrono::Utc::now());
    let Started {
        client,
        handles,
        shutdown,
        service,
        name,
    } = start(config, Some(time.shared()), Duration::from_secs(10)).await;
    let kv = handles.sessions.clone();
    let hb = heartbeat_of(&name);
    let ok = request(&client, &subjects::session_heartbeat_subject("steady"), &hb).await;
    assert!(ok.is_some_and(|r| r.error.is_none()));

    // Full: no write fits any more.
    let js = handles.js.clone();
    let mut stream = js
        .get_stream(subjects::kv_stream(subjects::SESSIONS_BUCKET))
        .await
        .unwrap();
    let normal = stream.info().await.unwrap().config.clone();
    let bytes = stream.info().await.unwrap().state.bytes as i64;
    let mut full = normal.clone();
    full.max_bytes = bytes.max(1);
    full.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    js.update_stream(&full).await.unwrap();
    // Heartbeats fail for three timeouts (of the service's clock).
    let refused_now = || async {
        let r = request(&client, &subjects::session_heartbeat_subject("steady"), &hb).await;
        r.and_then(|r| r.error)
            .is_some_and(|e| e.code == ErrorCode::Unavailable)
            .then_some(())
    };
    let mut refused = 0;
    eventually(Duration::from_secs(10), "a heartbeat refused", refused_now).await;
    refused += 1;
    time.advance(Duration::from_secs(3));
    eventually(Duration::from_secs(10), "a heartbeat refused", refused_now).await;
    refused += 1;
    assert!(
        refused > 0,
        "the store never refused a heartbeat: the test tests nothing"
    );
    js.update_stream(&normal).await.unwrap();
    // Writes work again. The bot's next heartbeat comes within a third of
    // the timeout; meanwhile nothing may expire it.
    let back = std::time::Instant::now();
    while back.elapsed() < Duration::from_millis(330) {
        let e = kv.entry(session_key(&name)).await.unwrap().unwrap();
        let s: Session = serde_json::from_slice(&e.value).unwrap();
        assert_eq!(
            s.state,
            SessionState::Active,
            "expired {:?} after the store took writes again",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = request(&client, &subjects::session_heartbeat_subject("steady"), &hb).await;
    assert!(
        r.as_ref().is_some_and(|r| r.error.is_none()),
        "heartbeat refused after the store is back: {r:?}"
    );
    shutdown.cancel();
    service.await.unwrap().unwrap();
}
