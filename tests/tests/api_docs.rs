//! docs/api.md cannot drift from the code: its external-executor flow
//! (the block marked `<!-- test: executor-flow -->`) runs as written, with
//! `bash -euo pipefail`, curl and jq, against a live `warden up`, with the
//! task config the page shows (`<!-- test: config -->`); then every
//! `<!-- test: example -->` block runs against the same instance. Every
//! shell block carries a marker, every excerpt is a piece of the flow,
//! and every operation of the OpenAPI document has an example.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use warden_e2e::{entries, entry, Scenario};

const API_MD: &str = include_str!("../../docs/api.md");
const OPENAPI: &str = include_str!("../../services/api/openapi.json");
const TOKEN: &str = "docs-t0ken";

/// The test's own settings, beside the page's task: writes need a token,
/// and a retried job waits long enough that the flow's second take gets
/// the second job, as the page says.
const CONFIG: &str = r#"
[http]
token = "docs-t0ken"

[retry]
initial_delay = "1h"
max_delay = "2h"
"#;

struct Block {
    /// The marker's word: executor-flow, example, excerpt, config, not-run.
    kind: Option<String>,
    lang: String,
    body: String,
    line: usize,
}

fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = md.lines().enumerate();
    let mut marker: Option<String> = None;
    while let Some((n, line)) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push(Block {
                kind: marker.take(),
                lang: lang.trim().to_string(),
                body,
                line: n + 1,
            });
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        marker = line
            .trim()
            .strip_prefix("<!-- test:")
            .and_then(|m| m.strip_suffix("-->"))
            .and_then(|m| m.split_whitespace().next())
            .map(str::to_string);
    }
    out
}

fn the(blocks: &[Block], kind: &str) -> String {
    let found: Vec<&Block> = blocks
        .iter()
        .filter(|b| b.kind.as_deref() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "docs/api.md needs exactly one {kind} block");
    found[0].body.clone()
}

fn need(tool: &str) {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "docs/api.md's examples need {tool}: install it (Debian: apt-get install {tool})"
    );
}

/// Runs a block with `bash -euo pipefail`; returns stdout, or panics
/// with everything it printed.
async fn run(what: &str, script: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} ran for more than 120 s:\n{script}"))
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

#[test]
fn every_shell_block_is_marked_excerpts_come_from_the_flow_and_every_operation_has_an_example() {
    let blocks = blocks(API_MD);
    for b in blocks.iter().filter(|b| b.lang == "sh") {
        let kind = b.kind.as_deref().unwrap_or_else(|| {
            panic!(
                "docs/api.md:{}: a sh block without a <!-- test: KIND --> marker",
                b.line
            )
        });
        assert!(
            ["executor-flow", "example", "excerpt", "not-run"].contains(&kind),
            "docs/api.md:{}: unknown marker {kind}",
            b.line
        );
    }
    let flow = the(&blocks, "executor-flow");
    for b in blocks
        .iter()
        .filter(|b| b.kind.as_deref() == Some("excerpt"))
    {
        for l in b.body.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                flow.lines().any(|f| f == l),
                "docs/api.md:{}: excerpt line not in the executor flow: {l}",
                b.line
            );
        }
    }
    let shown: Vec<&str> = blocks
        .iter()
        .filter(|b| {
            matches!(
                b.kind.as_deref(),
                Some("executor-flow" | "example" | "excerpt")
            )
        })
        .flat_map(|b| b.body.lines())
        .collect();
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let url = format!("$WARDEN{}", path.replace("{id}", "$ID"));
            let post = method == "post";
            let example = shown.iter().any(|l| {
                l.split(['"', '?'])
                    .any(|part| part == url || part == url.replace("$ID", "$ID2"))
                    && l.contains("-X POST") == post
            });
            assert!(
                example,
                "docs/api.md has no tested curl example of {} {path}",
                method.to_uppercase()
            );
            if let Some(subject) = op["x-nats-subject"].as_str() {
                assert!(
                    API_MD.contains(&format!("`{subject}`")),
                    "docs/api.md does not name {subject}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_flow_and_every_example_run_against_a_live_warden() {
    need("curl");
    need("jq");
    let blocks = blocks(API_MD);
    let flow = the(&blocks, "executor-flow");
    let s = Scenario::new()
        .config(&the(&blocks, "config"))
        .config(CONFIG)
        .up();
    let base = s.warden.http.clone();
    let env = [("WARDEN", base.as_str()), ("TOKEN", TOKEN)];

    let out = run("the executor flow", &flow, &env).await;
    println!("--- the executor flow printed\n{out}");
    assert!(
        out.contains("stale_execution") && out.contains("HTTP 409"),
        "the stale token was not refused:\n{out}"
    );
    let errors: Vec<&str> = out.lines().filter(|l| l.contains("\"error\"")).collect();
    assert_eq!(errors.len(), 1, "only the stale token is an error:\n{out}");

    // The jobs the flow made: the crashed one retried, the other finished.
    let list = s.get("/api/v1/jobs?task=integration").await;
    assert_eq!(list["total"], 2, "{list}");
    let id_of = |state: &str| -> String {
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["state"] == state)
            .unwrap_or_else(|| panic!("no {state} job: {list}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (crashed, finished) = (id_of("SCHEDULED"), id_of("FINISHED"));
    // The stale RUNNING repeats a report the scheduler already applied for
    // that attempt: it is dropped as a duplicate and changes nothing.
    let job = s.job(&crashed).await;
    assert_eq!(job["blame"], "third_party", "{job}");
    assert_eq!(job["detail"], "network", "{job}");
    assert_eq!(job["description"], "koji hub did not answer", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    assert!(job["not_before"].is_string(), "a delayed retry: {job}");
    assert!(job.get("lease").is_none(), "{job}");
    let crash = entry(&job, "crash");
    assert_eq!(crash["bot_id"], "buildbot-7", "{job}");
    assert!(
        crash["note"]
            .as_str()
            .unwrap()
            .contains("third_party/network"),
        "{job}"
    );
    assert!(
        !entries(&job, "start").is_empty() && !entries(&job, "retry").is_empty(),
        "{job}"
    );

    let job = s.job(&finished).await;
    assert_eq!(
        (&job["outcome"], &job["attempt"], &job["priority"]),
        (&Value::from("PASSED"), &Value::from(1), &Value::from(10)),
        "{job}"
    );
    let finish = entry(&job, "finish");
    assert_eq!(finish["bot_id"], "buildbot-7", "{job}");

    // Every example, in the page's order, on the crashed job.
    let env = [
        ("WARDEN", base.as_str()),
        ("TOKEN", TOKEN),
        ("ID", crashed.as_str()),
    ];
    let examples: Vec<&Block> = blocks
        .iter()
        .filter(|b| b.kind.as_deref() == Some("example"))
        .collect();
    assert!(examples.len() >= 9, "only {} examples", examples.len());
    for b in examples {
        let what = format!("the example at docs/api.md:{}", b.line);
        let out = run(&what, &b.body, &env).await;
        println!("--- {what} printed\n{out}");
        assert!(!out.trim().is_empty(), "{what} printed nothing");
        assert!(
            !out.contains("\"error\""),
            "{what} answered an error:\n{}\n---\n{out}",
            b.body
        );
    }
    // The examples cancelled, then retried it.
    let job = s.job(&crashed).await;
    assert_eq!(job["state"], "SCHEDULED", "{job}");
    let actions: Vec<&str> = job["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["actor"] == "api")
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "cancel", "retry"], "{job}");
    let list = s.get("/api/v1/jobs?task=integration").await;
    assert_eq!(list["total"], 3, "the create example made one job: {list}");
}
