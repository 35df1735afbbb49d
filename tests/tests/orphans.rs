//! A crashed parent leaves no children behind: after a SIGKILL of `warden
//! up` its nats-server and its tasks (with their own children) are gone
//! within seconds and the next `warden up` on the same data dir and port
//! starts; after a SIGKILL of a `warden worker` its task is gone, so the
//! re-run of the job elsewhere is never a second run at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use warden_e2e::{cli_ok, entries, eventually, free_port, process_alive, signal, Scenario, Warden};

/// `hold` writes its own pid and a background child's, then waits.
const CONFIG: &str = r#"
[tasks.hold]
command = ["sh", "-c", "sleep 300 & echo $! > \"$WARDEN_ARG_DIR/grandchild.tmp\"; mv \"$WARDEN_ARG_DIR/grandchild.tmp\" \"$WARDEN_ARG_DIR/grandchild\"; echo $$ > \"$WARDEN_ARG_DIR/task.tmp\"; mv \"$WARDEN_ARG_DIR/task.tmp\" \"$WARDEN_ARG_DIR/task\"; wait"]
"#;

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Processes whose command line has an argument containing `needle`
/// (Linux: read from /proc; elsewhere none are found).
fn pids_with_arg(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    c.split(|b| *b == 0)
                        .any(|a| String::from_utf8_lossy(a).contains(needle))
                })
                .unwrap_or(false)
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// SIGKILLs what a failed run left behind, so one failure does not leave
/// a `sleep 300` or a nats-server around.
struct Reap(Vec<u32>, Option<String>);

impl Drop for Reap {
    fn drop(&mut self) {
        let mut pids = self.0.clone();
        if let Some(needle) = &self.1 {
            pids.extend(pids_with_arg(needle));
        }
        for pid in pids.into_iter().filter(|p| process_alive(*p)) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Submits `hold` and waits until its task and the task's child run.
async fn start_hold(nats_url: &str, pids: &Path) -> (u32, u32) {
    cli_ok(
        nats_url,
        &[
            "job",
            "submit",
            "hold",
            "--arg",
            &format!("dir={}", pids.display()),
        ],
    );
    let (task, grandchild) = eventually(
        Duration::from_secs(30),
        "the task wrote its pid and its child's",
        || async {
            Some((
                read_pid(&pids.join("task"))?,
                read_pid(&pids.join("grandchild"))?,
            ))
        },
    )
    .await;
    assert!(process_alive(task), "task {task} runs");
    assert!(process_alive(grandchild), "grandchild {grandchild} runs");
    (task, grandchild)
}

async fn assert_gone(pids: &[u32], what: &str) {
    eventually(Duration::from_secs(5), what, || async {
        pids.iter().all(|p| !process_alive(*p)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_warden_up_leaves_no_nats_server_and_no_task() {
    let dir = tempfile::tempdir().unwrap();
    let pids = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf_path = dir
        .path()
        .join("data")
        .join("nats")
        .join("nats-server.conf");
    let mut reap = Reap(Vec::new(), Some(conf_path.display().to_string()));

    let mut warden = Warden::up_local(dir.path(), port, CONFIG, 1);
    let nats_url = warden.nats_url.clone();
    let (task, grandchild) = start_hold(&nats_url, pids.path()).await;
    reap.0.extend([task, grandchild]);
    if cfg!(target_os = "linux") {
        // The nats-server (and its guard, once there is one).
        assert!(
            !pids_with_arg(&conf_path.display().to_string()).is_empty(),
            "a nats-server runs with {}",
            conf_path.display()
        );
    }

    warden.kill();
    assert_gone(&[task, grandchild], "the task and its child gone").await;
    eventually(Duration::from_secs(5), "the nats-server gone", || async {
        (pids_with_arg(&conf_path.display().to_string()).is_empty()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
        .then_some(())
    })
    .await;

    // The next start on the same data dir and port comes up healthy.
    let mut again = Warden::up_local(dir.path(), port, CONFIG, 0);
    assert_eq!(again.stop(), Some(0), "{}", again.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_no_task() {
    let s = Scenario::new().config(CONFIG).up();
    let pids = tempfile::tempdir().unwrap();
    let mut reap = Reap(Vec::new(), None);

    let mut worker = s.worker("doomed");
    let (task, grandchild) = start_hold(&s.url(), pids.path()).await;
    reap.0.extend([task, grandchild]);

    worker.kill().unwrap();
    worker.wait().unwrap();
    assert_gone(&[task, grandchild], "the task and its child gone").await;
}

/// A worker frozen (SIGSTOP) cannot close its tasks' links, so their
/// guards' dead man's switch kills them within half the session timeout,
/// before the session can expire and the job be leased again; thawed,
/// the worker reports the attempt as self-fenced (a lost worker under the
/// retry policy), never as the task's crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_workers_task_is_killed_before_its_job_can_run_again() {
    let s = Scenario::new()
        .config(CONFIG)
        .config("[fencing]\nsession_timeout = \"6s\"\n[retry]\ninitial_delay = \"1s\"")
        .up();
    let pids = tempfile::tempdir().unwrap();
    let mut reap = Reap(Vec::new(), None);

    let mut worker = s.worker("frozen");
    let (task, grandchild) = start_hold(&s.url(), pids.path()).await;
    reap.0.extend([task, grandchild]);
    let pid = worker.id();
    signal(pid, "-STOP");
    let frozen = std::time::Instant::now();
    // Half the session timeout (3 s), then the guard kills: well before
    // the 6 s after which the session may expire.
    eventually(
        Duration::from_secs(6),
        "the task and its child gone while the worker is frozen",
        || async {
            [task, grandchild]
                .iter()
                .all(|p| !process_alive(*p))
                .then_some(())
        },
    )
    .await;
    let killed_after = frozen.elapsed();
    signal(pid, "-CONT");
    assert!(
        killed_after < Duration::from_secs(6),
        "killed {killed_after:?} after the freeze"
    );
    let id = s.get("/api/v1/jobs?task=hold").await["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // It goes back to the queue as a lost worker's attempt (retried), and
    // is never recorded as the task's crash.
    let job = s
        .wait_job_where(
            &id,
            "the attempt taken back",
            Duration::from_secs(30),
            |j| j["attempt"].as_u64() >= Some(2) || j["state"] == "SCHEDULED",
        )
        .await;
    assert!(
        entries(&job, "crash")
            .iter()
            .all(|e| !e["note"].as_str().is_some_and(|n| n.starts_with("unknown"))),
        "{job:#}"
    );
    assert_ne!(job["state"], "CRASHED", "{job:#}");
    worker.kill().unwrap();
    worker.wait().unwrap();
}

/// Through the guard a task's own exit code and signal reach the job, and
/// a program that cannot be started is a setup failure, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_task_ends_as_it_ended() {
    let s = Scenario::new()
        .config(CONFIG)
        .config(
            "[retry]\nretryable = []\n\
             [tasks.segv]\ncommand = [\"sh\", \"-c\", \"kill -SEGV $$\"]\n\
             [tasks.three]\ncommand = [\"sh\", \"-c\", \"exit 3\"]\n\
             [tasks.missing]\ncommand = [\"/nonexistent/warden-missing-program\"]",
        )
        .workers(1)
        .up();
    for (task, field, want) in [
        ("segv", "signal", serde_json::json!(11)),
        ("three", "exit_code", serde_json::json!(3)),
        ("missing", "detail", serde_json::json!("setup_failed")),
    ] {
        let id = s.submit(&[task]);
        let job = s.wait_job(&id, "CRASHED", Duration::from_secs(30)).await;
        let got = if field == "detail" {
            &job["detail"]
        } else {
            &job["crash"][field]
        };
        assert_eq!(got, &want, "{task}: {job:#}");
    }
}
