//! Read-modify-compare-and-set on a KV key, with one retry policy: a
//! write that lost the race for its key (by error kind, see
//! [`crate::store::lost_race`]) reads again and retries, up to
//! [`Policy::attempts`], pausing a few jittered milliseconds in between.
//! Records are JSON.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// How often and how patiently a compare-and-set retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts in all (the first one included).
    pub attempts: u32,
}

impl Policy {
    /// The policy every Warden compare-and-set uses unless it has a reason.
    pub const DEFAULT: Policy = Policy { attempts: 16 };

    /// The pause before retry `attempt` (1…): a few milliseconds, growing,
    /// jittered so that replicas that collided do not collide again in
    /// step (and one whose read came from a lagging follower reads again
    /// after it caught up).
    pub fn pause(&self, attempt: u32) -> Duration {
        pause_with(attempt, uuid::Uuid::new_v4().as_u128())
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::DEFAULT
    }
}

/// [`Policy::pause`] with its randomness given: 2 ms plus a jitter below
/// `5·min(attempt, 10) + 5` ms.
fn pause_with(attempt: u32, random: u128) -> Duration {
    let ceiling = 5 * u64::from(attempt.min(10)) + 5;
    let jitter = (random % u128::from(ceiling)) as u64;
    Duration::from_millis(2 + jitter)
}

/// Why a compare-and-set did not land.
#[derive(Debug, Error)]
pub enum CasError<E: std::error::Error + 'static> {
    /// Every attempt lost the race for the key.
    #[error("{key}: still changing after {attempts} attempts")]
    Conflict { key: String, attempts: u32 },
    /// The store failed (read or write), not a lost race.
    #[error("{key}: store unavailable")]
    Store {
        key: String,
        #[source]
        source: async_nats::Error,
    },
    /// The stored record is not valid JSON of the type asked for.
    #[error("{key}: record cannot be decoded")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The new record cannot be encoded.
    #[error("{key}: record cannot be encoded")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The change refused.
    #[error(transparent)]
    Refused(E),
}

impl<E: std::error::Error + 'static> CasError<E> {
    /// Worth trying again later (the store is down, or too busy).
    pub fn is_transient(&self) -> bool {
        matches!(self, CasError::Store { .. } | CasError::Conflict { .. })
    }
}

/// A change that cannot refuse.
#[derive(Debug, Error)]
#[error("never")]
pub enum Never {}

/// Reads `key` (absent, or a deleted key, is `None`), gives it to
/// `change`, and writes what it returns if the key's revision has not
/// moved; `Ok(None)` when `change` returns `Ok(None)` (nothing to write),
/// `Ok(Some((value, revision)))` once written. `change` may run several
/// times, once per attempt, on the latest value each time.
pub async fn modify<T, E, F>(
    kv: &kv::Store,
    key: &str,
    policy: Policy,
    mut change: F,
) -> Result<Option<(T, u64)>, CasError<E>>
where
    T: Serialize + DeserializeOwned,
    E: std::error::Error + 'static,
    F: FnMut(Option<T>) -> Result<Option<T>, E>,
{
    let attempts = policy.attempts.max(1);
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(policy.pause(attempt)).await;
        }
        let (current, revision) = read(kv, key).await?;
        let Some(next) = change(current).map_err(CasError::Refused)? else {
            return Ok(None);
        };
        let body = serde_json::to_vec(&next)
            .map(Bytes::from)
            .map_err(|source| CasError::Encode {
                key: key.to_string(),
                source,
            })?;
        match write(kv, key, body, revision).await {
            Ok(rev) => return Ok(Some((next, rev))),
            Err(Write::LostRace) => continue,
            Err(Write::Failed(source)) => {
                return Err(CasError::Store {
                    key: key.to_string(),
                    source,
                })
            }
        }
    }
    Err(CasError::Conflict {
        key: key.to_string(),
        attempts,
    })
}

/// The value of `key` and the revision a write must name (`None`: the
/// key must not exist).
async fn read<T: DeserializeOwned, E: std::error::Error + 'static>(
    kv: &kv::Store,
    key: &str,
) -> Result<(Option<T>, Option<u64>), CasError<E>> {
    let entry = kv.entry(key).await.map_err(|e| CasError::Store {
        key: key.to_string(),
        source: e.into(),
    })?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&e.value).map_err(|source| CasError::Decode {
                key: key.to_string(),
                source,
            })?;
            Ok((Some(value), Some(e.revision)))
        }
        // A deleted or purged key: `create` writes over its marker.
        _ => Ok((None, None)),
    }
}

enum Write {
    LostRace,
    Failed(async_nats::Error),
}

async fn write(
    kv: &kv::Store,
    key: &str,
    body: Bytes,
    revision: Option<u64>,
) -> Result<u64, Write> {
    match revision {
        None => kv.create(key, body).await.map_err(|e| {
            if e.kind() == kv::CreateErrorKind::AlreadyExists || crate::store::lost_race(&e) {
                Write::LostRace
            } else {
                Write::Failed(e.into())
            }
        }),
        Some(rev) => kv.update(key, body, rev).await.map_err(|e| {
            if e.kind() == kv::UpdateErrorKind::WrongLastRevision || crate::store::lost_race(&e) {
                Write::LostRace
            } else {
                Write::Failed(e.into())
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_short_grow_and_are_bounded() {
        for attempt in 1..40 {
            for random in [0u128, 1, 7, 54, u128::MAX] {
                let p = pause_with(attempt, random);
                assert!(p >= Duration::from_millis(2));
                assert!(p < Duration::from_millis(2 + 5 * u64::from(attempt.min(10)) + 5));
            }
        }
        assert_eq!(pause_with(1, 0), Duration::from_millis(2));
        assert_eq!(pause_with(1, 9), Duration::from_millis(11));
        assert_eq!(pause_with(20, 54), Duration::from_millis(56));
    }

    #[test]
    fn the_default_policy_is_sixteen_attempts() {
        assert_eq!(Policy::default().attempts, 16);
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use async_nats::jetstream;
    use warden_testsupport::NatsServer;

    #[tokio::test]
    async fn concurrent_modifiers_both_land() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.expect("connects");
        let js = jetstream::new(client);
        let kv = js
            .create_key_value(kv::Config {
                bucket: "cas_test".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .expect("bucket");
        let add = |who: &'static str| {
            let kv = kv.clone();
            async move {
                for i in 0..20 {
                    modify(
                        &kv,
                        "k",
                        Policy { attempts: 64 },
                        |cur: Option<Vec<String>>| {
                            let mut v = cur.unwrap_or_default();
                            v.push(format!("{who}{i}"));
                            Ok::<_, Never>(Some(v))
                        },
                    )
                    .await
                    .expect("lands");
                }
            }
        };
        tokio::join!(add("a"), add("b"));
        let (v, _) = read::<Vec<String>, Never>(&kv, "k").await.expect("reads");
        let v = v.expect("written");
        assert_eq!(v.len(), 40, "{v:?}");
        for who in ["a", "b"] {
            for i in 0..20 {
                assert!(v.contains(&format!("{who}{i}")));
            }
        }
        // Nothing to write: the record stays.
        let none = modify(&kv, "k", Policy::DEFAULT, |_: Option<Vec<String>>| {
            Ok::<_, Never>(None)
        })
        .await
        .expect("reads");
        assert!(none.is_none());
    }
}
