//! The archival steps (the recorder's janitor takes them in this order)
//! and the retention of the database itself.
//!
//! 1. [`HistoryDb::archive_due`]: a terminal job last changed before the
//!    cut-off, recorded at its latest revision, is marked archived and
//!    counted in the archived statistics (archive state 1).
//! 2. The janitor deletes the job from the bucket, expecting that very
//!    revision; [`HistoryDb::mark_removed`] records it (state 2). A job
//!    that changed meanwhile keeps its key: the recorder writes its newer
//!    revision, which makes the row live again (state 0).
//! 3. After a grace period in which every watcher has seen the delete, the
//!    janitor purges the delete marker from the stream, so nothing that
//!    replays the bucket at start pays for it;
//!    [`HistoryDb::mark_marker_purged`] records that (state 3).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use crate::rows::{TallyKey, MINUTE_MICROS};
use crate::write::{add_tallies, args, exec, Val};
use crate::{micros, Backend, DbError, HistoryDb};

/// A job at the revision the archival step is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Archived {
    pub id: Uuid,
    pub rev: u64,
}

const TERMINAL: &str = "('FINISHED', 'CRASHED', 'SHELVED', 'CANCELLED')";

/// Jobs per statement of [`HistoryDb::mark_all`] and step 1: two bound
/// values each, far under either database's limit.
const MARK_CHUNK: usize = 500;

/// The condition "one of `jobs`, at its revision", its values bound from
/// `$first` on (pushed onto `vals`; each placeholder once, in order). The
/// id list lets both planners look the rows up by the id index; the pairs
/// then hold each to its revision.
fn at_revisions(first: usize, jobs: &[Archived], vals: &mut Vec<Val>) -> String {
    let n = jobs.len();
    let ids: Vec<String> = (0..n).map(|i| format!("${}", first + i)).collect();
    let pairs: Vec<String> = (0..n)
        .map(|i| format!("(${}, ${})", first + n + 2 * i, first + n + 2 * i + 1))
        .collect();
    vals.extend(jobs.iter().map(|a| Val::S(a.id.to_string())));
    for a in jobs {
        vals.push(Val::S(a.id.to_string()));
        vals.push(Val::I(rev_of(*a)));
    }
    format!(
        "id IN ({}) AND (id, rev) IN (VALUES {})",
        ids.join(", "),
        pairs.join(", ")
    )
}

fn archived_of(row: &sqlx::any::AnyRow) -> Result<Option<Archived>, DbError> {
    let id: String = row.try_get("id")?;
    let rev: i64 = row.try_get("rev")?;
    Ok(id.parse::<Uuid>().ok().map(|id| Archived {
        id,
        rev: u64::try_from(rev).unwrap_or(0),
    }))
}

impl HistoryDb {
    /// Step 1: marks up to `limit` terminal jobs last changed before
    /// `cutoff` archived, counts them in the statistics of archived jobs,
    /// and returns them (their bucket copies are to be deleted).
    pub async fn archive_due(
        &self,
        cutoff: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Archived>, DbError> {
        let mut tx = self.write.begin().await?;
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT id, rev, state, blame, detail, attempt, updated_at FROM jobs \
             WHERE archived = 0 AND updated_at < $1 AND state IN {TERMINAL} \
             ORDER BY updated_at LIMIT $2{lock}"
        );
        let found = sqlx::query_with(
            AssertSqlSafe(sql),
            args(vec![Val::I(micros(cutoff)), Val::I(limit_i64(limit))])?,
        )
        .fetch_all(&mut *tx)
        .await?;
        // What each found job adds to the archived statistics.
        let mut found_jobs = Vec::with_capacity(found.len());
        let mut keys = std::collections::HashMap::with_capacity(found.len());
        for row in &found {
            let Some(a) = archived_of(row)? else { continue };
            let state: String = row.try_get("state")?;
            let blame: Option<String> = row.try_get("blame")?;
            let detail: Option<String> = row.try_get("detail")?;
            let key = TallyKey::new(
                row.try_get("updated_at")?,
                &state,
                blame.as_deref(),
                detail.as_deref(),
                row.try_get("attempt")?,
            );
            found_jobs.push(a);
            keys.insert(a, key);
        }
        // Marked in one statement per chunk; those it marked (all of them
        // unless another writer got there first) are counted.
        let mut out = Vec::with_capacity(found_jobs.len());
        let mut tallies: BTreeMap<TallyKey, i64> = BTreeMap::new();
        for chunk in found_jobs.chunks(MARK_CHUNK) {
            let mut vals = vec![Val::I(micros(now))];
            let cond = at_revisions(2, chunk, &mut vals);
            let marked = sqlx::query_with(
                AssertSqlSafe(format!(
                    "UPDATE jobs SET archive_state = 1, archived = 1, archived_at = $1 \
                     WHERE archived = 0 AND {cond} RETURNING id, rev"
                )),
                args(vals)?,
            )
            .fetch_all(&mut *tx)
            .await?;
            for row in &marked {
                let Some(a) = archived_of(row)? else { continue };
                if let Some(key) = keys.remove(&a) {
                    *tallies.entry(key).or_default() += 1;
                    out.push(a);
                }
            }
        }
        add_tallies(&mut tx, self.backend, &tallies).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Jobs archived whose bucket copy is still to be deleted (step 1
    /// done, step 2 not): what a janitor that stopped halfway resumes.
    pub async fn removals_pending(&self, limit: usize) -> Result<Vec<Archived>, DbError> {
        self.in_archive_state(1, None, limit).await
    }

    /// Step 2 done for `jobs`: the bucket no longer holds those
    /// revisions. One transaction for all of them (a row per job written
    /// one commit at a time held SQLite's one writer away from the
    /// recorder); returns how many moved on.
    pub async fn mark_removed(
        &self,
        jobs: &[Archived],
        now: DateTime<Utc>,
    ) -> Result<usize, DbError> {
        self.mark_all(
            jobs,
            "UPDATE jobs SET archive_state = 2, archived_at = $1 \
             WHERE archive_state = 1 AND {jobs}",
            Some(micros(now)),
        )
        .await
    }

    /// Jobs deleted from the bucket before `before` whose delete marker
    /// is still in the stream.
    pub async fn markers_due(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Archived>, DbError> {
        self.in_archive_state(2, Some(before), limit).await
    }

    /// Step 3 done for `jobs`, in one transaction; how many moved on.
    pub async fn mark_marker_purged(&self, jobs: &[Archived]) -> Result<usize, DbError> {
        self.mark_all(
            jobs,
            "UPDATE jobs SET archive_state = 3 WHERE archive_state = 2 AND {jobs}",
            None,
        )
        .await
    }

    /// Runs `sql` (`$1` the time if given; `{jobs}` where the condition
    /// naming every job at its revision goes) for `jobs`, one statement
    /// per [`MARK_CHUNK`] of them, in one transaction. (A statement per job
    /// cost a round trip each: on PostgreSQL with 10 million rows the
    /// janitor archived 40 to 380 jobs a second.)
    async fn mark_all(
        &self,
        jobs: &[Archived],
        sql: &str,
        at: Option<i64>,
    ) -> Result<usize, DbError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut tx = self.write.begin().await?;
        let mut n = 0;
        for chunk in jobs.chunks(MARK_CHUNK) {
            let mut vals: Vec<Val> = at.map(Val::I).into_iter().collect();
            let cond = at_revisions(vals.len() + 1, chunk, &mut vals);
            n += exec(&mut tx, sql.replace("{jobs}", &cond), vals).await?;
        }
        tx.commit().await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn in_archive_state(
        &self,
        state: u8,
        before: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<Archived>, DbError> {
        // The state is written into the statement, not bound, and the
        // partial index's own condition repeated, so the planner uses
        // `jobs_archive` (SQLite proves a partial index only from the
        // same term).
        let (sql, vals) = match before {
            Some(t) => (
                format!(
                    "SELECT id, rev FROM jobs WHERE archive_state IN (1, 2) AND archive_state = {state} \
                     AND archived_at < $1 ORDER BY archived_at LIMIT $2"
                ),
                vec![Val::I(micros(t)), Val::I(limit_i64(limit))],
            ),
            None => (
                format!(
                    "SELECT id, rev FROM jobs WHERE archive_state IN (1, 2) AND archive_state = {state} \
                     ORDER BY archived_at LIMIT $1"
                ),
                vec![Val::I(limit_i64(limit))],
            ),
        };
        let rows = sqlx::query_with(AssertSqlSafe(sql), args(vals)?)
            .fetch_all(&self.read)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            if let Some(a) = archived_of(r)? {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Retention: deletes up to `limit` archived jobs (gone from the
    /// bucket) last changed before the hour `before` falls in, with their
    /// history, attempts and statistics. Returns how many jobs went.
    pub async fn expire(&self, before: DateTime<Utc>, limit: usize) -> Result<usize, DbError> {
        let hour = micros(before).div_euclid(60 * MINUTE_MICROS);
        let cut = hour * 60 * MINUTE_MICROS;
        let mut tx = self.write.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar_with(
            "SELECT id FROM jobs WHERE archived = 1 AND archive_state >= 2 AND updated_at < $1 \
             ORDER BY updated_at LIMIT $2",
            args(vec![Val::I(cut), Val::I(limit_i64(limit))])?,
        )
        .fetch_all(&mut *tx)
        .await?;
        for chunk in ids.chunks(500) {
            let list = crate::placeholders(self.backend, 1, chunk.len());
            for table in ["history", "attempts"] {
                exec(
                    &mut tx,
                    format!("DELETE FROM {table} WHERE job_id IN ({list})"),
                    chunk.iter().map(|s| Val::S(s.clone())).collect(),
                )
                .await?;
            }
            exec(
                &mut tx,
                format!("DELETE FROM jobs WHERE id IN ({list})"),
                chunk.iter().map(|s| Val::S(s.clone())).collect(),
            )
            .await?;
        }
        // The statistics of those hours go once their last job has.
        if ids.len() < limit {
            exec(
                &mut tx,
                "DELETE FROM stats_minute WHERE minute < $1".to_string(),
                vec![Val::I(hour * 60)],
            )
            .await?;
            exec(
                &mut tx,
                "DELETE FROM stats_hour WHERE hour < $1".to_string(),
                vec![Val::I(hour)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(ids.len())
    }
}

fn limit_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn rev_of(a: Archived) -> i64 {
    crate::rows::rev_i64(a.rev)
}
