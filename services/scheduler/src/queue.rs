//! The scheduler's in-memory queue of SCHEDULED jobs: a cache rebuilt from
//! the jobs bucket, never the source of truth. Ordered by priority (higher
//! first), then job age (older first), across first attempts and retries.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;
use warden_shared::job::Job;
use warden_shared::messages::{PoolQueue, QueueReply};
use warden_shared::store::Versioned;
use warden_shared::JobState;

type Key = (Reverse<i32>, DateTime<Utc>, Uuid);

#[derive(Default)]
pub struct Queue {
    /// Ready jobs per pool in dispatch order.
    ready: HashMap<String, BTreeSet<Key>>,
    /// Delayed retries by the instant they become ready.
    delayed: BTreeSet<(DateTime<Utc>, Uuid)>,
    jobs: HashMap<Uuid, Versioned>,
    /// RUNNING jobs, their latest version seen: the first guess of the
    /// compare-and-set that applies a report ([`Queue::take_running`]),
    /// so it need not read the job first. As many as run now.
    running: HashMap<Uuid, Versioned>,
}

fn key(job: &Job) -> Key {
    (Reverse(job.priority), job.created_at, job.id)
}

impl Queue {
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Takes in the latest version of a job: queued if SCHEDULED, kept
    /// aside if RUNNING, dropped otherwise. Older revisions than the one
    /// held are ignored.
    pub fn observe(&mut self, v: Versioned) {
        let id = v.job.id;
        let held = self.jobs.get(&id).or_else(|| self.running.get(&id));
        if held.is_some_and(|held| held.revision > v.revision) {
            return;
        }
        self.remove(&id);
        self.running.remove(&id);
        if v.job.state == JobState::Running {
            self.running.insert(id, v);
            return;
        }
        if v.job.state != JobState::Scheduled {
            return;
        }
        match v.job.not_before {
            Some(at) if at > Utc::now() => {
                self.delayed.insert((at, v.job.id));
            }
            _ => {
                self.ready
                    .entry(v.job.pool.clone())
                    .or_default()
                    .insert(key(&v.job));
            }
        }
        self.jobs.insert(v.job.id, v);
    }

    /// The latest version seen of RUNNING job `id`, taken out (whoever
    /// writes the job next puts its own version back).
    pub fn take_running(&mut self, id: &Uuid) -> Option<Versioned> {
        self.running.remove(id)
    }

    /// Forgets job `id` (deleted from the bucket).
    pub fn forget(&mut self, id: &Uuid) {
        self.remove(id);
        self.running.remove(id);
    }

    pub fn remove(&mut self, id: &Uuid) -> Option<Versioned> {
        let v = self.jobs.remove(id)?;
        if let Some(set) = self.ready.get_mut(&v.job.pool) {
            set.remove(&key(&v.job));
        }
        if let Some(at) = v.job.not_before {
            self.delayed.remove(&(at, v.job.id));
        }
        Some(v)
    }

    /// Moves delayed jobs whose time has come to the ready sets; returns
    /// how many did.
    pub fn promote(&mut self, now: DateTime<Utc>) -> usize {
        let mut n = 0;
        while let Some(&(at, id)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(v) = self.jobs.get(&id) {
                self.ready
                    .entry(v.job.pool.clone())
                    .or_default()
                    .insert(key(&v.job));
                n += 1;
            }
        }
        n
    }

    /// When the next delayed job becomes ready.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.delayed.first().map(|(at, _)| *at)
    }

    /// Removes and returns up to `max` ready jobs from `pools`, best first
    /// across all of them.
    pub fn take(&mut self, pools: &[String], max: usize) -> Vec<Versioned> {
        let mut out = Vec::new();
        while out.len() < max {
            let best = pools
                .iter()
                .filter_map(|p| self.ready.get(p).and_then(|s| s.first()).map(|k| (*k, p)))
                .min_by_key(|(k, _)| *k);
            let Some((k, pool)) = best else { break };
            let pool = pool.clone();
            if let Some(set) = self.ready.get_mut(&pool) {
                set.remove(&k);
            }
            if let Some(v) = self.jobs.remove(&k.2) {
                out.push(v);
            }
        }
        out
    }

    /// Ready jobs and the oldest one's queue time, per pool and priority
    /// (the queue-depth and starvation gauges).
    pub fn waiting(&self) -> BTreeMap<(String, i32), (usize, DateTime<Utc>)> {
        let mut out: BTreeMap<(String, i32), (usize, DateTime<Utc>)> = BTreeMap::new();
        for (pool, set) in &self.ready {
            for k in set {
                let Some(v) = self.jobs.get(&k.2) else {
                    continue;
                };
                let e = out
                    .entry((pool.clone(), v.job.priority))
                    .or_insert((0, v.job.queued_at));
                e.0 += 1;
                e.1 = e.1.min(v.job.queued_at);
            }
        }
        out
    }

    /// Jobs waiting for their retry delay, per pool.
    pub fn delayed(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, id) in &self.delayed {
            if let Some(v) = self.jobs.get(id) {
                *out.entry(v.job.pool.clone()).or_insert(0) += 1;
            }
        }
        out
    }
}

/// The queue per pool for [`warden_shared::messages::QueueReply`]: every
/// pool with a ready or delayed job, or served by an active session
/// (`known`), with its ready and delayed counts, its oldest ready job's
/// queue time (over all priorities: the worst of the per-priority
/// `warden_scheduler_oldest_waiting_seconds`) and whether a session on open
/// resources serves it. Ages are filled in by [`age`] when asked.
pub fn pools(
    waiting: &BTreeMap<(String, i32), (usize, DateTime<Utc>)>,
    delayed: &BTreeMap<String, usize>,
    served: &HashSet<String>,
    known: &[String],
) -> Vec<PoolQueue> {
    fn entry<'a>(
        out: &'a mut BTreeMap<String, PoolQueue>,
        served: &HashSet<String>,
        pool: &str,
    ) -> &'a mut PoolQueue {
        out.entry(pool.to_string()).or_insert_with(|| PoolQueue {
            pool: pool.to_string(),
            ready: 0,
            delayed: 0,
            oldest_queued_at: None,
            oldest_wait_seconds: 0,
            served: served.contains(pool),
        })
    }
    let mut out: BTreeMap<String, PoolQueue> = BTreeMap::new();
    for p in known {
        entry(&mut out, served, p);
    }
    for ((pool, _), (count, oldest)) in waiting {
        let e = entry(&mut out, served, pool);
        e.ready += *count as u64;
        e.oldest_queued_at = Some(e.oldest_queued_at.map_or(*oldest, |o| o.min(*oldest)));
    }
    for (pool, count) in delayed {
        entry(&mut out, served, pool).delayed += *count as u64;
    }
    out.into_values().collect()
}

/// Sets each pool's `oldest_wait_seconds` as of `now`.
pub fn age(reply: &mut QueueReply, now: DateTime<Utc>) {
    for p in &mut reply.pools {
        p.oldest_wait_seconds = p
            .oldest_queued_at
            .map_or(0, |at| (now - at).num_seconds().max(0) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn job(pool: &str, priority: i32, age_s: i64) -> Versioned {
        let t = Utc::now() - Duration::seconds(age_s);
        Versioned {
            job: Job::builder("t")
                .pool(pool)
                .priority(priority)
                .at(t)
                .build(),
            revision: 1,
        }
    }

    #[test]
    fn priority_first_then_oldest() {
        let mut q = Queue::default();
        let low_old = job("p", 0, 100);
        let low_new = job("p", 0, 1);
        let high_new = job("p", 10, 1);
        let high_old = job("p", 10, 50);
        for v in [&low_old, &low_new, &high_new, &high_old] {
            q.observe(v.clone());
        }
        let ids: Vec<Uuid> = q
            .take(&["p".into()], 10)
            .into_iter()
            .map(|v| v.job.id)
            .collect();
        assert_eq!(
            ids,
            vec![
                high_old.job.id,
                high_new.job.id,
                low_old.job.id,
                low_new.job.id
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn takes_across_the_workers_pools_only() {
        let mut q = Queue::default();
        let a = job("a", 1, 1);
        let b = job("b", 5, 1);
        let c = job("c", 9, 1);
        for v in [&a, &b, &c] {
            q.observe(v.clone());
        }
        let got: Vec<Uuid> = q
            .take(&["a".into(), "b".into()], 5)
            .into_iter()
            .map(|v| v.job.id)
            .collect();
        assert_eq!(got, vec![b.job.id, a.job.id]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn non_scheduled_and_stale_revisions_are_dropped() {
        let mut q = Queue::default();
        let mut v = job("p", 0, 1);
        v.revision = 5;
        q.observe(v.clone());
        let mut old = v.clone();
        old.revision = 4;
        old.job.priority = 99;
        q.observe(old);
        assert_eq!(q.take(&["p".into()], 1)[0].job.priority, 0);
        q.observe(v.clone());
        let mut running = v.clone();
        running.revision = 6;
        running.job.state = JobState::Running;
        q.observe(running);
        assert!(q.is_empty());
    }

    #[test]
    fn the_latest_running_version_is_kept_for_the_next_report_until_it_ends() {
        let mut q = Queue::default();
        let mut v = job("p", 0, 1);
        v.revision = 3;
        v.job.state = JobState::Running;
        q.observe(v.clone());
        // Not queued, and an older version seen late changes nothing.
        assert!(q.is_empty() && q.take(&["p".into()], 1).is_empty());
        let mut older = v.clone();
        older.revision = 2;
        older.job.state = JobState::Scheduled;
        q.observe(older);
        assert!(q.is_empty());
        let guess = q.take_running(&v.job.id).expect("kept");
        assert_eq!((guess.revision, guess.job.state), (3, JobState::Running));
        // Taken: the next report reads, unless a write puts one back.
        assert!(q.take_running(&v.job.id).is_none());
        q.observe(v.clone());
        let mut finished = v.clone();
        finished.revision = 4;
        finished.job.state = JobState::Finished;
        q.observe(finished);
        assert!(q.take_running(&v.job.id).is_none());
        // A deleted job is forgotten.
        q.observe(v.clone());
        q.forget(&v.job.id);
        assert!(q.take_running(&v.job.id).is_none());
    }

    #[test]
    fn waiting_is_counted_per_pool_and_priority_with_the_oldest_age() {
        let mut q = Queue::default();
        let old_low = job("p", 0, 100);
        for v in [&old_low, &job("p", 0, 5), &job("p", 7, 1), &job("q", 0, 1)] {
            q.observe(v.clone());
        }
        let mut d = job("p", 0, 1);
        d.job.not_before = Some(Utc::now() + Duration::seconds(60));
        q.observe(d);
        let w = q.waiting();
        assert_eq!(w.len(), 3);
        assert_eq!(
            w.get(&("p".to_string(), 0)).copied(),
            Some((2, old_low.job.queued_at))
        );
        assert_eq!(w.get(&("p".to_string(), 7)).map(|x| x.0), Some(1));
        assert_eq!(q.delayed().get("p"), Some(&1));
    }

    #[test]
    fn the_snapshot_has_each_pools_worst_age_delayed_jobs_and_served_pools() {
        let mut q = Queue::default();
        let old_low = job("p", 0, 100);
        for v in [&old_low, &job("p", 7, 10), &job("q", 0, 1)] {
            q.observe(v.clone());
        }
        let mut d = job("r", 0, 1);
        d.job.not_before = Some(Utc::now() + Duration::seconds(60));
        q.observe(d);
        let served: HashSet<String> = ["q".to_string()].into();
        let known = vec!["q".to_string(), "idle".to_string()];
        let mut reply = QueueReply {
            version: 1,
            at: Utc::now(),
            pools: pools(&q.waiting(), &q.delayed(), &served, &known),
        };
        let names: Vec<&str> = reply.pools.iter().map(|p| p.pool.as_str()).collect();
        assert_eq!(names, ["idle", "p", "q", "r"]);
        let now = old_low.job.queued_at + Duration::seconds(100);
        age(&mut reply, now);
        let p = &reply.pools[1];
        assert_eq!((p.ready, p.delayed, p.served), (2, 0, false));
        assert_eq!(p.oldest_queued_at, Some(old_low.job.queued_at));
        assert_eq!(p.oldest_wait_seconds, 100, "the older of both priorities");
        let idle = &reply.pools[0];
        assert_eq!(
            (idle.ready, idle.oldest_wait_seconds, idle.served),
            (0, 0, false)
        );
        assert!(reply.pools[2].served);
        let r = &reply.pools[3];
        assert_eq!((r.ready, r.delayed, r.oldest_wait_seconds), (0, 1, 0));
        assert_eq!(r.oldest_queued_at, None, "a delayed job is not waiting");
    }

    #[test]
    fn delayed_jobs_wait_for_their_time() {
        let mut q = Queue::default();
        let mut v = job("p", 0, 1);
        let due = Utc::now() + Duration::seconds(30);
        v.job.not_before = Some(due);
        q.observe(v.clone());
        assert!(q.take(&["p".into()], 1).is_empty());
        assert_eq!(q.next_due(), Some(due));
        assert_eq!(q.promote(Utc::now()), 0);
        assert_eq!(q.promote(due), 1);
        assert_eq!(q.take(&["p".into()], 1)[0].job.id, v.job.id);
    }
}
