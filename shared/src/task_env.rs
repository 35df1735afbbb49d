//! What a task starts with: a cleared environment plus an allowlist, and
//! optionally another user (docs/security.md "Tasks and the worker's
//! secrets").
//!
//! A worker runs untrusted code, and its own environment holds its NATS
//! password, the HTTP token and the paths of its credential files. A task
//! therefore never inherits that environment: it gets
//!
//! 1. the worker's values of [`DEFAULT_PASS`] and of every `LC_*`
//!    variable, plus those of the names in `worker.task_env`, each only
//!    if [`refused`] does not refuse its name and its value holds none of
//!    the worker's secrets ([`task_environment`]);
//! 2. the task's fixed `tasks.<name>.env` entries;
//! 3. what Warden itself gives a task: `WARDEN_JOB_ID`, `WARDEN_ATTEMPT`,
//!    `WARDEN_TASK`, `WARDEN_STATUS_FILE`, `WARDEN_ARG_<NAME>`,
//!    `WARDEN_RESOURCE_<KIND>`.
//!
//! With `worker.task_user` the task also runs as another user
//! ([`resolve_user`]), so it cannot read the worker's
//! `/proc/<pid>/environ` or its credential files either.

use std::collections::BTreeMap;

use thiserror::Error;

/// Passed through from the worker's environment by default.
pub const DEFAULT_PASS: &[&str] = &[
    "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "TERM",
];

/// Every variable with one of these prefixes is passed by default.
pub const DEFAULT_PREFIXES: &[&str] = &["LC_"];

/// Words that make a name look like a credential (matched in the upper
/// case name).
const CREDENTIAL_WORDS: &[&str] = &[
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "CREDENTIAL",
    "CREDS",
    "NKEY",
    "SEED",
    "PRIVATE_KEY",
    "API_KEY",
];

/// Secrets shorter than this are not looked for in values: a two-letter
/// password would drop half the environment.
const MIN_SECRET_LEN: usize = 4;

/// Why `name` may never be passed through from the worker's environment
/// (`worker.task_env`), or `None` when it may.
pub fn refused(name: &str) -> Option<&'static str> {
    if let Some(reason) = refused_fixed(name) {
        return Some(reason);
    }
    let upper = name.to_ascii_uppercase();
    if CREDENTIAL_WORDS.iter().any(|w| upper.contains(w)) {
        return Some(
            "its name looks like a credential; give the task the value it needs \
             as a fixed tasks.<name>.env entry instead",
        );
    }
    None
}

/// Why `name` may never be a fixed `tasks.<name>.env` entry either.
pub fn refused_fixed(name: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("WARDEN_") {
        return Some(
            "WARDEN_* is Warden's: the worker's own configuration (its NATS \
             password, the HTTP token, credential paths) and the variables \
             Warden sets for a task",
        );
    }
    if upper.starts_with("NATS_") {
        return Some("NATS_* holds NATS client credentials and settings");
    }
    None
}

/// Whether `name` is a usable environment variable name: letters, digits
/// and `_`, not starting with a digit.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The worker's variables a task may get.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Passed {
    pub env: BTreeMap<String, String>,
    /// Allowed by name but dropped because the value holds one of the
    /// worker's secrets (names only, never values).
    pub dropped: Vec<String>,
}

/// From the worker's environment `inherited`, the variables a task
/// starts with: [`DEFAULT_PASS`], [`DEFAULT_PREFIXES`] and `extra`
/// (`worker.task_env`), never a name [`refused`] refuses (whatever
/// `extra` says), and never a value that contains one of `secrets` (the
/// NATS password, the HTTP token, credential paths).
pub fn task_environment(
    inherited: impl IntoIterator<Item = (String, String)>,
    extra: &[String],
    secrets: &[&str],
) -> Passed {
    let secrets: Vec<&str> = secrets
        .iter()
        .copied()
        .filter(|s| s.len() >= MIN_SECRET_LEN)
        .collect();
    let mut passed = Passed::default();
    for (name, value) in inherited {
        let allowed = DEFAULT_PASS.contains(&name.as_str())
            || DEFAULT_PREFIXES.iter().any(|p| name.starts_with(p))
            || extra.contains(&name);
        if !allowed || refused(&name).is_some() {
            continue;
        }
        if secrets.iter().any(|s| value.contains(s)) {
            passed.dropped.push(name);
            continue;
        }
        passed.env.insert(name, value);
    }
    passed
}

/// The user tasks run as (`worker.task_user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskUser {
    pub uid: u32,
    pub gid: u32,
    /// From the passwd entry, when the user was named: the task's `HOME`,
    /// `USER` and `LOGNAME`.
    pub name: Option<String>,
    pub home: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TaskUserError {
    #[error(
        "worker.task_user: no user {0:?} in /etc/passwd (give uid:gid for users from elsewhere)"
    )]
    Unknown(String),
    #[error("worker.task_user: {0:?} is neither a user name nor uid[:gid]")]
    Invalid(String),
    #[error(
        "worker.task_user: running tasks as uid {uid} needs the worker to run as root \
         (it runs as uid {euid}); run it as root or leave worker.task_user empty"
    )]
    NotRoot { uid: u32, euid: u32 },
    #[error("worker.task_user: cannot read /etc/passwd: {0}")]
    Passwd(String),
}

/// Whether `spec` has the shape of a `worker.task_user` value (a user
/// name, `uid` or `uid:gid`); checked with the config.
pub fn valid_user_spec(spec: &str) -> bool {
    if let Some((u, g)) = spec.split_once(':') {
        return u.parse::<u32>().is_ok() && g.parse::<u32>().is_ok();
    }
    !spec.is_empty()
        && spec
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Resolves `spec` (a user name, looked up in `passwd`, the text of
/// `/etc/passwd`; or `uid` with the gid from passwd or the same number;
/// or `uid:gid`).
pub fn resolve_user(spec: &str, passwd: &str) -> Result<TaskUser, TaskUserError> {
    if !valid_user_spec(spec) {
        return Err(TaskUserError::Invalid(spec.to_string()));
    }
    let entries = || passwd.lines().filter_map(parse_passwd_line);
    if let Some((u, g)) = spec.split_once(':') {
        let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>()) else {
            return Err(TaskUserError::Invalid(spec.to_string()));
        };
        let known = entries().find(|e| e.uid == uid);
        return Ok(TaskUser {
            uid,
            gid,
            name: known.as_ref().and_then(|e| e.name.clone()),
            home: known.and_then(|e| e.home),
        });
    }
    if let Ok(uid) = spec.parse::<u32>() {
        return Ok(entries().find(|e| e.uid == uid).unwrap_or(TaskUser {
            uid,
            gid: uid,
            name: None,
            home: None,
        }));
    }
    entries()
        .find(|e| e.name.as_deref() == Some(spec))
        .ok_or_else(|| TaskUserError::Unknown(spec.to_string()))
}

/// `name:x:uid:gid:gecos:home:shell`.
fn parse_passwd_line(line: &str) -> Option<TaskUser> {
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() < 7 || fields[0].is_empty() || line.starts_with('#') {
        return None;
    }
    Some(TaskUser {
        uid: fields[2].parse().ok()?,
        gid: fields[3].parse().ok()?,
        name: Some(fields[0].to_string()),
        home: Some(fields[5].to_string()).filter(|h| !h.is_empty()),
    })
}

/// Whether a process running as `euid` may start tasks as `user`: only
/// root may switch, and switching to oneself is no switch.
pub fn check_can_switch(user: &TaskUser, euid: u32) -> Result<(), TaskUserError> {
    if euid == 0 || euid == user.uid {
        Ok(())
    } else {
        Err(TaskUserError::NotRoot {
            uid: user.uid,
            euid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_the_allowlist_passes() {
        let worker = vars(&[
            ("PATH", "/usr/bin:/bin"),
            ("HOME", "/var/lib/warden"),
            ("LC_ALL", "C.UTF-8"),
            ("WARDEN_NATS_PASSWORD", "worker-pw"),
            ("WARDEN_NATS_USER", "warden-worker"),
            ("WARDEN_NATS_CREDENTIALS", "/etc/warden/worker.creds"),
            ("WARDEN_HTTP_TOKEN", "s3cret-token"),
            ("NATS_CREDS", "/etc/warden/worker.creds"),
            ("CI_CACHE", "/srv/cache"),
            ("UNLISTED", "x"),
        ]);
        let passed = task_environment(worker, &["CI_CACHE".into()], &[]);
        let names: Vec<&str> = passed.env.keys().map(String::as_str).collect();
        assert_eq!(names, ["CI_CACHE", "HOME", "LC_ALL", "PATH"]);
        assert!(passed.dropped.is_empty());
    }

    #[test]
    fn the_allowlist_never_passes_a_refused_name() {
        let worker = vars(&[
            ("WARDEN_NATS_PASSWORD", "worker-pw"),
            ("NATS_PASSWORD", "worker-pw"),
            ("WARDEN_HTTP_TOKEN", "t0ken-value"),
            ("GITHUB_TOKEN", "ghp_x"),
        ]);
        let extra: Vec<String> = worker.iter().map(|(k, _)| k.clone()).collect();
        let passed = task_environment(worker, &extra, &[]);
        assert!(passed.env.is_empty(), "{:?}", passed.env);
    }

    #[test]
    fn values_holding_a_secret_are_dropped() {
        let worker = vars(&[
            ("PATH", "/bin"),
            ("TMPDIR", "/run/secrets/worker.creds/.."),
            ("CI_URL", "nats://warden-worker:worker-pw@host:4222"),
            ("TERM", "xterm"),
        ]);
        let passed = task_environment(
            worker,
            &["CI_URL".into()],
            &["worker-pw", "/run/secrets/worker.creds", "", "pw"],
        );
        assert_eq!(passed.dropped, ["TMPDIR", "CI_URL"]);
        let names: Vec<&str> = passed.env.keys().map(String::as_str).collect();
        // The short secret "pw" is not looked for.
        assert_eq!(names, ["PATH", "TERM"]);
    }

    #[test]
    fn refusals() {
        for name in [
            "WARDEN_NATS_PASSWORD",
            "WARDEN_NATS_USER",
            "WARDEN_NATS_CREDENTIALS",
            "WARDEN_HTTP_TOKEN",
            "warden_http_token",
            "NATS_URL",
            "NATS_CREDS",
            "MY_SECRET",
            "AWS_SECRET_ACCESS_KEY",
            "DB_PASSWORD",
            "NKEY_SEED_FILE",
            "VAULT_TOKEN",
        ] {
            assert!(refused(name).is_some(), "{name}");
        }
        for name in ["PATH", "CI_CACHE", "http_proxy", "JAVA_HOME"] {
            assert!(refused(name).is_none(), "{name}");
        }
        assert!(refused_fixed("GITHUB_TOKEN").is_none());
        assert!(refused_fixed("WARDEN_ARG_X").is_some());
        assert!(refused_fixed("NATS_PASSWORD").is_some());
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("CI_CACHE"));
        assert!(valid_env_name("_x1"));
        assert!(!valid_env_name(""));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name("LC_*"));
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        builder:x:1500:1600:CI tasks:/home/builder:/bin/sh\n\
        broken line\n";

    #[test]
    fn users_resolve_by_name_uid_or_uid_gid() {
        let builder = TaskUser {
            uid: 1500,
            gid: 1600,
            name: Some("builder".into()),
            home: Some("/home/builder".into()),
        };
        assert_eq!(resolve_user("builder", PASSWD), Ok(builder.clone()));
        assert_eq!(resolve_user("1500", PASSWD), Ok(builder.clone()));
        assert_eq!(
            resolve_user("1500:42", PASSWD),
            Ok(TaskUser { gid: 42, ..builder })
        );
        assert_eq!(
            resolve_user("7000", PASSWD),
            Ok(TaskUser {
                uid: 7000,
                gid: 7000,
                name: None,
                home: None
            })
        );
        assert_eq!(
            resolve_user("nobody-here", PASSWD),
            Err(TaskUserError::Unknown("nobody-here".into()))
        );
        assert!(matches!(
            resolve_user("a b", PASSWD),
            Err(TaskUserError::Invalid(_))
        ));
        assert!(matches!(
            resolve_user("1:x", PASSWD),
            Err(TaskUserError::Invalid(_))
        ));
    }

    #[test]
    fn only_root_switches_users() {
        let user = TaskUser {
            uid: 1500,
            gid: 1500,
            name: None,
            home: None,
        };
        assert!(check_can_switch(&user, 0).is_ok());
        assert!(check_can_switch(&user, 1500).is_ok());
        assert_eq!(
            check_can_switch(&user, 1000),
            Err(TaskUserError::NotRoot {
                uid: 1500,
                euid: 1000
            })
        );
    }
}
