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
