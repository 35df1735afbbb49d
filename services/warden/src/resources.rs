//! `warden resources`, `warden resource check|close` and
//! `warden recycle-hook`: resources and their health for operators and
//! provisioners.

use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use warden_shared::messages::{HealthReply, HealthRequest, ResourceRecycle, MESSAGE_VERSION};
use warden_shared::resource;
use warden_shared::{subjects, Config};

use crate::cli::connect;

/// `warden resources`: every resource with its state, reason, dependents,
/// sessions and latest check.
pub async fn list(config: &Config, json: bool) -> anyhow::Result<i32> {
    let client = connect(config).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value(subjects::RESOURCES_BUCKET)
        .await
        .context("no resources bucket: has Warden ever run on this bus?")?;
    let all = resource::list(&kv)
        .await
        .map_err(|e| anyhow::anyhow!("cannot list resources: {e}"))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&resource::listing(&all))?
        );
        return Ok(0);
    }
    let now = chrono::Utc::now();
    println!(
        "{:<28}  {:<9}  {:<10}  {:>4}  {:<14}  {:<18}  {:>9}  REASON",
        "RESOURCE", "KIND", "STATE", "INC", "POOLS", "BOTS", "SINCE"
    );
    for r in &all {
        let bots: Vec<&str> = r.sessions.iter().map(|s| s.bot_id.as_str()).collect();
        println!(
            "{:<28}  {:<9}  {:<10}  {:>4}  {:<14}  {:<18}  {:>8.0}s  {}",
            r.name,
            r.kind,
            r.state.as_str(),
            r.incarnation,
            r.pools.join(","),
            if bots.is_empty() {
                "-".to_string()
            } else {
                bots.join(",")
            },
            (now - r.since).num_milliseconds() as f64 / 1000.0,
            r.reason
        );
        let deps = resource::dependents(&all, &r.name);
        if !deps.is_empty() {
            println!("    dependents: {}", deps.join(", "));
        }
        if let Some(c) = r.checks.last() {
            println!(
                "    last check: {} {} ({} ms, {}): {}",
                c.at.format("%Y-%m-%d %H:%M:%S"),
                c.result,
                c.duration_ms,
                c.trigger,
                c.summary
            );
        }
    }
    Ok(0)
}

/// `warden resource check NAME` / `close NAME`: asks the health service.
/// Exit 0 when the check passed (or the close happened), 1 when the check
/// failed, 2 when the request was refused.
pub async fn act(
    config: &Config,
    op: &str,
    name: &str,
    reason: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let client = connect(config).await?;
    let req = HealthRequest {
        version: MESSAGE_VERSION,
        resource: name.to_string(),
        reason,
    };
    let subject = if op == "check" {
        subjects::HEALTH_CHECK
    } else {
        subjects::HEALTH_CLOSE
    };
    // A check may take the agent up to the configured time limit.
    let limit = config.health.check_timeout + Duration::from_secs(5);
    let msg = tokio::time::timeout(
        limit,
        client.request(subject, serde_json::to_vec(&req)?.into()),
    )
    .await
    .with_context(|| format!("the health service did not answer within {limit:?}"))?
    .context("the health service is not reachable (is warden-health running?)")?;
    let reply: HealthReply =
        serde_json::from_slice(&msg.payload).context("bad answer from the health service")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    }
    if let Some(e) = reply.error {
        eprintln!("warden: {}: {}", e.code, e.message);
        return Ok(2);
    }
    let Some(r) = reply.resource else {
        bail!("the health service answered without the resource");
    };
    if !json {
        println!("{} is {}: {}", r.name, r.state, r.reason);
        if let Some(c) = &reply.check {
            for res in &c.results {
                println!(
                    "  {} {}: {}",
                    if res.passed { "ok  " } else { "FAIL" },
                    res.name,
                    res.detail
                );
            }
        }
    }
    Ok(match reply.check {
        Some(c) if !c.passed => 1,
        _ => 0,
    })
}

/// `warden recycle-hook -- CMD ARGS`: runs CMD for every recycle event (a
/// provisioner replaces the resource), with the event in its environment
/// (`WARDEN_RESOURCE`, `WARDEN_RESOURCE_KIND`, `WARDEN_RESOURCE_PATH`,
/// `WARDEN_RESOURCE_BOT`, `WARDEN_RECYCLE_REASON`,
/// `WARDEN_RECYCLE_DESCRIPTION`, `WARDEN_RESOURCE_INCARNATION`) and as
/// JSON on stdin. An event is acknowledged only when CMD exits 0; a
/// failure is retried after a minute. Durable: events published while the
/// hook was down are run when it comes back.
pub async fn hook(config: &Config, consumer: &str, command: &[String]) -> anyhow::Result<i32> {
    let Some(program) = command.first() else {
        bail!("give the command to run: warden recycle-hook -- CMD [ARGS]");
    };
    let client = connect(config).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(subjects::NOTIFY_STREAM)
        .await
        .context("no notify stream: has Warden ever run on this bus?")?;
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(consumer, subjects::recycle_hook_consumer(consumer))
        .await
        .context("cannot create the recycle hook's consumer")?;
    let shutdown = warden_shared::runtime::shutdown_on_signal();
    eprintln!(
        "warden: running `{}` for every recycled resource",
        command.join(" ")
    );
    let mut messages = consumer
        .messages()
        .await
        .context("cannot read recycle events")?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(0),
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => { eprintln!("warden: recycle events interrupted: {e}"); continue }
                None => bail!("recycle events ended"),
            },
        };
        let event: ResourceRecycle = match serde_json::from_slice(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("warden: skipping an undecodable recycle event: {e}");
                let _ = msg.ack_with(async_nats::jetstream::AckKind::Term).await;
                continue;
            }
        };
        let ok = run_hook(program, &command[1..], &event, &msg.payload).await;
        let ack = if ok {
            async_nats::jetstream::AckKind::Ack
        } else {
            async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(60)))
        };
        if let Err(e) = msg.ack_with(ack).await {
            eprintln!("warden: cannot acknowledge the recycle event: {e}");
        }
    }
}

async fn run_hook(program: &str, args: &[String], e: &ResourceRecycle, json: &[u8]) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("WARDEN_RESOURCE", &e.resource)
        .env("WARDEN_RESOURCE_KIND", &e.kind)
        .env("WARDEN_RESOURCE_PATH", e.path.as_deref().unwrap_or(""))
        .env("WARDEN_RESOURCE_BOT", e.bot_id.as_deref().unwrap_or(""))
        .env("WARDEN_RESOURCE_INCARNATION", e.incarnation.to_string())
        .env("WARDEN_RECYCLE_REASON", &e.reason)
        .env("WARDEN_RECYCLE_DESCRIPTION", &e.description)
        .stdin(std::process::Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("warden: cannot run {program}: {err}");
            return false;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(json).await;
    }
    match child.wait().await {
        Ok(s) if s.success() => {
            eprintln!(
                "warden: recycled {} ({}, {}): hook done",
                e.resource, e.kind, e.reason
            );
            true
        }
        Ok(s) => {
            eprintln!(
                "warden: hook for {} failed ({s}); retrying in a minute",
                e.resource
            );
            false
        }
        Err(err) => {
            eprintln!("warden: hook for {}: {err}", e.resource);
            false
        }
    }
}
