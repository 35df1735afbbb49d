//! Session requests (`warden.session.{create,heartbeat,close}.<bot>`, and
//! `warden.session.executor.create.<bot>` from the API service): the bot
//! is read off the subject (only its own NATS user may publish there),
//! the body decoded by its [`Op`], answered with a [`SessionReply`]. A
//! request on a subject without a bot token is refused as
//! `bot_unidentified`.

use std::sync::Arc;

use tracing::warn;
use warden_shared::messages::{
    CloseSession, CreateSession, Heartbeat, SessionReply, MESSAGE_VERSION,
};

use warden_shared::error::ErrorCode;
use warden_shared::serve::Reply;
use warden_shared::subjects;

use crate::metrics::metrics;
use crate::sessions::{Creator, Sessions};
use crate::OpError;

/// The session request operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    /// An external executor's session, asked by the API service.
    ExecutorCreate,
    Heartbeat,
    Close,
}

impl Op {
    #[cfg(test)]
    pub(crate) const ALL: [Op; 4] = [Op::Create, Op::ExecutorCreate, Op::Heartbeat, Op::Close];

    /// Its `op` label (`metrics::OPS`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::ExecutorCreate => "executor_create",
            Op::Heartbeat => "heartbeat",
            Op::Close => "close",
        }
    }

    /// The subject prefix its bot token follows.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Op::Create => subjects::SESSION_CREATE,
            Op::ExecutorCreate => subjects::SESSION_EXECUTOR_CREATE,
            Op::Heartbeat => subjects::SESSION_HEARTBEAT,
            Op::Close => subjects::SESSION_CLOSE,
        }
    }
}

/// The bot a request on `subject` acts as, or the refusal.
pub(crate) fn bot_of(op: Op, subject: &str) -> Result<String, OpError> {
    subjects::bot_of_subject(op.prefix(), subject)
        .ok_or_else(|| crate::decide::unidentified(subject).into())
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
    subject: &str,
    payload: &[u8],
) -> Result<(Option<String>, Vec<uuid::Uuid>), OpError> {
    let bot = bot_of(op, subject)?;
    match op {
        Op::Create | Op::ExecutorCreate => {
            let creator = if op == Op::Create {
                Creator::Bot
            } else {
                Creator::Executor
            };
            let r: CreateSession = decode(payload)?;
            sessions
                .create(&bot, creator, r)
                .await
                .map(|n| (Some(n), Vec::new()))
        }
        Op::Heartbeat => {
            let r: Heartbeat = decode(payload)?;
            sessions.heartbeat(&bot, r).await.map(|c| (None, c))
        }
        Op::Close => {
            let r: CloseSession = decode(payload)?;
            sessions.close(&bot, r).await.map(|_| (None, Vec::new()))
        }
    }
}

/// Answers one request of `op`.
pub(crate) async fn handle(sessions: Arc<Sessions>, op: Op, msg: async_nats::Message) -> Reply {
    let result = dispatch(&sessions, op, msg.subject.as_str(), &msg.payload).await;
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
            warn!(op, subject = %msg.subject, code = %body.code, error = %body.message, "session request rejected");
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
        for op in Op::ALL {
            assert!(crate::metrics::OPS.contains(&op.as_str()), "{op:?}");
        }
    }

    #[test]
    fn the_bot_is_the_subjects_and_a_bare_subject_names_none() {
        let subject = subjects::session_heartbeat_subject("bot-a");
        assert_eq!(
            bot_of(Op::Heartbeat, &subject).ok().as_deref(),
            Some("bot-a")
        );
        let e = bot_of(Op::Create, subjects::SESSION_CREATE)
            .err()
            .map(|e| e.body().code);
        assert_eq!(e, Some(ErrorCode::BotUnidentified));
        // A create subject is not an executor one, nor the other way.
        assert!(bot_of(Op::ExecutorCreate, &subjects::session_create_subject("b")).is_err());
        assert_eq!(
            bot_of(
                Op::ExecutorCreate,
                &subjects::executor_session_create_subject("b")
            )
            .ok()
            .as_deref(),
            Some("b")
        );
    }

    #[test]
    fn an_undecodable_request_is_invalid() {
        let e = decode::<Heartbeat>(b"{").err().map(|e| e.body().code);
        assert_eq!(e, Some(ErrorCode::InvalidRequest));
    }
}
