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
        .route("/healthz", get(healthz))
}

/// Where a service of this process is in its start.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Starting,
    /// Waiting for JetStream: what for, and since how long (as of the
    /// last failed attempt).
    Waiting {
        what: String,
        waited: std::time::Duration,
    },
    Ready,
}

fn readiness() -> &'static std::sync::Mutex<std::collections::BTreeMap<String, Phase>> {
    static R: std::sync::OnceLock<std::sync::Mutex<std::collections::BTreeMap<String, Phase>>> =
        std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

fn set_phase(service: &str, phase: Phase) {
    readiness()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(service.to_string(), phase);
}

/// A service of this process is starting: `/healthz` answers 503 until
/// it calls [`ready`]. `warden up` calls it for every service before
/// starting any, so its `/healthz` is 200 only once all of them answer.
pub fn starting(service: &str) {
    set_phase(service, Phase::Starting);
}

/// The service answers on the bus (its subscriptions and consumers are
/// in place).
pub fn ready(service: &str) {
    set_phase(service, Phase::Ready);
}

/// The starting service waits for JetStream (`what` it tried, for how
/// long): `/healthz` says so. Changes nothing for a service already
/// ready (a wait after the start is not a start).
pub fn waiting_for_jetstream(service: &str, what: &str, waited: std::time::Duration) {
    let mut r = readiness().lock().unwrap_or_else(|p| p.into_inner());
    if r.get(service) != Some(&Phase::Ready) {
        r.insert(
            service.to_string(),
            Phase::Waiting {
                what: format!("for JetStream: {what}"),
                waited,
            },
        );
    }
}

/// The service waits for something other than JetStream (`what`, e.g.
/// its AMQP broker) since `waited`: `/healthz` says so, even for a
/// service that was ready (it lost what it needs).
pub fn waiting_for(service: &str, what: &str, waited: std::time::Duration) {
    readiness()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            service.to_string(),
            Phase::Waiting {
                what: format!("for {what}"),
                waited,
            },
        );
}

/// The wait of [`waiting_for_jetstream`] is over; the service is still
/// starting.
pub fn done_waiting(service: &str) {
    let mut r = readiness().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p @ Phase::Waiting { .. }) = r.get_mut(service) {
        *p = Phase::Starting;
    }
}

/// The services of this process that are not ready yet.
pub fn not_ready() -> Vec<String> {
    readiness()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, phase)| **phase != Phase::Ready)
        .map(|(name, _)| name.clone())
        .collect()
}

/// The `/healthz` answer: 200 `ok` once every service of the process is
/// ready, else 503 naming the ones still starting, and for each one
/// waiting for JetStream what it waits for and since how long.
pub fn health() -> (u16, String) {
    let r = readiness().lock().unwrap_or_else(|p| p.into_inner());
    let waiting: Vec<String> = r
        .iter()
        .filter_map(|(name, phase)| match phase {
            Phase::Ready => None,
            Phase::Starting => Some(name.clone()),
            Phase::Waiting { what, waited } => {
                Some(format!("{name} (waiting {what}, {} s)", waited.as_secs()))
            }
        })
        .collect();
    if waiting.is_empty() {
        (200, "ok\n".into())
    } else {
        (503, format!("starting: {}\n", waiting.join(", ")))
    }
}

async fn healthz() -> (axum::http::StatusCode, String) {
    let (code, body) = health();
    let status = if code == 200 {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthz_waits_for_every_service_of_the_process() {
        starting("test-ready-a");
        starting("test-ready-b");
        ready("test-ready-a");
        let (status, body) = healthz().await;
        assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("test-ready-b") && !body.contains("test-ready-a"),
            "{body}"
        );
        ready("test-ready-b");
        assert!(!not_ready().iter().any(|n| n.starts_with("test-ready")));
    }

    #[tokio::test]
    async fn healthz_names_a_service_waiting_for_jetstream() {
        starting("test-wait");
        waiting_for_jetstream(
            "test-wait",
            "streams and buckets",
            std::time::Duration::from_secs(3),
        );
        let (status, body) = healthz().await;
        assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("test-wait (waiting for JetStream: streams and buckets, 3 s)"),
            "{body}"
        );
        done_waiting("test-wait");
        assert!(!health().1.contains("test-wait (waiting"));
        assert!(not_ready().contains(&"test-wait".to_string()));
        ready("test-wait");
        waiting_for_jetstream("test-wait", "later", std::time::Duration::from_secs(1));
        assert!(
            !not_ready().contains(&"test-wait".to_string()),
            "a ready service stays ready"
        );
    }

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
