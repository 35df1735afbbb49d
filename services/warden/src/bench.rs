//! `warden bench`: no-op jobs end to end through a real local bus, held
//! to the bare JetStream lifecycle measured on the same server in the
//! same run ([`crate::bench_bare`]).
//!
//! Path measured: job created in the KV bucket (as the API and trigger do)
//! → scheduler watch → lease by compare-and-set → worker → Started and
//! Finished reports on the reports stream → scheduler compare-and-sets.
//! Every state change is a JetStream write acknowledged by the server.
//!
//! Each case prints its figure, the ceiling it is held to where there is
//! one, the CPU seconds per 1,000 jobs of this process (every Warden
//! service and the bench's client) and of nats-server, and both's peak
//! memory during the case; `--json` adds one JSON line per case.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warden_shared::job::{Blame, CrashInfo, Job};
use warden_shared::messages::Fault;
use warden_shared::store::{self, JobStore};
use warden_shared::{runtime, Config, JobState};
use warden_worker::{ExecFuture, ExecRequest, Execution, Executor, NoopExecutor};

use crate::bench_search::status_mib;
use crate::natsd::LocalNats;
use crate::BenchArgs;

/// The bus the bench runs on.
enum Bus {
    /// `--nats-url`: a server someone else runs (no CPU figures for it).
    External,
    Single(LocalNats),
    Cluster(warden_chaos::cluster::Cluster),
}

impl Bus {
    fn server_pids(&self) -> Vec<u32> {
        match self {
            Bus::External => Vec::new(),
            Bus::Single(n) => n.server_pid().into_iter().collect(),
            Bus::Cluster(c) => c.server_pids(),
        }
    }

    fn nodes(&self) -> usize {
        match self {
            Bus::Cluster(_) => 3,
            _ => 1,
        }
    }
}

pub async fn run(
    mut config: Config,
    nats_url: Option<String>,
    args: BenchArgs,
) -> anyhow::Result<i32> {
    if args.jobs == 0 || args.workers == 0 || args.in_flight == 0 {
        bail!("--jobs, --workers and --in-flight must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.fail_rate) {
        bail!("--fail-rate must be between 0 and 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("warden-bench-")
        .tempdir()
        .context("cannot create temp dir")?;
    let mut bus = match nats_url {
        Some(url) => {
            config.nats.url = url;
            Bus::External
        }
        None if args.cluster => {
            let c =
                warden_chaos::cluster::Cluster::start(&dir.path().join("nats"), args.sync_always)
                    .await?;
            config.nats.url = c.url();
            config.nats.replicas = 3;
            Bus::Cluster(c)
        }
        None => {
            let n = LocalNats::spawn(dir.path(), None, args.sync_always)?;
            config.nats.url = n.url();
            Bus::Single(n)
        }
    };
    config.worker.capacity = args.in_flight.div_ceil(args.workers) as u32;
    config.worker.work_dir = dir.path().join("work").display().to_string();
    let sync = if args.sync_always {
        "always"
    } else {
        "server default"
    };
    println!(
        "warden bench: {} jobs, {} workers x {} slots, nats {} ({} node{}, sync: {sync})",
        args.jobs,
        args.workers,
        config.worker.capacity,
        warden_shared::redact::redact(&config.nats.url),
        bus.nodes(),
        if bus.nodes() == 1 { "" } else { "s" },
    );
    let mut table = Table::new(bus.nodes(), sync, args.jobs);
    let nats_pids = bus.server_pids();
    let (client, _handles) = runtime::Connect::new(&config, "bench")
        .topology_forever()
        .await
        .context("cannot connect to the bench's bus")?;

    // The ceiling: the bare lifecycle on the same server.
    let usage = Usage::start(&nats_pids);
    let bare =
        crate::bench_bare::measure(&client, &config.topology(), args.jobs, args.sequential).await?;
    let bare_usage = usage.finish(args.jobs + args.sequential);
    let usage = Usage::start(&nats_pids);
    let writes = crate::bench_bare::writes_alone(&client, &config.topology(), args.jobs).await?;
    let writes_usage = usage.finish(args.jobs);
    println!(
        "{:>16} burst:      {:.0} jobs/s (its five writes per job alone, chained: {:.0} jobs/s); one at a time: submit->FINISHED p50 {:.2} ms p99 {:.2} ms  ({bare_usage})",
        "bare JetStream",
        bare.burst,
        writes,
        bare.one_p50_ms,
        bare.one_p99_ms,
    );

    let noop: Arc<dyn Executor> = Arc::new(NoopExecutor);
    let clean = phase(
        &config,
        &args,
        &nats_pids,
        "no-op executor",
        noop.clone(),
        true,
    )
    .await?;
    println!(
        "{:>16} burst is {:.2}x the bare lifecycle's; one at a time p50 {:.2}x",
        "warden",
        clean.burst / bare.burst,
        clean.one_p50_ms / bare.one_p50_ms
    );
    table.row(
        "no-op burst, jobs/s",
        Some(bare.burst),
        clean.burst,
        bare_usage,
        clean.usage,
    );
    table.row(
        "no-op burst, jobs/s, against the five writes alone",
        Some(writes),
        clean.burst,
        writes_usage,
        clean.usage,
    );
    table.row(
        "one at a time, submit->FINISHED p50 ms",
        Some(bare.one_p50_ms),
        clean.one_p50_ms,
        bare_usage,
        clean.usage,
    );
    table.row(
        "one at a time, submit->FINISHED p99 ms",
        Some(bare.one_p99_ms),
        clean.one_p99_ms,
        bare_usage,
        clean.usage,
    );

    if args.steady_secs > 0 {
        let rate = clean.burst * 0.5;
        let steady = steady(&config, &args, &nats_pids, noop, rate).await?;
        for (what, lat) in [("RUNNING", &steady.running), ("FINISHED", &steady.finished)] {
            for (p, name) in [(0.50, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
                table.row(
                    &format!("steady {rate:.0} jobs/s (50%), submit->{what} {name} ms"),
                    None,
                    pct(lat, p),
                    Usage::none(),
                    steady.usage,
                );
            }
        }
    }

    if args.fail_rate > 0.0 {
        // Retried jobs: a share of first attempts crash with a retryable
        // third-party fault and come back after the retry delay.
        let mut flaky_config = config.clone();
        let delay = Duration::from_millis(args.retry_delay_ms);
        flaky_config.retry.initial_delay = delay;
        flaky_config.retry.max_delay = flaky_config.retry.max_delay.max(delay);
        let flaky: Arc<dyn Executor> = Arc::new(FailFirstAttempt {
            rate: args.fail_rate,
        });
        let label = format!("{:.0}% fail once", args.fail_rate * 100.0);
        let with_retries = phase(&flaky_config, &args, &nats_pids, &label, flaky, false).await?;
        println!(
            "{label:>16} burst throughput is {:.0}% of the clean run (retry delay {:?})",
            100.0 * with_retries.burst / clean.burst,
            delay
        );
    }
    if !args.no_process {
        let spawn = spawn_rate(args.process_jobs, args.in_flight).await?;
        println!(
            "{:>16} {:.0} processes/s ({} at a time, no Warden)",
            "spawn `true`", spawn, args.in_flight
        );
        let process: Arc<dyn Executor> = Arc::new(warden_worker::ProcessExecutor::new(Arc::new(
            config.clone(),
        ))?);
        let process_args = BenchArgs {
            jobs: args.process_jobs,
            ..args.clone()
        };
        let with_process = phase(
            &config,
            &process_args,
            &nats_pids,
            "process `true`",
            process,
            false,
        )
        .await?;
        println!(
            "{:>16} burst is {:.2}x spawning `true` alone",
            "process `true`",
            with_process.burst / spawn
        );
        table.row(
            "a process per job (`true`), jobs/s",
            Some(spawn),
            with_process.burst,
            Usage::none(),
            with_process.usage,
        );
    }
    table.print();
    if args.json {
        table.print_json(&args);
    }
    drop(client);
    if let Bus::Cluster(c) = &mut bus {
        c.stop().await;
    }
    Ok(0)
}

/// Crashes the first attempt of about `rate` of all jobs (chosen by job
/// id) with a retryable third-party fault; every later attempt passes.
struct FailFirstAttempt {
    rate: f64,
}

impl Executor for FailFirstAttempt {
    fn execute(&self, req: ExecRequest, _cancel: CancellationToken) -> ExecFuture<'_> {
        let unlucky = (req.job_id.as_u128() % 10_000) < (self.rate * 10_000.0) as u128;
        Box::pin(async move {
            if unlucky && req.epoch == 1 {
                // As a task says it: in its status file, which is what the
                // classifier reads.
                Execution::Crashed {
                    crash: CrashInfo {
                        status_file: Some(
                            r#"{"blame":"third_party","detail":"network","description":"bench: transient failure"}"#
                                .into(),
                        ),
                        ..CrashInfo::default()
                    },
                    fault: Some(Fault {
                        blame: Blame::ThirdParty,
                        detail: "network".into(),
                        description: "bench: transient failure".into(),
                    }),
                }
            } else {
                Execution::Finished {
                    outcome: "passed".into(),
                    duration_ms: 0,
                }
            }
        })
    }
}

/// What one case measured.
struct PhaseFigures {
    burst: f64,
    one_p50_ms: f64,
    one_p99_ms: f64,
    usage: Usage,
}

/// Every Warden service of the path, in this process, on `config`'s bus;
/// and a watch of the bucket noting when each job was first seen RUNNING
/// and when it ended.
struct Services {
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    client: async_nats::Client,
    store: JobStore,
    running: Arc<Mutex<HashMap<Uuid, Instant>>>,
    finished: Arc<Mutex<HashMap<Uuid, Instant>>>,
    notify: Arc<tokio::sync::Notify>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Services {
    async fn start(
        config: &Config,
        args: &BenchArgs,
        executor: Arc<dyn Executor>,
    ) -> anyhow::Result<Services> {
        let config = Arc::new(config.clone());
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        {
            let (c, s) = (config.clone(), shutdown.clone());
            tasks.spawn(async move {
                warden_scheduler::run(c, s)
                    .await
                    .map_err(anyhow::Error::from)
            });
            let (c, s) = (config.clone(), shutdown.clone());
            tasks
                .spawn(async move { warden_fencing::run(c, s).await.map_err(anyhow::Error::from) });
            let (c, s) = (config.clone(), shutdown.clone());
            tasks.spawn(async move {
                warden_classifier::service::run(c, s)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        for i in 0..args.workers {
            let mut wc = (*config).clone();
            wc.worker.bot_id = format!("bench-{i}");
            let (c, s, e) = (Arc::new(wc), shutdown.clone(), executor.clone());
            tasks.spawn(async move {
                warden_worker::run_with(c, e, s)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let (client, handles) = runtime::Connect::new(&config, "bench")
            .topology_forever()
            .await?;
        let store = JobStore::new(handles.jobs.clone());
        let running: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
        let finished: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
        let notify = Arc::new(tokio::sync::Notify::new());
        let watcher = {
            let (running, finished, notify) = (running.clone(), finished.clone(), notify.clone());
            let mut watch = handles.jobs.watch(">").await.context("cannot watch jobs")?;
            tokio::spawn(async move {
                while let Some(entry) = watch.next().await {
                    // A watch error (a node lost, a missed heartbeat) is
                    // not the end of the watch: stopping here would show
                    // every later job as never ended.
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(e) => {
                            tracing::warn!(error = %e, "bench watch of jobs: error; going on");
                            continue;
                        }
                    };
                    let Ok(job) = store::decode(&entry.key, &entry.value) else {
                        continue;
                    };
                    if job.state == JobState::Running {
                        lock(&running).entry(job.id).or_insert_with(Instant::now);
                    } else if job.state.is_terminal() {
                        lock(&finished).insert(job.id, Instant::now());
                        notify.notify_waiters();
                    }
                }
            })
        };
        // Let the workers register before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Services {
            shutdown,
            tasks,
            client,
            store,
            running,
            finished,
            notify,
            watcher,
        })
    }

    /// Waits until every job of `ids` has ended; if some have not by
    /// `timeout`, says where (up to ten of) them are, read from the bucket
    /// itself, so a stranded job and a watch that missed an end can be
    /// told apart.
    async fn wait_all(&self, ids: &[Uuid], timeout: Duration) -> anyhow::Result<()> {
        let Err(e) = wait_all(&self.finished, &self.notify, ids, timeout).await else {
            return Ok(());
        };
        let missing: Vec<Uuid> = {
            let f = lock(&self.finished);
            ids.iter()
                .filter(|id| !f.contains_key(id))
                .take(10)
                .copied()
                .collect()
        };
        for id in missing {
            match self.store.get(&id).await {
                Ok(Some(v)) => eprintln!(
                    "  not seen ending: {id} {:?} attempt {} revision {} lease {:?} updated {}",
                    v.job.state, v.job.attempt, v.revision, v.job.lease, v.job.updated_at
                ),
                Ok(None) => eprintln!("  not seen ending: {id} is not in the bucket"),
                Err(e) => eprintln!("  not seen ending: {id} cannot be read: {e}"),
            }
        }
        // Whether the scheduler holds them: in its queue and not handed
        // out, or not in it at all.
        match self
            .client
            .request(warden_shared::subjects::SCHED_QUEUE, Vec::new().into())
            .await
        {
            Ok(reply) => eprintln!(
                "  the scheduler's queue: {}",
                String::from_utf8_lossy(&reply.payload)
            ),
            Err(e) => eprintln!("  the scheduler's queue cannot be read: {e}"),
        }
        for family in warden_shared::metrics::registry().gather() {
            let name = family.name();
            if name.contains("conflict") || name.contains("dispatch") || name.contains("orphan") {
                let total: f64 = family
                    .get_metric()
                    .iter()
                    .map(|m| m.get_counter().get_value())
                    .sum();
                eprintln!("  {name} {total}");
            }
        }
        Err(e)
    }

    /// Every job of `ids` ended FINISHED, as far as a sample of 2,000 of
    /// them tells (a benchmark that loses jobs is a bug report); how many
    /// of the sample needed a retry.
    async fn check_finished(&self, label: &str, ids: &[Uuid]) -> anyhow::Result<()> {
        let mut not_finished = 0;
        let mut retried = 0;
        let mut sampled = 0;
        for id in ids.iter().take(2000) {
            if let Ok(Some(v)) = self.store.get(id).await {
                sampled += 1;
                if v.job.state != JobState::Finished {
                    not_finished += 1;
                }
                if v.job.attempt > 1 {
                    retried += 1;
                }
            }
        }
        if retried > 0 {
            println!(
                "{label:>16} {retried} of {sampled} sampled jobs needed a retry; all finished"
            );
        }
        if not_finished > 0 {
            bail!("{label}: {not_finished} sampled jobs did not end FINISHED");
        }
        Ok(())
    }

    async fn stop(mut self) {
        self.watcher.abort();
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.client.flush().await.ok();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A burst of `args.jobs`, then (with `sequential`) `args.sequential` jobs
/// one at a time.
async fn phase(
    config: &Config,
    args: &BenchArgs,
    nats_pids: &[u32],
    label: &str,
    executor: Arc<dyn Executor>,
    sequential: bool,
) -> anyhow::Result<PhaseFigures> {
    let services = Services::start(config, args, executor).await?;
    let (store, finished) = (&services.store, &services.finished);
    let usage = Usage::start(nats_pids);

    // Burst.
    let n = args.jobs;
    let submitted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let start = Instant::now();
    let results = futures::stream::iter(0..n)
        .map(|_| {
            let (store, submitted) = (store.clone(), submitted.clone());
            async move {
                let job = noop_job();
                lock(&submitted).insert(job.id, Instant::now());
                store.create(&job).await.map(|_| job.id)
            }
        })
        .buffer_unordered(512)
        .collect::<Vec<_>>()
        .await;
    let submit_elapsed = start.elapsed();
    let ids: Vec<Uuid> = results
        .into_iter()
        .collect::<Result<_, _>>()
        .context("cannot submit")?;
    services
        .wait_all(&ids, Duration::from_secs(60 + n as u64 / 100))
        .await?;
    let total = start.elapsed();
    let burst = n as f64 / total.as_secs_f64();
    let lat = latencies(&submitted, finished, &ids);
    println!(
        "{label:>16} burst:      {n} jobs in {:.2} s = {burst:.0} jobs/s (submit {:.0} jobs/s); submit->FINISHED p50 {:.1} ms p99 {:.1} ms",
        total.as_secs_f64(),
        n as f64 / submit_elapsed.as_secs_f64(),
        pct(&lat, 0.50),
        pct(&lat, 0.99)
    );

    // One at a time.
    let m = if sequential {
        args.sequential.min(n).max(1)
    } else {
        0
    };
    let mut seq = Vec::with_capacity(m);
    let seq_start = Instant::now();
    for _ in 0..m {
        let job = noop_job();
        lock(&submitted).insert(job.id, Instant::now());
        store.create(&job).await.context("cannot submit")?;
        services
            .wait_all(&[job.id], Duration::from_secs(30))
            .await?;
        seq.push(job.id);
    }
    let usage = usage.finish(n + m);
    let one = latencies(&submitted, finished, &seq);
    if m > 0 {
        println!(
            "{label:>16} sequential: {m} jobs in {:.2} s = {:.0} jobs/s; submit->FINISHED p50 {:.2} ms p99 {:.2} ms",
            seq_start.elapsed().as_secs_f64(),
            m as f64 / seq_start.elapsed().as_secs_f64(),
            pct(&one, 0.50),
            pct(&one, 0.99)
        );
    }
    println!("{label:>16} {usage}");
    let all: Vec<Uuid> = ids.iter().chain(seq.iter()).copied().collect();
    let checked = services.check_finished(label, &all).await;
    services.stop().await;
    checked?;
    Ok(PhaseFigures {
        burst,
        one_p50_ms: pct(&one, 0.50),
        one_p99_ms: pct(&one, 0.99),
        usage,
    })
}

/// What a steady load measured: submit→RUNNING and submit→FINISHED of
/// every job, sorted, in milliseconds.
struct SteadyFigures {
    running: Vec<f64>,
    finished: Vec<f64>,
    usage: Usage,
}

/// Jobs submitted at a steady `rate` for `args.steady_secs` (open loop:
/// on time whatever the answers do, so a slow answer shows as latency).
async fn steady(
    config: &Config,
    args: &BenchArgs,
    nats_pids: &[u32],
    executor: Arc<dyn Executor>,
    rate: f64,
) -> anyhow::Result<SteadyFigures> {
    let services = Services::start(config, args, executor).await?;
    let usage = Usage::start(nats_pids);
    let submitted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let total = (rate * args.steady_secs as f64).round().max(1.0) as usize;
    let start = Instant::now();
    let mut submits = tokio::task::JoinSet::new();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(total);
        for _ in sent..due {
            let (store, submitted) = (services.store.clone(), submitted.clone());
            submits.spawn(async move {
                let job = noop_job();
                lock(&submitted).insert(job.id, Instant::now());
                store.create(&job).await.map(|_| job.id)
            });
        }
        sent = sent.max(due);
    }
    let mut ids = Vec::with_capacity(total);
    while let Some(r) = submits.join_next().await {
        ids.push(r.context("a submit panicked")?.context("cannot submit")?);
    }
    services
        .wait_all(&ids, Duration::from_secs(60 + total as u64 / 100))
        .await?;
    let took = start.elapsed();
    let usage = usage.finish(total);
    let running = latencies(&submitted, &services.running, &ids);
    let finished = latencies(&submitted, &services.finished, &ids);
    println!(
        "{:>16} {total} jobs at {rate:.0} jobs/s over {:.1} s: submit->RUNNING p50 {:.2} p99 {:.2} p99.9 {:.2} ms; submit->FINISHED p50 {:.2} p99 {:.2} p99.9 {:.2} ms  ({usage})",
        "steady (50%)",
        took.as_secs_f64(),
        pct(&running, 0.5),
        pct(&running, 0.99),
        pct(&running, 0.999),
        pct(&finished, 0.5),
        pct(&finished, 0.99),
        pct(&finished, 0.999),
    );
    let checked = services.check_finished("steady (50%)", &ids).await;
    services.stop().await;
    checked?;
    Ok(SteadyFigures {
        running,
        finished,
        usage,
    })
}

/// Processes of `true` per second, `parallel` at a time, with nothing
/// else: what a process per job can cost at best on this machine.
async fn spawn_rate(n: usize, parallel: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut runs = futures::stream::iter(0..n)
        .map(|_| tokio::process::Command::new("true").status())
        .buffer_unordered(parallel);
    while let Some(status) = runs.next().await {
        let status = status.context("cannot spawn `true`")?;
        if !status.success() {
            bail!("`true` ended {status}");
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A fresh job for the built-in `noop` task in pool `default`.
fn noop_job() -> Job {
    Job::new(
        Uuid::new_v4(),
        "noop".into(),
        BTreeMap::new(),
        "default".into(),
        0,
        None,
        "bench",
        Utc::now(),
    )
}

pub(crate) async fn wait_all(
    finished: &Mutex<HashMap<Uuid, Instant>>,
    notify: &tokio::sync::Notify,
    ids: &[Uuid],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Every id before `done` has ended. Each wake-up moves it past the ids
    // that ended since, and stops at the first that has not: O(1) per
    // job and per wake-up (a count over all ids at every finished job was
    // quadratic, and its CPU counted against the figures).
    let mut done = 0;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let f = finished.lock().unwrap_or_else(|p| p.into_inner());
            while done < ids.len() && f.contains_key(&ids[done]) {
                done += 1;
            }
        }
        if done == ids.len() {
            return Ok(());
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                let f = finished.lock().unwrap_or_else(|p| p.into_inner());
                let ended = ids.iter().filter(|id| f.contains_key(id)).count();
                bail!("only {ended} of {} jobs ended within {timeout:?}", ids.len())
            }
        }
    }
}

fn latencies(
    submitted: &Mutex<HashMap<Uuid, Instant>>,
    finished: &Mutex<HashMap<Uuid, Instant>>,
    ids: &[Uuid],
) -> Vec<f64> {
    let s = submitted.lock().unwrap_or_else(|p| p.into_inner());
    let f = finished.lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<f64> = ids
        .iter()
        .filter_map(|id| {
            Some(
                f.get(id)?
                    .saturating_duration_since(*s.get(id)?)
                    .as_secs_f64()
                    * 1000.0,
            )
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU seconds and peak memory of this process (every Warden service and
/// the bench's client) and of the bus's nats-servers over one case.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    jobs: usize,
    warden_cpu_s: f64,
    nats_cpu_s: f64,
    warden_peak_mib: f64,
    nats_peak_mib: f64,
}

/// A case's usage being measured: the CPU times at its start (the peaks
/// were reset then).
struct UsageClock {
    pids: Vec<u32>,
    warden_cpu_s: f64,
    nats_cpu_s: f64,
}

impl Usage {
    /// No usage of its own (a figure measured with no Warden).
    fn none() -> Usage {
        Usage::default()
    }

    fn start(nats_pids: &[u32]) -> UsageClock {
        // Peak memory (VmHWM) counts from here: `5` resets it.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        for pid in nats_pids {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
        UsageClock {
            pids: nats_pids.to_vec(),
            warden_cpu_s: cpu_seconds("self").unwrap_or(0.0),
            nats_cpu_s: nats_pids
                .iter()
                .filter_map(|p| cpu_seconds(&p.to_string()))
                .sum(),
        }
    }

    fn per_1000(cpu_s: f64, jobs: usize) -> f64 {
        cpu_s * 1000.0 / jobs.max(1) as f64
    }

    fn measured(&self) -> bool {
        self.jobs > 0
    }
}

impl UsageClock {
    fn finish(self, jobs: usize) -> Usage {
        let nats_cpu: f64 = self
            .pids
            .iter()
            .filter_map(|p| cpu_seconds(&p.to_string()))
            .sum();
        Usage {
            jobs,
            warden_cpu_s: cpu_seconds("self").unwrap_or(0.0) - self.warden_cpu_s,
            nats_cpu_s: nats_cpu - self.nats_cpu_s,
            warden_peak_mib: status_mib("self", "VmHWM:").unwrap_or(f64::NAN),
            nats_peak_mib: self
                .pids
                .iter()
                .filter_map(|p| status_mib(&p.to_string(), "VmHWM:"))
                .sum(),
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU per 1,000 jobs: this process {:.2} s, nats-server {:.2} s; peak memory {:.0} MiB and {:.0} MiB",
            Usage::per_1000(self.warden_cpu_s, self.jobs),
            Usage::per_1000(self.nats_cpu_s, self.jobs),
            self.warden_peak_mib,
            self.nats_peak_mib
        )
    }
}

/// User and system CPU seconds of process `pid` (or `self`), from
/// `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_of_stat(&stat, rustix::param::clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15, counted after the command name, which
/// may itself hold spaces and parentheses) in seconds.
fn cpu_of_stat(stat: &str, ticks_per_second: u64) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second.max(1) as f64)
}

/// One figure of the run: Warden's, and the ceiling it is held to.
struct Row {
    work: String,
    ceiling: Option<f64>,
    warden: f64,
    ceiling_usage: Usage,
    usage: Usage,
}

/// Every figure of the run, printed as a table at the end and, with
/// `--json`, as one JSON line each.
struct Table {
    nodes: usize,
    sync: &'static str,
    jobs: usize,
    rows: Vec<Row>,
}

impl Table {
    fn new(nodes: usize, sync: &'static str, jobs: usize) -> Table {
        Table {
            nodes,
            sync,
            jobs,
            rows: Vec::new(),
        }
    }

    fn row(
        &mut self,
        work: &str,
        ceiling: Option<f64>,
        warden: f64,
        ceiling_usage: Usage,
        usage: Usage,
    ) {
        self.rows.push(Row {
            work: work.to_string(),
            ceiling,
            warden,
            ceiling_usage,
            usage,
        });
    }

    fn print(&self) {
        println!();
        println!(
            "{} node{}, sync {}, {} jobs per burst; CPU s per 1,000 jobs and peak MiB of Warden's process / nats-server",
            self.nodes,
            if self.nodes == 1 { "" } else { "s" },
            self.sync,
            self.jobs
        );
        println!(
            "| {:<54} | {:>9} | {:>9} | {:>5} | {:>11} | {:>11} |",
            "work", "ceiling", "warden", "ratio", "CPU s/1k", "peak MiB"
        );
        println!(
            "|{:-<56}|{:->11}|{:->11}|{:->7}|{:->13}|{:->13}|",
            "", "", "", "", "", ""
        );
        for r in &self.rows {
            let ceiling = r.ceiling.map_or("-".to_string(), |c| format!("{c:.2}"));
            let ratio = r
                .ceiling
                .map_or("-".to_string(), |c| format!("{:.2}", r.warden / c));
            let (cpu, mem) = if r.usage.measured() {
                (
                    format!(
                        "{:.2} / {:.2}",
                        Usage::per_1000(r.usage.warden_cpu_s, r.usage.jobs),
                        Usage::per_1000(r.usage.nats_cpu_s, r.usage.jobs)
                    ),
                    format!(
                        "{:.0} / {:.0}",
                        r.usage.warden_peak_mib, r.usage.nats_peak_mib
                    ),
                )
            } else {
                ("-".to_string(), "-".to_string())
            };
            println!(
                "| {:<54} | {ceiling:>9} | {:>9.2} | {ratio:>5} | {cpu:>11} | {mem:>11} |",
                r.work, r.warden
            );
        }
    }

    fn print_json(&self, args: &BenchArgs) {
        let usage = |u: &Usage| {
            u.measured().then(|| {
                serde_json::json!({
                    "jobs": u.jobs,
                    "warden_cpu_s_per_1000": Usage::per_1000(u.warden_cpu_s, u.jobs),
                    "nats_cpu_s_per_1000": Usage::per_1000(u.nats_cpu_s, u.jobs),
                    "warden_peak_mib": u.warden_peak_mib,
                    "nats_peak_mib": u.nats_peak_mib,
                })
            })
        };
        let at = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        for r in &self.rows {
            let line = serde_json::json!({
                "at": at,
                "nodes": self.nodes,
                "sync": self.sync,
                "jobs": self.jobs,
                "in_flight": args.in_flight,
                "workers": args.workers,
                "work": r.work,
                "ceiling": r.ceiling,
                "warden": r.warden,
                "ratio": r.ceiling.map(|c| r.warden / c),
                "usage": usage(&r.usage),
                "ceiling_usage": usage(&r.ceiling_usage),
            });
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // A command name with a space and a parenthesis in it.
        let stat =
            "4242 (nats (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 0 0";
        assert_eq!(cpu_of_stat(stat, 100), Some(3.0));
        assert_eq!(cpu_of_stat("4242 (short) S 1", 100), None);
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 501.0);
        assert_eq!(pct(&v, 0.999), 999.0);
        assert!(pct(&[], 0.5).is_nan());
    }
}
