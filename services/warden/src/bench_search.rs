//! `warden bench-search`: search and statistics latency with a large job
//! history.
//!
//! 1. The API's index ([`warden_api::index::JobIndex`], the structure the
//!    jobs-bucket watch feeds) is loaded with `--jobs` synthetic jobs
//!    (default a million) spread over 30 days, with realistic skew: most
//!    jobs FINISHED, a few percent CRASHED or SHELVED with a blame and
//!    detail, tasks and bots of uneven popularity, most jobs triggered by a
//!    bus message. It prints the load rate and the process's memory, then
//!    p50/p99/max of typical searches and of statistics windows.
//! 2. With `--bus-jobs N`, N full job records are written to a real jobs
//!    bucket on a spawned nats-server, a real API service is started on
//!    it, and the bench prints how long the index takes to catch up from
//!    the bucket and the latency of searches and statistics over NATS
//!    request/reply, end to end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warden_api::index::{Filter, JobIndex};
use warden_api::{ApiClient, ListQuery, StatsQuery};
use warden_shared::job::{Job, Source};
use warden_shared::store::JobStore;
use warden_shared::xorshift::XorShift;
use warden_shared::{runtime, Blame, Config, JobState, JobSummary};

use crate::natsd::LocalNats;
use crate::BenchSearchArgs;

const TASKS: usize = 40;
const POOLS: usize = 6;
const BOTS: usize = 200;
const DAYS: i64 = 30;

/// 0..n, low values much likelier (popular tasks, busy bots).
fn skewed(rng: &mut XorShift, n: usize) -> usize {
    let r = rng.below(1_000_000) as f64 / 1_000_000.0;
    ((r * r * r) * n as f64) as usize
}

fn details(blame: Blame) -> &'static [&'static str] {
    match blame {
        Blame::System => &["oom", "disk_full", "worker_lost", "setup_failed"],
        Blame::Task => &["task_exception", "test_failure_crash", "timeout"],
        Blame::ThirdParty => &["network", "koji_unavailable", "mirror_error"],
        Blame::Unknown => &["unclassified"],
    }
}

/// One synthetic job summary, created within the last 30 days of `now`.
pub(crate) fn summary(rng: &mut XorShift, n: u64, now: DateTime<Utc>) -> JobSummary {
    let created =
        now - chrono::Duration::milliseconds(rng.below((DAYS * 86_400_000) as u64) as i64);
    let state = match rng.below(1000) {
        0..=899 => JobState::Finished,
        900..=939 => JobState::Crashed,
        940..=949 => JobState::Shelved,
        950..=959 => JobState::Cancelled,
        960..=984 => JobState::Scheduled,
        _ => JobState::Running,
    };
    let (blame, detail) = if matches!(state, JobState::Crashed | JobState::Shelved) {
        let blame = match rng.below(100) {
            0..=29 => Blame::System,
            30..=69 => Blame::Task,
            70..=94 => Blame::ThirdParty,
            _ => Blame::Unknown,
        };
        let d = details(blame);
        (
            Some(blame),
            Some(d[rng.below(d.len() as u64) as usize].to_string()),
        )
    } else {
        (None, None)
    };
    let attempt = match state {
        JobState::Scheduled => 0,
        JobState::Shelved => 4,
        _ if rng.below(10) == 0 => 2,
        _ => 1,
    };
    let updated = (created + chrono::Duration::seconds(rng.below(7200) as i64)).min(now);
    JobSummary {
        id: Uuid::from_u64_pair(0x5741_5244_454e_0000, n),
        task: format!("task-{:02}", skewed(rng, TASKS)),
        pool: format!("pool-{}", skewed(rng, POOLS)),
        state,
        priority: (rng.below(3) as i32) * 5,
        attempt,
        outcome: (state == JobState::Finished).then(|| {
            if rng.below(10) == 0 {
                "FAILED"
            } else {
                "PASSED"
            }
            .to_string()
        }),
        blame,
        detail,
        bot_id: (attempt > 0).then(|| format!("bot-{:03}", skewed(rng, BOTS))),
        source_message_id: (rng.below(10) < 6).then(|| format!("2026-{:016x}", rng.next_u64())),
        not_before: None,
        queued_at: updated,
        created_at: created,
        updated_at: updated,
    }
}

/// p50, p99 and max of `samples`, in milliseconds.
pub(crate) fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99), at(1.0))
}

/// This process's resident memory, in MiB.
pub(crate) fn rss_mib() -> Option<f64> {
    status_mib("self", "VmRSS:")
}

/// A memory figure (`VmRSS:`, `VmHWM:`) of process `pid` (or `self`)
/// from `/proc/<pid>/status`, in MiB.
pub(crate) fn status_mib(pid: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The searches a person or a dashboard makes, by name.
fn queries(now: DateTime<Utc>, sample_source: &str) -> Vec<(&'static str, Filter, usize, usize)> {
    let ago = |h: i64| Some(now - chrono::Duration::hours(h));
    let f = Filter::default;
    vec![
        ("newest 100, no filter", f(), 100, 0),
        (
            "state=CRASHED",
            Filter {
                state: Some(JobState::Crashed),
                ..f()
            },
            100,
            0,
        ),
        (
            "state=FINISHED",
            Filter {
                state: Some(JobState::Finished),
                ..f()
            },
            100,
            0,
        ),
        (
            "state=FINISHED task=task-00",
            Filter {
                state: Some(JobState::Finished),
                task: Some("task-00".into()),
                ..f()
            },
            100,
            0,
        ),
        (
            "task=task-39 (rare)",
            Filter {
                task: Some("task-39".into()),
                ..f()
            },
            100,
            0,
        ),
        (
            "blame=system last 24h",
            Filter {
                blame: Some(Blame::System),
                since: ago(24),
                ..f()
            },
            100,
            0,
        ),
        (
            "detail=network pool=pool-1",
            Filter {
                detail: Some("network".into()),
                pool: Some("pool-1".into()),
                ..f()
            },
            100,
            0,
        ),
        (
            "bot=bot-007 state=CRASHED",
            Filter {
                bot_id: Some("bot-007".into()),
                state: Some(JobState::Crashed),
                ..f()
            },
            100,
            0,
        ),
        (
            "source message id",
            Filter {
                source_message_id: Some(sample_source.to_string()),
                ..f()
            },
            100,
            0,
        ),
        (
            "created in one hour",
            Filter {
                since: ago(49),
                until: ago(48),
                ..f()
            },
            100,
            0,
        ),
        (
            "state=FINISHED last 7 days",
            Filter {
                state: Some(JobState::Finished),
                since: ago(24 * 7),
                ..f()
            },
            100,
            0,
        ),
        (
            "state=FINISHED page at 100000",
            Filter {
                state: Some(JobState::Finished),
                ..f()
            },
            100,
            100_000,
        ),
    ]
}

pub async fn run(config: Config, args: BenchSearchArgs) -> anyhow::Result<i32> {
    if args.jobs == 0 || args.repeat == 0 {
        bail!("--jobs and --repeat must be at least 1");
    }
    in_memory(&args)?;
    if args.bus_jobs > 0 {
        over_the_bus(config, &args).await?;
    }
    Ok(0)
}

fn in_memory(args: &BenchSearchArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
    let before = rss_mib();
    let mut index = JobIndex::default();
    let mut sample_source = String::new();
    let started = Instant::now();
    for n in 0..args.jobs as u64 {
        let j = summary(&mut rng, n, now);
        if n >= args.jobs as u64 / 2 && sample_source.is_empty() {
            sample_source = j.source_message_id.clone().unwrap_or_default();
        }
        index.upsert(j);
    }
    let load = started.elapsed();
    // Changes as the watch delivers them: a state move of an existing job.
    let started = Instant::now();
    let changes = (args.jobs / 10).max(1) as u64;
    for _ in 0..changes {
        // Never the sampled job, whose source message is searched for.
        let which = rng.below(args.jobs as u64 / 2);
        let mut j = summary(&mut rng, which, now);
        j.state = JobState::Finished;
        index.upsert(j);
    }
    let change = started.elapsed();
    println!(
        "warden bench-search: {} jobs over {DAYS} days in the API's index",
        index.len()
    );
    println!(
        "  load   {:>8.0} jobs/s ({:.1}s)   changes {:>8.0}/s   memory {}",
        args.jobs as f64 / load.as_secs_f64(),
        load.as_secs_f64(),
        changes as f64 / change.as_secs_f64(),
        match (before, rss_mib()) {
            (Some(b), Some(a)) => format!(
                "{:.0} MiB ({:.0} bytes/job)",
                a - b,
                (a - b) * 1024.0 * 1024.0 / args.jobs as f64
            ),
            _ => "unknown".into(),
        }
    );
    println!(
        "  {:<34} {:>9} {:>9} {:>9} {:>9}",
        "search (limit 100)", "matches", "p50 ms", "p99 ms", "max ms"
    );
    for (name, filter, limit, offset) in queries(now, &sample_source) {
        let mut samples = Vec::with_capacity(args.repeat);
        let mut total = 0;
        let mut exact = true;
        for _ in 0..args.repeat {
            let t = Instant::now();
            let r = index.search(&filter, limit, offset);
            samples.push(t.elapsed());
            total = r.total;
            exact = r.total_exact;
            std::hint::black_box(r.jobs);
        }
        let (p50, p99, max) = percentiles(samples);
        let total = format!("{total}{}", if exact { "" } else { "+" });
        println!("  {name:<34} {total:>9} {p50:>9.3} {p99:>9.3} {max:>9.3}");
    }
    println!(
        "  {:<34} {:>9} {:>9} {:>9} {:>9}",
        "stats (jobs changed in window)", "jobs", "p50 ms", "p99 ms", "max ms"
    );
    for (name, hours) in [
        ("1h", 1),
        ("24h", 24),
        ("7days", 24 * 7),
        ("30days", 24 * 30),
    ] {
        let mut samples = Vec::with_capacity(args.repeat);
        let mut jobs = 0;
        for _ in 0..args.repeat {
            let until = Utc::now();
            let t = Instant::now();
            let s = index.stats(until - chrono::Duration::hours(hours), until);
            samples.push(t.elapsed());
            jobs = s.jobs;
        }
        let (p50, p99, max) = percentiles(samples);
        println!("  {name:<34} {jobs:>9} {p50:>9.3} {p99:>9.3} {max:>9.3}");
    }
    console_pages(&index, args.repeat);
    Ok(())
}

/// The console's pages rendered from this index: the server's work for a
/// page (the index lookups and the HTML), next to the JSON API's answer
/// to the same question (lookup and encoding): the ceiling a page is
/// measured against.
fn console_pages(index: &JobIndex, repeat: usize) {
    use warden_api::console::views;
    println!(
        "  {:<34} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "console page (server time)", "bytes", "page p50", "page p99", "json p50", "json p99"
    );
    let viewer = views::Viewer {
        token_set: false,
        signed_in: true,
        csrf: "0".repeat(32),
        here: "/jobs".into(),
    };
    let list = |q: &ListQuery, f: &Filter| {
        let r = index.search(f, q.limit.unwrap_or(views::PAGE), q.offset.unwrap_or(0));
        warden_api::ListReply {
            jobs: r.jobs,
            total: r.total,
            total_exact: r.total_exact,
            next: None,
        }
    };
    let jobs_page = |q: &ListQuery, f: &Filter| -> (usize, usize) {
        let reply = list(q, f);
        let json = serde_json::to_vec(&reply).map(|v| v.len()).unwrap_or(0);
        let page = views::layout(
            "Jobs",
            views::Section::Jobs,
            &viewer,
            None,
            views::jobs_filters(q),
            views::jobs_list(q, &Ok(reply), Utc::now()),
        )
        .into_string();
        (page.len(), json)
    };
    let crashed = ListQuery {
        state: Some("CRASHED".into()),
        ..ListQuery::default()
    };
    let crashed_filter = Filter {
        state: Some(JobState::Crashed),
        ..Filter::default()
    };
    let deep = ListQuery {
        offset: Some(5_000),
        ..ListQuery::default()
    };
    /// Renders something and says how many bytes it made.
    type Render<'a> = Box<dyn Fn() -> usize + 'a>;
    let cases: Vec<(&str, Render, Render)> = vec![
        (
            "/jobs (all, first 50)",
            Box::new(|| jobs_page(&ListQuery::default(), &Filter::default()).0),
            Box::new(|| jobs_page(&ListQuery::default(), &Filter::default()).1),
        ),
        (
            "/jobs?state=CRASHED",
            Box::new(|| jobs_page(&crashed, &crashed_filter).0),
            Box::new(|| {
                let r = list(&crashed, &crashed_filter);
                serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(0)
            }),
        ),
        (
            "/jobs?offset=5000",
            Box::new(|| jobs_page(&deep, &Filter::default()).0),
            Box::new(|| {
                let r = list(&deep, &Filter::default());
                serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(0)
            }),
        ),
        (
            "/stats?window=30days (24 bars)",
            Box::new(|| {
                let until = Utc::now();
                let since = until - chrono::Duration::days(30);
                let st = index.stats(since, until);
                let series = index.blame_series(since, until, 24);
                views::layout(
                    "Statistics",
                    views::Section::Stats,
                    &viewer,
                    None,
                    views::stats_filters("30days"),
                    views::stats(&Ok((st, series))),
                )
                .into_string()
                .len()
            }),
            Box::new(|| {
                let until = Utc::now();
                let st = index.stats(until - chrono::Duration::days(30), until);
                serde_json::to_vec(&st).map(|v| v.len()).unwrap_or(0)
            }),
        ),
        (
            "/queues (index part)",
            Box::new(|| {
                let now = Utc::now();
                let rows = index.queues(now);
                views::layout(
                    "Queues",
                    views::Section::Queues,
                    &viewer,
                    None,
                    maud::html! {},
                    views::queues(&Err("not asked".into()), &rows, now),
                )
                .into_string()
                .len()
            }),
            Box::new(|| index.queues(Utc::now()).len()),
        ),
    ];
    for (name, page, json) in cases {
        let mut pages = Vec::with_capacity(repeat);
        let mut jsons = Vec::with_capacity(repeat);
        let mut bytes = 0;
        for _ in 0..repeat {
            let t = Instant::now();
            bytes = std::hint::black_box(page());
            pages.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(json());
            jsons.push(t.elapsed());
        }
        let (p50, p99, _) = percentiles(pages);
        let (j50, j99, _) = percentiles(jsons);
        println!("  {name:<34} {bytes:>9} {p50:>9.3} {p99:>9.3} {j50:>9.3} {j99:>9.3}");
    }
}

/// A full job record for `s`, as the scheduler would have left it.
pub(crate) fn record(s: &JobSummary) -> Job {
    let mut job = Job::new(
        s.id,
        s.task.clone(),
        Default::default(),
        s.pool.clone(),
        s.priority,
        s.source_message_id.clone().map(|id| Source {
            subject: "org.fedoraproject.prod.buildsys.build.state.change".into(),
            message_id: id,
            rule: Some("koji".into()),
        }),
        "bench",
        s.created_at,
    );
    job.state = s.state;
    job.attempt = s.attempt;
    job.outcome = s.outcome.clone();
    job.blame = s.blame;
    job.detail = s.detail.clone();
    job.updated_at = s.updated_at;
    job
}

async fn over_the_bus(mut config: Config, args: &BenchSearchArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("warden-bench-search-")
        .tempdir()
        .context("cannot create temp dir")?;
    let nats = LocalNats::spawn(dir.path(), None, false)?;
    config.nats.url = nats.url();
    config.http.listen = "127.0.0.1:0".into();
    let config = Arc::new(config);
    let (client, handles) = runtime::Connect::new(&config, "bench")
        .topology_forever()
        .await
        .context("cannot connect to the bench's nats-server")?;
    let store = JobStore::new(handles.jobs.clone());
    let now = Utc::now();
    let mut rng = XorShift::new(0x2545_f491_4f6c_dd1d);
    let jobs: Vec<Job> = (0..args.bus_jobs as u64)
        .map(|n| record(&summary(&mut rng, n, now)))
        .collect();
    let started = Instant::now();
    let mut writes =
        futures::stream::iter(jobs.iter().map(|j| store.create(j))).buffer_unordered(512);
    while let Some(r) = writes.next().await {
        r.context("cannot write a job record")?;
    }
    let written = started.elapsed();
    println!(
        "  bus: {} job records written to the jobs bucket in {:.1}s ({:.0}/s)",
        args.bus_jobs,
        written.as_secs_f64(),
        args.bus_jobs as f64 / written.as_secs_f64()
    );

    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the API's port")?;
    let started = Instant::now();
    let api = tokio::spawn(warden_api::serve(
        config.clone(),
        listener,
        shutdown.clone(),
    ));
    let api_client = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(30));
    let caught_up = loop {
        match api_client
            .list(ListQuery {
                limit: Some(1),
                ..ListQuery::default()
            })
            .await
        {
            Ok(r) if r.total == args.bus_jobs => break started.elapsed(),
            _ if started.elapsed() > Duration::from_secs(1800) => {
                bail!("the API's index did not catch up within 30 minutes")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    println!(
        "  bus: API started and its index caught up with the bucket in {:.1}s ({:.0} jobs/s)",
        caught_up.as_secs_f64(),
        args.bus_jobs as f64 / caught_up.as_secs_f64()
    );
    println!(
        "  {:<34} {:>9} {:>9} {:>9} {:>9}",
        "over NATS request/reply", "matches", "p50 ms", "p99 ms", "max ms"
    );
    let list = |state: Option<&str>, blame: Option<&str>, since: Option<String>| ListQuery {
        state: state.map(Into::into),
        blame: blame.map(Into::into),
        since,
        ..ListQuery::default()
    };
    let day_ago = (now - chrono::Duration::hours(24)).to_rfc3339();
    let searches = [
        ("newest 100, no filter", list(None, None, None)),
        ("state=CRASHED", list(Some("CRASHED"), None, None)),
        (
            "blame=system last 24h",
            list(None, Some("system"), Some(day_ago)),
        ),
    ];
    for (name, q) in searches {
        let mut samples = Vec::with_capacity(args.repeat);
        let mut total = 0;
        for _ in 0..args.repeat {
            let t = Instant::now();
            let r = api_client
                .list(q.clone())
                .await
                .context("search over NATS")?;
            samples.push(t.elapsed());
            total = r.total;
        }
        let (p50, p99, max) = percentiles(samples);
        println!("  {name:<34} {total:>9} {p50:>9.3} {p99:>9.3} {max:>9.3}");
    }
    for window in ["24h", "30days"] {
        let mut samples = Vec::with_capacity(args.repeat);
        let mut jobs = 0;
        for _ in 0..args.repeat {
            let t = Instant::now();
            let s = api_client
                .stats(StatsQuery {
                    window: Some(window.into()),
                })
                .await
                .context("stats over NATS")?;
            samples.push(t.elapsed());
            jobs = s.jobs;
        }
        let (p50, p99, max) = percentiles(samples);
        println!(
            "  {:<34} {jobs:>9} {p50:>9.3} {p99:>9.3} {max:>9.3}",
            format!("stats {window}")
        );
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), api).await;
    drop(nats);
    Ok(())
}
