//! Every health service metric, declared once.

use std::sync::OnceLock;

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use warden_shared::metrics::register;

pub struct Metrics {
    pub resources: IntGaugeVec,
    pub pool_resources: IntGaugeVec,
    pub checks: IntCounterVec,
    pub recycles: IntCounterVec,
    pub suspects: IntCounterVec,
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        resources: gauge(
            "warden_health_resources",
            "Resources on record, by state (open, suspicious, broken, closed)",
            &["state"],
        ),
        pool_resources: gauge(
            "warden_health_pool_resources",
            "Resources serving each pool, by state; open counts only resources with an active session",
            &["pool", "state"],
        ),
        checks: counter(
            "warden_health_checks_total",
            "Health checks by result (passed, failed, timeout)",
            &["result"],
        ),
        recycles: counter(
            "warden_health_recycles_total",
            "Resources recycled (closed, recycle event published), by reason",
            &["reason"],
        ),
        suspects: counter(
            "warden_health_suspects_total",
            "Suspect-resource events, by what came of them (suspicious, flapping, noted, ignored, unknown, invalid)",
            &["result"],
        ),
    })
}
