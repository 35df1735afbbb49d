//! `warden up --secure`: its own nats-server with TLS, client certificates
//! and the shipped per-role users, every service and worker logged in as
//! its role; a job runs to FINISHED through it, a CLI connects with the
//! config snippet it wrote, and a plain client or one without a
//! certificate is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use warden_e2e::{free_port, warden_bin, Warden};
use warden_shared::runtime::Connect;
use warden_shared::Config;
use warden_testsupport::plain_client_answer;

fn warden_with(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(warden_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("WARDEN_LOG", "warn")
        .output()
        .expect("run warden")
}

#[tokio::test]
async fn a_secured_warden_up_runs_a_job_and_refuses_plain_clients() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut warden = Warden::up_local_with(dir.path(), port, "", 1, &["--secure"]);
    let secure = dir.path().join("data").join("secure");

    // A CLI with the service's snippet submits a job; the worker runs it.
    let service = secure.join("client-service.toml");
    let out = warden_with(
        &service,
        &["job", "submit", "noop", "--wait", "--timeout", "60"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("FINISHED"),
        "submit over TLS: {}\n{stdout}\n{}\nlog:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        warden.log_text()
    );
    // Its bot is registered (only registered bots get a session there).
    let out = warden_with(&service, &["bot", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("local-1"),
        "the local bot is in the registry: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The read-only snippet lists it.
    let out = warden_with(&secure.join("client-readonly.toml"), &["job", "list"]);
    assert!(
        out.status.success(),
        "list as readonly: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("noop"));

    // No TLS: never a PONG.
    let said = plain_client_answer(port);
    assert!(said.contains("tls_required"), "{said}");
    assert!(!said.contains("PONG"), "a plain client is refused: {said}");

    // TLS and the right password, but no client certificate: refused.
    let text = std::fs::read_to_string(&service).unwrap();
    let mut c = Config::from_parts(Some(&text), []).unwrap();
    c.nats.tls_cert_file = None;
    c.nats.tls_key_file = None;
    let refused = Connect::new(&c, "test")
        .short_lived(Duration::from_secs(5), 0)
        .client()
        .await;
    assert!(refused.is_err(), "no client certificate: refused");
    // And with it, the snippet's login connects.
    let c = Config::from_parts(Some(&text), []).unwrap();
    Connect::new(&c, "test")
        .short_lived(Duration::from_secs(5), 0)
        .client()
        .await
        .expect("the snippet connects");

    // The banner says where the CLI snippet is and shows no password.
    let log = warden.log_text();
    assert!(log.contains("client-readonly.toml"), "{log}");
    let passwords = std::fs::read_to_string(secure.join("passwords")).unwrap();
    for line in passwords.lines() {
        let pw = line.split_once(' ').unwrap().1;
        assert!(!log.contains(pw), "a password in the log");
    }
    assert_eq!(warden.stop(), Some(0), "{}", warden.log_text());
}
