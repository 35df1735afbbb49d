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
