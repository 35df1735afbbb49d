//! Every subject, stream, KV bucket and durable consumer name, spelled once.
//!
//! **Architecture Invariant**: no other module writes a subject or stream
//! name as a literal; they call into this module.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use thiserror::Error;
use uuid::Uuid;

/// Stream the trigger consumes: bus events from bridges and publishers.
pub const EVENTS_STREAM: &str = "WARDEN_EVENTS";
/// Events nobody could use, with the reason.
pub const DEADLETTER_STREAM: &str = "WARDEN_DEADLETTER";
pub const DEADLETTER_PREFIX: &str = "warden.deadletter";
/// Worker reports about attempts (work-queue retention: gone once applied).
pub const REPORTS_STREAM: &str = "WARDEN_REPORTS";
pub const REPORTS_PREFIX: &str = "warden.report";

/// Current state of every job (value: [`crate::job::Job`] as JSON).
pub const JOBS_BUCKET: &str = "warden_jobs";
/// Bot sessions, keyed by session name, plus `bot.<bot_id>` → current name.
pub const SESSIONS_BUCKET: &str = "warden_sessions";
/// The stream JetStream keeps a key-value `bucket` in.
/// [`kv_stream`] of [`JOBS_BUCKET`], for what needs a `&'static str`.
pub const JOBS_STREAM: &str = "KV_warden_jobs";

pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}
/// Resources and their health (value: [`crate::resource::Resource`]).
pub const RESOURCES_BUCKET: &str = "warden_resources";
/// The bot registry, written by `warden bot add`: key = the bot's token
/// ([`bot_token`]), value: [`crate::bots::BotRecord`].
pub const BOTS_BUCKET: &str = "warden_bots";

/// What the CI-messages publisher (`warden bridge amqp`,
/// `[amqp.ci_messages]`) last published per job: key = job id, value = the
/// ordering key of that message. Created by the publisher itself, so only
/// deployments that publish CI messages have it.
pub const CI_PUBLISHED_BUCKET: &str = "warden_ci_published";

/// Durable consumer names.
pub const TRIGGER_CONSUMER: &str = "warden-trigger";
/// The CI-messages publishers' shared durable consumer on the jobs
/// bucket's stream (every bridge replica pulls from it).
pub const CI_MESSAGES_CONSUMER: &str = "warden-bridge-ci-messages";
pub const SCHEDULER_REPORTS_CONSUMER: &str = "warden-scheduler-reports";
/// The recorders' shared durable consumer on the jobs bucket's stream.
pub const RECORDER_CONSUMER: &str = "warden-recorder";

/// The header JetStream puts on a key-value delete (`DEL`) or purge
/// (`PURGE`) marker.
pub const KV_OPERATION_HEADER: &str = "KV-Operation";

/// Whether a message of a bucket's stream is a delete or purge marker
/// rather than a value.
pub fn is_kv_removal(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get(KV_OPERATION_HEADER))
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}
pub const HEALTH_SUSPECTS_CONSUMER: &str = "warden-health-suspects";

/// Worker → scheduler: long-poll for leases (queue group across replicas).
pub const ACQUIRE: &str = "warden.sched.acquire";
pub const SCHEDULER_QUEUE_GROUP: &str = "warden-scheduler";
/// Scheduler (async-nats service API): a snapshot of its queue per pool
/// ([`crate::messages::QueueReply`]), for `warden check queue-age`. Any
/// replica answers: each holds the whole queue.
pub const SCHEDULER_SERVICE: &str = "warden-scheduler";
pub const SCHED_QUEUE: &str = "warden.sched.queue";

/// Fencing service (async-nats service API).
pub const FENCING_SERVICE: &str = "warden-fencing";
pub const SESSION_GROUP: &str = "warden.session";
pub const SESSION_CREATE: &str = "warden.session.create";
pub const SESSION_HEARTBEAT: &str = "warden.session.heartbeat";
pub const SESSION_CLOSE: &str = "warden.session.close";
/// API service → fencing: create an external executor's session
/// (`warden.session.executor.create.<bot>`). Only the services' user may
/// publish here (a bot may publish only on its own subjects); such a bot
/// id has no NATS user of its own and must not be a registered bot's.
pub const SESSION_EXECUTOR_CREATE: &str = "warden.session.executor.create";

/// API service over NATS (the same operations as HTTP).
pub const API_SERVICE: &str = "warden-api";
pub const API_GROUP: &str = "warden.api";
pub const API_JOB_CREATE: &str = "warden.api.job.create";
pub const API_JOB_GET: &str = "warden.api.job.get";
pub const API_JOB_LIST: &str = "warden.api.job.list";
pub const API_JOB_RETRY: &str = "warden.api.job.retry";
pub const API_JOB_CANCEL: &str = "warden.api.job.cancel";
pub const API_STATS: &str = "warden.api.stats";
/// An external executor takes a job (a session and a lease for it).
pub const API_EXECUTION_TAKE: &str = "warden.api.execution.take";
/// An external executor switches its job's state with its execution token.
pub const API_JOB_STATE: &str = "warden.api.job.state";
pub const API_BOTS: &str = "warden.api.bots";
pub const API_RESOURCES: &str = "warden.api.resources";

/// Crash classifier (async-nats service API; replicas share the queue
/// group the service API gives every endpoint).
pub const CLASSIFIER_SERVICE: &str = "warden-classifier";
pub const CLASSIFY: &str = "warden.classify";

/// Notifications for operators and task owners: `warden.notify.<party>`,
/// kept in [`NOTIFY_STREAM`] for whatever delivers them (mail, chat).
pub const NOTIFY_PREFIX: &str = "warden.notify";
pub const NOTIFY_STREAM: &str = "WARDEN_NOTIFY";
/// Resources an attempt's failure may be the fault of:
/// `warden.resource.suspect.<resource>`, kept in [`NOTIFY_STREAM`] too.
pub const SUSPECT_PREFIX: &str = "warden.resource.suspect";

/// Resources recycled (broken or closed): `warden.resource.recycle.<r>`,
/// kept in [`NOTIFY_STREAM`] for a provisioner (`warden recycle-hook`).
pub const RECYCLE_PREFIX: &str = "warden.resource.recycle";
/// The durable consumer `warden recycle-hook` uses unless told otherwise.
pub const RECYCLE_HOOK_CONSUMER: &str = "warden-recycle-hook";

/// Health service (async-nats service API): operators' checks and closes.
pub const HEALTH_SERVICE: &str = "warden-health";
pub const HEALTH_GROUP: &str = "warden.health";
pub const HEALTH_CHECK: &str = "warden.health.check";
pub const HEALTH_CLOSE: &str = "warden.health.close";

/// NATS service API discovery (async-nats `service`): every service
/// instance answers a request here with its name and id.
pub const SERVICE_PING: &str = "$SRV.PING";

/// Subjects every default events stream listens on besides configured ones:
/// what `warden publish` and webhooks use when no bridge topic applies.
pub const LOCAL_EVENTS: &str = "warden.events.>";

/// NATS subject matching: `*` is one token, `>` one or more trailing ones.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Headers the AMQP bridge (`warden bridge amqp`) sets on every event it
/// publishes: [`HEADER_EVENT_SOURCE`] = [`EVENT_SOURCE_AMQP`] says the
/// payload is the bus message's body alone (fedora-messaging puts the id
/// and headers in AMQP properties, not in the body), its id is the
/// `Nats-Msg-Id` header and its topic (the routing key as sent) is
/// [`HEADER_EVENT_TOPIC`].
pub const HEADER_EVENT_SOURCE: &str = "Warden-Event-Source";
pub const EVENT_SOURCE_AMQP: &str = "amqp";
pub const HEADER_EVENT_TOPIC: &str = "Warden-Topic";
/// The exchange the bridged message was published to.
pub const HEADER_AMQP_EXCHANGE: &str = "Warden-Amqp-Exchange";
/// The AMQP `content_type` / `content_encoding` / `timestamp` properties.
pub const HEADER_AMQP_CONTENT_TYPE: &str = "Warden-Amqp-Content-Type";
pub const HEADER_AMQP_CONTENT_ENCODING: &str = "Warden-Amqp-Content-Encoding";
pub const HEADER_AMQP_TIMESTAMP: &str = "Warden-Amqp-Timestamp";

/// The subject reports used before bot identity (`warden.report.<job>`):
/// the scheduler refuses reports on it (nothing proves who sent them).
pub fn report_subject(job_id: &Uuid) -> String {
    format!("{REPORTS_PREFIX}.{job_id}")
}

pub fn notify_subject(party: crate::messages::Party) -> String {
    format!("{NOTIFY_PREFIX}.{}", party.as_str())
}

/// A resource name as one subject token (dots and wildcards replaced).
fn subject_token(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' | '*' | '>' | ' ' | '\t' | '\r' | '\n' => '_',
            c => c,
        })
        .collect()
}

pub fn suspect_subject(resource: &str) -> String {
    format!("{SUSPECT_PREFIX}.{}", subject_token(resource))
}

pub fn recycle_subject(resource: &str) -> String {
    format!("{RECYCLE_PREFIX}.{}", subject_token(resource))
}

/// Where the health service asks a bot's agent to check its resources.
pub fn agent_check_subject(bot_id: &str) -> String {
    format!("warden.agent.{}.check", hex_token(bot_id))
}

/// Free text as a key or subject token: lowercase hex of its bytes.
pub fn hex_token(s: &str) -> String {
    let mut k = String::with_capacity(s.len() * 2);
    for b in s.as_bytes() {
        k.push_str(&format!("{b:02x}"));
    }
    k
}

/// Text back from [`hex_token`]; `None` if `token` is not one.
pub fn from_hex_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.is_empty() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

// --- Subjects that carry the bot id ----------------------------------
//
// A bot's identity is its NATS user: each bot has its own user whose
// permissions name only subjects that carry its own bot token (its id in
// hex, [`bot_token`]); the services read the bot id off the subject, never
// from the body. [`bot_permissions`] is that permission set, spelled once.

/// A bot id as the one subject token its permissions are written on.
pub fn bot_token(bot_id: &str) -> String {
    hex_token(bot_id)
}

/// Bot → fencing: create a session (`warden.session.create.<bot>`).
pub fn session_create_subject(bot_id: &str) -> String {
    format!("{SESSION_CREATE}.{}", bot_token(bot_id))
}
/// Bot → fencing: heartbeat (`warden.session.heartbeat.<bot>`).
pub fn session_heartbeat_subject(bot_id: &str) -> String {
    format!("{SESSION_HEARTBEAT}.{}", bot_token(bot_id))
}
/// Bot → fencing: close its session (`warden.session.close.<bot>`).
pub fn session_close_subject(bot_id: &str) -> String {
    format!("{SESSION_CLOSE}.{}", bot_token(bot_id))
}
/// API service → fencing: an executor's session for `bot_id`.
pub fn executor_session_create_subject(bot_id: &str) -> String {
    format!("{SESSION_EXECUTOR_CREATE}.{}", bot_token(bot_id))
}
/// Bot → scheduler: long-poll for leases (`warden.sched.acquire.<bot>`).
pub fn acquire_subject(bot_id: &str) -> String {
    format!("{ACQUIRE}.{}", bot_token(bot_id))
}
/// What the scheduler replicas subscribe to (queue group): every bot's
/// acquire subject.
pub fn acquire_all() -> String {
    format!("{ACQUIRE}.*")
}
/// The job a report subject `warden.report.<bot>.<job>` is about, if the
/// subject has that shape (the old `warden.report.<job>` has not).
pub fn job_of_report_subject(subject: &str) -> Option<Uuid> {
    let rest = subject.strip_prefix(REPORTS_PREFIX)?.strip_prefix('.')?;
    let mut parts = rest.split('.');
    let (Some(_bot), Some(job), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    job.parse().ok()
}
/// Bot → WARDEN_REPORTS: a report about `job_id`
/// (`warden.report.<bot>.<job>`).
pub fn bot_report_subject(bot_id: &str, job_id: &Uuid) -> String {
    format!("{REPORTS_PREFIX}.{}.{job_id}", bot_token(bot_id))
}
/// Where a bot's client receives its replies: `_INBOX.bot.<bot>`; only
/// that bot may subscribe below it.
pub fn bot_inbox_prefix(bot_id: &str) -> String {
    format!("{INBOX_ROOT}.bot.{}", bot_token(bot_id))
}
/// Where a role's clients receive their replies: `_INBOX.<role>`.
pub fn role_inbox_prefix(role: &str) -> String {
    format!("{INBOX_ROOT}.{role}")
}
/// The root every inbox prefix is under.
pub const INBOX_ROOT: &str = "_INBOX";

/// The inbox prefix a connection uses, so that only its own identity's
/// permissions cover its replies (request answers, JetStream acks, KV
/// watches, pull fetches): the configured `nats.inbox_prefix` if any;
/// else a user/password login as `U` gets `_INBOX.<U>` (a role's users
/// subscribe only below their own name); else a bot gets
/// `_INBOX.bot.<token>` (its own nkey user subscribes only there); else
/// `_INBOX` (a server without per-role permissions).
pub fn inbox_prefix(explicit: Option<&str>, user: Option<&str>, bot_id: Option<&str>) -> String {
    if let Some(p) = explicit {
        return p.to_string();
    }
    if let Some(u) = user {
        return role_inbox_prefix(u);
    }
    if let Some(b) = bot_id {
        return bot_inbox_prefix(b);
    }
    INBOX_ROOT.to_string()
}

/// Why a configured inbox prefix is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum InboxPrefixError {
    #[error("must start with \"_INBOX.\" and name at least one more token")]
    NotUnderInbox,
    #[error("has an empty token")]
    EmptyToken,
    #[error("must not hold '.', '*', '>' or white space")]
    BadCharacter,
}

/// A configured inbox prefix: `_INBOX.` and one or more tokens, without
/// wildcards (the client subscribes to `<prefix>.>` and its permission
/// must be exactly that).
pub fn check_inbox_prefix(prefix: &str) -> Result<(), InboxPrefixError> {
    let rest = prefix
        .strip_prefix(INBOX_ROOT)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(InboxPrefixError::NotUnderInbox)?;
    if rest.is_empty() {
        return Err(InboxPrefixError::NotUnderInbox);
    }
    for token in rest.split('.') {
        check_one_token(token)?;
    }
    Ok(())
}

/// A role user name is one subject token: `_INBOX.<user>.>` must name
/// exactly its own replies.
pub fn check_one_token(token: &str) -> Result<(), InboxPrefixError> {
    if token.is_empty() {
        return Err(InboxPrefixError::EmptyToken);
    }
    if token
        .chars()
        .any(|c| matches!(c, '*' | '>' | '.') || c.is_whitespace() || c.is_control())
    {
        return Err(InboxPrefixError::BadCharacter);
    }
    Ok(())
}

/// The bot id a subject `<prefix>.<bot>` or `<prefix>.<bot>.<rest>` was
/// published on, if it has that shape (`prefix` is e.g. [`SESSION_CREATE`],
/// [`ACQUIRE`] or [`REPORTS_PREFIX`]).
pub fn bot_of_subject(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let token = rest.split('.').next()?;
    from_hex_token(token)
}

/// What one bot's NATS user may do, and nothing more: the subjects of its
/// own bot token. `warden bot add` writes these into the server's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotPermissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

pub fn bot_permissions(bot_id: &str) -> BotPermissions {
    let t = bot_token(bot_id);
    BotPermissions {
        publish: vec![
            format!("{SESSION_CREATE}.{t}"),
            format!("{SESSION_HEARTBEAT}.{t}"),
            format!("{SESSION_CLOSE}.{t}"),
            format!("{ACQUIRE}.{t}"),
            format!("{REPORTS_PREFIX}.{t}.*"),
        ],
        subscribe: vec![
            format!("{}.>", bot_inbox_prefix(bot_id)),
            agent_check_subject(bot_id),
        ],
    }
}

pub fn deadletter_subject(service: &str, reason: &str) -> String {
    format!("{DEADLETTER_PREFIX}.{service}.{reason}")
}

/// Sizes and ages of the durable state. The defaults suit one laptop and a
/// small fleet; production changes replicas (and sync in the server config).
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub replicas: usize,
    pub event_subjects: Vec<String>,
    pub events_max_age: Duration,
    pub deadletter_max_age: Duration,
    /// Bridges re-publish on reconnect; the stream drops a message id seen
    /// within this window.
    pub duplicate_window: Duration,
    pub max_job_bytes: i32,
    pub events: Bounds,
    pub deadletter: Bounds,
    pub reports: Bounds,
    pub notify: Bounds,
    /// The jobs bucket's total; its values are bounded by `max_job_bytes`.
    pub jobs_max_bytes: i64,
    pub sessions: Bounds,
    pub resources: Bounds,
    pub bots: Bounds,
}

/// How much a stream or bucket may hold: `max_bytes` in all, `max_msg`
/// per message (per value for a bucket). Neither is unlimited: what comes
/// from outside must not fill the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_bytes: i64,
    pub max_msg: i32,
}

/// What a full stream does with the next message. A stream whose messages
/// are work someone still has to do (events for the trigger, reports for
/// the scheduler, suspects and recycles for health and the provisioners)
/// refuses the new one, so the publisher sees an error and nothing it was
/// told is stored is dropped; the dead letters, a record for operators
/// that a consumer must be able to write before it acks, drop their
/// oldest.
pub fn discard_policy(stream: &str) -> stream::DiscardPolicy {
    if stream == DEADLETTER_STREAM {
        stream::DiscardPolicy::Old
    } else {
        stream::DiscardPolicy::New
    }
}

impl Topology {
    pub fn events_stream(&self) -> stream::Config {
        stream::Config {
            name: EVENTS_STREAM.into(),
            description: Some("bus events for the trigger (fedmsg, fedora-messaging)".into()),
            subjects: self.event_subjects.clone(),
            retention: stream::RetentionPolicy::Limits,
            max_age: self.events_max_age,
            duplicate_window: self.duplicate_window,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            max_bytes: self.events.max_bytes,
            max_message_size: self.events.max_msg,
            discard: discard_policy(EVENTS_STREAM),
            ..Default::default()
        }
    }

    pub fn deadletter_stream(&self) -> stream::Config {
        stream::Config {
            name: DEADLETTER_STREAM.into(),
            description: Some("events no service could use, with the reason".into()),
            subjects: vec![format!("{DEADLETTER_PREFIX}.>")],
            retention: stream::RetentionPolicy::Limits,
            max_age: self.deadletter_max_age,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            max_bytes: self.deadletter.max_bytes,
            max_message_size: self.deadletter.max_msg,
            discard: discard_policy(DEADLETTER_STREAM),
            ..Default::default()
        }
    }

    pub fn reports_stream(&self) -> stream::Config {
        stream::Config {
            name: REPORTS_STREAM.into(),
            description: Some("worker reports about attempts, applied by the scheduler".into()),
            subjects: vec![format!("{REPORTS_PREFIX}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: self.duplicate_window,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            max_bytes: self.reports.max_bytes,
            max_message_size: self.reports.max_msg,
            discard: discard_policy(REPORTS_STREAM),
            ..Default::default()
        }
    }

    pub fn notify_stream(&self) -> stream::Config {
        stream::Config {
            name: NOTIFY_STREAM.into(),
            description: Some(
                "crash notifications for operators and task owners; suspect and recycled resources"
                    .into(),
            ),
            subjects: vec![
                format!("{NOTIFY_PREFIX}.>"),
                format!("{SUSPECT_PREFIX}.>"),
                format!("{RECYCLE_PREFIX}.>"),
            ],
            retention: stream::RetentionPolicy::Limits,
            max_age: self.deadletter_max_age,
            duplicate_window: self.duplicate_window,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            max_bytes: self.notify.max_bytes,
            max_message_size: self.notify.max_msg,
            discard: discard_policy(NOTIFY_STREAM),
            ..Default::default()
        }
    }

    pub fn jobs_bucket(&self) -> kv::Config {
        kv::Config {
            bucket: JOBS_BUCKET.into(),
            description: "current state and history of every job".into(),
            history: 1,
            max_value_size: self.max_job_bytes,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            max_bytes: self.jobs_max_bytes,
            ..Default::default()
        }
    }

    pub fn resources_bucket(&self) -> kv::Config {
        kv::Config {
            bucket: RESOURCES_BUCKET.into(),
            description: "resources (hosts, working copies) and their health".into(),
            history: 1,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            max_bytes: self.resources.max_bytes,
            max_value_size: self.resources.max_msg,
            ..Default::default()
        }
    }

    pub fn bots_bucket(&self) -> kv::Config {
        kv::Config {
            bucket: BOTS_BUCKET.into(),
            description: "registered bots: pools and capacity each may claim".into(),
            history: 1,
            max_bytes: self.bots.max_bytes,
            max_value_size: self.bots.max_msg,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }

    pub fn sessions_bucket(&self) -> kv::Config {
        kv::Config {
            bucket: SESSIONS_BUCKET.into(),
            description: "bot sessions and the current session of each bot".into(),
            history: 1,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            max_bytes: self.sessions.max_bytes,
            max_value_size: self.sessions.max_msg,
            ..Default::default()
        }
    }
}

/// The trigger's durable consumer on the events stream.
pub fn trigger_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(TRIGGER_CONSUMER.into()),
        description: Some("trigger: events to jobs".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: 20,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// The CI-messages publishers' durable consumer on [`kv_stream`] of
/// [`JOBS_BUCKET`]: every job revision, but only those written after the
/// consumer was first made (`DeliverPolicy::New`), so a first start does
/// not replay the past's jobs as CI messages; later starts resume where
/// the consumer stands. The bucket keeps one revision per job: one
/// superseded before a publisher pulled it (all publishers down or far
/// behind) is gone, and only the job's latest state is published.
pub fn ci_messages_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CI_MESSAGES_CONSUMER.into()),
        description: Some("bridge: job changes as Fedora CI messages".into()),
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        max_ack_pending: 1_000,
        ..Default::default()
    }
}

/// The recorders' durable consumer on [`kv_stream`] of [`JOBS_BUCKET`]:
/// every job revision from the stream's start (`DeliverPolicy::All`), so
/// a first start records every job the bucket holds (an upgraded data
/// dir's history). Revisions superseded before a recorder pulled them are
/// gone from the stream (the bucket keeps one per job); the latest
/// carries the job's whole state and its recent history.
pub fn recorder_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(RECORDER_CONSUMER.into()),
        description: Some("recorder: job revisions into the execution database".into()),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// [`CI_PUBLISHED_BUCKET`]: one small value per job, kept `max_age`, at
/// most `max_bytes` in all.
pub fn ci_published_bucket(replicas: usize, max_bytes: i64, max_age: Duration) -> kv::Config {
    kv::Config {
        bucket: CI_PUBLISHED_BUCKET.into(),
        description: "CI messages published per job (what was sent last)".into(),
        history: 1,
        max_age,
        max_bytes,
        max_value_size: 1024,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The scheduler replicas' shared durable consumer on the reports stream.
pub fn scheduler_reports_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(SCHEDULER_REPORTS_CONSUMER.into()),
        description: Some("scheduler: apply worker reports".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// The health service replicas' durable consumer of suspect resources.
pub fn health_suspects_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(HEALTH_SUSPECTS_CONSUMER.into()),
        description: Some("health: resources suspected after failed attempts".into()),
        filter_subject: format!("{SUSPECT_PREFIX}.>"),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    }
}

/// A provisioner's durable consumer of recycle events.
pub fn recycle_hook_consumer(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        description: Some("recycle hook: a provisioner replaces recycled resources".into()),
        filter_subject: format!("{RECYCLE_PREFIX}.>"),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(300),
        ..Default::default()
    }
}

#[cfg(test)]
mod bot_subject_tests {
    use super::*;

    #[test]
    fn the_bot_is_read_back_off_each_of_its_subjects() {
        let bot = "build-01.example.org";
        let job = Uuid::nil();
        assert_eq!(
            bot_of_subject(SESSION_CREATE, &session_create_subject(bot)).as_deref(),
            Some(bot)
        );
        assert_eq!(
            bot_of_subject(ACQUIRE, &acquire_subject(bot)).as_deref(),
            Some(bot)
        );
        assert_eq!(
            bot_of_subject(REPORTS_PREFIX, &bot_report_subject(bot, &job)).as_deref(),
            Some(bot)
        );
    }

    #[test]
    fn a_report_subject_names_its_bot_and_job_and_the_old_one_neither() {
        let job = Uuid::from_u128(7);
        let s = bot_report_subject("bot-a", &job);
        assert_eq!(job_of_report_subject(&s), Some(job));
        assert_eq!(bot_of_subject(REPORTS_PREFIX, &s).as_deref(), Some("bot-a"));
        let old = report_subject(&job);
        assert_eq!(job_of_report_subject(&old), None);
        assert_eq!(bot_of_subject(REPORTS_PREFIX, &old), None);
        assert_eq!(job_of_report_subject(&format!("{s}.x")), None);
        assert!(acquire_subject("bot-a").starts_with(acquire_all().trim_end_matches('*')));
    }

    #[test]
    fn a_subject_without_a_bot_token_names_no_bot() {
        assert_eq!(bot_of_subject(SESSION_CREATE, SESSION_CREATE), None);
        assert_eq!(
            bot_of_subject(SESSION_CREATE, "warden.session.create.zz"),
            None
        );
        assert_eq!(
            bot_of_subject(SESSION_CREATE, "warden.session.create.6"),
            None
        );
        assert_eq!(bot_of_subject(ACQUIRE, "warden.session.create.6161"), None);
    }

    #[test]
    fn the_inbox_prefix_follows_the_login() {
        let bot = bot_inbox_prefix("b");
        assert_eq!(
            inbox_prefix(Some("_INBOX.x"), Some("u"), Some("b")),
            "_INBOX.x"
        );
        assert_eq!(inbox_prefix(None, Some("u"), Some("b")), "_INBOX.u");
        assert_eq!(inbox_prefix(None, None, Some("b")), bot);
        assert_eq!(inbox_prefix(None, None, None), "_INBOX");
        // A bot's prefix is what its permissions let it subscribe below.
        assert_eq!(bot_permissions("b").subscribe[0], format!("{bot}.>"));
        assert_eq!(check_inbox_prefix(&bot), Ok(()));
        assert_eq!(
            check_inbox_prefix("_INBOX"),
            Err(InboxPrefixError::NotUnderInbox)
        );
        assert_eq!(
            check_inbox_prefix("_INBOXx.a"),
            Err(InboxPrefixError::NotUnderInbox)
        );
        assert_eq!(
            check_inbox_prefix("_INBOX.a..b"),
            Err(InboxPrefixError::EmptyToken)
        );
        assert_eq!(
            check_inbox_prefix("_INBOX.a.*"),
            Err(InboxPrefixError::BadCharacter)
        );
        assert_eq!(check_one_token("warden-service"), Ok(()));
        assert_eq!(check_one_token("a.b"), Err(InboxPrefixError::BadCharacter));
    }

    #[test]
    fn work_is_never_discarded_dead_letters_drop_the_oldest() {
        for s in [EVENTS_STREAM, REPORTS_STREAM, NOTIFY_STREAM] {
            assert_eq!(discard_policy(s), stream::DiscardPolicy::New, "{s}");
        }
        assert_eq!(
            discard_policy(DEADLETTER_STREAM),
            stream::DiscardPolicy::Old
        );
    }

    #[test]
    fn a_bots_permissions_name_only_its_own_token() {
        let p = bot_permissions("a");
        let mine = bot_token("a");
        for s in p.publish.iter().chain(&p.subscribe) {
            assert!(s.contains(&mine), "{s}");
            assert!(!s.ends_with(".>") || s.starts_with("_INBOX.bot."), "{s}");
        }
    }
}

#[derive(Debug, Error)]
pub enum TopologyError {
    #[error("cannot create stream {name}")]
    Stream {
        name: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot create key-value bucket {name}")]
    Bucket {
        name: String,
        #[source]
        source: jetstream::context::CreateKeyValueError,
    },
}

/// The handles every service works with.
#[derive(Clone)]
pub struct Handles {
    pub js: jetstream::Context,
    pub jobs: kv::Store,
    pub sessions: kv::Store,
    pub resources: kv::Store,
    pub bots: kv::Store,
}

/// Creates (or brings up to date) every stream and bucket. Safe to run from
/// every service at every start, concurrently.
pub async fn ensure(js: &jetstream::Context, topo: &Topology) -> Result<Handles, TopologyError> {
    for cfg in [
        topo.events_stream(),
        topo.deadletter_stream(),
        topo.reports_stream(),
        topo.notify_stream(),
    ] {
        let name = cfg.name.clone();
        js.create_or_update_stream(cfg)
            .await
            .map_err(|source| TopologyError::Stream { name, source })?;
    }
    let bucket = |cfg: kv::Config| async move {
        let name = cfg.bucket.clone();
        js.create_or_update_key_value(cfg)
            .await
            .map_err(|source| TopologyError::Bucket { name, source })
    };
    Ok(Handles {
        js: js.clone(),
        jobs: bucket(topo.jobs_bucket()).await?,
        sessions: bucket(topo.sessions_bucket()).await?,
        resources: bucket(topo.resources_bucket()).await?,
        bots: bucket(topo.bots_bucket()).await?,
    })
}
