//! Resource health with real processes (docs/design.md "Resources and health";
//! Drydock's rule: check after failure).
//!
//! - The Drydock case: a task deletes the marker its working copy's check
//!   needs and crashes; the working copy turns suspicious, gets no lease,
//!   fails its check, is closed and recycled (the recycle hook runs); the
//!   job finishes on another host. A crash for an unrelated reason on a
//!   healthy host leaves it open after its check.
//! - A host vanishes (SIGKILL of its agent): host and working copy are
//!   broken and closed after the heartbeat timeout, its jobs finish on
//!   another host.
//! - The only resource of a pool is suspicious while its check runs: that
//!   pool's jobs wait (and the metric says so), other pools keep flowing,
//!   and the waiting jobs run once the check passes.
//! - Closed by hand while a job runs there: the job is requeued at once,
//!   the attempt not counted, and finishes on another host.
//! - An agent stopped (SIGSTOP) past its session timeout: its host
//!   vanished and was closed; continued, it is checked on the same agent
//!   process, stays out while its check fails, and opens as a new
//!   incarnation that takes the queue's jobs once the check passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use warden_e2e::{
    cli_ok, eventually, get_json, job, never_within, sample, signal, submit, wait_job, warden_bin,
    Proc, Scenario, Warden,
};

const BASE: &str = r#"
[fencing]
session_timeout = "2s"

[retry]
initial_delay = "500ms"
jitter = 0.0

[health]
check_timeout = "30s"

[[health.checks.workcopy]]
name = "checkout"
command = ["test", "-f", "{path}/.git-ok"]

# First attempt: wreck the working copy (as a test that deletes .git
# would), then fail the way the next checkout there would.
[tasks.mangle]
command = ["sh", "-c", "if [ \"$WARDEN_ATTEMPT\" = 1 ]; then rm -f \"$WARDEN_RESOURCE_WORKCOPY/.git-ok\"; echo 'fatal: not a git repository (or any of the parent directories): .git' >&2; exit 128; fi; echo built"]

# Looks like the host's fault, is not.
[tasks.diskfull]
command = ["sh", "-c", "echo 'cp: error writing out/app.bin: No space left on device' >&2; exit 2"]

[tasks.sleepy]
command = ["sh", "-c", "if [ \"$WARDEN_ATTEMPT\" = 1 ]; then exec sleep 60; fi; echo done"]

[tasks.solo-diskfull]
command = ["sh", "-c", "echo 'write error: No space left on device' >&2; exit 2"]
pool = "solo"
"#;

/// A worker's config: BASE plus its host, pools, work dir and (optional)
/// working copy with the marker its check wants.
fn worker_conf(dir: &Path, bot: &str, host: &str, pools: &[&str], extra: &str) -> PathBuf {
    let work = dir.join(format!("{bot}-work"));
    std::fs::create_dir_all(&work).unwrap();
    let pools: Vec<String> = pools.iter().map(|p| format!("{p:?}")).collect();
    let text = format!(
        "{BASE}{extra}\n[worker]\nresource = {host:?}\npools = [{}]\nwork_dir = {:?}\ncapacity = 2\n",
        pools.join(", "),
        work.display().to_string(),
    );
    let conf = dir.join(format!("{bot}.toml"));
    std::fs::write(&conf, text).unwrap();
    conf
}

fn with_checkout(dir: &Path, bot: &str, host: &str, pools: &[&str], extra: &str) -> PathBuf {
    let wc = dir.join(format!("{bot}-checkout"));
    std::fs::create_dir_all(&wc).unwrap();
    std::fs::write(wc.join(".git-ok"), "").unwrap();
    let conf = worker_conf(dir, bot, host, pools, extra);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!(
        "\n[[worker.resources]]\nname = \"{host}/checkout\"\nkind = \"workcopy\"\npath = {:?}\n",
        wc.display().to_string()
    ));
    std::fs::write(&conf, text).unwrap();
    conf
}

async fn resource(w: &Warden, name: &str) -> Option<serde_json::Value> {
    let all = get_json(&w.url("/api/v1/resources")).await;
    all["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
}

async fn wait_resource(w: &Warden, name: &str, state: &str, secs: u64) -> serde_json::Value {
    eventually(
        Duration::from_secs(secs),
        &format!("{name} {state}"),
        || async { resource(w, name).await.filter(|r| r["state"] == state) },
    )
    .await
}

/// The states a resource went through, oldest first.
fn states(r: &serde_json::Value) -> Vec<String> {
    r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["to"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drydock_mangled_working_copy_is_checked_closed_and_recycled() {
    let s = Scenario::new().config(BASE).up();
    let (url, warden, dir) = (s.url(), &s.warden, s.dir());
    // The provisioner's hook, as deploy/systemd runs it.
    let recycled = dir.join("recycled.txt");
    let hook = Command::new(warden_bin())
        .args(["recycle-hook", "--nats-url", &url, "--", "sh", "-c"])
        .arg(format!(
            "echo \"$WARDEN_RESOURCE $WARDEN_RESOURCE_KIND $WARDEN_RECYCLE_REASON\" >> {}",
            recycled.display()
        ))
        .env("WARDEN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conf_a = with_checkout(dir, "bot-a", "host-a", &["default"], "");
    let conf_b = with_checkout(dir, "bot-b", "host-b", &["default"], "");
    let mut procs = vec![Proc(hook), s.worker_with(&conf_a, "bot-a")];

    let wc = wait_resource(warden, "host-a/checkout", "open", 30).await;
    assert_eq!(wc["kind"], "workcopy");
    assert_eq!(wc["depends_on"], "host-a");
    let host = resource(warden, "host-a").await.unwrap();
    assert_eq!(host["dependents"], serde_json::json!(["host-a/checkout"]));
    assert_eq!(host["sessions"][0]["bot_id"], "bot-a");

    let id = submit(&url, &["mangle"]);
    // The crash is system/setup_failed (retryable): the retry waits for a
    // healthy resource. The mangled working copy fails its check and is
    // closed; its host passes its own and stays usable.
    let wc = wait_resource(warden, "host-a/checkout", "closed", 30).await;
    assert_eq!(
        states(&wc),
        ["open", "suspicious", "broken", "closed"],
        "{wc}"
    );
    let last = &wc["checks"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["result"], "failed", "{wc}");
    assert!(
        last["summary"]
            .as_str()
            .unwrap()
            .contains("checkout: test -f"),
        "{wc}"
    );
    assert!(
        wc["reason"].as_str().unwrap().contains("check_failed"),
        "{wc}"
    );
    let host = wait_resource(warden, "host-a", "open", 30).await;
    assert_eq!(
        host["checks"].as_array().unwrap().last().unwrap()["result"],
        "passed",
        "{host}"
    );

    // No further lease goes to host-a: bot-a is idle and asking, yet the
    // job, due long since, stays waiting.
    never_within(Duration::from_secs(3), "the job leased again", || async {
        let j = job(warden, &id).await;
        (j["state"] != "SCHEDULED" || j["attempt"] != 1).then_some(j)
    })
    .await;
    let waiting = job(warden, &id).await;
    assert_eq!(waiting["state"], "SCHEDULED", "{waiting}");
    assert_eq!(waiting["attempt"], 1, "{waiting}");
    assert_eq!(waiting["detail"], "setup_failed", "{waiting}");

    procs.push(s.worker_with(&conf_b, "bot-b"));
    let done = wait_job(warden, &id, "FINISHED", Duration::from_secs(60)).await;
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(done["lease"]["bot_id"], "bot-b", "{done}");
    assert_eq!(
        done["lease"]["resources"],
        serde_json::json!(["host-b", "host-b/checkout"])
    );

    // The recycle event reached the hook, once.
    let lines = eventually(Duration::from_secs(20), "recycle hook ran", || async {
        std::fs::read_to_string(&recycled)
            .ok()
            .filter(|t| !t.is_empty())
    })
    .await;
    assert_eq!(lines.trim(), "host-a/checkout workcopy check_failed");

    // An unrelated failure on a healthy host: both of its resources are
    // suspected, checked, and open again; work still goes there.
    let crash = submit(&url, &["diskfull"]);
    let crashed = wait_job(warden, &crash, "CRASHED", Duration::from_secs(60)).await;
    assert_eq!(crashed["detail"], "disk_full", "{crashed}");
    for name in ["host-b", "host-b/checkout"] {
        let r = eventually(Duration::from_secs(30), "checked and open", || async {
            resource(warden, name)
                .await
                .filter(|r| r["state"] == "open" && !r["checks"].as_array().unwrap().is_empty())
        })
        .await;
        assert_eq!(states(&r), ["open", "suspicious", "open"], "{r}");
        assert!(
            r["reason"].as_str().unwrap().starts_with("check passed"),
            "{r}"
        );
    }
    let after = submit(&url, &["noop"]);
    let after = wait_job(warden, &after, "FINISHED", Duration::from_secs(30)).await;
    assert_eq!(after["lease"]["bot_id"], "bot-b");

    let m = s.metrics().await;
    assert_eq!(
        sample(&m, "warden_health_recycles_total{reason=\"check_failed\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(sample(&m, "warden_health_checks_total{result=\"passed\"}").unwrap() >= 3.0);
    assert_eq!(
        sample(&m, "warden_health_checks_total{result=\"failed\"}"),
        Some(1.0)
    );
    eventually(Duration::from_secs(5), "resource gauges", || async {
        let m = s.metrics().await;
        (sample(&m, "warden_health_resources{state=\"closed\"}") == Some(1.0)
            && sample(&m, "warden_health_resources{state=\"open\"}") == Some(3.0))
        .then_some(())
    })
    .await;

    // `warden resources` shows the same, for people.
    let table = cli_ok(&url, &["resources"]);
    assert!(table.contains("host-a/checkout"), "{table}");
    assert!(table.contains("closed"), "{table}");
    assert!(table.contains("dependents: host-a/checkout"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_host_and_its_working_copy_are_recycled_and_jobs_finish_elsewhere() {
    let s = Scenario::new().config(BASE).up();
    let (url, warden, dir) = (s.url(), &s.warden, s.dir());
    let conf_v = with_checkout(dir, "bot-v", "host-v", &["default"], "");
    let conf_w = with_checkout(dir, "bot-w", "host-w", &["default"], "");
    let mut v = s.worker_with(&conf_v, "bot-v");
    wait_resource(warden, "host-v/checkout", "open", 30).await;

    let ids = [submit(&url, &["sleepy"]), submit(&url, &["sleepy"])];
    for id in &ids {
        let j = wait_job(warden, id, "RUNNING", Duration::from_secs(30)).await;
        assert_eq!(j["lease"]["bot_id"], "bot-v");
    }
    let _w = s.worker_with(&conf_w, "bot-w");
    wait_resource(warden, "host-w", "open", 30).await;
    v.kill().unwrap();
    v.wait().unwrap();

    let host = wait_resource(warden, "host-v", "closed", 30).await;
    assert_eq!(states(&host), ["open", "broken", "closed"], "{host}");
    assert!(
        host["reason"].as_str().unwrap().contains("vanished"),
        "{host}"
    );
    let wc = wait_resource(warden, "host-v/checkout", "closed", 30).await;
    assert!(
        wc["reason"].as_str().unwrap().contains("host-v"),
        "the working copy goes with its host: {wc}"
    );
    for id in &ids {
        let j = wait_job(warden, id, "FINISHED", Duration::from_secs(60)).await;
        assert_eq!(j["lease"]["bot_id"], "bot-w", "{j}");
        assert_eq!(j["attempt"], 2, "{j}");
    }
    assert_eq!(resource(warden, "host-w").await.unwrap()["state"], "open");
    let m = s.metrics().await;
    assert_eq!(
        sample(&m, "warden_health_recycles_total{reason=\"vanished\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "warden_health_recycles_total{reason=\"dependency\"}"),
        Some(1.0),
        "{m}"
    );

    // The agent comes back (a new process after recycling): its resources
    // pass their checks and open as a new incarnation.
    let _v2 = s.worker_with(&conf_v, "bot-v");
    let again = wait_resource(warden, "host-v", "open", 30).await;
    assert_eq!(again["incarnation"], 2, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_only_resource_under_check_holds_its_jobs_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    // The host check waits while a `hold` file exists in its work dir.
    let gate = r#"
[[health.checks.host]]
name = "gate"
command = ["sh", "-c", "while [ -e {path}/hold ]; do sleep 0.1; done"]
"#;
    let config = format!("{BASE}{gate}");
    let s = Scenario::new().config(&config).up();
    let (url, warden) = (s.url(), &s.warden);
    let conf_s = worker_conf(dir.path(), "bot-s", "host-s", &["solo"], gate);
    let conf_d = worker_conf(dir.path(), "bot-d", "host-d", &["default"], gate);
    let hold = dir.path().join("bot-s-work").join("hold");
    std::fs::write(&hold, "").unwrap();
    let _workers = [
        s.worker_with(&conf_s, "bot-s"),
        s.worker_with(&conf_d, "bot-d"),
    ];
    wait_resource(warden, "host-s", "open", 30).await;
    wait_resource(warden, "host-d", "open", 30).await;

    let crash = submit(&url, &["solo-diskfull"]);
    wait_job(warden, &crash, "CRASHED", Duration::from_secs(60)).await;
    let r = eventually(Duration::from_secs(30), "host-s under check", || async {
        resource(warden, "host-s")
            .await
            .filter(|r| r["state"] == "suspicious" && r["check"].is_object())
    })
    .await;
    assert_eq!(r["check"]["trigger"], "suspicion", "{r}");

    let held: Vec<String> = (0..3)
        .map(|_| submit(&url, &["noop", "--pool", "solo"]))
        .collect();
    let flowing: Vec<String> = (0..5).map(|_| submit(&url, &["noop"])).collect();
    for id in &flowing {
        wait_job(warden, id, "FINISHED", Duration::from_secs(60)).await;
    }
    eventually(Duration::from_secs(10), "waiting jobs counted", || async {
        let m = s.metrics().await;
        (sample(
            &m,
            "warden_scheduler_jobs_waiting_for_resource{pool=\"solo\"}",
        ) == Some(3.0)
            && sample(
                &m,
                "warden_health_pool_resources{pool=\"solo\",state=\"suspicious\"}",
            ) == Some(1.0)
            && sample(
                &m,
                "warden_health_pool_resources{pool=\"solo\",state=\"open\"}",
            ) == Some(0.0))
        .then_some(())
    })
    .await;
    for id in &held {
        assert_eq!(job(warden, id).await["state"], "SCHEDULED");
    }

    std::fs::remove_file(&hold).unwrap();
    let r = wait_resource(warden, "host-s", "open", 30).await;
    assert!(
        r["reason"].as_str().unwrap().starts_with("check passed"),
        "{r}"
    );
    for id in &held {
        let j = wait_job(warden, id, "FINISHED", Duration::from_secs(60)).await;
        assert_eq!(j["lease"]["bot_id"], "bot-s");
    }
    eventually(Duration::from_secs(10), "gauge back to 0", || async {
        let m = s.metrics().await;
        (sample(
            &m,
            "warden_scheduler_jobs_waiting_for_resource{pool=\"solo\"}",
        ) == Some(0.0))
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_resource_by_hand_requeues_its_running_job_without_spending_its_budget() {
    let s = Scenario::new().config(BASE).up();
    let (url, warden, dir) = (s.url(), &s.warden, s.dir());
    let conf_x = worker_conf(dir, "bot-x", "host-x", &["default"], "");
    let conf_y = worker_conf(dir, "bot-y", "host-y", &["default"], "");
    let mut workers = vec![s.worker_with(&conf_x, "bot-x")];
    wait_resource(warden, "host-x", "open", 30).await;
    // One attempt allowed: a second one can only come from a requeue that
    // does not count.
    let id = submit(&url, &["sleepy", "--max-attempts", "1"]);
    let j = wait_job(warden, &id, "RUNNING", Duration::from_secs(30)).await;
    assert_eq!(j["lease"]["bot_id"], "bot-x");
    workers.push(s.worker_with(&conf_y, "bot-y"));
    wait_resource(warden, "host-y", "open", 30).await;

    let out = cli_ok(
        &url,
        &["resource", "close", "host-x", "--reason", "disk replaced"],
    );
    assert!(out.contains("host-x is closed"), "{out}");
    let done = wait_job(warden, &id, "FINISHED", Duration::from_secs(60)).await;
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(done["lease"]["bot_id"], "bot-y", "{done}");
    let requeue = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["action"] == "requeue")
        .unwrap_or_else(|| panic!("a requeue in {done}"))
        .clone();
    assert!(
        requeue["note"]
            .as_str()
            .unwrap()
            .contains("resource host-x was closed"),
        "{requeue}"
    );
    let r = resource(warden, "host-x").await.unwrap();
    assert!(
        r["reason"].as_str().unwrap().contains("disk replaced"),
        "{r}"
    );
    let m = s.metrics().await;
    assert_eq!(
        sample(&m, "warden_health_recycles_total{reason=\"manual\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "warden_scheduler_leases_requeued_total{reason=\"resource_closed\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // Closing it again is refused, with a reason, exit 2.
    let again = warden_e2e::cli(&url, &["resource", "close", "host-x"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_that_comes_back_gets_its_host_back_after_its_check_and_takes_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("host-ok");
    std::fs::write(&marker, "").unwrap();
    let extra = format!(
        "\n[tasks.quick]\ncommand = [\"sh\", \"-c\", \"echo quick\"]\n\n[[health.checks.host]]\nname = \"marker\"\ncommand = [\"test\", \"-f\", {:?}]\n",
        marker.display().to_string()
    );
    let server = format!("{BASE}{extra}").replace(
        "check_timeout = \"30s\"",
        "check_timeout = \"30s\"\nrecheck_backoff = \"1s\"\nflap_window = \"4s\"",
    );
    let s = Scenario::new().config(&server).up();
    let (url, warden) = (s.url(), &s.warden);
    let conf = worker_conf(dir.path(), "bot-s", "host-s", &["default"], &extra);
    let mut worker = s.worker_with(&conf, "bot-s");
    let pid = worker.id();
    wait_resource(warden, "host-s", "open", 30).await;
    let first = submit(&url, &["quick"]);
    wait_job(warden, &first, "FINISHED", Duration::from_secs(30)).await;

    // Stopped past its session timeout (2 s), while its host breaks.
    std::fs::remove_file(&marker).unwrap();
    signal(pid, "-STOP");
    let host = wait_resource(warden, "host-s", "closed", 30).await;
    assert!(
        host["reason"].as_str().unwrap().contains("vanished"),
        "{host}"
    );
    signal(pid, "-CONT");

    // Back, with a new session of the same process: checked, fails, stays
    // out, its jobs wait.
    let waiting = submit(&url, &["quick"]);
    let host = eventually(Duration::from_secs(30), "a failed return check", || async {
        resource(warden, "host-s").await.filter(|r| {
            r["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["trigger"] == "return" && c["result"] == "failed")
        })
    })
    .await;
    assert_eq!(
        (host["state"].as_str(), host["incarnation"].as_u64()),
        (Some("closed"), Some(1)),
        "{host}"
    );
    assert_eq!(job(warden, &waiting).await["state"], "SCHEDULED");

    // Fixed: it comes back by itself as a new incarnation and takes work.
    std::fs::write(&marker, "").unwrap();
    let host = wait_resource(warden, "host-s", "open", 30).await;
    assert_eq!(host["incarnation"], 2, "{host}");
    assert!(
        host["reason"].as_str().unwrap().starts_with("returned"),
        "{host}"
    );
    let done = wait_job(warden, &waiting, "FINISHED", Duration::from_secs(30)).await;
    assert_eq!(done["lease"]["bot_id"], "bot-s", "{done}");
    worker.kill().unwrap();
}
