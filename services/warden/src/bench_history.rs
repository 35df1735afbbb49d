//! `warden bench-history`: the execution database at scale, in one run.
//!
//! 1. Loads `--jobs` archived jobs (10 million by default) into SQLite
//!    and, with `--postgres URL`, PostgreSQL, as an import of jobs already
//!    gone from the bucket ([`HistoryDb::import_archived`]: the recorder's
//!    write, each job archived in the same transaction), and prints the
//!    rate. The recorder's own rate is step 3's.
//! 2. Times the searches the API sends to the database (every filter,
//!    full text, a deep page) and statistics over 24 hours and 30 days:
//!    p50/p99/max against the ceilings of the issue (50 ms, 200 ms), and
//!    this process's memory with the whole history behind it.
//! 3. On a real nats-server: writes `--bus-jobs` finished jobs (three
//!    revisions each) as fast as the bus takes them (the ceiling),
//!    runs a real recorder until it has recorded and archived them, and
//!    compares its rate with the ceiling; then starts the real
//!    `warden-scheduler` on the bucket before archival, after it, and on a
//!    bucket that never held history, and prints its start time and peak
//!    memory in each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use warden_history::{HistoryDb, Revision, Search};
use warden_shared::job::CrashInfo;
use warden_shared::store::JobStore;
use warden_shared::xorshift::XorShift;
use warden_shared::{runtime, Config, Job, JobState};

use crate::bench_search::{percentiles, record, rss_mib, status_mib, summary};
use crate::natsd::LocalNats;
use crate::BenchHistoryArgs;

/// A duration in milliseconds, as the tables print them.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const SEARCH_CEILING_MS: f64 = 50.0;
const STATS_CEILING_MS: f64 = 200.0;
/// The exit status of a run that measured everything and missed a
/// ceiling (an error is 1).
pub const CEILING_MISSED: i32 = 3;
/// Jobs per imported batch (one transaction) while loading.
const LOAD_BATCH: usize = 5000;

pub async fn run(config: Config, args: BenchHistoryArgs) -> anyhow::Result<i32> {
    if args.jobs == 0 || args.repeat == 0 {
        bail!("--jobs and --repeat must be at least 1");
    }
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => tempfile::Builder::new()
            .prefix("warden-bench-history-")
            .tempdir()
            .context("cannot create a temp dir")?
            .keep(),
    };
    println!(
        "bench-history: {} archived jobs, each query {} times (data in {})",
        args.jobs,
        args.repeat,
        dir.display()
    );
    let mut failed = false;
    let sqlite = format!("sqlite://{}", dir.join("history.sqlite").display());
    if !args.skip_sqlite {
        failed |= database(&sqlite, "sqlite", &args).await?;
    }
    if let Some(url) = &args.postgres {
        failed |= database(url, "postgres", &args).await?;
    }
    if args.bus_jobs > 0 {
        over_the_bus(config, &args, &dir).await?;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(if failed { CEILING_MISSED } else { 0 })
}

/// The archived job number `n` of `total`: created in the 30 days before
/// `now`, in order, a crash with a log tail now and then.
fn archived_job(rng: &mut XorShift, n: u64, total: u64, now: DateTime<Utc>) -> Job {
    let mut s = summary(rng, n, now);
    if matches!(s.state, JobState::Scheduled | JobState::Running) {
        s.state = JobState::Finished;
        s.outcome = Some("PASSED".into());
        s.attempt = s.attempt.max(1);
    }
    // Jobs reach the recorder roughly in the order they were made: job n
    // of N is made at n/N of the 30 days, its change up to 2 hours later.
    let span = 30 * 86_400_000_000i64;
    let created = now - chrono::Duration::microseconds(span)
        + chrono::Duration::microseconds((span as f64 * (n as f64 / total as f64)) as i64);
    s.updated_at = created + (s.updated_at - s.created_at);
    s.created_at = created;
    s.queued_at = created;
    let mut job = record(&s);
    job.lease = s.bot_id.clone().map(|bot| warden_shared::job::Lease {
        session: format!("{bot}-s1"),
        bot_id: bot,
        resource: None,
        resources: Vec::new(),
        epoch: s.attempt,
        leased_at: s.created_at,
        started_at: Some(s.created_at),
        secret_hash: None,
    });
    if job.state == JobState::Crashed {
        const TAILS: [&str; 4] = [
            "curl: (6) Could not resolve host: mirrors.fedoraproject.org",
            "error: Bad exit status from /var/tmp/rpm-tmp.XYZ (%build)",
            "Out of memory: Killed process 4242 (cc1plus)",
            "No space left on device",
        ];
        job.crash = Some(CrashInfo {
            exit_code: Some(1),
            log_tail: TAILS[(n % 4) as usize].to_string(),
            ..CrashInfo::default()
        });
    }
    // A word in one job of 10,000: what a rare word costs.
    if n % 10_000 == 4_321 {
        job.description = Some("mass rebuild after the zstd soname bump".into());
    }
    job
}

/// Loads, times and prints one database; true if a ceiling was missed.
/// Each query runs once before it is timed: that first run reads from
/// disk what the page cache does not hold (all of it after a load on a
/// machine short of cache), and is shown but not judged; the ceilings are
/// for a database in use.
async fn database(url: &str, name: &str, args: &BenchHistoryArgs) -> anyhow::Result<bool> {
    let opening = Instant::now();
    let db = HistoryDb::open(url)
        .await
        .with_context(|| format!("cannot open {}", warden_history::redact_url(url)))?;
    let opening = opening.elapsed();
    let now = Utc::now() - chrono::Duration::days(2);
    let (held, archived) = db.job_counts().await?;
    // An earlier run's recorder may have added its live-path jobs
    // (--recorder-db): a few thousand beside the millions loaded.
    if held >= args.jobs as u64 && archived >= args.jobs as u64 {
        let analyzing = Instant::now();
        db.analyze().await?;
        println!(
            "  {name}: reusing the {archived} archived jobs already loaded ({} more recorded by \
             earlier runs' recorders; opened, migrations included, in {:.1}s; analyzed in {:.0}s)",
            held - args.jobs as u64,
            opening.as_secs_f64(),
            analyzing.elapsed().as_secs_f64()
        );
    } else if held > 0 {
        bail!(
            "{name}: the database holds {held} jobs, not {}: give an empty one",
            args.jobs
        );
    } else {
        // One thread makes the jobs; two imports at a time, so one
        // builds its rows while the other is in the database.
        let total = args.jobs as u64;
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Revision>>(4);
        let maker = tokio::task::spawn_blocking(move || {
            let mut rng = XorShift::new(0x6a09_e667_f3bc_c908);
            let mut n = 0u64;
            while n < total {
                let batch: Vec<Revision> = (n..(n + LOAD_BATCH as u64).min(total))
                    .map(|i| Revision {
                        rev: i + 1,
                        job: archived_job(&mut rng, i, total, now),
                    })
                    .collect();
                n += batch.len() as u64;
                if tx.blocking_send(batch).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let mut next_report = Instant::now() + Duration::from_secs(30);
        let mut n = 0u64;
        let imports =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
                .map(|batch| {
                    let db = db.clone();
                    async move {
                        db.import_archived(&batch, Utc::now()).await?;
                        Ok::<_, warden_history::DbError>(batch.len() as u64)
                    }
                })
                .buffer_unordered(2);
        let mut imports = std::pin::pin!(imports);
        while let Some(done) = imports.next().await {
            n += done?;
            if Instant::now() >= next_report {
                println!(
                    "  {name}: {n} imported ({:.0}/s)",
                    n as f64 / started.elapsed().as_secs_f64()
                );
                next_report += Duration::from_secs(30);
            }
        }
        maker.await.context("the job maker failed")?;
        let loaded = started.elapsed();
        let analyzing = Instant::now();
        db.analyze().await?;
        let analyzing = analyzing.elapsed();
        println!(
            "  {name}: imported {} archived jobs in {:.0}s ({:.0} jobs/s; the recorder's own \
             rate is --bus-jobs's figure), then analyzed them in {:.0}s",
            args.jobs,
            loaded.as_secs_f64(),
            args.jobs as f64 / loaded.as_secs_f64(),
            analyzing.as_secs_f64(),
        );
    }
    let rss_before = rss_mib();
    let mut missed = false;
    let since = |days: i64| Some(now - chrono::Duration::days(days));
    let s = Search::default;
    let searches: Vec<(&str, Search, usize, usize)> = vec![
        ("newest 100", s(), 100, 0),
        (
            "state=CRASHED",
            Search {
                state: Some("CRASHED".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "task=task-07",
            Search {
                task: Some("task-07".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "pool=pool-3 state=FINISHED",
            Search {
                pool: Some("pool-3".into()),
                state: Some("FINISHED".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "blame=system detail=oom",
            Search {
                blame: Some("system".into()),
                detail: Some("oom".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "bot=bot-150",
            Search {
                bot_id: Some("bot-150".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "last 24h",
            Search {
                since: since(1),
                ..s()
            },
            100,
            0,
        ),
        (
            "days 10-11 ago, task-01",
            Search {
                since: since(11),
                until: since(10),
                task: Some("task-01".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "q=resolve host",
            Search {
                text: Some("resolve host".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "q=soname (1 in 10,000)",
            Search {
                text: Some("soname".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "q=nosuchword",
            Search {
                text: Some("nosuchword".into()),
                ..s()
            },
            100,
            0,
        ),
        (
            "q=resolve host, offset 1000",
            Search {
                text: Some("resolve host".into()),
                ..s()
            },
            100,
            1000,
        ),
        (
            "q=memory, task-02",
            Search {
                text: Some("memory".into()),
                task: Some("task-02".into()),
                ..s()
            },
            100,
            0,
        ),
        ("offset 5000", s(), 100, 5000),
    ];
    println!(
        "  {name}: search (ms: a first run, then p50 / p99 / max of --repeat; ceiling {SEARCH_CEILING_MS} ms at p99)"
    );
    for (label, mut search, limit, offset) in searches {
        search.archived_only = search.text.is_none();
        let t = Instant::now();
        db.search(&search, limit, offset, 10_000).await?;
        let first = ms(t.elapsed());
        let mut samples = Vec::with_capacity(args.repeat);
        let mut total = 0;
        for _ in 0..args.repeat {
            let t = Instant::now();
            let page = db.search(&search, limit, offset, 10_000).await?;
            samples.push(t.elapsed());
            total = page.total;
        }
        let (p50, p99, max) = percentiles(samples);
        let over = p99 > SEARCH_CEILING_MS;
        missed |= over;
        println!(
            "    {label:<28} {first:>7.2} {p50:>7.2} {p99:>7.2} {max:>7.2}  ({total} matches){}",
            if over { "  OVER" } else { "" }
        );
    }
    println!(
        "  {name}: statistics (ms: a first run, then p50 / p99 / max of --repeat; ceiling {STATS_CEILING_MS} ms at p99)"
    );
    for (label, days) in [("24 hours", 1), ("30 days", 30)] {
        // The window reaches back `days` from two days ago, where the
        // loaded history ends.
        let window = |until: DateTime<Utc>| {
            (
                until - chrono::Duration::days(days) - chrono::Duration::days(2),
                until,
            )
        };
        let t = Instant::now();
        let (from, until) = window(Utc::now());
        db.counts(from, until).await?;
        let first = ms(t.elapsed());
        let mut samples = Vec::with_capacity(args.repeat);
        let mut jobs = 0;
        for _ in 0..args.repeat {
            let (from, until) = window(Utc::now());
            let t = Instant::now();
            let c = db.counts(from, until).await?;
            samples.push(t.elapsed());
            jobs = c.jobs;
        }
        let (p50, p99, max) = percentiles(samples);
        let over = p99 > STATS_CEILING_MS;
        missed |= over;
        println!(
            "    {label:<28} {first:>7.2} {p50:>7.2} {p99:>7.2} {max:>7.2}  ({jobs} jobs){}",
            if over { "  OVER" } else { "" }
        );
    }
    println!(
        "  {name}: this process's memory: {:.0} MiB before the queries, {:.0} MiB after \
         (the database's pages are its own cache, bounded per connection)",
        rss_before.unwrap_or(0.0),
        rss_mib().unwrap_or(0.0)
    );
    db.close().await;
    Ok(missed)
}

/// The live path on a real bus: the recorder against the bus's own write
/// rate, and the scheduler's start before and after archival.
async fn over_the_bus(
    mut config: Config,
    args: &BenchHistoryArgs,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    // A kept --dir holds an earlier run's bus and small database: start
    // this part afresh (the big database is the first step's to reuse).
    for stale in ["nats", "nats-fresh"] {
        let _ = std::fs::remove_dir_all(dir.join(stale));
    }
    for stale in [
        "bus-history.sqlite",
        "bus-history.sqlite-wal",
        "bus-history.sqlite-shm",
    ] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let nats_dir = dir.join("nats");
    let nats = LocalNats::spawn(&nats_dir, None, false)?;
    config.nats.url = nats.url();
    let small = format!("sqlite://{}", dir.join("bus-history.sqlite").display());
    config.history.database = args.recorder_db.clone().unwrap_or_else(|| small.clone());
    config.history.archive_after = Duration::from_secs(1);
    config.history.marker_grace = Duration::from_secs(1);
    config.history.janitor_interval = Duration::from_millis(200);
    let config = Arc::new(config);
    let (_client, handles) = runtime::Connect::new(&config, "bench")
        .topology_forever()
        .await
        .context("cannot connect to the bench's nats-server")?;
    let store = JobStore::new(handles.jobs.clone());
    let live = 1000usize;
    // The live jobs every case has: SCHEDULED in a pool nobody serves.
    for _ in 0..live {
        store
            .create(&Job::builder("bench").pool("nobody").at(Utc::now()).build())
            .await?;
    }
    // The ceiling: three revisions per job, as fast as the bus takes them.
    let old = Utc::now() - chrono::Duration::days(3);
    let started = Instant::now();
    let mut writes = futures::stream::iter(0..args.bus_jobs)
        .map(|_| {
            let store = store.clone();
            async move {
                let mut job = Job::builder("bench").pool("bench").at(old).build();
                let rev = store.create(&job).await?;
                job.state = JobState::Running;
                let rev = store.update(&job, rev).await?;
                job.state = JobState::Finished;
                job.outcome = Some("PASSED".into());
                store.update(&job, rev).await
            }
        })
        .buffer_unordered(256);
    while let Some(r) = writes.next().await {
        r.context("cannot write a job")?;
    }
    let wrote = started.elapsed();
    let ceiling = (3 * args.bus_jobs) as f64 / wrote.as_secs_f64();
    println!(
        "  bus: {} jobs written (3 revisions each) in {:.1}s: {ceiling:.0} revisions/s, the ceiling",
        args.bus_jobs,
        wrote.as_secs_f64()
    );
    let before = scheduler_start(&config, dir, live).await?;
    // The recorder on the whole stream with nothing due for archival yet:
    // its own rate, as after a burst (the janitor then archives what was
    // made a day before, at that day's rate, not the burst's).
    let mut draining = (*config).clone();
    // (The jobs were made three days ago: a day would make them due.)
    draining.history.archive_after = Duration::from_secs(3650 * 86_400);
    let shutdown = CancellationToken::new();
    let in_db = &warden_recorder::metrics::metrics().batch_seconds;
    let (batches_before, db_before) = (in_db.get_sample_count(), in_db.get_sample_sum());
    let jobs_stream = handles.jobs.stream.clone();
    let last = jobs_stream.clone().info().await?.state.last_sequence;
    let started = Instant::now();
    let recorder = tokio::spawn(warden_recorder::run(Arc::new(draining), shutdown.clone()));
    let db = HistoryDb::open(&config.history.database).await?;
    let (held_before, _) = db.job_counts().await?;
    if held_before > 0 {
        println!("  bus: the recorder writes to a database that holds {held_before} jobs");
    }
    let total = (args.bus_jobs + live) as u64;
    // Done when the recorder has acked the last revision (it acks after
    // its transaction commits), read off its consumer: counting the
    // database's rows instead would scan a big one and compete with the
    // recorder's writes.
    wait(
        Duration::from_secs(600),
        "the recorder to record every job",
        || {
            let stream = jobs_stream.clone();
            async move {
                stream
                    .consumer_info(warden_shared::subjects::RECORDER_CONSUMER)
                    .await
                    .map(|c| c.ack_floor.stream_sequence >= last && c.num_ack_pending == 0)
                    .unwrap_or(false)
            }
        },
    )
    .await?;
    let recorded = started.elapsed();
    shutdown.cancel();
    let _ = recorder.await;
    let (held_after, _) = db.job_counts().await?;
    if held_after < held_before + total {
        bail!(
            "the recorder acked every revision but the database holds {} of the {total} jobs",
            held_after.saturating_sub(held_before)
        );
    }
    // The bucket keeps a job's latest revision: what the recorder read.
    println!(
        "  bus: the recorder recorded {total} jobs in {:.1}s ({:.0} jobs/s; {:.2}x the bus's write \
         rate of {:.0} jobs/s)",
        recorded.as_secs_f64(),
        total as f64 / recorded.as_secs_f64(),
        (total as f64 / recorded.as_secs_f64()) / (ceiling / 3.0),
        ceiling / 3.0
    );
    let batches = in_db.get_sample_count() - batches_before;
    let db_secs = in_db.get_sample_sum() - db_before;
    println!(
        "  bus: {batches} batches ({:.0} revisions each on average), {db_secs:.1}s of it in the database's transactions ({:.0}%)",
        total as f64 / batches.max(1) as f64,
        100.0 * db_secs / recorded.as_secs_f64()
    );
    // Then archival of all of them at once, on its own.
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let recorder = tokio::spawn(warden_recorder::run(config.clone(), shutdown.clone()));
    let mut stream = handles.jobs.stream.clone();
    wait(
        Duration::from_secs(600),
        "archival and marker purge",
        || {
            let mut stream = stream.clone();
            async move {
                stream
                    .info()
                    .await
                    .map(|i| i.state.messages == live as u64)
                    .unwrap_or(false)
            }
        },
    )
    .await?;
    let archival = started.elapsed();
    println!(
        "  bus: the janitor archived {} jobs and purged their markers in {:.1}s ({:.0} jobs/s); \
         the bucket's stream is back to its {live} live jobs",
        args.bus_jobs,
        archival.as_secs_f64(),
        args.bus_jobs as f64 / archival.as_secs_f64(),
    );
    shutdown.cancel();
    let _ = recorder.await;
    let after = scheduler_start(&config, dir, live).await?;
    let messages = stream.info().await?.state.messages;
    // A bucket that never held history.
    let fresh_dir = dir.join("nats-fresh");
    let fresh = LocalNats::spawn(&fresh_dir, None, false)?;
    let mut fresh_config = (*config).clone();
    fresh_config.nats.url = fresh.url();
    let fresh_config = Arc::new(fresh_config);
    let (_c, h) = runtime::Connect::new(&fresh_config, "bench")
        .topology_forever()
        .await
        .context("cannot connect to the second nats-server")?;
    let fresh_store = JobStore::new(h.jobs);
    for _ in 0..live {
        fresh_store
            .create(&Job::builder("bench").pool("nobody").at(Utc::now()).build())
            .await?;
    }
    let none = scheduler_start(&fresh_config, dir, live).await?;
    println!("  scheduler: start (to /healthz 200), peak memory, replay of the bucket:");
    for (label, (t, hwm, replay)) in [
        (
            format!("{} history jobs in the bucket", args.bus_jobs),
            before,
        ),
        (format!("after archival ({messages} messages left)"), after),
        ("a bucket that never held history".to_string(), none),
    ] {
        println!(
            "    {label:<44} {:>7.0} ms {:>7.1} MiB {:>8.1} ms",
            t.as_secs_f64() * 1000.0,
            hwm,
            replay.as_secs_f64() * 1000.0
        );
    }
    drop(fresh);
    // The API's memory: on the same bus, with the big database the first
    // step loaded and with the recorder's small one.
    let big = dir.join("history.sqlite");
    let mut apis = Vec::new();
    if !args.skip_sqlite && big.exists() {
        let url = format!("sqlite://{}", big.display());
        apis.push((format!("{} archived jobs", args.jobs), url));
    }
    match &args.recorder_db {
        None => apis.push((format!("{} archived jobs", args.bus_jobs), small)),
        Some(url) if !apis.iter().any(|(_, big)| big == url) => {
            apis.push((format!("{} + {total} jobs", args.jobs), url.clone()))
        }
        Some(_) => {}
    }
    println!("  api: peak memory after starting and serving searches and stats:");
    for (label, url) in apis {
        let (hwm, took) = api_memory(&config, dir, &url).await?;
        println!(
            "    {label:<44} {hwm:>7.1} MiB  (the requests took {:.0} ms)",
            took.as_secs_f64() * 1000.0
        );
    }
    drop(nats);
    Ok(())
}

/// Starts the real `warden-api` on `config`'s bus and the database at
/// `database`, sends it the searches and statistics a console sends (each
/// five times), and returns its peak memory (VmHWM) and how long the
/// requests took.
async fn api_memory(
    config: &Config,
    dir: &std::path::Path,
    database: &str,
) -> anyhow::Result<(f64, Duration)> {
    let bin = std::env::current_exe()?.with_file_name("warden-api");
    let free_port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (port, metrics) = (free_port()?, free_port()?);
    let conf = dir.join("api.toml");
    std::fs::write(
        &conf,
        format!(
            "[nats]\nurl = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[history]\ndatabase = {database:?}\n",
            config.nats.url
        ),
    )?;
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&conf)
        .env("WARDEN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("api.log"))?)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}/api/v1");
    let served = async {
        wait(Duration::from_secs(300), "the API to start", || async {
            http.get(format!("{base}/jobs?limit=1"))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        })
        .await?;
        let started = Instant::now();
        for _ in 0..5 {
            for q in [
                "jobs?limit=100",
                "jobs?limit=100&state=CRASHED",
                "jobs?limit=100&pool=pool-3&state=FINISHED",
                "jobs?limit=100&q=resolve%20host",
                "jobs?limit=100&offset=5000",
                "stats?window=30days",
            ] {
                let r = http.get(format!("{base}/{q}")).send().await?;
                if !r.status().is_success() {
                    bail!("GET {q}: {}", r.status());
                }
                r.bytes().await?;
            }
        }
        Ok::<_, anyhow::Error>(started.elapsed())
    }
    .await;
    let hwm = status_mib(&child.id().to_string(), "VmHWM:").unwrap_or(0.0);
    let _ = child.kill();
    let _ = child.wait();
    Ok((hwm, served?))
}

async fn wait<F, Fut>(limit: Duration, what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        if started.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The first pass of a watch of the jobs bucket, as the scheduler and the
/// API make at every start: how long it takes.
async fn replay(config: &Config) -> anyhow::Result<Duration> {
    let client = async_nats::connect(&config.nats.url).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value(warden_shared::subjects::JOBS_BUCKET)
        .await?;
    let started = Instant::now();
    let mut watch = kv.watch_with_history(">").await?;
    while let Some(e) = watch.next().await {
        if e?.delta == 0 {
            break;
        }
    }
    Ok(started.elapsed())
}

/// Starts the real `warden-scheduler` on `config`'s bus: its time to a
/// healthy `/healthz`, its peak memory (VmHWM) once its replay of the
/// bucket is done, and how long that replay takes.
async fn scheduler_start(
    config: &Config,
    dir: &std::path::Path,
    _live: usize,
) -> anyhow::Result<(Duration, f64, Duration)> {
    let bin = std::env::current_exe()?.with_file_name("warden-scheduler");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("scheduler.toml");
    std::fs::write(
        &conf,
        format!(
            "[nats]\nurl = {:?}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            config.nats.url
        ),
    )?;
    let started = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&conf)
        .env("WARDEN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("scheduler.log"))?)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let ready = wait(
        Duration::from_secs(300),
        "the scheduler to start",
        || async {
            http.get(&url)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        },
    )
    .await;
    let took = started.elapsed();
    // The same replay the scheduler makes at start: once it is done here,
    // the scheduler's (begun earlier) is too, and its peak memory holds
    // the whole bucket's.
    let replayed = replay(config).await;
    let hwm = status_mib(&child.id().to_string(), "VmHWM:").unwrap_or(0.0);
    let _ = child.kill();
    let _ = child.wait();
    ready?;
    Ok((took, hwm, replayed?))
}
