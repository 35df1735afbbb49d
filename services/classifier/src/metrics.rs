//! Every classifier metric, declared once; [`init`] registers them and
//! exports every blame and catalogue detail at zero when the service
//! starts.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use warden_shared::classify::detail_labels;
use warden_shared::metrics::{register, touch};
use warden_shared::Blame;

use crate::Catalogue;

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

/// Registers every classifier metric, with every blame × detail of the
/// catalogue (plus the built-in details and `other`) at zero: a rule may
/// give another blame than the catalogue's.
pub fn init(catalogue: &Catalogue) {
    let m = metrics();
    let details = detail_labels(catalogue);
    for blame in Blame::ALL {
        for detail in &details {
            touch(&m.classified, &[blame.as_str(), detail]);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_blame_and_detail_is_exported_at_zero() {
        let config = warden_shared::Config::defaults();
        super::init(&config.classifier.details);
        let text = warden_shared::metrics::render();
        for series in [
            r#"warden_classifier_classifications_total{blame="system",detail="oom"} "#,
            r#"warden_classifier_classifications_total{blame="task",detail="network"} "#,
            r#"warden_classifier_classifications_total{blame="unknown",detail="other"} "#,
            "warden_classifier_requests_invalid_total ",
            "warden_classifier_duration_seconds_count ",
        ] {
            assert!(text.contains(series), "{series} missing");
        }
    }
}
