//! What a batch of reports of one job does: [`fold`] applies them in
//! order to the job record read (the single place a report's fate is
//! decided, on top of [`crate::apply`]), and says what to write, what to
//! count and which crash events to publish once the write is durable.
//! Pure: the consume loop is `loops::reports`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use warden_shared::job::Job;
use warden_shared::lease_secret;
use warden_shared::messages::{Classification, Report, ReportKind};
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
    /// A start applied after its attempt's end ([`Decision::LateStart`]):
    /// nothing to write.
    LateStart,
    /// Not applied, recorded in the history.
    Rejected(Rejection),
}

impl ReportOutcome {
    pub const LABELS: [&'static str; 5] = [
        "applied",
        "duplicate",
        "after_cancel",
        "late_start",
        "rejected",
    ];

    pub fn label(self) -> &'static str {
        match self {
            ReportOutcome::Applied { .. } => "applied",
            ReportOutcome::Duplicate => "duplicate",
            ReportOutcome::AfterCancel => "after_cancel",
            ReportOutcome::LateStart => "late_start",
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

/// Why a report is refused before anything is decided on it: it does not
/// come from the lease holder, or it is out of bounds. Dead-lettered with
/// its [`label`](Self::label) as the reason (and counted in
/// `warden_scheduler_reports_refused_total`); the job is not touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// On a subject that names no bot (the old `warden.report.<job>`, which
    /// any holder of the old shared credentials could publish on).
    NoBotSubject,
    /// The subject's job is not the report's.
    SubjectJob,
    /// The report's `bot_id` is not the bot its subject (credentials) name.
    BotMismatch,
    /// The lease of that attempt is another bot's.
    OtherBot,
    /// The lease has a secret and the report does not carry it.
    Forged,
    /// A Finished report's outcome is longer than [`MAX_OUTCOME`].
    OutcomeTooLong,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::NoBotSubject,
        Refusal::SubjectJob,
        Refusal::BotMismatch,
        Refusal::OtherBot,
        Refusal::Forged,
        Refusal::OutcomeTooLong,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoBotSubject => "report_without_bot",
            Refusal::SubjectJob => "report_subject_mismatch",
            Refusal::BotMismatch => "bot_mismatch",
            Refusal::OtherBot => "report_from_other_bot",
            Refusal::Forged => "forged_report",
            Refusal::OutcomeTooLong => "outcome_too_long",
        }
    }

    /// What the dead letter says.
    pub fn explain(self, r: &Report) -> String {
        match self {
            Refusal::NoBotSubject => format!(
                "report for job {} on a subject without a bot (the old warden.report.<job>): refused",
                r.job_id
            ),
            Refusal::SubjectJob => format!("report for job {} on another job's subject", r.job_id),
            Refusal::BotMismatch => format!(
                "report names bot {:?}, its subject another bot",
                r.bot_id
            ),
            Refusal::OtherBot => format!(
                "report by bot {:?} for attempt {} of job {}, leased to another bot",
                r.bot_id, r.epoch, r.job_id
            ),
            Refusal::Forged => format!(
                "report by bot {:?} for attempt {} of job {} without the lease's secret",
                r.bot_id, r.epoch, r.job_id
            ),
            Refusal::OutcomeTooLong => format!(
                "report for job {}: outcome longer than {MAX_OUTCOME} bytes",
                r.job_id
            ),
        }
    }
}

/// Longest outcome a Finished report may carry (bytes): an outcome is a
/// short token (`passed`, `failed`, ...).
pub const MAX_OUTCOME: usize = 64;
/// Longest fault detail and description, and stop/release reason (bytes);
/// longer ones are cut with [`TRUNCATED`].
pub const MAX_FAULT_TEXT: usize = 4096;
/// Longest crash log tail and status file (bytes); longer ones are cut
/// with [`TRUNCATED`].
pub const MAX_CRASH_TEXT: usize = 65536;
/// What ends a text cut to its bound.
pub const TRUNCATED: &str = "...[truncated by warden]";

/// The report its subject proves: the subject must be
/// `warden.report.<bot>.<job>` of the report's own job and bot
/// ([`warden_shared::subjects::bot_report_subject`]).
pub fn check_subject(subject: &str, r: &Report) -> Result<(), Refusal> {
    use warden_shared::subjects::{bot_of_subject, job_of_report_subject, REPORTS_PREFIX};
    let (Some(bot), Some(job)) = (
        bot_of_subject(REPORTS_PREFIX, subject),
        job_of_report_subject(subject),
    ) else {
        return Err(Refusal::NoBotSubject);
    };
    if job != r.job_id {
        return Err(Refusal::SubjectJob);
    }
    if bot != r.bot_id {
        return Err(Refusal::BotMismatch);
    }
    Ok(())
}

/// Whether `r` may be decided on against `job`: a report about the
/// attempt the lease is for must come from the lease's bot and carry the
/// secret whose hash the lease keeps. A lease written before secrets
/// existed (no hash) is held by its bot alone. A report about another
/// attempt claims nothing the lease holds; the fold rejects it by epoch.
pub fn check_holder(job: &Job, r: &Report) -> Result<(), Refusal> {
    let Some(lease) = job.lease.as_ref().filter(|l| l.epoch == r.epoch) else {
        return Ok(());
    };
    if lease.bot_id != r.bot_id {
        return Err(Refusal::OtherBot);
    }
    match (&lease.secret_hash, &r.secret) {
        (None, _) => Ok(()),
        (Some(h), Some(secret)) if lease_secret::matches(secret, h) => Ok(()),
        (Some(_), _) => Err(Refusal::Forged),
    }
}

fn cut(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max.saturating_sub(TRUNCATED.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(TRUNCATED);
    true
}

/// `r` within its bounds: an outcome over [`MAX_OUTCOME`] is refused;
/// fault and crash text over theirs is cut (with [`TRUNCATED`]). Whether
/// anything was cut.
pub fn bound(r: &mut Report) -> Result<bool, Refusal> {
    Ok(match &mut r.kind {
        ReportKind::Finished { outcome, .. } => {
            if outcome.len() > MAX_OUTCOME {
                return Err(Refusal::OutcomeTooLong);
            }
            false
        }
        ReportKind::Crashed { crash, fault } => {
            let mut cut_any = cut(&mut crash.log_tail, MAX_CRASH_TEXT);
            if let Some(status) = crash.status_file.as_mut() {
                cut_any |= cut(status, MAX_CRASH_TEXT);
            }
            if let Some(f) = fault.as_mut() {
                cut_any |= cut(&mut f.detail, MAX_FAULT_TEXT);
                cut_any |= cut(&mut f.description, MAX_FAULT_TEXT);
            }
            cut_any
        }
        ReportKind::Released { reason } => cut(reason, MAX_FAULT_TEXT),
        ReportKind::Started { resource } => resource
            .as_mut()
            .is_some_and(|res| cut(res, MAX_FAULT_TEXT)),
        ReportKind::Stopped { .. } => false,
    })
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
    /// Nothing to write: every report was already applied (or is a
    /// start whose end was).
    pub fn all_duplicates(&self) -> bool {
        self.outcomes
            .iter()
            .all(|(_, o)| matches!(o, ReportOutcome::Duplicate | ReportOutcome::LateStart))
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
            Decision::LateStart => (None, ReportOutcome::LateStart),
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
            [
                "applied",
                "duplicate",
                "after_cancel",
                "late_start",
                "rejected"
            ]
        );
        assert_eq!(Rejection::UnknownJob.label(), "unknown_job");
        assert_eq!(Rejection::CorruptJob.label(), "corrupt_job");
    }

    #[test]
    fn a_report_is_only_its_subjects_bots_and_jobs() {
        use warden_shared::subjects::{bot_report_subject, report_subject};
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", finished());
        assert_eq!(
            check_subject(&bot_report_subject("bot", &job.id), &r),
            Ok(())
        );
        assert_eq!(
            check_subject(&report_subject(&job.id), &r),
            Err(Refusal::NoBotSubject)
        );
        assert_eq!(
            check_subject(&bot_report_subject("attacker", &job.id), &r),
            Err(Refusal::BotMismatch)
        );
        assert_eq!(
            check_subject(&bot_report_subject("bot", &uuid::Uuid::from_u128(1)), &r),
            Err(Refusal::SubjectJob)
        );
    }

    #[test]
    fn only_the_lease_holder_with_its_secret_is_heard() {
        let mut job = running(1, "s1");
        let secret = lease_secret::generate();
        if let Some(l) = job.lease.as_mut() {
            l.secret_hash = Some(lease_secret::hash(&secret));
        }
        let mut r = report(&job, 1, "s1", finished());
        // The victim's session and epoch are not enough.
        assert_eq!(check_holder(&job, &r), Err(Refusal::Forged));
        r.secret = Some(lease_secret::generate());
        assert_eq!(check_holder(&job, &r), Err(Refusal::Forged));
        // The lease's hash is not its secret.
        r.secret = job.lease.as_ref().and_then(|l| l.secret_hash.clone());
        assert_eq!(check_holder(&job, &r), Err(Refusal::Forged));
        r.secret = Some(secret.clone());
        assert_eq!(check_holder(&job, &r), Ok(()));
        // Even with the secret, another bot's report is not the holder's.
        r.bot_id = "attacker".into();
        assert_eq!(check_holder(&job, &r), Err(Refusal::OtherBot));
        // Another attempt's report claims nothing: the fold decides.
        let stale = report(&job, 0, "s0", finished());
        assert_eq!(check_holder(&job, &stale), Ok(()));
    }

    #[test]
    fn a_lease_from_before_secrets_is_held_by_its_bot_alone() {
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", finished());
        assert_eq!(check_holder(&job, &r), Ok(()));
        let mut other = r.clone();
        other.bot_id = "attacker".into();
        assert_eq!(check_holder(&job, &other), Err(Refusal::OtherBot));
    }

    #[test]
    fn outcomes_are_short_tokens_and_fault_text_is_cut() {
        let job = running(1, "s1");
        let mut r = report(
            &job,
            1,
            "s1",
            ReportKind::Finished {
                outcome: "x".repeat(MAX_OUTCOME + 1),
                duration_ms: 1,
            },
        );
        assert_eq!(bound(&mut r), Err(Refusal::OutcomeTooLong));
        let mut ok = report(&job, 1, "s1", finished());
        assert_eq!(bound(&mut ok), Ok(false));
        let mut c = report(
            &job,
            1,
            "s1",
            ReportKind::Crashed {
                crash: warden_shared::job::CrashInfo {
                    log_tail: "é".repeat(MAX_CRASH_TEXT),
                    ..Default::default()
                },
                fault: Some(warden_shared::messages::Fault {
                    blame: Blame::Task,
                    detail: "d".into(),
                    description: "y".repeat(MAX_FAULT_TEXT * 2),
                }),
            },
        );
        assert_eq!(bound(&mut c), Ok(true));
        let ReportKind::Crashed { crash, fault } = &c.kind else {
            panic!("kind changed")
        };
        assert!(crash.log_tail.len() <= MAX_CRASH_TEXT && crash.log_tail.ends_with(TRUNCATED));
        let f = fault.as_ref().expect("fault kept");
        assert_eq!(f.detail, "d");
        assert!(f.description.len() <= MAX_FAULT_TEXT && f.description.ends_with(TRUNCATED));
        let labels: Vec<&str> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "report_without_bot",
                "report_subject_mismatch",
                "bot_mismatch",
                "report_from_other_bot",
                "forged_report",
                "outcome_too_long"
            ]
        );
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
