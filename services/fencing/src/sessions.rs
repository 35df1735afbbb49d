//! The session store (`warden_sessions`): reads, compare-and-set writes,
//! and the operations built of them (decisions in `decide`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tracing::{info, warn};
use uuid::Uuid;
use warden_shared::bots::{self, BotRecord};
use warden_shared::cas::{
    self, Change, Failure, KvError, KvKey, KvText, Never, Outcome, Retry, Step,
};
use warden_shared::clock::{self, Clock};
use warden_shared::config::FencingConfig;
use warden_shared::messages::{CloseSession, CreateSession, Heartbeat};
use warden_shared::session::{bot_key, session_key, Session, SessionState};
use warden_shared::store::lost_race;

use crate::decide::{self, SweepClock};
use crate::metrics::{self, metrics};
use crate::{store_err, GetError, OpError};

/// Why a sweep stopped before its end (the store failed); nothing it had
/// not written yet was expired.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SweepError {
    #[error("cannot list the sessions: {0}")]
    List(#[from] kv::WatchError),
    #[error("cannot list the sessions: {0}")]
    ListKey(#[from] kv::WatcherError),
    #[error(transparent)]
    Read(GetError),
    #[error(transparent)]
    Write(OpError),
}

/// How often a compare-and-set on a session record is tried in all (the
/// record re-read each time it changed under the write).
const CAS_ATTEMPTS: u32 = 5;

/// A quarantine: after a lost race, read again after a jittered pause.
const QUARANTINE: Retry = Retry {
    attempts: CAS_ATTEMPTS,
    ..Retry::DEFAULT
};

/// A close: after a lost race, read again (session and pointer) at once.
const CLOSE: Retry = Retry {
    attempts: CAS_ATTEMPTS,
    on_conflict: cas::OnConflict::AtOnce,
    ..Retry::DEFAULT
};

/// Pointing a bot at its new session: after a lost race (another create
/// of the same bot moved the pointer first), read again at once.
const POINT: Retry = Retry {
    attempts: 16,
    on_conflict: cas::OnConflict::AtOnce,
    ..Retry::DEFAULT
};

/// Closing session `name`: refused unless it exists and is its bot's
/// current one, the pointer read on every attempt.
struct Close<'a> {
    sessions: &'a Sessions,
    name: &'a str,
    /// The bot the request's subject names.
    bot: &'a str,
}

impl Change<Session> for Close<'_> {
    type Write = ();
    type Stop = Never;
    type Error = OpError;

    async fn step(
        &mut self,
        current: Option<Session>,
    ) -> Result<Step<Session, (), Never>, OpError> {
        let Some(s) = current else {
            return Err(decide::unknown(self.name).into());
        };
        decide::owns(self.bot, self.name, &s)?;
        let pointer = self.sessions.current_of(&s.bot_id).await?;
        decide::is_current(self.name, &s, pointer.as_ref().map(|(n, _)| n.as_str()))?;
        Ok(Step::Write(decide::close(s, self.sessions.now()), ()))
    }
}

/// A session store failure of a compare-and-set, as the answer's error:
/// an undecodable record is corrupt, anything else the store's fault.
fn kv_error(key: &str, e: &KvError) -> OpError {
    match e {
        KvError::Decode(error) => OpError::Corrupt(
            GetError::Corrupt {
                key: key.to_string(),
                error: error.to_string(),
            }
            .to_string(),
        ),
        KvError::Read(e) => store_err(e),
        KvError::Create(e) => store_err(e),
        KvError::Update(e) => store_err(e),
        KvError::Encode(e) => store_err(e),
    }
}

/// What the fencing service enforces beyond newest-wins (`[fencing]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub require_registered_bots: bool,
    pub session_creates_per_minute: u32,
    pub closed_session_retention: std::time::Duration,
}

impl Limits {
    pub fn from_config(c: &FencingConfig) -> Limits {
        Limits {
            require_registered_bots: c.require_registered_bots,
            session_creates_per_minute: c.session_creates_per_minute,
            closed_session_retention: c.closed_session_retention,
        }
    }
}

/// Who asks for a session: a bot for itself (on its own subject) or the
/// API service for an external executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Creator {
    Bot,
    Executor,
}

pub struct Sessions {
    kv: kv::Store,
    jobs: warden_shared::store::JobStore,
    /// The bot registry (`warden_bots`).
    bots: kv::Store,
    limits: Limits,
    /// Each bot's accepted creates of the last minute (this replica's).
    recent_creates: Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>,
    /// The last time this replica saw the session store fail.
    last_store_failure: Mutex<Option<DateTime<Utc>>>,
    /// Where every decision reads the time.
    clock: Arc<dyn Clock>,
}

impl Sessions {
    pub fn new(
        kv: kv::Store,
        jobs: warden_shared::store::JobStore,
        bots: kv::Store,
        limits: Limits,
    ) -> Sessions {
        Sessions::with_clock(kv, jobs, bots, limits, clock::system())
    }

    /// [`Sessions::new`] reading the time from `clock`.
    pub fn with_clock(
        kv: kv::Store,
        jobs: warden_shared::store::JobStore,
        bots: kv::Store,
        limits: Limits,
        clock: Arc<dyn Clock>,
    ) -> Sessions {
        Sessions {
            kv,
            jobs,
            bots,
            limits,
            recent_creates: Mutex::new(HashMap::new()),
            last_store_failure: Mutex::new(None),
            clock,
        }
    }

    /// The time every decision is taken at.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The session store failed just now: no session's clock counts
    /// before this instant.
    pub(crate) fn store_failed(&self) {
        let now = self.now();
        *self
            .last_store_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    fn last_store_failure(&self) -> Option<DateTime<Utc>> {
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
        let key = session_key(old);
        let now = self.now();
        let step = cas::decide(|current: Option<Session>| {
            Ok::<_, Never>(
                match current.and_then(|s| decide::quarantine(s, new, now)) {
                    Some(q) => Step::Write(q, ()),
                    None => Step::Stop(()),
                },
            )
        });
        match cas::run(&KvKey::new(&self.kv, &key), QUARANTINE, step).await {
            Ok(Outcome::Written { .. }) => Ok(true),
            Ok(Outcome::Stopped(())) => Ok(false),
            Err(Failure::Conflict { .. }) => Err(OpError::Store(format!(
                "session {old} kept changing; not quarantined"
            ))),
            Err(Failure::Store { key, source, .. }) if source.is_corrupt() => {
                Err(OpError::Corrupt(source.describe(&key)))
            }
            Err(Failure::Store { key, source, .. }) => Err(OpError::Store(source.describe(&key))),
            Err(Failure::Refused(never)) => match never {},
        }
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

    /// Points `bot_id` at session `name` by compare-and-set on the
    /// pointer, so of two concurrent creates exactly one is current and
    /// the other is told; returns the session it named before (none when
    /// absent, empty or deleted).
    async fn point(&self, bot_id: &str, name: &str) -> Result<Option<String>, OpError> {
        let key = bot_key(bot_id);
        let step = cas::decide(|current: Option<String>| {
            Ok::<Step<_, _, ()>, Never>(Step::Write(name.to_string(), decide::previous(current)))
        });
        match cas::run(&KvText::new(&self.kv, &key), POINT, step).await {
            Ok(Outcome::Written { with: previous, .. }) => Ok(previous),
            Ok(Outcome::Stopped(())) => Ok(None),
            Err(Failure::Conflict { attempts, .. }) => Err(OpError::Store(format!(
                "the session pointer of bot {bot_id} kept changing ({attempts} attempts)"
            ))),
            Err(Failure::Store { key, source, .. }) => Err(kv_error(&key, &source)),
            Err(Failure::Refused(never)) => match never {},
        }
    }

    /// `bot_id`'s registry record, if it has one.
    async fn record_of(&self, bot_id: &str) -> Result<Option<BotRecord>, OpError> {
        let key = bots::record_key(bot_id);
        match self.bots.entry(key.clone()).await.map_err(store_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                serde_json::from_slice(&e.value).map(Some).map_err(|error| {
                    OpError::Corrupt(
                        GetError::Corrupt {
                            key: format!("{}/{key}", warden_shared::subjects::BOTS_BUCKET),
                            error: error.to_string(),
                        }
                        .to_string(),
                    )
                })
            }
            _ => Ok(None),
        }
    }

    /// The per-bot create limit ([`decide::admit_create`]).
    fn admit_create(&self, bot_id: &str) -> Result<(), OpError> {
        let now = self.now();
        let mut recent = self
            .recent_creates
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Bots with no create in the last minute take no memory.
        if recent.len() > 1024 {
            let window = chrono::Duration::minutes(1);
            recent.retain(|_, times| times.back().is_some_and(|t| now - *t < window));
        }
        let times = recent.entry(bot_id.to_string()).or_default();
        decide::admit_create(times, now, self.limits.session_creates_per_minute)?;
        Ok(())
    }

    /// A create on the subject of `subject_bot`: refused unless the body
    /// names that bot, within the create limit and (for a bot) what its
    /// registry record allows; nothing is written when refused.
    pub(crate) async fn create(
        &self,
        subject_bot: &str,
        creator: Creator,
        req: CreateSession,
    ) -> Result<String, OpError> {
        decide::validate_create(&req)?;
        decide::same_bot(subject_bot, &req)?;
        self.admit_create(&req.bot_id)?;
        let record = self.record_of(&req.bot_id).await?;
        match creator {
            Creator::Bot => {
                decide::allowed(&req, record.as_ref(), self.limits.require_registered_bots)?
            }
            Creator::Executor => decide::executor_allowed(&req, record.as_ref())?,
        }
        let name = Uuid::new_v4().to_string();
        let session = decide::new_session(&req, name.clone(), self.now());
        self.put(&session).await?;
        if let Some(old) = self.point(&req.bot_id, &name).await? {
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

    /// The session if it exists, is `bot`'s and is its current one.
    async fn current(&self, bot: &str, name: &str) -> Result<(Session, u64), OpError> {
        let Some((s, rev)) = self.get(name).await? else {
            return Err(decide::unknown(name).into());
        };
        decide::owns(bot, name, &s)?;
        let pointer = self.current_of(&s.bot_id).await?;
        decide::is_current(name, &s, pointer.as_ref().map(|(n, _)| n.as_str()))?;
        Ok((s, rev))
    }

    /// Leases the bot reports holding that are no longer its own (the job
    /// moved to another attempt or session): it must stop them.
    async fn stale_leases(&self, req: &Heartbeat) -> Vec<Uuid> {
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

    /// A heartbeat on the subject of `bot`: refused (and nothing changed)
    /// unless it names `bot`'s current session and lists at most its
    /// capacity of leases.
    pub(crate) async fn heartbeat(&self, bot: &str, req: Heartbeat) -> Result<Vec<Uuid>, OpError> {
        self.renew(bot, &req).await?;
        Ok(self.stale_leases(&req).await)
    }

    async fn renew(&self, bot: &str, req: &Heartbeat) -> Result<(), OpError> {
        let (s, rev) = self.current(bot, &req.session).await?;
        decide::leases_within_capacity(&s, req.leases.len())?;
        let s = decide::renew(s, req.leases.clone(), self.now());
        // CAS: a concurrent quarantine must not be overwritten by a late
        // heartbeat of the old session.
        if self.update(&s, rev).await? {
            Ok(())
        } else {
            self.current(bot, &req.session).await.map(|_| ())
        }
    }

    /// Marks active sessions silent for longer than `timeout` (counting
    /// from `since` at the earliest, and never from before the last store
    /// failure: [`decide::silent_past_limit`]) as expired; returns (bot,
    /// session). `None` when listing the sessions took longer than
    /// `max_listing`: the view may be stale (the bus was away), so nothing
    /// is expired. An undecodable record is skipped, counted and logged,
    /// and expires nobody's chance to be expired.
    pub(crate) async fn sweep(
        &self,
        timeout: std::time::Duration,
        since: DateTime<Utc>,
        max_listing: std::time::Duration,
    ) -> Result<Option<Vec<(String, String)>>, SweepError> {
        let started = std::time::Instant::now();
        let mut keys = self.kv.keys().await?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k?;
            if let Some(name) = k.strip_prefix("session.") {
                names.push(name.to_string());
            }
        }
        if started.elapsed() > max_listing {
            return Ok(None);
        }
        let mut by_state = std::collections::HashMap::new();
        let mut expired = Vec::new();
        for name in names {
            let (s, rev) = match self.get(&name).await {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(GetError::Corrupt { key, error }) => {
                    metrics().corrupt.inc();
                    warn!(key = %key, error = %error, "undecodable session record skipped");
                    continue;
                }
                Err(e @ GetError::Store(_)) => return Err(SweepError::Read(e)),
            };
            if decide::retired(&s, self.now(), self.limits.closed_session_retention) {
                match self.delete(&s, rev).await {
                    Ok(true) => {
                        metrics().deleted.inc();
                        info!(bot.id = %s.bot_id, session = %name, state = s.state.as_str(), "ended session deleted after the retention");
                    }
                    Ok(false) => decide::count(&mut by_state, s.state),
                    Err(e) => return Err(SweepError::Write(e)),
                }
                continue;
            }
            let clock = SweepClock {
                now: self.now(),
                available_since: since,
                last_store_failure: self.last_store_failure(),
                default_timeout: timeout,
            };
            let Some(gone) = decide::expire(&s, &clock) else {
                decide::count(&mut by_state, s.state);
                continue;
            };
            decide::count(&mut by_state, SessionState::Expired);
            // CAS: a heartbeat that lands meanwhile wins.
            match self.update(&gone, rev).await {
                Ok(true) => expired.push((gone.bot_id, name)),
                Ok(false) => {}
                Err(e) => return Err(SweepError::Write(e)),
            }
        }
        metrics::set_sessions(|state| by_state.get(&state).copied().unwrap_or(0));
        Ok(Some(expired))
    }

    /// Deletes the ended session `s` (read at `rev`) and its bot's
    /// pointer if that still names it, each by compare-and-set: a record
    /// that changed meanwhile is left for the next sweep (`Ok(false)`),
    /// a pointer that moved to a newer session is kept.
    async fn delete(&self, s: &Session, rev: u64) -> Result<bool, OpError> {
        match self
            .kv
            .delete_expect_revision(session_key(&s.name), Some(rev))
            .await
        {
            Ok(()) => {}
            Err(e) if lost_race(&e) => return Ok(false),
            Err(e) => return Err(store_err(e)),
        }
        if let Some((pointed, prev)) = self.current_of(&s.bot_id).await? {
            if pointed == s.name {
                match self
                    .kv
                    .delete_expect_revision(bot_key(&s.bot_id), Some(prev))
                    .await
                {
                    Ok(()) => {}
                    // A create moved it meanwhile: it names the new one.
                    Err(e) if lost_race(&e) => {}
                    Err(e) => return Err(store_err(e)),
                }
            }
        }
        Ok(true)
    }

    /// Closes the session by compare-and-set on the revision read; when
    /// it changed meanwhile (an expiry, a quarantine, a heartbeat) it is
    /// read again, and a session no longer current is refused as usual.
    pub(crate) async fn close(&self, bot: &str, req: CloseSession) -> Result<(), OpError> {
        let key = session_key(&req.session);
        let step = Close {
            sessions: self,
            name: &req.session,
            bot,
        };
        match cas::run(&KvKey::new(&self.kv, &key), CLOSE, step).await {
            Ok(Outcome::Written { .. }) => Ok(()),
            Ok(Outcome::Stopped(never)) => match never {},
            Err(Failure::Conflict { .. }) => Err(OpError::Store(format!(
                "session {} kept changing; not closed",
                req.session
            ))),
            Err(Failure::Store { key, source, .. }) => Err(kv_error(&key, &source)),
            Err(Failure::Refused(e)) => Err(e),
        }
    }
}
