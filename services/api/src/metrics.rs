//! Every API metric, declared once; [`init`] registers them and exports
//! every closed label value at zero when the service starts.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use warden_shared::metrics::{register, touch};
use warden_shared::state::{transition, Action};
use warden_shared::JobState;

pub struct Metrics {
    /// Requests by bounded route name and status code.
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub jobs_indexed: IntGauge,
    /// Jobs by state, as the index sees the bucket.
    pub jobs: IntGaugeVec,
    /// State changes made by hand (retry, cancel).
    pub transitions: IntCounterVec,
    /// HTTP requests refused before a handler ran, by reason.
    pub http_refusals: IntCounterVec,
    /// Execution tokens refused: old (w1) or without the lease's secret.
    pub forged_tokens: IntCounterVec,
}

/// `reason` of `warden_api_http_refusals_total`.
pub const HEADER_TIMEOUT: &str = "header_timeout";
pub const BODY_TIMEOUT: &str = "body_timeout";
pub const NO_TOKEN: &str = "no_token";
/// A console form without the CSRF token its cookie holds.
pub const CSRF: &str = "csrf";
/// A console write from another site (`Origin`, `Sec-Fetch-Site`).
pub const CROSS_SITE: &str = "cross_site";
pub const REFUSAL_REASONS: [&str; 5] = [HEADER_TIMEOUT, BODY_TIMEOUT, NO_TOKEN, CSRF, CROSS_SITE];

/// `reason` of `warden_api_execution_tokens_refused_total`.
pub const TOKEN_REFUSALS: [&str; 3] = ["outdated", "malformed", "wrong_secret"];

/// What a person can do to a job through the API.
pub const ACTIONS: [Action; 2] = [Action::Retry, Action::Cancel];

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
        transitions: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_api_transitions_total",
                    "Job state transitions made through the API (a person's retry or cancel)",
                ),
                &["from", "to"],
            )
            .expect("valid metric"),
        ),
        http_refusals: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_api_http_refusals_total",
                    "HTTP connections or requests refused before a handler ran, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        ),
        forged_tokens: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_api_execution_tokens_refused_total",
                    "State switches refused for their execution token: outdated (w1, without a secret), malformed, or wrong_secret (not the lease's)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        ),
    })
}

/// Registers every API metric, with every transition a retry or cancel can
/// make at zero. The jobs gauge is left to the index, once it has read the
/// bucket.
pub fn init() {
    let m = metrics();
    warden_shared::metrics::touch_each(&m.http_refusals, &REFUSAL_REASONS);
    warden_shared::metrics::touch_each(&m.forged_tokens, &TOKEN_REFUSALS);
    for from in JobState::ALL {
        for action in ACTIONS {
            if let Ok(to) = transition(from, action) {
                touch(&m.transitions, &[from.as_str(), to.as_str()]);
            }
        }
    }
}

/// Counts one HTTP refusal (one of [`REFUSAL_REASONS`]).
pub fn http_refused(reason: &'static str) {
    metrics().http_refusals.with_label_values(&[reason]).inc();
}

/// Counts one change made by hand.
pub fn count_transition(from: JobState, to: JobState) {
    metrics()
        .transitions
        .with_label_values(&[from.as_str(), to.as_str()])
        .inc();
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

#[cfg(test)]
mod tests {
    #[test]
    fn transitions_by_hand_are_exported_at_zero() {
        super::init();
        let text = warden_shared::metrics::render();
        for series in [
            r#"warden_api_transitions_total{from="SHELVED",to="SCHEDULED"} "#,
            r#"warden_api_transitions_total{from="RUNNING",to="CANCELLED"} "#,
        ] {
            assert!(text.contains(series), "{series} missing");
        }
        assert!(!text.contains(r#"warden_api_transitions_total{from="FINISHED""#));
    }
}
