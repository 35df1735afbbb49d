//! The same operations over NATS request/reply, as an async-nats service
//! (`$SRV.PING/INFO/STATS` discovery for free). Replies are the result's
//! JSON or `{"error": {...}}`; error replies also carry the
//! `Nats-Service-Error` headers so generic service tooling sees them.

use std::sync::Arc;
use std::time::Instant;
use warden_shared::error::ErrorCode;

use async_nats::service::{self, Service, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use warden_shared::serve::{serve_tagged, Reply};
use warden_shared::subjects;

use crate::metrics;
use crate::ops::{OpError, Ops};
use crate::types::{
    BotsQuery, CancelRequest, ErrorReply, ListQuery, StateRequest, StatsQuery, TakeRequest,
    IDEMPOTENT_REPLAYED,
};
use warden_shared::job::NewJob;

const ENDPOINTS: usize = 10;

/// Every endpoint (name, subject), in the order [`serve`] takes them. The
/// name is the HTTP route's; the OpenAPI document names each subject in
/// its operation's `x-nats-subject` (checked by `tests/openapi.rs`).
pub const ENDPOINT_SUBJECTS: [(&str, &str); ENDPOINTS] = [
    ("job_create", subjects::API_JOB_CREATE),
    ("job_get", subjects::API_JOB_GET),
    ("job_list", subjects::API_JOB_LIST),
    ("job_retry", subjects::API_JOB_RETRY),
    ("job_cancel", subjects::API_JOB_CANCEL),
    ("stats", subjects::API_STATS),
    ("job_state", subjects::API_JOB_STATE),
    ("execution_take", subjects::API_EXECUTION_TAKE),
    ("bots", subjects::API_BOTS),
    ("resources", subjects::API_RESOURCES),
];

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Create,
    Get,
    List,
    Retry,
    Cancel,
    Stats,
    State,
    Take,
    Bots,
    Resources,
}

impl Endpoint {
    fn route(self) -> &'static str {
        match self {
            Endpoint::Create => "nats_job_create",
            Endpoint::Get => "nats_job_get",
            Endpoint::List => "nats_job_list",
            Endpoint::Retry => "nats_job_retry",
            Endpoint::Cancel => "nats_job_cancel",
            Endpoint::Stats => "nats_stats",
            Endpoint::State => "nats_job_state",
            Endpoint::Take => "nats_execution_take",
            Endpoint::Bots => "nats_bots",
            Endpoint::Resources => "nats_resources",
        }
    }
}

/// The body of job.get as received: the id stays a string so a malformed
/// one is `invalid_id`, as over HTTP, rather than a decoding error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGetRequest {
    id: String,
}

/// Registers the service and its endpoints.
pub async fn start(
    client: &async_nats::Client,
) -> Result<(Service, [service::endpoint::Endpoint; ENDPOINTS]), async_nats::Error> {
    let svc = client
        .service_builder()
        .description(
            "Warden job API: create, get, search, retry and cancel jobs; external executors \
             take jobs and switch their state; bots, resources and statistics",
        )
        .start(subjects::API_SERVICE, env!("CARGO_PKG_VERSION"))
        .await?;
    let mut endpoints = Vec::with_capacity(ENDPOINTS);
    for (name, subject) in ENDPOINT_SUBJECTS {
        endpoints.push(svc.endpoint_builder().name(name).add(subject).await?);
    }
    let endpoints: [service::endpoint::Endpoint; ENDPOINTS] =
        endpoints.try_into().map_err(|_| "endpoint count")?;
    Ok((svc, endpoints))
}

/// Answers requests until `shutdown`, each in its own task so a slow
/// store write does not hold up searches; then stops taking requests and
/// answers those taken ([`warden_shared::serve`]).
pub async fn serve(
    ops: Arc<Ops>,
    endpoints: [service::endpoint::Endpoint; ENDPOINTS],
    shutdown: CancellationToken,
) {
    use warden_shared::serve::endpoint as requests_of;
    let [create, get, list, retry, cancel, stats, state, take, bots, resources] = endpoints;
    let requests = futures::stream::select_all([
        requests_of(create).map(|r| (Endpoint::Create, r)).boxed(),
        requests_of(get).map(|r| (Endpoint::Get, r)).boxed(),
        requests_of(list).map(|r| (Endpoint::List, r)).boxed(),
        requests_of(retry).map(|r| (Endpoint::Retry, r)).boxed(),
        requests_of(cancel).map(|r| (Endpoint::Cancel, r)).boxed(),
        requests_of(stats).map(|r| (Endpoint::Stats, r)).boxed(),
        requests_of(state).map(|r| (Endpoint::State, r)).boxed(),
        requests_of(take).map(|r| (Endpoint::Take, r)).boxed(),
        requests_of(bots).map(|r| (Endpoint::Bots, r)).boxed(),
        requests_of(resources)
            .map(|r| (Endpoint::Resources, r))
            .boxed(),
    ]);
    serve_tagged("api", requests, &shutdown, move |endpoint, message| {
        let ops = ops.clone();
        async move { answer(&ops, endpoint, &message.payload).await }
    })
    .await;
}

/// The reply to one request, its route's metrics observed.
async fn answer(ops: &Ops, endpoint: Endpoint, payload: &[u8]) -> Reply {
    let start = Instant::now();
    let result = handle(ops, endpoint, payload).await;
    let status = match &result {
        Ok(_) => 200,
        Err(e) => e.status,
    };
    metrics::observe(endpoint.route(), status, start.elapsed());
    match result {
        Ok((body, false)) => Reply::from(body),
        Ok((body, true)) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(IDEMPOTENT_REPLAYED, "true");
            Reply {
                payload: body,
                headers: Some(headers),
            }
        }
        Err(e) => {
            let mut headers = async_nats::HeaderMap::new();
            // The code, not the message: header values must stay on one line.
            headers.insert(service::NATS_SERVICE_ERROR, e.body.code.as_str());
            headers.insert(
                service::NATS_SERVICE_ERROR_CODE,
                e.status.to_string().as_str(),
            );
            let body = encode(&ErrorReply { error: e.body }).unwrap_or_default();
            Reply {
                payload: body,
                headers: Some(headers),
            }
        }
    }
}

/// A reply's body, and whether it is a replayed create.
async fn handle(ops: &Ops, endpoint: Endpoint, payload: &[u8]) -> Result<(Bytes, bool), OpError> {
    if payload.len() > ops.config.http.max_body_bytes {
        return Err(OpError::too_large(
            "request is larger than http.max_body_bytes",
        ));
    }
    match endpoint {
        Endpoint::Create => {
            let req: NewJob = decode(payload)?;
            let created = ops.create(req).await?;
            Ok((encode(&created.job)?, created.replayed))
        }
        _ => handle_other(ops, endpoint, payload)
            .await
            .map(|b| (b, false)),
    }
}

/// Every endpoint but create (its reply may be a replay), size checked.
async fn handle_other(ops: &Ops, endpoint: Endpoint, payload: &[u8]) -> Result<Bytes, OpError> {
    match endpoint {
        Endpoint::Create => Err(OpError::internal("create is answered by `handle`")),
        Endpoint::Get => {
            let req: RawGetRequest = decode(payload)?;
            encode(&ops.get_str(&req.id).await?)
        }
        Endpoint::List => {
            // An empty request is a search with no filters.
            let req: ListQuery = if payload.iter().all(u8::is_ascii_whitespace) {
                ListQuery::default()
            } else {
                decode(payload)?
            };
            encode(&ops.list(req).await?)
        }
        Endpoint::Retry => {
            let req: RawGetRequest = decode(payload)?;
            encode(&ops.retry(&req.id).await?)
        }
        Endpoint::Cancel => {
            let req: CancelRequest = decode(payload)?;
            encode(&ops.cancel(&req.id, req.reason).await?)
        }
        Endpoint::Stats => {
            let req: StatsQuery = if payload.iter().all(u8::is_ascii_whitespace) {
                StatsQuery::default()
            } else {
                decode(payload)?
            };
            encode(&ops.stats(req).await?)
        }
        Endpoint::State => {
            let req: StateRequest = decode(payload)?;
            let Some(id) = req.id.clone() else {
                return Err(OpError::bad_request(
                    ErrorCode::InvalidRequest,
                    "missing field `id` (the job)",
                ));
            };
            encode(&ops.switch_state(&id, req).await?)
        }
        Endpoint::Take => {
            let req: TakeRequest = decode(payload)?;
            encode(&ops.take(req).await?)
        }
        Endpoint::Bots => {
            let req: BotsQuery = if payload.iter().all(u8::is_ascii_whitespace) {
                BotsQuery::default()
            } else {
                decode(payload)?
            };
            encode(&ops.bots(req).await?)
        }
        Endpoint::Resources => encode(&ops.resources().await?),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, OpError> {
    serde_json::from_slice(payload).map_err(|e| OpError::from_json(&e))
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, OpError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| OpError::internal(format!("cannot encode reply: {e}")))
}
