//! The health service's decisions, free of I/O: each takes the resource
//! record(s), the session or message, the configuration and `now`, and
//! returns the record to write, what to publish or what to answer. The
//! I/O modules (`suspects`, `checks`, `sessions`, `tick`, `requests`)
//! read, call these and write.

pub mod checks;
pub mod recycling;
pub mod sessions;
pub mod suspicion;
pub mod tick;

use std::time::Duration;

use chrono::{DateTime, Utc};

/// `now + wait`, an hour when `wait` does not fit a chrono duration.
pub fn after(now: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1))
}

/// `s` cut to at most `max` bytes (on a character boundary), with `…`.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
pub(crate) mod fixtures {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use chrono::{DateTime, TimeZone, Utc};
    use warden_shared::config::HealthConfig;
    use warden_shared::resource::{Resource, ResourceDecl, ResourceSession};
    use warden_shared::Config;

    pub fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    pub fn cfg(extra: &str) -> HealthConfig {
        let text = format!(
            "[health]\nrecheck_backoff = \"10s\"\nflap_window = \"35s\"\ncheck_timeout = \"5s\"\n{extra}"
        );
        Config::from_parts(Some(&text), Vec::new()).unwrap().health
    }

    pub fn decl(name: &str) -> ResourceDecl {
        ResourceDecl {
            name: name.into(),
            kind: "host".into(),
            path: None,
            depends_on: None,
        }
    }

    /// An open resource registered at `t(0)` with one session.
    pub fn open(name: &str) -> Resource {
        let mut r = Resource::register(
            &decl(name),
            1,
            "agent-1",
            "bot-1",
            "registered".into(),
            t(0),
        );
        r.sessions.push(ResourceSession {
            session: "s1".into(),
            bot_id: "bot-1".into(),
        });
        r.pools = vec!["default".into()];
        r
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(super::truncate("abc".into(), 5), "abc");
        assert_eq!(super::truncate("abcdef".into(), 3), "abc…");
        assert_eq!(super::truncate("aé".into(), 2), "a…");
    }
}
