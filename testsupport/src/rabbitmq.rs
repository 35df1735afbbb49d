//! A real RabbitMQ node for tests (Debian's `rabbitmq-server` package),
//! never a mock, never the machine's default ports.
//!
//! [`RabbitMq::start`] runs one node on free loopback ports (AMQP, Erlang
//! distribution and its own `epmd`, via `ERL_EPMD_PORT`, so it never
//! touches 4369 or 5672) with everything in a temporary directory: `HOME`
//! (and so the Erlang cookie), the Mnesia data, the logs, a generated
//! `rabbitmq.conf`, an empty enabled-plugins file and an empty
//! `rabbitmq-env.conf` (so `/etc/rabbitmq/` is not read). Each node has
//! its own node name (`warden-<port>@localhost`), so several run at once.
//! Dropping it stops the node and the `epmd` it started.
//!
//! The scripts are `$WARDEN_RABBITMQ_SERVER` (set by `scripts/ensure-tools`)
//! and the `rabbitmqctl` beside it; default `/usr/lib/rabbitmq/bin/`. The
//! package's `/usr/sbin` wrappers are not used: as root they switch to the
//! `rabbitmq` user, who cannot write the test's directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, TestPki};

/// How long a node may take to start (a loaded 2-core machine needs ~10 s).
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub fn rabbitmq_server_bin() -> PathBuf {
    std::env::var_os("WARDEN_RABBITMQ_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server"))
}

/// `rabbitmqctl`, beside the server script.
pub fn rabbitmqctl_bin() -> PathBuf {
    rabbitmq_server_bin().with_file_name("rabbitmqctl")
}

/// `epmd`: on `PATH` (Debian's `erlang-base` puts it in /usr/bin).
fn epmd_bin() -> PathBuf {
    PathBuf::from("epmd")
}

/// `n` distinct free loopback ports.
fn free_ports(n: usize) -> Vec<u16> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        let p = free_port();
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

/// One RabbitMQ node.
pub struct RabbitMq {
    /// The `rabbitmq-server` shell script (it runs the VM as its child).
    child: Option<Child>,
    /// The Erlang VM's OS pid, for [`RabbitMq::kill`].
    beam_pid: Option<u32>,
    port: u16,
    tls_port: Option<u16>,
    epmd_port: u16,
    dist_port: u16,
    node: String,
    dir: tempfile::TempDir,
    /// How long the last start took, until `await_startup` said yes.
    started_in: Duration,
}

impl RabbitMq {
    /// A node with a plain AMQP listener on a free loopback port.
    pub fn start() -> RabbitMq {
        Self::new(None)
    }

    /// [`RabbitMq::start`] plus an `amqps` listener on a second free port
    /// with `pki`'s server certificate and CA, requiring a client
    /// certificate signed by that CA (`verify_peer`,
    /// `fail_if_no_peer_cert`).
    pub fn start_tls(pki: &TestPki) -> RabbitMq {
        Self::new(Some(pki))
    }

    fn new(pki: Option<&TestPki>) -> RabbitMq {
        let ports = free_ports(4);
        let (port, epmd_port, dist_port) = (ports[0], ports[1], ports[2]);
        let tls_port = pki.map(|_| ports[3]);
        let dir = tempfile::Builder::new()
            .prefix("warden-rabbitmq-")
            .tempdir()
            .unwrap();
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{port}\n\
             # guest may log in from loopback only (the default); the tests\n\
             # connect from 127.0.0.1, so loopback_users stays as it is.\n\
             log.console = false\n\
             log.file.level = info\n"
        );
        if let (Some(pki), Some(tls_port)) = (pki, tls_port) {
            let server = pki.server();
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 # fedora-messaging logs in with SASL EXTERNAL when it has a\n\
                 # client certificate (as on Fedora's broker): the user is the\n\
                 # certificate's CN (RabbitMq::add_cert_user).\n\
                 auth_mechanisms.1 = PLAIN\n\
                 auth_mechanisms.2 = AMQPLAIN\n\
                 auth_mechanisms.3 = EXTERNAL\n\
                 ssl_cert_login_from = common_name\n",
                pki.ca().display(),
                server.cert.display(),
                server.key.display()
            ));
        }
        std::fs::write(dir.path().join("rabbitmq.conf"), conf).unwrap();
        let plugins = if pki.is_some() {
            "[rabbitmq_auth_mechanism_ssl].\n"
        } else {
            "[].\n"
        };
        std::fs::write(dir.path().join("enabled_plugins"), plugins).unwrap();
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").unwrap();
        // The cookie before anything starts, so the node and every
        // rabbitmqctl read the same one (whoever came first would make one).
        let cookie = dir.path().join(".erlang.cookie");
        std::fs::write(&cookie, format!("WARDENTEST{port}{epmd_port}{dist_port}")).unwrap();
        set_mode_0400(&cookie);
        let mut mq = RabbitMq {
            child: None,
            beam_pid: None,
            port,
            tls_port,
            epmd_port,
            dist_port,
            node: format!("warden-{port}@localhost"),
            dir,
            started_in: Duration::ZERO,
        };
        mq.spawn();
        mq
    }

    /// The environment every `rabbitmq-server`, `rabbitmqctl` and `epmd`
    /// of this node runs with.
    fn env(&self) -> Vec<(String, String)> {
        let d = self.dir.path();
        let p = |name: &str| d.join(name).display().to_string();
        vec![
            ("HOME".into(), d.display().to_string()),
            ("RABBITMQ_CONF_ENV_FILE".into(), p("rabbitmq-env.conf")),
            ("RABBITMQ_CONFIG_FILE".into(), p("rabbitmq.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE".into(), p("advanced.config")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), p("enabled_plugins")),
            ("RABBITMQ_MNESIA_BASE".into(), p("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), p("log")),
            ("RABBITMQ_PID_FILE".into(), p("node.pid")),
            ("RABBITMQ_NODENAME".into(), self.node.clone()),
            ("RABBITMQ_DIST_PORT".into(), self.dist_port.to_string()),
            // Erlang distribution and epmd on loopback only.
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".into(),
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            ("ERL_EPMD_PORT".into(), self.epmd_port.to_string()),
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
        ]
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node still running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stdout.log"))
            .unwrap();
        let started = Instant::now();
        let mut child = Command::new(rabbitmq_server_bin())
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?}: {e} (install Debian's rabbitmq-server: scripts/ensure-tools)",
                    rabbitmq_server_bin()
                )
            });
        // The AMQP listener opens at the end of the boot; then one
        // `await_startup` confirms (polling rabbitmqctl itself would cost
        // a CLI start-up, ~0.5 s of CPU, per try).
        let deadline = started + START_TIMEOUT;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "rabbitmq-server {} exited early with {status}:\n{}",
                    self.node,
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "rabbitmq-server {} did not listen on {} within {START_TIMEOUT:?}:\n{}",
                    self.node,
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        self.ctl(&["await_startup", "--timeout", "60"]);
        self.started_in = started.elapsed();
        let pid = self.ctl(&["eval", "os:getpid()."]);
        self.beam_pid = Some(
            pid.trim()
                .trim_matches('"')
                .parse()
                .unwrap_or_else(|_| panic!("os:getpid() said {pid:?}")),
        );
    }

    /// The last lines of the node's log and console output, for failures.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        let log = self
            .dir
            .path()
            .join("log")
            .join(format!("{}.log", self.node));
        for path in [self.dir.path().join("stdout.log"), log] {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(30);
            out.push_str(&format!(
                "--- {}\n{}\n",
                path.display(),
                lines[from..].join("\n")
            ));
        }
        out
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2F`
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2F", self.port)
    }

    /// `amqps://guest:guest@127.0.0.1:<tls port>/%2F` (a node from
    /// [`RabbitMq::start_tls`] only).
    pub fn amqps_url(&self) -> String {
        format!(
            "amqps://guest:guest@127.0.0.1:{}/%2F",
            self.tls_port().expect("a node started with start_tls")
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The Erlang node name, `warden-<port>@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The node's data, logs and config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How long the last start took (spawn until `await_startup` answered).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The Erlang VM's OS pid while the node runs.
    pub fn beam_pid(&self) -> Option<u32> {
        self.beam_pid
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs `rabbitmqctl <args>` against this node and returns its stdout;
    /// panics with its stderr if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        if !out.status.success() {
            panic!(
                "rabbitmqctl {args:?} on {} failed ({}):\n{}{}",
                self.node,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ctl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(rabbitmqctl_bin())
            .envs(self.env())
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", rabbitmqctl_bin()))
    }

    /// Every queue of vhost `/`: (name, messages ready, messages
    /// unacknowledged).
    pub fn queues(&self) -> Vec<(String, u64, u64)> {
        let out = self.ctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        out.lines()
            .filter_map(|line| {
                let mut f = line.split('\t');
                let name = f.next()?.to_string();
                let ready = f.next()?.trim().parse().ok()?;
                let unacked = f.next()?.trim().parse().ok()?;
                Some((name, ready, unacked))
            })
            .collect()
    }

    /// (messages ready, messages unacknowledged) of `queue`; panics if
    /// there is no such queue.
    pub fn queue_messages(&self, queue: &str) -> (u64, u64) {
        let all = self.queues();
        all.iter()
            .find(|(name, _, _)| name == queue)
            .map(|(_, r, u)| (*r, *u))
            .unwrap_or_else(|| panic!("no queue {queue:?} on {}; queues: {all:?}", self.node))
    }

    /// A user `name` with `password` and every permission on vhost `/`.
    pub fn add_user(&self, name: &str, password: &str) {
        self.ctl(&["add_user", name, password]);
        self.ctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
    }

    /// The user a client certificate with common name `cn` logs in as
    /// with SASL EXTERNAL (what fedora-messaging does when it has a
    /// certificate and key), with every permission on `/`.
    pub fn add_cert_user(&self, cn: &str) {
        self.add_user(cn, &format!("{cn}-unused-pw"));
    }

    /// Graceful stop (`rabbitmqctl shutdown`, which waits for the VM to
    /// exit); the data stays for [`RabbitMq::start_again`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let out = self.ctl_output(&["shutdown"]);
        if !out.status.success() {
            // Not answering: the harshest stop is still a stop.
            self.kill_beam();
        }
        wait_or_kill(&mut child, Duration::from_secs(30));
        self.beam_pid = None;
    }

    /// SIGKILL of the Erlang VM: no clean shutdown (persistent messages
    /// that were confirmed survive, as on a crash).
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.kill_beam();
        wait_or_kill(&mut child, Duration::from_secs(10));
        self.beam_pid = None;
    }

    fn kill_beam(&self) {
        if let Some(pid) = self.beam_pid {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            // The VM is not our child (the script is): wait until it is gone.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the node again after [`RabbitMq::stop`] or
    /// [`RabbitMq::kill`]: same ports, same node name, same data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "node still running");
        self.spawn();
    }

    /// Stops the node and restarts it on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// `epmd -kill` for this node's epmd port (it only answers once no
    /// node is registered there, which holds after the node stopped).
    fn kill_epmd(&self) {
        let _ = Command::new(epmd_bin())
            .arg("-kill")
            .envs(self.env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The epmd port this node registers with (`ERL_EPMD_PORT`).
    pub fn epmd_port(&self) -> u16 {
        self.epmd_port
    }
}

/// Waits up to `timeout` for `child` to exit, then SIGKILLs it.
fn wait_or_kill(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn set_mode_0400(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).unwrap();
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A graceful stop is as fast as a kill here and leaves nothing
            // half-written behind; kill if it does not answer.
            self.stop();
        }
        self.kill_epmd();
    }
}
