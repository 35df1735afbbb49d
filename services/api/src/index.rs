//! The search index: a materialized view of the jobs bucket, kept by a KV
//! watch and rebuilt from scratch at every start. Searches never scan the
//! bucket.
//!
//! [`JobIndex`] is the data structure alone (no I/O, no locking) so it can
//! be replaced by something that scales past iterating every job.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;
use warden_shared::store;
use warden_shared::{Blame, JobState, JobSummary};

use crate::metrics;

/// Which jobs a search wants; `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub state: Option<JobState>,
    pub task: Option<String>,
    pub pool: Option<String>,
    pub blame: Option<Blame>,
    pub detail: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn matches(&self, j: &JobSummary) -> bool {
        self.state.is_none_or(|s| s == j.state)
            && self.task.as_deref().is_none_or(|t| t == j.task)
            && self.pool.as_deref().is_none_or(|p| p == j.pool)
            && self.blame.is_none_or(|b| Some(b) == j.blame)
            && self
                .detail
                .as_deref()
                .is_none_or(|d| Some(d) == j.detail.as_deref())
            && self.since.is_none_or(|t| j.created_at >= t)
            && self.until.is_none_or(|t| j.created_at < t)
    }
}

/// Counts over the jobs last changed within a window.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Jobs whose last change falls in the window.
    pub jobs: usize,
    pub by_state: BTreeMap<String, usize>,
    /// Jobs carrying a blame (crashed, shelved, or waiting for a retry).
    pub by_blame: BTreeMap<String, usize>,
    /// `blame/detail` → count.
    pub by_detail: BTreeMap<String, usize>,
    /// Jobs in the window that needed more than one attempt.
    pub retried: usize,
    pub shelved: usize,
}

/// Every job's summary plus an order by creation time, newest first.
#[derive(Debug, Default)]
pub struct JobIndex {
    jobs: HashMap<Uuid, JobSummary>,
    order: BTreeSet<(Reverse<DateTime<Utc>>, Uuid)>,
    by_state: BTreeMap<JobState, usize>,
}

impl JobIndex {
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn count(&self, state: JobState) -> usize {
        self.by_state.get(&state).copied().unwrap_or(0)
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.jobs.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &Uuid> {
        self.jobs.keys()
    }

    pub fn upsert(&mut self, job: JobSummary) {
        self.remove(&job.id);
        self.order.insert((Reverse(job.created_at), job.id));
        *self.by_state.entry(job.state).or_default() += 1;
        self.jobs.insert(job.id, job);
    }

    pub fn remove(&mut self, id: &Uuid) -> Option<JobSummary> {
        let old = self.jobs.remove(id)?;
        self.order.remove(&(Reverse(old.created_at), old.id));
        if let Some(n) = self.by_state.get_mut(&old.state) {
            *n = n.saturating_sub(1);
        }
        Some(old)
    }

    /// Counts by state, blame and detail over the jobs last changed in
    /// `[since, until)`.
    pub fn stats(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Stats {
        let mut s = Stats {
            since: Some(since),
            until: Some(until),
            ..Stats::default()
        };
        for j in self.jobs.values() {
            if j.updated_at < since || j.updated_at >= until {
                continue;
            }
            s.jobs += 1;
            *s.by_state.entry(j.state.as_str().to_string()).or_default() += 1;
            if let Some(b) = j.blame {
                *s.by_blame.entry(b.as_str().to_string()).or_default() += 1;
                let d = j.detail.as_deref().unwrap_or("unclassified");
                *s.by_detail.entry(format!("{b}/{d}")).or_default() += 1;
            }
            if j.attempt > 1 {
                s.retried += 1;
            }
            if j.state == JobState::Shelved {
                s.shelved += 1;
            }
        }
        s
    }

    /// One page of the jobs matching `filter`, newest first, and how many
    /// match in all.
    pub fn search(&self, filter: &Filter, limit: usize, offset: usize) -> (Vec<JobSummary>, usize) {
        let mut page = Vec::with_capacity(limit.min(self.jobs.len()));
        let mut total = 0;
        for (_, id) in &self.order {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            if !filter.matches(job) {
                continue;
            }
            if total >= offset && page.len() < limit {
                page.push(job.clone());
            }
            total += 1;
        }
        (page, total)
    }
}

/// The index shared between the watch task and request handlers.
pub struct SharedIndex {
    // A std mutex: nothing awaits while it is held, and searches are short.
    index: Mutex<JobIndex>,
    caught_up: watch::Sender<bool>,
}

impl Default for SharedIndex {
    fn default() -> Self {
        SharedIndex {
            index: Mutex::new(JobIndex::default()),
            caught_up: watch::Sender::new(false),
        }
    }
}

impl SharedIndex {
    pub fn lock(&self) -> MutexGuard<'_, JobIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the first pass over the bucket has been applied.
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Waits until the index reflects the bucket, at most `timeout`.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let mut rx = self.caught_up.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await;
        matches!(waited, Ok(Ok(_)))
    }

    fn mark_caught_up(&self) {
        self.caught_up.send_replace(true);
    }

    fn publish_counts(&self) {
        let index = self.lock();
        metrics::set_index_counts(index.len(), |s| index.count(s));
    }

    /// Applies one watch entry; returns the job id it was about, if any.
    fn apply(&self, entry: &kv::Entry) -> Option<Uuid> {
        let Ok(id) = entry.key.parse::<Uuid>() else {
            debug!(key = %entry.key, "ignoring non-job key in jobs bucket");
            return None;
        };
        match entry.operation {
            kv::Operation::Put => match store::decode(&entry.key, &entry.value) {
                Ok(job) => self.lock().upsert(job.summary()),
                Err(e) => {
                    warn!(job.id = %id, error = %e, "undecodable job record left out of the index");
                    self.lock().remove(&id);
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.lock().remove(&id);
            }
        }
        Some(id)
    }
}

/// Keeps `index` equal to the bucket until `shutdown`. A watch delivers
/// every key's latest value first (LastPerSubject), then live changes; on
/// a watch error it starts over, and at the end of each new first pass
/// drops jobs the pass no longer delivered.
pub async fn watch_loop(
    kv: kv::Store,
    index: std::sync::Arc<SharedIndex>,
    shutdown: CancellationToken,
) {
    let mut first = true;
    while !shutdown.is_cancelled() {
        match watch_once(&kv, &index, &shutdown, first).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "jobs watch failed; restarting");
                first = false;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Messages in the bucket's stream right now.
async fn stored_messages(kv: &kv::Store) -> Result<u64, async_nats::Error> {
    let mut stream = kv.stream.clone();
    Ok(stream.info().await?.state.messages)
}

async fn watch_once(
    kv: &kv::Store,
    index: &SharedIndex,
    shutdown: &CancellationToken,
    first: bool,
) -> Result<(), async_nats::Error> {
    // An empty bucket yields no entry at all, so nothing would ever say
    // the first pass is over: ask the stream instead.
    let empty_at_start = stored_messages(kv).await? == 0;
    let mut watch = kv.watch_with_history(">").await?;
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut passed = false;
    let mut applied = 0u64;
    let finish_pass = |seen: &mut HashSet<Uuid>| {
        if !first {
            let mut idx = index.lock();
            let gone: Vec<Uuid> = idx.ids().filter(|id| !seen.contains(id)).copied().collect();
            for id in gone {
                idx.remove(&id);
            }
        }
        seen.clear();
        seen.shrink_to_fit();
        index.mark_caught_up();
        index.publish_counts();
    };
    if empty_at_start {
        passed = true;
        finish_pass(&mut seen);
        info!(jobs = 0, "job index caught up");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick(), if !passed && applied == 0 => {
                // The bucket held messages when asked but the watch has
                // delivered none: they were removed in between.
                if stored_messages(kv).await? == 0 {
                    passed = true;
                    finish_pass(&mut seen);
                    info!(jobs = 0, "job index caught up");
                }
            }
            entry = watch.next() => {
                let entry = match entry {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("jobs watch ended".into()),
                };
                let id = index.apply(&entry);
                applied += 1;
                if passed {
                    index.publish_counts();
                } else {
                    if let Some(id) = id {
                        seen.insert(id);
                    }
                    if entry.delta == 0 || entry.seen_current {
                        passed = true;
                        finish_pass(&mut seen);
                        info!(jobs = index.lock().len(), "job index caught up");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_the_window_by_state_blame_and_detail() {
        let mut idx = JobIndex::default();
        let mut a = job(1, 10, JobState::Crashed, "t", "p");
        a.blame = Some(Blame::Task);
        a.detail = Some("task_exception".into());
        let mut b = job(2, 20, JobState::Shelved, "t", "p");
        b.blame = Some(Blame::ThirdParty);
        b.detail = Some("network".into());
        b.attempt = 3;
        let c = job(3, 30, JobState::Finished, "t", "p");
        let old = job(4, -1000, JobState::Finished, "t", "p");
        for j in [a, b, c, old.clone()] {
            idx.upsert(j);
        }
        let since = old.updated_at + chrono::Duration::seconds(1);
        let until = since + chrono::Duration::days(1);
        let s = idx.stats(since, until);
        assert_eq!(s.jobs, 3, "the old job is outside the window");
        assert_eq!(s.by_state.get("FINISHED"), Some(&1));
        assert_eq!(s.by_blame.get("task"), Some(&1));
        assert_eq!(s.by_detail.get("third_party/network"), Some(&1));
        assert_eq!((s.retried, s.shelved), (1, 1));
        let filter = Filter {
            blame: Some(Blame::ThirdParty),
            ..Filter::default()
        };
        assert_eq!(idx.search(&filter, 10, 0).1, 1);
    }
    use chrono::TimeZone;

    fn job(n: u128, secs: i64, state: JobState, task: &str, pool: &str) -> JobSummary {
        let at = Utc
            .timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("time");
        JobSummary {
            id: Uuid::from_u128(n),
            task: task.into(),
            pool: pool.into(),
            state,
            priority: 0,
            attempt: 0,
            outcome: None,
            blame: None,
            detail: None,
            bot_id: None,
            source_message_id: None,
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn newest_first_with_filters_and_paging() {
        let mut idx = JobIndex::default();
        for i in 0..10u128 {
            let state = if i % 2 == 0 {
                JobState::Scheduled
            } else {
                JobState::Running
            };
            idx.upsert(job(i, i as i64, state, if i < 5 { "a" } else { "b" }, "p"));
        }
        let (all, total) = idx.search(&Filter::default(), 3, 0);
        assert_eq!(total, 10);
        let ids: Vec<u128> = all.iter().map(|j| j.id.as_u128()).collect();
        assert_eq!(ids, vec![9, 8, 7]);
        let (page, _) = idx.search(&Filter::default(), 3, 8);
        assert_eq!(
            page.iter().map(|j| j.id.as_u128()).collect::<Vec<_>>(),
            vec![1, 0]
        );

        let f = Filter {
            state: Some(JobState::Running),
            task: Some("a".into()),
            ..Filter::default()
        };
        let (page, total) = idx.search(&f, 100, 0);
        assert_eq!(total, 2);
        assert_eq!(
            page.iter().map(|j| j.id.as_u128()).collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert_eq!(idx.count(JobState::Running), 5);
    }

    #[test]
    fn upsert_replaces_and_remove_forgets() {
        let mut idx = JobIndex::default();
        idx.upsert(job(1, 0, JobState::Scheduled, "a", "p"));
        idx.upsert(job(1, 0, JobState::Running, "a", "p"));
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.count(JobState::Scheduled), 0);
        assert_eq!(idx.count(JobState::Running), 1);
        let f = Filter {
            state: Some(JobState::Running),
            ..Filter::default()
        };
        assert_eq!(idx.search(&f, 10, 0).1, 1);
        assert!(idx.remove(&Uuid::from_u128(1)).is_some());
        assert!(idx.is_empty());
        assert_eq!(idx.count(JobState::Running), 0);
        assert_eq!(idx.search(&Filter::default(), 10, 0), (vec![], 0));
    }
}
