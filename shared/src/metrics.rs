//! Prometheus plumbing shared by every service. Each service declares its
//! own metrics in its `metrics.rs` on [`registry`]; this module serves them
//! and owns the few metrics every process has.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

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

/// Creates the series of `labels` at zero if it does not exist yet, so a
/// counter is exported before its first event and `increase()` sees the
/// step from 0 to 1 (a series born at 1 has no step to see).
pub fn touch(vec: &IntCounterVec, labels: &[&str]) {
    let _ = vec.with_label_values(labels);
}

/// [`touch`] for each value of a one-label counter.
pub fn touch_each(vec: &IntCounterVec, values: &[&str]) {
    for v in values {
        touch(vec, &[v]);
    }
}

/// Every NATS client event kind counted in
/// `warden_nats_connection_events_total`.
pub const NATS_EVENTS: [&str; 7] = [
    "connected",
    "disconnected",
    "lame_duck",
    "slow_consumer",
    "server_error",
    "client_error",
    "other",
];

struct Common {
    nats_connected: IntGaugeVec,
    nats_events: IntCounterVec,
}

fn common() -> &'static Common {
    static C: OnceLock<Common> = OnceLock::new();
    C.get_or_init(|| Common {
        // Per service, not per process: under `warden up` every service
        // has its own client, and one that lost the bus must not be hidden
        // by another that reconnected.
        nats_connected: register(
            IntGaugeVec::new(
                Opts::new(
                    "warden_nats_connected",
                    "1 while this service's NATS client is connected, 0 while it is not (from its first connection attempt), by service",
                ),
                &["service"],
            )
            .expect("valid metric"),
        ),
        nats_events: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_nats_connection_events_total",
                    "NATS client connection events by service and kind",
                ),
                &["service", "event"],
            )
            .expect("valid metric"),
        ),
    })
}

/// Exports `service`'s connection state as disconnected and its event
/// counters at zero: called before its client first connects.
pub fn nats_connecting(service: &str) {
    let c = common();
    c.nats_connected.with_label_values(&[service]).set(0);
    for event in NATS_EVENTS {
        let _ = c.nats_events.with_label_values(&[service, event]);
    }
}

/// Sets `service`'s connection state.
pub fn nats_connected(service: &str, connected: bool) {
    common()
        .nats_connected
        .with_label_values(&[service])
        .set(i64::from(connected));
}

/// Counts a client event of `service` and follows its connection state.
pub fn nats_event(service: &str, event: &async_nats::Event) {
    let c = common();
    let kind = match event {
        async_nats::Event::Connected => {
            nats_connected(service, true);
            "connected"
        }
        async_nats::Event::Disconnected => {
            nats_connected(service, false);
            "disconnected"
        }
        async_nats::Event::LameDuckMode => "lame_duck",
        async_nats::Event::SlowConsumer(_) => "slow_consumer",
        async_nats::Event::ServerError(_) => "server_error",
        async_nats::Event::ClientError(_) => "client_error",
        _ => "other",
    };
    c.nats_events.with_label_values(&[service, kind]).inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_has_its_own_connection_state() {
        nats_connecting("test-a");
        nats_connecting("test-b");
        let text = render();
        assert!(text.contains("warden_nats_connected{service=\"test-a\"} 0"));
        assert!(text.contains(
            "warden_nats_connection_events_total{event=\"disconnected\",service=\"test-a\"} 0"
        ));
        nats_event("test-a", &async_nats::Event::Connected);
        nats_connected("test-b", true);
        nats_event("test-b", &async_nats::Event::Disconnected);
        let text = render();
        assert!(text.contains("warden_nats_connected{service=\"test-a\"} 1"));
        assert!(text.contains("warden_nats_connected{service=\"test-b\"} 0"));
        assert!(text.contains(
            "warden_nats_connection_events_total{event=\"connected\",service=\"test-a\"} 1"
        ));
    }
}
