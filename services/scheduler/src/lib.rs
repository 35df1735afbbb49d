//! `warden-scheduler`: hands SCHEDULED jobs to workers, best first, and
//! applies what workers report.
//!
//! Three loops share one in-memory [`queue::Queue`] (a cache of the jobs
//! bucket, rebuilt at start):
//! - **watch**: every change in `warden_jobs` updates the queue;
//! - **acquire**: workers long-poll [`subjects::ACQUIRE`]; each job handed
//!   out is first moved SCHEDULED → RUNNING by a compare-and-set on its
//!   revision, so two replicas can never lease one attempt twice;
//! - **reports**: a durable consumer, shared by all replicas, applies
//!   worker reports with compare-and-set, checking session and epoch.
//!
//! Besides, the `warden-scheduler` service (async-nats service API, so it
//! answers `$SRV.PING`) answers [`subjects::SCHED_QUEUE`] with the queue
//! snapshot the timer refreshes every second, never touching the queue
//! itself.

pub mod apply;
pub mod metrics;
pub mod queue;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;
use warden_shared::job::{HistoryEntry, Lease};
use warden_shared::messages::{
    AcquireReply, AcquireRequest, Classification, ClassifyReply, ClassifyRequest, ErrorBody,
    LeaseGrant, Notification, Party, QueueReply, Report, ReportKind, ResourceSuspect,
    MESSAGE_VERSION,
};
use warden_shared::resource::{Resource, ResourceState};
use warden_shared::retry::{self, Fate, Loss};
use warden_shared::runtime;
use warden_shared::session::{
    Session, SessionState, RESOURCE_UNAVAILABLE, SESSION_SUPERSEDED, UNKNOWN_SESSION,
};
use warden_shared::state::{transition, Action};
use warden_shared::store::{self, JobStore, StoreError, Versioned};
use warden_shared::{subjects, Config, JobState};

use crate::apply::{
    crash_to_classify, decide_with, record_after_cancel, record_rejection, Decision,
};
use crate::metrics::{
    count_crash, metrics, PriorityLabels, CORRUPT_JOB, INVALID_REPORT, LEASE_UNDELIVERED,
    RESOURCE_CLOSED, SESSION_CLOSED, SESSION_SUPERSEDED as SUPERSEDED, UNKNOWN_JOB, WORKER_LOST,
};
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

struct Shared {
    config: Arc<Config>,
    store: JobStore,
    js: jetstream::Context,
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
    sweeping: Mutex<std::collections::HashSet<Uuid>>,
}

/// Which session holds which running job, and which sessions are dead: a
/// cache of the two buckets, enough to requeue a dead session's work.
#[derive(Default)]
struct LeaseIndex {
    by_session: std::collections::HashMap<String, std::collections::HashSet<Uuid>>,
    session_of: std::collections::HashMap<Uuid, String>,
    states: std::collections::HashMap<String, SessionState>,
    /// The bot of every session seen.
    bots: std::collections::HashMap<String, String>,
    /// Pools and resources of every active session.
    active: std::collections::HashMap<String, (Vec<String>, Vec<String>)>,
    /// Running attempts by resource, and the state of every resource.
    by_resource: std::collections::HashMap<String, std::collections::HashSet<Uuid>>,
    resources_of: std::collections::HashMap<Uuid, Vec<String>>,
    resource_states: std::collections::HashMap<String, ResourceState>,
    /// Epoch and lease time of every running attempt.
    leased: std::collections::HashMap<Uuid, (u32, DateTime<Utc>)>,
    /// Per active session: its last heartbeat and the leases it listed.
    heartbeats: std::collections::HashMap<String, LastHeartbeat>,
}

/// A session's last heartbeat: when, and the (job, epoch) leases it listed.
type LastHeartbeat = (DateTime<Utc>, Vec<(Uuid, u32)>);

/// Why a running attempt must be taken back, found by [`LeaseIndex::orphans`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Orphan {
    job: Uuid,
    session: String,
    reason: &'static str,
    /// The attempt, when only that one may be taken back.
    epoch: Option<u32>,
}

/// Whether an active session's heartbeat shows it never got a lease: a
/// heartbeat later than `grace` after the lease was granted that does not
/// list it. A heartbeat that may have been sent before the grant arrived
/// (within `grace`) proves nothing.
fn undelivered(
    leased_at: DateTime<Utc>,
    epoch: u32,
    job: Uuid,
    heartbeat: Option<&LastHeartbeat>,
    grace: Duration,
) -> bool {
    let Some((at, held)) = heartbeat else {
        return false;
    };
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::seconds(5));
    *at > leased_at + grace && !held.contains(&(job, epoch))
}

impl LeaseIndex {
    /// Running attempts whose lease must go back: their session is known
    /// dead, their resource closed, or the session's heartbeats show it
    /// never got the grant. The sweep that calls this catches whatever a
    /// missed or failed watch event left behind.
    fn orphans(&self, grace: Duration) -> Vec<Orphan> {
        let mut out = Vec::new();
        for (job, session) in &self.session_of {
            if let Some(reason) = self.dead(session) {
                out.push(Orphan {
                    job: *job,
                    session: session.clone(),
                    reason,
                    epoch: None,
                });
            } else if self.on_closed_resource(job) {
                out.push(Orphan {
                    job: *job,
                    session: session.clone(),
                    reason: RESOURCE_CLOSED,
                    epoch: None,
                });
            } else if let Some((epoch, at)) = self.leased.get(job) {
                if undelivered(*at, *epoch, *job, self.heartbeats.get(session), grace) {
                    out.push(Orphan {
                        job: *job,
                        session: session.clone(),
                        reason: LEASE_UNDELIVERED,
                        epoch: Some(*epoch),
                    });
                }
            }
        }
        out
    }

    fn observe_job(&mut self, job: &warden_shared::Job) {
        if let Some(old) = self.session_of.remove(&job.id) {
            if let Some(set) = self.by_session.get_mut(&old) {
                set.remove(&job.id);
            }
        }
        for r in self.resources_of.remove(&job.id).unwrap_or_default() {
            if let Some(set) = self.by_resource.get_mut(&r) {
                set.remove(&job.id);
            }
        }
        self.leased.remove(&job.id);
        if let (JobState::Running, Some(lease)) = (job.state, &job.lease) {
            self.leased.insert(job.id, (lease.epoch, lease.leased_at));
            self.session_of.insert(job.id, lease.session.clone());
            self.by_session
                .entry(lease.session.clone())
                .or_default()
                .insert(job.id);
            let resources = lease_resources(lease);
            for r in &resources {
                self.by_resource
                    .entry(r.clone())
                    .or_default()
                    .insert(job.id);
            }
            self.resources_of.insert(job.id, resources);
        }
    }

    /// The first of `resources` known not to be open, with its state. A
    /// resource the health service has not registered yet is not refused.
    fn unavailable<'a>(&self, resources: &'a [String]) -> Option<(&'a str, ResourceState)> {
        resources
            .iter()
            .find_map(|r| match self.resource_states.get(r) {
                Some(s) if !s.leasable() => Some((r.as_str(), *s)),
                _ => None,
            })
    }

    /// Whether a running attempt sits on a closed resource.
    fn on_closed_resource(&self, job: &Uuid) -> bool {
        self.resources_of.get(job).is_some_and(|rs| {
            rs.iter()
                .any(|r| self.resource_states.get(r) == Some(&ResourceState::Closed))
        })
    }

    /// Pools some active session on open resources serves.
    fn served_pools(&self) -> std::collections::HashSet<String> {
        self.active
            .values()
            .filter(|(_, resources)| self.unavailable(resources).is_none())
            .flat_map(|(pools, _)| pools.iter().cloned())
            .collect()
    }

    /// Why work leased to `session` must go back, if it must.
    fn dead(&self, session: &str) -> Option<&'static str> {
        match self.states.get(session)? {
            SessionState::Active => None,
            SessionState::Expired => Some(WORKER_LOST),
            SessionState::Quarantined => Some(SUPERSEDED),
            SessionState::Closed => Some(SESSION_CLOSED),
        }
    }
}

/// Every resource a lease runs on (its host alone for older records).
fn lease_resources(lease: &Lease) -> Vec<String> {
    lease.resource_names()
}

impl Shared {
    fn leases(&self) -> std::sync::MutexGuard<'_, LeaseIndex> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> std::sync::MutexGuard<'_, QueueReply> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs one scheduler replica until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    warden_shared::metrics::starting("scheduler");
    metrics::init(&config);
    let Some((client, handles)) =
        runtime::connect_with_topology_until(&config, "scheduler", &shutdown).await?
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
        sweeping: Mutex::new(std::collections::HashSet::new()),
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
            subjects::ACQUIRE,
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
    tracker.spawn(watch_loop(shared.clone(), shutdown.clone()));
    tracker.spawn(timer_loop(shared.clone(), shutdown.clone()));
    tracker.spawn(sessions_loop(
        shared.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(resources_loop(
        shared.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(reports_loop(shared.clone(), consumer, shutdown.clone()));
    tracker.spawn(acquire_loop(
        shared.clone(),
        acquire,
        tracker.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(queue_service_loop(
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

/// Keeps the queue equal to the SCHEDULED jobs in the bucket. On a watch
/// error it starts over: the first pass of a watch delivers every key's
/// latest value, which rebuilds the cache.
async fn watch_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    runtime::follow_kv(shared.store.kv(), ">", "jobs", &shutdown, |entry| {
        on_job_entry(&shared, entry);
        std::future::ready(())
    })
    .await;
}

fn on_job_entry(shared: &Arc<Shared>, entry: async_nats::jetstream::kv::Entry) {
    let Ok(id) = entry.key.parse::<Uuid>() else {
        return;
    };
    if entry.operation != async_nats::jetstream::kv::Operation::Put {
        shared.queue().remove(&id);
        return;
    }
    match store::decode(&entry.key, &entry.value) {
        Ok(job) => {
            let dead = {
                let mut l = shared.leases();
                l.observe_job(&job);
                match (&job.state, &job.lease) {
                    (JobState::Running, Some(lease)) => l
                        .dead(&lease.session)
                        .or_else(|| l.on_closed_resource(&job.id).then_some(RESOURCE_CLOSED))
                        .map(|r| (lease.session.clone(), r)),
                    _ => None,
                }
            };
            if let Some((session, reason)) = dead {
                let shared = shared.clone();
                let id = job.id;
                tokio::spawn(async move { requeue(&shared, id, &session, reason).await });
            }
            let scheduled = job.state == JobState::Scheduled;
            shared.queue().observe(Versioned {
                job,
                revision: entry.revision,
            });
            if scheduled {
                shared.ready.notify_waiters();
            }
        }
        Err(e) => warn!(job.id = %id, error = %e, "undecodable job record ignored"),
    }
}

/// Follows the sessions bucket; when a session stops being active, its
/// running attempts go back to the queue.
async fn sessions_loop(shared: Arc<Shared>, tracker: TaskTracker, shutdown: CancellationToken) {
    runtime::follow_kv(
        &shared.sessions_kv,
        "session.>",
        "sessions",
        &shutdown,
        |entry| {
            on_session_entry(&shared, &tracker, entry);
            std::future::ready(())
        },
    )
    .await;
}

fn on_session_entry(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    entry: async_nats::jetstream::kv::Entry,
) {
    let Ok(session) = serde_json::from_slice::<Session>(&entry.value) else {
        return;
    };
    let (reason, doomed) = {
        let mut l = shared.leases();
        l.states.insert(session.name.clone(), session.state);
        l.bots.insert(session.name.clone(), session.bot_id.clone());
        if session.state == SessionState::Active {
            l.active.insert(
                session.name.clone(),
                (session.pools.clone(), session.resource_names()),
            );
            l.heartbeats.insert(
                session.name.clone(),
                (
                    session.last_heartbeat,
                    session.leases.iter().map(|h| (h.job_id, h.epoch)).collect(),
                ),
            );
        } else {
            l.active.remove(&session.name);
            l.heartbeats.remove(&session.name);
        }
        let reason = l.dead(&session.name);
        let doomed: Vec<Uuid> = match reason {
            Some(_) => l
                .by_session
                .get(&session.name)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        (reason, doomed)
    };
    let Some(reason) = reason else { return };
    for id in doomed {
        let shared = shared.clone();
        let name = session.name.clone();
        tracker.spawn(async move { requeue(&shared, id, &name, reason).await });
    }
}

/// Follows the resources bucket: a resource that is no longer open gets no
/// new lease (checked in `acquire`); one that is closed loses its running
/// attempts, requeued without counting against their jobs. Any change
/// wakes parked acquire requests, so a resource that opens again gets work
/// at once.
async fn resources_loop(shared: Arc<Shared>, tracker: TaskTracker, shutdown: CancellationToken) {
    runtime::follow_kv(&shared.resources_kv, ">", "resources", &shutdown, |entry| {
        on_resource_entry(&shared, &tracker, entry);
        std::future::ready(())
    })
    .await;
}

fn on_resource_entry(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    entry: async_nats::jetstream::kv::Entry,
) {
    let Ok(resource) = serde_json::from_slice::<Resource>(&entry.value) else {
        return;
    };
    let doomed: Vec<(Uuid, String)> = {
        let mut l = shared.leases();
        l.resource_states
            .insert(resource.name.clone(), resource.state);
        if resource.state == ResourceState::Closed {
            l.by_resource
                .get(&resource.name)
                .map(|jobs| {
                    jobs.iter()
                        .filter_map(|id| l.session_of.get(id).map(|s| (*id, s.clone())))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    shared.ready.notify_waiters();
    for (id, session) in doomed {
        let shared = shared.clone();
        tracker.spawn(async move { requeue(&shared, id, &session, RESOURCE_CLOSED).await });
    }
}

/// Takes a dead session's lease back. A lost worker (expired, or replaced
/// by its own restart) ends the attempt as `system/worker_lost` under the
/// retry policy: a delayed retry, or SHELVED (budget spent, or poison). A
/// closed session's lease goes straight back to the queue, costing
/// nothing. Several replicas may try; compare-and-set lets one win, the
/// others see the job moved on and stop.
async fn requeue(shared: &Shared, id: Uuid, session: &str, reason: &'static str) {
    requeue_attempt(shared, id, session, None, reason).await
}

/// [`requeue`], of attempt `epoch` only when given. A job that cannot be
/// read is tried again with back-off (a NATS node may be down): giving up
/// would leave it RUNNING under a dead lease until the next sweep.
async fn requeue_attempt(
    shared: &Shared,
    id: Uuid,
    session: &str,
    epoch: Option<u32>,
    reason: &'static str,
) {
    let loss = match reason {
        WORKER_LOST => Some(Loss::WorkerLost),
        SUPERSEDED => Some(Loss::SessionSuperseded),
        RESOURCE_CLOSED => Some(Loss::ResourceBroken),
        _ => None,
    };
    let mut pause = Duration::from_millis(100);
    for _ in 0..30 {
        let current = match shared.store.get(&id).await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                debug!(job.id = %id, error = %e, "cannot read the job to take its lease back; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let job = &current.job;
        if job.state != JobState::Running
            || job.lease.as_ref().map(|l| l.session.as_str()) != Some(session)
            || epoch.is_some_and(|e| job.lease.as_ref().map(|l| l.epoch) != Some(e))
        {
            return;
        }
        // This replica's view of the resources may lag (a resource closed,
        // then reopened as a new incarnation): act only on a closure the
        // bucket still shows.
        if reason == RESOURCE_CLOSED {
            let names = job.lease.as_ref().map(lease_resources).unwrap_or_default();
            if !closed_now(shared, &names).await {
                debug!(job.id = %id, "its resource is no longer closed; lease kept");
                return;
            }
        }
        let now = Utc::now();
        let mut next = job.clone();
        next.updated_at = now;
        let fate = match loss {
            Some(loss) => {
                let policy = shared.config.retry_policy(&next.task);
                let words = match loss {
                    Loss::WorkerLost | Loss::SelfFenced => format!("session {session} expired"),
                    Loss::SessionSuperseded => {
                        format!("session {session} was superseded by a new session of its bot")
                    }
                    Loss::ResourceBroken => {
                        let closed: Vec<String> = job
                            .lease
                            .as_ref()
                            .map(lease_resources)
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|r| {
                                shared.leases().resource_states.get(r)
                                    == Some(&ResourceState::Closed)
                            })
                            .collect();
                        format!("resource {} was closed", closed.join(", "))
                    }
                };
                Some(retry::after_loss(&mut next, &policy, loss, &words, now))
            }
            None => {
                let Ok(to) = transition(job.state, Action::Requeue) else {
                    return;
                };
                let lease = next.lease.take();
                next.state = to;
                next.queued_at = now;
                // Not the job's doing: the attempt is not counted.
                next.budget_from = next.budget_from.saturating_add(1);
                next.push_history(HistoryEntry {
                    at: now,
                    action: Action::Requeue,
                    attempt: job.attempt,
                    from: Some(JobState::Running),
                    to: Some(to),
                    actor: "scheduler".into(),
                    bot_id: lease.as_ref().map(|l| l.bot_id.clone()),
                    resource: lease.as_ref().and_then(|l| l.resource.clone()),
                    note: Some(if reason == LEASE_UNDELIVERED {
                        format!("{reason}: session {session} never listed the lease in its heartbeats; requeued, the attempt not counted")
                    } else {
                        format!("{reason}: session {session} is no longer current; requeued, the attempt not counted")
                    }),
                });
                None
            }
        };
        // The holder may still be alive and running the task (its resource
        // was closed under it; the grant may have reached it after all):
        // the job waits half a session timeout, time for the holder's next
        // heartbeat to be told to stop, so it never runs twice at once.
        if matches!(reason, RESOURCE_CLOSED | LEASE_UNDELIVERED)
            && next.state == JobState::Scheduled
        {
            next.not_before = Some(now + holder_grace(&shared.config));
        }
        match shared.store.update(&next, current.revision).await {
            Ok(_) => {
                let m = metrics();
                m.requeued.with_label_values(&[reason]).inc();
                m.transitions
                    .with_label_values(&["RUNNING", next.state.as_str()])
                    .inc();
                if let Some(fate) = fate {
                    count_fate(fate, next.blame);
                    // A lost worker's attempt failed with the blame it was
                    // recorded with; a closed resource's costs nothing
                    // (requeued, blame cleared) unless it made the job poison.
                    if let (Some(blame), Some(detail)) = (next.blame, next.detail.as_deref()) {
                        count_crash(&shared.config, blame, detail);
                    }
                }
                info!(job.id = %id, session, reason, state = %next.state, "lease taken back");
                return;
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => {
                warn!(job.id = %id, error = %e, "cannot requeue; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Half a session timeout: how long a lease's holder has to learn at its
/// next heartbeat that the lease was taken back, and how fresh a lease must
/// be to be handed out after a dispatch read back.
fn holder_grace(config: &Config) -> chrono::Duration {
    chrono::Duration::from_std(config.fencing.session_timeout / 2)
        .unwrap_or(chrono::Duration::seconds(5))
}

/// Whether one of `names` is closed in the resources bucket now; `false`
/// when it cannot be read (the orphan sweep asks again in two seconds).
async fn closed_now(shared: &Shared, names: &[String]) -> bool {
    for name in names {
        match shared
            .resources_kv
            .get(warden_shared::resource::resource_key(name))
            .await
        {
            Ok(Some(bytes)) => {
                if serde_json::from_slice::<Resource>(&bytes)
                    .is_ok_and(|r| r.state == ResourceState::Closed)
                {
                    return true;
                }
            }
            Ok(None) => {}
            Err(e) => {
                debug!(resource = %name, error = %e, "cannot read the resource");
                return false;
            }
        }
    }
    false
}

/// Counts what the retry policy did with a failed attempt.
fn count_fate(fate: Fate, blame: Option<warden_shared::Blame>) {
    let m = metrics();
    match fate {
        Fate::Retried => m
            .retries
            .with_label_values(&[blame.map(|b| b.as_str()).unwrap_or("unknown")])
            .inc(),
        Fate::ShelvedRetriesExhausted | Fate::ShelvedPoison => {
            m.shelved.with_label_values(&[fate.as_str()]).inc()
        }
        Fate::Kept | Fate::Requeued => {}
    }
}

/// Takes back, every two seconds, the leases that must go back (see
/// [`LeaseIndex::orphans`]); one take-back per job at a time.
fn sweep_orphans(shared: &Arc<Shared>) {
    // A full session timeout: a heartbeat built before the grant arrived
    // but answered late must not look like one that never got it.
    let grace = shared
        .config
        .fencing
        .session_timeout
        .max(Duration::from_secs(2));
    let orphans = shared.leases().orphans(grace);
    for o in orphans {
        if !shared
            .sweeping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(o.job)
        {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            if o.reason == LEASE_UNDELIVERED {
                warn!(job.id = %o.job, session = %o.session, epoch = ?o.epoch, "lease never reached its worker; taking it back");
            }
            requeue_attempt(&shared, o.job, &o.session, o.epoch, o.reason).await;
            shared
                .sweeping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&o.job);
        });
    }
}

/// Promotes delayed retries when due (within 100 ms), refreshes the
/// queue gauges every second, and sweeps orphaned leases every two.
async fn timer_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let priorities = PriorityLabels::new(&shared.config);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Utc::now();
        if shared.queue().promote(now) > 0 {
            shared.ready.notify_waiters();
        }
        n += 1;
        if n % 20 == 5 {
            sweep_orphans(&shared);
        }
        if n % 10 != 1 {
            continue;
        }
        let (waiting, delayed) = {
            let q = shared.queue();
            (q.waiting(), q.delayed())
        };
        let m = metrics();
        // Priorities outside the config share one label: their counts add
        // up and the oldest of them is the age.
        let mut by_label: std::collections::BTreeMap<(&str, String), (usize, DateTime<Utc>)> =
            std::collections::BTreeMap::new();
        for ((pool, priority), (count, oldest)) in &waiting {
            let e = by_label
                .entry((pool.as_str(), priorities.label(*priority)))
                .or_insert((0, *oldest));
            e.0 += count;
            e.1 = e.1.min(*oldest);
        }
        m.queue_depth.reset();
        m.oldest_age.reset();
        m.delayed.reset();
        for ((pool, priority), (count, oldest)) in &by_label {
            m.queue_depth
                .with_label_values(&[*pool, priority.as_str()])
                .set(*count as i64);
            m.oldest_age
                .with_label_values(&[*pool, priority.as_str()])
                .set((now - *oldest).num_seconds().max(0));
        }
        for (pool, count) in &delayed {
            m.delayed.with_label_values(&[pool]).set(*count as i64);
        }
        let (served, known) = {
            let l = shared.leases();
            let known: Vec<String> = l
                .active
                .values()
                .flat_map(|(pools, _)| pools.iter().cloned())
                .collect();
            (l.served_pools(), known)
        };
        *shared.snapshot() = QueueReply {
            version: MESSAGE_VERSION,
            at: now,
            pools: queue::pools(&waiting, &delayed, &served, &known),
        };
        // Every pool a worker serves is exported, 0 when nothing waits.
        let mut unserved: std::collections::BTreeMap<String, i64> =
            known.into_iter().map(|p| (p, 0)).collect();
        for ((pool, _), (count, _)) in &waiting {
            let e = unserved.entry(pool.clone()).or_default();
            if !served.contains(pool) {
                *e += *count as i64;
            }
        }
        m.waiting_for_resource.reset();
        for (pool, count) in unserved {
            m.waiting_for_resource
                .with_label_values(&[&pool])
                .set(count);
        }
    }
}

/// Answers [`subjects::SCHED_QUEUE`] from the snapshot, with each pool's
/// oldest wait computed now.
async fn queue_service_loop(
    shared: Arc<Shared>,
    mut endpoint: async_nats::service::endpoint::Endpoint,
    shutdown: CancellationToken,
) {
    loop {
        let req = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = endpoint.next() => match r { Some(r) => r, None => return },
        };
        let mut reply = shared.snapshot().clone();
        queue::age(&mut reply, Utc::now());
        let answer = match serde_json::to_vec(&reply) {
            Ok(body) => req.respond(Ok(body.into())).await,
            Err(e) => {
                warn!(error = %e, "cannot encode queue reply");
                continue;
            }
        };
        if let Err(e) = answer {
            debug!(error = %e, "cannot answer queue request");
        }
    }
}

async fn acquire_loop(
    shared: Arc<Shared>,
    mut sub: async_nats::Subscriber,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let Some(reply) = msg.reply.clone() else {
                return;
            };
            let answer = match serde_json::from_slice::<AcquireRequest>(&msg.payload) {
                Ok(req) => acquire(&shared, req, &shutdown).await,
                Err(e) => {
                    metrics()
                        .acquire_requests
                        .with_label_values(&["invalid"])
                        .inc();
                    AcquireReply {
                        version: MESSAGE_VERSION,
                        leases: Vec::new(),
                        error: Some(ErrorBody::new(
                            "invalid_request",
                            format!("cannot decode acquire request: {e}"),
                        )),
                    }
                }
            };
            match serde_json::to_vec(&answer) {
                Ok(body) => {
                    if let Err(e) = shared.client.publish(reply, body.into()).await {
                        warn!(error = %e, "cannot answer acquire request");
                    }
                }
                Err(e) => warn!(error = %e, "cannot encode acquire reply"),
            }
        });
    }
    let _ = sub.unsubscribe().await;
}

/// Leases up to `req.max` jobs to the requesting session, waiting up to
/// `req.wait_ms` (capped by config) for work to appear.
async fn acquire(
    shared: &Shared,
    req: AcquireRequest,
    shutdown: &CancellationToken,
) -> AcquireReply {
    let wait = Duration::from_millis(req.wait_ms).min(shared.config.scheduler.acquire_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let max = req.max.clamp(1, 1000) as usize;
    let mut leases = Vec::new();
    let resources = request_resources(&req);
    let mut blocked: Option<String>;
    // Only a session known to be active, and the requesting bot's own,
    // gets a lease: one this replica has not seen yet is read from the
    // bucket (it may just have been created).
    let known = {
        let l = shared.leases();
        l.states
            .get(&req.session)
            .map(|s| (*s, l.bots.get(&req.session).cloned().unwrap_or_default()))
    };
    let known = match known {
        Some(k) => Some(k),
        None => match shared
            .sessions_kv
            .get(warden_shared::session::session_key(&req.session))
            .await
        {
            Ok(Some(bytes)) => serde_json::from_slice::<Session>(&bytes)
                .ok()
                .map(|s| (s.state, s.bot_id)),
            Ok(None) => None,
            Err(e) => {
                warn!(session = %req.session, error = %e, "cannot read the session; acquire refused for now");
                metrics()
                    .acquire_requests
                    .with_label_values(&["rejected"])
                    .inc();
                return AcquireReply {
                    version: MESSAGE_VERSION,
                    leases,
                    error: Some(ErrorBody::new(
                        UNAVAILABLE,
                        format!("cannot read session {}: {e}", req.session),
                    )),
                };
            }
        },
    };
    if let Err((code, message)) =
        session_verdict(&req, known.as_ref().map(|(s, b)| (*s, b.as_str())))
    {
        metrics()
            .acquire_requests
            .with_label_values(&["rejected"])
            .inc();
        return AcquireReply {
            version: MESSAGE_VERSION,
            leases,
            error: Some(ErrorBody::new(code, message)),
        };
    }
    loop {
        // Register interest before looking, so a job that arrives between
        // the look and the wait still wakes us.
        let notified = shared.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A session this replica knows to be dead gets nothing, checked on
        // every wake-up: a long poll parked before its bot died must not
        // take work.
        if let Some(reason) = shared.leases().dead(&req.session) {
            metrics()
                .acquire_requests
                .with_label_values(&["rejected"])
                .inc();
            let code = if reason == SUPERSEDED {
                SESSION_SUPERSEDED
            } else {
                UNKNOWN_SESSION
            };
            return AcquireReply {
                version: MESSAGE_VERSION,
                leases,
                error: Some(ErrorBody::new(
                    code,
                    format!("session {} is no longer current ({reason})", req.session),
                )),
            };
        }
        // No new lease for a session on a resource that is not open
        // (suspicious, broken, closed): its jobs wait for others, and this
        // request is held like an empty one, so a resource that opens
        // again is served at once.
        blocked = shared
            .leases()
            .unavailable(&resources)
            .map(|(r, state)| format!("resource {r} is {state}"));
        let candidates = if blocked.is_some() {
            Vec::new()
        } else {
            shared.queue().take(&req.pools, max - leases.len())
        };
        if !candidates.is_empty() {
            let results = futures::future::join_all(
                candidates.into_iter().map(|v| dispatch(shared, v, &req)),
            )
            .await;
            leases.extend(results.into_iter().flatten());
            if leases.len() >= max || !leases.is_empty() {
                break;
            }
            // Every one lost (to another replica, or the store failed):
            // a short pause, so a failing store is not hammered.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = shutdown.cancelled() => break,
        }
    }
    if let (Some(why), true) = (blocked, leases.is_empty()) {
        metrics()
            .acquire_requests
            .with_label_values(&["resource_unavailable"])
            .inc();
        return AcquireReply {
            version: MESSAGE_VERSION,
            leases,
            error: Some(ErrorBody::new(RESOURCE_UNAVAILABLE, why)),
        };
    }
    metrics()
        .acquire_requests
        .with_label_values(&[if leases.is_empty() { "empty" } else { "leased" }])
        .inc();
    AcquireReply {
        version: MESSAGE_VERSION,
        leases,
        error: None,
    }
}

/// Transient: the scheduler could not check the session; ask again.
const UNAVAILABLE: &str = "unavailable";

/// May `req` be served, given what is known of its session (state and
/// bot; `None`: the fencing service never created it)? The error code and
/// message to refuse it with otherwise.
fn session_verdict(
    req: &AcquireRequest,
    known: Option<(SessionState, &str)>,
) -> Result<(), (&'static str, String)> {
    let name = &req.session;
    match known {
        None => Err((UNKNOWN_SESSION, format!("session {name} does not exist"))),
        Some((_, bot)) if bot != req.bot_id => Err((
            UNKNOWN_SESSION,
            format!("session {name} belongs to bot {bot}, not to {}", req.bot_id),
        )),
        Some((SessionState::Active, _)) => Ok(()),
        Some((SessionState::Quarantined, _)) => Err((
            SESSION_SUPERSEDED,
            format!("session {name} is no longer current ({SUPERSEDED})"),
        )),
        Some((state, _)) => Err((
            UNKNOWN_SESSION,
            format!("session {name} is {}", state.as_str()),
        )),
    }
}

/// The resources an acquire request runs on (its host alone for agents
/// that do not declare resources).
fn request_resources(req: &AcquireRequest) -> Vec<String> {
    if req.resources.is_empty() {
        req.resource.iter().cloned().collect()
    } else {
        req.resources.clone()
    }
}

/// SCHEDULED → RUNNING with a new epoch, by compare-and-set. `None` when
/// another writer got there first (the watch will tell us what happened).
async fn dispatch(shared: &Shared, v: Versioned, req: &AcquireRequest) -> Option<LeaseGrant> {
    let now = Utc::now();
    let revision = v.revision;
    let original = v.clone();
    let mut job = v.job;
    let to = transition(job.state, Action::Dispatch).ok()?;
    let from = job.state;
    job.state = to;
    job.attempt += 1;
    job.lease = Some(Lease {
        session: req.session.clone(),
        bot_id: req.bot_id.clone(),
        resource: req.resource.clone(),
        resources: request_resources(req),
        epoch: job.attempt,
        leased_at: now,
        started_at: None,
    });
    job.outcome = None;
    job.blame = None;
    job.detail = None;
    job.description = None;
    job.crash = None;
    job.not_before = None;
    job.updated_at = now;
    job.push_history(HistoryEntry {
        at: now,
        action: Action::Dispatch,
        attempt: job.attempt,
        from: Some(from),
        to: Some(to),
        actor: req.session.clone(),
        bot_id: Some(req.bot_id.clone()),
        resource: req.resource.clone(),
        note: None,
    });
    match shared.store.update(&job, revision).await {
        Ok(_) => {
            let m = metrics();
            m.dispatched.inc();
            m.transitions
                .with_label_values(&[from.as_str(), to.as_str()])
                .inc();
            m.dispatch_latency
                .observe((now - job.queued_at).num_milliseconds().max(0) as f64 / 1000.0);
            debug!(job.id = %job.id, epoch = job.attempt, bot.id = %req.bot_id, "job dispatched");
            Some(grant(&job))
        }
        Err(StoreError::Conflict(_)) => {
            metrics().dispatch_conflicts.inc();
            None
        }
        Err(e) => {
            // The write may have happened though its acknowledgement was
            // lost (a NATS node died in between): read it back. Ours: hand
            // the lease out. Unchanged, or unknown: back in the queue (a
            // dispatch of a job that did move fails by revision, and the
            // watch brings its new state). A lease written but never handed
            // out is taken back by the orphan sweep.
            match shared.store.get(&job.id).await {
                // Only a fresh lease: one written long ago would look
                // undelivered to the orphan sweep as soon as it is handed
                // out; that one the sweep takes back instead.
                Ok(Some(v))
                    if v.job.is_held_by(&req.session, job.attempt)
                        && v.job.lease.as_ref().is_some_and(|l| {
                            Utc::now() - l.leased_at < holder_grace(&shared.config)
                        }) =>
                {
                    metrics().dispatched.inc();
                    info!(job.id = %job.id, epoch = job.attempt, error = %e, "dispatch written though not acknowledged");
                    Some(grant(&v.job))
                }
                Ok(Some(v)) if v.revision != revision => None,
                Ok(None) => None,
                _ => {
                    warn!(job.id = %job.id, error = %e, "dispatch failed; job stays queued");
                    shared.queue().observe(original);
                    None
                }
            }
        }
    }
}

fn grant(job: &warden_shared::Job) -> LeaseGrant {
    LeaseGrant {
        job_id: job.id,
        epoch: job.attempt,
        task: job.task.clone(),
        args: job.args.clone(),
        pool: job.pool.clone(),
        priority: job.priority,
    }
}

async fn reports_loop(shared: Arc<Shared>, consumer: PullConsumer, shutdown: CancellationToken) {
    let batch = shared.config.scheduler.report_batch;
    while !shutdown.is_cancelled() {
        let messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull reports; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut chunks = messages.ready_chunks(batch);
        loop {
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = chunks.next() => match c { Some(c) => c, None => break },
            };
            let mut by_job: Vec<(Uuid, Vec<(jetstream::Message, Report)>)> = Vec::new();
            for item in chunk {
                let msg = match item {
                    Ok(m) => m,
                    Err(e) => {
                        debug!(error = %e, "report pull interrupted");
                        continue;
                    }
                };
                match serde_json::from_slice::<Report>(&msg.payload) {
                    Ok(r) => match by_job.iter_mut().find(|(id, _)| *id == r.job_id) {
                        Some((_, list)) => list.push((msg, r)),
                        None => by_job.push((r.job_id, vec![(msg, r)])),
                    },
                    Err(e) => dead_letter_report(&shared, msg, e).await,
                }
            }
            // Reports of one job are folded into one write, in order;
            // different jobs are written concurrently.
            futures::future::join_all(by_job.into_iter().map(|(_, list)| {
                let shared = &shared;
                async move {
                    let reports: Vec<&Report> = list.iter().map(|(_, r)| r).collect();
                    let deliveries = list
                        .iter()
                        .filter_map(|(m, _)| m.info().ok().map(|i| i.delivered))
                        .max()
                        .unwrap_or(1);
                    let kind = match handle_reports(shared, &reports, deliveries).await {
                        Disposition::Ack => AckKind::Ack,
                        Disposition::Retry => AckKind::Nak(Some(Duration::from_secs(1))),
                    };
                    for (msg, _) in &list {
                        if let Err(e) = msg.ack_with(kind).await {
                            debug!(error = %e, "cannot ack report");
                        }
                    }
                }
            }))
            .await;
        }
    }
}

enum Disposition {
    Ack,
    Retry,
}

/// Applies the reports of one job, in order, with a single
/// compare-and-set: the single place a report's fate is decided.
async fn handle_reports(shared: &Shared, reports: &[&Report], deliveries: i64) -> Disposition {
    let Some(first) = reports.first() else {
        return Disposition::Ack;
    };
    let job_id = first.job_id;
    let m = metrics();
    // Classifications by report index, kept across compare-and-set retries.
    let mut classified: std::collections::HashMap<usize, Classification> =
        std::collections::HashMap::new();
    for _ in 0..16 {
        let current = match shared.store.get(&job_id).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                for r in reports {
                    m.reports
                        .with_label_values(&[r.kind.name(), "rejected"])
                        .inc();
                    m.rejected.with_label_values(&[UNKNOWN_JOB]).inc();
                    warn!(job.id = %job_id, bot.id = %r.bot_id, "report for unknown job rejected");
                }
                return Disposition::Ack;
            }
            Err(e) if e.is_transient() => return Disposition::Retry,
            Err(e) => {
                warn!(job.id = %job_id, error = %e, "job record unreadable; reports dropped");
                for r in reports {
                    m.reports
                        .with_label_values(&[r.kind.name(), "rejected"])
                        .inc();
                    m.rejected.with_label_values(&[CORRUPT_JOB]).inc();
                }
                return Disposition::Ack;
            }
        };
        // Crashes are classified before anything is decided, so the retry
        // policy acts on the classifier's blame and detail.
        for (i, r) in reports.iter().enumerate() {
            if classified.contains_key(&i) || !crash_to_classify(&current.job, r) {
                continue;
            }
            match classify(shared, &current.job, r, deliveries).await {
                Some(c) => {
                    classified.insert(i, c);
                }
                None => return Disposition::Retry,
            }
        }
        let now = Utc::now();
        let mut job = current.job.clone();
        let mut results = Vec::with_capacity(reports.len());
        let mut fates = Vec::new();
        let mut crashes = Vec::new();
        // Counted only once the write is durable.
        let mut failed = Vec::new();
        let mut ended = Vec::new();
        let mut duplicates: Vec<&Report> = Vec::new();
        for (i, r) in reports.iter().enumerate() {
            match decide_with(&job, r, classified.get(&i), now) {
                Decision::Duplicate => {
                    duplicates.push(*r);
                    results.push((r, "duplicate", None))
                }
                Decision::Apply(mut next) => {
                    let from = job.state;
                    if from == JobState::Running && metrics::ENDED.contains(&next.state) {
                        if let Some(lease) = &job.lease {
                            let secs = (now - lease.leased_at).num_milliseconds().max(0) as f64;
                            ended.push((next.state, secs / 1000.0));
                        }
                    }
                    // A crash and what the retry policy makes of it are one
                    // write: no restart can leave a crash unanswered.
                    if next.state == JobState::Crashed {
                        let policy = shared.config.retry_policy(&next.task);
                        let resources = job.lease.as_ref().map(lease_resources).unwrap_or_default();
                        let leased_at = job.lease.as_ref().map(|l| l.leased_at);
                        let attempt = next.attempt;
                        if let (Some(blame), Some(detail)) = (next.blame, next.detail.clone()) {
                            failed.push((blame, detail));
                        }
                        let fate = retry::after_crash(&mut next, &policy, now);
                        fates.push((fate, next.blame));
                        if let Some(c) = classified.get(&i) {
                            crashes.push((c.clone(), attempt, resources, leased_at, next.state));
                        }
                    }
                    results.push((r, "applied", Some((from, next.state))));
                    job = *next;
                }
                Decision::Lost(loss) => {
                    // Warden stopped the attempt, not the task: the lease
                    // is lost with the worker, under the retry policy.
                    let policy = shared.config.retry_policy(&job.task);
                    let from = job.state;
                    let (next, fate) = apply::apply_loss(&job, r, loss, &policy, now);
                    fates.push((fate, next.blame));
                    if let (Some(blame), Some(detail)) = (next.blame, next.detail.clone()) {
                        failed.push((blame, detail));
                    }
                    if let Some(lease) = &job.lease {
                        let secs = (now - lease.leased_at).num_milliseconds().max(0) as f64;
                        if metrics::ENDED.contains(&next.state) {
                            ended.push((next.state, secs / 1000.0));
                        }
                    }
                    info!(job.id = %job_id, session = %r.session, loss = loss.as_str(), state = %next.state, "attempt stopped by its worker; lease lost");
                    results.push((r, "applied", Some((from, next.state))));
                    job = next;
                }
                Decision::AfterCancel => {
                    job = record_after_cancel(&job, r, now);
                    results.push((r, "after_cancel", None));
                }
                Decision::Reject(reason) => {
                    job = record_rejection(&job, r, reason, now);
                    results.push((r, reason.as_str(), None));
                }
            }
        }
        if results.iter().all(|(_, res, _)| *res == "duplicate") {
            for (r, _, _) in &results {
                m.reports
                    .with_label_values(&[r.kind.name(), "duplicate"])
                    .inc();
            }
            // A redelivered crash: its events may not have gone out.
            return republish_crash_events(shared, &job, reports, deliveries).await;
        }
        match shared.store.update(&job, current.revision).await {
            Ok(_) => {
                for (fate, blame) in fates {
                    count_fate(fate, blame);
                }
                for (blame, detail) in failed {
                    count_crash(&shared.config, blame, &detail);
                }
                for (state, secs) in ended {
                    m.job_duration
                        .with_label_values(&[state.as_str()])
                        .observe(secs);
                }
                // A report whose events did not all go out is not acked:
                // redelivered, it is a duplicate, and they are sent again.
                let mut events_out = true;
                for (c, attempt, resources, leased_at, state) in crashes {
                    let lease = (attempt, resources.as_slice(), leased_at);
                    events_out &= act_on_classification(shared, &job, &c, lease, state).await;
                }
                for (r, res, change) in results {
                    match (res, change) {
                        ("applied", Some((from, to))) => {
                            m.reports
                                .with_label_values(&[r.kind.name(), "applied"])
                                .inc();
                            m.transitions
                                .with_label_values(&[from.as_str(), to.as_str()])
                                .inc();
                            debug!(job.id = %job_id, state = %to, "report applied");
                        }
                        ("duplicate" | "after_cancel", _) => {
                            m.reports.with_label_values(&[r.kind.name(), res]).inc()
                        }
                        (reason, _) => {
                            m.reports
                                .with_label_values(&[r.kind.name(), "rejected"])
                                .inc();
                            m.rejected.with_label_values(&[reason]).inc();
                            warn!(job.id = %job_id, bot.id = %r.bot_id, session = %r.session, epoch = r.epoch, reason, "report rejected");
                        }
                    }
                }
                if !events_out {
                    return Disposition::Retry;
                }
                return republish_crash_events(shared, &job, &duplicates, deliveries).await;
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(StoreError::TooLarge) => {
                warn!(job.id = %job_id, "job record would exceed the size limit; reports dropped");
                return Disposition::Ack;
            }
            Err(e) if e.is_transient() => return Disposition::Retry,
            Err(e) => {
                warn!(job.id = %job_id, error = %e, "cannot write job; reports dropped");
                return Disposition::Ack;
            }
        }
    }
    Disposition::Retry
}

/// How long one classification may take before the report is retried.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// After this many deliveries of a crash report without an answer from
/// the classifier, the crash is recorded unclassified (the task's own
/// fault if it declared one) rather than leave the job RUNNING forever.
const CLASSIFY_GIVE_UP: i64 = 20;

/// Asks the classifier about the crash in `r`; `None` when it did not
/// answer (the report is retried), a stand-in when it never will.
async fn classify(
    shared: &Shared,
    job: &warden_shared::Job,
    r: &Report,
    deliveries: i64,
) -> Option<Classification> {
    let ReportKind::Crashed { crash, fault } = &r.kind else {
        return None;
    };
    let req = ClassifyRequest {
        version: MESSAGE_VERSION,
        job_id: job.id,
        task: job.task.clone(),
        attempt: r.epoch,
        resource: job.lease.as_ref().and_then(|l| l.resource.clone()),
        crash: crash.clone(),
    };
    let m = metrics();
    let failure = match serde_json::to_vec(&req) {
        Err(e) => format!("cannot encode: {e}"),
        Ok(body) => {
            match tokio::time::timeout(
                CLASSIFY_TIMEOUT,
                shared.client.request(subjects::CLASSIFY, body.into()),
            )
            .await
            {
                Ok(Ok(msg)) => match serde_json::from_slice::<ClassifyReply>(&msg.payload) {
                    Ok(ClassifyReply {
                        classification: Some(c),
                        ..
                    }) => return Some(c),
                    Ok(ClassifyReply { error, .. }) => format!(
                        "classifier error: {}",
                        error.map(|e| e.message).unwrap_or_default()
                    ),
                    Err(e) => format!("bad classifier reply: {e}"),
                },
                Ok(Err(e)) => format!("classifier request failed: {e}"),
                Err(_) => "classifier did not answer in time".to_string(),
            }
        }
    };
    m.classify_failures.inc();
    if deliveries < CLASSIFY_GIVE_UP {
        debug!(job.id = %job.id, deliveries, failure, "crash not classified yet; will retry");
        return None;
    }
    warn!(job.id = %job.id, deliveries, failure, "classifier unavailable; crash recorded without classification");
    let (blame, detail, mut description) = apply::unclassified(crash, fault.as_ref());
    if fault.is_none() {
        description.push_str(" (the classifier did not answer)");
    }
    Some(Classification {
        blame,
        detail,
        description,
        rule: "classifier_unavailable".into(),
        notify: Party::Operators,
        suspect_resource: false,
    })
}

/// After a classified crash is written: tell the party the catalogue names
/// and flag every resource the attempt ran on when they may be at fault. Both are durable
/// publishes with a message id per attempt, so a retried write never
/// notifies twice; a failed publish is logged and counted, the crash stays
/// recorded, and false is returned (the report is then not acked).
async fn act_on_classification(
    shared: &Shared,
    job: &warden_shared::Job,
    c: &Classification,
    (attempt, resources, leased_at): (u32, &[String], Option<chrono::DateTime<Utc>>),
    state: JobState,
) -> bool {
    let m = metrics();
    let resource = resources.first().cloned();
    let mut all = true;
    let now = Utc::now();
    if c.notify != Party::None {
        let recipients = match c.notify {
            Party::Owners => shared
                .config
                .tasks
                .get(&job.task)
                .map(|t| t.owners.clone())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let n = Notification {
            version: MESSAGE_VERSION,
            party: c.notify,
            recipients,
            job_id: job.id,
            task: job.task.clone(),
            attempt,
            blame: c.blame,
            detail: c.detail.clone(),
            description: c.description.clone(),
            state,
            resource: resource.clone(),
            links: vec![
                format!("/api/v1/jobs/{}", job.id),
                format!("warden job show {}", job.id),
            ],
            at: now,
        };
        let id = format!("{}:{attempt}:notify", job.id);
        let ok = publish_durable(shared, subjects::notify_subject(c.notify), &id, &n).await;
        all &= ok;
        m.notifications
            .with_label_values(&[c.notify.as_str(), if ok { "published" } else { "failed" }])
            .inc();
    }
    if !c.suspect_resource {
        return all;
    }
    for resource in resources {
        let s = ResourceSuspect {
            version: MESSAGE_VERSION,
            resource: resource.clone(),
            job_id: job.id,
            attempt,
            detail: c.detail.clone(),
            leased_at,
            at: now,
        };
        let id = format!("{}:{attempt}:suspect:{resource}", job.id);
        if publish_durable(shared, subjects::suspect_subject(resource), &id, &s).await {
            m.suspects.inc();
        } else {
            all = false;
        }
    }
    all
}

/// Publishes again the events of every crash in `reports` that is already
/// recorded on `job` (a redelivered report: the first publish may have
/// failed, or the scheduler stopped between the write and the publish).
/// The events carry a message id per attempt, so a copy that did go out is
/// dropped by the stream. Retry (nak) unless every event went out.
async fn republish_crash_events(
    shared: &Shared,
    job: &warden_shared::Job,
    reports: &[&Report],
    deliveries: i64,
) -> Disposition {
    for r in reports {
        let Some(crash) = apply::applied_crash(job, r) else {
            continue;
        };
        let Some(c) = classify(shared, job, r, deliveries).await else {
            return Disposition::Retry;
        };
        let lease = (
            r.epoch,
            crash.resources.as_slice(),
            apply::leased_at(job, r.epoch),
        );
        if !act_on_classification(shared, job, &c, lease, job.state).await {
            return Disposition::Retry;
        }
        debug!(job.id = %job.id, epoch = r.epoch, "events of a redelivered crash published again");
    }
    Disposition::Ack
}

async fn publish_durable<T: serde::Serialize>(
    shared: &Shared,
    subject: String,
    msg_id: &str,
    body: &T,
) -> bool {
    match runtime::publish_with_id(&shared.js, subject.clone(), msg_id, body).await {
        Ok(()) => true,
        Err(e) => {
            warn!(subject, error = %e, "durable publish failed");
            false
        }
    }
}

async fn dead_letter_report(shared: &Shared, msg: jetstream::Message, err: serde_json::Error) {
    metrics().invalid_reports.inc();
    warn!(subject = %msg.subject, error = %err, "undecodable report dead-lettered");
    let subject = msg.subject.to_string();
    let error = err.to_string();
    match runtime::dead_letter(
        &shared.js,
        "scheduler",
        INVALID_REPORT,
        &subject,
        &error,
        &msg.payload,
    )
    .await
    {
        Ok(()) => {
            metrics()
                .dead_letters
                .with_label_values(&[INVALID_REPORT])
                .inc();
            let _ = msg.ack().await;
        }
        Err(e) => warn!(error = %e, "cannot dead-letter report; will be redelivered"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(session: &str, bot: &str) -> AcquireRequest {
        AcquireRequest {
            version: MESSAGE_VERSION,
            session: session.into(),
            bot_id: bot.into(),
            resource: None,
            resources: Vec::new(),
            pools: vec!["default".into()],
            max: 1,
            wait_ms: 0,
        }
    }

    #[test]
    fn only_an_active_session_of_the_requesting_bot_is_served() {
        let r = req("s1", "bot-a");
        assert_eq!(
            session_verdict(&r, Some((SessionState::Active, "bot-a"))),
            Ok(())
        );
        let code = |known| session_verdict(&r, known).map_err(|(c, _)| c);
        assert_eq!(code(None), Err(UNKNOWN_SESSION));
        assert_eq!(
            code(Some((SessionState::Active, "bot-b"))),
            Err(UNKNOWN_SESSION)
        );
        assert_eq!(
            code(Some((SessionState::Quarantined, "bot-a"))),
            Err(SESSION_SUPERSEDED)
        );
        assert_eq!(
            code(Some((SessionState::Expired, "bot-a"))),
            Err(UNKNOWN_SESSION)
        );
        assert_eq!(
            code(Some((SessionState::Closed, "bot-a"))),
            Err(UNKNOWN_SESSION)
        );
    }
}

#[cfg(test)]
mod orphan_tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    #[test]
    fn a_lease_is_undelivered_only_after_a_late_heartbeat_without_it() {
        let job = Uuid::from_u128(1);
        let grace = Duration::from_secs(5);
        // No heartbeat since: proves nothing.
        assert!(!undelivered(at(0), 1, job, None, grace));
        // A heartbeat within the grace may predate the grant's arrival.
        assert!(!undelivered(at(0), 1, job, Some(&(at(4), vec![])), grace));
        // Later and without it: never delivered.
        assert!(undelivered(at(0), 1, job, Some(&(at(6), vec![])), grace));
        // Later and listing it: held.
        assert!(!undelivered(
            at(0),
            1,
            job,
            Some(&(at(6), vec![(job, 1)])),
            grace
        ));
        // Listing an older attempt of the job is not this one.
        assert!(undelivered(
            at(0),
            2,
            job,
            Some(&(at(6), vec![(job, 1)])),
            grace
        ));
    }

    #[test]
    fn orphans_are_dead_sessions_closed_resources_and_undelivered_leases() {
        let mut l = LeaseIndex::default();
        let mut add = |n: u128, session: &str, resource: &str| {
            let id = Uuid::from_u128(n);
            l.session_of.insert(id, session.to_string());
            l.resources_of.insert(id, vec![resource.to_string()]);
            l.leased.insert(id, (1, at(0)));
        };
        add(1, "dead", "r1");
        add(2, "live", "closed");
        add(3, "live", "r1");
        add(4, "live", "r1");
        l.states.insert("dead".into(), SessionState::Expired);
        l.states.insert("live".into(), SessionState::Active);
        l.resource_states
            .insert("closed".into(), ResourceState::Closed);
        l.heartbeats
            .insert("live".into(), (at(10), vec![(Uuid::from_u128(4), 1)]));
        let mut found: Vec<(u128, &str)> = l
            .orphans(Duration::from_secs(5))
            .into_iter()
            .map(|o| (o.job.as_u128(), o.reason))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                (1, WORKER_LOST),
                (2, RESOURCE_CLOSED),
                (3, LEASE_UNDELIVERED)
            ]
        );
    }
}
