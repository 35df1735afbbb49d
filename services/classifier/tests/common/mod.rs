//! What the fixture tests (cases.rs) and the held-out test (heldout.rs)
//! share: a crash made from a log file as the worker would report it, and
//! the logs a folder holds.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use warden_shared::job::CrashInfo;

/// The crash a worker would report for `log`: its bytes as the worker
/// reads them (invalid UTF-8 replaced) and how the process ended.
pub fn crash_from_log(
    log: &Path,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
) -> CrashInfo {
    let bytes = std::fs::read(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    CrashInfo {
        exit_code,
        signal,
        timed_out,
        log_tail: String::from_utf8_lossy(&bytes).into_owned(),
        ..Default::default()
    }
}

/// The names of the files in `dir`, so a manifest can be compared with
/// what is on disk.
pub fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}
