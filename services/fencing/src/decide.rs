//! The session decisions, free of I/O: each takes the session record(s),
//! the request, the configuration and `now`, and returns the record to
//! write or the rejection to answer. `sessions` reads, calls these and
//! writes by compare-and-set.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
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
pub fn quarantine(mut s: Session, new: &str) -> Option<Session> {
    if s.state != SessionState::Active {
        return None;
    }
    s.state = SessionState::Quarantined;
    s.superseded_by = Some(new.to_string());
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
pub fn close(mut s: Session) -> Session {
    s.state = SessionState::Closed;
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
        s
    })
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
        let q = quarantine(old, "new").unwrap();
        assert_eq!(q.state, SessionState::Quarantined);
        assert_eq!(q.superseded_by.as_deref(), Some("new"));
        assert!(quarantine(q, "newer").is_none());
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
        let closed = close(s);
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
            expire(&close(s), &clock(100)).is_none(),
            "only active sessions expire"
        );
        let mut by_state = HashMap::new();
        count(&mut by_state, SessionState::Active);
        count(&mut by_state, SessionState::Active);
        assert_eq!(by_state[&SessionState::Active], 2);
    }
}
