//! The three bucket watches (jobs, sessions, resources): each change
//! updates the queue and the [`crate::leases::LeaseIndex`]; a lease the
//! index says must go back is taken back (`loops::requeue`).

use std::sync::Arc;

use async_nats::jetstream::kv::{Entry, Operation};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;
use uuid::Uuid;
use warden_shared::resource::Resource;
use warden_shared::runtime;
use warden_shared::session::Session;
use warden_shared::store::{self, Versioned};
use warden_shared::JobState;

use super::requeue::requeue;
use crate::Shared;

/// Keeps the queue equal to the SCHEDULED jobs in the bucket. On a watch
/// error it starts over: the first pass of a watch delivers every key's
/// latest value, which rebuilds the cache.
pub async fn jobs(shared: Arc<Shared>, shutdown: CancellationToken) {
    runtime::follow_kv(shared.store.kv(), ">", "jobs", &shutdown, |entry| {
        on_job(&shared, entry);
        std::future::ready(())
    })
    .await;
}

fn on_job(shared: &Arc<Shared>, entry: Entry) {
    let Ok(id) = entry.key.parse::<Uuid>() else {
        return;
    };
    if entry.operation != Operation::Put {
        shared.queue().forget(&id);
        return;
    }
    let job = match store::decode(&entry.key, &entry.value) {
        Ok(job) => job,
        Err(e) => {
            warn!(job.id = %id, error = %e, "undecodable job record ignored");
            return;
        }
    };
    let dead = shared.leases().observe_job(&job);
    if let Some((session, reason)) = dead {
        let shared = shared.clone();
        tokio::spawn(async move { requeue(&shared, id, &session, None, reason).await });
    }
    let scheduled = job.state == JobState::Scheduled;
    shared.queue().observe(Versioned {
        job,
        revision: entry.revision,
    });
    if scheduled {
        shared.ready.notify_waiters();
    }
}

/// Follows the sessions bucket; when a session stops being active, its
/// running attempts go back to the queue.
pub async fn sessions(shared: Arc<Shared>, tracker: TaskTracker, shutdown: CancellationToken) {
    runtime::follow_kv(
        &shared.sessions_kv,
        "session.>",
        "sessions",
        &shutdown,
        |entry| {
            on_session(&shared, &tracker, entry);
            std::future::ready(())
        },
    )
    .await;
}

fn on_session(shared: &Arc<Shared>, tracker: &TaskTracker, entry: Entry) {
    let Ok(session) = serde_json::from_slice::<Session>(&entry.value) else {
        return;
    };
    let Some((reason, doomed)) = shared.leases().observe_session(&session) else {
        return;
    };
    for id in doomed {
        let shared = shared.clone();
        let name = session.name.clone();
        tracker.spawn(async move { requeue(&shared, id, &name, None, reason).await });
    }
}

/// Follows the resources bucket: a resource that is no longer open gets no
/// new lease (checked in `acquire`); one that is closed loses its running
/// attempts, requeued without counting against their jobs. Any change
/// wakes parked acquire requests, so a resource that opens again gets work
/// at once.
pub async fn resources(shared: Arc<Shared>, tracker: TaskTracker, shutdown: CancellationToken) {
    runtime::follow_kv(&shared.resources_kv, ">", "resources", &shutdown, |entry| {
        on_resource(&shared, &tracker, entry);
        std::future::ready(())
    })
    .await;
}

fn on_resource(shared: &Arc<Shared>, tracker: &TaskTracker, entry: Entry) {
    let Ok(resource) = serde_json::from_slice::<Resource>(&entry.value) else {
        return;
    };
    let doomed = shared.leases().observe_resource(&resource);
    shared.ready.notify_waiters();
    for (id, session) in doomed {
        let shared = shared.clone();
        tracker.spawn(async move {
            requeue(
                &shared,
                id,
                &session,
                None,
                crate::requeue::RequeueReason::ResourceClosed,
            )
            .await
        });
    }
}
