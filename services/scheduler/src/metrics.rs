//! Every scheduler metric, declared once.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts};
use warden_shared::metrics::register;

pub struct Metrics {
    pub dispatched: IntCounter,
    pub dispatch_conflicts: IntCounter,
    pub transitions: IntCounterVec,
    pub reports: IntCounterVec,
    pub rejected: IntCounterVec,
    pub invalid_reports: IntCounter,
    pub queue_depth: IntGaugeVec,
    pub oldest_age: IntGaugeVec,
    pub dispatch_latency: Histogram,
    pub acquire_requests: IntCounterVec,
    pub requeued: IntCounterVec,
    pub retries: IntCounterVec,
    pub shelved: IntCounterVec,
    pub delayed: IntGaugeVec,
    pub classify_failures: IntCounter,
    pub notifications: IntCounterVec,
    pub suspects: IntCounter,
    pub waiting_for_resource: IntGaugeVec,
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let counter =
            |name: &str, help: &str| register(IntCounter::new(name, help).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        Metrics {
            dispatched: counter(
                "warden_scheduler_dispatched_total",
                "Attempts leased to workers",
            ),
            dispatch_conflicts: counter(
                "warden_scheduler_dispatch_conflicts_total",
                "Dispatches lost to a concurrent writer (another replica or a state change)",
            ),
            transitions: counter_vec(
                "warden_scheduler_transitions_total",
                "Job state transitions applied by the scheduler",
                &["from", "to"],
            ),
            reports: counter_vec(
                "warden_scheduler_reports_total",
                "Worker reports by kind and result",
                &["kind", "result"],
            ),
            rejected: counter_vec(
                "warden_scheduler_reports_rejected_total",
                "Worker reports rejected, by reason",
                &["reason"],
            ),
            invalid_reports: counter(
                "warden_scheduler_reports_invalid_total",
                "Report messages that could not be decoded (dead-lettered)",
            ),
            queue_depth: register(
                IntGaugeVec::new(
                    Opts::new(
                        "warden_scheduler_queue_depth",
                        "SCHEDULED jobs ready for dispatch, per pool and priority",
                    ),
                    &["pool", "priority"],
                )
                .expect("valid metric"),
            ),
            oldest_age: register(
                IntGaugeVec::new(
                    Opts::new(
                        "warden_scheduler_oldest_waiting_seconds",
                        "How long the oldest ready job has waited, per pool and priority (starvation)",
                    ),
                    &["pool", "priority"],
                )
                .expect("valid metric"),
            ),
            dispatch_latency: register(
                Histogram::with_opts(
                    HistogramOpts::new(
                        "warden_scheduler_dispatch_latency_seconds",
                        "From queued to leased",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            requeued: counter_vec(
                "warden_scheduler_leases_requeued_total",
                "Running attempts taken back because their session ended or their resource was closed, by reason",
                &["reason"],
            ),
            retries: counter_vec(
                "warden_scheduler_retries_total",
                "Failed attempts the retry policy scheduled again (after a delay), by blame",
                &["blame"],
            ),
            shelved: counter_vec(
                "warden_scheduler_shelved_total",
                "Jobs shelved by the retry policy: retries_exhausted or worker_crash_loop (poison)",
                &["reason"],
            ),
            delayed: register(
                IntGaugeVec::new(
                    Opts::new(
                        "warden_scheduler_delayed_jobs",
                        "SCHEDULED jobs waiting for their retry delay, per pool",
                    ),
                    &["pool"],
                )
                .expect("valid metric"),
            ),
            waiting_for_resource: register(
                IntGaugeVec::new(
                    Opts::new(
                        "warden_scheduler_jobs_waiting_for_resource",
                        "Ready jobs in a pool no active session on open resources serves, per pool",
                    ),
                    &["pool"],
                )
                .expect("valid metric"),
            ),
            classify_failures: counter(
                "warden_scheduler_classify_failures_total",
                "Crash classifications that failed (classifier down or slow); the report is retried",
            ),
            notifications: counter_vec(
                "warden_scheduler_notifications_total",
                "Crash notifications published, by party and result",
                &["party", "result"],
            ),
            suspects: counter(
                "warden_scheduler_resource_suspects_total",
                "Resources flagged suspicious after a crash that may be their fault",
            ),
            acquire_requests: counter_vec(
                "warden_scheduler_acquire_requests_total",
                "Worker acquire requests by result",
                &["result"],
            ),
        }
    })
}
