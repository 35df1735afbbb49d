//! Resources (docs/design.md "Resources and health"): what leases run on, in
//! the `warden_resources` bucket, owned by the health service.
//!
//! A resource is a host, or something on a host (a working copy) that
//! depends on it. Workers declare theirs when they create a session. The
//! states and their only moves:
//!
//! ```text
//!   open ──suspect──▶ suspicious ──check passed──▶ open
//!    │                    │
//!    │ vanished,          │ check failed / no answer, flapping
//!    │ check failed       ▼
//!    └──────────────▶  broken ──recycled──▶ closed
//!   (any state but closed) ──closed by hand / dependency closed──▶ closed
//!   closed ══check passed (a live agent came back, or an operator's)══▶ open
//!          (a NEW incarnation)
//! ```
//!
//! A closed incarnation never opens again: the one move out of closed
//! makes a new incarnation (incarnation + 1), after a check on a live agent
//! passed. One closed by hand comes back only by an operator's check.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::messages::MESSAGE_VERSION;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceState {
    /// Healthy: leases may go here.
    Open,
    /// An attempt's failure may be its fault: no new lease until checked.
    Suspicious,
    /// Failed its check (or vanished): about to be recycled.
    Broken,
    /// Recycled or closed by hand; never used again.
    Closed,
}

impl ResourceState {
    pub const ALL: [ResourceState; 4] = [
        ResourceState::Open,
        ResourceState::Suspicious,
        ResourceState::Broken,
        ResourceState::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceState::Open => "open",
            ResourceState::Suspicious => "suspicious",
            ResourceState::Broken => "broken",
            ResourceState::Closed => "closed",
        }
    }

    /// Whether a new lease may go to a session on this resource.
    pub fn leasable(self) -> bool {
        self == ResourceState::Open
    }
}

impl std::fmt::Display for ResourceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("resource {resource}: illegal change {from} → {to}")]
pub struct IllegalResourceChange {
    pub resource: String,
    pub from: ResourceState,
    pub to: ResourceState,
}

/// What a legal move does to the record's incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// The same incarnation changes state.
    Same,
    /// A closed resource opens as a new incarnation: its agent (or an
    /// operator) passed a check after it was closed.
    NewIncarnation,
}

/// The one table of resource moves.
pub fn transition(from: ResourceState, to: ResourceState) -> Option<Move> {
    use ResourceState::*;
    match (from, to) {
        (Open, Suspicious)
        | (Open, Broken)
        | (Open, Closed)
        | (Suspicious, Open)
        | (Suspicious, Broken)
        | (Suspicious, Closed)
        | (Broken, Closed) => Some(Move::Same),
        (Closed, Open) => Some(Move::NewIncarnation),
        _ => None,
    }
}

/// Whether `from → to` is in the table.
pub fn allowed(from: ResourceState, to: ResourceState) -> bool {
    transition(from, to).is_some()
}

/// Why a resource was recycled (metric label and recycle event `reason`).
pub mod reason {
    /// Its health check failed.
    pub const CHECK_FAILED: &str = "check_failed";
    /// Its agent did not answer the check in time.
    pub const CHECK_TIMEOUT: &str = "check_timeout";
    /// Its agent stopped heartbeating (session expired).
    pub const VANISHED: &str = "vanished";
    /// Suspected too often within the flap window.
    pub const FLAPPING: &str = "flapping";
    /// Closed by an operator.
    pub const MANUAL: &str = "manual";
    /// What it depends on was closed.
    pub const DEPENDENCY: &str = "dependency";
    /// Not a recycle reason: a closed resource opened as a new incarnation
    /// (its agent came back and passed its check, or an operator's did).
    pub const RETURNED: &str = "returned";
    pub const ALL: [&str; 6] = [
        CHECK_FAILED,
        CHECK_TIMEOUT,
        VANISHED,
        FLAPPING,
        MANUAL,
        DEPENDENCY,
    ];
}

/// A resource as a worker declares it when it creates a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceDecl {
    pub name: String,
    /// Selects the health checks (`[health.checks.KIND]`).
    pub kind: String,
    /// A directory the checks (and tasks, as `WARDEN_RESOURCE_<KIND>`) use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The resource this one lives on (a working copy's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<String>,
}

/// An active session on a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSession {
    pub session: String,
    pub bot_id: String,
}

/// One health check as recorded on the resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub at: DateTime<Utc>,
    /// `passed`, `failed` or `timeout`.
    pub result: String,
    /// What failed, or what was checked, in words (bounded).
    pub summary: String,
    pub duration_ms: u64,
    /// Why it ran: `suspicion` or `manual`.
    pub trigger: String,
}

/// One change of state, with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ResourceState>,
    pub to: ResourceState,
    pub reason: String,
}

/// A check some health replica has claimed and is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCheck {
    pub by: String,
    pub started_at: DateTime<Utc>,
    pub trigger: String,
}

const KEEP_CHECKS: usize = 10;
const KEEP_CHANGES: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub version: u32,
    pub name: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<String>,
    /// 1 at first registration; +1 each time an agent registers it again
    /// after it was closed.
    pub incarnation: u32,
    /// The agent process that registered this incarnation.
    #[serde(default)]
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    /// Active sessions that declared it, with their bots.
    #[serde(default)]
    pub sessions: Vec<ResourceSession>,
    /// Pools those sessions serve.
    #[serde(default)]
    pub pools: Vec<String>,
    pub state: ResourceState,
    pub reason: String,
    pub since: DateTime<Utc>,
    pub registered_at: DateTime<Utc>,
    /// When it was suspected recently (within the flap window).
    #[serde(default)]
    pub suspicions: Vec<DateTime<Utc>>,
    /// Its check waits until then (back-off for a flapping resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_after: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<PendingCheck>,
    /// Recent checks, newest last.
    #[serde(default)]
    pub checks: Vec<CheckRecord>,
    /// Recent changes of state, newest last.
    #[serde(default)]
    pub changes: Vec<StateChange>,
    /// While closed: why (a [`reason`] code). One closed by hand
    /// (`manual`) does not come back by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_for: Option<String>,
}

impl Resource {
    /// A newly registered resource (or a new incarnation), open.
    pub fn register(
        decl: &ResourceDecl,
        incarnation: u32,
        agent: &str,
        bot_id: &str,
        reason: String,
        now: DateTime<Utc>,
    ) -> Resource {
        Resource {
            version: MESSAGE_VERSION,
            name: decl.name.clone(),
            kind: decl.kind.clone(),
            path: decl.path.clone(),
            depends_on: decl.depends_on.clone(),
            incarnation,
            agent: agent.to_string(),
            bot_id: Some(bot_id.to_string()),
            sessions: Vec::new(),
            pools: Vec::new(),
            state: ResourceState::Open,
            reason: reason.clone(),
            since: now,
            registered_at: now,
            suspicions: Vec::new(),
            check_after: None,
            check: None,
            checks: Vec::new(),
            changes: vec![StateChange {
                at: now,
                from: None,
                to: ResourceState::Open,
                reason,
            }],
            closed_for: None,
        }
    }

    /// Moves to `to` with `reason`, recorded; an illegal move changes
    /// nothing.
    pub fn set_state(
        &mut self,
        to: ResourceState,
        reason: impl Into<String>,
        now: DateTime<Utc>,
    ) -> Result<(), IllegalResourceChange> {
        let Some(kind) = transition(self.state, to) else {
            return Err(IllegalResourceChange {
                resource: self.name.clone(),
                from: self.state,
                to,
            });
        };
        if kind == Move::NewIncarnation {
            self.incarnation += 1;
            self.registered_at = now;
            self.suspicions.clear();
        }
        if to != ResourceState::Closed {
            self.closed_for = None;
        }
        let reason = reason.into();
        self.changes.push(StateChange {
            at: now,
            from: Some(self.state),
            to,
            reason: reason.clone(),
        });
        if self.changes.len() > KEEP_CHANGES {
            let extra = self.changes.len() - KEEP_CHANGES;
            self.changes.drain(..extra);
        }
        self.state = to;
        self.reason = reason;
        self.since = now;
        if to != ResourceState::Suspicious {
            self.check = None;
            self.check_after = None;
        }
        Ok(())
    }

    /// Closes it for `code` (a [`reason`]), recorded as recycled.
    pub fn close(
        &mut self,
        code: &str,
        why: &str,
        now: DateTime<Utc>,
    ) -> Result<(), IllegalResourceChange> {
        self.set_state(
            ResourceState::Closed,
            format!("recycled ({code}): {why}"),
            now,
        )?;
        self.closed_for = Some(code.to_string());
        Ok(())
    }

    /// Whether it may come back by itself once a live agent passes its
    /// check: closed, and not by hand.
    pub fn may_return(&self) -> bool {
        self.state == ResourceState::Closed && self.closed_for.as_deref() != Some(reason::MANUAL)
    }

    /// Checks that failed since it was closed, newest first until one
    /// passed (the back-off of its return checks doubles with each).
    pub fn failed_checks_while_closed(&self) -> u32 {
        if self.state != ResourceState::Closed {
            return 0;
        }
        self.checks
            .iter()
            .rev()
            .take_while(|c| c.at >= self.since && c.result != "passed")
            .count() as u32
    }

    pub fn record_check(&mut self, check: CheckRecord) {
        self.checks.push(check);
        if self.checks.len() > KEEP_CHECKS {
            let extra = self.checks.len() - KEEP_CHECKS;
            self.checks.drain(..extra);
        }
        self.check = None;
    }

    /// Notes a suspicion at `now`, forgetting those older than `window`;
    /// returns how many fall within the window, this one included.
    pub fn note_suspicion(&mut self, now: DateTime<Utc>, window: std::time::Duration) -> usize {
        let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::hours(1));
        self.suspicions.retain(|t| now - *t <= window);
        self.suspicions.push(now);
        self.suspicions.len()
    }
}

/// Every resource in the bucket, by name (a few thousand at most: read
/// directly, no index needed).
pub async fn list(
    kv: &async_nats::jetstream::kv::Store,
) -> Result<Vec<Resource>, async_nats::Error> {
    use futures::StreamExt;
    let mut keys = kv.keys().await?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        names.push(k?);
    }
    let mut all = Vec::with_capacity(names.len());
    for k in names {
        if let Some(v) = kv.get(&k).await? {
            if let Ok(r) = serde_json::from_slice::<Resource>(&v) {
                all.push(r);
            }
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

/// The resources that depend on `name`, directly or not.
pub fn dependents<'a>(all: &'a [Resource], name: &str) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    let mut frontier = vec![name.to_string()];
    while let Some(n) = frontier.pop() {
        for r in all {
            if r.depends_on.as_deref() == Some(n.as_str()) && !out.contains(&r.name.as_str()) {
                out.push(&r.name);
                frontier.push(r.name.clone());
            }
        }
    }
    out
}

/// Resources as the API and `warden resources --json` show them: each
/// record with its `dependents`.
pub fn listing(all: &[Resource]) -> Vec<serde_json::Value> {
    all.iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "dependents".into(),
                    serde_json::json!(dependents(all, &r.name)),
                );
            }
            v
        })
        .collect()
}

/// KV key of a resource: names are free text, keys are not.
pub fn resource_key(name: &str) -> String {
    format!("res.{}", crate::subjects::hex_token(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ResourceState::*;

    fn wc() -> Resource {
        Resource::register(
            &ResourceDecl {
                name: "host-a/checkout".into(),
                kind: "workcopy".into(),
                path: Some("/srv/checkout".into()),
                depends_on: Some("host-a".into()),
            },
            1,
            "agent-1",
            "bot-a",
            "registered".into(),
            Utc::now(),
        )
    }

    #[test]
    fn only_the_table_moves_a_resource() {
        for from in ResourceState::ALL {
            for to in ResourceState::ALL {
                let mut r = wc();
                r.state = from;
                let before = r.clone();
                match r.set_state(to, "why", Utc::now()) {
                    Ok(()) => {
                        assert!(allowed(from, to));
                        assert_eq!((r.state, r.reason.as_str()), (to, "why"));
                        assert_eq!(r.changes.last().map(|c| c.from), Some(Some(from)));
                        // A closed incarnation never opens again: the one
                        // move out of closed is a new incarnation.
                        let new = transition(from, to) == Some(Move::NewIncarnation);
                        assert_eq!(new, from == Closed, "{from} → {to}");
                        assert_eq!(r.incarnation, before.incarnation + u32::from(new));
                    }
                    Err(e) => {
                        assert!(!allowed(from, to), "{e}");
                        assert_eq!(r, before, "an illegal move changes nothing");
                    }
                }
            }
        }
        // Out of closed only to open, as a new incarnation; nothing
        // returns to open but a passed check.
        let from_closed: Vec<ResourceState> = ResourceState::ALL
            .into_iter()
            .filter(|&to| allowed(Closed, to))
            .collect();
        assert_eq!(from_closed, [Open]);
        assert!(!allowed(Broken, Open));
        assert!(Open.leasable() && !Suspicious.leasable() && !Broken.leasable());
    }

    #[test]
    fn only_a_resource_closed_by_hand_stays_out_and_failed_return_checks_count() {
        let t0 = Utc::now();
        let mut r = wc();
        r.note_suspicion(t0, std::time::Duration::from_secs(60));
        r.close(reason::VANISHED, "gone", t0).expect("legal");
        assert!(r.may_return());
        assert_eq!(r.closed_for.as_deref(), Some(reason::VANISHED));
        let check = |result: &str, s: i64| CheckRecord {
            at: t0 + chrono::Duration::seconds(s),
            result: result.into(),
            summary: String::new(),
            duration_ms: 1,
            trigger: "return".into(),
        };
        r.record_check(check("failed", 1));
        r.record_check(check("timeout", 2));
        assert_eq!(r.failed_checks_while_closed(), 2);
        r.set_state(Open, "returned", t0 + chrono::Duration::seconds(3))
            .expect("legal");
        assert_eq!((r.incarnation, r.closed_for.clone()), (2, None));
        assert!(r.suspicions.is_empty() && !r.may_return());
        assert_eq!(r.failed_checks_while_closed(), 0);

        let mut m = wc();
        m.close(reason::MANUAL, "decommissioned", t0)
            .expect("legal");
        assert!(!m.may_return());
    }

    #[test]
    fn suspicions_outside_the_window_are_forgotten() {
        let mut r = wc();
        let t0 = Utc::now();
        let w = std::time::Duration::from_secs(600);
        assert_eq!(r.note_suspicion(t0, w), 1);
        assert_eq!(r.note_suspicion(t0 + chrono::Duration::seconds(60), w), 2);
        assert_eq!(r.note_suspicion(t0 + chrono::Duration::seconds(650), w), 2);
        assert_eq!(r.suspicions.len(), 2);
    }

    #[test]
    fn history_is_bounded_and_keys_are_safe() {
        let mut r = wc();
        for _ in 0..30 {
            r.set_state(Suspicious, "s", Utc::now()).expect("legal");
            r.set_state(Open, "o", Utc::now()).expect("legal");
        }
        assert_eq!(r.changes.len(), KEEP_CHANGES);
        let k = resource_key("host a.example/wc*>");
        assert!(k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_'));
        assert_ne!(resource_key("a.b"), resource_key("a_b"));
    }
}
