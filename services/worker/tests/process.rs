//! ProcessExecutor against real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warden_shared::job::Blame;
use warden_shared::Config;
use warden_worker::{ExecRequest, Execution, Executor, ProcessExecutor};

fn executor(tasks: &str) -> ProcessExecutor {
    let config = Config::from_parts(
        Some(&format!("[worker]\nlog_tail_bytes = 64\n{tasks}")),
        Vec::new(),
    )
    .expect("config");
    ProcessExecutor::new(Arc::new(config)).expect("executor")
}

fn req(task: &str, args: &[(&str, &str)]) -> ExecRequest {
    ExecRequest {
        job_id: Uuid::new_v4(),
        epoch: 1,
        task: task.into(),
        args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

#[tokio::test]
async fn arguments_arrive_verbatim_and_are_never_shell_interpolated() {
    let marker = std::env::temp_dir().join(format!("warden-pwned-{}", Uuid::new_v4()));
    let evil = format!(
        "$(touch {}); `touch {}`; echo hi",
        marker.display(),
        marker.display()
    );
    let ex = executor(
        r#"[tasks.echo]
command = ["sh", "-c", "printf '%s' \"$WARDEN_ARG_X\" >&2; exit 3"]
"#,
    );
    let Execution::Crashed { crash, fault } = ex
        .execute(req("echo", &[("x", &evil)]), CancellationToken::new())
        .await
    else {
        panic!("exit 3 is no verdict")
    };
    assert!(fault.is_none());
    assert_eq!(crash.exit_code, Some(3));
    assert!(crash.log_tail.ends_with("echo hi"), "{:?}", crash.log_tail);
    assert!(!marker.exists(), "argument was interpolated by a shell");
}

#[tokio::test]
async fn status_file_wins_over_exit_code() {
    let ex = executor(
        r#"[tasks.declares]
command = ["sh", "-c", "echo '{\"blame\":\"third_party\",\"detail\":\"network\",\"description\":\"koji down\"}' > \"$WARDEN_STATUS_FILE\"; exit 0"]
[tasks.ok]
command = ["sh", "-c", "echo OK > \"$WARDEN_STATUS_FILE\"; exit 7"]
"#,
    );
    let Execution::Crashed {
        fault: Some(f),
        crash,
    } = ex
        .execute(req("declares", &[]), CancellationToken::new())
        .await
    else {
        panic!()
    };
    assert_eq!((f.blame, f.detail.as_str()), (Blame::ThirdParty, "network"));
    assert!(crash.status_file.unwrap().contains("koji down"));
    assert!(matches!(
        ex.execute(req("ok", &[]), CancellationToken::new()).await,
        Execution::Finished { ref outcome, .. } if outcome == "passed"
    ));
}

#[tokio::test]
async fn time_limit_kills_the_whole_process_group() {
    let pidfile = std::env::temp_dir().join(format!("warden-child-{}", Uuid::new_v4()));
    let ex = executor(&format!(
        r#"[tasks.hang]
command = ["sh", "-c", "sleep 100 & echo $! > {}; echo started; wait"]
timeout = "500ms"
"#,
        pidfile.display()
    ));
    let t0 = Instant::now();
    let Execution::Crashed { crash, fault } =
        ex.execute(req("hang", &[]), CancellationToken::new()).await
    else {
        panic!()
    };
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(fault.is_none());
    assert_eq!(crash.signal, Some(9));
    assert!(crash.log_tail.contains("time limit"), "{}", crash.log_tail);
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    warden_testsupport::eventually(
        Duration::from_secs(5),
        "the grandchild sleep gone (it survived the kill)",
        || async {
            let alive = std::path::Path::new(&format!("/proc/{child}")).exists()
                && !std::fs::read_to_string(format!("/proc/{child}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ");
            (!alive).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn log_tail_is_bounded_and_unknown_tasks_are_setup_failures() {
    let ex = executor(
        r#"[tasks.loud]
command = ["sh", "-c", "i=0; while [ $i -lt 1000 ]; do echo line-$i; i=$((i+1)); done; exit 5"]
"#,
    );
    let Execution::Crashed { crash, .. } =
        ex.execute(req("loud", &[]), CancellationToken::new()).await
    else {
        panic!()
    };
    assert!(crash.log_tail.len() <= 64);
    assert!(
        crash.log_tail.ends_with("line-999\n"),
        "{:?}",
        crash.log_tail
    );
    let Execution::Crashed { fault: Some(f), .. } =
        ex.execute(req("nope", &[]), CancellationToken::new()).await
    else {
        panic!()
    };
    assert_eq!(
        (f.blame, f.detail.as_str()),
        (Blame::System, "setup_failed")
    );
}
