//! What an acquire request gets: pure decisions (may the session be
//! served, the record a dispatch writes, what a dispatch read back means,
//! the reply). The long poll itself is `loops::acquire`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use warden_shared::error::ErrorCode;
use warden_shared::job::{HistoryEntry, Job, Lease};
use warden_shared::messages::{
    AcquireReply, AcquireRequest, ErrorBody, LeaseGrant, MESSAGE_VERSION,
};
use warden_shared::session::{Session, SessionState};
use warden_shared::state::{transition, Action};
use warden_shared::store::Versioned;
use warden_shared::{lease_secret, Config};

use crate::requeue::RequeueReason;

/// How an acquire request ended; its [`label`](Self::label) is the
/// `result` of `warden_scheduler_acquire_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireResult {
    Leased,
    Empty,
    Rejected,
    ResourceUnavailable,
    Invalid,
}

impl AcquireResult {
    pub const ALL: [AcquireResult; 5] = [
        AcquireResult::Leased,
        AcquireResult::Empty,
        AcquireResult::Rejected,
        AcquireResult::ResourceUnavailable,
        AcquireResult::Invalid,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AcquireResult::Leased => "leased",
            AcquireResult::Empty => "empty",
            AcquireResult::Rejected => "rejected",
            AcquireResult::ResourceUnavailable => "resource_unavailable",
            AcquireResult::Invalid => "invalid",
        }
    }
}

/// Why a request gets no lease: the error code and message of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: String) -> Self {
        Refusal { code, message }
    }

    /// The reply refusing the request, and how it is counted.
    pub fn reply(self, result: AcquireResult) -> (AcquireResult, AcquireReply) {
        (
            result,
            AcquireReply {
                version: MESSAGE_VERSION,
                leases: Vec::new(),
                error: Some(ErrorBody::new(self.code, self.message)),
            },
        )
    }
}

/// How long a request may wait for work, and how many leases it may get:
/// never more than its session's capacity.
pub fn limits(req: &AcquireRequest, config: &Config, capacity: u32) -> (Duration, usize) {
    (
        Duration::from_millis(req.wait_ms).min(config.scheduler.acquire_wait),
        req.max.clamp(1, capacity.clamp(1, 1000)) as usize,
    )
}

/// The reply to a request that could not be decoded.
pub fn invalid(error: &str) -> (AcquireResult, AcquireReply) {
    Refusal::new(
        ErrorCode::InvalidRequest,
        format!("cannot decode acquire request: {error}"),
    )
    .reply(AcquireResult::Invalid)
}

/// The refusal when the session could not be read: transient, ask again.
pub fn session_unreadable(session: &str, error: &str) -> Refusal {
    Refusal::new(
        ErrorCode::Unavailable,
        format!("cannot read session {session}: {error}"),
    )
}

/// May `req`, published on the acquire subject of `subject_bot` (the bot
/// its credentials prove), be served, given its session as the fencing
/// service wrote it (`None`: never created, or deleted)? The refusal
/// otherwise. Served only: the bot the subject names, its own session,
/// active, and only pools that session serves.
pub fn session_verdict(
    req: &AcquireRequest,
    subject_bot: &str,
    known: Option<&Session>,
) -> Result<(), Refusal> {
    let name = &req.session;
    if req.bot_id != subject_bot {
        return Err(Refusal::new(
            ErrorCode::BotMismatch,
            format!(
                "the request names bot {:?}, but its credentials are bot {subject_bot:?}",
                req.bot_id
            ),
        ));
    }
    let Some(session) = known else {
        return Err(Refusal::new(
            ErrorCode::UnknownSession,
            format!("session {name} does not exist"),
        ));
    };
    if session.bot_id != subject_bot {
        // Another bot's session: said as if it did not exist (whose it is
        // is none of this bot's business).
        return Err(Refusal::new(
            ErrorCode::UnknownSession,
            format!("session {name} is not a session of bot {subject_bot}"),
        ));
    }
    match session.state {
        SessionState::Active => {}
        SessionState::Quarantined => {
            return Err(Refusal::new(
                ErrorCode::SessionSuperseded,
                format!(
                    "session {name} is no longer current ({})",
                    RequeueReason::SessionSuperseded
                ),
            ))
        }
        state => {
            return Err(Refusal::new(
                ErrorCode::UnknownSession,
                format!("session {name} is {}", state.as_str()),
            ))
        }
    }
    if let Some(pool) = req.pools.iter().find(|p| !session.pools.contains(p)) {
        return Err(Refusal::new(
            ErrorCode::PoolNotAllowed,
            format!("session {name} does not serve pool {pool:?}"),
        ));
    }
    Ok(())
}

/// The refusal of a request whose session this replica learned is dead
/// while it waited.
pub fn dead_session(req: &AcquireRequest, reason: RequeueReason) -> Refusal {
    let code = match reason {
        RequeueReason::SessionSuperseded => ErrorCode::SessionSuperseded,
        RequeueReason::WorkerLost
        | RequeueReason::SessionClosed
        | RequeueReason::ResourceClosed
        | RequeueReason::LeaseUndelivered => ErrorCode::UnknownSession,
    };
    Refusal::new(
        code,
        format!("session {} is no longer current ({reason})", req.session),
    )
}

/// The reply once the wait is over: the leases got, or why none (a
/// resource not open, `blocked`), or empty.
pub fn finish(leases: Vec<LeaseGrant>, blocked: Option<String>) -> (AcquireResult, AcquireReply) {
    if let (Some(why), true) = (blocked, leases.is_empty()) {
        return Refusal::new(ErrorCode::ResourceUnavailable, why)
            .reply(AcquireResult::ResourceUnavailable);
    }
    let result = if leases.is_empty() {
        AcquireResult::Empty
    } else {
        AcquireResult::Leased
    };
    (
        result,
        AcquireReply {
            version: MESSAGE_VERSION,
            leases,
            error: None,
        },
    )
}

/// The resources an acquire request runs on (its host alone for agents
/// that do not declare resources).
pub fn request_resources(req: &AcquireRequest) -> Vec<String> {
    if req.resources.is_empty() {
        req.resource.iter().cloned().collect()
    } else {
        req.resources.clone()
    }
}

/// The record of `job` dispatched to `req`'s session: SCHEDULED → RUNNING
/// with a new epoch, its lease keeping `secret_hash` (of the secret only
/// the grant carries). `None` when the state machine does not allow it.
pub fn dispatched(
    mut job: Job,
    req: &AcquireRequest,
    secret_hash: String,
    now: DateTime<Utc>,
) -> Option<Job> {
    let to = transition(job.state, Action::Dispatch).ok()?;
    let from = job.state;
    job.state = to;
    job.attempt += 1;
    job.lease = Some(Lease {
        session: req.session.clone(),
        bot_id: req.bot_id.clone(),
        resource: req.resource.clone(),
        resources: request_resources(req),
        epoch: job.attempt,
        leased_at: now,
        started_at: None,
        secret_hash: Some(secret_hash),
    });
    job.outcome = None;
    job.blame = None;
    job.detail = None;
    job.description = None;
    job.crash = None;
    job.not_before = None;
    job.updated_at = now;
    job.push_history(HistoryEntry {
        at: now,
        action: Action::Dispatch,
        attempt: job.attempt,
        from: Some(from),
        to: Some(to),
        actor: req.session.clone(),
        bot_id: Some(req.bot_id.clone()),
        resource: req.resource.clone(),
        note: None,
    });
    Some(job)
}

/// What a dispatch whose write failed (its acknowledgement may be lost)
/// does, given the record read back.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadBack {
    /// Our write went through, and the lease is fresh: hand it out.
    Grant(LeaseGrant),
    /// The job moved on (or is gone): the watch brings its new state.
    Moved,
    /// Unchanged, or unknown (it could not be read): back in the queue.
    Requeue,
}

/// [`ReadBack`] of dispatch `attempt` to `session` of the record read at
/// `revision`, given `read` (`None`: it could not be read; `Some(None)`:
/// no such job). A grant carries `secret`, the one whose hash the dispatch
/// wrote: a lease of ours whose hash is another's is not ours.
pub fn read_back(
    read: Option<Option<&Versioned>>,
    secret: &str,
    session: &str,
    attempt: u32,
    revision: u64,
    grace: chrono::Duration,
    now: DateTime<Utc>,
) -> ReadBack {
    match read {
        // Only a fresh lease: one written long ago would look undelivered
        // to the orphan sweep as soon as it is handed out; that one the
        // sweep takes back instead.
        Some(Some(v))
            if v.job.is_held_by(session, attempt)
                && v.job.lease.as_ref().is_some_and(|l| {
                    now - l.leased_at < grace
                        && l.secret_hash
                            .as_deref()
                            .is_some_and(|h| lease_secret::matches(secret, h))
                }) =>
        {
            ReadBack::Grant(grant(&v.job, secret))
        }
        Some(Some(v)) if v.revision != revision => ReadBack::Moved,
        Some(None) => ReadBack::Moved,
        _ => ReadBack::Requeue,
    }
}

/// What goes back into the queue after a dispatch lost its
/// compare-and-set, given the record read back (`None`: it could not be
/// read; `Some(None)`: no such job). A lost race does not prove that the
/// job moved on: a clustered stream also refuses a write of a key whose
/// previous write it is still applying (10164), with nobody else writing.
/// Taking that for a move left the job out of the queue, SCHEDULED, with
/// no new version coming to bring it back. So the newer of the read and
/// the dispatched-from version is observed again (a replica lagging
/// behind cannot take the job back in time); nothing when it is gone.
pub fn after_lost_dispatch(
    original: Versioned,
    read: Option<Option<Versioned>>,
) -> Option<Versioned> {
    match read {
        Some(None) => None,
        Some(Some(v)) if v.revision >= original.revision => Some(v),
        _ => Some(original),
    }
}

/// The lease handed to the worker, with the secret whose hash its record
/// keeps.
pub fn grant(job: &Job, secret: &str) -> LeaseGrant {
    LeaseGrant {
        job_id: job.id,
        epoch: job.attempt,
        task: job.task.clone(),
        args: job.args.clone(),
        pool: job.pool.clone(),
        priority: job.priority,
        secret: Some(secret.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{acquire_req as req, at, running, scheduled, session};
    use warden_shared::JobState;

    #[test]
    fn a_lost_dispatch_puts_back_what_the_bucket_holds_never_an_older_version() {
        let original = Versioned {
            job: scheduled(),
            revision: 7,
        };
        // Refused though unchanged (a clustered write still in flight):
        // the job stays queued.
        let same = after_lost_dispatch(original.clone(), Some(Some(original.clone())));
        assert_eq!(same.map(|v| v.revision), Some(7));
        // Moved on: its newer version, whatever its state.
        let mut moved = original.clone();
        moved.revision = 9;
        moved.job.state = JobState::Running;
        let newer = after_lost_dispatch(original.clone(), Some(Some(moved)));
        assert_eq!(
            newer.map(|v| (v.revision, v.job.state)),
            Some((9, JobState::Running))
        );
        // A lagging read does not take it back in time; an unreadable
        // one keeps what we had.
        let mut lagging = original.clone();
        lagging.revision = 5;
        assert_eq!(
            after_lost_dispatch(original.clone(), Some(Some(lagging))).map(|v| v.revision),
            Some(7)
        );
        assert_eq!(
            after_lost_dispatch(original.clone(), None).map(|v| v.revision),
            Some(7)
        );
        // Gone: nothing to queue.
        assert!(after_lost_dispatch(original, Some(None)).is_none());
    }

    #[test]
    fn only_an_active_session_of_the_subjects_bot_is_served() {
        let r = req("s1", "bot-a");
        let mine = session("s1", "bot-a", SessionState::Active);
        assert_eq!(session_verdict(&r, "bot-a", Some(&mine)), Ok(()));
        let code = |bot: &str, known: Option<&Session>| {
            session_verdict(&r, bot, known).map_err(|f| f.code)
        };
        // Never created (or made up).
        assert_eq!(code("bot-a", None), Err(ErrorCode::UnknownSession));
        // Another bot's session, the body naming the credentials' bot.
        let theirs = session("s1", "bot-b", SessionState::Active);
        assert_eq!(code("bot-a", Some(&theirs)), Err(ErrorCode::UnknownSession));
        // The body naming a bot the credentials are not.
        assert_eq!(code("bot-b", Some(&theirs)), Err(ErrorCode::BotMismatch));
        assert_eq!(code("bot-b", None), Err(ErrorCode::BotMismatch));
        for (state, want) in [
            (SessionState::Quarantined, ErrorCode::SessionSuperseded),
            (SessionState::Expired, ErrorCode::UnknownSession),
            (SessionState::Closed, ErrorCode::UnknownSession),
        ] {
            let s = session("s1", "bot-a", state);
            assert_eq!(code("bot-a", Some(&s)), Err(want), "{state:?}");
        }
    }

    #[test]
    fn only_the_sessions_own_pools_are_served() {
        let mine = session("s1", "bot-a", SessionState::Active);
        let mut r = req("s1", "bot-a");
        r.pools = vec!["default".into(), "gpu".into()];
        let f = session_verdict(&r, "bot-a", Some(&mine)).expect_err("refused");
        assert_eq!(f.code, ErrorCode::PoolNotAllowed);
        assert_eq!(f.message, "session s1 does not serve pool \"gpu\"");
        r.pools = vec!["default".into()];
        assert_eq!(session_verdict(&r, "bot-a", Some(&mine)), Ok(()));
    }

    #[test]
    fn a_superseded_session_is_told_so_and_any_other_dead_one_is_unknown() {
        let r = req("s1", "bot-a");
        for reason in RequeueReason::ALL {
            let f = dead_session(&r, reason);
            let want = if reason == RequeueReason::SessionSuperseded {
                ErrorCode::SessionSuperseded
            } else {
                ErrorCode::UnknownSession
            };
            assert_eq!(f.code, want, "{reason}");
            assert_eq!(
                f.message,
                format!("session s1 is no longer current ({})", reason.label())
            );
        }
    }

    #[test]
    fn refusals_carry_their_codes_and_results() {
        let (result, reply) = invalid("bad json");
        assert_eq!(result, AcquireResult::Invalid);
        let e = reply.error.expect("an error");
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                ErrorCode::InvalidRequest,
                "cannot decode acquire request: bad json"
            )
        );
        let (result, reply) = session_unreadable("s1", "timed out").reply(AcquireResult::Rejected);
        assert_eq!(result, AcquireResult::Rejected);
        assert_eq!(reply.error.map(|e| e.code), Some(ErrorCode::Unavailable));
        assert!(reply.leases.is_empty());
    }

    #[test]
    fn the_reply_is_leased_empty_or_resource_unavailable() {
        let g = grant(&running(1, "s1"), "secret");
        let (result, reply) = finish(vec![g.clone()], None);
        assert_eq!((result, reply.error), (AcquireResult::Leased, None));
        // Leases got before a resource closed are handed out all the same.
        let (result, reply) = finish(vec![g], Some("resource r1 is closed".into()));
        assert_eq!((result, reply.leases.len()), (AcquireResult::Leased, 1));
        assert_eq!(finish(Vec::new(), None).0, AcquireResult::Empty);
        let (result, reply) = finish(Vec::new(), Some("resource r1 is broken".into()));
        assert_eq!(result, AcquireResult::ResourceUnavailable);
        let e = reply.error.expect("an error");
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::ResourceUnavailable, "resource r1 is broken")
        );
    }

    #[test]
    fn result_labels_are_the_exported_ones() {
        let labels: Vec<&str> = AcquireResult::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "leased",
                "empty",
                "rejected",
                "resource_unavailable",
                "invalid"
            ]
        );
    }

    #[test]
    fn a_request_runs_on_its_declared_resources_else_its_host() {
        let mut r = req("s1", "bot-a");
        assert!(request_resources(&r).is_empty());
        r.resource = Some("host".into());
        assert_eq!(request_resources(&r), vec!["host".to_string()]);
        r.resources = vec!["host".into(), "gpu".into()];
        assert_eq!(
            request_resources(&r),
            vec!["host".to_string(), "gpu".into()]
        );
    }

    #[test]
    fn limits_cap_the_wait_and_the_count_at_the_sessions_capacity() {
        let config = Config::defaults();
        let mut r = req("s1", "bot-a");
        r.max = 0;
        r.wait_ms = u64::MAX / 2;
        assert_eq!(limits(&r, &config, 4), (config.scheduler.acquire_wait, 1));
        r.max = 5000;
        r.wait_ms = 1;
        assert_eq!(limits(&r, &config, 4), (Duration::from_millis(1), 4));
        assert_eq!(limits(&r, &config, 0), (Duration::from_millis(1), 1));
        assert_eq!(limits(&r, &config, u32::MAX).1, 1000);
    }

    #[test]
    fn a_dispatch_starts_a_new_attempt_with_a_fresh_lease() {
        let mut job = scheduled();
        job.blame = Some(warden_shared::Blame::Task);
        job.not_before = Some(at(5));
        let mut r = req("s1", "bot-a");
        r.resource = Some("host".into());
        let secret = lease_secret::generate();
        let next = dispatched(job, &r, lease_secret::hash(&secret), at(10)).expect("dispatched");
        assert_eq!((next.state, next.attempt), (JobState::Running, 1));
        let lease = next.lease.as_ref().expect("a lease");
        assert_eq!(
            (lease.session.as_str(), lease.epoch, lease.leased_at),
            ("s1", 1, at(10))
        );
        assert_eq!(lease.resources, vec!["host".to_string()]);
        assert_eq!((next.blame, next.not_before), (None, None));
        let last = next.history.last().expect("history");
        assert_eq!((last.action, last.actor.as_str()), (Action::Dispatch, "s1"));
        // The record keeps only the secret's hash; the grant carries it.
        assert_eq!(lease.secret_hash, Some(lease_secret::hash(&secret)));
        assert!(!serde_json::to_string(&next)
            .expect("json")
            .contains(&secret));
        let g = grant(&next, &secret);
        assert_eq!((g.epoch, g.secret.as_deref()), (1, Some(secret.as_str())));
        // A running job is not dispatched again.
        assert_eq!(dispatched(next, &r, String::new(), at(11)), None);
    }

    #[test]
    fn a_dispatch_read_back_is_granted_only_when_ours_and_fresh() {
        let grace = chrono::Duration::seconds(5);
        let mut job = running(1, "s1");
        let secret = lease_secret::generate();
        if let Some(l) = job.lease.as_mut() {
            l.secret_hash = Some(lease_secret::hash(&secret));
        }
        let ours = Versioned { job, revision: 8 };
        // Same session and epoch, but another dispatch's secret: not ours.
        assert_eq!(
            read_back(Some(Some(&ours)), "other", "s1", 1, 7, grace, at(2)),
            ReadBack::Moved
        );
        // Ours and fresh: hand it out.
        assert!(matches!(
            read_back(Some(Some(&ours)), &secret, "s1", 1, 7, grace, at(2)),
            ReadBack::Grant(g) if g.epoch == 1 && g.secret.as_deref() == Some(secret.as_str())
        ));
        // Ours but old: the orphan sweep takes it back; moved on otherwise.
        assert_eq!(
            read_back(Some(Some(&ours)), &secret, "s1", 1, 7, grace, at(6)),
            ReadBack::Moved
        );
        // Another session's: moved on.
        assert_eq!(
            read_back(Some(Some(&ours)), &secret, "s2", 1, 7, grace, at(2)),
            ReadBack::Moved
        );
        // Unchanged (the write did not happen): back in the queue.
        let unchanged = Versioned {
            job: scheduled(),
            revision: 7,
        };
        assert_eq!(
            read_back(Some(Some(&unchanged)), &secret, "s1", 1, 7, grace, at(2)),
            ReadBack::Requeue
        );
        // Gone: moved on; unreadable: back in the queue.
        assert_eq!(
            read_back(Some(None), &secret, "s1", 1, 7, grace, at(2)),
            ReadBack::Moved
        );
        assert_eq!(
            read_back(None, &secret, "s1", 1, 7, grace, at(2)),
            ReadBack::Requeue
        );
    }
}
