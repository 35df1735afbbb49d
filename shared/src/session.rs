//! Bot session records in the `warden_sessions` bucket.
//!
//! Keys: `session.<name>` → [`Session`]; `bot.<hex bot_id>` → the name of
//! the bot's current session (newest wins).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Active,
    /// Replaced by a newer session of the same bot.
    Quarantined,
    /// Silent past its timeout.
    Expired,
    /// Closed by the bot itself.
    Closed,
}

impl SessionState {
    pub const ALL: [SessionState; 4] = [
        SessionState::Active,
        SessionState::Quarantined,
        SessionState::Expired,
        SessionState::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Active => "active",
            SessionState::Quarantined => "quarantined",
            SessionState::Expired => "expired",
            SessionState::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub version: u32,
    pub name: String,
    pub bot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Every resource the bot declared (its host first); the health
    /// service registers them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<crate::resource::ResourceDecl>,
    /// The agent process (new at every start): a closed resource declared
    /// by a new agent process is registered as a new incarnation.
    #[serde(default)]
    pub agent_instance: String,
    pub pools: Vec<String>,
    pub capacity: u32,
    #[serde(default)]
    pub agent_version: String,
    /// Its own silence limit, if it asked for one (external executors);
    /// otherwise `fencing.session_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub state: SessionState,
    pub created_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
    /// When it stopped being active (closed, quarantined, expired); the
    /// sweep deletes it `fencing.closed_session_retention` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Leases the bot said it held at its last heartbeat.
    #[serde(default)]
    pub leases: Vec<crate::messages::HeldLease>,
}

pub fn session_key(name: &str) -> String {
    format!("session.{name}")
}

/// Bot ids are free text; KV keys are not, so the id is hex-encoded.
pub fn bot_key(bot_id: &str) -> String {
    format!("bot.{}", crate::subjects::hex_token(bot_id))
}

impl Session {
    /// How long this session may stay silent before it expires.
    pub fn timeout(&self, default: std::time::Duration) -> std::time::Duration {
        self.timeout_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(default)
    }

    /// Names of the resources the session runs on (the declared ones, or
    /// its single `resource` from before resources were declared).
    pub fn resource_names(&self) -> Vec<String> {
        if self.resources.is_empty() {
            self.resource.iter().cloned().collect()
        } else {
            self.resources.iter().map(|r| r.name.clone()).collect()
        }
    }
}

/// Every session on record, by bot id and then newest first (the
/// sessions bucket holds one record per session; bots are thousands at
/// most, so it is read as is). Unreadable records are skipped.
pub async fn list(
    kv: &async_nats::jetstream::kv::Store,
) -> Result<Vec<Session>, async_nats::Error> {
    use futures::StreamExt;
    let mut keys = kv.keys().await?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k?;
        if k.starts_with("session.") {
            names.push(k);
        }
    }
    let mut all = Vec::with_capacity(names.len());
    for k in names {
        if let Some(v) = kv.get(&k).await? {
            match serde_json::from_slice::<Session>(&v) {
                Ok(s) => all.push(s),
                Err(e) => tracing::warn!(key = %k, error = %e, "skipping an unreadable session"),
            }
        }
    }
    all.sort_by(|a, b| {
        a.bot_id
            .cmp(&b.bot_id)
            .then(b.created_at.cmp(&a.created_at))
    });
    Ok(all)
}
