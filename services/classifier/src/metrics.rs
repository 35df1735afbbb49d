//! Every classifier metric, declared once.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use warden_shared::metrics::register;

pub struct Metrics {
    pub classified: IntCounterVec,
    pub invalid: IntCounter,
    pub duration: Histogram,
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        classified: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_classifier_classifications_total",
                    "Crashes classified, by blame and detail (details outside the catalogue count as other)",
                ),
                &["blame", "detail"],
            )
            .expect("valid metric"),
        ),
        invalid: register(
            IntCounter::new(
                "warden_classifier_requests_invalid_total",
                "Classification requests that could not be decoded",
            )
            .expect("valid metric"),
        ),
        duration: register(
            Histogram::with_opts(
                HistogramOpts::new(
                    "warden_classifier_duration_seconds",
                    "Time to classify one crash",
                )
                .buckets(vec![0.0001, 0.001, 0.01, 0.1, 1.0]),
            )
            .expect("valid metric"),
        ),
    })
}
