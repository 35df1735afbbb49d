//! Archival out of the live bucket, and the database's retention, every
//! `janitor_interval` (docs/history.md):
//!
//! 1. the database marks terminal jobs last changed more than
//!    `archive_after` ago archived (only rows it holds, at the revision
//!    it holds);
//! 2. each is deleted from the bucket *expecting that revision*: a job
//!    that changed since (a retry, a revision not yet recorded) keeps its
//!    key, and the recorder's write of the newer revision makes the row
//!    live again. So a job leaves the bucket only once the database holds
//!    exactly what the bucket held;
//! 3. after `marker_grace` (every watcher has seen the delete) the delete
//!    marker is purged from the stream, up to and including its own
//!    sequence only, so a revision written after it survives;
//! 4. with `retain_for` set, archived jobs older than that leave the
//!    database.
//!
//! Every step is idempotent and resumable: a janitor stopped between two
//! steps takes up the rest at its next pass (state kept in the rows), and
//! several recorder replicas may run it at once.

use std::sync::Arc;

use async_nats::jetstream::kv;
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warden_history::archive::Archived;
use warden_history::HistoryDb;
use warden_shared::{subjects, Config};

use crate::metrics::{self, metrics};

/// Jobs taken per database round.
const BATCH: usize = 500;
/// Bus requests (deletes, purges) of a round in flight at once.
const IN_FLIGHT: usize = 32;

/// Why one archival step did not finish (it is retried next pass).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Database(#[from] warden_history::DbError),
    #[error("cannot delete the job from the bucket")]
    Delete(#[source] kv::DeleteError),
    #[error("cannot read the job's entry")]
    Entry(#[source] kv::EntryError),
    #[error("cannot read the job's last message")]
    LastMessage(#[source] async_nats::jetstream::stream::LastRawMessageError),
    #[error("cannot purge the job's delete marker")]
    Purge(#[source] async_nats::jetstream::stream::PurgeError),
}

/// Runs passes until `shutdown`.
pub async fn run(config: Arc<Config>, db: HistoryDb, jobs: kv::Store, shutdown: CancellationToken) {
    let every = config.history.janitor_interval;
    loop {
        if let Err(e) = pass(&config, &db, &jobs, &shutdown).await {
            warn!(error = %e, "archival pass stopped; the next one resumes it");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub archived: usize,
    pub removed: usize,
    pub changed: usize,
    pub markers_purged: usize,
    pub expired: usize,
}

/// One pass of every step.
pub async fn pass(
    config: &Config,
    db: &HistoryDb,
    jobs: &kv::Store,
    shutdown: &CancellationToken,
) -> Result<Pass, StepError> {
    let h = &config.history;
    let m = metrics();
    let mut p = Pass::default();
    let archive_after =
        chrono::Duration::from_std(h.archive_after).unwrap_or(chrono::Duration::MAX);
    // Step 2 for what an earlier pass left halfway (a janitor stopped
    // between the steps, or a job that had changed): once per pass, so
    // jobs that keep changing never hold up new archival.
    let pending = db.removals_pending(BATCH).await?;
    let mut rounds = vec![pending];
    loop {
        let Some(due) = rounds.pop() else {
            // Steps 1 and 2 for jobs newly due; each round archives jobs
            // that were not archived before, so the loop ends.
            if shutdown.is_cancelled() {
                break;
            }
            let now = Utc::now();
            let due = db.archive_due(now - archive_after, now, BATCH).await?;
            if due.is_empty() {
                break;
            }
            m.archival
                .with_label_values(&[metrics::ARCHIVED])
                .inc_by(due.len() as u64);
            p.archived += due.len();
            rounds.push(due);
            continue;
        };
        // The round's deletes go out together; the ones done are then
        // recorded in one write, also when another failed (that one stays
        // pending for the next pass).
        let (removed, changed, failed) = on_the_bus(due, |a| remove(jobs, a)).await;
        db.mark_removed(&removed, Utc::now()).await?;
        p.removed += removed.len();
        p.changed += changed;
        m.archival
            .with_label_values(&[metrics::REMOVED])
            .inc_by(removed.len() as u64);
        m.archival
            .with_label_values(&[metrics::CHANGED])
            .inc_by(changed as u64);
        if let Some(e) = failed {
            return Err(e);
        }
    }
    // Step 3.
    let grace = chrono::Duration::from_std(h.marker_grace).unwrap_or(chrono::Duration::MAX);
    loop {
        let due = db.markers_due(Utc::now() - grace, BATCH).await?;
        if due.is_empty() || shutdown.is_cancelled() {
            break;
        }
        let (purged, _, failed) = on_the_bus(due, |a| purge_marker(jobs, a)).await;
        db.mark_marker_purged(&purged).await?;
        p.markers_purged += purged.len();
        m.archival
            .with_label_values(&[metrics::MARKER_PURGED])
            .inc_by(purged.len() as u64);
        if let Some(e) = failed {
            return Err(e);
        }
    }
    // Step 4.
    if !h.retain_for.is_zero() {
        let keep = chrono::Duration::from_std(h.retain_for).unwrap_or(chrono::Duration::MAX);
        loop {
            let n = db.expire(Utc::now() - keep, BATCH).await?;
            p.expired += n;
            m.archival
                .with_label_values(&[metrics::EXPIRED])
                .inc_by(n as u64);
            if n < BATCH || shutdown.is_cancelled() {
                break;
            }
        }
    }
    if p != Pass::default() {
        info!(
            archived = p.archived,
            removed = p.removed,
            changed = p.changed,
            markers_purged = p.markers_purged,
            expired = p.expired,
            "archival pass"
        );
    }
    Ok(p)
}

/// Runs `step` for every job of a round, [`IN_FLIGHT`] at a time: the
/// jobs it did, how many it left as they were (false), and the first
/// error.
async fn on_the_bus<F, Fut>(
    round: Vec<Archived>,
    step: F,
) -> (Vec<Archived>, usize, Option<StepError>)
where
    F: Fn(Archived) -> Fut,
    Fut: std::future::Future<Output = Result<bool, StepError>>,
{
    let mut results = futures::stream::iter(round)
        .map(|a| {
            let done = step(a);
            async move { (a, done.await) }
        })
        .buffer_unordered(IN_FLIGHT);
    let (mut done, mut left, mut failed) = (Vec::new(), 0, None);
    while let Some((a, r)) = results.next().await {
        match r {
            Ok(true) => done.push(a),
            Ok(false) => left += 1,
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    (done, left, failed)
}

/// Step 2's bus part for `a`: true once the bucket no longer holds its
/// revision (deleted now, or by an earlier pass that stopped before
/// recording it); false if the bucket has a newer one.
async fn remove(jobs: &kv::Store, a: Archived) -> Result<bool, StepError> {
    let key = a.id.to_string();
    match jobs.delete_expect_revision(&key, Some(a.rev)).await {
        Ok(()) => {}
        Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {
            match jobs.entry(&key).await.map_err(StepError::Entry)? {
                // Gone already: deleted by an earlier pass that stopped
                // before recording it (the entry is its marker).
                None => {}
                Some(entry) if entry.operation != kv::Operation::Put => {}
                Some(entry) => {
                    debug!(job.id = %a.id, recorded = a.rev, bucket = entry.revision, "job changed since it was recorded; kept");
                    return Ok(false);
                }
            }
        }
        Err(e) => return Err(StepError::Delete(e)),
    }
    Ok(true)
}

/// Step 3's bus part for `a`: purges the job's subject up to and
/// including its delete marker; a revision after the marker (the job
/// re-created by a retry) is kept, and the recorder's write of it makes
/// the row live: false then, and the row is left to that write.
async fn purge_marker(jobs: &kv::Store, a: Archived) -> Result<bool, StepError> {
    let subject = format!("$KV.{}.{}", subjects::JOBS_BUCKET, a.id);
    match jobs.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(last) => {
            if subjects::is_kv_removal(Some(&last.headers)) {
                jobs.stream
                    .purge()
                    .filter(&subject)
                    .sequence(last.sequence + 1)
                    .await
                    .map_err(StepError::Purge)?;
            } else {
                // Re-created: nothing of the old job is left to purge.
                return Ok(false);
            }
        }
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
        Err(e) => return Err(StepError::LastMessage(e)),
    }
    Ok(true)
}
