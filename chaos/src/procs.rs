//! Processes restarted when they die, as systemd's `Restart=on-failure`
//! does for `warden@.service`: a service replica or worker that exits
//! without being told to is counted as an unplanned exit and started again
//! after `RESTART_SEC`. A planned kill holds the process down until the
//! fault injector releases it.
//!
//! Each runs under a guard (`warden_shared::guard`) when the runner can
//! be one (`warden chaos`), so nothing outlives a runner that is killed;
//! signals then go to the guard's process group (the process and its
//! guard; a worker's tasks run in groups of their own, so freezing a
//! worker does not freeze its tasks, as with a real SIGSTOP).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use warden_shared::guard::Link;

/// systemd's `RestartSec=2s` in `deploy/systemd/warden@.service`.
pub const RESTART_SEC: Duration = Duration::from_secs(2);

/// Sends `sig` to process `pid`; a process that is gone is no error.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Sends `sig` to what was spawned as `pid`: its guard's whole group when
/// guarded, else the process.
pub fn signal_spawned(pid: u32, guarded: bool, sig: rustix::process::Signal) {
    match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) if guarded => {
            let _ = rustix::process::kill_process_group(p, sig);
        }
        Some(p) => {
            let _ = rustix::process::kill_process(p, sig);
        }
        None => {}
    }
}

/// How to start one process.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr go here (appended across restarts).
    pub log: PathBuf,
}

/// An exit nobody asked for.
#[derive(Debug, Clone)]
pub struct Exit {
    pub name: String,
    pub status: String,
    /// Killed by SIGKILL from outside the runner (a poison task).
    pub sigkill: bool,
}

#[derive(Default)]
struct State {
    pid: Option<u32>,
    /// The pid is a guard's, leading the process's group.
    guarded: bool,
    /// The runner killed it: not an unplanned exit.
    planned: bool,
    /// Held down until released.
    held: bool,
    stopped: bool,
    starts: u32,
    exits: Vec<Exit>,
}

#[derive(Clone)]
pub struct Supervised {
    spec: Arc<Spec>,
    state: Arc<Mutex<State>>,
    released: Arc<Notify>,
}

impl Supervised {
    /// Starts `spec` and keeps it running until `shutdown`, then SIGTERMs
    /// it and waits (at most `stop_grace`, then SIGKILL).
    pub fn start(spec: Spec, shutdown: CancellationToken, stop_grace: Duration) -> Supervised {
        let s = Supervised {
            spec: Arc::new(spec),
            state: Arc::new(Mutex::new(State::default())),
            released: Arc::new(Notify::new()),
        };
        let me = s.clone();
        tokio::spawn(async move { me.supervise(shutdown, stop_grace).await });
        s
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.state().pid
    }

    pub fn starts(&self) -> u32 {
        self.state().starts
    }

    pub fn exits(&self) -> Vec<Exit> {
        self.state().exits.clone()
    }

    /// SIGKILL, held down until [`Supervised::release`].
    pub fn kill(&self) {
        let (pid, guarded) = {
            let mut st = self.state();
            st.planned = true;
            st.held = true;
            (st.pid, st.guarded)
        };
        if let Some(pid) = pid {
            signal_spawned(pid, guarded, rustix::process::Signal::KILL);
        }
    }

    /// Lets a killed process start again.
    pub fn release(&self) {
        self.state().held = false;
        self.released.notify_one();
    }

    pub fn pause(&self) {
        let (pid, guarded) = {
            let mut st = self.state();
            st.stopped = true;
            (st.pid, st.guarded)
        };
        if let Some(pid) = pid {
            signal_spawned(pid, guarded, rustix::process::Signal::STOP);
        }
    }

    pub fn resume(&self) {
        let (pid, guarded) = {
            let mut st = self.state();
            st.stopped = false;
            (st.pid, st.guarded)
        };
        if let Some(pid) = pid {
            signal_spawned(pid, guarded, rustix::process::Signal::CONT);
        }
    }

    async fn supervise(self, shutdown: CancellationToken, stop_grace: Duration) {
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let held = self.state().held;
            if held {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.released.notified() => {}
                }
                continue;
            }
            let (mut child, mut link) = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(process = %self.spec.name, error = %e, "cannot start");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RESTART_SEC) => continue,
                    }
                }
            };
            let pid = child.id();
            let guarded = link.is_guarded();
            {
                let mut st = self.state();
                st.pid = pid;
                st.guarded = guarded;
                st.starts += 1;
            }
            let status = tokio::select! {
                s = child.wait() => s,
                _ = shutdown.cancelled() => {
                    if let Some(pid) = pid {
                        // A paused process must run to see the SIGTERM.
                        signal_spawned(pid, guarded, rustix::process::Signal::CONT);
                        let _ = link.terminate(pid);
                    }
                    if tokio::time::timeout(stop_grace, child.wait()).await.is_err() {
                        tracing::warn!(process = %self.spec.name, "did not stop within the grace period; killing");
                        if let Some(pid) = pid {
                            signal_spawned(pid, guarded, rustix::process::Signal::KILL);
                        }
                        let _ = child.kill().await;
                    }
                    self.state().pid = None;
                    return;
                }
            };
            drop(link);
            let planned = {
                let mut st = self.state();
                st.pid = None;
                std::mem::take(&mut st.planned)
            };
            if planned {
                continue;
            }
            let (text, sigkill) = match &status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    (s.to_string(), s.signal() == Some(9))
                }
                Err(e) => (format!("cannot wait: {e}"), false),
            };
            tracing::warn!(process = %self.spec.name, status = %text, "exited unplanned; restarting");
            self.state().exits.push(Exit {
                name: self.spec.name.clone(),
                status: text,
                sigkill,
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RESTART_SEC) => {}
            }
        }
    }

    fn spawn(&self) -> std::io::Result<(tokio::process::Child, Link)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)?;
        let log2 = log.try_clone()?;
        let (cmd, link) = warden_shared::guard::command(&self.spec.program)?;
        let mut cmd = Command::from(cmd);
        cmd.args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(!link.is_guarded());
        let child = cmd.spawn()?;
        // It holds the guard's end of the link.
        drop(cmd);
        Ok((child, link))
    }
}
