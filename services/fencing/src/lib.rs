//! `warden-fencing`: owns bot sessions (docs/design.md "Bot
//! sessions and fencing") and answers session requests over the NATS service API.
//!
//! Every request names its bot in its subject (`warden.session.<op>.<bot
//! token>`), which only that bot's NATS user may publish on
//! (docs/security.md "Bot identity"); a request acting on another bot is
//! refused and changes nothing.
//!
//! - create: the server names the session; a second session for the same
//!   `bot_id` quarantines the older one (newest wins); limited per bot and
//!   by the bot's registry record (`warden_bots`);
//! - heartbeat: keeps a session alive; an unknown or superseded name gets a
//!   typed error and changes nothing;
//! - close: the bot leaves.
//!
//! Layout: `decide` holds the session decisions, free of I/O, with their
//! unit tests; `sessions` is the store and the operations on it; `sweep`
//! expires silent sessions; `requests` answers the service API.

pub mod decide;
pub mod metrics;
mod requests;
mod sessions;
mod sweep;

use std::sync::Arc;

use futures::StreamExt;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::info;
use warden_shared::clock::{self, Clock};
use warden_shared::error::ErrorCode;
use warden_shared::messages::ErrorBody;
use warden_shared::{runtime, serve, subjects, Config};

pub use crate::decide::silent_past_limit;
use crate::requests::Op;
pub use crate::sessions::Sessions;

#[derive(Debug, Error)]
pub enum FencingError {
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error(transparent)]
    Setup(#[from] runtime::SetupError),
    #[error("cannot start the session service")]
    Service(#[source] async_nats::Error),
}

#[derive(Debug, Error)]
enum OpError {
    #[error("{1}")]
    Rejected(ErrorCode, String),
    /// The session store failed (its fault, not the caller's).
    #[error("session store unavailable: {0}")]
    Store(String),
    /// A record on file that cannot be decoded.
    #[error("{0}")]
    Corrupt(String),
}

impl OpError {
    fn body(&self) -> ErrorBody {
        match self {
            OpError::Rejected(code, msg) => ErrorBody::new(*code, msg.clone()),
            OpError::Store(msg) => ErrorBody::new(ErrorCode::Unavailable, msg.clone()),
            OpError::Corrupt(msg) => ErrorBody::new(ErrorCode::Internal, msg.clone()),
        }
    }
}

impl From<decide::Rejection> for OpError {
    fn from(r: decide::Rejection) -> OpError {
        OpError::Rejected(r.code, r.message)
    }
}

/// Why a session record could not be read.
#[derive(Debug, Error)]
pub enum GetError {
    #[error("session store unavailable: {0}")]
    Store(String),
    #[error("undecodable session record {key}: {error}")]
    Corrupt { key: String, error: String },
}

impl From<GetError> for OpError {
    fn from(e: GetError) -> OpError {
        match e {
            GetError::Store(m) => OpError::Store(m),
            c @ GetError::Corrupt { .. } => OpError::Corrupt(c.to_string()),
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> OpError {
    OpError::Store(e.to_string())
}

/// Runs the session service until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), FencingError> {
    run_with_clock(config, shutdown, clock::system()).await
}

/// [`run`] with the time taken from `clock` (tests move a `ManualClock`
/// instead of sleeping): heartbeats, creates and the expiry of silent
/// sessions. The sweep's pace and its detection of a blind stretch (no
/// bus, a listing too slow to trust) stay real time.
pub async fn run_with_clock(
    config: Arc<Config>,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> Result<(), FencingError> {
    warden_shared::metrics::starting("fencing");
    metrics::init();
    let Some((client, handles)) = runtime::Connect::new(&config, "fencing")
        .topology(&shutdown)
        .await?
    else {
        return Ok(());
    };
    let sessions = Arc::new(Sessions::with_clock(
        handles.sessions.clone(),
        warden_shared::store::JobStore::new(handles.jobs.clone()),
        handles.bots.clone(),
        sessions::Limits::from_config(&config.fencing),
        clock,
    ));
    let Some(service) = runtime::start_service_api(
        &client,
        "fencing",
        subjects::FENCING_SERVICE,
        "Warden bot sessions",
        env!("CARGO_PKG_VERSION"),
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    // Each operation on `<op>.<bot token>` (the bot is read off the
    // subject), and on the bare `<op>` only to refuse it as
    // `bot_unidentified`.
    let group = service.group(subjects::SESSION_GROUP);
    let mut endpoints = Vec::new();
    for (op, name) in [
        (Op::Create, "create"),
        (Op::Heartbeat, "heartbeat"),
        (Op::Close, "close"),
        (Op::ExecutorCreate, "executor.create"),
    ] {
        let ep = group
            .endpoint_builder()
            .name(name.replace('.', "-"))
            .add(format!("{name}.*"))
            .await
            .map_err(FencingError::Service)?;
        endpoints.push((op, ep));
        if op != Op::ExecutorCreate {
            let bare = group
                .endpoint_builder()
                .name(format!("{name}-unidentified"))
                .add(name)
                .await
                .map_err(FencingError::Service)?;
            endpoints.push((op, bare));
        }
    }
    tokio::spawn(sweep::sweep_loop(
        client.clone(),
        sessions.clone(),
        config.fencing.session_timeout,
        shutdown.clone(),
    ));
    warden_shared::metrics::ready("fencing");
    info!("fencing service running");
    let requests = futures::stream::select_all(
        endpoints
            .into_iter()
            .map(|(op, ep)| serve::endpoint(ep).map(move |r| (op, r)).boxed()),
    );
    serve::serve_tagged("fencing", requests, &shutdown, move |op, msg| {
        requests::handle(sessions.clone(), op, msg)
    })
    .await;
    let _ = service.stop().await;
    warden_shared::runtime::flush(&client).await;
    info!("fencing service stopped");
    Ok(())
}
