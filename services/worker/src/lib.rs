//! `warden-worker`: the agent on a build host (a "bot").
//!
//! It holds a session with the fencing service, long-polls the scheduler
//! for leases, runs each attempt with an [`Executor`], and publishes
//! reports durably (JetStream, de-duplicated by `job:epoch:kind`). When its
//! session is rejected, or it cannot heartbeat for longer than the session
//! timeout, it kills what it runs: those attempts belong to someone else
//! by now. On SIGTERM it lets running attempts finish within
//! `worker.shutdown_grace`, then hands the rest back.

pub mod checks;
pub mod exec;
pub use warden_shared::self_fence as fencing;
pub mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use thiserror::Error;
use tokio::sync::{RwLock, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;
use warden_shared::config::WorkerConfig;
use warden_shared::error::ErrorCode;
use warden_shared::messages::CheckRequest;
use warden_shared::messages::{
    AcquireReply, AcquireRequest, CloseSession, CreateSession, Heartbeat, HeldLease, LeaseGrant,
    Report, ReportKind, SessionReply, StopReason, MESSAGE_VERSION,
};
use warden_shared::resource::ResourceDecl;
use warden_shared::{runtime, subjects, Config};

pub use exec::{ExecFuture, ExecRequest, Execution, Executor, NoopExecutor, ProcessExecutor};
use metrics::metrics;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error(transparent)]
    TaskUser(#[from] warden_shared::task_env::TaskUserError),
}

/// The worker's command-line flags, for `warden-worker` and `warden
/// worker` alike; each one given overrides `[worker]` of the config.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WorkerArgs {
    #[arg(long)]
    pub bot_id: Option<String>,
    /// Pool to serve, repeatable
    #[arg(long = "pool")]
    pub pools: Vec<String>,
    #[arg(long)]
    pub resource: Option<String>,
    #[arg(long)]
    pub capacity: Option<u32>,
}

impl WorkerArgs {
    /// Overrides what was given in `w`.
    pub fn apply(self, w: &mut WorkerConfig) {
        if let Some(b) = self.bot_id {
            w.bot_id = b;
        }
        if !self.pools.is_empty() {
            w.pools = self.pools;
        }
        if let Some(r) = self.resource {
            w.resource = r;
        }
        if let Some(c) = self.capacity {
            w.capacity = c;
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

struct Running {
    epoch: u32,
    cancel: CancellationToken,
    /// Why Warden stopped it, if it did: the attempt then ends with a
    /// `stopped` report saying so, never as the task's crash.
    stop: Option<StopReason>,
}

struct Agent {
    config: Arc<Config>,
    client: async_nats::Client,
    js: jetstream::Context,
    executor: Arc<dyn Executor>,
    bot_id: String,
    resource: String,
    /// Every resource this agent runs on, its host first.
    resources: Vec<ResourceDecl>,
    /// New at every start: tells the health service this is a new agent.
    agent_instance: String,
    session: RwLock<String>,
    // A std mutex: nothing awaits while it is held.
    running: Mutex<HashMap<Uuid, Running>>,
    slots: Arc<Semaphore>,
    /// Set when the session must be replaced; the heartbeat loop does it.
    fenced: tokio::sync::Notify,
    /// Why (superseded or unknown), said by whoever notified `fenced`.
    /// The session it is about: a request about a session already
    /// replaced is stale (both the watchdog and a refused acquire may ask
    /// about one dead session; it is replaced once).
    fence_reason: Mutex<Option<(String, StopReason)>>,
    /// When the last heartbeat (or session create) that the fencing
    /// service answered was *sent*, and whether this stretch of silence
    /// has fenced already: the watchdog's input.
    contact: Mutex<Contact>,
}

#[derive(Debug, Clone, Copy)]
struct Contact {
    last_ok_sent: Instant,
    fenced: bool,
}

pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let executor = Arc::new(ProcessExecutor::new(config.clone())?);
    run_with(config, executor, shutdown).await
}

pub async fn run_with(
    config: Arc<Config>,
    executor: Arc<dyn Executor>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    metrics::init();
    let bot_id = if config.worker.bot_id.is_empty() {
        format!("{}-{}", hostname(), std::process::id())
    } else {
        config.worker.bot_id.clone()
    };
    let client = runtime::Connect::new(&config, "worker")
        .bot(&bot_id)
        .client()
        .await?;
    let resource = if config.worker.resource.is_empty() {
        hostname()
    } else {
        config.worker.resource.clone()
    };
    let resources = declared_resources(&config.worker, &resource);
    let agent = Arc::new(Agent {
        js: jetstream::new(client.clone()),
        client: client.clone(),
        executor,
        bot_id,
        resource,
        resources,
        agent_instance: Uuid::new_v4().to_string(),
        session: RwLock::new(String::new()),
        running: Mutex::new(HashMap::new()),
        slots: Arc::new(Semaphore::new(config.worker.capacity as usize)),
        fenced: tokio::sync::Notify::new(),
        fence_reason: Mutex::new(None),
        contact: Mutex::new(Contact {
            last_ok_sent: Instant::now(),
            fenced: false,
        }),
        config,
    });
    // Answer health checks before the resources are registered, so the
    // first check can never find nobody listening.
    let checks = match agent
        .client
        .subscribe(subjects::agent_check_subject(&agent.bot_id))
        .await
    {
        Ok(sub) => Some(tokio::spawn(
            agent.clone().check_loop(sub, shutdown.clone()),
        )),
        Err(e) => {
            warn!(error = %e, "cannot answer health checks; they will fail");
            None
        }
    };
    let Some(name) = agent.create_session(&shutdown).await else {
        return Ok(());
    };
    *agent.session.write().await = name;

    let attempts = TaskTracker::new();
    let heartbeat = tokio::spawn(agent.clone().heartbeat_loop(shutdown.clone()));
    let watchdog = tokio::spawn(agent.clone().silence_watchdog(shutdown.clone()));
    agent
        .clone()
        .acquire_loop(attempts.clone(), shutdown.clone())
        .await;

    // Shutdown: let running attempts finish within the grace period, then
    // stop the rest and hand them back.
    attempts.close();
    let grace = agent.config.worker.shutdown_grace;
    if tokio::time::timeout(grace, attempts.wait()).await.is_err() {
        let n = agent.stop_all(StopReason::Shutdown);
        info!(
            attempts = n,
            "handing back attempts still running after the grace period"
        );
        attempts.wait().await;
    }
    heartbeat.abort();
    watchdog.abort();
    if let Some(mut c) = checks {
        // Checks in flight get their answer (the loop stopped taking new
        // ones at shutdown), for at most one check timeout.
        let wait = agent.config.health.check_timeout;
        if tokio::time::timeout(wait, &mut c).await.is_err() {
            c.abort();
        }
    }
    let session = agent.session.read().await.clone();
    let close = CloseSession {
        version: MESSAGE_VERSION,
        session,
    };
    if let Ok(body) = serde_json::to_vec(&close) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            agent
                .client
                .request(subjects::session_close_subject(&agent.bot_id), body.into()),
        )
        .await;
    }
    warden_shared::runtime::flush(&agent.client).await;
    info!(bot.id = %agent.bot_id, "worker stopped");
    Ok(())
}

/// The host (kind `host`, path: where tasks run) and the configured
/// resources on it, each depending on the host unless it says otherwise.
fn declared_resources(w: &WorkerConfig, host: &str) -> Vec<ResourceDecl> {
    let host_path = if w.work_dir.is_empty() {
        std::env::temp_dir().display().to_string()
    } else {
        w.work_dir.clone()
    };
    let mut all = vec![ResourceDecl {
        name: host.to_string(),
        kind: "host".into(),
        path: Some(host_path),
        depends_on: None,
    }];
    for r in &w.resources {
        let mut r = r.clone();
        if r.depends_on.is_none() {
            r.depends_on = Some(host.to_string());
        }
        all.push(r);
    }
    all
}

impl Agent {
    /// Runs the configured checks of a resource when the health service
    /// asks; each request in its own task, so a slow check holds nothing.
    /// On shutdown it takes no more requests and answers those taken.
    async fn check_loop(self: Arc<Self>, sub: async_nats::Subscriber, shutdown: CancellationToken) {
        use warden_shared::serve::{serve, subscription, Reply};
        let requests = subscription(self.client.clone(), sub);
        serve("health check", requests, &shutdown, move |msg| {
            let agent = self.clone();
            async move {
                if msg.reply.is_none() {
                    return Reply::default();
                }
                Reply::json(&agent.check(&msg.payload).await)
            }
        })
        .await
    }

    /// The answer to one check request.
    async fn check(&self, payload: &[u8]) -> warden_shared::messages::CheckReply {
        match serde_json::from_slice::<CheckRequest>(payload) {
            Ok(req) => match self.resources.iter().find(|r| r.name == req.resource) {
                Some(decl) => {
                    let specs = self
                        .config
                        .health
                        .checks
                        .get(&decl.kind)
                        .cloned()
                        .unwrap_or_default();
                    let r = checks::run_all(&specs, decl, self.config.health.check_timeout).await;
                    info!(resource = %decl.name, passed = r.passed, "health check run");
                    metrics()
                        .checks
                        .with_label_values(&[if r.passed { "passed" } else { "failed" }])
                        .inc();
                    r
                }
                None => checks::unknown_resource(&req.resource),
            },
            Err(e) => {
                let mut r = checks::unknown_resource("");
                r.error = Some(warden_shared::messages::ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!("cannot decode check request: {e}"),
                ));
                r
            }
        }
    }

    /// Creates a session, retrying until it works or `shutdown`.
    async fn create_session(&self, shutdown: &CancellationToken) -> Option<String> {
        let req = CreateSession {
            version: MESSAGE_VERSION,
            bot_id: self.bot_id.clone(),
            resource: Some(self.resource.clone()),
            resources: self.resources.clone(),
            agent_instance: self.agent_instance.clone(),
            pools: self.config.worker.pools.clone(),
            capacity: self.config.worker.capacity,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            timeout_ms: None,
        };
        let body = serde_json::to_vec(&req).ok()?;
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let sent = Instant::now();
            let res = tokio::time::timeout(
                Duration::from_secs(5),
                self.client.request(
                    subjects::session_create_subject(&self.bot_id),
                    body.clone().into(),
                ),
            )
            .await;
            match res {
                Ok(Ok(msg)) => match serde_json::from_slice::<SessionReply>(&msg.payload) {
                    Ok(SessionReply {
                        session: Some(name),
                        ..
                    }) => {
                        info!(bot.id = %self.bot_id, session = %name, "session created");
                        self.heard_back(sent);
                        return Some(name);
                    }
                    Ok(r) => warn!(error = ?r.error, "session refused"),
                    Err(e) => warn!(error = %e, "bad session reply"),
                },
                Ok(Err(e)) => debug!(error = %e, "fencing service not reachable"),
                Err(_) => debug!("session request timed out"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// The fencing service answered a request sent at `sent`.
    fn heard_back(&self, sent: Instant) {
        let mut c = self.contact.lock().unwrap_or_else(|p| p.into_inner());
        if sent >= c.last_ok_sent {
            *c = Contact {
                last_ok_sent: sent,
                fenced: false,
            };
        }
    }

    /// How long since the last answered request to the fencing service
    /// was sent.
    fn silence(&self) -> Duration {
        self.contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_ok_sent
            .elapsed()
    }

    /// Stops every attempt once the fencing service has not answered for
    /// [`fencing::self_fence_after`] of the session timeout, on a timer of
    /// its own: a heartbeat waiting for its answer does not delay it. Then
    /// the heartbeat loop replaces the session.
    async fn silence_watchdog(self: Arc<Self>, shutdown: CancellationToken) {
        let timeout = self.config.fencing.session_timeout;
        let tick = fencing::watchdog_tick(timeout);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let due = {
                let mut c = self.contact.lock().unwrap_or_else(|p| p.into_inner());
                let due = !c.fenced && fencing::fence_due(c.last_ok_sent.elapsed(), timeout);
                if due {
                    c.fenced = true;
                }
                due
            };
            if !due || self.held().is_empty() {
                continue;
            }
            warn!(bot.id = %self.bot_id, silent_ms = self.silence().as_millis() as u64, "the fencing service has not answered for most of the session timeout; stopping own tasks before the session can expire");
            metrics()
                .session_resets
                .with_label_values(&[metrics::SELF_FENCED])
                .inc();
            self.stop_all(StopReason::SelfFenced);
            let session = self.session.read().await.clone();
            *self.fence_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((session, StopReason::SelfFenced));
            self.fenced.notify_one();
        }
    }

    /// Heartbeats; replaces the session when it is rejected or the
    /// watchdog fenced it.
    async fn heartbeat_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let timeout = self.config.fencing.session_timeout;
        let period = timeout / 3;
        let mut need_new: Option<StopReason> = None;
        // Heartbeats in a row that were not recorded (store unavailable,
        // no answer): the next one goes soon, not a full period later, so
        // it lands as soon as the store is back.
        let mut failed: u32 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(heartbeat_delay(period, failed)) => {}
                _ = self.fenced.notified() => {
                    let asked = self
                        .fence_reason
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    let current = self.session.read().await.clone();
                    match asked {
                        Some((session, why)) if session == current => {
                            need_new.get_or_insert(why);
                        }
                        // About a session this loop replaced already.
                        _ => continue,
                    }
                }
            }
            if let Some(why) = need_new {
                // The old session is given up before the new one is asked
                // for: a grant to it that arrives meanwhile (an acquire
                // sent under it, answered late) is then not this worker's
                // (`acquire_loop` compares), even in the moment between
                // the fencing service recording the new session and this
                // worker hearing of it.
                self.session.write().await.clear();
                self.stop_all(why);
                if let Some(name) = self.create_session(&shutdown).await {
                    *self.session.write().await = name;
                    need_new = None;
                }
                continue;
            }
            let hb = Heartbeat {
                version: MESSAGE_VERSION,
                session: self.session.read().await.clone(),
                leases: self.held(),
            };
            let Ok(body) = serde_json::to_vec(&hb) else {
                continue;
            };
            let sent = Instant::now();
            match tokio::time::timeout(
                fencing::heartbeat_timeout(timeout),
                self.client.request(
                    subjects::session_heartbeat_subject(&self.bot_id),
                    body.into(),
                ),
            )
            .await
            {
                Ok(Ok(msg)) => match serde_json::from_slice::<SessionReply>(&msg.payload) {
                    Ok(reply) => match reply.error {
                        Some(e)
                            if matches!(
                                e.code,
                                ErrorCode::UnknownSession | ErrorCode::SessionSuperseded
                            ) =>
                        {
                            warn!(bot.id = %self.bot_id, code = %e.code, "session rejected; abandoning its work");
                            metrics()
                                .session_resets
                                .with_label_values(&[e.code.as_str()])
                                .inc();
                            need_new = Some(if e.code == ErrorCode::UnknownSession {
                                StopReason::UnknownSession
                            } else {
                                StopReason::Superseded
                            });
                        }
                        Some(e) => {
                            failed += 1;
                            debug!(code = %e.code, failed, "heartbeat not recorded; retrying soon")
                        }
                        None => {
                            failed = 0;
                            self.heard_back(sent);
                            for id in reply.cancel {
                                self.stop_one(&id, StopReason::Cancelled);
                            }
                        }
                    },
                    Err(e) => {
                        failed += 1;
                        debug!(error = %e, "bad heartbeat reply")
                    }
                },
                _ => {
                    failed += 1;
                    debug!(failed, "heartbeat not answered")
                }
            }
        }
    }

    fn held(&self) -> Vec<HeldLease> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .map(|(id, r)| HeldLease {
                job_id: *id,
                epoch: r.epoch,
            })
            .collect()
    }

    fn stop_one(&self, id: &Uuid, why: StopReason) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = running.get_mut(id) {
            r.stop.get_or_insert(why);
            r.cancel.cancel();
        }
    }

    fn stop_all(&self, why: StopReason) -> usize {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for r in running.values_mut() {
            r.stop.get_or_insert(why);
            r.cancel.cancel();
        }
        running.len()
    }

    async fn acquire_loop(self: Arc<Self>, attempts: TaskTracker, shutdown: CancellationToken) {
        let wait = self.config.worker.acquire_wait;
        let capacity = self.config.worker.capacity as usize;
        let mut unavailable = false;
        loop {
            // Wait for one free slot, then take every other free one.
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let mut permits = vec![first];
            while permits.len() < capacity {
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            // No session while one is being replaced: nothing to ask under.
            if self.session.read().await.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            // No new work while the fencing service is not answering: the
            // session may be about to expire, and the watchdog would stop
            // the task at once.
            if !fencing::may_acquire(self.silence(), self.config.fencing.session_timeout) {
                drop(permits);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            let req = AcquireRequest {
                version: MESSAGE_VERSION,
                session: self.session.read().await.clone(),
                bot_id: self.bot_id.clone(),
                resource: Some(self.resource.clone()),
                resources: self.resources.iter().map(|r| r.name.clone()).collect(),
                pools: self.config.worker.pools.clone(),
                max: permits.len() as u32,
                wait_ms: wait.as_millis() as u64,
            };
            let Ok(body) = serde_json::to_vec(&req) else {
                return;
            };
            let res = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(wait + Duration::from_secs(2), self.client.request(subjects::acquire_subject(&self.bot_id), body.into())) => r,
            };
            let reply = match res {
                Ok(Ok(msg)) => serde_json::from_slice::<AcquireReply>(&msg.payload).ok(),
                _ => None,
            };
            let Some(reply) = reply else {
                drop(permits);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            };
            if let Some(e) = &reply.error {
                if e.code == ErrorCode::ResourceUnavailable {
                    // Not an error of ours: a resource is being checked or
                    // was recycled. The scheduler held the request; ask
                    // again, saying so once per stretch.
                    if !unavailable {
                        info!(bot.id = %self.bot_id, reason = %e.message, "no leases while a resource is not open");
                        unavailable = true;
                    }
                    metrics().acquire_unavailable.inc();
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
                if matches!(
                    e.code,
                    ErrorCode::UnknownSession | ErrorCode::SessionSuperseded
                ) {
                    *self.fence_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                        req.session.clone(),
                        if e.code == ErrorCode::UnknownSession {
                            StopReason::UnknownSession
                        } else {
                            StopReason::Superseded
                        },
                    ));
                    self.fenced.notify_one();
                }
                warn!(code = %e.code, error = %e.message, "acquire refused");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if unavailable {
                info!(bot.id = %self.bot_id, "resources open again; taking leases");
                unavailable = false;
            }
            // Leases granted to a session this worker has since replaced
            // (it fenced itself, or was superseded, while the request was
            // in flight) are not its own: the scheduler takes them back
            // when it sees that session gone, and may lease the job again
            // at once. Running one would run the job twice.
            if *self.session.read().await != req.session {
                for lease in &reply.leases {
                    metrics().stale_grants.inc();
                    warn!(job.id = %lease.job_id, epoch = lease.epoch, session = %req.session, "lease granted to a replaced session; not running it");
                }
                continue;
            }
            for lease in reply.leases {
                let Some(permit) = permits.pop() else {
                    // The scheduler sent more than asked: run it anyway
                    // rather than strand a RUNNING lease.
                    warn!(job.id = %lease.job_id, "more leases than requested");
                    attempts.spawn(self.clone().attempt(lease, req.session.clone(), None));
                    continue;
                };
                attempts.spawn(
                    self.clone()
                        .attempt(lease, req.session.clone(), Some(permit)),
                );
            }
        }
    }

    /// Runs `lease`, granted to `session`: its reports name that session,
    /// the one the scheduler fences them against.
    async fn attempt(
        self: Arc<Self>,
        lease: LeaseGrant,
        session: String,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let _permit = permit;
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                lease.job_id,
                Running {
                    epoch: lease.epoch,
                    cancel: cancel.clone(),
                    stop: None,
                },
            );
        let m = metrics();
        m.running.inc();
        let bot_id = self.bot_id.clone();
        let report = |kind| Report {
            version: MESSAGE_VERSION,
            job_id: lease.job_id,
            session: session.clone(),
            bot_id: bot_id.clone(),
            epoch: lease.epoch,
            at: Utc::now(),
            // The lease's secret: only this attempt has it; the scheduler
            // hears no report without it, and it makes the de-duplication
            // id one nobody else can publish first.
            secret: lease.secret.clone(),
            kind,
        };
        debug!(job.id = %lease.job_id, epoch = lease.epoch, task = %lease.task, "attempt starting");
        // Started goes out without waiting for its ack: the same connection
        // keeps it ahead of the final report.
        let started = self.clone().publish(report(ReportKind::Started {
            resource: Some(self.resource.clone()),
        }));
        let started = tokio::spawn(started);
        let req = ExecRequest {
            job_id: lease.job_id,
            epoch: lease.epoch,
            task: lease.task.clone(),
            args: lease.args.clone(),
        };
        let t0 = Instant::now();
        let result = self.executor.execute(req, cancel.clone()).await;
        m.duration.observe(t0.elapsed().as_secs_f64());
        // The lease stays listed in heartbeats until its final report is
        // acknowledged: a finished attempt whose report waits for the bus
        // is still this session's, not a grant that never arrived (which
        // the scheduler would take back, throwing the work away).
        let stop = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lease.job_id)
            .and_then(|r| r.stop);
        m.running.dec();
        let _ = started.await;
        #[cfg(feature = "chaos-fenced-as-crash")]
        let (stop, result) = broken::fenced_as_crash(stop, result);
        let kind = match (stop, result) {
            // Warden stopped it, not the task: say why, so the scheduler
            // never records the kill as the task's crash. If the attempt is
            // no longer ours the scheduler rejects it by epoch and records
            // it, which shows operators a stale bot was alive.
            (Some(reason), result) => {
                let (label, words) = match reason {
                    StopReason::Shutdown => ("released", "handed back on shutdown"),
                    _ => (
                        "abandoned",
                        "the lease is no longer ours (cancelled, taken back, the session was replaced, or the bus was lost past the session timeout)",
                    ),
                };
                m.attempts.with_label_values(&[label]).inc();
                let ended = match &result {
                    Execution::Finished { outcome, .. } => format!("outcome {outcome}"),
                    Execution::Crashed { crash, .. } => {
                        format!("exit code {:?}, signal {:?}", crash.exit_code, crash.signal)
                    }
                    Execution::Fenced { .. } => "killed by its guard".to_string(),
                };
                info!(job.id = %lease.job_id, epoch = lease.epoch, reason = %reason, ended, "attempt stopped: {words}");
                ReportKind::Stopped { reason }
            }
            (
                None,
                Execution::Finished {
                    outcome,
                    duration_ms,
                },
            ) => {
                m.attempts.with_label_values(&["finished"]).inc();
                ReportKind::Finished {
                    outcome,
                    duration_ms,
                }
            }
            (None, Execution::Crashed { crash, fault }) => {
                m.attempts.with_label_values(&["crashed"]).inc();
                ReportKind::Crashed { crash, fault }
            }
            // This worker was frozen past its guard's limit: the guard
            // killed the task so it could not outlive the lease.
            (None, Execution::Fenced { duration_ms }) => {
                m.attempts.with_label_values(&["abandoned"]).inc();
                warn!(job.id = %lease.job_id, epoch = lease.epoch, duration_ms, "task killed by its guard: this worker sent no keep-alive within the limit (frozen or starved)");
                ReportKind::Stopped {
                    reason: StopReason::SelfFenced,
                }
            }
        };
        self.clone().publish(report(kind)).await;
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease.job_id);
    }

    /// Publishes a report and waits for the bus to acknowledge it,
    /// retrying with backoff: a report is never dropped silently.
    async fn publish(self: Arc<Self>, report: Report) {
        let Ok(body) = serde_json::to_vec(&report) else {
            return;
        };
        let subject = subjects::bot_report_subject(&report.bot_id, &report.job_id);
        let msg_id = report.msg_id();
        let kind = report.kind.name();
        let give_up = Instant::now() + Duration::from_secs(3600);
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            let res = match self
                .js
                .publish_with_headers(subject.clone(), headers, body.clone().into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    metrics().reports.with_label_values(&[kind]).inc();
                    return;
                }
                Err(e) if Instant::now() > give_up => {
                    warn!(job.id = %report.job_id, kind, error = %e, "giving up on a report after an hour");
                    return;
                }
                Err(e) => {
                    metrics().report_retries.inc();
                    debug!(job.id = %report.job_id, kind, error = %e, "report not acknowledged; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// First retry after a heartbeat that was not recorded.
const HEARTBEAT_RETRY: Duration = Duration::from_millis(500);

/// The deliberately broken build of the chaos run's "shown to fail" check.
#[cfg(feature = "chaos-fenced-as-crash")]
mod broken {
    use super::{Execution, StopReason};
    use warden_shared::job::CrashInfo;

    /// A self-fencing kill reported as what the task's process saw: a
    /// SIGKILL crash (the defect the Stopped report fixed).
    pub fn fenced_as_crash(
        stop: Option<StopReason>,
        result: Execution,
    ) -> (Option<StopReason>, Execution) {
        match (stop, result) {
            (Some(StopReason::SelfFenced), _) | (None, Execution::Fenced { .. }) => (
                None,
                Execution::Crashed {
                    crash: CrashInfo {
                        signal: Some(9),
                        ..Default::default()
                    },
                    fault: None,
                },
            ),
            other => other,
        }
    }
}

/// How long to wait before the next heartbeat after `failed` heartbeats in
/// a row were not recorded: `period` when the last one was, else 500 ms
/// doubling with each failure, never more than `period`.
fn heartbeat_delay(period: Duration, failed: u32) -> Duration {
    if failed == 0 {
        return period;
    }
    let factor = 1u32 << (failed - 1).min(16);
    HEARTBEAT_RETRY.saturating_mul(factor).min(period)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_heartbeat_not_recorded_is_retried_soon_then_slower_up_to_the_period() {
        let period = Duration::from_secs(10);
        let d: Vec<u64> = (0..7)
            .map(|f| super::heartbeat_delay(period, f).as_millis() as u64)
            .collect();
        assert_eq!(d, [10_000, 500, 1000, 2000, 4000, 8000, 10_000]);
        assert_eq!(
            super::heartbeat_delay(Duration::from_millis(300), 1),
            Duration::from_millis(300)
        );
        assert_eq!(super::heartbeat_delay(period, 40), period);
    }
}
