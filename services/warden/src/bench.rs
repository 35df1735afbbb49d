//! `warden bench`: no-op jobs end to end through a real local bus.
//!
//! Path measured: job created in the KV bucket (as the API and trigger do)
//! → scheduler watch → lease by compare-and-set → worker → Started and
//! Finished reports on the reports stream → scheduler compare-and-sets.
//! Every state change is a JetStream write acknowledged by the server.

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

use crate::natsd::LocalNats;
use crate::BenchArgs;

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
    let _nats = match nats_url {
        Some(url) => {
            config.nats.url = url;
            None
        }
        None => {
            let n = LocalNats::spawn(dir.path(), None, args.sync_always)?;
            config.nats.url = n.url();
            Some(n)
        }
    };
    config.worker.capacity = args.in_flight.div_ceil(args.workers) as u32;
    config.worker.work_dir = dir.path().join("work").display().to_string();
    println!(
        "warden bench: {} jobs, {} workers x {} slots, nats {} (sync: {})",
        args.jobs,
        args.workers,
        config.worker.capacity,
        warden_shared::redact::redact(&config.nats.url),
        if args.sync_always {
            "always"
        } else {
            "server default"
        }
    );
    let noop: Arc<dyn Executor> = Arc::new(NoopExecutor);
    let clean = phase(&config, &args, "no-op executor", noop, true).await?;
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
        let with_retries = phase(&flaky_config, &args, &label, flaky, false).await?;
        println!(
            "{label:>16} burst throughput is {:.0}% of the clean run (retry delay {:?})",
            100.0 * with_retries / clean,
            delay
        );
    }
    if !args.no_process {
        let process: Arc<dyn Executor> = Arc::new(warden_worker::ProcessExecutor::new(Arc::new(
            config.clone(),
        )));
        phase(&config, &args, "process `true`", process, true).await?;
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

async fn phase(
    config: &Config,
    args: &BenchArgs,
    label: &str,
    executor: Arc<dyn Executor>,
    sequential: bool,
) -> anyhow::Result<f64> {
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
        tasks.spawn(async move { warden_fencing::run(c, s).await.map_err(anyhow::Error::from) });
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
    let finished: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let watcher = {
        let (finished, notify) = (finished.clone(), notify.clone());
        let mut watch = handles.jobs.watch(">").await.context("cannot watch jobs")?;
        tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let Ok(job) = store::decode(&entry.key, &entry.value) else {
                    continue;
                };
                if job.state.is_terminal() {
                    finished
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(job.id, Instant::now());
                    notify.notify_waiters();
                }
            }
        })
    };
    // Let the workers register before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Burst.
    let n = args.jobs;
    let submitted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let start = Instant::now();
    let results = futures::stream::iter(0..n)
        .map(|_| {
            let (store, submitted) = (store.clone(), submitted.clone());
            async move {
                let job = noop_job();
                submitted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(job.id, Instant::now());
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
    wait_all(
        &finished,
        &notify,
        &ids,
        Duration::from_secs(60 + n as u64 / 100),
    )
    .await?;
    let total = start.elapsed();
    let throughput = n as f64 / total.as_secs_f64();
    let lat = latencies(&submitted, &finished, &ids);
    println!(
        "{label:>16} burst:      {n} jobs in {:.2} s = {:.0} jobs/s (submit {:.0} jobs/s); submit->FINISHED p50 {:.1} ms p99 {:.1} ms",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
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
        let t0 = Instant::now();
        submitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.id, t0);
        store.create(&job).await.context("cannot submit")?;
        wait_all(&finished, &notify, &[job.id], Duration::from_secs(30)).await?;
        seq.push(job.id);
    }
    if m > 0 {
        let seq_total = seq_start.elapsed();
        let lat = latencies(&submitted, &finished, &seq);
        println!(
            "{label:>16} sequential: {m} jobs in {:.2} s = {:.0} jobs/s; submit->FINISHED p50 {:.1} ms p99 {:.1} ms",
            seq_total.as_secs_f64(),
            m as f64 / seq_total.as_secs_f64(),
            pct(&lat, 0.50),
            pct(&lat, 0.99)
        );
    }

    // Every job must have ended FINISHED: a benchmark that loses jobs is a bug report.
    let mut not_finished = 0;
    let mut retried = 0;
    let mut sampled = 0;
    for id in ids.iter().chain(seq.iter()).take(2000) {
        if let Ok(Some(v)) = store.get(id).await {
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
        println!("{label:>16} {retried} of {sampled} sampled jobs needed a retry; all finished");
    }
    watcher.abort();
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    client.flush().await.ok();
    if not_finished > 0 {
        bail!("{not_finished} sampled jobs did not end FINISHED");
    }
    Ok(throughput)
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

async fn wait_all(
    finished: &Mutex<HashMap<Uuid, Instant>>,
    notify: &tokio::sync::Notify,
    ids: &[Uuid],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let done = {
            let f = finished.lock().unwrap_or_else(|p| p.into_inner());
            ids.iter().filter(|id| f.contains_key(id)).count()
        };
        if done == ids.len() {
            return Ok(());
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::time::sleep_until(deadline) => bail!("only {done} of {} jobs ended within {timeout:?}", ids.len()),
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

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
