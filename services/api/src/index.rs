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
        if let Some(m) = &self.source_message_id {
            f.push(Facet::Source(m.clone()));
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

impl Stats {
    fn add(&mut self, t: &Tally) {
        self.jobs += t.jobs;
        for (k, n) in &t.by_state {
            *self.by_state.entry(k.as_str().to_string()).or_default() += n;
        }
        for (k, n) in &t.by_blame {
            *self.by_blame.entry(k.as_str().to_string()).or_default() += n;
        }
        for ((b, d), n) in &t.by_detail {
            *self.by_detail.entry(format!("{b}/{d}")).or_default() += n;
        }
        self.retried += t.retried;
        self.shelved += t.shelved;
    }
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
    Source(String),
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
    if let Some(m) = &j.source_message_id {
        f.push(Facet::Source(m.clone()));
    }
    f
}

/// The counts of the jobs last changed in one minute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tally {
    jobs: usize,
    by_state: BTreeMap<JobState, usize>,
    by_blame: BTreeMap<Blame, usize>,
    by_detail: BTreeMap<(Blame, String), usize>,
    retried: usize,
    shelved: usize,
}

impl Tally {
    fn of(j: &JobSummary) -> Tally {
        let mut t = Tally::default();
        t.change(j, true);
        t
    }

    /// Adds (`add`) or takes away one job's counts.
    fn change(&mut self, j: &JobSummary, add: bool) {
        fn step<K: Ord>(map: &mut BTreeMap<K, usize>, k: K, add: bool) {
            if add {
                *map.entry(k).or_default() += 1;
            } else if let std::collections::btree_map::Entry::Occupied(mut e) = map.entry(k) {
                *e.get_mut() = e.get().saturating_sub(1);
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        let one = |n: &mut usize| {
            if add {
                *n += 1
            } else {
                *n = n.saturating_sub(1)
            }
        };
        one(&mut self.jobs);
        step(&mut self.by_state, j.state, add);
        if let Some(b) = j.blame {
            step(&mut self.by_blame, b, add);
            let d = j.detail.clone().unwrap_or_else(|| "unclassified".into());
            step(&mut self.by_detail, (b, d), add);
        }
        if j.attempt > 1 {
            one(&mut self.retried);
        }
        if j.state == JobState::Shelved {
            one(&mut self.shelved);
        }
    }
}

const MINUTE_MICROS: i64 = 60_000_000;

fn minute_of(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros().div_euclid(MINUTE_MICROS)
}

/// Every job's summary, its posting sets, and per-minute tallies.
#[derive(Debug, Default)]
pub struct JobIndex {
    jobs: HashMap<Uuid, JobSummary>,
    order: Postings,
    postings: HashMap<Facet, Postings>,
    by_state: BTreeMap<JobState, usize>,
    /// (last change in microseconds, id): the jobs of a partial minute.
    changed: BTreeSet<(i64, Uuid)>,
    minutes: BTreeMap<i64, Tally>,
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
        let k = key(&job);
        self.order.insert(k);
        for f in facets_of(&job) {
            self.postings.entry(f).or_default().insert(k);
        }
        *self.by_state.entry(job.state).or_default() += 1;
        self.changed
            .insert((job.updated_at.timestamp_micros(), job.id));
        self.minutes
            .entry(minute_of(job.updated_at))
            .or_default()
            .change(&job, true);
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
        if let Some(t) = self.minutes.get_mut(&minute) {
            t.change(&old, false);
            if t.jobs == 0 {
                self.minutes.remove(&minute);
            }
        }
        Some(old)
    }

    /// Counts by state, blame and detail over the jobs last changed in
    /// `[since, until)`: whole minutes from their tallies, the partial
    /// minutes at either end job by job.
    pub fn stats(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Stats {
        let mut s = Stats {
            since: Some(since),
            until: Some(until),
            ..Stats::default()
        };
        let (from, to) = (since.timestamp_micros(), until.timestamp_micros());
        if from >= to {
            return s;
        }
        // Whole minutes [first, last): every change in them is inside.
        let first = from.div_euclid(MINUTE_MICROS) + i64::from(from.rem_euclid(MINUTE_MICROS) != 0);
        let last = to.div_euclid(MINUTE_MICROS);
        let edges = |a: i64, b: i64, s: &mut Stats| {
            for (_, id) in self.changed.range((a, Uuid::nil())..(b, Uuid::nil())) {
                if let Some(j) = self.jobs.get(id) {
                    s.add(&Tally::of(j));
                }
            }
        };
        if first >= last {
            edges(from, to, &mut s);
            return s;
        }
        edges(from, first * MINUTE_MICROS, &mut s);
        for t in self.minutes.range(first..last).map(|(_, t)| t) {
            s.add(t);
        }
        edges(last * MINUTE_MICROS, to, &mut s);
        s
    }

    /// One page of the jobs matching `filter`, newest first, and how many
    /// match in all. Walks the smallest posting set the filter names (all
    /// jobs when it names none), only within its creation-time range.
    pub fn search(&self, filter: &Filter, limit: usize, offset: usize) -> (Vec<JobSummary>, usize) {
        let mut base = &self.order;
        for f in filter.facets() {
            match self.postings.get(&f) {
                Some(set) if set.len() < base.len() => base = set,
                Some(_) => {}
                None => return (Vec::new(), 0),
            }
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
                return (Vec::new(), 0);
            }
        }
        let only_base =
            filter.facets().len() <= 1 && filter.since.is_none() && filter.until.is_none();
        if only_base {
            // The set is exactly the answer: no need to look at each job.
            let page = base
                .iter()
                .skip(offset)
                .take(limit)
                .filter_map(|(_, id)| self.jobs.get(id).cloned())
                .collect();
            return (page, base.len());
        }
        let mut page = Vec::with_capacity(limit.min(base.len()));
        let mut total = 0;
        for (_, id) in base.range((start, end)) {
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
        let mut s = Stats {
            since: Some(since),
            until: Some(until),
            ..Stats::default()
        };
        for j in all
            .values()
            .filter(|j| j.updated_at >= since && j.updated_at < until)
        {
            s.add(&Tally::of(j));
        }
        s
    }

    /// xorshift: reproducible without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Posting sets and minute tallies give exactly what looking at every
    /// job gives, through inserts, changes (state, blame, times) and
    /// removals, for random filters, pages and windows, including windows
    /// that start or end inside a minute.
    #[test]
    fn index_agrees_with_looking_at_every_job() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
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
            let at =
                |rng: &mut Rng| base + chrono::Duration::milliseconds(rng.below(4_300_000) as i64);
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
            let (page, total) = idx.search(&f, limit, offset);
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
