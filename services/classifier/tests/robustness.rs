//! The classifier never takes a service down: pathological patterns, huge
//! logs, binary garbage and invalid UTF-8 each give a bounded result.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use warden_classifier::{Classifier, CrashInput, MAX_DESCRIPTION};
use warden_shared::job::CrashInfo;
use warden_shared::Config;

fn classifier(extra: &str) -> Classifier {
    Classifier::from_config(&Config::from_parts(Some(extra), Vec::new()).expect("config"))
        .expect("rules compile")
}

fn classify(
    c: &Classifier,
    log: String,
    status: Option<String>,
) -> warden_shared::messages::Classification {
    let crash = CrashInfo {
        exit_code: Some(1),
        log_tail: log,
        status_file: status,
        ..Default::default()
    };
    c.classify(&CrashInput {
        task: "t",
        crash: &crash,
        resource: None,
    })
}

/// Deterministic pseudo-random bytes.
fn garbage(n: usize, seed: u64) -> Vec<u8> {
    warden_testsupport::XorShift::new(seed).bytes(n)
}

#[test]
fn catastrophic_patterns_over_a_10_mib_log_finish() {
    // Exponential in a backtracking engine; linear in `regex`.
    let c = classifier(
        r#"
[classifier]
max_scan_bytes = 16777216

[[classifier.rules]]
name = "nested"
log = "(a+)+$"
detail = "network"
description = "x"

[[classifier.rules]]
name = "alternation"
log = "(x|x|x)*y"
detail = "network"
description = "x"
"#,
    );
    let mut log = "a".repeat(10 << 20);
    log.push('!');
    let t = Instant::now();
    let got = classify(&c, log, None);
    // Generous: the point is that it ends at all (a backtracking engine
    // would not in the lifetime of the machine).
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(got.description.chars().count() <= MAX_DESCRIPTION);
}

#[test]
fn only_the_tail_of_a_huge_log_is_scanned() {
    let c = classifier("");
    // The OOM line is 10 MiB before the end: beyond max_scan_bytes (1 MiB).
    let mut log = String::from("Out of memory: Killed process 1 (cc1plus)\n");
    log.push_str(&"building...\n".repeat(10 << 20 >> 4));
    let got = classify(&c, log.clone(), None);
    assert_ne!(got.detail, "oom", "the line was out of range");
    // Near the end it is found.
    log.push_str("Out of memory: Killed process 2 (ld)\n");
    assert_eq!(classify(&c, log, None).detail, "oom");
}

#[test]
fn binary_garbage_and_invalid_utf8_give_a_bounded_result() {
    let c = classifier("");
    for seed in 1..20u64 {
        let bytes = garbage(64 * 1024, seed);
        // What the worker and `warden classify` do with bytes.
        let log = String::from_utf8_lossy(&bytes).into_owned();
        let status = String::from_utf8_lossy(&garbage(4096, seed + 100)).into_owned();
        let got = classify(&c, log, Some(status));
        assert!(got.description.chars().count() <= MAX_DESCRIPTION);
        assert!(
            !got.description.chars().any(char::is_control),
            "{:?}",
            got.description
        );
        assert!(!got.detail.is_empty() && !got.rule.is_empty());
    }
    let invalid =
        String::from_utf8_lossy(b"\xff\xfe\xfd No space left on device \xc3\x28").into_owned();
    assert_eq!(classify(&c, invalid, None).detail, "disk_full");
}

#[test]
fn a_huge_status_file_and_description_are_bounded() {
    let c = classifier("");
    let fault = format!(
        r#"{{"blame":"third_party","detail":"network","description":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let got = classify(&c, String::new(), Some(fault));
    assert_eq!(got.rule, "status_file");
    assert!(got.description.chars().count() <= MAX_DESCRIPTION);
    let junk = "{".repeat(1 << 20);
    let got = classify(&c, String::new(), Some(junk));
    assert_eq!(got.detail, "status_file_invalid");
    assert!(got.description.chars().count() <= MAX_DESCRIPTION);
}

#[test]
fn arbitrary_inputs_never_panic() {
    let c = classifier("");
    for seed in 1..300u64 {
        let n = (seed as usize * 7919) % 5000;
        let text = String::from_utf8_lossy(&garbage(n, seed)).into_owned();
        let crash = CrashInfo {
            exit_code: (seed % 3 == 0).then_some((seed % 256) as i32),
            signal: (seed % 5 == 0).then_some((seed % 32) as i32),
            timed_out: seed % 11 == 0,
            log_tail: text.clone(),
            status_file: (seed % 2 == 0).then(|| text.chars().rev().collect()),
            duration_ms: seed,
            resources: Vec::new(),
        };
        let input = CrashInput {
            task: "t",
            crash: &crash,
            resource: None,
        };
        let got = c.classify(&input);
        assert!(got.description.chars().count() <= MAX_DESCRIPTION);
        // The explanation never disagrees with the decision.
        assert_eq!(c.explain(&input).decision, got, "seed {seed}");
    }
}

#[test]
fn explain_agrees_with_classify_on_every_fixture_and_garbage_with_a_match_inside() {
    let c = classifier("");
    // A match that starts and ends next to multi-byte characters: the
    // matched line is cut at line ends, never inside a character.
    for seed in 1..200u64 {
        let mut text = String::from_utf8_lossy(&garbage(300, seed)).into_owned();
        text.push_str("é: No space left on device ü");
        text.push_str(&String::from_utf8_lossy(&garbage(200, seed + 1)));
        let crash = CrashInfo {
            exit_code: Some(1),
            log_tail: text,
            ..Default::default()
        };
        let input = CrashInput {
            task: "t",
            crash: &crash,
            resource: None,
        };
        let got = c.classify(&input);
        assert_eq!(c.explain(&input).decision, got, "seed {seed}");
        assert!(
            got.description.contains("No space left on device"),
            "seed {seed}: {got:?}"
        );
    }
}
