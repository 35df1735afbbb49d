//! Reading the execution database: one job, a search (the API's filters
//! and full text, newest first, paged), counts over any window, and an
//! export as JSON lines.

use std::collections::BTreeMap;
use std::io::Write;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;
use warden_shared::{Job, JobSummary};

use crate::rows::MINUTE_MICROS;
use crate::write::{args, Val};
use crate::{micros, DbError, HistoryDb};

/// What a search wants; `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    pub state: Option<String>,
    pub task: Option<String>,
    pub pool: Option<String>,
    pub blame: Option<String>,
    pub detail: Option<String>,
    pub bot_id: Option<String>,
    pub source_message_id: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Words that must all be in the job's description, log
    /// tail or status file (any case; punctuation separates words).
    pub text: Option<String>,
    /// Only archived jobs (what the API merges with its live index);
    /// otherwise every job recorded.
    pub archived_only: bool,
}

/// One page of a search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub jobs: Vec<JobSummary>,
    /// Matches in all, counted up to the cap the search was given.
    pub total: usize,
    pub total_exact: bool,
}

/// Counts over archived jobs last changed within a window (the API adds
/// its live jobs' counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub jobs: usize,
    pub by_state: BTreeMap<String, usize>,
    pub by_blame: BTreeMap<String, usize>,
    /// `blame/detail` → count (`unclassified` for a blame with no detail).
    pub by_detail: BTreeMap<String, usize>,
    pub retried: usize,
    pub shelved: usize,
}

impl Counts {
    fn add(&mut self, state: &str, blame: &str, detail: &str, retried: bool, n: i64) {
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return;
        }
        self.jobs += n;
        *self.by_state.entry(state.to_string()).or_default() += n;
        if !blame.is_empty() {
            *self.by_blame.entry(blame.to_string()).or_default() += n;
            let d = if detail.is_empty() {
                "unclassified"
            } else {
                detail
            };
            *self.by_detail.entry(format!("{blame}/{d}")).or_default() += n;
        }
        if retried {
            self.retried += n;
        }
        if state == "SHELVED" {
            self.shelved += n;
        }
    }
}

/// The words of a full-text query: runs of letters and digits, lower
/// case (what both databases' tokenizers make of the stored text).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .take(16)
        .collect()
}

/// The filters of `s` other than its words, as conditions on columns
/// `jobs` and `job_text` share, and their values, numbered from `$1`.
pub(crate) fn filters(s: &Search) -> (Vec<String>, Vec<Val>) {
    let mut conds: Vec<String> = Vec::new();
    let mut vals: Vec<Val> = Vec::new();
    let eq = |col: &str, v: &Option<String>, conds: &mut Vec<String>, vals: &mut Vec<Val>| {
        if let Some(v) = v {
            vals.push(Val::S(v.clone()));
            conds.push(format!("{col} = ${}", vals.len()));
        }
    };
    eq("state", &s.state, &mut conds, &mut vals);
    eq("task", &s.task, &mut conds, &mut vals);
    eq("pool", &s.pool, &mut conds, &mut vals);
    eq("blame", &s.blame, &mut conds, &mut vals);
    eq("detail", &s.detail, &mut conds, &mut vals);
    eq("bot_id", &s.bot_id, &mut conds, &mut vals);
    eq(
        "source_message_id",
        &s.source_message_id,
        &mut conds,
        &mut vals,
    );
    if s.archived_only {
        conds.push("archived = 1".into());
    }
    if let Some(t) = s.since {
        vals.push(Val::I(micros(t)));
        conds.push(format!("created_at >= ${}", vals.len()));
    }
    if let Some(t) = s.until {
        vals.push(Val::I(micros(t)));
        conds.push(format!("created_at < ${}", vals.len()));
    }
    (conds, vals)
}

/// ` WHERE a AND b`, or nothing.
pub(crate) fn where_clause(conds: &[String]) -> String {
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

pub(crate) fn decode(id: &str, body: &str) -> Result<Job, DbError> {
    serde_json::from_str(body).map_err(|source| DbError::Decode {
        id: id.to_string(),
        source,
    })
}

impl HistoryDb {
    /// The job as last recorded, with its revision; `None` if the
    /// database never saw it.
    pub async fn get(&self, id: &Uuid) -> Result<Option<(u64, Job)>, DbError> {
        let row = sqlx::query_with(
            "SELECT rev, body FROM jobs WHERE id = $1",
            args(vec![Val::S(id.to_string())])?,
        )
        .fetch_optional(&self.read)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let rev: i64 = row.try_get("rev")?;
        let body: String = row.try_get("body")?;
        Ok(Some((
            u64::try_from(rev).unwrap_or(0),
            decode(&id.to_string(), &body)?,
        )))
    }

    /// Whether the job is archived (no longer the bucket's to serve).
    pub async fn is_archived(&self, id: &Uuid) -> Result<bool, DbError> {
        let n: Option<i64> = sqlx::query_scalar_with(
            "SELECT archived FROM jobs WHERE id = $1",
            args(vec![Val::S(id.to_string())])?,
        )
        .fetch_optional(&self.read)
        .await?;
        Ok(n == Some(1))
    }

    /// The matches of `s` newest first (creation time, then id), `limit`
    /// of them after skipping `offset`, and how many match, counted up to
    /// `offset + limit + cap`.
    pub async fn search(
        &self,
        s: &Search,
        limit: usize,
        offset: usize,
        cap: usize,
    ) -> Result<Page, DbError> {
        if let Some(text) = &s.text {
            return self.search_text(s, &words(text), limit, offset, cap).await;
        }
        let (conds, vals) = filters(s);
        let clause = where_clause(&conds);
        let n = vals.len();
        let mut page_vals = vals.clone();
        page_vals.push(Val::I(as_i64(limit)));
        page_vals.push(Val::I(as_i64(offset)));
        let sql = format!(
            "SELECT id, body FROM jobs{clause} ORDER BY created_at DESC, id ASC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let rows = sqlx::query_with(AssertSqlSafe(sql), args(page_vals)?)
            .fetch_all(&self.read)
            .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get("id")?;
            let body: String = r.try_get("body")?;
            jobs.push(decode(&id, &body)?.summary());
        }
        let counted = offset.saturating_add(limit).saturating_add(cap);
        let mut count_vals = vals;
        count_vals.push(Val::I(as_i64(counted.saturating_add(1))));
        let sql = format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT 1 AS one FROM jobs{clause} LIMIT ${}) AS matches",
            n + 1
        );
        let total: i64 = sqlx::query_scalar_with(AssertSqlSafe(sql), args(count_vals)?)
            .fetch_one(&self.read)
            .await?;
        let total = usize::try_from(total).unwrap_or(0);
        Ok(Page {
            jobs,
            total: total.min(counted),
            total_exact: total <= counted,
        })
    }

    /// Counts over the archived jobs last changed in `[since, until)`:
    /// whole hours and minutes from the statistics tables, the partial
    /// minutes at either end job by job.
    pub async fn counts(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Counts, DbError> {
        let (from, to) = (micros(since), micros(until));
        let mut c = Counts::default();
        if from >= to {
            return Ok(c);
        }
        let ceil = |x: i64, unit: i64| x.div_euclid(unit) + i64::from(x.rem_euclid(unit) != 0);
        let (m0, m1) = (ceil(from, MINUTE_MICROS), to.div_euclid(MINUTE_MICROS));
        if m0 >= m1 {
            self.count_jobs(from, to, &mut c).await?;
            return Ok(c);
        }
        self.count_jobs(from, m0 * MINUTE_MICROS, &mut c).await?;
        let (h0, h1) = (ceil(m0, 60), m1.div_euclid(60));
        if h0 < h1 {
            self.count_cells("stats_minute", "minute", m0, h0 * 60, &mut c)
                .await?;
            self.count_cells("stats_hour", "hour", h0, h1, &mut c)
                .await?;
            self.count_cells("stats_minute", "minute", h1 * 60, m1, &mut c)
                .await?;
        } else {
            self.count_cells("stats_minute", "minute", m0, m1, &mut c)
                .await?;
        }
        self.count_jobs(m1 * MINUTE_MICROS, to, &mut c).await?;
        Ok(c)
    }

    async fn count_cells(
        &self,
        table: &str,
        unit: &str,
        a: i64,
        b: i64,
        c: &mut Counts,
    ) -> Result<(), DbError> {
        if a >= b {
            return Ok(());
        }
        let sql = format!(
            "SELECT state, blame, detail, retried, CAST(SUM(n) AS BIGINT) AS n FROM {table} \
             WHERE {unit} >= $1 AND {unit} < $2 GROUP BY state, blame, detail, retried"
        );
        let rows = sqlx::query_with(AssertSqlSafe(sql), args(vec![Val::I(a), Val::I(b)])?)
            .fetch_all(&self.read)
            .await?;
        for r in &rows {
            let state: String = r.try_get("state")?;
            let blame: String = r.try_get("blame")?;
            let detail: String = r.try_get("detail")?;
            let retried: i64 = r.try_get("retried")?;
            let n: i64 = r.try_get("n")?;
            c.add(&state, &blame, &detail, retried != 0, n);
        }
        Ok(())
    }

    async fn count_jobs(&self, a: i64, b: i64, c: &mut Counts) -> Result<(), DbError> {
        if a >= b {
            return Ok(());
        }
        let rows = sqlx::query_with(
            "SELECT state, blame, detail, attempt FROM jobs \
             WHERE archived = 1 AND updated_at >= $1 AND updated_at < $2",
            args(vec![Val::I(a), Val::I(b)])?,
        )
        .fetch_all(&self.read)
        .await?;
        for r in &rows {
            let state: String = r.try_get("state")?;
            let blame: Option<String> = r.try_get("blame")?;
            let detail: Option<String> = r.try_get("detail")?;
            let attempt: i64 = r.try_get("attempt")?;
            c.add(
                &state,
                blame.as_deref().unwrap_or(""),
                detail.as_deref().unwrap_or(""),
                attempt > 1,
                1,
            );
        }
        Ok(())
    }

    /// Writes every job recorded (archived or not) created in
    /// `[since, until)` to `out`, one JSON record per line, oldest
    /// recorded first; returns how many.
    pub async fn export(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        out: &mut (impl Write + Send),
    ) -> Result<usize, DbError> {
        let from = since.map(micros).unwrap_or(i64::MIN);
        let to = until.map(micros).unwrap_or(i64::MAX);
        let mut rows = sqlx::query_with(
            "SELECT body FROM jobs WHERE created_at >= $1 AND created_at < $2 ORDER BY seq",
            args(vec![Val::I(from), Val::I(to)])?,
        )
        .fetch(&self.read);
        let mut n = 0;
        while let Some(r) = rows.try_next().await? {
            let body: String = r.try_get("body")?;
            out.write_all(body.as_bytes())
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|e| DbError::Sql(sqlx::Error::Io(e)))?;
            n += 1;
        }
        Ok(n)
    }

    /// How many rows each table holds: what the fault tests count.
    pub async fn row_counts(&self) -> Result<RowCounts, DbError> {
        let mut out = RowCounts::default();
        for (table, slot) in [
            ("jobs", &mut out.jobs),
            ("history", &mut out.history),
            ("attempts", &mut out.attempts),
        ] {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM {table}"
            )))
            .fetch_one(&self.read)
            .await?;
            *slot = u64::try_from(n).unwrap_or(0);
        }
        out.archived = self.job_counts().await?.1;
        Ok(out)
    }

    /// How many jobs the database holds, and how many of them archived.
    pub async fn job_counts(&self) -> Result<(u64, u64), DbError> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n, \
             CAST(COALESCE(SUM(archived), 0) AS BIGINT) AS archived FROM jobs",
        )
        .fetch_one(&self.read)
        .await?;
        let n: i64 = row.try_get("n")?;
        let a: i64 = row.try_get("archived")?;
        Ok((u64::try_from(n).unwrap_or(0), u64::try_from(a).unwrap_or(0)))
    }
}

/// Rows per table ([`HistoryDb::row_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowCounts {
    pub jobs: u64,
    pub archived: u64,
    pub history: u64,
    pub attempts: u64,
}

pub(crate) fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_words_are_letters_and_digits_in_lower_case() {
        assert_eq!(
            words("Could not resolve host: Mirrors.FedoraProject.org!"),
            vec![
                "could",
                "not",
                "resolve",
                "host",
                "mirrors",
                "fedoraproject",
                "org"
            ]
        );
        assert!(words(" -- \"*\" ").is_empty());
    }
}
