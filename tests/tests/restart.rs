//! A job survives a restart of everything: services and nats-server on the
//! same data dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{cli_ok, eventually, get_json, NatsServer, Warden};

async fn state(w: &Warden, id: &str) -> Option<String> {
    let r = reqwest::get(w.url(&format!("/api/v1/jobs/{id}")))
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v["state"].as_str().map(str::to_string)
}

/// Hand running work back quickly on shutdown.
const CONFIG: &str = "[worker]\nshutdown_grace = \"200ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_a_restart_of_everything() {
    let mut nats = NatsServer::start();
    let url = nats.url();

    // No workers: both jobs can only wait.
    let mut warden = Warden::up(&url, CONFIG, 0);
    let waiting = cli_ok(&url, &["job", "submit", "noop"]).trim().to_string();
    let long = cli_ok(&url, &["job", "submit", "sleep", "--arg", "seconds=5"])
        .trim()
        .to_string();
    assert_eq!(warden.stop(), Some(0), "{}", warden.log_text());
    nats.restart();

    // After the first restart: the waiting job runs; stop everything while
    // the long one is RUNNING.
    let mut warden = Warden::up(&url, CONFIG, 1);
    for (id, want) in [(&waiting, "FINISHED"), (&long, "RUNNING")] {
        eventually(Duration::from_secs(30), want, || async {
            (state(&warden, id).await.as_deref() == Some(want)).then_some(())
        })
        .await;
    }
    assert_eq!(warden.stop(), Some(0), "{}", warden.log_text());
    nats.restart();

    // After the second restart the handed-back job runs again and finishes.
    let warden = Warden::up(&url, CONFIG, 2);
    eventually(
        Duration::from_secs(60),
        "long job FINISHED after restart",
        || async { (state(&warden, &long).await.as_deref() == Some("FINISHED")).then_some(()) },
    )
    .await;
    let job = get_json(&warden.url(&format!("/api/v1/jobs/{long}"))).await;
    let actions: Vec<&str> = job["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "finish").count(),
        1,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| **a == "requeue").count(),
        1,
        "{actions:?}"
    );
    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(state(&warden, &waiting).await.as_deref(), Some("FINISHED"));
}

/// SIGTERM ends `warden up` (two local workers included) even when the
/// bus went away first: flushing to a server that never comes back must
/// not hold the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_everything_after_the_bus_is_gone() {
    let mut nats = NatsServer::start();
    let mut warden = Warden::up(&nats.url(), CONFIG, 2);
    nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let code = warden.stop();
    eprintln!("stopped in {:?}", started.elapsed());
    assert!(
        code.is_some(),
        "warden up still running {:?} after SIGTERM with the bus gone; log:\n{}",
        started.elapsed(),
        warden.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "took {:?}",
        started.elapsed()
    );
}
