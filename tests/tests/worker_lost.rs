//! SIGKILL a worker mid-job: its session expires, the job goes back to the
//! queue as `worker_lost`, another worker runs it to FINISHED, and the
//! history shows both attempts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{cli_ok, eventually, get_json, NatsServer, Warden};

const CONFIG: &str = "[fencing]\nsession_timeout = \"1s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_is_requeued_and_finished_elsewhere() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("warden.toml");
    std::fs::write(&conf, CONFIG).unwrap();
    let warden = Warden::up(&url, CONFIG, 0);

    let mut a = warden_e2e::spawn_worker(&url, &conf, "bot-a");
    let id = cli_ok(&url, &["job", "submit", "sleep", "--arg", "seconds=3"])
        .trim()
        .to_string();
    let job_url = warden.url(&format!("/api/v1/jobs/{id}"));
    eventually(Duration::from_secs(30), "job RUNNING on bot-a", || async {
        let j = get_json(&job_url).await;
        (j["state"] == "RUNNING" && j["lease"]["bot_id"] == "bot-a").then_some(())
    })
    .await;
    a.kill().unwrap();
    a.wait().unwrap();

    let mut b = warden_e2e::spawn_worker(&url, &conf, "bot-b");
    let job = eventually(Duration::from_secs(30), "job FINISHED on bot-b", || async {
        let j = get_json(&job_url).await;
        (j["state"] == "FINISHED").then_some(j)
    })
    .await;
    b.kill().unwrap();
    let _ = b.wait();

    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(job["lease"]["bot_id"], "bot-b", "{job}");
    let history = job["history"].as_array().unwrap();
    let requeue = history
        .iter()
        .find(|h| h["action"] == "requeue")
        .expect("a requeue entry");
    assert!(
        requeue["note"].as_str().unwrap().starts_with("worker_lost"),
        "{requeue}"
    );
    assert_eq!(requeue["bot_id"], "bot-a");
    let dispatched_to: Vec<&str> = history
        .iter()
        .filter(|h| h["action"] == "dispatch")
        .map(|h| h["bot_id"].as_str().unwrap())
        .collect();
    assert_eq!(dispatched_to, ["bot-a", "bot-b"]);
}
