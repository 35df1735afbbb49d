//! Client commands: `warden job …` and `warden publish`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use uuid::Uuid;
use warden_api::{ApiClient, ListQuery};
use warden_shared::job::{Job, NewJob};
use warden_shared::{Config, JobState};

use crate::JobCommand;

/// A short-lived client: a command fails fast instead of waiting forever
/// for a bus that is not there.
pub async fn connect(config: &Config) -> anyhow::Result<async_nats::Client> {
    use warden_shared::runtime::{Connect, ConnectError};
    // A cluster with per-role users (deploy/nats/cluster/accounts.conf)
    // lets only the services' user submit, retry or cancel; the command
    // logs in as the config says, like the services do.
    Connect::new(config, "cli")
        .name("warden-cli")
        .short_lived(Duration::from_secs(5), 3)
        .client()
        .await
        .map_err(|e| match e {
            ConnectError::Connect { url, source }
                if source.kind() == async_nats::ConnectErrorKind::ServerParse =>
            {
                anyhow::Error::new(source).context(format!("bad NATS URL {url:?}"))
            }
            ConnectError::Connect { url, source } => anyhow::Error::new(source).context(format!(
                "cannot reach NATS at {url} (is `warden up` running? use --nats-url)"
            )),
            other => anyhow::Error::new(other),
        })
}

pub async fn job(config: &Config, cmd: &JobCommand) -> anyhow::Result<i32> {
    let client = connect(config).await?;
    let api = ApiClient::new(client.clone());
    match cmd {
        JobCommand::Submit {
            task,
            args,
            priority,
            pool,
            no_retry,
            max_attempts,
            key,
            wait,
            timeout,
        } => {
            let mut map = BTreeMap::new();
            for a in args {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--arg {a:?}: expected KEY=VALUE"))?;
                if k.is_empty() {
                    bail!("--arg {a:?}: empty key");
                }
                map.insert(k.to_string(), v.to_string());
            }
            let job = api
                .create(NewJob {
                    task: task.clone(),
                    args: map,
                    pool: pool.clone(),
                    priority: *priority,
                    retry: no_retry.then_some(false),
                    max_attempts: *max_attempts,
                    idempotency_key: key.clone(),
                })
                .await
                .map_err(|e| anyhow!("cannot submit job: {e}"))?;
            println!("{}", job.id);
            if !wait {
                return Ok(0);
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(*timeout);
            loop {
                if let Some(j) = api
                    .get(job.id)
                    .await
                    .map_err(|e| anyhow!("cannot read job: {e}"))?
                {
                    if j.state.is_terminal() {
                        println!("{}", one_line(&j));
                        let ok =
                            j.state == JobState::Finished && j.outcome.as_deref() == Some("passed");
                        return Ok(if ok { 0 } else { 1 });
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    eprintln!("warden: job {} still not done after {timeout}s", job.id);
                    return Ok(2);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        JobCommand::Show { id, json } => {
            let id: Uuid = id
                .parse()
                .map_err(|_| anyhow!("{id:?} is not a job id (a UUID)"))?;
            let Some(job) = api
                .get(id)
                .await
                .map_err(|e| anyhow!("cannot read job: {e}"))?
            else {
                eprintln!("warden: no job {id}");
                return Ok(1);
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print_job(&job);
            }
            Ok(0)
        }
        JobCommand::Retry { id } => {
            let id = parse_id(id)?;
            match api.retry(id).await {
                Ok(job) => {
                    println!("{}", one_line(&job));
                    Ok(0)
                }
                Err(e) => refused("retry", e),
            }
        }
        JobCommand::Cancel { id, reason } => {
            let id = parse_id(id)?;
            match api.cancel(id, reason.clone()).await {
                Ok(job) => {
                    println!("{}", one_line(&job));
                    Ok(0)
                }
                Err(e) => refused("cancel", e),
            }
        }
        JobCommand::List {
            state,
            task,
            pool,
            blame,
            detail,
            bot,
            source,
            since,
            limit,
            json,
        } => {
            if let Some(s) = state {
                s.parse::<JobState>().map_err(|e| anyhow!(e))?;
            }
            if let Some(b) = blame {
                b.parse::<warden_shared::Blame>().map_err(|e| anyhow!(e))?;
            }
            let query = ListQuery {
                state: state.clone(),
                task: task.clone(),
                pool: pool.clone(),
                blame: blame.clone(),
                detail: detail.clone(),
                bot_id: bot.clone(),
                source_message_id: source.clone(),
                since: since.clone(),
                limit: Some(*limit),
                ..Default::default()
            };
            let reply = api
                .list(query)
                .await
                .map_err(|e| anyhow!("cannot list jobs: {e}"))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&reply.jobs)?);
            } else {
                println!(
                    "{:<36}  {:<10}  {:<16}  {:>4}  {:>3}  {:<10}  CREATED",
                    "ID", "STATE", "TASK", "PRIO", "TRY", "OUTCOME"
                );
                for j in &reply.jobs {
                    let outcome = j
                        .outcome
                        .clone()
                        .or_else(|| j.detail.clone())
                        .unwrap_or_default();
                    println!(
                        "{:<36}  {:<10}  {:<16}  {:>4}  {:>3}  {:<10}  {}",
                        j.id,
                        j.state,
                        j.task,
                        j.priority,
                        j.attempt,
                        outcome,
                        j.created_at.format("%Y-%m-%d %H:%M:%S")
                    );
                }
                println!(
                    "({} shown of {}{})",
                    reply.jobs.len(),
                    reply.total,
                    if reply.total_exact { "" } else { " or more" }
                );
            }
            Ok(0)
        }
    }
}

/// `warden stats`: counts by state, blame and detail over a window.
pub async fn stats(config: &Config, window: &str, json: bool) -> anyhow::Result<i32> {
    let client = connect(config).await?;
    let api = ApiClient::new(client);
    let s = match api
        .stats(warden_api::StatsQuery {
            window: Some(window.to_string()),
        })
        .await
    {
        Ok(s) => s,
        Err(e) => return refused("read statistics", e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!(
        "{} jobs changed in the last {window} ({} retried, {} shelved)",
        s.jobs, s.retried, s.shelved
    );
    println!("by state:");
    for (k, n) in &s.by_state {
        println!("  {k:<12} {n:>8}");
    }
    if !s.by_blame.is_empty() {
        println!("by blame:");
        for (k, n) in &s.by_blame {
            println!("  {k:<12} {n:>8}");
        }
        println!("by blame/detail:");
        for (k, n) in &s.by_detail {
            println!("  {k:<32} {n:>8}");
        }
    }
    Ok(0)
}

fn parse_id(id: &str) -> anyhow::Result<Uuid> {
    id.parse()
        .map_err(|_| anyhow!("{id:?} is not a job id (a UUID)"))
}

/// An API refusal (illegal transition, unknown job) is the operator's
/// answer, not a failure of the command: the API's own words on one line,
/// exit 1. Anything else (no API running, a timeout) says what was tried.
fn refused(what: &str, e: warden_api::ClientError) -> anyhow::Result<i32> {
    match e {
        warden_api::ClientError::Api(body) => {
            eprintln!("warden: {}", body.message);
            Ok(1)
        }
        other => Err(anyhow!("cannot {what}: {other}")),
    }
}

fn one_line(j: &Job) -> String {
    match j.state {
        JobState::Finished => format!(
            "{} FINISHED outcome={}",
            j.id,
            j.outcome.as_deref().unwrap_or("?")
        ),
        s => {
            let mut line = format!("{} {s}", j.id);
            // A job without a failure (a fresh or cancelled one) has
            // nothing more to say.
            if let Some(b) = j.blame {
                line.push_str(&format!(
                    " blame={b} detail={}",
                    j.detail.as_deref().unwrap_or("")
                ));
            }
            if let Some(d) = j.description.as_deref().filter(|d| !d.is_empty()) {
                line.push(' ');
                line.push_str(d);
            }
            line
        }
    }
}

fn print_job(j: &Job) {
    print!("{}", describe(j, chrono::Utc::now()));
}

/// `warden job show`: the job, why it stands where it is (a job waiting
/// for a retry shows the failure it is retried for and when), and its
/// history.
fn describe(j: &Job, now: chrono::DateTime<chrono::Utc>) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("job       {}", j.id));
    line(format!("task      {}", j.task));
    for (k, v) in &j.args {
        line(format!("  arg     {k}={v}"));
    }
    line(format!("state     {}", j.state));
    if let Some(o) = &j.outcome {
        line(format!("outcome   {o}"));
    }
    if let Some(b) = j.blame {
        // A SCHEDULED job keeps the failure it is being retried for until
        // its next dispatch.
        let label = if j.state == JobState::Scheduled {
            "last fail"
        } else {
            "blame    "
        };
        let mut text = format!("{label} {b}/{}", j.detail.as_deref().unwrap_or("?"));
        if let Some(d) = j.description.as_deref().filter(|d| !d.is_empty()) {
            text.push_str(": ");
            text.push_str(d);
        }
        line(text);
    }
    if let Some(at) = j.not_before {
        let wait = (at - now).num_milliseconds();
        let due = if wait > 0 {
            format!(" (in {:.1}s)", wait as f64 / 1000.0)
        } else {
            " (due)".to_string()
        };
        line(format!("retry not before {}{due}", at.to_rfc3339()));
    }
    if !j.retry {
        line("retry     off for this job (retry: false)".to_string());
    }
    if let Some(n) = j.max_attempts {
        line(format!("attempts  at most {n} per budget (max_attempts)"));
    }
    if !j.lost_workers.is_empty() {
        line(format!(
            "lost on   {} (lost_workers, the poison count)",
            j.lost_workers.join(", ")
        ));
    }
    line(format!(
        "pool      {}  priority {}  attempt {}",
        j.pool, j.priority, j.attempt
    ));
    if let Some(l) = &j.lease {
        line(format!(
            "lease     bot {} session {} epoch {} resource {}",
            l.bot_id,
            l.session,
            l.epoch,
            l.resource.as_deref().unwrap_or("-")
        ));
    }
    if let Some(s) = &j.source {
        line(format!(
            "source    {} ({}){}",
            s.message_id,
            s.subject,
            s.rule
                .as_deref()
                .map(|r| format!(" rule {r}"))
                .unwrap_or_default()
        ));
    }
    line(format!("created   {}", j.created_at.to_rfc3339()));
    line(format!("updated   {}", j.updated_at.to_rfc3339()));
    line("history:".to_string());
    for h in &j.history {
        let change = match (h.from, h.to) {
            (Some(f), Some(t)) => format!("{f} -> {t}"),
            (None, Some(t)) => format!("-> {t}"),
            _ => String::new(),
        };
        line(format!(
            "  {}  #{:<2} {:<13} {:<24} by {}{}{}",
            h.at.format("%H:%M:%S%.3f"),
            h.attempt,
            h.action.as_str(),
            change,
            h.bot_id.as_deref().unwrap_or(&h.actor),
            h.resource
                .as_deref()
                .map(|r| format!(" on {r}"))
                .unwrap_or_default(),
            h.note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default()
        ));
    }
    if j.history_dropped > 0 {
        line(format!("  ({} older entries dropped)", j.history_dropped));
    }
    out
}

/// Publishes a JSON event durably, with its message id as the JetStream
/// de-duplication id, the way a bridge would.
pub async fn publish(config: &Config, subject: &str, file: &Path) -> anyhow::Result<i32> {
    warden_shared::config::check_pattern(subject)
        .map_err(|e| anyhow!("subject {subject:?}: {e}"))?;
    if subject.contains('*') || subject.contains('>') {
        bail!("subject {subject:?}: cannot publish on a wildcard");
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", file.display()))?;
    let msg_id = ["msg_id", "id"]
        .iter()
        .find_map(|k| value.get(*k).and_then(|v| v.as_str()).map(str::to_string));
    let client = connect(config).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = &msg_id {
        headers.insert("Nats-Msg-Id", id.as_str());
    }
    let ack = js
        .publish_with_headers(subject.to_string(), headers, bytes.into())
        .await
        .context("cannot publish")?
        .await
        .with_context(|| {
            format!("no stream accepted {subject} (is it covered by trigger.subjects?)")
        })?;
    println!(
        "published {subject} msg_id={} stream={} seq={}{}",
        msg_id.as_deref().unwrap_or("-"),
        ack.stream,
        ack.sequence,
        if ack.duplicate {
            " (duplicate: already on the bus)"
        } else {
            ""
        }
    );
    client.flush().await.ok();
    Ok(0)
}

/// `warden bots`: every session on record, newest first within a bot.
pub async fn bots(config: &Config, json: bool) -> anyhow::Result<i32> {
    let client = connect(config).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value(warden_shared::subjects::SESSIONS_BUCKET)
        .await
        .context("no sessions bucket: has Warden ever run on this bus?")?;
    let sessions = warden_shared::session::list(&kv)
        .await
        .map_err(|e| anyhow::anyhow!("cannot list sessions: {e}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(0);
    }
    let now = chrono::Utc::now();
    println!(
        "{:<20}  {:<36}  {:<11}  {:<16}  {:<12}  {:>6}  LAST HEARTBEAT",
        "BOT", "SESSION", "STATE", "RESOURCE", "POOLS", "LEASES"
    );
    for s in &sessions {
        println!(
            "{:<20}  {:<36}  {:<11}  {:<16}  {:<12}  {:>6}  {:.1}s ago",
            s.bot_id,
            s.name,
            s.state.as_str(),
            s.resource.as_deref().unwrap_or("-"),
            s.pools.join(","),
            s.leases.len(),
            (now - s.last_heartbeat).num_milliseconds() as f64 / 1000.0
        );
    }
    Ok(0)
}

/// `warden history export|status`: straight from the database
/// (`[history] database`), no bus needed.
pub async fn history(config: &Config, cmd: &crate::HistoryCommand) -> anyhow::Result<i32> {
    if !config.history.enabled() {
        bail!("history.database is not set (WARDEN_HISTORY_DATABASE or [history] database)");
    }
    let db = warden_history::HistoryDb::open(&config.history.database)
        .await
        .with_context(|| {
            format!(
                "cannot open {}",
                warden_history::redact_url(&config.history.database)
            )
        })?;
    let instant =
        |what: &str, s: &Option<String>| -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
            s.as_deref()
                .map(|t| {
                    chrono::DateTime::parse_from_rfc3339(t)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .with_context(|| format!("--{what} {t:?} is not an RFC 3339 time"))
                })
                .transpose()
        };
    match cmd {
        crate::HistoryCommand::Export { since, until, out } => {
            let (since, until) = (instant("since", since)?, instant("until", until)?);
            let n = match out {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    let n = db.export(since, until, &mut w).await?;
                    std::io::Write::flush(&mut w)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    n
                }
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout());
                    let n = db.export(since, until, &mut w).await?;
                    std::io::Write::flush(&mut w).context("cannot write stdout")?;
                    n
                }
            };
            eprintln!("exported {n} jobs");
        }
        crate::HistoryCommand::Status => {
            let c = db.row_counts().await?;
            println!(
                "database  {} ({}, schema version {})",
                warden_history::redact_url(&config.history.database),
                db.backend().as_str(),
                db.schema_version().await?
            );
            println!("jobs      {} ({} archived)", c.jobs, c.archived);
            println!("history   {} entries", c.history);
            println!("attempts  {}", c.attempts);
        }
    }
    db.close().await;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_shared::error::ErrorCode;
    use warden_shared::messages::ErrorBody;
    use warden_shared::Blame;

    fn job() -> Job {
        Job::builder("build")
            .pool("builders")
            .actor("api")
            .at(chrono::Utc::now())
            .build()
    }

    #[test]
    fn a_fresh_job_shows_no_retry_state() {
        let text = describe(&job(), chrono::Utc::now());
        for absent in ["blame", "last fail", "retry", "lost on", "attempts"] {
            assert!(!text.contains(absent), "{absent:?} in\n{text}");
        }
        assert!(text.contains("state     SCHEDULED\n"), "{text}");
    }

    #[test]
    fn a_job_waiting_for_a_retry_shows_why_and_when() {
        let now = chrono::Utc::now();
        let mut j = job();
        j.attempt = 2;
        j.blame = Some(Blame::ThirdParty);
        j.detail = Some("network".into());
        j.description = Some("a network service did not answer".into());
        j.not_before = Some(now + chrono::Duration::seconds(30));
        j.lost_workers = vec!["bot-a".into(), "bot-b".into()];
        let text = describe(&j, now);
        assert!(
            text.contains("last fail third_party/network: a network service did not answer\n"),
            "{text}"
        );
        let due = j.not_before.map(|t| t.to_rfc3339()).unwrap_or_default();
        assert!(
            text.contains(&format!("retry not before {due} (in 30.0s)\n")),
            "{text}"
        );
        assert!(text.contains("lost on   bot-a, bot-b"), "{text}");
    }

    #[test]
    fn a_shelved_job_shows_its_blame_and_limits() {
        let mut j = job();
        j.state = JobState::Shelved;
        j.blame = Some(Blame::Task);
        j.detail = Some("worker_crash_loop".into());
        j.retry = false;
        j.max_attempts = Some(2);
        let text = describe(&j, chrono::Utc::now());
        assert!(
            text.contains("blame     task/worker_crash_loop\n"),
            "no description, no colon: {text}"
        );
        assert!(text.contains("retry: false"), "{text}");
        assert!(text.contains("at most 2 per budget"), "{text}");
        assert!(!text.contains("not before"), "{text}");
    }

    #[test]
    fn one_line_names_a_failure_only_when_there_is_one() {
        let mut j = job();
        j.state = JobState::Cancelled;
        assert_eq!(one_line(&j), format!("{} CANCELLED", j.id));
        j.state = JobState::Scheduled;
        j.blame = Some(Blame::ThirdParty);
        j.detail = Some("network".into());
        j.description = Some("no answer".into());
        assert_eq!(
            one_line(&j),
            format!(
                "{} SCHEDULED blame=third_party detail=network no answer",
                j.id
            )
        );
        j.state = JobState::Finished;
        j.outcome = Some("passed".into());
        assert_eq!(one_line(&j), format!("{} FINISHED outcome=passed", j.id));
    }

    #[test]
    fn api_refusals_exit_1_and_transport_failures_are_errors() {
        let refusal = warden_api::ClientError::Api(ErrorBody::new(
            ErrorCode::IllegalTransition,
            "illegal transition: cannot retry a FINISHED job",
        ));
        assert_eq!(refused("retry", refusal).ok(), Some(1));
        let down = refused("retry", warden_api::ClientError::NoResponders)
            .expect_err("no api is an error");
        assert_eq!(down.to_string(), "cannot retry: no api service is running");
    }
}
