//! A fencing service started before its bus is there waits for it: it
//! does not exit, `/healthz` says it waits for JetStream, and it answers
//! as soon as a server comes up (issue 13: every service died at start on
//! a fresh cluster).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warden_shared::{subjects, Config};
use warden_testsupport::{eventually, free_port, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_nats_waits_and_then_answers() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let text = format!("[nats]\nurl = \"{url}\"\n");
    let config = Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap());
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(warden_fencing::run(config, shutdown.clone()));

    // Longer than one JetStream request timeout (5 s): the service that
    // gave up after its first try is gone by now.
    let body = eventually(
        Duration::from_secs(5),
        "/healthz naming fencing as waiting for JetStream",
        || async {
            let (code, body) = warden_shared::metrics::health();
            (code == 503 && body.contains("fencing (waiting for JetStream")).then_some(body)
        },
    )
    .await;
    assert!(body.contains("streams and buckets"), "{body}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !service.is_finished(),
        "the service exited while NATS was not there: {:?}",
        service.await
    );
    assert_eq!(warden_shared::metrics::health().0, 503);

    let _nats = NatsServer::start_on_port(port);
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url.as_str())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "fencing answers", || {
        let client = client.clone();
        async move {
            client
                .request(subjects::SESSION_HEARTBEAT, "{}".into())
                .await
                .ok()
        }
    })
    .await;
    eventually(Duration::from_secs(5), "/healthz 200", || async {
        (warden_shared::metrics::health().0 == 200).then_some(())
    })
    .await;
    shutdown.cancel();
    service.await.unwrap().unwrap();
}

/// Shutdown ends the wait: a service that never saw JetStream stops
/// cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_the_wait() {
    let text = format!("[nats]\nurl = \"nats://127.0.0.1:{}\"\n", free_port());
    let config = Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap());
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(warden_fencing::run(config, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!service.is_finished());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), service)
        .await
        .expect("stopped on shutdown")
        .unwrap()
        .unwrap();
}
