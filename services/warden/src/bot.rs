//! `warden bot add|remove|list`: a bot's credentials and its registry
//! record (docs/security.md "Bot identity"). Adding a bot is one command:
//! it generates the bot's nkey, writes the seed for the bot, writes the
//! bot's user (its permissions only its own subjects) into the server's
//! accounts config and registers the pools and capacity it may claim.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use async_nats::jetstream::kv;
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt;
use warden_shared::bots::{self, BotKey, BotRecord};
use warden_shared::{subjects, Config};

#[derive(Subcommand, Clone)]
pub enum BotCommand {
    /// Add a bot: its nkey (seed in OUT/<bot>.nk), its NATS user in the accounts config, its registry record
    Add {
        bot_id: String,
        /// A pool the bot may serve, repeatable (at least one)
        #[arg(long = "pool", required = true)]
        pools: Vec<String>,
        /// The largest capacity its sessions may claim
        #[arg(long, default_value_t = 1)]
        capacity: u32,
        /// The server's accounts config (deploy/nats/cluster/accounts.conf)
        #[arg(long)]
        accounts: PathBuf,
        /// Where the bot's seed file is written
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing bot's key (its old seed stops working at the server's reload)
        #[arg(long)]
        rotate: bool,
    },
    /// Remove a bot: its NATS user from the accounts config and its registry record
    Remove {
        bot_id: String,
        #[arg(long)]
        accounts: PathBuf,
    },
    /// List the registered bots
    List {
        #[arg(long)]
        json: bool,
    },
}

/// What to do after the accounts config changed.
const RELOAD: &str = "reload every nats-server so it reads the accounts config: \
`nats-server --signal reload` (or `systemctl reload nats-server`)";

pub async fn run(config: &Config, cmd: &BotCommand) -> anyhow::Result<i32> {
    match cmd {
        BotCommand::Add {
            bot_id,
            pools,
            capacity,
            accounts,
            out,
            rotate,
        } => add(config, bot_id, pools, *capacity, accounts, out, *rotate).await,
        BotCommand::Remove { bot_id, accounts } => remove(config, bot_id, accounts).await,
        BotCommand::List { json } => list(config, *json).await,
    }
}

/// The seed file's name: the bot id when it is a plain file name, its
/// bot token (hex) otherwise, so no id writes outside `--out`.
pub fn seed_file_name(bot_id: &str) -> String {
    let plain = !bot_id.starts_with('.')
        && bot_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if plain {
        format!("{bot_id}.nk")
    } else {
        format!("{}.nk", subjects::bot_token(bot_id))
    }
}

/// A pool name as the config accepts it.
fn valid_pool(p: &str) -> bool {
    !p.is_empty()
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

async fn registry(config: &Config) -> anyhow::Result<kv::Store> {
    let client = crate::cli::connect(config).await?;
    let js = async_nats::jetstream::new(client);
    js.create_or_update_key_value(config.topology().bots_bucket())
        .await
        .with_context(|| {
            format!(
                "cannot open the bot registry {} (connect with the services' credentials)",
                subjects::BOTS_BUCKET
            )
        })
}

async fn add(
    config: &Config,
    bot_id: &str,
    pools: &[String],
    capacity: u32,
    accounts: &Path,
    out: &Path,
    rotate: bool,
) -> anyhow::Result<i32> {
    bots::validate_bot_id(bot_id)?;
    if let Some(p) = pools.iter().find(|p| !valid_pool(p)) {
        bail!("pool {p:?}: letters, digits, `_`, `-` and `.` only");
    }
    if capacity == 0 {
        bail!("--capacity must be at least 1");
    }
    let seed_path = out.join(seed_file_name(bot_id));
    if seed_path.exists() && !rotate {
        bail!(
            "{} exists: bot {bot_id:?} has a key already (use --rotate to replace it)",
            seed_path.display()
        );
    }
    let text = std::fs::read_to_string(accounts)
        .with_context(|| format!("cannot read {}", accounts.display()))?;
    let key = BotKey::generate()?;
    let updated = bots::upsert_user(&text, bot_id, &bots::user_entry(bot_id, &key.public_key))
        .with_context(|| format!("{}", accounts.display()))?;
    // The registry first: with no bus nothing is written.
    let record = BotRecord {
        bot_id: bot_id.to_string(),
        pools: pools.to_vec(),
        max_capacity: capacity,
        public_key: key.public_key.clone(),
        added_at: chrono::Utc::now(),
    };
    let kv = registry(config).await?;
    kv.put(
        bots::record_key(bot_id),
        Bytes::from(serde_json::to_vec(&record)?),
    )
    .await
    .context("cannot register the bot")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_secret(&seed_path, key.seed.as_bytes())?;
    replace_file(accounts, updated.as_bytes())?;
    println!(
        "bot {bot_id} added: pools {}, capacity up to {capacity}, public key {}",
        pools.join(","),
        key.public_key
    );
    println!(
        "  seed: {} (mode 0600; copy it to the bot's host, keep it secret)",
        seed_path.display()
    );
    println!("next:");
    println!("  1. {RELOAD}");
    println!(
        "  2. on the bot's host, in warden.toml: [nats] nkey_file = \"{}\" and [worker] bot_id = \"{bot_id}\"",
        seed_path.display()
    );
    Ok(0)
}

async fn remove(config: &Config, bot_id: &str, accounts: &Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(accounts)
        .with_context(|| format!("cannot read {}", accounts.display()))?;
    let removed = bots::remove_user(&text, bot_id)?;
    let kv = registry(config).await?;
    let key = bots::record_key(bot_id);
    let registered = matches!(kv.entry(&key).await?, Some(e) if e.operation == kv::Operation::Put);
    if removed.is_none() && !registered {
        bail!(
            "no bot {bot_id:?} in {} nor in the registry",
            accounts.display()
        );
    }
    if registered {
        kv.delete(&key)
            .await
            .context("cannot remove the registry record")?;
    }
    if let Some(updated) = removed {
        replace_file(accounts, updated.as_bytes())?;
    }
    println!("bot {bot_id} removed; {RELOAD}");
    Ok(0)
}

async fn list(config: &Config, json: bool) -> anyhow::Result<i32> {
    let kv = registry(config).await?;
    let mut keys = kv.keys().await?;
    let mut records = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k?;
        let Some(v) = kv.get(&k).await? else { continue };
        match serde_json::from_slice::<BotRecord>(&v) {
            Ok(r) => records.push(r),
            Err(e) => eprintln!("warden: undecodable registry record {k}: {e}"),
        }
    }
    records.sort_by(|a, b| a.bot_id.cmp(&b.bot_id));
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(0);
    }
    println!(
        "{:<24}  {:<20}  {:>8}  {:<56}  ADDED",
        "BOT", "POOLS", "CAPACITY", "PUBLIC KEY"
    );
    for r in &records {
        println!(
            "{:<24}  {:<20}  {:>8}  {:<56}  {}",
            r.bot_id,
            r.pools.join(","),
            r.max_capacity,
            r.public_key,
            r.added_at.to_rfc3339()
        );
    }
    Ok(0)
}

/// Writes a secret readable by its owner only (0600), replacing `path`
/// atomically when it exists.
fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_beside(path)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Replaces `path` with `bytes` atomically (a temporary file beside it,
/// then a rename), keeping its mode.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .permissions();
    let tmp = temp_beside(path)?;
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, mode)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

fn temp_beside(path: &Path) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_seed_file_stays_inside_the_out_directory() {
        assert_eq!(
            seed_file_name("build-01.example.org"),
            "build-01.example.org.nk"
        );
        assert_eq!(
            seed_file_name("../etc/x"),
            format!("{}.nk", subjects::bot_token("../etc/x"))
        );
        assert_eq!(
            seed_file_name(".hidden"),
            format!("{}.nk", subjects::bot_token(".hidden"))
        );
    }

    #[test]
    fn files_are_replaced_keeping_their_mode_and_secrets_are_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("accounts.conf");
        std::fs::write(&conf, "old").expect("write");
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        replace_file(&conf, b"new").expect("replaced");
        assert_eq!(std::fs::read_to_string(&conf).expect("read"), "new");
        let mode = std::fs::metadata(&conf).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let seed = dir.path().join("b.nk");
        write_secret(&seed, b"SUAAA").expect("written");
        let mode = std::fs::metadata(&seed).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            2,
            "no temp left"
        );
    }

    #[test]
    fn pools_are_names() {
        assert!(valid_pool("default") && valid_pool("gpu.x-1"));
        assert!(!valid_pool("") && !valid_pool("a b") && !valid_pool("a>"));
    }
}
