//! Recording a batch of job revisions in one transaction. Every write is
//! idempotent: a job's row only moves to a higher revision, history
//! entries are inserted once by number, attempts merge. Replaying the
//! bucket's stream (a redelivery, a rebuilt database) changes nothing it
//! has already recorded.

use std::collections::{BTreeMap, HashMap};

use sqlx::any::AnyArguments;
use sqlx::{AnyConnection, Arguments, AssertSqlSafe, Row};

use crate::rows::{self, Apply, AttemptRow, Existing, Folded, HistoryRow, JobRow, TallyKey};
use crate::{value_rows, Backend, DbError, HistoryDb};

/// What one [`HistoryDb::record`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Jobs whose row was written (new, or a higher revision).
    pub written: usize,
    /// Jobs the database already had at this revision or a later one.
    pub stale: usize,
    /// Archived jobs a newer revision made live again (a retry).
    pub revived: usize,
}

/// Rows per multi-row statement (SQLite allows 32766 values in one).
const CHUNK: usize = 200;

/// A value to bind.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    I(i64),
    S(String),
    N(Option<String>),
    NI(Option<i64>),
}

pub(crate) fn args(vals: Vec<Val>) -> Result<AnyArguments, DbError> {
    let mut a = AnyArguments::default();
    for v in vals {
        let r = match v {
            Val::I(i) => a.add(i),
            Val::S(s) => a.add(s),
            Val::N(s) => a.add(s),
            Val::NI(i) => a.add(i),
        };
        r.map_err(|e| DbError::Sql(sqlx::Error::Encode(e)))?;
    }
    Ok(a)
}

pub(crate) async fn exec(
    conn: &mut AnyConnection,
    sql: String,
    vals: Vec<Val>,
) -> Result<u64, DbError> {
    let r = sqlx::query_with(AssertSqlSafe(sql), args(vals)?)
        .execute(&mut *conn)
        .await?;
    Ok(r.rows_affected())
}

const JOB_COLUMNS: &str = "id, rev, state, task, pool, priority, attempt, blame, detail, bot_id, \
     source_message_id, created_at, updated_at, search_text, body";

fn job_vals(r: &JobRow, out: &mut Vec<Val>) {
    out.extend([
        Val::S(r.id.clone()),
        Val::I(r.rev),
        Val::S(r.state.to_string()),
        Val::S(r.task.clone()),
        Val::S(r.pool.clone()),
        Val::I(r.priority),
        Val::I(r.attempt),
        Val::N(r.blame.map(str::to_string)),
        Val::N(r.detail.clone()),
        Val::N(r.bot_id.clone()),
        Val::N(r.source_message_id.clone()),
        Val::I(r.created_at),
        Val::I(r.updated_at),
        Val::S(r.search_text.clone()),
        Val::S(r.body.clone()),
    ]);
}

fn history_vals(h: &HistoryRow, out: &mut Vec<Val>) {
    out.extend([
        Val::S(h.job_id.clone()),
        Val::I(h.idx),
        Val::I(h.at),
        Val::S(h.action.clone()),
        Val::I(h.attempt),
        Val::N(h.from_state.map(str::to_string)),
        Val::N(h.to_state.map(str::to_string)),
        Val::S(h.actor.clone()),
        Val::N(h.bot_id.clone()),
        Val::N(h.resource.clone()),
        Val::N(h.note.clone()),
    ]);
}

fn attempt_vals(a: &AttemptRow, out: &mut Vec<Val>) {
    out.extend([
        Val::S(a.job_id.clone()),
        Val::I(a.attempt),
        Val::N(a.bot_id.clone()),
        Val::N(a.resource.clone()),
        Val::I(a.started_at),
        Val::NI(a.ended_at),
        Val::N(a.ended_as.clone()),
        Val::N(a.note.clone()),
    ]);
}

/// What a written row is in the archival steps (`crate::archive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// In the bucket: the recorder's write (archive state 0).
    Live,
    /// Already gone from the bucket and its stream, archived at this time
    /// (microseconds): an import (archive state 3).
    Archived(i64),
}

impl HistoryDb {
    /// Records `revisions` (any order, replays welcome) in one
    /// transaction: nothing of the batch is kept unless all of it is.
    pub async fn record(&self, revisions: &[rows::Revision]) -> Result<Recorded, DbError> {
        self.write_batch(revisions, Arrival::Live).await
    }

    /// Imports revisions of jobs the bucket no longer holds (an export
    /// read back, a history loaded for a benchmark), in one transaction
    /// like [`HistoryDb::record`] and as idempotent: a terminal job is
    /// written archived at `now` with nothing left to remove from the
    /// bucket, and counted in the statistics of archived jobs in the same
    /// write; a job not yet terminal is recorded live, for the janitor.
    pub async fn import_archived(
        &self,
        revisions: &[rows::Revision],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Recorded, DbError> {
        self.write_batch(revisions, Arrival::Archived(crate::micros(now)))
            .await
    }

    async fn write_batch(
        &self,
        revisions: &[rows::Revision],
        arrival: Arrival,
    ) -> Result<Recorded, DbError> {
        let folded = rows::fold(revisions);
        let mut done = Recorded::default();
        if folded.is_empty() {
            return Ok(done);
        }
        let mut tx = self.write.begin().await?;
        let existing = self.existing(&mut tx, &folded).await?;
        let mut writes: Vec<(&JobRow, Option<i64>)> = Vec::new();
        let mut tallies: BTreeMap<TallyKey, i64> = BTreeMap::new();
        for f in &folded {
            match rows::apply(existing.get(&f.row.id), &f.row) {
                Apply::Stale => done.stale += 1,
                Apply::Write { untally: key } => {
                    done.written += 1;
                    let archived_at = match arrival {
                        Arrival::Archived(at) if f.row.terminal => Some(at),
                        _ => None,
                    };
                    if let Some(k) = key {
                        if archived_at.is_none() {
                            done.revived += 1;
                        }
                        *tallies.entry(k).or_default() -= 1;
                    }
                    if archived_at.is_some() {
                        *tallies.entry(f.row.tally_key()).or_default() += 1;
                    }
                    writes.push((&f.row, archived_at));
                }
            }
        }
        for chunk in writes.chunks(CHUNK) {
            let mut vals = Vec::with_capacity(chunk.len() * 18);
            for (r, archived_at) in chunk {
                job_vals(r, &mut vals);
                vals.extend([
                    Val::I(if archived_at.is_some() { 3 } else { 0 }),
                    Val::I(i64::from(archived_at.is_some())),
                    Val::NI(*archived_at),
                ]);
            }
            let sql = format!(
                "INSERT INTO jobs ({JOB_COLUMNS}, archive_state, archived, archived_at) VALUES {} \
                 ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, state = excluded.state, \
                 task = excluded.task, pool = excluded.pool, priority = excluded.priority, \
                 attempt = excluded.attempt, blame = excluded.blame, detail = excluded.detail, \
                 bot_id = excluded.bot_id, source_message_id = excluded.source_message_id, \
                 created_at = excluded.created_at, updated_at = excluded.updated_at, \
                 search_text = excluded.search_text, body = excluded.body, \
                 archive_state = excluded.archive_state, archived = excluded.archived, \
                 archived_at = excluded.archived_at \
                 WHERE excluded.rev > jobs.rev",
                value_rows(self.backend, chunk.len(), 18)
            );
            exec(&mut tx, sql, vals).await?;
        }
        add_tallies(&mut tx, self.backend, &tallies).await?;
        let history: Vec<&HistoryRow> = folded.iter().flat_map(|f| &f.history).collect();
        for chunk in history.chunks(CHUNK) {
            let mut vals = Vec::with_capacity(chunk.len() * 11);
            for h in chunk {
                history_vals(h, &mut vals);
            }
            let sql = format!(
                "INSERT INTO history (job_id, idx, at, action, attempt, from_state, to_state, \
                 actor, bot_id, resource, note) VALUES {} ON CONFLICT (job_id, idx) DO NOTHING",
                value_rows(self.backend, chunk.len(), 11)
            );
            exec(&mut tx, sql, vals).await?;
        }
        let attempts: Vec<&AttemptRow> = folded.iter().flat_map(|f| &f.attempts).collect();
        for chunk in attempts.chunks(CHUNK) {
            let mut vals = Vec::with_capacity(chunk.len() * 8);
            for a in chunk {
                attempt_vals(a, &mut vals);
            }
            let sql = format!(
                "INSERT INTO attempts (job_id, attempt, bot_id, resource, started_at, ended_at, \
                 ended_as, note) VALUES {} ON CONFLICT (job_id, attempt) DO UPDATE SET \
                 bot_id = COALESCE(attempts.bot_id, excluded.bot_id), \
                 resource = COALESCE(attempts.resource, excluded.resource), \
                 started_at = CASE WHEN excluded.started_at < attempts.started_at \
                     THEN excluded.started_at ELSE attempts.started_at END, \
                 ended_at = COALESCE(attempts.ended_at, excluded.ended_at), \
                 ended_as = COALESCE(attempts.ended_as, excluded.ended_as), \
                 note = COALESCE(attempts.note, excluded.note)",
                value_rows(self.backend, chunk.len(), 8)
            );
            exec(&mut tx, sql, vals).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// What the database holds of the batch's jobs, locked for this
    /// transaction on PostgreSQL (SQLite has one writer at a time).
    async fn existing(
        &self,
        conn: &mut AnyConnection,
        folded: &[Folded],
    ) -> Result<HashMap<String, Existing>, DbError> {
        let mut out = HashMap::with_capacity(folded.len());
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        for chunk in folded.chunks(500) {
            let sql = format!(
                "SELECT id, rev, archived, state, blame, detail, attempt, updated_at FROM jobs \
                 WHERE id IN ({}){lock}",
                crate::placeholders(self.backend, 1, chunk.len())
            );
            let vals = chunk.iter().map(|f| Val::S(f.row.id.clone())).collect();
            let found = sqlx::query_with(AssertSqlSafe(sql), args(vals)?)
                .fetch_all(&mut *conn)
                .await?;
            for row in found {
                let id: String = row.try_get("id")?;
                let state: String = row.try_get("state")?;
                let blame: Option<String> = row.try_get("blame")?;
                let detail: Option<String> = row.try_get("detail")?;
                let tally = TallyKey::new(
                    row.try_get("updated_at")?,
                    &state,
                    blame.as_deref(),
                    detail.as_deref(),
                    row.try_get("attempt")?,
                );
                let archived: i64 = row.try_get("archived")?;
                out.insert(
                    id,
                    Existing {
                        rev: row.try_get("rev")?,
                        archived: archived != 0,
                        tally,
                    },
                );
            }
        }
        Ok(out)
    }
}

/// Adds `n` to each key's minute and hour cells (a negative `n` takes
/// away).
pub(crate) async fn add_tallies(
    conn: &mut AnyConnection,
    backend: Backend,
    tallies: &BTreeMap<TallyKey, i64>,
) -> Result<(), DbError> {
    for (table, unit) in [("stats_minute", "minute"), ("stats_hour", "hour")] {
        let cells: BTreeMap<(i64, &str, &str, &str, bool), i64> =
            tallies.iter().fold(BTreeMap::new(), |mut acc, (k, n)| {
                let at = if unit == "hour" { k.hour() } else { k.minute };
                *acc.entry((
                    at,
                    k.state.as_str(),
                    k.blame.as_str(),
                    k.detail.as_str(),
                    k.retried,
                ))
                .or_default() += n;
                acc
            });
        let cells: Vec<_> = cells.into_iter().filter(|(_, n)| *n != 0).collect();
        for chunk in cells.chunks(CHUNK) {
            let mut vals = Vec::with_capacity(chunk.len() * 6);
            for ((at, state, blame, detail, retried), n) in chunk {
                vals.extend([
                    Val::I(*at),
                    Val::S(state.to_string()),
                    Val::S(blame.to_string()),
                    Val::S(detail.to_string()),
                    Val::I(i64::from(*retried)),
                    Val::I(*n),
                ]);
            }
            let sql = format!(
                "INSERT INTO {table} ({unit}, state, blame, detail, retried, n) VALUES {} \
                 ON CONFLICT ({unit}, state, blame, detail, retried) \
                 DO UPDATE SET n = {table}.n + excluded.n",
                value_rows(backend, chunk.len(), 6)
            );
            exec(conn, sql, vals).await?;
        }
    }
    Ok(())
}
