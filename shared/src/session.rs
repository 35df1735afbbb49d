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
    pub pools: Vec<String>,
    pub capacity: u32,
    #[serde(default)]
    pub agent_version: String,
    pub state: SessionState,
    pub created_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
    /// Leases the bot said it held at its last heartbeat.
    #[serde(default)]
    pub leases: Vec<crate::messages::HeldLease>,
}

pub fn session_key(name: &str) -> String {
    format!("session.{name}")
}

/// Bot ids are free text; KV keys are not, so the id is hex-encoded.
pub fn bot_key(bot_id: &str) -> String {
    let mut k = String::with_capacity(4 + bot_id.len() * 2);
    k.push_str("bot.");
    for b in bot_id.as_bytes() {
        k.push_str(&format!("{b:02x}"));
    }
    k
}

/// Stable error codes a bot acts on.
pub const UNKNOWN_SESSION: &str = "unknown_session";
pub const SESSION_SUPERSEDED: &str = "session_superseded";
