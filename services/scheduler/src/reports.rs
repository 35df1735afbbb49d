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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, classification, crashed, finished, report, running};
    use warden_shared::messages::{ReportKind, StopReason};

    fn config() -> Config {
        Config::defaults()
    }

    #[test]
    fn a_finish_is_applied_and_its_duration_counted() {
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", finished());
        let f = fold(&job, &[&r], &HashMap::new(), &config(), at(3));
        assert_eq!(f.job.state, JobState::Finished);
        assert_eq!(
            f.outcomes[0].1,
            ReportOutcome::Applied {
                from: JobState::Running,
                to: JobState::Finished,
                lost: None
            }
        );
        assert_eq!(f.ended, vec![(JobState::Finished, 3.0)]);
        assert!(f.fates.is_empty() && f.crashes.is_empty() && !f.all_duplicates());
    }

    #[test]
    fn a_classified_crash_is_retried_in_the_same_write_and_its_events_go_out() {
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", crashed());
        let classified = HashMap::from([(0, classification(Blame::ThirdParty, "network"))]);
        let f = fold(&job, &[&r], &classified, &config(), at(2));
        // third_party/* is retryable by default: back to SCHEDULED, later.
        assert_eq!(f.job.state, JobState::Scheduled);
        assert_eq!(f.fates, vec![(Fate::Retried, Some(Blame::ThirdParty))]);
        assert_eq!(f.failed, vec![(Blame::ThirdParty, "network".to_string())]);
        assert_eq!(f.ended, vec![(JobState::Crashed, 2.0)]);
        assert_eq!(f.crashes.len(), 1);
        let e = &f.crashes[0];
        assert_eq!((e.attempt, e.state), (1, JobState::Scheduled));
        assert_eq!(
            (e.resources.clone(), e.leased_at),
            (vec!["r1".to_string()], Some(at(0)))
        );
        assert_eq!(
            f.outcomes[0].1,
            ReportOutcome::Applied {
                from: JobState::Running,
                // The transition counted is to where the policy put it.
                to: JobState::Scheduled,
                lost: None
            }
        );
    }

    #[test]
    fn a_task_crash_is_kept_crashed_and_unclassified_has_no_events() {
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", crashed());
        let f = fold(&job, &[&r], &HashMap::new(), &config(), at(2));
        assert_eq!(f.job.state, JobState::Crashed);
        assert_eq!(f.fates, vec![(Fate::Kept, Some(Blame::Unknown))]);
        assert!(f.crashes.is_empty());
    }

    #[test]
    fn a_redelivered_report_is_a_duplicate_with_nothing_to_write() {
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", finished());
        let first = fold(&job, &[&r], &HashMap::new(), &config(), at(3));
        let again = fold(&first.job, &[&r], &HashMap::new(), &config(), at(4));
        assert!(again.all_duplicates());
        assert_eq!(again.duplicates.len(), 1);
        assert_eq!(again.job, first.job);
        assert_eq!(ReportOutcome::Duplicate.label(), "duplicate");
    }

    #[test]
    fn reports_of_one_job_fold_in_order_into_one_record() {
        let job = running(1, "s1");
        let started = report(
            &job,
            1,
            "s1",
            ReportKind::Started {
                resource: Some("r1".into()),
            },
        );
        let done = report(&job, 1, "s1", finished());
        let stale = report(&job, 0, "s0", finished());
        let f = fold(
            &job,
            &[&started, &done, &stale],
            &HashMap::new(),
            &config(),
            at(5),
        );
        assert_eq!(f.job.state, JobState::Finished);
        let labels: Vec<&str> = f.outcomes.iter().map(|(_, o)| o.label()).collect();
        assert_eq!(labels, ["applied", "applied", "rejected"]);
        assert_eq!(
            f.outcomes[2].1,
            ReportOutcome::Rejected(Rejection::Report(RejectReason::StaleEpoch))
        );
        assert_eq!(
            Rejection::Report(RejectReason::StaleEpoch).label(),
            "stale_epoch"
        );
        // The rejection is recorded in the history.
        assert_eq!(
            f.job.history.last().map(|e| e.action),
            Some(warden_shared::Action::RejectReport)
        );
    }

    #[test]
    fn a_worker_that_stopped_its_attempt_loses_the_lease_under_the_policy() {
        let job = running(1, "s1");
        let r = report(
            &job,
            1,
            "s1",
            ReportKind::Stopped {
                reason: StopReason::SelfFenced,
            },
        );
        let f = fold(&job, &[&r], &HashMap::new(), &config(), at(5));
        let ReportOutcome::Applied { from, to, lost } = f.outcomes[0].1 else {
            panic!("not applied: {:?}", f.outcomes[0].1)
        };
        assert_eq!((from, lost), (JobState::Running, Some(Loss::SelfFenced)));
        assert_eq!(to, f.job.state);
        assert_eq!(f.fates.len(), 1);
    }

    #[test]
    fn a_report_after_cancel_is_expected_and_recorded() {
        let mut job = running(1, "s1");
        job.state = JobState::Cancelled;
        let r = report(&job, 1, "s1", finished());
        let f = fold(&job, &[&r], &HashMap::new(), &config(), at(5));
        assert_eq!(f.outcomes[0].1, ReportOutcome::AfterCancel);
        assert_eq!(f.outcomes[0].1.label(), "after_cancel");
        assert_eq!(f.job.history.len(), job.history.len() + 1);
    }

    #[test]
    fn outcome_and_rejection_labels_are_the_exported_ones() {
        assert_eq!(
            ReportOutcome::LABELS,
            ["applied", "duplicate", "after_cancel", "rejected"]
        );
        assert_eq!(Rejection::UnknownJob.label(), "unknown_job");
        assert_eq!(Rejection::CorruptJob.label(), "corrupt_job");
    }

    #[test]
    fn a_batch_is_grouped_by_job_in_order() {
        let a = running(1, "s1");
        let mut b = running(1, "s1");
        b.id = uuid::Uuid::from_u128(99);
        let items = vec![
            (1, report(&a, 1, "s1", finished())),
            (2, report(&b, 1, "s1", finished())),
            (3, report(&a, 1, "s1", crashed())),
        ];
        // The reports loop groups with warden_shared::consume::group_by,
        // keyed by job.
        let groups = warden_shared::consume::group_by(
            items.into_iter().map(|(n, r)| (r.job_id, (n, r))).collect(),
        );
        let shape: Vec<(uuid::Uuid, Vec<i32>)> = groups
            .into_iter()
            .map(|(id, list)| (id, list.into_iter().map(|(n, _)| n).collect()))
            .collect();
        assert_eq!(shape, vec![(a.id, vec![1, 3]), (b.id, vec![2])]);
    }
}
