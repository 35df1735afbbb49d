//! The search index: a materialized view of the jobs bucket, kept by a KV
//! watch (the bucket's stream of job changes) and rebuilt from scratch at
//! every start. Searches and statistics never scan the bucket, and never
//! scan every job either:
//!
//! - every facet value (a state, task, pool, blame, detail, bot, source
//!   message) has a posting set of its jobs ordered newest first, so a
//!   search walks the smallest set that applies, within the time range;
//! - statistics add up per-minute tallies, kept as jobs change, and look
//!   at single jobs only in the two partial minutes at the window's ends.
//!
//! [`JobIndex`] is the data structure alone (no I/O, no locking);
//! `warden bench-search` loads a million jobs into it and prints search
//! and statistics latency.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
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
    /// The bot of the current (or last) attempt.
    pub bot_id: Option<String>,
    /// The bus message the job was triggered by.
    pub source_message_id: Option<String>,
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
            && self
                .bot_id
                .as_deref()
                .is_none_or(|b| Some(b) == j.bot_id.as_deref())
            && self
                .source_message_id
                .as_deref()
                .is_none_or(|m| Some(m) == j.source_message_id.as_deref())
            && self.since.is_none_or(|t| j.created_at >= t)
            && self.until.is_none_or(|t| j.created_at < t)
    }

    /// The facets this filter names, each of which has a posting set.
    fn facets(&self) -> Vec<Facet> {
        let mut f = Vec::new();
        if let Some(s) = self.state {
            f.push(Facet::State(s));
        }
        if let Some(t) = &self.task {
            f.push(Facet::Task(t.clone()));
        }
        if let Some(p) = &self.pool {
            f.push(Facet::Pool(p.clone()));
        }
        if let Some(b) = self.blame {
            f.push(Facet::Blame(b));
        }
        if let Some(d) = &self.detail {
            f.push(Facet::Detail(d.clone()));
        }
        if let Some(b) = &self.bot_id {
            f.push(Facet::Bot(b.clone()));
        }
        f
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

/// One pool and priority of the queue of SCHEDULED jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueRow {
    pub pool: String,
    pub priority: i32,
    /// Ready for dispatch now.
    pub ready: usize,
    /// Waiting for a delayed retry.
    pub delayed: usize,
    /// When the longest-waiting ready job entered the queue.
    pub oldest_queued_at: Option<DateTime<Utc>>,
    /// The earliest delayed retry's due time.
    pub next_due: Option<DateTime<Utc>>,
}

/// One slice of time in [`JobIndex::blame_series`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesBucket {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Every blame, in [`Blame::ALL`] order, with its count.
    pub by_blame: Vec<(Blame, usize)>,
}

/// One posting set: jobs by creation time, newest first.
type Postings = BTreeSet<Key>;
/// (creation time in microseconds, newest first; id).
type Key = (Reverse<i64>, Uuid);

fn key(j: &JobSummary) -> Key {
    (Reverse(j.created_at.timestamp_micros()), j.id)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Facet {
    State(JobState),
    Task(String),
    Pool(String),
    Blame(Blame),
    Detail(String),
    Bot(String),
}

fn facets_of(j: &JobSummary) -> Vec<Facet> {
    let mut f = vec![
        Facet::State(j.state),
        Facet::Task(j.task.clone()),
        Facet::Pool(j.pool.clone()),
    ];
    if let Some(b) = j.blame {
        f.push(Facet::Blame(b));
    }
    if let Some(d) = &j.detail {
        f.push(Facet::Detail(d.clone()));
    }
    if let Some(b) = &j.bot_id {
        f.push(Facet::Bot(b.clone()));
    }
    f
}

/// The counts of the jobs last changed in one minute (or one hour).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tally {
    jobs: usize,
    by_state: [usize; JobState::ALL.len()],
    by_blame: [usize; Blame::ALL.len()],
    by_detail: BTreeMap<(Blame, String), usize>,
    retried: usize,
    shelved: usize,
}

fn state_slot(s: JobState) -> usize {
    JobState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

fn blame_slot(b: Blame) -> usize {
    Blame::ALL.iter().position(|x| *x == b).unwrap_or(0)
}

impl Tally {
    /// Adds (`add`) or takes away one job's counts.
    fn change(&mut self, j: &JobSummary, add: bool) {
        let one = |n: &mut usize| {
            if add {
                *n += 1
            } else {
                *n = n.saturating_sub(1)
            }
        };
        one(&mut self.jobs);
        one(&mut self.by_state[state_slot(j.state)]);
        if let Some(b) = j.blame {
            one(&mut self.by_blame[blame_slot(b)]);
            let d = j.detail.as_deref().unwrap_or("unclassified");
            if add {
                *self.by_detail.entry((b, d.to_string())).or_default() += 1;
            } else if let Some(n) = self.by_detail.get_mut(&(b, d.to_string())) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.by_detail.remove(&(b, d.to_string()));
                }
            }
        }
        if j.attempt > 1 {
            one(&mut self.retried);
        }
        if j.state == JobState::Shelved {
            one(&mut self.shelved);
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.jobs += other.jobs;
        for (a, b) in self.by_state.iter_mut().zip(other.by_state) {
            *a += b;
        }
        for (a, b) in self.by_blame.iter_mut().zip(other.by_blame) {
            *a += b;
        }
        for (k, n) in &other.by_detail {
            match self.by_detail.get_mut(k) {
                Some(m) => *m += n,
                None => {
                    self.by_detail.insert(k.clone(), *n);
                }
            }
        }
        self.retried += other.retried;
        self.shelved += other.shelved;
    }

    fn into_stats(self, since: DateTime<Utc>, until: DateTime<Utc>) -> Stats {
        let named = |pairs: Vec<(&str, usize)>| {
            pairs
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| (k.to_string(), n))
                .collect()
        };
        Stats {
            since: Some(since),
            until: Some(until),
            jobs: self.jobs,
            by_state: named(
                JobState::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .zip(self.by_state)
                    .collect(),
            ),
            by_blame: named(
                Blame::ALL
                    .iter()
                    .map(|b| b.as_str())
                    .zip(self.by_blame)
                    .collect(),
            ),
            by_detail: self
                .by_detail
                .into_iter()
                .map(|((b, d), n)| (format!("{b}/{d}"), n))
                .collect(),
            retried: self.retried,
            shelved: self.shelved,
        }
    }
}

const MINUTE_MICROS: i64 = 60_000_000;
const HOUR_MICROS: i64 = 60 * MINUTE_MICROS;

fn minute_of(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros().div_euclid(MINUTE_MICROS)
}

/// The most matches a search counts beyond its page: past it, `total` is
/// a lower bound (`total_exact` false), so a search over a huge set costs
/// no more than this many steps. Elasticsearch's default is the same.
pub const TOTAL_CAP: usize = 10_000;

/// One page of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchResult {
    pub jobs: Vec<JobSummary>,
    /// Matches over all pages, or at least this many if not `total_exact`.
    pub total: usize,
    pub total_exact: bool,
}

/// A cheap, stable hash of a source message id: the index keeps these
/// rather than a posting set per (nearly unique) message.
fn source_hash(m: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.hash(&mut h);
    h.finish()
}

/// Every job's summary, its posting sets, and per-minute tallies.
#[derive(Debug, Default)]
pub struct JobIndex {
    jobs: HashMap<Uuid, JobSummary>,
    order: Postings,
    postings: HashMap<Facet, Postings>,
    by_state: BTreeMap<JobState, usize>,
    /// Jobs by the hash of their source message id.
    sources: HashMap<u64, Vec<Key>>,
    /// (last change in microseconds, id): the jobs of a partial minute.
    changed: BTreeSet<(i64, Uuid)>,
    minutes: BTreeMap<i64, Tally>,
    hours: BTreeMap<i64, Tally>,
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

    /// The job's summary, if it is in the index.
    pub fn summary(&self, id: &Uuid) -> Option<JobSummary> {
        self.jobs.get(id).cloned()
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.jobs.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &Uuid> {
        self.jobs.keys()
    }

    pub fn upsert(&mut self, job: JobSummary) {
        self.remove(&job.id);
        let k = key(&job);
        self.order.insert(k);
        for f in facets_of(&job) {
            self.postings.entry(f).or_default().insert(k);
        }
        *self.by_state.entry(job.state).or_default() += 1;
        self.changed
            .insert((job.updated_at.timestamp_micros(), job.id));
        let minute = minute_of(job.updated_at);
        self.minutes.entry(minute).or_default().change(&job, true);
        self.hours
            .entry(minute.div_euclid(60))
            .or_default()
            .change(&job, true);
        if let Some(m) = &job.source_message_id {
            let keys = self.sources.entry(source_hash(m)).or_default();
            keys.push(k);
            keys.sort_unstable();
        }
        self.jobs.insert(job.id, job);
    }

    pub fn remove(&mut self, id: &Uuid) -> Option<JobSummary> {
        let old = self.jobs.remove(id)?;
        let k = key(&old);
        self.order.remove(&k);
        for f in facets_of(&old) {
            if let Some(set) = self.postings.get_mut(&f) {
                set.remove(&k);
                if set.is_empty() {
                    self.postings.remove(&f);
                }
            }
        }
        if let Some(n) = self.by_state.get_mut(&old.state) {
            *n = n.saturating_sub(1);
        }
        self.changed
            .remove(&(old.updated_at.timestamp_micros(), old.id));
        let minute = minute_of(old.updated_at);
        for (map, at) in [
            (&mut self.minutes, minute),
            (&mut self.hours, minute.div_euclid(60)),
        ] {
            if let Some(t) = map.get_mut(&at) {
                t.change(&old, false);
                if t.jobs == 0 {
                    map.remove(&at);
                }
            }
        }
        if let Some(m) = &old.source_message_id {
            let h = source_hash(m);
            if let Some(keys) = self.sources.get_mut(&h) {
                keys.retain(|x| *x != k);
                if keys.is_empty() {
                    self.sources.remove(&h);
                }
            }
        }
        Some(old)
    }

    /// Counts by state, blame and detail over the jobs last changed in
    /// `[since, until)`: whole hours and whole minutes from their tallies,
    /// the partial minutes at either end job by job.
    pub fn stats(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Stats {
        let (from, to) = (since.timestamp_micros(), until.timestamp_micros());
        let mut t = Tally::default();
        if from < to {
            self.tally(from, to, &mut t);
        }
        t.into_stats(since, until)
    }

    /// Adds the changes in `[from, to)` (microseconds) to `t`.
    fn tally(&self, from: i64, to: i64, t: &mut Tally) {
        let ceil = |x: i64, unit: i64| x.div_euclid(unit) + i64::from(x.rem_euclid(unit) != 0);
        let jobs = |a: i64, b: i64, t: &mut Tally| {
            if a < b {
                for (_, id) in self.changed.range((a, Uuid::nil())..(b, Uuid::nil())) {
                    if let Some(j) = self.jobs.get(id) {
                        t.change(j, true);
                    }
                }
            }
        };
        // Whole minutes [m0, m1), whole hours [h0, h1) within them.
        let (m0, m1) = (ceil(from, MINUTE_MICROS), to.div_euclid(MINUTE_MICROS));
        if m0 >= m1 {
            jobs(from, to, t);
            return;
        }
        jobs(from, m0 * MINUTE_MICROS, t);
        let (h0, h1) = (ceil(m0 * MINUTE_MICROS, HOUR_MICROS), m1.div_euclid(60));
        let minutes = |a: i64, b: i64, t: &mut Tally| {
            if a < b {
                for (_, m) in self.minutes.range(a..b) {
                    t.merge(m);
                }
            }
        };
        if h0 < h1 {
            minutes(m0, h0 * 60, t);
            for (_, h) in self.hours.range(h0..h1) {
                t.merge(h);
            }
            minutes(h1 * 60, m1, t);
        } else {
            minutes(m0, m1, t);
        }
        jobs(m1 * MINUTE_MICROS, to, t);
    }

    /// One page of the jobs matching `filter`, newest first, and how many
    /// match in all (counted up to [`TOTAL_CAP`] past the page). Walks the
    /// smallest posting set the filter names (all jobs when it names none),
    /// only within its creation-time range.
    pub fn search(&self, filter: &Filter, limit: usize, offset: usize) -> SearchResult {
        let empty = SearchResult {
            jobs: Vec::new(),
            total: 0,
            total_exact: true,
        };
        // A source message triggers a few jobs at most: start from them.
        if let Some(m) = &filter.source_message_id {
            let keys = self
                .sources
                .get(&source_hash(m))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            return self.walk(keys.iter(), filter, limit, offset);
        }
        let mut base = &self.order;
        let facets = filter.facets();
        for f in &facets {
            match self.postings.get(f) {
                Some(set) if set.len() < base.len() => base = set,
                Some(_) => {}
                None => return empty,
            }
        }
        if facets.len() <= 1 && filter.since.is_none() && filter.until.is_none() {
            // The set is exactly the answer: no need to look at each job.
            let jobs = base
                .iter()
                .skip(offset)
                .take(limit)
                .filter_map(|(_, id)| self.jobs.get(id).cloned())
                .collect();
            return SearchResult {
                jobs,
                total: base.len(),
                total_exact: true,
            };
        }
        // Newest first: `until` (exclusive) bounds the start of the walk,
        // `since` (inclusive) its end.
        let start = match filter.until {
            Some(t) => Bound::Excluded((Reverse(t.timestamp_micros()), Uuid::max())),
            None => Bound::Unbounded,
        };
        let end = match filter.since {
            Some(t) => Bound::Included((Reverse(t.timestamp_micros()), Uuid::max())),
            None => Bound::Unbounded,
        };
        if let (Bound::Excluded(a), Bound::Included(b)) = (&start, &end) {
            if a >= b {
                return empty;
            }
        }
        self.walk(base.range((start, end)), filter, limit, offset)
    }

    /// The SCHEDULED jobs by pool and priority (highest priority first
    /// within a pool): how many are ready and how many wait for a delayed
    /// retry at `now`, the oldest ready one's `queued_at`, and the next
    /// retry due. Walks the SCHEDULED posting set: live work, not history.
    pub fn queues(&self, now: DateTime<Utc>) -> Vec<QueueRow> {
        let mut rows: HashMap<(&str, i32), QueueRow> = HashMap::new();
        let Some(set) = self.postings.get(&Facet::State(JobState::Scheduled)) else {
            return Vec::new();
        };
        for (_, id) in set {
            let Some(j) = self.jobs.get(id) else { continue };
            let row = rows
                .entry((j.pool.as_str(), j.priority))
                .or_insert_with(|| QueueRow {
                    pool: j.pool.clone(),
                    priority: j.priority,
                    ..QueueRow::default()
                });
            match j.not_before {
                Some(due) if due > now => {
                    row.delayed += 1;
                    row.next_due = Some(row.next_due.map_or(due, |d| d.min(due)));
                }
                _ => {
                    row.ready += 1;
                    row.oldest_queued_at = Some(
                        row.oldest_queued_at
                            .map_or(j.queued_at, |q| q.min(j.queued_at)),
                    );
                }
            }
        }
        let mut rows: Vec<QueueRow> = rows.into_values().collect();
        rows.sort_by(|a, b| a.pool.cmp(&b.pool).then(b.priority.cmp(&a.priority)));
        rows
    }

    /// Jobs carrying a blame, by blame, in `buckets` equal slices of
    /// `[since, until)` by their last change: the same jobs
    /// [`JobIndex::stats`] counts in `by_blame`, over time.
    pub fn blame_series(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        buckets: usize,
    ) -> Vec<SeriesBucket> {
        let (from, to) = (since.timestamp_micros(), until.timestamp_micros());
        if buckets == 0 || from >= to {
            return Vec::new();
        }
        let n = i64::try_from(buckets).unwrap_or(i64::MAX);
        let width = ((to - from) / n).max(1);
        (0..n)
            .map(|i| {
                let a = from + i * width;
                let b = if i == n - 1 { to } else { a + width };
                let mut t = Tally::default();
                if a < b {
                    self.tally(a, b, &mut t);
                }
                SeriesBucket {
                    since: DateTime::from_timestamp_micros(a).unwrap_or(since),
                    until: DateTime::from_timestamp_micros(b).unwrap_or(until),
                    by_blame: Blame::ALL.iter().copied().zip(t.by_blame).collect(),
                }
            })
            .collect()
    }

    fn walk<'a>(
        &self,
        keys: impl Iterator<Item = &'a Key>,
        filter: &Filter,
        limit: usize,
        offset: usize,
    ) -> SearchResult {
        let cap = offset.saturating_add(limit).saturating_add(TOTAL_CAP);
        let mut jobs = Vec::with_capacity(limit.min(64));
        let mut total = 0;
        for (_, id) in keys {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            if !filter.matches(job) {
                continue;
            }
            if total >= cap {
                return SearchResult {
                    jobs,
                    total,
                    total_exact: false,
                };
            }
            if total >= offset && jobs.len() < limit {
                jobs.push(job.clone());
            }
            total += 1;
        }
        SearchResult {
            jobs,
            total,
            total_exact: true,
        }
    }
}

/// The index shared between the watch task and request handlers.
pub struct SharedIndex {
    // A std mutex: nothing awaits while it is held, and searches are short.
    index: Mutex<JobIndex>,
    caught_up: watch::Sender<bool>,
    /// Bumped at every job change applied after the first pass: what the
    /// console's live pages wait on.
    changes: watch::Sender<u64>,
}

impl Default for SharedIndex {
    fn default() -> Self {
        SharedIndex {
            index: Mutex::new(JobIndex::default()),
            caught_up: watch::Sender::new(false),
            changes: watch::Sender::new(0),
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

    /// A receiver that sees every job change the index applies (counted).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
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
                    index.changes.send_modify(|n| *n = n.wrapping_add(1));
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
    use warden_testsupport::XorShift;

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
        assert_eq!(idx.search(&filter, 10, 0).total, 1);
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
            not_before: None,
            queued_at: at,
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
        let SearchResult {
            jobs: all, total, ..
        } = idx.search(&Filter::default(), 3, 0);
        assert_eq!(total, 10);
        let ids: Vec<u128> = all.iter().map(|j| j.id.as_u128()).collect();
        assert_eq!(ids, vec![9, 8, 7]);
        let page = idx.search(&Filter::default(), 3, 8).jobs;
        assert_eq!(
            page.iter().map(|j| j.id.as_u128()).collect::<Vec<_>>(),
            vec![1, 0]
        );

        let f = Filter {
            state: Some(JobState::Running),
            task: Some("a".into()),
            ..Filter::default()
        };
        let SearchResult {
            jobs: page, total, ..
        } = idx.search(&f, 100, 0);
        assert_eq!(total, 2);
        assert_eq!(
            page.iter().map(|j| j.id.as_u128()).collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert_eq!(idx.count(JobState::Running), 5);
    }

    /// The obvious answer: every job looked at.
    fn naive_search(
        all: &HashMap<Uuid, JobSummary>,
        f: &Filter,
        limit: usize,
        offset: usize,
    ) -> (Vec<Uuid>, usize) {
        let mut m: Vec<&JobSummary> = all.values().filter(|j| f.matches(j)).collect();
        m.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let page = m.iter().skip(offset).take(limit).map(|j| j.id).collect();
        (page, m.len())
    }

    fn naive_stats(
        all: &HashMap<Uuid, JobSummary>,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Stats {
        let mut t = Tally::default();
        for j in all
            .values()
            .filter(|j| j.updated_at >= since && j.updated_at < until)
        {
            t.change(j, true);
        }
        t.into_stats(since, until)
    }

    /// Posting sets and minute tallies give exactly what looking at every
    /// job gives, through inserts, changes (state, blame, times) and
    /// removals, for random filters, pages and windows, including windows
    /// that start or end inside a minute.
    #[test]
    fn index_agrees_with_looking_at_every_job() {
        let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut idx = JobIndex::default();
        let mut all: HashMap<Uuid, JobSummary> = HashMap::new();
        let base = Utc.timestamp_opt(1_700_000_000, 0).single().expect("time");
        let tasks = ["build", "lint", "test"];
        let details = ["network", "oom", "task_exception"];
        for step in 0..3000u64 {
            let n = u128::from(rng.below(400));
            let id = Uuid::from_u128(n);
            if rng.below(10) == 0 {
                idx.remove(&id);
                all.remove(&id);
                continue;
            }
            let created = base + chrono::Duration::milliseconds(rng.below(3_600_000) as i64);
            let created = all.get(&id).map(|j| j.created_at).unwrap_or(created);
            let mut j = job(
                n,
                0,
                JobState::ALL[rng.below(6) as usize],
                tasks[rng.below(3) as usize],
                "p",
            );
            j.created_at = created;
            j.updated_at = created + chrono::Duration::milliseconds(rng.below(600_000) as i64);
            j.attempt = rng.below(4) as u32;
            if rng.below(3) == 0 {
                j.blame = Some(Blame::ALL[rng.below(4) as usize]);
                j.detail = (rng.below(4) != 0).then(|| details[rng.below(3) as usize].to_string());
            }
            j.bot_id = (rng.below(2) == 0).then(|| format!("bot-{}", rng.below(3)));
            j.source_message_id = Some(format!("msg-{}", n % 50));
            idx.upsert(j.clone());
            all.insert(id, j);
            if step % 25 != 0 {
                continue;
            }
            let at = |rng: &mut XorShift| {
                base + chrono::Duration::milliseconds(rng.below(4_300_000) as i64)
            };
            let f = Filter {
                state: (rng.below(2) == 0).then(|| JobState::ALL[rng.below(6) as usize]),
                task: (rng.below(3) == 0).then(|| tasks[rng.below(3) as usize].to_string()),
                pool: (rng.below(8) == 0).then(|| "p".to_string()),
                blame: (rng.below(3) == 0).then(|| Blame::ALL[rng.below(4) as usize]),
                detail: (rng.below(4) == 0).then(|| details[rng.below(3) as usize].to_string()),
                bot_id: (rng.below(4) == 0).then(|| format!("bot-{}", rng.below(3))),
                source_message_id: (rng.below(6) == 0).then(|| format!("msg-{}", rng.below(60))),
                since: (rng.below(3) == 0).then(|| at(&mut rng)),
                until: (rng.below(3) == 0).then(|| at(&mut rng)),
            };
            let (limit, offset) = (1 + rng.below(20) as usize, rng.below(30) as usize);
            let SearchResult {
                jobs: page,
                total,
                total_exact,
            } = idx.search(&f, limit, offset);
            assert!(total_exact);
            let got: Vec<Uuid> = page.iter().map(|j| j.id).collect();
            assert_eq!(
                (got, total),
                naive_search(&all, &f, limit, offset),
                "{f:?} limit {limit} offset {offset}"
            );

            let (a, b) = (at(&mut rng), at(&mut rng));
            let (since, until) = if a <= b { (a, b) } else { (b, a) };
            assert_eq!(
                idx.stats(since, until),
                naive_stats(&all, since, until),
                "{since} .. {until}"
            );
        }
        assert_eq!(idx.len(), all.len());
    }

    /// Past the cap a count stops and says so; the page is still right,
    /// and a single facet without a time range is counted exactly.
    #[test]
    fn huge_counts_stop_at_the_cap_and_say_so() {
        let mut idx = JobIndex::default();
        let n = TOTAL_CAP + 2000;
        for i in 0..n {
            idx.upsert(job(i as u128, i as i64, JobState::Finished, "t", "p"));
        }
        let f = Filter {
            state: Some(JobState::Finished),
            task: Some("t".into()),
            ..Filter::default()
        };
        let r = idx.search(&f, 10, 5);
        assert!(!r.total_exact);
        assert_eq!(r.total, 15 + TOTAL_CAP);
        let ids: Vec<u128> = r.jobs.iter().map(|j| j.id.as_u128()).collect();
        assert_eq!(
            ids,
            ((n - 15) as u128..(n - 5) as u128)
                .rev()
                .collect::<Vec<_>>()
        );
        let exact = idx.search(
            &Filter {
                task: Some("t".into()),
                ..Filter::default()
            },
            10,
            0,
        );
        assert_eq!((exact.total, exact.total_exact), (n, true));
    }

    /// Windows over days add up hour, minute and single-job tallies the
    /// same as counting every job.
    #[test]
    fn long_windows_use_hours_and_agree_with_counting() {
        let mut idx = JobIndex::default();
        let mut all = HashMap::new();
        for i in 0..3000i64 {
            let mut j = job(i as u128, i * 97, JobState::ALL[(i % 6) as usize], "t", "p");
            if i % 5 == 0 {
                j.blame = Some(Blame::System);
                j.detail = Some("oom".into());
            }
            j.attempt = (i % 3) as u32;
            all.insert(j.id, j.clone());
            idx.upsert(j);
        }
        let base = Utc.timestamp_opt(1_700_000_000, 0).single().expect("time");
        for (a, b) in [
            (0, 291_000),
            (59, 3601),
            (3599, 86_401),
            (-100, 400_000),
            (7200, 7200),
        ] {
            let since = base + chrono::Duration::seconds(a) + chrono::Duration::milliseconds(3);
            let until = base + chrono::Duration::seconds(b);
            assert_eq!(
                idx.stats(since, until),
                naive_stats(&all, since, until),
                "{a}..{b}"
            );
        }
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
        assert_eq!(idx.search(&f, 10, 0).total, 1);
        assert!(idx.remove(&Uuid::from_u128(1)).is_some());
        assert!(idx.is_empty());
        assert_eq!(idx.count(JobState::Running), 0);
        assert_eq!(idx.search(&Filter::default(), 10, 0).total, 0);
    }

    #[test]
    fn queues_split_ready_from_delayed_by_pool_and_priority() {
        let mut idx = JobIndex::default();
        let now = Utc.timestamp_opt(1_700_010_000, 0).single().expect("time");
        let mut a = job(1, 10, JobState::Scheduled, "t", "p");
        a.priority = 5;
        let mut b = job(2, 20, JobState::Scheduled, "t", "p");
        b.priority = 5;
        b.not_before = Some(now + chrono::Duration::seconds(30));
        let c = job(3, 5, JobState::Scheduled, "t", "p");
        // A retry whose due time has passed is ready again.
        let mut d = job(4, 30, JobState::Scheduled, "t", "q");
        d.not_before = Some(now - chrono::Duration::seconds(1));
        let e = job(5, 1, JobState::Running, "t", "p");
        for j in [a.clone(), b.clone(), c.clone(), d.clone(), e] {
            idx.upsert(j);
        }
        let rows = idx.queues(now);
        let view: Vec<(&str, i32, usize, usize)> = rows
            .iter()
            .map(|r| (r.pool.as_str(), r.priority, r.ready, r.delayed))
            .collect();
        assert_eq!(view, [("p", 5, 1, 1), ("p", 0, 1, 0), ("q", 0, 1, 0)]);
        assert_eq!(rows[0].oldest_queued_at, Some(a.queued_at));
        assert_eq!(rows[0].next_due, b.not_before);
        assert_eq!(rows[1].oldest_queued_at, Some(c.queued_at));
    }

    #[test]
    fn the_blame_series_adds_up_to_the_stats() {
        let mut idx = JobIndex::default();
        for i in 0..300u128 {
            let mut j = job(i, (i as i64) * 97, JobState::Crashed, "t", "p");
            j.blame = Some(Blame::ALL[(i % 4) as usize]);
            idx.upsert(j);
        }
        let since = Utc.timestamp_opt(1_700_000_000, 0).single().expect("time");
        let until = since + chrono::Duration::seconds(300 * 97);
        let series = idx.blame_series(since, until, 24);
        assert_eq!(series.len(), 24);
        assert_eq!(series[0].since, since);
        assert_eq!(series[23].until, until);
        let stats = idx.stats(since, until);
        for b in Blame::ALL {
            let summed: usize = series
                .iter()
                .flat_map(|s| s.by_blame.iter())
                .filter(|(x, _)| *x == b)
                .map(|(_, n)| n)
                .sum();
            assert_eq!(Some(&summed), stats.by_blame.get(b.as_str()), "{b}");
        }
        assert!(idx.blame_series(until, since, 24).is_empty());
    }
}
