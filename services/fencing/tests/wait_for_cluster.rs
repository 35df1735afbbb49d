//! A fencing service started on a 3-node cluster with two nodes down (no
//! JetStream meta leader) waits, says so in `/healthz`, and answers once
//! the nodes are back (issue 13).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warden_testsupport::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_on_a_cluster_without_leader_waits_and_then_answers() {
    let mut cluster = Cluster::start();
    cluster.kill(0);
    cluster.kill(1);
    let config = common::config(&cluster.node_url(2), "replicas = 3\n");
    let shutdown = CancellationToken::new();
    let service = common::spawn(config, &shutdown, None);

    common::waiting_for_jetstream().await;
    // Longer than one JetStream request timeout (5 s): a service that
    // gave up after its first try would be gone.
    common::keeps_waiting(&service, Duration::from_secs(7)).await;
    assert!(
        !service.is_finished(),
        "the service exited on a cluster without leader: {:?}",
        service.await
    );
    assert_eq!(warden_shared::metrics::health().0, 503);

    cluster.start_node(0);
    cluster.start_node(1);
    common::answers_then_ready(&cluster.node_url(2), Duration::from_secs(60)).await;
    shutdown.cancel();
    service.await.unwrap().unwrap();
}
