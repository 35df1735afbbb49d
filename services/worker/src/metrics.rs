//! Every worker metric, declared once; [`init`] registers them and
//! exports every closed label value at zero when the worker starts.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use warden_shared::error::ErrorCode;
use warden_shared::metrics::{register, touch_each};

pub struct Metrics {
    pub running: IntGauge,
    pub attempts: IntCounterVec,
    pub reports: IntCounterVec,
    pub report_retries: IntCounter,
    pub session_resets: IntCounterVec,
    pub duration: Histogram,
    pub checks: IntCounterVec,
    pub acquire_unavailable: IntCounter,
    /// Leases that answered an acquire of a session since replaced: not run.
    pub stale_grants: IntCounter,
    /// Allowlisted variables not passed to tasks because their value holds
    /// one of the worker's secrets.
    pub task_env_dropped: IntCounter,
}

/// `result` of `warden_worker_attempts_total`.
pub const ATTEMPT_RESULTS: [&str; 4] = ["finished", "crashed", "released", "abandoned"];
/// `kind` of `warden_worker_reports_published_total` (`ReportKind::name`).
pub const REPORT_KINDS: [&str; 5] = ["started", "finished", "crashed", "released", "stopped"];
/// The worker stopped its own tasks: it could not reach the bus past the
/// session timeout.
pub const SELF_FENCED: &str = "self_fenced";
/// `reason` of `warden_worker_session_resets_total`.
pub const RESET_REASONS: [&str; 3] = [
    ErrorCode::UnknownSession.as_str(),
    ErrorCode::SessionSuperseded.as_str(),
    SELF_FENCED,
];
/// `result` of `warden_worker_health_checks_total`.
pub const CHECK_RESULTS: [&str; 2] = ["passed", "failed"];

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        running: register(
            IntGauge::new(
                "warden_worker_tasks_running",
                "Attempts running on this worker",
            )
            .expect("valid metric"),
        ),
        attempts: register(
            IntCounterVec::new(
                Opts::new("warden_worker_attempts_total", "Attempts ended, by result"),
                &["result"],
            )
            .expect("valid metric"),
        ),
        reports: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_worker_reports_published_total",
                    "Reports acknowledged by the bus, by kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        ),
        report_retries: register(
            IntCounter::new(
                "warden_worker_report_publish_retries_total",
                "Report publishes retried after a failure",
            )
            .expect("valid metric"),
        ),
        session_resets: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_worker_session_resets_total",
                    "Sessions abandoned, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        ),
        duration: register(
            Histogram::with_opts(
                HistogramOpts::new("warden_worker_task_duration_seconds", "Task run time").buckets(
                    vec![0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0],
                ),
            )
            .expect("valid metric"),
        ),
        checks: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_worker_health_checks_total",
                    "Health checks of this worker's resources run on request, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
        ),
        acquire_unavailable: register(
            IntCounter::new(
                "warden_worker_acquire_unavailable_total",
                "Acquire requests answered with no lease because a resource is not open",
            )
            .expect("valid metric"),
        ),
        stale_grants: register(
            IntCounter::new(
                "warden_worker_stale_grants_total",
                "Leases granted to a session this worker had replaced meanwhile: not run",
            )
            .expect("valid metric"),
        ),
        task_env_dropped: register(
            IntCounter::new(
                "warden_worker_task_env_dropped_total",
                "Allowlisted variables kept from tasks because their value holds a worker secret",
            )
            .expect("valid metric"),
        ),
    })
}

/// Registers every worker metric with every closed label value at zero.
pub fn init() {
    let m = metrics();
    touch_each(&m.attempts, &ATTEMPT_RESULTS);
    touch_each(&m.reports, &REPORT_KINDS);
    touch_each(&m.session_resets, &RESET_REASONS);
    touch_each(&m.checks, &CHECK_RESULTS);
}

#[cfg(test)]
mod tests {
    #[test]
    fn closed_label_sets_are_exported_at_zero() {
        super::init();
        let text = warden_shared::metrics::render();
        for series in [
            r#"warden_worker_attempts_total{result="abandoned"} 0"#,
            r#"warden_worker_reports_published_total{kind="released"} 0"#,
            r#"warden_worker_session_resets_total{reason="self_fenced"} 0"#,
            r#"warden_worker_health_checks_total{result="failed"} 0"#,
            "warden_worker_tasks_running 0",
        ] {
            assert!(text.contains(series), "{series} missing");
        }
    }
}
