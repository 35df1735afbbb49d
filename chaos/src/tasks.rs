//! The configuration of a chaos run: its tasks (shell scripts that log
//! what they run to the run log and then behave as their [`Kind`] says),
//! a trigger rule for its events, and short retry delays so a run drains
//! in minutes.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use crate::Kind;

/// Subject prefix of the chaos run's bus events (under the trigger's
/// default `warden.events.>`).
pub const EVENT_TOPIC: &str = "warden.events.chaos.build";

/// Retry policy of the run (also what the checker holds jobs to).
pub const MAX_ATTEMPTS: u32 = 4;
pub const POISON_LIMIT: u32 = 2;

/// Logs a line and ticks `alive` every 200 ms for `$WARDEN_ARG_TICKS`.
const PRELUDE: &str = r#"log() { echo "$1 $WARDEN_JOB_ID $WARDEN_ATTEMPT $(date +%s%3N)" >> "$CHAOS_RUN_LOG"; }
log start
n="${WARDEN_ARG_TICKS:-1}"
while [ "$n" -gt 0 ]; do sleep 0.2; log alive; n=$((n-1)); done
"#;

fn script(kind: Kind) -> String {
    let tail = match kind {
        Kind::Quick | Kind::Slow => "log end\nexit 0\n",
        Kind::Transient => {
            r#"if [ "$WARDEN_ATTEMPT" = 1 ]; then
  echo '{"blame":"third_party","detail":"network","description":"chaos: koji.example.org timed out"}' > "$WARDEN_STATUS_FILE"
  echo "requests.exceptions.ConnectTimeout: koji.example.org" >&2
  log end
  exit 1
fi
log end
exit 0
"#
        }
        Kind::Crash => {
            r#"echo 'Traceback (most recent call last):' >&2
echo '  File "/usr/lib/chaos/check.py", line 12, in <module>' >&2
echo 'ValueError: chaos: the task is broken' >&2
log end
exit 1
"#
        }
        Kind::Failed => "echo 'chaos: 3 tests failed' >&2\nlog end\nexit 1\n",
        // The task's parent is its guard, whose parent is the worker
        // (field 4 of /proc/<pid>/stat).
        Kind::Poison => {
            r#"log end
kill -9 "$(cut -d' ' -f4 /proc/$PPID/stat)"
sleep 60
"#
        }
    };
    format!("{PRELUDE}{tail}")
}

fn toml_str(s: &str) -> String {
    // A TOML basic string with escapes, one line.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The TOML config every process of the run reads.
pub fn config(
    nats_url: &str,
    run_log: &Path,
    session_timeout: Duration,
    sync_always_note: bool,
) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "# written by warden chaos");
    let _ = writeln!(
        t,
        "[nats]\nurl = {}\nreplicas = 3\nconnect_timeout = \"2s\"\n",
        toml_str(nats_url)
    );
    let _ = writeln!(
        t,
        "[fencing]\nsession_timeout = \"{}ms\"\n",
        session_timeout.as_millis()
    );
    let _ = writeln!(
        t,
        "[retry]\nmax_attempts = {MAX_ATTEMPTS}\npoison_limit = {POISON_LIMIT}\ninitial_delay = \"1s\"\nbackoff = 2.0\nmax_delay = \"4s\"\njitter = 0.1\n"
    );
    let _ = writeln!(
        t,
        "[health]\ncheck_timeout = \"5s\"\nrecheck_backoff = \"2s\"\nflap_window = \"2m\"\nflap_limit = 3\n\n[[health.checks.host]]\nname = \"free-disk\"\nmin_free_mb = 16\n"
    );
    let _ = writeln!(
        t,
        "[worker]\ncapacity = 2\nacquire_wait = \"2s\"\nshutdown_grace = \"2s\"\n"
    );
    let _ = writeln!(
        t,
        "[[trigger.rules]]\nname = \"chaos-event\"\ntopic = \"{EVENT_TOPIC}\"\ntasks = [\"{}\"]\nargs = {{ ticks = \"{{ticks}}\" }}\n",
        Kind::Quick.task()
    );
    for kind in Kind::ALL {
        let _ = writeln!(t, "[tasks.{}]", kind.task());
        let _ = writeln!(t, "command = [\"sh\", \"-c\", {}]", toml_str(&script(kind)));
        let verdicts = match kind {
            Kind::Failed => "{ 0 = \"passed\", 1 = \"failed\" }",
            _ => "{ 0 = \"passed\" }",
        };
        let _ = writeln!(t, "verdicts = {verdicts}");
        let _ = writeln!(t, "timeout = \"60s\"");
        let _ = writeln!(
            t,
            "env = {{ CHAOS_RUN_LOG = {} }}\n",
            toml_str(&run_log.display().to_string())
        );
    }
    if sync_always_note {
        let _ = writeln!(t, "# nats-server runs with sync_interval: always");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_loads_and_names_every_task() {
        let dir = tempfile_dir();
        let path = dir.join("chaos.toml");
        let text = config(
            "nats://127.0.0.1:1,nats://127.0.0.1:2",
            &dir.join("runs.log"),
            Duration::from_secs(10),
            false,
        );
        std::fs::write(&path, &text).expect("write");
        let c = warden_shared::Config::load(Some(&path)).expect("chaos config loads");
        for kind in Kind::ALL {
            assert!(c.tasks.contains_key(kind.task()), "{kind:?}");
        }
        assert_eq!(c.nats.replicas, 3);
        assert_eq!(c.trigger.rules.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("warden-chaos-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }
}
