//! The I/O of a chaos run: processes, faults, load, drain, evidence.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warden_shared::job::Job;
use warden_shared::resource::Resource;
use warden_shared::session::{bot_key, session_key, Session, SessionState};
use warden_shared::state::Action;
use warden_shared::{subjects, JobState};

use crate::check::{self, Evidence, Violation};
use crate::cluster::{self, Cluster};
use crate::plan::{self, Fault, Shape, Submit, SERVICES};
use crate::procs::{Spec, Supervised};
use crate::{runlog, tasks, Kind};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosArgs {
    /// Replays a run; random (and printed) when absent.
    pub seed: Option<u64>,
    /// How long faults and jobs are injected.
    pub duration: Duration,
    /// How long the drain may take at most.
    pub drain: Duration,
    pub workers: usize,
    pub session_timeout: Duration,
    pub fault_every: Duration,
    pub job_rate: f64,
    /// nats-server fsyncs every write.
    pub sync_always: bool,
    /// Skip the restart of all three NATS nodes.
    pub no_nats_restart: bool,
    /// Where the service binaries are (`warden-scheduler`, ...).
    pub bin_dir: PathBuf,
    /// Keep logs, configs and stores here (else a temporary directory,
    /// kept when the run fails).
    pub dir: Option<PathBuf>,
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub seed: u64,
    pub jobs: usize,
    pub jobs_by_kind: BTreeMap<&'static str, usize>,
    pub jobs_by_state: BTreeMap<String, usize>,
    pub faults: BTreeMap<&'static str, usize>,
    pub creates_sent_twice: usize,
    pub events_sent_twice: usize,
    pub malformed_events: usize,
    pub client_retries: usize,
    pub retries: usize,
    pub shelved: usize,
    pub stale_reports_rejected: usize,
    pub unplanned_service_exits: Vec<String>,
    pub worker_exits_by_poison: usize,
    pub unplanned_worker_exits: Vec<String>,
    /// From a worker's SIGKILL to the next dispatch of a job it ran.
    pub redispatch: Vec<Duration>,
    pub violations: Vec<Violation>,
    pub drained_in: Duration,
    pub dir: PathBuf,
    /// The run's temporary directory was removed (it passed).
    pub dir_removed: bool,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.unplanned_service_exits.is_empty()
    }

    /// The p-th percentile of the re-dispatch times.
    pub fn redispatch_percentile(&self, p: f64) -> Option<Duration> {
        percentile(&self.redispatch, p)
    }

    pub fn print(&self) {
        println!("chaos run, seed {}", self.seed);
        println!(
            "  jobs        {} ({})",
            self.jobs,
            join(self.jobs_by_kind.iter().map(|(k, n)| format!("{k} {n}")))
        );
        println!(
            "  end states  {}",
            join(self.jobs_by_state.iter().map(|(k, n)| format!("{k} {n}")))
        );
        println!(
            "  faults      {} ({})",
            self.faults.values().sum::<usize>(),
            join(self.faults.iter().map(|(k, n)| format!("{k} {n}")))
        );
        println!(
            "  duplicates  creates sent twice {}, events sent twice {}, malformed events {}, client retries {}",
            self.creates_sent_twice, self.events_sent_twice, self.malformed_events, self.client_retries
        );
        println!(
            "  policy      retries {}, shelved {}, stale reports rejected {}",
            self.retries, self.shelved, self.stale_reports_rejected
        );
        println!(
            "  exits       unplanned service exits {}, workers killed by poison tasks {}, other worker exits {}",
            self.unplanned_service_exits.len(),
            self.worker_exits_by_poison,
            self.unplanned_worker_exits.len()
        );
        for e in self
            .unplanned_service_exits
            .iter()
            .chain(&self.unplanned_worker_exits)
        {
            println!("    {e}");
        }
        match (self.redispatch_percentile(0.5), self.redispatch_percentile(0.99)) {
            (Some(p50), Some(p99)) => println!(
                "  re-dispatch after a worker SIGKILL: {} jobs, p50 {:.1} s, p99 {:.1} s, max {:.1} s",
                self.redispatch.len(),
                p50.as_secs_f64(),
                p99.as_secs_f64(),
                self.redispatch.iter().max().copied().unwrap_or_default().as_secs_f64()
            ),
            _ => println!("  re-dispatch after a worker SIGKILL: no job was running on a killed worker"),
        }
        println!("  drained in  {:.1} s", self.drained_in.as_secs_f64());
        println!("  violations  {}", self.violations.len());
        for v in self.violations.iter().take(50) {
            println!("    {} {}: {}", v.rule.as_str(), v.subject, v.detail);
        }
        if self.dir_removed {
            println!("  logs        removed (the run passed; --dir keeps them)");
        } else {
            println!("  logs        {}", self.dir.display());
        }
        println!("  replay      warden chaos --seed {}", self.seed);
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// A worker SIGKILL: which bot, when.
#[derive(Debug, Clone)]
struct Kill {
    bot: String,
    at: DateTime<Utc>,
}

struct Fleet {
    services: Vec<Vec<Supervised>>,
    workers: Vec<Supervised>,
}

struct Load {
    submitted: BTreeMap<String, Kind>,
    events: BTreeMap<String, Kind>,
    creates_twice: usize,
    events_twice: usize,
    malformed: usize,
    client_retries: usize,
    /// A second create with one key that answered another job.
    key_mismatches: Vec<Violation>,
}

fn bot(i: usize) -> String {
    format!("chaos-w{}", i + 1)
}

fn host(i: usize) -> String {
    format!("chaos-host-{}", i + 1)
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<Summary> {
    let seed = args.seed.unwrap_or_else(|| {
        let b = uuid::Uuid::new_v4();
        u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or_default())
    });
    println!("chaos: seed {seed} (replay with --seed {seed})");
    // A temporary directory is removed only after a run that passed: a
    // failure, or an error on the way, leaves what is needed to see why.
    let (dir, temporary) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            (d.clone(), false)
        }
        None => {
            let t = tempfile::Builder::new().prefix("warden-chaos-").tempdir()?;
            (t.keep(), true)
        }
    };
    println!("chaos: configs, logs and stores in {}", dir.display());
    for bin in ["warden-worker"]
        .iter()
        .copied()
        .chain(SERVICES.iter().map(|s| match *s {
            "trigger" => "warden-trigger",
            "scheduler" => "warden-scheduler",
            "fencing" => "warden-fencing",
            "api" => "warden-api",
            "classifier" => "warden-classifier",
            _ => "warden-health",
        }))
    {
        let p = args.bin_dir.join(bin);
        anyhow::ensure!(
            p.exists(),
            "{} not found: build the service binaries (cargo build --workspace --bins) or pass --bin-dir",
            p.display()
        );
    }
    let shape = Shape {
        duration: args.duration,
        workers: args.workers,
        session_timeout: args.session_timeout,
        fault_every: args.fault_every,
        job_rate: args.job_rate,
        restart_all_nats: !args.no_nats_restart,
    };
    let the_plan = plan::plan(seed, &shape);

    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let cluster = Cluster::start(&dir.join("nats"), args.sync_always).await?;
    let url = cluster.url();
    let cluster = Arc::new(AsyncMutex::new(cluster));
    let run_log = dir.join("runs.log");
    std::fs::write(&run_log, "")?;
    let conf = dir.join("warden.toml");
    std::fs::write(
        &conf,
        tasks::config(&url, &run_log, args.session_timeout, args.sync_always),
    )?;

    let shutdown = CancellationToken::new();
    let mut api_urls = Vec::new();
    let mut services = Vec::new();
    for (si, name) in SERVICES.iter().enumerate() {
        let mut replicas = Vec::new();
        for r in 0..2 {
            let mut env = vec![
                ("WARDEN_LOG".to_string(), "info,async_nats=warn".to_string()),
                ("WARDEN_CONFIG".to_string(), conf.display().to_string()),
            ];
            if *name == "api" {
                let port = cluster::free_port()?;
                env.push(("WARDEN_HTTP_LISTEN".into(), format!("127.0.0.1:{port}")));
                api_urls.push(format!("http://127.0.0.1:{port}"));
            }
            let _ = si;
            replicas.push(Supervised::start(
                Spec {
                    name: format!("{name}-{}", r + 1),
                    program: args.bin_dir.join(format!("warden-{name}")),
                    args: vec!["--config".into(), conf.display().to_string()],
                    env,
                    log: logs.join(format!("{name}-{}.log", r + 1)),
                },
                shutdown.clone(),
                Duration::from_secs(20),
            ));
        }
        services.push(replicas);
    }
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let work = dir.join("work").join(bot(i));
        std::fs::create_dir_all(&work)?;
        workers.push(Supervised::start(
            Spec {
                name: bot(i),
                program: args.bin_dir.join("warden-worker"),
                args: vec![
                    "--config".into(),
                    conf.display().to_string(),
                    "--bot-id".into(),
                    bot(i),
                    "--resource".into(),
                    host(i),
                ],
                env: vec![
                    ("WARDEN_LOG".into(), "info,async_nats=warn".into()),
                    ("WARDEN_WORKER_WORK_DIR".into(), work.display().to_string()),
                ],
                log: logs.join(format!("{}.log", bot(i))),
            },
            shutdown.clone(),
            Duration::from_secs(20),
        ));
    }
    let fleet = Arc::new(Fleet { services, workers });

    // Through the one connection builder, like every other component.
    let mut harness = warden_shared::Config::defaults();
    harness.nats.url = url.clone();
    let client = warden_shared::runtime::Connect::new(&harness, "chaos")
        .name("warden-chaos")
        .client()
        .await
        .context("cannot connect to the chaos cluster")?;
    let js = jetstream::new(client.clone());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;

    // Ready: every service answers, every worker has a session.
    let started = Instant::now();
    wait_ready(&js, &http, &api_urls, args.workers).await?;
    println!(
        "chaos: {} services x2, {} workers on a 3-node cluster up in {:.1} s; running {} s",
        SERVICES.len(),
        args.workers,
        started.elapsed().as_secs_f64(),
        args.duration.as_secs()
    );

    let t0 = tokio::time::Instant::now();
    let kills: Arc<Mutex<Vec<Kill>>> = Arc::default();
    let fault_counts: Arc<Mutex<BTreeMap<&'static str, usize>>> = Arc::default();
    let faults = {
        let fleet = fleet.clone();
        let cluster = cluster.clone();
        let kills = kills.clone();
        let counts = fault_counts.clone();
        let list = the_plan.faults.clone();
        tokio::spawn(async move {
            let mut undo = Vec::new();
            for (at, fault) in list {
                tokio::time::sleep_until(t0 + at).await;
                counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(fault.kind())
                    .and_modify(|n| *n += 1)
                    .or_insert(1);
                undo.push(inject(fault, &fleet, &cluster, &kills).await);
            }
            for u in undo {
                let _ = u.await;
            }
        })
    };
    let load = drive_load(&the_plan, t0, &js, &http, &api_urls).await;
    let _ = faults.await;
    println!(
        "chaos: faults over after {:.1} s; draining (at most {} s)",
        t0.elapsed().as_secs_f64(),
        args.drain.as_secs()
    );

    // Drain: every job final and every live agent's host open.
    let drain_start = Instant::now();
    let live_hosts: Vec<String> = (0..args.workers).map(host).collect();
    let deadline = Instant::now() + args.drain;
    let mut last_read = None;
    let (jobs, resources) = loop {
        // The bucket handles too are looked up inside the retried read: the
        // cluster may still be electing a leader when the last fault ends,
        // and a lookup that timed out then is no reason to stop the run.
        let read = async {
            let jobs_kv = js.get_key_value(subjects::JOBS_BUCKET).await?;
            let resources_kv = js.get_key_value(subjects::RESOURCES_BUCKET).await?;
            let jobs: Vec<Job> = read_all(&jobs_kv).await?;
            let resources: Vec<Resource> = read_all(&resources_kv).await?;
            anyhow::Ok((jobs, resources))
        };
        let (jobs, resources) = match read.await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read the buckets; again in a second");
                if Instant::now() > deadline {
                    match last_read.take() {
                        Some(r) => break r,
                        None => anyhow::bail!("cannot read the jobs and resources: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let open = live_hosts.iter().all(|h| {
            resources
                .iter()
                .any(|r| &r.name == h && r.state == warden_shared::resource::ResourceState::Open)
        });
        let pending = jobs
            .iter()
            .filter(|j| matches!(j.state, JobState::Scheduled | JobState::Running))
            .count();
        if (pending == 0 && open && jobs.len() >= load.submitted.len()) || Instant::now() > deadline
        {
            break (jobs, resources);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let drained_in = drain_start.elapsed();
    // The tasks' log is read after the drain: an orphan still ticking
    // would show.
    let (runs, bad_lines) = runlog::parse(&std::fs::read_to_string(&run_log).unwrap_or_default());
    if bad_lines > 0 {
        info!(
            bad_lines,
            "run log lines cut short (tasks killed mid-write)"
        );
    }
    let evidence = Evidence {
        jobs,
        runs,
        submitted: load.submitted.clone(),
        events: load.events.clone(),
        resources,
        live_hosts,
        max_attempts: tasks::MAX_ATTEMPTS,
        poison_limit: tasks::POISON_LIMIT,
    };
    let mut violations = check::check(&evidence);
    violations.extend(load.key_mismatches.iter().cloned());

    shutdown.cancel();
    // Give the supervisors their SIGTERM and grace.
    for p in fleet.services.iter().flatten().chain(&fleet.workers) {
        let until = Instant::now() + Duration::from_secs(25);
        while p.pid().is_some() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    cluster.lock().await.stop().await;

    let mut summary = Summary {
        seed,
        jobs: evidence.jobs.len(),
        faults: fault_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        creates_sent_twice: load.creates_twice,
        events_sent_twice: load.events_twice,
        malformed_events: load.malformed,
        client_retries: load.client_retries,
        drained_in,
        dir: dir.clone(),
        ..Default::default()
    };
    for j in &evidence.jobs {
        if let Some(k) = Kind::from_task(&j.task) {
            *summary.jobs_by_kind.entry(k.as_str()).or_default() += 1;
        }
        *summary
            .jobs_by_state
            .entry(j.state.to_string())
            .or_default() += 1;
        if j.state == JobState::Shelved {
            summary.shelved += 1;
        }
        for e in &j.history {
            match e.action {
                Action::Retry if e.actor == "retry-policy" => summary.retries += 1,
                Action::RejectReport => summary.stale_reports_rejected += 1,
                _ => {}
            }
        }
    }
    for p in fleet.services.iter().flatten() {
        for e in p.exits() {
            summary
                .unplanned_service_exits
                .push(format!("{}: {}", e.name, e.status));
        }
    }
    for p in &fleet.workers {
        for e in p.exits() {
            if e.sigkill {
                summary.worker_exits_by_poison += 1;
            } else {
                summary
                    .unplanned_worker_exits
                    .push(format!("{}: {}", e.name, e.status));
            }
        }
    }
    summary.redispatch = redispatch_times(
        &evidence.jobs,
        &kills.lock().unwrap_or_else(|p| p.into_inner()),
    );
    summary.violations = violations;
    if summary.passed() && temporary {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(dir = %dir.display(), error = %e, "cannot remove the run's directory");
        }
        summary.dir_removed = true;
    }
    Ok(summary)
}

/// Applies `fault` now; the returned task puts things back after its
/// duration.
async fn inject(
    fault: Fault,
    fleet: &Arc<Fleet>,
    cluster: &Arc<AsyncMutex<Cluster>>,
    kills: &Arc<Mutex<Vec<Kill>>>,
) -> tokio::task::JoinHandle<()> {
    info!(?fault, "fault");
    let fleet = fleet.clone();
    let cluster = cluster.clone();
    match fault {
        Fault::KillWorker {
            worker,
            restart_after,
        } => {
            kills.lock().unwrap_or_else(|p| p.into_inner()).push(Kill {
                bot: bot(worker),
                at: Utc::now(),
            });
            fleet.workers[worker].kill();
            tokio::spawn(async move {
                tokio::time::sleep(restart_after).await;
                fleet.workers[worker].release();
            })
        }
        Fault::StopWorker { worker, paused } => {
            fleet.workers[worker].pause();
            tokio::spawn(async move {
                tokio::time::sleep(paused).await;
                fleet.workers[worker].resume();
            })
        }
        Fault::KillService {
            service,
            replica,
            restart_after,
        } => {
            fleet.services[service][replica].kill();
            tokio::spawn(async move {
                tokio::time::sleep(restart_after).await;
                fleet.services[service][replica].release();
            })
        }
        Fault::KillNatsNode { node, down } => {
            cluster.lock().await.kill(node).await;
            tokio::spawn(async move {
                tokio::time::sleep(down).await;
                if let Err(e) = cluster.lock().await.start_node(node).await {
                    warn!(node, error = %e, "cannot start the NATS node again");
                }
            })
        }
        Fault::RestartNats { down } => {
            {
                let mut c = cluster.lock().await;
                for n in 0..3 {
                    c.kill(n).await;
                }
            }
            tokio::spawn(async move {
                tokio::time::sleep(down).await;
                let mut c = cluster.lock().await;
                for n in 0..3 {
                    if let Err(e) = c.start_node(n).await {
                        warn!(node = n, error = %e, "cannot start the NATS node again");
                    }
                }
            })
        }
    }
}

async fn wait_ready(
    js: &jetstream::Context,
    http: &reqwest::Client,
    api_urls: &[String],
    workers: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut ready = true;
        for u in api_urls {
            let ok = http
                .get(format!("{u}/api/v1/jobs?limit=1"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            ready &= ok;
        }
        if ready {
            match js.get_key_value(subjects::SESSIONS_BUCKET).await {
                Ok(kv) => {
                    for i in 0..workers {
                        ready &= active_session(&kv, &bot(i)).await;
                    }
                }
                Err(_) => ready = false,
            }
        }
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "Warden did not come up within 180 s (APIs answering, every worker with a session)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn active_session(kv: &kv::Store, bot_id: &str) -> bool {
    let Ok(Some(name)) = kv.get(bot_key(bot_id)).await else {
        return false;
    };
    let name = String::from_utf8_lossy(&name).into_owned();
    let Ok(Some(body)) = kv.get(session_key(&name)).await else {
        return false;
    };
    serde_json::from_slice::<Session>(&body).is_ok_and(|s| s.state == SessionState::Active)
}

/// Every value in `kv`, or an error if any read failed (a partial read
/// would look like lost jobs). Values that do not decode are skipped.
async fn read_all<T: serde::de::DeserializeOwned>(kv: &kv::Store) -> anyhow::Result<Vec<T>> {
    let mut keys = kv.keys().await?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        names.push(k?);
    }
    let mut out = Vec::with_capacity(names.len());
    for k in names {
        if let Some(v) = kv.get(&k).await? {
            if let Ok(t) = serde_json::from_slice::<T>(&v) {
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// Submits the plan's jobs (API creates with idempotency keys, retried on
/// the other replica until acknowledged; bus events with a message id)
/// and malformed events, on time.
async fn drive_load(
    the_plan: &plan::Plan,
    t0: tokio::time::Instant,
    js: &jetstream::Context,
    http: &reqwest::Client,
    api_urls: &[String],
) -> Load {
    let load = Arc::new(Mutex::new(Load {
        submitted: BTreeMap::new(),
        events: BTreeMap::new(),
        creates_twice: 0,
        events_twice: 0,
        malformed: 0,
        client_retries: 0,
        key_mismatches: Vec::new(),
    }));
    let mut sends = Vec::new();
    let mut malformed = the_plan.malformed.iter().peekable();
    for (n, (at, submit)) in the_plan.jobs.iter().enumerate() {
        tokio::time::sleep_until(t0 + *at).await;
        while let Some(m) = malformed.next_if(|m| **m <= *at) {
            let _ = m;
            let id = uuid::Uuid::new_v4().to_string();
            if publish_event(js, &id, b"{\"id\": \"broken\", \"body\": ".to_vec()).await {
                load.lock().unwrap_or_else(|p| p.into_inner()).malformed += 1;
            }
        }
        let (js, http, urls, load, submit) = (
            js.clone(),
            http.clone(),
            api_urls.to_vec(),
            load.clone(),
            submit.clone(),
        );
        sends.push(tokio::spawn(async move {
            if submit.as_event {
                send_event(&js, &submit, &load).await;
            } else {
                send_create(&http, &urls, n, &submit, &load).await;
            }
        }));
    }
    for s in sends {
        let _ = s.await;
    }
    Arc::try_unwrap(load)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_else(|arc| {
            let l = arc.lock().unwrap_or_else(|p| p.into_inner());
            Load {
                submitted: l.submitted.clone(),
                events: l.events.clone(),
                creates_twice: l.creates_twice,
                events_twice: l.events_twice,
                malformed: l.malformed,
                client_retries: l.client_retries,
                key_mismatches: l.key_mismatches.clone(),
            }
        })
}

async fn publish_event(js: &jetstream::Context, msg_id: &str, body: Vec<u8>) -> bool {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let sent = js
            .publish_with_headers(tasks::EVENT_TOPIC, headers, body.clone().into())
            .await;
        if let Ok(ack) = sent {
            if ack.await.is_ok() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

async fn send_event(js: &jetstream::Context, submit: &Submit, load: &Mutex<Load>) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::json!({
        "id": id,
        "topic": tasks::EVENT_TOPIC,
        "headers": {"fedora_messaging_schema": "base.message"},
        "body": {"ticks": submit.ticks.to_string()},
    });
    let Ok(bytes) = serde_json::to_vec(&body) else {
        return;
    };
    if !publish_event(js, &id, bytes.clone()).await {
        warn!(msg_id = %id, "event never acknowledged; not counted");
        return;
    }
    load.lock()
        .unwrap_or_else(|p| p.into_inner())
        .events
        .insert(id.clone(), submit.kind);
    if submit.twice && publish_event(js, &id, bytes).await {
        load.lock().unwrap_or_else(|p| p.into_inner()).events_twice += 1;
    }
}

/// One create, retried with the same key on the replicas in turn until
/// one answers with the job; the job's id.
async fn create_once(
    http: &reqwest::Client,
    urls: &[String],
    n: usize,
    body: &serde_json::Value,
    load: &Mutex<Load>,
) -> Option<String> {
    let until = Instant::now() + Duration::from_secs(90);
    let mut attempt = 0usize;
    while Instant::now() < until {
        let url = &urls[(n + attempt) % urls.len()];
        attempt += 1;
        if attempt > 1 {
            load.lock()
                .unwrap_or_else(|p| p.into_inner())
                .client_retries += 1;
        }
        let res = http
            .post(format!("{url}/api/v1/jobs"))
            .json(body)
            .send()
            .await;
        if let Ok(r) = res {
            if r.status().is_success() {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
                        return Some(id.to_string());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    None
}

async fn send_create(
    http: &reqwest::Client,
    urls: &[String],
    n: usize,
    submit: &Submit,
    load: &Mutex<Load>,
) {
    let key = format!("chaos-{n}-{}", uuid::Uuid::new_v4());
    let body = serde_json::json!({
        "task": submit.kind.task(),
        "args": {"ticks": submit.ticks.to_string()},
        "idempotency_key": key,
    });
    let Some(first) = create_once(http, urls, n, &body, load).await else {
        warn!(key, "create never acknowledged; not counted");
        return;
    };
    load.lock()
        .unwrap_or_else(|p| p.into_inner())
        .submitted
        .insert(key.clone(), submit.kind);
    if submit.twice {
        let again = create_once(http, urls, n + 1, &body, load).await;
        let mut l = load.lock().unwrap_or_else(|p| p.into_inner());
        l.creates_twice += 1;
        if let Some(again) = again {
            if again != first {
                l.key_mismatches.push(Violation {
                    rule: check::Rule::Duplicated,
                    subject: format!("key {key}"),
                    detail: format!("a repeated create answered job {again}, the first {first}"),
                });
            }
        }
    }
}

/// For every job that was running on a worker when it was SIGKILLed: the
/// time from the kill to the job's next dispatch.
fn redispatch_times(jobs: &[Job], kills: &[Kill]) -> Vec<Duration> {
    let mut out = Vec::new();
    for k in kills {
        for j in jobs {
            // The attempt running on the bot at the kill.
            let running = j.history.iter().rev().find(|e| {
                e.action == Action::Dispatch && e.at <= k.at && e.bot_id.as_deref() == Some(&k.bot)
            });
            let Some(d) = running else { continue };
            let ended_before = j.history.iter().any(|e| {
                e.attempt == d.attempt
                    && e.at <= k.at
                    && matches!(
                        e.action,
                        Action::Finish
                            | Action::Crash
                            | Action::Requeue
                            | Action::Retry
                            | Action::Shelve
                            | Action::Cancel
                    )
            });
            if ended_before {
                continue;
            }
            if let Some(next) = j
                .history
                .iter()
                .find(|e| e.action == Action::Dispatch && e.attempt > d.attempt && e.at > k.at)
            {
                if let Ok(gap) = (next.at - k.at).to_std() {
                    out.push(gap);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use warden_shared::job::HistoryEntry;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0)
            .single()
            .unwrap_or_default()
    }

    fn dispatch(at: i64, attempt: u32, bot: &str) -> HistoryEntry {
        HistoryEntry {
            at: t(at),
            action: Action::Dispatch,
            attempt,
            from: Some(JobState::Scheduled),
            to: Some(JobState::Running),
            actor: "s".into(),
            bot_id: Some(bot.into()),
            resource: None,
            note: None,
        }
    }

    #[test]
    fn redispatch_counts_only_jobs_running_on_the_killed_bot() {
        let mut running = Job::builder("chaos-slow")
            .id(uuid::Uuid::from_u128(1))
            .actor("api")
            .at(t(0))
            .build();
        running.history.push(dispatch(1, 1, "w1"));
        running.history.push(dispatch(15, 2, "w2"));
        let mut finished_before = running.clone();
        finished_before.id = uuid::Uuid::from_u128(2);
        finished_before.history.insert(
            2,
            HistoryEntry {
                action: Action::Finish,
                at: t(5),
                ..dispatch(5, 1, "w1")
            },
        );
        let mut other_bot = running.clone();
        other_bot.id = uuid::Uuid::from_u128(3);
        other_bot.history[1].bot_id = Some("w3".into());
        let kills = vec![Kill {
            bot: "w1".into(),
            at: t(10),
        }];
        assert_eq!(
            redispatch_times(&[running, finished_before, other_bot], &kills),
            vec![Duration::from_secs(5)]
        );
        assert_eq!(
            percentile(&[Duration::from_secs(1), Duration::from_secs(9)], 0.99),
            Some(Duration::from_secs(9))
        );
        assert_eq!(percentile(&[], 0.5), None);
    }
}
