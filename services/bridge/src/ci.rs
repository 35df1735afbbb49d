//! CI messages out: job state changes as Fedora CI messages (the
//! `ci-messages` spec, version [`SPEC_VERSION`]), for ResultsDB,
//! dashboards and gating.
//!
//! This module decides, purely: which message a job revision calls for
//! ([`message_for`]), what it says, and whether it is still news
//! ([`should_publish`]). [`out`] moves the messages: job revisions in from
//! the jobs bucket's stream, CI messages out to AMQP.
//!
//! # Which job change becomes which message
//!
//! | job state                             | CI message |
//! |---------------------------------------|------------|
//! | SCHEDULED (creation, each retry)      | `queued`   |
//! | RUNNING                               | `running`  |
//! | FINISHED                              | `complete` with the outcome as `test.result` |
//! | CRASHED (not to be retried), SHELVED, CANCELLED | `error` with state, blame and detail |
//!
//! A crash the retry policy retries publishes nothing: Warden writes the
//! policy's answer in the same compare-and-set as the crash, so such a job
//! is never seen CRASHED, but SCHEDULED again (with `not_before`), and
//! that revision is the next attempt's `queued`. A CRASHED record the
//! policy *would* retry (one written by anything that skipped the policy)
//! is skipped too, as `retry_pending`: its next revision says what came of
//! it. Only a CRASHED record the policy leaves alone (not retryable, or
//! the job opted out of retries) is an `error`.
//!
//! # Order and repeats
//!
//! The same state is written many times (a RUNNING job's lease and
//! heartbeat updates), and two bridge replicas may handle revisions of one
//! job out of order. Each message has a [`Marker`]: (attempt, when the job
//! was last queued, status rank), rank queued < running < complete =
//! error. A job's marker only grows along its life: a dispatch raises the
//! attempt, a retry (by the policy or a person) raises `queued_at`, a state
//! change within one stay raises the rank. The last published marker of
//! every job is kept ([`CI_PUBLISHED_BUCKET`]); a message is published only
//! if its marker is greater, so each (attempt, stay, status) is published
//! at most once per marker write, and never a stale one after a newer.
//! `queued_at` comes from the clock of the replica that requeued the job:
//! a retry written with a clock behind the previous queueing's (skew
//! between hosts) publishes no `queued` for that stay; its `running`
//! (a new attempt) still follows.
//!
//! # What may be missed
//!
//! The jobs bucket keeps one revision per job. A revision superseded
//! before any publisher pulled it (every bridge down, or far behind) is
//! gone: then only the job's latest state is published. A job's last word
//! (`complete` or `error`, the spec's mandatory messages) is its latest
//! revision and so is always seen; `queued` and `running` (optional) may
//! be skipped. Jobs written before the publisher's consumer first existed
//! publish nothing (no flood of history on a first start).
//!
//! [`CI_PUBLISHED_BUCKET`]: warden_shared::subjects::CI_PUBLISHED_BUCKET

pub mod out;

pub use out::run;

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;
use warden_shared::amqp::{ci_required_artifact_fields, CiMessagesConfig, CiTask};
use warden_shared::job::Job;
use warden_shared::retry::{self, Fate, RetryPolicy};
use warden_shared::template::Template;
use warden_shared::JobState;

/// The `ci-messages` spec version the bodies follow.
pub const SPEC_VERSION: &str = "0.2.5";
/// `fedora_messaging_schema`: the `ci-messages` package's fedora-messaging
/// schema class, so a consumer with that package validates the body.
pub const SCHEMA: &str = "ci_messages.CIMessageV1";
/// `fedora_messaging_schema_package`: the Python distribution of
/// [`SCHEMA`], as fedora-messaging spells it (normalised, underscores).
pub const SCHEMA_PACKAGE: &str = "ci_messages";
/// `fedora_messaging_severity`: fedora-messaging's INFO.
pub const SEVERITY_INFO: i64 = 20;
/// Where the API shows one job (`GET /api/v1/jobs/{id}`): `run.url` and
/// `run.log` (the job's record holds its timeline and the crash's log
/// tail).
pub const API_JOB_PATH: &str = "/api/v1/jobs/";
/// `test.output` is "limited in length, say 500 chars or less".
pub const MAX_OUTPUT_CHARS: usize = 500;

/// A CI message's status: the last word of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CiStatus {
    Queued,
    Running,
    Complete,
    Error,
}

impl CiStatus {
    pub const ALL: [CiStatus; 4] = [
        CiStatus::Queued,
        CiStatus::Running,
        CiStatus::Complete,
        CiStatus::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CiStatus::Queued => "queued",
            CiStatus::Running => "running",
            CiStatus::Complete => "complete",
            CiStatus::Error => "error",
        }
    }

    /// Order within one attempt: queued < running < complete = error.
    pub fn rank(self) -> u8 {
        match self {
            CiStatus::Queued => 0,
            CiStatus::Running => 1,
            CiStatus::Complete | CiStatus::Error => 2,
        }
    }
}

/// What was published for a job, and the ordering key of a candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub attempt: u32,
    pub queued_at: DateTime<Utc>,
    pub status: CiStatus,
}

impl Marker {
    fn key(&self) -> (u32, DateTime<Utc>, u8) {
        (self.attempt, self.queued_at, self.status.rank())
    }
}

/// Whether `next` is news after `last` (the marker of what was published
/// for the job, if anything): only a strictly greater marker is.
pub fn should_publish(last: Option<&Marker>, next: &Marker) -> bool {
    last.is_none_or(|l| next.key() > l.key())
}

/// Why a job revision published no CI message
/// (`warden_bridge_ci_messages_skipped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Its task is not in `amqp.ci_messages.tasks`.
    TaskNotPublished,
    /// The job's args cannot fill a field the artifact type requires.
    IncompleteArtifact,
    /// A field the schema types (a numeric id, a boolean) is not of that
    /// type in the job's args.
    InvalidArtifact,
    /// CRASHED, and the retry policy would retry it.
    RetryPending,
    /// The job's marker says this message (or a later one) was published.
    AlreadyPublished,
    /// The revision is not a job record.
    Undecodable,
    /// The job was deleted or purged from the bucket.
    Deleted,
}

impl Skip {
    pub const REASONS: [&'static str; 7] = [
        "task_not_published",
        "incomplete_artifact",
        "invalid_artifact",
        "retry_pending",
        "already_published",
        "undecodable",
        "deleted",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::TaskNotPublished => Self::REASONS[0],
            Skip::IncompleteArtifact => Self::REASONS[1],
            Skip::InvalidArtifact => Self::REASONS[2],
            Skip::RetryPending => Self::REASONS[3],
            Skip::AlreadyPublished => Self::REASONS[4],
            Skip::Undecodable => Self::REASONS[5],
            Skip::Deleted => Self::REASONS[6],
        }
    }
}

/// One CI message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct CiMessage {
    /// The routing key.
    pub topic: String,
    pub status: CiStatus,
    pub marker: Marker,
    pub body: Value,
}

/// Whether the retry policy would retry this CRASHED job (false for any
/// other state).
pub fn will_retry(job: &Job, policy: &RetryPolicy, now: DateTime<Utc>) -> bool {
    if job.state != JobState::Crashed {
        return false;
    }
    let mut probe = job.clone();
    retry::after_crash(&mut probe, policy, now) == Fate::Retried
}

/// The status a job in its current state calls for (see the module's
/// table); `None` for a CRASHED job that will be retried.
pub fn status_of(job: &Job, will_retry: bool) -> Option<CiStatus> {
    Some(match job.state {
        JobState::Scheduled => CiStatus::Queued,
        JobState::Running => CiStatus::Running,
        JobState::Finished => CiStatus::Complete,
        JobState::Crashed if will_retry => return None,
        JobState::Crashed | JobState::Shelved | JobState::Cancelled => CiStatus::Error,
    })
}

/// The topic of `status` for artifact type `artifact`.
pub fn topic(ci: &CiMessagesConfig, artifact: &str, status: CiStatus) -> String {
    format!(
        "{}.{}.{artifact}.test.{}",
        ci.topic_prefix.trim_end_matches('.'),
        ci.namespace,
        status.as_str()
    )
}

/// The API's page of job `id`.
pub fn job_url(ci: &CiMessagesConfig, id: &Uuid) -> String {
    format!(
        "{}{API_JOB_PATH}{id}",
        ci.api_url.trim().trim_end_matches('/')
    )
}

/// A value of an artifact field as the schema types it: koji/brew `id` an
/// integer, `scratch` a boolean, everything else the string as rendered.
fn typed(artifact: &str, field: &str, value: String) -> Result<Value, Skip> {
    match (artifact, field) {
        ("koji-build" | "brew-build", "id") => value
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| Skip::InvalidArtifact),
        ("koji-build" | "brew-build", "scratch") => match value.trim() {
            "true" | "True" | "TRUE" | "1" => Ok(Value::Bool(true)),
            "false" | "False" | "FALSE" | "0" => Ok(Value::Bool(false)),
            _ => Err(Skip::InvalidArtifact),
        },
        _ => Ok(Value::String(value)),
    }
}

/// The `artifact` object of a job of `task`: `type` from the task, each
/// `artifact_args` template rendered over the job's args and typed. A
/// required field that cannot be rendered (or renders empty) is
/// [`Skip::IncompleteArtifact`]; an optional one that cannot is left out.
pub fn artifact(task: &CiTask, args: &BTreeMap<String, String>) -> Result<Value, Skip> {
    let required = ci_required_artifact_fields(&task.artifact);
    let over: Map<String, Value> = args
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let over = Value::Object(over);
    let mut a = Map::new();
    a.insert("type".into(), Value::String(task.artifact.clone()));
    for (field, text) in &task.artifact_args {
        let rendered = Template::parse(text)
            .ok()
            .and_then(|t| t.render(&over).ok())
            .filter(|s| !s.trim().is_empty());
        match rendered {
            Some(s) => {
                a.insert(field.clone(), typed(&task.artifact, field, s)?);
            }
            None if required.contains(&field.as_str()) => return Err(Skip::IncompleteArtifact),
            None => {}
        }
    }
    if required.iter().any(|f| !a.contains_key(*f)) {
        return Err(Skip::IncompleteArtifact);
    }
    Ok(Value::Object(a))
}

/// `test.result` of a FINISHED job's outcome: the ResultsDB outcomes
/// (`passed`, `failed`, `info`, `needs_inspection`, `not_applicable`, any
/// case) as they are, anything else `needs_inspection`.
pub fn result_of(outcome: Option<&str>) -> &'static str {
    const KNOWN: [&str; 5] = [
        "passed",
        "failed",
        "info",
        "needs_inspection",
        "not_applicable",
    ];
    outcome
        .and_then(|o| KNOWN.into_iter().find(|k| k.eq_ignore_ascii_case(o.trim())))
        .unwrap_or("needs_inspection")
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// `error.reason`: "crashed (blame: system, detail: oom): <description>";
/// a cancel says its reason, as given.
pub fn error_reason(job: &Job) -> String {
    let state = job.state.as_str().to_lowercase();
    if job.state == JobState::Cancelled {
        let why = job
            .history
            .iter()
            .rev()
            .find(|e| e.to == Some(JobState::Cancelled))
            .and_then(|e| e.note.clone());
        return match why {
            Some(w) => truncate(&format!("{state}: {w}"), MAX_OUTPUT_CHARS),
            None => state,
        };
    }
    let mut r = state;
    let blame = job.blame.map(|b| b.as_str());
    match (blame, job.detail.as_deref()) {
        (Some(b), Some(d)) => r.push_str(&format!(" (blame: {b}, detail: {d})")),
        (Some(b), None) => r.push_str(&format!(" (blame: {b})")),
        (None, Some(d)) => r.push_str(&format!(" (detail: {d})")),
        (None, None) => {}
    }
    if let Some(d) = job.description.as_deref().filter(|d| !d.is_empty()) {
        r.push_str(": ");
        r.push_str(d);
    }
    truncate(&r, MAX_OUTPUT_CHARS)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The CI message job revision `job` calls for, or why none.
pub fn message_for(
    job: &Job,
    ci: &CiMessagesConfig,
    will_retry: bool,
    now: DateTime<Utc>,
) -> Result<CiMessage, Skip> {
    let task = ci.tasks.get(&job.task).ok_or(Skip::TaskNotPublished)?;
    let status = status_of(job, will_retry).ok_or(Skip::RetryPending)?;
    let artifact = artifact(task, &job.args)?;
    let url = job_url(ci, &job.id);
    let mut test = json!({
        "category": task.category,
        "namespace": ci.namespace,
        "type": task.test_type.clone().unwrap_or_else(|| job.task.clone()),
    });
    let mut body = json!({
        "contact": ci.contact,
        "run": { "url": url, "log": url },
        "artifact": artifact,
        "pipeline": { "id": job.id.to_string(), "name": job.task },
        "generated_at": rfc3339(now),
        "version": SPEC_VERSION,
    });
    match status {
        CiStatus::Complete => {
            let outcome = job.outcome.as_deref();
            test["result"] = json!(result_of(outcome));
            if let Some(l) = &job.lease {
                let started = l.started_at.unwrap_or(l.leased_at);
                let ms = (job.updated_at - started).num_milliseconds();
                if ms >= 0 {
                    test["runtime"] = json!(ms as f64 / 1000.0);
                }
            }
            let mut output = format!("outcome {}", outcome.unwrap_or("none"));
            if let Some(d) = job.description.as_deref().filter(|d| !d.is_empty()) {
                output.push_str(": ");
                output.push_str(d);
            }
            test["output"] = json!(truncate(&output, MAX_OUTPUT_CHARS));
            body["system"] = json!([]);
        }
        CiStatus::Error => {
            body["error"] = json!({ "reason": error_reason(job) });
        }
        CiStatus::Queued | CiStatus::Running => {}
    }
    body["test"] = test;
    Ok(CiMessage {
        topic: topic(ci, &task.artifact, status),
        status,
        marker: Marker {
            attempt: job.attempt,
            queued_at: job.queued_at,
            status,
        },
        body,
    })
}

#[cfg(test)]
mod tests;
