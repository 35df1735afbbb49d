//! Registration: what a session record (from `warden_sessions`) does to
//! the resources it declares.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use warden_shared::resource::{reason, Resource, ResourceDecl, ResourceSession, ResourceState};
use warden_shared::session::{Session, SessionState};

/// The resources a session declares (an old agent names one host).
pub fn decls(s: &Session) -> Vec<ResourceDecl> {
    if s.resources.is_empty() {
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
    }
}

/// What a session in its state does to a resource it declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAction {
    /// Active: registered on the resource.
    Register,
    /// Gone: leaves it; `expired`: without a goodbye (it may have
    /// vanished).
    Leave { expired: bool },
}

pub fn action(state: SessionState) -> SessionAction {
    match state {
        SessionState::Active => SessionAction::Register,
        SessionState::Expired => SessionAction::Leave { expired: true },
        SessionState::Quarantined | SessionState::Closed => SessionAction::Leave { expired: false },
    }
}

/// Notes (session, resource) in `registered` (pairs this replica wrote
/// since it started: heartbeats rewrite session records and need not
/// re-read these). True when an active session was noted already, so
/// there is nothing to do; a session that is gone is forgotten.
pub fn seen(
    registered: &mut HashSet<(String, String)>,
    pair: &(String, String),
    state: SessionState,
) -> bool {
    match state {
        SessionState::Active => !registered.insert(pair.clone()),
        _ => {
            registered.remove(pair);
            false
        }
    }
}

/// The record after active session `s` declared `d` (`None`: nothing to
/// write). A new resource is registered open; on a known one (closed or
/// broken too: the periodic pass checks one that may come back on this
/// agent) the session is noted with its pools.
pub fn register(
    current: Option<Resource>,
    s: &Session,
    d: &ResourceDecl,
    now: DateTime<Utc>,
) -> Option<Resource> {
    let me = ResourceSession {
        session: s.name.clone(),
        bot_id: s.bot_id.clone(),
    };
    let Some(mut r) = current else {
        let mut r = Resource::register(
            d,
            1,
            &s.agent_instance,
            &s.bot_id,
            format!("registered by bot {} (session {})", s.bot_id, s.name),
            now,
        );
        r.sessions.push(me);
        r.pools = s.pools.clone();
        return Some(r);
    };
    // Several bots may share one host (each with its own work dir): the
    // record keeps what its latest new session declared.
    if r.sessions.contains(&me) && s.pools.iter().all(|p| r.pools.contains(p)) {
        return None;
    }
    if !r.sessions.contains(&me) {
        r.sessions.push(me);
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

/// The record after session `s` left it (`None`: it was not there). When
/// it expired and was the last one on an open or suspicious resource, the
/// resource vanished: broken (the caller recycles it).
pub fn leave(
    current: Option<Resource>,
    s: &Session,
    expired: bool,
    now: DateTime<Utc>,
) -> Option<Resource> {
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
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::decide::fixtures::{decl, t};

    pub fn session(i: usize) -> Session {
        Session {
            version: 1,
            name: format!("s{i}"),
            bot_id: format!("bot-{i}"),
            resource: Some("shared-host".into()),
            resources: vec![decl("shared-host")],
            agent_instance: format!("agent-{i}"),
            pools: vec!["default".into()],
            capacity: 1,
            agent_version: "test".into(),
            timeout_ms: None,
            state: SessionState::Active,
            created_at: t(0),
            last_heartbeat: t(0),
            superseded_by: None,
            ended_at: None,
            leases: Vec::new(),
        }
    }

    #[test]
    fn an_old_agent_declares_one_host() {
        let mut s = session(1);
        assert_eq!(decls(&s), vec![decl("shared-host")]);
        s.resources.clear();
        s.resource = Some("old".into());
        assert_eq!(decls(&s), vec![decl("old")]);
    }

    #[test]
    fn actions_and_the_seen_set() {
        assert_eq!(action(SessionState::Active), SessionAction::Register);
        assert_eq!(
            action(SessionState::Expired),
            SessionAction::Leave { expired: true }
        );
        assert_eq!(
            action(SessionState::Closed),
            SessionAction::Leave { expired: false }
        );
        let mut set = HashSet::new();
        let pair = ("s1".to_string(), "h".to_string());
        assert!(!seen(&mut set, &pair, SessionState::Active));
        assert!(seen(&mut set, &pair, SessionState::Active));
        assert!(!seen(&mut set, &pair, SessionState::Closed));
        assert!(!seen(&mut set, &pair, SessionState::Active));
    }

    #[test]
    fn sessions_sharing_a_host_are_all_noted_and_the_latest_declares() {
        let d = decl("shared-host");
        let r = register(None, &session(1), &d, t(1)).unwrap();
        assert_eq!(r.state, ResourceState::Open);
        assert_eq!(r.sessions.len(), 1);
        assert!(
            register(Some(r.clone()), &session(1), &d, t(2)).is_none(),
            "nothing new"
        );
        let mut s2 = session(2);
        s2.pools = vec!["big".into()];
        let r = register(Some(r), &s2, &d, t(2)).unwrap();
        assert_eq!(r.sessions.len(), 2);
        assert_eq!(r.bot_id.as_deref(), Some("bot-2"));
        assert_eq!(r.agent, "agent-2");
        assert_eq!(r.pools, vec!["default".to_string(), "big".to_string()]);
    }

    #[test]
    fn the_last_session_expiring_makes_the_resource_vanish() {
        let d = decl("shared-host");
        let r = register(None, &session(1), &d, t(1)).unwrap();
        let r = register(Some(r), &session(2), &d, t(1)).unwrap();
        assert!(
            leave(Some(r.clone()), &session(3), true, t(2)).is_none(),
            "not there"
        );
        let r = leave(Some(r), &session(1), true, t(2)).unwrap();
        assert_eq!(r.state, ResourceState::Open, "another session is left");
        let gone = leave(Some(r.clone()), &session(2), true, t(3)).unwrap();
        assert_eq!(gone.state, ResourceState::Broken);
        assert!(
            gone.reason.starts_with("vanished: session s2 of bot bot-2"),
            "{}",
            gone.reason
        );
        let left = leave(Some(r), &session(2), false, t(3)).unwrap();
        assert_eq!(left.state, ResourceState::Open, "a goodbye is no vanishing");
        assert!(left.sessions.is_empty());
    }
}
