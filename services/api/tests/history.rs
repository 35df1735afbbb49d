//! The API over archived jobs, on both databases: the same suite runs
//! with an SQLite file and with a PostgreSQL cluster of its own. A real
//! recorder (in-process) records the bucket and archives finished jobs
//! after one second; the API serves them from the database: the same
//! routes, bodies and error codes as for live jobs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use warden_shared::job::CrashInfo;
use warden_shared::store::JobStore;
use warden_shared::{Blame, Config, Job, JobState};
use warden_testsupport::{eventually, NatsServer, Postgres};

use common::Api;

struct Hub {
    api: Api,
    recorder: CancellationToken,
    _pg: Option<Postgres>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.recorder.cancel();
    }
}

fn history_toml(database: &str) -> String {
    format!(
        "\n[history]\ndatabase = {database:?}\narchive_after = \"1s\"\nmarker_grace = \"1s\"\njanitor_interval = \"200ms\"\n"
    )
}

async fn start(database: String, pg: Option<Postgres>, dir: Option<tempfile::TempDir>) -> Hub {
    let api = Api::start_with_http(NatsServer::start(), None, None, &history_toml(&database)).await;
    let recorder = CancellationToken::new();
    let config: Arc<Config> = api.config.clone();
    tokio::spawn(warden_recorder::run(config, recorder.clone()));
    Hub {
        api,
        recorder,
        _pg: pg,
        _dir: dir,
    }
}

async fn sqlite() -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("history.sqlite").display());
    start(url, None, Some(dir)).await
}

async fn postgres() -> Hub {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let url = pg.url();
    start(url, Some(pg), None).await
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::sqlite().await).await })*
        }
        mod on_postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::postgres().await).await })*
        }
    };
}

on_both!(
    archived_jobs_are_served_like_live_ones,
    paging_after_a_cursor_is_not_shifted_by_new_jobs,
    a_retry_brings_an_archived_job_back_to_the_bucket,
);

/// A finished or crashed job written into the bucket as the scheduler
/// leaves it.
async fn put(store: &JobStore, task: &str, state: JobState) -> Job {
    let now = Utc::now();
    let mut job = Job::builder(task).pool("builders").at(now).build();
    job.state = state;
    job.attempt = 1;
    if state == JobState::Crashed {
        job.blame = Some(Blame::ThirdParty);
        job.detail = Some("network".into());
        job.crash = Some(CrashInfo {
            exit_code: Some(6),
            log_tail: format!("curl: (6) Could not resolve host: mirror.{task}.example"),
            ..CrashInfo::default()
        });
    } else {
        job.outcome = Some("passed".into());
    }
    store.create(&job).await.expect("create");
    job
}

async fn get_json(api: &Api, path: &str) -> (StatusCode, Value) {
    let r = api.http.get(api.url(path)).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the bucket no longer holds any of `jobs`.
async fn archived(api: &Api, jobs: &[Job]) {
    let store = api.store().await;
    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    eventually(
        Duration::from_secs(30),
        "jobs archived out of the bucket",
        || {
            let store = store.clone();
            let ids = ids.clone();
            async move {
                for id in &ids {
                    if store.get(id).await.ok()?.is_some() {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
}

fn ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

async fn archived_jobs_are_served_like_live_ones(h: Hub) {
    let api = &h.api;
    let store = api.store().await;
    let mut old = Vec::new();
    for i in 0..6 {
        let (task, state) = if i % 2 == 0 {
            ("build", JobState::Finished)
        } else {
            ("test", JobState::Crashed)
        };
        old.push(put(&store, task, state).await);
    }
    archived(api, &old).await;
    // A live job, newer than all of them.
    let (_, created) = {
        let r = api
            .http
            .post(api.url("/api/v1/jobs"))
            .json(&serde_json::json!({"task": "build"}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    let live_id = created["id"].as_str().unwrap().to_string();

    // Get: the archived record, as it was.
    let (status, body) = get_json(api, &format!("/api/v1/jobs/{}", old[1].id)).await;
    assert_eq!(status, StatusCode::OK);
    let back: Job = serde_json::from_value(body).unwrap();
    assert_eq!(back, old[1]);
    let (status, body) = get_json(api, &format!("/api/v1/jobs/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");

    // List: live and archived, newest first, no job twice.
    let (status, all) = get_json(api, "/api/v1/jobs?limit=100").await;
    assert_eq!(status, StatusCode::OK);
    let listed = ids(&all);
    assert_eq!(all["total"], 7, "{all}");
    assert_eq!(listed[0], live_id);
    let mut expected: Vec<String> = old.iter().rev().map(|j| j.id.to_string()).collect();
    expected.insert(0, live_id.clone());
    assert_eq!(listed, expected);
    // Pages of 2 cover the same list.
    let mut paged = Vec::new();
    for offset in (0..8).step_by(2) {
        let (_, p) = get_json(api, &format!("/api/v1/jobs?limit=2&offset={offset}")).await;
        paged.extend(ids(&p));
    }
    assert_eq!(paged, expected);
    // Filters apply to archived jobs too.
    let (_, crashed) = get_json(
        api,
        "/api/v1/jobs?state=crashed&blame=third_party&detail=network",
    )
    .await;
    assert_eq!(crashed["total"], 3);
    let (_, builds) = get_json(api, "/api/v1/jobs?task=build").await;
    assert_eq!(builds["total"], 4);
    // Full text over log tails.
    let (status, found) = get_json(api, "/api/v1/jobs?q=resolve%20mirror").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["total"], 3);
    let (_, none) = get_json(api, "/api/v1/jobs?q=segfault").await;
    assert_eq!(none["total"], 0);
    // Bad input is still a 400 with its code.
    let (status, bad) = get_json(api, "/api/v1/jobs?state=exploded").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(bad["error"]["code"], "invalid_state");
    // Statistics count archived and live jobs.
    let (_, stats) = get_json(api, "/api/v1/stats?window=1h").await;
    assert_eq!(stats["jobs"], 7, "{stats}");
    assert_eq!(stats["by_state"]["CRASHED"], 3);
    assert_eq!(stats["by_detail"]["third_party/network"], 3);
}

async fn a_retry_brings_an_archived_job_back_to_the_bucket(h: Hub) {
    let api = &h.api;
    let store = api.store().await;
    let crashed = put(&store, "test", JobState::Crashed).await;
    let finished = put(&store, "build", JobState::Finished).await;
    archived(api, &[crashed.clone(), finished.clone()]).await;
    let r = api
        .http
        .post(api.url(&format!("/api/v1/jobs/{}/retry", crashed.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["state"], "SCHEDULED");
    // Live again: in the bucket, listed once, with the retry in its history.
    let again = store
        .get(&crashed.id)
        .await
        .unwrap()
        .expect("back in the bucket");
    assert_eq!(again.job.state, JobState::Scheduled);
    assert!(again.job.history.len() > crashed.history.len());
    let url = api.url("/api/v1/jobs?limit=10");
    let http = api.http.clone();
    eventually(
        Duration::from_secs(10),
        "the revived job listed once, live",
        || {
            let (http, url) = (http.clone(), url.clone());
            let id = crashed.id.to_string();
            async move {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                let listed = ids(&v);
                let scheduled = v["jobs"]
                    .as_array()?
                    .iter()
                    .any(|j| j["id"] == id.as_str() && j["state"] == "SCHEDULED");
                (v["total"] == 2 && listed.len() == 2 && scheduled).then_some(())
            }
        },
    )
    .await;
    // A cancel of an archived finished job is still an illegal transition.
    let r = api
        .http
        .post(api.url(&format!("/api/v1/jobs/{}/cancel", finished.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "illegal_transition");
    assert!(store.get(&finished.id).await.unwrap().is_none());
}

async fn paging_after_a_cursor_is_not_shifted_by_new_jobs(h: Hub) {
    let api = &h.api;
    let store = api.store().await;
    let mut old = Vec::new();
    for _ in 0..5 {
        old.push(put(&store, "build", JobState::Finished).await);
    }
    archived(api, &old).await;
    let mut live = Vec::new();
    for _ in 0..3 {
        live.push(put(&store, "build", JobState::Finished).await);
    }
    let mut expected: Vec<String> = old
        .iter()
        .chain(&live)
        .rev()
        .map(|j| j.id.to_string())
        .collect();
    let (status, first) = get_json(api, "/api/v1/jobs?limit=3").await;
    assert_eq!(status, StatusCode::OK);
    let mut seen = ids(&first);
    let mut next = first["next"]
        .as_str()
        .expect("a full page has a next")
        .to_string();
    // New jobs arrive while someone pages: offset paging would shift.
    for _ in 0..4 {
        put(&store, "build", JobState::Finished).await;
    }
    loop {
        let (status, p) = get_json(api, &format!("/api/v1/jobs?limit=3&after={next}")).await;
        assert_eq!(status, StatusCode::OK, "{p}");
        seen.extend(ids(&p));
        match p["next"].as_str() {
            Some(n) => next = n.to_string(),
            None => break,
        }
    }
    // A last full page's next leads to an empty page; drop nothing.
    expected.truncate(seen.len());
    assert_eq!(seen, expected);
    assert_eq!(seen.len(), 8);
    let (status, bad) = get_json(api, "/api/v1/jobs?after=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(bad["error"]["code"], "invalid_query");
}
