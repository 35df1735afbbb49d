//! The bare JetStream job lifecycle: the ceiling `warden bench` holds
//! Warden to, measured on the same server in the same run.
//!
//! The hand-offs a job needs on a bus and nothing else, with the configs
//! of Warden's own bucket and reports stream (only the names differ):
//! a submitter creates the job in a KV bucket; a dispatcher watching the
//! bucket moves each SCHEDULED job to RUNNING by compare-and-set and, as
//! its worker, publishes a started and a finished report on a work-queue
//! stream; a consumer of that stream moves the job to FINISHED by
//! compare-and-set and acks both reports; the watch tells the submitter.
//! Three compare-and-sets and two acknowledged publishes per job, as in
//! Warden, on values of a hundred bytes, with no checks, no history, no
//! sessions and no leases: what a job costs the bus itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warden_shared::subjects::Topology;

const BUCKET: &str = "warden_bench_bare";
const STREAM: &str = "WARDEN_BENCH_BARE";
const PREFIX: &str = "warden.bench.bare";
/// Writes outstanding at each step, as `warden bench` submits.
const IN_FLIGHT: usize = 512;

/// What one bare run measured.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// Jobs per second for a burst, submit of the first to FINISHED of
    /// the last.
    pub burst: f64,
    /// Submit→FINISHED of jobs run one at a time, milliseconds.
    pub one_p50_ms: f64,
    pub one_p99_ms: f64,
}

#[derive(Serialize, Deserialize)]
struct BareJob {
    id: Uuid,
    state: Step,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
enum Step {
    Scheduled,
    Running,
    Finished,
}

#[derive(Serialize, Deserialize)]
struct BareReport {
    id: Uuid,
    finished: bool,
    /// The RUNNING revision, which the finishing compare-and-set names.
    revision: u64,
}

type Done = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// Runs a burst of `jobs` (at most `in_flight` submits outstanding, as
/// `warden bench` submits) and then `sequential` jobs one at a time.
pub async fn measure(
    client: &async_nats::Client,
    topology: &Topology,
    jobs: usize,
    sequential: usize,
) -> anyhow::Result<Figures> {
    let js = jetstream::new(client.clone());
    let (kv, stream) = fresh(&js, topology).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bare".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .context("cannot create the bare consumer")?;

    let done: Done = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let dispatcher = tokio::spawn(dispatch(
        kv.clone(),
        js.clone(),
        done.clone(),
        notify.clone(),
    ));
    let finisher = tokio::spawn(finish(kv.clone(), consumer));

    let submitted: Done = Arc::default();
    let started = Instant::now();
    let created = futures::stream::iter(0..jobs)
        .map(|_| {
            let (kv, submitted) = (kv.clone(), submitted.clone());
            async move {
                let id = Uuid::new_v4();
                lock(&submitted).insert(id, Instant::now());
                kv.create(id.to_string(), value(id, Step::Scheduled)?)
                    .await
                    .context("bare create")?;
                Ok::<_, anyhow::Error>(id)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let ids = created.into_iter().collect::<Result<Vec<_>, _>>()?;
    crate::bench::wait_all(
        &done,
        &notify,
        &ids,
        Duration::from_secs(60 + jobs as u64 / 100),
    )
    .await?;
    let burst = jobs as f64 / started.elapsed().as_secs_f64();

    let mut one = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let id = Uuid::new_v4();
        let t0 = Instant::now();
        kv.create(id.to_string(), value(id, Step::Scheduled)?)
            .await
            .context("bare create")?;
        crate::bench::wait_all(&done, &notify, &[id], Duration::from_secs(30)).await?;
        let at = lock(&done).get(&id).copied().unwrap_or_else(Instant::now);
        one.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
    }
    one.sort_by(f64::total_cmp);
    dispatcher.abort();
    finisher.abort();
    clean_up(&js).await;
    Ok(Figures {
        burst,
        one_p50_ms: crate::bench::pct(&one, 0.50),
        one_p99_ms: crate::bench::pct(&one, 0.99),
    })
}

fn lock(m: &Mutex<HashMap<Uuid, Instant>>) -> std::sync::MutexGuard<'_, HashMap<Uuid, Instant>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn value(id: Uuid, state: Step) -> anyhow::Result<bytes::Bytes> {
    Ok(serde_json::to_vec(&BareJob { id, state })?.into())
}

/// The dispatcher: every SCHEDULED job to RUNNING, then its two reports;
/// every FINISHED job noted as done.
async fn dispatch(
    kv: kv::Store,
    js: jetstream::Context,
    done: Done,
    notify: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    // As many steps in flight as the submitter keeps (a task per entry
    // unbounded made ten thousand writes wait at once, and some timed out).
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut watch = kv.watch_all().await?;
    while let Some(entry) = watch.next().await {
        let Ok(entry) = entry else { continue };
        let Ok(job) = serde_json::from_slice::<BareJob>(&entry.value) else {
            continue;
        };
        match job.state {
            Step::Scheduled => {
                let (kv, js) = (kv.clone(), js.clone());
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                tokio::spawn(async move {
                    let _slot = slot;
                    let Ok(running) = value(job.id, Step::Running) else {
                        return;
                    };
                    // A clustered stream refuses a write of a key whose
                    // previous write (the create) it is still applying
                    // (10164); the same compare-and-set again is safe (it
                    // fails again if anyone else wrote) and needed, or the
                    // job is stranded and the run never ends.
                    let mut tries = 0;
                    let revision = loop {
                        match kv.update(&entry.key, running.clone(), entry.revision).await {
                            Ok(revision) => break revision,
                            Err(_) if tries < 20 => {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err(_) => return,
                        }
                    };
                    let subject = format!("{PREFIX}.{}", job.id);
                    for finished in [false, true] {
                        let Ok(report) = serde_json::to_vec(&BareReport {
                            id: job.id,
                            finished,
                            revision,
                        }) else {
                            return;
                        };
                        let Ok(ack) = js.publish(subject.clone(), report.into()).await else {
                            return;
                        };
                        if ack.await.is_err() {
                            return;
                        }
                    }
                });
            }
            Step::Running => {}
            Step::Finished => {
                lock(&done).insert(job.id, Instant::now());
                notify.notify_waiters();
            }
        }
    }
    Ok(())
}

/// The report consumer: a finished report moves its job to FINISHED, then
/// is acked; a started one is acked.
async fn finish(kv: kv::Store, consumer: consumer::PullConsumer) -> anyhow::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut messages = consumer.messages().await?;
    while let Some(msg) = messages.next().await {
        let Ok(msg) = msg else { continue };
        let kv = kv.clone();
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Ok(r) = serde_json::from_slice::<BareReport>(&msg.payload) {
                if r.finished {
                    let Ok(finished) = value(r.id, Step::Finished) else {
                        return;
                    };
                    if kv
                        .update(r.id.to_string(), finished, r.revision)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let _ = msg.ack().await;
        });
    }
    Ok(())
}

/// Jobs per second when each job is its five acknowledged writes in a
/// row (create, running, two reports, finished), one task per job, 512
/// jobs at a time, with no watch and no consumer between the steps: what
/// the server's write path allows.
pub async fn writes_alone(
    client: &async_nats::Client,
    topology: &Topology,
    jobs: usize,
) -> anyhow::Result<f64> {
    let js = jetstream::new(client.clone());
    let (kv, _stream) = fresh(&js, topology).await?;
    let rate = chained(&kv, &js, jobs).await;
    clean_up(&js).await;
    rate
}

/// A new bare bucket and reports stream, with Warden's configs.
async fn fresh(
    js: &jetstream::Context,
    topology: &Topology,
) -> anyhow::Result<(kv::Store, jetstream::stream::Stream)> {
    clean_up(js).await;
    let kv = js
        .create_key_value(kv::Config {
            bucket: BUCKET.into(),
            ..topology.jobs_bucket()
        })
        .await
        .context("cannot create the bare bucket")?;
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{PREFIX}.>")],
            ..topology.reports_stream()
        })
        .await
        .context("cannot create the bare reports stream")?;
    Ok((kv, stream))
}

async fn clean_up(js: &jetstream::Context) {
    let _ = js.delete_key_value(BUCKET).await;
    let _ = js.delete_stream(STREAM).await;
}

async fn chained(kv: &kv::Store, js: &jetstream::Context, jobs: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut runs = futures::stream::iter(0..jobs)
        .map(|_| {
            let (kv, js) = (kv.clone(), js.clone());
            async move {
                let id = Uuid::new_v4();
                let key = id.to_string();
                let rev = kv.create(&key, value(id, Step::Scheduled)?).await?;
                let rev = kv.update(&key, value(id, Step::Running)?, rev).await?;
                for finished in [false, true] {
                    let report = serde_json::to_vec(&BareReport {
                        id,
                        finished,
                        revision: rev,
                    })?;
                    js.publish(format!("{PREFIX}.{id}"), report.into())
                        .await?
                        .await?;
                }
                kv.update(&key, value(id, Step::Finished)?, rev).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(IN_FLIGHT);
    while let Some(r) = runs.next().await {
        r.context("bare write")?;
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}
