//! One API instance on a real nats-server, bound to 127.0.0.1:0.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warden_api::{ApiClient, ApiError};
use warden_shared::store::JobStore;
use warden_shared::{subjects, Config};
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
        let nats = NatsServer::start();
        let mut toml = format!(
            "[nats]\nurl = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = {MAX_BODY}\n",
            nats.url()
        );
        if let Some(t) = token {
            toml.push_str(&format!("token = {t:?}\n"));
        }
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
        let js = async_nats::jetstream::new(self.nats_client().await);
        JobStore::new(
            js.get_key_value(subjects::JOBS_BUCKET)
                .await
                .expect("jobs bucket"),
        )
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

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
