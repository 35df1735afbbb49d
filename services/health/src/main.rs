//! `warden-health`: the resource health service as its own process.

use std::path::PathBuf;

use clap::Parser;
use warden_shared::runtime;

#[derive(Parser)]
#[command(
    name = "warden-health",
    version,
    about = "Warden resource health service"
)]
struct Args {
    /// Config file (TOML), merged over the built-in defaults
    #[arg(long, env = "WARDEN_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::init_tracing();
    let (config, shutdown) = runtime::start_service(runtime::load_or_exit(
        args.config.as_deref(),
        "warden-health",
    ));
    warden_health::run(config, shutdown).await?;
    Ok(())
}
