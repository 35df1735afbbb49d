//! The API's side of the execution database: opened in the background
//! (the API serves live jobs while the database is still unreachable),
//! and the merge of live jobs (the index) with archived ones (the
//! database) into one newest-first page.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;
use warden_history::HistoryDb;
use warden_shared::JobSummary;

use crate::index::{Filter, Stats};

/// The database, once open; `configured` false: there is none (every job
/// stays in the bucket, so the index has them all).
#[derive(Clone, Default)]
pub struct History {
    configured: bool,
    db: Arc<tokio::sync::watch::Sender<Option<HistoryDb>>>,
}

impl History {
    /// No database.
    pub fn none() -> History {
        History::default()
    }

    /// Opens `url` in the background until it succeeds or `shutdown`.
    pub fn open_in_background(url: String, shutdown: CancellationToken) -> History {
        let h = History {
            configured: true,
            db: Arc::new(tokio::sync::watch::Sender::new(None)),
        };
        let cell = h.db.clone();
        tokio::spawn(async move {
            match HistoryDb::open_waiting("api", &url, &shutdown, |_| {}).await {
                Ok(Some(db)) => {
                    info!(
                        backend = db.backend().as_str(),
                        "api reads the history database"
                    );
                    cell.send_replace(Some(db));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "cannot use the history database; archived jobs are not served")
                }
            }
        });
        h
    }

    pub fn configured(&self) -> bool {
        self.configured
    }

    /// The database if there is one and it is open, waiting at most
    /// `wait` for it to open (a start: the API answers before its
    /// database is ready).
    pub async fn db(&self, wait: Duration) -> Option<HistoryDb> {
        if let Some(db) = self.db.borrow().as_ref() {
            return Some(db.clone());
        }
        let mut rx = self.db.subscribe();
        let opened = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        match opened {
            Ok(Ok(db)) => db.clone(),
            _ => None,
        }
    }
}

/// The database search of the archived jobs matching `f`.
pub fn archived_search(
    f: &Filter,
    text: Option<String>,
    archived_only: bool,
) -> warden_history::Search {
    warden_history::Search {
        state: f.state.map(|s| s.as_str().to_string()),
        task: f.task.clone(),
        pool: f.pool.clone(),
        blame: f.blame.map(|b| b.as_str().to_string()),
        detail: f.detail.clone(),
        bot_id: f.bot_id.clone(),
        source_message_id: f.source_message_id.clone(),
        since: f.since,
        until: f.until,
        text,
        archived_only,
    }
}

/// A place in the newest-first order: the jobs after it come on the next
/// page (`after=`), whatever was created since. Written
/// `<created_at in microseconds>.<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_us: i64,
    pub id: Uuid,
}

impl Cursor {
    pub fn of(j: &JobSummary) -> Cursor {
        Cursor {
            created_us: j.created_at.timestamp_micros(),
            id: j.id,
        }
    }

    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_us, self.id)
    }

    pub fn parse(s: &str) -> Option<Cursor> {
        let (t, id) = s.trim().split_once('.')?;
        Some(Cursor {
            created_us: t.parse().ok()?,
            id: id.parse().ok()?,
        })
    }

    /// Whether `j` comes after the cursor in the listing order.
    pub fn is_before(&self, j: &JobSummary) -> bool {
        order_key(j) > (Reverse(self.created_us), self.id)
    }

    /// The creation-time bound (exclusive) a search after the cursor
    /// needs: jobs made in the cursor's microsecond or earlier.
    pub fn until(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::from_timestamp_micros(self.created_us.saturating_add(1))
    }
}

/// The order of every listing: newest first, then by id.
fn order_key(j: &JobSummary) -> (Reverse<i64>, Uuid) {
    (Reverse(j.created_at.timestamp_micros()), j.id)
}

/// Live jobs and archived jobs (each newest first, each the first
/// `offset + limit` of its side) merged into the page at `offset`. An
/// archived job still in the index (the moment between its archival and
/// the index seeing its delete) is the index's.
pub fn merge(
    live: Vec<JobSummary>,
    archived: Vec<JobSummary>,
    is_live: impl Fn(&Uuid) -> bool,
    limit: usize,
    offset: usize,
) -> Vec<JobSummary> {
    let archived = archived.into_iter().filter(|j| !is_live(&j.id));
    let mut all: Vec<JobSummary> = live.into_iter().chain(archived).collect();
    all.sort_by_key(order_key);
    all.dedup_by_key(|j| j.id);
    all.into_iter().skip(offset).take(limit).collect()
}

/// The live counts plus the archived ones.
pub fn add_counts(stats: &mut Stats, c: &warden_history::Counts) {
    stats.jobs += c.jobs;
    for (k, n) in &c.by_state {
        *stats.by_state.entry(k.clone()).or_default() += n;
    }
    for (k, n) in &c.by_blame {
        *stats.by_blame.entry(k.clone()).or_default() += n;
    }
    for (k, n) in &c.by_detail {
        *stats.by_detail.entry(k.clone()).or_default() += n;
    }
    stats.retried += c.retried;
    stats.shelved += c.shelved;
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};
    use warden_shared::Job;

    fn at(minutes: i64, id: u128) -> JobSummary {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
            .single()
            .unwrap_or_default()
            + Duration::minutes(minutes);
        Job::builder("build")
            .id(Uuid::from_u128(id))
            .at(t)
            .build()
            .summary()
    }

    #[test]
    fn pages_interleave_live_and_archived_newest_first_without_doubles() {
        let live = vec![at(9, 1), at(5, 2), at(5, 3)];
        // Job 2 was archived but the index still has it.
        let archived = vec![at(8, 10), at(5, 2), at(4, 11), at(1, 12)];
        let is_live = |id: &Uuid| [1u128, 2, 3].contains(&id.as_u128());
        let ids = |v: Vec<JobSummary>| v.iter().map(|j| j.id.as_u128()).collect::<Vec<_>>();
        assert_eq!(
            ids(merge(live.clone(), archived.clone(), is_live, 10, 0)),
            vec![1, 10, 2, 3, 11, 12]
        );
        assert_eq!(
            ids(merge(live.clone(), archived.clone(), is_live, 2, 2)),
            vec![2, 3]
        );
        assert_eq!(
            ids(merge(live, archived, is_live, 10, 6)),
            Vec::<u128>::new()
        );
    }

    #[test]
    fn a_cursor_continues_after_its_job_whatever_came_since() {
        let page = [at(9, 1), at(5, 2), at(5, 3), at(4, 4)];
        let c = Cursor::of(&page[1]);
        assert_eq!(Cursor::parse(&c.encode()), Some(c));
        assert!(Cursor::parse("yesterday.x").is_none());
        let after: Vec<u128> = page
            .iter()
            .filter(|j| c.is_before(j))
            .map(|j| j.id.as_u128())
            .collect();
        assert_eq!(after, vec![3, 4]);
        // A job created later is never after the cursor.
        assert!(!c.is_before(&at(10, 9)));
        assert!(c.until().is_some_and(|u| u > page[1].created_at));
    }

    #[test]
    fn archived_counts_add_to_live_ones() {
        let mut s = Stats {
            jobs: 2,
            ..Stats::default()
        };
        s.by_state.insert("FINISHED".into(), 2);
        let mut c = warden_history::Counts {
            jobs: 3,
            retried: 1,
            ..Default::default()
        };
        c.by_state.insert("FINISHED".into(), 1);
        c.by_state.insert("CRASHED".into(), 2);
        add_counts(&mut s, &c);
        assert_eq!(s.jobs, 5);
        assert_eq!(s.by_state.get("FINISHED"), Some(&3));
        assert_eq!(s.by_state.get("CRASHED"), Some(&2));
        assert_eq!(s.retried, 1);
    }
}
