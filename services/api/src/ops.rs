//! The API's operations, independent of transport: HTTP and NATS both
//! decode a request, call one of these, and encode the result or the
//! [`OpError`] the same way.

use std::sync::Arc;
use std::time::Duration;
use warden_shared::cas::{self, Backoff, Never, OnConflict, Outcome, Retry, Step};
use warden_shared::error::ErrorCode;

use chrono::{DateTime, Utc};
use uuid::Uuid;
use warden_shared::config::{valid_name, valid_task_name};
use warden_shared::messages::ErrorBody;
use warden_shared::state::IllegalTransition;
use warden_shared::store::{JobStore, StoreError};
use warden_shared::{Blame, Config, Job, JobState, JobSummary};

use crate::history::Cursor;
use crate::index::{Filter, SharedIndex, Stats};
use crate::types::{
    BotsQuery, BotsReply, ListQuery, ListReply, ResourcesReply, StatsQuery, DEFAULT_LIMIT,
    MAX_LIMIT,
};
use warden_shared::job::{idempotent_job_id, valid_idempotency_key, NewJob, MAX_IDEMPOTENCY_KEY};
use warden_shared::session::SessionState;

/// Who the history names as the creator of jobs made through the API.
pub const ACTOR: &str = "api";

/// Longest cancel reason kept in the history.
pub const MAX_REASON: usize = 1000;

/// Jobs created in the same microsecond as a cursor's that a page after
/// it reads and drops (they come at or before it).
const CURSOR_TIES: usize = 64;

/// Longest full-text query (`q`), in characters.
pub const MAX_QUERY: usize = 200;

/// Reads a retry or cancel makes before it gives up on a job that other
/// writers (the scheduler, a second API replica) keep changing under it:
/// each conflict means someone else's write landed, so a few are normal
/// and many mean the caller should look again. Lost races are retried at
/// once; a store error is answered at once (the caller retries).
const CHANGE: Retry = Retry {
    attempts: 8,
    on_conflict: OnConflict::AtOnce,
    store_errors: Backoff::NONE,
};

/// How long a search waits for the index's first pass after a start.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Why an operation failed: a stable code, an HTTP status and words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub status: u16,
    pub body: ErrorBody,
}

/// The HTTP status of each error code the API returns (the same over
/// NATS, in `Nats-Service-Error-Code`); `None` for a code the API never
/// returns. `docs/api.md` and `openapi.json` list the same table (checked
/// by `tests/openapi.rs`).
pub fn api_status(code: ErrorCode) -> Option<u16> {
    use ErrorCode::*;
    Some(match code {
        InvalidJson
        | InvalidRequest
        | InvalidBody
        | InvalidQuery
        | InvalidId
        | UnknownTask
        | InvalidArgs
        | InvalidPool
        | InvalidMaxAttempts
        | InvalidIdempotencyKey
        | InvalidState
        | InvalidBlame
        | InvalidDetail
        | InvalidOutcome
        | InvalidTime
        | InvalidWindow
        | InvalidBotId
        | InvalidWait
        | InvalidTimeout
        | InvalidToken
        | TokenMismatch => 400,
        Unauthorized => 401,
        NotFound => 404,
        MethodNotAllowed => 405,
        IllegalTransition | Conflict | IdempotencyConflict | StaleExecution | Cancelled
        | SessionExpired => 409,
        TooLarge => 413,
        Internal => 500,
        Unavailable => 503,
        UnknownSession | SessionSuperseded | ResourceUnavailable | UnknownResource
        | BotUnidentified | BotMismatch | NotYourSession | BotNotRegistered | BotRegistered
        | PoolNotAllowed | CapacityNotAllowed | RateLimited | TooManyLeases | Unknown => {
            return None
        }
    })
}

impl OpError {
    /// An error with `code`, its status from [`api_status`] (500 for a
    /// code the API does not return: a bug).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            status: api_status(code).unwrap_or(500),
            body: ErrorBody::new(code, message),
        }
    }

    /// [`OpError::new`] for a code of a 400.
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        debug_assert_eq!(api_status(code), Some(400), "{code} is not a 400");
        OpError::new(code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        OpError::new(ErrorCode::NotFound, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        OpError::new(ErrorCode::TooLarge, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        OpError::new(ErrorCode::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        OpError::new(ErrorCode::Internal, message)
    }

    /// A request body that is not what the operation takes: broken JSON
    /// is `invalid_json`, well-formed JSON of the wrong shape (unknown or
    /// missing fields, wrong types) is `invalid_request`.
    pub fn from_json(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => OpError::bad_request(ErrorCode::InvalidRequest, e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => OpError::bad_request(
                ErrorCode::InvalidJson,
                format!("request body is not valid JSON: {e}"),
            ),
        }
    }

    fn from_history(e: warden_history::DbError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "history database unavailable");
            OpError::unavailable("the history database is unavailable; try again")
        } else {
            tracing::error!(error = %e, "history database query failed");
            OpError::internal("the history database could not answer")
        }
    }

    fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "job store unavailable");
                OpError::unavailable("the job store is unavailable; try again")
            }
            StoreError::TooLarge => {
                OpError::too_large("the job is larger than the job store allows")
            }
            StoreError::AlreadyExists(id) => {
                OpError::new(ErrorCode::Conflict, format!("job {id} already exists"))
            }
            StoreError::Conflict(id) => OpError::new(
                ErrorCode::Conflict,
                format!("job {id} changed concurrently"),
            ),
            StoreError::Corrupt { key, source } => {
                tracing::error!(job.id = %key, error = %source, "job record is not valid JSON");
                OpError::internal(format!("job record {key} is corrupt"))
            }
        }
    }
}

/// A job id from a path or a request body: `400 invalid_id` if it is
/// not a UUID.
pub(crate) fn parse_id(id: &str) -> Result<Uuid, OpError> {
    id.parse::<Uuid>().map_err(|_| {
        OpError::bad_request(
            ErrorCode::InvalidId,
            format!("{id:?} is not a job id (a UUID)"),
        )
    })
}

/// What the operations need.
pub struct Ops {
    pub config: Arc<Config>,
    /// Asked for its connection state only: while it is down, requests
    /// that need the bus get a 503 at once instead of after a timeout.
    pub client: async_nats::Client,
    /// Where an external executor's reports are published.
    pub js: async_nats::jetstream::Context,
    pub store: JobStore,
    pub index: Arc<SharedIndex>,
    /// The resources bucket (a few thousand records at most: read as is).
    pub resources: async_nats::jetstream::kv::Store,
    /// The sessions bucket (one record per bot session; read as is).
    pub sessions: async_nats::jetstream::kv::Store,
    /// The execution database: archived jobs (`[history] database`).
    pub history: crate::history::History,
}

impl Ops {
    /// Every resource with its state, reason, since, dependents, sessions
    /// and recent checks.
    pub async fn resources(&self) -> Result<ResourcesReply, OpError> {
        let all = self.resource_records().await?;
        Ok(ResourcesReply {
            resources: warden_shared::resource::listing(&all),
        })
    }

    /// Every resource record as stored.
    pub async fn resource_records(
        &self,
    ) -> Result<Vec<warden_shared::resource::Resource>, OpError> {
        self.bus_up()?;
        warden_shared::resource::list(&self.resources)
            .await
            .map_err(|e| OpError::unavailable(format!("cannot read resources: {e}")))
    }

    /// Waits (briefly) for the index's first pass over the bucket: a
    /// search or count before it would miss jobs. 503 if it is not done.
    pub async fn index_ready(&self) -> Result<(), OpError> {
        if !self.index.is_caught_up() && !self.index.wait_caught_up(CATCH_UP_WAIT).await {
            return Err(OpError::unavailable(
                "the job index is still loading; try again",
            ));
        }
        Ok(())
    }

    /// Every bot session on record (optionally in one state), by bot and
    /// newest first: workers and external executors alike.
    pub async fn bots(&self, q: BotsQuery) -> Result<BotsReply, OpError> {
        let state = match q.state.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => Some(
                SessionState::ALL
                    .into_iter()
                    .find(|st| st.as_str().eq_ignore_ascii_case(s))
                    .ok_or_else(|| {
                        OpError::bad_request(
                            ErrorCode::InvalidState,
                            format!(
                            "{s:?} is not a session state (active, quarantined, expired, closed)"
                        ),
                        )
                    })?,
            ),
            None => None,
        };
        self.bus_up()?;
        let mut bots = warden_shared::session::list(&self.sessions)
            .await
            .map_err(|e| OpError::unavailable(format!("cannot read sessions: {e}")))?;
        if let Some(st) = state {
            bots.retain(|s| s.state == st);
        }
        Ok(BotsReply { bots })
    }

    pub(crate) fn bus_up(&self) -> Result<(), OpError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(OpError::unavailable("not connected to NATS; try again")),
        }
    }

    /// Creates a job. With an idempotency key the id is derived from the
    /// key and the create is create-if-absent: a create with a key already
    /// used returns that job (`replayed`) if it asked for the same job, and
    /// is refused `idempotency_conflict` if it asked for another.
    pub async fn create(&self, req: NewJob) -> Result<Created, OpError> {
        let Some(task) = self.config.tasks.get(&req.task) else {
            let known: Vec<&str> = self.config.tasks.keys().map(String::as_str).collect();
            return Err(OpError::bad_request(
                ErrorCode::UnknownTask,
                format!(
                    "task {:?} is not defined (known: {})",
                    req.task,
                    known.join(", ")
                ),
            ));
        };
        if let Some(bad) = req.args.keys().find(|k| !valid_name(k)) {
            return Err(OpError::bad_request(
                ErrorCode::InvalidArgs,
                format!("argument name {bad:?}: argument names are letters, digits and _"),
            ));
        }
        let pool = match req.pool {
            Some(p) if !valid_task_name(&p) => {
                return Err(OpError::bad_request(
                    ErrorCode::InvalidPool,
                    format!("pool {p:?}: pool names are letters, digits, _, - and ."),
                ))
            }
            Some(p) => p,
            None => task.pool.clone(),
        };
        let priority = req.priority.unwrap_or(task.priority);
        if req.max_attempts == Some(0) {
            return Err(OpError::bad_request(
                ErrorCode::InvalidMaxAttempts,
                "max_attempts must be at least 1",
            ));
        }
        if let Some(key) = &req.idempotency_key {
            if !valid_idempotency_key(key) {
                return Err(OpError::bad_request(
                    ErrorCode::InvalidIdempotencyKey,
                    format!(
                        "idempotency_key: 1 to {MAX_IDEMPOTENCY_KEY} characters, no control characters"
                    ),
                ));
            }
        }
        self.bus_up()?;
        let id = match &req.idempotency_key {
            Some(key) => idempotent_job_id(key),
            None => Uuid::new_v4(),
        };
        let mut job = Job::new(
            id,
            req.task,
            req.args,
            pool,
            priority,
            None,
            ACTOR,
            Utc::now(),
        );
        job.retry = req.retry.unwrap_or(true);
        job.max_attempts = req.max_attempts;
        job.idempotency_key = req.idempotency_key;
        match self.store.create(&job).await {
            Ok(_) => {}
            Err(StoreError::AlreadyExists(_)) if job.idempotency_key.is_some() => {
                let existing = self.get(&job.id).await?;
                if !same_request(&existing, &job) {
                    return Err(OpError::new(
                        ErrorCode::IdempotencyConflict,
                        format!(
                            "idempotency key {:?} was used for job {} with another task, arguments, pool, priority or retry options",
                            job.idempotency_key.as_deref().unwrap_or_default(),
                            existing.id
                        ),
                    ));
                }
                tracing::info!(job.id = %existing.id, "create replayed: the idempotency key names an existing job");
                return Ok(Created {
                    job: existing,
                    replayed: true,
                });
            }
            Err(e) => return Err(OpError::from_store(e)),
        }
        tracing::info!(job.id = %job.id, task = %job.task, pool = %job.pool, "job created");
        Ok(Created {
            job,
            replayed: false,
        })
    }

    /// The job with its history, read from the bucket (never the index,
    /// which holds summaries and may lag).
    pub async fn get_str(&self, id: &str) -> Result<Job, OpError> {
        let id = parse_id(id)?;
        self.get(&id).await
    }

    /// From the bucket, else (archived) from the history database.
    pub async fn get(&self, id: &Uuid) -> Result<Job, OpError> {
        self.bus_up()?;
        match self.store.get(id).await.map_err(OpError::from_store)? {
            Some(v) => Ok(v.job),
            None => match self.archived(id).await? {
                Some(job) => Ok(job),
                None => Err(OpError::not_found(format!("no job {id}"))),
            },
        }
    }

    /// The job as the history database last recorded it, if there is a
    /// database and it has the job.
    async fn archived(&self, id: &Uuid) -> Result<Option<Job>, OpError> {
        if !self.history.configured() {
            return Ok(None);
        }
        let db = self.history_db().await?;
        db.get(id)
            .await
            .map(|found| found.map(|(_, job)| job))
            .map_err(OpError::from_history)
    }

    /// The open history database (waiting briefly after a start), or 503
    /// while it is not open.
    async fn history_db(&self) -> Result<warden_history::HistoryDb, OpError> {
        self.history
            .db(CATCH_UP_WAIT)
            .await
            .ok_or_else(|| OpError::unavailable("the history database is unavailable; try again"))
    }

    /// Counts by state, blame and detail over the jobs last changed within
    /// `window` (default 24 hours) of now.
    pub async fn stats(&self, q: StatsQuery) -> Result<Stats, OpError> {
        let window = match q.window.as_deref().map(str::trim).filter(|w| !w.is_empty()) {
            Some(w) => humantime_serde::re::humantime::parse_duration(w).map_err(|e| {
                OpError::bad_request(
                    ErrorCode::InvalidWindow,
                    format!("window {w:?} is not a duration like 1h or 7days: {e}"),
                )
            })?,
            None => Duration::from_secs(24 * 3600),
        };
        let window = chrono::Duration::from_std(window)
            .map_err(|_| OpError::bad_request(ErrorCode::InvalidWindow, "window is too long"))?;
        self.index_ready().await?;
        let now = Utc::now();
        let since = now
            .checked_sub_signed(window)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut stats = self.index.lock().stats(since, now);
        if self.history.configured() {
            let counts = self
                .history_db()
                .await?
                .counts(since, now)
                .await
                .map_err(OpError::from_history)?;
            crate::history::add_counts(&mut stats, &counts);
        }
        Ok(stats)
    }

    /// A person's retry: SHELVED, CRASHED or CANCELLED → SCHEDULED with a
    /// fresh attempt budget.
    pub async fn retry(&self, id: &str) -> Result<Job, OpError> {
        self.change(id, "retry", |job, now| job.retry_by(ACTOR, now))
            .await
    }

    /// SCHEDULED or RUNNING → CANCELLED; a running worker is told to stop
    /// at its next heartbeat.
    pub async fn cancel(&self, id: &str, reason: Option<String>) -> Result<Job, OpError> {
        if reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REASON)
        {
            return Err(OpError::bad_request(
                ErrorCode::InvalidRequest,
                format!("reason is longer than {MAX_REASON} characters"),
            ));
        }
        let reason = reason.filter(|r| !r.trim().is_empty());
        self.change(id, "cancel", |job, now| {
            job.cancel_by(ACTOR, reason.as_deref(), now)
        })
        .await
    }

    /// Reads, changes and compare-and-sets one job; re-reads on a
    /// concurrent write. Nothing is written when `f` refuses.
    async fn change(
        &self,
        id: &str,
        what: &'static str,
        f: impl Fn(&mut Job, chrono::DateTime<Utc>) -> Result<(), IllegalTransition>,
    ) -> Result<Job, OpError> {
        let id = parse_id(id)?;
        self.bus_up()?;
        if let Some(job) = self.revive(&id, what, &f).await? {
            return Ok(job);
        }
        let step = cas::decide(|current: Option<Job>| {
            let Some(mut job) = current else {
                return Err(OpError::not_found(format!("no job {id}")));
            };
            let from = job.state;
            if let Err(e) = f(&mut job, Utc::now()) {
                tracing::debug!(job.id = %id, from = %from, action = what, "job change refused");
                return Err(OpError::new(ErrorCode::IllegalTransition, e.to_string()));
            }
            Ok(Step::<Job, JobState, Never>::Write(job, from))
        });
        match cas::run(&self.store.at(id), CHANGE, step).await {
            Ok(Outcome::Written {
                value: job,
                with: from,
                ..
            }) => {
                crate::metrics::count_transition(from, job.state);
                tracing::info!(job.id = %id, from = %from, to = %job.state, action = what, "job changed by hand");
                Ok(job)
            }
            Ok(Outcome::Stopped(never)) => match never {},
            Err(cas::Failure::Refused(e)) => Err(e),
            Err(cas::Failure::Store { source, .. }) => Err(OpError::from_store(source)),
            Err(cas::Failure::Conflict { .. }) => Err(OpError::new(
                ErrorCode::Conflict,
                format!("job {id} keeps changing; try again"),
            )),
        }
    }

    /// A change to an archived job (one the bucket no longer holds): the
    /// changed job is created in the bucket again, live. `None`: the
    /// bucket holds it (or it was created again meanwhile); change it
    /// there.
    async fn revive(
        &self,
        id: &Uuid,
        what: &'static str,
        f: &impl Fn(&mut Job, chrono::DateTime<Utc>) -> Result<(), IllegalTransition>,
    ) -> Result<Option<Job>, OpError> {
        if !self.history.configured()
            || self
                .store
                .get(id)
                .await
                .map_err(OpError::from_store)?
                .is_some()
        {
            return Ok(None);
        }
        let Some(mut job) = self.archived(id).await? else {
            return Ok(None);
        };
        let from = job.state;
        if let Err(e) = f(&mut job, Utc::now()) {
            tracing::debug!(job.id = %id, from = %from, action = what, "archived job change refused");
            return Err(OpError::new(ErrorCode::IllegalTransition, e.to_string()));
        }
        match self.store.create(&job).await {
            Ok(_) => {
                crate::metrics::count_transition(from, job.state);
                tracing::info!(job.id = %id, from = %from, to = %job.state, action = what, "archived job changed by hand: live again");
                Ok(Some(job))
            }
            // Someone else brought it back first: change the live one.
            Err(StoreError::AlreadyExists(_)) => Ok(None),
            Err(e) => Err(OpError::from_store(e)),
        }
    }

    pub async fn list(&self, q: ListQuery) -> Result<ListReply, OpError> {
        let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
        let state = match nonempty(q.state) {
            Some(s) => Some(
                s.trim()
                    .parse::<JobState>()
                    .map_err(|e| OpError::bad_request(ErrorCode::InvalidState, e))?,
            ),
            None => None,
        };
        let blame = match nonempty(q.blame) {
            Some(b) => Some(
                b.trim()
                    .parse::<Blame>()
                    .map_err(|e| OpError::bad_request(ErrorCode::InvalidBlame, e))?,
            ),
            None => None,
        };
        let instant = |what: &str, s: Option<String>| -> Result<Option<DateTime<Utc>>, OpError> {
            match nonempty(s) {
                Some(t) => DateTime::parse_from_rfc3339(t.trim())
                    .map(|t| Some(t.with_timezone(&Utc)))
                    .map_err(|e| {
                        OpError::bad_request(
                            ErrorCode::InvalidTime,
                            format!("{what} {t:?} is not an RFC 3339 time: {e}"),
                        )
                    }),
                None => Ok(None),
            }
        };
        let mut filter = Filter {
            state,
            task: nonempty(q.task),
            pool: nonempty(q.pool),
            blame,
            detail: nonempty(q.detail),
            bot_id: nonempty(q.bot_id),
            source_message_id: nonempty(q.source_message_id),
            since: instant("since", q.since)?,
            until: instant("until", q.until)?,
        };
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
        let offset = q.offset.unwrap_or(0);
        let text = nonempty(q.q);
        if text.as_ref().is_some_and(|t| t.chars().count() > MAX_QUERY) {
            return Err(OpError::bad_request(
                ErrorCode::InvalidRequest,
                format!("q is longer than {MAX_QUERY} characters"),
            ));
        }
        let after = match nonempty(q.after) {
            Some(a) => Some(Cursor::parse(&a).ok_or_else(|| {
                OpError::bad_request(
                    ErrorCode::InvalidQuery,
                    format!("after {a:?} is not the `next` of a page"),
                )
            })?),
            None => None,
        };
        if let Some(c) = after {
            filter.until = match (filter.until, c.until()) {
                (Some(u), Some(c)) => Some(u.min(c)),
                (u, c) => u.or(c),
            };
        }
        // After a cursor every side is read from its start (the jobs made
        // in the cursor's own microsecond at or before it are dropped
        // there), then paged here.
        let (fetch, skip) = match after {
            Some(_) => (offset.saturating_add(limit).saturating_add(CURSOR_TIES), 0),
            None => (limit, offset),
        };
        let page = |jobs: Vec<JobSummary>, total: usize| -> (Vec<JobSummary>, usize) {
            match after {
                None => (jobs, total),
                Some(c) => {
                    let n = jobs.len();
                    let kept: Vec<JobSummary> =
                        jobs.into_iter().filter(|j| c.is_before(j)).collect();
                    let dropped = n - kept.len();
                    (
                        kept.into_iter().skip(offset).take(limit).collect(),
                        total.saturating_sub(dropped),
                    )
                }
            }
        };
        let next_of = |jobs: &[JobSummary]| {
            (jobs.len() == limit && limit > 0)
                .then(|| jobs.last().map(|j| Cursor::of(j).encode()))
                .flatten()
        };
        self.index_ready().await?;
        if !self.history.configured() {
            if text.is_some() {
                return Err(OpError::bad_request(
                    ErrorCode::InvalidRequest,
                    "full-text search (q) needs the history database ([history] database)",
                ));
            }
            let r = self.index.lock().search(&filter, fetch, skip);
            let (jobs, total) = page(r.jobs, r.total);
            let next = next_of(&jobs);
            return Ok(ListReply {
                jobs,
                total,
                total_exact: r.total_exact,
                next,
            });
        }
        let db = self.history_db().await?;
        if let Some(text) = text {
            // Only the database has the words: every job it recorded,
            // each shown as the index has it when it is live.
            let search = crate::history::archived_search(&filter, Some(text), false);
            let found = db
                .search(&search, fetch, skip, crate::index::TOTAL_CAP)
                .await
                .map_err(OpError::from_history)?;
            let (jobs, total) = page(found.jobs, found.total);
            let index = self.index.lock();
            let jobs: Vec<JobSummary> = jobs
                .into_iter()
                .map(|j| index.summary(&j.id).unwrap_or(j))
                .collect();
            let next = next_of(&jobs);
            return Ok(ListReply {
                jobs,
                total,
                total_exact: found.total_exact,
                next,
            });
        }
        let want = match after {
            Some(_) => fetch,
            None => offset.saturating_add(limit),
        };
        let search = crate::history::archived_search(&filter, None, true);
        let archived = db
            .search(&search, want, 0, crate::index::TOTAL_CAP)
            .await
            .map_err(OpError::from_history)?;
        let index = self.index.lock();
        let live = index.search(&filter, want, 0);
        let total_exact = live.total_exact && archived.total_exact;
        let merged =
            crate::history::merge(live.jobs, archived.jobs, |id| index.contains(id), want, 0);
        let (jobs, total) = match after {
            None => (
                merged.into_iter().skip(offset).take(limit).collect(),
                live.total + archived.total,
            ),
            Some(_) => page(merged, live.total + archived.total),
        };
        let next = next_of(&jobs);
        Ok(ListReply {
            jobs,
            total,
            total_exact,
            next,
        })
    }
}

/// A create's result: the job, and whether it already existed (a create
/// replayed with its idempotency key).
#[derive(Debug, Clone)]
pub struct Created {
    pub job: Job,
    pub replayed: bool,
}

/// Did the create that made `existing` ask for the same job as `new`?
fn same_request(existing: &Job, new: &Job) -> bool {
    existing.task == new.task
        && existing.args == new.args
        && existing.pool == new.pool
        && existing.priority == new.priority
        && existing.retry == new.retry
        && existing.max_attempts == new.max_attempts
}
