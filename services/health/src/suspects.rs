//! Consumes `warden.resource.suspect.*` (shared durable consumer) and
//! applies the suspicion state machine (`decide::suspicion`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warden_shared::messages::ResourceSuspect;
use warden_shared::resource::reason;
use warden_shared::runtime;

use crate::decide::suspicion::{self, SuspectResult};
use crate::metrics::{self, metrics};
use crate::store::OpError;
use crate::Health;

pub(crate) async fn suspects_loop(
    health: Arc<Health>,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull suspect events; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = messages.next() => match m { Some(Ok(m)) => m, Some(Err(e)) => { debug!(error = %e, "suspect pull interrupted"); continue } None => break },
            };
            let m = metrics();
            match serde_json::from_slice::<ResourceSuspect>(&msg.payload) {
                Ok(s) => match health.on_suspect(&s).await {
                    Ok(result) => {
                        m.suspects.with_label_values(&[result.label()]).inc();
                        if result == SuspectResult::Unknown {
                            warn!(resource = %s.resource, job.id = %s.job_id, "suspect event for a resource never registered");
                        }
                        let _ = msg.ack().await;
                    }
                    Err(e) => {
                        warn!(resource = %s.resource, error = %e, "cannot record suspicion; will retry");
                        let _ = msg
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                },
                Err(e) => {
                    m.suspects.with_label_values(&["invalid"]).inc();
                    if dead_letter(&health, &msg, &e.to_string()).await {
                        let _ = msg.ack().await;
                    }
                }
            }
        }
    }
}

async fn dead_letter(health: &Health, msg: &jetstream::Message, error: &str) -> bool {
    warn!(subject = %msg.subject, error, "undecodable suspect event dead-lettered");
    let subject = msg.subject.to_string();
    let kept = runtime::dead_letter(
        &health.js,
        "health",
        metrics::INVALID_SUSPECT,
        &subject,
        error,
        &msg.payload,
    )
    .await
    .is_ok();
    if kept {
        metrics()
            .dead_letters
            .with_label_values(&[metrics::INVALID_SUSPECT])
            .inc();
    }
    kept
}

impl Health {
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
