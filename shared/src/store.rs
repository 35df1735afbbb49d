//! Typed access to the `warden_jobs` bucket: create-if-absent, read with
//! revision, compare-and-set. Every job write in Warden goes through here.

use async_nats::jetstream::kv;
use bytes::Bytes;
use thiserror::Error;
use uuid::Uuid;

use crate::job::Job;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("job {0} already exists")]
    AlreadyExists(Uuid),
    #[error("job {0} changed concurrently (revision moved)")]
    Conflict(Uuid),
    #[error("job record {key} is not valid JSON")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("job record is larger than the bucket allows")]
    TooLarge,
    #[error("job store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Worth retrying later (the bus is down or slow), as opposed to a
    /// verdict on the request.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A job as read, with the revision a compare-and-set must name.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub job: Job,
    pub revision: u64,
}

#[derive(Clone)]
pub struct JobStore {
    kv: kv::Store,
}

impl JobStore {
    pub fn new(kv: kv::Store) -> JobStore {
        JobStore { kv }
    }

    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// Writes `job` only if no job with its id exists.
    pub async fn create(&self, job: &Job) -> Result<u64, StoreError> {
        let bytes = encode(job)?;
        self.kv
            .create(job.key(), bytes)
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => StoreError::AlreadyExists(job.id),
                _ if lost_race(&e) => StoreError::AlreadyExists(job.id),
                _ => classify(e),
            })
    }

    pub async fn get(&self, id: &Uuid) -> Result<Option<Versioned>, StoreError> {
        let entry = self
            .kv
            .entry(id.to_string())
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some(Versioned {
                job: decode(&e.key, &e.value)?,
                revision: e.revision,
            })),
            _ => Ok(None),
        }
    }

    /// Writes `job` if the stored revision is still `revision`.
    pub async fn update(&self, job: &Job, revision: u64) -> Result<u64, StoreError> {
        let bytes = encode(job)?;
        self.kv
            .update(job.key(), bytes, revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict(job.id),
                _ if lost_race(&e) => StoreError::Conflict(job.id),
                _ => classify(e),
            })
    }
}

impl JobStore {
    /// Job `id` as one record for [`crate::cas::run`].
    pub fn at(&self, id: Uuid) -> JobAt<'_> {
        JobAt { store: self, id }
    }
}

/// One job of a [`JobStore`], read and written by compare-and-set
/// ([`crate::cas::run`]).
pub struct JobAt<'a> {
    store: &'a JobStore,
    id: Uuid,
}

impl crate::cas::CasStore for JobAt<'_> {
    type Value = Job;
    type Error = StoreError;

    fn key(&self) -> String {
        self.id.to_string()
    }

    async fn get(&self) -> Result<Option<(Job, u64)>, StoreError> {
        Ok(self.store.get(&self.id).await?.map(|v| (v.job, v.revision)))
    }

    async fn create(&self, job: &Job) -> Result<u64, StoreError> {
        self.store.create(job).await
    }

    async fn update(&self, job: &Job, revision: u64) -> Result<u64, StoreError> {
        self.store.update(job, revision).await
    }

    fn fault(e: &StoreError) -> crate::cas::Fault {
        use crate::cas::Fault;
        match e {
            StoreError::Conflict(_) | StoreError::AlreadyExists(_) => Fault::LostRace,
            StoreError::Unavailable(_) => Fault::Transient,
            StoreError::Corrupt { .. } | StoreError::TooLarge => Fault::Fatal,
        }
    }
}

/// Whether a KV write lost a race for its key, by the server's error code
/// somewhere in the error's sources: a single server says "wrong last
/// sequence" with the current sequence (10071, which the client turns into
/// its own kind), a clustered stream refuses a write of a key whose
/// previous write is still in flight with the constant variant (10164),
/// which the client reports as `Other`. Every compare-and-set in Warden
/// recognises a conflict with this, never by text.
pub fn lost_race(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::ErrorCode;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            let code = js.error_code();
            if code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn classify<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    if too_large(&e) {
        return StoreError::TooLarge;
    }
    StoreError::Unavailable(Box::new(e))
}

/// Whether a KV write was refused for its size, by kind or server error
/// code somewhere in the error's sources: larger than the server's
/// `max_payload` the client refuses it before sending
/// (`PublishErrorKind::MaxPayloadExceeded`); larger than the bucket's
/// `max_value_size` the stream refuses it (10054).
pub fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    use async_nats::jetstream::ErrorCode;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            if js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM {
                return true;
            }
        }
        if let Some(p) = err.downcast_ref::<PublishError>() {
            if p.kind() == PublishErrorKind::MaxPayloadExceeded {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

pub fn encode(job: &Job) -> Result<Bytes, StoreError> {
    serde_json::to_vec(job)
        .map(Bytes::from)
        .map_err(|source| StoreError::Corrupt {
            key: job.key(),
            source,
        })
}

pub fn decode(key: &str, bytes: &[u8]) -> Result<Job, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use async_nats::jetstream;
    use warden_testsupport::NatsServer;

    async fn store(server: &NatsServer, max_value_size: i32) -> JobStore {
        let client = async_nats::connect(server.url()).await.expect("connects");
        let js = jetstream::new(client);
        let kv = js
            .create_key_value(kv::Config {
                bucket: "size_test".into(),
                history: 1,
                max_value_size,
                ..Default::default()
            })
            .await
            .expect("bucket");
        JobStore::new(kv)
    }

    fn job_of(bytes: usize) -> Job {
        Job::builder("build").arg("x", "a".repeat(bytes)).build()
    }

    #[tokio::test]
    async fn a_job_over_the_buckets_value_limit_is_too_large() {
        let server = NatsServer::start();
        let store = store(&server, 4096).await;
        assert!(matches!(
            store.create(&job_of(8192)).await,
            Err(StoreError::TooLarge)
        ));
        // An update that grows a job past the limit, too.
        let mut job = job_of(10);
        let rev = store.create(&job).await.expect("a small job fits");
        job.args.insert("y".into(), "b".repeat(8192));
        assert!(matches!(
            store.update(&job, rev).await,
            Err(StoreError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn a_job_over_the_servers_max_payload_is_too_large() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("small.conf");
        std::fs::write(&conf, "max_payload: 4096\n").expect("writes the config");
        let conf = conf.to_str().expect("a UTF-8 path");
        let server = NatsServer::start_with_args(&["-c", conf]);
        let store = store(&server, -1).await;
        assert!(matches!(
            store.create(&job_of(8192)).await,
            Err(StoreError::TooLarge)
        ));
    }
}
