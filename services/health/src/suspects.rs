//! Consumes `warden.resource.suspect.*` (shared durable consumer) and
//! applies the suspicion state machine (`decide::suspicion`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warden_shared::consume::{self, Consume, Disposition};
use warden_shared::messages::ResourceSuspect;
use warden_shared::resource::reason;

use crate::decide::suspicion::{self, SuspectResult};
use crate::metrics::{self, metrics};
use crate::store::OpError;
use crate::Health;

/// Consumes suspect events until `shutdown`, one at a time: a recorded
/// one is acked, one that could not be recorded (the store failed) is
/// delivered again after a second, an undecodable one is dead-lettered.
pub(crate) async fn suspects_loop(
    health: Arc<Health>,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) {
    let how = Consume {
        service: "health",
        js: &health.js,
        batch: 1,
        dead_letter_retry: Duration::from_secs(1),
        gather: Duration::ZERO,
    };
    let handler = |msg: jetstream::Message| {
        let health = health.clone();
        async move { health.on_suspect_message(&msg).await }
    };
    let on_dead_letter = |reason: &'static str| {
        metrics().dead_letters.with_label_values(&[reason]).inc();
    };
    consume::consume(how, &consumer, &shutdown, handler, on_dead_letter).await;
}

impl Health {
    async fn on_suspect_message(self: &Arc<Self>, msg: &jetstream::Message) -> Disposition {
        let m = metrics();
        match serde_json::from_slice::<ResourceSuspect>(&msg.payload) {
            Ok(s) => match self.on_suspect(&s).await {
                Ok(result) => {
                    m.suspects.with_label_values(&[result.label()]).inc();
                    if result == SuspectResult::Unknown {
                        warn!(resource = %s.resource, job.id = %s.job_id, "suspect event for a resource never registered");
                    }
                    Disposition::Ack
                }
                Err(e) => {
                    warn!(resource = %s.resource, error = %e, "cannot record suspicion; will retry");
                    Disposition::Nak(Duration::from_secs(1))
                }
            },
            Err(e) => {
                m.suspects.with_label_values(&["invalid"]).inc();
                warn!(subject = %msg.subject, error = %e, "undecodable suspect event dead-lettered");
                Disposition::DeadLetter {
                    reason: metrics::INVALID_SUSPECT,
                    error: e.to_string(),
                }
            }
        }
    }

    async fn on_suspect(self: &Arc<Self>, s: &ResourceSuspect) -> Result<SuspectResult, OpError> {
        let cfg = &self.config.health;
        let now = self.now();
        let why = suspicion::why(s);
        let mut result = SuspectResult::Unknown;
        let written = self
            .modify(&s.resource, |current| {
                let (r, next) = suspicion::on_suspect(current, s, &why, cfg, now);
                result = r;
                next
            })
            .await?;
        if let Some(r) = written {
            match result {
                SuspectResult::Flapping => {
                    warn!(resource = %r.name, "resource flapping: broken without a check");
                    self.recycle(&r.name, reason::FLAPPING, &r.reason).await?;
                }
                SuspectResult::Suspicious => {
                    info!(resource = %r.name, job.id = %s.job_id, detail = %s.detail, check_after = ?r.check_after, "resource suspicious")
                }
                _ => {}
            }
        }
        Ok(result)
    }
}
