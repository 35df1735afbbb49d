//! The one write path of `warden_resources`: read, change by a pure
//! decision, compare-and-set, retried on conflict.

use async_nats::jetstream::kv;
use thiserror::Error;
use tracing::debug;
use warden_shared::cas::{self, Change, Failure, KvKey, Never, Outcome, Retry, Step};
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
/// them (16 attempts, jittered: the default).
const CAS: Retry = Retry::DEFAULT;

/// A change of one resource record: `change` on the current record
/// (`None`: absent), `None` from it writes nothing. Counts every lost race
/// (`warden_health_write_conflicts_total`).
struct Counted<'a, F> {
    name: &'a str,
    change: F,
}

impl<F> Change<Resource> for Counted<'_, F>
where
    F: FnMut(Option<Resource>) -> Option<Resource>,
{
    type Write = ();
    type Stop = ();
    type Error = Never;

    async fn step(&mut self, current: Option<Resource>) -> Result<Step<Resource, (), ()>, Never> {
        Ok(match (self.change)(current) {
            Some(next) => Step::Write(next, ()),
            None => Step::Stop(()),
        })
    }

    fn lost_race(&mut self, attempt: u32) {
        metrics().cas_conflicts.inc();
        debug!(resource = %self.name, attempt, "resource changed meanwhile; re-reading");
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
    /// writer left, after a short jittered pause, and the lost race is
    /// counted (`warden_health_write_conflicts_total`). Returns what was
    /// written.
    pub(crate) async fn modify<F>(&self, name: &str, change: F) -> Result<Option<Resource>, OpError>
    where
        F: FnMut(Option<Resource>) -> Option<Resource>,
    {
        let key = resource_key(name);
        let step = Counted { name, change };
        match cas::run(&KvKey::new(&self.kv, &key), CAS, step).await {
            Ok(Outcome::Stopped(())) => Ok(None),
            Ok(Outcome::Written { value: next, .. }) => {
                self.cache().insert(next.name.clone(), next.clone());
                Ok(Some(next))
            }
            Err(Failure::Conflict { attempts, .. }) => Err(OpError::Store(format!(
                "{name}: still changing after {attempts} attempts"
            ))),
            Err(Failure::Store { key, source, .. }) => Err(OpError::Store(source.describe(&key))),
            Err(Failure::Refused(never)) => match never {},
        }
    }
}
