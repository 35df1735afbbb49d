//! The chaos run as CI runs it: `warden chaos` on a 3-node cluster with two
//! replicas of every service and four workers, once with a fixed seed and
//! once with a random one (printed, so a failure can be replayed), each
//! for a minute of faults. It passes only with zero violations and no
//! unplanned service exit.

use std::process::Command;

use warden_e2e::warden_bin;

fn chaos(seed: Option<u64>) {
    let mut cmd = Command::new(warden_bin());
    cmd.args(["chaos", "--duration", "60s", "--drain", "150s"])
        .env("WARDEN_LOG", "warn");
    if let Some(s) = seed {
        cmd.args(["--seed", &s.to_string()]);
    }
    let out = cmd.output().expect("run warden chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "chaos run failed ({}):\n{stdout}\nstderr (tail):\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 4000)
    );
    assert!(stdout.contains("violations  0"), "{stdout}");
    assert!(stdout.contains("unplanned service exits 0,"), "{stdout}");
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// One test, two runs one after the other: each already loads the
/// machine with 19 processes.
#[test]
fn chaos_runs_with_a_fixed_and_a_random_seed_hold_every_invariant() {
    chaos(Some(20_261_201));
    chaos(None);
}
