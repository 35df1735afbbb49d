//! Which session holds which running job, and which sessions and resources
//! are dead: a cache of the three buckets, and the pure decisions on it
//! (whose work goes back to the queue, and why).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;
use warden_shared::resource::{Resource, ResourceState};
use warden_shared::session::{Session, SessionState};
use warden_shared::{Job, JobState};

use crate::requeue::RequeueReason;

/// Which session holds which running job, and which sessions are dead: a
/// cache of the two buckets, enough to requeue a dead session's work.
#[derive(Default)]
pub struct LeaseIndex {
    pub(crate) by_session: HashMap<String, HashSet<Uuid>>,
    pub(crate) session_of: HashMap<Uuid, String>,
    pub(crate) states: HashMap<String, SessionState>,
    /// The bot of every session seen.
    pub(crate) bots: HashMap<String, String>,
    /// Pools and resources of every active session.
    pub(crate) active: HashMap<String, (Vec<String>, Vec<String>)>,
    /// Running attempts by resource, and the state of every resource.
    pub(crate) by_resource: HashMap<String, HashSet<Uuid>>,
    pub(crate) resources_of: HashMap<Uuid, Vec<String>>,
    pub(crate) resource_states: HashMap<String, ResourceState>,
    /// Epoch and lease time of every running attempt.
    pub(crate) leased: HashMap<Uuid, (u32, DateTime<Utc>)>,
    /// Per active session: its last heartbeat and the leases it listed.
    pub(crate) heartbeats: HashMap<String, LastHeartbeat>,
}

/// A session's last heartbeat: when, and the (job, epoch) leases it listed.
pub type LastHeartbeat = (DateTime<Utc>, Vec<(Uuid, u32)>);

/// Why a running attempt must be taken back, found by [`LeaseIndex::orphans`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub job: Uuid,
    pub session: String,
    pub reason: RequeueReason,
    /// The attempt, when only that one may be taken back.
    pub epoch: Option<u32>,
}

/// Whether an active session's heartbeat shows it never got a lease: a
/// heartbeat later than `grace` after the lease was granted that does not
/// list it. A heartbeat that may have been sent before the grant arrived
/// (within `grace`) proves nothing.
pub fn undelivered(
    leased_at: DateTime<Utc>,
    epoch: u32,
    job: Uuid,
    heartbeat: Option<&LastHeartbeat>,
    grace: Duration,
) -> bool {
    let Some((at, held)) = heartbeat else {
        return false;
    };
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::seconds(5));
    *at > leased_at + grace && !held.contains(&(job, epoch))
}

/// How long the orphan sweep waits for a heartbeat to list a lease: a full
/// session timeout (at least two seconds), so a heartbeat built before the
/// grant arrived but answered late does not look like one that never got it.
pub fn sweep_grace(session_timeout: Duration) -> Duration {
    session_timeout.max(Duration::from_secs(2))
}

impl LeaseIndex {
    /// Running attempts whose lease must go back: their session is known
    /// dead, their resource closed, or the session's heartbeats show it
    /// never got the grant. The sweep that calls this catches whatever a
    /// missed or failed watch event left behind.
    pub fn orphans(&self, grace: Duration) -> Vec<Orphan> {
        let mut out = Vec::new();
        for (job, session) in &self.session_of {
            if let Some(reason) = self.dead(session) {
                out.push(Orphan {
                    job: *job,
                    session: session.clone(),
                    reason,
                    epoch: None,
                });
            } else if self.on_closed_resource(job) {
                out.push(Orphan {
                    job: *job,
                    session: session.clone(),
                    reason: RequeueReason::ResourceClosed,
                    epoch: None,
                });
            } else if let Some((epoch, at)) = self.leased.get(job) {
                if undelivered(*at, *epoch, *job, self.heartbeats.get(session), grace) {
                    out.push(Orphan {
                        job: *job,
                        session: session.clone(),
                        reason: RequeueReason::LeaseUndelivered,
                        epoch: Some(*epoch),
                    });
                }
            }
        }
        out
    }

    /// Records a job's new state; the lease to take back at once when it
    /// runs for a session known dead or on a closed resource.
    pub fn observe_job(&mut self, job: &Job) -> Option<(String, RequeueReason)> {
        if let Some(old) = self.session_of.remove(&job.id) {
            if let Some(set) = self.by_session.get_mut(&old) {
                set.remove(&job.id);
            }
        }
        for r in self.resources_of.remove(&job.id).unwrap_or_default() {
            if let Some(set) = self.by_resource.get_mut(&r) {
                set.remove(&job.id);
            }
        }
        self.leased.remove(&job.id);
        let (JobState::Running, Some(lease)) = (job.state, &job.lease) else {
            return None;
        };
        self.leased.insert(job.id, (lease.epoch, lease.leased_at));
        self.session_of.insert(job.id, lease.session.clone());
        self.by_session
            .entry(lease.session.clone())
            .or_default()
            .insert(job.id);
        let resources = lease.resource_names();
        for r in &resources {
            self.by_resource
                .entry(r.clone())
                .or_default()
                .insert(job.id);
        }
        self.resources_of.insert(job.id, resources);
        self.dead(&lease.session)
            .or_else(|| {
                self.on_closed_resource(&job.id)
                    .then_some(RequeueReason::ResourceClosed)
            })
            .map(|r| (lease.session.clone(), r))
    }

    /// Records a session's new state; when it is no longer active, why, and
    /// the running jobs it held (their leases go back).
    pub fn observe_session(&mut self, session: &Session) -> Option<(RequeueReason, Vec<Uuid>)> {
        self.states.insert(session.name.clone(), session.state);
        self.bots
            .insert(session.name.clone(), session.bot_id.clone());
        if session.state == SessionState::Active {
            self.active.insert(
                session.name.clone(),
                (session.pools.clone(), session.resource_names()),
            );
            self.heartbeats.insert(
                session.name.clone(),
                (
                    session.last_heartbeat,
                    session.leases.iter().map(|h| (h.job_id, h.epoch)).collect(),
                ),
            );
        } else {
            self.active.remove(&session.name);
            self.heartbeats.remove(&session.name);
        }
        let reason = self.dead(&session.name)?;
        let doomed = self
            .by_session
            .get(&session.name)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        Some((reason, doomed))
    }

    /// Records a resource's new state; when it is closed, the running
    /// attempts on it, with their sessions (their leases go back).
    pub fn observe_resource(&mut self, resource: &Resource) -> Vec<(Uuid, String)> {
        self.resource_states
            .insert(resource.name.clone(), resource.state);
        if resource.state != ResourceState::Closed {
            return Vec::new();
        }
        self.by_resource
            .get(&resource.name)
            .map(|jobs| {
                jobs.iter()
                    .filter_map(|id| self.session_of.get(id).map(|s| (*id, s.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The state and bot of `session`, when this replica has seen it.
    pub fn session(&self, session: &str) -> Option<(SessionState, String)> {
        self.states
            .get(session)
            .map(|s| (*s, self.bots.get(session).cloned().unwrap_or_default()))
    }

    /// The first of `resources` known not to be open, with its state. A
    /// resource the health service has not registered yet is not refused.
    pub fn unavailable<'a>(&self, resources: &'a [String]) -> Option<(&'a str, ResourceState)> {
        resources
            .iter()
            .find_map(|r| match self.resource_states.get(r) {
                Some(s) if !s.leasable() => Some((r.as_str(), *s)),
                _ => None,
            })
    }

    /// Those of `resources` known closed.
    pub fn closed(&self, resources: &[String]) -> Vec<String> {
        resources
            .iter()
            .filter(|r| self.resource_states.get(*r) == Some(&ResourceState::Closed))
            .cloned()
            .collect()
    }

    /// Whether a running attempt sits on a closed resource.
    pub fn on_closed_resource(&self, job: &Uuid) -> bool {
        self.resources_of.get(job).is_some_and(|rs| {
            rs.iter()
                .any(|r| self.resource_states.get(r) == Some(&ResourceState::Closed))
        })
    }

    /// Pools some active session on open resources serves.
    pub fn served_pools(&self) -> HashSet<String> {
        self.active
            .values()
            .filter(|(_, resources)| self.unavailable(resources).is_none())
            .flat_map(|(pools, _)| pools.iter().cloned())
            .collect()
    }

    /// Pools of every active session (with repeats).
    pub fn known_pools(&self) -> Vec<String> {
        self.active
            .values()
            .flat_map(|(pools, _)| pools.iter().cloned())
            .collect()
    }

    /// Why work leased to `session` must go back, if it must.
    pub fn dead(&self, session: &str) -> Option<RequeueReason> {
        match self.states.get(session)? {
            SessionState::Active => None,
            SessionState::Expired => Some(RequeueReason::WorkerLost),
            SessionState::Quarantined => Some(RequeueReason::SessionSuperseded),
            SessionState::Closed => Some(RequeueReason::SessionClosed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    #[test]
    fn a_lease_is_undelivered_only_after_a_late_heartbeat_without_it() {
        let job = Uuid::from_u128(1);
        let grace = Duration::from_secs(5);
        // No heartbeat since: proves nothing.
        assert!(!undelivered(at(0), 1, job, None, grace));
        // A heartbeat within the grace may predate the grant's arrival.
        assert!(!undelivered(at(0), 1, job, Some(&(at(4), vec![])), grace));
        // Later and without it: never delivered.
        assert!(undelivered(at(0), 1, job, Some(&(at(6), vec![])), grace));
        // Later and listing it: held.
        assert!(!undelivered(
            at(0),
            1,
            job,
            Some(&(at(6), vec![(job, 1)])),
            grace
        ));
        // Listing an older attempt of the job is not this one.
        assert!(undelivered(
            at(0),
            2,
            job,
            Some(&(at(6), vec![(job, 1)])),
            grace
        ));
    }

    #[test]
    fn orphans_are_dead_sessions_closed_resources_and_undelivered_leases() {
        let mut l = LeaseIndex::default();
        let mut add = |n: u128, session: &str, resource: &str| {
            let id = Uuid::from_u128(n);
            l.session_of.insert(id, session.to_string());
            l.resources_of.insert(id, vec![resource.to_string()]);
            l.leased.insert(id, (1, at(0)));
        };
        add(1, "dead", "r1");
        add(2, "live", "closed");
        add(3, "live", "r1");
        add(4, "live", "r1");
        l.states.insert("dead".into(), SessionState::Expired);
        l.states.insert("live".into(), SessionState::Active);
        l.resource_states
            .insert("closed".into(), ResourceState::Closed);
        l.heartbeats
            .insert("live".into(), (at(10), vec![(Uuid::from_u128(4), 1)]));
        let mut found: Vec<(u128, RequeueReason)> = l
            .orphans(Duration::from_secs(5))
            .into_iter()
            .map(|o| (o.job.as_u128(), o.reason))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                (1, RequeueReason::WorkerLost),
                (2, RequeueReason::ResourceClosed),
                (3, RequeueReason::LeaseUndelivered)
            ]
        );
    }

    #[test]
    fn a_dead_session_says_why_its_work_goes_back() {
        let mut l = LeaseIndex::default();
        assert_eq!(l.dead("nobody"), None);
        for (state, want) in [
            (SessionState::Active, None),
            (SessionState::Expired, Some(RequeueReason::WorkerLost)),
            (
                SessionState::Quarantined,
                Some(RequeueReason::SessionSuperseded),
            ),
            (SessionState::Closed, Some(RequeueReason::SessionClosed)),
        ] {
            l.states.insert("s".into(), state);
            assert_eq!(l.dead("s"), want, "{state:?}");
        }
    }

    #[test]
    fn a_sweep_waits_at_least_two_seconds_for_a_heartbeat() {
        assert_eq!(
            sweep_grace(Duration::from_millis(500)),
            Duration::from_secs(2)
        );
        assert_eq!(
            sweep_grace(Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn unregistered_resources_are_not_refused_and_closed_ones_are_listed() {
        let mut l = LeaseIndex::default();
        l.resource_states.insert("open".into(), ResourceState::Open);
        l.resource_states
            .insert("gone".into(), ResourceState::Closed);
        let names = vec!["new".to_string(), "open".into(), "gone".into()];
        assert_eq!(l.unavailable(&names[..2]), None);
        assert_eq!(l.unavailable(&names), Some(("gone", ResourceState::Closed)));
        assert_eq!(l.closed(&names), vec!["gone".to_string()]);
    }

    fn session(name: &str, state: SessionState, hb: DateTime<Utc>) -> Session {
        serde_json::from_value(serde_json::json!({
            "version": 1,
            "name": name,
            "bot_id": "bot",
            "pools": ["p"],
            "capacity": 1,
            "state": state,
            "created_at": at(0),
            "last_heartbeat": hb,
        }))
        .expect("a session")
    }

    #[test]
    fn a_job_running_for_a_dead_session_or_on_a_closed_resource_goes_back() {
        let mut l = LeaseIndex::default();
        let job = crate::testing::running(1, "s1");
        assert_eq!(l.observe_job(&job), None);
        assert_eq!(l.session_of.get(&job.id).map(String::as_str), Some("s1"));
        l.states.insert("s1".into(), SessionState::Closed);
        assert_eq!(
            l.observe_job(&job),
            Some(("s1".to_string(), RequeueReason::SessionClosed))
        );
        l.states.insert("s1".into(), SessionState::Active);
        l.resource_states.insert("r1".into(), ResourceState::Closed);
        assert_eq!(
            l.observe_job(&job),
            Some(("s1".to_string(), RequeueReason::ResourceClosed))
        );
        // Once it no longer runs, it is forgotten.
        let mut done = job.clone();
        done.state = JobState::Finished;
        assert_eq!(l.observe_job(&done), None);
        assert!(l.session_of.is_empty() && l.leased.is_empty());
        assert!(l.by_resource.get("r1").is_some_and(|s| s.is_empty()));
    }

    #[test]
    fn a_session_that_dies_gives_back_the_jobs_it_held() {
        let mut l = LeaseIndex::default();
        let job = crate::testing::running(1, "s1");
        l.observe_job(&job);
        assert_eq!(
            l.observe_session(&session("s1", SessionState::Active, at(3))),
            None
        );
        assert_eq!(l.known_pools(), vec!["p".to_string()]);
        assert!(l.served_pools().contains("p"));
        assert_eq!(l.heartbeats.get("s1").map(|h| h.0), Some(at(3)));
        assert_eq!(
            l.observe_session(&session("s1", SessionState::Expired, at(4))),
            Some((RequeueReason::WorkerLost, vec![job.id]))
        );
        assert!(l.known_pools().is_empty() && l.heartbeats.is_empty());
        assert_eq!(
            l.session("s1"),
            Some((SessionState::Expired, "bot".to_string()))
        );
    }
}
