//! Every API metric, declared once.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use warden_shared::metrics::register;
use warden_shared::JobState;

pub struct Metrics {
    /// Requests by bounded route name and status code.
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub jobs_indexed: IntGauge,
    /// Jobs by state, as the index sees the bucket.
    pub jobs: IntGaugeVec,
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        requests: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_api_requests_total",
                    "API requests (HTTP and NATS) by route and status code",
                ),
                &["route", "status"],
            )
            .expect("valid metric"),
        ),
        duration: register(
            HistogramVec::new(
                HistogramOpts::new(
                    "warden_api_request_duration_seconds",
                    "Time to answer an API request, by route",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["route"],
            )
            .expect("valid metric"),
        ),
        jobs_indexed: register(
            IntGauge::new("warden_api_jobs_indexed", "Jobs in the API's search index")
                .expect("valid metric"),
        ),
        jobs: register(
            IntGaugeVec::new(
                Opts::new("warden_jobs", "Jobs in the jobs bucket by state"),
                &["state"],
            )
            .expect("valid metric"),
        ),
    })
}

/// Counts one answered request.
pub fn observe(route: &'static str, status: u16, elapsed: Duration) {
    let m = metrics();
    m.requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    m.duration
        .with_label_values(&[route])
        .observe(elapsed.as_secs_f64());
}

/// Publishes the index's counts.
pub fn set_index_counts(total: usize, by_state: impl Fn(JobState) -> usize) {
    let m = metrics();
    m.jobs_indexed.set(total as i64);
    for s in JobState::ALL {
        m.jobs
            .with_label_values(&[s.as_str()])
            .set(by_state(s) as i64);
    }
}
