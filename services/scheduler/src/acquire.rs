//! What an acquire request gets: pure decisions (may the session be
//! served, the record a dispatch writes, what a dispatch read back means,
//! the reply). The long poll itself is `loops::acquire`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use warden_shared::job::{HistoryEntry, Job, Lease};
use warden_shared::messages::{
    AcquireReply, AcquireRequest, ErrorBody, LeaseGrant, MESSAGE_VERSION,
};
use warden_shared::session::{
    SessionState, RESOURCE_UNAVAILABLE, SESSION_SUPERSEDED, UNKNOWN_SESSION,
};
use warden_shared::state::{transition, Action};
use warden_shared::store::Versioned;
use warden_shared::Config;

use crate::requeue::RequeueReason;

/// Transient: the scheduler could not check the session; ask again.
pub const UNAVAILABLE: &str = "unavailable";
/// The request could not be decoded.
pub const INVALID_REQUEST: &str = "invalid_request";

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
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(code: &'static str, message: String) -> Self {
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

/// How long a request may wait for work, and how many leases it may get.
pub fn limits(req: &AcquireRequest, config: &Config) -> (Duration, usize) {
    (
        Duration::from_millis(req.wait_ms).min(config.scheduler.acquire_wait),
        req.max.clamp(1, 1000) as usize,
    )
}

/// The reply to a request that could not be decoded.
pub fn invalid(error: &str) -> (AcquireResult, AcquireReply) {
    Refusal::new(
        INVALID_REQUEST,
        format!("cannot decode acquire request: {error}"),
    )
    .reply(AcquireResult::Invalid)
}

/// The refusal when the session could not be read.
pub fn session_unreadable(session: &str, error: &str) -> Refusal {
    Refusal::new(
        UNAVAILABLE,
        format!("cannot read session {session}: {error}"),
    )
}

/// May `req` be served, given what is known of its session (state and
/// bot; `None`: the fencing service never created it)? The refusal
/// otherwise.
pub fn session_verdict(
    req: &AcquireRequest,
    known: Option<(SessionState, &str)>,
) -> Result<(), Refusal> {
    let name = &req.session;
    match known {
        None => Err(Refusal::new(
            UNKNOWN_SESSION,
            format!("session {name} does not exist"),
        )),
        Some((_, bot)) if bot != req.bot_id => Err(Refusal::new(
            UNKNOWN_SESSION,
            format!("session {name} belongs to bot {bot}, not to {}", req.bot_id),
        )),
        Some((SessionState::Active, _)) => Ok(()),
        Some((SessionState::Quarantined, _)) => Err(Refusal::new(
            SESSION_SUPERSEDED,
            format!(
                "session {name} is no longer current ({})",
                RequeueReason::SessionSuperseded
            ),
        )),
        Some((state, _)) => Err(Refusal::new(
            UNKNOWN_SESSION,
            format!("session {name} is {}", state.as_str()),
        )),
    }
}

/// The refusal of a request whose session this replica learned is dead
/// while it waited.
pub fn dead_session(req: &AcquireRequest, reason: RequeueReason) -> Refusal {
    let code = match reason {
        RequeueReason::SessionSuperseded => SESSION_SUPERSEDED,
        RequeueReason::WorkerLost
        | RequeueReason::SessionClosed
        | RequeueReason::ResourceClosed
        | RequeueReason::LeaseUndelivered => UNKNOWN_SESSION,
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
        return Refusal::new(RESOURCE_UNAVAILABLE, why).reply(AcquireResult::ResourceUnavailable);
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
/// with a new epoch. `None` when the state machine does not allow it.
pub fn dispatched(mut job: Job, req: &AcquireRequest, now: DateTime<Utc>) -> Option<Job> {
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
/// no such job).
pub fn read_back(
    read: Option<Option<&Versioned>>,
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
                && v.job
                    .lease
                    .as_ref()
                    .is_some_and(|l| now - l.leased_at < grace) =>
        {
            ReadBack::Grant(grant(&v.job))
        }
        Some(Some(v)) if v.revision != revision => ReadBack::Moved,
        Some(None) => ReadBack::Moved,
        _ => ReadBack::Requeue,
    }
}

/// The lease handed to the worker.
pub fn grant(job: &Job) -> LeaseGrant {
    LeaseGrant {
        job_id: job.id,
        epoch: job.attempt,
        task: job.task.clone(),
        args: job.args.clone(),
        pool: job.pool.clone(),
        priority: job.priority,
    }
}
