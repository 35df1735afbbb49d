//! The operators' web console, served by the API on its own listener:
//! plain HTML pages rendered on the server ([`views`]), one stylesheet and
//! one small script embedded in the binary, nothing loaded from anywhere
//! else (it works on an offline network).
//!
//! - Reads go through the same [`Ops`] as the JSON API, with the same
//!   validation, error codes and redaction.
//! - Writes are POSTed forms; [`auth`] says who may make them.
//! - Pages refresh their live part (`#live`) without a reload: the script
//!   listens on `/events` (server-sent events, one per batch of job
//!   changes the index applies) and polls every 10 s besides (sessions and
//!   resources change without a job changing).

pub mod auth;
pub mod chart;
pub mod explain;
pub mod views;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Form, Router};
use chrono::Utc;
use futures::Stream;
use maud::Markup;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use warden_shared::error::ErrorCode;
use warden_shared::messages::{ErrorBody, HealthReply, HealthRequest, QueueReply, MESSAGE_VERSION};
use warden_shared::{subjects, JobState};

use crate::metrics;
use crate::ops::{OpError, Ops};
use crate::redact;
use crate::types::{BotsQuery, ListQuery, StatsQuery};
use views::{Notice, Section, Viewer};

/// One console route: what [`router`] is built from and what
/// `warden_api_requests_total` names it by (its `route` label).
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub name: &'static str,
    handler: fn(MethodFilter) -> MethodRouter<Arc<Console>>,
}

const fn route(
    method: Method,
    path: &'static str,
    name: &'static str,
    handler: fn(MethodFilter) -> MethodRouter<Arc<Console>>,
) -> Route {
    Route {
        method,
        path,
        name,
        handler,
    }
}

/// Every console route.
pub const ROUTES: &[Route] = &[
    route(Method::GET, "/", "console_overview", |m| on(m, overview)),
    route(Method::GET, "/jobs", "console_jobs", |m| on(m, jobs)),
    route(Method::GET, "/jobs/{id}", "console_job", |m| on(m, job)),
    route(Method::POST, "/jobs/{id}/retry", "console_job_retry", |m| {
        on(m, retry)
    }),
    route(
        Method::POST,
        "/jobs/{id}/cancel",
        "console_job_cancel",
        |m| on(m, cancel),
    ),
    route(Method::GET, "/bots", "console_bots", |m| on(m, bots)),
    route(Method::GET, "/resources", "console_resources", |m| {
        on(m, resources)
    }),
    route(
        Method::POST,
        "/resources/check",
        "console_resource_check",
        |m| on(m, resource_check),
    ),
    route(
        Method::POST,
        "/resources/close",
        "console_resource_close",
        |m| on(m, resource_close),
    ),
    route(Method::GET, "/queues", "console_queues", |m| on(m, queues)),
    route(Method::GET, "/stats", "console_stats", |m| on(m, stats)),
    route(Method::GET, "/login", "console_login_form", |m| {
        on(m, login_form)
    }),
    route(Method::POST, "/login", "console_login", |m| on(m, login)),
    route(Method::POST, "/logout", "console_logout", |m| on(m, logout)),
    route(Method::GET, "/events", "console_events", |m| on(m, events)),
    route(Method::GET, "/assets/{file}", "console_asset", |m| {
        on(m, asset)
    }),
    route(Method::GET, "/favicon.ico", "console_favicon", |m| {
        on(m, favicon)
    }),
];

/// Live pages open at once (each holds one `/events` stream); past it a
/// page falls back to polling.
pub const MAX_LIVE_STREAMS: usize = 256;
/// How long the console waits for the scheduler's or health service's
/// answer before it says that it did not get one.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Job changes closer together than this reach a page as one event.
const LIVE_COALESCE: Duration = Duration::from_millis(250);

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/favicon.svg");

/// The content security policy of every console response: nothing but
/// this server's own stylesheet, script and images, no inline script, no
/// framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub struct Console {
    ops: Arc<Ops>,
    shutdown: CancellationToken,
    live: Arc<Semaphore>,
    /// The last walk of the waiting jobs, reused for [`QUEUE_REUSE`]: the
    /// walk grows with the backlog, and every open queue page refreshes
    /// at each batch of job changes.
    queue_rows: std::sync::Mutex<Option<(std::time::Instant, Vec<crate::index::QueueRow>)>>,
}

/// How long one walk of the waiting jobs serves the queue page (the
/// scheduler's own snapshot is as old).
const QUEUE_REUSE: Duration = Duration::from_secs(1);

type Shared = State<Arc<Console>>;

/// The console's routes (merged into the API's router).
pub fn router(ops: Arc<Ops>, shutdown: CancellationToken) -> Router {
    let console = Arc::new(Console {
        ops: ops.clone(),
        shutdown,
        live: Arc::new(Semaphore::new(MAX_LIVE_STREAMS)),
        queue_rows: std::sync::Mutex::new(None),
    });
    let mut router = Router::new();
    for r in ROUTES {
        let filter = MethodFilter::try_from(r.method.clone())
            .expect("every console route's method is one axum can route");
        router = router.route(r.path, (r.handler)(filter));
    }
    router
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

/// Headers on every console response: the CSP, no sniffing, no framing,
/// a referrer only within this site (job ids stay here; `no-referrer`
/// would make browsers send `Origin: null` on the console's own forms),
/// and no caching of pages.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_asset = req.uri().path().starts_with("/assets/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The request as the console sees it: who is looking, and the CSRF
/// cookie to set if the browser has none yet.
struct Seen {
    viewer: Viewer,
    set_csrf: Option<String>,
}

fn cookie_header(headers: &HeaderMap) -> &str {
    headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Sees whole pages and may write: no token is set, the request carries
/// it (as the API takes it), or it is signed in.
fn signed_in(ops: &Ops, headers: &HeaderMap) -> bool {
    if crate::http::sees_everything(ops, headers) {
        return true;
    }
    ops.config.http.token.as_deref().is_some_and(|token| {
        auth::cookie(cookie_header(headers), auth::SESSION_COOKIE)
            .is_some_and(|v| auth::session_valid(token, v, Utc::now()))
    })
}

fn seen(ops: &Ops, headers: &HeaderMap, uri: &Uri) -> Seen {
    let existing = auth::cookie(cookie_header(headers), auth::CSRF_COOKIE)
        .filter(|c| auth::csrf_well_formed(c))
        .map(str::to_string);
    let (csrf, set_csrf) = match existing {
        Some(c) => (c, None),
        None => {
            let c = auth::new_csrf();
            (c.clone(), Some(c))
        }
    };
    Seen {
        viewer: Viewer {
            token_set: ops.config.http.token.is_some(),
            signed_in: signed_in(ops, headers),
            csrf,
            here: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
        },
        set_csrf,
    }
}

fn cookie(name: &str, value: &str, max_age: i64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn html(seen: &Seen, status: StatusCode, page: Markup) -> Response {
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page.into_string(),
    )
        .into_response();
    if let Some(c) = &seen.set_csrf {
        resp.headers_mut().append(
            header::SET_COOKIE,
            cookie(auth::CSRF_COOKIE, c, 30 * 86_400),
        );
    }
    resp
}

fn error_page(seen: &Seen, e: &OpError, back: Option<(&str, &str)>) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    html(
        seen,
        status,
        views::error_page(&seen.viewer, e.status, &e.body, back),
    )
}

/// A 404 page for a browser (the API's fallback sends JSON otherwise).
pub fn not_found_page(ops: &Ops, headers: &HeaderMap, uri: &Uri) -> Response {
    let s = seen(ops, headers, uri);
    error_page(
        &s,
        &OpError::not_found(format!("there is no page at {}", uri.path())),
        Some(("/", "Go to the overview")),
    )
}

/// Whether a request comes from a browser that wants a page.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn notice(done: Option<&str>, name: Option<&str>) -> Option<Notice> {
    let name = name.unwrap_or("the resource");
    let (ok, text) = match done? {
        "retried" => (
            true,
            "Retried: the job is scheduled again with a fresh attempt budget.".to_string(),
        ),
        "cancelled" => (
            true,
            "Cancelled. A running worker stops at its next heartbeat.".to_string(),
        ),
        "check_passed" => (true, format!("{name} passed its check.")),
        "check_failed" => (
            false,
            format!("{name} failed its check: it will be recycled and its work requeued."),
        ),
        "closed" => (
            true,
            format!(
                "{name} is closed: its leases are taken back and a recycle event is published."
            ),
        ),
        "signed_in" => (true, "Signed in.".to_string()),
        "signed_out" => (true, "Signed out.".to_string()),
        _ => return None,
    };
    Some(Notice { ok, text })
}

#[derive(Debug, Default, Deserialize)]
struct Done {
    done: Option<String>,
    name: Option<String>,
}

/// Splits `done`/`name` (the console's own notices) from a page's query.
fn split_done(raw: Option<&str>) -> (Option<Notice>, String) {
    let raw = raw.unwrap_or("");
    let d: Done = serde_urlencoded_like(raw);
    let rest: Vec<&str> = raw
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("done=") && !kv.starts_with("name="))
        .collect();
    (notice(d.done.as_deref(), d.name.as_deref()), rest.join("&"))
}

fn serde_urlencoded_like<T: for<'de> Deserialize<'de> + Default>(raw: &str) -> T {
    Query::<T>::try_from_uri(&Uri::try_from(format!("/?{raw}")).unwrap_or_default())
        .map(|q| q.0)
        .unwrap_or_default()
}

fn bad_query(e: impl std::fmt::Display) -> OpError {
    OpError::bad_request(
        ErrorCode::InvalidQuery,
        format!("the page's query does not parse: {e}"),
    )
}

/// Asks the scheduler for its queue snapshot.
async fn scheduler_queue(ops: &Ops) -> Result<QueueReply, String> {
    let asked = tokio::time::timeout(
        ASK_TIMEOUT,
        ops.client.request(subjects::SCHED_QUEUE, Vec::new().into()),
    )
    .await;
    match asked {
        Ok(Ok(m)) => serde_json::from_slice(&m.payload)
            .map_err(|e| format!("the scheduler's queue answer does not decode: {e}")),
        Ok(Err(e)) => Err(format!(
            "the scheduler did not answer ({e}): is warden-scheduler running?"
        )),
        Err(_) => Err(format!(
            "the scheduler did not answer within {ASK_TIMEOUT:?}"
        )),
    }
}

async fn overview(State(c): Shared, headers: HeaderMap, uri: Uri) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    let ops = &c.ops;
    if let Err(e) = ops.index_ready().await {
        return error_page(&s, &e, None);
    }
    let (counts, trouble) = {
        let idx = ops.index.lock();
        let counts: Vec<(JobState, usize)> = JobState::ALL
            .iter()
            .map(|st| (*st, idx.count(*st)))
            .collect();
        let mut trouble = Vec::new();
        for st in [JobState::Crashed, JobState::Shelved] {
            let f = crate::index::Filter {
                state: Some(st),
                ..Default::default()
            };
            trouble.extend(idx.search(&f, 10, 0).jobs);
        }
        trouble.sort_by_key(|j| std::cmp::Reverse(j.updated_at));
        trouble.truncate(10);
        (counts, trouble)
    };
    let queue = scheduler_queue(ops).await;
    let bots = ops
        .bots(BotsQuery {
            state: Some("active".into()),
        })
        .await
        .map(|r| r.bots.len())
        .map_err(|e| e.body.message);
    let res = ops
        .resource_records()
        .await
        .map(|all| {
            all.iter()
                .filter(|r| r.state != warden_shared::resource::ResourceState::Open)
                .map(|r| {
                    (
                        r.name.clone(),
                        r.state.as_str().to_string(),
                        r.reason.clone(),
                    )
                })
                .collect()
        })
        .map_err(|e| e.body.message);
    let o = views::Overview {
        counts,
        queue: queue.as_ref().map_err(Clone::clone),
        active_bots: bots,
        resources_not_open: res,
        recent_trouble: &trouble,
    };
    let page = views::layout(
        "Overview",
        Section::Overview,
        &s.viewer,
        None,
        maud::html! {},
        views::overview(&o, Utc::now()),
    );
    html(&s, StatusCode::OK, page)
}

/// A time from the filter form: RFC 3339 as the API takes it, or the
/// `2026-12-01T10:00` a person types (read as UTC).
fn normalize_time(t: Option<String>) -> Option<String> {
    let t = t?;
    let trimmed = t.trim();
    if trimmed.is_empty() || chrono::DateTime::parse_from_rfc3339(trimmed).is_ok() {
        return Some(t);
    }
    for fmt in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(n) = chrono::NaiveDateTime::parse_from_str(trimmed, fmt) {
            return Some(n.and_utc().to_rfc3339());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(trimmed, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|n| n.and_utc().to_rfc3339());
    }
    Some(t)
}

async fn jobs(State(c): Shared, headers: HeaderMap, uri: Uri) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    let parsed = Query::<ListQuery>::try_from_uri(&uri);
    let (q, result) = match parsed {
        Ok(Query(q)) => {
            let mut api_q = q.clone();
            api_q.limit = Some(q.limit.unwrap_or(views::PAGE));
            api_q.since = normalize_time(api_q.since);
            api_q.until = normalize_time(api_q.until);
            let r = c.ops.list(api_q).await.map_err(|e| e.body);
            (q, r)
        }
        Err(e) => (ListQuery::default(), Err(bad_query(e.body_text()).body)),
    };
    let status = status_of(&result);
    let page = views::layout(
        "Jobs",
        Section::Jobs,
        &s.viewer,
        None,
        views::jobs_filters(&q),
        views::jobs_list(&q, &result, Utc::now()),
    );
    html(&s, status, page)
}

async fn job(State(c): Shared, headers: HeaderMap, uri: Uri, Path(id): Path<String>) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    let (n, _) = split_done(uri.query());
    let mut job = match c.ops.get_str(&id).await {
        Ok(j) => j,
        Err(e) => return error_page(&s, &e, Some(("/jobs", "Back to the jobs"))),
    };
    if !s.viewer.signed_in {
        redact::redact_job(&mut job);
    }
    let policy = c.ops.config.retry_policy(&job.task);
    let (used, allowed) = warden_shared::retry::budget(&job, &policy);
    let queue = if job.state == JobState::Scheduled {
        scheduler_queue(&c.ops).await.ok()
    } else {
        None
    };
    let pool = queue
        .as_ref()
        .and_then(|q| q.pools.iter().find(|p| p.pool == job.pool));
    let ctx = views::JobContext {
        attempts_used: used,
        attempts_allowed: allowed,
        pool,
        retryable: job.blame.is_some_and(|b| {
            policy.is_retryable(b, job.detail.as_deref().unwrap_or("unclassified"))
        }),
        now: Utc::now(),
    };
    let title = format!("Job {} · {}", &job.id.simple().to_string()[..8], job.task);
    let page = views::layout(
        &title,
        Section::Jobs,
        &s.viewer,
        n.as_ref(),
        maud::html! {},
        maud::html! { (views::job_actions(&job, &s.viewer)) (views::job_detail(&job, &ctx)) },
    );
    html(&s, StatusCode::OK, page)
}

/// The fields of every console form (each form sends some of them).
#[derive(Debug, Default, Deserialize)]
struct WriteForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    next: Option<String>,
}

/// The form, once the write checks pass; else the page that says why.
fn checked_form(
    c: &Console,
    headers: &HeaderMap,
    uri: &Uri,
    form: Result<Form<WriteForm>, FormRejection>,
    check_sign_in: bool,
) -> Result<(Seen, WriteForm), Box<Response>> {
    let s = seen(&c.ops, headers, uri);
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return Err(Box::new(error_page(
                &s,
                &OpError::bad_request(
                    ErrorCode::InvalidBody,
                    format!("the form does not parse: {}", e.body_text()),
                ),
                None,
            )))
        }
    };
    let h = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let req = auth::WriteRequest {
        host: h(header::HOST),
        origin: h(header::ORIGIN),
        sec_fetch_site: headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()),
        csrf_cookie: auth::cookie(cookie_header(headers), auth::CSRF_COOKIE),
        csrf_field: form.csrf.as_deref(),
        signed_in: s.viewer.signed_in,
    };
    match auth::allow_write(&req, check_sign_in) {
        Ok(()) => Ok((s, form)),
        Err(why) => {
            let (reason, status, message) = match why {
                auth::Refusal::NotSignedIn => (
                    metrics::NO_TOKEN,
                    StatusCode::UNAUTHORIZED,
                    "sign in with the API token to do this",
                ),
                auth::Refusal::BadCsrf => (
                    metrics::CSRF,
                    StatusCode::FORBIDDEN,
                    "this form is out of date or did not come from this console: reload the page and try again",
                ),
                auth::Refusal::CrossSite => (
                    metrics::CROSS_SITE,
                    StatusCode::FORBIDDEN,
                    "refused: the request came from another site",
                ),
            };
            metrics::http_refused(reason);
            tracing::info!(reason, path = %uri.path(), "console write refused");
            let body = ErrorBody::new(ErrorCode::Unauthorized, message);
            let page = views::error_page(
                &s.viewer,
                status.as_u16(),
                &body,
                Some((auth::safe_next(Some("/login")), "Sign in")),
            );
            Err(Box::new(html(&s, status, page)))
        }
    }
}

/// What a person does to a job from its page.
#[derive(Debug, Clone, Copy)]
enum JobWrite {
    Retry,
    Cancel,
}

async fn job_write(
    c: &Console,
    headers: &HeaderMap,
    uri: &Uri,
    id: String,
    form: Result<Form<WriteForm>, FormRejection>,
    what: JobWrite,
) -> Response {
    let (s, f) = match checked_form(c, headers, uri, form, true) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (result, done) = match what {
        JobWrite::Retry => (c.ops.retry(&id).await, "retried"),
        JobWrite::Cancel => {
            let reason = f
                .reason
                .filter(|r| !r.trim().is_empty())
                .or_else(|| Some("cancelled from the console".into()));
            (c.ops.cancel(&id, reason).await, "cancelled")
        }
    };
    match result {
        Ok(job) => Redirect::to(&format!("/jobs/{}?done={done}", job.id)).into_response(),
        Err(e) => error_page(&s, &e, Some((&format!("/jobs/{id}"), "Back to the job"))),
    }
}

async fn retry(
    State(c): Shared,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    form: Result<Form<WriteForm>, FormRejection>,
) -> Response {
    job_write(&c, &headers, &uri, id, form, JobWrite::Retry).await
}

async fn cancel(
    State(c): Shared,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    form: Result<Form<WriteForm>, FormRejection>,
) -> Response {
    job_write(&c, &headers, &uri, id, form, JobWrite::Cancel).await
}

async fn bots(State(c): Shared, headers: HeaderMap, uri: Uri) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    let q = Query::<BotsQuery>::try_from_uri(&uri);
    let (state, result) = match q {
        Ok(Query(q)) => {
            let state = q.state.clone().unwrap_or_default();
            let mut r = c.ops.bots(q).await.map(|r| r.bots).map_err(|e| e.body);
            if !s.viewer.signed_in {
                if let Ok(list) = r.as_mut() {
                    list.iter_mut().for_each(redact::redact_session);
                }
            }
            (state, r)
        }
        Err(e) => (String::new(), Err(bad_query(e.body_text()).body)),
    };
    let status = status_of(&result);
    let page = views::layout(
        "Bots and sessions",
        Section::Bots,
        &s.viewer,
        None,
        views::bots_filters(&state),
        views::bots(&result, Utc::now()),
    );
    html(&s, status, page)
}

fn status_of<T>(r: &Result<T, ErrorBody>) -> StatusCode {
    match r {
        Ok(_) => StatusCode::OK,
        Err(e) => StatusCode::from_u16(crate::ops::api_status(e.code).unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

async fn resources(State(c): Shared, headers: HeaderMap, uri: Uri) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    let (n, _) = split_done(uri.query());
    let mut all = c.ops.resource_records().await.map_err(|e| e.body);
    if !s.viewer.signed_in {
        if let Ok(list) = all.as_mut() {
            list.iter_mut().for_each(redact::redact_resource);
        }
    }
    let views_of = all.as_ref().map(|list| {
        list.iter()
            .map(|r| views::ResourceView {
                resource: r,
                dependents: warden_shared::resource::dependents(list, &r.name)
                    .into_iter()
                    .map(str::to_string)
                    .collect(),
            })
            .collect::<Vec<_>>()
    });
    let views_of = views_of.map_err(Clone::clone);
    let status = status_of(&views_of);
    let page = views::layout(
        "Resources",
        Section::Resources,
        &s.viewer,
        n.as_ref(),
        maud::html! {},
        views::resources(&views_of, &s.viewer, Utc::now()),
    );
    html(&s, status, page)
}

async fn ask_health(
    c: &Console,
    subject: &str,
    name: String,
    reason: Option<String>,
) -> Result<HealthReply, OpError> {
    c.ops.bus_up()?;
    let req = HealthRequest {
        version: MESSAGE_VERSION,
        resource: name,
        reason,
    };
    let body = serde_json::to_vec(&req)
        .map_err(|e| OpError::internal(format!("cannot encode the request: {e}")))?;
    let limit = c.ops.config.health.check_timeout + Duration::from_secs(5);
    let msg = tokio::time::timeout(
        limit,
        c.ops.client.request(subject.to_string(), body.into()),
    )
    .await
    .map_err(|_| {
        OpError::unavailable(format!(
            "the health service did not answer within {limit:?}"
        ))
    })?
    .map_err(|e| {
        OpError::unavailable(format!(
            "the health service is not reachable ({e}): is warden-health running?"
        ))
    })?;
    let reply: HealthReply = serde_json::from_slice(&msg.payload)
        .map_err(|e| OpError::internal(format!("bad answer from the health service: {e}")))?;
    match reply.error {
        Some(e) => Err(OpError {
            status: match e.code {
                ErrorCode::UnknownResource | ErrorCode::NotFound => 404,
                ErrorCode::Unavailable | ErrorCode::ResourceUnavailable => 503,
                _ => 409,
            },
            body: e,
        }),
        None => Ok(reply),
    }
}

async fn resource_write(
    c: &Console,
    headers: &HeaderMap,
    uri: &Uri,
    form: Result<Form<WriteForm>, FormRejection>,
    close: bool,
) -> Response {
    let (s, f) = match checked_form(c, headers, uri, form, true) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let Some(name) = f.name.filter(|n| !n.is_empty()) else {
        return error_page(
            &s,
            &OpError::bad_request(
                ErrorCode::InvalidRequest,
                "which resource? The form sent no name",
            ),
            Some(("/resources", "Back to the resources")),
        );
    };
    let (subject, reason) = if close {
        (
            subjects::HEALTH_CLOSE,
            Some(
                f.reason
                    .filter(|r| !r.trim().is_empty())
                    .unwrap_or_else(|| "closed from the console".into()),
            ),
        )
    } else {
        (subjects::HEALTH_CHECK, None)
    };
    match ask_health(c, subject, name.clone(), reason).await {
        Ok(reply) => {
            let done = match (close, reply.check.map(|c| c.passed)) {
                (true, _) => "closed",
                (false, Some(false)) => "check_failed",
                (false, _) => "check_passed",
            };
            Redirect::to(&format!(
                "/resources?done={done}&name={}#{}",
                views::urlencode(&name),
                views::anchor(&name)
            ))
            .into_response()
        }
        Err(e) => error_page(&s, &e, Some(("/resources", "Back to the resources"))),
    }
}

async fn resource_check(
    State(c): Shared,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<WriteForm>, FormRejection>,
) -> Response {
    resource_write(&c, &headers, &uri, form, false).await
}

async fn resource_close(
    State(c): Shared,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<WriteForm>, FormRejection>,
) -> Response {
    resource_write(&c, &headers, &uri, form, true).await
}

async fn queues(State(c): Shared, headers: HeaderMap, uri: Uri) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    if let Err(e) = c.ops.index_ready().await {
        return error_page(&s, &e, None);
    }
    let now = Utc::now();
    let rows = {
        let mut cached = c.queue_rows.lock().unwrap_or_else(|p| p.into_inner());
        match cached.as_ref() {
            Some((at, rows)) if at.elapsed() < QUEUE_REUSE => rows.clone(),
            _ => {
                let rows = c.ops.index.lock().queues(now);
                *cached = Some((std::time::Instant::now(), rows.clone()));
                rows
            }
        }
    };
    let sched = scheduler_queue(&c.ops).await;
    let page = views::layout(
        "Queues",
        Section::Queues,
        &s.viewer,
        None,
        maud::html! {},
        views::queues(&sched, &rows, now),
    );
    html(&s, StatusCode::OK, page)
}

/// Bars in the statistics chart.
const CHART_BUCKETS: usize = 24;

async fn stats(State(c): Shared, headers: HeaderMap, uri: Uri) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    let q = Query::<StatsQuery>::try_from_uri(&uri);
    let (window, result) = match q {
        Ok(Query(q)) => {
            let window = q
                .window
                .clone()
                .filter(|w| !w.trim().is_empty())
                .unwrap_or_else(|| "24h".into());
            let r = match c
                .ops
                .stats(StatsQuery {
                    window: Some(window.clone()),
                })
                .await
            {
                Ok(st) => {
                    let (since, until) = (
                        st.since.unwrap_or_else(Utc::now),
                        st.until.unwrap_or_else(Utc::now),
                    );
                    let series = c.ops.index.lock().blame_series(since, until, CHART_BUCKETS);
                    Ok((st, series))
                }
                Err(e) => Err(e.body),
            };
            (window, r)
        }
        Err(e) => ("24h".to_string(), Err(bad_query(e.body_text()).body)),
    };
    let status = status_of(&result);
    let page = views::layout(
        "Statistics",
        Section::Stats,
        &s.viewer,
        None,
        views::stats_filters(&window),
        views::stats(&result),
    );
    html(&s, status, page)
}

#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_form(State(c): Shared, headers: HeaderMap, uri: Uri) -> Response {
    let s = seen(&c.ops, &headers, &uri);
    let (n, rest) = split_done(uri.query());
    let q: LoginQuery = serde_urlencoded_like(&rest);
    let next = auth::safe_next(q.next.as_deref()).to_string();
    let body = if c.ops.config.http.token.is_none() {
        maud::html! { p { "No API token is set: everyone on this machine may act, so there is nothing to sign in to. " a href=(next) { "Go on" } } }
    } else if s.viewer.signed_in {
        maud::html! { p { "You are signed in. " a href=(next) { "Go on" } } }
    } else {
        views::login(&next, &s.viewer.csrf, None)
    };
    let page = views::layout(
        "Sign in",
        Section::Other,
        &s.viewer,
        n.as_ref(),
        maud::html! {},
        body,
    );
    html(&s, StatusCode::OK, page)
}

async fn login(
    State(c): Shared,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<WriteForm>, FormRejection>,
) -> Response {
    let (s, f) = match checked_form(&c, &headers, &uri, form, false) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let next = auth::safe_next(f.next.as_deref()).to_string();
    let Some(token) = c.ops.config.http.token.as_deref() else {
        return Redirect::to(&next).into_response();
    };
    let given = f.token.unwrap_or_default();
    if !crate::http::constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
        metrics::http_refused(metrics::NO_TOKEN);
        tracing::info!("console sign-in with a wrong token");
        let page = views::layout(
            "Sign in",
            Section::Other,
            &s.viewer,
            None,
            maud::html! {},
            views::login(&next, &s.viewer.csrf, Some("That is not the API token.")),
        );
        return html(&s, StatusCode::UNAUTHORIZED, page);
    }
    let sep = if next.contains('?') { '&' } else { '?' };
    let mut resp = Redirect::to(&format!("{next}{sep}done=signed_in")).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        cookie(
            auth::SESSION_COOKIE,
            &auth::session_value(token, Utc::now()),
            auth::SESSION_HOURS * 3600,
        ),
    );
    resp
}

async fn logout(
    State(c): Shared,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<WriteForm>, FormRejection>,
) -> Response {
    if let Err(r) = checked_form(&c, &headers, &uri, form, false) {
        return *r;
    }
    let mut resp = Redirect::to("/login?done=signed_out").into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, cookie(auth::SESSION_COOKIE, "", 0));
    resp
}

/// Server-sent events: `change` after job changes (coalesced), until the
/// page goes away or the API shuts down.
async fn events(State(c): Shared) -> Response {
    let Ok(permit) = c.live.clone().try_acquire_owned() else {
        return OpError::unavailable("too many live pages open; this one polls instead")
            .into_response();
    };
    let rx = c.ops.index.changes();
    let shutdown = c.shutdown.clone();
    Sse::new(change_stream(rx, shutdown, permit))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn change_stream(
    rx: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(
        (rx, shutdown, permit),
        |(mut rx, shutdown, permit)| async move {
            tokio::select! {
                _ = shutdown.cancelled() => None,
                changed = rx.changed() => {
                    changed.ok()?;
                    // Let a burst of changes arrive as one event.
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(LIVE_COALESCE) => {}
                    }
                    let n = *rx.borrow_and_update();
                    Some((Ok(Event::default().event("change").data(n.to_string())), (rx, shutdown, permit)))
                }
            }
        },
    )
}

async fn favicon() -> Response {
    asset(Path("favicon.svg".into())).await
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        "favicon.svg" => (ICON, "image/svg+xml"),
        _ => return OpError::not_found(format!("no asset {file:?}")).into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_times_are_read_as_utc_and_rfc3339_passes_through() {
        assert_eq!(
            normalize_time(Some("2026-12-01T10:30".into())).as_deref(),
            Some("2026-12-01T10:30:00+00:00")
        );
        assert_eq!(
            normalize_time(Some("2026-12-01".into())).as_deref(),
            Some("2026-12-01T00:00:00+00:00")
        );
        assert_eq!(
            normalize_time(Some("2026-12-01T10:30:00+01:00".into())).as_deref(),
            Some("2026-12-01T10:30:00+01:00")
        );
        // Left for the API to refuse with its own message.
        assert_eq!(
            normalize_time(Some("yesterday".into())).as_deref(),
            Some("yesterday")
        );
    }

    #[test]
    fn notices_are_the_consoles_own_never_the_querys_text() {
        let (n, rest) = split_done(Some("done=retried&x=1"));
        assert!(n.is_some_and(|n| n.ok && n.text.starts_with("Retried")));
        assert_eq!(rest, "x=1");
        let (n, _) = split_done(Some("done=%3Cscript%3E"));
        assert_eq!(n, None);
        let (n, _) = split_done(Some("done=check_failed&name=host-a"));
        assert!(n.is_some_and(|n| !n.ok && n.text.starts_with("host-a failed")));
    }
}
