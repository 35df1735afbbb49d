//! The one write path of `warden_resources`: read, change by a pure
//! decision, compare-and-set, retried on conflict.

use async_nats::jetstream::kv;
use thiserror::Error;
use tracing::debug;
use warden_shared::cas::{self, CasError, Never, Policy};
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

/// Writes of one record tried before giving up, and the pauses between
/// them (16 attempts: the default).
const CAS: Policy = Policy::DEFAULT;

/// A store error as text, with its cause.
fn store_text<E: std::error::Error>(e: &CasError<E>) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
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
    /// written. Each attempt is one `warden_shared::cas::modify`, so that
    /// every lost race is counted (`warden_health_write_conflicts_total`).
    pub(crate) async fn modify<F>(
        &self,
        name: &str,
        mut change: F,
    ) -> Result<Option<Resource>, OpError>
    where
        F: FnMut(Option<Resource>) -> Option<Resource>,
    {
        let key = resource_key(name);
        let once = Policy { attempts: 1 };
        for attempt in 0..CAS.attempts {
            if attempt > 0 {
                tokio::time::sleep(CAS.pause(attempt)).await;
            }
            let written = cas::modify(&self.kv, &key, once, |current| {
                Ok::<_, Never>(change(current))
            })
            .await;
            match written {
                Ok(None) => return Ok(None),
                Ok(Some((next, _))) => {
                    self.cache().insert(next.name.clone(), next.clone());
                    return Ok(Some(next));
                }
                Err(e @ CasError::Conflict { .. }) => {
                    metrics().cas_conflicts.inc();
                    debug!(resource = %name, attempt, error = %e, "resource changed meanwhile; re-reading");
                }
                Err(e) => return Err(OpError::Store(store_text(&e))),
            }
        }
        Err(OpError::Store(format!(
            "{name}: still changing after {} attempts",
            CAS.attempts
        )))
    }
}
