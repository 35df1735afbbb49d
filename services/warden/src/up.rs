//! `warden up`: nats-server (unless given one), every service and N local
//! workers in one process; Ctrl-C or SIGTERM stops them in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use warden_shared::{runtime, services, Config};

use crate::natsd::LocalNats;
use crate::secure;
use crate::UpArgs;

/// Default port of a spawned nats-server (`--nats-port`).
pub const LOCAL_NATS_PORT: u16 = 4222;

type ServiceResult = (String, anyhow::Result<()>);

pub async fn run(mut config: Config, external_nats: bool, args: &UpArgs) -> anyhow::Result<i32> {
    if let Some(http) = &args.http {
        config.http.listen = http.clone();
    }
    runtime::exit_on_problems(&config, "warden");
    let exposed = config.http_serving_problems();
    if !exposed.is_empty() {
        eprintln!(
            "warden: invalid configuration:\n  - {}",
            exposed.join("\n  - ")
        );
        std::process::exit(warden_shared::config::EXIT_CONFIG);
    }
    if args.secure && external_nats {
        anyhow::bail!("--secure runs its own secured nats-server: drop --nats-url");
    }
    let secure = if args.secure {
        let dir = args.data_dir.join("secure");
        Some(
            secure::ensure(&dir)
                .with_context(|| format!("cannot make the secured setup in {}", dir.display()))?,
        )
    } else {
        None
    };
    let mut nats = if external_nats {
        None
    } else {
        let dir = args.data_dir.join("nats");
        let n = match &secure {
            Some(s) => {
                let extra = format!("{}include \"accounts.conf\"\n", s.server_tls_block());
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let local_bots: Vec<String> = (1..=args.workers).map(local_bot_id).collect();
                let accounts = s.accounts_with_bots(secure::ACCOUNTS_CONF, &local_bots)?;
                std::fs::write(dir.join("accounts.conf"), accounts)
                    .with_context(|| format!("cannot write {}", dir.display()))?;
                LocalNats::spawn_with(&dir, Some(args.nats_port), false, &extra, &s.server_env())
            }
            None => LocalNats::spawn(&dir, Some(args.nats_port), false),
        }
        .context("cannot start nats-server")?;
        config.nats.url = n.url();
        Some(n)
    };
    if let Some(s) = &secure {
        s.write_client_configs(&config.nats.url)?;
        s.apply(&mut config.nats, "service")?;
        // As in production: its bots are in the registry, and only
        // registered bots get a session.
        register_local_bots(&config, s, args.workers).await?;
        config.fencing.require_registered_bots = true;
    }

    if !config.history.enabled() {
        // The execution database, embedded: nothing else to install.
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
        config.history.database = format!(
            "sqlite://{}",
            args.data_dir.join("history.sqlite").display()
        );
    }

    let shutdown = runtime::shutdown_on_signal();
    let config = Arc::new(config);
    let mut set: JoinSet<ServiceResult> = JoinSet::new();
    // /healthz says 503 until every service below answers on the bus.
    for s in services::in_up() {
        warden_shared::metrics::starting(s.name);
    }
    if config.amqp.enabled() {
        warden_shared::metrics::starting("bridge");
    }
    for s in services::in_up() {
        let (c, t) = (config.clone(), shutdown.clone());
        match s.name {
            "trigger" => start(&mut set, s.name, warden_trigger::run(c, t)),
            "scheduler" => start(&mut set, s.name, warden_scheduler::run(c, t)),
            "fencing" => start(&mut set, s.name, warden_fencing::run(c, t)),
            "api" => start(&mut set, s.name, warden_api::run(c, t)),
            "health" => start(&mut set, s.name, warden_health::run(c, t)),
            "classifier" => start(&mut set, s.name, warden_classifier::service::run(c, t)),
            "recorder" => start(&mut set, s.name, warden_recorder::run(c, t)),
            other => anyhow::bail!("warden up does not know how to run {other}"),
        }
    }
    if config.amqp.enabled() {
        let mut bc = (*config).clone();
        if let Some(s) = &secure {
            // Secured, the bridge logs in as its own user, as in production.
            s.apply(&mut bc.nats, "bridge")?;
        }
        start(
            &mut set,
            "bridge",
            warden_bridge::run(Arc::new(bc), shutdown.clone()),
        );
    }
    let mut bots = Vec::new();
    for i in 1..=args.workers {
        let mut wc = (*config).clone();
        wc.worker.bot_id = local_bot_id(i);
        if wc.worker.work_dir.is_empty() {
            wc.worker.work_dir = args
                .data_dir
                .join("work")
                .join(&wc.worker.bot_id)
                .display()
                .to_string();
        }
        if let Some(s) = &secure {
            // Each local bot logs in as itself: its own nkey user.
            s.apply_bot(&mut wc.nats, &wc.worker.bot_id);
        }
        bots.push(wc.worker.bot_id.clone());
        start(
            &mut set,
            "worker",
            warden_worker::run(Arc::new(wc), shutdown.clone()),
        );
    }

    let http = config.http_listen();
    println!("Warden is up");
    match &nats {
        Some(n) => println!(
            "  NATS      {} (JetStream data in {})",
            n.url(),
            n.store_dir.display()
        ),
        None => println!(
            "  NATS      {} (external)",
            warden_shared::redact::redact(&config.nats.url)
        ),
    }
    if let Some(s) = &secure {
        println!(
            "  secured   TLS with client certificates and per-role users; files in {}",
            s.dir.display()
        );
        println!(
            "  CLI       warden --config {} job list   (or client-service.toml to submit)",
            s.client_toml("readonly").display()
        );
    }
    println!("  HTTP API  http://{http}/api/v1/jobs");
    println!(
        "  history   {} (finished jobs leave the live bucket after {})",
        warden_history::redact_url(&config.history.database),
        humantime::format_duration(config.history.archive_after)
    );
    if let Some(line) = beyond_loopback_warning(http) {
        println!("{line}");
    }
    println!("  metrics   http://{http}/metrics");
    println!(
        "  workers   {} in pool(s) {} ({})",
        args.workers,
        config.worker.pools.join(","),
        bots.join(", ")
    );
    println!(
        "  tasks     {}",
        config.tasks.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    println!("Try: warden job submit noop --wait     Stop: Ctrl-C");

    let code = supervise(&mut set, &shutdown).await;
    if let Some(n) = nats.as_mut() {
        n.stop();
    }
    println!("Warden stopped");
    Ok(code)
}

/// The warning `warden up` prints when its HTTP API is reachable from
/// other hosts (it only starts so with a token).
fn beyond_loopback_warning(http: std::net::SocketAddr) -> Option<String> {
    (!http.ip().is_loopback()).then(|| {
        format!(
            "  WARNING   the HTTP API listens on {http}, beyond this host: writes need \
             http.token; reads without it are redacted"
        )
    })
}

fn start<F, E>(set: &mut JoinSet<ServiceResult>, name: &str, fut: F)
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Into<anyhow::Error>,
{
    let name = name.to_string();
    set.spawn(async move { (name, fut.await.map_err(Into::into)) });
}

/// Waits for shutdown; a service that ends on its own (an error) takes
/// everything down, so `up` never runs half a Warden.
async fn supervise(set: &mut JoinSet<ServiceResult>, shutdown: &CancellationToken) -> i32 {
    let mut code = 0;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(done) = set.join_next() => {
            match done {
                // Ended because shutdown began at the same moment: normal.
                Ok((_, Ok(()))) if shutdown.is_cancelled() => {}
                Ok((name, Err(e))) => { error!(service = %name, error = format!("{e:#}"), "service failed; stopping"); code = 1; }
                Ok((name, Ok(()))) => { error!(service = %name, "service ended unexpectedly; stopping"); code = 1; }
                Err(e) => { error!(error = %e, "service panicked; stopping"); code = 1; }
            }
            shutdown.cancel();
        }
    }
    info!("stopping services");
    let grace = Duration::from_secs(30);
    let all = async {
        while let Some(done) = set.join_next().await {
            if let Ok((name, Err(e))) = done {
                error!(service = %name, error = format!("{e:#}"), "service failed while stopping");
                code = 1;
            }
        }
    };
    if tokio::time::timeout(grace, all).await.is_err() {
        error!("services did not stop within {grace:?}");
        set.abort_all();
        return 1;
    }
    code
}

/// Writes the registry record of each local bot of a `--secure` setup
/// (what `warden bot add` writes): the worker config's pools and capacity.
async fn register_local_bots(
    config: &Config,
    s: &secure::Secure,
    workers: u32,
) -> anyhow::Result<()> {
    use warden_shared::bots::{record_key, BotRecord};
    let (_client, handles) = runtime::Connect::new(config, "up")
        .topology_forever()
        .await
        .context("cannot reach the local nats-server to register the bots")?;
    for i in 1..=workers {
        let bot_id = local_bot_id(i);
        let record = BotRecord {
            bot_id: bot_id.clone(),
            pools: config.worker.pools.clone(),
            max_capacity: config.worker.capacity,
            public_key: s.bot_public_key(&bot_id)?,
            added_at: chrono::Utc::now(),
        };
        handles
            .bots
            .put(record_key(&bot_id), serde_json::to_vec(&record)?.into())
            .await
            .with_context(|| format!("cannot register bot {bot_id}"))?;
    }
    Ok(())
}

/// The bot id of `warden up`'s `i`-th local worker.
fn local_bot_id(i: u32) -> String {
    format!("local-{i}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_beyond_loopback() {
        let at = |s: &str| {
            s.parse::<std::net::SocketAddr>()
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(beyond_loopback_warning(at("127.0.0.1:8080")), None);
        assert_eq!(beyond_loopback_warning(at("[::1]:8080")), None);
        let line = beyond_loopback_warning(at("0.0.0.0:8080")).unwrap_or_default();
        assert!(
            line.contains("WARNING") && line.contains("0.0.0.0:8080"),
            "{line}"
        );
    }
}
