//! Recycling: the event a broken resource's provisioner gets, the close
//! that follows it, the dependents closed with it, and closing by hand.

use chrono::{DateTime, Utc};
use warden_shared::config::HealthConfig;
use warden_shared::messages::{ResourceRecycle, MESSAGE_VERSION};
use warden_shared::resource::{reason, Resource, ResourceState};

use super::checks::return_wait;
use super::{after, truncate};

/// The recycle event of `r` (`None`: closed already, nothing to publish).
pub fn event(r: &Resource, code: &str, why: &str, now: DateTime<Utc>) -> Option<ResourceRecycle> {
    (r.state != ResourceState::Closed).then(|| ResourceRecycle {
        version: MESSAGE_VERSION,
        resource: r.name.clone(),
        kind: r.kind.clone(),
        incarnation: r.incarnation,
        reason: code.to_string(),
        description: why.to_string(),
        bot_id: r.bot_id.clone(),
        path: r.path.clone(),
        depends_on: r.depends_on.clone(),
        at: now,
    })
}

/// The message id of a recycle event: one per incarnation.
pub fn event_id(e: &ResourceRecycle) -> String {
    format!("{}:{}:recycle", e.resource, e.incarnation)
}

/// The close after the recycle event of incarnation `incarnation`
/// (`None`: another incarnation now, or closed already). A live agent
/// gets it back after a check (`check_after`), unless closed by hand.
pub fn close(
    mut r: Resource,
    incarnation: u32,
    code: &str,
    why: &str,
    cfg: &HealthConfig,
    now: DateTime<Utc>,
) -> Option<Resource> {
    if r.incarnation != incarnation || r.state == ResourceState::Closed {
        return None;
    }
    if r.state != ResourceState::Broken {
        // Closed by hand or with what it depends on.
        r.set_state(ResourceState::Broken, format!("{code}: {why}"), now)
            .ok()?;
    }
    r.close(code, why, now).ok()?;
    r.check_after = return_wait(Some(code), 0, cfg).map(|w| after(now, w));
    Some(r)
}

/// What depends on `name` and is not closed yet, each with the code and
/// reason of its own recycle.
pub fn dependents_to_close(
    all: &[Resource],
    name: &str,
    code: &str,
) -> Vec<(String, String, String)> {
    warden_shared::resource::dependents(all, name)
        .into_iter()
        .filter(|d| {
            all.iter()
                .any(|r| r.name == *d && r.state != ResourceState::Closed)
        })
        .map(|d| {
            (
                d.to_string(),
                reason::DEPENDENCY.to_string(),
                format!("{name}, which it depends on, was closed ({code})"),
            )
        })
        .collect()
}

/// The [`reason`] code a broken resource's reason starts with
/// (`check_failed` when none).
pub fn code_of(why: &str) -> &'static str {
    reason::ALL
        .into_iter()
        .find(|c| why.starts_with(&format!("{c}:")))
        .unwrap_or(reason::CHECK_FAILED)
}

/// What closing a resource by hand does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManualClose {
    /// Not closed yet: recycled with reason `manual`.
    Recycle,
    /// Closed already (recycled) and would come back: now it stays out
    /// until an operator's check.
    KeepOut { incarnation: u32 },
    /// Closed by hand already: refused.
    AlreadyClosed,
}

pub fn manual_close(r: &Resource) -> ManualClose {
    if !r.may_return() && r.state == ResourceState::Closed {
        ManualClose::AlreadyClosed
    } else if r.state == ResourceState::Closed {
        ManualClose::KeepOut {
            incarnation: r.incarnation,
        }
    } else {
        ManualClose::Recycle
    }
}

/// The reason an operator gave (bounded), or the default.
pub fn manual_why(why: Option<String>) -> String {
    truncate(
        why.filter(|w| !w.trim().is_empty())
            .unwrap_or_else(|| "closed by an operator".into()),
        1000,
    )
}

/// A closed resource kept out by hand (`None`: another incarnation, or
/// kept out already).
pub fn keep_out(mut r: Resource, incarnation: u32, why: &str) -> Option<Resource> {
    if r.incarnation != incarnation || !r.may_return() {
        return None;
    }
    r.closed_for = Some(reason::MANUAL.into());
    r.reason = format!("{r}; then closed by hand: {why}", r = r.reason);
    r.check_after = None;
    Some(r)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::decide::fixtures::{cfg, open, t};

    #[test]
    fn a_broken_resource_is_closed_once_per_incarnation() {
        let c = cfg("");
        let mut r = open("h");
        r.set_state(ResourceState::Broken, "check_failed: disk", t(1))
            .unwrap();
        let e = event(&r, reason::CHECK_FAILED, "disk", t(2)).unwrap();
        assert_eq!(event_id(&e), "h:1:recycle");
        assert!(close(r.clone(), 2, reason::CHECK_FAILED, "disk", &c, t(2)).is_none());
        let closed = close(r, 1, reason::CHECK_FAILED, "disk", &c, t(2)).unwrap();
        assert_eq!(closed.state, ResourceState::Closed);
        assert_eq!(closed.closed_for.as_deref(), Some(reason::CHECK_FAILED));
        assert_eq!(closed.check_after, Some(t(12)));
        assert!(event(&closed, reason::CHECK_FAILED, "disk", t(3)).is_none());
        assert!(close(closed, 1, reason::CHECK_FAILED, "disk", &c, t(3)).is_none());
    }

    #[test]
    fn an_open_resource_closed_by_hand_never_returns_by_itself() {
        let c = cfg("");
        let r = open("h");
        assert_eq!(manual_close(&r), ManualClose::Recycle);
        let closed = close(r, 1, reason::MANUAL, "bye", &c, t(2)).unwrap();
        assert_eq!(closed.check_after, None);
        assert_eq!(manual_close(&closed), ManualClose::AlreadyClosed);
    }

    #[test]
    fn a_recycled_resource_closed_by_hand_is_kept_out() {
        let c = cfg("");
        let mut r = open("h");
        r.set_state(ResourceState::Broken, "x", t(1)).unwrap();
        let closed = close(r, 1, reason::VANISHED, "gone", &c, t(2)).unwrap();
        assert_eq!(closed.check_after, Some(t(2)), "vanished: at once");
        assert_eq!(
            manual_close(&closed),
            ManualClose::KeepOut { incarnation: 1 }
        );
        let out = keep_out(closed, 1, "bye").unwrap();
        assert_eq!(out.closed_for.as_deref(), Some(reason::MANUAL));
        assert_eq!(out.check_after, None);
        assert!(
            out.reason.ends_with("; then closed by hand: bye"),
            "{}",
            out.reason
        );
        assert!(keep_out(out, 1, "again").is_none());
    }

    #[test]
    fn dependents_not_closed_yet_follow() {
        let host = open("host");
        let mut wc = open("wc");
        wc.depends_on = Some("host".into());
        let mut done = open("wc2");
        done.depends_on = Some("host".into());
        done.set_state(ResourceState::Broken, "x", t(1)).unwrap();
        done.close(reason::DEPENDENCY, "x", t(1)).unwrap();
        let all = vec![host, wc, done];
        let next = dependents_to_close(&all, "host", reason::VANISHED);
        assert_eq!(
            next,
            vec![(
                "wc".to_string(),
                reason::DEPENDENCY.to_string(),
                "host, which it depends on, was closed (vanished)".to_string()
            )]
        );
    }

    #[test]
    fn reason_codes_and_manual_reasons() {
        assert_eq!(code_of("flapping: suspected 3 times"), reason::FLAPPING);
        assert_eq!(code_of("vanished: session s"), reason::VANISHED);
        assert_eq!(code_of("something else"), reason::CHECK_FAILED);
        assert_eq!(manual_why(None), "closed by an operator");
        assert_eq!(manual_why(Some("  ".into())), "closed by an operator");
        assert_eq!(manual_why(Some("disk".into())), "disk");
    }
}
