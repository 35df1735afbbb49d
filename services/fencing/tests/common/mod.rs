//! What the fencing tests share: requests, a create request, the
//! fencing service under test and its waits.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warden_shared::clock::Clock;
use warden_shared::messages::{CreateSession, Heartbeat, SessionReply};
use warden_shared::{subjects, Config};
use warden_testsupport::eventually;
pub use warden_testsupport::never_within;

pub type Service = JoinHandle<Result<(), warden_fencing::FencingError>>;

/// A config for a bus at `url` with `extra` TOML appended.
pub fn config(url: &str, extra: &str) -> Arc<Config> {
    let text = format!("[nats]\nurl = \"{url}\"\n{extra}");
    Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap())
}

/// A create request of bot `bot`.
pub fn create_request(bot: &str) -> CreateSession {
    CreateSession {
        version: 1,
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: String::new(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
    }
}

pub fn heartbeat_of(session: &str) -> Heartbeat {
    Heartbeat {
        version: 1,
        session: session.into(),
        leases: Vec::new(),
    }
}

/// A request answered within 2 s, or `None`.
pub async fn try_request<T: serde::Serialize>(
    client: &async_nats::Client,
    subject: &str,
    body: &T,
) -> Option<SessionReply> {
    let msg = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(
            subject.to_string(),
            serde_json::to_vec(body).unwrap().into(),
        ),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&msg.payload).ok()
}

/// Starts the fencing service with `clock` (`None`: the system's).
pub fn spawn(
    config: Arc<Config>,
    shutdown: &CancellationToken,
    clock: Option<Arc<dyn Clock>>,
) -> Service {
    match clock {
        Some(c) => tokio::spawn(warden_fencing::run_with_clock(config, shutdown.clone(), c)),
        None => tokio::spawn(warden_fencing::run(config, shutdown.clone())),
    }
}

/// `/healthz` says fencing waits for JetStream (503); its body.
pub async fn waiting_for_jetstream() -> String {
    eventually(
        Duration::from_secs(5),
        "/healthz naming fencing as waiting for JetStream",
        || async {
            let (code, body) = warden_shared::metrics::health();
            (code == 503 && body.contains("fencing (waiting for JetStream")).then_some(body)
        },
    )
    .await
}

/// For `duration` the service neither exits nor claims to be ready.
pub async fn keeps_waiting(service: &Service, duration: Duration) {
    never_within(duration, "the service exiting or turning ready", || async {
        let code = warden_shared::metrics::health().0;
        (service.is_finished() || code != 503).then_some(code)
    })
    .await;
}

/// Waits until a fencing service answers a session request on `client`.
pub async fn answers(client: &async_nats::Client, within: Duration) {
    eventually(within, "fencing answers", || {
        let client = client.clone();
        async move {
            // One probe at most a second: a request that reached a
            // subscription of a service instance just stopped is never
            // answered, and must not use up the whole wait.
            tokio::time::timeout(
                Duration::from_secs(1),
                client.request(subjects::session_heartbeat_subject("probe"), "{}".into()),
            )
            .await
            .ok()?
            .ok()
        }
    })
    .await;
}

/// Fencing on `url` answers a request, then `/healthz` is 200.
pub async fn answers_then_ready(url: &str, within: Duration) {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap();
    answers(&client, within).await;
    eventually(Duration::from_secs(5), "/healthz 200", || async {
        (warden_shared::metrics::health().0 == 200).then_some(())
    })
    .await;
}
