//! `[amqp]`: the bridge to an AMQP 0-9-1 bus (fedora-messaging on
//! RabbitMQ). One connection for both directions: bus messages in (a queue
//! bound to an exchange with routing keys, each message an event on the
//! events stream) and, optionally, CI messages out (`[amqp.ci_messages]`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` or `amqps://...` (TLS).
    /// Empty: no bridge (`warden up` starts none; `warden bridge amqp`
    /// refuses to start).
    pub url: String,
    /// PEM CA bundle the broker's certificate must chain to (amqps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (Fedora's public broker asks for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Longest one connect attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait between reconnect attempts (the backoff doubles from
    /// one second up to this).
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// The queue the bridge consumes. Replicas that name the same queue
    /// share its messages. Fedora's public broker wants a UUID here. Empty:
    /// nothing is consumed (CI messages may still be published).
    pub queue: String,
    /// Exchange the queue is bound to.
    pub exchange: String,
    /// Routing keys bound (AMQP topic patterns: `*` one word, `#` any).
    pub routing_keys: Vec<String>,
    /// Declare the queue durable (it and its persistent messages survive
    /// a broker restart).
    pub queue_durable: bool,
    /// `x-expires` for the queue: the broker deletes it after it was
    /// unused this long (Fedora's public broker enforces about an hour).
    /// "0s": never.
    #[serde(with = "humantime_serde")]
    pub queue_expires: Duration,
    /// Messages delivered to one bridge and not yet acknowledged
    /// (`basic.qos` prefetch).
    pub prefetch: u16,
    /// Prefix put before the subject made of the routing key ("" none;
    /// e.g. "amqp" gives `amqp.org.fedoraproject...`). The events stream
    /// must listen on the result (`trigger.subjects`).
    pub subject_prefix: String,
    /// How long a message whose publish to JetStream failed is held before
    /// it is handed back to the broker (nack, requeue) to be delivered
    /// again.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    pub ci_messages: CiMessagesConfig,
}

/// `[amqp.ci_messages]`: job state changes published as Fedora CI
/// messages (the `ci-messages` spec) for ResultsDB, dashboards and gating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiMessagesConfig {
    /// Off by default.
    pub enabled: bool,
    /// Exchange CI messages are published to.
    pub exchange: String,
    /// Topic = `<topic_prefix>.<namespace>.<artifact type>.test.<status>`.
    pub topic_prefix: String,
    /// `test.namespace` (also in the topic): whose results these are.
    pub namespace: String,
    /// Base URL of the API, for links to jobs (`run.url`, `run.log`).
    pub api_url: String,
    /// `contact` of every message.
    pub contact: CiContact,
    /// Which tasks publish, and how (tasks not listed publish nothing).
    #[serde(default)]
    pub tasks: BTreeMap<String, CiTask>,
    /// Longest wait for the broker's publisher confirm of one CI message;
    /// past it the publish counts as failed and is retried.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// How long the per-job marker of what was published is kept
    /// (bucket `warden_ci_published`). A job that changes again after its
    /// marker expired publishes as if new.
    #[serde(with = "humantime_serde")]
    pub marker_max_age: Duration,
    /// Bound of the marker bucket in bytes (about 100 bytes a job).
    pub marker_max_bytes: i64,
}

/// `test.category` values the CI-messages spec allows.
pub const CI_CATEGORIES: [&str; 6] = [
    "functional",
    "integration",
    "interoperability",
    "static-analysis",
    "system",
    "validation",
];

/// Artifact fields the CI-messages schemas require, per artifact type
/// Warden knows (`type` is always set from [`CiTask::artifact`]); other
/// types are published with whatever `artifact_args` give.
pub fn ci_required_artifact_fields(artifact: &str) -> &'static [&'static str] {
    match artifact {
        "koji-build" | "brew-build" => &["id", "issuer", "component", "nvr", "scratch"],
        "fedora-update" => &["id"],
        _ => &[],
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiContact {
    pub name: String,
    pub team: String,
    pub docs: String,
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irc: Option<String>,
}

/// How one task's jobs become CI messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiTask {
    /// Artifact type: `koji-build` or `fedora-update` (more to come).
    pub artifact: String,
    /// `test.category`: functional, integration, interoperability,
    /// static-analysis, system or validation.
    pub category: String,
    /// `test.type` (default: the task name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_type: Option<String>,
    /// Artifact fields from the job's arguments: field -> template over
    /// the job's args (`{nvr}`), e.g. `{ id = "{build_id}", nvr = "{nvr}" }`.
    #[serde(default)]
    pub artifact_args: BTreeMap<String, String>,
}

impl CiMessagesConfig {
    /// What is wrong with the keys beyond `exchange`, `namespace` and
    /// `tasks` being set (checked only when enabled).
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let words_ok = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|w| {
                    !w.is_empty()
                        && !w
                            .chars()
                            .any(|c| matches!(c, '*' | '#') || c.is_whitespace() || c.is_control())
                })
        };
        if !words_ok(&self.topic_prefix) {
            p.push(format!(
                "amqp.ci_messages.topic_prefix: {:?} must be dot-separated words without '*', '#' or spaces",
                self.topic_prefix
            ));
        }
        let api = self.api_url.trim();
        if !(api.starts_with("http://") || api.starts_with("https://")) {
            p.push(format!(
                "amqp.ci_messages.api_url: {api:?} is not an http:// or https:// URL"
            ));
        }
        let c = &self.contact;
        for (key, v) in [
            ("name", &c.name),
            ("team", &c.team),
            ("docs", &c.docs),
            ("email", &c.email),
        ] {
            if v.trim().is_empty() {
                p.push(format!("amqp.ci_messages.contact.{key}: must not be empty"));
            }
        }
        if self.confirm_timeout.is_zero() {
            p.push("amqp.ci_messages.confirm_timeout: must be positive".into());
        }
        if self.marker_max_age < Duration::from_secs(60) {
            p.push("amqp.ci_messages.marker_max_age: must be at least 1m".into());
        }
        if self.marker_max_bytes <= 0 {
            p.push("amqp.ci_messages.marker_max_bytes: must be positive".into());
        }
        for (name, t) in &self.tasks {
            let at = format!("amqp.ci_messages.tasks.{name}");
            if t.artifact.is_empty() || !words_ok(&t.artifact) || t.artifact.contains('.') {
                p.push(format!(
                    "{at}.artifact: {:?} must be one word (it is part of the topic)",
                    t.artifact
                ));
            }
            if !CI_CATEGORIES.contains(&t.category.as_str()) {
                p.push(format!(
                    "{at}.category: {:?} is not one of {}",
                    t.category,
                    CI_CATEGORIES.join(", ")
                ));
            }
            if t.test_type.as_deref().is_some_and(|s| s.trim().is_empty()) {
                p.push(format!("{at}.test_type: must not be empty"));
            }
            if t.artifact_args.contains_key("type") {
                p.push(format!(
                    "{at}.artifact_args.type: the artifact type is `artifact`, not an argument"
                ));
            }
            for (field, template) in &t.artifact_args {
                if let Err(e) = crate::template::Template::parse(template) {
                    p.push(format!("{at}.artifact_args.{field}: {e}"));
                }
            }
            for field in ci_required_artifact_fields(&t.artifact) {
                if !t.artifact_args.contains_key(*field) {
                    p.push(format!(
                        "{at}.artifact_args.{field}: a {} artifact needs it",
                        t.artifact
                    ));
                }
            }
        }
        p
    }
}

impl AmqpConfig {
    /// Whether a bridge is configured at all.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// Whether the bridge consumes bus messages.
    pub fn consumes(&self) -> bool {
        self.enabled() && !self.queue.is_empty()
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.enabled() {
            if self.ci_messages.enabled {
                p.push("amqp.ci_messages.enabled: needs amqp.url".into());
            }
            return p;
        }
        let url = self.url.trim();
        let tls = url.starts_with("amqps://");
        if !tls && !url.starts_with("amqp://") {
            p.push(format!(
                "amqp.url: {} is not an amqp:// or amqps:// URL",
                crate::redact::redact(url)
            ));
        }
        if !tls
            && (self.tls_ca_file.is_some()
                || self.tls_cert_file.is_some()
                || self.tls_key_file.is_some())
        {
            p.push("amqp.tls_*: set, but amqp.url is not amqps://".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            p.push("amqp.tls_cert_file and amqp.tls_key_file: set both or neither".into());
        }
        if self.connect_timeout.is_zero() {
            p.push("amqp.connect_timeout: must be positive".into());
        }
        if self.reconnect_max < Duration::from_secs(1) {
            p.push("amqp.reconnect_max: must be at least 1s".into());
        }
        if self.prefetch == 0 {
            p.push("amqp.prefetch: must be at least 1".into());
        }
        if self.retry_delay.is_zero() {
            p.push("amqp.retry_delay: must be positive".into());
        }
        if !self.queue.is_empty() && self.routing_keys.is_empty() {
            p.push("amqp.routing_keys: a consumed queue needs at least one routing key".into());
        }
        if !self.subject_prefix.is_empty() {
            for token in self.subject_prefix.split('.') {
                if let Err(e) = crate::subjects::check_one_token(token) {
                    p.push(format!(
                        "amqp.subject_prefix: {:?}: {e}",
                        self.subject_prefix
                    ));
                    break;
                }
            }
        }
        let ci = &self.ci_messages;
        if ci.enabled {
            if ci.exchange.is_empty() {
                p.push("amqp.ci_messages.exchange: must not be empty".into());
            }
            if ci.namespace.is_empty() || ci.namespace.contains('.') {
                p.push("amqp.ci_messages.namespace: one word, no dots".into());
            }
            if ci.tasks.is_empty() {
                p.push("amqp.ci_messages.tasks: name at least one task that publishes".into());
            }
            p.extend(ci.problems());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> AmqpConfig {
        let mut c = crate::Config::from_parts(None, Vec::new())
            .expect("defaults")
            .amqp;
        c.url = "amqp://localhost:5672/%2f".into();
        c.ci_messages.enabled = true;
        c.ci_messages.tasks.insert(
            "rpmlint".into(),
            CiTask {
                artifact: "koji-build".into(),
                category: "static-analysis".into(),
                test_type: None,
                artifact_args: [
                    ("id", "{build_id}"),
                    ("issuer", "{owner}"),
                    ("component", "{name}"),
                    ("nvr", "{nvr}"),
                    ("scratch", "false"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            },
        );
        c
    }

    #[test]
    fn a_complete_ci_messages_config_passes() {
        assert_eq!(enabled().problems(), Vec::<String>::new());
    }

    #[test]
    fn ci_messages_mistakes_are_named() {
        let mut c = enabled();
        let t = c.ci_messages.tasks.get_mut("rpmlint").expect("task");
        t.category = "unit".into();
        t.artifact = "koji.build".into();
        t.artifact_args.remove("nvr");
        t.artifact_args.insert("type".into(), "x".into());
        t.artifact_args.insert("source".into(), "{unclosed".into());
        c.ci_messages.api_url = "warden.example.org".into();
        c.ci_messages.topic_prefix = "org..ci".into();
        c.ci_messages.contact.email = " ".into();
        c.ci_messages.confirm_timeout = Duration::ZERO;
        c.ci_messages.marker_max_bytes = 0;
        let p = c.problems().join("\n");
        for needle in [
            "tasks.rpmlint.category",
            "tasks.rpmlint.artifact:",
            "artifact_args.type",
            "artifact_args.source",
            "api_url",
            "topic_prefix",
            "contact.email",
            "confirm_timeout",
            "marker_max_bytes",
        ] {
            assert!(p.contains(needle), "{needle} not in:\n{p}");
        }
        // koji.build is not koji-build, so nvr is not required of it; a
        // koji-build without nvr is refused.
        let mut c = enabled();
        let t = c.ci_messages.tasks.get_mut("rpmlint").expect("task");
        t.artifact_args.remove("nvr");
        assert!(c.problems().join("\n").contains("artifact_args.nvr"));
    }
}
