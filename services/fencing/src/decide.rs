//! The session decisions, free of I/O: each takes the session record(s),
//! the request, the configuration and `now`, and returns the record to
//! write or the rejection to answer. `sessions` reads, calls these and
//! writes by compare-and-set.

use std::collections::HashMap;

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use warden_shared::bots::BotRecord;
use warden_shared::error::ErrorCode;
use warden_shared::messages::{CreateSession, MESSAGE_VERSION};
use warden_shared::session::{Session, SessionState};

/// A request refused by the rules (the caller's fault): its wire code and
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

/// Whether a create request may open a session.
pub fn validate_create(req: &CreateSession) -> Result<(), Rejection> {
    if req.bot_id.trim().is_empty() {
        return Err(Rejection::new(
            ErrorCode::InvalidRequest,
            "bot_id must not be empty",
        ));
    }
    if req.timeout_ms.is_some_and(|ms| {
        ms < 1000 || ms > warden_shared::config::MAX_EXECUTION_TIMEOUT.as_millis() as u64
    }) {
        return Err(Rejection::new(
            ErrorCode::InvalidRequest,
            "timeout_ms must be between 1000 and 86400000",
        ));
    }
    Ok(())
}

/// The new session `name` a create request opens at `now`.
pub fn new_session(req: &CreateSession, name: String, now: DateTime<Utc>) -> Session {
    Session {
        version: MESSAGE_VERSION,
        name,
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
        ended_at: None,
        leases: Vec::new(),
    }
}

/// The session a bot pointer named before a create moved it (an empty
/// or deleted pointer names none).
pub fn previous(pointer: Option<String>) -> Option<String> {
    pointer.filter(|n| !n.is_empty())
}

/// Newest wins: the older session `s`, superseded by `new`, quarantined
/// (`None`: not active any more, nothing to write).
pub fn quarantine(mut s: Session, new: &str, now: DateTime<Utc>) -> Option<Session> {
    if s.state != SessionState::Active {
        return None;
    }
    s.state = SessionState::Quarantined;
    s.superseded_by = Some(new.to_string());
    s.ended_at = Some(now);
    Some(s)
}

/// The answer to a request naming a session not on file.
pub fn unknown(name: &str) -> Rejection {
    Rejection::new(
        ErrorCode::UnknownSession,
        format!("no session named {name}"),
    )
}

/// Whether session `name` (its record `s`) may act: it is active and is
/// what its bot's pointer names.
pub fn is_current(name: &str, s: &Session, pointer: Option<&str>) -> Result<(), Rejection> {
    if s.state != SessionState::Active || pointer != Some(name) {
        return Err(Rejection::new(
            ErrorCode::SessionSuperseded,
            format!(
                "session {name} of bot {} is {} and not current; start a new session",
                s.bot_id,
                s.state.as_str()
            ),
        ));
    }
    Ok(())
}

/// A heartbeat: renewed at `now`, with the leases the bot reports.
pub fn renew(
    mut s: Session,
    leases: Vec<warden_shared::messages::HeldLease>,
    now: DateTime<Utc>,
) -> Session {
    s.last_heartbeat = now;
    s.leases = leases;
    s
}

/// The bot leaves.
pub fn close(mut s: Session, now: DateTime<Utc>) -> Session {
    s.state = SessionState::Closed;
    s.ended_at = Some(now);
    s
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
    now: DateTime<Utc>,
    last_heartbeat: DateTime<Utc>,
    available_since: DateTime<Utc>,
    last_store_failure: Option<DateTime<Utc>>,
    limit: chrono::Duration,
) -> bool {
    let mut since = last_heartbeat.max(available_since);
    if let Some(f) = last_store_failure {
        since = since.max(f);
    }
    now - since > limit
}

/// What a sweep counts time from.
#[derive(Debug, Clone, Copy)]
pub struct SweepClock {
    pub now: DateTime<Utc>,
    /// This service's start, or the end of its last blind stretch.
    pub available_since: DateTime<Utc>,
    pub last_store_failure: Option<DateTime<Utc>>,
    /// `fencing.session_timeout`, for sessions without their own.
    pub default_timeout: std::time::Duration,
}

/// The sweep's verdict on one session: `Some(expired record)` when it is
/// active and silent past its limit.
pub fn expire(s: &Session, clock: &SweepClock) -> Option<Session> {
    let limit = chrono::Duration::from_std(s.timeout(clock.default_timeout))
        .unwrap_or(chrono::Duration::seconds(10));
    let silent = s.state == SessionState::Active
        && silent_past_limit(
            clock.now,
            s.last_heartbeat,
            clock.available_since,
            clock.last_store_failure,
            limit,
        );
    silent.then(|| {
        let mut s = s.clone();
        s.state = SessionState::Expired;
        s.ended_at = Some(clock.now);
        s
    })
}

// --- Identity: the bot a request may act as is the one its subject
// names (only that bot's NATS user may publish there).

/// A create may only open a session for the bot its subject names.
pub fn same_bot(subject_bot: &str, req: &CreateSession) -> Result<(), Rejection> {
    if req.bot_id != subject_bot {
        return Err(Rejection::new(
            ErrorCode::BotMismatch,
            format!(
                "bot_id {:?} is not the bot these credentials are for ({subject_bot:?}); nothing written",
                req.bot_id
            ),
        ));
    }
    Ok(())
}

/// A heartbeat or close may only name a session of the bot its subject
/// names.
pub fn owns(subject_bot: &str, name: &str, s: &Session) -> Result<(), Rejection> {
    if s.bot_id != subject_bot {
        return Err(Rejection::new(
            ErrorCode::NotYourSession,
            format!("session {name} is not a session of bot {subject_bot:?}; nothing changed"),
        ));
    }
    Ok(())
}

/// What a bot may claim at create, by its registry record: its pools a
/// subset of the registered ones, its capacity at most the registered
/// one. Without a record: refused when registration is `required`,
/// anything otherwise.
pub fn allowed(
    req: &CreateSession,
    record: Option<&BotRecord>,
    required: bool,
) -> Result<(), Rejection> {
    let Some(r) = record else {
        if required {
            return Err(Rejection::new(
                ErrorCode::BotNotRegistered,
                format!(
                    "bot {:?} is not registered (`warden bot add`), and fencing.require_registered_bots is on",
                    req.bot_id
                ),
            ));
        }
        return Ok(());
    };
    if let Some(p) = req.pools.iter().find(|p| !r.pools.contains(p)) {
        return Err(Rejection::new(
            ErrorCode::PoolNotAllowed,
            format!(
                "bot {:?} may serve pools {:?}, not {p:?}",
                req.bot_id, r.pools
            ),
        ));
    }
    if req.capacity > r.max_capacity {
        return Err(Rejection::new(
            ErrorCode::CapacityNotAllowed,
            format!(
                "bot {:?} may claim a capacity of at most {}, not {}",
                req.bot_id, r.max_capacity, req.capacity
            ),
        ));
    }
    Ok(())
}

/// An external executor's session (created by the API service) is for a
/// bot id without a NATS user: never a registered bot's, so no executor
/// can supersede a worker.
pub fn executor_allowed(req: &CreateSession, record: Option<&BotRecord>) -> Result<(), Rejection> {
    if record.is_some() {
        return Err(Rejection::new(
            ErrorCode::BotRegistered,
            format!(
                "bot {:?} is a registered worker bot; an executor needs an id of its own",
                req.bot_id
            ),
        ));
    }
    Ok(())
}

/// A request on a subject that names no bot (the bare
/// `warden.session.<op>` of older workers).
pub fn unidentified(subject: &str) -> Rejection {
    Rejection::new(
        ErrorCode::BotUnidentified,
        format!("{subject} names no bot; session requests go to {subject}.<bot token> (hex of the bot id)"),
    )
}

// --- Bounds.

/// A heartbeat may list at most the session's capacity of leases.
pub fn leases_within_capacity(s: &Session, listed: usize) -> Result<(), Rejection> {
    if listed > s.capacity as usize {
        return Err(Rejection::new(
            ErrorCode::TooManyLeases,
            format!(
                "the heartbeat lists {listed} leases; session {} has a capacity of {}",
                s.name, s.capacity
            ),
        ));
    }
    Ok(())
}

/// The per-bot create limit: `recent` holds the times of the bot's
/// accepted creates within the last minute (oldest first). A create at
/// `now` is admitted (and recorded) while fewer than `per_minute` are.
pub fn admit_create(
    recent: &mut VecDeque<DateTime<Utc>>,
    now: DateTime<Utc>,
    per_minute: u32,
) -> Result<(), Rejection> {
    let window = chrono::Duration::minutes(1);
    while recent.front().is_some_and(|t| now - *t >= window) {
        recent.pop_front();
    }
    if recent.len() >= per_minute as usize {
        return Err(Rejection::new(
            ErrorCode::RateLimited,
            format!(
                "more than {per_minute} session creates of this bot in a minute; try again later"
            ),
        ));
    }
    recent.push_back(now);
    Ok(())
}

/// Whether the sweep deletes `s` at `now`: it ended (closed, quarantined,
/// expired) more than `retention` ago. A record from before `ended_at`
/// was kept counts from its last heartbeat, which is never later.
pub fn retired(s: &Session, now: DateTime<Utc>, retention: std::time::Duration) -> bool {
    if s.state == SessionState::Active {
        return false;
    }
    let ended = s.ended_at.unwrap_or(s.last_heartbeat);
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    now - ended > retention
}

/// Sessions by state for the gauge, one session counted as `state`.
pub fn count(by_state: &mut HashMap<SessionState, i64>, state: SessionState) {
    *by_state.entry(state).or_default() += 1;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use chrono::{Duration, TimeZone};

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("valid")
    }

    fn req(bot: &str, timeout_ms: Option<u64>) -> CreateSession {
        CreateSession {
            version: 1,
            bot_id: bot.into(),
            resource: None,
            resources: Vec::new(),
            agent_instance: "a".into(),
            pools: vec!["default".into()],
            capacity: 1,
            agent_version: "test".into(),
            timeout_ms,
        }
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
    fn a_create_needs_a_bot_and_a_timeout_in_range() {
        assert!(validate_create(&req("b", None)).is_ok());
        assert!(validate_create(&req("b", Some(1000))).is_ok());
        assert!(validate_create(&req("b", Some(86_400_000))).is_ok());
        for bad in [
            req(" ", None),
            req("b", Some(999)),
            req("b", Some(86_400_001)),
        ] {
            assert_eq!(
                validate_create(&bad).unwrap_err().code,
                ErrorCode::InvalidRequest
            );
        }
        let s = new_session(&req("b", Some(3000)), "n".into(), t(1));
        assert_eq!(
            (s.state, s.created_at, s.last_heartbeat),
            (SessionState::Active, t(1), t(1))
        );
        assert_eq!(s.timeout_ms, Some(3000));
    }

    #[test]
    fn newest_wins_and_the_old_one_is_quarantined_once() {
        assert_eq!(previous(None), None);
        assert_eq!(previous(Some(String::new())), None);
        assert_eq!(previous(Some("old".into())).as_deref(), Some("old"));
        let old = new_session(&req("b", None), "old".into(), t(0));
        let q = quarantine(old, "new", t(1)).unwrap();
        assert_eq!(q.state, SessionState::Quarantined);
        assert_eq!(q.superseded_by.as_deref(), Some("new"));
        assert!(quarantine(q, "newer", t(2)).is_none());
    }

    #[test]
    fn only_the_current_active_session_may_act() {
        let s = new_session(&req("b", None), "s".into(), t(0));
        assert_eq!(unknown("x").code, ErrorCode::UnknownSession);
        assert_eq!(unknown("x").message, "no session named x");
        assert!(is_current("s", &s, Some("s")).is_ok());
        assert!(is_current("s", &s, None).is_err(), "no pointer");
        let e = is_current("s", &s, Some("other")).unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionSuperseded);
        assert_eq!(
            e.message,
            "session s of bot b is active and not current; start a new session"
        );
        let closed = close(s, t(1));
        assert_eq!(
            is_current("s", &closed, Some("s")).unwrap_err().code,
            ErrorCode::SessionSuperseded
        );
    }

    #[test]
    fn a_heartbeat_renews_and_the_sweep_expires_by_each_sessions_limit() {
        let s = new_session(&req("b", None), "s".into(), t(0));
        let own = new_session(&req("e", Some(30_000)), "e".into(), t(0));
        let clock = |now| SweepClock {
            now: t(now),
            available_since: t(0),
            last_store_failure: None,
            default_timeout: std::time::Duration::from_secs(10),
        };
        assert!(expire(&s, &clock(10)).is_none());
        assert_eq!(expire(&s, &clock(11)).unwrap().state, SessionState::Expired);
        assert!(expire(&own, &clock(11)).is_none(), "its own, longer limit");
        assert!(expire(&own, &clock(31)).is_some());
        let renewed = renew(s.clone(), Vec::new(), t(5));
        assert!(expire(&renewed, &clock(11)).is_none());
        assert!(
            expire(&close(s, t(1)), &clock(100)).is_none(),
            "only active sessions expire"
        );
        let mut by_state = HashMap::new();
        count(&mut by_state, SessionState::Active);
        count(&mut by_state, SessionState::Active);
        assert_eq!(by_state[&SessionState::Active], 2);
    }

    fn record(pools: &[&str], max_capacity: u32) -> BotRecord {
        BotRecord {
            bot_id: "b".into(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            max_capacity,
            public_key: "UKEY".into(),
            added_at: t(0),
        }
    }

    #[test]
    fn a_create_is_for_the_subjects_bot_only() {
        assert!(same_bot("b", &req("b", None)).is_ok());
        let e = same_bot("attacker", &req("victim", None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BotMismatch);
        assert!(e.message.contains("attacker") && e.message.contains("victim"));
    }

    #[test]
    fn a_heartbeat_or_close_names_only_the_subjects_bots_sessions() {
        let s = new_session(&req("victim", None), "s".into(), t(0));
        assert!(owns("victim", "s", &s).is_ok());
        assert_eq!(
            owns("attacker", "s", &s).unwrap_err().code,
            ErrorCode::NotYourSession
        );
        assert_eq!(
            unidentified("warden.session.create").code,
            ErrorCode::BotUnidentified
        );
    }

    #[test]
    fn a_registered_bot_claims_only_its_pools_and_capacity() {
        let mut r = req("b", None);
        r.pools = vec!["default".into(), "gpu".into()];
        r.capacity = 2;
        assert!(allowed(&r, Some(&record(&["default", "gpu", "x"], 2)), true).is_ok());
        assert_eq!(
            allowed(&r, Some(&record(&["default"], 2)), false)
                .unwrap_err()
                .code,
            ErrorCode::PoolNotAllowed
        );
        assert_eq!(
            allowed(&r, Some(&record(&["default", "gpu"], 1)), false)
                .unwrap_err()
                .code,
            ErrorCode::CapacityNotAllowed
        );
        assert!(
            allowed(&r, None, false).is_ok(),
            "registration not required"
        );
        assert_eq!(
            allowed(&r, None, true).unwrap_err().code,
            ErrorCode::BotNotRegistered
        );
        assert!(executor_allowed(&r, None).is_ok());
        assert_eq!(
            executor_allowed(&r, Some(&record(&["default"], 1)))
                .unwrap_err()
                .code,
            ErrorCode::BotRegistered
        );
    }

    #[test]
    fn a_heartbeat_lists_at_most_capacity_leases() {
        let lease = |n: u128| warden_shared::messages::HeldLease {
            job_id: uuid::Uuid::from_u128(n),
            epoch: 1,
        };
        let mut r = req("b", None);
        r.capacity = 2;
        let s = new_session(&r, "s".into(), t(0));
        assert!(leases_within_capacity(&s, 0).is_ok());
        assert!(leases_within_capacity(&s, 2).is_ok());
        let e = leases_within_capacity(&s, 20_000).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyLeases);
        assert_eq!(renew(s, vec![lease(1), lease(2)], t(1)).leases.len(), 2);
    }

    #[test]
    fn creates_are_limited_per_minute_sliding() {
        let mut recent = VecDeque::new();
        for i in 0..3 {
            assert!(admit_create(&mut recent, t(i), 3).is_ok(), "{i}");
        }
        let e = admit_create(&mut recent, t(10), 3).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(recent.len(), 3, "a refused create is not recorded");
        // The first one leaves the window at t(60).
        assert!(admit_create(&mut recent, t(59), 3).is_err());
        assert!(admit_create(&mut recent, t(60), 3).is_ok());
        assert!(admit_create(&mut recent, t(60), 3).is_err());
        // 300 creates in a blink: 30 admitted.
        let mut burst = VecDeque::new();
        let admitted = (0..300)
            .filter(|_| admit_create(&mut burst, t(0), 30).is_ok())
            .count();
        assert_eq!(admitted, 30);
    }

    #[test]
    fn ended_sessions_are_deleted_after_the_retention_active_ones_never() {
        let hour = std::time::Duration::from_secs(3600);
        let s = new_session(&req("b", None), "s".into(), t(0));
        assert!(!retired(&s, t(100_000), hour), "active");
        let closed = close(s.clone(), t(10));
        assert_eq!(closed.ended_at, Some(t(10)));
        assert!(!retired(&closed, t(3610), hour));
        assert!(retired(&closed, t(3611), hour));
        let q = quarantine(s.clone(), "n", t(20)).unwrap();
        assert!(!retired(&q, t(3620), hour) && retired(&q, t(3621), hour));
        let clock = SweepClock {
            now: t(30),
            available_since: t(0),
            last_store_failure: None,
            default_timeout: std::time::Duration::from_secs(10),
        };
        let gone = expire(&s, &clock).unwrap();
        assert_eq!(gone.ended_at, Some(t(30)));
        // A record written before `ended_at` existed: from its last heartbeat.
        let mut old = close(s, t(0));
        old.ended_at = None;
        old.last_heartbeat = t(5);
        assert!(retired(&old, t(3606), hour) && !retired(&old, t(3605), hour));
    }
}
