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
use warden_shared::store::lost_race;
use warden_shared::{runtime, subjects, Config};

use crate::metrics::{metrics, INVALID_REQUEST};

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
    Rejected(&'static str, String),
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
            OpError::Store(msg) => ErrorBody::new("unavailable", msg.clone()),
            OpError::Corrupt(msg) => ErrorBody::new("internal", msg.clone()),
        }
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

/// How often a compare-and-set on a session record is tried again after
/// the record changed under it (re-read each time).
const CAS_ATTEMPTS: usize = 5;

/// The session request operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Heartbeat,
    Close,
}

impl Op {
    /// Its `op` label (`metrics::OPS`).
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Heartbeat => "heartbeat",
            Op::Close => "close",
        }
    }
}

/// Whether an active session whose last heartbeat was `last_heartbeat`
/// has been silent past `limit` at `now`, counting only time during which
/// its heartbeats could have been recorded: the clock starts at the
/// latest of its heartbeat, `available_since` (this service's start, or
/// the end of a stretch in which it could not see the bus) and the last
/// time the session store was seen failing. So a session expires only
/// after a full `limit` of the store working, and an unavailable store
/// never evicts the fleet.
pub fn silent_past_limit(
    now: chrono::DateTime<Utc>,
    last_heartbeat: chrono::DateTime<Utc>,
    available_since: chrono::DateTime<Utc>,
    last_store_failure: Option<chrono::DateTime<Utc>>,
    limit: chrono::Duration,
) -> bool {
    let mut since = last_heartbeat.max(available_since);
    if let Some(f) = last_store_failure {
        since = since.max(f);
    }
    now - since > limit
}

fn store_err(e: impl std::fmt::Display) -> OpError {
    OpError::Store(e.to_string())
}

pub struct Sessions {
    kv: kv::Store,
    jobs: warden_shared::store::JobStore,
    /// The last time this replica saw the session store fail.
    last_store_failure: std::sync::Mutex<Option<chrono::DateTime<Utc>>>,
}

impl Sessions {
    pub fn new(kv: kv::Store, jobs: warden_shared::store::JobStore) -> Sessions {
        Sessions {
            kv,
            jobs,
            last_store_failure: std::sync::Mutex::new(None),
        }
    }

    /// The session store failed just now: no session's clock counts
    /// before this instant.
    fn store_failed(&self) {
        *self
            .last_store_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Utc::now());
    }

    fn last_store_failure(&self) -> Option<chrono::DateTime<Utc>> {
        *self
            .last_store_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub async fn get(&self, name: &str) -> Result<Option<(Session, u64)>, GetError> {
        let key = session_key(name);
        match self
            .kv
            .entry(key.clone())
            .await
            .map_err(|e| GetError::Store(e.to_string()))?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let s: Session =
                    serde_json::from_slice(&e.value).map_err(|error| GetError::Corrupt {
                        key,
                        error: error.to_string(),
                    })?;
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

    /// Writes `s` by compare-and-set on `rev`: `Ok(false)` when the record
    /// changed since it was read (the caller re-reads).
    async fn update(&self, s: &Session, rev: u64) -> Result<bool, OpError> {
        let body = serde_json::to_vec(s).map_err(store_err)?;
        match self
            .kv
            .update(session_key(&s.name), Bytes::from(body), rev)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost_race(&e) => {
                Ok(false)
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// Quarantines `old` (superseded by `new`) if it is still active, by
    /// compare-and-set on the revision read, re-reading when it changed
    /// (an expiry or a last heartbeat landing meanwhile).
    async fn quarantine(&self, old: &str, new: &str) -> Result<bool, OpError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut s, rev)) = self.get(old).await? else {
                return Ok(false);
            };
            if s.state != SessionState::Active {
                return Ok(false);
            }
            s.state = SessionState::Quarantined;
            s.superseded_by = Some(new.to_string());
            if self.update(&s, rev).await? {
                return Ok(true);
            }
        }
        Err(OpError::Store(format!(
            "session {old} kept changing; not quarantined"
        )))
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
            // `Ok(false)`: another create moved the pointer first; re-read.
            let won = match &current {
                None => match self
                    .kv
                    .create(bot_key(&req.bot_id), Bytes::from(name.clone()))
                    .await
                {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists || lost_race(&e) => {
                        false
                    }
                    Err(e) => return Err(store_err(e)),
                },
                Some((_, rev)) => match self
                    .kv
                    .update(bot_key(&req.bot_id), Bytes::from(name.clone()), *rev)
                    .await
                {
                    Ok(_) => true,
                    Err(e)
                        if e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost_race(&e) =>
                    {
                        false
                    }
                    Err(e) => return Err(store_err(e)),
                },
            };
            if won {
                break current.map(|(n, _)| n).filter(|n| !n.is_empty());
            }
        };
        if let Some(old) = previous {
            match self.quarantine(&old, &name).await {
                Ok(true) => {
                    info!(bot.id = %req.bot_id, old = %old, new = %name, "older session quarantined")
                }
                Ok(false) => {}
                // The pointer already names the new session, so the old
                // one is refused as superseded either way.
                Err(OpError::Corrupt(e)) => {
                    warn!(bot.id = %req.bot_id, old = %old, error = %e, "older session not quarantined")
                }
                Err(e) => return Err(e),
            }
        }
        info!(bot.id = %req.bot_id, session = %name, "session created");
        Ok(name)
    }

    /// The session if it exists and is its bot's current one.
    async fn current(&self, name: &str) -> Result<(Session, u64), OpError> {
        let Some((s, rev)) = self.get(name).await? else {
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
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost_race(&e) => {
                self.current(&req.session).await.map(|_| ())
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// Marks active sessions silent for longer than `timeout` (counting
    /// from `since` at the earliest, and never from before the last store
    /// failure: [`silent_past_limit`]) as expired; returns (bot, session).
    /// `None` when listing the sessions took longer than `max_listing`:
    /// the view may be stale (the bus was away), so nothing is expired. An
    /// undecodable record is skipped, counted and logged, and expires
    /// nobody's chance to be expired.
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
        let mut expired = Vec::new();
        for name in names {
            let (mut s, rev) = match self.get(&name).await {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(GetError::Corrupt { key, error }) => {
                    metrics().corrupt.inc();
                    warn!(key = %key, error = %error, "undecodable session record skipped");
                    continue;
                }
                Err(GetError::Store(e)) => return Err(e),
            };
            let limit = chrono::Duration::from_std(s.timeout(timeout))
                .unwrap_or(chrono::Duration::seconds(10));
            let silent = s.state == SessionState::Active
                && silent_past_limit(
                    Utc::now(),
                    s.last_heartbeat,
                    since,
                    self.last_store_failure(),
                    limit,
                );
            let counted = if silent {
                SessionState::Expired
            } else {
                s.state
            };
            *by_state.entry(counted).or_default() += 1;
            if !silent {
                continue;
            }
            s.state = SessionState::Expired;
            // CAS: a heartbeat that lands meanwhile wins.
            match self.update(&s, rev).await {
                Ok(true) => expired.push((s.bot_id, name)),
                Ok(false) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        metrics::set_sessions(|state| by_state.get(&state).copied().unwrap_or(0));
        Ok(Some(expired))
    }

    /// Closes the session by compare-and-set on the revision read; when
    /// it changed meanwhile (an expiry, a quarantine, a heartbeat) it is
    /// read again, and a session no longer current is refused as usual.
    async fn close(&self, req: CloseSession) -> Result<(), OpError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut s, rev) = self.current(&req.session).await?;
            s.state = SessionState::Closed;
            if self.update(&s, rev).await? {
                return Ok(());
            }
        }
        Err(OpError::Store(format!(
            "session {} kept changing; not closed",
            req.session
        )))
    }
}

/// Expires sessions silent past the timeout. The clock only counts time
/// during which heartbeats could have been recorded: after this service's
/// start, after any stretch in which it was blind (disconnected, sweeps
/// stalled), and after the last time the session store failed (a sweep,
/// or a create, heartbeat or close of any bot), every session gets a full
/// timeout to heartbeat again, so an outage of NATS, of the store or of
/// this service never evicts the whole fleet.
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
            Err(e) => {
                sessions.store_failed();
                warn!(error = %e, "cannot sweep sessions; every session's clock restarts when the store works again");
            }
        }
    }
}

/// Runs the session service until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), FencingError> {
    warden_shared::metrics::starting("fencing");
    metrics::init();
    let Some((client, handles)) =
        runtime::connect_with_topology_until(&config, "fencing", &shutdown).await?
    else {
        return Ok(());
    };
    let sessions = Arc::new(Sessions::new(
        handles.sessions.clone(),
        warden_shared::store::JobStore::new(handles.jobs.clone()),
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
            r = create.next() => (Op::Create, r),
            r = heartbeat.next() => (Op::Heartbeat, r),
            r = close.next() => (Op::Close, r),
        };
        let Some(req) = req else { break };
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let payload = req.message.payload.clone();
            let result: Result<(Option<String>, Vec<uuid::Uuid>), OpError> = match op {
                Op::Create => match serde_json::from_slice::<CreateSession>(&payload) {
                    Ok(r) => sessions.create(r).await.map(|n| (Some(n), Vec::new())),
                    Err(e) => Err(OpError::Rejected(INVALID_REQUEST, e.to_string())),
                },
                Op::Heartbeat => match serde_json::from_slice::<Heartbeat>(&payload) {
                    Ok(r) => sessions.heartbeat(r).await.map(|c| (None, c)),
                    Err(e) => Err(OpError::Rejected(INVALID_REQUEST, e.to_string())),
                },
                Op::Close => match serde_json::from_slice::<CloseSession>(&payload) {
                    Ok(r) => sessions.close(r).await.map(|_| (None, Vec::new())),
                    Err(e) => Err(OpError::Rejected(INVALID_REQUEST, e.to_string())),
                },
            };
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
            let bytes = warden_shared::messages::encode_reply(&reply);
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn t(s: i64) -> chrono::DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn silence_counts_from_the_latest_of_heartbeat_start_and_store_failure() {
        let limit = Duration::seconds(10);
        // Plain silence: expired once past the limit.
        assert!(!silent_past_limit(t(10), t(0), t(0), None, limit));
        assert!(silent_past_limit(t(11), t(0), t(0), None, limit));
        // The service started (or saw the bus again) later: a full limit
        // from then.
        assert!(!silent_past_limit(t(11), t(0), t(5), None, limit));
        assert!(silent_past_limit(t(16), t(0), t(5), None, limit));
        // The store failed at 8: nobody expires before 18, however long
        // they were silent before.
        assert!(!silent_past_limit(t(17), t(0), t(0), Some(t(8)), limit));
        assert!(!silent_past_limit(t(18), t(0), t(0), Some(t(8)), limit));
        assert!(silent_past_limit(t(19), t(0), t(0), Some(t(8)), limit));
        // A heartbeat after the failure counts from itself.
        assert!(!silent_past_limit(t(21), t(12), t(0), Some(t(8)), limit));
        assert!(silent_past_limit(t(23), t(12), t(0), Some(t(8)), limit));
    }

    #[test]
    fn every_op_has_its_metrics_label() {
        for op in [Op::Create, Op::Heartbeat, Op::Close] {
            assert!(metrics::OPS.contains(&op.as_str()), "{op:?}");
        }
    }
}
