//! The periodic pass: which resources need work now, and the gauges.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use warden_shared::config::HealthConfig;
use warden_shared::resource::{Resource, ResourceState};

use super::checks::{claimable, returnable};
use super::recycling::code_of;

/// Work the periodic pass starts on a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickJob {
    /// A due suspicious resource: its check.
    Check,
    /// A due closed resource with a live agent: its return check.
    Return,
    /// A broken one: its (interrupted) recycle, with its code and reason.
    Recycle { code: &'static str, why: String },
    /// Open or suspicious while what it depends on is closed: closed too.
    Dependency { why: String },
}

impl TickJob {
    /// Its name in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            TickJob::Check => "check",
            TickJob::Return => "return",
            TickJob::Recycle { .. } => "recycle",
            TickJob::Dependency { .. } => "dependency",
        }
    }
}

/// What to start on each resource of `all` at `now`.
pub fn due(all: &[Resource], cfg: &HealthConfig, now: DateTime<Utc>) -> Vec<(String, TickJob)> {
    let state: BTreeMap<&str, ResourceState> =
        all.iter().map(|r| (r.name.as_str(), r.state)).collect();
    let state_of = |n: &str| state.get(n).copied();
    let closed: HashSet<&str> = all
        .iter()
        .filter(|r| r.state == ResourceState::Closed)
        .map(|r| r.name.as_str())
        .collect();
    let mut jobs = Vec::new();
    for r in all {
        let job = match r.state {
            ResourceState::Suspicious if claimable(r, cfg, now) => TickJob::Check,
            ResourceState::Closed if returnable(r, cfg, now, state_of) => TickJob::Return,
            ResourceState::Broken => TickJob::Recycle {
                code: code_of(&r.reason),
                why: r.reason.clone(),
            },
            ResourceState::Open | ResourceState::Suspicious
                if r.depends_on.as_deref().is_some_and(|d| closed.contains(d)) =>
            {
                let dep = r.depends_on.clone().unwrap_or_default();
                TickJob::Dependency {
                    why: format!("{dep}, which it depends on, was closed"),
                }
            }
            _ => continue,
        };
        jobs.push((r.name.clone(), job));
    }
    jobs
}

/// Resources by state, and by pool and state (every pool of `pools`
/// listed; open without an agent is no capacity).
#[allow(clippy::type_complexity)]
pub fn gauges<'a>(
    all: &[Resource],
    pools: impl IntoIterator<Item = &'a str>,
) -> (
    BTreeMap<ResourceState, i64>,
    BTreeMap<String, BTreeMap<ResourceState, i64>>,
) {
    let mut by_state = BTreeMap::new();
    for state in ResourceState::ALL {
        by_state.insert(
            state,
            all.iter().filter(|r| r.state == state).count() as i64,
        );
    }
    let mut by_pool: BTreeMap<String, BTreeMap<ResourceState, i64>> = BTreeMap::new();
    for p in pools {
        by_pool.entry(p.to_string()).or_default();
    }
    for r in all {
        for p in &r.pools {
            let e = by_pool.entry(p.clone()).or_default();
            if r.state == ResourceState::Open && r.sessions.is_empty() {
                continue;
            }
            *e.entry(r.state).or_default() += 1;
        }
    }
    (by_state, by_pool)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::decide::fixtures::{cfg, open, t};
    use warden_shared::resource::reason;

    #[test]
    fn each_state_gets_its_work() {
        let c = cfg("");
        let mut sus = open("sus");
        sus.set_state(ResourceState::Suspicious, "oom", t(1))
            .unwrap();
        let mut later = open("later");
        later
            .set_state(ResourceState::Suspicious, "oom", t(1))
            .unwrap();
        later.check_after = Some(t(100));
        let mut broken = open("broken");
        broken
            .set_state(ResourceState::Broken, "flapping: often", t(1))
            .unwrap();
        let mut host = open("host");
        host.set_state(ResourceState::Broken, "x", t(1)).unwrap();
        host.close(reason::VANISHED, "x", t(1)).unwrap();
        let mut wc = open("wc");
        wc.depends_on = Some("host".into());
        let all = vec![sus, later, broken, host, wc, open("fine")];
        let jobs = due(&all, &c, t(2));
        assert_eq!(
            jobs,
            vec![
                ("sus".to_string(), TickJob::Check),
                (
                    "broken".to_string(),
                    TickJob::Recycle {
                        code: reason::FLAPPING,
                        why: "flapping: often".into()
                    }
                ),
                ("host".to_string(), TickJob::Return),
                (
                    "wc".to_string(),
                    TickJob::Dependency {
                        why: "host, which it depends on, was closed".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn open_without_an_agent_is_no_pool_capacity() {
        let mut idle = open("idle");
        idle.sessions.clear();
        let all = vec![open("a"), idle];
        let (by_state, by_pool) = gauges(&all, ["default", "empty"]);
        assert_eq!(by_state[&ResourceState::Open], 2);
        assert_eq!(by_state[&ResourceState::Closed], 0);
        assert_eq!(by_pool["default"].get(&ResourceState::Open), Some(&1));
        assert!(by_pool["empty"].is_empty());
    }
}
