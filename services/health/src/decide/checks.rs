//! Checks: when a resource is due for one, who may claim it, and what a
//! check's outcome does to the record.

use std::time::Duration;

use chrono::{DateTime, Utc};
use thiserror::Error;
use warden_shared::config::HealthConfig;
use warden_shared::messages::CheckReply;
use warden_shared::resource::{reason, CheckRecord, PendingCheck, Resource, ResourceState};

use super::{after, truncate};

/// Why a check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A suspicious resource's check, by the periodic pass.
    Suspicion,
    /// A closed resource whose agent is alive, by the periodic pass: pass
    /// opens it as a new incarnation.
    Return,
    /// An operator asked (`warden resource check`).
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Suspicion => "suspicion",
            Trigger::Return => "return",
            Trigger::Manual => "manual",
        }
    }
}

/// What a check came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
        }
    }

    /// The [`reason`] code of a resource broken by this outcome.
    pub fn reason_code(self) -> &'static str {
        match self {
            Outcome::Timeout => reason::CHECK_TIMEOUT,
            _ => reason::CHECK_FAILED,
        }
    }
}

/// Why a check was not claimed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("resource {resource} depends on {dependency}, which is {state}")]
    DependencyNotOpen {
        resource: String,
        dependency: String,
        state: ResourceState,
    },
    #[error("resource {resource} is {state} and cannot be checked")]
    NotCheckable {
        resource: String,
        state: ResourceState,
    },
}

/// How long a closed resource waits before its next return check (`None`:
/// it does not come back by itself). One closed by hand never; after
/// vanishing or with what it depends on, at once (its agent only went
/// silent); after failing a check itself or flapping, `recheck_backoff`;
/// each failed return check doubles the wait, capped at `flap_window`.
pub fn return_wait(closed_for: Option<&str>, failed: u32, cfg: &HealthConfig) -> Option<Duration> {
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

/// Whether nobody runs a check of `r` (or the one claimed is stale: older
/// than twice `check_timeout`).
pub fn unclaimed(r: &Resource, cfg: &HealthConfig, now: DateTime<Utc>) -> bool {
    let stale =
        chrono::Duration::from_std(cfg.check_timeout * 2).unwrap_or(chrono::Duration::minutes(1));
    r.check.as_ref().is_none_or(|c| now - c.started_at > stale)
}

/// Whether a suspicious resource is due for its check and unclaimed.
pub fn claimable(r: &Resource, cfg: &HealthConfig, now: DateTime<Utc>) -> bool {
    r.state == ResourceState::Suspicious
        && r.check_after.is_none_or(|t| t <= now)
        && unclaimed(r, cfg, now)
}

/// Whether what `r` depends on is open (or unknown), by `state_of` (the
/// state of a resource by name).
pub fn dependency_open(
    r: &Resource,
    state_of: impl Fn(&str) -> Option<ResourceState>,
) -> Result<(), Refusal> {
    let Some(dep) = r.depends_on.as_deref() else {
        return Ok(());
    };
    match state_of(dep) {
        Some(ResourceState::Open) | None => Ok(()),
        Some(state) => Err(Refusal::DependencyNotOpen {
            resource: r.name.clone(),
            dependency: dep.to_string(),
            state,
        }),
    }
}

/// Whether a closed resource is due for a return check: not closed by
/// hand, an active session on it, what it depends on open, its back-off
/// over, unclaimed.
pub fn returnable(
    r: &Resource,
    cfg: &HealthConfig,
    now: DateTime<Utc>,
    state_of: impl Fn(&str) -> Option<ResourceState>,
) -> bool {
    r.may_return()
        && !r.sessions.is_empty()
        && dependency_open(r, state_of).is_ok()
        && r.check_after.is_none_or(|t| t <= now)
        && unclaimed(r, cfg, now)
}

/// The claim of a check of `r` by replica `by`. `Manual`: any open,
/// suspicious or closed resource (a closed one whose dependency is open).
/// `Suspicion`: a due suspicious one. `Return`: a due closed one with a
/// live agent.
pub fn claim(
    mut r: Resource,
    trigger: Trigger,
    by: &str,
    cfg: &HealthConfig,
    now: DateTime<Utc>,
    state_of: impl Fn(&str) -> Option<ResourceState>,
) -> Result<Resource, Refusal> {
    match (trigger, r.state) {
        (Trigger::Manual, ResourceState::Open | ResourceState::Suspicious) => {}
        (Trigger::Manual, ResourceState::Closed) => dependency_open(&r, state_of)?,
        (Trigger::Suspicion, _) if claimable(&r, cfg, now) => {}
        (Trigger::Return, _) if returnable(&r, cfg, now, state_of) => {}
        _ => {
            return Err(Refusal::NotCheckable {
                resource: r.name.clone(),
                state: r.state,
            })
        }
    }
    r.check = Some(PendingCheck {
        by: by.to_string(),
        started_at: now,
        trigger: trigger.as_str().into(),
    });
    Ok(r)
}

/// What the check of the record claimed as `claimed` (its incarnation
/// and state then) did: the record after it, or `None` when it is
/// another incarnation now or was closed while its check ran. Pass opens
/// a suspicious or closed one (closed: a new incarnation); fail breaks an
/// open or suspicious one, and a closed one waits longer.
pub fn apply_result(
    mut r: Resource,
    claimed: (u32, ResourceState),
    outcome: Outcome,
    record: CheckRecord,
    trigger: Trigger,
    cfg: &HealthConfig,
    now: DateTime<Utc>,
) -> Option<Resource> {
    let (incarnation, claimed_state) = claimed;
    if r.incarnation != incarnation
        || (r.state == ResourceState::Closed && claimed_state != ResourceState::Closed)
    {
        return None;
    }
    let summary = record.summary.clone();
    r.record_check(record);
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
            let why = format!("{}: {summary}", outcome.reason_code());
            r.set_state(ResourceState::Broken, why, now).ok()?;
        }
        (_, ResourceState::Closed) => {
            // Stays out; checked again after a longer wait.
            let wait = return_wait(r.closed_for.as_deref(), r.failed_checks_while_closed(), cfg);
            r.check_after = wait.map(|w| after(now, w));
        }
        _ => {}
    }
    Some(r)
}

/// The outcome and summary of bot `bot`'s answer to a check of a
/// resource of `kind`.
pub fn judge_reply(bot: &str, kind: &str, reply: &CheckReply) -> (Outcome, String) {
    let summary = if let Some(e) = &reply.error {
        format!("bot {bot}: {}", e.message)
    } else if reply.passed {
        let names: Vec<&str> = reply.results.iter().map(|c| c.name.as_str()).collect();
        if names.is_empty() {
            format!("bot {bot} answered (no checks configured for kind {kind})")
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
    (outcome, truncate(summary, 1000))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::decide::fixtures::{cfg, open, t};
    use warden_shared::error::ErrorCode;
    use warden_shared::messages::{CheckResult, ErrorBody};

    fn none(_: &str) -> Option<ResourceState> {
        None
    }

    fn record(result: Outcome, at: i64) -> CheckRecord {
        CheckRecord {
            at: t(at),
            result: result.as_str().into(),
            summary: "disk".into(),
            duration_ms: 3,
            trigger: "suspicion".into(),
        }
    }

    fn suspicious() -> Resource {
        let mut r = open("h");
        r.set_state(ResourceState::Suspicious, "oom", t(1)).unwrap();
        r
    }

    fn closed(code: &str) -> Resource {
        let mut r = open("h");
        r.set_state(ResourceState::Broken, "x", t(1)).unwrap();
        r.close(code, "x", t(1)).unwrap();
        r
    }

    #[test]
    fn a_closed_resource_waits_longer_after_each_failed_return_check() {
        let cfg = cfg("");
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

    #[test]
    fn a_claim_goes_stale_after_twice_the_check_timeout() {
        let c = cfg("");
        let r = claim(suspicious(), Trigger::Suspicion, "me", &c, t(2), none).unwrap();
        assert!(!unclaimed(&r, &c, t(12)));
        assert!(!claimable(&r, &c, t(12)));
        assert!(unclaimed(&r, &c, t(13)));
        assert!(claimable(&r, &c, t(13)));
    }

    #[test]
    fn a_suspicious_resource_is_claimable_once_its_back_off_is_over() {
        let c = cfg("");
        let mut r = suspicious();
        r.check_after = Some(t(20));
        assert!(!claimable(&r, &c, t(19)));
        assert!(claimable(&r, &c, t(20)));
        assert!(!claimable(&open("h"), &c, t(20)), "open is not due");
    }

    #[test]
    fn a_dependency_that_is_not_open_is_named() {
        let mut r = open("wc");
        r.depends_on = Some("host".into());
        assert_eq!(dependency_open(&r, none), Ok(()));
        assert_eq!(dependency_open(&r, |_| Some(ResourceState::Open)), Ok(()));
        let e = dependency_open(&r, |_| Some(ResourceState::Closed)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "resource wc depends on host, which is closed"
        );
    }

    #[test]
    fn a_closed_resource_returns_with_a_session_and_an_open_dependency() {
        let c = cfg("");
        let mut r = closed(reason::VANISHED);
        r.check_after = None;
        assert!(returnable(&r, &c, t(2), none));
        r.depends_on = Some("host".into());
        assert!(!returnable(&r, &c, t(2), |_| Some(ResourceState::Broken)));
        r.depends_on = None;
        r.sessions.clear();
        assert!(!returnable(&r, &c, t(2), none), "no agent");
        let mut m = closed(reason::MANUAL);
        m.check_after = None;
        assert!(!returnable(&m, &c, t(2), none), "closed by hand");
    }

    #[test]
    fn claims_by_trigger() {
        let c = cfg("");
        assert!(claim(open("h"), Trigger::Manual, "me", &c, t(2), none).is_ok());
        let e = claim(open("h"), Trigger::Suspicion, "me", &c, t(2), none).unwrap_err();
        assert_eq!(e.to_string(), "resource h is open and cannot be checked");
        let mut broken = open("h");
        broken.set_state(ResourceState::Broken, "x", t(1)).unwrap();
        assert!(claim(broken, Trigger::Manual, "me", &c, t(2), none).is_err());
        let mut m = closed(reason::MANUAL);
        m.depends_on = Some("host".into());
        assert!(claim(m.clone(), Trigger::Manual, "me", &c, t(2), none).is_ok());
        assert!(matches!(
            claim(m.clone(), Trigger::Manual, "me", &c, t(2), |_| Some(
                ResourceState::Closed
            )),
            Err(Refusal::DependencyNotOpen { .. })
        ));
        assert!(claim(m, Trigger::Return, "me", &c, t(2), none).is_err());
        let r = claim(suspicious(), Trigger::Suspicion, "me", &c, t(2), none).unwrap();
        let check = r.check.unwrap();
        assert_eq!((check.by.as_str(), check.started_at), ("me", t(2)));
        assert_eq!(check.trigger, "suspicion");
    }

    #[test]
    fn a_pass_opens_and_a_failure_breaks() {
        let c = cfg("");
        let r = suspicious();
        let claimed = (r.incarnation, r.state);
        let passed = apply_result(
            r.clone(),
            claimed,
            Outcome::Passed,
            record(Outcome::Passed, 3),
            Trigger::Suspicion,
            &c,
            t(3),
        )
        .unwrap();
        assert_eq!(passed.state, ResourceState::Open);
        assert_eq!(passed.reason, "check passed: disk");
        let failed = apply_result(
            r,
            claimed,
            Outcome::Timeout,
            record(Outcome::Timeout, 3),
            Trigger::Suspicion,
            &c,
            t(3),
        )
        .unwrap();
        assert_eq!(failed.state, ResourceState::Broken);
        assert_eq!(failed.reason, "check_timeout: disk");
    }

    #[test]
    fn a_closed_resource_returns_as_a_new_incarnation_or_waits_longer() {
        let c = cfg("");
        let r = closed(reason::CHECK_FAILED);
        let claimed = (r.incarnation, r.state);
        let back = apply_result(
            r.clone(),
            claimed,
            Outcome::Passed,
            record(Outcome::Passed, 3),
            Trigger::Return,
            &c,
            t(3),
        )
        .unwrap();
        assert_eq!(back.state, ResourceState::Open);
        assert_eq!(back.incarnation, 2);
        assert!(
            back.reason.starts_with("returned: its agent came back"),
            "{}",
            back.reason
        );
        let out = apply_result(
            r,
            claimed,
            Outcome::Failed,
            record(Outcome::Failed, 3),
            Trigger::Return,
            &c,
            t(3),
        )
        .unwrap();
        assert_eq!(out.state, ResourceState::Closed);
        assert_eq!(out.check_after, Some(t(13)));
    }

    #[test]
    fn a_result_for_another_incarnation_or_a_resource_closed_meanwhile_is_dropped() {
        let c = cfg("");
        let r = suspicious();
        let rec = record(Outcome::Passed, 3);
        let stale = (r.incarnation + 1, r.state);
        assert!(apply_result(
            r,
            stale,
            Outcome::Passed,
            rec.clone(),
            Trigger::Suspicion,
            &c,
            t(3)
        )
        .is_none());
        let closed = closed(reason::MANUAL);
        let claimed = (closed.incarnation, ResourceState::Suspicious);
        assert!(apply_result(
            closed,
            claimed,
            Outcome::Passed,
            rec,
            Trigger::Suspicion,
            &c,
            t(3)
        )
        .is_none());
    }

    #[test]
    fn a_reply_is_judged_and_summarised() {
        let result = |name: &str, passed| CheckResult {
            name: name.into(),
            passed,
            detail: "low".into(),
            duration_ms: 1,
        };
        let ok = CheckReply {
            version: 1,
            passed: true,
            results: vec![result("disk", true), result("dns", true)],
            error: None,
        };
        assert_eq!(
            judge_reply("b", "host", &ok),
            (Outcome::Passed, "disk, dns passed on bot b".into())
        );
        let empty = CheckReply {
            results: Vec::new(),
            ..ok.clone()
        };
        assert_eq!(
            judge_reply("b", "host", &empty).1,
            "bot b answered (no checks configured for kind host)"
        );
        let bad = CheckReply {
            passed: false,
            results: vec![result("disk", false), result("dns", true)],
            ..ok.clone()
        };
        assert_eq!(
            judge_reply("b", "host", &bad),
            (Outcome::Failed, "disk: low (bot b)".into())
        );
        let err = CheckReply {
            error: Some(ErrorBody::new(ErrorCode::Internal, "boom")),
            ..ok
        };
        assert_eq!(
            judge_reply("b", "host", &err),
            (Outcome::Failed, "bot b: boom".into())
        );
    }
}
