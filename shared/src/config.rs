//! Configuration: built-in defaults, one TOML file merged over them, then
//! `WARDEN_<SECTION>_<KEY>` environment variables. Every bad value is
//! reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::classify::ClassifierConfig;
use crate::retry::{RetryOverride, RetryPolicy};
use crate::subjects::{Bounds, Topology};
use crate::template::Template;

/// The defaults every config is merged over (`shared/src/defaults.toml`).
pub const DEFAULTS_TOML: &str = include_str!("defaults.toml");

/// Exit status for a configuration error (EX_CONFIG is 78, but sysexits'
/// EX_USAGE 64 is what STYLE.md asks for: the operator gave bad input).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    pub replicas: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Client name prefix shown in the server's connection list.
    pub name: String,
    /// NATS credentials file (user JWT + seed) for this service's role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
    /// A bot's nkey seed file (`warden bot add` writes it, mode 0600): the
    /// bot's own NATS user, whose permissions carry its bot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_file: Option<PathBuf>,
    /// User and password for servers configured with per-role users
    /// (`deploy/nats/cluster/accounts.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Where this connection's replies arrive, instead of the one its
    /// login implies ([`crate::subjects::inbox_prefix`]): `_INBOX.` and
    /// one or more tokens, which the server's permissions let this user
    /// (and no one else) subscribe below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox_prefix: Option<String>,
    /// PEM file of the CA(s) the server's certificate must chain to, in
    /// place of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (and its key, [`NatsConfig::tls_key_file`])
    /// for a server that verifies clients (`verify: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS (also implied by a `tls://`
    /// URL).
    #[serde(default)]
    pub tls_required: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    /// Bearer token required for writes; none means writes are open (a
    /// laptop). Production sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// An external executor's session expires after this long without a
    /// state call (RUNNING again is a keep-alive); its job is then taken
    /// back like a lost worker's. A take may ask for less or more, up to
    /// [`MAX_EXECUTION_TIMEOUT`].
    #[serde(with = "humantime_serde")]
    pub execution_timeout: Duration,
    /// A connection that has not sent a whole request head within this is
    /// closed (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request whose body has not arrived whole within this (from the
    /// end of its head) is refused.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

/// Why serving HTTP on `listen` with `token` is refused: writes would be
/// open to more than this host. `None` when it is allowed (a loopback
/// address, or a token is set).
pub fn http_exposure_problem(listen: SocketAddr, token: Option<&str>) -> Option<String> {
    if listen.ip().is_loopback() || token.is_some_and(|t| !t.is_empty()) {
        return None;
    }
    Some(format!(
        "http.listen: {listen} is not a loopback address, so writes need a token: \
         set http.token (or WARDEN_HTTP_TOKEN) to a secret, or listen on 127.0.0.1"
    ))
}

/// The longest session an external executor may ask for.
pub const MAX_EXECUTION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where a standalone service serves `/metrics` and `/healthz`; empty
    /// means not at all (under `warden up` the API serves them).
    pub listen: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub deadletter_max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    pub max_job_bytes: i32,
    /// Bytes each stream and bucket may hold in all, and per message
    /// (per value): docs/security.md "Bounds".
    pub events_max_bytes: i64,
    pub events_max_msg_bytes: i32,
    pub deadletter_max_bytes: i64,
    pub deadletter_max_msg_bytes: i32,
    pub reports_max_bytes: i64,
    pub reports_max_msg_bytes: i32,
    pub notify_max_bytes: i64,
    pub notify_max_msg_bytes: i32,
    pub jobs_max_bytes: i64,
    pub sessions_max_bytes: i64,
    pub sessions_max_value_bytes: i32,
    pub resources_max_bytes: i64,
    pub resources_max_value_bytes: i32,
    pub bots_max_bytes: i64,
    pub bots_max_value_bytes: i32,
}

impl StorageConfig {
    /// (key prefix, total, per message) of every stream and bucket.
    fn bounds(&self) -> [(&'static str, i64, i32, &'static str); 8] {
        [
            (
                "events",
                self.events_max_bytes,
                self.events_max_msg_bytes,
                "msg",
            ),
            (
                "deadletter",
                self.deadletter_max_bytes,
                self.deadletter_max_msg_bytes,
                "msg",
            ),
            (
                "reports",
                self.reports_max_bytes,
                self.reports_max_msg_bytes,
                "msg",
            ),
            (
                "notify",
                self.notify_max_bytes,
                self.notify_max_msg_bytes,
                "msg",
            ),
            ("jobs", self.jobs_max_bytes, self.max_job_bytes, "job"),
            (
                "sessions",
                self.sessions_max_bytes,
                self.sessions_max_value_bytes,
                "value",
            ),
            (
                "resources",
                self.resources_max_bytes,
                self.resources_max_value_bytes,
                "value",
            ),
            (
                "bots",
                self.bots_max_bytes,
                self.bots_max_value_bytes,
                "value",
            ),
        ]
    }

    /// What is wrong with the streams' and buckets' bounds.
    pub fn bounds_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, total, one, what) in self.bounds() {
            let one_key = if what == "job" {
                "storage.max_job_bytes".to_string()
            } else {
                format!("storage.{name}_max_{what}_bytes")
            };
            if one < MIN_MESSAGE_BOUND {
                p.push(format!("{one_key}: must be at least {MIN_MESSAGE_BOUND}"));
            }
            if one > MAX_MESSAGE_BOUND {
                p.push(format!(
                    "{one_key}: must be at most {MAX_MESSAGE_BOUND} (the server's max_payload)"
                ));
            }
            if total < i64::from(one).max(MIN_TOTAL_BOUND) {
                p.push(format!(
                    "storage.{name}_max_bytes: must be at least {MIN_TOTAL_BOUND} and at least {one_key}"
                ));
            }
        }
        p
    }
}

/// The smallest per-message bound: a message must still fit its headers.
pub const MIN_MESSAGE_BOUND: i32 = 1024;
/// The largest per-message bound: the max_payload of deploy/nats/ (8 MB).
pub const MAX_MESSAGE_BOUND: i32 = 8 * 1024 * 1024;
/// The smallest stream or bucket.
pub const MIN_TOTAL_BOUND: i64 = 1024 * 1024;

/// A condition on one body field: a scalar means equality, an array means
/// "one of".
pub type Condition = serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    /// Topic pattern with NATS wildcards: `*` one token, `>` the rest.
    pub topic: String,
    /// Body field (dotted path) → value or list of values; all must hold.
    #[serde(default)]
    pub when: BTreeMap<String, Condition>,
    pub tasks: Vec<String>,
    /// Job argument → template over body fields, e.g. `"{name}-{version}"`.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    pub subjects: Vec<String>,
    pub max_event_bytes: usize,
    pub batch: usize,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Longest a worker's acquire request is held when nothing waits.
    #[serde(with = "humantime_serde")]
    pub acquire_wait: Duration,
    /// Reports fetched and applied per round.
    pub report_batch: usize,
}

/// The execution database and archival (`warden recorder`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    /// `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`; empty: no
    /// database (every job stays in the bucket, as before). `warden up`
    /// fills it in with `sqlite://<data-dir>/history.sqlite`.
    pub database: String,
    /// How long a finished (terminal) job stays in the live bucket after
    /// its last change, once the database has it.
    #[serde(with = "humantime_serde")]
    pub archive_after: Duration,
    /// How long the delete marker of an archived job stays in the
    /// bucket's stream (every watcher sees the delete) before it is
    /// purged.
    #[serde(with = "humantime_serde")]
    pub marker_grace: Duration,
    /// How long the database keeps an archived job; 0: for ever.
    #[serde(with = "humantime_serde")]
    pub retain_for: Duration,
    /// Job revisions recorded per transaction (at most).
    pub batch: usize,
    /// How often the janitor looks for jobs to archive.
    #[serde(with = "humantime_serde")]
    pub janitor_interval: Duration,
}

impl HistoryConfig {
    pub fn enabled(&self) -> bool {
        !self.database.trim().is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FencingConfig {
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Refuse a session for a bot that is not in the bot registry
    /// (`warden bot add`).
    pub require_registered_bots: bool,
    /// Session creates accepted per bot per minute (per fencing replica).
    pub session_creates_per_minute: u32,
    /// How long a closed, quarantined or expired session stays on record.
    #[serde(with = "humantime_serde")]
    pub closed_session_retention: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Empty: `<hostname>-<pid>`.
    pub bot_id: String,
    pub pools: Vec<String>,
    /// Empty: the host name.
    pub resource: String,
    pub capacity: u32,
    /// Where per-job status files and scratch directories go; empty: a
    /// temporary directory.
    pub work_dir: String,
    pub log_tail_bytes: usize,
    pub status_file_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub acquire_wait: Duration,
    /// How long in-flight tasks may run on after SIGTERM before they are
    /// stopped and handed back.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Resources on this host besides the host itself (`resource`), e.g.
    /// a working copy; each depends on the host unless it names another.
    #[serde(default)]
    pub resources: Vec<crate::resource::ResourceDecl>,
    /// Names passed through from the worker's environment to its tasks,
    /// beside the built-in allowlist (`crate::task_env`).
    #[serde(default)]
    pub task_env: Vec<String>,
    /// Run tasks as this user (a name, `uid` or `uid:gid`); empty: as the
    /// worker's own user. Needs the worker to run as root.
    #[serde(default)]
    pub task_user: String,
}

/// Resource health (docs/design.md "Resources and health").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// A check with no answer within this is a failed one.
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
    /// Suspicions are remembered this long (flapping detection).
    #[serde(with = "humantime_serde")]
    pub flap_window: Duration,
    /// This many suspicions within the window break the resource without
    /// a check (0: never).
    pub flap_limit: u32,
    /// A resource suspected again within the window after passing a check
    /// waits this long before its next check, doubled each further time.
    #[serde(with = "humantime_serde")]
    pub recheck_backoff: Duration,
    /// Checks by resource kind; the agent on the resource runs them.
    #[serde(default)]
    pub checks: BTreeMap<String, Vec<CheckSpec>>,
}

/// One health check: exactly one of `command`, `min_free_mb`, `dns`.
/// `{path}` and `{name}` in a command's arguments become the resource's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    /// argv, run without a shell; exit 0 passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Free space in the file system of the resource's path, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_mb: Option<u64>,
    /// A host name that must resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// This check's own limit (default: `health.check_timeout`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

fn default_pool() -> String {
    "default".into()
}

fn default_verdicts() -> BTreeMap<String, String> {
    BTreeMap::from([("0".to_string(), "passed".to_string())])
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// argv; no shell unless the task names one itself.
    pub command: Vec<String>,
    #[serde(default = "default_pool")]
    pub pool: String,
    #[serde(default)]
    pub priority: i32,
    /// Exit code → verdict (`outcome`). Any other exit is a crash.
    #[serde(default = "default_verdicts")]
    pub verdicts: BTreeMap<String, String>,
    /// Kill the task after this long (a crash, `task/time_limit`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Extra environment for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Who is told when the task is to blame.
    #[serde(default)]
    pub owners: Vec<String>,
    /// This task's changes to `[retry]`.
    #[serde(default)]
    pub retry: RetryOverride,
}

impl HealthConfig {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.check_timeout.is_zero() {
            p.push("health.check_timeout: must be positive".into());
        }
        if self.flap_window.is_zero() {
            p.push("health.flap_window: must be positive".into());
        }
        for (kind, checks) in &self.checks {
            let mut names = BTreeSet::new();
            for (i, c) in checks.iter().enumerate() {
                let at = format!("health.checks.{kind}[{i}] ({})", c.name);
                if c.name.trim().is_empty() {
                    p.push(format!("{at}: name must not be empty"));
                } else if !names.insert(c.name.as_str()) {
                    p.push(format!("{at}: duplicate check name"));
                }
                let set = [
                    c.command.is_some(),
                    c.min_free_mb.is_some(),
                    c.dns.is_some(),
                ];
                if set.iter().filter(|x| **x).count() != 1 {
                    p.push(format!(
                        "{at}: give exactly one of command, min_free_mb, dns"
                    ));
                }
                if c.command
                    .as_ref()
                    .is_some_and(|argv| argv.first().map(String::as_str).unwrap_or("").is_empty())
                {
                    p.push(format!("{at}: command must name a program"));
                }
                if c.dns.as_deref().is_some_and(|d| d.trim().is_empty()) {
                    p.push(format!("{at}: dns must name a host"));
                }
                if c.timeout.is_some_and(|t| t.is_zero()) {
                    p.push(format!("{at}: timeout must be positive"));
                }
            }
        }
        p
    }
}

impl TaskConfig {
    /// The verdict for `code`, if the task declared one.
    pub fn verdict(&self, code: i32) -> Option<&str> {
        self.verdicts.get(&code.to_string()).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub nats: NatsConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
    pub trigger: TriggerConfig,
    pub scheduler: SchedulerConfig,
    pub history: HistoryConfig,
    pub fencing: FencingConfig,
    pub worker: WorkerConfig,
    pub health: HealthConfig,
    pub retry: RetryPolicy,
    pub classifier: ClassifierConfig,
    pub amqp: crate::amqp::AmqpConfig,
    pub tasks: BTreeMap<String, TaskConfig>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { path, source } => vec![format!("{}: {source}", path.display())],
            ConfigError::Invalid(p) => p.clone(),
        }
    }
}

const SECTIONS: &[&str] = &[
    "nats",
    "http",
    "metrics",
    "storage",
    "trigger",
    "scheduler",
    "history",
    "fencing",
    "worker",
    "health",
    "retry",
    "classifier",
    "amqp",
];

/// Keys that are optional (absent from the defaults) but may still be set
/// from the environment.
const OPTIONAL_KEYS: &[(&str, &str)] = &[
    ("nats", "credentials"),
    ("nats", "nkey_file"),
    ("nats", "user"),
    ("nats", "password"),
    ("nats", "inbox_prefix"),
    ("nats", "tls_ca_file"),
    ("nats", "tls_cert_file"),
    ("nats", "tls_key_file"),
    ("http", "token"),
    ("amqp", "tls_ca_file"),
    ("amqp", "tls_cert_file"),
    ("amqp", "tls_key_file"),
];

/// Environment variables starting with `WARDEN_` that are not config keys.
const NON_CONFIG_ENV: &[&str] = &[
    "WARDEN_CONFIG",
    "WARDEN_LOG",
    "WARDEN_LOG_FORMAT",
    "WARDEN_DATA_DIR",
    "WARDEN_JOB_ID",
    "WARDEN_STATUS_FILE",
    "WARDEN_NATS_SERVER",
];

impl Config {
    /// The built-in defaults alone.
    pub fn defaults() -> Config {
        match Config::from_parts(None, std::iter::empty()) {
            Ok(c) => c,
            // The defaults are compiled in and covered by a test.
            Err(e) => panic!("built-in defaults are invalid: {e}"),
        }
    }

    /// Reads `path` (if any) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => None,
        };
        Config::from_parts(text.as_deref(), std::env::vars())
    }

    /// Builds a config from file text and environment pairs; tests call
    /// this with values, never with the process environment.
    pub fn from_parts(
        file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut merged: toml::Table = match DEFAULTS_TOML.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError::Invalid(vec![format!(
                    "built-in defaults: {e}"
                )]))
            }
        };
        if let Some(text) = file {
            match text.parse::<toml::Table>() {
                Ok(user) => {
                    for key in user.keys() {
                        if !SECTIONS.contains(&key.as_str()) && key != "tasks" {
                            problems.push(format!("unknown section [{key}]"));
                        }
                    }
                    merge(&mut merged, user);
                }
                Err(e) => problems.push(format!("config file: {e}")),
            }
        }
        apply_env(&mut merged, env, &mut problems);

        let nats = section::<NatsConfig>(&merged, "nats", &mut problems);
        let http = section::<HttpConfig>(&merged, "http", &mut problems);
        let metrics = section::<MetricsConfig>(&merged, "metrics", &mut problems);
        let storage = section::<StorageConfig>(&merged, "storage", &mut problems);
        let trigger = section::<TriggerConfig>(&merged, "trigger", &mut problems);
        let scheduler = section::<SchedulerConfig>(&merged, "scheduler", &mut problems);
        let fencing = section::<FencingConfig>(&merged, "fencing", &mut problems);
        let worker = section::<WorkerConfig>(&merged, "worker", &mut problems);
        let health = section::<HealthConfig>(&merged, "health", &mut problems);
        let retry = section::<RetryPolicy>(&merged, "retry", &mut problems);
        let classifier = section::<ClassifierConfig>(&merged, "classifier", &mut problems);
        let amqp = section::<crate::amqp::AmqpConfig>(&merged, "amqp", &mut problems);
        let history = section::<HistoryConfig>(&merged, "history", &mut problems);
        let tasks = section::<BTreeMap<String, TaskConfig>>(&merged, "tasks", &mut problems);

        let (
            Some(nats),
            Some(http),
            Some(metrics),
            Some(storage),
            Some(trigger),
            Some(scheduler),
            Some(fencing),
            Some(worker),
            Some(health),
            Some(retry),
            Some(classifier),
            Some(amqp),
            Some(history),
            Some(tasks),
        ) = (
            nats, http, metrics, storage, trigger, scheduler, fencing, worker, health, retry,
            classifier, amqp, history, tasks,
        )
        else {
            return Err(ConfigError::Invalid(problems));
        };
        let config = Config {
            nats,
            http,
            metrics,
            storage,
            trigger,
            scheduler,
            history,
            fencing,
            worker,
            health,
            retry,
            classifier,
            amqp,
            tasks,
        };
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every semantic problem, not just the first.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let n = &self.nats;
        if n.url.trim().is_empty() {
            p.push("nats.url: must not be empty".into());
        }
        if n.user.is_some() != n.password.is_some() {
            p.push("nats.user and nats.password: set both or neither".into());
        }
        let logins = [
            n.credentials.is_some(),
            n.nkey_file.is_some(),
            n.user.is_some(),
        ];
        if logins.iter().filter(|set| **set).count() > 1 {
            p.push(
                "nats.credentials, nats.nkey_file and nats.user/password: set one login, not several"
                    .into(),
            );
        }
        p.extend(nats_tls_problems(n));
        if !(1..=5).contains(&n.replicas) {
            p.push(format!(
                "nats.replicas: {} is not between 1 and 5",
                n.replicas
            ));
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:8080",
                self.http.listen
            ));
        }
        if self.http.max_body_bytes < 1024 {
            p.push("http.max_body_bytes: must be at least 1024".into());
        }
        if self.http.execution_timeout < Duration::from_secs(1)
            || self.http.execution_timeout > MAX_EXECUTION_TIMEOUT
        {
            p.push("http.execution_timeout: must be between 1s and 24h".into());
        }
        if self.http.header_timeout.is_zero() {
            p.push("http.header_timeout: must be positive".into());
        }
        if self.http.body_timeout.is_zero() {
            p.push("http.body_timeout: must be positive".into());
        }
        if self.http.token.as_deref().is_some_and(str::is_empty) {
            p.push("http.token: must not be empty when set".into());
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "metrics.listen: {:?} is not an address",
                self.metrics.listen
            ));
        }
        p.extend(self.storage.bounds_problems());
        if let Some(prefix) = &n.inbox_prefix {
            if let Err(e) = crate::subjects::check_inbox_prefix(prefix) {
                p.push(format!("nats.inbox_prefix: {prefix:?} {e}"));
            }
        } else if let Some(user) = &n.user {
            if let Err(e) = crate::subjects::check_one_token(user) {
                p.push(format!(
                    "nats.user: {user:?} {e} (it names the inbox prefix _INBOX.<user>; or set nats.inbox_prefix)"
                ));
            }
        }
        if self.storage.max_job_bytes < 4096 {
            p.push("storage.max_job_bytes: must be at least 4096".into());
        }
        if self.storage.duplicate_window.is_zero() {
            p.push("storage.duplicate_window: must be positive".into());
        }
        p.extend(self.amqp.problems());
        for task in self.amqp.ci_messages.tasks.keys() {
            if !self.tasks.contains_key(task) {
                p.push(format!(
                    "amqp.ci_messages.tasks.{task}: task {task:?} is not defined in [tasks]"
                ));
            }
        }
        let t = &self.trigger;
        if t.subjects.is_empty() {
            p.push("trigger.subjects: must list at least one subject".into());
        }
        for s in &t.subjects {
            if let Err(e) = check_pattern(s) {
                p.push(format!("trigger.subjects: {s:?}: {e}"));
            }
        }
        if t.max_event_bytes < 1024 {
            p.push("trigger.max_event_bytes: must be at least 1024".into());
        }
        if t.batch == 0 {
            p.push("trigger.batch: must be at least 1".into());
        }
        let mut names = BTreeSet::new();
        for (i, r) in t.rules.iter().enumerate() {
            let at = format!("trigger.rules[{i}] ({})", r.name);
            if r.name.is_empty() {
                p.push(format!("{at}: name must not be empty"));
            } else if !names.insert(r.name.as_str()) {
                p.push(format!("{at}: duplicate rule name"));
            }
            if let Err(e) = check_pattern(&r.topic) {
                p.push(format!("{at}: topic {:?}: {e}", r.topic));
            }
            if r.tasks.is_empty() {
                p.push(format!("{at}: tasks must name at least one task"));
            }
            for task in &r.tasks {
                if !self.tasks.contains_key(task) {
                    p.push(format!("{at}: task {task:?} is not defined in [tasks]"));
                }
            }
            for (arg, tmpl) in &r.args {
                if let Err(e) = Template::parse(tmpl) {
                    p.push(format!("{at}: args.{arg}: {e}"));
                }
                if !valid_name(arg) {
                    p.push(format!(
                        "{at}: args.{arg}: argument names are letters, digits and _"
                    ));
                }
            }
            for (field, cond) in &r.when {
                if field.is_empty() {
                    p.push(format!("{at}: when: empty field name"));
                }
                if cond.as_array().is_some_and(Vec::is_empty) {
                    p.push(format!("{at}: when.{field}: an empty list matches nothing"));
                }
            }
            if r.pool.as_deref().is_some_and(str::is_empty) {
                p.push(format!("{at}: pool must not be empty when set"));
            }
        }
        if self.scheduler.acquire_wait.is_zero() {
            p.push("scheduler.acquire_wait: must be positive".into());
        }
        let h = &self.history;
        if h.enabled()
            && !(h.database.starts_with("sqlite:")
                || h.database.starts_with("postgres://")
                || h.database.starts_with("postgresql://"))
        {
            p.push(format!(
                "history.database: {:?} is neither sqlite://PATH nor postgres://USER@HOST:PORT/DB",
                crate::redact::redact(&h.database)
            ));
        }
        if h.archive_after.is_zero() {
            p.push("history.archive_after: must be positive".into());
        }
        if h.marker_grace.is_zero() {
            p.push("history.marker_grace: must be positive".into());
        }
        if h.janitor_interval.is_zero() {
            p.push("history.janitor_interval: must be positive".into());
        }
        if h.batch == 0 {
            p.push("history.batch: must be at least 1".into());
        }
        if !h.retain_for.is_zero() && h.retain_for <= h.archive_after {
            p.push(
                "history.retain_for: must be longer than history.archive_after (or 0: for ever)"
                    .into(),
            );
        }
        if self.scheduler.report_batch == 0 {
            p.push("scheduler.report_batch: must be at least 1".into());
        }
        if self.fencing.session_timeout < Duration::from_millis(100) {
            p.push("fencing.session_timeout: must be at least 100ms".into());
        }
        if self.fencing.session_creates_per_minute == 0 {
            p.push("fencing.session_creates_per_minute: must be at least 1".into());
        }
        if self.fencing.closed_session_retention < Duration::from_secs(1) {
            p.push("fencing.closed_session_retention: must be at least 1s".into());
        }
        let w = &self.worker;
        if w.pools.is_empty() || w.pools.iter().any(|x| x.is_empty()) {
            p.push("worker.pools: must list at least one non-empty pool".into());
        }
        if w.capacity == 0 {
            p.push("worker.capacity: must be at least 1".into());
        }
        if w.log_tail_bytes == 0 {
            p.push("worker.log_tail_bytes: must be at least 1".into());
        }
        // A report carries the log tail and the status file; JSON escapes
        // may double them. One that does not fit is refused by the stream.
        let report_room = usize::try_from(self.storage.reports_max_msg_bytes).unwrap_or(0) / 2;
        if w.log_tail_bytes.saturating_add(w.status_file_bytes) > report_room {
            p.push(format!(
                "worker.log_tail_bytes + worker.status_file_bytes: must be at most half of storage.reports_max_msg_bytes ({report_room})"
            ));
        }
        if w.acquire_wait.is_zero() {
            p.push("worker.acquire_wait: must be positive".into());
        }
        for name in &w.task_env {
            if !crate::task_env::valid_env_name(name) {
                p.push(format!(
                    "worker.task_env: {name:?} is not an environment variable name"
                ));
            } else if let Some(why) = crate::task_env::refused(name) {
                p.push(format!(
                    "worker.task_env: {name:?} is never passed to a task: {why}"
                ));
            }
        }
        if !w.task_user.is_empty() && !crate::task_env::valid_user_spec(&w.task_user) {
            p.push(format!(
                "worker.task_user: {:?} is neither a user name nor uid[:gid]",
                w.task_user
            ));
        }
        let mut declared = BTreeSet::new();
        for (i, r) in w.resources.iter().enumerate() {
            let at = format!("worker.resources[{i}] ({})", r.name);
            if r.name.trim().is_empty() {
                p.push(format!("{at}: name must not be empty"));
            } else if !declared.insert(r.name.as_str()) || r.name == w.resource {
                p.push(format!("{at}: declared twice (or the host's own name)"));
            }
            if r.kind.trim().is_empty() {
                p.push(format!("{at}: kind must not be empty"));
            }
        }
        p.extend(self.health.problems());
        p.extend(self.retry.problems("retry"));
        p.extend(
            self.classifier
                .problems("classifier.rules", &self.classifier.rules),
        );
        for (name, task) in &self.tasks {
            let at = format!("tasks.{name}");
            p.extend(
                self.retry
                    .with(&task.retry)
                    .problems(&format!("{at}.retry")),
            );
            if !valid_task_name(name) {
                p.push(format!(
                    "{at}: task names are letters, digits, '-', '_' and '.'"
                ));
            }
            if task.command.is_empty() || task.command[0].is_empty() {
                p.push(format!("{at}: command must name a program"));
            }
            if task.pool.is_empty() {
                p.push(format!("{at}: pool must not be empty"));
            }
            for name in task.env.keys() {
                if let Some(why) = crate::task_env::refused_fixed(name) {
                    p.push(format!("{at}: env.{name}: not allowed: {why}"));
                }
            }
            for (code, outcome) in &task.verdicts {
                if code.parse::<i32>().is_err() {
                    p.push(format!("{at}: verdicts: {code:?} is not an exit code"));
                }
                if outcome.is_empty() {
                    p.push(format!("{at}: verdicts.{code}: outcome must not be empty"));
                }
            }
        }
        p
    }

    /// The retry policy of `task`: `[retry]` with the task's overrides.
    /// An unknown task (its config was removed while jobs waited) gets
    /// `[retry]` alone.
    pub fn retry_policy(&self, task: &str) -> RetryPolicy {
        match self.tasks.get(task) {
            Some(t) => self.retry.with(&t.retry),
            None => self.retry.clone(),
        }
    }

    pub fn topology(&self) -> Topology {
        let mut subjects = self.trigger.subjects.clone();
        if !subjects.iter().any(|s| s == crate::subjects::LOCAL_EVENTS) {
            subjects.push(crate::subjects::LOCAL_EVENTS.to_string());
        }
        let st = &self.storage;
        Topology {
            replicas: self.nats.replicas,
            event_subjects: subjects,
            events_max_age: self.storage.events_max_age,
            deadletter_max_age: self.storage.deadletter_max_age,
            duplicate_window: self.storage.duplicate_window,
            max_job_bytes: self.storage.max_job_bytes,
            events: Bounds {
                max_bytes: st.events_max_bytes,
                max_msg: st.events_max_msg_bytes,
            },
            deadletter: Bounds {
                max_bytes: st.deadletter_max_bytes,
                max_msg: st.deadletter_max_msg_bytes,
            },
            reports: Bounds {
                max_bytes: st.reports_max_bytes,
                max_msg: st.reports_max_msg_bytes,
            },
            notify: Bounds {
                max_bytes: st.notify_max_bytes,
                max_msg: st.notify_max_msg_bytes,
            },
            jobs_max_bytes: st.jobs_max_bytes,
            sessions: Bounds {
                max_bytes: st.sessions_max_bytes,
                max_msg: st.sessions_max_value_bytes,
            },
            resources: Bounds {
                max_bytes: st.resources_max_bytes,
                max_msg: st.resources_max_value_bytes,
            },
            bots: Bounds {
                max_bytes: st.bots_max_bytes,
                max_msg: st.bots_max_value_bytes,
            },
        }
    }

    /// The HTTP address (validated at load time).
    pub fn http_listen(&self) -> SocketAddr {
        self.http
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// What stops this config from serving the HTTP API (`warden-api`,
    /// `warden up`): see [`http_exposure_problem`]. Not part of
    /// [`Config::problems`], since workers and other services share the
    /// file and never serve it.
    pub fn http_serving_problems(&self) -> Vec<String> {
        self.http
            .listen
            .parse::<SocketAddr>()
            .ok()
            .and_then(|addr| http_exposure_problem(addr, self.http.token.as_deref()))
            .into_iter()
            .collect()
    }

    /// The standalone metrics address, if any (validated at load time).
    pub fn metrics_listen(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub fn valid_task_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A NATS subject pattern: non-empty tokens, `>` only as the last token.
pub fn check_pattern(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty subject");
    }
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, tok) in tokens.iter().enumerate() {
        if tok.is_empty() {
            return Err("empty token");
        }
        if tok.chars().any(char::is_whitespace) {
            return Err("whitespace in subject");
        }
        if *tok == ">" && i + 1 != tokens.len() {
            return Err("'>' must be the last token");
        }
        if tok.len() > 1 && (tok.contains('*') || tok.contains('>')) {
            return Err("wildcards must be whole tokens");
        }
    }
    Ok(())
}

fn section<T: DeserializeOwned>(
    table: &toml::Table,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    let value = table
        .get(name)
        .cloned()
        .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
    match value.try_into::<T>() {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(format!("[{name}]: {}", e.message().trim()));
            None
        }
    }
}

/// What is wrong with `nats.url` and the `nats.tls_*` keys: a URL that
/// carries a login (the client ignores it, and it would be echoed in
/// errors and check output), half a client certificate, an empty path.
pub fn nats_tls_problems(n: &NatsConfig) -> Vec<String> {
    let mut p = Vec::new();
    if crate::redact::has_userinfo(&n.url) {
        p.push(format!(
            "nats.url: {} carries a login (user:password@); the client ignores it. Give it in nats.user and nats.password, or a credentials file in nats.credentials, and keep the URL as nats://host:port",
            crate::redact::redact(&n.url)
        ));
    }
    match (&n.tls_cert_file, &n.tls_key_file) {
        (Some(_), None) => {
            p.push("nats.tls_cert_file: set, but nats.tls_key_file (its key) is not".into())
        }
        (None, Some(_)) => {
            p.push("nats.tls_key_file: set, but nats.tls_cert_file (its certificate) is not".into())
        }
        _ => {}
    }
    for (key, path) in [
        ("nats.tls_ca_file", &n.tls_ca_file),
        ("nats.tls_cert_file", &n.tls_cert_file),
        ("nats.tls_key_file", &n.tls_key_file),
    ] {
        if path.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            p.push(format!("{key}: must not be empty when set"));
        }
    }
    p
}

/// Tables merge key by key; anything else (arrays included) is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<String>,
) {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("WARDEN_"))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        if NON_CONFIG_ENV.contains(&var.as_str()) || var.starts_with("WARDEN_ARG_") {
            continue;
        }
        let rest = &var["WARDEN_".len()..];
        let Some(section) = SECTIONS.iter().find(|s| {
            rest.len() > s.len() + 1
                && rest.starts_with(&s.to_uppercase())
                && rest.as_bytes()[s.len()] == b'_'
        }) else {
            continue;
        };
        let key = rest[section.len() + 1..].to_lowercase();
        let Some(toml::Value::Table(sec)) = table.get_mut(*section) else {
            continue;
        };
        let value = match sec.get(&key) {
            Some(toml::Value::Integer(_)) => match raw.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => {
                    problems.push(format!("{var}: {raw:?} is not an integer"));
                    continue;
                }
            },
            Some(toml::Value::Float(_)) => match raw.trim().parse::<f64>() {
                Ok(x) => toml::Value::Float(x),
                Err(_) => {
                    problems.push(format!("{var}: {raw:?} is not a number"));
                    continue;
                }
            },
            Some(toml::Value::Boolean(_)) => match raw.trim() {
                "true" | "1" | "yes" => toml::Value::Boolean(true),
                "false" | "0" | "no" => toml::Value::Boolean(false),
                _ => {
                    problems.push(format!("{var}: {raw:?} is not true or false"));
                    continue;
                }
            },
            Some(toml::Value::Array(_)) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            ),
            Some(toml::Value::String(_)) => toml::Value::String(raw),
            None if OPTIONAL_KEYS.contains(&(*section, key.as_str())) => toml::Value::String(raw),
            _ => {
                problems.push(format!("{var}: [{section}] has no scalar key {key:?}"));
                continue;
            }
        };
        sec.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn problems_of(text: &str) -> Vec<String> {
        match Config::from_parts(Some(text), Vec::new()) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(p)) => p,
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn every_stream_and_bucket_is_bounded_by_default() {
        let t = Config::from_parts(None, Vec::new())
            .expect("defaults")
            .topology();
        for s in [
            t.events_stream(),
            t.deadletter_stream(),
            t.reports_stream(),
            t.notify_stream(),
        ] {
            assert!(s.max_bytes > 0 && s.max_message_size > 0, "{}", s.name);
            assert!(i64::from(s.max_message_size) <= s.max_bytes, "{}", s.name);
        }
        for b in [t.jobs_bucket(), t.sessions_bucket(), t.resources_bucket()] {
            assert!(b.max_bytes > 0 && b.max_value_size > 0, "{}", b.bucket);
        }
        assert_eq!(t.events_stream().max_message_size, 1024 * 1024);
    }

    #[test]
    fn bad_bounds_are_refused() {
        let p = problems_of("[storage]\nevents_max_msg_bytes = 10\nreports_max_bytes = 1000\nnotify_max_msg_bytes = 99999999");
        assert!(
            p.iter()
                .any(|m| m.starts_with("storage.events_max_msg_bytes")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.starts_with("storage.reports_max_bytes")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("storage.notify_max_msg_bytes")),
            "{p:?}"
        );
        let p = problems_of("[storage]\njobs_max_bytes = 1048576\nmax_job_bytes = 2097152");
        assert!(
            p.iter().any(|m| m.starts_with("storage.jobs_max_bytes")),
            "{p:?}"
        );
        let p = problems_of("[worker]\nlog_tail_bytes = 200000");
        assert!(
            p.iter().any(|m| m.starts_with("worker.log_tail_bytes")),
            "{p:?}"
        );
    }

    #[test]
    fn inbox_prefixes_and_user_names_are_checked() {
        assert!(problems_of("[nats]\ninbox_prefix = \"_INBOX.mine.x\"").is_empty());
        for bad in [
            "_INBOX",
            "_INBOX.",
            "OTHER.x",
            "_INBOX.*",
            "_INBOX.a.>",
            "_INBOX..a",
            "_INBOX.a b",
        ] {
            let p = problems_of(&format!("[nats]\ninbox_prefix = {bad:?}"));
            assert!(
                p.iter().any(|m| m.starts_with("nats.inbox_prefix")),
                "{bad}: {p:?}"
            );
        }
        let p = problems_of("[nats]\nuser = \"a.b\"\npassword = \"p\"");
        assert!(p.iter().any(|m| m.starts_with("nats.user")), "{p:?}");
        assert!(problems_of(
            "[nats]\nuser = \"a.b\"\npassword = \"p\"\ninbox_prefix = \"_INBOX.ab\""
        )
        .is_empty());
        assert!(problems_of("[nats]\nuser = \"warden-readonly\"\npassword = \"p\"").is_empty());
        let from_env = Config::from_parts(None, env(&[("WARDEN_NATS_INBOX_PREFIX", "_INBOX.env")]))
            .expect("valid");
        assert_eq!(from_env.nats.inbox_prefix.as_deref(), Some("_INBOX.env"));
    }

    #[test]
    fn defaults_are_valid_and_have_the_promised_tasks_and_rule() {
        let c = Config::defaults();
        for t in ["noop", "sleep", "fail"] {
            assert!(c.tasks.contains_key(t), "default task {t}");
        }
        assert!(c
            .trigger
            .rules
            .iter()
            .any(|r| r.topic.ends_with("buildsys.build.state.change")));
        assert_eq!(c.fencing.session_timeout, Duration::from_secs(10));
        assert_eq!(c.tasks["fail"].verdict(1), Some("failed"));
        assert_eq!(c.tasks["noop"].verdict(0), Some("passed"));
        assert_eq!(c.tasks["noop"].verdict(1), None);
    }

    #[test]
    fn a_login_in_the_url_is_refused_naming_the_keys_and_not_echoed() {
        let Err(e) = Config::from_parts(
            Some("[nats]\nurl = \"nats://n1:4222,nats://warden-worker:s3cret@n2:4222\"\n"),
            [],
        ) else {
            panic!("a login in nats.url is refused");
        };
        let text = e.problems().join("\n");
        assert!(text.contains("nats.url"), "{text}");
        assert!(
            text.contains("nats.user") && text.contains("nats.password"),
            "{text}"
        );
        assert!(text.contains("nats.credentials"), "{text}");
        assert!(
            !text.contains("s3cret"),
            "the password is not echoed: {text}"
        );
        let env_url = env(&[("WARDEN_NATS_URL", "nats://u:pw@h:4222")]);
        assert!(Config::from_parts(None, env_url).is_err());
    }

    #[test]
    fn tls_keys_load_and_half_a_client_certificate_is_refused() {
        let c = Config::from_parts(
            None,
            env(&[
                ("WARDEN_NATS_TLS_CA_FILE", "/etc/warden/ca.pem"),
                ("WARDEN_NATS_TLS_CERT_FILE", "/etc/warden/w.pem"),
                ("WARDEN_NATS_TLS_KEY_FILE", "/etc/warden/w.key"),
                ("WARDEN_NATS_TLS_REQUIRED", "true"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.nats.tls_ca_file,
            Some(PathBuf::from("/etc/warden/ca.pem"))
        );
        assert!(c.nats.tls_required);
        assert!(!Config::defaults().nats.tls_required);
        let Err(e) = Config::from_parts(Some("[nats]\ntls_cert_file = \"/w.pem\"\n"), []) else {
            panic!("a certificate without its key is refused");
        };
        let text = e.problems().join("\n");
        assert!(text.contains("nats.tls_key_file"), "{text}");
        let Err(e) = Config::from_parts(Some("[nats]\ntls_key_file = \"/w.key\"\n"), []) else {
            panic!("a key without its certificate is refused");
        };
        assert!(e.problems().join("\n").contains("nats.tls_cert_file"));
    }

    #[test]
    fn file_merges_over_defaults_and_env_over_file() {
        let file = r#"
            [nats]
            url = "nats://10.0.0.1:4222"
            [worker]
            capacity = 8
            [tasks.build]
            command = ["make"]
            pool = "x86_64"
        "#;
        let c = Config::from_parts(
            Some(file),
            env(&[
                ("WARDEN_WORKER_CAPACITY", "3"),
                ("WARDEN_WORKER_POOLS", "a, b"),
                ("WARDEN_HTTP_TOKEN", "s3cret"),
                ("WARDEN_LOG", "debug"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(c.worker.capacity, 3);
        assert_eq!(c.worker.pools, vec!["a", "b"]);
        assert_eq!(c.http.token.as_deref(), Some("s3cret"));
        assert!(c.tasks.contains_key("build") && c.tasks.contains_key("noop"));
        assert_eq!(c.tasks["build"].verdicts, default_verdicts());
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let file = r#"
            [nats]
            replicas = 9
            [http]
            listen = "everywhere"
            [worker]
            capacity = 0
            [tasks.empty]
            command = []
            verdicts = { x = "passed" }
            [[trigger.rules]]
            name = "r"
            topic = "a.>.b"
            tasks = ["nope"]
            args = { nvr = "{name" }
        "#;
        let err = Config::from_parts(
            Some(file),
            env(&[("WARDEN_SCHEDULER_REPORT_BATCH", "many")]),
        )
        .expect_err("invalid");
        let problems = err.problems();
        let text = problems.join("\n");
        for needle in [
            "WARDEN_SCHEDULER_REPORT_BATCH",
            "nats.replicas",
            "http.listen",
            "worker.capacity",
            "tasks.empty: command",
            "tasks.empty: verdicts",
            "'>' must be the last token",
            "task \"nope\" is not defined",
            "args.nvr",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(problems.len() >= 9, "{problems:?}");
    }

    #[test]
    fn type_errors_in_separate_sections_are_all_reported() {
        let file = "[nats]\nreplicas = \"three\"\n[worker]\ncapacity = \"lots\"\n[bogus]\nx = 1\n";
        let text = Config::from_parts(Some(file), Vec::new())
            .expect_err("invalid")
            .problems()
            .join("\n");
        assert!(
            text.contains("[nats]") && text.contains("[worker]") && text.contains("[bogus]"),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_not_silently_ignored() {
        let text = Config::from_parts(Some("[worker]\ncapasity = 4\n"), Vec::new())
            .expect_err("typo")
            .problems()
            .join("\n");
        assert!(text.contains("capasity"), "{text}");
        let text = Config::from_parts(None, env(&[("WARDEN_WORKER_CAPASITY", "4")]))
            .expect_err("typo")
            .problems()
            .join("\n");
        assert!(text.contains("WARDEN_WORKER_CAPASITY"), "{text}");
    }

    #[test]
    fn task_env_never_lists_the_workers_secrets() {
        let file = "[worker]\ntask_env = [\"CI_CACHE\", \"WARDEN_NATS_PASSWORD\", \"NATS_CREDS\", \"GITHUB_TOKEN\", \"A=B\"]\ntask_user = \"a b\"\n[tasks.x]\ncommand = [\"true\"]\nenv = { WARDEN_HTTP_TOKEN = \"t\", GITHUB_TOKEN = \"fine\" }\n";
        let problems = Config::from_parts(Some(file), Vec::new())
            .expect_err("refused names")
            .problems();
        let text = problems.join("\n");
        for needle in [
            "worker.task_env: \"WARDEN_NATS_PASSWORD\" is never passed",
            "worker.task_env: \"NATS_CREDS\" is never passed",
            "worker.task_env: \"GITHUB_TOKEN\" is never passed",
            "worker.task_env: \"A=B\" is not an environment variable name",
            "worker.task_user: \"a b\"",
            "tasks.x: env.WARDEN_HTTP_TOKEN: not allowed",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(problems.len(), 6, "{problems:?}");
        // From the environment too, comma-separated.
        let c = Config::from_parts(
            None,
            env(&[("WARDEN_WORKER_TASK_ENV", "CI_CACHE, http_proxy")]),
        )
        .expect("allowed names");
        assert_eq!(c.worker.task_env, ["CI_CACHE", "http_proxy"]);
    }

    #[test]
    fn writes_beyond_loopback_need_a_token() {
        let at = |s: &str| {
            s.parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("{s}: {e}"))
        };
        assert_eq!(http_exposure_problem(at("127.0.0.1:8080"), None), None);
        assert_eq!(http_exposure_problem(at("[::1]:8080"), None), None);
        assert_eq!(
            http_exposure_problem(at("0.0.0.0:8080"), Some("s3cret")),
            None
        );
        for addr in ["0.0.0.0:8080", "[::]:8080", "192.0.2.7:80"] {
            let problem = http_exposure_problem(at(addr), None).unwrap_or_default();
            assert!(
                problem.contains("http.token") && problem.contains("WARDEN_HTTP_TOKEN"),
                "{addr}: {problem:?}"
            );
            assert!(http_exposure_problem(at(addr), Some("")).is_some());
        }
        let open = Config::from_parts(None, env(&[("WARDEN_HTTP_LISTEN", "0.0.0.0:8080")]))
            .expect("a worker may share the file");
        assert_eq!(open.http_serving_problems().len(), 1);
        let closed = Config::from_parts(
            None,
            env(&[
                ("WARDEN_HTTP_LISTEN", "0.0.0.0:8080"),
                ("WARDEN_HTTP_TOKEN", "s3cret"),
            ]),
        )
        .expect("valid");
        assert!(closed.http_serving_problems().is_empty());
    }

    #[test]
    fn patterns() {
        assert!(check_pattern("org.fedoraproject.*.buildsys.>").is_ok());
        assert!(check_pattern("a..b").is_err());
        assert!(check_pattern("a.b*").is_err());
        assert!(check_pattern(">").is_ok());
    }
}
