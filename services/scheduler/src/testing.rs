//! Records for the unit tests of the decision modules.

use chrono::{DateTime, Utc};
use uuid::Uuid;
use warden_shared::job::{CrashInfo, Job, Lease};
use warden_shared::messages::{
    AcquireRequest, Classification, Party, Report, ReportKind, MESSAGE_VERSION,
};
use warden_shared::{Blame, JobState};

/// A fixed instant, `s` seconds after an arbitrary origin.
pub fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
}

/// A SCHEDULED job of task `t` in pool `p`, created at `at(0)`.
pub fn scheduled() -> Job {
    Job::builder("t")
        .id(Uuid::from_u128(7))
        .pool("p")
        .at(at(0))
        .build()
}

/// A job RUNNING attempt `epoch` for `session` (bot `bot`) on resource
/// `r1`, leased at `at(0)`.
pub fn running(epoch: u32, session: &str) -> Job {
    let mut j = scheduled();
    j.state = JobState::Running;
    j.attempt = epoch;
    j.lease = Some(Lease {
        session: session.into(),
        bot_id: "bot".into(),
        resource: Some("r1".into()),
        resources: vec!["r1".into()],
        epoch,
        leased_at: at(0),
        started_at: None,
        secret_hash: None,
    });
    j
}

pub fn report(job: &Job, epoch: u32, session: &str, kind: ReportKind) -> Report {
    Report {
        version: MESSAGE_VERSION,
        job_id: job.id,
        session: session.into(),
        bot_id: "bot".into(),
        epoch,
        at: at(1),
        secret: None,
        kind,
    }
}

pub fn finished() -> ReportKind {
    ReportKind::Finished {
        outcome: "passed".into(),
        duration_ms: 5,
    }
}

pub fn crashed() -> ReportKind {
    ReportKind::Crashed {
        crash: CrashInfo {
            exit_code: Some(3),
            ..Default::default()
        },
        fault: None,
    }
}

pub fn classification(blame: Blame, detail: &str) -> Classification {
    Classification {
        blame,
        detail: detail.into(),
        description: "it broke".into(),
        rule: "r".into(),
        notify: Party::Operators,
        suspect_resource: true,
    }
}

pub fn acquire_req(session: &str, bot: &str) -> AcquireRequest {
    AcquireRequest {
        version: MESSAGE_VERSION,
        session: session.into(),
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        pools: vec!["default".into()],
        max: 1,
        wait_ms: 0,
    }
}

/// A session `name` of bot `bot` in `state`, serving pool `default` with
/// capacity 2, as the fencing service writes it.
pub fn session(
    name: &str,
    bot: &str,
    state: warden_shared::session::SessionState,
) -> warden_shared::session::Session {
    warden_shared::session::Session {
        version: MESSAGE_VERSION,
        name: name.into(),
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: String::new(),
        pools: vec!["default".into()],
        capacity: 2,
        agent_version: String::new(),
        timeout_ms: None,
        state,
        created_at: at(0),
        last_heartbeat: at(0),
        superseded_by: None,
        leases: Vec::new(),
        ended_at: None,
    }
}
