//! Taking a lease back: read the job, decide ([`crate::requeue`]), write
//! by compare-and-set. Several replicas may try; one wins, the others see
//! the job moved on and stop.

use std::time::Duration;

use chrono::Utc;
use tracing::{debug, info, warn};
use uuid::Uuid;
use warden_shared::cas::{self, Backoff, Change, Never, OnConflict, Outcome, Retry, Step};
use warden_shared::job::Job;
use warden_shared::resource::{resource_key, Resource, ResourceState};
use warden_shared::retry::Fate;

use crate::metrics::{count_crash, count_fate, metrics};
use crate::requeue::{holder_grace, still_held, take_back, RequeueReason};
use crate::Shared;

/// Takes `session`'s lease on job `id` back, of attempt `epoch` only when
/// given. A lost worker (expired, or replaced by its own restart) ends the
/// attempt as `system/worker_lost` under the retry policy: a delayed
/// retry, or SHELVED (budget spent, or poison). A closed session's lease
/// goes straight back to the queue, costing nothing. A job that cannot be
/// read is tried again with back-off (a NATS node may be down): giving up
/// would leave it RUNNING under a dead lease until the next sweep.
pub async fn requeue(
    shared: &Shared,
    id: Uuid,
    session: &str,
    epoch: Option<u32>,
    reason: RequeueReason,
) {
    let step = Decide {
        shared,
        session,
        epoch,
        reason,
    };
    match cas::run(&shared.store.at(id), RETRY, step).await {
        Ok(Outcome::Written {
            value: next,
            with: fate,
            ..
        }) => {
            let m = metrics();
            m.requeued.with_label_values(&[reason.label()]).inc();
            m.transitions
                .with_label_values(&["RUNNING", next.state.as_str()])
                .inc();
            if let Some(fate) = fate {
                count_fate(fate, next.blame);
                // A lost worker's attempt failed with the blame it was
                // recorded with; a closed resource's costs nothing
                // (requeued, blame cleared) unless it made the job poison.
                if let (Some(blame), Some(detail)) = (next.blame, next.detail.as_deref()) {
                    count_crash(&shared.config, blame, detail);
                }
            }
            info!(job.id = %id, session, reason = reason.label(), state = %next.state, "lease taken back");
        }
        Ok(Outcome::Stopped(())) => {}
        Err(e) => {
            warn!(job.id = %id, session, error = %e, "cannot take the lease back; the sweep tries again")
        }
    }
}

/// A take-back's attempts: 30 in all, lost races retried at once, store
/// errors (a NATS node down) after 100 ms doubling to 2 s.
const RETRY: Retry = Retry {
    attempts: 30,
    on_conflict: OnConflict::AtOnce,
    store_errors: Backoff {
        retries: 29,
        first: Duration::from_millis(100),
        max: Duration::from_secs(2),
    },
};

/// One attempt's decision: whether the lease is still the one to take
/// back, and what the job becomes ([`take_back`]).
struct Decide<'a> {
    shared: &'a Shared,
    session: &'a str,
    epoch: Option<u32>,
    reason: RequeueReason,
}

impl Change<Job> for Decide<'_> {
    /// What the retry policy did, to count once written.
    type Write = Option<Fate>;
    type Stop = ();
    type Error = Never;

    async fn step(&mut self, current: Option<Job>) -> Result<Step<Job, Option<Fate>, ()>, Never> {
        let shared = self.shared;
        let Some(job) = current else {
            return Ok(Step::Stop(()));
        };
        if !still_held(&job, self.session, self.epoch) {
            return Ok(Step::Stop(()));
        }
        let names = job
            .lease
            .as_ref()
            .map(|l| l.resource_names())
            .unwrap_or_default();
        // This replica's view of the resources may lag (a resource closed,
        // then reopened as a new incarnation): act only on a closure the
        // bucket still shows.
        if self.reason == RequeueReason::ResourceClosed && !closed_now(shared, &names).await {
            debug!(job.id = %job.id, "its resource is no longer closed; lease kept");
            return Ok(Step::Stop(()));
        }
        let closed = shared.leases().closed(&names);
        let policy = shared.config.retry_policy(&job.task);
        let grace = holder_grace(&shared.config);
        Ok(
            match take_back(
                &job,
                self.session,
                self.reason,
                &closed,
                &policy,
                grace,
                Utc::now(),
            ) {
                Some(back) => Step::Write(back.next, back.fate),
                None => Step::Stop(()),
            },
        )
    }
}

/// Whether one of `names` is closed in the resources bucket now; `false`
/// when it cannot be read (the orphan sweep asks again in two seconds).
async fn closed_now(shared: &Shared, names: &[String]) -> bool {
    for name in names {
        match shared.resources_kv.get(resource_key(name)).await {
            Ok(Some(bytes)) => {
                if serde_json::from_slice::<Resource>(&bytes)
                    .is_ok_and(|r| r.state == ResourceState::Closed)
                {
                    return true;
                }
            }
            Ok(None) => {}
            Err(e) => {
                debug!(resource = %name, error = %e, "cannot read the resource");
                return false;
            }
        }
    }
    false
}
