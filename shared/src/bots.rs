//! Bot credentials: every bot is its own NATS user, an nkey, whose
//! permissions name only the subjects that carry its own bot token
//! ([`subjects::bot_permissions`]). A worker's credentials are an
//! attacker's (workers run untrusted code), so the bot id the services act
//! on is read off the subject, which only that user may publish on.
//!
//! `warden bot add` generates the key and writes the user's entry into the
//! server's accounts config between [`BEGIN_BOTS`] and [`END_BOTS`]; the
//! bot keeps the seed (the secret half), the server only ever sees the
//! public key.

use thiserror::Error;

use crate::subjects;

/// The marker lines in the accounts config between which bot users live.
pub const BEGIN_BOTS: &str = "# BEGIN WARDEN BOTS (written by `warden bot add`; do not edit)";
pub const END_BOTS: &str = "# END WARDEN BOTS";

/// Longest bot id accepted (bytes): it is a subject token in hex, twice as
/// long, and subjects stay short.
pub const MAX_BOT_ID: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BotsError {
    #[error("bot id must not be empty")]
    EmptyId,
    #[error("bot id is {0} bytes; at most {MAX_BOT_ID}")]
    IdTooLong(usize),
    #[error("bot id {0:?} holds a control character or white space")]
    IdCharacters(String),
    #[error("the accounts config has no `{BEGIN_BOTS}` ... `{END_BOTS}` block")]
    NoBotsBlock,
    #[error("cannot make an nkey: {0}")]
    Key(String),
}

/// A bot id is printable text without white space (it is shown in logs,
/// comments of the server config and the console).
pub fn validate_bot_id(bot_id: &str) -> Result<(), BotsError> {
    if bot_id.is_empty() {
        return Err(BotsError::EmptyId);
    }
    if bot_id.len() > MAX_BOT_ID {
        return Err(BotsError::IdTooLong(bot_id.len()));
    }
    if bot_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(BotsError::IdCharacters(bot_id.to_string()));
    }
    Ok(())
}

/// A new bot's key pair: `seed` is the secret the bot connects with
/// (`nats.nkey_file`), `public_key` what the server config names.
#[derive(Debug, Clone)]
pub struct BotKey {
    pub seed: String,
    pub public_key: String,
}

impl BotKey {
    pub fn generate() -> Result<BotKey, BotsError> {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().map_err(|e| BotsError::Key(e.to_string()))?;
        Ok(BotKey {
            seed,
            public_key: pair.public_key(),
        })
    }
}

fn quoted(list: &[String]) -> String {
    list.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn entry_start(bot_id: &str) -> String {
    format!("# bot {}", subjects::bot_token(bot_id))
}

/// The server-config entry of `bot_id`'s user (inside a `users: [...]`).
pub fn user_entry(bot_id: &str, public_key: &str) -> String {
    let p = subjects::bot_permissions(bot_id);
    format!(
        "      {start} ({bot_id})\n      {{\n        nkey: {public_key}\n        permissions: {{\n          publish: {{ allow: [{publish}] }}\n          subscribe: {{ allow: [{subscribe}] }}\n          allow_responses: true\n        }}\n      }}\n",
        start = entry_start(bot_id),
        publish = quoted(&p.publish),
        subscribe = quoted(&p.subscribe),
    )
}

/// `accounts` with `entry` (from [`user_entry`]) as `bot_id`'s user: an
/// entry the bot already has is replaced (a new key), others are kept.
pub fn upsert_user(accounts: &str, bot_id: &str, entry: &str) -> Result<String, BotsError> {
    let (head, bots, tail) = split_block(accounts)?;
    let mut kept = remove_entry(bots, bot_id);
    kept.push_str(entry);
    Ok(format!("{head}{kept}{tail}"))
}

/// `accounts` without `bot_id`'s user; `None` if it had none.
pub fn remove_user(accounts: &str, bot_id: &str) -> Result<Option<String>, BotsError> {
    let (head, bots, tail) = split_block(accounts)?;
    let kept = remove_entry(bots, bot_id);
    Ok((kept.len() != bots.len()).then(|| format!("{head}{kept}{tail}")))
}

/// (through the begin marker's line, the bot entries, from the end marker).
fn split_block(accounts: &str) -> Result<(&str, &str, &str), BotsError> {
    let begin = accounts.find(BEGIN_BOTS).ok_or(BotsError::NoBotsBlock)?;
    let body = accounts[begin..]
        .find('\n')
        .map(|n| begin + n + 1)
        .ok_or(BotsError::NoBotsBlock)?;
    let end_marker = accounts[body..]
        .find(END_BOTS)
        .ok_or(BotsError::NoBotsBlock)?
        + body;
    // The end marker's own indentation stays with it.
    let end = accounts[..end_marker]
        .rfind('\n')
        .map(|n| n + 1)
        .unwrap_or(end_marker)
        .max(body);
    Ok((&accounts[..body], &accounts[body..end], &accounts[end..]))
}

/// The bot entries without `bot_id`'s: an entry runs from its `# bot` line
/// to the next one.
fn remove_entry(bots: &str, bot_id: &str) -> String {
    let start = entry_start(bot_id);
    let mut out = String::with_capacity(bots.len());
    let mut skipping = false;
    for line in bots.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("# bot ") {
            skipping = trimmed
                .strip_prefix(&start)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\n']));
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNTS: &str = "users: [\n  { user: a }\n      # BEGIN WARDEN BOTS (written by `warden bot add`; do not edit)\n      # END WARDEN BOTS\n]\n";

    #[test]
    fn a_bot_entry_is_added_replaced_and_removed_leaving_the_rest() {
        let a1 = user_entry("bot-a", "UAAA");
        let b = user_entry("bot-b", "UBBB");
        let one = upsert_user(ACCOUNTS, "bot-a", &a1).expect("ok");
        let two = upsert_user(&one, "bot-b", &b).expect("ok");
        assert!(two.contains("UAAA") && two.contains("UBBB"));
        let a2 = user_entry("bot-a", "UA22");
        let replaced = upsert_user(&two, "bot-a", &a2).expect("ok");
        assert!(
            !replaced.contains("UAAA") && replaced.contains("UA22") && replaced.contains("UBBB")
        );
        let gone = remove_user(&replaced, "bot-a")
            .expect("block")
            .expect("entry");
        assert!(!gone.contains("UA22") && gone.contains("UBBB"));
        let back = remove_user(&gone, "bot-b").expect("block").expect("entry");
        assert_eq!(back, ACCOUNTS);
        assert_eq!(remove_user(ACCOUNTS, "bot-a").expect("ok"), None);
    }

    #[test]
    fn a_bot_whose_token_starts_another_ones_is_kept_apart() {
        // "a" is 61, "ab" is 6162: removing "a" must not remove "ab".
        let both = upsert_user(ACCOUNTS, "a", &user_entry("a", "UA")).expect("ok");
        let both = upsert_user(&both, "ab", &user_entry("ab", "UAB")).expect("ok");
        let left = remove_user(&both, "a").expect("block").expect("entry");
        assert!(left.contains("UAB") && !left.contains("nkey: UA\n"));
    }

    #[test]
    fn an_entry_names_only_its_own_subjects() {
        let e = user_entry("b1", "UKEY");
        let t = subjects::bot_token("b1");
        assert!(e.contains(&format!("warden.sched.acquire.{t}")));
        assert!(!e.contains("warden.report.>"));
        assert!(e.contains("allow_responses: true"));
    }

    #[test]
    fn ids_that_would_break_the_config_or_a_subject_are_refused() {
        assert_eq!(validate_bot_id(""), Err(BotsError::EmptyId));
        assert!(matches!(
            validate_bot_id("a b"),
            Err(BotsError::IdCharacters(_))
        ));
        assert!(matches!(
            validate_bot_id("a\nb"),
            Err(BotsError::IdCharacters(_))
        ));
        assert!(matches!(
            validate_bot_id(&"x".repeat(65)),
            Err(BotsError::IdTooLong(65))
        ));
        assert_eq!(validate_bot_id("build-01.example.org"), Ok(()));
    }

    #[test]
    fn a_config_without_the_block_is_an_error() {
        assert_eq!(
            upsert_user("users: []", "a", "x").err(),
            Some(BotsError::NoBotsBlock)
        );
    }

    #[test]
    fn a_generated_key_is_a_user_nkey() {
        let k = BotKey::generate().expect("ok");
        assert!(k.public_key.starts_with('U'), "{}", k.public_key);
        assert!(k.seed.starts_with("SU"), "seed kind");
    }
}
