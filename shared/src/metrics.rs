//! Prometheus plumbing shared by every service. Each service declares its
//! own metrics in its `metrics.rs` on [`registry`]; this module serves them
//! and owns the few metrics every process has.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// One registry per process: under `warden up` every service's metrics are
/// served from the same `/metrics`.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

/// Registers a collector, tolerating a second registration of the same
/// metric (two services of one process share process-wide metrics).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    let _ = registry().register(Box::new(c.clone()));
    c
}

struct Common {
    nats_connected: IntGauge,
    nats_events: IntCounterVec,
}

fn common() -> &'static Common {
    static C: OnceLock<Common> = OnceLock::new();
    C.get_or_init(|| Common {
        nats_connected: register(
            IntGauge::new(
                "warden_nats_connected",
                "1 while this process is connected to NATS",
            )
            .expect("valid metric"),
        ),
        nats_events: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_nats_connection_events_total",
                    "NATS client connection events by kind",
                ),
                &["event"],
            )
            .expect("valid metric"),
        ),
    })
}

pub fn nats_event(event: &async_nats::Event) {
    let c = common();
    let kind = match event {
        async_nats::Event::Connected => {
            c.nats_connected.set(1);
            "connected"
        }
        async_nats::Event::Disconnected => {
            c.nats_connected.set(0);
            "disconnected"
        }
        async_nats::Event::LameDuckMode => "lame_duck",
        async_nats::Event::SlowConsumer(_) => "slow_consumer",
        async_nats::Event::ServerError(_) => "server_error",
        async_nats::Event::ClientError(_) => "client_error",
        _ => "other",
    };
    c.nats_events.with_label_values(&[kind]).inc();
}

/// The text exposition of every registered metric.
pub fn render() -> String {
    common();
    let families = registry().gather();
    TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_default()
}

pub async fn metrics_handler() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(),
    )
}

pub fn router() -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
}
