//! Taking a running attempt's lease back: why ([`RequeueReason`]), and the
//! record that results ([`take_back`]). Pure: the loop in
//! `loops::requeue` reads the job, calls [`take_back`] and writes its
//! answer with compare-and-set.

use chrono::{DateTime, Utc};
use warden_shared::job::{HistoryEntry, Job};
use warden_shared::retry::{self, Fate, Loss, RetryPolicy};
use warden_shared::state::{transition, Action};
use warden_shared::{self_fence, Config, JobState};

/// Why a running attempt's lease is taken back; its [`label`](Self::label)
/// is the `reason` of `warden_scheduler_leases_requeued_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequeueReason {
    /// The session expired: the bot stopped heartbeating.
    WorkerLost,
    /// The bot started a new session while this one held the lease.
    SessionSuperseded,
    /// The session was closed (the bot shut down cleanly).
    SessionClosed,
    /// A resource the attempt ran on was closed.
    ResourceClosed,
    /// A lease the session's heartbeats never listed: the grant was lost on
    /// its way to the worker (a reply dropped with a connection, a write
    /// whose acknowledgement timed out).
    LeaseUndelivered,
}

impl RequeueReason {
    pub const ALL: [RequeueReason; 5] = [
        RequeueReason::WorkerLost,
        RequeueReason::SessionSuperseded,
        RequeueReason::SessionClosed,
        RequeueReason::ResourceClosed,
        RequeueReason::LeaseUndelivered,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RequeueReason::WorkerLost => "worker_lost",
            RequeueReason::SessionSuperseded => "session_superseded",
            RequeueReason::SessionClosed => "session_closed",
            RequeueReason::ResourceClosed => "resource_closed",
            RequeueReason::LeaseUndelivered => "lease_undelivered",
        }
    }

    /// The loss the retry policy judges, or `None`: the lease goes straight
    /// back to the queue and the attempt is not counted.
    pub fn loss(self) -> Option<Loss> {
        match self {
            RequeueReason::WorkerLost => Some(Loss::WorkerLost),
            RequeueReason::SessionSuperseded => Some(Loss::SessionSuperseded),
            RequeueReason::ResourceClosed => Some(Loss::ResourceBroken),
            RequeueReason::SessionClosed | RequeueReason::LeaseUndelivered => None,
        }
    }

    /// Whether the lease's holder may still be alive and running the task
    /// (its resource was closed under it; the grant may have reached it
    /// after all): a requeued job then waits [`holder_grace`], until the
    /// holder was told to stop or has fenced itself, so it never runs
    /// twice at once.
    pub fn holder_may_run(self) -> bool {
        match self {
            RequeueReason::ResourceClosed | RequeueReason::LeaseUndelivered => true,
            RequeueReason::WorkerLost
            | RequeueReason::SessionSuperseded
            | RequeueReason::SessionClosed => false,
        }
    }
}

impl std::fmt::Display for RequeueReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// How long a job whose lease was taken back from a holder that may
/// still run it waits before it is leased again: until the holder has
/// surely stopped ([`self_fence::holder_stopped_within`], a session
/// timeout). Half a timeout was not enough: a holder whose heartbeats
/// went unanswered for a while (a NATS node down) kept running the task
/// while the job's next attempt started elsewhere.
pub fn holder_grace(config: &Config) -> chrono::Duration {
    chrono::Duration::from_std(self_fence::holder_stopped_within(
        config.fencing.session_timeout,
    ))
    .unwrap_or(chrono::Duration::seconds(10))
}

/// How fresh a lease read back after an unacknowledged dispatch must be
/// to be handed out: half a session timeout, so the holder is listing it
/// in its heartbeats well before the orphan sweep looks.
pub fn fresh_lease_limit(config: &Config) -> chrono::Duration {
    chrono::Duration::from_std(config.fencing.session_timeout / 2)
        .unwrap_or(chrono::Duration::seconds(5))
}

/// Whether `job` is still the attempt to take back: RUNNING, leased to
/// `session`, and of attempt `epoch` when one is given. Anything else: the
/// job moved on (another replica won), nothing to do.
pub fn still_held(job: &Job, session: &str, epoch: Option<u32>) -> bool {
    job.state == JobState::Running
        && job.lease.as_ref().map(|l| l.session.as_str()) == Some(session)
        && epoch.is_none_or(|e| job.lease.as_ref().map(|l| l.epoch) == Some(e))
}

/// The record to write when `job`'s lease is taken back.
#[derive(Debug, Clone, PartialEq)]
pub struct TakeBack {
    pub next: Job,
    /// What the retry policy did, when it judged the loss.
    pub fate: Option<Fate>,
}

/// What taking back `session`'s lease on `job` for `reason` writes:
/// under the retry policy for a lost worker (a delayed retry, or SHELVED),
/// straight back to the queue, uncounted, otherwise. `closed` are the
/// lease's resources known closed (named in the history note). `None`
/// when the state machine allows no requeue. The caller checked
/// [`still_held`].
pub fn take_back(
    job: &Job,
    session: &str,
    reason: RequeueReason,
    closed: &[String],
    policy: &RetryPolicy,
    grace: chrono::Duration,
    now: DateTime<Utc>,
) -> Option<TakeBack> {
    let mut next = job.clone();
    next.updated_at = now;
    let fate = match reason.loss() {
        Some(loss) => {
            let words = match loss {
                Loss::WorkerLost | Loss::SelfFenced => format!("session {session} expired"),
                Loss::SessionSuperseded => {
                    format!("session {session} was superseded by a new session of its bot")
                }
                Loss::ResourceBroken => format!("resource {} was closed", closed.join(", ")),
            };
            Some(retry::after_loss(&mut next, policy, loss, &words, now))
        }
        None => {
            let to = transition(job.state, Action::Requeue).ok()?;
            let lease = next.lease.take();
            next.state = to;
            next.queued_at = now;
            // Not the job's doing: the attempt is not counted.
            next.budget_from = next.budget_from.saturating_add(1);
            next.push_history(HistoryEntry {
                at: now,
                action: Action::Requeue,
                attempt: job.attempt,
                from: Some(JobState::Running),
                to: Some(to),
                actor: "scheduler".into(),
                bot_id: lease.as_ref().map(|l| l.bot_id.clone()),
                resource: lease.as_ref().and_then(|l| l.resource.clone()),
                note: Some(if reason == RequeueReason::LeaseUndelivered {
                    format!("{reason}: session {session} never listed the lease in its heartbeats; requeued, the attempt not counted")
                } else {
                    format!("{reason}: session {session} is no longer current; requeued, the attempt not counted")
                }),
            });
            None
        }
    };
    if reason.holder_may_run() && next.state == JobState::Scheduled {
        next.not_before = Some(now + grace);
    }
    Some(TakeBack { next, fate })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, running, scheduled};
    use warden_shared::Blame;

    fn grace() -> chrono::Duration {
        chrono::Duration::seconds(5)
    }

    fn back(job: &Job, reason: RequeueReason) -> TakeBack {
        let policy = Config::defaults().retry_policy(&job.task);
        take_back(job, "s1", reason, &["r1".into()], &policy, grace(), at(100)).expect("taken back")
    }

    #[test]
    fn labels_are_the_exported_ones() {
        let labels: Vec<&str> = RequeueReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "worker_lost",
                "session_superseded",
                "session_closed",
                "resource_closed",
                "lease_undelivered"
            ]
        );
    }

    #[test]
    fn only_a_lost_worker_or_a_closed_resource_is_judged_by_the_policy() {
        assert_eq!(RequeueReason::WorkerLost.loss(), Some(Loss::WorkerLost));
        assert_eq!(
            RequeueReason::SessionSuperseded.loss(),
            Some(Loss::SessionSuperseded)
        );
        assert_eq!(
            RequeueReason::ResourceClosed.loss(),
            Some(Loss::ResourceBroken)
        );
        assert_eq!(RequeueReason::SessionClosed.loss(), None);
        assert_eq!(RequeueReason::LeaseUndelivered.loss(), None);
    }

    #[test]
    fn the_take_back_stops_when_the_job_moved_on() {
        let job = running(2, "s1");
        assert!(still_held(&job, "s1", None));
        assert!(still_held(&job, "s1", Some(2)));
        assert!(!still_held(&job, "s1", Some(1)));
        assert!(!still_held(&job, "s2", None));
        assert!(!still_held(&scheduled(), "s1", None));
    }

    #[test]
    fn a_closed_session_requeues_at_once_uncounted() {
        let job = running(2, "s1");
        let b = back(&job, RequeueReason::SessionClosed);
        assert_eq!(b.fate, None);
        assert_eq!(b.next.state, JobState::Scheduled);
        assert_eq!(b.next.lease, None);
        assert_eq!(b.next.budget_from, job.budget_from + 1);
        assert_eq!((b.next.queued_at, b.next.not_before), (at(100), None));
        let last = b.next.history.last().expect("history");
        assert_eq!(
            (last.action, last.actor.as_str()),
            (Action::Requeue, "scheduler")
        );
        assert!(last
            .note
            .as_deref()
            .is_some_and(|n| n.starts_with("session_closed: session s1 is no longer current")));
    }

    #[test]
    fn an_undelivered_lease_waits_for_its_holder_to_hear() {
        let b = back(&running(2, "s1"), RequeueReason::LeaseUndelivered);
        assert_eq!((b.fate, b.next.state), (None, JobState::Scheduled));
        assert_eq!(b.next.not_before, Some(at(100) + grace()));
        assert!(b
            .next
            .history
            .last()
            .and_then(|e| e.note.as_deref())
            .is_some_and(|n| n.contains("never listed the lease in its heartbeats")));
    }

    #[test]
    fn a_lost_worker_is_retried_under_the_policy() {
        let b = back(&running(1, "s1"), RequeueReason::WorkerLost);
        assert_eq!(b.fate, Some(Fate::Retried));
        assert_eq!(b.next.state, JobState::Scheduled);
        assert_eq!(b.next.blame, Some(Blame::System));
        assert_eq!(b.next.detail.as_deref(), Some("worker_lost"));
        // Its delay is the policy's, not the holder's grace.
        assert!(b.next.not_before.is_some_and(|t| t > at(100) + grace()));
    }

    #[test]
    fn a_closed_resource_costs_nothing_and_waits_for_its_holder() {
        let b = back(&running(1, "s1"), RequeueReason::ResourceClosed);
        assert_eq!(b.fate, Some(Fate::Requeued));
        assert_eq!(b.next.state, JobState::Scheduled);
        assert_eq!(b.next.not_before, Some(at(100) + grace()));
    }

    #[test]
    fn a_job_that_cannot_be_requeued_is_left_alone() {
        let policy = Config::defaults().retry_policy("t");
        let job = scheduled();
        assert_eq!(
            take_back(
                &job,
                "s1",
                RequeueReason::SessionClosed,
                &[],
                &policy,
                grace(),
                at(1)
            ),
            None
        );
    }

    /// Property: a job taken back from a holder that may still run it is
    /// not leased again before that holder, hearing nothing more, has
    /// fenced itself. (It was half a session timeout: with heartbeats
    /// unanswered for six of the ten seconds, chaos saw one job's two
    /// attempts run at once for a second.)
    #[test]
    fn a_taken_back_job_waits_until_a_silent_holder_has_fenced_itself() {
        for secs in [1, 3, 10, 60, 600] {
            let t = std::time::Duration::from_secs(secs);
            let mut config = Config::defaults();
            config.fencing.session_timeout = t;
            let fenced_by = self_fence::self_fence_after(t) + self_fence::watchdog_tick(t);
            let grace = holder_grace(&config).to_std().expect("positive");
            assert!(grace >= fenced_by, "{t:?}: {grace:?} < {fenced_by:?}");
            for reason in RequeueReason::ALL
                .into_iter()
                .filter(|r| r.holder_may_run())
            {
                let policy = config.retry_policy("t");
                let back = take_back(
                    &running(1, "s1"),
                    "s1",
                    reason,
                    &["r1".into()],
                    &policy,
                    holder_grace(&config),
                    at(100),
                )
                .expect("taken back");
                if back.next.state == JobState::Scheduled {
                    let wait = (back.next.not_before.expect("waits") - at(100))
                        .to_std()
                        .expect("ahead");
                    assert!(wait >= fenced_by, "{reason}: {wait:?}");
                }
            }
        }
        let mut config = Config::defaults();
        config.fencing.session_timeout = std::time::Duration::from_secs(10);
        assert_eq!(fresh_lease_limit(&config), chrono::Duration::seconds(5));
    }
}
