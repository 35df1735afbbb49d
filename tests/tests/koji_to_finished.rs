//! The whole path: real Koji fedmsg messages on a real bus → trigger rule →
//! jobs → workers → FINISHED, visible over HTTP and `warden job show`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{cli, cli_ok, eventually, fixture, get_json, js, never_within, Scenario, Warden};

const KOJI_DIR: &str = "messages";
const START: &str = "06_buildsys.build.state.change__TestKojiBuildStateChangeStart.json";
const CANCEL: &str = "08_buildsys.build.state.change__TestKojiBuildStateChangeCancel.json";
const FAIL: &str = "09_buildsys.build.state.change__TestKojiBuildStateChangeFail.json";
const COMPLETE: &str = "10_buildsys.build.state.change__TestKojiBuildStateChangeComplete.json";
const SUBJECT: &str = "org.fedoraproject.prod.buildsys.build.state.change";

/// Runs a check on every build that ended (complete, failed, cancelled),
/// not on builds that started.
const CONFIG: &str = r#"
[[trigger.rules]]
name = "koji-build-ended"
topic = "org.fedoraproject.*.buildsys.build.state.change"
when = { new = [1, 3, 4] }
tasks = ["rpmlint"]
args = { nvr = "{name}-{version}-{release}", owner = "{owner}" }
"#;

async fn rpmlint_jobs(w: &Warden) -> Vec<serde_json::Value> {
    let v = get_json(&w.url("/api/v1/jobs?task=rpmlint&limit=100")).await;
    v["jobs"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn koji_messages_become_finished_jobs_exactly_once() {
    let mut s = Scenario::new().config(CONFIG).workers(2).up();
    let url = s.url();
    let warden = &mut s.warden;

    for f in [START, CANCEL, FAIL, COMPLETE] {
        let path = fixture(&format!("{KOJI_DIR}/{f}"));
        cli_ok(&url, &["publish", SUBJECT, path.to_str().unwrap()]);
    }

    // Three builds ended: three jobs, all FINISHED.
    let jobs = eventually(
        Duration::from_secs(60),
        "three FINISHED rpmlint jobs",
        || async {
            let jobs = rpmlint_jobs(warden).await;
            (jobs.len() == 3 && jobs.iter().all(|j| j["state"] == "FINISHED")).then_some(jobs)
        },
    )
    .await;
    for j in &jobs {
        assert_eq!(j["outcome"], "passed", "{j}");
    }

    // The same message again, through the bridge path (stream de-dup) and
    // raw without a message id (trigger-level de-dup): no new job.
    let out = cli_ok(
        &url,
        &[
            "publish",
            SUBJECT,
            fixture(&format!("{KOJI_DIR}/{COMPLETE}")).to_str().unwrap(),
        ],
    );
    assert!(out.contains("duplicate"), "{out}");
    let (client, jsx) = js(&url).await;
    let raw = std::fs::read(fixture(&format!("{KOJI_DIR}/{COMPLETE}"))).unwrap();
    jsx.publish(SUBJECT, raw.into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Garbage on the bus: dead-lettered with a reason, nothing crashes.
    jsx.publish("warden.events.bridge", "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dl = jsx
        .get_stream(warden_shared::subjects::DEADLETTER_STREAM)
        .await
        .unwrap();
    let letter = eventually(Duration::from_secs(20), "a dead letter", || {
        let mut dl = dl.clone();
        async move {
            let (messages, first) = {
                let info = dl.info().await.ok()?;
                (info.state.messages, info.state.first_sequence)
            };
            if messages == 0 {
                return None;
            }
            let m = dl.get_raw_message(first).await.ok()?;
            serde_json::from_slice::<serde_json::Value>(&m.payload).ok()
        }
    })
    .await;
    assert_eq!(letter["reason"], "invalid_json", "{letter}");
    assert_eq!(letter["subject"], "warden.events.bridge");
    assert!(letter["payload"].as_str().unwrap().contains("{not json"));

    // Still three jobs, and Warden still serves new work after the garbage.
    let id = cli_ok(
        &url,
        &["job", "submit", "noop", "--wait", "--timeout", "60"],
    );
    assert!(id.contains("FINISHED"), "{id}");
    never_within(Duration::from_secs(1), "a fourth rpmlint job", || async {
        let jobs = rpmlint_jobs(warden).await;
        (jobs.len() != 3).then_some(jobs)
    })
    .await;
    assert_eq!(rpmlint_jobs(warden).await.len(), 3);
    assert!(
        warden.is_running(),
        "warden up died:\n{}",
        warden.log_text()
    );

    // History over HTTP: created, dispatched, started, finished, by whom.
    let complete = jobs
        .iter()
        .find(|j| j["source_message_id"] == "2015-6395fb7a-e5a7-4b95-858a-ff7b80410e7f")
        .expect("job of message 10");
    let id = complete["id"].as_str().unwrap();
    let full = get_json(&w_url(warden, id)).await;
    assert_eq!(full["args"]["nvr"], "ansible-1.8.3-1.el7");
    assert_eq!(full["source"]["subject"], SUBJECT);
    let actions: Vec<&str> = full["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "dispatch", "start", "finish"], "{full}");
    assert!(full["history"][1]["bot_id"]
        .as_str()
        .unwrap()
        .starts_with("local-"));

    // The same through the CLI.
    let show = cli_ok(&url, &["job", "show", id]);
    assert!(
        show.contains("FINISHED")
            && show.contains("ansible-1.8.3-1.el7")
            && show.contains("finish"),
        "{show}"
    );
    let list: serde_json::Value = serde_json::from_str(&cli_ok(
        &url,
        &["job", "list", "--task", "rpmlint", "--json"],
    ))
    .unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for key in [
        "id",
        "task",
        "state",
        "priority",
        "attempt",
        "blame",
        "detail",
        "created_at",
        "updated_at",
    ] {
        assert!(
            list[0].get(key).is_some(),
            "job list --json lacks {key}: {}",
            list[0]
        );
    }
    // Which job did this bus message make? Searched by its message id.
    let by_source: serde_json::Value = serde_json::from_str(&cli_ok(
        &url,
        &[
            "job",
            "list",
            "--source",
            "2015-6395fb7a-e5a7-4b95-858a-ff7b80410e7f",
            "--json",
        ],
    ))
    .unwrap();
    let ids: Vec<&str> = by_source
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id], "{by_source}");
    let bad = cli(&url, &["job", "show", "not-a-uuid"]);
    assert!(!bad.status.success());

    assert_eq!(
        warden.stop(),
        Some(0),
        "warden up did not exit cleanly:\n{}",
        warden.log_text()
    );
    drop(client);
}

fn w_url(w: &Warden, id: &str) -> String {
    w.url(&format!("/api/v1/jobs/{id}"))
}
