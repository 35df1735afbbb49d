//! `warden-bridge`: an AMQP 0-9-1 bus (fedora-messaging on RabbitMQ) and
//! Warden.
//!
//! - **In** ([`consume`]): a queue bound to `amqp.exchange` with
//!   `amqp.routing_keys`; each message becomes an event on the events
//!   stream ([`inbound`]: subject from the routing key ([`subject`]),
//!   `Nats-Msg-Id` from the message id, headers kept, body unchanged),
//!   acknowledged to the broker only once JetStream acknowledged it.
//!   Several replicas may consume one queue.
//! - **Out** ([`ci`]): with `amqp.ci_messages.enabled`, job state changes
//!   of the configured tasks as Fedora CI messages.
//!
//! The AMQP connection is retried with backoff for as long as the bridge
//! runs; `/healthz` says when it is down.

pub mod amqp;
pub mod ci;
pub mod consume;
pub mod inbound;
pub mod metrics;
pub mod subject;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warden_shared::ready::Backoff;
use warden_shared::{runtime, Config};

use crate::consume::{Inbound, SERVICE};
use crate::metrics::metrics;

#[derive(Debug, Error)]
pub enum BridgeError {
    #[error("amqp.url is not set: there is no bus to bridge")]
    NotConfigured,
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot read the AMQP TLS files")]
    Tls(#[from] amqp::ConnectError),
    #[error("cannot look up the events stream")]
    Events(#[source] async_nats::jetstream::context::GetStreamError),
}

/// Options of one bridge process beyond its config.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fault injection (tests): exit after this many JetStream-acknowledged
    /// events, before the AMQP ack of the last.
    pub crash_after_publish: Option<u64>,
}

pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), BridgeError> {
    run_with(config, Options::default(), shutdown).await
}

pub async fn run_with(
    config: Arc<Config>,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), BridgeError> {
    if !config.amqp.enabled() {
        return Err(BridgeError::NotConfigured);
    }
    // Unreadable TLS files are a configuration error: say so at once,
    // not in every reconnect.
    amqp::tls_config(&config.amqp)?;
    warden_shared::metrics::starting(SERVICE);
    metrics::init();
    // The bridge creates no stream: the services do (its NATS user,
    // warden-bridge, may not). It waits for the events stream instead.
    let client = runtime::Connect::new(&config, SERVICE).client().await?;
    let js = async_nats::jetstream::new(client.clone());
    if config.amqp.consumes() {
        let found = warden_shared::ready::retry_until_ready(
            SERVICE,
            "the events stream",
            &shutdown,
            || {
                let js = js.clone();
                async move {
                    js.get_stream(warden_shared::subjects::EVENTS_STREAM)
                        .await
                        .map(|_| ())
                }
            },
        )
        .await
        .map_err(BridgeError::Events)?;
        if found.is_none() {
            return Ok(());
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    if config.amqp.ci_messages.enabled {
        let (c, js, t) = (config.clone(), js.clone(), shutdown.clone());
        tasks.spawn(async move { ci::run(c, js, t).await });
    }
    if config.amqp.consumes() {
        let topo = config.topology();
        let max_msg = usize::try_from(config.storage.events_max_msg_bytes)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(usize::MAX);
        let ib = Arc::new(Inbound {
            js: js.clone(),
            amqp: config.amqp.clone(),
            rules: inbound::Rules {
                subject_prefix: config.amqp.subject_prefix.clone(),
                event_subjects: topo.event_subjects,
                max_bytes: config.trigger.max_event_bytes.min(max_msg),
            },
            crash_after_publish: options.crash_after_publish,
            published: AtomicU64::new(0),
        });
        inbound_loop(ib, &shutdown).await;
    } else {
        warden_shared::metrics::ready(SERVICE);
        info!("bridge running: no queue configured, publishing CI messages only");
        shutdown.cancelled().await;
    }
    while tasks.join_next().await.is_some() {}
    runtime::flush(&client).await;
    info!("bridge stopped");
    Ok(())
}

/// Connects, consumes, and on any loss reconnects with backoff, until
/// shutdown.
async fn inbound_loop(ib: Arc<Inbound>, shutdown: &CancellationToken) {
    let m = metrics();
    let cap = ib.amqp.reconnect_max;
    let mut backoff = Backoff::new(Duration::from_secs(1), cap);
    let mut down_since = Instant::now();
    while !shutdown.is_cancelled() {
        m.connected.set(0);
        match amqp::connect(&ib.amqp, "warden-bridge").await {
            Ok(conn) => {
                m.connects.with_label_values(&["ok"]).inc();
                m.connected.set(1);
                info!(url = %warden_shared::redact::redact(&ib.amqp.url), "AMQP connected");
                backoff = Backoff::new(Duration::from_secs(1), cap);
                let ended = consume::consume(&conn, ib.clone(), shutdown).await;
                m.connected.set(0);
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    conn.close(200, "bridge stopping".into()),
                )
                .await;
                match ended {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(error = %e, "AMQP connection lost; reconnecting");
                        down_since = Instant::now();
                    }
                }
            }
            Err(e) => {
                m.connects.with_label_values(&["failed"]).inc();
                warn!(error = %e, "cannot connect to AMQP; retrying with backoff");
            }
        }
        warden_shared::metrics::waiting_for(SERVICE, "the AMQP broker", down_since.elapsed());
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
}
