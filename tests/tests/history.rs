//! The execution database under faults, and the upgrade of a data dir
//! from before it: the real `warden-recorder` process (SIGKILLed and
//! restarted), a real PostgreSQL (stopped and started again) and the real
//! `warden up` on a bucket full of old jobs. Counts are checked: every
//! job recorded once, every history entry once, none lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;
use warden_e2e::{eventually, get_json, service_bin, NatsServer, Warden};
use warden_history::HistoryDb;
use warden_shared::job::HistoryEntry;
use warden_shared::store::JobStore;
use warden_shared::{subjects, Action, Config, Job, JobState};
use warden_testsupport::Postgres;

fn config_text(nats: &str, database: &str) -> String {
    format!(
        "[nats]\nurl = {nats:?}\n[history]\ndatabase = {database:?}\narchive_after = \"1s\"\n\
         marker_grace = \"1s\"\njanitor_interval = \"200ms\"\nbatch = 64\n"
    )
}

async fn jobs_store(config: &Config) -> JobStore {
    let client = async_nats::connect(&config.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let handles = subjects::ensure(&js, &config.topology()).await.unwrap();
    JobStore::new(handles.jobs)
}

/// A recorder process on `config_file`; SIGKILLed on drop.
struct Recorder(Child);

impl Recorder {
    fn start(config_file: &std::path::Path, log: &std::path::Path) -> Recorder {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Recorder(
            Command::new(service_bin("recorder"))
                .arg("--config")
                .arg(config_file)
                .env("WARDEN_LOG", "info,async_nats=warn,sqlx=warn")
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        )
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `n` jobs: each created, then finished with one more history
/// entry (two revisions, two entries each).
async fn write_jobs(store: &JobStore, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let mut job = Job::builder("build")
            .pool("builders")
            .at(Utc::now())
            .build();
        let rev = store.create(&job).await.unwrap();
        job.state = JobState::Finished;
        job.outcome = Some("passed".into());
        job.updated_at = Utc::now();
        job.history.push(HistoryEntry {
            at: job.updated_at,
            action: Action::Finish,
            attempt: 0,
            from: Some(JobState::Scheduled),
            to: Some(JobState::Finished),
            actor: "test".into(),
            bot_id: None,
            resource: None,
            note: None,
        });
        store.update(&job, rev).await.unwrap();
        ids.push(job.id);
    }
    ids
}

/// Waits (at most a minute) until the bucket holds none of `ids`.
async fn gone_from_bucket(store: &JobStore, ids: &[Uuid], what: &str) {
    eventually(Duration::from_secs(60), what, || {
        let (store, ids) = (store.clone(), ids.to_vec());
        async move {
            for id in &ids {
                if store.get(id).await.ok()?.is_some() {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

async fn until_recorded(db: &HistoryDb, at_least: u64) {
    eventually(
        Duration::from_secs(60),
        &format!("{at_least} jobs recorded"),
        || async move { (db.row_counts().await.ok()?.jobs >= at_least).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn killing_the_recorder_or_the_database_mid_stream_loses_and_doubles_nothing() {
    let nats = NatsServer::start();
    let mut pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&nats.url(), &pg.url());
    let file = dir.path().join("warden.toml");
    std::fs::write(&file, &text).unwrap();
    let log = dir.path().join("recorder.log");
    let config = Config::from_parts(Some(&text), Vec::new()).unwrap();
    let store = jobs_store(&config).await;
    let db = HistoryDb::open(&pg.url()).await.unwrap();

    let mut recorder = Recorder::start(&file, &log);
    let mut ids = write_jobs(&store, 400).await;
    until_recorded(&db, 100).await;
    // SIGKILL mid-stream: batches in flight are neither acked nor
    // half-written; the next recorder takes them up.
    recorder.kill();
    ids.extend(write_jobs(&store, 400).await);
    let recorder = Recorder::start(&file, &log);
    until_recorded(&db, 500).await;
    // The database goes away mid-stream (the recorder notices), and
    // comes back.
    pg.stop();
    ids.extend(write_jobs(&store, 400).await);
    eventually(
        Duration::from_secs(30),
        "the recorder sees the outage",
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains("history database is unavailable")
                    .then_some(())
            }
        },
    )
    .await;
    pg.start_again();
    let db = HistoryDb::open(&pg.url()).await.unwrap();

    // Every job recorded once with both its entries, archived, and gone
    // from the bucket.
    let n = ids.len() as u64;
    eventually(Duration::from_secs(90), "every job archived", || {
        let db = db.clone();
        async move {
            let c = db.row_counts().await.ok()?;
            (c.archived == n).then_some(c)
        }
    })
    .await;
    let c = db.row_counts().await.unwrap();
    assert_eq!(c.jobs, n, "{c:?}");
    assert_eq!(c.history, 2 * n, "{c:?}");
    // Archived in the database first, then deleted from the bucket.
    gone_from_bucket(&store, &ids, "every job gone from the bucket").await;
    let counts = db
        .counts(Utc::now() - chrono::Duration::hours(1), Utc::now())
        .await
        .unwrap();
    assert_eq!(counts.jobs as u64, n);
    assert_eq!(counts.by_state.get("FINISHED").copied(), Some(n as usize));
    drop(recorder);
}

#[tokio::test]
async fn an_upgraded_data_dir_moves_its_history_into_the_database() {
    // Today's layout: every job ever made is in the bucket.
    let mut nats = NatsServer::start();
    let text = format!("[nats]\nurl = {:?}\n", nats.url());
    let config = Config::from_parts(Some(&text), Vec::new()).unwrap();
    let store = jobs_store(&config).await;
    let old = Utc::now() - chrono::Duration::days(3);
    let mut finished = Vec::new();
    for i in 0..300 {
        let mut job = Job::builder("build").pool("builders").at(old).build();
        job.state = if i % 3 == 0 {
            JobState::Cancelled
        } else {
            JobState::Finished
        };
        store.create(&job).await.unwrap();
        finished.push(job.id);
    }
    let mut live = Vec::new();
    for _ in 0..5 {
        let job = Job::builder("build").pool("nobody").at(old).build();
        store.create(&job).await.unwrap();
        live.push(job.id);
    }
    nats.restart();
    // The new version on the old data: the recorder replays the bucket.
    let warden = Warden::up(
        &nats.url(),
        "[history]\njanitor_interval = \"200ms\"\nmarker_grace = \"1s\"\n",
        0,
    );
    gone_from_bucket(&store, &finished, "old finished jobs left the bucket").await;
    for id in &live {
        assert!(
            store.get(id).await.unwrap().is_some(),
            "live job {id} archived"
        );
    }
    // Nothing lost: the API still has every job, the old ones archived.
    let all = get_json(&warden.url("/api/v1/jobs?limit=1")).await;
    assert_eq!(all["total"], 305, "{all}");
    let cancelled = get_json(&warden.url("/api/v1/jobs?state=cancelled&limit=1")).await;
    assert_eq!(cancelled["total"], 100);
    let one = get_json(&warden.url(&format!("/api/v1/jobs/{}", finished[1]))).await;
    assert_eq!(one["state"], "FINISHED");
    let stats = get_json(&warden.url("/api/v1/stats?window=7days")).await;
    assert_eq!(stats["jobs"], 305, "{stats}");
}
