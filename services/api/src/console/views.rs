//! Every console page as a pure function from data to HTML. Nothing here
//! does I/O; `super` gathers the data and sends the result. All text goes
//! through maud's escaping: job arguments, log tails, status files and
//! descriptions come from untrusted tasks.

use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};
use warden_shared::job::{HistoryEntry, Job, JobSummary};
use warden_shared::messages::{PoolQueue, QueueReply};
use warden_shared::resource::Resource;
use warden_shared::session::{Session, SessionState};
use warden_shared::{Blame, JobState};

use super::chart;
use super::explain;
use crate::index::{QueueRow, SeriesBucket, Stats};
use crate::types::{ListQuery, ListReply};
use warden_shared::messages::ErrorBody;

/// Who is looking, as the pages need it.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// Whether the API has a token (else everyone may write).
    pub token_set: bool,
    /// Signed in (or no token set): sees whole answers and may write.
    pub signed_in: bool,
    /// The CSRF token every form carries.
    pub csrf: String,
    /// The page's own path and query, for "sign in and come back".
    pub here: String,
}

impl Viewer {
    pub fn may_write(&self) -> bool {
        self.signed_in
    }
}

/// A message shown at the top of a page after a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub ok: bool,
    pub text: String,
}

/// Which section the page belongs to (the current one is marked in the
/// navigation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Jobs,
    Bots,
    Resources,
    Queues,
    Stats,
    Other,
}

const NAV: [(Section, &str, &str); 6] = [
    (Section::Overview, "/", "Overview"),
    (Section::Jobs, "/jobs", "Jobs"),
    (Section::Bots, "/bots", "Bots"),
    (Section::Resources, "/resources", "Resources"),
    (Section::Queues, "/queues", "Queues"),
    (Section::Stats, "/stats", "Statistics"),
];

/// The page shell: head, navigation, sign-in state, the notice, and the
/// live region the script refreshes (`#live`).
pub fn layout(
    title: &str,
    section: Section,
    viewer: &Viewer,
    notice: Option<&Notice>,
    controls: Markup,
    live: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Warden" }
                link rel="stylesheet" href="/assets/console.css";
                link rel="icon" href="/assets/favicon.svg" type="image/svg+xml";
                script src="/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "Warden" }
                    nav aria-label="Sections" {
                        ul {
                            @for (s, href, name) in NAV {
                                li {
                                    @if s == section {
                                        a href=(href) aria-current="page" { (name) }
                                    } @else {
                                        a href=(href) { (name) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        @if !viewer.token_set {
                            span.muted title="No API token is set: this API listens on loopback only and anyone here may act." { "open (loopback)" }
                        } @else if viewer.signed_in {
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        } @else {
                            a href=(format!("/login?next={}", urlencode(&viewer.here))) { "Sign in" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    @if let Some(n) = notice {
                        p class=(if n.ok { "notice ok" } else { "notice bad" }) role=(if n.ok { "status" } else { "alert" }) { (n.text) }
                    }
                    @if viewer.token_set && !viewer.signed_in {
                        p.muted.small { "Signed out: task output, arguments and session names are hidden, and actions need you to sign in." }
                    }
                    (controls)
                    div id="live" aria-live="polite" data-live="1" {
                        (live)
                    }
                    p.updated.small.muted { "Updates live. " span id="live-state" {} }
                }
            }
        }
    }
}

/// An API error as a readable message.
pub fn error_message(e: &ErrorBody) -> Markup {
    html! {
        div.notice.bad role="alert" {
            p { strong { (e.message) } }
            p.small { "Error code " code { (e.code.as_str()) } "." }
        }
    }
}

/// A whole page that says only what went wrong.
pub fn error_page(
    viewer: &Viewer,
    status: u16,
    e: &ErrorBody,
    back: Option<(&str, &str)>,
) -> Markup {
    let title = match status {
        400 => "Bad request",
        401 => "Sign in needed",
        403 => "Refused",
        404 => "Not found",
        409 => "Not possible now",
        503 => "Unavailable",
        _ => "Something went wrong",
    };
    layout(
        title,
        Section::Other,
        viewer,
        None,
        html! {
            (error_message(e))
            @if let Some((href, label)) = back {
                p { a href=(href) { (label) } }
            }
        },
        html! {},
    )
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `/jobs?...` with these filters (empty ones left out).
pub fn jobs_href(pairs: &[(&str, &str)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect();
    if q.is_empty() {
        "/jobs".to_string()
    } else {
        format!("/jobs?{}", q.join("&"))
    }
}

fn time(t: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)) title=(t.format("%Y-%m-%d %H:%M:%S%.3f UTC")) {
            (t.format("%Y-%m-%d %H:%M:%S")) " "
            span.muted.small { "(" (ago(t, now)) ")" }
        }
    }
}

/// "12 s ago", "3 min ago", "in 4 s".
pub fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    let (n, future) = (secs.unsigned_abs(), secs < 0);
    let span = match n {
        0..=89 => format!("{n} s"),
        90..=5399 => format!("{} min", (n + 30) / 60),
        5400..=129_599 => format!("{} h", (n + 1800) / 3600),
        _ => format!("{} days", (n + 43_200) / 86_400),
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

fn state_badge(s: JobState) -> Markup {
    html! { span class=(format!("badge s-{}", s.as_str().to_ascii_lowercase())) { (s.as_str()) } }
}

fn short(id: &uuid::Uuid) -> String {
    id.simple().to_string()[..8].to_string()
}

fn job_link(id: &uuid::Uuid) -> Markup {
    html! { a href=(format!("/jobs/{id}")) title=(id) { code { (short(id)) } } }
}

fn cause(blame: Option<Blame>, detail: Option<&str>) -> Markup {
    html! {
        @if let Some(b) = blame {
            a class=(format!("blame {}", chart::blame_class(b))) href=(jobs_href(&[("blame", b.as_str())])) { (b.as_str()) }
            @if let Some(d) = detail {
                " / " a href=(jobs_href(&[("blame", b.as_str()), ("detail", d)])) { (d) }
            }
        }
    }
}

/// The table of jobs used by the list and the overview.
pub fn jobs_table(jobs: &[JobSummary], now: DateTime<Utc>, caption: &str) -> Markup {
    html! {
        div.scroll {
            table.jobs {
                caption.visually-hidden { (caption) }
                thead { tr {
                    th scope="col" { "Job" } th scope="col" { "Task" } th scope="col" { "Pool" }
                    th scope="col" { "State" } th scope="col" { "Attempt" } th scope="col" { "Result" }
                    th scope="col" { "Bot" } th scope="col" { "Created" } th scope="col" { "Last change" }
                } }
                tbody {
                    @for j in jobs {
                        tr {
                            td { (job_link(&j.id)) }
                            td { a href=(jobs_href(&[("task", &j.task)])) { (j.task) } }
                            td { a href=(jobs_href(&[("pool", &j.pool)])) { (j.pool) } }
                            td { (state_badge(j.state)) }
                            td.num { (j.attempt) }
                            td {
                                @if let Some(o) = &j.outcome { (o) }
                                (cause(j.blame, j.detail.as_deref()))
                            }
                            td { @if let Some(b) = &j.bot_id { a href=(jobs_href(&[("bot_id", b)])) { (b) } } }
                            td { (time(j.created_at, now)) }
                            td { (time(j.updated_at, now)) }
                        }
                    }
                }
            }
        }
    }
}

/// What the overview shows.
pub struct Overview<'a> {
    pub counts: Vec<(JobState, usize)>,
    pub queue: Result<&'a QueueReply, String>,
    pub active_bots: Result<usize, String>,
    pub resources_not_open: Result<Vec<(String, String, String)>, String>,
    pub recent_trouble: &'a [JobSummary],
}

pub fn overview(o: &Overview<'_>, now: DateTime<Utc>) -> Markup {
    html! {
        section aria-labelledby="h-counts" {
            h2 id="h-counts" { "Jobs by state" }
            ul.tiles {
                @for (s, n) in &o.counts {
                    li { a href=(jobs_href(&[("state", s.as_str())])) {
                        span.big { (n) } " " (state_badge(*s))
                    } }
                }
            }
        }
        section aria-labelledby="h-pools" {
            h2 id="h-pools" { "Pools" }
            @match &o.queue {
                Ok(q) => (pools_table(&q.pools)),
                Err(e) => p.notice.bad role="alert" { (e) },
            }
            @match &o.active_bots {
                Ok(n) => p { a href="/bots?state=active" { (n) " active bot session" @if *n != 1 { "s" } } },
                Err(e) => p.notice.bad role="alert" { (e) },
            }
        }
        section aria-labelledby="h-res" {
            h2 id="h-res" { "Resources that are not open" }
            @match &o.resources_not_open {
                Ok(list) if list.is_empty() => p.empty { "Every resource is open." },
                Ok(list) => ul { @for (name, state, reason) in list {
                    li { a href=(format!("/resources#{}", anchor(name))) { (name) } " " span class=(format!("badge r-{state}")) { (state) } " " (reason) }
                } },
                Err(e) => p.notice.bad role="alert" { (e) },
            }
        }
        section aria-labelledby="h-trouble" {
            h2 id="h-trouble" { "Latest crashed and shelved jobs" }
            @if o.recent_trouble.is_empty() {
                p.empty { "None." }
            } @else {
                (jobs_table(o.recent_trouble, now, "Latest crashed and shelved jobs"))
            }
        }
    }
}

fn pools_table(pools: &[PoolQueue]) -> Markup {
    html! {
        @if pools.is_empty() {
            p.empty { "No pool has a waiting job or a bot serving it." }
        } @else {
            div.scroll { table {
                caption.visually-hidden { "Pools as the scheduler sees them" }
                thead { tr { th scope="col" { "Pool" } th scope="col" { "Ready" } th scope="col" { "Delayed retries" } th scope="col" { "Oldest wait" } th scope="col" { "Served" } } }
                tbody { @for p in pools { tr {
                    td { a href=(jobs_href(&[("pool", &p.pool), ("state", "SCHEDULED")])) { (p.pool) } }
                    td.num { (p.ready) } td.num { (p.delayed) }
                    td.num { (p.oldest_wait_seconds) " s" }
                    td { @if p.served { "yes" } @else { strong.warn { "no bot" } } }
                } } }
            } }
        }
    }
}

/// HTML id for a resource name (names are free text).
pub fn anchor(name: &str) -> String {
    format!(
        "r-{}",
        name.bytes()
            .map(|b| if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("_{b:02x}")
            })
            .collect::<String>()
    )
}

/// The choices of the state and blame selects.
fn select(name: &str, label: &str, current: &str, options: &[&str]) -> Markup {
    html! {
        label for=(format!("f-{name}")) { (label) }
        select id=(format!("f-{name}")) name=(name) {
            option value="" selected[current.is_empty()] { "any" }
            @for o in options {
                option value=(o) selected[current.eq_ignore_ascii_case(o)] { (o) }
            }
        }
    }
}

fn text_input(name: &str, label: &str, current: &str, kind: &str, hint: Option<&str>) -> Markup {
    html! {
        label for=(format!("f-{name}")) { (label) @if let Some(h) = hint { " " span.muted.small { (h) } } }
        input id=(format!("f-{name}")) name=(name) type=(kind) value=(current) autocomplete="off";
    }
}

/// The filter form of the job list; `q` as the page got it.
pub fn jobs_filters(q: &ListQuery) -> Markup {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    let blames: Vec<&str> = Blame::ALL.iter().map(|b| b.as_str()).collect();
    let limit = q.limit.unwrap_or(PAGE).to_string();
    html! {
        form.filters method="get" action="/jobs" role="search" aria-label="Filter jobs" {
            div.field { (select("state", "State", &v(&q.state), &states)) }
            div.field { (text_input("task", "Task", &v(&q.task), "text", None)) }
            div.field { (text_input("pool", "Pool", &v(&q.pool), "text", None)) }
            div.field { (select("blame", "Blame", &v(&q.blame), &blames)) }
            div.field { (text_input("detail", "Detail", &v(&q.detail), "text", None)) }
            div.field { (text_input("bot_id", "Bot", &v(&q.bot_id), "text", None)) }
            div.field { (text_input("source_message_id", "Source message", &v(&q.source_message_id), "text", None)) }
            div.field { (text_input("since", "Created from", &v(&q.since), "text", Some("(UTC, e.g. 2026-12-01T00:00)"))) }
            div.field { (text_input("until", "Created before", &v(&q.until), "text", Some("(UTC)"))) }
            div.field {
                label for="f-limit" { "Per page" }
                select id="f-limit" name="limit" {
                    @for n in ["25", "50", "100", "500"] { option value=(n) selected[limit == n] { (n) } }
                }
            }
            div.actions { button type="submit" { "Search" } " " a href="/jobs" { "Clear" } }
        }
    }
}

/// Jobs per page when the query names no limit.
pub const PAGE: usize = 50;

/// The query string of `q` with another offset.
fn with_offset(q: &ListQuery, offset: usize) -> String {
    let limit = q.limit.unwrap_or(PAGE).to_string();
    let offset = offset.to_string();
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let pairs = [
        ("state", v(&q.state)),
        ("task", v(&q.task)),
        ("pool", v(&q.pool)),
        ("blame", v(&q.blame)),
        ("detail", v(&q.detail)),
        ("bot_id", v(&q.bot_id)),
        ("source_message_id", v(&q.source_message_id)),
        ("since", v(&q.since)),
        ("until", v(&q.until)),
        ("limit", limit),
        ("offset", if offset == "0" { String::new() } else { offset }),
    ];
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    jobs_href(&refs)
}

pub fn jobs_list(q: &ListQuery, r: &Result<ListReply, ErrorBody>, now: DateTime<Utc>) -> Markup {
    let limit = q.limit.unwrap_or(PAGE);
    let offset = q.offset.unwrap_or(0);
    html! {
        @match r {
            Err(e) => (error_message(e)),
            Ok(r) => {
                p.count role="status" {
                    @if r.total == 0 {
                        "No job matches."
                    } @else {
                        strong { (r.total) @if !r.total_exact { "+" } } " job" @if r.total != 1 { "s" } " match; showing "
                        (offset + 1) "–" (offset + r.jobs.len()) ", newest first."
                    }
                }
                @if !r.jobs.is_empty() { (jobs_table(&r.jobs, now, "Jobs matching the filters")) }
                nav.paging aria-label="Pages" {
                    @if offset > 0 {
                        a rel="prev" href=(with_offset(q, offset.saturating_sub(limit))) { "← Newer" }
                    }
                    @if offset + r.jobs.len() < r.total {
                        a rel="next" href=(with_offset(q, offset + limit)) { "Older →" }
                    }
                }
            }
        }
    }
}

/// What the job page needs besides the job.
pub struct JobContext<'a> {
    pub attempts_used: u32,
    pub attempts_allowed: u32,
    pub pool: Option<&'a PoolQueue>,
    /// Whether the retry policy retries the job's blame and detail.
    pub retryable: bool,
    pub now: DateTime<Utc>,
}

fn history_row(e: &HistoryEntry, now: DateTime<Utc>) -> Markup {
    html! {
        tr class=(if e.action == warden_shared::state::Action::RejectReport { "rejected" } else { "" }) {
            td { (time(e.at, now)) }
            td { (e.action.as_str()) }
            td { @if let (Some(f), Some(t)) = (e.from, e.to) { (f.as_str()) " → " (t.as_str()) } }
            td { (e.actor) }
            td { @if let Some(b) = &e.bot_id { a href=(jobs_href(&[("bot_id", b)])) { (b) } } }
            td { @if let Some(r) = &e.resource { a href=(format!("/resources#{}", anchor(r))) { (r) } } }
            td.note { @if let Some(n) = &e.note { (n) } }
        }
    }
}

/// The job's buttons: Retry / Cancel when its state allows them.
pub fn job_actions(job: &Job, viewer: &Viewer) -> Markup {
    let retry = explain::can_retry(job.state);
    let cancel = explain::can_cancel(job.state);
    html! {
        @if retry || cancel {
            div.actions {
                @if !viewer.may_write() {
                    p.small { a href=(format!("/login?next={}", urlencode(&viewer.here))) { "Sign in" } " to "
                        @if retry { "retry" } @else { "cancel" } " this job." }
                } @else {
                    @if retry {
                        form method="post" action=(format!("/jobs/{}/retry", job.id)) {
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            button type="submit" id="retry" { "Retry" }
                        }
                    }
                    @if cancel {
                        form method="post" action=(format!("/jobs/{}/cancel", job.id)) {
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            label for="cancel-reason" { "Reason " span.muted.small { "(optional)" } }
                            input id="cancel-reason" name="reason" type="text" maxlength="1000";
                            button.danger type="submit" id="cancel" { "Cancel" }
                        }
                    }
                }
            }
        }
    }
}

pub fn job_detail(job: &Job, ctx: &JobContext<'_>) -> Markup {
    let now = ctx.now;
    let attempts = explain::attempts(job);
    html! {
        p.status { (state_badge(job.state)) " " span id="status-line" { (explain::status_line(job)) } }
        @if let Some(w) = explain::why_waiting(job, ctx.pool, now) {
            p.waiting id="why-waiting" { (w) }
        }
        @if let Some(w) = explain::not_retried_because(job, ctx.retryable) {
            p.waiting id="why-not-retried" { (w) }
        }
        dl.facts {
            dt { "Job" } dd { code { (job.id) } }
            dt { "Task" } dd { a href=(jobs_href(&[("task", &job.task)])) { (job.task) } }
            dt { "Pool" } dd { a href=(jobs_href(&[("pool", &job.pool)])) { (job.pool) } }
            dt { "Priority" } dd { (job.priority) }
            dt { "Attempts" } dd { (ctx.attempts_used) " of " (ctx.attempts_allowed) " allowed"
                @if job.attempt != ctx.attempts_used { " (attempt " (job.attempt) " in all; a person's retry starts a fresh budget)" }
                @if !job.retry { "; never retried automatically" } }
            @if let Some(due) = job.not_before { dt { "Retry due" } dd { (time(due, now)) } }
            dt { "Created" } dd { (time(job.created_at, now)) }
            dt { "Last change" } dd { (time(job.updated_at, now)) }
            @if let Some(s) = &job.source {
                dt { "Source message" } dd { a href=(jobs_href(&[("source_message_id", &s.message_id)])) { code { (s.message_id) } } " on " code { (s.subject) }
                    @if let Some(r) = &s.rule { " (rule " (r) ")" } }
            }
            @if !job.lost_workers.is_empty() {
                dt { "Lost on bots" } dd { (job.lost_workers.join(", ")) }
            }
        }
        @if !job.args.is_empty() {
            h2 { "Arguments" }
            div.scroll { table.args {
                caption.visually-hidden { "Arguments" }
                thead { tr { th scope="col" { "Name" } th scope="col" { "Value" } } }
                tbody { @for (k, v) in &job.args { tr { td { code { (k) } } td { code { (v) } } } } }
            } }
        }
        @if let Some(c) = &job.crash {
            section.crash aria-labelledby="h-crash" {
                h2 id="h-crash" { "Last crash" }
                p { (cause(job.blame, job.detail.as_deref())) @if let Some(d) = &job.description { ": " (d) } }
                dl.facts {
                    @if let Some(x) = c.exit_code { dt { "Exit code" } dd { (x) } }
                    @if let Some(s) = c.signal { dt { "Signal" } dd { (s) } }
                    dt { "Ran for" } dd { (format!("{:.1} s", c.duration_ms as f64 / 1000.0)) }
                    @if c.timed_out { dt { "Time limit" } dd { "reached" } }
                    @if !c.resources.is_empty() { dt { "Resources" } dd { @for r in &c.resources { a href=(format!("/resources#{}", anchor(r))) { (r) } " " } } }
                }
                @if let Some(s) = &c.status_file {
                    h3 { "Status file" }
                    pre.log tabindex="0" aria-label="Status file" { (s) }
                }
                @if !c.log_tail.is_empty() {
                    h3 { "Log tail" }
                    pre.log tabindex="0" aria-label="Log tail" { (c.log_tail) }
                }
            }
        }
        h2 { "Attempts" }
        @if job.history_dropped > 0 {
            p.muted.small { (job.history_dropped) " older history entries were dropped to keep the record small." }
        }
        ol.timeline {
            @for a in &attempts {
                li.attempt id=(format!("attempt-{}", a.number)) {
                    h3 {
                        @if a.number == 0 { "Before the first attempt" } @else {
                            "Attempt " (a.number)
                            @if let Some(b) = a.bot_id { " on bot " (b) }
                            @if let Some(r) = a.resource { ", resource " (r) }
                            @if let Some(e) = a.end { " — " (e.action.as_str())
                                @if let Some(t) = e.to { " → " (t.as_str()) } }
                        }
                    }
                    @if a.rejected > 0 {
                        p.warn { (a.rejected) " stale or refused report" @if a.rejected != 1 { "s" } " rejected (shown in red)." }
                    }
                    div.scroll { table.history {
                        caption.visually-hidden { "History of attempt " (a.number) }
                        thead { tr { th scope="col" { "When" } th scope="col" { "What" } th scope="col" { "State" } th scope="col" { "By" } th scope="col" { "Bot" } th scope="col" { "Resource" } th scope="col" { "Note" } } }
                        tbody { @for e in &a.entries { (history_row(e, now)) } }
                    } }
                }
            }
        }
    }
}

fn session_state_badge(s: SessionState) -> Markup {
    html! { span class=(format!("badge ss-{}", s.as_str())) { (s.as_str()) } }
}

pub fn bots_filters(state: &str) -> Markup {
    let states: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
    html! {
        form.filters method="get" action="/bots" aria-label="Filter sessions" {
            div.field { (select("state", "Session state", state, &states)) }
            div.actions { button type="submit" { "Show" } }
        }
    }
}

pub fn bots(r: &Result<Vec<Session>, ErrorBody>, now: DateTime<Utc>) -> Markup {
    html! {
        @match r {
            Err(e) => (error_message(e)),
            Ok(list) if list.is_empty() => p.empty { "No bot session on record." },
            Ok(list) => {
                p.count { (list.len()) " session" @if list.len() != 1 { "s" } ", by bot, newest first." }
                div.scroll { table {
                    caption.visually-hidden { "Bot sessions" }
                    thead { tr {
                        th scope="col" { "Bot" } th scope="col" { "Session" } th scope="col" { "State" } th scope="col" { "Pools" }
                        th scope="col" { "Resources" } th scope="col" { "Leases" } th scope="col" { "Started" } th scope="col" { "Last heartbeat" } th scope="col" { "Ended" }
                    } }
                    tbody { @for s in list { tr {
                        td { a href=(jobs_href(&[("bot_id", &s.bot_id)])) { (s.bot_id) } }
                        td { code.small { (s.name) } @if let Some(by) = &s.superseded_by { br; span.small.muted { "superseded by " code { (by) } } } }
                        td { (session_state_badge(s.state)) }
                        td { (s.pools.join(", ")) " " span.muted.small { "×" (s.capacity) } }
                        td { @for r in &s.resources { a href=(format!("/resources#{}", anchor(&r.name))) { (r.name) } " " } }
                        td { @for l in &s.leases { (job_link(&l.job_id)) " " span.muted.small { "epoch " (l.epoch) } " " } }
                        td { (time(s.created_at, now)) }
                        td { (time(s.last_heartbeat, now)) }
                        td { @if let Some(t) = s.ended_at { (time(t, now)) } }
                    } } }
                } }
            }
        }
    }
}

/// A resource with what depends on it.
pub struct ResourceView<'a> {
    pub resource: &'a Resource,
    pub dependents: Vec<String>,
}

pub fn resources(
    r: &Result<Vec<ResourceView<'_>>, ErrorBody>,
    viewer: &Viewer,
    now: DateTime<Utc>,
) -> Markup {
    html! {
        @match r {
            Err(e) => (error_message(e)),
            Ok(list) if list.is_empty() => p.empty { "No resource is registered." },
            Ok(list) => {
                @for v in list {
                    @let r = v.resource;
                    section.resource id=(anchor(&r.name)) aria-labelledby=(format!("h-{}", anchor(&r.name))) {
                        h2 id=(format!("h-{}", anchor(&r.name))) { (r.name) " " span class=(format!("badge r-{}", r.state.as_str())) { (r.state.as_str()) } }
                        p { (r.reason) " — since " (time(r.since, now)) }
                        dl.facts {
                            dt { "Kind" } dd { (r.kind) }
                            dt { "Incarnation" } dd { (r.incarnation) }
                            @if let Some(d) = &r.depends_on { dt { "Depends on" } dd { a href=(format!("#{}", anchor(d))) { (d) } } }
                            dt { "Dependents" } dd { @if v.dependents.is_empty() { "none" } @for d in &v.dependents { a href=(format!("#{}", anchor(d))) { (d) } " " } }
                            dt { "Pools" } dd { (r.pools.join(", ")) }
                            dt { "Bots" } dd { @for s in &r.sessions { a href=(jobs_href(&[("bot_id", &s.bot_id)])) { (s.bot_id) } " " } }
                            @if let Some(p) = &r.path { dt { "Path" } dd { code { (p) } } }
                            @if let Some(t) = r.check_after { dt { "Next check not before" } dd { (time(t, now)) } }
                        }
                        @if !r.checks.is_empty() {
                            h3 { "Last checks" }
                            ul.small { @for c in r.checks.iter().rev().take(5) {
                                li { (time(c.at, now)) " " strong class=(if c.result == "passed" { "ok" } else { "warn" }) { (c.result) } " (" (c.trigger) ", " (c.duration_ms) " ms): " (c.summary) }
                            } }
                        }
                        @if !r.changes.is_empty() {
                            h3 { "Last changes" }
                            ul.small { @for c in r.changes.iter().rev().take(5) {
                                li { (time(c.at, now)) " " @if let Some(f) = c.from { (f.as_str()) " → " } (c.to.as_str()) ": " (c.reason) }
                            } }
                        }
                        @if viewer.may_write() && r.state != warden_shared::resource::ResourceState::Closed {
                            div.actions {
                                form method="post" action="/resources/check" {
                                    input type="hidden" name="csrf" value=(viewer.csrf);
                                    input type="hidden" name="name" value=(r.name);
                                    button type="submit" { "Check now" }
                                }
                                form method="post" action="/resources/close" {
                                    input type="hidden" name="csrf" value=(viewer.csrf);
                                    input type="hidden" name="name" value=(r.name);
                                    label for=(format!("reason-{}", anchor(&r.name))) { "Reason" }
                                    input id=(format!("reason-{}", anchor(&r.name))) name="reason" type="text" maxlength="500";
                                    button.danger type="submit" { "Close" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn queues(
    scheduler: &Result<QueueReply, String>,
    rows: &[QueueRow],
    now: DateTime<Utc>,
) -> Markup {
    html! {
        section aria-labelledby="h-sched" {
            h2 id="h-sched" { "Per pool, as the scheduler sees it" }
            @match scheduler {
                Ok(q) => { (pools_table(&q.pools)) p.small.muted { "Snapshot of " (time(q.at, now)) "." } },
                Err(e) => p.notice.bad role="alert" { (e) },
            }
        }
        section aria-labelledby="h-prio" {
            h2 id="h-prio" { "Per pool and priority" }
            @if rows.is_empty() {
                p.empty { "No job is waiting." }
            } @else {
                div.scroll { table {
                    caption.visually-hidden { "Waiting jobs per pool and priority" }
                    thead { tr { th scope="col" { "Pool" } th scope="col" { "Priority" } th scope="col" { "Ready" } th scope="col" { "Delayed retries" } th scope="col" { "Oldest ready since" } th scope="col" { "Next retry due" } } }
                    tbody { @for r in rows { tr {
                        td { a href=(jobs_href(&[("pool", &r.pool), ("state", "SCHEDULED")])) { (r.pool) } }
                        td.num { (r.priority) } td.num { (r.ready) } td.num { (r.delayed) }
                        td { @if let Some(t) = r.oldest_queued_at { (time(t, now)) } }
                        td { @if let Some(t) = r.next_due { (time(t, now)) } }
                    } } }
                } }
            }
        }
    }
}

/// The windows the statistics page offers.
pub const WINDOWS: [&str; 5] = ["1h", "6h", "24h", "7days", "30days"];

pub fn stats_filters(window: &str) -> Markup {
    html! {
        form.filters method="get" action="/stats" aria-label="Statistics window" {
            div.field {
                label for="f-window" { "Window" }
                input id="f-window" name="window" type="text" value=(window) list="windows" autocomplete="off";
                datalist id="windows" { @for w in WINDOWS { option value=(w) {} } }
            }
            div.actions { button type="submit" { "Show" } }
            p.small { @for w in WINDOWS { a href=(format!("/stats?window={w}")) { (w) } " " } }
        }
    }
}

/// `blame/detail` counts, most first (ties by name).
pub fn top_details(s: &Stats) -> Vec<(&String, &usize)> {
    let mut top: Vec<(&String, &usize)> = s.by_detail.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    top
}

pub fn stats(r: &Result<(Stats, Vec<SeriesBucket>), ErrorBody>) -> Markup {
    html! {
        @match r {
            Err(e) => (error_message(e)),
            Ok((s, series)) => {
                p.count { strong { (s.jobs) } " jobs changed in the window; " (s.retried) " needed more than one attempt; " (s.shelved) " shelved." }
                section aria-labelledby="h-chart" {
                    h2 id="h-chart" { "Crashes by blame over time" }
                    (chart::crashes_by_blame(series))
                    div.scroll { table.small {
                        caption { "The chart's figures" }
                        thead { tr { th scope="col" { "From (UTC)" } @for b in Blame::ALL { th scope="col" { (b.as_str()) } } } }
                        tbody { @for b in series { @if b.by_blame.iter().any(|(_, n)| *n > 0) { tr {
                            td { (b.since.format("%Y-%m-%d %H:%M")) }
                            @for (_, n) in &b.by_blame { td.num { (n) } }
                        } } } }
                    } }
                }
                section aria-labelledby="h-top" {
                    h2 id="h-top" { "Top details" }
                    @let top = top_details(s);
                    @if top.is_empty() { p.empty { "No crash in the window." } } @else {
                        div.scroll { table {
                            caption.visually-hidden { "Top details" }
                            thead { tr { th scope="col" { "Blame / detail" } th scope="col" { "Jobs" } } }
                            tbody { @for (k, n) in top.iter().take(15) {
                                @let (b, d) = k.split_once('/').unwrap_or((k.as_str(), ""));
                                tr { td { a href=(jobs_href(&[("blame", b), ("detail", d)])) { (k) } } td.num { (n) } }
                            } }
                        } }
                    }
                }
                section aria-labelledby="h-bystate" {
                    h2 id="h-bystate" { "By state" }
                    ul.tiles { @for (st, n) in &s.by_state { li { a href=(jobs_href(&[("state", st)])) { span.big { (n) } " " (st) } } } }
                }
            }
        }
    }
}

pub fn login(next: &str, csrf: &str, error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { p.notice.bad role="alert" { (e) } }
        form.login method="post" action="/login" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="next" value=(next);
            div.field {
                label for="token" { "API token " span.muted.small { "(http.token; the same one writes to the API need)" } }
                input id="token" name="token" type="password" autocomplete="current-password" required;
            }
            div.actions { button type="submit" { "Sign in" } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_output_is_escaped_everywhere_it_is_shown() {
        let mut job = Job::new(
            uuid::Uuid::nil(),
            "t".into(),
            [("x".to_string(), "<script>alert(1)</script>".to_string())].into(),
            "p".into(),
            0,
            None,
            "api",
            Utc::now(),
        );
        job.state = JobState::Crashed;
        job.description = Some("<img src=x onerror=alert(2)>".into());
        job.crash = Some(warden_shared::job::CrashInfo {
            exit_code: Some(1),
            signal: None,
            duration_ms: 10,
            log_tail: "</pre><script>alert(3)</script>".into(),
            status_file: Some("\"><b>".into()),
            timed_out: false,
            resources: vec![],
        });
        let ctx = JobContext {
            attempts_used: 1,
            attempts_allowed: 3,
            pool: None,
            retryable: false,
            now: Utc::now(),
        };
        let html = job_detail(&job, &ctx).into_string();
        for bad in ["<script>", "<img", "</pre><script>", "\"><b>"] {
            assert!(!html.contains(bad), "{bad} reached the page: {html}");
        }
        assert!(html.contains("&lt;script&gt;alert(3)"));
    }

    #[test]
    fn links_carry_filters_encoded_and_paging_keeps_them() {
        assert_eq!(
            jobs_href(&[("task", "a b&c"), ("pool", "")]),
            "/jobs?task=a%20b%26c"
        );
        assert_eq!(jobs_href(&[]), "/jobs");
        let q = ListQuery {
            state: Some("CRASHED".into()),
            limit: Some(25),
            ..ListQuery::default()
        };
        assert_eq!(
            with_offset(&q, 50),
            "/jobs?state=CRASHED&limit=25&offset=50"
        );
        assert_eq!(with_offset(&q, 0), "/jobs?state=CRASHED&limit=25");
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = Utc::now();
        assert_eq!(ago(now - chrono::Duration::seconds(5), now), "5 s ago");
        assert_eq!(ago(now - chrono::Duration::seconds(600), now), "10 min ago");
        assert_eq!(ago(now + chrono::Duration::seconds(4), now), "in 4 s");
        assert_eq!(ago(now - chrono::Duration::days(3), now), "3 days ago");
    }

    #[test]
    fn resource_anchors_are_valid_ids_and_distinct() {
        assert_eq!(anchor("host-a/checkout"), "r-host_2da_2fcheckout");
        assert_ne!(anchor("a/b"), anchor("a_b"));
    }
}
