//! Bridge throughput: messages/s from a RabbitMQ queue into the events
//! stream, against two ceilings measured in the same run, each with as
//! many messages in flight as the bridge's prefetch: the same events
//! published straight to JetStream by one client (NATS alone), and the
//! same messages consumed and acknowledged from RabbitMQ by one lapin
//! client that does nothing else (RabbitMQ alone). Prints all three;
//! asserts only that every message arrived exactly once (a benchmark, not
//! a timed test).
//!
//! `WARDEN_BRIDGE_BENCH_MESSAGES` (default 2000) sets the count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use warden_e2e::{eventually, js, Bridge, NatsServer};
use warden_shared::subjects;
use warden_testsupport::fedora_messaging::{self, Kind, PublishOpts};
use warden_testsupport::rabbitmq::RabbitMq;

const PREFETCH: usize = 64;

/// Messages per second between the first and the last message stored on
/// `subject` (the stream's own timestamps, so polling does not count).
async fn stored_rate(jsx: &async_nats::jetstream::Context, subject: &str, n: u64) -> f64 {
    let stream = jsx.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: subject.to_string(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let (mut first, mut last) = (None, None);
    for _ in 0..n {
        let m = msgs.next().await.unwrap().unwrap();
        let t = m.info().unwrap().published;
        first.get_or_insert(t);
        last = Some(t);
    }
    let secs = (last.unwrap() - first.unwrap()).as_seconds_f64().max(1e-6);
    (n - 1) as f64 / secs
}

async fn count(jsx: &async_nats::jetstream::Context, subject: &str) -> u64 {
    let stream = jsx.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let info = stream
        .info_with_subjects(subject)
        .await
        .unwrap()
        .next()
        .await;
    match info {
        Some(Ok((_, n))) => n as u64,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_throughput_against_jetstream_alone() {
    let n: usize = std::env::var("WARDEN_BRIDGE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rabbit = RabbitMq::start();
    let nats = NatsServer::start();
    // The bridge creates no stream (the services do): make them here.
    warden_e2e::ensure_topology(&nats.url()).await;
    let queue = uuid::Uuid::new_v4().to_string();
    let koji = "org.fedoraproject.prod.buildsys.build.state.change";
    fedora_messaging::declare_queue(&rabbit.amqp_url(), &queue, &[koji]);
    // The queue filled before the bridge starts: it drains a backlog, as
    // after an outage.
    let published = fedora_messaging::publish(
        &rabbit.amqp_url(),
        Kind::Koji,
        &PublishOpts {
            count: Some(n),
            id_prefix: Some("bench".into()),
            fast: true,
            ..PublishOpts::default()
        },
    );
    assert_eq!(published.len(), n);
    let body = std::fs::read(warden_testsupport::fedora_messaging::repo_root().join(
        "tests/fixtures/fedora-messaging/koji_buildsys.build.state.change__msg_build_complete.json",
    ))
    .unwrap();

    let config = format!(
        "[amqp]\nurl = {:?}\nqueue = {queue:?}\nrouting_keys = [{koji:?}]\nprefetch = {PREFETCH}\n",
        rabbit.amqp_url()
    );
    let mut bridge = Bridge::start(&nats.url(), &config);
    let (_c, jsx) = js(&nats.url()).await;
    eventually(
        Duration::from_secs(600),
        "every message bridged",
        || async { (count(&jsx, koji).await == n as u64).then_some(()) },
    )
    .await;
    eventually(Duration::from_secs(30), "the queue drained", || async {
        (rabbit.queue_messages(&queue) == (0, 0)).then_some(())
    })
    .await;
    let bridge_rate = stored_rate(&jsx, koji, n as u64).await;
    assert_eq!(
        bridge.sample("warden_bridge_published_total").await,
        n as f64
    );

    // Ceiling: the same events straight to JetStream, PREFETCH in flight.
    let ceiling_subject = "warden.events.bench";
    let started = std::time::Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for i in 0..n {
        if in_flight.len() >= PREFETCH {
            in_flight.next().await.unwrap();
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("ceiling-{i}").as_str());
        let ack = jsx
            .publish_with_headers(ceiling_subject, headers, body.clone().into())
            .await
            .unwrap();
        in_flight.push(async move { ack.await.unwrap() });
    }
    while in_flight.next().await.is_some() {}
    let wall = started.elapsed();
    assert_eq!(count(&jsx, ceiling_subject).await, n as u64);
    let ceiling_rate = stored_rate(&jsx, ceiling_subject, n as u64).await;

    // Ceiling: RabbitMQ alone, the same backlog consumed and acknowledged
    // (the bridge stopped first: nothing else takes the CPU).
    assert_eq!(bridge.stop(), Some(0), "{}", bridge.log_text());
    let queue2 = uuid::Uuid::new_v4().to_string();
    fedora_messaging::declare_queue(&rabbit.amqp_url(), &queue2, &[koji]);
    fedora_messaging::publish(
        &rabbit.amqp_url(),
        Kind::Koji,
        &PublishOpts {
            count: Some(n),
            id_prefix: Some("bench2".into()),
            fast: true,
            ..PublishOpts::default()
        },
    );
    let rabbit_rate = rabbit_alone(&rabbit.amqp_url(), &queue2, n).await;
    println!(
        "bridge throughput: {n} messages, RabbitMQ -> events stream {bridge_rate:.0} msg/s \
         (prefetch {PREFETCH}); ceilings in the same run: JetStream alone {ceiling_rate:.0} msg/s \
         ({:.0} by wall clock), RabbitMQ alone (consume + ack) {rabbit_rate:.0} msg/s; \
         bridge at {:.0}% of the lower ceiling",
        n as f64 / wall.as_secs_f64(),
        100.0 * bridge_rate / ceiling_rate.min(rabbit_rate)
    );
}

/// Consumes and acknowledges `n` messages of `queue` with one lapin
/// client, `PREFETCH` unacknowledged at most: messages/s from the first
/// delivery to the last ack.
async fn rabbit_alone(url: &str, queue: &str, n: usize) -> f64 {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(PREFETCH as u16, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut started = None;
    for _ in 0..n {
        let d = consumer.next().await.unwrap().unwrap();
        started.get_or_insert_with(std::time::Instant::now);
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let secs = started.unwrap().elapsed().as_secs_f64().max(1e-6);
    (n - 1) as f64 / secs
}
