//! Every scheduler metric, declared once, and the closed sets of their
//! label values, exported at zero by [`init`] when the scheduler starts.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
};
use warden_shared::classify::{detail_label, detail_labels};
use warden_shared::metrics::{register, touch, touch_each};
use warden_shared::retry::Fate;
use warden_shared::state::{transition, Action};
use warden_shared::{Blame, Config, JobState};

use crate::acquire::AcquireResult;
use crate::apply::RejectReason;
use crate::reports::{Refusal, Rejection, ReportOutcome};
use crate::requeue::RequeueReason;

pub struct Metrics {
    pub dispatched: IntCounter,
    pub dispatch_conflicts: IntCounter,
    pub report_conflicts: IntCounter,
    pub transitions: IntCounterVec,
    pub reports: IntCounterVec,
    pub rejected: IntCounterVec,
    pub invalid_reports: IntCounter,
    pub dead_letters: IntCounterVec,
    pub reports_refused: IntCounterVec,
    pub reports_truncated: IntCounter,
    pub acquire_refused: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub oldest_age: IntGaugeVec,
    pub dispatch_latency: Histogram,
    pub job_duration: HistogramVec,
    pub acquire_requests: IntCounterVec,
    pub requeued: IntCounterVec,
    pub crashes: IntCounterVec,
    pub retries: IntCounterVec,
    pub shelved: IntCounterVec,
    pub delayed: IntGaugeVec,
    pub classify_failures: IntCounter,
    pub notifications: IntCounterVec,
    pub suspects: IntCounter,
    pub waiting_for_resource: IntGaugeVec,
}

/// `kind` of `warden_scheduler_reports_total` (`ReportKind::name`).
pub const REPORT_KINDS: [&str; 5] = ["started", "finished", "crashed", "released", "stopped"];
/// `result` of `warden_scheduler_reports_total` ([`ReportOutcome::label`]).
pub const REPORT_RESULTS: [&str; 5] = ReportOutcome::LABELS;
/// `reason` of `warden_scheduler_shelved_total`.
pub const SHELVE_REASONS: [Fate; 2] = [Fate::ShelvedRetriesExhausted, Fate::ShelvedPoison];
/// `party` and `result` of `warden_scheduler_notifications_total` (no
/// notification is sent for party `none`).
pub const NOTIFY_PARTIES: [&str; 2] = ["operators", "owners"];
pub const NOTIFY_RESULTS: [&str; 2] = ["published", "failed"];
/// `code` of `warden_scheduler_acquire_refused_total`.
pub const ACQUIRE_REFUSALS: [warden_shared::error::ErrorCode; 4] = [
    warden_shared::error::ErrorCode::BotMismatch,
    warden_shared::error::ErrorCode::UnknownSession,
    warden_shared::error::ErrorCode::SessionSuperseded,
    warden_shared::error::ErrorCode::PoolNotAllowed,
];
/// `reason` of `warden_scheduler_dead_letters_total`.
pub const INVALID_REPORT: &str = "invalid_report";
/// `state` of `warden_scheduler_job_duration_seconds`: how an attempt
/// ended by its worker's report.
pub const ENDED: [JobState; 2] = [JobState::Finished, JobState::Crashed];
/// `priority` of the queue gauges for a priority no task or trigger rule
/// is configured with.
pub const OTHER_PRIORITY: &str = "other";

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let counter =
            |name: &str, help: &str| register(IntCounter::new(name, help).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
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
            report_conflicts: counter(
                "warden_scheduler_report_conflicts_total",
                "Writes of reports that lost the race for their job (another writer, or the replica's cached version of the job was not the latest) and were decided again on a fresh read",
            ),
            transitions: counter_vec(
                "warden_scheduler_transitions_total",
                "Job state transitions applied by the scheduler (a crash and the retry policy's answer count as one, RUNNING to the resulting state)",
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
                "Report messages that could not be decoded (each delivery, before it is dead-lettered)",
            ),
            dead_letters: counter_vec(
                "warden_scheduler_dead_letters_total",
                "Messages kept on the dead-letter stream (acknowledged by it), by reason",
                &["reason"],
            ),
            reports_refused: counter_vec(
                "warden_scheduler_reports_refused_total",
                "Reports refused before anything was decided on them (dead-lettered, the job untouched): not from the lease holder (subject without a bot, another bot, without the lease's secret) or out of bounds, by reason",
                &["reason"],
            ),
            reports_truncated: counter(
                "warden_scheduler_reports_truncated_total",
                "Reports whose fault or crash text was cut to its bound",
            ),
            acquire_refused: counter_vec(
                "warden_scheduler_acquire_refused_total",
                "Acquire requests refused for their session, bot or pools, by error code",
                &["code"],
            ),
            queue_depth: gauge_vec(
                "warden_scheduler_queue_depth",
                "SCHEDULED jobs ready for dispatch, per pool and priority (a priority no task or trigger rule is configured with counts as other)",
                &["pool", "priority"],
            ),
            oldest_age: gauge_vec(
                "warden_scheduler_oldest_waiting_seconds",
                "How long the oldest ready job has waited, per pool and priority (starvation; a priority no task or trigger rule is configured with counts as other)",
                &["pool", "priority"],
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
            job_duration: register(
                HistogramVec::new(
                    HistogramOpts::new(
                        "warden_scheduler_job_duration_seconds",
                        "Attempts ended by their worker's report, from lease to the report applied (scheduler clock), by the state it ended in (FINISHED, CRASHED)",
                    )
                    .buckets(vec![
                        0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 10800.0,
                    ]),
                    &["state"],
                )
                .expect("valid metric"),
            ),
            requeued: counter_vec(
                "warden_scheduler_leases_requeued_total",
                "Running attempts taken back because their session ended or their resource was closed, by reason",
                &["reason"],
            ),
            crashes: counter_vec(
                "warden_scheduler_crashes_total",
                "Failed attempts recorded, by blame and detail (outside the catalogue: other): every crash report applied, as classified, and every lease taken back from a lost worker (expired or superseded session: system/worker_lost, or task/worker_crash_loop when that makes the job poison); a lease taken back from a closed resource counts only when it makes the job poison, a closed session's never",
                &["blame", "detail"],
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
            delayed: gauge_vec(
                "warden_scheduler_delayed_jobs",
                "SCHEDULED jobs waiting for their retry delay, per pool",
                &["pool"],
            ),
            waiting_for_resource: gauge_vec(
                "warden_scheduler_jobs_waiting_for_resource",
                "Ready jobs in a pool no active session on open resources serves, per pool",
                &["pool"],
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

/// The (from, to) pairs the scheduler writes: a dispatch, and every way a
/// RUNNING attempt ends here (a report, or its lease taken back). Cancels
/// are the API's.
fn scheduler_transitions() -> Vec<(JobState, JobState)> {
    let mut pairs = Vec::new();
    let moves = std::iter::once((JobState::Scheduled, Action::Dispatch)).chain(
        Action::ALL
            .into_iter()
            .filter(|a| *a != Action::Cancel)
            .map(|a| (JobState::Running, a)),
    );
    for (from, action) in moves {
        if let Ok(to) = transition(from, action) {
            if !pairs.contains(&(from, to)) {
                pairs.push((from, to));
            }
        }
    }
    pairs
}

/// Registers every metric and exports every counter series whose label
/// values are a closed set at zero, so `increase()` sees the first event.
/// Crash details are the config's catalogue, the built-in codes and
/// `other`, for every blame (a rule may give another blame than the
/// catalogue's).
pub fn init(config: &Config) {
    let m = metrics();
    for (from, to) in scheduler_transitions() {
        touch(&m.transitions, &[from.as_str(), to.as_str()]);
    }
    for kind in REPORT_KINDS {
        for result in REPORT_RESULTS {
            touch(&m.reports, &[kind, result]);
        }
    }
    for r in RejectReason::ALL {
        touch(&m.rejected, &[r.as_str()]);
    }
    for r in [Rejection::UnknownJob, Rejection::CorruptJob] {
        touch(&m.rejected, &[r.label()]);
    }
    touch_each(&m.dead_letters, &[INVALID_REPORT]);
    for r in Refusal::ALL {
        touch(&m.reports_refused, &[r.label()]);
        touch(&m.dead_letters, &[r.label()]);
    }
    for code in ACQUIRE_REFUSALS {
        touch(&m.acquire_refused, &[code.as_str()]);
    }
    for r in AcquireResult::ALL {
        touch(&m.acquire_requests, &[r.label()]);
    }
    for r in RequeueReason::ALL {
        touch(&m.requeued, &[r.label()]);
    }
    let details = detail_labels(&config.classifier.details);
    for blame in Blame::ALL {
        touch(&m.retries, &[blame.as_str()]);
        for detail in &details {
            touch(&m.crashes, &[blame.as_str(), detail]);
        }
    }
    for fate in SHELVE_REASONS {
        touch(&m.shelved, &[fate.as_str()]);
    }
    for party in NOTIFY_PARTIES {
        for result in NOTIFY_RESULTS {
            touch(&m.notifications, &[party, result]);
        }
    }
    for state in ENDED {
        let _ = m.job_duration.with_label_values(&[state.as_str()]);
    }
}

/// Counts what the retry policy did with a failed attempt.
pub fn count_fate(fate: Fate, blame: Option<Blame>) {
    let m = metrics();
    match fate {
        Fate::Retried => m
            .retries
            .with_label_values(&[blame.map(|b| b.as_str()).unwrap_or("unknown")])
            .inc(),
        Fate::ShelvedRetriesExhausted | Fate::ShelvedPoison => {
            m.shelved.with_label_values(&[fate.as_str()]).inc()
        }
        Fate::Kept | Fate::Requeued => {}
    }
}

/// Counts one failed attempt as recorded on the job.
pub fn count_crash(config: &Config, blame: Blame, detail: &str) {
    metrics()
        .crashes
        .with_label_values(&[
            blame.as_str(),
            detail_label(&config.classifier.details, detail),
        ])
        .inc();
}

/// The `priority` label of the queue gauges: a priority some task or
/// trigger rule is configured with (or 0, the default) as itself, any
/// other (a job submitted through the API with its own) as
/// [`OTHER_PRIORITY`]. The set is bounded by the config, whatever
/// priorities jobs carry.
pub struct PriorityLabels(BTreeSet<i32>);

impl PriorityLabels {
    pub fn new(config: &Config) -> PriorityLabels {
        let mut known: BTreeSet<i32> = config.tasks.values().map(|t| t.priority).collect();
        known.extend(config.trigger.rules.iter().filter_map(|r| r.priority));
        known.insert(0);
        PriorityLabels(known)
    }

    pub fn label(&self, priority: i32) -> String {
        if self.0.contains(&priority) {
            priority.to_string()
        } else {
            OTHER_PRIORITY.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn closed_label_sets_are_exported_at_zero_after_init() {
        init(&Config::defaults());
        let text = warden_shared::metrics::render();
        for series in [
            r#"warden_scheduler_crashes_total{blame="system",detail="oom"}"#,
            r#"warden_scheduler_crashes_total{blame="third_party",detail="network"}"#,
            r#"warden_scheduler_crashes_total{blame="task",detail="other"}"#,
            r#"warden_scheduler_retries_total{blame="third_party"}"#,
            r#"warden_scheduler_shelved_total{reason="worker_crash_loop"}"#,
            r#"warden_scheduler_shelved_total{reason="retries_exhausted"}"#,
            r#"warden_scheduler_reports_rejected_total{reason="stale_epoch"}"#,
            r#"warden_scheduler_reports_rejected_total{reason="unknown_job"}"#,
            r#"warden_scheduler_leases_requeued_total{reason="worker_lost"}"#,
            r#"warden_scheduler_transitions_total{from="RUNNING",to="SHELVED"}"#,
            r#"warden_scheduler_transitions_total{from="SCHEDULED",to="RUNNING"}"#,
            r#"warden_scheduler_reports_total{kind="crashed",result="applied"}"#,
            r#"warden_scheduler_acquire_requests_total{result="resource_unavailable"}"#,
            r#"warden_scheduler_notifications_total{party="owners",result="failed"}"#,
            r#"warden_scheduler_dead_letters_total{reason="invalid_report"}"#,
            r#"warden_scheduler_job_duration_seconds_count{state="CRASHED"}"#,
        ] {
            assert!(sample(&text, series).is_some(), "{series} missing");
        }
        // The scheduler never cancels: no series for it.
        assert!(!text.contains(r#"to="CANCELLED""#));
    }

    #[test]
    fn a_crash_counts_once_under_its_blame_and_detail() {
        let config = Config::defaults();
        init(&config);
        let series = r#"warden_scheduler_crashes_total{blame="system",detail="disk_full"}"#;
        let before = sample(&warden_shared::metrics::render(), series).unwrap_or(-1.0);
        count_crash(&config, Blame::System, "disk_full");
        let after = sample(&warden_shared::metrics::render(), series);
        assert_eq!(after, Some(before + 1.0));
        // A detail outside the catalogue is other, never a new series.
        count_crash(&config, Blame::Task, "made up by the task");
        let text = warden_shared::metrics::render();
        assert!(!text.contains("made up"));
        assert!(
            sample(
                &text,
                r#"warden_scheduler_crashes_total{blame="task",detail="other"}"#
            )
            .unwrap_or(0.0)
                >= 1.0
        );
    }

    #[test]
    fn priorities_outside_the_config_share_one_label() {
        let mut config = Config::defaults();
        if let Some(t) = config.tasks.values_mut().next() {
            t.priority = 7;
        }
        let p = PriorityLabels::new(&config);
        assert_eq!(p.label(0), "0");
        assert_eq!(p.label(7), "7");
        assert_eq!(p.label(123_456), OTHER_PRIORITY);
        assert_eq!(p.label(-3), OTHER_PRIORITY);
    }
}
