//! A grant that answers an acquire the worker sent under a session it has
//! since replaced is not the worker's to run: the scheduler leased it to
//! the old session and takes it back when it sees that session superseded,
//! so the job may already be running elsewhere. The worker drops it.
//! (Found by `warden chaos --seed 1804459560`: a worker that fenced itself
//! opened a new session while its acquire of the old one was in flight,
//! ran the grant under the new session, and the job ran twice at once.)
//!
//! The test answers `warden.sched.acquire` itself, holding the first
//! request until the worker's session has been replaced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warden_e2e::{eventually, never_within, NatsServer};
use warden_shared::messages::{AcquireReply, AcquireRequest, LeaseGrant, SessionReply};
use warden_shared::session::bot_key;
use warden_shared::{runtime, subjects};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_for_a_replaced_session_is_not_run() {
    let nats = NatsServer::start();
    let config = warden_e2e::config(
        &nats.url(),
        "[fencing]\nsession_timeout = \"3s\"\n[worker]\nbot_id = \"grant-bot\"\n",
    );
    let (client, handles) = runtime::Connect::new(&config, "test")
        .topology_forever()
        .await
        .unwrap();
    let mut acquires = client.subscribe(subjects::acquire_all()).await.unwrap();
    let stop = CancellationToken::new();
    let fencing = tokio::spawn(warden_fencing::run(config.clone(), stop.clone()));
    let worker = tokio::spawn(warden_worker::run(config.clone(), stop.clone()));

    // The worker's first acquire, under its first session: held.
    let held = tokio::time::timeout(Duration::from_secs(30), acquires.next())
        .await
        .expect("an acquire request")
        .unwrap();
    let req: AcquireRequest = serde_json::from_slice(&held.payload).unwrap();
    let first = req.session.clone();

    // Another session of the same bot supersedes it; the worker hears so at
    // its next heartbeat and opens a session of its own again.
    let create = serde_json::json!({
        "version": 1, "bot_id": "grant-bot", "agent_instance": "test",
        "pools": ["default"], "capacity": 1, "agent_version": "test",
    });
    let reply = client
        .request(
            subjects::session_create_subject("grant-bot"),
            serde_json::to_vec(&create).unwrap().into(),
        )
        .await
        .unwrap();
    let intruder = serde_json::from_slice::<SessionReply>(&reply.payload)
        .unwrap()
        .session
        .expect("a session");
    let sessions = handles.sessions.clone();
    eventually(Duration::from_secs(30), "the worker's new session", || {
        let sessions = sessions.clone();
        let (first, intruder) = (first.clone(), intruder.clone());
        async move {
            let current = sessions.get(bot_key("grant-bot")).await.ok()??;
            let current = String::from_utf8(current.to_vec()).ok()?;
            (current != first && current != intruder).then_some(())
        }
    })
    .await;

    // Now the grant for the first session arrives.
    let job = Uuid::new_v4();
    let grant = AcquireReply {
        version: 1,
        leases: vec![LeaseGrant {
            job_id: job,
            epoch: 1,
            task: "sleep".into(),
            args: [("seconds".to_string(), "30".to_string())].into(),
            pool: "default".into(),
            priority: 0,
            secret: None,
        }],
        error: None,
    };
    client
        .publish(
            held.reply.clone().expect("a reply subject"),
            serde_json::to_vec(&grant).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();

    let reports = handles
        .js
        .get_stream(subjects::REPORTS_STREAM)
        .await
        .unwrap();
    never_within(
        Duration::from_secs(5),
        "the worker running a grant of its replaced session",
        || {
            let reports = reports.clone();
            async move {
                reports
                    .get_last_raw_message_by_subject(&subjects::bot_report_subject(
                        "grant-bot",
                        &job,
                    ))
                    .await
                    .ok()
                    .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            }
        },
    )
    .await;

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), worker).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), fencing).await;
}
