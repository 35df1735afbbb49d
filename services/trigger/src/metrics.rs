//! Every trigger metric, declared once.

use std::sync::OnceLock;

use prometheus::{IntCounter, IntCounterVec, Opts};
use warden_shared::metrics::register;

pub struct Metrics {
    pub events: IntCounterVec,
    pub jobs_created: IntCounter,
    pub dead_letters: IntCounterVec,
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        events: register(
            IntCounterVec::new(
                Opts::new("warden_trigger_events_total", "Events handled, by outcome (matched, unmatched, duplicate, incomplete, dead_lettered, retried)"),
                &["outcome"],
            )
            .expect("valid metric"),
        ),
        jobs_created: register(IntCounter::new("warden_trigger_jobs_created_total", "Jobs created from events").expect("valid metric")),
        dead_letters: register(
            IntCounterVec::new(Opts::new("warden_trigger_dead_letters_total", "Events dead-lettered, by reason"), &["reason"])
                .expect("valid metric"),
        ),
    })
}
