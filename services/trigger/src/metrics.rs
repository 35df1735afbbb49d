//! Every trigger metric, declared once; [`init`] registers them and
//! exports every closed label value at zero when the trigger starts.

use std::sync::OnceLock;

use prometheus::{IntCounter, IntCounterVec, Opts};
use warden_shared::metrics::{register, touch_each};

use crate::decode::DecodeError;

pub struct Metrics {
    pub events: IntCounterVec,
    pub jobs_created: IntCounter,
    pub dead_letters: IntCounterVec,
}

/// `outcome` of `warden_trigger_events_total`.
pub const OUTCOMES: [&str; 6] = [
    "matched",
    "unmatched",
    "duplicate",
    "incomplete",
    "dead_lettered",
    "retried",
];
/// A dead-letter reason that is not a decoding error: the job an event
/// asks for is too large to store.
pub const JOB_TOO_LARGE: &str = "job_too_large";

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        events: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_trigger_events_total",
                    "Events handled, by outcome (matched, unmatched, duplicate, incomplete, dead_lettered, retried)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        ),
        jobs_created: register(
            IntCounter::new("warden_trigger_jobs_created_total", "Jobs created from events")
                .expect("valid metric"),
        ),
        dead_letters: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_trigger_dead_letters_total",
                    "Events kept on the dead-letter stream (acknowledged by it), by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        ),
    })
}

/// Registers every trigger metric, each outcome and dead-letter reason at
/// zero, so the first event of a kind is a visible step.
pub fn init() {
    let m = metrics();
    touch_each(&m.events, &OUTCOMES);
    touch_each(&m.dead_letters, &DecodeError::REASONS);
    touch_each(&m.dead_letters, &[JOB_TOO_LARGE]);
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_outcome_and_reason_is_exported_at_zero() {
        super::init();
        let text = warden_shared::metrics::render();
        for series in [
            r#"warden_trigger_events_total{outcome="unmatched"} "#,
            r#"warden_trigger_events_total{outcome="dead_lettered"} "#,
            r#"warden_trigger_dead_letters_total{reason="invalid_json"} "#,
            r#"warden_trigger_dead_letters_total{reason="job_too_large"} "#,
            "warden_trigger_jobs_created_total ",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }
}
