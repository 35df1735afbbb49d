//! What a batch of reports of one job does: [`fold`] applies them in
//! order to the job record read (the single place a report's fate is
//! decided, on top of [`crate::apply`]), and says what to write, what to
//! count and which crash events to publish once the write is durable.
//! Pure: the consume loop is `loops::reports`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use warden_shared::job::Job;
use warden_shared::messages::{Classification, Report};
use warden_shared::retry::{self, Fate, Loss};
use warden_shared::{Blame, Config, JobState};

use crate::apply::{
    self, decide_with, record_after_cancel, record_rejection, Decision, RejectReason,
};
use crate::classification::CrashEvent;
use crate::metrics::ENDED;

/// What became of one report; its [`label`](Self::label) is the `result`
/// of `warden_scheduler_reports_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Written: the job moved `from` → `to`; `lost` when the worker
    /// stopped the attempt itself and the lease was lost with it.
    Applied {
        from: JobState,
        to: JobState,
        lost: Option<Loss>,
    },
    /// Already applied (a redelivered report): nothing to write.
    Duplicate,
    /// The cancelled attempt's own worker saying how it ended.
    AfterCancel,
    /// Not applied, recorded in the history.
    Rejected(Rejection),
}

impl ReportOutcome {
    pub const LABELS: [&'static str; 4] = ["applied", "duplicate", "after_cancel", "rejected"];

    pub fn label(self) -> &'static str {
        match self {
            ReportOutcome::Applied { .. } => "applied",
            ReportOutcome::Duplicate => "duplicate",
            ReportOutcome::AfterCancel => "after_cancel",
            ReportOutcome::Rejected(_) => "rejected",
        }
    }
}

/// Why a report was rejected; its [`label`](Self::label) is the `reason`
/// of `warden_scheduler_reports_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Decided against the job record ([`RejectReason`]).
    Report(RejectReason),
    /// No job with that id.
    UnknownJob,
    /// The job record cannot be read.
    CorruptJob,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Report(r) => r.as_str(),
            Rejection::UnknownJob => "unknown_job",
            Rejection::CorruptJob => "corrupt_job",
        }
    }
}

/// The reports of one job folded into one write.
#[derive(Debug, Clone, PartialEq)]
pub struct Fold<'a> {
    /// The record to write (compare-and-set on the revision read).
    pub job: Job,
    /// Each report's outcome, in order.
    pub outcomes: Vec<(&'a Report, ReportOutcome)>,
    /// What the retry policy did, with the blame left (counted once the
    /// write is durable, like everything below).
    pub fates: Vec<(Fate, Option<Blame>)>,
    /// Failed attempts: blame and detail.
    pub failed: Vec<(Blame, String)>,
    /// Attempts that ended: their end state and duration in seconds.
    pub ended: Vec<(JobState, f64)>,
    /// Classified crashes whose events go out after the write.
    pub crashes: Vec<CrashEvent>,
    /// Reports already applied: their crash events go out again.
    pub duplicates: Vec<&'a Report>,
}

impl Fold<'_> {
    /// Nothing to write: every report was already applied.
    pub fn all_duplicates(&self) -> bool {
        self.outcomes
            .iter()
            .all(|(_, o)| *o == ReportOutcome::Duplicate)
    }
}

fn seconds_since(since: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - since).num_milliseconds().max(0) as f64 / 1000.0
}

/// What `reports` (of one job, in order) do to `job`, given the
/// classification of each crash among them (by index). A crash and what
/// the retry policy makes of it are one write: no restart can leave a
/// crash unanswered.
pub fn fold<'a>(
    job: &Job,
    reports: &[&'a Report],
    classified: &HashMap<usize, Classification>,
    config: &Config,
    now: DateTime<Utc>,
) -> Fold<'a> {
    let mut out = Fold {
        job: job.clone(),
        outcomes: Vec::with_capacity(reports.len()),
        fates: Vec::new(),
        failed: Vec::new(),
        ended: Vec::new(),
        crashes: Vec::new(),
        duplicates: Vec::new(),
    };
    for (i, r) in reports.iter().enumerate() {
        let job = &out.job;
        let (next, outcome) = match decide_with(job, r, classified.get(&i), now) {
            Decision::Duplicate => {
                out.duplicates.push(*r);
                (None, ReportOutcome::Duplicate)
            }
            Decision::Apply(mut next) => {
                let from = job.state;
                if from == JobState::Running && ENDED.contains(&next.state) {
                    if let Some(lease) = &job.lease {
                        out.ended
                            .push((next.state, seconds_since(lease.leased_at, now)));
                    }
                }
                if next.state == JobState::Crashed {
                    let policy = config.retry_policy(&next.task);
                    let resources = job
                        .lease
                        .as_ref()
                        .map(|l| l.resource_names())
                        .unwrap_or_default();
                    let leased_at = job.lease.as_ref().map(|l| l.leased_at);
                    let attempt = next.attempt;
                    if let (Some(blame), Some(detail)) = (next.blame, next.detail.clone()) {
                        out.failed.push((blame, detail));
                    }
                    let fate = retry::after_crash(&mut next, &policy, now);
                    out.fates.push((fate, next.blame));
                    if let Some(c) = classified.get(&i) {
                        out.crashes.push(CrashEvent {
                            classification: c.clone(),
                            attempt,
                            resources,
                            leased_at,
                            state: next.state,
                        });
                    }
                }
                let to = next.state;
                (
                    Some(*next),
                    ReportOutcome::Applied {
                        from,
                        to,
                        lost: None,
                    },
                )
            }
            Decision::Lost(loss) => {
                // Warden stopped the attempt, not the task: the lease is
                // lost with the worker, under the retry policy.
                let policy = config.retry_policy(&job.task);
                let (next, fate) = apply::apply_loss(job, r, loss, &policy, now);
                out.fates.push((fate, next.blame));
                if let (Some(blame), Some(detail)) = (next.blame, next.detail.clone()) {
                    out.failed.push((blame, detail));
                }
                if let Some(lease) = &job.lease {
                    if ENDED.contains(&next.state) {
                        out.ended
                            .push((next.state, seconds_since(lease.leased_at, now)));
                    }
                }
                let outcome = ReportOutcome::Applied {
                    from: job.state,
                    to: next.state,
                    lost: Some(loss),
                };
                (Some(next), outcome)
            }
            Decision::AfterCancel => (
                Some(record_after_cancel(job, r, now)),
                ReportOutcome::AfterCancel,
            ),
            Decision::Reject(reason) => (
                Some(record_rejection(job, r, reason, now)),
                ReportOutcome::Rejected(Rejection::Report(reason)),
            ),
        };
        if let Some(next) = next {
            out.job = next;
        }
        out.outcomes.push((*r, outcome));
    }
    out
}

/// A pull batch grouped by job, jobs in order of first appearance, each
/// job's reports in the order they came.
pub fn group_by_job<T>(items: Vec<(T, Report)>) -> Vec<(uuid::Uuid, Vec<(T, Report)>)> {
    let mut by_job: Vec<(uuid::Uuid, Vec<(T, Report)>)> = Vec::new();
    for (msg, r) in items {
        match by_job.iter_mut().find(|(id, _)| *id == r.job_id) {
            Some((_, list)) => list.push((msg, r)),
            None => by_job.push((r.job_id, vec![(msg, r)])),
        }
    }
    by_job
}
