//! Every error code a Warden service or the API puts on the wire, as one
//! enum. On the wire a code is its snake_case string (`"invalid_request"`);
//! a code this build does not know (from a newer peer) decodes as
//! [`ErrorCode::Unknown`] instead of failing the whole reply.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A stable error code: what a client acts on (the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// `invalid_json`: The request body is not valid JSON.
    InvalidJson,
    /// `invalid_request`: Well-formed JSON of the wrong shape, or a request that cannot be decoded.
    InvalidRequest,
    /// `invalid_body`: The request body could not be read.
    InvalidBody,
    /// `invalid_query`: The query string does not parse.
    InvalidQuery,
    /// `invalid_id`: The job id is not a UUID.
    InvalidId,
    /// `unknown_task`: No task of that name is configured.
    UnknownTask,
    /// `invalid_args`: An argument name is not letters, digits and `_`.
    InvalidArgs,
    /// `invalid_pool`: A pool name is not letters, digits, `_`, `-` and `.`.
    InvalidPool,
    /// `invalid_max_attempts`: `max_attempts` is 0.
    InvalidMaxAttempts,
    /// `invalid_idempotency_key`: `idempotency_key` is empty, too long, or has control characters.
    InvalidIdempotencyKey,
    /// `invalid_state`: Not a state this request accepts.
    InvalidState,
    /// `invalid_blame`: Not a blame (system, task, third_party, unknown).
    InvalidBlame,
    /// `invalid_detail`: A crash without a valid detail code.
    InvalidDetail,
    /// `invalid_outcome`: A finish without a valid outcome.
    InvalidOutcome,
    /// `invalid_time`: `since` or `until` is not an RFC 3339 time.
    InvalidTime,
    /// `invalid_window`: `window` is not a duration.
    InvalidWindow,
    /// `invalid_bot_id`: `bot_id` is empty, too long or has control characters.
    InvalidBotId,
    /// `invalid_wait`: `wait_ms` is too long.
    InvalidWait,
    /// `invalid_timeout`: `timeout` is not a duration in range.
    InvalidTimeout,
    /// `invalid_token`: The execution token is not one a take returned.
    InvalidToken,
    /// `token_mismatch`: The execution token is for another job.
    TokenMismatch,
    /// `unauthorized`: A write without the configured bearer token.
    Unauthorized,
    /// `not_found`: No such job, resource or route.
    NotFound,
    /// `method_not_allowed`: The route exists but not with this method.
    MethodNotAllowed,
    /// `illegal_transition`: The record's state does not allow this change; nothing changed.
    IllegalTransition,
    /// `conflict`: The record kept changing under the request, or already exists.
    Conflict,
    /// `idempotency_conflict`: An idempotency key was used before for a different request.
    IdempotencyConflict,
    /// `stale_execution`: The execution's attempt no longer holds the job.
    StaleExecution,
    /// `cancelled`: The job was cancelled while the executor held it.
    Cancelled,
    /// `session_expired`: The executor's session expired or was superseded.
    SessionExpired,
    /// `too_large`: The body or the record is larger than allowed.
    TooLarge,
    /// `internal`: A bug or a corrupt record: a reply could not be made.
    Internal,
    /// `unavailable`: A store or service is not reachable: try again.
    Unavailable,
    /// `unknown_session`: No session of that name (fencing, scheduler): start a new session.
    UnknownSession,
    /// `session_superseded`: The session is closed or no longer its bot's current one: start a new session.
    SessionSuperseded,
    /// `resource_unavailable`: Acquire refused for now: a resource of the session is not open. Not a fencing error: the session lives.
    ResourceUnavailable,
    /// `unknown_resource`: A worker was asked to check a resource it does not have.
    UnknownResource,
    /// `bot_mismatch`: The request names a bot other than the one its credentials (its subject) prove.
    BotMismatch,
    /// `pool_not_allowed`: Acquire asked for a pool its session does not serve.
    PoolNotAllowed,
    /// A code this build does not know (sent by a newer peer); encodes as
    /// `"unknown"`. Never sent by this build on purpose.
    Unknown,
}

impl ErrorCode {
    /// Every code this build sends (not [`ErrorCode::Unknown`]).
    pub const ALL: [ErrorCode; 39] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidBody,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidId,
        ErrorCode::UnknownTask,
        ErrorCode::InvalidArgs,
        ErrorCode::InvalidPool,
        ErrorCode::InvalidMaxAttempts,
        ErrorCode::InvalidIdempotencyKey,
        ErrorCode::InvalidState,
        ErrorCode::InvalidBlame,
        ErrorCode::InvalidDetail,
        ErrorCode::InvalidOutcome,
        ErrorCode::InvalidTime,
        ErrorCode::InvalidWindow,
        ErrorCode::InvalidBotId,
        ErrorCode::InvalidWait,
        ErrorCode::InvalidTimeout,
        ErrorCode::InvalidToken,
        ErrorCode::TokenMismatch,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::IllegalTransition,
        ErrorCode::Conflict,
        ErrorCode::IdempotencyConflict,
        ErrorCode::StaleExecution,
        ErrorCode::Cancelled,
        ErrorCode::SessionExpired,
        ErrorCode::TooLarge,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::UnknownSession,
        ErrorCode::SessionSuperseded,
        ErrorCode::ResourceUnavailable,
        ErrorCode::UnknownResource,
        ErrorCode::BotMismatch,
        ErrorCode::PoolNotAllowed,
    ];

    /// The wire string.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::UnknownTask => "unknown_task",
            ErrorCode::InvalidArgs => "invalid_args",
            ErrorCode::InvalidPool => "invalid_pool",
            ErrorCode::InvalidMaxAttempts => "invalid_max_attempts",
            ErrorCode::InvalidIdempotencyKey => "invalid_idempotency_key",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::InvalidBlame => "invalid_blame",
            ErrorCode::InvalidDetail => "invalid_detail",
            ErrorCode::InvalidOutcome => "invalid_outcome",
            ErrorCode::InvalidTime => "invalid_time",
            ErrorCode::InvalidWindow => "invalid_window",
            ErrorCode::InvalidBotId => "invalid_bot_id",
            ErrorCode::InvalidWait => "invalid_wait",
            ErrorCode::InvalidTimeout => "invalid_timeout",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenMismatch => "token_mismatch",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::IllegalTransition => "illegal_transition",
            ErrorCode::Conflict => "conflict",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::StaleExecution => "stale_execution",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::SessionExpired => "session_expired",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::SessionSuperseded => "session_superseded",
            ErrorCode::ResourceUnavailable => "resource_unavailable",
            ErrorCode::UnknownResource => "unknown_resource",
            ErrorCode::BotMismatch => "bot_mismatch",
            ErrorCode::PoolNotAllowed => "pool_not_allowed",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The code named by the wire string `s`; [`ErrorCode::Unknown`] for
    /// one this build does not know.
    pub fn from_wire(s: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Unknown)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(ErrorCode::from_wire(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_code_round_trips_as_its_string() {
        for c in ErrorCode::ALL {
            let json = serde_json::to_string(&c).expect("encodes");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).expect("decodes");
            assert_eq!(back, c);
            assert_eq!(c.to_string(), c.as_str());
        }
    }

    #[test]
    fn codes_are_distinct_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{c} twice");
            assert!(c
                .as_str()
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch == '_'));
            assert_ne!(c, ErrorCode::Unknown);
        }
    }

    #[test]
    fn a_newer_peers_code_decodes_as_unknown() {
        let c: ErrorCode = serde_json::from_str("\"quota_exceeded\"").expect("decodes");
        assert_eq!(c, ErrorCode::Unknown);
        assert_eq!(
            ErrorCode::from_wire("invalid_request"),
            ErrorCode::InvalidRequest
        );
        assert_eq!(ErrorCode::InvalidRequest.as_str(), "invalid_request");
    }
}
