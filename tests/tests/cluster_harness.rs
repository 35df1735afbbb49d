//! The 3-node cluster harness later failover tests build on: a replicated
//! stream keeps accepting and serving writes with one node down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream::stream;
use warden_e2e::{eventually, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_stream_survives_one_node_down() {
    let mut cluster = Cluster::start();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(warden_shared::runtime::server_addrs(&cluster.url()).unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    // JetStream needs a meta leader before it takes R3 streams.
    let mut s = eventually(Duration::from_secs(30), "an R3 stream", || {
        let js = js.clone();
        async move {
            js.create_stream(stream::Config {
                name: "SMOKE".into(),
                subjects: vec!["smoke.>".into()],
                num_replicas: 3,
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    js.publish("smoke.a", "1".into())
        .await
        .unwrap()
        .await
        .unwrap();

    cluster.kill(0);
    let ack = eventually(
        Duration::from_secs(30),
        "a write acknowledged with one node down",
        || {
            let js = js.clone();
            async move { js.publish("smoke.b", "2".into()).await.ok()?.await.ok() }
        },
    )
    .await;
    assert_eq!(ack.sequence, 2);
    let info = s.info().await.unwrap();
    assert_eq!(info.state.messages, 2);
    cluster.start_node(0);
}
