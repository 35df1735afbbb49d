//! Recycling and closing by hand: publishes the recycle event, closes the
//! resource, then what depends on it (decisions in `decide::recycling`).

use tracing::warn;
use warden_shared::messages::ResourceRecycle;
use warden_shared::resource::{reason, Resource};
use warden_shared::{runtime, subjects};

use crate::decide::recycling::{self as decide, ManualClose};
use crate::metrics::metrics;
use crate::store::OpError;
use crate::Health;

impl Health {
    /// Publishes a recycle event for `name` (once per incarnation) and
    /// closes it, then everything that depends on it.
    pub(crate) async fn recycle(&self, name: &str, code: &str, why: &str) -> Result<(), OpError> {
        let mut work = vec![(name.to_string(), code.to_string(), why.to_string())];
        while let Some((name, code, why)) = work.pop() {
            let Some((r, _)) = self.get(&name).await? else {
                continue;
            };
            if let Some(event) = decide::event(&r, &code, &why, self.now()) {
                // Published before the close: a crash in between leaves it
                // broken, and the retry's event is the same message id.
                self.publish_recycle(&event).await?;
                let incarnation = r.incarnation;
                let cfg = &self.config.health;
                let closed = self
                    .modify(&name, |current| {
                        decide::close(current?, incarnation, &code, &why, cfg, self.now())
                    })
                    .await?;
                if closed.is_some() {
                    metrics().recycles.with_label_values(&[&code]).inc();
                    warn!(resource = %name, reason = %code, why = %why, "resource recycled");
                }
            }
            let all: Vec<Resource> = self.cache().values().cloned().collect();
            work.extend(decide::dependents_to_close(&all, &name, &code));
        }
        Ok(())
    }

    async fn publish_recycle(&self, event: &ResourceRecycle) -> Result<(), OpError> {
        runtime::publish_with_id(
            &self.js,
            subjects::recycle_subject(&event.resource),
            &decide::event_id(event),
            event,
        )
        .await
        .map_err(|e| OpError::Store(format!("recycle event: {e}")))
    }

    /// Closes a resource by hand (and what depends on it).
    pub(crate) async fn close(&self, name: &str, why: Option<String>) -> Result<Resource, OpError> {
        let Some((r, _)) = self.get(name).await? else {
            return Err(OpError::NotFound(name.into()));
        };
        let why = decide::manual_why(why);
        match decide::manual_close(&r) {
            ManualClose::AlreadyClosed => {
                return Err(OpError::Refused(format!(
                    "resource {name} is already closed by hand"
                )))
            }
            ManualClose::KeepOut { incarnation } => {
                self.modify(name, |current| {
                    decide::keep_out(current?, incarnation, &why)
                })
                .await?;
            }
            ManualClose::Recycle => self.recycle(name, reason::MANUAL, &why).await?,
        }
        self.get(name)
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| OpError::NotFound(name.into()))
    }
}
