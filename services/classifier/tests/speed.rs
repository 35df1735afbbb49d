//! How long the shipped rules take on a 1 MiB log (the default
//! `classifier.max_scan_bytes`, so the most any crash costs), against one
//! literal search over the same bytes measured in the same run (the least
//! any scan of them can cost). A benchmark, not a timed test: it prints the
//! figures and asserts only the classifications. Run it with
//! `cargo test --release -p warden-classifier --test speed -- --nocapture`
//! for release figures; the target is well under 10 ms per log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use warden_classifier::{Classifier, CrashInput};
use warden_shared::job::CrashInfo;
use warden_shared::Config;

const MIB: usize = 1 << 20;
const ROUNDS: usize = 15;

/// A build log with no failure in it: the worst case, as every rule scans
/// all of it and none stops early.
fn clean_build_log(bytes: usize) -> String {
    let lines = [
        "gcc -O2 -g -pipe -Wall -Werror=format-security -fexceptions -c src/module_17.c -o build/module_17.o",
        "  CC       lib/libfoo_la-parser.lo",
        "make[2]: Entering directory '/builddir/build/BUILD/foo-1.2.3/src'",
        "Requirement already satisfied: setuptools in /usr/lib/python3.12/site-packages (69.0.3)",
        "test_parse_header (tests.test_parser.ParserTest.test_parse_header) ... ok",
        "+ install -m 0644 -p docs/foo.1 /builddir/build/BUILDROOT/foo-1.2.3-1.fc41.x86_64/usr/share/man/man1/",
        "[ 42%] Building CXX object src/CMakeFiles/foo.dir/engine/scheduler.cpp.o",
        "Downloading https://files.pythonhosted.org/packages/ab/cd/foo-1.0-py3-none-any.whl (123 kB)",
    ];
    let mut out = String::with_capacity(bytes + 200);
    let mut i = 0usize;
    while out.len() < bytes {
        out.push_str(lines[i % lines.len()]);
        out.push('\n');
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    out.truncate(bytes);
    out
}

fn crash(log: String, exit: i32) -> CrashInfo {
    CrashInfo {
        exit_code: Some(exit),
        log_tail: log,
        ..Default::default()
    }
}

/// Median and slowest of `ROUNDS` runs of `f`.
fn time(mut f: impl FnMut()) -> (Duration, Duration) {
    let mut runs: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    runs.sort();
    (runs[ROUNDS / 2], runs[ROUNDS - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
fn a_one_mib_log_is_classified_in_milliseconds() {
    let classifier = Classifier::from_config(&Config::defaults()).unwrap();
    let clean = clean_build_log(MIB);
    let mut failing = clean_build_log(MIB - 200);
    failing.push_str("\nerror: Bad exit status from /var/tmp/rpm-tmp.Q2w3E4 (%build)\n");
    let mut disk = clean_build_log(MIB - 200);
    disk.push_str("\ncp: error writing 'out/big.img': No space left on device\n");
    let mut noise = Vec::with_capacity(MIB);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while noise.len() < MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let noise = String::from_utf8_lossy(&noise[..MIB]).into_owned();
    let one_line = "x".repeat(MIB);

    let cases: [(&str, CrashInfo, &str); 5] = [
        (
            "clean build log, no rule matches",
            crash(clean, 1),
            "unclassified",
        ),
        (
            "rpmbuild failure at the end",
            crash(failing, 1),
            "task_failure",
        ),
        ("disk full at the end", crash(disk, 1), "disk_full"),
        ("random bytes", crash(noise, 1), "unclassified"),
        ("one 1 MiB line", crash(one_line, 1), "unclassified"),
    ];
    println!(
        "\nclassifier, {} rules, 1 MiB logs, median (slowest) of {ROUNDS} runs:",
        classifier.rule_names().count()
    );
    println!(
        "{:<34} {:>16} {:>16} {:>18} {:>8}",
        "log", "classify ms", "explain ms", "one scan ms", "ratio"
    );
    let needle = regex::Regex::new("zq9xj_never_present").unwrap();
    for (name, info, want) in &cases {
        let input = CrashInput {
            task: "t",
            crash: info,
            resource: None,
        };
        let got = classifier.classify(&input);
        assert_eq!(got.detail, *want, "{name}: {got:?}");
        let (classify, classify_max) = time(|| {
            std::hint::black_box(classifier.classify(&input));
        });
        let (explain, explain_max) = time(|| {
            std::hint::black_box(classifier.explain(&input));
        });
        let (scan, scan_max) = time(|| {
            std::hint::black_box(needle.is_match(&info.log_tail));
        });
        println!(
            "{name:<34} {:>7.2} ({:>6.2}) {:>7.2} ({:>6.2}) {:>8.3} ({:>7.3}) {:>7.0}x",
            ms(classify),
            ms(classify_max),
            ms(explain),
            ms(explain_max),
            ms(scan),
            ms(scan_max),
            classify.as_secs_f64() / scan.as_secs_f64().max(1e-9),
        );
    }
    println!("target: well under 10 ms per log (release build)");
}
