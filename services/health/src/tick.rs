//! The periodic pass: starts due checks, finishes interrupted recycles,
//! closes resources whose dependency was closed (decisions in
//! `decide::tick`), and exports the gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;
use warden_shared::resource::{reason, Resource, ResourceState};

use crate::decide::checks::Trigger;
use crate::decide::tick::{self as decide, TickJob};
use crate::metrics::metrics;
use crate::store::OpError;
use crate::Health;

pub(crate) async fn tick_loop(
    health: Arc<Health>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        health.tick(&tracker);
        n += 1;
        if n % 5 == 1 {
            health.export_gauges();
        }
    }
}

impl Health {
    fn tick(self: &Arc<Self>, tracker: &TaskTracker) {
        let all: Vec<Resource> = self.cache().values().cloned().collect();
        for (name, job) in decide::due(&all, &self.config.health, self.now()) {
            if !self.start(&name) {
                continue;
            }
            let me = self.clone();
            tracker.spawn(async move {
                let what = job.as_str();
                let res = match job {
                    TickJob::Check => me.check(&name, Trigger::Suspicion).await.map(|_| ()),
                    TickJob::Return => me.check(&name, Trigger::Return).await.map(|_| ()),
                    TickJob::Recycle { code, why } => me.recycle(&name, code, &why).await,
                    TickJob::Dependency { why } => {
                        me.recycle(&name, reason::DEPENDENCY, &why).await
                    }
                };
                match res {
                    Ok(()) | Err(OpError::Refused(_)) => {}
                    Err(e) => {
                        warn!(resource = %name, what, error = %e, "health step failed; will retry")
                    }
                }
                me.done(&name);
            });
        }
    }

    fn export_gauges(&self) {
        let all: Vec<Resource> = self.cache().values().cloned().collect();
        let pools = self.config.tasks.values().map(|t| t.pool.as_str());
        let (by_state, by_pool) = decide::gauges(&all, pools);
        let m = metrics();
        for (state, n) in by_state {
            m.resources.with_label_values(&[state.as_str()]).set(n);
        }
        for (pool, counts) in by_pool {
            for state in ResourceState::ALL {
                m.pool_resources
                    .with_label_values(&[&pool, state.as_str()])
                    .set(counts.get(&state).copied().unwrap_or(0));
            }
        }
    }
}
