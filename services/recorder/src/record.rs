//! The recording loop: each pulled batch of job revisions is one
//! database transaction, and every message of it is acked only once that
//! transaction has committed.
//!
//! When a batch fails: with the database unreachable every message comes
//! back later (nothing is ever dropped for an outage); otherwise each
//! revision is tried alone, so one that cannot be written is told from
//! the rest, and it is dead-lettered only after [`MAX_DELIVERIES`].

use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use warden_history::{DbError, HistoryDb, Revision};
use warden_shared::consume::{self, Disposition, PullBackoff};
use warden_shared::{store, subjects, Config};

use crate::metrics::{self, metrics};

/// What one message of the bucket's stream is.
#[derive(Debug)]
pub enum Item {
    /// A job revision.
    Revision(Box<Revision>),
    /// A delete or purge marker: the janitor's own archival; nothing to
    /// record.
    Marker,
}

/// Deliveries of a revision that fails alone (not for an outage) before
/// it is dead-lettered. The bucket still holds the job.
pub const MAX_DELIVERIES: i64 = 5;

/// How long a batch waits before it comes again after a database error.
const RETRY: Duration = Duration::from_secs(2);

/// How long a batch waits to fill: 5 ms took the bench's drain into
/// SQLite from 64 revisions a transaction to 512, and from 4,451 to
/// 7,216 jobs/s.
pub const GATHER: Duration = Duration::from_millis(5);

/// What a message of the bucket's stream is, or why it cannot be used.
pub fn sort(msg: &jetstream::Message) -> Result<((), Item), Disposition> {
    if subjects::is_kv_removal(msg.headers.as_ref()) {
        return Ok(((), Item::Marker));
    }
    let rev = msg
        .info()
        .map(|i| i.stream_sequence)
        .map_err(|e| Disposition::DeadLetter {
            reason: metrics::UNDECODABLE_JOB,
            error: format!("no stream sequence: {e}"),
        })?;
    let key = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
    match store::decode(key, &msg.payload) {
        Ok(job) => Ok(((), Item::Revision(Box::new(Revision { rev, job })))),
        Err(e) => Err(Disposition::DeadLetter {
            reason: metrics::UNDECODABLE_JOB,
            error: e.to_string(),
        }),
    }
}

fn deliveries(msg: &jetstream::Message) -> i64 {
    msg.info().map(|i| i.delivered).unwrap_or(1)
}

/// Records one batch; one disposition per message, in order.
pub async fn handle(db: &HistoryDb, batch: Vec<(jetstream::Message, Item)>) -> Vec<Disposition> {
    let m = metrics();
    let revisions: Vec<Revision> = batch
        .iter()
        .filter_map(|(_, item)| match item {
            Item::Revision(r) => Some((**r).clone()),
            Item::Marker => None,
        })
        .collect();
    let markers = batch.len() - revisions.len();
    m.revisions
        .with_label_values(&[metrics::MARKER])
        .inc_by(markers as u64);
    let started = Instant::now();
    let result = db.record(&revisions).await;
    m.batch_seconds.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(done) => {
            m.revisions
                .with_label_values(&[metrics::WRITTEN])
                .inc_by(done.written as u64);
            m.revisions
                .with_label_values(&[metrics::STALE])
                .inc_by((revisions.len() - done.written) as u64);
            debug!(
                revisions = revisions.len(),
                written = done.written,
                revived = done.revived,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "batch recorded"
            );
            vec![Disposition::Ack; batch.len()]
        }
        Err(e) if e.is_unavailable() => {
            // Every message comes back; nothing is tried alone.
            vec![one_failed(&e, &batch[0].0, revisions.len()); batch.len()]
        }
        Err(e) => {
            m.db_errors.with_label_values(&[metrics::STATEMENT]).inc();
            warn!(error = %e, revisions = revisions.len(), "a batch failed; recording its revisions one by one");
            let mut out = Vec::with_capacity(batch.len());
            for (msg, item) in &batch {
                let Item::Revision(r) = item else {
                    out.push(Disposition::Ack);
                    continue;
                };
                match db.record(std::slice::from_ref(r)).await {
                    Ok(done) => {
                        let outcome = if done.written == 1 {
                            metrics::WRITTEN
                        } else {
                            metrics::STALE
                        };
                        m.revisions.with_label_values(&[outcome]).inc();
                        out.push(Disposition::Ack);
                    }
                    Err(e) => out.push(one_failed(&e, msg, 1)),
                }
            }
            out
        }
    }
}

/// The disposition of a revision that failed to record with `e`.
fn one_failed(e: &DbError, msg: &jetstream::Message, revisions: usize) -> Disposition {
    let m = metrics();
    if e.is_unavailable() {
        m.db_errors.with_label_values(&[metrics::UNAVAILABLE]).inc();
        m.revisions
            .with_label_values(&[metrics::RETRIED])
            .inc_by(revisions as u64);
        warn!(error = %e, "the history database is unavailable; the batch comes again");
        return Disposition::Nak(RETRY);
    }
    m.db_errors.with_label_values(&[metrics::STATEMENT]).inc();
    if deliveries(msg) >= MAX_DELIVERIES {
        warn!(subject = %msg.subject, error = %e, "a job revision cannot be recorded; dead-lettered");
        return Disposition::DeadLetter {
            reason: metrics::UNRECORDABLE_JOB,
            error: e.to_string(),
        };
    }
    m.revisions
        .with_label_values(&[metrics::RETRIED])
        .inc_by(revisions as u64);
    warn!(subject = %msg.subject, error = %e, "a job revision could not be recorded; it comes again");
    Disposition::Nak(RETRY)
}

/// The consume loop, until `shutdown` (the batch in hand is finished).
pub async fn run(
    config: &Config,
    db: &HistoryDb,
    js: &jetstream::Context,
    consumer: &PullConsumer,
    shutdown: &CancellationToken,
) {
    consume::consume_grouped(
        consume::Consume {
            service: "recorder",
            js,
            batch: config.history.batch,
            dead_letter_retry: RETRY,
            // A batch is one transaction: fill it.
            gather: GATHER,
        },
        PullBackoff::DEFAULT,
        consumer,
        shutdown,
        sort,
        |batch| handle(db, batch),
        |_reason| {
            metrics()
                .revisions
                .with_label_values(&[metrics::DEAD_LETTERED])
                .inc();
        },
    )
    .await;
}

/// Keeps `warden_recorder_pending` (revisions not yet delivered) current.
pub async fn watch_pending(mut consumer: PullConsumer, shutdown: CancellationToken) {
    loop {
        if let Ok(info) = consumer.info().await {
            metrics()
                .pending
                .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
