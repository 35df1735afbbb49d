//! The consume loop: AMQP deliveries in, events on the events stream out.
//!
//! Each delivery is acknowledged to the broker only after JetStream
//! acknowledged its event (or the dead-letter stream its letter); a
//! publish that fails is held for `amqp.retry_delay` and handed back
//! (nack, requeue), so the broker delivers it again. Up to
//! `amqp.prefetch` deliveries are in flight at once, each acknowledged on
//! its own. A bridge that dies holding deliveries loses nothing: the
//! broker requeues what was not acknowledged, and a delivery whose event
//! was already stored is one event still (`Nats-Msg-Id`, then the
//! trigger's create-if-absent job ids).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warden_shared::amqp::AmqpConfig;
use warden_shared::runtime;

use crate::inbound::{self, Rules};
use crate::metrics::metrics;

/// The service name in dead letters and logs.
pub const SERVICE: &str = "bridge";

/// How often the queue's depth is asked for (`warden_bridge_queue_messages`).
const DEPTH_EVERY: Duration = Duration::from_secs(5);

pub struct Inbound {
    pub js: jetstream::Context,
    pub amqp: AmqpConfig,
    pub rules: Rules,
    /// Fault injection for tests: exit right after this many events were
    /// acknowledged by JetStream, before the AMQP ack of the last one.
    pub crash_after_publish: Option<u64>,
    pub published: AtomicU64,
}

/// Why one connection's consuming ended (the caller reconnects unless it
/// was shutdown).
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("AMQP channel or consumer failed")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the consumer (queue deleted?)")]
    Cancelled,
}

/// Declares and binds the queue, then consumes until `shutdown` or a
/// connection error. On shutdown it stops taking deliveries, finishes the
/// ones in flight, and closes the channel (the broker requeues anything
/// still unacknowledged).
pub async fn consume(
    conn: &Connection,
    ib: Arc<Inbound>,
    shutdown: &CancellationToken,
) -> Result<(), ConsumeError> {
    let a = &ib.amqp;
    let ch = conn.create_channel().await?;
    ch.basic_qos(a.prefetch, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    if !a.queue_expires.is_zero() {
        let ms = i64::try_from(a.queue_expires.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    let queue = ch
        .queue_declare(
            a.queue.as_str().into(),
            QueueDeclareOptions {
                durable: a.queue_durable,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    metrics()
        .queue_messages
        .set(i64::from(queue.message_count()));
    for key in &a.routing_keys {
        ch.queue_bind(
            a.queue.as_str().into(),
            a.exchange.as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let tag = format!("warden-bridge-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = ch
        .basic_consume(
            a.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let stats = conn.create_channel().await?;
    info!(queue = %a.queue, exchange = %a.exchange, keys = ?a.routing_keys, "consuming");
    warden_shared::metrics::ready(SERVICE);

    let mut in_flight = FuturesUnordered::new();
    let mut depth = tokio::time::interval(DEPTH_EVERY);
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            _ = depth.tick() => queue_depth(&stats, &a.queue).await,
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    metrics().in_flight.inc();
                    in_flight.push(handle(ib.clone(), d, shutdown.clone()));
                }
                Some(Err(e)) => break Err(ConsumeError::Amqp(e)),
                None => break Err(ConsumeError::Cancelled),
            },
        }
    };
    if ended.is_ok() {
        // No new deliveries; the buffered ones are requeued by the close.
        let _ = ch
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    while in_flight.next().await.is_some() {}
    let _ = stats.close(200, "bye".into()).await;
    let _ = ch.close(200, "bye".into()).await;
    ended
}

async fn queue_depth(ch: &Channel, queue: &str) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => metrics().queue_messages.set(i64::from(q.message_count())),
        Err(e) => debug!(error = %e, "cannot read the queue depth"),
    }
}

/// One delivery: publish (or dead-letter), then ack; or hold and nack.
async fn handle(ib: Arc<Inbound>, d: Delivery, shutdown: CancellationToken) {
    let m = metrics();
    m.received.inc();
    if d.redelivered {
        m.redelivered.inc();
    }
    let p = &d.properties;
    let headers = inbound::render_headers(p.headers().as_ref());
    let msg = inbound::Message {
        exchange: d.exchange.as_str(),
        routing_key: d.routing_key.as_str(),
        message_id: p.message_id().as_ref().map(|s| s.as_str()),
        content_type: p.content_type().as_ref().map(|s| s.as_str()),
        content_encoding: p.content_encoding().as_ref().map(|s| s.as_str()),
        timestamp: *p.timestamp(),
        headers,
        body: &d.data,
    };
    let sent_at = sent_at(&msg);
    let stored = match inbound::to_event(&msg, &ib.rules) {
        Ok(event) => match publish(&ib.js, &event, &d.data).await {
            Ok(()) => {
                let n = ib.published.fetch_add(1, Ordering::SeqCst) + 1;
                if ib.crash_after_publish == Some(n) {
                    warn!(
                        n,
                        "fault injection: exiting after the JetStream ack, before the AMQP ack"
                    );
                    std::process::exit(FAULT_EXIT);
                }
                if let Some(t) = sent_at {
                    let age = chrono::Utc::now().signed_duration_since(t);
                    m.lag_seconds
                        .set(age.num_milliseconds().max(0) as f64 / 1000.0);
                }
                debug!(subject = %event.subject, id = %event.msg_id, "bridged");
                Some(true)
            }
            Err(e) => {
                warn!(subject = %event.subject, id = %event.msg_id, error = %e, "JetStream did not acknowledge the event; handing the message back");
                None
            }
        },
        Err(u) => {
            let reason = u.reason();
            warn!(routing_key = %msg.routing_key, reason, error = %u, "AMQP message cannot be an event; dead-lettering it");
            match runtime::dead_letter(
                &ib.js,
                SERVICE,
                reason,
                msg.routing_key,
                &u.to_string(),
                &d.data,
            )
            .await
            {
                Ok(()) => {
                    m.dead_lettered.with_label_values(&[reason]).inc();
                    Some(false)
                }
                Err(e) => {
                    warn!(error = %e, "cannot dead-letter; handing the message back");
                    None
                }
            }
        }
    };
    match stored {
        Some(published) => {
            if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                // The broker will deliver it again; the event is stored,
                // so the redelivery is deduplicated.
                warn!(error = %e, "AMQP ack failed; the message will come again");
            } else if published {
                m.published.inc();
            }
        }
        None => {
            m.publish_retries.inc();
            tokio::select! {
                _ = tokio::time::sleep(ib.amqp.retry_delay) => {}
                _ = shutdown.cancelled() => {}
            }
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if let Err(e) = d.acker.nack(requeue).await {
                warn!(error = %e, "AMQP nack failed; the broker requeues on close");
            }
        }
    }
    m.in_flight.dec();
}

/// Exit status of the fault-injection exit (as if killed by SIGKILL).
pub const FAULT_EXIT: i32 = 137;

fn sent_at(msg: &inbound::Message<'_>) -> Option<chrono::DateTime<chrono::Utc>> {
    msg.headers
        .iter()
        .find(|(n, _)| n == "sent-at")
        .and_then(|(_, v)| chrono::DateTime::parse_from_rfc3339(v).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .or_else(|| {
            msg.timestamp
                .and_then(|s| chrono::DateTime::from_timestamp(i64::try_from(s).ok()?, 0))
        })
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("JetStream publish failed")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
}

async fn publish(
    js: &jetstream::Context,
    e: &inbound::Event,
    body: &[u8],
) -> Result<(), PublishError> {
    let mut headers = HeaderMap::new();
    for (name, value) in &e.headers {
        match (HeaderName::from_str(name), HeaderValue::from_str(value)) {
            (Ok(n), Ok(v)) => headers.insert(n, v),
            _ => debug!(name, "header NATS cannot carry; left out"),
        }
    }
    if let Ok(id) = HeaderValue::from_str(&e.msg_id) {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    }
    js.publish_with_headers(e.subject.clone(), headers, body.to_vec().into())
        .await
        .map_err(PublishError::Publish)?
        .await
        .map_err(PublishError::Publish)?;
    Ok(())
}
