//! `warden-classifier`: the crash classifier service as its own process.

use std::path::PathBuf;

use clap::Parser;
use warden_shared::runtime;

#[derive(Parser)]
#[command(
    name = "warden-classifier",
    version,
    about = "Warden crash classifier service"
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
        "warden-classifier",
    ));
    warden_classifier::service::run(config, shutdown).await?;
    Ok(())
}
