//! External executors (a Buildbot step, a shell script with curl): take a
//! job, then switch its state with the execution token the take returned.
//!
//! An executor is a bot like any other, with the same fencing:
//! - a take opens a session for the executor's bot id at the fencing
//!   service (newest session wins, so an older take by the same bot is
//!   superseded) and asks the scheduler for one lease, as a worker does;
//! - every state switch renews that session (so RUNNING again is a
//!   keep-alive) and is published as the worker's report would be, on the
//!   reports stream; the scheduler applies it only if it names the job's
//!   current attempt and session, classifies a crash, and runs the retry
//!   policy. A report for an attempt that is no longer the executor's is
//!   rejected, recorded in the job's history and counted, exactly like a
//!   zombie worker's;
//! - silence past the session's timeout expires it, and the scheduler
//!   takes the job back like a lost worker's.
//!
//! The token (`w2.<job>.<epoch>.<session>.<secret>`) is a fencing token
//! and a secret: it carries the lease secret the scheduler handed to the
//! take ([`warden_shared::lease_secret`]), and a switch is made only if the
//! secret's hash is the lease's. Job, epoch and session are what anyone
//! who reads the job sees; the secret only the take's caller has, so no
//! token can be built for a lease held by another (a worker bot's, or
//! another executor's). Tokens of the old form (`w1.`, without a secret)
//! are refused.

use std::time::Duration;
use warden_shared::error::ErrorCode;

use chrono::Utc;
use serde::de::DeserializeOwned;
use uuid::Uuid;
use warden_shared::config::{valid_name, valid_task_name, MAX_EXECUTION_TIMEOUT};
use warden_shared::job::CrashInfo;
use warden_shared::messages::{
    AcquireReply, AcquireRequest, CloseSession, CreateSession, Fault, Heartbeat, HeldLease, Report,
    ReportKind, SessionReply, MESSAGE_VERSION,
};
use warden_shared::state::Action;
use warden_shared::{lease_secret, subjects, Blame, Job, JobState};

use crate::ops::{parse_id, OpError, Ops, MAX_REASON};
use crate::types::{Execution, StateReply, StateRequest, TakeReply, TakeRequest};

/// The longest a take may wait for a job.
pub const MAX_WAIT_MS: u64 = 30_000;
/// Longest bot id an executor may give.
pub const MAX_BOT_ID: usize = 128;
/// Longest outcome an executor may give.
pub const MAX_OUTCOME: usize = 64;
/// How long a state switch waits for the scheduler to record it before it
/// answers "accepted, not applied yet".
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// How long the fencing service and the scheduler get to answer.
const BUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The fencing token of one attempt held by an executor, with the lease
/// secret of its grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionToken {
    pub job_id: Uuid,
    pub epoch: u32,
    pub session: String,
    pub secret: String,
}

/// Why a string is not an execution token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// A token of the old form (`w1.`): it carries no secret.
    Outdated,
    /// Not a token at all.
    Malformed,
}

impl ExecutionToken {
    pub fn encode(&self) -> String {
        format!(
            "w2.{}.{}.{}.{}",
            self.job_id, self.epoch, self.session, self.secret
        )
    }

    pub fn parse(s: &str) -> Result<ExecutionToken, TokenError> {
        let s = s.trim();
        if s.starts_with("w1.") {
            return Err(TokenError::Outdated);
        }
        let mut parts = s.split('.');
        let (Some("w2"), Some(job), Some(epoch), Some(session), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let session = session
            .parse::<Uuid>()
            .map_err(|_| TokenError::Malformed)?
            .to_string();
        if secret.len() != lease_secret::SECRET_LEN
            || !secret.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(TokenError::Malformed);
        }
        Ok(ExecutionToken {
            job_id: job.parse().map_err(|_| TokenError::Malformed)?,
            epoch: epoch
                .parse()
                .ok()
                .filter(|e| *e > 0)
                .ok_or(TokenError::Malformed)?,
            session,
            secret: secret.to_string(),
        })
    }
}

/// Whether `token` may speak for the attempt it names on `job`: if the
/// job's lease is that attempt's, its secret's hash must be the lease's
/// (a lease without a hash was never an executor's take). A token for
/// another attempt claims nothing; [`stale`] answers it.
fn holds_secret(job: &Job, token: &ExecutionToken) -> Result<(), OpError> {
    let Some(lease) = job.lease.as_ref().filter(|l| l.epoch == token.epoch) else {
        return Ok(());
    };
    match &lease.secret_hash {
        Some(h) if lease_secret::matches(&token.secret, h) => Ok(()),
        _ => Err(OpError::bad_request(
            ErrorCode::InvalidToken,
            format!(
                "the token does not hold attempt {} of job {}: its secret is not the lease's",
                token.epoch, job.id
            ),
        )),
    }
}

/// The state an executor asks for, validated.
/// The state an executor asks for, validated (public for the fuzz
/// targets).
#[derive(Debug, Clone, PartialEq)]
pub enum Switch {
    Running,
    Finished { outcome: String },
    Crashed { fault: Fault },
}

impl Switch {
    fn action(&self) -> Action {
        match self {
            Switch::Running => Action::Start,
            Switch::Finished { .. } => Action::Finish,
            Switch::Crashed { .. } => Action::Crash,
        }
    }

    pub fn from_request(req: &StateRequest) -> Result<Switch, OpError> {
        let given = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.trim().is_empty());
        let refuse_extra = |state: &str, fields: &[(&str, bool)]| -> Result<(), OpError> {
            match fields.iter().find(|(_, present)| *present) {
                Some((name, _)) => Err(OpError::bad_request(
                    ErrorCode::InvalidRequest,
                    format!("{name} does not go with state {state}"),
                )),
                None => Ok(()),
            }
        };
        match req.state.trim().to_ascii_uppercase().as_str() {
            "RUNNING" => {
                refuse_extra(
                    "RUNNING",
                    &[
                        ("outcome", given(&req.outcome)),
                        ("blame", given(&req.blame)),
                        ("detail", given(&req.detail)),
                        ("description", given(&req.description)),
                    ],
                )?;
                Ok(Switch::Running)
            }
            "FINISHED" => {
                refuse_extra(
                    "FINISHED",
                    &[
                        ("blame", given(&req.blame)),
                        ("detail", given(&req.detail)),
                        ("description", given(&req.description)),
                    ],
                )?;
                let outcome = req.outcome.as_deref().map(str::trim).unwrap_or_default();
                if outcome.is_empty() || outcome.len() > MAX_OUTCOME || !valid_task_name(outcome) {
                    return Err(OpError::bad_request(
                        ErrorCode::InvalidOutcome,
                        format!(
                            "FINISHED needs an outcome such as PASSED or FAILED: letters, digits, \
                             _, - and ., at most {MAX_OUTCOME}"
                        ),
                    ));
                }
                Ok(Switch::Finished {
                    outcome: outcome.to_string(),
                })
            }
            "CRASHED" => {
                refuse_extra("CRASHED", &[("outcome", given(&req.outcome))])?;
                let blame = req
                    .blame
                    .as_deref()
                    .map(str::trim)
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| {
                        OpError::bad_request(
                            ErrorCode::InvalidBlame,
                            "CRASHED needs a blame: system, task, third_party or unknown",
                        )
                    })?
                    .parse::<Blame>()
                    .map_err(|e| OpError::bad_request(ErrorCode::InvalidBlame, e))?;
                let detail = req.detail.as_deref().map(str::trim).unwrap_or_default();
                // The same rule as a task's status file.
                if detail.is_empty() || detail.len() > 64 || !valid_name(detail) {
                    return Err(OpError::bad_request(
                        ErrorCode::InvalidDetail,
                        "CRASHED needs a detail code of letters, digits and _ (at most 64), \
                         e.g. network or oom",
                    ));
                }
                let description = req.description.clone().unwrap_or_default();
                if description.chars().count() > MAX_REASON {
                    return Err(OpError::bad_request(
                        ErrorCode::InvalidRequest,
                        format!("description is longer than {MAX_REASON} characters"),
                    ));
                }
                Ok(Switch::Crashed {
                    fault: Fault {
                        blame,
                        detail: detail.to_string(),
                        description,
                    },
                })
            }
            other => Err(OpError::bad_request(
                ErrorCode::InvalidState,
                format!("state {other:?}: an executor sets RUNNING, FINISHED or CRASHED"),
            )),
        }
    }
}

/// How the scheduler has treated this attempt's report of `action` so far.
enum Seen {
    Applied,
    Rejected(String),
    Pending,
}

fn seen(job: &Job, token: &ExecutionToken, action: Action) -> Seen {
    for e in job.history.iter().rev() {
        if e.attempt != token.epoch || e.actor != token.session {
            continue;
        }
        if e.action == action {
            return Seen::Applied;
        }
        if e.action == Action::RejectReport {
            let note = e.note.clone().unwrap_or_default();
            let kind = match action {
                Action::Start => "started",
                Action::Finish => "finished",
                _ => "crashed",
            };
            if note.starts_with(kind) {
                return Seen::Rejected(note);
            }
        }
    }
    Seen::Pending
}

/// Why `token` no longer holds `job`, or `None` if it does.
/// The executor's bot id: that of the lease its token's session holds
/// (its session subjects carry it).
fn executor_bot(
    lease: Option<&warden_shared::job::Lease>,
    token: &ExecutionToken,
) -> Option<String> {
    lease
        .filter(|l| l.session == token.session)
        .map(|l| l.bot_id.clone())
}

fn stale(job: &Job, token: &ExecutionToken) -> Option<OpError> {
    if job.attempt == token.epoch && job.is_held_by(&token.session, token.epoch) {
        return None;
    }
    if job.state == JobState::Cancelled && job.attempt == token.epoch {
        return Some(OpError::new(
            ErrorCode::Cancelled,
            format!("job {} was cancelled; stop the execution", job.id),
        ));
    }
    Some(OpError::new(
        ErrorCode::StaleExecution,
        format!(
            "this execution (attempt {}) no longer holds job {}: it is {} at attempt {}",
            token.epoch, job.id, job.state, job.attempt
        ),
    ))
}

impl Ops {
    /// Opens a session for the executor and leases it one job, if one is
    /// ready within `wait_ms`.
    pub async fn take(&self, req: TakeRequest) -> Result<TakeReply, OpError> {
        let bot_id = req.bot_id.trim().to_string();
        if bot_id.is_empty()
            || bot_id.chars().count() > MAX_BOT_ID
            || bot_id.chars().any(char::is_control)
        {
            return Err(OpError::bad_request(
                ErrorCode::InvalidBotId,
                format!("bot_id must be 1 to {MAX_BOT_ID} printable characters"),
            ));
        }
        let pools = if req.pools.is_empty() {
            vec!["default".to_string()]
        } else {
            req.pools
        };
        if let Some(p) = pools.iter().find(|p| !valid_task_name(p)) {
            return Err(OpError::bad_request(
                ErrorCode::InvalidPool,
                format!("pool {p:?}: pool names are letters, digits, _, - and ."),
            ));
        }
        let wait_ms = req.wait_ms.unwrap_or(0);
        if wait_ms > MAX_WAIT_MS {
            return Err(OpError::bad_request(
                ErrorCode::InvalidWait,
                format!("wait_ms is at most {MAX_WAIT_MS}"),
            ));
        }
        let timeout = match req
            .timeout
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            Some(t) => humantime_serde::re::humantime::parse_duration(t)
                .ok()
                .filter(|d| *d >= Duration::from_secs(1) && *d <= MAX_EXECUTION_TIMEOUT)
                .ok_or_else(|| {
                    OpError::bad_request(
                        ErrorCode::InvalidTimeout,
                        format!("timeout {t:?} is not a duration between 1s and 24h"),
                    )
                })?,
            None => self.config.http.execution_timeout,
        };
        self.bus_up()?;

        let create = CreateSession {
            version: MESSAGE_VERSION,
            bot_id: bot_id.clone(),
            resource: None,
            resources: Vec::new(),
            agent_instance: format!("api-executor:{}", Uuid::new_v4()),
            pools: pools.clone(),
            capacity: 1,
            agent_version: concat!("warden-api ", env!("CARGO_PKG_VERSION")).into(),
            timeout_ms: Some(timeout.as_millis() as u64),
        };
        let reply: SessionReply = self
            .ask(
                &subjects::executor_session_create_subject(&bot_id),
                &create,
                BUS_TIMEOUT,
                "fencing",
            )
            .await?;
        let session = match (reply.session, reply.error) {
            (Some(s), _) => s,
            (None, Some(e)) if e.code == ErrorCode::InvalidRequest => {
                return Err(OpError::bad_request(ErrorCode::InvalidRequest, e.message))
            }
            // A registered worker bot's id: an executor needs its own.
            (None, Some(e)) if e.code == ErrorCode::BotRegistered => {
                return Err(OpError::bad_request(ErrorCode::InvalidBotId, e.message))
            }
            (None, e) => {
                return Err(OpError::unavailable(format!(
                    "the fencing service refused a session: {}",
                    e.map(|e| e.message).unwrap_or_default()
                )))
            }
        };

        let acquire = AcquireRequest {
            version: MESSAGE_VERSION,
            session: session.clone(),
            bot_id: bot_id.clone(),
            resource: None,
            resources: Vec::new(),
            pools,
            max: 1,
            wait_ms,
        };
        let reply: Result<AcquireReply, OpError> = self
            .ask(
                &subjects::acquire_subject(&bot_id),
                &acquire,
                Duration::from_millis(wait_ms) + BUS_TIMEOUT,
                "scheduler",
            )
            .await;
        let grant = match reply {
            Ok(r) => r.leases.into_iter().next(),
            Err(e) => {
                self.close_session(&bot_id, &session).await;
                return Err(e);
            }
        };
        let Some(grant) = grant else {
            self.close_session(&bot_id, &session).await;
            return Ok(TakeReply { execution: None });
        };
        let Some(secret) = grant.secret.clone() else {
            // A scheduler from before lease secrets: its lease cannot be
            // held by a token; it goes back when the session closes.
            self.close_session(&bot_id, &session).await;
            return Err(OpError::unavailable(
                "the scheduler granted a lease without a secret (an older scheduler); try again",
            ));
        };
        let token = ExecutionToken {
            job_id: grant.job_id,
            epoch: grant.epoch,
            session: session.clone(),
            secret,
        };
        tracing::info!(job.id = %grant.job_id, epoch = grant.epoch, bot.id = %bot_id, %session, "job taken by an external executor");
        Ok(TakeReply {
            execution: Some(Execution {
                token: token.encode(),
                job_id: grant.job_id,
                epoch: grant.epoch,
                task: grant.task,
                args: grant.args,
                pool: grant.pool,
                priority: grant.priority,
                bot_id,
                session,
                timeout_ms: timeout.as_millis() as u64,
            }),
        })
    }

    /// Switches the state of job `id` for the executor holding `req.token`.
    pub async fn switch_state(&self, id: &str, req: StateRequest) -> Result<StateReply, OpError> {
        let id = parse_id(id)?;
        let token = ExecutionToken::parse(&req.token).inspect_err(|e| {
            let reason = match e {
                TokenError::Outdated => "outdated",
                TokenError::Malformed => "malformed",
            };
            crate::metrics::metrics()
                .forged_tokens
                .with_label_values(&[reason])
                .inc();
        });
        let token = token.map_err(|e| match e {
            TokenError::Outdated => OpError::bad_request(
                ErrorCode::InvalidToken,
                "w1 execution tokens are no longer accepted (they carry no secret): take the job again for a w2 token",
            ),
            TokenError::Malformed => OpError::bad_request(
                ErrorCode::InvalidToken,
                "token is not an execution token from a take",
            ),
        })?;
        if token.job_id != id {
            return Err(OpError::bad_request(
                ErrorCode::TokenMismatch,
                format!("the token is for job {}, not {id}", token.job_id),
            ));
        }
        let switch = Switch::from_request(&req)?;
        let action = switch.action();
        let job = self.get(&id).await?;
        if let Err(refusal) = holds_secret(&job, &token) {
            crate::metrics::metrics()
                .forged_tokens
                .with_label_values(&["wrong_secret"])
                .inc();
            tracing::warn!(job.id = %id, epoch = token.epoch, "execution token without the lease's secret refused");
            return Err(refusal);
        }

        // A repeated call (the answer to the first was lost) changes nothing.
        // RUNNING again is also the keep-alive: once the attempt is no
        // longer the executor's (cancelled, taken back) it is refused below
        // like any stale report, not answered as applied.
        if let Seen::Applied = seen(&job, &token, action) {
            if switch != Switch::Running {
                return Ok(StateReply { applied: true, job });
            }
            if stale(&job, &token).is_none() {
                self.renew(&job, &token).await?;
                return Ok(StateReply { applied: true, job });
            }
        }
        let lease = job.lease.clone();
        let report = |kind: ReportKind| Report {
            version: MESSAGE_VERSION,
            job_id: id,
            session: token.session.clone(),
            bot_id: lease
                .as_ref()
                .filter(|l| l.session == token.session)
                .map(|l| l.bot_id.clone())
                .unwrap_or_else(|| "unknown".into()),
            epoch: token.epoch,
            at: Utc::now(),
            secret: Some(token.secret.clone()),
            kind,
        };
        let started = lease
            .as_ref()
            .map(|l| l.started_at.unwrap_or(l.leased_at))
            .unwrap_or_else(Utc::now);
        let duration_ms = (Utc::now() - started).num_milliseconds().max(0) as u64;
        let kind = match &switch {
            Switch::Running => ReportKind::Started { resource: None },
            Switch::Finished { outcome } => ReportKind::Finished {
                outcome: outcome.clone(),
                duration_ms,
            },
            Switch::Crashed { fault } => ReportKind::Crashed {
                crash: CrashInfo {
                    duration_ms,
                    log_tail: fault.description.clone(),
                    // Classified as a task's own fault is: rule status_file.
                    status_file: Some(
                        serde_json::json!({
                            "blame": fault.blame,
                            "detail": fault.detail,
                            "description": fault.description,
                        })
                        .to_string(),
                    ),
                    ..CrashInfo::default()
                },
                fault: Some(fault.clone()),
            },
        };
        let report = report(kind);

        if let Some(refusal) = stale(&job, &token) {
            // Published all the same: the scheduler records and counts it
            // as it does a zombie worker's report.
            self.publish_report(&report).await?;
            tracing::info!(job.id = %id, epoch = token.epoch, code = %refusal.body.code, "stale execution reported");
            return Err(refusal);
        }
        self.renew(&job, &token).await?;
        self.publish_report(&report).await?;

        let deadline = tokio::time::Instant::now() + APPLY_WAIT;
        let last = loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let last = self.get(&id).await?;
            match seen(&last, &token, action) {
                Seen::Applied => break last,
                Seen::Rejected(note) => {
                    return Err(OpError::new(ErrorCode::StaleExecution, note));
                }
                Seen::Pending if tokio::time::Instant::now() >= deadline => {
                    return Ok(StateReply {
                        applied: false,
                        job: last,
                    })
                }
                Seen::Pending => {}
            }
        };
        if switch != Switch::Running {
            if let Some(bot) = executor_bot(lease.as_ref(), &token) {
                self.close_session(&bot, &token.session).await;
            }
        }
        tracing::info!(job.id = %id, epoch = token.epoch, state = %last.state, "external executor switched state");
        Ok(StateReply {
            applied: true,
            job: last,
        })
    }

    /// Heartbeats the executor's session; refuses if it is no longer live
    /// or the fencing service says the lease is not its own any more.
    async fn renew(&self, job: &Job, token: &ExecutionToken) -> Result<(), OpError> {
        let Some(bot) = executor_bot(job.lease.as_ref(), token) else {
            return Err(OpError::new(
                ErrorCode::StaleExecution,
                format!("job {} is no longer this execution's", job.id),
            ));
        };
        let hb = Heartbeat {
            version: MESSAGE_VERSION,
            session: token.session.clone(),
            leases: vec![HeldLease {
                job_id: token.job_id,
                epoch: token.epoch,
            }],
        };
        let reply: SessionReply = self
            .ask(
                &subjects::session_heartbeat_subject(&bot),
                &hb,
                BUS_TIMEOUT,
                "fencing",
            )
            .await?;
        match reply.error {
            Some(e)
                if matches!(
                    e.code,
                    ErrorCode::UnknownSession | ErrorCode::SessionSuperseded
                ) =>
            {
                Err(OpError::new(
                    ErrorCode::SessionExpired,
                    format!(
                        "the execution's session is no longer live ({}): job {} is being \
                         taken back",
                        e.message, job.id
                    ),
                ))
            }
            Some(e) => Err(OpError::unavailable(format!(
                "the fencing service refused the heartbeat: {}",
                e.message
            ))),
            None if reply.cancel.contains(&token.job_id) && job.state == JobState::Running => {
                Err(OpError::new(
                    ErrorCode::StaleExecution,
                    format!("job {} is no longer this execution's", job.id),
                ))
            }
            None => Ok(()),
        }
    }

    async fn publish_report(&self, report: &Report) -> Result<(), OpError> {
        warden_shared::runtime::publish_with_id(
            &self.js,
            subjects::bot_report_subject(&report.bot_id, &report.job_id),
            &report.msg_id(),
            report,
        )
        .await
        .map_err(|e| OpError::unavailable(format!("cannot publish the report: {e}")))
    }

    /// Best effort: an unclosed session expires by its timeout anyway.
    async fn close_session(&self, bot_id: &str, session: &str) {
        let req = CloseSession {
            version: MESSAGE_VERSION,
            session: session.to_string(),
        };
        if let Err(e) = self
            .ask::<SessionReply>(
                &subjects::session_close_subject(bot_id),
                &req,
                BUS_TIMEOUT,
                "fencing",
            )
            .await
        {
            tracing::debug!(%session, error = %e.body.message, "cannot close an executor session");
        }
    }

    /// A request to another service, its reply decoded.
    async fn ask<T: DeserializeOwned>(
        &self,
        subject: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
        who: &str,
    ) -> Result<T, OpError> {
        let payload = serde_json::to_vec(body)
            .map_err(|e| OpError::internal(format!("cannot encode request: {e}")))?;
        let request = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(timeout));
        let msg = self
            .client
            .send_request(subject.to_string(), request)
            .await
            .map_err(|e| OpError::unavailable(format!("the {who} service did not answer: {e}")))?;
        serde_json::from_slice(&msg.payload).map_err(|e| {
            OpError::unavailable(format!(
                "the {who} service answered something unreadable: {e}"
            ))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn token() -> ExecutionToken {
        ExecutionToken {
            job_id: Uuid::new_v4(),
            epoch: 3,
            session: Uuid::new_v4().to_string(),
            secret: lease_secret::generate(),
        }
    }

    #[test]
    fn tokens_round_trip_and_junk_is_refused() {
        let t = token();
        assert_eq!(ExecutionToken::parse(&t.encode()), Ok(t.clone()));
        let s = t.encode();
        for bad in [
            "",
            "w2",
            "w2.a.b.c",
            &s.replace("w2.", "w3."),
            &format!("{s}.extra"),
            &s.replace(".3.", ".0."),
            &s.replace(".3.", ".x."),
            &s.replace(&t.session, "not-a-session"),
            &s.replace(&t.secret, "abc"),
            &s.replace(&t.secret, &"z".repeat(lease_secret::SECRET_LEN)),
        ] {
            assert_eq!(
                ExecutionToken::parse(bad),
                Err(TokenError::Malformed),
                "{bad:?}"
            );
        }
        // The old form, built from what the job shows: refused as such.
        let w1 = format!("w1.{}.{}.{}", t.job_id, t.epoch, t.session);
        assert_eq!(ExecutionToken::parse(&w1), Err(TokenError::Outdated));
    }

    #[test]
    fn only_the_lease_secret_holds_the_attempt() {
        let t = token();
        let mut job = Job::builder("t").id(t.job_id).build();
        job.state = JobState::Running;
        job.attempt = t.epoch;
        job.lease = Some(warden_shared::job::Lease {
            session: t.session.clone(),
            bot_id: "bot".into(),
            resource: None,
            resources: Vec::new(),
            epoch: t.epoch,
            leased_at: Utc::now(),
            started_at: None,
            secret_hash: Some(lease_secret::hash(&t.secret)),
        });
        assert!(holds_secret(&job, &t).is_ok());
        let mut forged = t.clone();
        forged.secret = lease_secret::generate();
        assert_eq!(
            holds_secret(&job, &forged).map_err(|e| e.body.code),
            Err(ErrorCode::InvalidToken)
        );
        // The hash (which the job shows) is not the secret.
        forged.secret = lease_secret::hash(&t.secret);
        assert!(holds_secret(&job, &forged).is_err());
        // A lease without a hash (a worker's from before secrets) is never
        // an executor's.
        if let Some(l) = job.lease.as_mut() {
            l.secret_hash = None;
        }
        assert!(holds_secret(&job, &t).is_err());
        // Another attempt's token claims nothing here: stale() answers it.
        let mut old = t.clone();
        old.epoch = 2;
        assert!(holds_secret(&job, &old).is_ok());
    }

    fn req(state: &str) -> StateRequest {
        StateRequest {
            token: "t".into(),
            state: state.into(),
            ..StateRequest::default()
        }
    }

    #[test]
    fn each_state_takes_its_own_fields_only() {
        assert_eq!(Switch::from_request(&req("running")), Ok(Switch::Running));
        let mut r = req("RUNNING");
        r.outcome = Some("PASSED".into());
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidRequest
        );

        let mut r = req("FINISHED");
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidOutcome
        );
        r.outcome = Some("PASSED".into());
        assert!(matches!(
            Switch::from_request(&r),
            Ok(Switch::Finished { .. })
        ));
        r.outcome = Some("PASS ED".into());
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidOutcome
        );

        let mut r = req("CRASHED");
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidBlame
        );
        r.blame = Some("the-moon".into());
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidBlame
        );
        r.blame = Some("third_party".into());
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidDetail
        );
        r.detail = Some("net work".into());
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidDetail
        );
        r.detail = Some("network".into());
        r.description = Some("x".repeat(MAX_REASON + 1));
        assert_eq!(
            Switch::from_request(&r).unwrap_err().body.code,
            ErrorCode::InvalidRequest
        );
        r.description = Some("mirror timed out".into());
        let Ok(Switch::Crashed { fault }) = Switch::from_request(&r) else {
            panic!("a valid crash refused");
        };
        assert_eq!(fault.blame, Blame::ThirdParty);
        assert_eq!(fault.detail, "network");

        for s in ["SCHEDULED", "CANCELLED", "", "done"] {
            assert_eq!(
                Switch::from_request(&req(s)).unwrap_err().body.code,
                ErrorCode::InvalidState,
                "{s}"
            );
        }
    }
}
