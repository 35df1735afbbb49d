//! The request/reply loop every NATS service runs: take requests from a
//! service API endpoint or a (queue-group) subscription, answer each in its
//! own task, and on shutdown stop taking requests and drain: every request
//! already taken gets its reply before [`serve`] returns.

use std::future::Future;

use async_nats::service;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ErrorCode;
use crate::messages::{encode_reply, ErrorBody, ErrorReply};

/// One request, from wherever it came.
pub enum Request {
    /// From a `$SRV` service API endpoint.
    Service(service::Request),
    /// From a plain or queue-group subscription; answered on its reply
    /// subject by `client`.
    Message {
        client: async_nats::Client,
        message: async_nats::Message,
    },
}

impl Request {
    pub fn message(&self) -> &async_nats::Message {
        match self {
            Request::Service(r) => &r.message,
            Request::Message { message, .. } => message,
        }
    }

    async fn respond(self, reply: Reply) -> Result<(), async_nats::Error> {
        match self {
            Request::Service(r) => {
                match reply.headers {
                    Some(h) => r.respond_with_headers(Ok(reply.payload), h).await?,
                    None => r.respond(Ok(reply.payload)).await?,
                }
                Ok(())
            }
            Request::Message { client, message } => {
                let Some(to) = message.reply else {
                    return Ok(());
                };
                match reply.headers {
                    Some(h) => client.publish_with_headers(to, h, reply.payload).await?,
                    None => client.publish(to, reply.payload).await?,
                }
                Ok(())
            }
        }
    }
}

/// What a handler answers: a body, and headers if any.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub payload: Bytes,
    pub headers: Option<async_nats::HeaderMap>,
}

impl Reply {
    /// `reply` as JSON (never empty: see [`encode_reply`]).
    pub fn json<T: serde::Serialize>(reply: &T) -> Reply {
        Reply {
            payload: Bytes::from(encode_reply(reply)),
            headers: None,
        }
    }
}

impl From<Bytes> for Reply {
    fn from(payload: Bytes) -> Reply {
        Reply {
            payload,
            headers: None,
        }
    }
}

/// The requests of a service API endpoint.
pub fn endpoint(ep: service::endpoint::Endpoint) -> impl Stream<Item = Request> + Unpin {
    ep.map(Request::Service)
}

/// The requests of a subscription, answered by `client`.
pub fn subscription(
    client: async_nats::Client,
    sub: async_nats::Subscriber,
) -> impl Stream<Item = Request> + Unpin {
    sub.map(move |message| Request::Message {
        client: client.clone(),
        message,
    })
}

/// Answers each request of `requests` with `handler`, each in its own task,
/// until `shutdown` or until the stream ends; then drops the stream (no new
/// requests: a subscription is unsubscribed, so they go to other replicas)
/// and waits until every request taken has been answered. A handler that
/// may wait long should watch `shutdown` itself.
pub async fn serve<S, H, Fut>(
    what: &'static str,
    requests: S,
    shutdown: &CancellationToken,
    handler: H,
) where
    S: Stream<Item = Request> + Unpin,
    H: Fn(async_nats::Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    serve_tagged(what, requests.map(|r| ((), r)), shutdown, move |(), m| {
        handler(m)
    })
    .await
}

/// [`serve`] for several endpoints in one loop: each request comes with
/// the tag of its endpoint (`futures::stream::select_all` of
/// `endpoint(e).map(|r| (tag, r))`).
pub async fn serve_tagged<K, S, H, Fut>(
    what: &'static str,
    mut requests: S,
    shutdown: &CancellationToken,
    handler: H,
) where
    K: Send + 'static,
    S: Stream<Item = (K, Request)> + Unpin,
    H: Fn(K, async_nats::Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let handler = std::sync::Arc::new(handler);
    let tracker = TaskTracker::new();
    loop {
        let (tag, req) = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = requests.next() => match next {
                Some(r) => r,
                None => {
                    tracing::warn!(what, "requests ended");
                    break;
                }
            },
        };
        let handler = handler.clone();
        tracker.spawn(async move {
            let reply = handler(tag, req.message().clone()).await;
            if let Err(e) = req.respond(reply).await {
                tracing::debug!(what, error = %e, "cannot send a reply");
            }
        });
    }
    drop(requests);
    tracker.close();
    if !tracker.is_empty() {
        tracing::info!(
            what,
            in_flight = tracker.len(),
            "answering requests in flight"
        );
    }
    tracker.wait().await;
}

/// `payload` decoded as `T`, or the `invalid_request` error to answer.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ErrorBody> {
    serde_json::from_slice(payload)
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e.to_string()))
}

/// Decodes `payload` as `Req` and answers with `handle`; a request that
/// does not decode is answered `R::from_error(invalid_request)`, after
/// `on_invalid` (a counter, a log line) saw the error.
pub async fn answer_json<Req, R, Fut>(
    payload: &[u8],
    on_invalid: impl FnOnce(&ErrorBody),
    handle: impl FnOnce(Req) -> Fut,
) -> Reply
where
    Req: DeserializeOwned,
    R: ErrorReply,
    Fut: Future<Output = R>,
{
    match decode::<Req>(payload) {
        Ok(req) => Reply::json(&handle(req).await),
        Err(e) => {
            on_invalid(&e);
            Reply::json(&R::from_error(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::Notify;
    use warden_testsupport::{eventually, NatsServer};

    #[tokio::test]
    async fn a_request_in_flight_is_answered_after_shutdown() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.expect("connects");
        let sub = client.subscribe("t.serve").await.expect("subscribes");
        client.flush().await.expect("flushes");
        let shutdown = CancellationToken::new();
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (s, r) = (started.clone(), release.clone());
        let serving = tokio::spawn({
            let client = client.clone();
            let shutdown = shutdown.clone();
            async move {
                serve("test", subscription(client, sub), &shutdown, move |m| {
                    let (s, r) = (s.clone(), r.clone());
                    async move {
                        s.notify_one();
                        r.notified().await;
                        Reply::from(m.payload)
                    }
                })
                .await
            }
        });
        let asking = tokio::spawn({
            let client = client.clone();
            async move { client.request("t.serve", "ping".into()).await }
        });
        started.notified().await;
        shutdown.cancel();
        // The loop stopped taking requests but waits for the one in flight.
        eventually(Duration::from_secs(5), "unsubscribed", || async {
            let late = tokio::time::timeout(
                Duration::from_millis(300),
                client.request("t.serve", "late".into()),
            )
            .await;
            matches!(late, Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders)
                .then_some(())
        })
        .await;
        assert!(!serving.is_finished());
        release.notify_one();
        let reply = asking.await.expect("joins").expect("answered");
        assert_eq!(&reply.payload[..], b"ping");
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("serve returns once drained")
            .expect("joins");
    }

    #[tokio::test]
    async fn an_undecodable_request_is_invalid_request() {
        #[derive(serde::Deserialize)]
        struct Req {
            #[allow(dead_code)]
            resource: String,
        }
        let invalid = std::sync::atomic::AtomicU32::new(0);
        let reply = answer_json(
            b"{not json",
            |_| {
                invalid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
            |_: Req| async {
                crate::messages::CheckReply::from_error(ErrorBody::new(ErrorCode::Internal, "no"))
            },
        )
        .await;
        let back: crate::messages::CheckReply =
            serde_json::from_slice(&reply.payload).expect("decodes");
        assert_eq!(back.error.map(|e| e.code), Some(ErrorCode::InvalidRequest));
        assert_eq!(invalid.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
