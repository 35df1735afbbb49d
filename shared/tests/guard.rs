//! The guard (`warden_shared::guard`) with real processes. This test
//! binary is its own guard, as `warden` and `warden-worker` are: its
//! `main` calls `run_if_requested` first, so it runs without the libtest
//! harness and prints the plain `N passed, N failed` line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Stdio};
use std::time::Duration;

use warden_shared::guard::{self, Ended, Link};
use warden_testsupport::eventually;

/// Whether `pid` runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        return !matches!(state, Some("Z") | Some("X") | None);
    }
    if std::path::Path::new("/proc/self").exists() {
        return false;
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `sh -c SCRIPT` under a guard, stdout piped.
fn sh(script: &str) -> (Child, Link) {
    let (mut cmd, link) = guard::command("sh").unwrap();
    cmd.args(["-c", script]).stdout(Stdio::piped());
    let child = cmd.spawn().unwrap();
    drop(cmd);
    assert!(link.is_guarded());
    (child, link)
}

fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

async fn gone(pids: &[u32]) {
    eventually(Duration::from_secs(5), "the processes gone", || async {
        pids.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;
}

async fn exit_code_is_passed_on() {
    let (mut child, mut link) = sh("exit 3");
    assert_eq!(child.wait().unwrap().code(), Some(3));
    assert_eq!(link.finish(), Ended::Exited(3));
}

async fn signals_are_passed_on() {
    for (sig, name) in [(15, "TERM"), (11, "SEGV"), (6, "ABRT")] {
        let (mut child, mut link) = sh(&format!("kill -{name} $$"));
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(sig), "{name}: {status}");
        assert_eq!(link.finish(), Ended::Signalled(sig), "{name}");
    }
    // Rust's runtime ignores SIGPIPE, so the guard cannot die of it: it
    // exits 128 + 13, and the link still says what happened.
    let (mut child, mut link) = sh("kill -PIPE $$");
    let status = child.wait().unwrap();
    assert!(
        status.signal() == Some(13) || status.code() == Some(141),
        "{status}"
    );
    assert_eq!(link.finish(), Ended::Signalled(13));
}

async fn args_env_cwd_and_stdout_reach_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cmd, mut link) = guard::command("sh").unwrap();
    cmd.args(["-c", "cat; echo \"$1 $FOO $(pwd)\"", "sh", "hello"])
        .env("FOO", "bar")
        .current_dir(dir.path())
        .stdout(Stdio::piped());
    let out = cmd.output().unwrap();
    drop(cmd);
    assert!(out.status.success(), "{:?}", out);
    let want = format!(
        "hello bar {}\n",
        dir.path().canonicalize().unwrap().display()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    assert_eq!(link.finish(), Ended::Exited(0));
}

async fn a_missing_program_is_not_started() {
    let (mut cmd, mut link) = guard::command("/nonexistent/warden-test-program").unwrap();
    let status = cmd.status().unwrap();
    drop(cmd);
    assert_eq!(status.code(), Some(127));
    let Ended::NotStarted(msg) = link.finish() else {
        panic!("not reported as not started")
    };
    assert!(msg.contains("warden-test-program"), "{msg}");
}

async fn dropping_the_link_kills_the_group() {
    let (mut child, link) = sh("sleep 300 & echo $!; wait");
    let grandchild: u32 = first_line(&mut child).parse().unwrap();
    assert!(alive(grandchild));
    drop(link);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");
    gone(&[grandchild]).await;
}

async fn a_parent_gone_before_the_guard_starts_starts_nothing_for_long() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cmd, link) = guard::command("sh").unwrap();
    cmd.args(["-c", "sleep 300 & echo $! > pid; wait"])
        .current_dir(dir.path());
    // The parent's end is closed before the guard even runs.
    drop(link);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");
    if let Some(pid) = std::fs::read_to_string(dir.path().join("pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        gone(&[pid]).await;
    }
}

async fn terminate_sends_sigterm_to_the_program() {
    let (mut child, mut link) = sh("trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done");
    assert_eq!(first_line(&mut child), "ready");
    link.terminate(child.id()).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(7));
    assert_eq!(link.finish(), Ended::Exited(7));
}

async fn killing_the_guards_group_kills_the_program_and_its_children() {
    let (mut child, _link) = sh("sleep 300 & echo $!; wait");
    let grandchild: u32 = first_line(&mut child).parse().unwrap();
    // What the worker does on cancel or a time limit: kill -KILL -- -pgid.
    let pgid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    gone(&[grandchild]).await;
}

/// A frozen parent (no keep-alive within the limit): the guard says
/// `fenced` and kills the program and what it started, though the parent
/// still holds the link.
async fn a_silent_parent_gets_its_program_killed_by_the_dead_mans_switch() {
    let (mut cmd, mut link) = guard::watched_command("sh", Duration::from_millis(300)).unwrap();
    cmd.args(["-c", "sleep 300 & echo $!; wait"])
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let grandchild: u32 = first_line(&mut child).parse().unwrap();
    let started = std::time::Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(link.finish(), Ended::Fenced);
    gone(&[grandchild]).await;
}

/// Keep-alives within the limit: the program runs to its end.
async fn keep_alives_keep_the_program_running() {
    let (mut cmd, mut link) = guard::watched_command("sh", Duration::from_millis(300)).unwrap();
    cmd.args(["-c", "sleep 1; exit 5"]);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    // A keep-alive every 50 ms (the limit is 300 ms) until it ends.
    let mut every = tokio::time::interval(Duration::from_millis(50));
    let status = loop {
        every.tick().await;
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        link.keep_alive().unwrap();
    };
    assert_eq!(status.code(), Some(5), "{status}");
    assert_eq!(link.finish(), Ended::Exited(5));
}

fn main() {
    guard::run_if_requested();
    assert!(guard::enabled());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    macro_rules! cases {
        ($($f:ident),* $(,)?) => { vec![$((stringify!($f), Box::pin($f()) as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>)),*] };
    }
    let cases = cases![
        exit_code_is_passed_on,
        signals_are_passed_on,
        args_env_cwd_and_stdout_reach_the_program,
        a_missing_program_is_not_started,
        dropping_the_link_kills_the_group,
        a_parent_gone_before_the_guard_starts_starts_nothing_for_long,
        terminate_sends_sigterm_to_the_program,
        killing_the_guards_group_kills_the_program_and_its_children,
        a_silent_parent_gets_its_program_killed_by_the_dead_mans_switch,
        keep_alives_keep_the_program_running,
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(case)));
        match result {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
