//! Taking a running attempt's lease back: why ([`RequeueReason`]), and the
//! record that results ([`take_back`]). Pure: the loop in
//! `loops::requeue` reads the job, calls [`take_back`] and writes its
//! answer with compare-and-set.

use chrono::{DateTime, Utc};
use warden_shared::job::{HistoryEntry, Job};
use warden_shared::retry::{self, Fate, Loss, RetryPolicy};
use warden_shared::state::{transition, Action};
use warden_shared::{Config, JobState};

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
    /// after all): a requeued job then waits [`holder_grace`], time for the
    /// holder's next heartbeat to be told to stop, so it never runs twice
    /// at once.
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

/// Half a session timeout: how long a lease's holder has to learn at its
/// next heartbeat that the lease was taken back, and how fresh a lease must
/// be to be handed out after a dispatch read back.
pub fn holder_grace(config: &Config) -> chrono::Duration {
    chrono::Duration::from_std(config.fencing.session_timeout / 2)
        .unwrap_or(chrono::Duration::seconds(5))
}

/// Whether `job` is still the attempt to take back: RUNNING, leased to
/// `session`, and of attempt `epoch` when one is given. Anything else: the
/// job moved on (another replica won), nothing to do.
pub fn still_held(job: &Job, session: &str, epoch: Option<u32>) -> bool {
    job.state == JobState::Running
        && job.lease.as_ref().map(|l| l.session.as_str()) == Some(session)
        && !epoch.is_some_and(|e| job.lease.as_ref().map(|l| l.epoch) != Some(e))
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
