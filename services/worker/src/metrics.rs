//! Every worker metric, declared once.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use warden_shared::metrics::register;

pub struct Metrics {
    pub running: IntGauge,
    pub attempts: IntCounterVec,
    pub reports: IntCounterVec,
    pub report_retries: IntCounter,
    pub session_resets: IntCounterVec,
    pub duration: Histogram,
    pub checks: IntCounterVec,
    pub acquire_unavailable: IntCounter,
}

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
    })
}
