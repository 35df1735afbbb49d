//! The reports consumer: a durable consumer shared by all replicas. Each
//! pull batch is grouped by job; the reports of one job are folded into
//! one compare-and-set write ([`crate::reports::fold`]), different jobs
//! are written concurrently. A report that does not come from its lease's
//! holder (the bot its subject names and the lease's secret) is
//! dead-lettered without touching the job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;
use warden_shared::cas::{
    self, Backoff, Change, Failure, Never, OnConflict, Outcome, Phase, Retry, Step,
};
use warden_shared::consume::{self, Consume, Disposition, PullBackoff};
use warden_shared::job::Job;
use warden_shared::messages::{Classification, Report};
use warden_shared::store::{StoreError, Versioned};

use super::classify::{act_on_classification, classify};
use crate::apply::crash_to_classify;
use crate::classification;
use crate::metrics::{count_crash, count_fate, metrics, INVALID_REPORT};
use crate::reports::{
    bound, check_holder, check_subject, fold, Fold, Refusal, Rejection, ReportOutcome,
};
use crate::Shared;

/// How long a report that could not be applied now waits to come again.
const RETRY: Duration = Duration::from_secs(1);

pub async fn consume(shared: Arc<Shared>, consumer: PullConsumer, shutdown: CancellationToken) {
    let how = Consume {
        service: "scheduler",
        js: &shared.js,
        batch: shared.config.scheduler.report_batch,
        dead_letter_retry: RETRY,
        gather: Duration::ZERO,
    };
    // A fixed pause after a consumer error: reports are the scheduler's
    // main input, and it pulls again as soon as the bus is back.
    consume::consume_grouped(
        how,
        PullBackoff::fixed(RETRY),
        &consumer,
        &shutdown,
        sort,
        |group| handle_job(&shared, group),
        |reason| metrics().dead_letters.with_label_values(&[reason]).inc(),
    )
    .await;
}

/// A report's job (its group), or the dead-letter of one that cannot be
/// decoded, is on a subject that does not prove its bot, or is out of
/// bounds. Text over its bound is cut here (counted).
fn sort(msg: &jetstream::Message) -> Result<(Uuid, Report), Disposition> {
    let mut r = match serde_json::from_slice::<Report>(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            metrics().invalid_reports.inc();
            warn!(subject = %msg.subject, error = %e, "undecodable report dead-lettered");
            return Err(Disposition::DeadLetter {
                reason: INVALID_REPORT,
                error: e.to_string(),
            });
        }
    };
    let checked = check_subject(msg.subject.as_str(), &r).and_then(|()| bound(&mut r));
    match checked {
        Ok(cut) => {
            if cut {
                metrics().reports_truncated.inc();
                debug!(job.id = %r.job_id, "report text cut to its bound");
            }
            Ok((r.job_id, r))
        }
        Err(why) => Err(refuse(msg.subject.as_str(), &r, why)),
    }
}

/// The dead letter of a refused report, counted and logged.
fn refuse(subject: &str, r: &Report, why: Refusal) -> Disposition {
    metrics()
        .reports_refused
        .with_label_values(&[why.label()])
        .inc();
    warn!(%subject, job.id = %r.job_id, bot.id = %r.bot_id, epoch = r.epoch, reason = why.label(), "report refused; dead-lettered, the job untouched");
    Disposition::DeadLetter {
        reason: why.label(),
        error: why.explain(r),
    }
}

/// Applies the reports of one job (in pull order); the disposition of
/// each.
async fn handle_job(shared: &Shared, list: Vec<(jetstream::Message, Report)>) -> Vec<Disposition> {
    let reports: Vec<&Report> = list.iter().map(|(_, r)| r).collect();
    let deliveries = list
        .iter()
        .filter_map(|(m, _)| m.info().ok().map(|i| i.delivered))
        .max()
        .unwrap_or(1);
    let (rest, refused) = handle_reports(shared, &reports, deliveries).await;
    list.iter()
        .enumerate()
        .map(|(i, (m, r))| match refused.iter().find(|(j, _)| *j == i) {
            Some((_, why)) => refuse(m.subject.as_str(), r, *why),
            None => rest.clone(),
        })
        .collect()
}

fn count_rejected(r: &Report, why: Rejection) {
    let m = metrics();
    m.reports
        .with_label_values(&[r.kind.name(), ReportOutcome::Rejected(why).label()])
        .inc();
    m.rejected.with_label_values(&[why.label()]).inc();
}

/// Applies the reports of one job, in order, with a single
/// compare-and-set (decided by [`fold`]): the disposition of those decided
/// on, and those refused (by index) as not the lease holder's.
async fn handle_reports(
    shared: &Shared,
    reports: &[&Report],
    deliveries: i64,
) -> (Disposition, Vec<(usize, Refusal)>) {
    let Some(first) = reports.first() else {
        return (Disposition::Ack, Vec::new());
    };
    let job_id = first.job_id;
    let mut step = Apply {
        shared,
        reports,
        deliveries,
        classified: HashMap::new(),
        refused: Vec::new(),
    };
    // The job as this replica last saw it RUNNING (its own write, or the
    // watch's latest) is the first guess: a right one saves reading the
    // job before the write; a stale one loses the race and reads.
    let guess = shared
        .queue()
        .take_running(&job_id)
        .map(|v| (v.job, v.revision));
    let result = cas::run_from(&shared.store.at(job_id), RETRY_CAS, &mut step, guess).await;
    let refused = std::mem::take(&mut step.refused);
    let result = match result {
        Ok(Outcome::Written {
            value,
            revision,
            with,
        }) => {
            // The next report of this job starts from this write.
            shared.queue().observe(Versioned {
                job: value,
                revision,
            });
            Ok(with)
        }
        Ok(Outcome::Stopped(halt)) => Err(Ok(halt)),
        Err(e) => Err(Err(e)),
    };
    (
        settle_reports(shared, job_id, reports, deliveries, result).await,
        refused,
    )
}

/// The fold written, or why nothing was: the step stopped, or the
/// compare-and-set failed.
type ApplyResult<'r> = Result<Fold<'r>, Result<Halt<'r>, Failure<StoreError, Never>>>;

/// Why a step wrote nothing. What each means is done by
/// [`settle_reports`], once the step's decision is final (one decided on
/// a guess is decided again on a read), so it happens once.
enum Halt<'r> {
    /// No job with that id.
    UnknownJob,
    /// Every report was already applied: counted, and their crash events
    /// published again.
    Duplicates {
        job: Box<Job>,
        outcomes: Vec<(&'r Report, ReportOutcome)>,
        reports: Vec<&'r Report>,
    },
    /// Nothing to do but this.
    Settled(Disposition),
}

/// What becomes of the reports decided on, once the write is done.
async fn settle_reports(
    shared: &Shared,
    job_id: Uuid,
    reports: &[&Report],
    deliveries: i64,
    result: ApplyResult<'_>,
) -> Disposition {
    let m = metrics();
    let folded = match result {
        Ok(folded) => folded,
        Err(Ok(Halt::Settled(d))) => return d,
        Err(Ok(Halt::UnknownJob)) => {
            for r in reports {
                count_rejected(r, Rejection::UnknownJob);
                warn!(job.id = %r.job_id, bot.id = %r.bot_id, "report for unknown job rejected");
            }
            return Disposition::Ack;
        }
        Err(Ok(Halt::Duplicates {
            job,
            outcomes,
            reports,
        })) => {
            for (r, outcome) in &outcomes {
                m.reports
                    .with_label_values(&[r.kind.name(), outcome.label()])
                    .inc();
            }
            // A redelivered crash: its events may not have gone out.
            return republish_crash_events(shared, &job, &reports, deliveries).await;
        }
        Err(Err(Failure::Conflict { .. })) => return Disposition::Nak(RETRY),
        Err(Err(Failure::Store { source: e, .. })) if e.is_transient() => {
            return Disposition::Nak(RETRY)
        }
        Err(Err(Failure::Store {
            phase: Phase::Read,
            source: e,
            ..
        })) => {
            warn!(job.id = %job_id, error = %e, "job record unreadable; reports dropped");
            for r in reports {
                count_rejected(r, Rejection::CorruptJob);
            }
            return Disposition::Ack;
        }
        Err(Err(Failure::Store {
            source: StoreError::TooLarge,
            ..
        })) => {
            warn!(job.id = %job_id, "job record would exceed the size limit; reports dropped");
            return Disposition::Ack;
        }
        Err(Err(Failure::Store { source: e, .. })) => {
            warn!(job.id = %job_id, error = %e, "cannot write job; reports dropped");
            return Disposition::Ack;
        }
        Err(Err(Failure::Refused(never))) => match never {},
    };
    for (fate, blame) in folded.fates {
        count_fate(fate, blame);
    }
    for (blame, detail) in folded.failed {
        count_crash(&shared.config, blame, &detail);
    }
    for (state, secs) in folded.ended {
        m.job_duration
            .with_label_values(&[state.as_str()])
            .observe(secs);
    }
    // A report whose events did not all go out is not acked:
    // redelivered, it is a duplicate, and they are sent again.
    let mut events_out = true;
    for c in &folded.crashes {
        events_out &= act_on_classification(shared, &folded.job, c).await;
    }
    for (r, outcome) in &folded.outcomes {
        count_outcome(job_id, r, *outcome);
    }
    if !events_out {
        return Disposition::Nak(RETRY);
    }
    republish_crash_events(shared, &folded.job, &folded.duplicates, deliveries).await
}

/// The reports' compare-and-set: 16 attempts, lost races retried at once;
/// a store error naks the reports (they come again after [`RETRY`]).
const RETRY_CAS: Retry = Retry {
    attempts: 16,
    on_conflict: OnConflict::AtOnce,
    store_errors: Backoff::NONE,
};

/// One attempt at applying the reports of one job: classify its crashes,
/// then [`fold`]. It has no effect outside itself when it stops
/// ([`Halt`]): a stop decided on a guess is decided again.
struct Apply<'s, 'r> {
    shared: &'s Shared,
    reports: &'s [&'r Report],
    deliveries: i64,
    /// Classifications by report index, kept across attempts.
    classified: HashMap<usize, Classification>,
    /// Reports (by index) refused at the last attempt: not the lease
    /// holder's.
    refused: Vec<(usize, Refusal)>,
}

impl<'r> Change<Job> for Apply<'_, 'r> {
    type Write = Fold<'r>;
    /// Nothing to write: what becomes of the reports.
    type Stop = Halt<'r>;
    type Error = Never;

    async fn step(&mut self, current: Option<Job>) -> Result<Step<Job, Fold<'r>, Halt<'r>>, Never> {
        let (shared, reports, deliveries) = (self.shared, self.reports, self.deliveries);
        let Some(job) = current else {
            return Ok(Step::Stop(Halt::UnknownJob));
        };
        // Only the lease holder's reports are decided on; the others are
        // dead-lettered, the job untouched.
        self.refused.clear();
        let mut heard = Vec::with_capacity(reports.len());
        for (i, r) in reports.iter().enumerate() {
            match check_holder(&job, r) {
                Ok(()) => heard.push(i),
                Err(why) => self.refused.push((i, why)),
            }
        }
        if heard.is_empty() {
            return Ok(Step::Stop(Halt::Settled(Disposition::Ack)));
        }
        // Crashes are classified before anything is decided, so the retry
        // policy acts on the classifier's blame and detail.
        for &i in &heard {
            let r = reports[i];
            if self.classified.contains_key(&i) || !crash_to_classify(&job, r) {
                continue;
            }
            match classify(shared, &job, r, deliveries).await {
                Some(c) => {
                    self.classified.insert(i, c);
                }
                None => return Ok(Step::Stop(Halt::Settled(Disposition::Nak(RETRY)))),
            }
        }
        let reports: Vec<&'r Report> = heard.iter().map(|&i| reports[i]).collect();
        let classified: HashMap<usize, Classification> = heard
            .iter()
            .enumerate()
            .filter_map(|(j, i)| self.classified.get(i).map(|c| (j, c.clone())))
            .collect();
        let reports = &reports[..];
        let folded = fold(&job, reports, &classified, &shared.config, Utc::now());
        if folded.all_duplicates() {
            return Ok(Step::Stop(Halt::Duplicates {
                job: Box::new(folded.job),
                outcomes: folded.outcomes,
                reports: reports.to_vec(),
            }));
        }
        Ok(Step::Write(folded.job.clone(), folded))
    }

    fn lost_race(&mut self, _attempt: u32) {
        metrics().report_conflicts.inc();
    }
}

/// Counts (and logs) one report's outcome once its write is durable.
fn count_outcome(job_id: uuid::Uuid, r: &Report, outcome: ReportOutcome) {
    let m = metrics();
    match outcome {
        ReportOutcome::Applied { from, to, lost } => {
            if let Some(loss) = lost {
                info!(job.id = %job_id, session = %r.session, loss = loss.as_str(), state = %to, "attempt stopped by its worker; lease lost");
            }
            m.reports
                .with_label_values(&[r.kind.name(), outcome.label()])
                .inc();
            m.transitions
                .with_label_values(&[from.as_str(), to.as_str()])
                .inc();
            debug!(job.id = %job_id, state = %to, "report applied");
        }
        ReportOutcome::Duplicate | ReportOutcome::AfterCancel | ReportOutcome::LateStart => m
            .reports
            .with_label_values(&[r.kind.name(), outcome.label()])
            .inc(),
        ReportOutcome::Rejected(why) => {
            count_rejected(r, why);
            warn!(job.id = %job_id, bot.id = %r.bot_id, session = %r.session, epoch = r.epoch, reason = why.label(), "report rejected");
        }
    }
}

/// Publishes again the events of every crash in `reports` that is already
/// recorded on `job` (a redelivered report: the first publish may have
/// failed, or the scheduler stopped between the write and the publish).
/// The events carry a message id per attempt, so a copy that did go out is
/// dropped by the stream. Retry (nak) unless every event went out.
async fn republish_crash_events(
    shared: &Shared,
    job: &Job,
    reports: &[&Report],
    deliveries: i64,
) -> Disposition {
    for r in reports {
        if crate::apply::applied_crash(job, r).is_none() {
            continue;
        }
        let Some(c) = classify(shared, job, r, deliveries).await else {
            return Disposition::Nak(RETRY);
        };
        let Some(event) = classification::redelivered(job, r, c) else {
            continue;
        };
        if !act_on_classification(shared, job, &event).await {
            return Disposition::Nak(RETRY);
        }
        debug!(job.id = %job.id, epoch = r.epoch, "events of a redelivered crash published again");
    }
    Disposition::Ack
}
