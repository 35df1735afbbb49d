//! The real `fedora-messaging` Python client in tests: wrappers around the
//! scripts in `tests/python/` (run with `$WARDEN_PYTHON`, the project venv's
//! python that `scripts/ensure-tools` fills with fedora-messaging and the
//! schema packages).
//!
//! - [`publish`]: Koji / Bodhi messages of the real schema classes,
//!   published with `fedora_messaging.api.publish` (`fm_publish.py`).
//! - [`publish_raw`]: arbitrary bytes (for undecodable-message tests).
//! - [`CiConsumer`]: a fedora-messaging consumer that validates every CI
//!   message against the `ci-messages` schemas (`fm_consume_ci.py`).
//! - [`declare_queue`], [`get_messages`]: plain AMQP helpers (pika).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root (testsupport's manifest dir + "..").
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `tests/python/<name>`.
pub fn script(name: &str) -> PathBuf {
    repo_root().join("tests").join("python").join(name)
}

/// `$WARDEN_PYTHON`, else `.tools/venv/bin/python` of the repository.
pub fn python() -> PathBuf {
    std::env::var_os("WARDEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/venv/bin/python"))
}

/// Which schema class [`publish`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `koji_fedoramessaging_messages.build.BuildStateChangeV1`, topic
    /// `org.fedoraproject.prod.buildsys.build.state.change`.
    Koji,
    /// `bodhi.messages.schemas.update.UpdateRequestTestingV1`, topic
    /// `org.fedoraproject.prod.bodhi.update.request.testing`.
    Bodhi,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Koji => "koji",
            Kind::Bodhi => "bodhi",
        }
    }
}

/// Options of [`publish`].
#[derive(Debug, Clone, Default)]
pub struct PublishOpts {
    /// How many messages (default 1).
    pub count: Option<usize>,
    /// Deterministic ids `<prefix>-0`, `<prefix>-1`, ...; else UUID4s.
    pub id_prefix: Option<String>,
    /// Default `amq.topic`.
    pub exchange: Option<String>,
    /// One pika connection with publisher confirms and one schema
    /// validation for all (same wire bytes as `api.publish`), for
    /// benchmarks.
    pub fast: bool,
    /// TLS for `amqps://` URLs: CA, client certificate, key.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// One published message, as `fm_publish.py` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    /// The full Fedora topic (= the routing key).
    pub topic: String,
    pub routing_key: String,
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} with {:?}: {e}", python()));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn parse_published(out: &str) -> Vec<Published> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("fm_publish said {l:?}: {e}"));
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            Published {
                id: s("id"),
                topic: s("topic"),
                routing_key: s("routing_key"),
            }
        })
        .collect()
}

/// Publishes `kind` messages to `url` with the real fedora-messaging client.
pub fn publish(url: &str, kind: Kind, opts: &PublishOpts) -> Vec<Published> {
    let mut cmd = Command::new(python());
    cmd.arg(script("fm_publish.py"))
        .args(["--amqp-url", url, "--kind", kind.arg()])
        .args(["--count", &opts.count.unwrap_or(1).to_string()]);
    if let Some(p) = &opts.id_prefix {
        cmd.args(["--id-prefix", p]);
    }
    if let Some(x) = &opts.exchange {
        cmd.args(["--exchange", x]);
    }
    if opts.fast {
        cmd.arg("--fast");
    }
    if let Some((ca, cert, key)) = &opts.tls {
        cmd.arg("--ca-cert").arg(ca);
        cmd.arg("--certfile").arg(cert);
        cmd.arg("--keyfile").arg(key);
    }
    parse_published(&run(&mut cmd, "fm_publish.py"))
}

/// Publishes `body` as it is (no fedora-messaging headers, persistent,
/// `message_id` `id` if given) to `amq.topic` with `routing_key`.
pub fn publish_raw(url: &str, routing_key: &str, body: &[u8]) -> Published {
    publish_raw_with_id(url, routing_key, body, None)
}

pub fn publish_raw_with_id(
    url: &str,
    routing_key: &str,
    body: &[u8],
    id: Option<&str>,
) -> Published {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(script("fm_publish.py"))
        .args([
            "--amqp-url",
            url,
            "--routing-key",
            routing_key,
            "--raw-body",
        ])
        .arg(file.path());
    if let Some(id) = id {
        cmd.args(["--id", id]);
    }
    parse_published(&run(&mut cmd, "fm_publish.py --raw-body"))
        .pop()
        .expect("fm_publish.py printed the message")
}

/// A durable queue `queue` bound to `amq.topic` with `bindings`.
pub fn declare_queue(url: &str, queue: &str, bindings: &[&str]) {
    let mut cmd = Command::new(python());
    cmd.arg(script("amqp_tool.py"))
        .args(["--amqp-url", url, "declare", "--queue", queue]);
    for b in bindings {
        cmd.args(["--bind", b]);
    }
    run(&mut cmd, "amqp_tool.py declare");
}

/// Takes (and acks) up to `max` messages from `queue`: one JSON object
/// each, `{"routing_key", "exchange", "redelivered", "properties",
/// "headers", "header_types", "body" (text or null), "body_b64"}`.
pub fn get_messages(url: &str, queue: &str, max: usize) -> Vec<serde_json::Value> {
    let out = run(
        Command::new(python()).arg(script("amqp_tool.py")).args([
            "--amqp-url",
            url,
            "get",
            "--queue",
            queue,
            "--count",
            &max.to_string(),
        ]),
        "amqp_tool.py get",
    );
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A running `fm_consume_ci.py`: a fedora-messaging consumer that
/// validates each CI message it gets. Killed on drop.
pub struct CiConsumer {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl CiConsumer {
    /// Starts a consumer on durable queue `queue` bound to `amq.topic`
    /// with `binding` and waits (up to 60 s) until it is bound.
    pub fn start(url: &str, queue: &str, binding: &str) -> CiConsumer {
        Self::start_with(url, queue, &[binding], None)
    }

    /// [`CiConsumer::start`] with several bindings and TLS (CA, client
    /// certificate, key) for `amqps://`.
    pub fn start_with(
        url: &str,
        queue: &str,
        bindings: &[&str],
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> CiConsumer {
        let mut cmd = Command::new(python());
        cmd.arg("-u")
            .arg(script("fm_consume_ci.py"))
            .args(["--amqp-url", url, "--queue", queue]);
        for b in bindings {
            cmd.args(["--bind", b]);
        }
        if let Some((ca, cert, key)) = &tls {
            cmd.arg("--ca-cert").arg(ca);
            cmd.arg("--certfile").arg(cert);
            cmd.arg("--keyfile").arg(key);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start fm_consume_ci.py with {:?}: {e}", python()));
        let all = Arc::new(Mutex::new(Vec::new()));
        let ready = Arc::new(Mutex::new(None::<serde_json::Value>));
        let stdout = child.stdout.take().unwrap();
        {
            let (all, ready) = (all.clone(), ready.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if v.get("ready").is_some() || v.get("error").is_some() {
                        *ready.lock().unwrap() = Some(v);
                    } else {
                        all.lock().unwrap().push(v);
                    }
                }
            });
        }
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let text = stderr_text.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut t = text.lock().unwrap();
                    t.push_str(&line);
                    t.push('\n');
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = ready.lock().unwrap().take() {
                if v.get("ready").is_some() {
                    break;
                }
                let _ = child.kill();
                panic!(
                    "fm_consume_ci.py failed: {v}\n{}",
                    stderr_text.lock().unwrap()
                );
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "fm_consume_ci.py exited with {status} before it was ready:\n{}",
                    stderr_text.lock().unwrap()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "fm_consume_ci.py not ready within 60 s:\n{}",
                    stderr_text.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        CiConsumer {
            child,
            lines: all,
            stderr: stderr_text,
        }
    }

    /// Every message received so far (non-blocking): `{"topic", "id",
    /// "headers", "body", "valid", "errors", "schema"}` (plus
    /// `"rejected_by_client": true` for a message the client itself
    /// refused to decode or validate).
    pub fn messages(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    /// What the consumer wrote to stderr so far (the client's logs).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for CiConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
