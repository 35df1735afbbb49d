//! `warden up --secure`: a local secured setup, made once in
//! `<data>/secure/` and reused after. A CA; a server certificate for
//! 127.0.0.1 and localhost; a client certificate and a password per role
//! of the shipped `deploy/nats/cluster/accounts.conf` (whose users the
//! local nats-server then runs with, TLS and `verify` on); and a Warden
//! config snippet per role (`client-<role>.toml`) for a CLI. Every file is
//! mode 0600, the directory 0700.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use warden_shared::config::NatsConfig;

/// The shipped per-role users; their passwords come from
/// `NATS_WARDEN_<ROLE>_PASSWORD` in the server's environment.
pub const ACCOUNTS_CONF: &str = include_str!("../../../deploy/nats/cluster/accounts.conf");

/// The roles of [`ACCOUNTS_CONF`]: user `warden-<role>`, password variable
/// `NATS_WARDEN_<ROLE>_PASSWORD`.
pub fn roles(accounts_conf: &str) -> Vec<String> {
    let mut roles: Vec<String> = accounts_conf
        .match_indices("$NATS_WARDEN_")
        .filter_map(|(at, _)| {
            let var: String = accounts_conf[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            var.strip_prefix("NATS_WARDEN_")?
                .strip_suffix("_PASSWORD")
                .map(str::to_ascii_lowercase)
        })
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

/// The files of a secured setup in `dir`.
#[derive(Debug, Clone)]
pub struct Secure {
    pub dir: PathBuf,
    /// Role -> password.
    pub passwords: BTreeMap<String, String>,
}

impl Secure {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn client_cert(&self, role: &str) -> PathBuf {
        self.dir.join(format!("client-{role}.pem"))
    }

    pub fn client_key(&self, role: &str) -> PathBuf {
        self.dir.join(format!("client-{role}.key"))
    }

    /// The config snippet a CLI of `role` uses (`warden --config ...`).
    pub fn client_toml(&self, role: &str) -> PathBuf {
        self.dir.join(format!("client-{role}.toml"))
    }

    /// The certificate every local bot presents (its login is its nkey).
    pub const BOT_CERT: &'static str = "bot";

    /// Where bot `bot_id`'s nkey seed is kept.
    pub fn bot_nkey(&self, bot_id: &str) -> PathBuf {
        self.dir.join(format!(
            "bot-{}.nk",
            warden_shared::subjects::bot_token(bot_id)
        ))
    }

    /// `accounts` (the shipped accounts config) with a user for each of
    /// `bots`, each bot's key made on first use and kept in [`Secure::bot_nkey`].
    pub fn accounts_with_bots(&self, accounts: &str, bots: &[String]) -> anyhow::Result<String> {
        use warden_shared::bots;
        let mut text = accounts.to_string();
        for bot_id in bots {
            let path = self.bot_nkey(bot_id);
            let public_key = match std::fs::read_to_string(&path) {
                Ok(seed) => public_key_of(&seed, &path)?,
                Err(_) => {
                    let key = bots::BotKey::generate()?;
                    write_private(&path, key.seed.as_bytes())?;
                    key.public_key
                }
            };
            text = bots::upsert_user(&text, bot_id, &bots::user_entry(bot_id, &public_key))?;
        }
        Ok(text)
    }

    /// The public key of bot `bot_id`'s nkey (made by
    /// [`Secure::accounts_with_bots`]).
    pub fn bot_public_key(&self, bot_id: &str) -> anyhow::Result<String> {
        let path = self.bot_nkey(bot_id);
        let seed = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        public_key_of(&seed, &path)
    }

    /// `nats` logged in as bot `bot_id` (its nkey) over TLS.
    pub fn apply_bot(&self, nats: &mut NatsConfig, bot_id: &str) {
        nats.user = None;
        nats.password = None;
        nats.credentials = None;
        nats.nkey_file = Some(self.bot_nkey(bot_id));
        nats.tls_ca_file = Some(self.ca());
        nats.tls_cert_file = Some(self.client_cert(Self::BOT_CERT));
        nats.tls_key_file = Some(self.client_key(Self::BOT_CERT));
        nats.tls_required = true;
    }

    /// `nats` logged in as `role` over TLS with its client certificate.
    pub fn apply(&self, nats: &mut NatsConfig, role: &str) -> anyhow::Result<()> {
        let password = self
            .passwords
            .get(role)
            .with_context(|| format!("no password for role {role} in {}", self.dir.display()))?;
        nats.user = Some(format!("warden-{role}"));
        nats.password = Some(password.clone());
        nats.credentials = None;
        nats.nkey_file = None;
        nats.tls_ca_file = Some(self.ca());
        nats.tls_cert_file = Some(self.client_cert(role));
        nats.tls_key_file = Some(self.client_key(role));
        nats.tls_required = true;
        Ok(())
    }

    /// The nats-server `tls {}` block: this setup's server certificate,
    /// its CA, client certificates required.
    pub fn server_tls_block(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
            self.server_cert().display().to_string(),
            self.server_key().display().to_string(),
            self.ca().display().to_string()
        )
    }

    /// `NATS_WARDEN_<ROLE>_PASSWORD` for the server's environment only.
    pub fn server_env(&self) -> Vec<(String, String)> {
        self.passwords
            .iter()
            .map(|(role, pw)| {
                (
                    format!("NATS_WARDEN_{}_PASSWORD", role.to_ascii_uppercase()),
                    pw.clone(),
                )
            })
            .collect()
    }

    /// Writes `client-<role>.toml` for every role, for a server at `url`.
    pub fn write_client_configs(&self, url: &str) -> anyhow::Result<()> {
        for role in self.passwords.keys() {
            let mut nats = warden_shared::Config::defaults().nats;
            nats.url = url.to_string();
            self.apply(&mut nats, role)?;
            write_private(&self.client_toml(role), client_toml(&nats).as_bytes())?;
        }
        Ok(())
    }
}

/// The `[nats]` section of a client config for `nats`.
pub fn client_toml(nats: &NatsConfig) -> String {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| format!("{:?}", p.display().to_string()))
            .unwrap_or_default()
    };
    format!(
        "# written by `warden up --secure`: use with `warden --config <this file> ...`\n[nats]\nurl = {:?}\nuser = {:?}\npassword = {:?}\ntls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}\ntls_required = true\n",
        nats.url,
        nats.user.clone().unwrap_or_default(),
        nats.password.clone().unwrap_or_default(),
        path(&nats.tls_ca_file),
        path(&nats.tls_cert_file),
        path(&nats.tls_key_file),
    )
}

/// The public key of the nkey `seed` read from `path`.
fn public_key_of(seed: &str, path: &Path) -> anyhow::Result<String> {
    Ok(nkeys::KeyPair::from_seed(seed.trim())
        .with_context(|| format!("{} is not an nkey seed", path.display()))?
        .public_key())
}

/// `role password` lines.
fn format_passwords(p: &BTreeMap<String, String>) -> String {
    p.iter().map(|(r, pw)| format!("{r} {pw}\n")).collect()
}

fn parse_passwords(text: &str) -> Option<BTreeMap<String, String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (role, pw) = l.trim().split_once(' ')?;
            (!role.is_empty() && !pw.is_empty()).then(|| (role.to_string(), pw.to_string()))
        })
        .collect()
}

/// A random password (two v4 UUIDs: 244 random bits).
fn new_password() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Writes `bytes` to `path`, mode 0600 from the start.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The setup in `dir`: read back when complete, else made anew (a CA,
/// the server's and every role's certificate, every role's password).
pub fn ensure(dir: &Path) -> anyhow::Result<Secure> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    let roles = roles(ACCOUNTS_CONF);
    let passwords_file = dir.join("passwords");
    let existing = std::fs::read_to_string(&passwords_file)
        .ok()
        .and_then(|t| parse_passwords(&t));
    if let Some(passwords) = existing {
        let s = Secure {
            dir: dir.to_path_buf(),
            passwords,
        };
        let complete = roles.iter().all(|r| {
            s.passwords.contains_key(r) && s.client_cert(r).exists() && s.client_key(r).exists()
        }) && s.client_cert(Secure::BOT_CERT).exists()
            && s.ca().exists()
            && s.server_cert().exists()
            && s.server_key().exists();
        if complete {
            return Ok(s);
        }
    }
    let s = Secure {
        dir: dir.to_path_buf(),
        passwords: roles.iter().map(|r| (r.clone(), new_password())).collect(),
    };
    generate(&s, &roles)?;
    // Last: its presence says the rest is there.
    write_private(&passwords_file, format_passwords(&s.passwords).as_bytes())?;
    Ok(s)
}

fn generate(s: &Secure, roles: &[String]) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "warden up --secure local CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write_private(&s.ca(), ca_cert.pem().as_bytes())?;
    // The CA's key is not kept: nothing else is ever signed with it.
    let issuer = Issuer::new(ca, ca_key);
    let issue = |name: &str,
                 sans: Vec<String>,
                 usage: ExtendedKeyUsagePurpose,
                 cert: &Path,
                 key: &Path|
     -> anyhow::Result<()> {
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let k = KeyPair::generate()?;
        let c = p.signed_by(&k, &issuer)?;
        write_private(cert, c.pem().as_bytes())?;
        write_private(key, k.serialize_pem().as_bytes())?;
        Ok(())
    };
    issue(
        "warden local nats-server",
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        &s.server_cert(),
        &s.server_key(),
    )?;
    for role in roles.iter().map(String::as_str).chain([Secure::BOT_CERT]) {
        issue(
            &format!("warden-{role}"),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            &s.client_cert(role),
            &s.client_key(role),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roles_are_read_off_the_shipped_accounts() {
        let r = roles(ACCOUNTS_CONF);
        for role in ["service", "publisher", "executor", "readonly"] {
            assert!(r.contains(&role.to_string()), "{role} in {r:?}");
        }
        assert_eq!(
            roles("password: $NATS_WARDEN_A_B_PASSWORD x $NATS_WARDEN_A_B_PASSWORD"),
            vec!["a_b"]
        );
    }

    #[test]
    fn passwords_read_back() {
        let p: BTreeMap<String, String> = [("service".into(), "abc".into())].into();
        assert_eq!(parse_passwords(&format_passwords(&p)), Some(p));
        assert_eq!(parse_passwords("service\n"), None);
    }

    #[test]
    fn a_setup_is_made_private_once_and_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().join("secure");
        let s = ensure(&d).expect("made");
        s.write_client_configs("nats://127.0.0.1:4300")
            .expect("client configs");
        let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        for entry in std::fs::read_dir(&d).expect("list") {
            let p = entry.expect("entry").path();
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        assert_eq!(s.passwords.len(), roles(ACCOUNTS_CONF).len());
        assert!(s.passwords.values().all(|p| p.len() == 64));
        let ca = std::fs::read(s.ca()).expect("ca");
        let again = ensure(&d).expect("reused");
        assert_eq!(again.passwords, s.passwords);
        assert_eq!(std::fs::read(again.ca()).expect("ca"), ca);
        // A client config loads and logs in as its role with TLS.
        let text = std::fs::read_to_string(s.client_toml("readonly")).expect("snippet");
        let c = warden_shared::Config::from_parts(Some(&text), []).expect("valid config");
        assert_eq!(c.nats.user.as_deref(), Some("warden-readonly"));
        assert!(c.nats.tls_required && c.nats.tls_cert_file.is_some());
        // Half a setup is made anew.
        std::fs::remove_file(s.client_key("readonly")).expect("remove");
        let fresh = ensure(&d).expect("made again");
        assert_ne!(fresh.passwords, s.passwords);
        assert!(fresh.client_key("readonly").exists());
        // A bot's key is made once, and its user written into the accounts.
        let bots = vec!["local-1".to_string()];
        let one = fresh
            .accounts_with_bots(ACCOUNTS_CONF, &bots)
            .expect("bots");
        let two = fresh
            .accounts_with_bots(ACCOUNTS_CONF, &bots)
            .expect("bots");
        assert_eq!(one, two, "the same key the second time");
        assert!(one.contains(&warden_shared::subjects::acquire_subject("local-1")));
    }
}
