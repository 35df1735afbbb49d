//! The JetStream pull loop every consuming service runs: the handler
//! decides what happens to each message ([`Disposition`]), the loop acks,
//! naks or dead-letters it, rides out consumer errors with backoff, and on
//! shutdown stops after finishing the messages it holds. [`consume`]
//! handles messages one by one (several at once); [`consume_grouped`]
//! sorts each pulled batch into groups (the reports of one job) and
//! handles each group as one, in order, with one disposition.

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
    /// How long a batch that is not full waits for more messages before
    /// it is handled (zero: handle what is ready at once). The pull's
    /// messages arrive a socket read at a time (about 64 job records), so
    /// a service whose cost is per batch rather than per message (one
    /// database transaction) fills its batches by waiting a little.
    pub gather: Duration,
}

/// How long the loop waits after a consumer error (the stream or the bus
/// is down): `first`, doubling after each failure in a row, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullBackoff {
    pub first: Duration,
    pub max: Duration,
}

impl PullBackoff {
    /// 1 s, doubling, at most 8 s ([`consume`]).
    pub const DEFAULT: PullBackoff = PullBackoff {
        first: Duration::from_secs(1),
        max: Duration::from_secs(8),
    };

    /// The same pause every time.
    pub const fn fixed(pause: Duration) -> PullBackoff {
        PullBackoff {
            first: pause,
            max: pause,
        }
    }

    /// The pause after `failures` earlier failures in a row.
    pub fn pause(&self, failures: u32) -> Duration {
        self.first
            .checked_mul(1u32 << failures.min(16))
            .unwrap_or(self.max)
            .min(self.max)
    }
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
    let (handler, on_dead_letter, how) = (&handler, &on_dead_letter, &how);
    pull(how, PullBackoff::DEFAULT, consumer, shutdown, move |msgs| {
        futures::future::join_all(msgs.into_iter().map(move |m| async move {
            let d = handler(m.clone()).await;
            settle(how, &m, d, on_dead_letter).await;
        }))
    })
    .await
}

/// Consumes `consumer` until `shutdown` in groups: each pulled batch is
/// sorted by `sort` into a key and what the handler needs (or, for a
/// message that cannot be used, its disposition at once), grouped by key
/// ([`group_by`]: in pull order), and each group goes to `handler` as one
/// (groups concurrently); every message of a group is settled with the
/// disposition the handler returns for it (one per message, in order; a
/// message it returns none for gets the last one), once the handler is
/// done. `pull_backoff`: the pauses after consumer errors.
pub async fn consume_grouped<K, T, S, H, Fut>(
    how: Consume<'_>,
    pull_backoff: PullBackoff,
    consumer: &jetstream::consumer::PullConsumer,
    shutdown: &CancellationToken,
    sort: S,
    handler: H,
    on_dead_letter: impl Fn(&'static str),
) where
    K: PartialEq,
    S: Fn(&jetstream::Message) -> Result<(K, T), Disposition>,
    H: Fn(Vec<(jetstream::Message, T)>) -> Fut,
    Fut: Future<Output = Vec<Disposition>>,
{
    let (sort, handler, on_dead_letter, how) = (&sort, &handler, &on_dead_letter, &how);
    pull(
        how,
        pull_backoff,
        consumer,
        shutdown,
        move |msgs| async move {
            let mut sorted = Vec::with_capacity(msgs.len());
            let mut refused = Vec::new();
            for m in msgs {
                match sort(&m) {
                    Ok((key, t)) => sorted.push((key, (m, t))),
                    Err(d) => refused.push((m, d)),
                }
            }
            let refused = futures::future::join_all(
                refused
                    .into_iter()
                    .map(|(m, d)| async move { settle(how, &m, d, on_dead_letter).await }),
            );
            let groups = futures::future::join_all(group_by(sorted).into_iter().map(
                |(_, group)| async move {
                    let messages: Vec<jetstream::Message> =
                        group.iter().map(|(m, _)| m.clone()).collect();
                    let each = handler(group).await;
                    let last = each.last().cloned().unwrap_or(Disposition::Ack);
                    for (i, m) in messages.iter().enumerate() {
                        let d = each.get(i).cloned().unwrap_or_else(|| last.clone());
                        settle(how, m, d, on_dead_letter).await;
                    }
                },
            ));
            futures::future::join(refused, groups).await;
        },
    )
    .await
}

/// `items` grouped by key: groups in the order their first item came, the
/// items of each in their order.
pub fn group_by<K: PartialEq, T>(items: Vec<(K, T)>) -> Vec<(K, Vec<T>)> {
    let mut groups: Vec<(K, Vec<T>)> = Vec::new();
    for (key, item) in items {
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, list)) => list.push(item),
            None => groups.push((key, vec![item])),
        }
    }
    groups
}

/// The pull loop: hands each ready batch (up to `how.batch` messages) to
/// `batch` and waits for it; pauses after consumer errors.
async fn pull<B, Fut>(
    how: &Consume<'_>,
    pull_backoff: PullBackoff,
    consumer: &jetstream::consumer::PullConsumer,
    shutdown: &CancellationToken,
    batch: B,
) where
    B: Fn(Vec<jetstream::Message>) -> Fut,
    Fut: Future,
{
    let service = how.service;
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        // Each pull asks for as many messages as one batch takes (the
        // client's default is 200): with a backlog, batches come full.
        let messages = match consumer
            .stream()
            .max_messages_per_batch(how.batch.max(1))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                let pause = pull_backoff.pause(failures);
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
            let mut chunk = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = chunks.next() => match c { Some(c) => c, None => break },
            };
            if !how.gather.is_zero() {
                let until = tokio::time::Instant::now() + how.gather;
                while chunk.len() < how.batch {
                    match tokio::time::timeout_at(until, chunks.next()).await {
                        Ok(Some(more)) => chunk.extend(more),
                        _ => break,
                    }
                }
            }
            let mut msgs = Vec::with_capacity(chunk.len());
            for m in chunk {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) => tracing::debug!(service, error = %e, "pull interrupted"),
                }
            }
            batch(msgs).await;
        }
    }
}

/// Does what `d` says with `m`.
async fn settle(
    how: &Consume<'_>,
    m: &jetstream::Message,
    d: Disposition,
    on_dead_letter: &impl Fn(&'static str),
) {
    let service = how.service;
    let kind = match d {
        Disposition::Ack => AckKind::Ack,
        Disposition::Nak(after) => AckKind::Nak(Some(after)),
        Disposition::DeadLetter { reason, error } => {
            let subject = m.subject.to_string();
            match crate::runtime::dead_letter(how.js, service, reason, &subject, &error, &m.payload)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_eight_seconds() {
        let backoff = |failures| PullBackoff::DEFAULT.pause(failures);
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(100), Duration::from_secs(8));
    }

    #[test]
    fn a_fixed_pull_backoff_does_not_grow() {
        let b = PullBackoff::fixed(Duration::from_secs(1));
        for failures in [0, 1, 5, 1000] {
            assert_eq!(b.pause(failures), Duration::from_secs(1));
        }
    }

    #[test]
    fn groups_keep_the_order_of_first_arrival_and_of_their_items() {
        let items = vec![("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5)];
        assert_eq!(
            group_by(items),
            vec![("b", vec![1, 3]), ("a", vec![2, 5]), ("c", vec![4])]
        );
        assert!(group_by::<u8, u8>(Vec::new()).is_empty());
    }
}
