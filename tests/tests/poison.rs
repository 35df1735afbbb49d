//! A poison job: its task SIGKILLs the worker that runs it, every time.
//! After it has taken down two distinct workers it is SHELVED with blame
//! `task`, detail `worker_crash_loop`, and never dispatched again; the
//! surviving worker keeps serving other jobs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::Scenario;

const CONFIG: &str = r#"
[fencing]
session_timeout = "1s"

[worker]
capacity = 1

[retry]
initial_delay = "200ms"
jitter = 0.0
max_attempts = 10

# The task runs under its guard, whose parent is the worker: field 4 of
# /proc/<guard>/stat is the worker's pid.
[tasks.poison]
command = ["sh", "-c", "kill -9 \"$(cut -d' ' -f4 /proc/$PPID/stat)\"; sleep 2"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_job_is_shelved_after_two_workers_and_the_rest_keep_working() {
    let s = Scenario::new().config(CONFIG).up();
    let bots = ["bot-a", "bot-b", "bot-c"];
    let mut workers: Vec<_> = bots.iter().map(|b| s.worker(b)).collect();

    let id = s.submit(&["poison"]);
    let job = s.wait_job(&id, "SHELVED", Duration::from_secs(60)).await;
    assert_eq!(job["blame"], "task", "{job:#}");
    assert_eq!(job["detail"], "worker_crash_loop");
    assert_eq!(
        job["attempt"], 2,
        "shelved after the second lost worker: {job:#}"
    );
    let lost: Vec<String> = job["lost_workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    assert_eq!(lost.len(), 2, "{job:#}");
    assert!(job["description"]
        .as_str()
        .unwrap()
        .contains("2 distinct workers"));

    // Exactly the two workers it ran on are dead.
    let mut alive = Vec::new();
    for (bot, w) in bots.iter().zip(workers.iter_mut()) {
        if w.try_wait().unwrap().is_none() {
            alive.push(bot.to_string());
        }
    }
    assert_eq!(alive.len(), 1, "alive: {alive:?}, lost: {lost:?}");
    assert!(!lost.contains(&alive[0]));

    // The survivor serves other jobs; the shelved job stays shelved.
    for _ in 0..3 {
        s.assert_noop_passes();
    }
    let still = s.job(&id).await;
    assert_eq!(still["state"], "SHELVED");
    assert_eq!(still["attempt"], 2, "never dispatched again");

    let metrics = s.metrics().await;
    assert!(
        metrics.contains("warden_scheduler_shelved_total{reason=\"worker_crash_loop\"} 1"),
        "{metrics}"
    );
}
