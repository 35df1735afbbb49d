//! The CI-messages loop: job revisions in, CI messages out.
//!
//! Every bridge replica pulls from one durable consumer on the jobs
//! bucket's stream ([`subjects::ci_messages_consumer`]), made with
//! deliver-new: the first start publishes nothing about jobs written
//! before it, later starts resume where the consumer stands. Each revision
//! is decoded, its message decided ([`super::message_for`]) and checked
//! against the job's marker in [`subjects::CI_PUBLISHED_BUCKET`]
//! ([`super::should_publish`]); a message that is news is published to
//! `amqp.ci_messages.exchange` with publisher confirms, and only once the
//! broker confirmed it is the marker written (compare-and-set) and the
//! revision acknowledged. A publish the broker does not confirm (nack,
//! timeout, connection lost) is counted in
//! `warden_bridge_ci_messages_failures_total` and the revision handed back
//! (nak with `amqp.retry_delay`), so it comes again.
//!
//! Delivery is at least once: a bridge that dies between the broker's
//! confirm and its marker write, or two replicas handling the same job at
//! the same moment, may publish a message twice. Consumers dedupe on
//! `pipeline.id` and the topic's status.
//!
//! The AMQP connection is this loop's own (named `warden-bridge-ci`),
//! reconnected with backoff; on shutdown the revision in hand is finished,
//! then the loop stops.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, AckKind};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;
use warden_shared::ready::Backoff;
use warden_shared::{store, subjects, Config};

use super::{message_for, should_publish, will_retry, CiMessage, Marker, Skip};
use crate::metrics::metrics;

/// The AMQP connection name of this loop.
pub const CONNECTION_NAME: &str = "warden-bridge-ci";

/// Why one AMQP connection's work ended (the loop reconnects).
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("AMQP channel failed")]
    Amqp(#[from] lapin::Error),
    #[error("the jobs consumer's message stream ended")]
    StreamEnded,
    #[error("cannot pull from the jobs consumer")]
    Pull(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the AMQP channel is closed")]
    ChannelClosed,
}

/// Why a revision is handed back to come again.
#[derive(Debug, thiserror::Error)]
enum Retry {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot read the job's marker")]
    Marker(#[source] kv::EntryError),
}

/// Why one publish failed (retried).
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("AMQP publish failed")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
}

/// The AMQP properties of one CI message, as fedora-messaging 3.9 sets
/// them (`Message._build_properties` with the default configuration):
/// JSON in UTF-8, persistent, a fresh UUID as the message id, and the
/// headers `fedora_messaging_schema` (+ `_package`), `sent-at` (UTC, whole
/// seconds, `+00:00`), `fedora_messaging_severity` and `priority` (the
/// publish priority mirrored, 0; the property itself unset, as
/// `publish_priority = None` leaves it).
pub fn properties(message_id: &Uuid, sent_at: chrono::DateTime<Utc>) -> BasicProperties {
    let mut h = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    h.insert("fedora_messaging_schema".into(), s(super::SCHEMA));
    h.insert(
        "fedora_messaging_schema_package".into(),
        s(super::SCHEMA_PACKAGE),
    );
    h.insert(
        "sent-at".into(),
        s(&sent_at.to_rfc3339_opts(SecondsFormat::Secs, false)),
    );
    h.insert(
        "fedora_messaging_severity".into(),
        AMQPValue::LongInt(super::SEVERITY_INFO as i32),
    );
    h.insert("priority".into(), AMQPValue::LongInt(0));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.to_string().into())
        .with_headers(h)
}

struct Out {
    config: Arc<Config>,
    markers: kv::Store,
}

/// Runs until `shutdown`: sets up the consumer and the marker bucket
/// (retried), then publishes, reconnecting to the broker with backoff.
pub async fn run(config: Arc<Config>, js: jetstream::Context, shutdown: CancellationToken) {
    let Some((consumer, markers)) = setup(&config, &js, &shutdown).await else {
        return;
    };
    let out = Out { config, markers };
    let a = &out.config.amqp;
    let mut backoff = Backoff::new(Duration::from_secs(1), a.reconnect_max);
    info!(
        exchange = %a.ci_messages.exchange,
        tasks = out.config.amqp.ci_messages.tasks.len(),
        "publishing CI messages"
    );
    while !shutdown.is_cancelled() {
        match crate::amqp::connect(a, CONNECTION_NAME).await {
            Ok(conn) => {
                info!("CI messages: AMQP connected");
                backoff = Backoff::new(Duration::from_secs(1), a.reconnect_max);
                let ended = serve(&out, &conn, &consumer, &shutdown).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    conn.close(200, "bridge stopping".into()),
                )
                .await;
                match ended {
                    Ok(()) => break,
                    Err(e) => warn!(error = %e, "CI messages: connection lost; reconnecting"),
                }
            }
            Err(e) => warn!(error = %e, "CI messages: cannot connect to AMQP; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    info!("CI messages stopped");
}

/// The jobs consumer and the marker bucket, retried until they exist or
/// shutdown.
async fn setup(
    config: &Config,
    js: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Option<(consumer::Consumer<consumer::pull::Config>, kv::Store)> {
    let ci = &config.amqp.ci_messages;
    let mut backoff = Backoff::new(Duration::from_secs(1), config.amqp.reconnect_max);
    loop {
        let attempt = async {
            let stream = js
                .get_stream(subjects::kv_stream(subjects::JOBS_BUCKET))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            let consumer = stream
                .get_or_create_consumer(
                    subjects::CI_MESSAGES_CONSUMER,
                    subjects::ci_messages_consumer(),
                )
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            let markers = js
                .create_or_update_key_value(subjects::ci_published_bucket(
                    config.nats.replicas,
                    ci.marker_max_bytes,
                    ci.marker_max_age,
                ))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((consumer, markers))
        };
        match attempt.await {
            Ok(r) => return Some(r),
            Err(e) => warn!(error = %e, "CI messages: cannot set up the jobs consumer; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// One connection's life: a confirming channel, then every revision in
/// turn until shutdown (Ok) or a broken channel or stream (Err).
async fn serve(
    out: &Out,
    conn: &Connection,
    consumer: &consumer::Consumer<consumer::pull::Config>,
    shutdown: &CancellationToken,
) -> Result<(), Broken> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Broken::Pull(Box::new(e)))?;
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let msg = match next {
            None => return Err(Broken::StreamEnded),
            Some(Err(e)) => {
                warn!(error = %e, "CI messages: pulling job revisions failed");
                continue;
            }
            Some(Ok(m)) => m,
        };
        match handle(out, &ch, &msg).await {
            Ok(()) => {
                if let Err(e) = msg.ack().await {
                    warn!(error = %e, "CI messages: ack of a job revision failed (it comes again)");
                }
            }
            Err(e) => {
                if matches!(e, Retry::Publish(_)) {
                    metrics().ci_failures.inc();
                }
                warn!(error = %e, "CI messages: job revision not done; retried");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(out.config.amqp.retry_delay)))
                    .await;
                if !ch.status().connected() {
                    return Err(Broken::ChannelClosed);
                }
            }
        }
    }
}

fn skip(reason: Skip) {
    metrics()
        .ci_skipped
        .with_label_values(&[reason.as_str()])
        .inc();
}

/// One revision: Ok when it is done with (published and marked, or
/// nothing to publish), Err when the publish must be retried.
async fn handle(out: &Out, ch: &Channel, msg: &jetstream::Message) -> Result<(), Retry> {
    if subjects::is_kv_removal(msg.headers.as_ref()) {
        skip(Skip::Deleted);
        return Ok(());
    }
    let job = match store::decode(msg.subject.as_str(), &msg.payload) {
        Ok(j) => j,
        Err(e) => {
            warn!(subject = %msg.subject, error = %e, "CI messages: not a job record");
            skip(Skip::Undecodable);
            return Ok(());
        }
    };
    let now = Utc::now();
    let retry = will_retry(&job, &out.config.retry_policy(&job.task), now);
    let m = match message_for(&job, &out.config.amqp.ci_messages, retry, now) {
        Ok(m) => m,
        Err(reason) => {
            if reason != Skip::TaskNotPublished {
                debug!(job = %job.id, state = %job.state, reason = reason.as_str(), "CI messages: nothing to publish");
            }
            skip(reason);
            return Ok(());
        }
    };
    let key = job.id.to_string();
    let (last, revision) = read_marker(&out.markers, &key)
        .await
        .map_err(Retry::Marker)?;
    if !should_publish(last.as_ref(), &m.marker) {
        skip(Skip::AlreadyPublished);
        return Ok(());
    }
    publish(out, ch, &m).await?;
    metrics()
        .ci_published
        .with_label_values(&[m.status.as_str()])
        .inc();
    info!(job = %job.id, topic = %m.topic, "CI message published");
    write_marker(&out.markers, &key, &m.marker, revision).await;
    Ok(())
}

async fn publish(out: &Out, ch: &Channel, m: &CiMessage) -> Result<(), PublishError> {
    let ci = &out.config.amqp.ci_messages;
    let body = serde_json::to_vec(&m.body).unwrap_or_default();
    let props = properties(&Uuid::new_v4(), Utc::now());
    let confirm = ch
        .basic_publish(
            ci.exchange.as_str().into(),
            m.topic.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?;
    match tokio::time::timeout(ci.confirm_timeout, confirm).await {
        Err(_) => Err(PublishError::Timeout(ci.confirm_timeout)),
        Ok(Err(e)) => Err(PublishError::Amqp(e)),
        Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
        Ok(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => Ok(()),
    }
}

/// The job's marker and its revision (`None` when there is none; an
/// undecodable marker counts as none and is overwritten).
async fn read_marker(
    markers: &kv::Store,
    key: &str,
) -> Result<(Option<Marker>, Option<u64>), kv::EntryError> {
    Ok(match markers.entry(key).await? {
        Some(e) if e.operation == kv::Operation::Put => (
            serde_json::from_slice::<Marker>(&e.value).ok(),
            Some(e.revision),
        ),
        Some(e) => (None, Some(e.revision)),
        None => (None, None),
    })
}

/// Writes `marker` for `key` by compare-and-set from `revision`; when
/// another replica wrote meanwhile, keeps the greater of the two. A
/// marker that cannot be written is logged: the next revision of the job
/// may then publish its message again (at least once).
async fn write_marker(markers: &kv::Store, key: &str, marker: &Marker, mut revision: Option<u64>) {
    let bytes = Bytes::from(serde_json::to_vec(marker).unwrap_or_default());
    for _ in 0..5 {
        let r = match revision {
            None => markers
                .create(key, bytes.clone())
                .await
                .map(|_| ())
                .map_err(|e| {
                    let race =
                        e.kind() == kv::CreateErrorKind::AlreadyExists || store::lost_race(&e);
                    (
                        race,
                        Box::new(e) as Box<dyn std::error::Error + Send + Sync>,
                    )
                }),
            Some(rev) => markers
                .update(key, bytes.clone(), rev)
                .await
                .map(|_| ())
                .map_err(|e| {
                    let race =
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision || store::lost_race(&e);
                    (
                        race,
                        Box::new(e) as Box<dyn std::error::Error + Send + Sync>,
                    )
                }),
        };
        match r {
            Ok(()) => return,
            Err((true, _)) => {
                let Ok((now, rev)) = read_marker(markers, key).await else {
                    return;
                };
                if !should_publish(now.as_ref(), marker) {
                    return; // a newer (or the same) marker is there already
                }
                revision = rev;
            }
            Err((false, e)) => {
                warn!(key, error = %e, "CI messages: cannot write the job's marker");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_fedora_messagings() {
        let id = Uuid::from_u128(1);
        let at = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
            .expect("time")
            .with_timezone(&Utc);
        let p = properties(&id, at);
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.content_encoding().as_ref().map(|s| s.as_str()),
            Some("utf-8")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.message_id().as_ref().map(|s| s.to_string()),
            Some(id.to_string())
        );
        assert_eq!(*p.priority(), None);
        let h = p.headers().as_ref().expect("headers");
        let get = |k: &str| h.inner().get(k).cloned();
        assert_eq!(
            get("fedora_messaging_schema"),
            Some(AMQPValue::LongString("ci_messages.CIMessageV1".into()))
        );
        assert_eq!(
            get("fedora_messaging_schema_package"),
            Some(AMQPValue::LongString("ci_messages".into()))
        );
        assert_eq!(
            get("sent-at"),
            Some(AMQPValue::LongString("2026-01-02T03:04:05+00:00".into()))
        );
        assert_eq!(
            get("fedora_messaging_severity"),
            Some(AMQPValue::LongInt(20))
        );
        assert_eq!(get("priority"), Some(AMQPValue::LongInt(0)));
        assert_eq!(h.inner().len(), 5);
    }
}
