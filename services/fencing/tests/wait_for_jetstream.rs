//! A fencing service started before its bus is there waits for it: it
//! does not exit, `/healthz` says it waits for JetStream, and it answers
//! as soon as a server comes up (issue 13: every service died at start on
//! a fresh cluster).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warden_testsupport::{free_port, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_nats_waits_and_then_answers() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let config = common::config(&url, "");
    let shutdown = CancellationToken::new();
    let service = common::spawn(config, &shutdown, None);

    let body = common::waiting_for_jetstream().await;
    assert!(body.contains("streams and buckets"), "{body}");
    // Longer than one JetStream request timeout (5 s): the service that
    // gave up after its first try is gone by now.
    common::keeps_waiting(&service, Duration::from_secs(6)).await;
    assert!(
        !service.is_finished(),
        "the service exited while NATS was not there: {:?}",
        service.await
    );
    assert_eq!(warden_shared::metrics::health().0, 503);

    let _nats = NatsServer::start_on_port(port);
    common::answers_then_ready(&url, Duration::from_secs(20)).await;
    shutdown.cancel();
    service.await.unwrap().unwrap();
}

/// Shutdown ends the wait: a service that never saw JetStream stops
/// cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_the_wait() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let config = common::config(&url, "");
    let shutdown = CancellationToken::new();
    let service = common::spawn(config, &shutdown, None);
    common::never_within(
        Duration::from_millis(500),
        "the service exiting",
        || async { service.is_finished().then_some(()) },
    )
    .await;
    assert!(!service.is_finished());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), service)
        .await
        .expect("stopped on shutdown")
        .unwrap()
        .unwrap();
}
