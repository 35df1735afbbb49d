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
    /// Jobs created at or after this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Jobs created before this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
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
    /// How many jobs match the filters, over all pages.
    pub total: usize,
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
