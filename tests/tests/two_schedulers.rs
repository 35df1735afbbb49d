//! Two scheduler replicas running at once never lease one attempt twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;
use warden_e2e::{eventually, write_sessions, InProcess};
use warden_shared::job::Job;
use warden_shared::messages::{AcquireReply, AcquireRequest, LeaseGrant, Report, ReportKind};
use warden_shared::{subjects, Action, JobState};

const JOBS: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_dispatch_one_job_twice() {
    let s = InProcess::start("").await;
    let (client, handles, store) = (s.client.clone(), s.handles.clone(), s.store.clone());
    // Spawned here, not with `s.spawn`: each must stop cleanly.
    let replicas: Vec<_> = (0..2)
        .map(|_| tokio::spawn(warden_scheduler::run(s.config.clone(), s.shutdown.clone())))
        .collect();
    write_sessions(&handles, 8, 7).await;
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let job = Job::builder("noop").build();
        store.create(&job).await.unwrap();
        ids.push(job.id);
    }

    // Eight greedy acquirers hammer both replicas (the queue group spreads
    // requests) and record every lease they are given.
    let acquirers: Vec<_> = (0..8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut empty = 0;
                while empty < 3 {
                    let req = AcquireRequest {
                        version: 1,
                        session: format!("session-{i}"),
                        bot_id: format!("bot-{i}"),
                        resource: None,
                        resources: Vec::new(),
                        pools: vec!["default".into()],
                        max: 7,
                        wait_ms: 300,
                    };
                    let reply = client
                        .request(
                            subjects::acquire_subject(&req.bot_id),
                            serde_json::to_vec(&req).unwrap().into(),
                        )
                        .await
                        .unwrap();
                    let reply: AcquireReply = serde_json::from_slice(&reply.payload).unwrap();
                    if reply.leases.is_empty() {
                        empty += 1;
                    }
                    got.extend(reply.leases.into_iter().map(|l| (l.job_id, l.epoch, i)));
                }
                got
            })
        })
        .collect();
    let mut granted: HashMap<Uuid, Vec<(u32, usize)>> = HashMap::new();
    for a in acquirers {
        for (id, epoch, who) in a.await.unwrap() {
            granted.entry(id).or_default().push((epoch, who));
        }
    }
    let twice: Vec<_> = granted.iter().filter(|(_, g)| g.len() > 1).collect();
    assert!(twice.is_empty(), "jobs leased more than once: {twice:?}");
    assert_eq!(granted.len(), JOBS, "every job leased exactly once");

    // The bucket agrees: every job RUNNING at attempt 1 with one dispatch.
    for id in &ids {
        let v = store.get(id).await.unwrap().unwrap();
        assert_eq!((v.job.state, v.job.attempt), (JobState::Running, 1));
        assert_eq!(
            v.job
                .history
                .iter()
                .filter(|h| h.action == warden_shared::Action::Dispatch)
                .count(),
            1
        );
        let lease = v.job.lease.unwrap();
        assert_eq!(
            format!("session-{}", granted[id][0].1),
            lease.session,
            "the lease names the acquirer that got it"
        );
    }
    s.shutdown.cancel();
    for r in replicas {
        let res = tokio::time::timeout(Duration::from_secs(15), r)
            .await
            .expect("replica stops on shutdown");
        res.unwrap().unwrap();
    }
}

/// Publishes the report `kind` of the holder of `lease` (bot-0), and
/// waits for the stream to store it.
async fn report(js: &async_nats::jetstream::Context, lease: &LeaseGrant, kind: ReportKind) {
    let r = Report {
        version: 1,
        job_id: lease.job_id,
        session: "session-0".into(),
        bot_id: "bot-0".into(),
        epoch: lease.epoch,
        at: Utc::now(),
        secret: lease.secret.clone(),
        kind,
    };
    js.publish(
        subjects::bot_report_subject("bot-0", &lease.job_id),
        serde_json::to_vec(&r).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Each replica applies a report starting from the version of the job it
/// last saw RUNNING (its own dispatch, its own last write, or the watch's
/// latest) instead of reading it first. With two replicas sharing the
/// reports consumer, the version one holds is often older than what the
/// other wrote: every report must still be applied exactly once, on the
/// latest version, and no job may finish twice or lose its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_apply_every_report_once_on_the_latest_version() {
    const N: usize = 300;
    let s = InProcess::start("").await;
    let (client, handles, store) = (s.client.clone(), s.handles.clone(), s.store.clone());
    let js = async_nats::jetstream::new(client.clone());
    let replicas: Vec<_> = (0..2)
        .map(|_| tokio::spawn(warden_scheduler::run(s.config.clone(), s.shutdown.clone())))
        .collect();
    write_sessions(&handles, 1, N as u32).await;
    let mut ids = Vec::new();
    for _ in 0..N {
        let job = Job::builder("noop").build();
        store.create(&job).await.unwrap();
        ids.push(job.id);
    }
    // One bot leases them all, from both replicas.
    let mut leases: Vec<LeaseGrant> = Vec::new();
    while leases.len() < N {
        let req = warden_e2e::acquire_request("session-0", "bot-0", N as u32);
        let reply = client
            .request(
                subjects::acquire_subject(&req.bot_id),
                serde_json::to_vec(&req).unwrap().into(),
            )
            .await
            .unwrap();
        let reply: AcquireReply = serde_json::from_slice(&reply.payload).unwrap();
        assert!(reply.error.is_none(), "{:?}", reply.error);
        leases.extend(reply.leases);
    }
    // Each job's start and then its end, all jobs at once: the two
    // replicas pull them interleaved, so the one that applies a job's end
    // often holds the job as it was before the other applied its start.
    let publishing: Vec<_> = leases
        .into_iter()
        .map(|l| {
            let js = js.clone();
            tokio::spawn(async move {
                report(&js, &l, ReportKind::Started { resource: None }).await;
                let end = ReportKind::Finished {
                    outcome: "passed".into(),
                    duration_ms: 1,
                };
                report(&js, &l, end).await;
            })
        })
        .collect();
    for p in publishing {
        p.await.unwrap();
    }
    eventually(Duration::from_secs(30), "every job FINISHED", || {
        let store = store.clone();
        let ids = ids.clone();
        async move {
            for id in &ids {
                let j = store.get(id).await.ok()??.job;
                (j.state == JobState::Finished).then_some(())?;
            }
            Some(())
        }
    })
    .await;
    // Each job dispatched and finished once, never a rejected report; its
    // start recorded, or counted late when its end was applied first.
    let mut starts = 0;
    for id in &ids {
        let j = store.get(id).await.unwrap().unwrap().job;
        let count = |a: Action| j.history.iter().filter(|h| h.action == a).count();
        assert_eq!(
            (
                j.attempt,
                count(Action::Dispatch),
                count(Action::Finish),
                count(Action::RejectReport)
            ),
            (1, 1, 1, 0),
            "{:?}",
            j.history
        );
        assert!(count(Action::Start) <= 1, "{:?}", j.history);
        starts += count(Action::Start);
    }
    let m = warden_scheduler::metrics::metrics();
    let late = m
        .reports
        .with_label_values(&["started", "late_start"])
        .get() as usize;
    assert_eq!(starts + late, N, "{starts} starts recorded, {late} late");
    // How often a replica's version was not the latest (not asserted: it
    // depends on timing).
    let conflicts = m.report_conflicts.get();
    eprintln!(
        "{late} of {N} starts late; report writes that lost the race: {conflicts} of {}",
        2 * N
    );
    s.shutdown.cancel();
    for r in replicas {
        let res = tokio::time::timeout(Duration::from_secs(15), r)
            .await
            .expect("replica stops on shutdown");
        res.unwrap().unwrap();
    }
}
