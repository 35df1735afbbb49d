//! Every recorder metric, declared once; [`init`] registers them and
//! exports every closed label value at zero.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use warden_shared::metrics::{register, touch_each};

pub struct Metrics {
    pub revisions: IntCounterVec,
    pub archival: IntCounterVec,
    pub db_errors: IntCounterVec,
    pub batch_seconds: Histogram,
    pub pending: IntGauge,
}

/// `outcome` of `warden_recorder_revisions_total`.
pub const WRITTEN: &str = "written";
pub const STALE: &str = "stale";
pub const MARKER: &str = "marker";
pub const DEAD_LETTERED: &str = "dead_lettered";
pub const RETRIED: &str = "retried";
pub const OUTCOMES: [&str; 5] = [WRITTEN, STALE, MARKER, DEAD_LETTERED, RETRIED];

/// `step` of `warden_recorder_archival_total`.
pub const ARCHIVED: &str = "archived";
pub const REMOVED: &str = "removed";
pub const CHANGED: &str = "changed";
pub const MARKER_PURGED: &str = "marker_purged";
pub const EXPIRED: &str = "expired";
pub const STEPS: [&str; 5] = [ARCHIVED, REMOVED, CHANGED, MARKER_PURGED, EXPIRED];

/// `kind` of `warden_recorder_db_errors_total`.
pub const UNAVAILABLE: &str = "unavailable";
pub const STATEMENT: &str = "statement";
pub const KINDS: [&str; 2] = [UNAVAILABLE, STATEMENT];

/// Dead-letter reasons.
pub const UNDECODABLE_JOB: &str = "undecodable_job";
pub const UNRECORDABLE_JOB: &str = "unrecordable_job";

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        revisions: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_recorder_revisions_total",
                    "Job revisions handled, by outcome (written, stale: the database had it, \
                     marker: a delete, dead_lettered, retried: handed back after a database error)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        ),
        archival: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_recorder_archival_total",
                    "Archival steps taken, by step (archived, removed from the bucket, changed: \
                     the bucket had a newer revision, marker_purged, expired by retention)",
                ),
                &["step"],
            )
            .expect("valid metric"),
        ),
        db_errors: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_recorder_db_errors_total",
                    "Database errors, by kind (unavailable, statement)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        ),
        batch_seconds: register(
            Histogram::with_opts(
                HistogramOpts::new(
                    "warden_recorder_batch_seconds",
                    "Time to record one batch of revisions (one transaction)",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("valid metric"),
        ),
        pending: register(
            IntGauge::new(
                "warden_recorder_pending",
                "Job revisions in the bucket's stream not yet delivered to a recorder",
            )
            .expect("valid metric"),
        ),
    })
}

pub fn init() {
    let m = metrics();
    touch_each(&m.revisions, &OUTCOMES);
    touch_each(&m.archival, &STEPS);
    touch_each(&m.db_errors, &KINDS);
}
