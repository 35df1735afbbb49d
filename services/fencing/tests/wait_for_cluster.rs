//! A fencing service started on a 3-node cluster with two nodes down (no
//! JetStream meta leader) waits, says so in `/healthz`, and answers once
//! the nodes are back (issue 13).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warden_shared::{subjects, Config};
use warden_testsupport::{eventually, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_on_a_cluster_without_leader_waits_and_then_answers() {
    let mut cluster = Cluster::start();
    cluster.kill(0);
    cluster.kill(1);
    let text = format!("[nats]\nurl = \"{}\"\nreplicas = 3\n", cluster.node_url(2));
    let config = Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap());
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(warden_fencing::run(config, shutdown.clone()));

    eventually(
        Duration::from_secs(5),
        "/healthz naming fencing as waiting for JetStream",
        || async {
            let (code, body) = warden_shared::metrics::health();
            (code == 503 && body.contains("fencing (waiting for JetStream")).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        !service.is_finished(),
        "the service exited on a cluster without leader: {:?}",
        service.await
    );
    assert_eq!(warden_shared::metrics::health().0, 503);

    cluster.start_node(0);
    cluster.start_node(1);
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(cluster.node_url(2).as_str())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "fencing answers", || {
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
