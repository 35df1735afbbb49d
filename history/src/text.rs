//! Full text: the jobs whose description, log tail or status file hold
//! every word of a query, newest first (creation time, then id), paged,
//! and how many there are, counted up to a cap.
//!
//! The cost of a text search must not grow with the number of jobs that
//! hold its words. Taking every match from the text index and sorting
//! them does: a word in 100,000 of 10 million jobs took half a second,
//! most of it reading each match's whole row. So the searches run on
//! `job_text` (migration 0003), which holds only the jobs with words in
//! them and only what a search filters and orders on, indexed newest
//! first, and the plan depends on how many jobs hold the words:
//!
//! - **Few** (at most `sort_at_most` in the text index on SQLite, at
//!   most the counting cap on PostgreSQL): take them all from the text
//!   index and sort them. The cost is that of the matches, which are few.
//! - **Many**: walk `job_text` newest first (through the index of a
//!   filter, if one is given) and test each job's words, until the page is
//!   full. The matches are dense, so the walk is short. PostgreSQL tests
//!   the words stored in the row. SQLite's text index cannot test one row
//!   cheaply, so the walk goes a window of `window` jobs at a time and
//!   asks the text index once for the matches among the window's rowids
//!   (they rise with creation time, so the range is tight).
//!
//! A walk that finds the words too thin to fill the page within
//! `walk_windows` windows (a common word, but rare under the filters
//! given) falls back to sorting. Counting stops at
//! [`TEXT_COUNTED_PAST_PAGE`] past the page (a lower cap than other
//! searches': counting is finding); on SQLite, with filters given, it
//! also stops where the walk stops, and the total is then "at least"
//! (not exact).
//!
//! Both databases' bodies come from `jobs`, for the page's jobs only.

use std::collections::{HashMap, HashSet};

use sqlx::{AssertSqlSafe, Row};

use crate::read::{as_i64, decode, filters, where_clause, Page, Search};
use crate::write::{args, Val};
use crate::{placeholders, Backend, DbError, HistoryDb};

/// Full text counts at most this many matches past the page (other
/// searches count up to the caller's cap): every match counted is a match
/// found, and a word in 100,000 jobs is not counted to 10,000 in 50 ms.
/// Past it the total is a lower bound (`total_exact` false), as past any
/// cap.
pub const TEXT_COUNTED_PAST_PAGE: usize = 1_000;

/// Where the plans change ([`HistoryDb::with_text_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimits {
    /// SQLite sorts the matches when the text index has at most this many.
    pub sort_at_most: usize,
    /// Jobs per window of SQLite's walk.
    pub window: usize,
    /// Windows a walk takes before it falls back to sorting.
    pub walk_windows: usize,
}

impl Default for TextLimits {
    fn default() -> TextLimits {
        TextLimits {
            sort_at_most: 2_000,
            window: 1_024,
            walk_windows: 64,
        }
    }
}

/// The SQLite text index's query for `words`: each word a quoted string
/// (so nothing in it is syntax), all of them required.
pub fn fts_query(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("\"{}\"", w.replace('"', "")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The PostgreSQL query for `words` (`to_tsquery('simple', …)`): all of
/// them required. The words are letters and digits only
/// ([`crate::read::words`]), so nothing in them is syntax.
pub fn ts_query(words: &[String]) -> String {
    words.join(" & ")
}

/// How a page and its count came about: what the tests and the bench
/// look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Sort,
    Walk,
    WalkThenSort,
}

/// Where the match at position `i` (0-based, newest first) goes: into the
/// page, or only into the count.
fn in_page(i: usize, offset: usize, limit: usize) -> bool {
    i >= offset && i - offset < limit
}

impl HistoryDb {
    /// The same database with other plan limits: what the tests use to
    /// take every plan with a few dozen jobs.
    pub fn with_text_limits(mut self, limits: TextLimits) -> HistoryDb {
        self.text_limits = limits;
        self
    }

    pub(crate) async fn search_text(
        &self,
        s: &Search,
        words: &[String],
        limit: usize,
        offset: usize,
        cap: usize,
    ) -> Result<Page, DbError> {
        Ok(self
            .search_text_planned(s, words, limit, offset, cap)
            .await?
            .0)
    }

    /// [`HistoryDb::search`] with words, and the plan it took.
    pub async fn search_text_planned(
        &self,
        s: &Search,
        words: &[String],
        limit: usize,
        offset: usize,
        cap: usize,
    ) -> Result<(Page, Plan), DbError> {
        if words.is_empty() {
            // Nothing to look for matches nothing.
            return Ok((
                Page {
                    total_exact: true,
                    ..Page::default()
                },
                Plan::Sort,
            ));
        }
        let counted = offset
            .saturating_add(limit)
            .saturating_add(cap.min(TEXT_COUNTED_PAST_PAGE));
        let (seqs, total, plan) = match self.backend {
            Backend::Sqlite => self.sqlite_text(s, words, limit, offset, counted).await?,
            Backend::Postgres => self.postgres_text(s, words, limit, offset, counted).await?,
        };
        let jobs = self.summaries(&seqs).await?;
        let (total, total_exact) = match total {
            Total::Counted(n) => (n.min(counted), n <= counted),
            Total::AtLeast(n) => (n.min(counted), false),
        };
        Ok((
            Page {
                jobs,
                total,
                total_exact,
            },
            plan,
        ))
    }

    /// The jobs of `seqs`, in that order.
    async fn summaries(&self, seqs: &[i64]) -> Result<Vec<warden_shared::JobSummary>, DbError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT seq, id, body FROM jobs WHERE seq IN ({})",
            placeholders(self.backend, 1, seqs.len())
        );
        let rows = sqlx::query_with(
            AssertSqlSafe(sql),
            args(seqs.iter().map(|s| Val::I(*s)).collect())?,
        )
        .fetch_all(&self.read)
        .await?;
        let mut by_seq = HashMap::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get("seq")?;
            let id: String = r.try_get("id")?;
            let body: String = r.try_get("body")?;
            by_seq.insert(seq, decode(&id, &body)?.summary());
        }
        // A job removed between the two reads (retention) is left out.
        Ok(seqs.iter().filter_map(|s| by_seq.remove(s)).collect())
    }

    /// `SELECT COUNT(*)` of `from_where`'s rows, counting at most `upto`.
    async fn count_upto(
        &self,
        from_where: &str,
        vals: Vec<Val>,
        upto: usize,
    ) -> Result<usize, DbError> {
        let mut conn = self.read.acquire().await?;
        count_upto_in(&mut conn, from_where, vals, upto).await
    }

    /// A read transaction on PostgreSQL with the planner's `setting` (one
    /// of its `enable_*` switches) off until it ends.
    async fn steered(
        &self,
        setting: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, DbError> {
        let mut tx = self.read.begin().await?;
        sqlx::query(AssertSqlSafe(format!("SET LOCAL {setting} = off")))
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// The seqs of one page of `job_text` rows matching `conds`, newest
    /// first; `sort` keeps the planner off the creation-time index (so
    /// it takes the few matches from the text index and sorts them).
    async fn page_seqs(
        &self,
        conds: &[String],
        mut vals: Vec<Val>,
        limit: usize,
        offset: usize,
        sort: bool,
    ) -> Result<Vec<i64>, DbError> {
        let order = match (sort, self.backend) {
            (false, _) => "created_at DESC, id",
            (true, Backend::Sqlite) => "+created_at DESC, id",
            (true, Backend::Postgres) => "created_at + 0 DESC, id",
        };
        vals.push(Val::I(as_i64(limit)));
        vals.push(Val::I(as_i64(offset)));
        let sql = format!(
            "SELECT seq FROM job_text{} ORDER BY {order} LIMIT ${} OFFSET ${}",
            where_clause(conds),
            vals.len() - 1,
            vals.len()
        );
        let query = sqlx::query_scalar_with(AssertSqlSafe(sql), args(vals)?);
        if sort || self.backend == Backend::Sqlite {
            return Ok(query.fetch_all(&self.read).await?);
        }
        // PostgreSQL, walking: without bitmap scans the only way to the
        // rows in order is the creation-time index (or a filter's).
        let mut tx = self.steered("enable_bitmapscan").await?;
        let seqs = query.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(seqs)
    }

    async fn postgres_text(
        &self,
        s: &Search,
        words: &[String],
        limit: usize,
        offset: usize,
        counted: usize,
    ) -> Result<(Vec<i64>, Total, Plan), DbError> {
        let (mut conds, mut vals) = filters(s);
        let filtered = !conds.is_empty();
        vals.push(Val::S(ts_query(words)));
        conds.push(format!("words @@ to_tsquery('simple', ${})", vals.len()));
        let from_where = format!("job_text{}", where_clause(&conds));
        let total = if filtered {
            // Left to itself the planner counts a common word under a
            // filter by reading the table, testing the words of every row
            // until the cap (47 ms for a word in 1 of 4 jobs with text and
            // a task in 1 of 20); through the filter's index and the text
            // index it takes half that.
            let mut tx = self.steered("enable_seqscan").await?;
            let n = count_upto_in(
                &mut tx,
                &from_where,
                vals.clone(),
                counted.saturating_add(1),
            )
            .await?;
            tx.commit().await?;
            n
        } else {
            self.count_upto(&from_where, vals.clone(), counted.saturating_add(1))
                .await?
        };
        // Every match was counted: sorting them costs what counting did.
        let sort = total <= counted;
        let seqs = self.page_seqs(&conds, vals, limit, offset, sort).await?;
        Ok((
            seqs,
            Total::Counted(total),
            if sort { Plan::Sort } else { Plan::Walk },
        ))
    }

    async fn sqlite_text(
        &self,
        s: &Search,
        words: &[String],
        limit: usize,
        offset: usize,
        counted: usize,
    ) -> Result<(Vec<i64>, Total, Plan), DbError> {
        let q = fts_query(words);
        let in_text = "jobs_text WHERE jobs_text MATCH $1";
        let in_index = self
            .count_upto(
                in_text,
                vec![Val::S(q.clone())],
                self.text_limits.sort_at_most + 1,
            )
            .await?;
        let (conds, vals) = filters(s);
        let filtered = !conds.is_empty();
        if in_index <= self.text_limits.sort_at_most {
            let (seqs, total) = self
                .sqlite_sorted(&q, conds, vals, limit, offset, counted)
                .await?;
            return Ok((seqs, Total::Counted(total), Plan::Sort));
        }
        let want = offset.saturating_add(limit);
        // Without filters the text index counts alone, and cheaply.
        let stop_at = if filtered {
            counted.saturating_add(1)
        } else {
            want
        };
        let walk = self
            .sqlite_walk(&q, &conds, &vals, limit, offset, stop_at)
            .await?;
        if !walk.exhausted && walk.matched < want {
            let (seqs, total) = self
                .sqlite_sorted(&q, conds, vals, limit, offset, counted)
                .await?;
            return Ok((seqs, Total::Counted(total), Plan::WalkThenSort));
        }
        let total = if !filtered {
            Total::Counted(
                self.count_upto(in_text, vec![Val::S(q)], counted.saturating_add(1))
                    .await?,
            )
        } else if walk.exhausted || walk.matched > counted {
            Total::Counted(walk.matched)
        } else {
            // The walk stopped at its last window short of the cap: at
            // least this many.
            Total::AtLeast(walk.matched)
        };
        Ok((walk.page, total, Plan::Walk))
    }

    /// SQLite, few matches: all of them from the text index, filtered and
    /// sorted; the count is exact (there are few).
    async fn sqlite_sorted(
        &self,
        q: &str,
        mut conds: Vec<String>,
        mut vals: Vec<Val>,
        limit: usize,
        offset: usize,
        counted: usize,
    ) -> Result<(Vec<i64>, usize), DbError> {
        vals.push(Val::S(q.to_string()));
        conds.push(format!(
            "seq IN (SELECT rowid FROM jobs_text WHERE jobs_text MATCH ${})",
            vals.len()
        ));
        let total = self
            .count_upto(
                &format!("job_text{}", where_clause(&conds)),
                vals.clone(),
                counted.saturating_add(1),
            )
            .await?;
        let seqs = self.page_seqs(&conds, vals, limit, offset, true).await?;
        Ok((seqs, total))
    }

    /// SQLite, many matches: `job_text` newest first, a window at a time,
    /// each window's matches from the text index by rowid range; stops
    /// after `stop_at` matches, at the end of the rows, or after
    /// `walk_windows` windows.
    async fn sqlite_walk(
        &self,
        q: &str,
        conds: &[String],
        vals: &[Val],
        limit: usize,
        offset: usize,
        stop_at: usize,
    ) -> Result<Walk, DbError> {
        let mut walk = Walk::default();
        let mut after: Option<(i64, String)> = None;
        let window_len = self.text_limits.window.max(1);
        for _ in 0..self.text_limits.walk_windows {
            let mut conds = conds.to_vec();
            let mut vals = vals.to_vec();
            if let Some((created, id)) = &after {
                vals.push(Val::I(*created));
                let c = vals.len();
                vals.push(Val::S(id.clone()));
                let i = vals.len();
                // The range on created_at is the index's; the rest picks
                // up after the last job of the window before among ties.
                conds.push(format!(
                    "created_at <= ${c} AND (created_at < ${c} OR id > ${i})"
                ));
            }
            vals.push(Val::I(as_i64(window_len)));
            let sql = format!(
                "SELECT seq, created_at, id FROM job_text{} ORDER BY created_at DESC, id LIMIT ${}",
                where_clause(&conds),
                vals.len()
            );
            let rows = sqlx::query_with(AssertSqlSafe(sql), args(vals)?)
                .fetch_all(&self.read)
                .await?;
            let mut window = Vec::with_capacity(rows.len());
            for r in &rows {
                let seq: i64 = r.try_get("seq")?;
                let created: i64 = r.try_get("created_at")?;
                let id: String = r.try_get("id")?;
                window.push((seq, created, id));
            }
            let (Some(lo), Some(hi)) = (
                window.iter().map(|w| w.0).min(),
                window.iter().map(|w| w.0).max(),
            ) else {
                walk.exhausted = true;
                return Ok(walk);
            };
            let hits: HashSet<i64> = sqlx::query_scalar_with(
                "SELECT rowid FROM jobs_text WHERE jobs_text MATCH $1 AND rowid >= $2 AND rowid <= $3",
                args(vec![Val::S(q.to_string()), Val::I(lo), Val::I(hi)])?,
            )
            .fetch_all(&self.read)
            .await?
            .into_iter()
            .collect();
            let full = window.len() == window_len;
            for (seq, created, id) in window {
                if hits.contains(&seq) {
                    if in_page(walk.matched, offset, limit) {
                        walk.page.push(seq);
                    }
                    walk.matched += 1;
                    if walk.matched >= stop_at {
                        return Ok(walk);
                    }
                }
                after = Some((created, id));
            }
            if !full {
                walk.exhausted = true;
                return Ok(walk);
            }
        }
        Ok(walk)
    }
}

/// A search's count: every match up to the cap, or only some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Total {
    Counted(usize),
    AtLeast(usize),
}

/// What a SQLite walk found.
#[derive(Debug, Default)]
struct Walk {
    /// The page's seqs, newest first.
    page: Vec<i64>,
    /// Matches seen (page and before it and after it).
    matched: usize,
    /// Whether it saw every row under the filters.
    exhausted: bool,
}

/// [`HistoryDb::count_upto`] on a connection of the caller's (a
/// transaction with the planner steered).
async fn count_upto_in(
    conn: &mut sqlx::AnyConnection,
    from_where: &str,
    mut vals: Vec<Val>,
    upto: usize,
) -> Result<usize, DbError> {
    vals.push(Val::I(as_i64(upto)));
    let sql = format!(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT 1 AS one FROM {from_where} LIMIT ${}) AS m",
        vals.len()
    );
    let n: i64 = sqlx::query_scalar_with(AssertSqlSafe(sql), args(vals)?)
        .fetch_one(&mut *conn)
        .await?;
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_in_a_word_cannot_escape_the_text_query() {
        let w = vec!["a".to_string(), "\"or\"".to_string(), "b".to_string()];
        assert_eq!(fts_query(&w), "\"a\" \"or\" \"b\"");
        assert_eq!(ts_query(&["x".into(), "y".into()]), "x & y");
    }

    #[test]
    fn the_page_takes_the_matches_after_the_offset_up_to_the_limit() {
        let page: Vec<usize> = (0..20).filter(|i| in_page(*i, 5, 3)).collect();
        assert_eq!(page, vec![5, 6, 7]);
        assert!(!(0..20).any(|i| in_page(i, 5, 0)));
    }
}
