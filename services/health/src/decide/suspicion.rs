//! A suspect report on a resource (a job's attempt failed in a way the
//! catalogue blames on the resource): what becomes of the resource.

use chrono::{DateTime, Utc};
use warden_shared::config::HealthConfig;
use warden_shared::messages::ResourceSuspect;
use warden_shared::resource::{reason, Resource, ResourceState};

/// What a suspect report came to (`result` of
/// `warden_health_suspects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspectResult {
    /// No such resource on record.
    Unknown,
    /// Broken or closed already: nothing to do.
    Ignored,
    /// Already waiting for its check: one incident, noted in its reason.
    Noted,
    /// Open → suspicious, checked when due.
    Suspicious,
    /// Suspected `flap_limit` times within the window: broken without a
    /// check (the caller recycles it).
    Flapping,
}

impl SuspectResult {
    /// Its metric label (`metrics::SUSPECT_RESULTS`).
    pub fn label(self) -> &'static str {
        match self {
            SuspectResult::Unknown => "unknown",
            SuspectResult::Ignored => "ignored",
            SuspectResult::Noted => "noted",
            SuspectResult::Suspicious => "suspicious",
            SuspectResult::Flapping => "flapping",
        }
    }
}

/// The reason a suspect report gives.
pub fn why(s: &ResourceSuspect) -> String {
    format!(
        "job {} attempt {} failed with {} (may be the resource's fault)",
        s.job_id, s.attempt, s.detail
    )
}

/// The suspicion state machine: the report `s` (with its reason `why`)
/// on the record `current` (`None`: none) at `now`. Returns the result
/// and the record to write (`None`: write nothing; a move the record
/// does not allow writes nothing either, with the result it would have
/// had).
pub fn on_suspect(
    current: Option<Resource>,
    s: &ResourceSuspect,
    why: &str,
    cfg: &HealthConfig,
    now: DateTime<Utc>,
) -> (SuspectResult, Option<Resource>) {
    let Some(mut r) = current else {
        return (SuspectResult::Unknown, None);
    };
    match r.state {
        ResourceState::Broken | ResourceState::Closed => (SuspectResult::Ignored, None),
        // Already waiting for its check: one incident, not a new
        // suspicion (a host whose every job hit the same OOM is not
        // flapping).
        ResourceState::Suspicious => {
            r.reason = format!(
                "{}; also: {why}",
                r.reason.split("; also:").next().unwrap_or("")
            );
            (SuspectResult::Noted, Some(r))
        }
        // An attempt leased before the resource last passed a check
        // belongs to the incident that check covered: a new check, but no
        // flapping count and no back-off.
        ResourceState::Open if s.leased_at.is_some_and(|t| t < r.since) => {
            let ok = r.set_state(ResourceState::Suspicious, why, now).is_ok();
            (SuspectResult::Suspicious, ok.then_some(r))
        }
        ResourceState::Open => {
            let n = r.note_suspicion(now, cfg.flap_window) as u32;
            if cfg.flap_limit > 0 && n >= cfg.flap_limit {
                let reason = format!(
                    "{}: suspected {n} times within {:?}; last: {why}",
                    reason::FLAPPING,
                    cfg.flap_window
                );
                let ok = r.set_state(ResourceState::Broken, reason, now).is_ok();
                (SuspectResult::Flapping, ok.then_some(r))
            } else {
                if r.set_state(ResourceState::Suspicious, why, now).is_err() {
                    return (SuspectResult::Suspicious, None);
                }
                if n > 1 {
                    // Suspected again soon after passing a check: out of
                    // service for longer.
                    let wait = cfg.recheck_backoff.saturating_mul(1 << (n - 2).min(16));
                    r.check_after = Some(super::after(now, wait));
                }
                (SuspectResult::Suspicious, Some(r))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::decide::fixtures::{cfg, open, t};
    use uuid::Uuid;

    fn report(leased_at: Option<DateTime<Utc>>) -> ResourceSuspect {
        ResourceSuspect {
            version: 1,
            resource: "h".into(),
            job_id: Uuid::nil(),
            attempt: 1,
            detail: "oom".into(),
            leased_at,
            at: t(0),
        }
    }

    fn suspect(
        r: Option<Resource>,
        s: &ResourceSuspect,
        now: i64,
    ) -> (SuspectResult, Option<Resource>) {
        on_suspect(r, s, &why(s), &cfg(""), t(now))
    }

    #[test]
    fn labels_are_the_metric_values() {
        for r in [
            SuspectResult::Unknown,
            SuspectResult::Ignored,
            SuspectResult::Noted,
            SuspectResult::Suspicious,
            SuspectResult::Flapping,
        ] {
            assert!(
                crate::metrics::SUSPECT_RESULTS.contains(&r.label()),
                "{r:?}"
            );
        }
    }

    #[test]
    fn an_unknown_resource_writes_nothing() {
        assert_eq!(
            suspect(None, &report(None), 1),
            (SuspectResult::Unknown, None)
        );
    }

    #[test]
    fn a_broken_or_closed_resource_is_ignored() {
        let mut r = open("h");
        r.set_state(ResourceState::Broken, "x", t(1)).unwrap();
        assert_eq!(
            suspect(Some(r.clone()), &report(None), 2).0,
            SuspectResult::Ignored
        );
        r.close(reason::CHECK_FAILED, "x", t(2)).unwrap();
        assert_eq!(
            suspect(Some(r), &report(None), 3),
            (SuspectResult::Ignored, None)
        );
    }

    #[test]
    fn open_becomes_suspicious_then_further_reports_are_noted_once() {
        let s = report(None);
        let (res, r) = suspect(Some(open("h")), &s, 1);
        assert_eq!(res, SuspectResult::Suspicious);
        let r = r.unwrap();
        assert_eq!(r.state, ResourceState::Suspicious);
        assert_eq!(r.check_after, None, "first suspicion: no back-off");
        let (res, r) = suspect(Some(r), &s, 2);
        assert_eq!(res, SuspectResult::Noted);
        let (_, r) = suspect(r, &s, 3);
        let r = r.unwrap();
        assert_eq!(r.reason.matches("; also:").count(), 1, "{}", r.reason);
        assert_eq!(r.state, ResourceState::Suspicious);
    }

    #[test]
    fn suspected_again_after_a_pass_waits_a_back_off_and_then_flaps() {
        let s = report(None);
        let (_, r) = suspect(Some(open("h")), &s, 1);
        let mut r = r.unwrap();
        r.set_state(ResourceState::Open, "check passed", t(2))
            .unwrap();
        let (res, r) = suspect(Some(r), &s, 3);
        assert_eq!(res, SuspectResult::Suspicious);
        let mut r = r.unwrap();
        assert_eq!(
            r.check_after,
            Some(t(13)),
            "recheck_backoff after the second"
        );
        r.set_state(ResourceState::Open, "check passed", t(4))
            .unwrap();
        let (res, r) = suspect(Some(r), &s, 5);
        assert_eq!(res, SuspectResult::Flapping);
        let r = r.unwrap();
        assert_eq!(r.state, ResourceState::Broken);
        assert!(r.reason.starts_with(reason::FLAPPING), "{}", r.reason);
    }

    #[test]
    fn an_attempt_leased_before_the_last_pass_does_not_count_as_flapping() {
        let s = report(None);
        let (_, r) = suspect(Some(open("h")), &s, 1);
        let mut r = r.unwrap();
        r.set_state(ResourceState::Open, "check passed", t(10))
            .unwrap();
        let old = report(Some(t(5)));
        let (res, r) = suspect(Some(r), &old, 11);
        assert_eq!(res, SuspectResult::Suspicious);
        let r = r.unwrap();
        assert_eq!(r.check_after, None);
        assert_eq!(r.suspicions.len(), 1, "not counted");
    }

    #[test]
    fn no_flapping_with_a_limit_of_zero() {
        let s = report(None);
        let c = cfg("flap_limit = 0\n");
        let mut r = open("h");
        for i in 0..5 {
            let (res, next) = on_suspect(Some(r), &s, &why(&s), &c, t(2 * i + 1));
            assert_eq!(res, SuspectResult::Suspicious);
            r = next.unwrap();
            r.set_state(ResourceState::Open, "passed", t(2 * i + 2))
                .unwrap();
        }
    }
}
