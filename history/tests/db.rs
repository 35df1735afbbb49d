//! The execution database on both backends: every test runs once on an
//! SQLite file and once on a real PostgreSQL cluster of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use warden_history::archive::Archived;
use warden_history::{HistoryDb, Plan, Revision, Search, TextLimits};
use warden_shared::job::{CrashInfo, HistoryEntry, Lease};
use warden_shared::{Action, Blame, Job, JobState};
use warden_testsupport::Postgres;

/// A database and what keeps it alive.
struct Db {
    db: HistoryDb,
    _file: Option<tempfile::TempDir>,
    _pg: Option<Postgres>,
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("history.sqlite").display());
    Db {
        db: HistoryDb::open(&url).await.unwrap(),
        _file: Some(dir),
        _pg: None,
    }
}

async fn postgres() -> Db {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    Db {
        db: HistoryDb::open(&pg.url()).await.unwrap(),
        _file: None,
        _pg: Some(pg),
    }
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
    replays_and_older_revisions_change_nothing,
    searches_filter_page_and_read_full_text,
    archived_jobs_count_in_statistics_until_a_retry_revives_them,
    an_import_is_archived_and_counted_at_once_and_idempotent,
    retention_removes_old_archived_jobs_and_their_counts,
    export_writes_one_json_record_per_line,
    migrations_are_versioned_and_reopening_keeps_the_data,
    full_text_gives_the_same_pages_whichever_plan_it_takes,
);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 1, 8, 0, 0).single().unwrap()
}

/// A job created `minutes` after t0 that ran once on `bot` and ended in
/// `state` 30 s later.
fn finished(task: &str, minutes: i64, state: JobState, bot: &str) -> Job {
    let created = t0() + Duration::minutes(minutes);
    let mut j = Job::builder(task).pool("builders").at(created).build();
    j.description = Some(format!("{task} of glibc"));
    let at = created + Duration::seconds(1);
    j.attempt = 1;
    j.lease = Some(Lease {
        session: "s-1".into(),
        bot_id: bot.into(),
        resource: Some("host-1".into()),
        resources: vec!["host-1".into()],
        epoch: 1,
        leased_at: at,
        started_at: Some(at),
        secret_hash: None,
    });
    j.history.push(HistoryEntry {
        at,
        action: Action::Dispatch,
        attempt: 1,
        from: Some(JobState::Scheduled),
        to: Some(JobState::Running),
        actor: "scheduler".into(),
        bot_id: Some(bot.into()),
        resource: Some("host-1".into()),
        note: None,
    });
    let end = created + Duration::seconds(30);
    j.history.push(HistoryEntry {
        at: end,
        action: if state == JobState::Finished {
            Action::Finish
        } else {
            Action::Crash
        },
        attempt: 1,
        from: Some(JobState::Running),
        to: Some(state),
        actor: "s-1".into(),
        bot_id: Some(bot.into()),
        resource: None,
        note: None,
    });
    if state == JobState::Crashed {
        j.blame = Some(Blame::ThirdParty);
        j.detail = Some("network".into());
        j.crash = Some(CrashInfo {
            exit_code: Some(1),
            log_tail: format!("curl: (6) Could not resolve host: mirror-{task}.example.org"),
            ..CrashInfo::default()
        });
    } else {
        j.outcome = Some("passed".into());
    }
    j.state = state;
    j.updated_at = end;
    j
}

async fn replays_and_older_revisions_change_nothing(d: Db) {
    let db = &d.db;
    let mut j = finished("build", 0, JobState::Crashed, "bot-a");
    let crashed = Revision {
        rev: 10,
        job: j.clone(),
    };
    let r = db.record(std::slice::from_ref(&crashed)).await.unwrap();
    assert_eq!((r.written, r.stale), (1, 0));
    // Redelivered: nothing written.
    let r = db.record(std::slice::from_ref(&crashed)).await.unwrap();
    assert_eq!((r.written, r.stale), (0, 1));
    // A newer revision wins; then an older one arriving late loses.
    j.state = JobState::Shelved;
    j.updated_at += Duration::seconds(5);
    db.record(&[Revision {
        rev: 12,
        job: j.clone(),
    }])
    .await
    .unwrap();
    let mut older = j.clone();
    older.state = JobState::Running;
    let r = db
        .record(&[Revision {
            rev: 11,
            job: older,
        }])
        .await
        .unwrap();
    assert_eq!(r.stale, 1);
    let (rev, got) = db.get(&j.id).await.unwrap().unwrap();
    assert_eq!((rev, got.state), (12, JobState::Shelved));
    assert_eq!(got, j);
    assert!(db.get(&uuid::Uuid::new_v4()).await.unwrap().is_none());
    let (all, archived) = db.job_counts().await.unwrap();
    assert_eq!((all, archived), (1, 0));
}

async fn searches_filter_page_and_read_full_text(d: Db) {
    let db = &d.db;
    let mut revs = Vec::new();
    for i in 0..30 {
        let (task, state, bot) = match i % 3 {
            0 => ("build", JobState::Finished, "bot-a"),
            1 => ("test", JobState::Crashed, "bot-b"),
            _ => ("lint", JobState::Finished, "bot-a"),
        };
        revs.push(Revision {
            rev: 100 + i as u64,
            job: finished(task, i, state, bot),
        });
    }
    db.record(&revs).await.unwrap();
    let all = Search::default();
    let p = db.search(&all, 10, 0, 1000).await.unwrap();
    assert_eq!((p.total, p.total_exact), (30, true));
    // Newest first.
    let created: Vec<_> = p.jobs.iter().map(|j| j.created_at).collect();
    let mut sorted = created.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(created, sorted);
    assert_eq!(p.jobs[0].created_at, t0() + Duration::minutes(29));
    // Pages do not overlap and cover everything.
    let mut seen = std::collections::HashSet::new();
    for page in 0..3 {
        for j in db.search(&all, 10, page * 10, 1000).await.unwrap().jobs {
            assert!(seen.insert(j.id));
        }
    }
    assert_eq!(seen.len(), 30);
    let s = Search {
        task: Some("test".into()),
        bot_id: Some("bot-b".into()),
        state: Some("CRASHED".into()),
        blame: Some("third_party".into()),
        detail: Some("network".into()),
        ..Search::default()
    };
    let p = db.search(&s, 50, 0, 1000).await.unwrap();
    assert_eq!(p.total, 10);
    assert!(p
        .jobs
        .iter()
        .all(|j| j.task == "test" && j.state == JobState::Crashed));
    let s = Search {
        since: Some(t0() + Duration::minutes(10)),
        until: Some(t0() + Duration::minutes(20)),
        ..Search::default()
    };
    assert_eq!(db.search(&s, 50, 0, 1000).await.unwrap().total, 10);
    // Full text: words of the log tail, any case, punctuation apart.
    let s = Search {
        text: Some("RESOLVE host mirror-test".into()),
        ..Search::default()
    };
    let p = db.search(&s, 50, 0, 1000).await.unwrap();
    assert_eq!(p.total, 10, "{p:?}");
    let s = Search {
        text: Some("resolve mirror-build".into()),
        ..Search::default()
    };
    assert_eq!(db.search(&s, 50, 0, 1000).await.unwrap().total, 0);
    let s = Search {
        text: Some("Lint GLIBC".into()),
        task: Some("lint".into()),
        ..Search::default()
    };
    assert_eq!(db.search(&s, 50, 0, 1000).await.unwrap().total, 10);
    // Counting stops at the cap and says so.
    let p = db.search(&all, 5, 0, 10).await.unwrap();
    assert_eq!((p.total, p.total_exact), (15, false));
    // Only archived: none yet.
    let s = Search {
        archived_only: true,
        ..Search::default()
    };
    assert_eq!(db.search(&s, 5, 0, 10).await.unwrap().total, 0);
}

async fn archived_jobs_count_in_statistics_until_a_retry_revives_them(d: Db) {
    let db = &d.db;
    let mut revs = Vec::new();
    // 90 jobs over three hours, one every two minutes.
    for i in 0..90 {
        let state = if i % 2 == 0 {
            JobState::Finished
        } else {
            JobState::Crashed
        };
        revs.push(Revision {
            rev: 1 + i as u64,
            job: finished("build", i * 2, state, "bot-a"),
        });
    }
    // And one still running: never archived.
    let mut running = finished("build", 0, JobState::Finished, "bot-a");
    running.state = JobState::Running;
    revs.push(Revision {
        rev: 500,
        job: running.clone(),
    });
    db.record(&revs).await.unwrap();
    let now = t0() + Duration::days(3);
    let cutoff = now - Duration::days(1);
    let mut archived = Vec::new();
    loop {
        let batch = db.archive_due(cutoff, now, 40).await.unwrap();
        if batch.is_empty() {
            break;
        }
        archived.extend(batch);
    }
    assert_eq!(archived.len(), 90);
    assert!(!archived.iter().any(|a| a.id == running.id));
    assert!(db.is_archived(&archived[0].id).await.unwrap());
    // The whole span, a window with partial minutes and hours at both
    // ends, and an empty one.
    let c = db.counts(t0() - Duration::days(1), now).await.unwrap();
    assert_eq!(c.jobs, 90);
    assert_eq!(c.by_state.get("FINISHED"), Some(&45));
    assert_eq!(c.by_detail.get("third_party/network"), Some(&45));
    let since = t0() + Duration::minutes(29) + Duration::seconds(40);
    let until = t0() + Duration::minutes(151) + Duration::seconds(10);
    let c = db.counts(since, until).await.unwrap();
    let expected = revs[..90]
        .iter()
        .filter(|r| r.job.updated_at >= since && r.job.updated_at < until)
        .count();
    assert_eq!(c.jobs, expected);
    assert_eq!(
        db.counts(now, now + Duration::days(1)).await.unwrap().jobs,
        0
    );
    // Archival steps 2 and 3 are recorded once each.
    let a = archived[0];
    assert_eq!(db.removals_pending(1000).await.unwrap().len(), 90);
    assert_eq!(db.mark_removed(&[a], now).await.unwrap(), 1);
    assert_eq!(db.mark_removed(&[a], now).await.unwrap(), 0);
    assert_eq!(
        db.markers_due(now + Duration::minutes(1), 10)
            .await
            .unwrap(),
        vec![a]
    );
    assert_eq!(db.mark_marker_purged(&[a]).await.unwrap(), 1);
    assert!(db
        .markers_due(now + Duration::minutes(1), 10)
        .await
        .unwrap()
        .is_empty());
    // Many at once: each only at the revision it names.
    let stale = Archived {
        rev: archived[2].rev + 7,
        ..archived[2]
    };
    assert_eq!(
        db.mark_removed(&[archived[1], stale, archived[3], a], now)
            .await
            .unwrap(),
        2
    );
    assert_eq!(db.removals_pending(1000).await.unwrap().len(), 87);
    // A retry: the job is live again and out of the archived counts.
    let (_, mut job) = db.get(&a.id).await.unwrap().unwrap();
    job.state = JobState::Scheduled;
    job.updated_at = now;
    let r = db.record(&[Revision { rev: 900, job }]).await.unwrap();
    assert_eq!(r.revived, 1);
    assert!(!db.is_archived(&a.id).await.unwrap());
    let c = db.counts(t0() - Duration::days(1), now).await.unwrap();
    assert_eq!(c.jobs, 89);
    let s = Search {
        archived_only: true,
        ..Search::default()
    };
    assert_eq!(db.search(&s, 5, 0, 1000).await.unwrap().total, 89);
}

async fn an_import_is_archived_and_counted_at_once_and_idempotent(d: Db) {
    let db = &d.db;
    let mut revs: Vec<Revision> = (0..20)
        .map(|i| Revision {
            rev: 1 + i as u64,
            job: finished(
                "build",
                i * 2,
                if i % 4 == 0 {
                    JobState::Crashed
                } else {
                    JobState::Finished
                },
                "bot-a",
            ),
        })
        .collect();
    let mut running = finished("build", 0, JobState::Finished, "bot-a");
    running.state = JobState::Running;
    revs.push(Revision {
        rev: 100,
        job: running.clone(),
    });
    let now = t0() + Duration::days(3);
    let r = db.import_archived(&revs, now).await.unwrap();
    assert_eq!((r.written, r.stale, r.revived), (21, 0, 0));
    let window = (t0() - Duration::days(1), now);
    let c = db.counts(window.0, window.1).await.unwrap();
    assert_eq!((c.jobs, c.by_state.get("CRASHED")), (20, Some(&5)));
    assert!(db.is_archived(&revs[0].job.id).await.unwrap());
    // Nothing is left for the janitor of an archived import, and the job
    // still running is live, for the janitor to archive once it ends.
    assert!(db.removals_pending(100).await.unwrap().is_empty());
    assert!(db.markers_due(now, 100).await.unwrap().is_empty());
    assert!(!db.is_archived(&running.id).await.unwrap());
    // Imported twice: nothing changes, nothing is counted twice.
    let r = db.import_archived(&revs, now).await.unwrap();
    assert_eq!((r.written, r.stale), (0, 21));
    assert_eq!(db.counts(window.0, window.1).await.unwrap().jobs, 20);
    // A later revision of an archived job moves its count to its new cell.
    let mut job = revs[0].job.clone();
    job.state = JobState::Finished;
    job.blame = None;
    job.detail = None;
    let r = db
        .import_archived(&[Revision { rev: 50, job }], now)
        .await
        .unwrap();
    assert_eq!((r.written, r.revived), (1, 0));
    let c = db.counts(window.0, window.1).await.unwrap();
    assert_eq!((c.jobs, c.by_state.get("CRASHED")), (20, Some(&4)));
    let s = Search {
        archived_only: true,
        ..Search::default()
    };
    assert_eq!(db.search(&s, 5, 0, 1000).await.unwrap().total, 20);
}

async fn retention_removes_old_archived_jobs_and_their_counts(d: Db) {
    let db = &d.db;
    let old = finished("build", 0, JobState::Finished, "bot-a");
    let new = finished("build", 60 * 24 * 20, JobState::Finished, "bot-a");
    db.record(&[
        Revision {
            rev: 1,
            job: old.clone(),
        },
        Revision {
            rev: 2,
            job: new.clone(),
        },
    ])
    .await
    .unwrap();
    let now = t0() + Duration::days(40);
    for a in db.archive_due(now, now, 10).await.unwrap() {
        db.mark_removed(&[a], now).await.unwrap();
    }
    assert_eq!(db.expire(t0() + Duration::days(10), 100).await.unwrap(), 1);
    assert!(db.get(&old.id).await.unwrap().is_none());
    assert!(db.get(&new.id).await.unwrap().is_some());
    let c = db.counts(t0() - Duration::days(1), now).await.unwrap();
    assert_eq!(c.jobs, 1);
    assert_eq!(db.expire(t0() + Duration::days(10), 100).await.unwrap(), 0);
}

async fn export_writes_one_json_record_per_line(d: Db) {
    let db = &d.db;
    let jobs: Vec<Job> = (0..5)
        .map(|i| finished("build", i, JobState::Finished, "bot-a"))
        .collect();
    let revs: Vec<Revision> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| Revision {
            rev: i as u64 + 1,
            job: j.clone(),
        })
        .collect();
    db.record(&revs).await.unwrap();
    let mut out = Vec::new();
    let n = db
        .export(Some(t0() + Duration::minutes(1)), None, &mut out)
        .await
        .unwrap();
    assert_eq!(n, 4);
    let back: Vec<Job> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, jobs[1..].to_vec());
}

async fn migrations_are_versioned_and_reopening_keeps_the_data(d: Db) {
    let db = &d.db;
    assert_eq!(db.schema_version().await.unwrap(), 3);
    let j = finished("build", 0, JobState::Finished, "bot-a");
    db.record(&[Revision {
        rev: 1,
        job: j.clone(),
    }])
    .await
    .unwrap();
    let url = match (&d._file, &d._pg) {
        (Some(dir), _) => format!("sqlite://{}", dir.path().join("history.sqlite").display()),
        (_, Some(pg)) => pg.url(),
        _ => unreachable!(),
    };
    db.close().await;
    let again = HistoryDb::open(&url).await.unwrap();
    assert_eq!(again.schema_version().await.unwrap(), 3);
    assert_eq!(again.get(&j.id).await.unwrap().map(|(r, _)| r), Some(1));
}

/// Full text answers a common word by walking newest first and a rare one
/// by sorting its matches (src/text.rs). Whichever plan a search takes,
/// its page is exactly the newest matches after the offset, and its count
/// is exact or says it is not. With small plan limits, 80 jobs take every
/// plan; the jobs are recorded out of creation order (their rowids do not
/// follow creation time) and in pairs created in the same instant.
async fn full_text_gives_the_same_pages_whichever_plan_it_takes(d: Db) {
    let backend = d.db.backend();
    let db = d.db.clone().with_text_limits(TextLimits {
        sort_at_most: 6,
        window: 4,
        walk_windows: 3,
    });
    let describe = |i: usize, round: usize| -> Option<String> {
        if i % 11 == 0 || (round == 1 && i % 4 == 0) {
            return None;
        }
        let mut w = vec!["delta"];
        if i % 2 == 0 {
            w.push("alpha");
        }
        if i % 5 == 0 {
            w.push("Beta,");
        }
        if i == 7 || i == 42 {
            w.push("gamma");
        }
        Some(w.join(" "))
    };
    let mut jobs: Vec<Job> = (0..80)
        .map(|i| {
            let mut j = finished(
                &format!("t{}", i % 3),
                (i / 2) as i64,
                JobState::Finished,
                "bot-a",
            );
            j.description = describe(i, 0);
            j
        })
        .collect();
    let mut order: Vec<usize> = (0..80).map(|i| (i * 37) % 80).collect();
    for batch in order.chunks(10) {
        let revs: Vec<Revision> = batch
            .iter()
            .map(|&i| Revision {
                rev: 1,
                job: jobs[i].clone(),
            })
            .collect();
        db.record(&revs).await.unwrap();
    }
    let mut plans = std::collections::BTreeSet::new();
    for round in 0..2 {
        if round == 1 {
            // A later revision takes the words off some jobs and moves
            // others to another task: the text table follows.
            order.reverse();
            let revs: Vec<Revision> = order
                .iter()
                .map(|&i| {
                    jobs[i].description = describe(i, 1);
                    if i % 7 == 0 {
                        jobs[i].task = "t1".into();
                    }
                    Revision {
                        rev: 2,
                        job: jobs[i].clone(),
                    }
                })
                .collect();
            db.record(&revs).await.unwrap();
        }
        let filters = [
            Search::default(),
            Search {
                task: Some("t1".into()),
                ..Search::default()
            },
            Search {
                since: Some(t0() + Duration::minutes(5)),
                until: Some(t0() + Duration::minutes(30)),
                ..Search::default()
            },
        ];
        for words in [
            "alpha",
            "beta",
            "gamma",
            "delta",
            "ALPHA beta",
            "nosuch",
            "delta alpha",
        ] {
            for f in &filters {
                for (limit, offset, cap) in [
                    (5, 0, 1000),
                    (5, 7, 1000),
                    (50, 0, 1000),
                    (3, 30, 2),
                    (4, 2, 1),
                ] {
                    let s = Search {
                        text: Some(words.into()),
                        ..f.clone()
                    };
                    let query = warden_history::read::words(words);
                    let mut expected: Vec<&Job> = jobs
                        .iter()
                        .filter(|j| {
                            let have =
                                warden_history::read::words(j.description.as_deref().unwrap_or(""));
                            query.iter().all(|w| have.contains(w))
                                && f.task.as_ref().is_none_or(|t| &j.task == t)
                                && f.since.is_none_or(|t| j.created_at >= t)
                                && f.until.is_none_or(|t| j.created_at < t)
                        })
                        .collect();
                    expected.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
                    let want: Vec<_> = expected
                        .iter()
                        .skip(offset)
                        .take(limit)
                        .map(|j| j.id)
                        .collect();
                    let (page, plan) = db
                        .search_text_planned(&s, &query, limit, offset, cap)
                        .await
                        .unwrap();
                    plans.insert(format!("{plan:?}"));
                    let got: Vec<_> = page.jobs.iter().map(|j| j.id).collect();
                    let case = format!("round {round}, {words:?}, {f:?}, limit {limit} offset {offset} cap {cap}: {plan:?}");
                    assert_eq!(got, want, "{case}");
                    let counted = offset + limit + cap;
                    if page.total_exact {
                        assert_eq!(page.total, expected.len(), "{case}");
                    } else {
                        assert!(
                            page.total <= expected.len().min(counted),
                            "{case}: {}",
                            page.total
                        );
                        assert!(page.total >= offset + got.len(), "{case}: {}", page.total);
                    }
                    if expected.len() <= counted && plan == Plan::Sort {
                        assert!(page.total_exact, "{case}");
                    }
                    // The API's search takes the same route.
                    assert_eq!(
                        db.search(&s, limit, offset, cap).await.unwrap(),
                        page,
                        "{case}"
                    );
                }
            }
        }
    }
    let want: &[&str] = match backend {
        warden_history::Backend::Sqlite => &["Sort", "Walk", "WalkThenSort"],
        warden_history::Backend::Postgres => &["Sort", "Walk"],
    };
    assert_eq!(plans.iter().map(String::as_str).collect::<Vec<_>>(), want);
}
