//! `warden check`, the Nagios plugin, as Nagios runs it: the real binary,
//! one status line on stdout, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN,
//! perfdata after `|`.
//!
//! - Without a bus: `bus` is CRITICAL on a port nothing listens on,
//!   `queue-age` UNKNOWN; bad arguments are UNKNOWN (never clap's 2).
//! - A bus without Warden: `bus` names every missing service; `queue-age`
//!   is UNKNOWN because no scheduler answers.
//! - A running Warden with one worker in pool `default`: `bus` OK;
//!   `resources` OK for `default`, WARNING below its threshold, CRITICAL
//!   for a pool nobody serves; `queue-age` WARNING then CRITICAL while jobs
//!   wait in that pool; `shelved` OK, WARNING, CRITICAL as jobs whose only
//!   attempt failed are shelved; `crash-rate` for their blame.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use warden_e2e::{cli_ok, eventually, free_port, warden_bin, NatsServer, Scenario};

/// One run of `warden check`: exit code, stdout, stderr.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The one status line (asserting there is exactly one).
    fn line(&self) -> &str {
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "one status line on stdout, got {:?} (stderr {:?})",
            self.stdout,
            self.stderr
        );
        lines[0]
    }
}

fn check(url: &str, args: &[&str]) -> Run {
    // As Nagios runs it: no WARDEN_LOG, so no logs at all.
    let out = Command::new(warden_bin())
        .arg("check")
        .args(["--nats-url", url])
        .args(args)
        .env_remove("WARDEN_LOG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run warden check");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_run(r: &Run, code: i32, start: &str) {
    assert_eq!(
        r.code, code,
        "exit code; stdout {:?} stderr {:?}",
        r.stdout, r.stderr
    );
    assert!(
        r.line().starts_with(start),
        "{:?} should start with {start:?}",
        r.line()
    );
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("backtrace"),
        "{}",
        r.stderr
    );
}

/// Runs the check until it exits `code`; returns that run.
async fn until(url: &str, args: &[&str], code: i32, secs: u64) -> Run {
    let what = format!("warden check {} to exit {code}", args.join(" "));
    eventually(Duration::from_secs(secs), &what, || async {
        let r = check(url, args);
        if r.code == code {
            Some(r)
        } else {
            eprintln!("not yet ({}): {}", r.code, r.stdout.trim());
            None
        }
    })
    .await
}

#[test]
fn without_a_bus_bus_is_critical_the_rest_unknown_and_bad_arguments_unknown() {
    let nowhere = format!("nats://127.0.0.1:{}", free_port());

    let bus = check(&nowhere, &["bus"]);
    assert_run(
        &bus,
        2,
        &format!("WARDEN BUS CRITICAL - cannot reach NATS at {nowhere}: "),
    );
    assert!(
        bus.line().ends_with(" | 'services'=0;;6:;0;6"),
        "{}",
        bus.line()
    );
    assert!(bus.stderr.is_empty(), "nothing on stderr: {}", bus.stderr);

    let age = check(&nowhere, &["--warning", "300", "queue-age"]);
    assert_run(
        &age,
        3,
        &format!("WARDEN QUEUE-AGE UNKNOWN - cannot reach NATS at {nowhere}: "),
    );
    assert!(!age.line().contains('|'), "no perfdata without a value");

    // Arguments are checked before the bus is tried.
    for (args, line) in [
        (
            &["nonsense"][..],
            "WARDEN UNKNOWN - unknown check \"nonsense\": use bus, queue-age, shelved, crash-rate or resources",
        ),
        (
            &["--warning", "abc", "shelved"][..],
            "WARDEN SHELVED UNKNOWN - --warning \"abc\": not a number or a range (N, N:, ~:N, N:M, @N:M)",
        ),
        (
            &["--critical", "5:1", "queue-age"][..],
            "WARDEN QUEUE-AGE UNKNOWN - --critical \"5:1\": its start is above its end",
        ),
        (
            &["--blame", "everyone", "crash-rate"][..],
            "WARDEN CRASH-RATE UNKNOWN - --blame \"everyone\": use system, third_party, task or unknown",
        ),
        (
            &["--warning", "2", "resources"][..],
            "WARDEN RESOURCES UNKNOWN - resources needs --pool P",
        ),
        (
            &["--timeout", "soon", "bus"][..],
            "WARDEN BUS UNKNOWN - --timeout \"soon\": not a duration (e.g. 15m, 10s)",
        ),
        // clap's own usage errors: 3 as well, on one line.
        (
            &["--bogus", "bus"][..],
            "WARDEN UNKNOWN - bad arguments: unexpected argument '--bogus' found",
        ),
        (
            &[][..],
            "WARDEN UNKNOWN - bad arguments: the following required arguments were not provided: <WHAT>",
        ),
        (
            &["--warning"][..],
            "WARDEN UNKNOWN - bad arguments: a value is required for '--warning <N>'",
        ),
    ] {
        let r = check(&nowhere, args);
        assert_run(&r, 3, line);
    }
    // The config file is read first, and a bad one is UNKNOWN too (not 64).
    let r = check(&nowhere, &["--config", "/nonexistent/warden.toml", "bus"]);
    assert_run(&r, 3, "WARDEN BUS UNKNOWN - bad configuration: ");
}

#[test]
fn a_bus_without_warden_names_every_missing_service() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = check(&url, &["bus"]);
    assert_run(
        &bus,
        2,
        "WARDEN BUS CRITICAL - not answering: warden-api, warden-classifier, warden-fencing, \
         warden-health, warden-scheduler, warden-trigger (cannot read its consumer",
    );
    assert!(
        bus.line().contains(" | 'rtt'=") && bus.line().contains(" 'services'=0;;6:;0;6 "),
        "{}",
        bus.line()
    );
    let age = check(&url, &["queue-age"]);
    assert_run(
        &age,
        3,
        "WARDEN QUEUE-AGE UNKNOWN - no warden-scheduler answers on warden.sched.queue",
    );
    let shelved = check(&url, &["shelved"]);
    assert_run(
        &shelved,
        3,
        "WARDEN SHELVED UNKNOWN - no warden-api answers",
    );
}

const CONFIG: &str = r#"
[retry]
jitter = 0.0

# A mirror outage: third-party blame, retryable, so a job with one attempt
# is SHELVED after it.
[tasks.mirror]
command = ["sh", "-c", "echo '{\"blame\":\"third_party\",\"detail\":\"network\",\"description\":\"mirror unreachable\"}' > \"$WARDEN_STATUS_FILE\"; exit 3"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_warden_ok_warning_critical() {
    let s = Scenario::new().config(CONFIG).workers(1).up();
    let url = s.url();

    // bus: every service, and the trigger pulling from its consumer.
    let bus = until(&url, &["bus"], 0, 20).await;
    assert_run(&bus, 0, "WARDEN BUS OK - NATS answers in ");
    assert!(
        bus.line().contains(
            "all 6 services answer (warden-api, warden-classifier, warden-fencing, \
             warden-health, warden-scheduler, warden-trigger)"
        ),
        "{}",
        bus.line()
    );
    assert!(
        bus.line().contains(" 'services'=6;;6:;0;6 "),
        "{}",
        bus.line()
    );

    // resources: fewer than N healthy alerts.
    let ok = until(
        &url,
        &["--pool", "default", "-w", "1", "-c", "1", "resources"],
        0,
        20,
    )
    .await;
    assert_eq!(
        ok.line(),
        "WARDEN RESOURCES OK - 1 healthy resource in pool default \
         | 'healthy_default'=1;1:;1:;0; 'unhealthy_default'=0;;;0;"
    );
    let warn = check(
        &url,
        &["--pool", "default", "-w", "2", "-c", "1", "resources"],
    );
    assert_run(
        &warn,
        1,
        "WARDEN RESOURCES WARNING - 1 healthy resource in pool default",
    );
    let none = check(&url, &["--pool", "gpu", "-w", "2", "-c", "1", "resources"]);
    assert_eq!(none.code, 2);
    assert_eq!(
        none.line(),
        "WARDEN RESOURCES CRITICAL - no healthy resource in pool gpu \
         | 'healthy_gpu'=0;2:;1:;0; 'unhealthy_gpu'=0;;;0;"
    );

    // Nothing shelved, nothing waiting yet.
    let shelved = check(&url, &["--warning", "0", "--critical", "1", "shelved"]);
    assert_eq!(shelved.code, 0);
    assert_eq!(
        shelved.line(),
        "WARDEN SHELVED OK - no shelved job | 'shelved'=0;0;1;0;"
    );
    let age = check(&url, &["--warning", "0.5", "--critical", "2", "queue-age"]);
    assert_run(
        &age,
        0,
        "WARDEN QUEUE-AGE OK - no job waiting | 'oldest_wait'=0s;0.5;2;0;",
    );

    // Jobs in a pool no worker serves wait; two mirror jobs get one
    // attempt each and are shelved.
    for _ in 0..2 {
        cli_ok(&url, &["job", "submit", "noop", "--pool", "gpu"]);
    }
    for _ in 0..2 {
        cli_ok(&url, &["job", "submit", "mirror", "--max-attempts", "1"]);
    }

    // A wide critical threshold, so a slow machine cannot skip the warning.
    let age = until(&url, &["-w", "0.5", "-c", "60", "queue-age"], 1, 20).await;
    assert_run(&age, 1, "WARDEN QUEUE-AGE WARNING - oldest waiting job ");
    assert!(
        age.line()
            .contains("(pool gpu: 2 ready, no worker on a healthy resource serves it)"),
        "{}",
        age.line()
    );
    assert!(age.line().contains(" 'ready_gpu'=2;;;0;"), "{}", age.line());
    let age = until(&url, &["-w", "0.5", "-c", "2", "queue-age"], 2, 20).await;
    assert_run(&age, 2, "WARDEN QUEUE-AGE CRITICAL - oldest waiting job ");
    assert!(age.line().contains(" | 'oldest_wait'="), "{}", age.line());
    // Only the pool asked about.
    let default = check(
        &url,
        &["-w", "0.5", "-c", "2", "--pool", "default", "queue-age"],
    );
    assert_run(
        &default,
        0,
        "WARDEN QUEUE-AGE OK - no job waiting in pool default",
    );

    let shelved = until(&url, &["-w", "1", "-c", "5", "shelved"], 1, 30).await;
    assert_run(
        &shelved,
        1,
        "WARDEN SHELVED WARNING - 2 shelved jobs (newest: mirror ",
    );
    assert!(
        shelved
            .line()
            .contains(", third_party/network) | 'shelved'=2;1;5;0;"),
        "{}",
        shelved.line()
    );
    let shelved = check(&url, &["-w", "0", "-c", "1", "shelved"]);
    assert_run(&shelved, 2, "WARDEN SHELVED CRITICAL - 2 shelved jobs");

    // Two third-party jobs in 15 minutes: 0.13 per minute.
    let rate = check(
        &url,
        &[
            "-w",
            "0.1",
            "-c",
            "1",
            "--blame",
            "third_party",
            "crash-rate",
        ],
    );
    assert_eq!(rate.code, 1, "{}", rate.stdout);
    assert_eq!(
        rate.line(),
        "WARDEN CRASH-RATE WARNING - 0.13 crashes/min with blame third_party over 15m \
         (2 jobs last changed in the window carrying that blame) \
         | 'crash_rate_third_party'=0.133333;0.1;1;0; 'crashed_third_party'=2;;;0;"
    );
    let rate = check(
        &url,
        &[
            "-w",
            "0.1",
            "-c",
            "1",
            "--blame",
            "system",
            "--window",
            "1h",
            "crash-rate",
        ],
    );
    assert_run(
        &rate,
        0,
        "WARDEN CRASH-RATE OK - 0.00 crashes/min with blame system over 1h (0 jobs",
    );
}

/// What deploy/nagios/README.md promises: the read-only user of the
/// deploy's NATS permissions runs every check (and a wrong password is
/// UNKNOWN, the check's own set-up, not a hang or a bus outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_user_runs_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let conf = warden_testsupport::accounts_conf(dir.path());
    let s = Scenario::new()
        .nats(NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]))
        .config("[nats]\nuser = \"warden-service\"\npassword = \"service-pw\"")
        .workers(1)
        .up();
    let url = s.url();
    let readonly = dir.path().join("nagios.toml");
    std::fs::write(
        &readonly,
        "[nats]\nuser = \"warden-readonly\"\npassword = \"readonly-pw\"\n",
    )
    .unwrap();
    let ro = readonly.to_str().unwrap();

    let bus = until(&url, &["--config", ro, "bus"], 0, 20).await;
    assert_run(&bus, 0, "WARDEN BUS OK - ");
    let pool = until(
        &url,
        &[
            "--config",
            ro,
            "--pool",
            "default",
            "-w",
            "1",
            "-c",
            "1",
            "resources",
        ],
        0,
        20,
    )
    .await;
    assert_run(
        &pool,
        0,
        "WARDEN RESOURCES OK - 1 healthy resource in pool default",
    );
    for (args, start) in [
        (&["queue-age"][..], "WARDEN QUEUE-AGE OK - "),
        (&["shelved"][..], "WARDEN SHELVED OK - no shelved job"),
        (
            &["--blame", "system", "crash-rate"][..],
            "WARDEN CRASH-RATE OK - ",
        ),
    ] {
        let mut all = vec!["--config", ro];
        all.extend_from_slice(args);
        assert_run(&check(&url, &all), 0, start);
    }

    std::fs::write(
        &readonly,
        "[nats]\nuser = \"warden-readonly\"\npassword = \"wrong\"\n",
    )
    .unwrap();
    let denied = check(&url, &["--config", ro, "bus"]);
    assert_run(
        &denied,
        3,
        &format!("WARDEN BUS UNKNOWN - NATS at {url} refused the login: "),
    );
}
