//! A real PostgreSQL server per test, from Debian's `postgresql` package:
//! its own cluster (`initdb` into a temporary directory), on a free
//! loopback port, no Unix socket, trust authentication for the `warden`
//! user on loopback only; stopped (fast shutdown) and removed on drop.
//! [`Postgres::stop`] and [`Postgres::start_again`] keep the port and the
//! data, so a client finds the same database at the same URL.
//!
//! The binaries are `$WARDEN_POSTGRES_BIN` (a directory), else the newest
//! `/usr/lib/postgresql/*/bin`. PostgreSQL refuses to run as root: as root
//! the server runs as the package's `postgres` user (`setpriv`, which
//! execs, so the child is the server itself).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `initdb` and `postgres` are.
pub fn postgres_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WARDEN_POSTGRES_BIN") {
        return PathBuf::from(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` run as the server's user.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// A new cluster, started and accepting connections.
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("warden-pg-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&data)
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot chown {data:?} to postgres");
        }
        let bin = postgres_bin_dir();
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "warden", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run initdb in {bin:?}: {e} (install Debian's postgresql: scripts/ensure-tools)")
            });
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            dir,
            port: 0,
            child: None,
        };
        // The port is picked before the server binds it: another process
        // may take it in between, so a failed start tries another.
        for _ in 0..5 {
            pg.port = crate::free_port();
            if pg.spawn() {
                return pg;
            }
        }
        panic!(
            "postgres did not start; log:\n{}",
            std::fs::read_to_string(pg.log_path()).unwrap_or_default()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the server on `self.port`; false if it exited instead.
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = as_server_user(&postgres_bin_dir().join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=100",
                "-c",
                "shared_buffers=64MB",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.ready() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Whether the server accepts queries (`pg_isready`).
    fn ready(&self) -> bool {
        Command::new(postgres_bin_dir().join("pg_isready"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "warden",
                "-q",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `postgres://warden@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://warden@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast shutdown (SIGINT: sessions are cut, committed data kept); the
    /// data stays for [`Postgres::start_again`].
    pub fn stop(&mut self) {
        self.signal_and_wait("-INT");
    }

    /// SIGKILL: a crash; the next start recovers from the WAL.
    pub fn kill(&mut self) {
        self.signal_and_wait("-KILL");
    }

    fn signal_and_wait(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        if signal == "-KILL" {
            // The backends outlive a SIGKILLed postmaster briefly; the
            // next start waits for the port to be free.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the server again on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "postgres still running");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "postgres did not start again; log:\n{}",
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
