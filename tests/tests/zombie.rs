//! A worker SIGSTOPped mid-job past its session timeout: the job is
//! requeued and finished by another worker; when the stopped one resumes,
//! its late report is rejected and recorded, and it re-registers. The
//! final state and outcome are the second worker's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{entries, entry, signal, Scenario};

const CONFIG: &str = "[fencing]\nsession_timeout = \"1s\"\n[retry]\ninitial_delay = \"200ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_worker_cannot_overwrite_the_retry() {
    let s = Scenario::new().config(CONFIG).up();
    let url = s.url();

    let a = s.worker("zombie");
    let id = s.submit(&["sleep", "--arg", "seconds=2"]);
    s.wait_running_on(&id, "zombie").await;
    signal(a.id(), "-STOP");
    let _b = s.worker("healthy");
    let done = s.wait_job(&id, "FINISHED", Duration::from_secs(30)).await;
    assert_eq!(done["lease"]["bot_id"], "healthy");

    // Resume the zombie: its attempt-1 report arrives late and is rejected.
    signal(a.id(), "-CONT");
    let job = s
        .wait_job_where(
            &id,
            "the zombie's report rejected and recorded",
            Duration::from_secs(30),
            |j| {
                entries(j, "reject_report")
                    .iter()
                    .any(|h| h["bot_id"] == "zombie")
            },
        )
        .await;
    assert_eq!(job["state"], "FINISHED");
    assert_eq!(job["outcome"], "passed");
    assert_eq!(job["attempt"], 2, "{job:#}");
    assert_eq!(
        job["lease"]["bot_id"], "healthy",
        "the final state is the second worker's"
    );
    let rejection = entry(&job, "reject_report");
    assert_eq!(rejection["attempt"], 1);
    assert!(
        rejection["note"].as_str().unwrap().contains("stale_epoch"),
        "{rejection}"
    );
    let dispatched: Vec<&str> = entries(&job, "dispatch")
        .iter()
        .map(|h| h["bot_id"].as_str().unwrap())
        .collect();
    assert_eq!(dispatched, ["zombie", "healthy"]);

    // The zombie re-registers: a new active session for its bot id.
    s.wait_active_session("zombie", Duration::from_secs(15))
        .await;

    // Operators see it: two sessions of the zombie bot, one of them dead,
    // and the counters the alerts read.
    let bots: serde_json::Value =
        serde_json::from_str(&warden_e2e::cli_ok(&url, &["bots", "--json"])).unwrap();
    let zombie: Vec<&serde_json::Value> = bots
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["bot_id"] == "zombie")
        .collect();
    assert_eq!(zombie.len(), 2, "{bots}");
    assert_eq!(zombie[0]["state"], "active", "newest first: {bots}");
    assert_eq!(zombie[1]["state"], "expired", "{bots}");
    let text = s.metrics().await;
    for needle in [
        "warden_scheduler_reports_rejected_total{reason=\"stale_epoch\"}",
        "warden_scheduler_leases_requeued_total{reason=\"worker_lost\"}",
        "warden_fencing_sessions{state=\"active\"}",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}");
    }
}
