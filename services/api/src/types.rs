//! Request and reply bodies of the API, the same over HTTP and NATS.
//!
//! Requests reject unknown fields: a misspelt filter or option that was
//! silently ignored would return (or create) something other than what the
//! caller asked for.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warden_shared::messages::ErrorBody;
use warden_shared::JobSummary;

/// Jobs returned by a search when the caller gives no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// The most jobs one search returns; larger limits are lowered to this.
pub const MAX_LIMIT: usize = 1000;

/// Body of `POST /api/v1/jobs/{id}/retry` (optional): no options yet, so
/// only `{}`; a field is rejected rather than ignored, as everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {}

/// Body of `POST /api/v1/jobs/{id}/cancel` (optional) and, with `id`, of
/// the job.cancel endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Body of the job.cancel endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Body of the job.get endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    pub id: Uuid,
}

/// Search filters and paging: the query string of `GET /api/v1/jobs` and
/// the body of the job.list endpoint. Empty strings mean "no filter", so
/// `?state=&task=` is the same as no query at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// A job state in any case (`running`, `RUNNING`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `system`, `task`, `third_party` or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blame: Option<String>,
    /// A detail code (`oom`, `network`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The bot of the job's current (or last) attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    /// The id of the bus message that triggered the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_message_id: Option<String>,
    /// Jobs created at or after this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Jobs created before this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// A page's `next`: the jobs after the last one of that page, however
    /// many jobs were created since (paging that new jobs do not shift).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Words that must all be in the job's description, log
    /// tail or status file (needs the history database).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

/// The query of `GET /api/v1/stats` and the body of the stats endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// How far back from now, e.g. `24h`, `7days` (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

/// One page of a search, newest job first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    pub jobs: Vec<JobSummary>,
    /// How many jobs match the filters, over all pages; at least this
    /// many when `total_exact` is false (a search counts at most
    /// `index::TOTAL_CAP` matches past its page, so it stays fast).
    pub total: usize,
    #[serde(default = "exact")]
    pub total_exact: bool,
    /// Where the next page starts (pass it as `after`), when this page is
    /// full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

fn exact() -> bool {
    true
}

/// An error reply: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

/// What a NATS endpoint answers: the result itself, or an [`ErrorReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiReply<T> {
    // Tried first: a result never has exactly one field named `error`.
    Error(ErrorReply),
    Ok(T),
}

/// Body of `POST /api/v1/executions` and of the execution.take endpoint:
/// an external executor asks for one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeRequest {
    /// Who runs it (shown in the job's history and in `bots`). One bot id
    /// runs one job at a time: a second take by the same bot supersedes
    /// the first, as a worker's new session does.
    pub bot_id: String,
    /// Pools to take from; default `["default"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
    /// How long to wait for a job when none is ready, in milliseconds
    /// (default 0: answer at once; at most 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// How long the execution may go without a state call before it is
    /// taken back, e.g. `30m` (default `http.execution_timeout`; 1s..24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// What a take answers: the execution, or `null` when no job was ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeReply {
    pub execution: Option<Execution>,
}

/// A job leased to an external executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// Give it with every state switch of this attempt; it stops working
    /// once the attempt is no longer the executor's (fencing).
    pub token: String,
    pub job_id: Uuid,
    /// The attempt number, which is also the lease epoch.
    pub epoch: u32,
    pub task: String,
    #[serde(default)]
    pub args: std::collections::BTreeMap<String, String>,
    pub pool: String,
    pub priority: i32,
    pub bot_id: String,
    pub session: String,
    /// Silence allowed between state calls, in milliseconds.
    pub timeout_ms: u64,
}

/// Body of `POST /api/v1/jobs/{id}/state` and (with `id`) of the
/// job.state endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRequest {
    /// The job; over HTTP it is in the path (and must match if given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// From the take.
    pub token: String,
    /// `RUNNING`, `FINISHED` or `CRASHED` (any case).
    pub state: String,
    /// FINISHED: the verdict, e.g. `PASSED`, `FAILED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// CRASHED: `system`, `task`, `third_party` or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blame: Option<String>,
    /// CRASHED: a detail code (`network`, `oom`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// CRASHED: what happened, in words (at most 1000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What a state switch answers: the job after it, and whether the switch
/// is already recorded (`false`: accepted, still being applied; look
/// again with a get).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateReply {
    pub applied: bool,
    pub job: warden_shared::Job,
}

/// The query of `GET /api/v1/bots` and the body of the bots endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotsQuery {
    /// Only sessions in this state (`active`, `quarantined`, `expired`,
    /// `closed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Every bot session on record, by bot and newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotsReply {
    pub bots: Vec<warden_shared::session::Session>,
}

/// Every resource with its state and history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourcesReply {
    pub resources: Vec<serde_json::Value>,
}

/// Header on a create's reply when it was replayed: the idempotency key
/// named an existing job, which is returned (HTTP 200, not 201).
pub const IDEMPOTENT_REPLAYED: &str = "Idempotent-Replayed";
