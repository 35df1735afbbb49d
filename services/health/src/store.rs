//! The one write path of `warden_resources`: read, change by a pure
//! decision, compare-and-set, retried on conflict.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use thiserror::Error;
use tracing::debug;
use uuid::Uuid;
use warden_shared::error::ErrorCode;
use warden_shared::messages::ErrorBody;
use warden_shared::resource::{resource_key, Resource};

use crate::metrics::metrics;
use crate::Health;

/// Why an operation on a resource did not happen.
#[derive(Debug, Error)]
pub(crate) enum OpError {
    #[error("no resource named {0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("resource store: {0}")]
    Store(String),
}

impl OpError {
    pub(crate) fn body(&self) -> ErrorBody {
        let code = match self {
            OpError::NotFound(_) => ErrorCode::NotFound,
            OpError::Refused(_) => ErrorCode::IllegalTransition,
            OpError::Store(_) => ErrorCode::Unavailable,
        };
        ErrorBody::new(code, self.to_string())
    }
}

/// Writes of one record tried before giving up.
const CAS_ATTEMPTS: u32 = 16;

/// The pause before retry `attempt` (1…) of a compare-and-set: a few
/// milliseconds, growing, jittered so that replicas that collided do not
/// collide again in step (and a replica whose read came from a lagging
/// follower reads again after it caught up).
fn cas_pause(attempt: u32) -> Duration {
    let ceiling = 5 * u64::from(attempt.min(10)) + 5;
    let jitter = (Uuid::new_v4().as_u128() % u128::from(ceiling)) as u64;
    Duration::from_millis(2 + jitter)
}

impl Health {
    pub(crate) async fn get(&self, name: &str) -> Result<Option<(Resource, u64)>, OpError> {
        match self
            .kv
            .entry(resource_key(name))
            .await
            .map_err(|e| OpError::Store(e.to_string()))?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let r = serde_json::from_slice(&e.value)
                    .map_err(|e| OpError::Store(format!("undecodable record of {name}: {e}")))?;
                Ok(Some((r, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Read, change, compare-and-set, retried on conflict: the one write
    /// path of `warden_resources` (registration, leaving, suspicion, check
    /// claims and results, recycling, closing by hand). `change` gets the
    /// current record (`None`: absent) and returns the new one, or `None`
    /// to write nothing; on a conflict it runs again on what another
    /// writer left, after a short jittered pause. Returns what was
    /// written.
    pub(crate) async fn modify<F>(
        &self,
        name: &str,
        mut change: F,
    ) -> Result<Option<Resource>, OpError>
    where
        F: FnMut(Option<Resource>) -> Option<Resource>,
    {
        let key = resource_key(name);
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(cas_pause(attempt)).await;
            }
            let current = self.get(name).await?;
            let revision = current.as_ref().map(|(_, rev)| *rev);
            let Some(next) = change(current.map(|(r, _)| r)) else {
                return Ok(None);
            };
            let body =
                Bytes::from(serde_json::to_vec(&next).map_err(|e| OpError::Store(e.to_string()))?);
            let written = match revision {
                None => self.kv.create(&key, body).await.map(|_| ()).map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists
                            || warden_shared::store::lost_race(&e),
                        e.to_string(),
                    )
                }),
                Some(rev) => self
                    .kv
                    .update(&key, body, rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision
                                || warden_shared::store::lost_race(&e),
                            e.to_string(),
                        )
                    }),
            };
            match written {
                Ok(()) => {
                    self.cache().insert(next.name.clone(), next.clone());
                    return Ok(Some(next));
                }
                Err((true, e)) => {
                    metrics().cas_conflicts.inc();
                    debug!(resource = %name, attempt, error = %e, "resource changed meanwhile; re-reading");
                }
                Err((false, e)) => return Err(OpError::Store(e)),
            }
        }
        Err(OpError::Store(format!(
            "{name}: still changing after {CAS_ATTEMPTS} attempts"
        )))
    }
}
