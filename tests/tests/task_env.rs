//! A task starts from a cleared environment: the worker's NATS user and
//! password, its HTTP token and its credentials-file variables never reach
//! it; the allowlist (built-in and `worker.task_env`) and Warden's own
//! variables do (docs/security.md "Tasks and the worker's secrets").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use warden_e2e::{warden_bin, Proc, Scenario};

const CONFIG: &str = r#"
[worker]
task_env = ["CI_EXTRA"]

[tasks.envdump]
command = ["sh", "-c", "env > \"$WARDEN_ARG_OUT\""]
env = { FIXED_ENTRY = "fixed" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sees_none_of_the_workers_secrets() {
    let s = Scenario::new().config(CONFIG).workers(0).up();
    let config = s.dir().join("worker.toml");
    std::fs::write(&config, s.config_text()).unwrap();
    let creds = s.dir().join("worker.creds");
    let worker = Proc(
        Command::new(warden_bin())
            .args(["worker", "--bot-id", "env-bot", "--nats-url", &s.url()])
            .arg("--config")
            .arg(&config)
            .env("WARDEN_LOG", "warn")
            // What a worker on a secured fleet has in its environment (the
            // test server has no auth, so it ignores user and password).
            .env("WARDEN_NATS_USER", "warden-worker")
            .env("WARDEN_NATS_PASSWORD", "worker-pw-e2e")
            .env("WARDEN_HTTP_TOKEN", "http-token-e2e")
            .env("NATS_CREDS", &creds)
            .env("NATS_PASSWORD", "worker-pw-e2e")
            .env("CI_EXTRA", "allowed")
            .env("NOT_LISTED", "kept-out")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn warden worker"),
    );
    s.wait_active_session("env-bot", Duration::from_secs(20))
        .await;

    let out = s.dir().join("task-env.txt");
    let id = s.submit(&["envdump", "--arg", &format!("out={}", out.display())]);
    let job = s.wait_job(&id, "FINISHED", Duration::from_secs(30)).await;
    assert_eq!(job["outcome"], "passed", "{job}");
    drop(worker);

    let text = std::fs::read_to_string(&out).unwrap();
    let env: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    for secret in [
        "WARDEN_NATS_USER",
        "WARDEN_NATS_PASSWORD",
        "WARDEN_HTTP_TOKEN",
        "NATS_CREDS",
        "NATS_PASSWORD",
        "NOT_LISTED",
        "WARDEN_LOG",
    ] {
        assert!(
            !env.contains_key(secret),
            "{secret} reached the task:\n{text}"
        );
    }
    for value in ["worker-pw-e2e", "http-token-e2e", "worker.creds"] {
        assert!(!text.contains(value), "{value} reached the task:\n{text}");
    }
    assert_eq!(env.get("CI_EXTRA"), Some(&"allowed"), "{text}");
    assert_eq!(env.get("FIXED_ENTRY"), Some(&"fixed"), "{text}");
    assert!(env.contains_key("PATH"), "{text}");
    assert_eq!(env.get("WARDEN_JOB_ID"), Some(&id.as_str()), "{text}");
    assert_eq!(env.get("WARDEN_TASK"), Some(&"envdump"), "{text}");
    assert_eq!(env.get("WARDEN_ATTEMPT"), Some(&"1"), "{text}");
    assert!(env.contains_key("WARDEN_STATUS_FILE"), "{text}");
    assert!(env.contains_key("WARDEN_ARG_OUT"), "{text}");
}
