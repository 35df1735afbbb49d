//! Every health service metric, declared once; [`init`] registers them
//! and exports every closed label value at zero when the service starts.

use std::sync::OnceLock;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
use warden_shared::metrics::{register, touch_each};
use warden_shared::resource::reason;

pub struct Metrics {
    pub resources: IntGaugeVec,
    pub pool_resources: IntGaugeVec,
    pub checks: IntCounterVec,
    pub recycles: IntCounterVec,
    pub suspects: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub cas_conflicts: IntCounter,
}

/// `result` of `warden_health_checks_total`.
pub const CHECK_RESULTS: [&str; 3] = ["passed", "failed", "timeout"];
/// `result` of `warden_health_suspects_total`.
pub const SUSPECT_RESULTS: [&str; 6] = [
    "suspicious",
    "flapping",
    "noted",
    "ignored",
    "unknown",
    "invalid",
];
/// `reason` of `warden_health_dead_letters_total`.
pub const INVALID_SUSPECT: &str = "invalid_suspect";

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
        dead_letters: counter(
            "warden_health_dead_letters_total",
            "Messages kept on the dead-letter stream (acknowledged by it), by reason",
            &["reason"],
        ),
        cas_conflicts: register(
            IntCounter::new(
                "warden_health_write_conflicts_total",
                "Writes of a resource record that lost a race with another writer and were retried",
            )
            .expect("valid metric"),
        ),
    })
}

/// Registers every health metric with every check result, recycle
/// reason, suspect result and dead-letter reason at zero. The resource
/// gauges are left to the first export, after the bucket was read.
pub fn init() {
    let m = metrics();
    touch_each(&m.checks, &CHECK_RESULTS);
    touch_each(&m.recycles, &reason::ALL);
    touch_each(&m.suspects, &SUSPECT_RESULTS);
    touch_each(&m.dead_letters, &[INVALID_SUSPECT]);
}

#[cfg(test)]
mod tests {
    #[test]
    fn closed_label_sets_are_exported_at_zero() {
        super::init();
        let text = warden_shared::metrics::render();
        for series in [
            r#"warden_health_checks_total{result="timeout"} 0"#,
            r#"warden_health_recycles_total{reason="vanished"} 0"#,
            r#"warden_health_suspects_total{result="flapping"} 0"#,
            r#"warden_health_dead_letters_total{reason="invalid_suspect"} 0"#,
            "warden_health_write_conflicts_total 0",
        ] {
            assert!(text.contains(series), "{series} missing");
        }
    }
}
