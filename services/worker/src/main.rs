//! `warden-worker`: the worker agent as its own process.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use warden_shared::config::{Config, EXIT_CONFIG};
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::init_tracing();
    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    warden_worker::apply_overrides(
        &mut config.worker,
        args.bot_id,
        args.pools,
        args.resource,
        args.capacity,
    );
    let problems = config.problems();
    if !problems.is_empty() {
        eprintln!("invalid configuration:\n  - {}", problems.join("\n  - "));
        std::process::exit(EXIT_CONFIG);
    }
    let config = Arc::new(config);
    let shutdown = runtime::shutdown_on_signal();
    if let Some(addr) = config.metrics_listen() {
        tokio::spawn(runtime::serve_metrics(addr, shutdown.clone()));
    }
    warden_worker::run(config, shutdown).await?;
    Ok(())
}
