//! Children that die with their parent, on Linux and macOS, without
//! `unsafe` and without signal handlers.
//!
//! A Warden process never spawns a long-lived child (a task, `warden up`'s
//! nats-server) directly: it spawns a *guard*, its own executable run as
//! `warden-guard __warden-guard -- PROGRAM ARGS...`, which starts the
//! program and watches its parent:
//!
//! - the guard is the leader of its own process group (the command from
//!   [`command`] spawns it with `process_group(0)`) and starts the program
//!   in that group, stdin null;
//! - the guard's stdin is one end of a socket pair whose other end, the
//!   [`Link`], only the parent holds (close-on-exec, so no other child
//!   inherits it). When the parent dies, however it dies (SIGKILL, OOM
//!   kill, a crash), or drops the `Link`, the guard reads end-of-file and
//!   SIGKILLs its whole process group: the program, whatever the program
//!   started in its group, and itself. A parent already gone when the
//!   guard starts is an end-of-file at once;
//! - otherwise the guard waits for the program and ends the same way: the
//!   same exit code, or the same signal raised on itself (with core dumps
//!   off, so one crash makes one core; raised twice, since Rust's runtime
//!   catches the first SIGSEGV or SIGBUS and then restores the default),
//!   falling back to exit 128 + signal when the signal cannot end it
//!   (SIGPIPE, which Rust's runtime ignores).
//!   It also writes how the program ended on the link, so [`Link::finish`]
//!   gives the parent the exact status, and a program that could not be
//!   started at all is told apart from one that exited 127;
//! - the parent asks for a graceful stop by writing `t` on the link
//!   ([`Link::terminate`]): the guard sends the program SIGTERM;
//! - a dead man's switch, for children that must not outlive a parent
//!   that is alive but frozen (SIGSTOP, swapping): started with
//!   [`watched_command`], the guard expects a keep-alive byte
//!   ([`Link::keep_alive`]) within the silence limit, and when none comes
//!   it reports `fenced` on the link and SIGKILLs its group. A worker
//!   uses it so a task never outlives its lease: the limit is shorter
//!   than the time after which the fencing service expires a silent
//!   session, so the task is dead before its job can be leased again.
//!
//! A process that never called [`run_if_requested`] (a library user, a
//! test harness) spawns the program itself, unguarded.
//!
//! What escapes: a process that leaves the group (`setsid`, `setpgid`), as
//! with any process-group kill.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The hidden first argument that makes a Warden binary a guard.
pub const MARKER: &str = "__warden-guard";

/// The guard's option for its dead man's switch, in milliseconds.
const SILENCE_FLAG: &str = "--silence-ms";

/// The executable to run as a guard; set by [`run_if_requested`].
static GUARD_EXE: OnceLock<PathBuf> = OnceLock::new();

/// How long [`Link::finish`] waits for the guard's last words.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Call first thing in `main` of every binary that spawns guarded
/// children, before any runtime or thread is started. With [`MARKER`] as
/// the first argument this process *is* a guard: it runs the program and
/// exits as the program did, never returning. Otherwise it records that
/// [`command`] may use this executable as a guard.
pub fn run_if_requested() {
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    if args.next().as_deref() == Some(OsStr::new(MARKER)) {
        imp::guard_main(args.collect());
    }
    if let Some(exe) = own_exe() {
        let _ = GUARD_EXE.set(exe);
    }
}

/// Whether [`command`] spawns a guard (this process called
/// [`run_if_requested`], on a Unix).
pub fn enabled() -> bool {
    cfg!(unix) && GUARD_EXE.get().is_some()
}

/// On Linux `/proc/self/exe` is still this executable after a package
/// upgrade replaced or removed the file on disk; elsewhere, its path.
fn own_exe() -> Option<PathBuf> {
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && proc_exe.exists() {
        return Some(proc_exe.to_path_buf());
    }
    std::env::current_exe().ok()
}

/// How the guarded program ended, as its guard reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signalled(i32),
    /// Could not be started (the program is missing, not executable, …).
    NotStarted(String),
    /// The guard's dead man's switch fired: the parent sent no keep-alive
    /// within the silence limit, so the guard killed the group.
    Fenced,
    /// The guard said nothing: it was killed (SIGKILL of the group by the
    /// parent, a time limit), or the command ran unguarded. The exit
    /// status of the spawned process is then the answer.
    Unknown,
}

/// A command that runs `program` under a guard when guarding is enabled,
/// else `program` itself. Set args, env, cwd, stdout and stderr on it as
/// usual: they reach the program (the guard passes its own on). Leave
/// stdin alone: it is the guard's link; the program's stdin is null.
/// The guarded command is spawned in a new process group led by the
/// guard (`process_group(0)`), so killing that group kills the program
/// and everything it started.
///
/// Keep the returned [`Link`] for as long as the child may run, and drop
/// the `Command` once it is spawned (it holds the guard's end of the
/// link). Dropping the `Link` kills the guarded group.
pub fn command(program: impl AsRef<OsStr>) -> io::Result<(Command, Link)> {
    imp::command(program.as_ref(), None)
}

/// Like [`command`], with the dead man's switch: the guard kills the
/// group when the parent writes no [`Link::keep_alive`] for `silence`
/// (rounded up to whole milliseconds, at least one), and [`Link::finish`]
/// then says [`Ended::Fenced`].
pub fn watched_command(
    program: impl AsRef<OsStr>,
    silence: Duration,
) -> io::Result<(Command, Link)> {
    imp::command(program.as_ref(), Some(silence))
}

/// The parent's end of a guard's link. See [`command`].
#[derive(Debug)]
pub struct Link {
    stream: Option<imp::Stream>,
}

impl Link {
    /// Whether a guard is at the other end.
    pub fn is_guarded(&self) -> bool {
        self.stream.is_some()
    }

    /// Asks for a graceful stop: the guard sends the program SIGTERM;
    /// unguarded, `pid` (the spawned program) gets it directly.
    pub fn terminate(&mut self, pid: u32) -> io::Result<()> {
        match &mut self.stream {
            Some(s) => s.write_all(b"t"),
            None => imp::sigterm(pid),
        }
    }

    /// Tells a watching guard that the parent is alive. Call it well
    /// within the silence limit given to [`watched_command`].
    pub fn keep_alive(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Some(s) => s.write_all(b"k"),
            None => Ok(()),
        }
    }

    /// After the spawned process has exited: how the program ended, as
    /// the guard reported it. Blocks (briefly) until the guard's end of
    /// the link is closed.
    pub fn finish(&mut self) -> Ended {
        let Some(s) = self.stream.as_mut() else {
            return Ended::Unknown;
        };
        let _ = s.set_read_timeout(Some(FINISH_TIMEOUT));
        let mut text = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        parse_reports(&String::from_utf8_lossy(&text))
    }
}

/// The guard's reports, one a line: `started PID`, then `exit CODE` or
/// `signal N`; or `failed MESSAGE` alone. The last word decides.
fn parse_reports(text: &str) -> Ended {
    let mut ended = Ended::Unknown;
    for line in text.lines() {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        ended = match (word, rest.trim().parse::<i32>()) {
            ("exit", Ok(code)) => Ended::Exited(code),
            ("signal", Ok(sig)) => Ended::Signalled(sig),
            ("failed", _) => Ended::NotStarted(rest.to_string()),
            ("fenced", _) => Ended::Fenced,
            _ => continue,
        };
    }
    ended
}

fn report_line(ended: &Ended) -> String {
    match ended {
        Ended::Exited(code) => format!("exit {code}\n"),
        Ended::Signalled(sig) => format!("signal {sig}\n"),
        Ended::NotStarted(msg) => format!("failed {}\n", msg.replace('\n', " ")),
        Ended::Fenced => "fenced\n".to_string(),
        Ended::Unknown => String::new(),
    }
}

#[cfg(unix)]
mod imp {
    use std::ffi::{OsStr, OsString};
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};

    use rustix::process::{Pid, Signal};

    use std::time::Duration;

    use super::{report_line, Ended, Link, GUARD_EXE, MARKER, SILENCE_FLAG};

    pub type Stream = UnixStream;

    pub fn command(program: &OsStr, silence: Option<Duration>) -> io::Result<(Command, Link)> {
        let Some(exe) = GUARD_EXE.get() else {
            let mut cmd = Command::new(program);
            cmd.stdin(Stdio::null());
            return Ok((cmd, Link { stream: None }));
        };
        let (ours, theirs) = UnixStream::pair()?;
        let mut cmd = Command::new(exe);
        cmd.arg0("warden-guard").arg(MARKER);
        if let Some(limit) = silence {
            let ms = limit.as_nanos().div_ceil(1_000_000).max(1);
            cmd.arg(SILENCE_FLAG).arg(ms.to_string());
        }
        cmd.arg("--")
            .arg(program)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .process_group(0);
        Ok((cmd, Link { stream: Some(ours) }))
    }

    pub fn sigterm(pid: u32) -> io::Result<()> {
        let pid = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        rustix::process::kill_process(pid, Signal::TERM).map_err(io::Error::from)
    }

    /// What the link watcher and the waiter share.
    #[derive(Default)]
    struct State {
        /// The program, once started.
        pid: Option<Pid>,
        /// The program has exited (it may be a zombie, not yet reaped, so
        /// its pid is still its own while this is false).
        exited: bool,
        /// A stop was asked for before the program started.
        terminate: bool,
    }

    /// SIGKILL this process's group: the program, what it started, and
    /// the guard.
    fn kill_group() -> ! {
        let _ = rustix::process::kill_current_process_group(Signal::KILL);
        std::process::exit(128 + 9)
    }

    /// Tells the parent; false if it could not be told.
    fn send(link: &mut Option<File>, ended: &Ended) -> bool {
        link.as_mut()
            .is_some_and(|l| l.write_all(report_line(ended).as_bytes()).is_ok())
    }

    pub fn guard_main(args: Vec<OsString>) -> ! {
        let mut args = args.into_iter().peekable();
        let mut silence = None;
        if args.peek().map(OsString::as_os_str) == Some(OsStr::new(SILENCE_FLAG)) {
            let _ = args.next();
            match args
                .next()
                .and_then(|v| v.to_str().and_then(|v| v.parse::<u64>().ok()))
            {
                Some(ms) if ms > 0 => silence = Some(Duration::from_millis(ms)),
                _ => {
                    eprintln!("warden-guard: {SILENCE_FLAG} needs milliseconds > 0");
                    std::process::exit(2);
                }
            }
        }
        if args.next().as_deref() != Some(OsStr::new("--")) {
            eprintln!("warden-guard: usage: {MARKER} -- PROGRAM [ARGS...]");
            std::process::exit(2);
        }
        let Some(program) = args.next() else {
            eprintln!("warden-guard: no program given");
            std::process::exit(2);
        };
        // Never kill the parent's group: lead one of our own (the command
        // from `command()` already made it so).
        if rustix::process::getpgrp() != rustix::process::getpid() {
            let _ = rustix::process::setpgid(None, None);
        }
        let link = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(File::from);
        let state = Arc::new(Mutex::new(State::default()));
        if let Some(mut watch) = link
            .as_ref()
            .and_then(|l| l.try_clone().ok())
            .map(|f| UnixStream::from(OwnedFd::from(f)))
        {
            let state = state.clone();
            let mut fenced_link = link.as_ref().and_then(|l| l.try_clone().ok());
            if silence.is_some() && watch.set_read_timeout(silence).is_err() {
                eprintln!("warden-guard: stdin is not a socket; no dead man's switch");
            }
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match watch.read(&mut buf) {
                        Ok(0) => kill_group(),
                        // No keep-alive within the limit: the parent is
                        // frozen. Say so (it reads it when it runs
                        // again), then kill.
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            send(&mut fenced_link, &Ended::Fenced);
                            kill_group()
                        }
                        Ok(n) => {
                            if buf[..n].contains(&b't') {
                                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                                match s.pid {
                                    Some(pid) if !s.exited => {
                                        let _ = rustix::process::kill_process(pid, Signal::TERM);
                                    }
                                    Some(_) => {}
                                    None => s.terminate = true,
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => kill_group(),
                    }
                }
            });
        } else {
            // No link to watch: nothing could tell us the parent died.
            eprintln!("warden-guard: stdin is not a link to the parent");
            std::process::exit(2);
        }
        let mut link = link;
        let mut child = match Command::new(&program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("cannot start {program:?}: {e}");
                if !send(&mut link, &Ended::NotStarted(msg.clone())) {
                    eprintln!("warden-guard: {msg}");
                }
                std::process::exit(127);
            }
        };
        let pid = Pid::from_child(&child);
        {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.pid = Some(pid);
            if s.terminate {
                let _ = rustix::process::kill_process(pid, Signal::TERM);
            }
        }
        if let Some(l) = link.as_mut() {
            let _ = l.write_all(format!("started {}\n", child.id()).as_bytes());
        }
        // Wait without reaping, so the pid cannot be reused while the
        // watcher may still signal it; then mark it exited and reap.
        while let Err(rustix::io::Errno::INTR) = rustix::process::waitid(
            rustix::process::WaitId::Pid(pid),
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
        ) {}
        state.lock().unwrap_or_else(|p| p.into_inner()).exited = true;
        let status = match child.wait() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warden-guard: cannot wait for {program:?}: {e}");
                std::process::exit(1);
            }
        };
        if let Some(code) = status.code() {
            send(&mut link, &Ended::Exited(code));
            std::process::exit(code);
        }
        let sig = status.signal().unwrap_or(9);
        send(&mut link, &Ended::Signalled(sig));
        if let Some(signal) = Signal::from_named_raw(sig) {
            // One crash, one core: the program's.
            let _ = rustix::process::setrlimit(
                rustix::process::Resource::Core,
                rustix::process::Rlimit {
                    current: Some(0),
                    maximum: None,
                },
            );
            // Twice: Rust's runtime catches SIGSEGV and SIGBUS (to report
            // stack overflows); its handler, seeing no stack overflow,
            // restores the default action, and the second one ends us.
            for _ in 0..2 {
                let _ = rustix::process::kill_process(rustix::process::getpid(), signal);
            }
        }
        std::process::exit(128 + sig)
    }
}

#[cfg(not(unix))]
mod imp {
    use std::ffi::{OsStr, OsString};
    use std::io;
    use std::process::{Command, Stdio};

    use super::Link;

    /// Never constructed: there is no guard off Unix.
    #[derive(Debug)]
    pub enum Stream {}

    impl Stream {
        pub fn write_all(&mut self, _: &[u8]) -> io::Result<()> {
            match *self {}
        }
        pub fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            match *self {}
        }
        pub fn set_read_timeout(&self, _: Option<std::time::Duration>) -> io::Result<()> {
            match *self {}
        }
    }

    pub fn command(
        program: &OsStr,
        _silence: Option<std::time::Duration>,
    ) -> io::Result<(Command, Link)> {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        Ok((cmd, Link { stream: None }))
    }

    pub fn sigterm(_pid: u32) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub fn guard_main(_args: Vec<OsString>) -> ! {
        eprintln!("warden-guard: not supported on this platform");
        std::process::exit(2)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_last_report_decides() {
        assert_eq!(parse_reports(""), Ended::Unknown);
        assert_eq!(parse_reports("started 12\n"), Ended::Unknown);
        assert_eq!(parse_reports("started 12\nexit 3\n"), Ended::Exited(3));
        assert_eq!(
            parse_reports("started 12\nsignal 11\n"),
            Ended::Signalled(11)
        );
        assert_eq!(
            parse_reports("failed cannot start \"x\": No such file\n"),
            Ended::NotStarted("cannot start \"x\": No such file".into())
        );
        // A truncated last line is not a report.
        assert_eq!(parse_reports("started 12\nexi"), Ended::Unknown);
    }

    #[test]
    fn reports_round_trip() {
        for e in [
            Ended::Exited(0),
            Ended::Exited(255),
            Ended::Signalled(15),
            Ended::NotStarted("cannot start: two\nlines".into()),
            Ended::Fenced,
        ] {
            let back = parse_reports(&report_line(&e));
            match (&e, &back) {
                (Ended::NotStarted(_), Ended::NotStarted(m)) => assert!(!m.contains('\n')),
                _ => assert_eq!(back, e),
            }
        }
    }

    #[test]
    fn unguarded_without_run_if_requested() {
        // A test harness never called run_if_requested.
        assert!(!enabled());
        let (mut cmd, mut link) = command("sh").unwrap();
        assert!(!link.is_guarded());
        let status = cmd.args(["-c", "exit 4"]).status().unwrap();
        assert_eq!(status.code(), Some(4));
        assert_eq!(link.finish(), Ended::Unknown);
    }
}
