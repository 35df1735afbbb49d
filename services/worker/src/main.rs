//! `warden-worker`: the worker agent as its own process.

use std::path::PathBuf;

use clap::Parser;
use warden_shared::runtime;

#[derive(Parser)]
#[command(version, about = "Warden worker agent")]
struct Args {
    #[arg(long, env = "WARDEN_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    bot_id: Option<String>,
    /// Pool to serve, repeatable
    #[arg(long = "pool")]
    pools: Vec<String>,
    #[arg(long)]
    resource: Option<String>,
    #[arg(long)]
    capacity: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    // First: as a guard this process only runs its task (see
    // warden_shared::guard); otherwise tasks run under a guard.
    warden_shared::guard::run_if_requested();
    run()
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::init_tracing();
    let mut config = runtime::load_or_exit(args.config.as_deref(), "warden-worker");
    warden_worker::apply_overrides(
        &mut config.worker,
        args.bot_id,
        args.pools,
        args.resource,
        args.capacity,
    );
    runtime::exit_on_problems(&config, "warden-worker");
    let (config, shutdown) = runtime::start_service(config);
    warden_worker::run(config, shutdown).await?;
    Ok(())
}
