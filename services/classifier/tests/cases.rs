//! The shipped rules against failure logs (tests/fixtures/cases.toml, each
//! log in tests/fixtures/logs/ with the public report it comes from): every
//! case must get its expected blame and detail. All mismatches are
//! reported at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use warden_classifier::{Classifier, CrashInput};
use warden_shared::Config;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    file: String,
    source: String,
    #[serde(default)]
    constructed: bool,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    timed_out: bool,
    blame: String,
    detail: String,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    case: Vec<Case>,
}

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("cases.toml")).expect("read cases.toml");
    toml::from_str::<Cases>(&text)
        .expect("cases.toml parses")
        .case
}

#[test]
fn shipped_rules_classify_every_fixture() {
    let classifier = Classifier::from_config(&Config::defaults()).expect("shipped rules compile");
    let cases = cases();
    let mut wrong = Vec::new();
    for c in &cases {
        let crash = common::crash_from_log(
            &fixtures().join("logs").join(&c.file),
            c.exit_code,
            c.signal,
            c.timed_out,
        );
        let got = classifier.classify(&CrashInput {
            task: "t",
            crash: &crash,
            resource: None,
        });
        let (said, want) = (
            format!("{}/{}", got.blame, got.detail),
            format!("{}/{}", c.blame, c.detail),
        );
        if said != want {
            wrong.push(format!(
                "{} ({}): expected {want}, got {said} (rule {}: {})",
                c.file, c.source, got.rule, got.description
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} misclassified:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// At least 25 real logs, each citing a public source; constructed cases a
/// small minority; every log file used, every detail the rules give covered.
#[test]
fn the_manifest_is_honest_and_complete() {
    let cases = cases();
    let real: Vec<&Case> = cases.iter().filter(|c| !c.constructed).collect();
    assert!(real.len() >= 25, "only {} real cases", real.len());
    assert!(
        cases.len() - real.len() <= real.len() / 5,
        "constructed cases must stay a small minority"
    );
    for c in &cases {
        if c.constructed {
            assert_eq!(c.source, "constructed", "{}", c.file);
        } else {
            assert!(
                c.source.starts_with("https://") && !c.source.contains(' '),
                "{}: cite the public report as a URL",
                c.file
            );
        }
    }
    let used: BTreeSet<String> = cases.iter().map(|c| c.file.clone()).collect();
    assert_eq!(
        used,
        common::files_in(&fixtures().join("logs")),
        "every log has a case and every case a log"
    );
    let covered: BTreeSet<&str> = real.iter().map(|c| c.detail.as_str()).collect();
    let rules: toml::Table = toml::from_str(warden_classifier::DEFAULT_RULES_TOML).unwrap();
    for r in rules["rules"].as_array().unwrap() {
        let detail = r["detail"].as_str().unwrap();
        assert!(
            covered.contains(detail),
            "no real log exercises a rule giving {detail}"
        );
    }
}
