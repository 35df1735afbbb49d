//! The timer: promotes delayed retries when due (within 100 ms), refreshes
//! the queue gauges and snapshot every second, and sweeps orphaned leases
//! every two (decisions in [`crate::timers`] and [`crate::leases`]).

use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use warden_shared::messages::{QueueReply, MESSAGE_VERSION};

use super::requeue::requeue;
use crate::leases::sweep_grace;
use crate::metrics::{metrics, PriorityLabels};
use crate::requeue::RequeueReason;
use crate::timers::{age_seconds, by_label, tick, unserved, TICK};
use crate::{queue, Shared};

pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let priorities = PriorityLabels::new(&shared.config);
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = Utc::now();
        if shared.queue().promote(now) > 0 {
            shared.ready.notify_waiters();
        }
        n += 1;
        let t = tick(n);
        if t.sweep {
            sweep_orphans(&shared);
        }
        if t.gauges {
            refresh(&shared, &priorities, now);
        }
    }
}

/// Sets the queue gauges and the snapshot [`super::queue`] answers.
fn refresh(shared: &Shared, priorities: &PriorityLabels, now: chrono::DateTime<Utc>) {
    let (waiting, delayed) = {
        let q = shared.queue();
        (q.waiting(), q.delayed())
    };
    let m = metrics();
    m.queue_depth.reset();
    m.oldest_age.reset();
    m.delayed.reset();
    for ((pool, priority), (count, oldest)) in &by_label(&waiting, priorities) {
        m.queue_depth
            .with_label_values(&[*pool, priority.as_str()])
            .set(*count as i64);
        m.oldest_age
            .with_label_values(&[*pool, priority.as_str()])
            .set(age_seconds(*oldest, now));
    }
    for (pool, count) in &delayed {
        m.delayed.with_label_values(&[pool]).set(*count as i64);
    }
    let (served, known) = {
        let l = shared.leases();
        (l.served_pools(), l.known_pools())
    };
    *shared.snapshot() = QueueReply {
        version: MESSAGE_VERSION,
        at: now,
        pools: queue::pools(&waiting, &delayed, &served, &known),
    };
    m.waiting_for_resource.reset();
    for (pool, count) in unserved(known, &waiting, &served) {
        m.waiting_for_resource
            .with_label_values(&[&pool])
            .set(count);
    }
}

/// Takes back the leases that must go back (see
/// [`crate::leases::LeaseIndex::orphans`]); one take-back per job at a time.
fn sweep_orphans(shared: &Arc<Shared>) {
    let orphans = shared
        .leases()
        .orphans(sweep_grace(shared.config.fencing.session_timeout));
    for o in orphans {
        if !shared.sweeping().insert(o.job) {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            if o.reason == RequeueReason::LeaseUndelivered {
                warn!(job.id = %o.job, session = %o.session, epoch = ?o.epoch, "lease never reached its worker; taking it back");
            }
            requeue(&shared, o.job, &o.session, o.epoch, o.reason).await;
            shared.sweeping().remove(&o.job);
        });
    }
}
