//! Waiting for JetStream at start: a service whose bus is not ready yet
//! (no server listening, JetStream not enabled, a cluster without a meta
//! leader, a stream still being placed) waits with capped exponential
//! backoff, says so in its log and in `/healthz`, and never exits for it.
//! Errors that waiting cannot fix (an invalid name or config, a refused
//! login) still fail; the two are told apart by error kind, never by text.

use std::error::Error as StdError;
use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::context::{
    AccountError, AccountErrorKind, CreateKeyValueError, CreateKeyValueErrorKind,
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind,
    RequestErrorKind as JsRequestErrorKind,
};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use async_nats::jetstream::ErrorCode;
use tokio_util::sync::CancellationToken;

/// What an error at start says about the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// JetStream is not there yet (or not reachable): try again.
    NotReady,
    /// Trying again cannot help: fail.
    Fatal,
}

/// First delay between two attempts.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// An attempt still unanswered after this shows as a wait in `/healthz`.
const SLOW_ATTEMPT: Duration = Duration::from_secs(1);

/// Capped exponential backoff: `first`, doubling, never above `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            next: first.min(cap),
            cap,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(FIRST_DELAY, MAX_DELAY)
    }
}

/// Whether JetStream answering `code` may answer otherwise later (no
/// leader yet, a stream not placed or offline, JetStream still off).
pub fn code_readiness(code: ErrorCode) -> Readiness {
    match code {
        ErrorCode::JETSTREAM_NOT_ENABLED
        | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        | ErrorCode::CLUSTER_NOT_AVAILABLE
        | ErrorCode::CLUSTER_NO_PEERS
        | ErrorCode::CLUSTER_INCOMPLETE
        | ErrorCode::CLUSTER_NOT_ACTIVE
        | ErrorCode::CLUSTER_NOT_ASSIGNED
        | ErrorCode::CLUSTER_NOT_LEADER
        | ErrorCode::CLUSTER_PEER_NOT_MEMBER
        | ErrorCode::CLUSTER_SERVER_NOT_MEMBER
        | ErrorCode::RAFT_GENERAL
        | ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::STREAM_NOT_FOUND
        | ErrorCode::CONSUMER_NOT_FOUND
        | ErrorCode::STREAM_OFFLINE
        | ErrorCode::CONSUMER_OFFLINE
        | ErrorCode::STREAM_ASSIGNMENT
        | ErrorCode::STREAM_MOVE_IN_PROGRESS => Readiness::NotReady,
        _ => Readiness::Fatal,
    }
}

/// The verdict of one error of the chain, `None` when it only wraps its
/// source (or is of a kind not known here).
fn classify_one(e: &(dyn StdError + 'static)) -> Option<Readiness> {
    use Readiness::{Fatal, NotReady};
    if let Some(e) = e.downcast_ref::<jetstream::Error>() {
        return Some(code_readiness(e.error_code()));
    }
    if let Some(e) = e.downcast_ref::<CreateStreamError>() {
        return match e.kind() {
            CreateStreamErrorKind::JetStream(js) => Some(code_readiness(js.error_code())),
            CreateStreamErrorKind::EmptyStreamName
            | CreateStreamErrorKind::InvalidStreamName
            | CreateStreamErrorKind::DomainAndExternalSet => Some(Fatal),
            CreateStreamErrorKind::JetStreamUnavailable
            | CreateStreamErrorKind::TimedOut
            | CreateStreamErrorKind::NotFound
            | CreateStreamErrorKind::Response
            | CreateStreamErrorKind::ResponseParse => Some(NotReady),
        };
    }
    if let Some(e) = e.downcast_ref::<CreateKeyValueError>() {
        return match e.kind() {
            CreateKeyValueErrorKind::InvalidStoreName
            | CreateKeyValueErrorKind::TooLongHistory
            | CreateKeyValueErrorKind::LimitMarkersNotSupported => Some(Fatal),
            CreateKeyValueErrorKind::TimedOut => Some(NotReady),
            CreateKeyValueErrorKind::JetStream | CreateKeyValueErrorKind::BucketCreate => None,
        };
    }
    if let Some(e) = e.downcast_ref::<GetStreamError>() {
        return match e.kind() {
            GetStreamErrorKind::JetStream(js) => Some(code_readiness(js.error_code())),
            GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => Some(Fatal),
            GetStreamErrorKind::Request => None,
        };
    }
    if let Some(e) = e.downcast_ref::<ConsumerError>() {
        return match e.kind() {
            ConsumerErrorKind::JetStream(js) => Some(code_readiness(js.error_code())),
            ConsumerErrorKind::TimedOut => Some(NotReady),
            ConsumerErrorKind::InvalidConsumerType | ConsumerErrorKind::InvalidName => Some(Fatal),
            ConsumerErrorKind::Request | ConsumerErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<AccountError>() {
        return match e.kind() {
            AccountErrorKind::JetStream(js) => Some(code_readiness(js.error_code())),
            AccountErrorKind::TimedOut | AccountErrorKind::JetStreamUnavailable => Some(NotReady),
            AccountErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<jetstream::context::RequestError>() {
        return match e.kind() {
            JsRequestErrorKind::NoResponders | JsRequestErrorKind::TimedOut => Some(NotReady),
            JsRequestErrorKind::InvalidSubject => Some(Fatal),
            JsRequestErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<async_nats::RequestError>() {
        return match e.kind() {
            async_nats::RequestErrorKind::NoResponders | async_nats::RequestErrorKind::TimedOut => {
                Some(NotReady)
            }
            async_nats::RequestErrorKind::InvalidSubject
            | async_nats::RequestErrorKind::MaxPayloadExceeded => Some(Fatal),
            async_nats::RequestErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<async_nats::ConnectError>() {
        return match e.kind() {
            async_nats::ConnectErrorKind::ServerParse
            | async_nats::ConnectErrorKind::Authentication
            | async_nats::ConnectErrorKind::AuthorizationViolation
            | async_nats::ConnectErrorKind::Tls => Some(Fatal),
            _ => Some(NotReady),
        };
    }
    None
}

/// Whether `err` (or the first error of its source chain whose kind says
/// anything) means "JetStream is not ready yet". An error of no kind known
/// here counts as not ready: exiting for a bus that is still coming up is
/// the failure this module exists to avoid, and the wait is logged.
pub fn readiness(err: &(dyn StdError + 'static)) -> Readiness {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = classify_one(e) {
            return r;
        }
        cur = e.source();
    }
    Readiness::NotReady
}

/// An error with its sources, for a log line.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Runs `op` until it succeeds, waiting with [`Backoff`] (100 ms doubling
/// to 5 s) after each failure that [`readiness`] calls not ready, with a
/// WARN naming `what` and how long `service` has waited, and `/healthz`
/// answering 503 "waiting for JetStream". `Ok(None)` when `shutdown` came
/// first (the only thing that ends the wait); `Err` for a fatal error.
pub async fn retry_until_ready<T, E, F, Fut>(
    service: &str,
    what: &str,
    shutdown: &CancellationToken,
    mut op: F,
) -> Result<Option<T>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: StdError + 'static,
{
    let started = Instant::now();
    let mut backoff = Backoff::default();
    let mut attempts: u32 = 0;
    let mut waited = false;
    loop {
        let attempt = op();
        tokio::pin!(attempt);
        // An attempt that hangs (a request that will time out) already
        // shows in `/healthz`, refreshed every SLOW_ATTEMPT.
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = &mut attempt => break r,
                _ = tokio::time::sleep(SLOW_ATTEMPT) => {
                    waited = true;
                    crate::metrics::waiting_for_jetstream(service, what, started.elapsed());
                }
            }
        };
        attempts += 1;
        match result {
            Ok(v) => {
                if attempts > 1 || waited {
                    tracing::info!(
                        service,
                        what,
                        attempts,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "JetStream ready"
                    );
                    crate::metrics::done_waiting(service);
                }
                return Ok(Some(v));
            }
            Err(e) if readiness(&e) == Readiness::Fatal => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    service,
                    what,
                    attempts,
                    waited_ms = started.elapsed().as_millis() as u64,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %chain(&e),
                    "waiting for JetStream"
                );
                waited = true;
                crate::metrics::waiting_for_jetstream(service, what, started.elapsed());
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_a_5s_cap() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000],
            "{delays:?}"
        );
    }

    #[test]
    fn not_ready_and_fatal_by_kind() {
        let timed_out = CreateStreamError::new(CreateStreamErrorKind::TimedOut);
        assert_eq!(readiness(&timed_out), Readiness::NotReady);
        let unavailable = CreateStreamError::new(CreateStreamErrorKind::JetStreamUnavailable);
        assert_eq!(readiness(&unavailable), Readiness::NotReady);
        let bad_name = CreateStreamError::new(CreateStreamErrorKind::InvalidStreamName);
        assert_eq!(readiness(&bad_name), Readiness::Fatal);
        // A bucket whose stream could not be created: the stream's error
        // decides.
        let bucket = CreateKeyValueError::with_source(
            CreateKeyValueErrorKind::BucketCreate,
            CreateStreamError::new(CreateStreamErrorKind::TimedOut),
        );
        assert_eq!(readiness(&bucket), Readiness::NotReady);
        let bucket = CreateKeyValueError::with_source(
            CreateKeyValueErrorKind::BucketCreate,
            CreateStreamError::new(CreateStreamErrorKind::EmptyStreamName),
        );
        assert_eq!(readiness(&bucket), Readiness::Fatal);
        assert_eq!(
            readiness(&ConsumerError::new(ConsumerErrorKind::TimedOut)),
            Readiness::NotReady
        );
        assert_eq!(
            readiness(&async_nats::ConnectError::new(
                async_nats::ConnectErrorKind::AuthorizationViolation
            )),
            Readiness::Fatal
        );
        assert_eq!(
            readiness(&async_nats::ConnectError::new(
                async_nats::ConnectErrorKind::TimedOut
            )),
            Readiness::NotReady
        );
    }

    #[test]
    fn jetstream_codes() {
        for code in [
            ErrorCode::JETSTREAM_NOT_ENABLED,
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::STREAM_NOT_FOUND,
            ErrorCode::INSUFFICIENT_RESOURCES,
        ] {
            assert_eq!(code_readiness(code), Readiness::NotReady, "{code:?}");
        }
        for code in [
            ErrorCode::STREAM_SUBJECT_OVERLAP,
            ErrorCode::BAD_REQUEST,
            ErrorCode::STREAM_INVALID_CONFIG,
        ] {
            assert_eq!(code_readiness(code), Readiness::Fatal, "{code:?}");
        }
    }

    /// A wrapper of ours (like a service's setup error) is looked through.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot set up")]
    struct Setup(#[source] async_nats::Error);

    #[tokio::test]
    async fn retries_until_success_and_stops_on_fatal_or_shutdown() {
        let shutdown = CancellationToken::new();
        let mut calls = 0;
        let r = retry_until_ready("test-retry", "a thing", &shutdown, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(Setup(Box::new(ConsumerError::new(
                        ConsumerErrorKind::TimedOut,
                    ))))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.ok().flatten(), Some(3));

        let r: Result<Option<()>, Setup> =
            retry_until_ready("test-retry", "a thing", &shutdown, || async {
                Err(Setup(Box::new(ConsumerError::new(
                    ConsumerErrorKind::InvalidName,
                ))))
            })
            .await;
        assert!(r.is_err(), "a fatal error is not retried");

        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.cancel();
        });
        let r: Result<Option<()>, Setup> =
            retry_until_ready("test-retry-stop", "a thing", &stop, || async {
                Err(Setup(Box::new(ConsumerError::new(
                    ConsumerErrorKind::TimedOut,
                ))))
            })
            .await;
        assert!(matches!(r, Ok(None)), "only shutdown ends the wait");
    }
}
