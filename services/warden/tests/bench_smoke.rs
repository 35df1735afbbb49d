//! `warden bench` end to end at a small size: it spawns its own
//! nats-server, runs every service in-process, and exits non-zero if any
//! sampled job did not end FINISHED, including the retried ones (a crash
//! the classifier did not see as retryable would leave them CRASHED).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn small_bench_finishes_every_job_including_retried_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args([
            "bench",
            "--jobs",
            "300",
            "--in-flight",
            "32",
            "--workers",
            "2",
            "--sequential",
            "5",
            "--no-process",
            "--fail-rate",
            "0.2",
            "--steady-secs",
            "1",
            "--json",
        ])
        .env("WARDEN_LOG", "warn")
        .output()
        .expect("run warden bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("needed a retry; all finished"), "{stdout}");
    assert!(stdout.contains("of the clean run"), "{stdout}");
    // The ceiling measured in the same run, and Warden held to it.
    assert!(stdout.contains("bare JetStream burst:"), "{stdout}");
    assert!(stdout.contains("x the bare lifecycle's"), "{stdout}");
    // One JSON line per figure, the burst's with its ceiling, ratio and
    // CPU, the steady load's latencies among them.
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let burst = lines
        .iter()
        .find(|l| l["work"] == "no-op burst, jobs/s")
        .expect("the burst's line");
    assert!(burst["ceiling"].as_f64().unwrap() > 0.0, "{burst}");
    assert!(burst["ratio"].as_f64().unwrap() > 0.0, "{burst}");
    assert!(
        burst["usage"]["nats_cpu_s_per_1000"].as_f64().unwrap() > 0.0,
        "{burst}"
    );
    assert!(
        lines.iter().any(|l| l["work"]
            .as_str()
            .unwrap_or("")
            .contains("submit->RUNNING p99.9")),
        "{stdout}"
    );
}

/// `warden bench-search` at a small size: the index answers every search
/// and window, a source message finds its job, and a real API catches up
/// with a real bucket and answers over NATS.
#[test]
fn small_search_bench_runs_in_memory_and_over_the_bus() {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args([
            "bench-search",
            "--jobs",
            "20000",
            "--repeat",
            "2",
            "--bus-jobs",
            "300",
        ])
        .env("WARDEN_LOG", "warn")
        .output()
        .expect("run warden bench-search");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench-search failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("source message id")[3], "1", "{stdout}");
    assert_eq!(line("newest 100, no filter")[4], "20000", "{stdout}");
    assert!(
        stdout.contains("index caught up with the bucket"),
        "{stdout}"
    );
    assert_eq!(line("stats 30days")[2], "300", "{stdout}");
}

/// `warden bench-history` at a small size: it imports, searches and
/// counts an SQLite history, and a real recorder on a real nats-server
/// records and archives every job. Exit status 3 (a ceiling missed) is
/// no failure here: an unoptimised build on a busy machine proves nothing
/// about latency.
#[test]
fn small_history_bench_imports_searches_and_records_over_the_bus() {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args([
            "bench-history",
            "--jobs",
            "3000",
            "--repeat",
            "2",
            "--bus-jobs",
            "300",
        ])
        .env("WARDEN_LOG", "warn")
        .output()
        .expect("run warden bench-history");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "bench-history failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let matches = |label: &str| {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"));
        line.split('(')
            .nth(1)
            .and_then(|m| m.split(' ').next())
            .map(str::to_string)
    };
    assert!(stdout.contains("imported 3000 archived jobs"), "{stdout}");
    assert_eq!(matches("newest 100").as_deref(), Some("3000"), "{stdout}");
    // The window ends now; the oldest imported job may fall just before.
    let in_window: usize = matches("30 days").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!((2990..=3000).contains(&in_window), "{stdout}");
    // 300 finished jobs and the 1000 live ones every case has.
    assert!(
        stdout.contains("the recorder recorded 1300 jobs"),
        "{stdout}"
    );
}
