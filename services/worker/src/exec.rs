//! Running a task as a real process, and the verdict rules of
//! docs/design.md ("Tasks, verdicts and the status file").

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warden_shared::config::TaskConfig;
use warden_shared::guard::{self, Ended};
use warden_shared::job::{Blame, CrashInfo};
use warden_shared::messages::Fault;
use warden_shared::task_env::{self, TaskUser, TaskUserError};
use warden_shared::Config;

use crate::metrics::metrics;

/// One attempt to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub job_id: Uuid,
    pub epoch: u32,
    pub task: String,
    pub args: BTreeMap<String, String>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Execution {
    Finished {
        outcome: String,
        duration_ms: u64,
    },
    Crashed {
        crash: CrashInfo,
        fault: Option<Fault>,
    },
    /// The task's guard killed it because this worker sent no keep-alive
    /// within the guard's silence limit (the worker was frozen or
    /// starved): Warden's kill, never the task's crash.
    Fenced {
        duration_ms: u64,
    },
}

/// How long a task's guard lets its worker go without a keep-alive before
/// it kills the task: half the session timeout, so a frozen worker's task
/// is dead before the fencing service can expire the session (a full
/// timeout of silence) and the job be leased again. At the default 10 s,
/// 5 s; never under 1 s.
pub fn guard_silence_limit(config: &Config) -> Duration {
    (config.fencing.session_timeout / 2).max(Duration::from_secs(1))
}

pub type ExecFuture<'a> = Pin<Box<dyn Future<Output = Execution> + Send + 'a>>;

/// Runs attempts. `cancel` means: stop now (the result is then ignored).
pub trait Executor: Send + Sync {
    fn execute(&self, req: ExecRequest, cancel: CancellationToken) -> ExecFuture<'_>;
}

/// Runs nothing and passes at once: `warden bench` uses it to measure
/// Warden's own cost.
pub struct NoopExecutor;

impl Executor for NoopExecutor {
    fn execute(&self, _req: ExecRequest, _cancel: CancellationToken) -> ExecFuture<'_> {
        Box::pin(async {
            Execution::Finished {
                outcome: "passed".into(),
                duration_ms: 0,
            }
        })
    }
}

/// Keeps the last `cap` bytes written to it.
pub struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail {
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
            cap,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    pub fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Finished(String),
    /// A crash; `fault` when the task explained it.
    Crashed(Option<Fault>),
}

/// docs/design.md: the status file first (`OK`, a JSON verdict, or a JSON fault),
/// then the task's configured exit-code verdicts; a signal, any other exit
/// code or a malformed status file is a crash. A task killed for running
/// past its time limit has crashed whatever it wrote.
pub fn verdict(
    task: &TaskConfig,
    exit_code: Option<i32>,
    signal: Option<i32>,
    status_file: Option<&str>,
    timed_out: bool,
) -> Verdict {
    if timed_out {
        return Verdict::Crashed(None);
    }
    if let Some(text) = status_file.map(str::trim).filter(|t| !t.is_empty()) {
        if text == "OK" {
            return Verdict::Finished("passed".into());
        }
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(text)
        else {
            return Verdict::Crashed(None);
        };
        if let Some(outcome) = obj
            .get("outcome")
            .or_else(|| obj.get("verdict"))
            .and_then(|v| v.as_str())
        {
            if !outcome.is_empty() {
                return Verdict::Finished(outcome.to_string());
            }
        }
        let blame = obj
            .get("blame")
            .and_then(|v| v.as_str())
            .and_then(|b| b.parse::<Blame>().ok());
        let detail = obj
            .get("detail")
            .and_then(|v| v.as_str())
            .filter(|d| !d.is_empty());
        if let (Some(blame), Some(detail)) = (blame, detail) {
            let description = obj
                .get("description")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            return Verdict::Crashed(Some(Fault {
                blame,
                detail: detail.to_string(),
                description,
            }));
        }
        return Verdict::Crashed(None);
    }
    match (exit_code, signal) {
        (Some(code), None) => match task.verdict(code) {
            Some(outcome) => Verdict::Finished(outcome.to_string()),
            None => Verdict::Crashed(None),
        },
        _ => Verdict::Crashed(None),
    }
}

/// Runs the task's argv from the worker's config. Arguments are passed as
/// `WARDEN_ARG_<NAME>` environment variables, never through a shell line.
/// The task starts from a cleared environment (`warden_shared::task_env`),
/// as `worker.task_user` when one is set.
pub struct ProcessExecutor {
    config: Arc<Config>,
    work_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// The worker's variables every task gets (taken once: the worker's
    /// environment does not change).
    passed_env: BTreeMap<String, String>,
    user: Option<TaskUser>,
}

/// The values a task's environment must never hold: the worker's NATS
/// password, HTTP token and credentials path.
fn worker_secrets(config: &Config) -> Vec<String> {
    let mut secrets = Vec::new();
    secrets.extend(config.nats.password.clone());
    secrets.extend(config.http.token.clone());
    if let Some(path) = &config.nats.credentials {
        secrets.push(path.display().to_string());
    }
    secrets
}

/// `worker.task_user`, resolved and checked against this process's user.
fn task_user(config: &Config) -> Result<Option<TaskUser>, TaskUserError> {
    let spec = config.worker.task_user.trim();
    if spec.is_empty() {
        return Ok(None);
    }
    let passwd = match std::fs::read_to_string("/etc/passwd") {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(TaskUserError::Passwd(e.to_string())),
    };
    let user = task_env::resolve_user(spec, &passwd)?;
    task_env::check_can_switch(&user, rustix::process::geteuid().as_raw())?;
    Ok(Some(user))
}

impl ProcessExecutor {
    /// Fails when `worker.task_user` is set but cannot be used.
    pub fn new(config: Arc<Config>) -> Result<ProcessExecutor, TaskUserError> {
        Self::with_environment(config, std::env::vars())
    }

    /// Like [`ProcessExecutor::new`], with `inherited` standing for the
    /// worker's environment.
    pub fn with_environment(
        config: Arc<Config>,
        inherited: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ProcessExecutor, TaskUserError> {
        let user = task_user(&config)?;
        let secrets = worker_secrets(&config);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let passed = task_env::task_environment(inherited, &config.worker.task_env, &secrets);
        for name in &passed.dropped {
            tracing::warn!(
                variable = %name,
                "not passed to tasks: its value holds one of the worker's secrets"
            );
            metrics().task_env_dropped.inc();
        }
        let mut passed_env = passed.env;
        if let Some(u) = &user {
            if let Some(home) = &u.home {
                passed_env.insert("HOME".into(), home.clone());
            }
            if let Some(name) = &u.name {
                passed_env.insert("USER".into(), name.clone());
                passed_env.insert("LOGNAME".into(), name.clone());
            }
        }
        let (work_dir, temp) = if config.worker.work_dir.is_empty() {
            match tempfile::Builder::new().prefix("warden-worker-").tempdir() {
                Ok(t) => (t.path().to_path_buf(), Some(t)),
                Err(_) => (std::env::temp_dir(), None),
            }
        } else {
            let dir = PathBuf::from(&config.worker.work_dir);
            // Made now, so its health checks look at the right disk.
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot create the work dir");
            }
            (dir, None)
        };
        Ok(ProcessExecutor {
            config,
            work_dir,
            _temp: temp,
            passed_env,
            user,
        })
    }

    fn setup_failed(description: String) -> Execution {
        Execution::Crashed {
            crash: CrashInfo {
                // The classifier's setup_failed rule matches this prefix.
                log_tail: format!("[warden] setup failed: {description}\n"),
                ..Default::default()
            },
            fault: Some(Fault {
                blame: Blame::System,
                detail: "setup_failed".into(),
                description,
            }),
        }
    }

    async fn run(&self, req: ExecRequest, cancel: CancellationToken) -> Execution {
        let Some(task) = self.config.tasks.get(&req.task) else {
            return Self::setup_failed(format!(
                "task {} is not configured on this worker",
                req.task
            ));
        };
        let dir = self.work_dir.join(format!("{}-{}", req.job_id, req.epoch));
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return Self::setup_failed(format!("cannot create work dir {}: {e}", dir.display()));
        }
        if let Some(u) = &self.user {
            // The task writes its status file and scratch files here.
            if let Err(e) = rustix::fs::chown(
                &dir,
                Some(rustix::fs::Uid::from_raw(u.uid)),
                Some(rustix::fs::Gid::from_raw(u.gid)),
            ) {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Self::setup_failed(format!(
                    "cannot give work dir {} to uid {}: {e}",
                    dir.display(),
                    u.uid
                ));
            }
        }
        let status_path = dir.join("warden-status");
        let result = self
            .spawn_and_wait(task, &req, &dir, &status_path, cancel)
            .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        result
    }

    async fn spawn_and_wait(
        &self,
        task: &TaskConfig,
        req: &ExecRequest,
        dir: &std::path::Path,
        status_path: &std::path::Path,
        cancel: CancellationToken,
    ) -> Execution {
        // Under a guard (in `warden` and `warden-worker`): the task and
        // everything it starts in its group die with this process, however
        // it dies (see warden_shared::guard).
        let silence = guard_silence_limit(&self.config);
        let (std_cmd, mut link) = match guard::watched_command(&task.command[0], silence) {
            Ok(c) => c,
            Err(e) => {
                return Self::setup_failed(format!("cannot start {:?}: {e}", task.command[0]))
            }
        };
        let mut std_cmd = std_cmd;
        #[cfg(unix)]
        if let Some(u) = &self.user {
            // On the guard, which passes its user on to the task; std
            // drops the supplementary groups when it switches.
            use std::os::unix::process::CommandExt;
            std_cmd.uid(u.uid).gid(u.gid);
        }
        let mut cmd = tokio::process::Command::from(std_cmd);
        // The guard passes its environment on to the task: clearing it
        // here clears both (the worker's secrets reach neither).
        cmd.args(&task.command[1..])
            .current_dir(dir)
            .env_clear()
            .envs(&self.passed_env)
            .envs(&task.env)
            .env("WARDEN_JOB_ID", req.job_id.to_string())
            .env("WARDEN_ATTEMPT", req.epoch.to_string())
            .env("WARDEN_TASK", &req.task)
            .env("WARDEN_STATUS_FILE", status_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Guarded, dropping the link kills the whole group; SIGKILL of
            // the guard alone would leave the task running.
            .kill_on_drop(!link.is_guarded());
        for (k, v) in &req.args {
            cmd.env(format!("WARDEN_ARG_{}", k.to_uppercase()), v);
        }
        for r in &self.config.worker.resources {
            if let Some(path) = &r.path {
                cmd.env(resource_env(&r.kind), path);
            }
        }
        #[cfg(unix)]
        cmd.process_group(0);
        let started = Instant::now();
        let spawned = cmd.spawn();
        // It holds the guard's end of the link: the guard's exit must be
        // the link's end.
        drop(cmd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                return Self::setup_failed(format!("cannot start {:?}: {e}", task.command[0]))
            }
        };
        let tail = Arc::new(Mutex::new(Tail::new(self.config.worker.log_tail_bytes)));
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        .map(|mut r| {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tail.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(&buf[..n]);
                }
            })
        })
        .collect();
        let pgid = child.id();
        let limit = task.timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
        let mut timed_out = false;
        // The guard's dead man's switch: a keep-alive five times within its
        // limit while this worker runs.
        let mut keep_alive = tokio::time::interval(silence / 5);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let time_limit = tokio::time::sleep(limit);
        tokio::pin!(time_limit);
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                _ = &mut time_limit => {
                    timed_out = true;
                    kill_group(pgid);
                    break child.wait().await;
                }
                _ = cancel.cancelled() => {
                    kill_group(pgid);
                    break child.wait().await;
                }
                _ = keep_alive.tick() => {
                    if let Err(e) = link.keep_alive() {
                        tracing::debug!(job.id = %req.job_id, error = %e, "cannot reach the task's guard");
                    }
                }
            }
        };
        // A background grandchild may keep the pipes open: don't wait forever.
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        // The guard's report is the task's own status; without one (the
        // group was SIGKILLed, or no guard) the spawned process's.
        let ended = tokio::task::spawn_blocking(move || link.finish())
            .await
            .unwrap_or(Ended::Unknown);
        let (exit_code, signal) = match (ended, &status) {
            (Ended::NotStarted(description), _) => return Self::setup_failed(description),
            (Ended::Exited(code), _) => (Some(code), None),
            (Ended::Signalled(sig), _) => (None, Some(sig)),
            (Ended::Fenced, _) => return Execution::Fenced { duration_ms },
            (Ended::Unknown, Ok(s)) => (s.code(), exit_signal(s)),
            (Ended::Unknown, Err(_)) => (None, None),
        };
        let status_file = read_bounded(status_path, self.config.worker.status_file_bytes).await;
        let log_tail = tail.lock().unwrap_or_else(|p| p.into_inner()).text();
        match verdict(task, exit_code, signal, status_file.as_deref(), timed_out) {
            Verdict::Finished(outcome) => Execution::Finished {
                outcome,
                duration_ms,
            },
            Verdict::Crashed(fault) => {
                let mut log_tail = log_tail;
                if timed_out {
                    log_tail.push_str(&format!(
                        "\n[warden] time limit of {limit:?} exceeded: task killed\n"
                    ));
                }
                Execution::Crashed {
                    crash: CrashInfo {
                        exit_code,
                        signal,
                        duration_ms,
                        log_tail,
                        status_file,
                        timed_out,
                        resources: Vec::new(),
                    },
                    fault,
                }
            }
        }
    }
}

/// `WARDEN_RESOURCE_<KIND>`: where a task finds a resource of that kind.
pub fn resource_env(kind: &str) -> String {
    let kind: String = kind
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("WARDEN_RESOURCE_{kind}")
}

impl Executor for ProcessExecutor {
    fn execute(&self, req: ExecRequest, cancel: CancellationToken) -> ExecFuture<'_> {
        Box::pin(self.run(req, cancel))
    }
}

#[cfg(unix)]
fn exit_signal(s: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    s.signal()
}

#[cfg(not(unix))]
fn exit_signal(_: &std::process::ExitStatus) -> Option<i32> {
    None
}

/// SIGKILL the task's whole process group (its guard, the task and what
/// the task started), so children die with it.
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn read_bounded(path: &std::path::Path, max: usize) -> Option<String> {
    let file = tokio::fs::File::open(path).await.ok()?;
    let mut buf = Vec::new();
    file.take(max as u64).read_to_end(&mut buf).await.ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(verdicts: &[(i32, &str)]) -> TaskConfig {
        TaskConfig {
            command: vec!["true".into()],
            pool: "default".into(),
            priority: 0,
            verdicts: verdicts
                .iter()
                .map(|(c, o)| (c.to_string(), o.to_string()))
                .collect(),
            timeout: None,
            env: BTreeMap::new(),
            owners: Vec::new(),
            retry: Default::default(),
        }
    }

    #[test]
    fn exit_codes_map_to_verdicts_or_crashes() {
        let t = task(&[(0, "passed"), (1, "failed")]);
        assert_eq!(
            verdict(&t, Some(0), None, None, false),
            Verdict::Finished("passed".into())
        );
        assert_eq!(
            verdict(&t, Some(1), None, None, false),
            Verdict::Finished("failed".into())
        );
        assert_eq!(
            verdict(&t, Some(2), None, None, false),
            Verdict::Crashed(None)
        );
        assert_eq!(
            verdict(&t, None, Some(9), None, false),
            Verdict::Crashed(None)
        );
    }

    #[test]
    fn status_file_comes_first() {
        let t = task(&[(0, "passed")]);
        assert_eq!(
            verdict(&t, Some(3), None, Some("OK\n"), false),
            Verdict::Finished("passed".into())
        );
        assert_eq!(
            verdict(
                &t,
                Some(0),
                None,
                Some(r#"{"outcome":"needs_inspection"}"#),
                false
            ),
            Verdict::Finished("needs_inspection".into())
        );
        let fault = Fault {
            blame: Blame::ThirdParty,
            detail: "network".into(),
            description: "koji unreachable".into(),
        };
        assert_eq!(
            verdict(
                &t,
                Some(0),
                None,
                Some(
                    r#"{"blame":"third_party","detail":"network","description":"koji unreachable"}"#
                ),
                false
            ),
            Verdict::Crashed(Some(fault))
        );
        // Malformed: a crash without a fault (the content is reported).
        assert_eq!(
            verdict(&t, Some(0), None, Some("{nope"), false),
            Verdict::Crashed(None)
        );
        assert_eq!(
            verdict(
                &t,
                Some(0),
                None,
                Some(r#"{"blame":"gremlins","detail":"x"}"#),
                false
            ),
            Verdict::Crashed(None)
        );
        // Empty status file: ignored.
        assert_eq!(
            verdict(&t, Some(0), None, Some("  \n"), false),
            Verdict::Finished("passed".into())
        );
    }

    #[test]
    fn time_limit_is_a_crash_whatever_the_task_wrote() {
        let t = task(&[(0, "passed")]);
        assert_eq!(
            verdict(&t, None, Some(9), Some("OK"), true),
            Verdict::Crashed(None)
        );
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::new(8);
        t.push(b"hello ");
        t.push(b"world!");
        assert_eq!(t.text(), "o world!");
        t.push(b"0123456789abc");
        assert_eq!(t.text(), "56789abc");
    }
}
