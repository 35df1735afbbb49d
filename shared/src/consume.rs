//! The JetStream pull loop every consuming service runs: the handler
//! decides what happens to each message ([`Disposition`]), the loop acks,
//! naks or dead-letters it, rides out consumer errors with backoff, and on
//! shutdown stops after finishing the messages it holds.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// What happens to a message; decided by the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done with it.
    Ack,
    /// Deliver it again after this long (the store or the bus failed).
    Nak(Duration),
    /// It can never be used: keep it on the dead-letter stream
    /// (`warden.deadletter.<service>.<reason>`), then ack it. If the dead
    /// letter cannot be written the message is delivered again after
    /// [`Consume::dead_letter_retry`].
    DeadLetter { reason: &'static str, error: String },
}

/// How a service consumes.
pub struct Consume<'a> {
    /// The service's name (dead-letter subject, logs).
    pub service: &'static str,
    /// Where dead letters go.
    pub js: &'a jetstream::Context,
    /// Messages handled at once (up to this many ready ones, together);
    /// 1 handles them one by one.
    pub batch: usize,
    /// The nak delay when a dead letter could not be written.
    pub dead_letter_retry: Duration,
}

/// Backoff after a consumer error: 1 s, doubling, at most 8 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(3))
}

/// Consumes `consumer` until `shutdown`, giving each message to `handler`
/// and doing what it returns; `on_dead_letter(reason)` runs once a dead
/// letter is durable (a counter).
pub async fn consume<H, Fut>(
    how: Consume<'_>,
    consumer: &jetstream::consumer::PullConsumer,
    shutdown: &CancellationToken,
    handler: H,
    on_dead_letter: impl Fn(&'static str),
) where
    H: Fn(jetstream::Message) -> Fut,
    Fut: Future<Output = Disposition>,
{
    let service = how.service;
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                let pause = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(service, error = %e, retry_ms = pause.as_millis() as u64, "cannot pull messages; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        failures = 0;
        let mut chunks = messages.ready_chunks(how.batch.max(1));
        loop {
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = chunks.next() => match c { Some(c) => c, None => break },
            };
            let mut msgs = Vec::with_capacity(chunk.len());
            for m in chunk {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) => tracing::debug!(service, error = %e, "pull interrupted"),
                }
            }
            futures::future::join_all(msgs.into_iter().map(|m| {
                let handler = &handler;
                let on_dead_letter = &on_dead_letter;
                let js = how.js;
                async move {
                    let d = handler(m.clone()).await;
                    let kind = match d {
                        Disposition::Ack => AckKind::Ack,
                        Disposition::Nak(after) => AckKind::Nak(Some(after)),
                        Disposition::DeadLetter { reason, error } => {
                            let subject = m.subject.to_string();
                            match crate::runtime::dead_letter(
                                js, service, reason, &subject, &error, &m.payload,
                            )
                            .await
                            {
                                Ok(()) => {
                                    on_dead_letter(reason);
                                    AckKind::Ack
                                }
                                Err(e) => {
                                    tracing::warn!(service, reason, error = %e, "cannot dead-letter a message; will retry");
                                    AckKind::Nak(Some(how.dead_letter_retry))
                                }
                            }
                        }
                    };
                    if let Err(e) = m.ack_with(kind).await {
                        tracing::debug!(service, error = %e, "cannot ack a message");
                    }
                }
            }))
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_eight_seconds() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(100), Duration::from_secs(8));
    }
}
