//! What an HTTP read without the write token may see (docs/security.md
//! "HTTP"). With a token configured, a read that does not present it gets
//! every job, session and resource with these left out:
//!
//! - job arguments' values (the names stay): they may carry anything a
//!   trigger rule put there;
//! - the lease's session name, and a history entry's actor when it is a
//!   session (anything but Warden's own services and `api`): a session
//!   name was enough to forge a report;
//! - a crash's log tail and status file (task output);
//! - session names and resource paths of bots and resources.
//!
//! Without a token configured (only allowed on a loopback address) every
//! reader may write anyway, so answers are whole.

use warden_shared::job::Job;
use warden_shared::session::Session;

/// What a redacted value reads as.
pub const REDACTED: &str = "[redacted]";

/// Whether a reader presenting `given` (the bearer token, if any) sees
/// whole answers when the API's token is `token`.
pub fn sees_everything(token: Option<&str>, given: Option<&str>) -> bool {
    match token {
        None => true,
        Some(t) => given.is_some_and(|g| crate::http::constant_time_eq(g.as_bytes(), t.as_bytes())),
    }
}

/// An actor that names no session: one of Warden's services, or `api`.
fn public_actor(actor: &str) -> bool {
    actor == crate::ops::ACTOR || warden_shared::services::ALL.iter().any(|s| s.name == actor)
}

/// `job` as a reader without the token may see it.
pub fn redact_job(job: &mut Job) {
    for v in job.args.values_mut() {
        *v = REDACTED.into();
    }
    if let Some(lease) = job.lease.as_mut() {
        lease.session = REDACTED.into();
        // Not the secret, but nothing a reader needs either.
        lease.secret_hash = None;
    }
    for h in &mut job.history {
        if !public_actor(&h.actor) {
            h.actor = REDACTED.into();
        }
    }
    if let Some(crash) = job.crash.as_mut() {
        if !crash.log_tail.is_empty() {
            crash.log_tail = REDACTED.into();
        }
        if crash.status_file.is_some() {
            crash.status_file = Some(REDACTED.into());
        }
    }
}

/// `session` as a reader without the token may see it.
pub fn redact_session(session: &mut Session) {
    session.name = REDACTED.into();
    for r in &mut session.resources {
        if r.path.is_some() {
            r.path = Some(REDACTED.into());
        }
    }
}

/// A resource as a reader without the token may see it: without its
/// path, and without the names of the sessions that declared it.
pub fn redact_resource(resource: &mut warden_shared::resource::Resource) {
    if resource.path.is_some() {
        resource.path = Some(REDACTED.into());
    }
    for s in &mut resource.sessions {
        s.session = REDACTED.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_shared::job::{CrashInfo, Lease};

    #[test]
    fn only_the_token_sees_everything() {
        assert!(sees_everything(None, None));
        assert!(sees_everything(None, Some("x")));
        assert!(sees_everything(Some("s3cret"), Some("s3cret")));
        assert!(!sees_everything(Some("s3cret"), None));
        assert!(!sees_everything(Some("s3cret"), Some("s3cre")));
    }

    #[test]
    fn a_job_loses_session_names_argument_values_and_task_output() {
        let mut job = Job::builder("build").arg("nvr", "secret-pkg-1.0").build();
        job.lease = Some(Lease {
            session: "bot-a-7f3e".into(),
            bot_id: "bot-a".into(),
            resource: Some("host-a".into()),
            resources: Vec::new(),
            epoch: 1,
            leased_at: chrono::Utc::now(),
            started_at: None,
            secret_hash: Some("ab".repeat(32)),
        });
        let mut from_session = job.history[0].clone();
        from_session.actor = "bot-a-7f3e".into();
        job.history.push(from_session);
        let mut from_api = job.history[0].clone();
        from_api.actor = "api".into();
        job.history.push(from_api);
        job.crash = Some(CrashInfo {
            log_tail: "token=abc".into(),
            status_file: Some("{}".into()),
            ..Default::default()
        });
        let mut r = job.clone();
        redact_job(&mut r);
        let text = serde_json::to_string(&r).unwrap_or_default();
        for secret in ["secret-pkg-1.0", "bot-a-7f3e", "token=abc"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(r.args.get("nvr").map(String::as_str), Some(REDACTED));
        let lease = r.lease.as_ref().map(|l| (l.bot_id.as_str(), l.epoch));
        assert_eq!(lease, Some(("bot-a", 1)), "the bot and epoch stay");
        let actors: Vec<&str> = r.history.iter().map(|h| h.actor.as_str()).collect();
        assert_eq!(actors.last(), Some(&"api"));
        assert!(actors.contains(&REDACTED));
        assert_eq!((r.id, &r.task, r.state), (job.id, &job.task, job.state));
    }

    fn resource(name: &str, path: Option<&str>) -> warden_shared::resource::Resource {
        warden_shared::resource::Resource::register(
            &warden_shared::resource::ResourceDecl {
                name: name.into(),
                kind: "host".into(),
                path: path.map(str::to_string),
                depends_on: None,
            },
            1,
            "agent-1",
            "bot-a",
            "registered".into(),
            chrono::Utc::now(),
        )
    }

    #[test]
    fn resource_paths_go() {
        let mut v = resource("host-a", Some("/srv/work"));
        redact_resource(&mut v);
        assert_eq!(v.path.as_deref(), Some(REDACTED));
        assert_eq!(v.name, "host-a");
        let mut none = resource("host-b", None);
        redact_resource(&mut none);
        assert!(none.path.is_none());
    }

    /// A session name was enough to forge a report: the resources listing
    /// gave it away to any reader until the console's review found it.
    #[test]
    fn the_sessions_that_declared_a_resource_lose_their_names() {
        let mut v = resource("host-a", None);
        v.sessions = vec![warden_shared::resource::ResourceSession {
            session: "s-secret-1".into(),
            bot_id: "bot-a".into(),
        }];
        redact_resource(&mut v);
        assert_eq!(v.sessions[0].session, REDACTED);
        assert_eq!(v.sessions[0].bot_id, "bot-a");
    }
}
