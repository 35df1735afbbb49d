//! `warden-health`: owns resources and their health (DESIGN.md "Resources
//! and health"; Phabricator Drydock's rule: check after failure, not
//! before every use).
//!
//! - **registration**: follows `warden_sessions`; the resources an active
//!   session declares are registered (on a closed one the session is
//!   noted, and the periodic pass checks it on that agent: see returning).
//!   A resource whose last session
//!   *expired* vanished: it is broken, as if its check failed. Fencing
//!   expires sessions only for silence it could see (its grace rule), so a
//!   bus outage does not break every resource at once.
//! - **suspicion**: consumes `warden.resource.suspect.*` (published by the
//!   scheduler after a crash the catalogue marks `suspect_resource`): open
//!   → suspicious. Suspected again soon after passing a check, it waits a
//!   back-off before its check; `flap_limit` suspicions within the window
//!   break it outright.
//! - **checks**: a suspicious resource is claimed by one replica (a
//!   compare-and-set on the record) and checked by the agent on it, in its
//!   own task; pass → open, fail or no answer in `check_timeout` → broken.
//! - **recycling**: a broken resource gets a recycle event (durable, one
//!   per incarnation) and is closed, then everything that depends on it.
//!   The scheduler takes back the leases of closed resources.
//! - **returning**: a closed resource with an active session (not closed
//!   by hand, its dependency open) is checked on its agent; pass → open
//!   as a new incarnation, fail → closed, checked again after a growing
//!   back-off. Closed by hand: only an operator's check reopens it.
//!
//! Every write is a compare-and-set on the record's revision, re-read and
//! retried when another writer won, so replicas can run side by side.

mod metrics;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, kv};
use async_nats::service::ServiceExt;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;
use warden_shared::config::HealthConfig;
use warden_shared::messages::{
    CheckReply, CheckRequest, ErrorBody, HealthReply, HealthRequest, ResourceRecycle,
    ResourceSuspect, MESSAGE_VERSION,
};
use warden_shared::resource::{
    reason, resource_key, CheckRecord, PendingCheck, Resource, ResourceDecl, ResourceSession,
    ResourceState,
};
use warden_shared::session::{Session, SessionState};
use warden_shared::{runtime, subjects, Config};

use crate::metrics::metrics;

#[derive(Debug, Error)]
pub enum HealthError {
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

fn setup<E: Into<async_nats::Error>>(what: &'static str) -> impl FnOnce(E) -> HealthError {
    move |e| HealthError::Setup {
        what,
        source: e.into(),
    }
}

/// Why an operation on a resource did not happen.
#[derive(Debug, Error)]
enum OpError {
    #[error("no resource named {0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("resource store: {0}")]
    Store(String),
}

impl OpError {
    fn body(&self) -> ErrorBody {
        let code = match self {
            OpError::NotFound(_) => "not_found",
            OpError::Refused(_) => "illegal_transition",
            OpError::Store(_) => "unavailable",
        };
        ErrorBody::new(code, self.to_string())
    }
}

/// Why a check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// A suspicious resource's check, by the periodic pass.
    Suspicion,
    /// A closed resource whose agent is alive, by the periodic pass: pass
    /// opens it as a new incarnation.
    Return,
    /// An operator asked (`warden resource check`).
    Manual,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Suspicion => "suspicion",
            Trigger::Return => "return",
            Trigger::Manual => "manual",
        }
    }
}

/// How long a closed resource waits before its next return check (`None`:
/// it does not come back by itself). One closed by hand never; after
/// vanishing or with what it depends on, at once (its agent only went
/// silent); after failing a check itself or flapping, `recheck_backoff`;
/// each failed return check doubles the wait, capped at `flap_window`.
fn return_wait(closed_for: Option<&str>, failed: u32, cfg: &HealthConfig) -> Option<Duration> {
    if closed_for == Some(reason::MANUAL) {
        return None;
    }
    let cap = cfg.flap_window.max(cfg.recheck_backoff);
    let wait = match (failed, closed_for) {
        (0, None | Some(reason::VANISHED) | Some(reason::DEPENDENCY)) => Duration::ZERO,
        (0, _) => cfg.recheck_backoff,
        (n, _) => cfg.recheck_backoff.saturating_mul(1 << (n - 1).min(16)),
    };
    Some(wait.min(cap))
}

/// What a check came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Timeout,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
        }
    }
}

pub struct Health {
    config: Arc<Config>,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: kv::Store,
    /// This replica, in check claims.
    id: String,
    /// Every resource, from a watch of the bucket.
    cache: Mutex<BTreeMap<String, Resource>>,
    /// Checks and recycles this replica has under way.
    busy: Mutex<HashSet<String>>,
    /// (session, resource) pairs registered since this replica started:
    /// heartbeats rewrite session records, and need not re-read these.
    registered: Mutex<HashSet<(String, String)>>,
}

impl Health {
    fn new(
        config: Arc<Config>,
        client: async_nats::Client,
        handles: &subjects::Handles,
    ) -> Arc<Self> {
        Arc::new(Health {
            config,
            client,
            js: handles.js.clone(),
            kv: handles.resources.clone(),
            id: Uuid::new_v4().to_string(),
            cache: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(HashSet::new()),
            registered: Mutex::new(HashSet::new()),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Resource>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `name` busy; false when it already was.
    fn start(&self, name: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string())
    }

    fn done(&self, name: &str) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    async fn get(&self, name: &str) -> Result<Option<(Resource, u64)>, OpError> {
        match self
            .kv
            .entry(resource_key(name))
            .await
            .map_err(|e| OpError::Store(e.to_string()))?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let r = serde_json::from_slice(&e.value)
                    .map_err(|e| OpError::Store(format!("undecodable record of {name}: {e}")))?;
                Ok(Some((r, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Read, change, compare-and-set, retried on conflict: the one write
    /// path of `warden_resources` (registration, leaving, suspicion, check
    /// claims and results, recycling, closing by hand). `change` gets the
    /// current record (`None`: absent) and returns the new one, or `None`
    /// to write nothing; on a conflict it runs again on what another
    /// writer left, after a short jittered pause. Returns what was
    /// written.
    async fn modify<F>(&self, name: &str, mut change: F) -> Result<Option<Resource>, OpError>
    where
        F: FnMut(Option<Resource>) -> Option<Resource>,
    {
        let key = resource_key(name);
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(cas_pause(attempt)).await;
            }
            let current = self.get(name).await?;
            let revision = current.as_ref().map(|(_, rev)| *rev);
            let Some(next) = change(current.map(|(r, _)| r)) else {
                return Ok(None);
            };
            let body =
                Bytes::from(serde_json::to_vec(&next).map_err(|e| OpError::Store(e.to_string()))?);
            let written = match revision {
                None => self.kv.create(&key, body).await.map(|_| ()).map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists
                            || warden_shared::store::lost_race(&e),
                        e.to_string(),
                    )
                }),
                Some(rev) => self
                    .kv
                    .update(&key, body, rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision
                                || warden_shared::store::lost_race(&e),
                            e.to_string(),
                        )
                    }),
            };
            match written {
                Ok(()) => {
                    self.cache().insert(next.name.clone(), next.clone());
                    return Ok(Some(next));
                }
                Err((true, e)) => {
                    metrics().cas_conflicts.inc();
                    debug!(resource = %name, attempt, error = %e, "resource changed meanwhile; re-reading");
                }
                Err((false, e)) => return Err(OpError::Store(e)),
            }
        }
        Err(OpError::Store(format!(
            "{name}: still changing after {CAS_ATTEMPTS} attempts"
        )))
    }

    // --- registration and vanishing -------------------------------------

    async fn on_session(self: &Arc<Self>, s: &Session) {
        let decls: Vec<ResourceDecl> = if s.resources.is_empty() {
            s.resource
                .iter()
                .map(|r| ResourceDecl {
                    name: r.clone(),
                    kind: "host".into(),
                    path: None,
                    depends_on: None,
                })
                .collect()
        } else {
            s.resources.clone()
        };
        for d in decls {
            let pair = (s.name.clone(), d.name.clone());
            let seen = {
                let mut r = self.registered.lock().unwrap_or_else(|p| p.into_inner());
                match s.state {
                    SessionState::Active => !r.insert(pair.clone()),
                    _ => {
                        r.remove(&pair);
                        false
                    }
                }
            };
            if seen {
                continue;
            }
            let res = match s.state {
                SessionState::Active => self.register(s, &d).await,
                SessionState::Expired => self.leave(s, &d.name, true).await,
                SessionState::Quarantined | SessionState::Closed => {
                    self.leave(s, &d.name, false).await
                }
            };
            if let Err(e) = res {
                warn!(resource = %d.name, session = %s.name, error = %e, "cannot record the session on its resource");
                // Try again at the session's next heartbeat.
                self.registered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&pair);
            }
        }
    }

    async fn register(&self, s: &Session, d: &ResourceDecl) -> Result<(), OpError> {
        let now = Utc::now();
        let me = ResourceSession {
            session: s.name.clone(),
            bot_id: s.bot_id.clone(),
        };
        let written = self
            .modify(&d.name, |current| match current {
                None => {
                    let mut r = Resource::register(
                        d,
                        1,
                        &s.agent_instance,
                        &s.bot_id,
                        format!("registered by bot {} (session {})", s.bot_id, s.name),
                        now,
                    );
                    r.sessions.push(me.clone());
                    r.pools = s.pools.clone();
                    Some(r)
                }
                // Closed (or broken, about to be): the session is noted
                // like any other; the periodic pass checks a resource
                // that may come back on this agent and opens a new
                // incarnation if it passes.
                Some(mut r) => {
                    // Several bots may share one host (each with its own
                    // work dir): the record keeps what its latest new
                    // session declared.
                    if r.sessions.contains(&me) && s.pools.iter().all(|p| r.pools.contains(p)) {
                        return None;
                    }
                    if !r.sessions.contains(&me) {
                        r.sessions.push(me.clone());
                        r.kind = d.kind.clone();
                        r.path = d.path.clone();
                        r.depends_on = d.depends_on.clone();
                        r.bot_id = Some(s.bot_id.clone());
                        r.agent = s.agent_instance.clone();
                    }
                    for p in &s.pools {
                        if !r.pools.contains(p) {
                            r.pools.push(p.clone());
                        }
                    }
                    Some(r)
                }
            })
            .await?;
        if let Some(r) = written {
            info!(resource = %r.name, kind = %r.kind, state = %r.state, incarnation = r.incarnation, bot.id = %s.bot_id, "resource registered");
        }
        Ok(())
    }

    /// A session leaves its resource; when it expired and was the last one
    /// there, the resource vanished: broken, then recycled.
    async fn leave(
        self: &Arc<Self>,
        s: &Session,
        name: &str,
        expired: bool,
    ) -> Result<(), OpError> {
        let now = Utc::now();
        let written = self
            .modify(name, |current| {
                let mut r = current?;
                let before = r.sessions.len();
                r.sessions.retain(|x| x.session != s.name);
                if r.sessions.len() == before {
                    return None;
                }
                if expired
                    && r.sessions.is_empty()
                    && matches!(r.state, ResourceState::Open | ResourceState::Suspicious)
                {
                    let why = format!(
                        "{}: session {} of bot {} expired without heartbeats",
                        reason::VANISHED,
                        s.name,
                        s.bot_id
                    );
                    r.set_state(ResourceState::Broken, why, now).ok()?;
                }
                Some(r)
            })
            .await?;
        if let Some(r) = written {
            if r.state == ResourceState::Broken {
                warn!(resource = %r.name, bot.id = %s.bot_id, "resource vanished: its agent stopped heartbeating");
                self.recycle(name, reason::VANISHED, &r.reason).await?;
            }
        }
        Ok(())
    }

    // --- suspicion --------------------------------------------------------

    async fn on_suspect(self: &Arc<Self>, s: &ResourceSuspect) -> Result<&'static str, OpError> {
        let cfg = &self.config.health;
        let now = Utc::now();
        let why = format!(
            "job {} attempt {} failed with {} (may be the resource's fault)",
            s.job_id, s.attempt, s.detail
        );
        let mut result = "unknown";
        let written = self
            .modify(&s.resource, |current| {
                let mut r = current?;
                result = match r.state {
                    ResourceState::Broken | ResourceState::Closed => "ignored",
                    // Already waiting for its check: one incident, not a
                    // new suspicion (a host whose every job hit the same
                    // OOM is not flapping).
                    ResourceState::Suspicious => "noted",
                    // An attempt leased before the resource last passed a
                    // check belongs to the incident that check covered: a
                    // new check, but no flapping count and no back-off.
                    ResourceState::Open if s.leased_at.is_some_and(|t| t < r.since) => {
                        r.set_state(ResourceState::Suspicious, why.clone(), now)
                            .ok()?;
                        "suspicious"
                    }
                    ResourceState::Open => {
                        let n = r.note_suspicion(now, cfg.flap_window) as u32;
                        if cfg.flap_limit > 0 && n >= cfg.flap_limit {
                            let reason = format!(
                                "{}: suspected {n} times within {:?}; last: {why}",
                                reason::FLAPPING,
                                cfg.flap_window
                            );
                            r.set_state(ResourceState::Broken, reason, now).ok()?;
                            "flapping"
                        } else {
                            r.set_state(ResourceState::Suspicious, why.clone(), now)
                                .ok()?;
                            if n > 1 {
                                // Suspected again soon after passing a
                                // check: out of service for longer.
                                let wait = cfg.recheck_backoff.saturating_mul(1 << (n - 2).min(16));
                                r.check_after = Some(
                                    now + chrono::Duration::from_std(wait)
                                        .unwrap_or(chrono::Duration::hours(1)),
                                );
                            }
                            "suspicious"
                        }
                    }
                };
                if result == "ignored" {
                    return None;
                }
                if result == "noted" {
                    r.reason = format!(
                        "{}; also: {why}",
                        r.reason.split("; also:").next().unwrap_or("")
                    );
                }
                Some(r)
            })
            .await?;
        if let Some(r) = written {
            match result {
                "flapping" => {
                    warn!(resource = %r.name, "resource flapping: broken without a check");
                    self.recycle(&r.name, reason::FLAPPING, &r.reason).await?;
                }
                "suspicious" => {
                    info!(resource = %r.name, job.id = %s.job_id, detail = %s.detail, check_after = ?r.check_after, "resource suspicious")
                }
                _ => {}
            }
        }
        Ok(result)
    }

    // --- checks -----------------------------------------------------------

    /// Whether nobody runs a check of `r` (or the one claimed is stale).
    fn unclaimed(&self, r: &Resource, now: DateTime<Utc>) -> bool {
        let stale = chrono::Duration::from_std(self.config.health.check_timeout * 2)
            .unwrap_or(chrono::Duration::minutes(1));
        r.check.as_ref().is_none_or(|c| now - c.started_at > stale)
    }

    fn claimable(&self, r: &Resource, now: DateTime<Utc>) -> bool {
        r.state == ResourceState::Suspicious
            && r.check_after.is_none_or(|t| t <= now)
            && self.unclaimed(r, now)
    }

    /// The open state of what `r` depends on, from the cache: `Err` names
    /// a dependency that is not open.
    fn dependency_open(&self, r: &Resource) -> Result<(), String> {
        let Some(dep) = r.depends_on.as_deref() else {
            return Ok(());
        };
        match self.cache().get(dep).map(|d| d.state) {
            Some(ResourceState::Open) | None => Ok(()),
            Some(state) => Err(format!(
                "resource {} depends on {dep}, which is {state}",
                r.name
            )),
        }
    }

    /// Whether a closed resource is due for a return check: not closed by
    /// hand, an active session on it, what it depends on open, its
    /// back-off over.
    fn returnable(&self, r: &Resource, now: DateTime<Utc>) -> bool {
        r.may_return()
            && !r.sessions.is_empty()
            && self.dependency_open(r).is_ok()
            && r.check_after.is_none_or(|t| t <= now)
            && self.unclaimed(r, now)
    }

    /// Claims and runs a check of `name`. `Manual` (an operator asked):
    /// any open, suspicious or closed resource, now (a closed one whose
    /// dependency is open). `Suspicion`: a due suspicious one. `Return`: a
    /// due closed one with a live agent. A closed resource that passes
    /// opens as a new incarnation. Returns the record after it and the
    /// agent's answer.
    async fn check(
        self: &Arc<Self>,
        name: &str,
        trigger: Trigger,
    ) -> Result<(Resource, Option<CheckReply>), OpError> {
        let now = Utc::now();
        let mut refusal = None;
        let claimed = self
            .modify(name, |current| {
                let mut r = current?;
                let ok = match (trigger, r.state) {
                    (Trigger::Manual, ResourceState::Open | ResourceState::Suspicious) => Ok(()),
                    (Trigger::Manual, ResourceState::Closed) => self.dependency_open(&r),
                    (Trigger::Suspicion, _) if self.claimable(&r, now) => Ok(()),
                    (Trigger::Return, _) if self.returnable(&r, now) => Ok(()),
                    _ => Err(format!(
                        "resource {name} is {} and cannot be checked",
                        r.state
                    )),
                };
                if let Err(why) = ok {
                    refusal = Some(why);
                    return None;
                }
                r.check = Some(PendingCheck {
                    by: self.id.clone(),
                    started_at: now,
                    trigger: trigger.as_str().into(),
                });
                Some(r)
            })
            .await?;
        let Some(r) = claimed else {
            return Err(match refusal {
                Some(why) => OpError::Refused(why),
                None => OpError::NotFound(name.into()),
            });
        };
        let started = std::time::Instant::now();
        let (outcome, summary, reply) = self.ask_agent(&r).await;
        metrics()
            .checks
            .with_label_values(&[outcome.as_str()])
            .inc();
        let record = CheckRecord {
            at: Utc::now(),
            result: outcome.as_str().into(),
            summary: summary.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
            trigger: trigger.as_str().into(),
        };
        let (incarnation, claimed_state) = (r.incarnation, r.state);
        let code = match outcome {
            Outcome::Timeout => reason::CHECK_TIMEOUT,
            _ => reason::CHECK_FAILED,
        };
        let cfg = &self.config.health;
        let after = self
            .modify(name, |current| {
                let mut r = current?;
                // Another incarnation now, or closed while its check ran.
                if r.incarnation != incarnation
                    || (r.state == ResourceState::Closed && claimed_state != ResourceState::Closed)
                {
                    return None;
                }
                r.record_check(record.clone());
                let now = Utc::now();
                match (outcome, r.state) {
                    (Outcome::Passed, ResourceState::Suspicious) => {
                        r.set_state(ResourceState::Open, format!("check passed: {summary}"), now)
                            .ok()?;
                    }
                    (Outcome::Passed, ResourceState::Closed) => {
                        let who = if trigger == Trigger::Manual {
                            "an operator's check passed"
                        } else {
                            "its agent came back and passed its check"
                        };
                        let why = format!(
                            "{}: {who} (incarnation {}): {summary}",
                            reason::RETURNED,
                            r.incarnation + 1
                        );
                        r.set_state(ResourceState::Open, why, now).ok()?;
                    }
                    (Outcome::Passed, _) => {}
                    (_, ResourceState::Open | ResourceState::Suspicious) => {
                        r.set_state(ResourceState::Broken, format!("{code}: {summary}"), now)
                            .ok()?;
                    }
                    (_, ResourceState::Closed) => {
                        // Stays out; checked again after a longer wait.
                        let wait = return_wait(
                            r.closed_for.as_deref(),
                            r.failed_checks_while_closed(),
                            cfg,
                        );
                        r.check_after = wait.map(|w| {
                            now + chrono::Duration::from_std(w)
                                .unwrap_or(chrono::Duration::hours(1))
                        });
                    }
                    _ => {}
                }
                Some(r)
            })
            .await?;
        let Some(after) = after else {
            return Err(OpError::Refused(format!(
                "resource {name} changed while it was checked"
            )));
        };
        info!(resource = %name, trigger = trigger.as_str(), result = outcome.as_str(), state = %after.state, incarnation = after.incarnation, summary = %summary, check_after = ?after.check_after, "resource checked");
        if after.state == ResourceState::Broken {
            let why = after.reason.clone();
            self.recycle(name, code, &why).await?;
            let closed = self.get(name).await?.map(|(r, _)| r).unwrap_or(after);
            return Ok((closed, reply));
        }
        Ok((after, reply))
    }

    /// Asks the agent of record to run the resource's checks.
    async fn ask_agent(&self, r: &Resource) -> (Outcome, String, Option<CheckReply>) {
        let limit = self.config.health.check_timeout;
        let Some(bot) = r
            .sessions
            .last()
            .map(|s| s.bot_id.clone())
            .or(r.bot_id.clone())
        else {
            return (Outcome::Timeout, "no agent on record".into(), None);
        };
        let req = CheckRequest {
            version: MESSAGE_VERSION,
            resource: r.name.clone(),
            kind: r.kind.clone(),
        };
        let Ok(body) = serde_json::to_vec(&req) else {
            return (
                Outcome::Failed,
                "cannot encode the check request".into(),
                None,
            );
        };
        let answer = tokio::time::timeout(
            limit,
            self.client
                .request(subjects::agent_check_subject(&bot), body.into()),
        )
        .await;
        match answer {
            Err(_) => (
                Outcome::Timeout,
                format!("bot {bot} did not answer within {limit:?}"),
                None,
            ),
            Ok(Err(e)) => (
                Outcome::Timeout,
                format!("bot {bot} cannot be reached: {e}"),
                None,
            ),
            Ok(Ok(msg)) => match serde_json::from_slice::<CheckReply>(&msg.payload) {
                Err(e) => (
                    Outcome::Failed,
                    format!("bad answer from bot {bot}: {e}"),
                    None,
                ),
                Ok(reply) => {
                    let summary = if let Some(e) = &reply.error {
                        format!("bot {bot}: {}", e.message)
                    } else if reply.passed {
                        let names: Vec<&str> =
                            reply.results.iter().map(|c| c.name.as_str()).collect();
                        if names.is_empty() {
                            format!(
                                "bot {bot} answered (no checks configured for kind {})",
                                r.kind
                            )
                        } else {
                            format!("{} passed on bot {bot}", names.join(", "))
                        }
                    } else {
                        let failed: Vec<String> = reply
                            .results
                            .iter()
                            .filter(|c| !c.passed)
                            .map(|c| format!("{}: {}", c.name, c.detail))
                            .collect();
                        format!("{} (bot {bot})", failed.join("; "))
                    };
                    let outcome = if reply.passed && reply.error.is_none() {
                        Outcome::Passed
                    } else {
                        Outcome::Failed
                    };
                    (outcome, truncate(summary, 1000), Some(reply))
                }
            },
        }
    }

    // --- recycling --------------------------------------------------------

    /// Publishes a recycle event for `name` (once per incarnation) and
    /// closes it, then everything that depends on it.
    async fn recycle(&self, name: &str, code: &str, why: &str) -> Result<(), OpError> {
        let mut work = vec![(name.to_string(), code.to_string(), why.to_string())];
        while let Some((name, code, why)) = work.pop() {
            let Some((r, _)) = self.get(&name).await? else {
                continue;
            };
            if r.state != ResourceState::Closed {
                let event = ResourceRecycle {
                    version: MESSAGE_VERSION,
                    resource: r.name.clone(),
                    kind: r.kind.clone(),
                    incarnation: r.incarnation,
                    reason: code.clone(),
                    description: why.clone(),
                    bot_id: r.bot_id.clone(),
                    path: r.path.clone(),
                    depends_on: r.depends_on.clone(),
                    at: Utc::now(),
                };
                // Published before the close: a crash in between leaves it
                // broken, and the retry's event is the same message id.
                self.publish_recycle(&event).await?;
                let incarnation = r.incarnation;
                let closed = self
                    .modify(&name, |current| {
                        let mut r = current?;
                        if r.incarnation != incarnation || r.state == ResourceState::Closed {
                            return None;
                        }
                        let now = Utc::now();
                        if r.state != ResourceState::Broken {
                            // Closed by hand or with what it depends on.
                            r.set_state(ResourceState::Broken, format!("{code}: {why}"), now)
                                .ok()?;
                        }
                        r.close(&code, &why, now).ok()?;
                        // A live agent gets it back after a check, unless
                        // it was closed by hand.
                        r.check_after = return_wait(Some(&code), 0, &self.config.health).map(|w| {
                            now + chrono::Duration::from_std(w)
                                .unwrap_or(chrono::Duration::hours(1))
                        });
                        Some(r)
                    })
                    .await?;
                if closed.is_some() {
                    metrics().recycles.with_label_values(&[&code]).inc();
                    warn!(resource = %name, reason = %code, why = %why, "resource recycled");
                }
            }
            let dependents: Vec<String> = {
                let all: Vec<Resource> = self.cache().values().cloned().collect();
                warden_shared::resource::dependents(&all, &name)
                    .into_iter()
                    .filter(|d| {
                        all.iter()
                            .any(|r| r.name == *d && r.state != ResourceState::Closed)
                    })
                    .map(str::to_string)
                    .collect()
            };
            for d in dependents {
                work.push((
                    d,
                    reason::DEPENDENCY.to_string(),
                    format!("{name}, which it depends on, was closed ({code})"),
                ));
            }
        }
        Ok(())
    }

    async fn publish_recycle(&self, event: &ResourceRecycle) -> Result<(), OpError> {
        let id = format!("{}:{}:recycle", event.resource, event.incarnation);
        runtime::publish_with_id(
            &self.js,
            subjects::recycle_subject(&event.resource),
            &id,
            event,
        )
        .await
        .map_err(|e| OpError::Store(format!("recycle event: {e}")))
    }

    /// Closes a resource by hand (and what depends on it).
    async fn close(&self, name: &str, why: Option<String>) -> Result<Resource, OpError> {
        let Some((r, _)) = self.get(name).await? else {
            return Err(OpError::NotFound(name.into()));
        };
        if !r.may_return() && r.state == ResourceState::Closed {
            return Err(OpError::Refused(format!(
                "resource {name} is already closed by hand"
            )));
        }
        let why = truncate(
            why.filter(|w| !w.trim().is_empty())
                .unwrap_or_else(|| "closed by an operator".into()),
            1000,
        );
        if r.state == ResourceState::Closed {
            // Closed already (recycled), and would come back once its
            // agent passes a check: now it stays out until an operator's
            // check.
            let incarnation = r.incarnation;
            self.modify(name, |current| {
                let mut r = current?;
                if r.incarnation != incarnation || !r.may_return() {
                    return None;
                }
                r.closed_for = Some(reason::MANUAL.into());
                r.reason = format!("{r}; then closed by hand: {why}", r = r.reason);
                r.check_after = None;
                Some(r)
            })
            .await?;
        } else {
            self.recycle(name, reason::MANUAL, &why).await?;
        }
        self.get(name)
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| OpError::NotFound(name.into()))
    }

    // --- the periodic pass ------------------------------------------------

    /// Starts due checks, finishes interrupted recycles, closes resources
    /// whose dependency was closed.
    fn tick(self: &Arc<Self>, tracker: &TaskTracker) {
        let now = Utc::now();
        let all: Vec<Resource> = self.cache().values().cloned().collect();
        let closed: HashSet<&str> = all
            .iter()
            .filter(|r| r.state == ResourceState::Closed)
            .map(|r| r.name.as_str())
            .collect();
        for r in &all {
            let job: Option<(&'static str, String)> = match r.state {
                ResourceState::Suspicious if self.claimable(r, now) => {
                    Some(("check", String::new()))
                }
                ResourceState::Closed if self.returnable(r, now) => Some(("return", String::new())),
                ResourceState::Broken => Some(("recycle", r.reason.clone())),
                ResourceState::Open | ResourceState::Suspicious
                    if r.depends_on.as_deref().is_some_and(|d| closed.contains(d)) =>
                {
                    Some(("dependency", String::new()))
                }
                _ => None,
            };
            let Some((what, why)) = job else { continue };
            if !self.start(&r.name) {
                continue;
            }
            let me = self.clone();
            let r = r.clone();
            tracker.spawn(async move {
                let res = match what {
                    "check" => me.check(&r.name, Trigger::Suspicion).await.map(|_| ()),
                    "return" => me.check(&r.name, Trigger::Return).await.map(|_| ()),
                    "recycle" => {
                        let code = reason::ALL
                            .into_iter()
                            .find(|c| why.starts_with(&format!("{c}:")))
                            .unwrap_or(reason::CHECK_FAILED);
                        me.recycle(&r.name, code, &why).await
                    }
                    _ => {
                        let dep = r.depends_on.clone().unwrap_or_default();
                        me.recycle(
                            &r.name,
                            reason::DEPENDENCY,
                            &format!("{dep}, which it depends on, was closed"),
                        )
                        .await
                    }
                };
                match res {
                    Ok(()) | Err(OpError::Refused(_)) => {}
                    Err(e) => warn!(resource = %r.name, what, error = %e, "health step failed; will retry"),
                }
                me.done(&r.name);
            });
        }
    }

    fn export_gauges(&self) {
        let all: Vec<Resource> = self.cache().values().cloned().collect();
        let m = metrics();
        for state in ResourceState::ALL {
            let n = all.iter().filter(|r| r.state == state).count();
            m.resources
                .with_label_values(&[state.as_str()])
                .set(n as i64);
        }
        let mut pools: BTreeMap<String, BTreeMap<ResourceState, i64>> = BTreeMap::new();
        for t in self.config.tasks.values() {
            pools.entry(t.pool.clone()).or_default();
        }
        for r in &all {
            for p in &r.pools {
                let e = pools.entry(p.clone()).or_default();
                // Open without an agent is no capacity.
                if r.state == ResourceState::Open && r.sessions.is_empty() {
                    continue;
                }
                *e.entry(r.state).or_default() += 1;
            }
        }
        for (pool, counts) in pools {
            for state in ResourceState::ALL {
                m.pool_resources
                    .with_label_values(&[&pool, state.as_str()])
                    .set(counts.get(&state).copied().unwrap_or(0));
            }
        }
    }
}

/// Writes of one record tried before giving up.
const CAS_ATTEMPTS: u32 = 16;

/// The pause before retry `attempt` (1…) of a compare-and-set: a few
/// milliseconds, growing, jittered so that replicas that collided do not
/// collide again in step (and a replica whose read came from a lagging
/// follower reads again after it caught up).
fn cas_pause(attempt: u32) -> Duration {
    let ceiling = 5 * u64::from(attempt.min(10)) + 5;
    let jitter = (Uuid::new_v4().as_u128() % u128::from(ceiling)) as u64;
    Duration::from_millis(2 + jitter)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Runs one health replica until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), HealthError> {
    warden_shared::metrics::starting("health");
    metrics::init();
    let Some((client, handles)) =
        runtime::connect_with_topology_until(&config, "health", &shutdown).await?
    else {
        return Ok(());
    };
    let health = Health::new(config.clone(), client.clone(), &handles);
    let Some(consumer) = runtime::durable_consumer(
        &handles.js,
        "health",
        subjects::NOTIFY_STREAM,
        subjects::HEALTH_SUSPECTS_CONSUMER,
        subjects::health_suspects_consumer(),
        &shutdown,
    )
    .await
    .map_err(setup("suspects consumer"))?
    else {
        return Ok(());
    };
    let service = client
        .service_builder()
        .description("Warden resource health")
        .start(subjects::HEALTH_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(setup("health service"))?;
    let group = service.group(subjects::HEALTH_GROUP);
    let mut check_ep = group
        .endpoint("check")
        .await
        .map_err(setup("check endpoint"))?;
    let mut close_ep = group
        .endpoint("close")
        .await
        .map_err(setup("close endpoint"))?;

    let tracker = TaskTracker::new();
    tracker.spawn(watch_loop(health.clone(), shutdown.clone()));
    tracker.spawn(sessions_loop(
        health.clone(),
        handles.sessions.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(suspects_loop(health.clone(), consumer, shutdown.clone()));
    tracker.spawn(tick_loop(health.clone(), tracker.clone(), shutdown.clone()));
    warden_shared::metrics::ready("health");
    info!("health service running");
    loop {
        let (op, req) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = check_ep.next() => ("check", r),
            r = close_ep.next() => ("close", r),
        };
        let Some(req) = req else { break };
        let health = health.clone();
        tracker.spawn(async move {
            let reply = match serde_json::from_slice::<HealthRequest>(&req.message.payload) {
                Err(e) => Err(ErrorBody::new(
                    "invalid_request",
                    format!("cannot decode request: {e}"),
                )),
                Ok(r) if r.resource.trim().is_empty() => Err(ErrorBody::new(
                    "invalid_request",
                    "resource must not be empty",
                )),
                Ok(r) => match op {
                    "check" => health
                        .check(&r.resource, Trigger::Manual)
                        .await
                        .map_err(|e| e.body()),
                    _ => health
                        .close(&r.resource, r.reason)
                        .await
                        .map(|res| (res, None))
                        .map_err(|e| e.body()),
                },
            };
            let reply = match reply {
                Ok((resource, check)) => HealthReply {
                    version: MESSAGE_VERSION,
                    resource: Some(resource),
                    check,
                    error: None,
                },
                Err(e) => {
                    warn!(op, code = %e.code, error = %e.message, "health request refused");
                    HealthReply {
                        version: MESSAGE_VERSION,
                        resource: None,
                        check: None,
                        error: Some(e),
                    }
                }
            };
            let body = warden_shared::messages::encode_reply(&reply);
            if let Err(e) = req.respond(Ok(Bytes::from(body))).await {
                warn!(error = %e, "cannot answer health request");
            }
        });
    }
    let _ = service.stop().await;
    runtime::drain(&client, &tracker, Duration::from_secs(10)).await;
    info!("health service stopped");
    Ok(())
}

/// Keeps the cache equal to the bucket (rebuilt by the watch's first pass).
async fn watch_loop(health: Arc<Health>, shutdown: CancellationToken) {
    runtime::follow_kv(&health.kv, ">", "resources", &shutdown, |entry| {
        if entry.operation == kv::Operation::Put {
            if let Ok(r) = serde_json::from_slice::<Resource>(&entry.value) {
                health.cache().insert(r.name.clone(), r);
            }
        }
        std::future::ready(())
    })
    .await;
}

async fn sessions_loop(health: Arc<Health>, sessions: kv::Store, shutdown: CancellationToken) {
    runtime::follow_kv(&sessions, "session.>", "sessions", &shutdown, |entry| {
        let health = health.clone();
        async move {
            if let Ok(s) = serde_json::from_slice::<Session>(&entry.value) {
                health.on_session(&s).await;
            }
        }
    })
    .await;
}

async fn suspects_loop(health: Arc<Health>, consumer: PullConsumer, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull suspect events; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = messages.next() => match m { Some(Ok(m)) => m, Some(Err(e)) => { debug!(error = %e, "suspect pull interrupted"); continue } None => break },
            };
            let m = metrics();
            match serde_json::from_slice::<ResourceSuspect>(&msg.payload) {
                Ok(s) => match health.on_suspect(&s).await {
                    Ok(result) => {
                        m.suspects.with_label_values(&[result]).inc();
                        if result == "unknown" {
                            warn!(resource = %s.resource, job.id = %s.job_id, "suspect event for a resource never registered");
                        }
                        let _ = msg.ack().await;
                    }
                    Err(e) => {
                        warn!(resource = %s.resource, error = %e, "cannot record suspicion; will retry");
                        let _ = msg
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                },
                Err(e) => {
                    m.suspects.with_label_values(&["invalid"]).inc();
                    if dead_letter(&health, &msg, &e.to_string()).await {
                        let _ = msg.ack().await;
                    }
                }
            }
        }
    }
}

async fn dead_letter(health: &Health, msg: &jetstream::Message, error: &str) -> bool {
    warn!(subject = %msg.subject, error, "undecodable suspect event dead-lettered");
    let subject = msg.subject.to_string();
    let kept = runtime::dead_letter(
        &health.js,
        "health",
        metrics::INVALID_SUSPECT,
        &subject,
        error,
        &msg.payload,
    )
    .await
    .is_ok();
    if kept {
        metrics()
            .dead_letters
            .with_label_values(&[metrics::INVALID_SUSPECT])
            .inc();
    }
    kept
}

async fn tick_loop(health: Arc<Health>, tracker: TaskTracker, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        health.tick(&tracker);
        n += 1;
        if n % 5 == 1 {
            health.export_gauges();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use warden_testsupport::{eventually, Cluster};

    fn session(i: usize) -> Session {
        Session {
            version: 1,
            name: format!("s{i}"),
            bot_id: format!("bot-{i}"),
            resource: Some("shared-host".into()),
            resources: vec![ResourceDecl {
                name: "shared-host".into(),
                kind: "host".into(),
                path: None,
                depends_on: None,
            }],
            agent_instance: format!("agent-{i}"),
            pools: vec!["default".into()],
            capacity: 1,
            agent_version: "test".into(),
            timeout_ms: None,
            state: SessionState::Active,
            created_at: Utc::now(),
            last_heartbeat: Utc::now(),
            superseded_by: None,
            leases: Vec::new(),
        }
    }

    #[test]
    fn a_closed_resource_waits_longer_after_each_failed_return_check() {
        let text = "[health]\nrecheck_backoff = \"10s\"\nflap_window = \"35s\"\n";
        let cfg = Config::from_parts(Some(text), Vec::new()).unwrap().health;
        let s = Duration::from_secs;
        assert_eq!(return_wait(Some(reason::MANUAL), 0, &cfg), None);
        assert_eq!(return_wait(Some(reason::VANISHED), 0, &cfg), Some(s(0)));
        assert_eq!(return_wait(Some(reason::DEPENDENCY), 0, &cfg), Some(s(0)));
        assert_eq!(return_wait(None, 0, &cfg), Some(s(0)));
        assert_eq!(return_wait(Some(reason::FLAPPING), 0, &cfg), Some(s(10)));
        assert_eq!(
            return_wait(Some(reason::CHECK_FAILED), 0, &cfg),
            Some(s(10))
        );
        assert_eq!(return_wait(Some(reason::VANISHED), 1, &cfg), Some(s(10)));
        assert_eq!(return_wait(Some(reason::VANISHED), 2, &cfg), Some(s(20)));
        assert_eq!(return_wait(Some(reason::VANISHED), 3, &cfg), Some(s(35)));
        assert_eq!(return_wait(Some(reason::VANISHED), 60, &cfg), Some(s(35)));
    }

    /// Two replicas on a clustered (R3) bucket register many sessions on
    /// one shared host at once: every write lands. A clustered stream
    /// refuses a second write of a key while one is in flight with its
    /// own "wrong last sequence" (10164), which is a conflict like any.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_on_a_cluster_record_every_session_of_a_shared_host() {
        let cluster = Cluster::start();
        let config = |url: String| {
            let text = format!(
                "[nats]\nurl = \"{url}\"\nreplicas = 3\n[health]\ncheck_timeout = \"1s\"\n"
            );
            Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap())
        };
        let mut replicas = Vec::new();
        for node in 0..2 {
            let c = config(cluster.node_url(node));
            // JetStream needs a meta leader before it takes R3 buckets.
            let (client, handles) = eventually(Duration::from_secs(30), "the topology", || {
                let c = c.clone();
                async move { runtime::connect_with_topology(&c, "test").await.ok() }
            })
            .await;
            replicas.push(Health::new(c, client, &handles));
        }
        let n = 40;
        let sessions: Vec<Session> = (0..n).map(session).collect();
        let writes = sessions.iter().enumerate().map(|(i, s)| {
            let h = replicas[i % 2].clone();
            async move { h.register(s, &s.resources[0]).await }
        });
        let results = futures::future::join_all(writes).await;
        let failed: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        assert!(failed.is_empty(), "writes given up: {failed:?}");
        let (r, _) = replicas[0].get("shared-host").await.unwrap().unwrap();
        assert_eq!(r.sessions.len(), n, "{:?}", r.sessions);
    }
}
