//! `warden-health`: owns resources and their health (docs/design.md
//! "Resources and health"; Phabricator Drydock's rule: check after failure, not
//! before every use).
//!
//! - **registration**: follows `warden_sessions`; the resources an active
//!   session declares are registered (on a closed one the session is
//!   noted, and the periodic pass checks it on that agent: see returning).
//!   A resource whose last session
//!   *expired* vanished: it is broken, as if its check failed. Fencing
//!   expires sessions only for silence it could see (its grace rule), so a
//!   bus outage does not break every resource at once.
//! - **suspicion**: consumes `warden.resource.suspect.*` (published by the
//!   scheduler after a crash the catalogue marks `suspect_resource`): open
//!   → suspicious. Suspected again soon after passing a check, it waits a
//!   back-off before its check; `flap_limit` suspicions within the window
//!   break it outright.
//! - **checks**: a suspicious resource is claimed by one replica (a
//!   compare-and-set on the record) and checked by the agent on it, in its
//!   own task; pass → open, fail or no answer in `check_timeout` → broken.
//! - **recycling**: a broken resource gets a recycle event (durable, one
//!   per incarnation) and is closed, then everything that depends on it.
//!   The scheduler takes back the leases of closed resources.
//! - **returning**: a closed resource with an active session (not closed
//!   by hand, its dependency open) is checked on its agent; pass → open
//!   as a new incarnation, fail → closed, checked again after a growing
//!   back-off. Closed by hand: only an operator's check reopens it.
//!
//! Every write is a compare-and-set on the record's revision, re-read and
//! retried when another writer won, so replicas can run side by side.
//!
//! Layout: `decide::*` hold the decisions, free of I/O (suspicion,
//! checks, recycling, sessions, the periodic pass), each with its unit
//! tests; `store` is the compare-and-set write path; `suspects`,
//! `checks`, `sessions`, `tick` and `requests` are the loops and the I/O
//! around those decisions.

mod checks;
mod decide;
mod metrics;
mod recycle;
mod requests;
mod sessions;
mod store;
mod suspects;
mod tick;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::service::ServiceExt;
use chrono::{DateTime, Utc};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use uuid::Uuid;
use warden_shared::clock::{self, Clock};
use warden_shared::resource::Resource;
use warden_shared::{runtime, serve, subjects, Config};

#[derive(Debug, Error)]
pub enum HealthError {
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

fn setup<E: Into<async_nats::Error>>(what: &'static str) -> impl FnOnce(E) -> HealthError {
    move |e| HealthError::Setup {
        what,
        source: e.into(),
    }
}

pub struct Health {
    config: Arc<Config>,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: kv::Store,
    /// This replica, in check claims.
    id: String,
    /// Every resource, from a watch of the bucket.
    cache: Mutex<BTreeMap<String, Resource>>,
    /// Checks and recycles this replica has under way.
    busy: Mutex<HashSet<String>>,
    /// (session, resource) pairs registered since this replica started:
    /// heartbeats rewrite session records, and need not re-read these.
    registered: Mutex<HashSet<(String, String)>>,
    /// Where every decision reads the time.
    clock: Arc<dyn Clock>,
}

impl Health {
    fn new(
        config: Arc<Config>,
        client: async_nats::Client,
        handles: &subjects::Handles,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new(Health {
            config,
            client,
            js: handles.js.clone(),
            kv: handles.resources.clone(),
            id: Uuid::new_v4().to_string(),
            cache: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(HashSet::new()),
            registered: Mutex::new(HashSet::new()),
            clock,
        })
    }

    /// The time every decision is taken at.
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn cache(&self) -> MutexGuard<'_, BTreeMap<String, Resource>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registered(&self) -> MutexGuard<'_, HashSet<(String, String)>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `name` busy; false when it already was.
    fn start(&self, name: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string())
    }

    fn done(&self, name: &str) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// Runs one health replica until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), HealthError> {
    run_with_clock(config, shutdown, clock::system()).await
}

/// [`run`] with the time taken from `clock` (tests move a
/// `ManualClock` instead of sleeping). Timeouts on the bus (a check's
/// `check_timeout`) and the pace of the periodic pass stay real time.
pub async fn run_with_clock(
    config: Arc<Config>,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> Result<(), HealthError> {
    warden_shared::metrics::starting("health");
    metrics::init();
    let Some((client, handles)) = runtime::Connect::new(&config, "health")
        .topology(&shutdown)
        .await?
    else {
        return Ok(());
    };
    let health = Health::new(config.clone(), client.clone(), &handles, clock);
    let Some(consumer) = runtime::durable_consumer(
        &handles.js,
        "health",
        subjects::NOTIFY_STREAM,
        subjects::HEALTH_SUSPECTS_CONSUMER,
        subjects::health_suspects_consumer(),
        &shutdown,
    )
    .await
    .map_err(setup("suspects consumer"))?
    else {
        return Ok(());
    };
    let service = client
        .service_builder()
        .description("Warden resource health")
        .start(subjects::HEALTH_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(setup("health service"))?;
    let group = service.group(subjects::HEALTH_GROUP);
    let check_ep = group
        .endpoint("check")
        .await
        .map_err(setup("check endpoint"))?;
    let close_ep = group
        .endpoint("close")
        .await
        .map_err(setup("close endpoint"))?;

    let tracker = TaskTracker::new();
    tracker.spawn(watch_loop(health.clone(), shutdown.clone()));
    tracker.spawn(sessions::sessions_loop(
        health.clone(),
        handles.sessions.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(suspects::suspects_loop(
        health.clone(),
        consumer,
        shutdown.clone(),
    ));
    tracker.spawn(tick::tick_loop(
        health.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    warden_shared::metrics::ready("health");
    info!("health service running");
    // One stream of both endpoints; each request's op is read from its
    // subject.
    let requests = futures::stream::select(serve::endpoint(check_ep), serve::endpoint(close_ep));
    serve::serve("health", requests, &shutdown, move |msg| {
        requests::handle(health.clone(), msg)
    })
    .await;
    let _ = service.stop().await;
    runtime::drain(&client, &tracker, Duration::from_secs(10)).await;
    info!("health service stopped");
    Ok(())
}

/// Keeps the cache equal to the bucket (rebuilt by the watch's first pass).
async fn watch_loop(health: Arc<Health>, shutdown: CancellationToken) {
    runtime::follow_kv(&health.kv, ">", "resources", &shutdown, |entry| {
        if entry.operation == kv::Operation::Put {
            if let Ok(r) = serde_json::from_slice::<Resource>(&entry.value) {
                health.cache().insert(r.name.clone(), r);
            }
        }
        std::future::ready(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use warden_shared::session::Session;
    use warden_testsupport::{eventually, Cluster};

    /// The decisions' fixture session, stamped now: the service reads it
    /// from a real bucket.
    fn session(i: usize) -> Session {
        Session {
            created_at: Utc::now(),
            last_heartbeat: Utc::now(),
            ..crate::decide::sessions::tests::session(i)
        }
    }

    /// Two replicas on a clustered (R3) bucket register many sessions on
    /// one shared host at once: every write lands. A clustered stream
    /// refuses a second write of a key while one is in flight with its
    /// own "wrong last sequence" (10164), which is a conflict like any.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_on_a_cluster_record_every_session_of_a_shared_host() {
        let cluster = Cluster::start();
        let config = |url: String| {
            let text = format!(
                "[nats]\nurl = \"{url}\"\nreplicas = 3\n[health]\ncheck_timeout = \"1s\"\n"
            );
            Arc::new(Config::from_parts(Some(&text), Vec::new()).unwrap())
        };
        let mut replicas = Vec::new();
        for node in 0..2 {
            let c = config(cluster.node_url(node));
            // JetStream needs a meta leader before it takes R3 buckets.
            let (client, handles) = eventually(Duration::from_secs(30), "the topology", || {
                let c = c.clone();
                async move {
                    runtime::Connect::new(&c, "test")
                        .topology_forever()
                        .await
                        .ok()
                }
            })
            .await;
            replicas.push(Health::new(c, client, &handles, clock::system()));
        }
        let n = 40;
        let sessions: Vec<Session> = (0..n).map(session).collect();
        let writes = sessions.iter().enumerate().map(|(i, s)| {
            let h = replicas[i % 2].clone();
            async move { h.register(s, &s.resources[0]).await }
        });
        let results = futures::future::join_all(writes).await;
        let failed: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        assert!(failed.is_empty(), "writes given up: {failed:?}");
        let (r, _) = replicas[0].get("shared-host").await.unwrap().unwrap();
        assert_eq!(r.sessions.len(), n, "{:?}", r.sessions);
    }
}
