//! `warden`: runs Warden (`up`), talks to it (`job`, `publish`, `stats`), runs a
//! worker agent (`worker`), measures it (`bench`) and checks it for Nagios
//! (`check`).

mod bench;
mod bench_bare;
mod bench_history;
mod bench_search;
mod bot;
mod check;
mod classify;
mod cli;
mod natsd;
mod resources;
mod secure;
mod up;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use warden_shared::config::Config;

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Warden: a job-execution hub for CI and test automation on NATS JetStream"
)]
pub struct Cli {
    /// NATS server URL [default: nats.url from the config, nats://127.0.0.1:4222]
    #[arg(long, global = true, env = "WARDEN_NATS_URL")]
    pub nats_url: Option<String>,
    /// Config file (TOML), merged over the built-in defaults
    #[arg(long, global = true, env = "WARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run every service and local workers in one process (spawns nats-server unless --nats-url is given)
    Up(UpArgs),
    /// Submit, show, list, retry and cancel jobs
    #[command(subcommand)]
    Job(JobCommand),
    /// Publish a JSON event from FILE on SUBJECT, as a bus bridge would
    Publish { subject: String, file: PathBuf },
    /// Run a worker agent (a bot) on this host
    Worker(warden_worker::WorkerArgs),
    /// Bridge another bus to Warden
    #[command(subcommand)]
    Bridge(BridgeCommand),
    /// Add, remove and list bots: their NATS users (nkeys) and registry records
    #[command(subcommand)]
    Bot(bot::BotCommand),
    /// List bot sessions: bot id, session, resource, pools, state, leases, last heartbeat
    Bots {
        #[arg(long)]
        json: bool,
    },
    /// List resources (hosts, working copies): state, reason, since, dependents, sessions, last check
    Resources {
        #[arg(long)]
        json: bool,
    },
    /// Check or close one resource
    #[command(subcommand)]
    Resource(ResourceCommand),
    /// Run a command for every recycled resource (a provisioner's hook); the event is in its environment and on stdin
    RecycleHook {
        /// Durable consumer name: hooks sharing one share the events
        #[arg(long, default_value = warden_shared::subjects::RECYCLE_HOOK_CONSUMER)]
        consumer: String,
        /// The command and its arguments, after `--`
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Run no-op jobs end to end through a real local bus and print throughput and latency
    Bench(BenchArgs),
    /// Search and statistics latency with a large job history (a million jobs by default)
    BenchSearch(BenchSearchArgs),
    /// The execution database at scale: 10 million archived jobs in SQLite (and PostgreSQL with --postgres), search and statistics latency, the recorder against the bus's write rate, the scheduler's start before and after archival
    BenchHistory(BenchHistoryArgs),
    /// The execution database: export jobs as JSON lines, or show what it holds
    #[command(subcommand)]
    History(HistoryCommand),
    /// Chaos run: a 3-node cluster, two replicas of every service, workers, jobs of every kind and faults from a seed; then an invariant check (exit 0: no violation)
    Chaos(ChaosCmd),
    /// Counts by state, blame and detail over a window (jobs last changed in it)
    Stats {
        /// How far back: 1h, 24h, 7days
        #[arg(long, default_value = "24h")]
        window: String,
        #[arg(long)]
        json: bool,
    },
    /// Classify a crash from its log (and status file, exit code, signal) without a bus
    Classify(classify::ClassifyArgs),
    /// Nagios plugin: one status line with perfdata; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
    Check(check::CheckArgs),
}

#[derive(Args)]
pub struct UpArgs {
    /// Where nats-server keeps its data
    #[arg(long, default_value = "./.warden")]
    pub data_dir: PathBuf,
    /// HTTP API address [default: http.listen from the config, 127.0.0.1:8080]
    #[arg(long)]
    pub http: Option<String>,
    /// Local workers to run (pool `default`)
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Loopback port of the spawned nats-server (ignored with --nats-url)
    #[arg(long, default_value_t = up::LOCAL_NATS_PORT)]
    pub nats_port: u16,
    /// Run secured: TLS with client certificates and the per-role users of
    /// deploy/nats/cluster/accounts.conf, all made once in <data-dir>/secure
    /// (CLI config snippets: <data-dir>/secure/client-<role>.toml)
    #[arg(long)]
    pub secure: bool,
}

#[derive(Subcommand)]
pub enum BridgeCommand {
    /// AMQP 0-9-1 (fedora-messaging on RabbitMQ): the [amqp] queue's messages
    /// become events; with [amqp.ci_messages], job changes go out as CI messages
    Amqp {
        /// Fault injection for tests: exit (status 137) right after the Nth
        /// event JetStream acknowledged, before its AMQP ack
        #[arg(long, hide = true)]
        crash_after_publish: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// Create a job; prints its id
    Submit {
        task: String,
        /// Task argument, repeatable
        #[arg(long = "arg", value_name = "KEY=VALUE")]
        args: Vec<String>,
        #[arg(long)]
        priority: Option<i32>,
        #[arg(long)]
        pool: Option<String>,
        /// Never retry this job automatically, whatever the failure
        #[arg(long)]
        no_retry: bool,
        /// Attempts this job may use before it is shelved (over the task's retry.max_attempts)
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Idempotency key: a retried submit with the same key returns the
        /// first job instead of making a second one
        #[arg(long)]
        key: Option<String>,
        /// Wait until the job ends; exit 0 only if it FINISHED with outcome passed
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Show one job with its history
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put a SHELVED, CRASHED or CANCELLED job back in the queue with a fresh attempt budget
    Retry { id: String },
    /// Cancel a SCHEDULED or RUNNING job (a running task is stopped)
    Cancel {
        id: String,
        /// Why, recorded in the job's history
        #[arg(long)]
        reason: Option<String>,
    },
    /// List jobs, newest first
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// system, task, third_party or unknown
        #[arg(long)]
        blame: Option<String>,
        /// A detail code (oom, network, ...); see docs/crash-details.md
        #[arg(long)]
        detail: Option<String>,
        /// The bot of the job's current or last attempt
        #[arg(long)]
        bot: Option<String>,
        /// The id of the bus message that triggered the job
        #[arg(long)]
        source: Option<String>,
        /// Jobs created at or after this RFC 3339 time
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ResourceCommand {
    /// Have the agent on the resource run its checks now; exit 1 if they fail (the resource is then recycled)
    Check {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Close a resource (and what depends on it) by hand: its leases are taken back and a recycle event is published
    Close {
        name: String,
        /// Why, recorded on the resource and in the recycle event
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
pub struct ChaosCmd {
    /// Replay a run (default: a random seed, printed)
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long jobs and faults are injected
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
    /// How long the drain may take at most
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub drain: std::time::Duration,
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// fencing.session_timeout of the run
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub session_timeout: std::time::Duration,
    /// Mean time between faults
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub fault_every: std::time::Duration,
    /// Jobs submitted per second
    #[arg(long, default_value_t = 1.5)]
    pub job_rate: f64,
    /// nats-server fsyncs every write (sync_interval: always)
    #[arg(long)]
    pub sync_always: bool,
    /// Leave out the restart of all three NATS nodes
    #[arg(long)]
    pub no_nats_restart: bool,
    /// Where warden-scheduler, warden-worker, ... are [default: next to this binary]
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Keep configs, logs and stores here [default: a temporary directory, kept if the run fails]
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct BenchSearchArgs {
    /// Jobs loaded into the API's index
    #[arg(long, default_value_t = 1_000_000)]
    pub jobs: usize,
    /// Times each search and statistics window is run
    #[arg(long, default_value_t = 50)]
    pub repeat: usize,
    /// Also write this many job records to a real jobs bucket and time a
    /// real API's catch-up and its searches over NATS (0: skip)
    #[arg(long, default_value_t = 0)]
    pub bus_jobs: usize,
}

#[derive(Args, Clone)]
pub struct BenchHistoryArgs {
    /// Archived jobs loaded into each database
    #[arg(long, default_value_t = 10_000_000)]
    pub jobs: usize,
    /// Times each search and statistics window is run
    #[arg(long, default_value_t = 50)]
    pub repeat: usize,
    /// Also load and time a PostgreSQL database (an empty one, or one an
    /// earlier run with the same --jobs loaded)
    #[arg(long)]
    pub postgres: Option<String>,
    /// Leave SQLite out (time PostgreSQL alone, say while another run
    /// has the SQLite file)
    #[arg(long)]
    pub skip_sqlite: bool,
    /// Keep the SQLite database here (a second run reuses it) instead of
    /// a temporary directory
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Jobs for the live-path part on a real nats-server (0: skip)
    #[arg(long, default_value_t = 20_000)]
    pub bus_jobs: usize,
    /// The database the live-path part's recorder writes to (default: a
    /// new small SQLite file in --dir). Give the big one (the SQLite file
    /// in --dir or the --postgres URL) to measure the recorder's rate into
    /// a database that already holds the history; its jobs stay there and
    /// a later run still reuses it.
    #[arg(long)]
    pub recorder_db: Option<String>,
}

#[derive(Subcommand)]
pub enum HistoryCommand {
    /// Every recorded job created in a window, one JSON record per line (to FILE or stdout)
    Export {
        /// Jobs created at or after this instant (RFC 3339)
        #[arg(long)]
        since: Option<String>,
        /// Jobs created before this instant (RFC 3339)
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Jobs, archived jobs, history entries and attempts the database holds, and its schema version
    Status,
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Jobs in the burst
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Jobs running at once across all workers (worker slots)
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Jobs run one at a time for the latency figures
    #[arg(long, default_value_t = 200)]
    pub sequential: usize,
    /// Make nats-server fsync every write (the production durability setting)
    #[arg(long)]
    pub sync_always: bool,
    /// Skip the second run that executes `true` as a real process per job
    #[arg(long)]
    pub no_process: bool,
    /// Share of jobs whose first attempt fails with a retryable third-party
    /// fault, for the retried-jobs run (0 skips it)
    #[arg(long, default_value_t = 0.1)]
    pub fail_rate: f64,
    /// Retry delay in the retried-jobs run, in milliseconds
    #[arg(long, default_value_t = 100)]
    pub retry_delay_ms: u64,
    /// Seconds of steady load at half the burst rate, for latency under
    /// load (0 skips it)
    #[arg(long, default_value_t = 5)]
    pub steady_secs: u64,
    /// Jobs in the run that spawns `true` per job (and in its baseline
    /// without Warden)
    #[arg(long, default_value_t = 3000)]
    pub process_jobs: usize,
    /// Run on a 3-node JetStream cluster on loopback (replicas 3) instead
    /// of a single node
    #[arg(long)]
    pub cluster: bool,
    /// Also print every figure as one JSON line
    #[arg(long)]
    pub json: bool,
}

async fn chaos(args: &ChaosCmd) -> anyhow::Result<i32> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
    };
    let summary = warden_chaos::run(warden_chaos::ChaosArgs {
        seed: args.seed,
        duration: args.duration,
        drain: args.drain,
        workers: args.workers.max(1),
        session_timeout: args.session_timeout,
        fault_every: args.fault_every,
        job_rate: args.job_rate,
        sync_always: args.sync_always,
        no_nats_restart: args.no_nats_restart,
        bin_dir,
        dir: args.dir.clone(),
    })
    .await?;
    summary.print();
    Ok(if summary.passed() { 0 } else { 1 })
}

fn load_config(cli: &Cli) -> Config {
    let mut c = warden_shared::runtime::load_or_exit(cli.config.as_deref(), "warden");
    if let Some(url) = &cli.nats_url {
        c.nats.url = url.clone();
        // A login in --nats-url is refused like one in the config.
        warden_shared::runtime::exit_on_problems(&c, "warden");
    }
    c
}

fn main() {
    // First: as a guard (`warden __warden-guard -- PROGRAM ...`) this
    // process only runs PROGRAM; otherwise tasks and the local nats-server
    // are spawned under a guard (warden_shared::guard).
    warden_shared::guard::run_if_requested();
    run();
}

#[tokio::main]
async fn run() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        // clap exits 2 on a usage error, which Nagios reads as CRITICAL:
        // a plugin says UNKNOWN (3), on one line on stdout. Help and
        // --version still go out as usual.
        Err(e) if e.use_stderr() && check::invoked(&argv) => {
            let o = check::Outcome::unknown(check::usage_error_text(&e.to_string()));
            println!("{}", o.line(None));
            std::process::exit(o.status.code());
        }
        Err(e) => e.exit(),
    };
    if let Command::Check(args) = &cli.command {
        // Nagios reads stdout: nothing but the status line goes there, and
        // logs (to stderr) only when asked for.
        if std::env::var_os("WARDEN_LOG").is_some() {
            warden_shared::runtime::init_tracing();
        }
        let config = Config::load(cli.config.as_deref()).and_then(|mut c| {
            if let Some(url) = &cli.nats_url {
                c.nats.url = url.clone();
            }
            // A login in --nats-url is refused like one in the config.
            let problems = c.problems();
            if problems.is_empty() {
                Ok(c)
            } else {
                Err(warden_shared::config::ConfigError::Invalid(problems))
            }
        });
        let (line, code) = check::main(config, args).await;
        println!("{line}");
        std::process::exit(code);
    }
    warden_shared::runtime::init_tracing();
    let config = load_config(&cli);
    let result = match &cli.command {
        Command::Up(args) => up::run(config, cli.nats_url.is_some(), args).await,
        Command::Job(cmd) => cli::job(&config, cmd).await,
        Command::Publish { subject, file } => cli::publish(&config, subject, file).await,
        Command::Bots { json } => cli::bots(&config, *json).await,
        Command::Bot(cmd) => bot::run(&config, cmd).await,
        Command::Worker(args) => {
            let mut config = config;
            args.clone().apply(&mut config.worker);
            warden_shared::runtime::exit_on_problems(&config, "warden");
            let (config, shutdown) = warden_shared::runtime::start_service(config);
            warden_worker::run(config, shutdown)
                .await
                .map(|_| 0)
                .map_err(anyhow::Error::from)
        }
        Command::Bridge(BridgeCommand::Amqp {
            crash_after_publish,
        }) => {
            warden_shared::runtime::exit_on_problems(&config, "warden");
            let (config, shutdown) = warden_shared::runtime::start_service(config);
            let options = warden_bridge::Options {
                crash_after_publish: *crash_after_publish,
            };
            warden_bridge::run_with(config, options, shutdown)
                .await
                .map(|_| 0)
                .map_err(anyhow::Error::from)
        }
        Command::Resources { json } => resources::list(&config, *json).await,
        Command::Resource(ResourceCommand::Check { name, json }) => {
            resources::act(&config, "check", name, None, *json).await
        }
        Command::Resource(ResourceCommand::Close { name, reason, json }) => {
            resources::act(&config, "close", name, reason.clone(), *json).await
        }
        Command::RecycleHook { consumer, command } => {
            resources::hook(&config, consumer, command).await
        }
        Command::Bench(args) => bench::run(config, cli.nats_url.clone(), args.clone()).await,
        Command::BenchSearch(args) => bench_search::run(config, args.clone()).await,
        Command::BenchHistory(args) => bench_history::run(config, args.clone()).await,
        Command::History(cmd) => cli::history(&config, cmd).await,
        Command::Chaos(args) => chaos(args).await,
        Command::Classify(args) => classify::run(&config, args),
        Command::Stats { window, json } => cli::stats(&config, window, *json).await,
        Command::Check(_) => unreachable!("handled above"),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("warden: {e:#}");
            std::process::exit(1);
        }
    }
}
