//! A small client for the API's NATS endpoints, for the `warden` command
//! and tests.

use std::time::Duration;
use warden_shared::error::ErrorCode;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use uuid::Uuid;
use warden_shared::job::NewJob;
use warden_shared::messages::ErrorBody;
use warden_shared::{subjects, Job};

use crate::index::Stats;
use crate::types::{
    ApiReply, CancelRequest, GetRequest, ListQuery, ListReply, StatsQuery, IDEMPOTENT_REPLAYED,
};

#[derive(Debug, Error)]
pub enum ClientError {
    /// The API answered with an error (branch on `code`).
    #[error("api error {}: {}", .0.code, .0.message)]
    Api(ErrorBody),
    #[error("no api service is running")]
    NoResponders,
    #[error("api request timed out")]
    Timeout,
    #[error("api request failed")]
    Transport(#[source] async_nats::RequestError),
    #[error("cannot encode api request")]
    Encode(#[source] serde_json::Error),
    #[error("invalid api reply")]
    Decode(#[source] serde_json::Error),
}

impl ClientError {
    /// The API's error code, if the API answered with an error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api(e) => Some(e.code.as_str()),
            _ => None,
        }
    }
}

/// A create's reply: the job, and whether it existed already.
#[derive(Debug, Clone)]
pub struct CreateReply {
    pub job: Job,
    pub replayed: bool,
}

#[derive(Clone)]
pub struct ApiClient {
    client: async_nats::Client,
    timeout: Duration,
}

impl ApiClient {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(client: async_nats::Client) -> Self {
        ApiClient {
            client,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn create(&self, job: NewJob) -> Result<Job, ClientError> {
        self.create_replayable(job).await.map(|c| c.job)
    }

    /// Creates a job, saying whether the API returned an existing one (a
    /// create replayed with its `idempotency_key`).
    pub async fn create_replayable(&self, job: NewJob) -> Result<CreateReply, ClientError> {
        let (job, headers) = self
            .call_with_headers(subjects::API_JOB_CREATE, &job)
            .await?;
        let replayed = headers
            .as_ref()
            .and_then(|h| h.get(IDEMPOTENT_REPLAYED))
            .is_some_and(|v| v.as_str() == "true");
        Ok(CreateReply { job, replayed })
    }

    /// The job with its history; `None` if there is no such job.
    pub async fn get(&self, id: Uuid) -> Result<Option<Job>, ClientError> {
        match self.call(subjects::API_JOB_GET, &GetRequest { id }).await {
            Ok(job) => Ok(Some(job)),
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Puts a SHELVED, CRASHED or CANCELLED job back to SCHEDULED.
    pub async fn retry(&self, id: Uuid) -> Result<Job, ClientError> {
        self.call(subjects::API_JOB_RETRY, &GetRequest { id }).await
    }

    /// Cancels a SCHEDULED or RUNNING job.
    pub async fn cancel(&self, id: Uuid, reason: Option<String>) -> Result<Job, ClientError> {
        let req = CancelRequest {
            id: id.to_string(),
            reason,
        };
        self.call(subjects::API_JOB_CANCEL, &req).await
    }

    /// Counts by state, blame and detail over a window.
    pub async fn stats(&self, query: StatsQuery) -> Result<Stats, ClientError> {
        self.call(subjects::API_STATS, &query).await
    }

    pub async fn list(&self, query: ListQuery) -> Result<ListReply, ClientError> {
        self.call(subjects::API_JOB_LIST, &query).await
    }

    async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        subject: &'static str,
        req: &Q,
    ) -> Result<R, ClientError> {
        self.call_with_headers(subject, req).await.map(|(r, _)| r)
    }

    async fn call_with_headers<Q: Serialize, R: DeserializeOwned>(
        &self,
        subject: &'static str,
        req: &Q,
    ) -> Result<(R, Option<async_nats::HeaderMap>), ClientError> {
        let payload = serde_json::to_vec(req).map_err(ClientError::Encode)?;
        let request = async_nats::Request::new()
            .payload(Bytes::from(payload))
            .timeout(Some(self.timeout));
        let msg = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => ClientError::NoResponders,
                async_nats::RequestErrorKind::TimedOut => ClientError::Timeout,
                _ => ClientError::Transport(e),
            })?;
        let r = match serde_json::from_slice::<ApiReply<R>>(&msg.payload) {
            Ok(ApiReply::Ok(r)) => r,
            Ok(ApiReply::Error(e)) => return Err(ClientError::Api(e.error)),
            // Decode again for the typed error: the untagged enum's own
            // message only says that no variant matched.
            Err(_) => serde_json::from_slice::<R>(&msg.payload).map_err(ClientError::Decode)?,
        };
        Ok((r, msg.headers))
    }
}
