//! Two scheduler replicas running at once never lease one attempt twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;
use warden_e2e::InProcess;
use warden_shared::job::Job;
use warden_shared::messages::{AcquireReply, AcquireRequest};
use warden_shared::session::{session_key, Session, SessionState};
use warden_shared::{subjects, JobState};

const JOBS: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_dispatch_one_job_twice() {
    let s = InProcess::start("").await;
    let (client, handles, store) = (s.client.clone(), s.handles.clone(), s.store.clone());
    // Spawned here, not with `s.spawn`: each must stop cleanly.
    let replicas: Vec<_> = (0..2)
        .map(|_| tokio::spawn(warden_scheduler::run(s.config.clone(), s.shutdown.clone())))
        .collect();
    // The acquirers' sessions, as the fencing service would have written
    // them: the scheduler leases only to a session it knows to be active.
    for i in 0..8 {
        let now = Utc::now();
        let s = Session {
            version: 1,
            name: format!("session-{i}"),
            bot_id: format!("bot-{i}"),
            resource: None,
            resources: Vec::new(),
            agent_instance: String::new(),
            pools: vec!["default".into()],
            capacity: 7,
            agent_version: String::new(),
            timeout_ms: None,
            state: SessionState::Active,
            created_at: now,
            last_heartbeat: now,
            superseded_by: None,
            ended_at: None,
            leases: Vec::new(),
        };
        handles
            .sessions
            .put(session_key(&s.name), serde_json::to_vec(&s).unwrap().into())
            .await
            .unwrap();
    }
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
