//! One API instance on a real nats-server, bound to 127.0.0.1:0.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warden_api::{ApiClient, ApiError};
use warden_shared::job::Lease;
use warden_shared::store::JobStore;
use warden_shared::{subjects, Blame, Config, Job, JobState};
use warden_testsupport::{eventually, NatsServer};

pub const MAX_BODY: usize = 4096;

pub struct Api {
    pub nats: NatsServer,
    pub config: Arc<Config>,
    pub base: String,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<(), ApiError>>>,
}

impl Api {
    pub async fn start() -> Api {
        Api::start_with_token(None).await
    }

    pub async fn start_with_token(token: Option<&str>) -> Api {
        Api::start_on(NatsServer::start(), token, None).await
    }

    /// On `nats` (say one configured with per-role users), logging in as
    /// `user` = (name, password) when given.
    pub async fn start_on(
        nats: NatsServer,
        token: Option<&str>,
        user: Option<(&str, &str)>,
    ) -> Api {
        Api::start_with_http(nats, token, user, "").await
    }

    /// Like [`Api::start_on`], with `http` (TOML keys) added to `[http]`.
    pub async fn start_with_http(
        nats: NatsServer,
        token: Option<&str>,
        user: Option<(&str, &str)>,
        http: &str,
    ) -> Api {
        let mut toml = format!("[nats]\nurl = {:?}\n", nats.url());
        if let Some((name, password)) = user {
            toml.push_str(&format!("user = {name:?}\npassword = {password:?}\n"));
        }
        toml.push_str(&format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = {MAX_BODY}\n"
        ));
        if let Some(t) = token {
            toml.push_str(&format!("token = {t:?}\n"));
        }
        toml.push_str(http);
        toml.push('\n');
        toml.push_str("[tasks.build]\ncommand = [\"true\"]\npool = \"builders\"\npriority = 7\n");
        let config = Arc::new(Config::from_parts(Some(&toml), Vec::new()).expect("valid config"));
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(warden_api::serve(
            config.clone(),
            listener,
            shutdown.clone(),
        ));
        let api = Api {
            nats,
            config,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            shutdown,
            task: Some(task),
        };
        // Ready once a search answers: connected and the index caught up.
        let url = api.url("/api/v1/jobs");
        let http = api.http.clone();
        eventually(Duration::from_secs(20), "api ready", || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        api
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A second, independent NATS client (another service, say).
    pub async fn nats_client(&self) -> async_nats::Client {
        async_nats::connect(self.nats.url()).await.expect("connect")
    }

    pub async fn store(&self) -> JobStore {
        store_of(self.nats_client().await).await
    }

    /// A job record written straight into the bucket, as the scheduler
    /// would have left it: `state` after `attempt` attempts, the last one
    /// failed as third_party/network on `bot-a` and `bot-b`.
    pub async fn put_job(&self, state: JobState, attempt: u32) -> (Job, u64) {
        self.put_job_in(&self.store().await, state, attempt).await
    }

    /// [`Api::put_job`] through `store` (a client with its own login).
    pub async fn put_job_in(&self, store: &JobStore, state: JobState, attempt: u32) -> (Job, u64) {
        let now = Utc::now();
        let mut job = Job::builder("build")
            .pool("builders")
            .priority(7)
            .at(now)
            .build();
        job.state = state;
        job.attempt = attempt;
        if attempt > 0 {
            job.blame = Some(Blame::ThirdParty);
            job.detail = Some("network".into());
            job.description = Some("a network service did not answer".into());
            job.lost_workers = vec!["bot-a".into(), "bot-b".into()];
        }
        if state == JobState::Running {
            job.lease = Some(Lease {
                session: "session-1".into(),
                bot_id: "bot-c".into(),
                resource: None,
                resources: Vec::new(),
                epoch: attempt,
                leased_at: now,
                started_at: Some(now),
                secret_hash: None,
            });
        }
        let revision = store.create(&job).await.expect("create");
        (job, revision)
    }

    /// The job's current revision in the bucket.
    pub async fn revision(&self, id: &Uuid) -> u64 {
        self.store()
            .await
            .get(id)
            .await
            .expect("get")
            .expect("exists")
            .revision
    }

    pub async fn api_client(&self) -> ApiClient {
        let client = ApiClient::new(self.nats_client().await).with_timeout(Duration::from_secs(5));
        // The service subscribes after the HTTP side is up; wait for it.
        let c = client.clone();
        eventually(Duration::from_secs(10), "api service on nats", || {
            let c = c.clone();
            async move { c.list(Default::default()).await.ok().map(|_| ()) }
        })
        .await;
        client
    }

    /// Stops the API; the nats-server keeps running until `self` drops.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("api stops in time")
                .expect("api task");
            r.expect("api ran cleanly");
        }
    }
}

pub async fn store_of(client: async_nats::Client) -> JobStore {
    let js = async_nats::jetstream::new(client);
    JobStore::new(
        js.get_key_value(subjects::JOBS_BUCKET)
            .await
            .expect("jobs bucket"),
    )
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
