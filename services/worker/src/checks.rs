//! Health checks the agent runs on its own resources when the health
//! service asks (docs/design.md "Resources and health"). Every configured check
//! of the resource's kind runs, each under a time limit; the resource
//! passes only if all pass. A kind with no checks passes: the agent
//! answered.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use warden_shared::config::CheckSpec;
use warden_shared::messages::{CheckReply, CheckResult, ErrorBody, MESSAGE_VERSION};
use warden_shared::resource::ResourceDecl;

/// Bytes of a failing command's output kept in its result.
const DETAIL_BYTES: usize = 500;

pub async fn run_all(specs: &[CheckSpec], resource: &ResourceDecl, limit: Duration) -> CheckReply {
    let mut results = Vec::with_capacity(specs.len());
    for spec in specs {
        let started = Instant::now();
        let timeout = spec.timeout.unwrap_or(limit);
        let (passed, detail) = match tokio::time::timeout(timeout, run_one(spec, resource)).await {
            Ok(r) => r,
            Err(_) => (false, format!("no result within {timeout:?}")),
        };
        results.push(CheckResult {
            name: spec.name.clone(),
            passed,
            detail,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    CheckReply {
        version: MESSAGE_VERSION,
        passed: results.iter().all(|r| r.passed),
        results,
        error: None,
    }
}

pub fn unknown_resource(name: &str) -> CheckReply {
    CheckReply {
        version: MESSAGE_VERSION,
        passed: false,
        results: Vec::new(),
        error: Some(ErrorBody::new(
            warden_shared::error::ErrorCode::UnknownResource,
            format!("this agent does not run on {name}"),
        )),
    }
}

async fn run_one(spec: &CheckSpec, r: &ResourceDecl) -> (bool, String) {
    let path = r.path.as_deref().unwrap_or("/");
    if let Some(argv) = &spec.command {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.replace("{path}", path).replace("{name}", &r.name))
            .collect();
        return command(&argv).await;
    }
    if let Some(min) = spec.min_free_mb {
        return free_disk(Path::new(path), min).await;
    }
    if let Some(host) = &spec.dns {
        return match tokio::net::lookup_host((host.as_str(), 0)).await {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => (true, format!("{host} resolves to {}", a.ip())),
                None => (false, format!("{host} has no address")),
            },
            Err(e) => (false, format!("cannot resolve {host}: {e}")),
        };
    }
    (false, "check has nothing to run".into())
}

async fn command(argv: &[String]) -> (bool, String) {
    let Some(program) = argv.first() else {
        return (false, "empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run {program}: {e}")),
    };
    // Dropped at the time limit: kill_on_drop ends the process.
    let output = match child.wait_with_output().await {
        Ok(o) => o,
        Err(e) => return (false, format!("{program}: {e}")),
    };
    let status = output.status;
    let mut out = output.stderr;
    out.extend_from_slice(&output.stdout);
    let start = out.len().saturating_sub(DETAIL_BYTES);
    let text = String::from_utf8_lossy(&out[start..]).trim().to_string();
    let words = match status.code() {
        Some(0) => format!("{} passed", argv.join(" ")),
        Some(c) => format!("{} exited {c}", argv.join(" ")),
        None => format!("{} was killed", argv.join(" ")),
    };
    let detail = if text.is_empty() {
        words
    } else {
        format!("{words}: {text}")
    };
    (status.success(), detail)
}

async fn free_disk(path: &Path, min_mb: u64) -> (bool, String) {
    // A directory not made yet lives on its nearest existing ancestor's
    // file system.
    let p = path
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let stat = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&p)).await;
    match stat {
        Ok(Ok(s)) => {
            let free_mb = s.f_bavail.saturating_mul(s.f_frsize) / (1024 * 1024);
            (
                free_mb >= min_mb,
                format!(
                    "{free_mb} MiB free in {} (need {min_mb} MiB)",
                    path.display()
                ),
            )
        }
        Ok(Err(e)) => (false, format!("cannot stat {}: {e}", path.display())),
        Err(e) => (false, format!("cannot stat {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(path: &Path) -> ResourceDecl {
        ResourceDecl {
            name: "host-a/checkout".into(),
            kind: "workcopy".into(),
            path: Some(path.display().to_string()),
            depends_on: None,
        }
    }

    fn spec(name: &str) -> CheckSpec {
        CheckSpec {
            name: name.into(),
            command: None,
            min_free_mb: None,
            dns: None,
            timeout: None,
        }
    }

    #[tokio::test]
    async fn every_check_runs_and_one_failure_fails_the_resource() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("marker"), "").expect("write");
        let marker = CheckSpec {
            command: Some(vec!["test".into(), "-f".into(), "{path}/marker".into()]),
            ..spec("marker")
        };
        let disk = CheckSpec {
            min_free_mb: Some(1),
            ..spec("disk")
        };
        // Where tasks will run need not exist yet.
        let later = decl(&dir.path().join("not/made/yet"));
        let r = run_all(std::slice::from_ref(&disk), &later, Duration::from_secs(5)).await;
        assert!(r.passed, "{r:?}");
        let huge = CheckSpec {
            min_free_mb: Some(u64::MAX / 2),
            ..spec("huge")
        };
        let r = decl(dir.path());
        let ok = run_all(&[marker.clone(), disk.clone()], &r, Duration::from_secs(5)).await;
        assert!(ok.passed, "{ok:?}");
        assert!(ok.results[1].detail.contains("MiB free"), "{ok:?}");

        std::fs::remove_file(dir.path().join("marker")).expect("rm");
        let bad = run_all(&[marker, disk, huge], &r, Duration::from_secs(5)).await;
        assert!(!bad.passed);
        let passed: Vec<bool> = bad.results.iter().map(|r| r.passed).collect();
        assert_eq!(passed, [false, true, false], "{bad:?}");
        assert!(bad.results[0].detail.contains("exited 1"), "{bad:?}");
    }

    #[tokio::test]
    async fn a_hanging_check_fails_at_its_time_limit() {
        let hang = CheckSpec {
            command: Some(vec!["sleep".into(), "30".into()]),
            timeout: Some(Duration::from_millis(200)),
            ..spec("hang")
        };
        let t0 = Instant::now();
        let r = run_all(&[hang], &decl(Path::new("/")), Duration::from_secs(60)).await;
        assert!(!r.passed);
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(r.results[0].detail.contains("no result within"), "{r:?}");
    }

    #[tokio::test]
    async fn missing_programs_and_unresolvable_names_fail_with_a_reason() {
        let missing = CheckSpec {
            command: Some(vec!["/nonexistent/warden-check".into()]),
            ..spec("missing")
        };
        let dns = CheckSpec {
            dns: Some("no-such-host.invalid".into()),
            ..spec("dns")
        };
        let r = run_all(
            &[missing, dns],
            &decl(Path::new("/")),
            Duration::from_secs(10),
        )
        .await;
        assert!(!r.passed);
        assert!(r.results[0].detail.contains("cannot run"), "{r:?}");
        assert!(!r.results[1].passed, "{r:?}");
        // No checks configured: the agent answered, that is the check.
        assert!(
            run_all(&[], &decl(Path::new("/")), Duration::from_secs(1))
                .await
                .passed
        );
    }
}
