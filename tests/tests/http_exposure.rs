//! `warden up` refuses to serve the HTTP API beyond loopback without a
//! write token, with a message naming the key; with one it warns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use warden_e2e::warden_bin;

#[test]
fn warden_up_beyond_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(warden_bin())
        .args(["up", "--http", "0.0.0.0:0", "--workers", "0"])
        .args(["--nats-url", "nats://127.0.0.1:1", "--data-dir"])
        .arg(dir.path())
        .env("WARDEN_LOG", "warn")
        .env_remove("WARDEN_HTTP_TOKEN")
        .output()
        .expect("run warden up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("http.token") && stderr.contains("WARDEN_HTTP_TOKEN"),
        "{stderr}"
    );
}
