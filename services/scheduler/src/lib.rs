//! `warden-scheduler`: hands SCHEDULED jobs to workers, best first, and
//! applies what workers report.
//!
//! Three loops share one in-memory [`queue::Queue`] (a cache of the jobs
//! bucket, rebuilt at start):
//! - **watch**: every change in `warden_jobs` updates the queue;
//! - **acquire**: workers long-poll their own [`subjects::acquire_subject`]; each job handed
//!   out is first moved SCHEDULED → RUNNING by a compare-and-set on its
//!   revision, so two replicas can never lease one attempt twice;
//! - **reports**: a durable consumer, shared by all replicas, applies
//!   worker reports with compare-and-set, checking session and epoch.
//!
//! Besides, the `warden-scheduler` service (async-nats service API, so it
//! answers `$SRV.PING`) answers [`subjects::SCHED_QUEUE`] with the queue
//! snapshot the timer refreshes every second, never touching the queue
//! itself.
//!
//! Layout: the top-level modules are pure decisions (records, config and
//! `now` in; what to write, publish, answer or requeue out), each with its
//! unit tests:
//! - [`apply`]: what one report does to a job (fencing, state machine);
//! - [`reports`]: what a batch of one job's reports does ([`reports::fold`]:
//!   "what happens to a crash report"), typed [`reports::ReportOutcome`];
//! - [`acquire`]: who may get a lease, the dispatch record, the reply;
//! - [`requeue`]: taking a lease back, typed [`requeue::RequeueReason`];
//! - [`leases`]: the session/resource index and its orphans;
//! - [`classification`]: the classifier question, stand-in and events;
//! - [`timers`], [`queue`], [`metrics`].
//!
//! The I/O lives in [`loops`], one module per loop.

pub mod acquire;
pub mod apply;
pub mod classification;
pub mod leases;
mod loops;
pub mod metrics;
pub mod queue;
pub mod reports;
pub mod requeue;
#[cfg(test)]
mod testing;
pub mod timers;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use uuid::Uuid;
use warden_shared::messages::{QueueReply, MESSAGE_VERSION};
use warden_shared::runtime;
use warden_shared::store::JobStore;
use warden_shared::{subjects, Config};

use crate::leases::LeaseIndex;
use crate::queue::Queue;

#[derive(Debug, Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error(transparent)]
    Wait(#[from] runtime::SetupError),
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

fn setup<E: Into<async_nats::Error>>(what: &'static str) -> impl FnOnce(E) -> SchedulerError {
    move |e| SchedulerError::Setup {
        what,
        source: e.into(),
    }
}

/// What the loops of one replica share.
pub(crate) struct Shared {
    config: Arc<Config>,
    store: JobStore,
    js: async_nats::jetstream::Context,
    client: async_nats::Client,
    // A std mutex: nothing awaits while it is held.
    queue: Mutex<Queue>,
    /// Woken whenever jobs become ready.
    ready: Notify,
    sessions_kv: async_nats::jetstream::kv::Store,
    resources_kv: async_nats::jetstream::kv::Store,
    /// Running attempts by session, and the state of every session seen.
    leases: Mutex<LeaseIndex>,
    /// The queue per pool as of the last gauge refresh: what
    /// [`subjects::SCHED_QUEUE`] answers, so a monitoring request never
    /// takes the queue lock the acquire path needs.
    snapshot: Mutex<QueueReply>,
    /// Jobs whose lease the orphan sweep is taking back now.
    sweeping: Mutex<HashSet<Uuid>>,
}

/// A lock that a panic elsewhere did not poison for good: the data behind
/// it are caches, rebuilt by the watches.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn leases(&self) -> MutexGuard<'_, LeaseIndex> {
        lock(&self.leases)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    fn snapshot(&self) -> MutexGuard<'_, QueueReply> {
        lock(&self.snapshot)
    }

    fn sweeping(&self) -> MutexGuard<'_, HashSet<Uuid>> {
        lock(&self.sweeping)
    }
}

/// Runs one scheduler replica until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    warden_shared::metrics::starting("scheduler");
    metrics::init(&config);
    let Some((client, handles)) = runtime::Connect::new(&config, "scheduler")
        .topology(&shutdown)
        .await?
    else {
        return Ok(());
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        store: JobStore::new(handles.jobs.clone()),
        js: handles.js.clone(),
        client: client.clone(),
        queue: Mutex::new(Queue::default()),
        ready: Notify::new(),
        sessions_kv: handles.sessions.clone(),
        resources_kv: handles.resources.clone(),
        leases: Mutex::new(LeaseIndex::default()),
        snapshot: Mutex::new(QueueReply {
            version: MESSAGE_VERSION,
            at: Utc::now(),
            pools: Vec::new(),
        }),
        sweeping: Mutex::new(HashSet::new()),
    });

    let Some(consumer) = runtime::durable_consumer(
        &handles.js,
        "scheduler",
        subjects::REPORTS_STREAM,
        subjects::SCHEDULER_REPORTS_CONSUMER,
        subjects::scheduler_reports_consumer(),
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let acquire = client
        .queue_subscribe(
            subjects::acquire_all(),
            subjects::SCHEDULER_QUEUE_GROUP.to_string(),
        )
        .await
        .map_err(setup("acquire subscription"))?;
    let Some(service) = runtime::start_service_api(
        &client,
        "scheduler",
        subjects::SCHEDULER_SERVICE,
        "Warden scheduler: queue snapshot per pool",
        env!("CARGO_PKG_VERSION"),
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let queue_endpoint = service
        .endpoint_builder()
        .name("queue")
        .add(subjects::SCHED_QUEUE)
        .await
        .map_err(setup("queue endpoint"))?;

    let tracker = TaskTracker::new();
    tracker.spawn(loops::watch::jobs(shared.clone(), shutdown.clone()));
    tracker.spawn(loops::timers::run(shared.clone(), shutdown.clone()));
    tracker.spawn(loops::watch::sessions(
        shared.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(loops::watch::resources(
        shared.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(loops::reports::consume(
        shared.clone(),
        consumer,
        shutdown.clone(),
    ));
    tracker.spawn(loops::acquire::serve(
        shared.clone(),
        acquire,
        shutdown.clone(),
    ));
    tracker.spawn(loops::queue::serve(
        shared.clone(),
        queue_endpoint,
        shutdown.clone(),
    ));
    warden_shared::metrics::ready("scheduler");
    info!("scheduler running");
    shutdown.cancelled().await;
    let _ = service.stop().await;
    runtime::drain(&client, &tracker, Duration::from_secs(10)).await;
    info!("scheduler stopped");
    Ok(())
}
