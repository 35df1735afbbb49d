//! `warden-api`: create, get and search jobs over HTTP JSON and over NATS
//! request/reply, with the same validation and error codes on both.
//!
//! - Writes go straight to the jobs bucket through
//!   [`warden_shared::store::JobStore`]; a get reads the bucket too, so it
//!   is fresh and carries the full history.
//! - Searches read [`index::JobIndex`], an in-memory view of the bucket
//!   that a KV watch keeps current and that every start rebuilds.
//! - HTTP also serves `/metrics`, `/healthz` and the operators' web
//!   console ([`console`]) under `/`.
//!
//! [`run`] binds `http.listen`; [`serve`] takes a listener the caller bound
//! (say on `127.0.0.1:0`) so it can learn the port first.

pub mod client;
pub mod console;
pub mod executions;
pub mod history;
pub mod http;
pub mod index;
pub mod metrics;
pub mod nats;
pub mod ops;
pub mod redact;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use warden_shared::runtime;
use warden_shared::store::JobStore;
use warden_shared::Config;

pub use client::{ApiClient, ClientError};
pub use index::Stats;
pub use types::{ApiReply, ErrorReply, GetRequest, ListQuery, ListReply, StatsQuery};

/// How long in-flight requests may take to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot start the api service on NATS")]
    Service(#[source] async_nats::Error),
    #[error("http server failed")]
    Http(#[source] std::io::Error),
    #[error("refusing to serve HTTP: {0}")]
    Exposed(String),
}

/// Binds `http.listen` and serves until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), ApiError> {
    if let Some(problem) = config.http_serving_problems().into_iter().next() {
        return Err(ApiError::Exposed(problem));
    }
    let listener = TcpListener::bind(&config.http.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: config.http.listen.clone(),
            source,
        })?;
    serve(config, listener, shutdown).await
}

/// Serves HTTP on `listener` (whatever `http.listen` says) and the NATS
/// endpoints until `shutdown`.
pub async fn serve(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    let addr = listener.local_addr().map_err(ApiError::Http)?;
    // Checked on the address actually bound, whatever the config says.
    if let Some(problem) =
        warden_shared::config::http_exposure_problem(addr, config.http.token.as_deref())
    {
        return Err(ApiError::Exposed(problem));
    }
    warden_shared::metrics::starting("api");
    metrics::init();
    let Some((client, handles)) = runtime::Connect::new(&config, "api")
        .topology(&shutdown)
        .await?
    else {
        return Ok(());
    };
    let index = Arc::new(index::SharedIndex::default());
    let ops = Arc::new(ops::Ops {
        config: config.clone(),
        client: client.clone(),
        js: async_nats::jetstream::new(client.clone()),
        store: JobStore::new(handles.jobs.clone()),
        index: index.clone(),
        resources: handles.resources.clone(),
        sessions: handles.sessions.clone(),
        history: if config.history.enabled() {
            history::History::open_in_background(config.history.database.clone(), shutdown.clone())
        } else {
            history::History::none()
        },
    });

    let tracker = TaskTracker::new();
    tracker.spawn(index::watch_loop(
        handles.jobs.clone(),
        index,
        shutdown.clone(),
    ));
    let (service, endpoints) = nats::start(&client).await.map_err(ApiError::Service)?;
    tracker.spawn(nats::serve(ops.clone(), endpoints, shutdown.clone()));

    let server = http::serve_http(
        listener,
        http::router(ops, shutdown.clone()),
        config.http.header_timeout,
        shutdown.clone(),
    );
    let mut server = tokio::spawn(server);
    warden_shared::metrics::ready("api");
    info!(%addr, "api listening");

    let early = tokio::select! {
        r = &mut server => Some(r),
        _ = shutdown.cancelled() => None,
    };
    let result = match early {
        // axum only returns when shutdown was asked, so this is a failure.
        Some(r) => {
            shutdown.cancel();
            match r {
                Ok(()) => Ok(()),
                Err(e) => Err(ApiError::Http(std::io::Error::other(e))),
            }
        }
        None => {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Err(e)) => warn!(error = %e, "http server failed while stopping"),
                Ok(Ok(())) => {}
                Err(_) => {
                    warn!("http connections still open after grace period");
                    server.abort();
                }
            }
            Ok(())
        }
    };
    if let Err(e) = service.stop().await {
        warn!(error = %e, "cannot stop the api service cleanly");
    }
    runtime::drain(&client, &tracker, SHUTDOWN_GRACE).await;
    info!("api stopped");
    result
}
