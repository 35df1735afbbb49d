//! The shipped rules against real failure logs (tests/fixtures/cases.toml,
//! each with its public source): every case must get its expected blame and
//! detail. All mismatches are reported at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde::Deserialize;
use warden_classifier::{Classifier, CrashInput};
use warden_shared::job::CrashInfo;
use warden_shared::Config;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    source: String,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    timed_out: bool,
    expect: String,
    log: String,
}

#[derive(Deserialize)]
struct Cases {
    case: Vec<Case>,
}

#[test]
fn shipped_rules_classify_every_real_log() {
    let text = include_str!("fixtures/cases.toml");
    let cases: Cases = toml::from_str(text).expect("cases.toml parses");
    assert!(cases.case.len() >= 25, "only {} cases", cases.case.len());
    let classifier = Classifier::from_config(&Config::defaults()).expect("shipped rules compile");
    let mut wrong = Vec::new();
    for c in &cases.case {
        assert!(
            c.source.starts_with("https://"),
            "{}: cite a source",
            c.source
        );
        let crash = CrashInfo {
            exit_code: c.exit_code,
            signal: c.signal,
            timed_out: c.timed_out,
            log_tail: c.log.clone(),
            ..Default::default()
        };
        let got = classifier.classify(&CrashInput {
            task: "t",
            crash: &crash,
            resource: None,
        });
        let said = format!("{}/{}", got.blame, got.detail);
        if said != c.expect {
            wrong.push(format!(
                "{}: expected {}, got {said} (rule {}: {})",
                c.source, c.expect, got.rule, got.description
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} misclassified:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
