//! The retry policy (docs/design.md "Retries, shelving, poison jobs,
//! priorities"): which failures are retried, after how long, how many
//! times, and when a job is poison.
//!
//! Everything here is a pure function of the job record, the policy and
//! the clock, so every replica of every service that ends an attempt
//! decides alike, and a decision is written in the same compare-and-set as
//! the failure it answers: there is never a CRASHED job "waiting to be
//! retried" that a restart could forget. A delayed retry is a SCHEDULED job
//! with `not_before`; it waits in the jobs bucket, not in a sleeping task.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::job::{Blame, HistoryEntry, Job};
use crate::state::{transition, Action};
use crate::JobState;

/// The detail of an attempt lost with its worker.
pub const WORKER_LOST: &str = "worker_lost";
/// The detail of a job shelved because its attempts keep taking workers
/// (or their resources) down.
pub const WORKER_CRASH_LOOP: &str = "worker_crash_loop";

/// The history's actor of the retry policy's own entries.
pub const ACTOR: &str = "retry-policy";

/// `[retry]`, and the effective policy of one task after its
/// `[tasks.NAME.retry]` overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// `blame/detail` pairs that are retried; `*` as the detail matches any
    /// detail of that blame (`third_party/*`).
    pub retryable: Vec<String>,
    /// Attempts a job gets in one budget, the first included. A person's
    /// `retry` starts a new budget.
    pub max_attempts: u32,
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Each further retry waits this many times longer than the previous.
    pub backoff: f64,
    /// No retry waits longer than this.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Spread each delay by up to this fraction either way (0.1: ±10%), so
    /// the jobs of a host that died together do not all return at once.
    pub jitter: f64,
    /// Distinct workers a job's attempts may lose (worker gone, resource
    /// broken) before it is shelved as poison; 0 turns the rule off.
    pub poison_limit: u32,
}

/// `[tasks.NAME.retry]`: any subset of [`RetryPolicy`]'s keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub initial_delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<f64>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poison_limit: Option<u32>,
}

impl RetryPolicy {
    /// This policy with `o`'s keys over it.
    pub fn with(&self, o: &RetryOverride) -> RetryPolicy {
        RetryPolicy {
            retryable: o
                .retryable
                .clone()
                .unwrap_or_else(|| self.retryable.clone()),
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
            initial_delay: o.initial_delay.unwrap_or(self.initial_delay),
            backoff: o.backoff.unwrap_or(self.backoff),
            max_delay: o.max_delay.unwrap_or(self.max_delay),
            jitter: o.jitter.unwrap_or(self.jitter),
            poison_limit: o.poison_limit.unwrap_or(self.poison_limit),
        }
    }

    /// Is a failure with this blame and detail retried?
    pub fn is_retryable(&self, blame: Blame, detail: &str) -> bool {
        self.retryable.iter().any(|pat| {
            pat.split_once('/')
                .is_some_and(|(b, d)| b == blame.as_str() && (d == "*" || d == detail))
        })
    }

    /// The wait before retry number `retry` (1 for the first) of `job_id`:
    /// `initial_delay × backoff^(retry-1)`, capped at `max_delay`, spread
    /// by `jitter`. The spread is derived from the job id and retry number,
    /// so every replica computes the same instant.
    pub fn delay(&self, retry: u32, job_id: &Uuid) -> Duration {
        let exp = retry.saturating_sub(1).min(64) as i32;
        let base = self.initial_delay.as_secs_f64() * self.backoff.powi(exp);
        let capped = base.min(self.max_delay.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            // A uniform value in [-1, 1) from the id and the retry number.
            let u = unit(
                job_id.as_u128() as u64 ^ (job_id.as_u128() >> 64) as u64,
                retry,
            );
            1.0 + self.jitter * (2.0 * u - 1.0)
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * spread).max(0.0))
    }

    /// What is wrong with this policy, each problem prefixed with `at`.
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut p = Vec::new();
        for pat in &self.retryable {
            match pat.split_once('/') {
                Some((b, d)) if b.parse::<Blame>().is_ok() && !d.is_empty() => {}
                _ => p.push(format!(
                    "{at}.retryable: {pat:?} is not BLAME/DETAIL (BLAME one of system, task, third_party, unknown; DETAIL a code or *)"
                )),
            }
        }
        if self.max_attempts == 0 {
            p.push(format!("{at}.max_attempts: must be at least 1"));
        }
        if !(self.backoff.is_finite() && self.backoff >= 1.0) {
            p.push(format!("{at}.backoff: must be a number of at least 1"));
        }
        if self.max_delay < self.initial_delay {
            p.push(format!(
                "{at}.max_delay: must not be less than initial_delay"
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            p.push(format!("{at}.jitter: must be between 0 and 1"));
        }
        p
    }
}

/// splitmix64 of `seed` and `n`, as a float in [0, 1).
fn unit(seed: u64, n: u32) -> f64 {
    let mut z = seed.wrapping_add(u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// What the policy did with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Back to SCHEDULED, not before the job's `not_before`.
    Retried,
    /// The attempt budget is used up: SHELVED with the last failure.
    ShelvedRetriesExhausted,
    /// Poison: SHELVED with blame `task`, detail `worker_crash_loop`.
    ShelvedPoison,
    /// Left as it is (CRASHED): not retryable, or the job opted out.
    Kept,
    /// Back to SCHEDULED at once, the attempt not counted against the
    /// task: its resource was recycled under it.
    Requeued,
}

impl Fate {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Fate::Retried => "retried",
            Fate::ShelvedRetriesExhausted => "retries_exhausted",
            Fate::ShelvedPoison => "worker_crash_loop",
            Fate::Kept => "kept",
            Fate::Requeued => "requeued",
        }
    }
}

/// Why a running attempt's lease went away with its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The session expired: the bot stopped heartbeating.
    WorkerLost,
    /// The bot started a new session (it restarted) while this one held
    /// the lease.
    SessionSuperseded,
    /// The resource the attempt ran on was found broken (or closed by
    /// hand) and recycled: not the task's fault, so the attempt is not
    /// counted against its budget; the bot still counts towards poison.
    ResourceBroken,
    /// The worker could not reach the bus past the session timeout and
    /// killed the attempt itself (self-fencing), and said so.
    SelfFenced,
}

impl Loss {
    pub fn as_str(self) -> &'static str {
        match self {
            Loss::WorkerLost => "worker_lost",
            Loss::SessionSuperseded => "session_superseded",
            Loss::ResourceBroken => "resource_broken",
            Loss::SelfFenced => "self_fenced",
        }
    }
}

/// Attempts the job has used of its budget, and the budget: what a
/// person reads as "attempt 2 of 3".
pub fn budget(job: &Job, policy: &RetryPolicy) -> (u32, u32) {
    (attempts_used(job), limit(job, policy))
}

fn attempts_used(job: &Job) -> u32 {
    job.attempt.saturating_sub(job.budget_from)
}

fn limit(job: &Job, policy: &RetryPolicy) -> u32 {
    job.max_attempts.unwrap_or(policy.max_attempts).max(1)
}

fn entry(
    job: &Job,
    action: Action,
    from: JobState,
    to: JobState,
    now: DateTime<Utc>,
    note: String,
) -> HistoryEntry {
    HistoryEntry {
        at: now,
        action,
        attempt: job.attempt,
        from: Some(from),
        to: Some(to),
        actor: ACTOR.into(),
        bot_id: None,
        resource: None,
        note: Some(note),
    }
}

/// Moves `job` by `action` and records it in the history (by
/// `retry-policy`, about the lost `bot` if any); a shelved job keeps no
/// lease and no retry time. False, and nothing changed, when the job's
/// state does not allow `action`.
fn step(
    job: &mut Job,
    action: Action,
    note: String,
    bot: Option<String>,
    now: DateTime<Utc>,
) -> bool {
    let from = job.state;
    let Ok(to) = transition(from, action) else {
        return false;
    };
    job.state = to;
    if action == Action::Shelve {
        job.lease = None;
        job.not_before = None;
    }
    let mut e = entry(job, action, from, to, now, note);
    e.bot_id = bot;
    job.push_history(e);
    true
}

/// Moves `job` from `from` (CRASHED or RUNNING) to SCHEDULED after the
/// policy's delay, or to SHELVED when its budget is spent.
fn retry_or_shelve(job: &mut Job, policy: &RetryPolicy, now: DateTime<Utc>) -> Fate {
    let from = job.state;
    let used = attempts_used(job);
    let max = limit(job, policy);
    let what = job.blame_detail();
    if used >= max {
        let note = format!("retries used up: {used} of {max} attempts failed; last {what}");
        return match step(job, Action::Shelve, note, None, now) {
            true => Fate::ShelvedRetriesExhausted,
            false => Fate::Kept,
        };
    }
    let Ok(to) = transition(from, Action::Retry).or_else(|_| transition(from, Action::Requeue))
    else {
        return Fate::Kept;
    };
    let delay = policy.delay(used, &job.id);
    let at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
    job.state = to;
    job.lease = None;
    job.not_before = Some(at);
    job.queued_at = now;
    let action = if from == JobState::Running {
        Action::Requeue
    } else {
        Action::Retry
    };
    let note = format!(
        "{what}: retry {used} of {} in {:.1}s",
        max - 1,
        delay.as_secs_f64()
    );
    let e = entry(job, action, from, to, now, note);
    job.push_history(e);
    Fate::Retried
}

/// Applies the policy to a job whose attempt has just been recorded as
/// CRASHED (blame and detail set): retried after a delay, shelved when the
/// budget is spent, or kept CRASHED when the failure is not retryable or
/// the job opted out.
pub fn after_crash(job: &mut Job, policy: &RetryPolicy, now: DateTime<Utc>) -> Fate {
    if job.state != JobState::Crashed || !job.retry {
        return Fate::Kept;
    }
    let blame = job.blame.unwrap_or(Blame::Unknown);
    let detail = job.detail.clone().unwrap_or_default();
    if !policy.is_retryable(blame, &detail) {
        return Fate::Kept;
    }
    retry_or_shelve(job, policy, now)
}

/// Applies the policy to a RUNNING job whose worker was lost with its
/// lease (`reason` in words for the history): the failure is recorded as
/// `system/worker_lost`, the worker counted towards the poison rule, and
/// the job retried, shelved, or (retries off) CRASHED.
pub fn after_loss(
    job: &mut Job,
    policy: &RetryPolicy,
    loss: Loss,
    reason: &str,
    now: DateTime<Utc>,
) -> Fate {
    if job.state != JobState::Running {
        return Fate::Kept;
    }
    let bot = job.lease.as_ref().map(|l| l.bot_id.clone());
    if let Some(bot) = &bot {
        if !job.lost_workers.contains(bot) {
            job.lost_workers.push(bot.clone());
        }
    }
    job.blame = Some(Blame::System);
    job.detail = Some(WORKER_LOST.into());
    job.description = Some(format!(
        "{}: {reason}",
        match loss {
            Loss::WorkerLost => "the worker stopped heartbeating while running the attempt",
            Loss::SessionSuperseded => "the worker restarted while running the attempt",
            Loss::ResourceBroken => "the resource running the attempt was recycled",
            Loss::SelfFenced =>
                "the worker lost the bus past the session timeout and stopped the attempt",
        }
    ));
    job.updated_at = now;
    let lost = job.lost_workers.len() as u32;
    if policy.poison_limit > 0 && lost >= policy.poison_limit {
        if transition(job.state, Action::Shelve).is_err() {
            return Fate::Kept;
        }
        job.blame = Some(Blame::Task);
        job.detail = Some(WORKER_CRASH_LOOP.into());
        job.description = Some(format!(
            "poison job: its attempts were lost with {lost} distinct workers ({}); not dispatched again until a person retries it",
            job.lost_workers.join(", ")
        ));
        let note = format!(
            "task/{WORKER_CRASH_LOOP}: lost {lost} workers ({}), limit {}",
            job.lost_workers.join(", "),
            policy.poison_limit
        );
        step(job, Action::Shelve, note, bot, now);
        return Fate::ShelvedPoison;
    }
    if loss == Loss::ResourceBroken {
        // Not the task's doing: this attempt does not count, and the job
        // may run at once on another resource.
        let from = job.state;
        let Ok(to) = transition(from, Action::Requeue) else {
            return Fate::Kept;
        };
        job.budget_from = job.budget_from.saturating_add(1);
        job.state = to;
        job.lease = None;
        job.not_before = None;
        job.queued_at = now;
        job.blame = None;
        job.detail = None;
        job.description = None;
        let mut e = entry(
            job,
            Action::Requeue,
            from,
            to,
            now,
            format!("{reason}; requeued, the attempt not counted"),
        );
        e.bot_id = bot;
        job.push_history(e);
        return Fate::Requeued;
    }
    if !job.retry || !policy.is_retryable(Blame::System, WORKER_LOST) {
        let note = format!("system/{WORKER_LOST}: {reason}; not retried");
        step(job, Action::Crash, note, bot, now);
        return Fate::Kept;
    }
    let fate = retry_or_shelve(job, policy, now);
    if let Some(last) = job.history.last_mut() {
        last.bot_id = bot;
    }
    fate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Lease;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retryable: vec!["system/worker_lost".into(), "third_party/*".into()],
            max_attempts: 3,
            initial_delay: Duration::from_secs(10),
            backoff: 2.0,
            max_delay: Duration::from_secs(25),
            jitter: 0.0,
            poison_limit: 2,
        }
    }

    fn running(attempt: u32, bot: &str) -> Job {
        let now = Utc::now();
        let mut j = Job::builder("t").pool("p").at(now).build();
        j.state = JobState::Running;
        j.attempt = attempt;
        j.lease = Some(Lease {
            session: format!("s-{bot}"),
            bot_id: bot.into(),
            resource: None,
            resources: Vec::new(),
            epoch: attempt,
            leased_at: now,
            started_at: None,
            secret_hash: None,
        });
        j
    }

    fn crashed(attempt: u32, blame: Blame, detail: &str) -> Job {
        let mut j = running(attempt, "bot");
        j.state = JobState::Crashed;
        j.blame = Some(blame);
        j.detail = Some(detail.into());
        j
    }

    #[test]
    fn patterns_match_blame_and_detail() {
        let p = policy();
        assert!(p.is_retryable(Blame::ThirdParty, "network"));
        assert!(p.is_retryable(Blame::System, "worker_lost"));
        assert!(!p.is_retryable(Blame::System, "oom"));
        assert!(!p.is_retryable(Blame::Task, "task_exception"));
    }

    #[test]
    fn delays_grow_by_backoff_up_to_the_cap() {
        let p = policy();
        let id = Uuid::new_v4();
        let d: Vec<u64> = (1..=4).map(|n| p.delay(n, &id).as_secs()).collect();
        assert_eq!(d, [10, 20, 25, 25]);
    }

    #[test]
    fn jitter_is_bounded_and_the_same_for_every_replica() {
        let p = RetryPolicy {
            jitter: 0.2,
            ..policy()
        };
        for _ in 0..200 {
            let id = Uuid::new_v4();
            let d = p.delay(1, &id).as_secs_f64();
            assert!((8.0..=12.0).contains(&d), "{d}");
            assert_eq!(p.delay(1, &id), p.delay(1, &id));
        }
    }

    #[test]
    fn third_party_crash_is_retried_then_shelved() {
        let p = policy();
        let now = Utc::now();
        let mut j = crashed(1, Blame::ThirdParty, "network");
        assert_eq!(after_crash(&mut j, &p, now), Fate::Retried);
        assert_eq!(j.state, JobState::Scheduled);
        assert_eq!(j.not_before, Some(now + chrono::Duration::seconds(10)));
        assert_eq!(j.blame, Some(Blame::ThirdParty), "the reason stays visible");
        let mut j = crashed(3, Blame::ThirdParty, "network");
        assert_eq!(after_crash(&mut j, &p, now), Fate::ShelvedRetriesExhausted);
        assert_eq!(j.state, JobState::Shelved);
        assert_eq!(j.detail.as_deref(), Some("network"));
        assert_eq!(j.history.last().map(|e| e.action), Some(Action::Shelve));
    }

    #[test]
    fn task_blame_and_opted_out_jobs_stay_crashed() {
        let p = policy();
        let mut j = crashed(1, Blame::Task, "task_exception");
        assert_eq!(after_crash(&mut j, &p, Utc::now()), Fate::Kept);
        assert_eq!(j.state, JobState::Crashed);
        let mut j = crashed(1, Blame::ThirdParty, "network");
        j.retry = false;
        assert_eq!(after_crash(&mut j, &p, Utc::now()), Fate::Kept);
        assert_eq!(j.state, JobState::Crashed);
    }

    #[test]
    fn job_limit_and_fresh_budget_count_from_the_budget_start() {
        let p = policy();
        let mut j = crashed(5, Blame::ThirdParty, "network");
        j.budget_from = 4; // a person retried after attempt 4
        assert_eq!(after_crash(&mut j, &p, Utc::now()), Fate::Retried);
        let mut j = crashed(1, Blame::ThirdParty, "network");
        j.max_attempts = Some(1);
        assert_eq!(
            after_crash(&mut j, &p, Utc::now()),
            Fate::ShelvedRetriesExhausted
        );
    }

    #[test]
    fn lost_workers_are_retried_then_poison_after_two_distinct_bots() {
        let p = RetryPolicy {
            max_attempts: 10,
            ..policy()
        };
        let now = Utc::now();
        let mut j = running(1, "a");
        assert_eq!(
            after_loss(&mut j, &p, Loss::WorkerLost, "session expired", now),
            Fate::Retried
        );
        assert_eq!(
            (j.state, j.blame, j.detail.as_deref()),
            (
                JobState::Scheduled,
                Some(Blame::System),
                Some("worker_lost")
            )
        );
        assert!(j.lease.is_none() && j.not_before.is_some());
        let last = j.history.last().expect("history");
        assert_eq!(
            (last.action, last.bot_id.as_deref()),
            (Action::Requeue, Some("a"))
        );
        // The same bot again (it restarted) is still one worker.
        j.state = JobState::Running;
        j.attempt = 2;
        j.lease = running(2, "a").lease;
        assert_eq!(
            after_loss(&mut j, &p, Loss::SessionSuperseded, "restarted", now),
            Fate::Retried
        );
        j.state = JobState::Running;
        j.attempt = 3;
        j.lease = running(3, "b").lease;
        assert_eq!(
            after_loss(&mut j, &p, Loss::WorkerLost, "session expired", now),
            Fate::ShelvedPoison
        );
        assert_eq!(
            (j.state, j.blame, j.detail.as_deref()),
            (
                JobState::Shelved,
                Some(Blame::Task),
                Some(WORKER_CRASH_LOOP)
            )
        );
        assert_eq!(j.lost_workers, ["a", "b"]);
    }

    #[test]
    fn a_recycled_resource_requeues_without_spending_the_budget() {
        let p = RetryPolicy {
            max_attempts: 1,
            ..policy()
        };
        let now = Utc::now();
        let mut j = running(1, "a");
        assert_eq!(
            after_loss(&mut j, &p, Loss::ResourceBroken, "host-a closed", now),
            Fate::Requeued
        );
        // One attempt allowed, one made: still runnable, at once.
        assert_eq!(j.state, JobState::Scheduled);
        assert_eq!(attempts_used(&j), 0);
        assert!(j.not_before.is_none() && j.lease.is_none() && j.blame.is_none());
        assert_eq!(j.lost_workers, ["a"]);
        // The poison rule still applies: a second bot lost with it shelves.
        j.state = JobState::Running;
        j.attempt = 2;
        j.lease = running(2, "b").lease;
        assert_eq!(
            after_loss(&mut j, &p, Loss::ResourceBroken, "host-b closed", now),
            Fate::ShelvedPoison
        );
    }

    #[test]
    fn lost_worker_of_an_opted_out_job_crashes_it() {
        let mut j = running(1, "a");
        j.retry = false;
        assert_eq!(
            after_loss(&mut j, &policy(), Loss::WorkerLost, "gone", Utc::now()),
            Fate::Kept
        );
        assert_eq!(j.state, JobState::Crashed);
        assert_eq!(j.detail.as_deref(), Some(WORKER_LOST));
    }

    #[test]
    fn bad_policies_are_reported() {
        let p = RetryPolicy {
            retryable: vec!["network".into(), "nobody/x".into()],
            max_attempts: 0,
            backoff: 0.5,
            max_delay: Duration::from_secs(1),
            jitter: 2.0,
            ..policy()
        };
        assert_eq!(p.problems("retry").len(), 6, "{:?}", p.problems("retry"));
        assert!(policy().problems("retry").is_empty());
    }
}
