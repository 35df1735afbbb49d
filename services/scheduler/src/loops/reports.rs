//! The reports consumer: a durable consumer shared by all replicas. Each
//! pull batch is grouped by job; the reports of one job are folded into
//! one compare-and-set write ([`crate::reports::fold`]), different jobs
//! are written concurrently.

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
use warden_shared::store::StoreError;

use super::classify::{act_on_classification, classify};
use crate::apply::crash_to_classify;
use crate::classification;
use crate::metrics::{count_crash, count_fate, metrics, INVALID_REPORT};
use crate::reports::{fold, Fold, Rejection, ReportOutcome};
use crate::Shared;

/// How long a report that could not be applied now waits to come again.
const RETRY: Duration = Duration::from_secs(1);

pub async fn consume(shared: Arc<Shared>, consumer: PullConsumer, shutdown: CancellationToken) {
    let how = Consume {
        service: "scheduler",
        js: &shared.js,
        batch: shared.config.scheduler.report_batch,
        dead_letter_retry: RETRY,
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

/// A report's job (its group), or the dead-letter of an undecodable one.
fn sort(msg: &jetstream::Message) -> Result<(Uuid, Report), Disposition> {
    match serde_json::from_slice::<Report>(&msg.payload) {
        Ok(r) => Ok((r.job_id, r)),
        Err(e) => {
            metrics().invalid_reports.inc();
            warn!(subject = %msg.subject, error = %e, "undecodable report dead-lettered");
            Err(Disposition::DeadLetter {
                reason: INVALID_REPORT,
                error: e.to_string(),
            })
        }
    }
}

/// Applies the reports of one job (in pull order); the disposition of
/// them all.
async fn handle_job(shared: &Shared, list: Vec<(jetstream::Message, Report)>) -> Disposition {
    let reports: Vec<&Report> = list.iter().map(|(_, r)| r).collect();
    let deliveries = list
        .iter()
        .filter_map(|(m, _)| m.info().ok().map(|i| i.delivered))
        .max()
        .unwrap_or(1);
    handle_reports(shared, &reports, deliveries).await
}

fn count_rejected(r: &Report, why: Rejection) {
    let m = metrics();
    m.reports
        .with_label_values(&[r.kind.name(), ReportOutcome::Rejected(why).label()])
        .inc();
    m.rejected.with_label_values(&[why.label()]).inc();
}

/// Applies the reports of one job, in order, with a single
/// compare-and-set (decided by [`fold`]).
async fn handle_reports(shared: &Shared, reports: &[&Report], deliveries: i64) -> Disposition {
    let Some(first) = reports.first() else {
        return Disposition::Ack;
    };
    let job_id = first.job_id;
    let m = metrics();
    let step = Apply {
        shared,
        reports,
        deliveries,
        classified: HashMap::new(),
    };
    let folded = match cas::run(&shared.store.at(job_id), RETRY_CAS, step).await {
        Ok(Outcome::Written { with: folded, .. }) => folded,
        Ok(Outcome::Stopped(d)) => return d,
        Err(Failure::Conflict { .. }) => return Disposition::Nak(RETRY),
        Err(Failure::Store { source: e, .. }) if e.is_transient() => {
            return Disposition::Nak(RETRY)
        }
        Err(Failure::Store {
            phase: Phase::Read,
            source: e,
            ..
        }) => {
            warn!(job.id = %job_id, error = %e, "job record unreadable; reports dropped");
            for r in reports {
                count_rejected(r, Rejection::CorruptJob);
            }
            return Disposition::Ack;
        }
        Err(Failure::Store {
            source: StoreError::TooLarge,
            ..
        }) => {
            warn!(job.id = %job_id, "job record would exceed the size limit; reports dropped");
            return Disposition::Ack;
        }
        Err(Failure::Store { source: e, .. }) => {
            warn!(job.id = %job_id, error = %e, "cannot write job; reports dropped");
            return Disposition::Ack;
        }
        Err(Failure::Refused(never)) => match never {},
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
/// then [`fold`].
struct Apply<'s, 'r> {
    shared: &'s Shared,
    reports: &'s [&'r Report],
    deliveries: i64,
    /// Classifications by report index, kept across attempts.
    classified: HashMap<usize, Classification>,
}

impl<'r> Change<Job> for Apply<'_, 'r> {
    type Write = Fold<'r>;
    /// Nothing to write: what becomes of the reports.
    type Stop = Disposition;
    type Error = Never;

    async fn step(
        &mut self,
        current: Option<Job>,
    ) -> Result<Step<Job, Fold<'r>, Disposition>, Never> {
        let (shared, reports, deliveries) = (self.shared, self.reports, self.deliveries);
        let Some(job) = current else {
            for r in reports {
                count_rejected(r, Rejection::UnknownJob);
                warn!(job.id = %r.job_id, bot.id = %r.bot_id, "report for unknown job rejected");
            }
            return Ok(Step::Stop(Disposition::Ack));
        };
        // Crashes are classified before anything is decided, so the retry
        // policy acts on the classifier's blame and detail.
        for (i, r) in reports.iter().enumerate() {
            if self.classified.contains_key(&i) || !crash_to_classify(&job, r) {
                continue;
            }
            match classify(shared, &job, r, deliveries).await {
                Some(c) => {
                    self.classified.insert(i, c);
                }
                None => return Ok(Step::Stop(Disposition::Nak(RETRY))),
            }
        }
        let folded = fold(&job, reports, &self.classified, &shared.config, Utc::now());
        if folded.all_duplicates() {
            let m = metrics();
            for (r, outcome) in &folded.outcomes {
                m.reports
                    .with_label_values(&[r.kind.name(), outcome.label()])
                    .inc();
            }
            // A redelivered crash: its events may not have gone out.
            return Ok(Step::Stop(
                republish_crash_events(shared, &folded.job, reports, deliveries).await,
            ));
        }
        Ok(Step::Write(folded.job.clone(), folded))
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
        ReportOutcome::Duplicate | ReportOutcome::AfterCancel => m
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
