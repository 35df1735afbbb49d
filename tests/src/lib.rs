//! Helpers for end-to-end tests: the real `warden` binary against a real
//! `nats-server` (from `warden-testsupport`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use warden_testsupport::{eventually, free_port, never_within, Cluster, NatsServer};

/// `target/<profile>/warden`, next to the test binary's `deps/` folder.
/// `scripts/test` builds it before the tests run.
pub fn warden_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WARDEN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("warden");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// `target/<profile>/warden-<service>`, beside [`warden_bin`].
pub fn service_bin(service: &str) -> PathBuf {
    let bin = warden_bin().with_file_name(format!("warden-{service}"));
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// Fixture path under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Runs `warden ARGS --nats-url URL` to completion.
pub fn cli(nats_url: &str, args: &[&str]) -> Output {
    cli_with_env(nats_url, args, &[])
}

/// [`cli`] with these environment variables (e.g. the login).
pub fn cli_with_env(nats_url: &str, args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(warden_bin())
        .args(args)
        .args(["--nats-url", nats_url])
        .env("WARDEN_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run warden")
}

/// Like [`cli`], asserting success and returning stdout.
pub fn cli_ok(nats_url: &str, args: &[&str]) -> String {
    cli_ok_with_env(nats_url, args, &[])
}

/// [`cli_ok`] with these environment variables.
pub fn cli_ok_with_env(nats_url: &str, args: &[&str], env: &[(String, String)]) -> String {
    let out = cli_with_env(nats_url, args, env);
    assert!(
        out.status.success(),
        "warden {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `warden up` process on an external nats-server; SIGTERM on drop.
pub struct Warden {
    child: Option<Child>,
    pub http: String,
    pub nats_url: String,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Warden {
    /// `config` is TOML text merged over the defaults.
    pub fn up(nats_url: &str, config: &str, workers: u32) -> Warden {
        Warden::up_with_env(nats_url, config, workers, &[])
    }

    /// [`Warden::up`] with these environment variables (e.g. the login).
    pub fn up_with_env(
        nats_url: &str,
        config: &str,
        workers: u32,
        env: &[(String, String)],
    ) -> Warden {
        let dir = tempfile::Builder::new()
            .prefix("warden-up-")
            .tempdir()
            .unwrap();
        let mut w = Warden::spawn(dir.path(), Some(nats_url), None, config, workers, env);
        w._dir = Some(dir);
        w.wait_healthy();
        w
    }

    /// `warden up` spawning its own nats-server on `nats_port`, with its
    /// config, log and data dir (`data`) in `dir`: a second one on the
    /// same `dir` finds the first one's data.
    pub fn up_local(dir: &Path, nats_port: u16, config: &str, workers: u32) -> Warden {
        Warden::up_local_with(dir, nats_port, config, workers, &[])
    }

    /// [`Warden::up_local`] with more `warden up` arguments (`--secure`).
    pub fn up_local_with(
        dir: &Path,
        nats_port: u16,
        config: &str,
        workers: u32,
        extra: &[&str],
    ) -> Warden {
        let w = Warden::spawn_with(dir, None, Some(nats_port), config, workers, extra, &[]);
        w.wait_healthy();
        w
    }

    fn spawn(
        dir: &Path,
        nats_url: Option<&str>,
        nats_port: Option<u16>,
        config: &str,
        workers: u32,
        env: &[(String, String)],
    ) -> Warden {
        Warden::spawn_with(dir, nats_url, nats_port, config, workers, &[], env)
    }

    fn spawn_with(
        dir: &Path,
        nats_url: Option<&str>,
        nats_port: Option<u16>,
        config: &str,
        workers: u32,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Warden {
        let conf = dir.join("warden.toml");
        std::fs::write(&conf, config).unwrap();
        let port = free_port();
        let http = format!("127.0.0.1:{port}");
        let log = dir.join("warden.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(warden_bin());
        cmd.args(["up", "--http", &http, "--workers", &workers.to_string()]);
        cmd.args(extra);
        if let Some(url) = nats_url {
            cmd.args(["--nats-url", url]);
        }
        if let Some(p) = nats_port {
            cmd.args(["--nats-port", &p.to_string()]);
        }
        let child = cmd
            .arg("--config")
            .arg(&conf)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("WARDEN_LOG", "info,async_nats=warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(logf.try_clone().unwrap()))
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn warden up");
        let nats_url = match (nats_url, nats_port) {
            (Some(url), _) => url.to_string(),
            (None, Some(p)) => format!("nats://127.0.0.1:{p}"),
            (None, None) => "nats://127.0.0.1:4222".to_string(),
        };
        Warden {
            child: Some(child),
            http: format!("http://{http}"),
            nats_url,
            log,
            _dir: None,
        }
    }

    /// The `warden up` process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as an OOM kill or a crash would: nothing is stopped in
    /// order.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `/healthz` answers 200: it says 503 until every service
    /// of `warden up` (the fencing service and the scheduler among them)
    /// answers on the bus, so a session, an acquire or a take made after
    /// it is answered.
    fn wait_healthy(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = self.http.trim_start_matches("http://").to_string();
        while Instant::now() < deadline {
            if let Ok(mut conn) = std::net::TcpStream::connect(&addr) {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut answer = String::new();
                if conn
                    .write_all(b"GET /healthz HTTP/1.0\r\nHost: warden\r\n\r\n")
                    .is_ok()
                    && conn.read_to_string(&mut answer).is_ok()
                    && (answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "warden up did not answer /healthz within 30s; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http)
    }
}

impl Drop for Warden {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// GET a JSON document.
pub async fn get_json(url: &str) -> serde_json::Value {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert!(status.is_success(), "GET {url}: {status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

/// The text of `/metrics` served at `url`.
pub async fn metrics_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The value of one series in a `/metrics` text, e.g.
/// `warden_scheduler_crashes_total{blame="system",detail="oom"}` (labels
/// in the order the exposition sorts them: by name).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub async fn js(nats_url: &str) -> (async_nats::Client, async_nats::jetstream::Context) {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    (client, js)
}

/// A `warden worker` process (SIGKILL or SIGSTOP it in failure tests).
pub fn spawn_worker(nats_url: &str, config: &Path, bot_id: &str) -> Child {
    spawn_worker_with_env(nats_url, config, bot_id, &[])
}

/// [`spawn_worker`] with these environment variables (e.g. its nkey).
pub fn spawn_worker_with_env(
    nats_url: &str,
    config: &Path,
    bot_id: &str,
    env: &[(String, String)],
) -> Child {
    Command::new(warden_bin())
        .args([
            "worker",
            "--bot-id",
            bot_id,
            "--nats-url",
            nats_url,
            "--config",
        ])
        .arg(config)
        .env("WARDEN_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn warden worker")
}

/// Whether process `pid` still runs (a zombie, dead but not yet reaped by
/// whoever inherited it, counts as gone).
pub fn process_alive(pid: u32) -> bool {
    let proc_dir = Path::new("/proc");
    if proc_dir.join("self").exists() {
        let Ok(stat) = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("stat")) else {
            return false;
        };
        // pid (comm) STATE ...; comm may hold spaces and parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        return !matches!(state, Some("Z") | Some("X") | None);
    }
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A child process SIGKILLed and reaped on drop, so a failed test leaves
/// no worker or hook behind. Derefs to the [`Child`] (kill it, stop it,
/// read its id).
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kill SIG PID` (e.g. `"-STOP"`), asserting it was delivered.
pub fn signal(pid: u32, sig: &str) {
    let pid = pid.to_string();
    let ok = Command::new("kill")
        .args([sig, &pid])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

/// The entries of a job's (JSON) history with `action`, oldest first.
pub fn entries<'a>(job: &'a serde_json::Value, action: &str) -> Vec<&'a serde_json::Value> {
    job["history"]
        .as_array()
        .unwrap_or_else(|| panic!("a job without a history: {job:#}"))
        .iter()
        .filter(|e| e["action"] == action)
        .collect()
}

/// The first entry of a job's history with `action`; panics with the job
/// when there is none.
pub fn entry<'a>(job: &'a serde_json::Value, action: &str) -> &'a serde_json::Value {
    entries(job, action)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no {action} entry in {job:#}"))
}

/// A JSON timestamp (`"2024-05-01T12:00:00Z"`).
pub fn at(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not a timestamp: {v}"))
}

/// The usual set-up of an end-to-end test: a nats-server of its own, a
/// `warden up` on it with `config` (TOML over the defaults) and `workers`
/// local workers; `warden worker` processes of its own on the same config
/// with [`Stack::worker`].
///
/// ```ignore
/// let s = Scenario::new().config(CONFIG).workers(2).up();
/// let id = s.submit(&["noop"]);
/// let job = s.wait_job(&id, "FINISHED", Duration::from_secs(30)).await;
/// ```
#[derive(Default)]
pub struct Scenario {
    config: String,
    workers: u32,
    nats: Option<NatsServer>,
    secured: Option<Vec<String>>,
}

impl Scenario {
    pub fn new() -> Scenario {
        Scenario::default()
    }

    /// TOML appended to the config written so far (later tables win where
    /// TOML allows; a table named twice is an error, as in any file).
    pub fn config(mut self, toml: &str) -> Scenario {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    /// Local workers `warden up` runs (0: none; a test starts its own).
    pub fn workers(mut self, n: u32) -> Scenario {
        self.workers = n;
        self
    }

    /// Runs on this nats-server (e.g. one with accounts) instead of a
    /// plain fresh one.
    pub fn nats(mut self, nats: NatsServer) -> Scenario {
        self.nats = Some(nats);
        self
    }

    /// Runs on a nats-server with the shipped permissions
    /// (`deploy/nats/cluster/accounts.conf`, passwords `<role>-pw`) and a
    /// NATS user for each of `bots` written as `warden bot add` writes it:
    /// the services log in as `warden-service`, the CLI too, and workers
    /// started with [`Stack::bot_worker`] with their bot's nkey. Local
    /// workers of `warden up` ([`Scenario::workers`]) would run as the
    /// services' user: keep them at 0.
    pub fn secured(mut self, bots: &[&str]) -> Scenario {
        self.secured = Some(bots.iter().map(|b| b.to_string()).collect());
        self
    }

    /// Starts nats-server and `warden up` (healthy when this returns).
    pub fn up(self) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("warden-stack-")
            .tempdir()
            .unwrap();
        let (nats, service_env, bots) = match &self.secured {
            None => (
                self.nats.unwrap_or_else(NatsServer::start),
                Vec::new(),
                Vec::new(),
            ),
            Some(names) => {
                assert!(self.nats.is_none(), "secured() starts its own nats-server");
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let (conf, bots) = warden_testsupport::accounts_conf_with_bots(dir.path(), &names);
                let nats = NatsServer::start_with_args(&["-c", conf.to_str().expect("utf-8 path")]);
                let env = vec![
                    ("WARDEN_NATS_USER".to_string(), SERVICE_USER.to_string()),
                    (
                        "WARDEN_NATS_PASSWORD".to_string(),
                        role_password(SERVICE_USER),
                    ),
                ];
                (nats, env, bots)
            }
        };
        let worker_config = dir.path().join("worker.toml");
        std::fs::write(&worker_config, &self.config).unwrap();
        let warden = Warden::up_with_env(&nats.url(), &self.config, self.workers, &service_env);
        Stack {
            nats,
            warden,
            config: self.config,
            worker_config,
            dir,
            service_env,
            bots,
        }
    }
}

/// The services' NATS user in the shipped accounts config.
pub const SERVICE_USER: &str = "warden-service";

/// The test password of role user `user` (`warden-readonly` →
/// `readonly-pw`, see `warden_testsupport::accounts_conf`).
pub fn role_password(user: &str) -> String {
    format!("{}-pw", user.trim_start_matches("warden-"))
}

/// What [`Scenario::up`] started. Fields are public so a test can restart
/// the bus (`s.nats.restart()`) or stop Warden (`s.warden.stop()`).
pub struct Stack {
    pub nats: NatsServer,
    pub warden: Warden,
    config: String,
    worker_config: PathBuf,
    dir: tempfile::TempDir,
    /// The services' login (empty on an open server).
    service_env: Vec<(String, String)>,
    /// Bot users of a [`Scenario::secured`] stack.
    pub bots: Vec<warden_testsupport::TestBot>,
}

impl Stack {
    /// The bus URL.
    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// The config text `warden up` runs with.
    pub fn config_text(&self) -> &str {
        &self.config
    }

    /// A scratch directory of this stack's (worker configs, marker files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `warden job submit ARGS` (e.g. `["sleep", "--arg", "seconds=5"]`):
    /// the new job's id.
    pub fn submit(&self, args: &[&str]) -> String {
        let mut full = vec!["job", "submit"];
        full.extend_from_slice(args);
        self.cli_ok(&full)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// `warden ARGS` on this bus with the services' login.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with_env(&self.url(), args, &self.service_env)
    }

    /// [`Stack::cli`], asserting success; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        cli_ok_with_env(&self.url(), args, &self.service_env)
    }

    /// The test bot `bot_id` of a secured stack.
    pub fn bot(&self, bot_id: &str) -> &warden_testsupport::TestBot {
        self.bots
            .iter()
            .find(|b| b.bot_id == bot_id)
            .unwrap_or_else(|| panic!("{bot_id} is not a bot of this stack"))
    }

    /// A `warden worker` for bot `bot_id` logged in with its own nkey
    /// (a secured stack), with the stack's config; killed on drop.
    pub fn bot_worker(&self, bot_id: &str) -> Proc {
        self.bot_worker_with(&self.worker_config, bot_id)
    }

    /// [`Stack::bot_worker`] with its own config file.
    pub fn bot_worker_with(&self, config: &Path, bot_id: &str) -> Proc {
        let nkey = self.bot(bot_id).nkey_file.display().to_string();
        let env = vec![("WARDEN_NATS_NKEY_FILE".to_string(), nkey)];
        Proc(spawn_worker_with_env(&self.url(), config, bot_id, &env))
    }

    /// A client logged in as bot `bot_id` (its nkey, replies under its
    /// own inbox prefix): what an attacker holding its credentials has.
    pub async fn connect_bot(&self, bot_id: &str) -> async_nats::Client {
        let seed = std::fs::read_to_string(&self.bot(bot_id).nkey_file).expect("seed");
        async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
            .custom_inbox_prefix(warden_shared::subjects::bot_inbox_prefix(bot_id))
            .connect(self.url())
            .await
            .expect("connect as a bot")
    }

    /// A client logged in as role user `user` (`warden-readonly`, ...)
    /// with its test password, replies under `_INBOX.<user>`.
    pub async fn connect_role(&self, user: &str) -> async_nats::Client {
        async_nats::ConnectOptions::with_user_and_password(user.into(), role_password(user))
            .custom_inbox_prefix(warden_shared::subjects::role_inbox_prefix(user))
            .connect(self.url())
            .await
            .expect("connect as a role")
    }

    /// A client with the services' login (anonymous on an open stack).
    pub async fn service_client(&self) -> async_nats::Client {
        if self.service_env.is_empty() {
            async_nats::connect(self.url()).await.expect("connect")
        } else {
            self.connect_role(SERVICE_USER).await
        }
    }

    /// Every key of KV `bucket` with its raw value: compare two of these
    /// to show nothing changed, byte for byte.
    pub async fn kv_snapshot(&self, bucket: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        use futures::StreamExt;
        let js = async_nats::jetstream::new(self.service_client().await);
        let kv = js.get_key_value(bucket).await.expect("bucket");
        let mut keys = kv.keys().await.expect("keys");
        let mut out = std::collections::BTreeMap::new();
        while let Some(Ok(key)) = keys.next().await {
            if let Ok(Some(v)) = kv.get(&key).await {
                out.insert(key, v.to_vec());
            }
        }
        out
    }

    /// `warden job submit noop --wait --timeout 30`, asserting it passed:
    /// a free slot runs work.
    pub fn assert_noop_passes(&self) {
        let out = cli_ok(
            &self.url(),
            &["job", "submit", "noop", "--wait", "--timeout", "30"],
        );
        assert!(out.contains("FINISHED outcome=passed"), "{out}");
    }

    /// A `warden worker` process on this bus (see [`spawn_worker`]).
    pub fn spawn_worker(&self, config: &Path, bot_id: &str) -> Child {
        spawn_worker(&self.url(), config, bot_id)
    }

    /// A `warden worker` named `bot_id` on this bus with the stack's own
    /// config, killed on drop.
    pub fn worker(&self, bot_id: &str) -> Proc {
        Proc(spawn_worker(&self.url(), &self.worker_config, bot_id))
    }

    /// A `warden worker` with its own config file, killed on drop.
    pub fn worker_with(&self, config: &Path, bot_id: &str) -> Proc {
        Proc(spawn_worker(&self.url(), config, bot_id))
    }

    /// `GET /api/v1/jobs/ID`.
    pub async fn job(&self, id: &str) -> serde_json::Value {
        job(&self.warden, id).await
    }

    /// GET a JSON document of the HTTP API (`path` like `/api/v1/bots`).
    pub async fn get(&self, path: &str) -> serde_json::Value {
        get_json(&self.warden.url(path)).await
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        metrics_text(&self.warden.url("/metrics")).await
    }

    /// Waits until every `(series, value)` of `want` is in `/metrics` (the
    /// counters follow the write the API saw, so they are polled).
    pub async fn wait_samples(&self, what: &str, timeout: Duration, want: &[(&str, f64)]) {
        let url = self.warden.url("/metrics");
        eventually(timeout, what, || async {
            let text = metrics_text(&url).await;
            want.iter()
                .all(|(s, n)| sample(&text, s) == Some(*n))
                .then_some(())
        })
        .await
    }

    /// Waits for job `id` to be in `state` (see [`wait_job`]).
    pub async fn wait_job(&self, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
        wait_job(&self.warden, id, state, timeout).await
    }

    /// Waits until job `id` satisfies `want` (see [`wait_job_where`]).
    pub async fn wait_job_where(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_job_where(&self.warden, id, what, timeout, want).await
    }

    /// Waits until job `id` is RUNNING on `bot_id`.
    pub async fn wait_running_on(&self, id: &str, bot_id: &str) -> serde_json::Value {
        self.wait_job_where(
            id,
            &format!("job {id} RUNNING on {bot_id}"),
            Duration::from_secs(30),
            |j| j["state"] == "RUNNING" && j["lease"]["bot_id"] == bot_id,
        )
        .await
    }

    /// Waits until `bot_id`'s newest session is active in the sessions
    /// bucket (a worker registered, or re-registered).
    pub async fn wait_active_session(&self, bot_id: &str, timeout: Duration) {
        use warden_shared::session::{bot_key, session_key, Session, SessionState};
        let js = async_nats::jetstream::new(self.service_client().await);
        let kv = js
            .get_key_value(warden_shared::subjects::SESSIONS_BUCKET)
            .await
            .expect("the sessions bucket");
        eventually(timeout, &format!("{bot_id} has an active session"), || {
            let kv = kv.clone();
            async move {
                let name = kv.get(bot_key(bot_id)).await.ok()??;
                let rec = kv
                    .get(session_key(std::str::from_utf8(&name).ok()?))
                    .await
                    .ok()??;
                let s: Session = serde_json::from_slice(&rec).ok()?;
                (s.state == SessionState::Active).then_some(())
            }
        })
        .await;
    }
}

/// `warden job submit ARGS` on `nats_url`: the new job's id (the first line
/// of what it prints).
pub fn submit(nats_url: &str, args: &[&str]) -> String {
    let mut full = vec!["job", "submit"];
    full.extend_from_slice(args);
    cli_ok(nats_url, &full)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `GET /api/v1/jobs/ID` from `w`.
pub async fn job(w: &Warden, id: &str) -> serde_json::Value {
    get_json(&w.url(&format!("/api/v1/jobs/{id}"))).await
}

/// A job's state over HTTP, `None` while it cannot be read.
pub async fn job_state(w: &Warden, id: &str) -> Option<String> {
    let r = reqwest::get(w.url(&format!("/api/v1/jobs/{id}")))
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v["state"].as_str().map(str::to_string)
}

/// Waits until job `id` (over `w`'s HTTP API) is in `state`; returns it.
pub async fn wait_job(w: &Warden, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
    wait_job_where(w, id, &format!("job {id} {state}"), timeout, |j| {
        j["state"] == state
    })
    .await
}

/// Waits until job `id` satisfies `want` (e.g. a state at an attempt);
/// returns it. A job that cannot be read yet is waited for too.
pub async fn wait_job_where(
    w: &Warden,
    id: &str,
    what: &str,
    timeout: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let url = w.url(&format!("/api/v1/jobs/{id}"));
    let want = &want;
    eventually(timeout, what, || {
        let url = url.clone();
        async move {
            let r = reqwest::get(&url).await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            let j: serde_json::Value = r.json().await.ok()?;
            want(&j).then_some(j)
        }
    })
    .await
}

/// Services run in the test's own process (for tests that cut one off, or
/// play a worker by hand on the bus): a nats-server, a config for it, a
/// connection with the topology made, and the job store.
pub struct InProcess {
    pub nats: NatsServer,
    pub config: std::sync::Arc<warden_shared::Config>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub client: async_nats::Client,
    pub handles: warden_shared::subjects::Handles,
    pub store: warden_shared::store::JobStore,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A config for the services of a test: `[nats] url` plus `extra` TOML.
pub fn config(nats_url: &str, extra: &str) -> std::sync::Arc<warden_shared::Config> {
    std::sync::Arc::new(
        warden_shared::Config::from_parts(
            Some(&format!("[nats]\nurl = \"{nats_url}\"\n{extra}")),
            Vec::new(),
        )
        .expect("test config"),
    )
}

impl InProcess {
    /// A fresh server, the config (`extra` TOML after `[nats] url`) and a
    /// connection with streams and buckets made.
    pub async fn start(extra: &str) -> InProcess {
        let nats = NatsServer::start();
        let config = config(&nats.url(), extra);
        let (client, handles) = warden_shared::runtime::Connect::new(&config, "test")
            .topology_forever()
            .await
            .expect("connect with the topology");
        let store = warden_shared::store::JobStore::new(handles.jobs.clone());
        InProcess {
            nats,
            config,
            shutdown: tokio_util::sync::CancellationToken::new(),
            client,
            handles,
            store,
            tasks: Vec::new(),
        }
    }

    /// Runs a service (`warden_scheduler::run`, `warden_fencing::run`, ...)
    /// with this config until [`InProcess::stop`].
    pub fn spawn<F, Fut, T>(&mut self, run: F)
    where
        F: FnOnce(
            std::sync::Arc<warden_shared::Config>,
            tokio_util::sync::CancellationToken,
        ) -> Fut,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let fut = run(self.config.clone(), self.shutdown.clone());
        self.tasks.push(tokio::spawn(async move {
            let _ = fut.await;
        }));
    }

    /// Cancels the services and gives each 15 s to end.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

/// An acquire by `bot_id` on `session` for up to `max` jobs of pool
/// `default`, waiting 300 ms for one.
pub fn acquire_request(
    session: &str,
    bot_id: &str,
    max: u32,
) -> warden_shared::messages::AcquireRequest {
    warden_shared::messages::AcquireRequest {
        version: 1,
        session: session.into(),
        bot_id: bot_id.into(),
        resource: None,
        resources: Vec::new(),
        pools: vec!["default".into()],
        max,
        wait_ms: 300,
    }
}

/// Sends `req` to the scheduler once: its answer, `None` while none comes.
pub async fn try_acquire(
    client: &async_nats::Client,
    req: &warden_shared::messages::AcquireRequest,
) -> Option<warden_shared::messages::AcquireReply> {
    let body = serde_json::to_vec(req).ok()?;
    let reply = client
        .request(
            warden_shared::subjects::acquire_subject(&req.bot_id),
            body.into(),
        )
        .await
        .ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

/// A session for `bot_id` (pool `default`, capacity 1) from the fencing
/// service, asked for until it answers (20 s): the session's name.
pub async fn open_session(client: &async_nats::Client, bot_id: &str) -> String {
    use warden_shared::messages::{CreateSession, SessionReply};
    let create = CreateSession {
        version: 1,
        bot_id: bot_id.into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: uuid::Uuid::new_v4().to_string(),
        pools: vec!["default".into()],
        capacity: 1,
        agent_version: "test".into(),
        timeout_ms: None,
    };
    let body = serde_json::to_vec(&create).expect("a session request");
    let bot = bot_id.to_string();
    eventually(Duration::from_secs(20), "a session", || {
        let client = client.clone();
        let body = body.clone();
        let bot = bot.clone();
        async move {
            let msg = client
                .request(
                    warden_shared::subjects::session_create_subject(&bot),
                    body.into(),
                )
                .await
                .ok()?;
            serde_json::from_slice::<SessionReply>(&msg.payload)
                .ok()?
                .session
        }
    })
    .await
}

/// A `warden bridge amqp` process: its own config (TOML text merged over
/// the defaults, with an `[amqp]` section), its own `/metrics` and
/// `/healthz` port, its log in a temp dir. SIGKILL on drop.
pub struct Bridge {
    child: Option<Child>,
    nats_url: String,
    conf: PathBuf,
    log: PathBuf,
    /// `http://127.0.0.1:<port>` of its metrics server.
    pub metrics: String,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Bridge {
    /// Starts the bridge and waits until `/healthz` says it consumes.
    pub fn start(nats_url: &str, config: &str) -> Bridge {
        let b = Bridge::spawn(nats_url, config, &[]);
        b.wait_healthy();
        b
    }

    /// Starts the bridge with more arguments (e.g. the hidden
    /// `--crash-after-publish N`), without waiting.
    pub fn spawn(nats_url: &str, config: &str, extra: &[&str]) -> Bridge {
        Bridge::spawn_with_env(nats_url, config, extra, &[])
    }

    /// [`Bridge::spawn`] with these environment variables (its NATS login).
    pub fn spawn_with_env(
        nats_url: &str,
        config: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Bridge {
        let dir = tempfile::Builder::new()
            .prefix("warden-bridge-")
            .tempdir()
            .unwrap();
        let conf = dir.path().join("bridge.toml");
        std::fs::write(&conf, config).unwrap();
        let mut b = Bridge {
            child: None,
            nats_url: nats_url.to_string(),
            conf,
            log: dir.path().join("bridge.log"),
            metrics: format!("http://127.0.0.1:{}", free_port()),
            env: env.to_vec(),
            _dir: dir,
        };
        b.launch(extra);
        b
    }

    fn launch(&mut self, extra: &[&str]) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(warden_bin())
            .args(["--nats-url", &self.nats_url, "--config"])
            .arg(&self.conf)
            .args(["bridge", "amqp"])
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("WARDEN_LOG", "info,async_nats=warn,lapin=warn")
            .env(
                "WARDEN_METRICS_LISTEN",
                self.metrics.trim_start_matches("http://"),
            )
            .stdout(Stdio::from(logf.try_clone().unwrap()))
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn warden bridge amqp");
        self.child = Some(child);
    }

    /// Starts it again (same config, same metrics port) after it exited
    /// or was killed, and waits until it consumes.
    pub fn start_again(&mut self) {
        self.kill();
        self.launch(&[]);
        self.wait_healthy();
    }

    /// Waits until `/healthz` answers 200 (connected to NATS and the
    /// broker, consuming).
    pub fn wait_healthy(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = self.metrics.trim_start_matches("http://").to_string();
        while Instant::now() < deadline {
            if let Ok(mut conn) = std::net::TcpStream::connect(&addr) {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut answer = String::new();
                if conn
                    .write_all(b"GET /healthz HTTP/1.0\r\nHost: bridge\r\n\r\n")
                    .is_ok()
                    && conn.read_to_string(&mut answer).is_ok()
                    && answer.starts_with("HTTP/1.")
                    && answer.contains(" 200 ")
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the bridge did not answer /healthz within 60s; log:\n{}",
            self.log_text()
        );
    }

    /// Waits for the process to exit on its own; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the bridge did not exit within {timeout:?}");
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit; its code.
    pub fn stop(&mut self) -> Option<i32> {
        let c = self.child.as_ref()?;
        signal(c.id(), "-TERM");
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Its `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        metrics_text(&format!("{}/metrics", self.metrics)).await
    }

    /// One sample of its `/metrics` (0 when absent).
    pub async fn sample(&self, series: &str) -> f64 {
        sample(&self.metrics_text().await, series).unwrap_or(0.0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates Warden's streams and buckets (the default topology) on the
/// server at `nats_url`, as the services do at start: for a test that runs
/// a client which creates none (the AMQP bridge) without the services.
pub async fn ensure_topology(nats_url: &str) {
    let (_client, jsx) = js(nats_url).await;
    warden_shared::subjects::ensure(&jsx, &warden_shared::Config::defaults().topology())
        .await
        .expect("streams and buckets");
}

/// The acquirers' sessions `session-0..n` of `bot-0..n`, as the fencing
/// service would have written them: the scheduler leases only to a
/// session it knows to be active.
pub async fn write_sessions(handles: &warden_shared::subjects::Handles, n: usize, capacity: u32) {
    for i in 0..n {
        let now = chrono::Utc::now();
        let s = warden_shared::session::Session {
            version: 1,
            name: format!("session-{i}"),
            bot_id: format!("bot-{i}"),
            resource: None,
            resources: Vec::new(),
            agent_instance: String::new(),
            pools: vec!["default".into()],
            capacity,
            agent_version: String::new(),
            timeout_ms: None,
            state: warden_shared::session::SessionState::Active,
            created_at: now,
            last_heartbeat: now,
            superseded_by: None,
            ended_at: None,
            leases: Vec::new(),
        };
        handles
            .sessions
            .put(
                warden_shared::session::session_key(&s.name),
                serde_json::to_vec(&s).expect("a session encodes").into(),
            )
            .await
            .expect("the session is written");
    }
}
