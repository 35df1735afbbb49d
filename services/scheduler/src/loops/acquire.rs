//! The acquire long poll: workers ask on their own acquire subject
//! ([`warden_shared::subjects::acquire_subject`], the bot its credentials
//! prove); the session must be one the fencing service wrote for that bot;
//! each job handed out is first moved SCHEDULED → RUNNING by a
//! compare-and-set on its revision, so two replicas can never lease one
//! attempt twice. Decisions in [`crate::acquire`].

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warden_shared::messages::{AcquireReply, AcquireRequest, LeaseGrant};
use warden_shared::serve::{self, Reply};
use warden_shared::session::{session_key, Session};
use warden_shared::store::{StoreError, Versioned};
use warden_shared::{lease_secret, subjects};

use crate::acquire::{
    after_lost_dispatch, dead_session, dispatched, finish, grant, invalid, limits, read_back,
    request_resources, session_unreadable, session_verdict, AcquireResult, ReadBack,
};
use crate::metrics::metrics;
use crate::requeue::fresh_lease_limit;
use crate::Shared;

/// Answers acquire requests until `shutdown`, then drains: every request
/// taken gets its reply (a parked long poll returns at once, empty).
pub async fn serve(shared: Arc<Shared>, sub: async_nats::Subscriber, shutdown: CancellationToken) {
    let requests = serve::subscription(shared.client.clone(), sub);
    let stop = shutdown.clone();
    serve::serve("acquire", requests, &shutdown, move |msg| {
        let shared = shared.clone();
        let shutdown = stop.clone();
        async move {
            // Nobody to hand a lease to: nothing is dispatched.
            if msg.reply.is_none() {
                return Reply::default();
            }
            let bot = subjects::bot_of_subject(subjects::ACQUIRE, msg.subject.as_str());
            let (result, answer) =
                match (bot, serde_json::from_slice::<AcquireRequest>(&msg.payload)) {
                    (Some(bot), Ok(req)) => acquire(&shared, &bot, req, &shutdown).await,
                    (None, _) => invalid("the subject names no bot"),
                    (_, Err(e)) => invalid(&e.to_string()),
                };
            metrics()
                .acquire_requests
                .with_label_values(&[result.label()])
                .inc();
            Reply::json(&answer)
        }
    })
    .await;
}

/// Leases up to `req.max` jobs (at most its session's capacity) to the
/// requesting session of `bot` (read off the subject), waiting up to
/// `req.wait_ms` (capped by config) for work to appear.
async fn acquire(
    shared: &Shared,
    bot: &str,
    req: AcquireRequest,
    shutdown: &CancellationToken,
) -> (AcquireResult, AcquireReply) {
    // The session as the fencing service wrote it, read from the bucket
    // every time: only what fencing created for this bot, active, and the
    // pools it serves get a lease (a cache could hold a session this
    // replica never saw written, or miss one).
    let known = match shared.sessions_kv.get(session_key(&req.session)).await {
        Ok(Some(bytes)) => serde_json::from_slice::<Session>(&bytes)
            .ok()
            .filter(|s| s.name == req.session),
        Ok(None) => None,
        Err(e) => {
            warn!(session = %req.session, error = %e, "cannot read the session; acquire refused for now");
            return session_unreadable(&req.session, &e.to_string()).reply(AcquireResult::Rejected);
        }
    };
    if let Err(refusal) = session_verdict(&req, bot, known.as_ref()) {
        metrics()
            .acquire_refused
            .with_label_values(&[refusal.code.as_str()])
            .inc();
        warn!(bot.id = %bot, session = %req.session, code = %refusal.code, reason = %refusal.message, "acquire refused");
        return refusal.reply(AcquireResult::Rejected);
    }
    let capacity = known.as_ref().map(|s| s.capacity).unwrap_or(1);
    let (wait, max) = limits(&req, &shared.config, capacity);
    let deadline = tokio::time::Instant::now() + wait;
    let mut leases = Vec::new();
    let resources = request_resources(&req);
    let mut blocked: Option<String>;
    loop {
        // Register interest before looking, so a job that arrives between
        // the look and the wait still wakes us.
        let notified = shared.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A session this replica knows to be dead gets nothing, checked on
        // every wake-up: a long poll parked before its bot died must not
        // take work.
        let dead = shared.leases().dead(&req.session);
        if let Some(reason) = dead {
            return dead_session(&req, reason).reply(AcquireResult::Rejected);
        }
        // No new lease for a session on a resource that is not open
        // (suspicious, broken, closed): its jobs wait for others, and this
        // request is held like an empty one, so a resource that opens
        // again is served at once.
        blocked = shared
            .leases()
            .unavailable(&resources)
            .map(|(r, state)| format!("resource {r} is {state}"));
        let candidates = if blocked.is_some() {
            Vec::new()
        } else {
            shared.queue().take(&req.pools, max - leases.len())
        };
        if !candidates.is_empty() {
            let results = futures::future::join_all(
                candidates.into_iter().map(|v| dispatch(shared, v, &req)),
            )
            .await;
            leases.extend(results.into_iter().flatten());
            if leases.len() >= max || !leases.is_empty() {
                break;
            }
            // Every one lost (to another replica, or the store failed):
            // a short pause, so a failing store is not hammered.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = shutdown.cancelled() => break,
        }
    }
    finish(leases, blocked)
}

/// SCHEDULED → RUNNING with a new epoch, by compare-and-set. `None` when
/// another writer got there first (the watch will tell us what happened).
async fn dispatch(shared: &Shared, v: Versioned, req: &AcquireRequest) -> Option<LeaseGrant> {
    let now = Utc::now();
    let revision = v.revision;
    let original = v.clone();
    let from = v.job.state;
    // A fresh secret for every grant: only the holder gets it, the record
    // keeps its hash.
    let secret = lease_secret::generate();
    let job = dispatched(v.job, req, lease_secret::hash(&secret), now)?;
    match shared.store.update(&job, revision).await {
        Ok(written) => {
            let m = metrics();
            m.dispatched.inc();
            m.transitions
                .with_label_values(&[from.as_str(), job.state.as_str()])
                .inc();
            m.dispatch_latency
                .observe((now - job.queued_at).num_milliseconds().max(0) as f64 / 1000.0);
            debug!(job.id = %job.id, epoch = job.attempt, bot.id = %req.bot_id, "job dispatched");
            let lease = grant(&job, &secret);
            // Its first report starts from this write (the watch may not
            // have delivered it yet).
            shared.queue().observe(Versioned {
                job,
                revision: written,
            });
            Some(lease)
        }
        Err(StoreError::Conflict(_)) => {
            metrics().dispatch_conflicts.inc();
            let read = shared.store.get(&job.id).await.ok();
            if let Some(v) = after_lost_dispatch(original, read) {
                shared.queue().observe(v);
                shared.ready.notify_waiters();
            }
            None
        }
        Err(e) => {
            // The write may have happened though its acknowledgement was
            // lost (a NATS node died in between): read it back. A lease
            // written but never handed out is taken back by the orphan
            // sweep.
            let read = shared.store.get(&job.id).await.ok();
            let grace = fresh_lease_limit(&shared.config);
            match read_back(
                read.as_ref().map(Option::as_ref),
                &secret,
                &req.session,
                job.attempt,
                revision,
                grace,
                Utc::now(),
            ) {
                ReadBack::Grant(lease) => {
                    metrics().dispatched.inc();
                    info!(job.id = %job.id, epoch = job.attempt, error = %e, "dispatch written though not acknowledged");
                    Some(lease)
                }
                ReadBack::Moved => None,
                ReadBack::Requeue => {
                    warn!(job.id = %job.id, error = %e, "dispatch failed; job stays queued");
                    shared.queue().observe(original);
                    None
                }
            }
        }
    }
}
