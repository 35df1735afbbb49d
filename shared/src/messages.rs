//! Every message that crosses the bus between Warden's own services.
//!
//! Each carries `version` so that old and new services can share a bus
//! during a rolling upgrade: readers accept any version they understand and
//! ignore unknown fields.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::error::ErrorCode;
use crate::job::{Blame, CrashInfo};

pub const MESSAGE_VERSION: u32 = 1;

fn v1() -> u32 {
    MESSAGE_VERSION
}

/// A worker asks the scheduler for work (long poll): request on
/// [`crate::subjects::ACQUIRE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireRequest {
    #[serde(default = "v1")]
    pub version: u32,
    pub session: String,
    pub bot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Every resource the session runs on (host first); no lease is given
    /// while one of them is not open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    pub pools: Vec<String>,
    /// How many leases the worker can take now (free slots).
    pub max: u32,
    /// How long the scheduler may hold the request when nothing is waiting.
    pub wait_ms: u64,
}

/// One attempt handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub job_id: Uuid,
    pub epoch: u32,
    pub task: String,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    pub pool: String,
    pub priority: i32,
    /// The lease secret ([`crate::lease_secret`]): only the holder gets it;
    /// its reports carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireReply {
    #[serde(default = "v1")]
    pub version: u32,
    #[serde(default)]
    pub leases: Vec<LeaseGrant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Who is told about a crash (the catalogue's `notify`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    /// The people who run the fleet (system and third-party trouble).
    #[default]
    Operators,
    /// The task's owners (`[tasks.NAME] owners`).
    Owners,
    /// Nobody.
    None,
}

impl Party {
    pub fn as_str(self) -> &'static str {
        match self {
            Party::Operators => "operators",
            Party::Owners => "owners",
            Party::None => "none",
        }
    }
}

/// The scheduler asks the classifier (request on
/// [`crate::subjects::CLASSIFY`]) why an attempt crashed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyRequest {
    #[serde(default = "v1")]
    pub version: u32,
    pub job_id: Uuid,
    pub task: String,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub crash: CrashInfo,
}

/// The classifier's decision and what the catalogue says to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classification {
    pub blame: Blame,
    pub detail: String,
    pub description: String,
    /// The rule that decided (`status_file`, a rule name, or `fallback`).
    pub rule: String,
    #[serde(default)]
    pub notify: Party,
    /// The resource the attempt ran on may be at fault: check it.
    #[serde(default)]
    pub suspect_resource: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifyReply {
    #[serde(default = "v1")]
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Published on [`crate::subjects::notify_subject`] when a crash needs
/// someone's attention: operators for system and third-party trouble, the
/// task's owners when the task is to blame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    #[serde(default = "v1")]
    pub version: u32,
    pub party: Party,
    /// The task's owners when `party` is owners; empty otherwise.
    #[serde(default)]
    pub recipients: Vec<String>,
    pub job_id: Uuid,
    pub task: String,
    pub attempt: u32,
    pub blame: Blame,
    pub detail: String,
    pub description: String,
    /// What the retry policy made of it: CRASHED, SCHEDULED or SHELVED.
    pub state: crate::JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Where to look: the API path of the job and the CLI command.
    #[serde(default)]
    pub links: Vec<String>,
    pub at: DateTime<Utc>,
}

/// Published on [`crate::subjects::suspect_subject`] when an attempt's
/// failure may be its resource's fault (the health service checks it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSuspect {
    #[serde(default = "v1")]
    pub version: u32,
    pub resource: String,
    pub job_id: Uuid,
    pub attempt: u32,
    pub detail: String,
    /// When the failed attempt was leased: a failure of an attempt that
    /// began before the resource last passed a check is not flapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_at: Option<DateTime<Utc>>,
    pub at: DateTime<Utc>,
}

/// What a worker says about an attempt. Published durably on
/// [`crate::subjects::report_subject`] with a message id that makes a
/// re-sent report a duplicate the stream drops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(default = "v1")]
    pub version: u32,
    pub job_id: Uuid,
    pub session: String,
    pub bot_id: String,
    pub epoch: u32,
    pub at: DateTime<Utc>,
    /// The lease secret of the grant ([`LeaseGrant::secret`]): proves the
    /// report comes from the lease holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(flatten)]
    pub kind: ReportKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReportKind {
    /// The task process started.
    Started {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resource: Option<String>,
    },
    /// The task ran to its end and gave a verdict.
    Finished { outcome: String, duration_ms: u64 },
    /// The execution broke.
    Crashed {
        #[serde(flatten)]
        crash: CrashInfo,
        /// A fault the task declared in its status file, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fault: Option<Fault>,
    },
    /// The worker hands the attempt back without running it to the end
    /// (graceful shutdown): the job is requeued, not counted as a failure.
    /// Older workers send this; newer ones send `Stopped` with
    /// [`StopReason::Shutdown`].
    Released { reason: String },
    /// Warden itself stopped the attempt (the worker killed the task for a
    /// reason of its own, not the task's): never the task's crash.
    Stopped { reason: StopReason },
}

/// Why a worker stopped an attempt itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The worker could not reach the bus past the session timeout and
    /// killed its own tasks (self-fencing).
    SelfFenced,
    /// The fencing service said the session was superseded by a newer
    /// session of the bot.
    Superseded,
    /// The fencing service did not know the session (expired, or never
    /// created).
    UnknownSession,
    /// The heartbeat's reply listed the attempt to stop (cancelled, or no
    /// longer this session's).
    Cancelled,
    /// The worker was shut down and the attempt did not end within the
    /// grace period: handed back.
    Shutdown,
}

impl StopReason {
    pub const ALL: [StopReason; 5] = [
        StopReason::SelfFenced,
        StopReason::Superseded,
        StopReason::UnknownSession,
        StopReason::Cancelled,
        StopReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::SelfFenced => "self_fenced",
            StopReason::Superseded => "superseded",
            StopReason::UnknownSession => "unknown_session",
            StopReason::Cancelled => "cancelled",
            StopReason::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ReportKind {
    pub fn name(&self) -> &'static str {
        match self {
            ReportKind::Started { .. } => "started",
            ReportKind::Finished { .. } => "finished",
            ReportKind::Crashed { .. } => "crashed",
            ReportKind::Released { .. } => "released",
            ReportKind::Stopped { .. } => "stopped",
        }
    }
}

impl Report {
    /// JetStream de-duplication id: one report of each kind per attempt,
    /// with a tag of the lease secret ([`crate::lease_secret::dedup_tag`]),
    /// so nobody without the secret can publish a report with the holder's
    /// id ahead of it (the stream would drop the holder's as a duplicate).
    pub fn msg_id(&self) -> String {
        let tag = self
            .secret
            .as_deref()
            .map(crate::lease_secret::dedup_tag)
            .unwrap_or_else(|| "-".into());
        format!("{}:{}:{}:{tag}", self.job_id, self.epoch, self.kind.name())
    }
}

/// A crash the task itself explained (status file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub blame: Blame,
    pub detail: String,
    #[serde(default)]
    pub description: String,
}

/// A machine-readable error in a reply: callers branch on `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// A reply type that can carry only an error (its other fields empty):
/// what a service answers to a request it cannot decode
/// ([`crate::serve::decode_or_reply`]).
pub trait ErrorReply: Serialize {
    fn from_error(error: ErrorBody) -> Self;
}

impl ErrorReply for AcquireReply {
    fn from_error(error: ErrorBody) -> Self {
        AcquireReply {
            version: MESSAGE_VERSION,
            leases: Vec::new(),
            error: Some(error),
        }
    }
}

impl ErrorReply for ClassifyReply {
    fn from_error(error: ErrorBody) -> Self {
        ClassifyReply {
            version: MESSAGE_VERSION,
            classification: None,
            error: Some(error),
        }
    }
}

impl ErrorReply for SessionReply {
    fn from_error(error: ErrorBody) -> Self {
        SessionReply {
            version: MESSAGE_VERSION,
            session: None,
            cancel: Vec::new(),
            error: Some(error),
        }
    }
}

impl ErrorReply for CheckReply {
    fn from_error(error: ErrorBody) -> Self {
        CheckReply {
            version: MESSAGE_VERSION,
            passed: false,
            results: Vec::new(),
            error: Some(error),
        }
    }
}

impl ErrorReply for HealthReply {
    fn from_error(error: ErrorBody) -> Self {
        HealthReply {
            version: MESSAGE_VERSION,
            resource: None,
            check: None,
            error: Some(error),
        }
    }
}

/// The reply body when a reply cannot be encoded: valid JSON that every
/// reply type decodes (version and error only), code `internal`.
pub const INTERNAL_ERROR_REPLY: &str =
    r#"{"version":1,"error":{"code":"internal","message":"cannot encode the reply"}}"#;

/// `reply` as JSON; never an empty body: on an encoding failure (logged)
/// [`INTERNAL_ERROR_REPLY`].
pub fn encode_reply<T: Serialize>(reply: &T) -> Vec<u8> {
    match serde_json::to_vec(reply) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply; answering internal");
            INTERNAL_ERROR_REPLY.as_bytes().to_vec()
        }
    }
}

impl ErrorBody {
    pub fn new(code: impl Into<ErrorCode>, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Sessions (fencing service requests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSession {
    #[serde(default = "v1")]
    pub version: u32,
    pub bot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The resources the bot runs on (its host first), registered by the
    /// health service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<crate::resource::ResourceDecl>,
    /// New at every start of the agent process.
    #[serde(default)]
    pub agent_instance: String,
    pub pools: Vec<String>,
    pub capacity: u32,
    #[serde(default)]
    pub agent_version: String,
    /// This session's own silence limit, in place of
    /// `fencing.session_timeout` (external executors, which call in only
    /// when their job changes state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReply {
    #[serde(default = "v1")]
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Leases the bot must stop (their attempt is no longer its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancel: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    pub job_id: Uuid,
    pub epoch: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    #[serde(default = "v1")]
    pub version: u32,
    pub session: String,
    #[serde(default)]
    pub leases: Vec<HeldLease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseSession {
    #[serde(default = "v1")]
    pub version: u32,
    pub session: String,
}

/// The health service asks a bot's agent to check one of its resources
/// (request on [`crate::subjects::agent_check_subject`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    #[serde(default = "v1")]
    pub version: u32,
    pub resource: String,
    pub kind: String,
}

/// One configured check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// What was seen (bounded): command output, free space, addresses.
    pub detail: String,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReply {
    #[serde(default = "v1")]
    pub version: u32,
    pub passed: bool,
    #[serde(default)]
    pub results: Vec<CheckResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Published on [`crate::subjects::recycle_subject`] when a resource is
/// recycled: a provisioner replaces it (`warden recycle-hook`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRecycle {
    #[serde(default = "v1")]
    pub version: u32,
    pub resource: String,
    pub kind: String,
    pub incarnation: u32,
    /// A [`crate::resource::reason`] code.
    pub reason: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<String>,
    pub at: DateTime<Utc>,
}

/// An operator asks the health service to check or close a resource
/// ([`crate::subjects::HEALTH_CHECK`], [`crate::subjects::HEALTH_CLOSE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRequest {
    #[serde(default = "v1")]
    pub version: u32,
    pub resource: String,
    /// Why (close only), recorded on the resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReply {
    #[serde(default = "v1")]
    pub version: u32,
    /// The resource after the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<crate::resource::Resource>,
    /// The check that ran (check only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckReply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// The scheduler's answer on [`crate::subjects::SCHED_QUEUE`]: its queue of
/// SCHEDULED jobs per pool, from the snapshot it refreshes every second
/// (the same one behind `warden_scheduler_queue_depth` and
/// `warden_scheduler_oldest_waiting_seconds`). The request body is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReply {
    #[serde(default = "v1")]
    pub version: u32,
    /// When the snapshot was taken.
    pub at: DateTime<Utc>,
    /// Every pool with a SCHEDULED job or an active session serving it.
    #[serde(default)]
    pub pools: Vec<PoolQueue>,
}

/// One pool in a [`QueueReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolQueue {
    pub pool: String,
    /// SCHEDULED jobs ready for dispatch (no `not_before`, or it is past).
    pub ready: u64,
    /// SCHEDULED jobs waiting for a delayed retry's `not_before`.
    #[serde(default)]
    pub delayed: u64,
    /// When the oldest ready job entered the queue (its `queued_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_at: Option<DateTime<Utc>>,
    /// How long the oldest ready job has waited when the reply was made,
    /// by the scheduler's clock; 0 when none is ready.
    #[serde(default)]
    pub oldest_wait_seconds: u64,
    /// Whether an active session on open resources serves the pool.
    #[serde(default)]
    pub served: bool,
}

/// An event the trigger could not use, kept on the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    #[serde(default = "v1")]
    pub version: u32,
    /// Subject the event arrived on.
    pub subject: String,
    /// Which service gave up on it.
    pub service: String,
    /// Stable reason code (`invalid_json`, `unknown_format`, `too_large`, ...).
    pub reason: String,
    /// The error in words.
    pub error: String,
    pub at: DateTime<Utc>,
    /// The original payload, lossily decoded as UTF-8 and bounded.
    pub payload: String,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reply_that_cannot_be_encoded_answers_internal_not_an_empty_body() {
        struct Broken;
        impl serde::Serialize for Broken {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("broken"))
            }
        }
        let body = super::encode_reply(&Broken);
        assert!(!body.is_empty());
        let s: super::SessionReply = serde_json::from_slice(&body).expect("a session reply");
        assert_eq!(s.error.map(|e| e.code), Some(ErrorCode::Internal));
        let h: super::HealthReply = serde_json::from_slice(&body).expect("a health reply");
        assert_eq!(h.error.map(|e| e.code), Some(ErrorCode::Internal));
        let c: super::ClassifyReply = serde_json::from_slice(&body).expect("a classify reply");
        assert_eq!(c.error.map(|e| e.code), Some(ErrorCode::Internal));
        let ok = super::encode_reply(&super::ErrorBody::new(
            crate::error::ErrorCode::Internal,
            "y",
        ));
        assert_eq!(
            ok,
            serde_json::to_vec(&super::ErrorBody::new(
                crate::error::ErrorCode::Internal,
                "y"
            ))
            .expect("encodes")
        );
    }

    use super::*;

    #[test]
    fn report_kind_is_flattened_with_a_tag() {
        let r = Report {
            version: 1,
            job_id: Uuid::nil(),
            session: "s".into(),
            bot_id: "b".into(),
            epoch: 3,
            at: Utc::now(),
            secret: None,
            kind: ReportKind::Crashed {
                crash: CrashInfo {
                    exit_code: Some(2),
                    log_tail: "boom".into(),
                    ..Default::default()
                },
                fault: None,
            },
        };
        let v: serde_json::Value = serde_json::to_value(&r).expect("json");
        assert_eq!(v["kind"], "crashed");
        assert_eq!(v["exit_code"], 2);
        let back: Report = serde_json::from_value(v).expect("back");
        assert_eq!(back, r);
        assert_eq!(r.msg_id(), format!("{}:3:crashed:-", Uuid::nil()));
        // With the lease secret, the id carries a tag of it: nobody
        // without the secret can publish the holder's id first.
        let mut held = r.clone();
        held.secret = Some(crate::lease_secret::generate());
        let id = held.msg_id();
        assert!(
            id.starts_with(&format!("{}:3:crashed:", Uuid::nil())),
            "{id}"
        );
        assert_ne!(id, r.msg_id());
        let mut other = held.clone();
        other.secret = Some(crate::lease_secret::generate());
        assert_ne!(other.msg_id(), id);
        let v: serde_json::Value = serde_json::to_value(&held).expect("json");
        assert_eq!(serde_json::from_value::<Report>(v).expect("back"), held);
    }

    #[test]
    fn stopped_report_has_its_own_kind_and_dedup_id() {
        let r = Report {
            version: 1,
            job_id: Uuid::nil(),
            session: "s".into(),
            bot_id: "b".into(),
            epoch: 2,
            at: Utc::now(),
            secret: None,
            kind: ReportKind::Stopped {
                reason: StopReason::SelfFenced,
            },
        };
        let v: serde_json::Value = serde_json::to_value(&r).expect("json");
        assert_eq!(v["kind"], "stopped");
        assert_eq!(v["reason"], "self_fenced");
        let back: Report = serde_json::from_value(v).expect("back");
        assert_eq!(back, r);
        assert_eq!(r.msg_id(), format!("{}:2:stopped:-", Uuid::nil()));
        for reason in StopReason::ALL {
            let v = serde_json::to_value(reason).expect("json");
            assert_eq!(v, reason.as_str());
        }
    }

    #[test]
    fn unknown_fields_from_newer_versions_are_ignored() {
        let text = r#"{"version":2,"session":"s","leases":[],"future_field":true}"#;
        let hb: Heartbeat = serde_json::from_str(text).expect("tolerant");
        assert_eq!(hb.version, 2);
    }
}
