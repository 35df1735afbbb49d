//! `warden classify` without a bus: plain and JSON output, exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn warden(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(args)
        .env("WARDEN_LOG", "warn")
        .output()
        .expect("run warden")
}

#[test]
fn classifies_a_log_plain_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("build.log");
    // From https://github.com/hoytech/strfry/issues/41
    std::fs::write(
        &log,
        "g++: fatal error: Killed signal terminated program cc1plus\ncompilation terminated.\nmake: *** [golpe/rules.mk:28: build/config.o] Error 1\n",
    )
    .unwrap();
    let log = log.to_str().unwrap();
    let out = warden(&["classify", "--log", log, "--exit-code", "2"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("blame:       system"), "{text}");
    assert!(text.contains("detail:      oom"), "{text}");
    assert!(text.contains("rule:        allocation-failure"), "{text}");

    let status = dir.path().join("status");
    std::fs::write(&status, "{\"outcome\": 3}").unwrap();
    let out = warden(&[
        "classify",
        "--log",
        log,
        "--status",
        status.to_str().unwrap(),
        "--signal",
        "SIGKILL",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["blame", "detail", "description", "rule"] {
        assert!(v[key].is_string(), "{key} missing: {v}");
    }
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_64() {
    let out = warden(&["classify", "--log", "/nonexistent/build.log"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read /nonexistent/build.log"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("l");
    std::fs::write(&log, "x").unwrap();
    let out = warden(&[
        "classify",
        "--log",
        log.to_str().unwrap(),
        "--signal",
        "SIGWHAT",
    ]);
    assert_eq!(out.status.code(), Some(64));
}
