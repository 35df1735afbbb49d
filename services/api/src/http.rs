//! HTTP JSON: the routes, the bearer-token check for writes, and the
//! mapping of every failure (including axum's own extractor rejections) to
//! `{"error": {"code", "message"}}`.

use std::sync::Arc;
use std::time::{Duration, Instant};
use warden_shared::error::ErrorCode;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::ops::{OpError, Ops};
use crate::redact;
use crate::types::IDEMPOTENT_REPLAYED;
use crate::types::{
    BotsQuery, CancelBody, ErrorReply, ListQuery, RetryBody, StateRequest, StatsQuery, TakeRequest,
};
use warden_shared::job::NewJob;

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorReply { error: self.body })).into_response()
    }
}

/// One route of the job API: the single list [`router`] is built from,
/// [`route_name`] names metrics by, and the OpenAPI document
/// (`services/api/openapi.json`) is checked against (`tests/openapi.rs`).
pub struct Route {
    pub method: Method,
    /// The path as axum matches it (`{id}` is a job id).
    pub path: &'static str,
    /// The `route` label of `warden_api_requests_total`, and the
    /// operation's `operationId` in the OpenAPI document.
    pub name: &'static str,
    /// Every status the route answers with, success and errors.
    pub statuses: &'static [u16],
    handler: fn(MethodFilter) -> MethodRouter<Arc<Ops>>,
}

/// The job API. Writes (POST) need the bearer token when one is set.
pub const ROUTES: &[Route] = &[
    Route {
        method: Method::GET,
        path: "/api/v1/jobs",
        name: "job_list",
        statuses: &[200, 400, 503],
        handler: |m| on(m, list_jobs),
    },
    Route {
        method: Method::POST,
        path: "/api/v1/jobs",
        name: "job_create",
        statuses: &[200, 201, 400, 401, 409, 413, 500, 503],
        handler: |m| on(m, create_job),
    },
    Route {
        method: Method::GET,
        path: "/api/v1/jobs/{id}",
        name: "job_get",
        statuses: &[200, 400, 404, 500, 503],
        handler: |m| on(m, get_job),
    },
    Route {
        method: Method::POST,
        path: "/api/v1/jobs/{id}/retry",
        name: "job_retry",
        statuses: &[200, 400, 401, 404, 409, 413, 500, 503],
        handler: |m| on(m, retry_job),
    },
    Route {
        method: Method::POST,
        path: "/api/v1/jobs/{id}/cancel",
        name: "job_cancel",
        statuses: &[200, 400, 401, 404, 409, 413, 500, 503],
        handler: |m| on(m, cancel_job),
    },
    Route {
        method: Method::POST,
        path: "/api/v1/jobs/{id}/state",
        name: "job_state",
        statuses: &[200, 202, 400, 401, 404, 409, 413, 500, 503],
        handler: |m| on(m, switch_state),
    },
    Route {
        method: Method::POST,
        path: "/api/v1/executions",
        name: "execution_take",
        statuses: &[200, 400, 401, 413, 500, 503],
        handler: |m| on(m, take),
    },
    Route {
        method: Method::GET,
        path: "/api/v1/stats",
        name: "stats",
        statuses: &[200, 400, 503],
        handler: |m| on(m, stats),
    },
    Route {
        method: Method::GET,
        path: "/api/v1/bots",
        name: "bots",
        statuses: &[200, 400, 503],
        handler: |m| on(m, bots),
    },
    Route {
        method: Method::GET,
        path: "/api/v1/resources",
        name: "resources",
        statuses: &[200, 503],
        handler: |m| on(m, resources),
    },
    Route {
        method: Method::GET,
        path: "/api/v1/openapi.json",
        name: "openapi",
        statuses: &[200],
        handler: |m| on(m, openapi),
    },
];

/// Served by `warden_shared::metrics::router()` beside the job API, with
/// their route names.
pub const SHARED_ROUTES: &[(Method, &str, &str)] = &[
    (Method::GET, "/metrics", "metrics"),
    (Method::GET, "/healthz", "healthz"),
];

/// The OpenAPI 3.1 document of this API, served at
/// `GET /api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// The whole HTTP surface: the job API ([`ROUTES`]), `/metrics`,
/// `/healthz` and the web console ([`crate::console::ROUTES`]). `shutdown`
/// ends the console's live event streams.
pub fn router(ops: Arc<Ops>, shutdown: CancellationToken) -> Router {
    let max_body = ops.config.http.max_body_bytes;
    let mut api = Router::new();
    for r in ROUTES {
        let filter = MethodFilter::try_from(r.method.clone())
            .expect("every route's method is one axum can route");
        api = api.route(r.path, (r.handler)(filter));
    }
    let console = crate::console::router(ops.clone(), shutdown)
        .route_layer(middleware::from_fn_with_state(ops.clone(), read_body))
        .layer(DefaultBodyLimit::max(max_body));
    let api = api
        .method_not_allowed_fallback(method_not_allowed)
        // Inner first: the token is checked before the body is read.
        .route_layer(middleware::from_fn_with_state(ops.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(ops.clone(), require_token))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(ops.clone());
    api.merge(console)
        .merge(warden_shared::metrics::router())
        .fallback(move |headers: HeaderMap, uri: axum::http::Uri| {
            not_found(ops.clone(), headers, uri)
        })
        .layer(middleware::from_fn(track))
}

/// Serves `app` on `listener` until `shutdown`, then lets open
/// connections finish (the caller bounds how long). Unlike `axum::serve`
/// it closes a connection that has not sent a whole request head within
/// `header_timeout` (slowloris), counted as `header_timeout` in
/// `warden_api_http_refusals_total`. HTTP/1.1 only, like axum's default.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little
                    // rather than spin.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    metrics::http_refused(metrics::HEADER_TIMEOUT);
                    tracing::debug!("closed a connection that sent no request head in time");
                } else {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Why a request body could not be had.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    TimedOut,
    TooLarge,
    Unreadable,
}

/// The whole of `body`, at most `max` bytes, by `deadline`.
pub async fn collect_body(
    body: Body,
    max: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(BodyError::TimedOut),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(_))) => return Err(BodyError::Unreadable),
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > max {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

/// Reads the body whole within `http.body_timeout` before the handler
/// runs, so a client trickling a body cannot hold a handler (and its
/// connection) open: too slow is 400 `invalid_body`, the connection
/// closed, and counted as `body_timeout`.
async fn read_body(State(ops): State<Arc<Ops>>, req: Request, next: Next) -> Response {
    let http = &ops.config.http;
    let deadline = tokio::time::Instant::now() + http.body_timeout;
    let (parts, body) = req.into_parts();
    match collect_body(body, http.max_body_bytes, deadline).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(BodyError::TooLarge) => {
            OpError::too_large("request body is larger than http.max_body_bytes").into_response()
        }
        Err(BodyError::Unreadable) => {
            OpError::bad_request(ErrorCode::InvalidBody, "cannot read the request body")
                .into_response()
        }
        Err(BodyError::TimedOut) => {
            metrics::http_refused(metrics::BODY_TIMEOUT);
            let mut resp = OpError::bad_request(
                ErrorCode::InvalidBody,
                format!(
                    "request body not received within http.body_timeout ({:?})",
                    http.body_timeout
                ),
            )
            .into_response();
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            resp
        }
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn create_job(
    State(ops): State<Arc<Ops>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpError> {
    let body = body.map_err(body_rejection)?;
    let req: NewJob = serde_json::from_slice(&body).map_err(|e| OpError::from_json(&e))?;
    let created = ops.create(req).await?;
    if created.replayed {
        return Ok((
            StatusCode::OK,
            [(IDEMPOTENT_REPLAYED, "true")],
            Json(created.job),
        )
            .into_response());
    }
    Ok((StatusCode::CREATED, Json(created.job)).into_response())
}

/// Whether this request sees whole answers (see [`redact`]).
pub(crate) fn sees_everything(ops: &Ops, headers: &HeaderMap) -> bool {
    redact::sees_everything(ops.config.http.token.as_deref(), bearer(headers))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn get_job(
    State(ops): State<Arc<Ops>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, OpError> {
    let Path(id) = id.map_err(|e| OpError::bad_request(ErrorCode::InvalidId, e.body_text()))?;
    let mut job = ops.get_str(&id).await?;
    if !sees_everything(&ops, &headers) {
        redact::redact_job(&mut job);
    }
    Ok(Json(job).into_response())
}

async fn retry_job(
    State(ops): State<Arc<Ops>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpError> {
    let Path(id) = id.map_err(|e| OpError::bad_request(ErrorCode::InvalidId, e.body_text()))?;
    let body = body.map_err(body_rejection)?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let _: RetryBody = serde_json::from_slice(&body).map_err(|e| OpError::from_json(&e))?;
    }
    Ok(Json(ops.retry(&id).await?).into_response())
}

async fn cancel_job(
    State(ops): State<Arc<Ops>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpError> {
    let Path(id) = id.map_err(|e| OpError::bad_request(ErrorCode::InvalidId, e.body_text()))?;
    let body = body.map_err(body_rejection)?;
    let req: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| OpError::from_json(&e))?
    };
    Ok(Json(ops.cancel(&id, req.reason).await?).into_response())
}

async fn stats(
    State(ops): State<Arc<Ops>>,
    query: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Response, OpError> {
    let Query(q) =
        query.map_err(|e| OpError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
    Ok(Json(ops.stats(q).await?).into_response())
}

async fn resources(State(ops): State<Arc<Ops>>, headers: HeaderMap) -> Result<Response, OpError> {
    let mut all = ops.resource_records().await?;
    if !sees_everything(&ops, &headers) {
        all.iter_mut().for_each(redact::redact_resource);
    }
    Ok(Json(crate::types::ResourcesReply {
        resources: warden_shared::resource::listing(&all),
    })
    .into_response())
}

async fn bots(
    State(ops): State<Arc<Ops>>,
    headers: HeaderMap,
    query: Result<Query<BotsQuery>, QueryRejection>,
) -> Result<Response, OpError> {
    let Query(q) =
        query.map_err(|e| OpError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
    let mut reply = ops.bots(q).await?;
    if !sees_everything(&ops, &headers) {
        reply.bots.iter_mut().for_each(redact::redact_session);
    }
    Ok(Json(reply).into_response())
}

async fn take(
    State(ops): State<Arc<Ops>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpError> {
    let body = body.map_err(body_rejection)?;
    let req: TakeRequest = serde_json::from_slice(&body).map_err(|e| OpError::from_json(&e))?;
    Ok(Json(ops.take(req).await?).into_response())
}

/// 200 when the switch is recorded, 202 when it is accepted but the
/// scheduler has not recorded it yet.
async fn switch_state(
    State(ops): State<Arc<Ops>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpError> {
    let Path(id) = id.map_err(|e| OpError::bad_request(ErrorCode::InvalidId, e.body_text()))?;
    let body = body.map_err(body_rejection)?;
    let req: StateRequest = serde_json::from_slice(&body).map_err(|e| OpError::from_json(&e))?;
    if req.id.as_deref().is_some_and(|given| given != id) {
        return Err(OpError::bad_request(
            ErrorCode::InvalidRequest,
            "id in the body differs from the job in the path",
        ));
    }
    let reply = ops.switch_state(&id, req).await?;
    let status = if reply.applied {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(reply)).into_response())
}

async fn list_jobs(
    State(ops): State<Arc<Ops>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, OpError> {
    let Query(q) =
        query.map_err(|e| OpError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
    Ok(Json(ops.list(q).await?).into_response())
}

fn body_rejection(e: BytesRejection) -> OpError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        OpError::too_large("request body is larger than http.max_body_bytes")
    } else {
        OpError::bad_request(ErrorCode::InvalidBody, e.body_text())
    }
}

/// JSON for API clients; a page for a browser that asked for HTML.
async fn not_found(ops: Arc<Ops>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    if crate::console::wants_html(&headers) {
        return crate::console::not_found_page(&ops, &headers, &uri);
    }
    OpError::not_found("no such route").into_response()
}

async fn method_not_allowed() -> OpError {
    OpError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

/// Writes need `Authorization: Bearer <http.token>` when a token is set;
/// reads are open. Checked before the body is read.
async fn require_token(State(ops): State<Arc<Ops>>, req: Request, next: Next) -> Response {
    let Some(token) = ops.config.http.token.as_deref() else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => {
            metrics::http_refused(metrics::NO_TOKEN);
            let mut resp = OpError::new(
                ErrorCode::Unauthorized,
                "writes need Authorization: Bearer <token>",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

/// Compares without stopping at the first difference, so response timing
/// does not tell how much of a guessed token was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every request under a bounded route name (never the raw path,
/// which carries job ids).
async fn track(req: Request, next: Next) -> Response {
    let route = route_name(
        req.method(),
        req.extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics::observe(route, resp.status().as_u16(), start.elapsed());
    resp
}

fn route_name(method: &Method, path: Option<&str>) -> &'static str {
    let Some(path) = path else {
        return "other";
    };
    if let Some(r) = ROUTES
        .iter()
        .find(|r| r.path == path && r.method == *method)
    {
        return r.name;
    }
    if let Some(r) = crate::console::ROUTES.iter().find(|r| {
        r.path == path
            && (r.method == *method || (r.method == Method::GET && method == Method::HEAD))
    }) {
        return r.name;
    }
    // Any method: axum's `get` also answers HEAD.
    SHARED_ROUTES
        .iter()
        .find(|(_, p, _)| *p == path)
        .map_or("other", |(_, _, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_named_without_ids() {
        for (method, path, name) in [
            (Method::POST, "/api/v1/jobs/{id}/retry", "job_retry"),
            (Method::POST, "/api/v1/jobs/{id}/cancel", "job_cancel"),
            (Method::GET, "/api/v1/jobs/{id}", "job_get"),
            (Method::GET, "/api/v1/jobs/{id}/retry", "other"),
            (Method::GET, "/api/v1/openapi.json", "openapi"),
            (Method::GET, "/metrics", "metrics"),
            (Method::HEAD, "/healthz", "healthz"),
        ] {
            assert_eq!(route_name(&method, Some(path)), name, "{method} {path}");
        }
        assert_eq!(route_name(&Method::POST, None), "other");
        let mut names: Vec<&str> = ROUTES.iter().map(|r| r.name).collect();
        names.extend(SHARED_ROUTES.iter().map(|(_, _, n)| *n));
        names.extend(crate::console::ROUTES.iter().map(|r| r.name));
        for r in crate::console::ROUTES {
            assert_eq!(
                route_name(&r.method, Some(r.path)),
                r.name,
                "{} {}",
                r.method,
                r.path
            );
        }
        assert_eq!(route_name(&Method::POST, Some("/jobs")), "other");
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "route names are unique");
        for r in ROUTES {
            assert_eq!(route_name(&r.method, Some(r.path)), r.name);
            assert!(
                MethodFilter::try_from(r.method.clone()).is_ok(),
                "{}",
                r.method
            );
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
