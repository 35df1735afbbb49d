//! The pull loop on a real nats-server: a backlog handed to a handler
//! whose cost is per batch (a database transaction, as the recorder's)
//! comes in full batches when the loop may gather, and every message is
//! handled once either way. Without gathering, the recorder's batches
//! held 64 revisions on average (what one socket read brings) instead of
//! its 512, and its drain ran at 0.6 of the rate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use tokio_util::sync::CancellationToken;
use warden_shared::consume::{self, Consume, Disposition, PullBackoff};
use warden_testsupport::{eventually, NatsServer};

const MESSAGES: usize = 3_000;
const BATCH: usize = 512;

/// Batch sizes the handler saw, draining a backlog of [`MESSAGES`] of
/// about 1 KB each, each batch taking 10 ms as a transaction would.
async fn drain(gather: Duration) -> Vec<usize> {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let s = js
        .create_stream(stream::Config {
            name: "BACKLOG".into(),
            subjects: vec!["backlog.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let body = vec![b'x'; 1_000];
    for i in 0..MESSAGES {
        js.publish(format!("backlog.{i}"), body.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let pull = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("drain".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let run = {
        let (js, sizes, shutdown) = (js.clone(), sizes.clone(), shutdown.clone());
        tokio::spawn(async move {
            consume::consume_grouped(
                Consume {
                    service: "test",
                    js: &js,
                    batch: BATCH,
                    dead_letter_retry: Duration::from_secs(1),
                    gather,
                },
                PullBackoff::DEFAULT,
                &pull,
                &shutdown,
                |_| Ok(((), ())),
                |batch| {
                    let sizes = sizes.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        sizes.lock().unwrap().push(batch.len());
                        vec![Disposition::Ack; batch.len()]
                    }
                },
                |_| {},
            )
            .await
        })
    };
    eventually(Duration::from_secs(60), "every message handled", || {
        let sizes = sizes.clone();
        async move { (sizes.lock().unwrap().iter().sum::<usize>() >= MESSAGES).then_some(()) }
    })
    .await;
    shutdown.cancel();
    run.await.unwrap();
    let sizes = sizes.lock().unwrap().clone();
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_comes_in_full_batches_when_the_loop_gathers() {
    let sizes = drain(Duration::from_millis(20)).await;
    assert_eq!(
        sizes.iter().sum::<usize>(),
        MESSAGES,
        "each once: {sizes:?}"
    );
    let mean = MESSAGES / sizes.len();
    assert!(mean >= BATCH / 2, "mean batch {mean}: {sizes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_gathering_every_message_is_handled_once() {
    let sizes = drain(Duration::ZERO).await;
    assert_eq!(
        sizes.iter().sum::<usize>(),
        MESSAGES,
        "each once: {sizes:?}"
    );
    assert!(sizes.iter().all(|n| *n <= BATCH), "{sizes:?}");
}
