//! A job survives a restart of everything: services and nats-server on the
//! same data dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{eventually, get_json, job_state, submit, NatsServer, Warden};

/// Hand running work back quickly on shutdown.
const CONFIG: &str = "[worker]\nshutdown_grace = \"200ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_a_restart_of_everything() {
    let mut nats = NatsServer::start();
    let url = nats.url();

    // No workers: both jobs can only wait.
    let mut warden = Warden::up(&url, CONFIG, 0);
    let waiting = submit(&url, &["noop"]);
    let long = submit(&url, &["sleep", "--arg", "seconds=5"]);
    assert_eq!(warden.stop(), Some(0), "{}", warden.log_text());
    nats.restart();

    // After the first restart: the waiting job runs; stop everything while
    // the long one is RUNNING.
    let mut warden = Warden::up(&url, CONFIG, 1);
    for (id, want) in [(&waiting, "FINISHED"), (&long, "RUNNING")] {
        eventually(Duration::from_secs(30), want, || async {
            (job_state(&warden, id).await.as_deref() == Some(want)).then_some(())
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
        || async { (job_state(&warden, &long).await.as_deref() == Some("FINISHED")).then_some(()) },
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
    assert_eq!(
        job_state(&warden, &waiting).await.as_deref(),
        Some("FINISHED")
    );
}

/// SIGTERM ends `warden up` (two local workers included) even when the
/// bus went away first: flushing to a server that never comes back must
/// not hold the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_everything_after_the_bus_is_gone() {
    let mut nats = NatsServer::start();
    let mut warden = Warden::up(&nats.url(), CONFIG, 2);
    nats.kill();
    eventually(
        Duration::from_secs(20),
        "warden up seeing the bus gone",
        || async {
            warden
                .log_text()
                .contains("nats disconnected")
                .then_some(())
        },
    )
    .await;
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
