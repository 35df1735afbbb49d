//! `warden-scheduler`: the trigger as its own process.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use warden_shared::config::{Config, EXIT_CONFIG};
use warden_shared::runtime;

#[derive(Parser)]
#[command(version, about = "Warden trigger (events to jobs)")]
struct Args {
    #[arg(long, env = "WARDEN_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::init_tracing();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let shutdown = runtime::shutdown_on_signal();
    if let Some(addr) = config.metrics_listen() {
        tokio::spawn(runtime::serve_metrics(addr, shutdown.clone()));
    }
    warden_trigger::run(config, shutdown).await?;
    Ok(())
}
