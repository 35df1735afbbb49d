//! `warden recorder`: every job revision into the execution database
//! (`warden-history`), and finished jobs out of the live bucket once they
//! are recorded.
//!
//! - [`record`]: the recorders' shared durable consumer on the jobs
//!   bucket's stream. Each pulled batch is one database transaction, acked
//!   only after it commits; a redelivered or replayed revision changes
//!   nothing (a row only moves to a higher revision).
//! - [`janitor`]: archival (a terminal job older than `archive_after`,
//!   recorded at the bucket's current revision, is deleted from the bucket
//!   by compare-and-delete on that revision, and its delete marker purged
//!   after `marker_grace`), and the database's own retention.

use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;
use warden_history::HistoryDb;
use warden_shared::{runtime, subjects, Config};

pub mod janitor;
pub mod metrics;
pub mod record;

#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("history.database is not set: the recorder has nowhere to write")]
    NoDatabase,
    #[error(transparent)]
    Database(#[from] warden_history::DbError),
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot set up the recorder's consumer")]
    Consumer(#[from] runtime::SetupError),
}

/// Runs the recorder until `shutdown`: the batch in hand is committed and
/// acked, then the database is closed.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), RecorderError> {
    const SERVICE: &str = "recorder";
    warden_shared::metrics::starting(SERVICE);
    metrics::init();
    if !config.history.enabled() {
        return Err(RecorderError::NoDatabase);
    }
    let Some(db) =
        HistoryDb::open_waiting(SERVICE, &config.history.database, &shutdown, |waited| {
            warden_shared::metrics::waiting_for(SERVICE, "the history database", waited)
        })
        .await?
    else {
        return Ok(());
    };
    let Some((client, handles)) = runtime::Connect::new(&config, SERVICE)
        .topology(&shutdown)
        .await?
    else {
        return Ok(());
    };
    let Some(consumer) = runtime::durable_consumer(
        &handles.js,
        SERVICE,
        subjects::JOBS_STREAM,
        subjects::RECORDER_CONSUMER,
        subjects::recorder_consumer(),
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    warden_shared::metrics::ready(SERVICE);
    info!(
        database = %warden_history::redact_url(&config.history.database),
        backend = db.backend().as_str(),
        archive_after = ?config.history.archive_after,
        "recorder running"
    );
    let janitor = tokio::spawn(janitor::run(
        config.clone(),
        db.clone(),
        handles.jobs.clone(),
        shutdown.clone(),
    ));
    let lag = tokio::spawn(record::watch_pending(consumer.clone(), shutdown.clone()));
    record::run(&config, &db, &handles.js, &consumer, &shutdown).await;
    let _ = janitor.await;
    let _ = lag.await;
    runtime::flush(&client).await;
    db.close().await;
    info!("recorder stopped");
    Ok(())
}
