//! Session requests (`warden.session.{create,heartbeat,close}`): decoded
//! by their [`Op`], answered with a [`SessionReply`].

use std::sync::Arc;

use tracing::warn;
use warden_shared::messages::{
    CloseSession, CreateSession, Heartbeat, SessionReply, MESSAGE_VERSION,
};

use warden_shared::error::ErrorCode;
use warden_shared::serve::Reply;

use crate::metrics::metrics;
use crate::sessions::Sessions;
use crate::OpError;

/// The session request operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    Heartbeat,
    Close,
}

impl Op {
    /// Its `op` label (`metrics::OPS`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Heartbeat => "heartbeat",
            Op::Close => "close",
        }
    }
}

fn decode<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, OpError> {
    serde_json::from_slice(payload)
        .map_err(|e| OpError::Rejected(ErrorCode::InvalidRequest, e.to_string()))
}

/// Runs `op` on `payload`: the new session's name and the leases to
/// cancel.
async fn dispatch(
    sessions: &Sessions,
    op: Op,
    payload: &[u8],
) -> Result<(Option<String>, Vec<uuid::Uuid>), OpError> {
    match op {
        Op::Create => {
            let r: CreateSession = decode(payload)?;
            sessions.create(r).await.map(|n| (Some(n), Vec::new()))
        }
        Op::Heartbeat => {
            let r: Heartbeat = decode(payload)?;
            sessions.heartbeat(r).await.map(|c| (None, c))
        }
        Op::Close => {
            let r: CloseSession = decode(payload)?;
            sessions.close(r).await.map(|_| (None, Vec::new()))
        }
    }
}

/// Answers one request of `op`.
pub(crate) async fn handle(sessions: Arc<Sessions>, op: Op, msg: async_nats::Message) -> Reply {
    let result = dispatch(&sessions, op, &msg.payload).await;
    if let Err(OpError::Store(_)) = &result {
        sessions.store_failed();
    }
    let m = metrics();
    let op = op.as_str();
    let reply = match result {
        Ok((session, cancel)) => {
            m.requests.with_label_values(&[op, "ok"]).inc();
            SessionReply {
                version: MESSAGE_VERSION,
                session,
                cancel,
                error: None,
            }
        }
        Err(e) => {
            let body = e.body();
            m.requests.with_label_values(&[op, "error"]).inc();
            if let OpError::Rejected(code, _) = &e {
                m.rejected.with_label_values(&[code.as_str()]).inc();
            }
            warn!(op, code = %body.code, error = %body.message, "session request rejected");
            SessionReply {
                version: MESSAGE_VERSION,
                session: None,
                cancel: Vec::new(),
                error: Some(body),
            }
        }
    };
    Reply::json(&reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_its_metrics_label() {
        for op in [Op::Create, Op::Heartbeat, Op::Close] {
            assert!(crate::metrics::OPS.contains(&op.as_str()), "{op:?}");
        }
    }

    #[test]
    fn an_undecodable_request_is_invalid() {
        let e = decode::<Heartbeat>(b"{").err().map(|e| e.body().code);
        assert_eq!(e, Some(ErrorCode::InvalidRequest));
    }
}
