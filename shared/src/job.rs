//! The job record kept in the `warden_jobs` KV bucket (ExecDB's execution).
//!
//! A job's current state *and* its history live in one KV value, so a
//! transition and its history entry are written by a single compare-and-set:
//! there is no window in which one exists without the other.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::{transition, Action, IllegalTransition, JobState};

/// Version of the job record schema written by this build.
pub const JOB_VERSION: u32 = 1;

/// How many history entries a job keeps. Attempts are bounded by the retry
/// policy, but rejected reports from a zombie bot are not, so the oldest
/// rejected-report entries are dropped first and counted in
/// [`Job::history_dropped`].
pub const MAX_HISTORY: usize = 200;

/// Who should act on a crash (docs/design.md "Blame and crash classification").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    System,
    Task,
    ThirdParty,
    Unknown,
}

impl Blame {
    pub const ALL: [Blame; 4] = [
        Blame::System,
        Blame::Task,
        Blame::ThirdParty,
        Blame::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Blame::System => "system",
            Blame::Task => "task",
            Blame::ThirdParty => "third_party",
            Blame::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Blame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A name that is not a [`Blame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown blame {0:?} (expected system, task, third_party or unknown)")]
pub struct UnknownBlame(pub String);

/// The message of an error reply.
impl From<UnknownBlame> for String {
    fn from(e: UnknownBlame) -> String {
        e.to_string()
    }
}

impl std::str::FromStr for Blame {
    type Err = UnknownBlame;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Blame::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| UnknownBlame(s.to_string()))
    }
}

/// Where a job came from when the trigger made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The bus message id (or a content hash for old fedmsg messages without one).
    pub message_id: String,
    /// The subject (topic) the message was published on.
    pub subject: String,
    /// The trigger rule that matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// The lease a running attempt holds: a fencing token. Reports must name
/// the same session and epoch to be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub session: String,
    pub bot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Every resource the attempt runs on (host first); all of them are
    /// suspected when it fails in a way that may be theirs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    pub epoch: u32,
    pub leased_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// SHA-256 of the secret handed to the holder with the grant
    /// ([`crate::lease_secret`]): a report or execution token is the
    /// holder's only if its secret hashes to this. `None` on leases written
    /// before secrets existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
}

impl Lease {
    /// Every resource the attempt runs on (its host alone for older
    /// records).
    pub fn resource_names(&self) -> Vec<String> {
        if self.resources.is_empty() {
            self.resource.iter().cloned().collect()
        } else {
            self.resources.clone()
        }
    }
}

/// What a worker saw when an attempt crashed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub duration_ms: u64,
    /// Bounded tail of the task's combined stdout/stderr.
    #[serde(default)]
    pub log_tail: String,
    /// Content of `$WARDEN_STATUS_FILE`, if the task wrote one (bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_file: Option<String>,
    /// The worker killed the task for running past its time limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Every resource the attempt ran on (host first), recorded by the
    /// scheduler from the lease when it writes the crash, so the crash's
    /// events can be published again after the lease is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
}

/// One entry of a job's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub action: Action,
    /// Attempt (epoch) the entry is about.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<JobState>,
    /// Who did it: a session name, `api`, `trigger`, `scheduler`, a user.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Outcome, blame/detail or a rejection reason, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The execution record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub version: u32,
    pub id: Uuid,
    pub task: String,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    pub pool: String,
    #[serde(default)]
    pub priority: i32,
    pub state: JobState,
    /// Number of the current (or last) attempt; also the lease epoch.
    /// 0 until the first dispatch.
    #[serde(default)]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blame: Option<Blame>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<CrashInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// A delayed retry is not dispatched before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// When the job entered its current SCHEDULED stay (queue age, ordering
    /// among equal priorities). Equal to `created_at` for a first attempt.
    pub queued_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub history_dropped: u32,
    /// Whether the retry policy may retry this job (`false`: it opted out
    /// at submission).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub retry: bool,
    /// The job's own attempt limit, over its task's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The client's idempotency key it was created with, if any: its id is
    /// [`idempotent_job_id`] of it, so a retried create finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The attempt number the current budget started after: attempts used
    /// are `attempt - budget_from`. A person's retry sets it to `attempt`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub budget_from: u32,
    /// Distinct bots whose loss (worker gone, resource broken) ended an
    /// attempt of this job in the current budget: the poison count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_workers: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// What is needed to create a job (the API's create body); ids are
/// assigned by [`Job::new`]. Unknown fields are rejected: a misspelt option
/// silently ignored would create something other than what was asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub task: String,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// `false`: never retry this job automatically, whatever the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<bool>,
    /// Attempts this job may use before it is shelved, over its task's
    /// `retry.max_attempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Makes the create exactly-once: a create with a key already used
    /// returns that job (1 to 200 printable characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl Job {
    /// Is the job RUNNING under a lease of `session` at attempt `epoch`
    /// (the fencing token a worker or an executor holds)?
    pub fn is_held_by(&self, session: &str, epoch: u32) -> bool {
        self.state == JobState::Running
            && self
                .lease
                .as_ref()
                .is_some_and(|l| l.session == session && l.epoch == epoch)
    }

    /// A SCHEDULED job with its creation recorded in the history.
    // Every argument is a field a production caller decides; fixtures,
    // which care about one or two, use [`Job::builder`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Uuid,
        task: String,
        args: BTreeMap<String, String>,
        pool: String,
        priority: i32,
        source: Option<Source>,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Job {
        let mut job = Job {
            version: JOB_VERSION,
            id,
            task,
            args,
            pool,
            priority,
            state: JobState::Scheduled,
            attempt: 0,
            lease: None,
            outcome: None,
            blame: None,
            detail: None,
            description: None,
            crash: None,
            source,
            not_before: None,
            queued_at: now,
            created_at: now,
            updated_at: now,
            history: Vec::new(),
            history_dropped: 0,
            retry: true,
            max_attempts: None,
            idempotency_key: None,
            budget_from: 0,
            lost_workers: Vec::new(),
        };
        job.push_history(HistoryEntry {
            at: now,
            action: Action::Create,
            attempt: 0,
            from: None,
            to: Some(JobState::Scheduled),
            actor: actor.to_string(),
            bot_id: None,
            resource: None,
            note: None,
        });
        job
    }

    /// A [`JobBuilder`] for `task`, with the defaults fixtures want: a
    /// fresh random id, no args, pool `default`, priority 0, no source,
    /// created by `test` now. `build()` is [`Job::new`] with those values.
    pub fn builder(task: impl Into<String>) -> JobBuilder {
        JobBuilder {
            id: Uuid::new_v4(),
            task: task.into(),
            args: BTreeMap::new(),
            pool: "default".to_string(),
            priority: 0,
            source: None,
            actor: "test".to_string(),
            now: Utc::now(),
        }
    }

    /// Appends to the history, dropping the oldest rejected-report entries
    /// (then the oldest entries) once [`MAX_HISTORY`] is reached.
    pub fn push_history(&mut self, entry: HistoryEntry) {
        if self.history.len() >= MAX_HISTORY {
            let victim = self
                .history
                .iter()
                .position(|e| e.action == Action::RejectReport)
                .unwrap_or(1.min(self.history.len().saturating_sub(1)));
            self.history.remove(victim);
            self.history_dropped += 1;
        }
        self.history.push(entry);
    }

    /// A person's retry: a SHELVED, CRASHED or CANCELLED job goes back to
    /// SCHEDULED at once with a fresh attempt budget and poison count. The
    /// last failure's blame and detail stay until the next dispatch.
    pub fn retry_by(&mut self, actor: &str, now: DateTime<Utc>) -> Result<(), IllegalTransition> {
        let from = self.state;
        let to = transition(from, Action::Retry)?;
        self.state = to;
        self.lease = None;
        self.not_before = None;
        self.queued_at = now;
        self.updated_at = now;
        self.budget_from = self.attempt;
        self.lost_workers.clear();
        self.push_history(HistoryEntry {
            at: now,
            action: Action::Retry,
            attempt: self.attempt,
            from: Some(from),
            to: Some(to),
            actor: actor.to_string(),
            bot_id: None,
            resource: None,
            note: Some("retried by hand with a fresh attempt budget".into()),
        });
        Ok(())
    }

    /// Stops a SCHEDULED or RUNNING job. A running attempt keeps its lease
    /// on the record so its worker is told to stop (at its next heartbeat)
    /// and its late report is recognised as the cancelled attempt's.
    pub fn cancel_by(
        &mut self,
        actor: &str,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), IllegalTransition> {
        let from = self.state;
        let to = transition(from, Action::Cancel)?;
        self.state = to;
        self.not_before = None;
        self.updated_at = now;
        let bot_id = self.lease.as_ref().map(|l| l.bot_id.clone());
        self.push_history(HistoryEntry {
            at: now,
            action: Action::Cancel,
            attempt: self.attempt,
            from: Some(from),
            to: Some(to),
            actor: actor.to_string(),
            bot_id: if from == JobState::Running {
                bot_id
            } else {
                None
            },
            resource: None,
            note: reason.map(str::to_string),
        });
        Ok(())
    }

    pub fn key(&self) -> String {
        self.id.to_string()
    }

    /// The compact view used in listings.
    /// `blame/detail` as history notes and the console write it
    /// (`unknown/unclassified` where either is missing).
    pub fn blame_detail(&self) -> String {
        format!(
            "{}/{}",
            self.blame.map(Blame::as_str).unwrap_or("unknown"),
            self.detail.as_deref().unwrap_or("unclassified")
        )
    }

    pub fn summary(&self) -> JobSummary {
        JobSummary {
            id: self.id,
            task: self.task.clone(),
            pool: self.pool.clone(),
            state: self.state,
            priority: self.priority,
            attempt: self.attempt,
            outcome: self.outcome.clone(),
            blame: self.blame,
            detail: self.detail.clone(),
            bot_id: self.lease.as_ref().map(|l| l.bot_id.clone()),
            source_message_id: self.source.as_ref().map(|s| s.message_id.clone()),
            not_before: self.not_before,
            queued_at: self.queued_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A job without its history and arguments, as listed by search.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: Uuid,
    pub task: String,
    pub pool: String,
    pub state: JobState,
    pub priority: i32,
    pub attempt: u32,
    pub outcome: Option<String>,
    pub blame: Option<Blame>,
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_message_id: Option<String>,
    /// SCHEDULED for a delayed retry: not dispatched before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// When it last entered the queue (creation, retry or requeue).
    pub queued_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Namespace for job ids derived from bus messages (UUID v5).
const TRIGGER_NAMESPACE: Uuid = Uuid::from_u128(0x5f1c_9a4e_7d2b_4c8a_9e31_0b6d_2f48_a7c3);

/// The job id for `task` triggered by bus message `message_id`: the same
/// message and task always give the same id, so a redelivered or
/// re-published message can never create a second job.
pub fn derived_job_id(message_id: &str, task: &str) -> Uuid {
    let mut name = Vec::with_capacity(message_id.len() + task.len() + 1);
    name.extend_from_slice(message_id.as_bytes());
    name.push(0);
    name.extend_from_slice(task.as_bytes());
    Uuid::new_v5(&TRIGGER_NAMESPACE, &name)
}

/// Longest idempotency key a create accepts, in characters.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Is `key` a valid idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`]
/// characters, none of them a control character?
pub fn valid_idempotency_key(key: &str) -> bool {
    let n = key.chars().count();
    (1..=MAX_IDEMPOTENCY_KEY).contains(&n) && !key.chars().any(char::is_control)
}

/// Namespace of [`idempotent_job_id`]: not the trigger's, so a client's key
/// can never name a triggered job.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x8b0e_43d1_26c9_4f57_a1d8_7e35_c94b_0f62);

/// The job id for a create with idempotency key `key`: the same key always
/// gives the same id, so a retried create finds the first job.
pub fn idempotent_job_id(key: &str) -> Uuid {
    Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes())
}

/// Named arguments for [`Job::new`] (see [`Job::builder`]): every field
/// has a default, so a fixture says only what matters to it.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build()`"]
pub struct JobBuilder {
    id: Uuid,
    task: String,
    args: BTreeMap<String, String>,
    pool: String,
    priority: i32,
    source: Option<Source>,
    actor: String,
    now: DateTime<Utc>,
}

impl JobBuilder {
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// One argument (added to those already set).
    pub fn arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.args.insert(key.into(), value.into());
        self
    }

    /// All arguments (replacing those already set).
    pub fn args(mut self, args: BTreeMap<String, String>) -> Self {
        self.args = args;
        self
    }

    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = pool.into();
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn source(mut self, source: Source) -> Self {
        self.source = Some(source);
        self
    }

    /// Who created it (the `create` history entry's actor).
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// When it was created (queued, updated).
    pub fn at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }

    pub fn build(self) -> Job {
        Job::new(
            self.id,
            self.task,
            self.args,
            self.pool,
            self.priority,
            self.source,
            &self.actor,
            self.now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_ids_are_stable_and_never_a_trigger_id() {
        let a = idempotent_job_id("ci-1234");
        assert_eq!(a, idempotent_job_id("ci-1234"));
        assert_ne!(a, idempotent_job_id("ci-1235"));
        // The trigger's id of the same bytes (message id, no task) differs.
        let mut name = b"ci-1234".to_vec();
        name.push(0);
        assert_ne!(a, Uuid::new_v5(&TRIGGER_NAMESPACE, &name));
        assert_ne!(a, Uuid::new_v5(&TRIGGER_NAMESPACE, b"ci-1234"));
        assert!(valid_idempotency_key("ci-1234 é"));
        assert!(valid_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY)));
        assert!(!valid_idempotency_key(""));
        assert!(!valid_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY + 1)));
        assert!(!valid_idempotency_key("a\nb"));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_job_id("2015-6395fb7a", "rpmlint");
        assert_eq!(a, derived_job_id("2015-6395fb7a", "rpmlint"));
        assert_ne!(a, derived_job_id("2015-6395fb7a", "abicheck"));
        assert_ne!(a, derived_job_id("2015-6395fb7b", "rpmlint"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(derived_job_id("ab", "c"), derived_job_id("a", "bc"));
    }

    #[test]
    fn the_builder_is_job_new_with_named_arguments_and_defaults() {
        let now = Utc::now();
        let id = Uuid::new_v4();
        let source = Source {
            message_id: "m1".into(),
            subject: "org.fedoraproject.prod.buildsys.build.state.change".into(),
            rule: Some("koji".into()),
        };
        let built = Job::builder("rpmlint")
            .id(id)
            .arg("nvr", "a-1-1")
            .arg("owner", "me")
            .pool("builders")
            .priority(-3)
            .source(source.clone())
            .actor("trigger")
            .at(now)
            .build();
        let by_hand = Job::new(
            id,
            "rpmlint".into(),
            BTreeMap::from([
                ("nvr".to_string(), "a-1-1".to_string()),
                ("owner".to_string(), "me".to_string()),
            ]),
            "builders".into(),
            -3,
            Some(source),
            "trigger",
            now,
        );
        assert_eq!(built, by_hand);

        let d = Job::builder("noop").build();
        assert_eq!(d.task, "noop");
        assert_eq!(d.pool, "default");
        assert_eq!(d.priority, 0);
        assert!(d.args.is_empty() && d.source.is_none());
        assert_eq!(d.state, JobState::Scheduled);
        assert_eq!(d.history.len(), 1);
        assert_eq!(d.history[0].actor, "test");
        assert_eq!(d.history[0].action, Action::Create);
        assert_eq!(d.created_at, d.history[0].at);
        assert_ne!(d.id, Job::builder("noop").build().id, "a fresh id each");
        // `args` replaces, `arg` adds.
        let a = Job::builder("t")
            .arg("x", "1")
            .args(BTreeMap::from([("y".to_string(), "2".to_string())]))
            .arg("z", "3")
            .build();
        assert_eq!(a.args.keys().collect::<Vec<_>>(), ["y", "z"]);
    }

    #[test]
    fn job_round_trips_through_json_with_screaming_states() {
        let now = Utc::now();
        let job = Job::builder("noop")
            .arg("seconds", "1")
            .priority(5)
            .actor("api")
            .at(now)
            .build();
        let text = serde_json::to_string(&job).expect("serialize");
        assert!(text.contains("\"state\":\"SCHEDULED\""), "{text}");
        let back: Job = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, job);
        assert_eq!(back.history.len(), 1);
    }

    #[test]
    fn history_is_bounded_and_drops_rejections_first() {
        let now = Utc::now();
        let mut job = Job::builder("t").pool("p").actor("api").at(now).build();
        for i in 0..(MAX_HISTORY as u32 + 50) {
            job.push_history(HistoryEntry {
                at: now,
                action: if i % 2 == 0 {
                    Action::RejectReport
                } else {
                    Action::Start
                },
                attempt: i,
                from: None,
                to: None,
                actor: "x".into(),
                bot_id: None,
                resource: None,
                note: None,
            });
        }
        assert_eq!(job.history.len(), MAX_HISTORY);
        assert_eq!(job.history_dropped, 51); // 1 creation + 250 pushes - 200 kept
                                             // The creation entry survives: only rejected reports were dropped.
        assert_eq!(job.history[0].action, Action::Create);
    }

    #[test]
    fn held_only_by_the_leasing_session_at_its_epoch_while_running() {
        let now = Utc::now();
        let mut j = Job::builder("t").pool("p").actor("api").at(now).build();
        assert!(!j.is_held_by("s1", 0), "no lease");
        j.state = JobState::Running;
        j.attempt = 2;
        j.lease = Some(Lease {
            session: "s1".into(),
            bot_id: "b".into(),
            resource: None,
            resources: Vec::new(),
            epoch: 2,
            leased_at: now,
            started_at: None,
            secret_hash: None,
        });
        assert!(j.is_held_by("s1", 2));
        assert!(!j.is_held_by("s1", 1), "an older attempt");
        assert!(!j.is_held_by("s2", 2), "another session");
        j.state = JobState::Cancelled;
        assert!(!j.is_held_by("s1", 2), "not running any more");
    }

    #[test]
    fn retry_by_hand_gives_a_fresh_budget_and_cancel_keeps_the_lease() {
        let now = Utc::now();
        let mut j = Job::builder("t").pool("p").actor("api").at(now).build();
        assert!(
            j.retry_by("alice", now).is_err(),
            "a SCHEDULED job is not retried"
        );
        j.state = JobState::Shelved;
        j.attempt = 4;
        j.lost_workers = vec!["a".into(), "b".into()];
        j.not_before = Some(now);
        j.retry_by("alice", now).expect("shelved jobs retry");
        assert_eq!(
            (j.state, j.budget_from, j.lost_workers.len(), j.not_before),
            (JobState::Scheduled, 4, 0, None)
        );
        j.cancel_by("bob", Some("not needed"), now).expect("cancel");
        assert_eq!(j.state, JobState::Cancelled);
        let last = j.history.last().expect("entry");
        assert_eq!(
            (last.action, last.actor.as_str(), last.note.as_deref()),
            (Action::Cancel, "bob", Some("not needed"))
        );
        assert!(j.cancel_by("bob", None, now).is_err(), "cancelled twice");
    }

    #[test]
    fn old_records_read_with_retry_on() {
        let now = Utc::now();
        let j = Job::builder("t").pool("p").actor("api").at(now).build();
        let text = serde_json::to_string(&j).expect("json");
        assert!(
            !text.contains("\"retry\""),
            "defaults are not written: {text}"
        );
        let back: Job = serde_json::from_str(&text).expect("parse");
        assert!(back.retry);
    }

    #[test]
    fn blame_parses_its_own_spelling() {
        for b in Blame::ALL {
            assert_eq!(b.as_str().parse::<Blame>(), Ok(b));
        }
        assert!("operator".parse::<Blame>().is_err());
    }
}
