//! `warden classify` without a bus, on the classifier's real-log fixtures:
//! plain and JSON output, operators' own rules, exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn warden(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(args)
        .env("WARDEN_LOG", "warn")
        .env_remove("WARDEN_CONFIG")
        .output()
        .expect("run warden")
}

/// A log from services/classifier/tests/fixtures/logs (see its cases.toml
/// for the public report each comes from).
fn fixture(name: &str) -> String {
    let p: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "../classifier/tests/fixtures/logs",
        name,
    ]
    .iter()
    .collect();
    assert!(p.exists(), "{}", p.display());
    p.to_str().unwrap().to_string()
}

#[test]
fn classifies_a_real_log_in_plain_text() {
    // From https://github.com/opensim-org/opensim-core/issues/3303
    let log = fixture("gcc-virtual-memory-exhausted.log");
    let out = warden(&["classify", "--log", &log, "--exit-code", "1"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("blame:       system"), "{text}");
    assert!(text.contains("detail:      oom"), "{text}");
    assert!(text.contains("rule:        allocation-failure"), "{text}");
    assert!(
        text.contains(
            "description: the task ran out of memory: virtual memory exhausted: Cannot allocate memory"
        ),
        "{text}"
    );
    assert!(text.contains("suspect:     resource"), "{text}");

    // From https://github.com/hoytech/strfry/issues/41: gcc says its
    // compiler was killed, and nothing says by whom: no guess.
    let log = fixture("gcc-killed-signal-make-j4.log");
    let out = warden(&["classify", "--log", &log, "--exit-code", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("blame:       unknown"), "{text}");
    assert!(text.contains("detail:      killed"), "{text}");
}

#[test]
fn classifies_a_real_log_as_json() {
    // From https://github.com/openshift/jenkins/issues/1774: the repository
    // host did not resolve, so the missing package is not the task's fault.
    let log = fixture("dnf-rhel8-baseos-unresolvable.log");
    let out = warden(&["classify", "--log", &log, "--exit-code", "1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blame"], "third_party", "{v}");
    assert_eq!(v["detail"], "dependency_missing", "{v}");
    assert_eq!(v["rule"], "repository-unreachable", "{v}");
    assert!(
        v["description"].as_str().unwrap().contains("repomd.xml"),
        "{v}"
    );

    // A status-file fault wins over every rule, whatever the signal.
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status");
    std::fs::write(
        &status,
        r#"{"blame": "task", "detail": "task_failure", "description": "3 tests failed"}"#,
    )
    .unwrap();
    let out = warden(&[
        "classify",
        "--log",
        &log,
        "--status",
        status.to_str().unwrap(),
        "--signal",
        "SIGKILL",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["blame"].as_str(),
            v["detail"].as_str(),
            v["rule"].as_str()
        ),
        (Some("task"), Some("task_failure"), Some("status_file")),
        "{v}"
    );
    assert_eq!(v["description"], "3 tests failed");
}

#[test]
fn an_operators_rule_from_config_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        r#"
[[classifier.rules]]
name = "our-mirror"
task = "rpm-build"
log = 'Could not resolve host: (base-\S+)'
detail = "network"
description = "our internal mirror {match} is down again ({task}, exit {exit_code})"
"#,
    )
    .unwrap();
    let log = fixture("dnf-rhel8-baseos-unresolvable.log");
    let config = config.to_str().unwrap();
    let run = |task: &str| {
        let out = warden(&[
            "--config",
            config,
            "classify",
            "--log",
            &log,
            "--exit-code",
            "1",
            "--task",
            task,
            "--json",
        ]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = run("rpm-build");
    assert_eq!(v["rule"], "our-mirror", "{v}");
    assert_eq!(v["blame"], "third_party", "the catalogue's blame: {v}");
    assert!(
        v["description"]
            .as_str()
            .unwrap()
            .ends_with("is down again (rpm-build, exit 1)"),
        "{v}"
    );
    // Another task: the rule does not apply, the shipped ones decide.
    assert_eq!(run("docs")["rule"], "repository-unreachable");
}

#[test]
fn only_the_tail_of_a_huge_log_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("big.log");
    // The OOM line is 4 MiB before the end, beyond max_scan_bytes (1 MiB).
    let mut text = String::from("Out of memory: Killed process 1 (cc1plus)\n");
    text.push_str(&"building...\n".repeat((4 << 20) / 12));
    std::fs::write(&log, &text).unwrap();
    let out = warden(&["classify", "--log", log.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["detail"], "unclassified", "{v}");
}

#[test]
fn bad_input_is_an_error_with_exit_64() {
    let out = warden(&["classify", "--log", "/nonexistent/build.log"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read /nonexistent/build.log"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let log = fixture("gcc-killed-signal-make-j4.log");
    let out = warden(&["classify", "--log", &log, "--signal", "SIGWHAT"]);
    assert_eq!(out.status.code(), Some(64));

    // A pattern that does not compile names its rule.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        "[[classifier.rules]]\nname = \"broken\"\nlog = \"(unclosed\"\ndetail = \"network\"\ndescription = \"x\"\n",
    )
    .unwrap();
    let out = warden(&[
        "--config",
        config.to_str().unwrap(),
        "classify",
        "--log",
        &log,
    ]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(broken)"), "{err}");
}

#[test]
fn explain_shows_every_rule_and_why_the_first_match_won() {
    // From https://github.com/openshift/jenkins/issues/1774: dnf could not
    // download the metadata because the host did not resolve: the
    // repository rule and the network rule both match; the repository rule
    // comes first and decides.
    let log = fixture("dnf-rhel8-baseos-unresolvable.log");
    let out = warden(&["classify", "--log", &log, "--exit-code", "1", "--explain"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |rule: &str| {
        text.lines()
            .find(|l| l.contains(&format!(". {rule} ")))
            .unwrap_or_else(|| panic!("no line for {rule}:\n{text}"))
            .to_string()
    };
    assert!(
        line("repository-unreachable").starts_with("=>"),
        "the deciding rule is marked:\n{text}"
    );
    assert!(
        line("repository-unreachable").contains("matched: "),
        "{text}"
    );
    assert!(
        line("network").starts_with(" +"),
        "a later match is shown as such:\n{text}"
    );
    assert!(
        line("time-limit").contains("only for a task killed at its time limit"),
        "{text}"
    );
    assert!(
        line("killed-exit-code").contains("not for exit code 1"),
        "{text}"
    );
    assert!(
        line("oom-killer").contains("its log pattern is not in the log"),
        "{text}"
    );
    let why = text.lines().find(|l| l.starts_with("why: ")).unwrap();
    assert!(
        why.contains("repository-unreachable is the first rule that matched")
            && why.contains("1 later rule also matched (network)"),
        "{why}"
    );

    // As JSON: every rule, in order, with its result.
    let out = warden(&[
        "classify",
        "--log",
        &log,
        "--exit-code",
        "1",
        "--explain",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["rule"], "repository-unreachable", "{v}");
    let rules = v["rules"].as_array().unwrap();
    assert!(rules.len() > 10, "{v}");
    let first_match = rules
        .iter()
        .find(|r| r["check"]["result"] == "matched")
        .unwrap();
    assert_eq!(first_match["rule"], "repository-unreachable");
    assert_eq!(first_match["origin"], "shipped");
    assert_eq!(v["status_file"]["read"], "absent");
}
