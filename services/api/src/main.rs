//! `warden-api`: the job API as a standalone service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use warden_shared::config::EXIT_CONFIG;
use warden_shared::{runtime, Config};

#[derive(Parser)]
#[command(
    name = "warden-api",
    version,
    about = "Warden job API over HTTP and NATS"
)]
struct Args {
    /// Config file (TOML), merged over the built-in defaults.
    #[arg(long, env = "WARDEN_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    runtime::init_tracing();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("warden-api: {:#}", anyhow::Error::from(e));
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let shutdown = runtime::shutdown_on_signal();
    match warden_api::run(config, shutdown)
        .await
        .context("api failed")
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "api stopped with an error");
            ExitCode::FAILURE
        }
    }
}
