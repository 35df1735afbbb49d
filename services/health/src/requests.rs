//! Operators' requests (`warden.health.check`, `warden.health.close`):
//! parsed into a [`HealthOp`] and a [`HealthRequest`], answered with a
//! [`HealthReply`].

use std::sync::Arc;

use thiserror::Error;
use tracing::warn;
use warden_shared::error::ErrorCode;
use warden_shared::messages::{ErrorBody, HealthReply, HealthRequest, MESSAGE_VERSION};
use warden_shared::serve::Reply;
use warden_shared::subjects;

use crate::decide::checks::Trigger;
use crate::Health;

/// A health request operation, by the subject it came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HealthOp {
    /// An operator's check (`warden resource check`).
    Check,
    /// Closing by hand (`warden resource close`).
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no health operation on subject {0}")]
pub(crate) struct UnknownOp(String);

impl HealthOp {
    pub(crate) fn from_subject(subject: &str) -> Result<HealthOp, UnknownOp> {
        match subject {
            subjects::HEALTH_CHECK => Ok(HealthOp::Check),
            subjects::HEALTH_CLOSE => Ok(HealthOp::Close),
            other => Err(UnknownOp(other.to_string())),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HealthOp::Check => "check",
            HealthOp::Close => "close",
        }
    }
}

/// A request decoded, or the error to answer.
pub(crate) fn parse(subject: &str, payload: &[u8]) -> Result<(HealthOp, HealthRequest), ErrorBody> {
    let op = HealthOp::from_subject(subject)
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e.to_string()))?;
    match serde_json::from_slice::<HealthRequest>(payload) {
        Err(e) => Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("cannot decode request: {e}"),
        )),
        Ok(r) if r.resource.trim().is_empty() => Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "resource must not be empty",
        )),
        Ok(r) => Ok((op, r)),
    }
}

/// Answers one request.
pub(crate) async fn handle(health: Arc<Health>, msg: async_nats::Message) -> Reply {
    let subject = msg.subject.to_string();
    let reply = match parse(&subject, &msg.payload) {
        Err(e) => Err(e),
        Ok((HealthOp::Check, r)) => health
            .check(&r.resource, Trigger::Manual)
            .await
            .map_err(|e| e.body()),
        Ok((HealthOp::Close, r)) => health
            .close(&r.resource, r.reason)
            .await
            .map(|res| (res, None))
            .map_err(|e| e.body()),
    };
    let reply = match reply {
        Ok((resource, check)) => HealthReply {
            version: MESSAGE_VERSION,
            resource: Some(resource),
            check,
            error: None,
        },
        Err(e) => {
            let op = HealthOp::from_subject(&subject).map_or("unknown", HealthOp::as_str);
            warn!(op, code = %e.code, error = %e.message, "health request refused");
            HealthReply {
                version: MESSAGE_VERSION,
                resource: None,
                check: None,
                error: Some(e),
            }
        }
    };
    Reply::json(&reply)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn each_subject_is_its_op_and_an_unknown_one_is_refused() {
        let body = br#"{"version":1,"resource":"h"}"#;
        assert_eq!(
            parse(subjects::HEALTH_CHECK, body).unwrap().0,
            HealthOp::Check
        );
        assert_eq!(
            parse(subjects::HEALTH_CLOSE, body).unwrap().0,
            HealthOp::Close
        );
        // Not a close: an operation nobody named is refused.
        let e = parse("warden.health.recycle", body).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("warden.health.recycle"), "{}", e.message);
    }

    #[test]
    fn a_request_needs_a_resource() {
        let e = parse(subjects::HEALTH_CLOSE, br#"{"version":1,"resource":" "}"#).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::InvalidRequest, "resource must not be empty")
        );
        let e = parse(subjects::HEALTH_CLOSE, b"{").unwrap_err();
        assert!(
            e.message.starts_with("cannot decode request"),
            "{}",
            e.message
        );
    }
}
