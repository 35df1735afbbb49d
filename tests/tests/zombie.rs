//! A worker SIGSTOPped mid-job past its session timeout: the job is
//! requeued and finished by another worker; when the stopped one resumes,
//! its late report is rejected and recorded, and it re-registers. The
//! final state and outcome are the second worker's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command};
use std::time::Duration;

use warden_e2e::{cli_ok, eventually, get_json, NatsServer, Warden};

const CONFIG: &str = "[fencing]\nsession_timeout = \"1s\"\n[retry]\ninitial_delay = \"200ms\"\n";

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_worker_cannot_overwrite_the_retry() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("warden.toml");
    std::fs::write(&conf, CONFIG).unwrap();
    let warden = Warden::up(&url, CONFIG, 0);

    let mut a = warden_e2e::spawn_worker(&url, &conf, "zombie");
    let id = cli_ok(&url, &["job", "submit", "sleep", "--arg", "seconds=2"])
        .trim()
        .to_string();
    let job_url = warden.url(&format!("/api/v1/jobs/{id}"));
    eventually(
        Duration::from_secs(30),
        "job RUNNING on the first worker",
        || async {
            let j = get_json(&job_url).await;
            (j["state"] == "RUNNING" && j["lease"]["bot_id"] == "zombie").then_some(())
        },
    )
    .await;
    signal(&a, "-STOP");
    let mut b = warden_e2e::spawn_worker(&url, &conf, "healthy");
    let done = eventually(
        Duration::from_secs(30),
        "job FINISHED by the second worker",
        || async {
            let j = get_json(&job_url).await;
            (j["state"] == "FINISHED").then_some(j)
        },
    )
    .await;
    assert_eq!(done["lease"]["bot_id"], "healthy");

    // Resume the zombie: its attempt-1 report arrives late and is rejected.
    signal(&a, "-CONT");
    let job = eventually(
        Duration::from_secs(30),
        "the zombie's report rejected and recorded",
        || async {
            let j = get_json(&job_url).await;
            let rejected = j["history"]
                .as_array()?
                .iter()
                .any(|h| h["action"] == "reject_report" && h["bot_id"] == "zombie");
            rejected.then_some(j)
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
    let history = job["history"].as_array().unwrap();
    let rejection = history
        .iter()
        .find(|h| h["action"] == "reject_report")
        .unwrap();
    assert_eq!(rejection["attempt"], 1);
    assert!(
        rejection["note"].as_str().unwrap().contains("stale_epoch"),
        "{rejection}"
    );
    let dispatched: Vec<&str> = history
        .iter()
        .filter(|h| h["action"] == "dispatch")
        .map(|h| h["bot_id"].as_str().unwrap())
        .collect();
    assert_eq!(dispatched, ["zombie", "healthy"]);

    // The zombie re-registers: a new active session for its bot id.
    let (client, js) = warden_e2e::js(&url).await;
    let kv = js
        .get_key_value(warden_shared::subjects::SESSIONS_BUCKET)
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "the zombie re-registered", || {
        let kv = kv.clone();
        async move {
            let name = kv
                .get(warden_shared::session::bot_key("zombie"))
                .await
                .ok()??;
            let rec = kv
                .get(warden_shared::session::session_key(
                    std::str::from_utf8(&name).ok()?,
                ))
                .await
                .ok()??;
            let s: warden_shared::session::Session = serde_json::from_slice(&rec).ok()?;
            (s.state == warden_shared::session::SessionState::Active).then_some(())
        }
    })
    .await;
    drop(client);

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
    let text = reqwest::get(warden.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "warden_scheduler_reports_rejected_total{reason=\"stale_epoch\"}",
        "warden_scheduler_leases_requeued_total{reason=\"worker_lost\"}",
        "warden_fencing_sessions{state=\"active\"}",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}");
    }
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}
