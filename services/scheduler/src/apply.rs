//! What a worker report does to a job: a pure decision, so every rule of
//! fencing and the state machine is tested without a bus.

use chrono::{DateTime, Utc};
use warden_shared::job::{Blame, CrashInfo, HistoryEntry, Job};
use warden_shared::messages::{Classification, Fault, Report, ReportKind, StopReason};
use warden_shared::retry::{self, Fate, Loss, RetryPolicy};
use warden_shared::state::{transition, Action};
use warden_shared::JobState;

/// Longest log tail kept on the job record (the worker bounds it too; this
/// keeps a misbehaving worker from bloating the record).
pub const MAX_LOG_TAIL: usize = 16 * 1024;
pub const MAX_STATUS_FILE: usize = 16 * 1024;

/// Why a report was not applied. Stable codes: metrics labels and history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The report names an older (or future) attempt than the current one.
    StaleEpoch,
    /// The attempt is current but leased to another session.
    WrongSession,
    /// The job's state does not allow this report (e.g. FINISHED already).
    IllegalTransition,
    /// The attempt is current but its lease was taken back (the worker was
    /// declared lost and the job requeued or shelved): a zombie reports.
    LeaseLost,
}

impl RejectReason {
    pub const ALL: [RejectReason; 4] = [
        RejectReason::StaleEpoch,
        RejectReason::WrongSession,
        RejectReason::IllegalTransition,
        RejectReason::LeaseLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::StaleEpoch => "stale_epoch",
            RejectReason::WrongSession => "wrong_session",
            RejectReason::IllegalTransition => "illegal_transition",
            RejectReason::LeaseLost => "lease_lost",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write this job (compare-and-set on the revision read).
    Apply(Box<Job>),
    /// Already applied (a redelivered report): nothing to write.
    Duplicate,
    /// Not applied; record it in the history with this reason.
    Reject(RejectReason),
    /// The cancelled attempt's own worker reporting how the stopped task
    /// ended: expected, recorded in the history, not a rejection.
    AfterCancel,
    /// The worker stopped the current attempt itself (it lost the bus, or
    /// its session was rejected): the lease is lost with the worker, under
    /// the retry policy ([`apply_loss`]).
    Lost(Loss),
    /// A start report of an attempt whose end, reported by the same
    /// session, is already applied: the two were pulled by different
    /// scheduler replicas and the end was written first. Nothing to write
    /// (the attempt is over; its record lacks only the start's time), and
    /// not a rejection.
    LateStart,
}

fn truncate_tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

fn bounded(mut crash: CrashInfo) -> CrashInfo {
    crash.log_tail = truncate_tail(&crash.log_tail, MAX_LOG_TAIL);
    crash.status_file = crash
        .status_file
        .map(|s| truncate_tail(&s, MAX_STATUS_FILE));
    crash
}

/// Was this report already applied to `job`? Judged from the history, as
/// the state may have moved on since (a crash already retried by policy).
fn already_applied(job: &Job, r: &Report) -> bool {
    // What applying it wrote: a stopped attempt's loss is the retry
    // policy's answer (requeue, shelve, or crash) written as the session's.
    let actions: &[Action] = match &r.kind {
        ReportKind::Started { .. } => &[Action::Start],
        ReportKind::Finished { .. } => &[Action::Finish],
        ReportKind::Crashed { .. } => &[Action::Crash],
        ReportKind::Released { .. } => &[Action::Requeue],
        ReportKind::Stopped { .. } => &[Action::Requeue, Action::Shelve, Action::Crash],
    };
    // A release the scheduler beat to it (the session closed first).
    if matches!(
        r.kind,
        ReportKind::Released { .. }
            | ReportKind::Stopped {
                reason: StopReason::Shutdown
            }
    ) && job.lease.is_none()
        && job.attempt == r.epoch
        && job.state == JobState::Scheduled
    {
        return true;
    }
    job.history.iter().rev().any(|e| {
        e.attempt == r.epoch
            && e.actor == r.session
            && (actions.contains(&e.action)
                || (e.action == Action::RejectReport
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.starts_with(&after_cancel_prefix(r)))))
    })
}

/// Is `r` a start report of an attempt whose session already reported
/// its end (finished, crashed, handed back or stopped: an entry of that
/// session for that attempt)? Reports of one job are pulled by whichever
/// replica asks first, so a start can be applied after its end. Judged
/// from the history, so it holds once the job has moved on (a crash
/// retried and leased again).
fn started_after_its_end(job: &Job, r: &Report) -> bool {
    const ENDS: [Action; 4] = [
        Action::Finish,
        Action::Crash,
        Action::Requeue,
        Action::Shelve,
    ];
    matches!(r.kind, ReportKind::Started { .. })
        && job
            .history
            .iter()
            .rev()
            .any(|e| e.attempt == r.epoch && e.actor == r.session && ENDS.contains(&e.action))
}

fn after_cancel_prefix(r: &Report) -> String {
    format!("{} report after cancel", r.kind.name())
}

/// The crash `r` reported, when it is the one already recorded on `job`
/// for its attempt (a redelivered crash report): its events (notify,
/// suspect) are published again, since the first try may have failed.
pub fn applied_crash<'a>(job: &'a Job, r: &Report) -> Option<&'a CrashInfo> {
    if !matches!(r.kind, ReportKind::Crashed { .. }) || job.attempt != r.epoch {
        return None;
    }
    let recorded = job
        .history
        .iter()
        .any(|e| e.attempt == r.epoch && e.actor == r.session && e.action == Action::Crash);
    recorded.then_some(job.crash.as_ref()).flatten()
}

/// When the attempt `epoch` of `job` was leased, from its history.
pub fn leased_at(job: &Job, epoch: u32) -> Option<DateTime<Utc>> {
    job.history
        .iter()
        .find(|e| e.attempt == epoch && e.action == Action::Dispatch)
        .map(|e| e.at)
}

/// [`decide_with`] without a classification (the task's own fault, else
/// `unknown/unclassified`).
pub fn decide(job: &Job, r: &Report, now: DateTime<Utc>) -> Decision {
    decide_with(job, r, None, now)
}

/// Would this report record a crash on `job` (so it needs classifying)?
pub fn crash_to_classify(job: &Job, r: &Report) -> bool {
    matches!(r.kind, ReportKind::Crashed { .. })
        && job.state == JobState::Running
        && r.epoch == job.attempt
        && job.lease.as_ref().is_some_and(|l| l.session == r.session)
        && !already_applied(job, r)
}

/// What `r` does to `job`; a crash takes its blame, detail and
/// description from `classification` when there is one.
/// A deliberately broken build (`--features chaos-skip-fencing-check`) that
/// applies reports without checking their epoch and session, so the
/// chaos run can show that its checker catches a stale report that wins.
/// Never on in a real build.
const SKIP_FENCING_CHECK: bool = cfg!(feature = "chaos-skip-fencing-check");

pub fn decide_with(
    job: &Job,
    r: &Report,
    classification: Option<&Classification>,
    now: DateTime<Utc>,
) -> Decision {
    if already_applied(job, r) {
        return Decision::Duplicate;
    }
    if started_after_its_end(job, r) {
        return Decision::LateStart;
    }
    if r.epoch != job.attempt && !SKIP_FENCING_CHECK {
        return Decision::Reject(RejectReason::StaleEpoch);
    }
    let Some(lease) = job.lease.as_ref() else {
        return Decision::Reject(match job.state {
            JobState::Scheduled | JobState::Shelved | JobState::Crashed => RejectReason::LeaseLost,
            _ => RejectReason::IllegalTransition,
        });
    };
    if job.state == JobState::Cancelled && lease.session == r.session {
        return Decision::AfterCancel;
    }
    if lease.session != r.session && !SKIP_FENCING_CHECK {
        return Decision::Reject(RejectReason::WrongSession);
    }
    let action = match &r.kind {
        ReportKind::Started { .. } => Action::Start,
        ReportKind::Finished { .. } => Action::Finish,
        ReportKind::Crashed { .. } => Action::Crash,
        ReportKind::Released { .. } => Action::Requeue,
        ReportKind::Stopped { reason } => match stop_loss(*reason) {
            Some(loss) => {
                return match transition(job.state, Action::Requeue) {
                    Ok(_) => Decision::Lost(loss),
                    Err(_) => Decision::Reject(RejectReason::IllegalTransition),
                }
            }
            None => Action::Requeue,
        },
    };
    let to = match transition(job.state, action) {
        Ok(to) => to,
        Err(_) => return Decision::Reject(RejectReason::IllegalTransition),
    };
    let mut next = job.clone();
    let from = next.state;
    next.state = to;
    next.updated_at = now;
    let mut note = None;
    match &r.kind {
        ReportKind::Started { resource } => {
            if let Some(l) = next.lease.as_mut() {
                l.started_at = Some(r.at);
                if resource.is_some() {
                    l.resource = resource.clone();
                }
            }
        }
        ReportKind::Finished {
            outcome,
            duration_ms,
        } => {
            next.outcome = Some(outcome.clone());
            note = Some(format!("outcome {outcome} after {duration_ms} ms"));
        }
        ReportKind::Crashed { crash, fault } => {
            // The classifier's word; without it, the task's own fault
            // (status file) as said, anything else unknown.
            let (blame, detail, description, rule) = match (classification, fault) {
                (Some(c), _) => (
                    c.blame,
                    c.detail.clone(),
                    c.description.clone(),
                    Some(c.rule.as_str()),
                ),
                (None, fault) => {
                    let (blame, detail, description) = unclassified(crash, fault.as_ref());
                    (blame, detail, description, None)
                }
            };
            note = Some(match rule {
                Some(rule) => format!("{blame}/{detail} (rule {rule}): {description}"),
                None => format!("{blame}/{detail}: {description}"),
            });
            next.blame = Some(blame);
            next.detail = Some(detail);
            next.description = Some(description);
            let mut crash = bounded(crash.clone());
            crash.resources = job
                .lease
                .as_ref()
                .map(|l| l.resource_names())
                .unwrap_or_default();
            next.crash = Some(crash);
        }
        // Handed back (shutdown, or a cancel word for an attempt still
        // ours): costing nothing, so the attempt does not count against
        // the job's budget.
        ReportKind::Released { reason } => {
            next.lease = None;
            next.queued_at = now;
            next.budget_from = next.budget_from.saturating_add(1);
            note = Some(format!("released by worker: {reason}; attempt not counted"));
        }
        ReportKind::Stopped { reason } => {
            next.lease = None;
            next.queued_at = now;
            next.budget_from = next.budget_from.saturating_add(1);
            note = Some(format!(
                "stopped by worker: {reason}; requeued, attempt not counted"
            ));
        }
    }
    next.push_history(HistoryEntry {
        at: now,
        action,
        attempt: r.epoch,
        from: Some(from),
        to: Some(to),
        actor: r.session.clone(),
        bot_id: Some(r.bot_id.clone()),
        resource: job.lease.as_ref().and_then(|l| l.resource.clone()),
        note,
    });
    Decision::Apply(Box::new(next))
}

/// The loss a worker's own stop of the current attempt stands for; `None`
/// when the attempt is simply handed back (shutdown, or a cancel word for
/// an attempt that is still this session's).
pub fn stop_loss(reason: StopReason) -> Option<Loss> {
    match reason {
        StopReason::SelfFenced => Some(Loss::SelfFenced),
        StopReason::Superseded => Some(Loss::SessionSuperseded),
        StopReason::UnknownSession => Some(Loss::WorkerLost),
        StopReason::Cancelled | StopReason::Shutdown => None,
    }
}

/// The job after a [`Decision::Lost`]: the retry policy's answer to the
/// lost attempt (`system/worker_lost`, retried after the delay, shelved,
/// or poison), recorded as the reporting session's, so a redelivered
/// report is a duplicate.
pub fn apply_loss(
    job: &Job,
    r: &Report,
    loss: Loss,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> (Job, Fate) {
    let mut next = job.clone();
    let words = match &r.kind {
        ReportKind::Stopped { reason } => {
            format!("session {} stopped the attempt ({reason})", r.session)
        }
        _ => format!("session {} lost the attempt", r.session),
    };
    let fate = retry::after_loss(&mut next, policy, loss, &words, now);
    // The policy's entry for this loss (it writes one, just now).
    if let Some(last) = next
        .history
        .last_mut()
        .filter(|e| e.at == now && e.attempt == r.epoch && e.actor == retry::ACTOR)
    {
        last.actor = r.session.clone();
        last.bot_id = Some(r.bot_id.clone());
    }
    next.updated_at = now;
    (next, fate)
}

/// Blame, detail and description of a crash nobody classified: the task's
/// own fault (status file) as said, anything else `unknown/unclassified`.
pub fn unclassified(crash: &CrashInfo, fault: Option<&Fault>) -> (Blame, String, String) {
    match fault {
        Some(f) => (f.blame, f.detail.clone(), f.description.clone()),
        None => (Blame::Unknown, "unclassified".to_string(), describe(crash)),
    }
}

/// A crash in words when nobody explained it.
pub fn describe(c: &CrashInfo) -> String {
    match (c.exit_code, c.signal) {
        (_, Some(sig)) => format!("killed by signal {sig} after {} ms", c.duration_ms),
        (Some(code), None) => format!("exited with code {code} after {} ms", c.duration_ms),
        (None, None) => "crashed without an exit status".to_string(),
    }
}

/// The job with the cancelled attempt's late report recorded.
pub fn record_after_cancel(job: &Job, r: &Report, now: DateTime<Utc>) -> Job {
    let how = match &r.kind {
        ReportKind::Finished { outcome, .. } => format!("outcome {outcome}"),
        ReportKind::Crashed { crash, .. } => describe(crash),
        ReportKind::Started { .. } => "started".into(),
        ReportKind::Released { reason } => format!("released: {reason}"),
        ReportKind::Stopped { reason } => format!("stopped: {reason}"),
    };
    let note = format!("{}: {how}", after_cancel_prefix(r));
    with_report_noted(job, r, note, now)
}

/// The job with a report that changes nothing recorded in its history
/// (`reject_report`, attempt and session of the report).
fn with_report_noted(job: &Job, r: &Report, note: String, now: DateTime<Utc>) -> Job {
    let mut next = job.clone();
    next.push_history(HistoryEntry {
        at: now,
        action: Action::RejectReport,
        attempt: r.epoch,
        from: None,
        to: None,
        actor: r.session.clone(),
        bot_id: Some(r.bot_id.clone()),
        resource: None,
        note: Some(note),
    });
    next.updated_at = now;
    next
}

/// The job with a rejected report recorded (no state change).
pub fn record_rejection(job: &Job, r: &Report, reason: RejectReason, now: DateTime<Utc>) -> Job {
    let note = format!(
        "{} report rejected: {} (current attempt {}, report for attempt {})",
        r.kind.name(),
        reason.as_str(),
        job.attempt,
        r.epoch
    );
    with_report_noted(job, r, note, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_shared::job::Lease;
    use warden_shared::messages::Fault;

    fn running(epoch: u32, session: &str) -> Job {
        let now = Utc::now();
        let mut j = Job::builder("t").pool("p").at(now).build();
        j.state = JobState::Running;
        j.attempt = epoch;
        j.lease = Some(Lease {
            session: session.into(),
            bot_id: "bot".into(),
            resource: None,
            resources: Vec::new(),
            epoch,
            leased_at: now,
            started_at: None,
            secret_hash: None,
        });
        j
    }

    fn report(job: &Job, epoch: u32, session: &str, kind: ReportKind) -> Report {
        Report {
            version: 1,
            job_id: job.id,
            session: session.into(),
            bot_id: "bot".into(),
            epoch,
            at: Utc::now(),
            secret: None,
            kind,
        }
    }

    fn finished() -> ReportKind {
        ReportKind::Finished {
            outcome: "passed".into(),
            duration_ms: 5,
        }
    }

    #[test]
    fn current_finish_is_applied_with_history() {
        let j = running(2, "s1");
        let Decision::Apply(next) = decide(&j, &report(&j, 2, "s1", finished()), Utc::now()) else {
            panic!("not applied")
        };
        assert_eq!(next.state, JobState::Finished);
        assert_eq!(next.outcome.as_deref(), Some("passed"));
        let last = next.history.last().expect("history");
        assert_eq!(
            (last.action, last.attempt, last.to),
            (Action::Finish, 2, Some(JobState::Finished))
        );
    }

    #[test]
    fn stale_epoch_and_wrong_session_are_rejected() {
        let j = running(3, "s2");
        assert_eq!(
            decide(&j, &report(&j, 2, "s1", finished()), Utc::now()),
            Decision::Reject(RejectReason::StaleEpoch)
        );
        assert_eq!(
            decide(&j, &report(&j, 3, "s1", finished()), Utc::now()),
            Decision::Reject(RejectReason::WrongSession)
        );
    }

    #[test]
    fn reports_for_finished_jobs_are_duplicates_or_rejected() {
        let j = running(1, "s1");
        let Decision::Apply(done) = decide(&j, &report(&j, 1, "s1", finished()), Utc::now()) else {
            panic!()
        };
        // Redelivery of the same report: nothing to do.
        assert_eq!(
            decide(&done, &report(&done, 1, "s1", finished()), Utc::now()),
            Decision::Duplicate
        );
        // A crash report for the finished attempt is an illegal transition.
        let crash = ReportKind::Crashed {
            crash: CrashInfo::default(),
            fault: None,
        };
        assert_eq!(
            decide(&done, &report(&done, 1, "s1", crash), Utc::now()),
            Decision::Reject(RejectReason::IllegalTransition)
        );
    }

    #[test]
    fn a_start_applied_after_its_end_is_late_not_rejected() {
        let j = running(1, "s1");
        let started = |j: &Job| report(j, 1, "s1", ReportKind::Started { resource: None });
        // The end overtook the start (two replicas): the start is late,
        // whether the attempt finished or crashed and was leased again.
        let Decision::Apply(done) = decide(&j, &report(&j, 1, "s1", finished()), Utc::now()) else {
            panic!()
        };
        assert_eq!(
            decide(&done, &started(&done), Utc::now()),
            Decision::LateStart
        );
        let crash = ReportKind::Crashed {
            crash: CrashInfo::default(),
            fault: None,
        };
        let Decision::Apply(mut crashed) = decide(&j, &report(&j, 1, "s1", crash), Utc::now())
        else {
            panic!()
        };
        crashed.attempt = 2;
        crashed.state = JobState::Running;
        assert_eq!(
            decide(&crashed, &started(&crashed), Utc::now()),
            Decision::LateStart
        );
        // Another session's start of that attempt is still refused, and a
        // start before any end is applied.
        let other = report(&done, 1, "s2", ReportKind::Started { resource: None });
        assert!(matches!(
            decide(&done, &other, Utc::now()),
            Decision::Reject(_)
        ));
        assert!(matches!(
            decide(&j, &started(&j), Utc::now()),
            Decision::Apply(_)
        ));
    }

    #[test]
    fn crash_without_fault_is_unclassified_and_fault_is_taken() {
        let j = running(1, "s1");
        let crash = CrashInfo {
            exit_code: Some(3),
            log_tail: "x".repeat(MAX_LOG_TAIL + 10),
            ..Default::default()
        };
        let Decision::Apply(n) = decide(
            &j,
            &report(
                &j,
                1,
                "s1",
                ReportKind::Crashed {
                    crash: crash.clone(),
                    fault: None,
                },
            ),
            Utc::now(),
        ) else {
            panic!()
        };
        assert_eq!(
            (n.state, n.blame, n.detail.as_deref()),
            (
                JobState::Crashed,
                Some(Blame::Unknown),
                Some("unclassified")
            )
        );
        assert_eq!(
            n.crash.as_ref().map(|c| c.log_tail.len()),
            Some(MAX_LOG_TAIL)
        );
        let fault = Fault {
            blame: Blame::ThirdParty,
            detail: "network".into(),
            description: "koji down".into(),
        };
        let Decision::Apply(n) = decide(
            &j,
            &report(
                &j,
                1,
                "s1",
                ReportKind::Crashed {
                    crash,
                    fault: Some(fault),
                },
            ),
            Utc::now(),
        ) else {
            panic!()
        };
        assert_eq!(
            (n.blame, n.detail.as_deref()),
            (Some(Blame::ThirdParty), Some("network"))
        );
    }

    #[test]
    fn started_is_applied_once() {
        let j = running(1, "s1");
        let r = report(
            &j,
            1,
            "s1",
            ReportKind::Started {
                resource: Some("host-a".into()),
            },
        );
        let Decision::Apply(n) = decide(&j, &r, Utc::now()) else {
            panic!()
        };
        assert_eq!(n.state, JobState::Running);
        assert_eq!(
            n.lease.as_ref().and_then(|l| l.resource.as_deref()),
            Some("host-a")
        );
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
    }

    #[test]
    fn release_requeues_without_lease() {
        let j = running(1, "s1");
        let r = report(
            &j,
            1,
            "s1",
            ReportKind::Released {
                reason: "worker_shutdown".into(),
            },
        );
        let Decision::Apply(n) = decide(&j, &r, Utc::now()) else {
            panic!()
        };
        assert_eq!(
            (n.state, n.lease.is_none(), n.attempt),
            (JobState::Scheduled, true, 1)
        );
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
    }

    fn crash_report(job: &Job, epoch: u32, session: &str) -> Report {
        report(
            job,
            epoch,
            session,
            ReportKind::Crashed {
                crash: CrashInfo::default(),
                fault: Some(Fault {
                    blame: Blame::ThirdParty,
                    detail: "network".into(),
                    description: "mirror down".into(),
                }),
            },
        )
    }

    #[test]
    fn redelivered_crash_after_a_policy_retry_is_a_duplicate() {
        let j = running(1, "s1");
        let r = crash_report(&j, 1, "s1");
        let Decision::Apply(mut n) = decide(&j, &r, Utc::now()) else {
            panic!()
        };
        // The retry policy moved it on in the same write.
        n.state = JobState::Scheduled;
        n.lease = None;
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
    }

    #[test]
    fn a_redelivered_crash_names_the_recorded_crash_and_its_resources() {
        let mut j = running(1, "s1");
        if let Some(l) = j.lease.as_mut() {
            l.resources = vec!["host-a".into(), "wc-a".into()];
        }
        let r = crash_report(&j, 1, "s1");
        assert!(applied_crash(&j, &r).is_none(), "not recorded yet");
        let Decision::Apply(mut n) = decide(&j, &r, Utc::now()) else {
            panic!()
        };
        // The retry policy moved it on and dropped the lease.
        n.state = JobState::Scheduled;
        n.lease = None;
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
        let crash = applied_crash(&n, &r).expect("the recorded crash");
        assert_eq!(crash.resources, vec!["host-a", "wc-a"]);
        // Another session's, or a finish, is not it.
        assert!(applied_crash(&n, &crash_report(&n, 1, "s9")).is_none());
        assert!(applied_crash(&n, &report(&n, 1, "s1", finished())).is_none());
    }

    #[test]
    fn zombie_report_after_its_lease_was_taken_back_is_lease_lost() {
        let mut j = running(1, "s1");
        j.state = JobState::Scheduled;
        j.lease = None;
        assert_eq!(
            decide(&j, &report(&j, 1, "s1", finished()), Utc::now()),
            Decision::Reject(RejectReason::LeaseLost)
        );
    }

    #[test]
    fn cancelled_attempts_report_is_recorded_once_and_not_a_rejection() {
        let mut j = running(1, "s1");
        j.cancel_by("api", None, Utc::now()).expect("cancel");
        let r = crash_report(&j, 1, "s1");
        assert_eq!(decide(&j, &r, Utc::now()), Decision::AfterCancel);
        let n = record_after_cancel(&j, &r, Utc::now());
        assert_eq!(n.state, JobState::Cancelled);
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
        // Another session's report for it is still a rejection.
        assert_eq!(
            decide(&n, &crash_report(&n, 1, "s9"), Utc::now()),
            Decision::Reject(RejectReason::WrongSession)
        );
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retryable: vec!["system/worker_lost".into()],
            max_attempts: 3,
            initial_delay: std::time::Duration::from_secs(10),
            backoff: 2.0,
            max_delay: std::time::Duration::from_secs(60),
            jitter: 0.0,
            poison_limit: 2,
        }
    }

    fn stopped(job: &Job, epoch: u32, session: &str, reason: StopReason) -> Report {
        report(job, epoch, session, ReportKind::Stopped { reason })
    }

    #[test]
    fn self_fenced_stop_is_a_lost_worker_not_the_tasks_crash() {
        for (reason, loss) in [
            (StopReason::SelfFenced, Loss::SelfFenced),
            (StopReason::Superseded, Loss::SessionSuperseded),
            (StopReason::UnknownSession, Loss::WorkerLost),
        ] {
            let j = running(1, "s1");
            let r = stopped(&j, 1, "s1", reason);
            assert_eq!(decide(&j, &r, Utc::now()), Decision::Lost(loss), "{reason}");
            let now = Utc::now();
            let (n, fate) = apply_loss(&j, &r, loss, &policy(), now);
            assert_eq!(fate, Fate::Retried, "{reason}");
            assert_eq!(
                (n.state, n.blame, n.detail.as_deref(), n.lease.is_none()),
                (
                    JobState::Scheduled,
                    Some(Blame::System),
                    Some("worker_lost"),
                    true
                ),
                "{reason}"
            );
            assert!(n.not_before.is_some_and(|t| t > now), "{reason}: delayed");
            assert_eq!(n.lost_workers, vec!["bot".to_string()]);
            let last = n.history.last().expect("entry");
            assert_eq!((last.action, last.actor.as_str()), (Action::Requeue, "s1"));
            // Redelivered: already applied.
            assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate, "{reason}");
        }
    }

    #[test]
    fn stopped_attempt_with_its_budget_spent_is_shelved() {
        let j = running(3, "s1");
        let r = stopped(&j, 3, "s1", StopReason::SelfFenced);
        let Decision::Lost(loss) = decide(&j, &r, Utc::now()) else {
            panic!("not a loss")
        };
        let (n, fate) = apply_loss(&j, &r, loss, &policy(), Utc::now());
        assert_eq!(
            (fate, n.state),
            (Fate::ShelvedRetriesExhausted, JobState::Shelved)
        );
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
    }

    #[test]
    fn stale_stop_is_rejected_like_any_stale_report() {
        let j = running(2, "s2");
        assert_eq!(
            decide(
                &j,
                &stopped(&j, 1, "s1", StopReason::SelfFenced),
                Utc::now()
            ),
            Decision::Reject(RejectReason::StaleEpoch)
        );
        assert_eq!(
            decide(
                &j,
                &stopped(&j, 2, "s1", StopReason::SelfFenced),
                Utc::now()
            ),
            Decision::Reject(RejectReason::WrongSession)
        );
        // Its lease already taken back (the session expired first).
        let mut gone = running(2, "s2");
        gone.state = JobState::Scheduled;
        gone.lease = None;
        assert_eq!(
            decide(
                &gone,
                &stopped(&gone, 2, "s2", StopReason::SelfFenced),
                Utc::now()
            ),
            Decision::Reject(RejectReason::LeaseLost)
        );
    }

    #[test]
    fn cancelled_stop_is_recorded_as_the_cancelled_attempts() {
        let mut j = running(1, "s1");
        j.cancel_by("api", None, Utc::now()).expect("cancel");
        let r = stopped(&j, 1, "s1", StopReason::Cancelled);
        assert_eq!(decide(&j, &r, Utc::now()), Decision::AfterCancel);
        let n = record_after_cancel(&j, &r, Utc::now());
        assert_eq!(n.state, JobState::Cancelled);
        assert!(n
            .history
            .last()
            .and_then(|e| e.note.as_deref())
            .is_some_and(|s| s.contains("stopped: cancelled")));
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
    }

    #[test]
    fn shutdown_stop_requeues_like_a_release() {
        let j = running(1, "s1");
        let r = stopped(&j, 1, "s1", StopReason::Shutdown);
        let Decision::Apply(n) = decide(&j, &r, Utc::now()) else {
            panic!("not applied")
        };
        assert_eq!(
            (n.state, n.lease.is_none(), n.attempt, n.blame),
            (JobState::Scheduled, true, 1, None)
        );
        assert_eq!(decide(&n, &r, Utc::now()), Decision::Duplicate);
    }

    #[test]
    fn rejection_is_recorded_without_state_change() {
        let j = running(2, "s2");
        let r = report(&j, 1, "s1", finished());
        let n = record_rejection(&j, &r, RejectReason::StaleEpoch, Utc::now());
        assert_eq!(n.state, j.state);
        let last = n.history.last().expect("entry");
        assert_eq!(last.action, Action::RejectReport);
        assert!(last
            .note
            .as_deref()
            .is_some_and(|s| s.contains("stale_epoch")));
    }
}
