//! `warden-fencing`: owns bot sessions (DESIGN.md "Bot sessions and
//! fencing") and answers session requests over the NATS service API.
//!
//! - create: the server names the session; a second session for the same
//!   `bot_id` quarantines the older one (newest wins);
//! - heartbeat: keeps a session alive; an unknown or superseded name gets a
//!   typed error and changes nothing;
//! - close: the bot leaves.

pub mod metrics;

use std::sync::Arc;

use async_nats::jetstream::kv;
use async_nats::service::ServiceExt;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;
use warden_shared::messages::{
    CloseSession, CreateSession, ErrorBody, Heartbeat, SessionReply, MESSAGE_VERSION,
};
use warden_shared::session::{
    bot_key, session_key, Session, SessionState, SESSION_SUPERSEDED, UNKNOWN_SESSION,
};
use warden_shared::{runtime, subjects, Config};

use crate::metrics::{metrics, INVALID_REQUEST};

#[derive(Debug, Error)]
pub enum FencingError {
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot start the session service")]
    Service(#[source] async_nats::Error),
}

#[derive(Debug, Error)]
enum OpError {
    #[error("{1}")]
    Rejected(&'static str, String),
    #[error("session store unavailable: {0}")]
    Store(String),
}

impl OpError {
    fn body(&self) -> ErrorBody {
        match self {
            OpError::Rejected(code, msg) => ErrorBody::new(*code, msg.clone()),
            OpError::Store(msg) => ErrorBody::new("unavailable", msg.clone()),
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> OpError {
    OpError::Store(e.to_string())
}

pub struct Sessions {
    kv: kv::Store,
    jobs: warden_shared::store::JobStore,
}

impl Sessions {
    pub fn new(kv: kv::Store, jobs: warden_shared::store::JobStore) -> Sessions {
        Sessions { kv, jobs }
    }

    pub async fn get(&self, name: &str) -> Result<Option<(Session, u64)>, String> {
        match self
            .kv
            .entry(session_key(name))
            .await
            .map_err(|e| e.to_string())?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let s: Session = serde_json::from_slice(&e.value).map_err(|e| e.to_string())?;
                Ok(Some((s, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn put(&self, s: &Session) -> Result<u64, OpError> {
        let body = serde_json::to_vec(s).map_err(store_err)?;
        self.kv
            .put(session_key(&s.name), Bytes::from(body))
            .await
            .map_err(store_err)
    }

    async fn current_of(&self, bot_id: &str) -> Result<Option<(String, u64)>, OpError> {
        match self.kv.entry(bot_key(bot_id)).await.map_err(store_err)? {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some((
                String::from_utf8_lossy(&e.value).into_owned(),
                e.revision,
            ))),
            Some(e) => Ok(Some((String::new(), e.revision))),
            None => Ok(None),
        }
    }

    async fn create(&self, req: CreateSession) -> Result<String, OpError> {
        if req.bot_id.trim().is_empty() {
            return Err(OpError::Rejected(
                INVALID_REQUEST,
                "bot_id must not be empty".into(),
            ));
        }
        if req.timeout_ms.is_some_and(|ms| {
            ms < 1000 || ms > warden_shared::config::MAX_EXECUTION_TIMEOUT.as_millis() as u64
        }) {
            return Err(OpError::Rejected(
                "invalid_request",
                "timeout_ms must be between 1000 and 86400000".into(),
            ));
        }
        let now = Utc::now();
        let name = Uuid::new_v4().to_string();
        let session = Session {
            version: MESSAGE_VERSION,
            name: name.clone(),
            bot_id: req.bot_id.clone(),
            resource: req.resource.clone(),
            resources: req.resources.clone(),
            agent_instance: req.agent_instance.clone(),
            pools: req.pools.clone(),
            capacity: req.capacity,
            agent_version: req.agent_version.clone(),
            timeout_ms: req.timeout_ms,
            state: SessionState::Active,
            created_at: now,
            last_heartbeat: now,
            superseded_by: None,
            leases: Vec::new(),
        };
        self.put(&session).await?;
        // Point the bot at the new session by compare-and-set, so of two
        // concurrent creates exactly one is current and the other is told.
        let previous = loop {
            let current = self.current_of(&req.bot_id).await?;
            let res = match &current {
                None => self
                    .kv
                    .create(bot_key(&req.bot_id), Bytes::from(name.clone()))
                    .await
                    .map_err(|e| e.to_string()),
                Some((_, rev)) => self
                    .kv
                    .update(bot_key(&req.bot_id), Bytes::from(name.clone()), *rev)
                    .await
                    .map_err(|e| e.to_string()),
            };
            match res {
                Ok(_) => break current.map(|(n, _)| n).filter(|n| !n.is_empty()),
                Err(e)
                    if e.contains("wrong last sequence")
                        || e.contains("already exists")
                        || e.contains("key exists") =>
                {
                    continue
                }
                Err(e) => return Err(OpError::Store(e)),
            }
        };
        if let Some(old) = previous {
            if let Ok(Some((mut s, _))) = self.get(&old).await {
                if s.state == SessionState::Active {
                    s.state = SessionState::Quarantined;
                    s.superseded_by = Some(name.clone());
                    self.put(&s).await?;
                    info!(bot.id = %req.bot_id, old = %old, new = %name, "older session quarantined");
                }
            }
        }
        info!(bot.id = %req.bot_id, session = %name, "session created");
        Ok(name)
    }

    /// The session if it exists and is its bot's current one.
    async fn current(&self, name: &str) -> Result<(Session, u64), OpError> {
        let Some((s, rev)) = self.get(name).await.map_err(OpError::Store)? else {
            return Err(OpError::Rejected(
                UNKNOWN_SESSION,
                format!("no session named {name}"),
            ));
        };
        let pointer = self.current_of(&s.bot_id).await?;
        let is_current = pointer.as_ref().is_some_and(|(n, _)| n == name);
        if s.state != SessionState::Active || !is_current {
            return Err(OpError::Rejected(
                SESSION_SUPERSEDED,
                format!(
                    "session {name} of bot {} is {} and not current; start a new session",
                    s.bot_id,
                    s.state.as_str()
                ),
            ));
        }
        Ok((s, rev))
    }

    /// Leases the bot reports holding that are no longer its own (the job
    /// moved to another attempt or session): it must stop them.
    async fn stale_leases(&self, req: &Heartbeat) -> Vec<uuid::Uuid> {
        let mut cancel = Vec::new();
        for held in &req.leases {
            let Ok(Some(v)) = self.jobs.get(&held.job_id).await else {
                continue;
            };
            if !v.job.is_held_by(&req.session, held.epoch) {
                cancel.push(held.job_id);
            }
        }
        cancel
    }

    async fn heartbeat(&self, req: Heartbeat) -> Result<Vec<uuid::Uuid>, OpError> {
        self.renew(&req).await?;
        Ok(self.stale_leases(&req).await)
    }

    async fn renew(&self, req: &Heartbeat) -> Result<(), OpError> {
        let (mut s, rev) = self.current(&req.session).await?;
        s.last_heartbeat = Utc::now();
        s.leases = req.leases.clone();
        let body = serde_json::to_vec(&s).map_err(store_err)?;
        // CAS: a concurrent quarantine must not be overwritten by a late
        // heartbeat of the old session.
        match self
            .kv
            .update(session_key(&s.name), Bytes::from(body), rev)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.current(&req.session).await.map(|_| ())
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// Marks active sessions silent for longer than `timeout` (counting
    /// from `since` at the earliest) as expired; returns (bot, session).
    /// `None` when listing the sessions took longer than `max_listing`:
    /// the view may be stale (the bus was away), so nothing is expired.
    async fn sweep(
        &self,
        timeout: std::time::Duration,
        since: chrono::DateTime<Utc>,
        max_listing: std::time::Duration,
    ) -> Result<Option<Vec<(String, String)>>, String> {
        let started = std::time::Instant::now();
        let mut keys = self.kv.keys().await.map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| e.to_string())?;
            if let Some(name) = k.strip_prefix("session.") {
                names.push(name.to_string());
            }
        }
        if started.elapsed() > max_listing {
            return Ok(None);
        }
        let mut by_state: std::collections::HashMap<SessionState, i64> =
            std::collections::HashMap::new();
        let now = Utc::now();
        let mut expired = Vec::new();
        for name in names {
            let Some((mut s, rev)) = self.get(&name).await? else {
                continue;
            };
            let limit = chrono::Duration::from_std(s.timeout(timeout))
                .unwrap_or(chrono::Duration::seconds(10));
            let counted =
                if s.state == SessionState::Active && now - s.last_heartbeat.max(since) > limit {
                    SessionState::Expired
                } else {
                    s.state
                };
            *by_state.entry(counted).or_default() += 1;
            if s.state != SessionState::Active || now - s.last_heartbeat.max(since) <= limit {
                continue;
            }
            s.state = SessionState::Expired;
            let body = serde_json::to_vec(&s).map_err(|e| e.to_string())?;
            // CAS: a heartbeat that lands meanwhile wins.
            if self
                .kv
                .update(session_key(&name), Bytes::from(body), rev)
                .await
                .is_ok()
            {
                expired.push((s.bot_id, name));
            }
        }
        metrics::set_sessions(|state| by_state.get(&state).copied().unwrap_or(0));
        Ok(Some(expired))
    }

    async fn close(&self, req: CloseSession) -> Result<(), OpError> {
        let (mut s, _) = self.current(&req.session).await?;
        s.state = SessionState::Closed;
        self.put(&s).await?;
        Ok(())
    }
}

/// Expires sessions silent past the timeout. The clock only counts time
/// during which this service could see the bus: after its own start, and
/// after any stretch in which it was blind (disconnected, sweeps failing or
/// stalled), every session gets a full timeout to heartbeat again, so an
/// outage of NATS or of this service never evicts the whole fleet.
async fn sweep_loop(
    client: async_nats::Client,
    sessions: Arc<Sessions>,
    timeout: std::time::Duration,
    shutdown: CancellationToken,
) {
    let period = (timeout / 4).max(std::time::Duration::from_millis(50));
    let mut available_since = Utc::now();
    let mut last_good = std::time::Instant::now();
    // The first sweep runs at once (nothing can expire in it: every
    // session's clock starts now) so the sessions gauge is exported from
    // the start.
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
        first = false;
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        if last_good.elapsed() > period * 3 {
            available_since = Utc::now();
            info!(
                blind_ms = last_good.elapsed().as_millis() as u64,
                "bus visible again; grace period for every session"
            );
        }
        match sessions.sweep(timeout, available_since, period).await {
            Ok(Some(expired)) => {
                last_good = std::time::Instant::now();
                for (bot, name) in expired {
                    metrics().expired.inc();
                    warn!(bot.id = %bot, session = %name, "session expired: no heartbeat within the timeout");
                }
            }
            // Too slow to trust: the bus may have been away meanwhile.
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot sweep sessions"),
        }
    }
}

/// Runs the session service until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), FencingError> {
    warden_shared::metrics::starting("fencing");
    metrics::init();
    let (client, handles) = runtime::connect_with_topology(&config, "fencing").await?;
    let sessions = Arc::new(Sessions::new(
        handles.sessions.clone(),
        warden_shared::store::JobStore::new(handles.jobs.clone()),
    ));
    let service = client
        .service_builder()
        .description("Warden bot sessions")
        .start(subjects::FENCING_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(FencingError::Service)?;
    let group = service.group(subjects::SESSION_GROUP);
    let mut create = group
        .endpoint("create")
        .await
        .map_err(FencingError::Service)?;
    let mut heartbeat = group
        .endpoint("heartbeat")
        .await
        .map_err(FencingError::Service)?;
    let mut close = group
        .endpoint("close")
        .await
        .map_err(FencingError::Service)?;
    tokio::spawn(sweep_loop(
        client.clone(),
        sessions.clone(),
        config.fencing.session_timeout,
        shutdown.clone(),
    ));
    warden_shared::metrics::ready("fencing");
    info!("fencing service running");
    loop {
        let (op, req) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = create.next() => ("create", r),
            r = heartbeat.next() => ("heartbeat", r),
            r = close.next() => ("close", r),
        };
        let Some(req) = req else { break };
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let payload = req.message.payload.clone();
            let result: Result<(Option<String>, Vec<uuid::Uuid>), OpError> = match op {
                "create" => match serde_json::from_slice::<CreateSession>(&payload) {
                    Ok(r) => sessions.create(r).await.map(|n| (Some(n), Vec::new())),
                    Err(e) => Err(OpError::Rejected(INVALID_REQUEST, e.to_string())),
                },
                "heartbeat" => match serde_json::from_slice::<Heartbeat>(&payload) {
                    Ok(r) => sessions.heartbeat(r).await.map(|c| (None, c)),
                    Err(e) => Err(OpError::Rejected(INVALID_REQUEST, e.to_string())),
                },
                _ => match serde_json::from_slice::<CloseSession>(&payload) {
                    Ok(r) => sessions.close(r).await.map(|_| (None, Vec::new())),
                    Err(e) => Err(OpError::Rejected(INVALID_REQUEST, e.to_string())),
                },
            };
            let m = metrics();
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
                        m.rejected.with_label_values(&[code]).inc();
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
            let bytes = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(e) = req.respond(Ok(Bytes::from(bytes))).await {
                warn!(error = %e, "cannot answer session request");
            }
        });
    }
    let _ = service.stop().await;
    warden_shared::runtime::flush(&client).await;
    info!("fencing service stopped");
    Ok(())
}
