//! What every service does the same way: connect to NATS, log, stop on a
//! signal, serve `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::subjects::{self, Handles, TopologyError};

/// Follows `filter` in a KV bucket until `shutdown`, giving `on_entry`
/// each entry in order: first every key's latest value (so a cache
/// rebuilds), then every change. A watch that fails or ends is started
/// again, and its first pass brings back what was missed; one that cannot
/// be started is tried again a second later.
pub async fn follow_kv<F, Fut>(
    kv: &jetstream::kv::Store,
    filter: &str,
    what: &str,
    shutdown: &CancellationToken,
    mut on_entry: F,
) where
    F: FnMut(jetstream::kv::Entry) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::StreamExt;
    while !shutdown.is_cancelled() {
        let mut watch = match kv.watch_with_history(filter).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(what, error = %e, "cannot watch; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = watch.next() => n,
            };
            match next {
                Some(Ok(entry)) => on_entry(entry).await,
                Some(Err(e)) => {
                    tracing::warn!(what, error = %e, "watch failed; restarting");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Why a durable publish did not happen.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error("cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot publish: {0}")]
    Publish(#[source] jetstream::context::PublishError),
    #[error("not acknowledged: {0}")]
    NotAcknowledged(#[source] jetstream::context::PublishError),
}

/// Publishes `body` as JSON into its stream with a de-duplication id (a
/// second publish with the same id within the stream's window is dropped);
/// `Ok` once the stream has acknowledged it.
pub async fn publish_with_id<T: serde::Serialize>(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    body: &T,
) -> Result<(), PublishError> {
    let payload = serde_json::to_vec(body)?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    js.publish_with_headers(subject, headers, payload.into())
        .await
        .map_err(PublishError::Publish)?
        .await
        .map_err(PublishError::NotAcknowledged)?;
    Ok(())
}

/// Bytes of a dead-lettered payload kept (lossily decoded as UTF-8).
pub const DEAD_LETTER_PAYLOAD: usize = 64 * 1024;

/// Keeps what `service` could not use on the dead-letter stream
/// (`warden.deadletter.<service>.<reason>`) with the reason and the error;
/// `Ok` once the stream has acknowledged it, so the caller may ack the
/// original only then.
pub async fn dead_letter(
    js: &jetstream::Context,
    service: &str,
    reason: &str,
    subject: &str,
    error: &str,
    payload: &[u8],
) -> Result<(), PublishError> {
    let letter = crate::messages::DeadLetter {
        version: crate::messages::MESSAGE_VERSION,
        subject: subject.to_string(),
        service: service.to_string(),
        reason: reason.to_string(),
        error: error.to_string(),
        at: chrono::Utc::now(),
        payload: String::from_utf8_lossy(&payload[..payload.len().min(DEAD_LETTER_PAYLOAD)])
            .into_owned(),
    };
    let body = serde_json::to_vec(&letter)?;
    js.publish(subjects::deadletter_subject(service, reason), body.into())
        .await
        .map_err(PublishError::Publish)?
        .await
        .map_err(PublishError::NotAcknowledged)?;
    Ok(())
}

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot read NATS credentials {path}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A `nats.tls_*` file that cannot be read (`key` names the setting).
    #[error("cannot read {key} {path}")]
    TlsFile {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("stopped while waiting for JetStream")]
    Stopped,
}

/// Called with the text of every `-ERR` the server sends.
type ServerErrorHook = std::sync::Arc<dyn Fn(String) + Send + Sync>;

/// The one way to a NATS connection, with the login the config names
/// (credentials file, user and password) and every server of `nats.url`.
///
/// By default a service's connection: named `<nats.name>-<service>`,
/// reconnecting forever, logged and exported as
/// `warden_nats_connected{service}`. [`Connect::short_lived`] makes a
/// command's connection instead, which fails fast; [`Connect::topology`]
/// also waits for every stream and bucket.
pub struct Connect<'a> {
    config: &'a Config,
    service: &'a str,
    name: Option<String>,
    short_lived: Option<(Duration, usize)>,
    on_server_error: Option<ServerErrorHook>,
    bot: Option<String>,
}

impl<'a> Connect<'a> {
    pub fn new(config: &'a Config, service: &'a str) -> Self {
        Connect {
            config,
            service,
            name: None,
            short_lived: None,
            on_server_error: None,
            bot: None,
        }
    }

    /// The connection of bot `bot_id` (a worker): without a user/password
    /// login or `nats.inbox_prefix`, its replies arrive below
    /// `_INBOX.bot.<token>`, where only its own nkey user may subscribe.
    pub fn bot(mut self, bot_id: &str) -> Self {
        self.bot = Some(bot_id.to_string());
        self
    }

    /// Where this connection's replies arrive: `nats.inbox_prefix`, else
    /// the login's ([`subjects::inbox_prefix`]): so no one else's
    /// permissions cover them.
    pub fn reply_prefix(&self) -> String {
        let n = &self.config.nats;
        let user = n.password.as_ref().and(n.user.as_deref());
        subjects::inbox_prefix(n.inbox_prefix.as_deref(), user, self.bot.as_deref())
    }

    /// The connection's name instead of `<nats.name>-<service>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A command's connection: the first connect is tried once within
    /// `timeout`, at most `max_reconnects` reconnects follow, and there are
    /// no logs or metrics.
    pub fn short_lived(mut self, timeout: Duration, max_reconnects: usize) -> Self {
        self.short_lived = Some((timeout, max_reconnects));
        self
    }

    /// `hook` gets the text of every error the server reports (a
    /// short-lived connection's only events).
    pub fn on_server_error(mut self, hook: impl Fn(String) + Send + Sync + 'static) -> Self {
        self.on_server_error = Some(std::sync::Arc::new(hook));
        self
    }

    /// The connection, waiting for nothing else.
    pub async fn client(self) -> Result<async_nats::Client, ConnectError> {
        let config = self.config;
        let service = self.service;
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{service}", config.nats.name));
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .custom_inbox_prefix(self.reply_prefix());
        match self.short_lived {
            Some((timeout, max_reconnects)) => {
                opts = opts
                    .connection_timeout(timeout)
                    .max_reconnects(Some(max_reconnects));
                if let Some(hook) = self.on_server_error.clone() {
                    opts = opts.event_callback(move |event| {
                        let hook = hook.clone();
                        async move {
                            if let async_nats::Event::ServerError(e) = event {
                                hook(e.to_string());
                            }
                        }
                    });
                }
            }
            None => {
                crate::metrics::nats_connecting(service);
                let label = service.to_string();
                let hook = self.on_server_error.clone();
                opts = opts
                    .connection_timeout(config.nats.connect_timeout)
                    .retry_on_initial_connect()
                    .max_reconnects(None)
                    .event_callback(move |event| {
                        let label = label.clone();
                        let hook = hook.clone();
                        async move {
                            crate::metrics::nats_event(&label, &event);
                            match event {
                                async_nats::Event::Connected => tracing::info!("nats connected"),
                                async_nats::Event::Disconnected => {
                                    tracing::warn!("nats disconnected")
                                }
                                other => {
                                    if let (Some(hook), async_nats::Event::ServerError(e)) =
                                        (&hook, &other)
                                    {
                                        hook(e.to_string());
                                    }
                                    tracing::debug!(event = %other, "nats event")
                                }
                            }
                        }
                    });
            }
        }
        if let Some(path) = &config.nats.credentials {
            opts =
                opts.credentials_file(path)
                    .await
                    .map_err(|source| ConnectError::Credentials {
                        path: path.display().to_string(),
                        source,
                    })?;
        }
        if let Some(path) = &config.nats.nkey_file {
            let seed = tokio::fs::read_to_string(path).await.map_err(|source| {
                ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            opts = opts.nkey(seed.trim().to_string());
        }
        if let (Some(user), Some(password)) = (&config.nats.user, &config.nats.password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        opts = tls_options(opts, &config.nats)?;
        // Only ever shown redacted (errors, logs): it may carry a login
        // when given on a command line.
        let url = crate::redact::redact(&config.nats.url);
        let addrs = server_addrs(&config.nats.url).map_err(|source| ConnectError::Connect {
            url: url.clone(),
            source,
        })?;
        if self.short_lived.is_some() {
            return opts
                .connect(addrs)
                .await
                .map_err(|source| ConnectError::Connect { url, source });
        }
        let client = tokio::time::timeout(config.nats.connect_timeout * 6, opts.connect(addrs))
            .await
            .map_err(|_| ConnectError::Connect {
                url: url.clone(),
                source: async_nats::ConnectError::from(async_nats::ConnectErrorKind::TimedOut),
            })?
            .map_err(|source| ConnectError::Connect { url, source })?;
        // The `Connected` event says so too, but it may be dropped when the
        // event queue is full. Never 0 from here: a stale read could
        // overwrite that event's 1.
        if client.connection_state() == async_nats::connection::State::Connected {
            crate::metrics::nats_connected(service, true);
        }
        Ok(client)
    }

    /// The connection once every stream and bucket exists. A bus that is
    /// not ready yet (nothing listening, JetStream off, no meta leader) is
    /// waited for with backoff, logged and shown in `/healthz`
    /// ([`retry_until_ready`]); `Ok(None)` when `shutdown` came first.
    pub async fn topology(
        self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(async_nats::Client, Handles)>, ConnectError> {
        let service = self.service;
        let topo = self.config.topology();
        let client = self.client().await?;
        let js = jetstream::new(client.clone());
        let handles = retry_until_ready(service, "streams and buckets", shutdown, || {
            subjects::ensure(&js, &topo)
        })
        .await?;
        Ok(handles.map(|h| (client, h)))
    }

    /// [`Connect::topology`] waiting as long as it takes, for tools and
    /// tests that have no shutdown to honour.
    pub async fn topology_forever(self) -> Result<(async_nats::Client, Handles), ConnectError> {
        match self.topology(&CancellationToken::new()).await? {
            Some(c) => Ok(c),
            // Nobody can cancel that token.
            None => Err(ConnectError::Stopped),
        }
    }
}

/// The `nats.tls_*` settings applied to `opts`, each file checked first so
/// a missing or unreadable one is an error naming it (the client would
/// only say "TLS error" at connect).
pub fn tls_options(
    mut opts: async_nats::ConnectOptions,
    nats: &crate::config::NatsConfig,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let readable = |key: &'static str, path: &std::path::Path| {
        std::fs::File::open(path)
            .map(drop)
            .map_err(|source| ConnectError::TlsFile {
                key,
                path: path.display().to_string(),
                source,
            })
    };
    if let Some(ca) = &nats.tls_ca_file {
        readable("nats.tls_ca_file", ca)?;
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert_file, &nats.tls_key_file) {
        readable("nats.tls_cert_file", cert)?;
        readable("nats.tls_key_file", key)?;
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if nats.tls_required {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// `nats.url` may list several servers separated by commas (a cluster);
/// the client fails over between them.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<async_nats::ServerAddr>().map_err(|e| {
                async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
            })
        })
        .collect()
}

/// Why a durable consumer or a service API could not be set up.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("cannot find stream {stream}")]
    Stream {
        stream: &'static str,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot create consumer {consumer}")]
    Consumer {
        consumer: &'static str,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot start the {name} service API")]
    Service {
        name: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

/// The pull consumer `consumer` of `stream` (created if missing), waiting
/// for JetStream like [`Connect::topology`]; `Ok(None)` on
/// shutdown.
pub async fn durable_consumer(
    js: &jetstream::Context,
    service: &str,
    stream: &'static str,
    consumer: &'static str,
    config: jetstream::consumer::pull::Config,
    shutdown: &CancellationToken,
) -> Result<Option<jetstream::consumer::PullConsumer>, SetupError> {
    let what = format!("consumer {consumer} on {stream}");
    retry_until_ready(service, &what, shutdown, || {
        let config = config.clone();
        async move {
            let s = js
                .get_stream(stream)
                .await
                .map_err(|source| SetupError::Stream { stream, source })?;
            s.get_or_create_consumer(consumer, config)
                .await
                .map_err(|source| SetupError::Consumer { consumer, source })
        }
    })
    .await
}

/// Starts the NATS service API `name` (`$SRV` discovery and its
/// endpoints' group), waiting like [`durable_consumer`].
pub async fn start_service_api(
    client: &async_nats::Client,
    service: &str,
    name: &'static str,
    description: &str,
    version: &str,
    shutdown: &CancellationToken,
) -> Result<Option<async_nats::service::Service>, SetupError> {
    use async_nats::service::ServiceExt;
    let what = format!("service API {name}");
    retry_until_ready(service, &what, shutdown, || async {
        client
            .service_builder()
            .description(description)
            .start(name, version)
            .await
            .map_err(|source| SetupError::Service { name, source })
    })
    .await
}

pub use crate::ready::{retry_until_ready, Readiness};

/// Cancels the returned token on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Exits with [`crate::config::EXIT_CONFIG`] listing every problem, if any.
/// For configs changed after loading (command-line overrides).
pub fn exit_on_problems(config: &Config, program: &str) {
    let problems = config.problems();
    if !problems.is_empty() {
        eprintln!(
            "{program}: invalid configuration:\n  - {}",
            problems.join("\n  - ")
        );
        std::process::exit(crate::config::EXIT_CONFIG);
    }
}

/// Loads the config (file + environment) or exits with every problem.
pub fn load_or_exit(path: Option<&std::path::Path>, program: &str) -> Config {
    match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::exit(crate::config::EXIT_CONFIG);
        }
    }
}

/// A service binary's command line: `--config` (or `WARDEN_CONFIG`)
/// and the service's own arguments `A`.
#[derive(clap::Parser)]
struct ServiceCli<A: clap::Args> {
    /// Config file (TOML), merged over the built-in defaults
    #[arg(long, env = "WARDEN_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    args: A,
}

/// A service with no arguments but `--config`.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct NoArgs {}

/// The whole `main` of a service binary `name` (`about` is its `--help`
/// line): arguments, logs, config (or exit 64 with every problem),
/// signals, `/metrics`, then `run` until shutdown.
pub fn service_main<F, Fut, E>(name: &'static str, about: &'static str, run: F) -> Result<(), E>
where
    F: FnOnce(std::sync::Arc<Config>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    service_main_with(name, about, |_, _: NoArgs| {}, run)
}

/// [`service_main`] for a service with arguments of its own `A`, which
/// `adjust` applies to the loaded config (checked again afterwards).
pub fn service_main_with<A, F, Fut, E>(
    name: &'static str,
    about: &'static str,
    adjust: impl FnOnce(&mut Config, A),
    run: F,
) -> Result<(), E>
where
    A: clap::Args,
    F: FnOnce(std::sync::Arc<Config>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    use clap::{CommandFactory, FromArgMatches};
    let matches = ServiceCli::<A>::command()
        .name(name)
        .bin_name(name)
        .about(about)
        .version(env!("CARGO_PKG_VERSION"))
        .get_matches();
    let cli = ServiceCli::<A>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        init_tracing();
        let mut config = load_or_exit(cli.config.as_deref(), name);
        adjust(&mut config, cli.args);
        exit_on_problems(&config, name);
        let (config, shutdown) = start_service(config);
        run(config, shutdown).await
    })
}

/// What every standalone service binary does before `run`: logs, a
/// shutdown token cancelled by SIGINT/SIGTERM, and `/metrics` on
/// `metrics.listen` when set.
pub fn start_service(config: Config) -> (std::sync::Arc<Config>, CancellationToken) {
    let shutdown = shutdown_on_signal();
    if let Some(addr) = config.metrics_listen() {
        let s = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(addr, s).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics");
            }
        });
    }
    (std::sync::Arc::new(config), shutdown)
}

/// Structured logs to stderr; `WARDEN_LOG` (or `RUST_LOG`) filters,
/// `WARDEN_LOG_FORMAT=json` switches to JSON lines.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("WARDEN_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("WARDEN_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Waits for `tasks` to end, at most `grace`; then drains the client so
/// buffered publishes reach the server before the process exits.
pub async fn drain(
    client: &async_nats::Client,
    tracker: &tokio_util::task::TaskTracker,
    grace: Duration,
) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "tasks still running after grace period"
        );
    }
    flush(client).await;
}

/// Flushes what this client published, for at most a few seconds: with
/// the bus gone a flush waits for a reconnect that may never come, and a
/// SIGTERM must still end the process.
pub async fn flush(client: &async_nats::Client) {
    match tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not flush to NATS before stopping"),
        Err(_) => tracing::warn!("could not flush to NATS before stopping (bus unreachable)"),
    }
}

/// How long a stopping service tries to flush what it published.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown`.
pub async fn serve_metrics(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, crate::metrics::router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_tls_file_is_an_error_naming_it() {
        let mut n = crate::config::Config::defaults().nats;
        n.tls_ca_file = Some("/nonexistent/ca.pem".into());
        let Err(e) = super::tls_options(async_nats::ConnectOptions::new(), &n) else {
            panic!("a missing CA file is an error");
        };
        match &e {
            super::ConnectError::TlsFile { key, path, .. } => {
                assert_eq!(*key, "nats.tls_ca_file");
                assert_eq!(path, "/nonexistent/ca.pem");
            }
            other => panic!("not a TlsFile error: {other:?}"),
        }
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").expect("write");
        n.tls_ca_file = Some(ca);
        n.tls_cert_file = Some(dir.path().join("client.pem"));
        n.tls_key_file = Some(dir.path().join("client.key"));
        match super::tls_options(async_nats::ConnectOptions::new(), &n) {
            Err(super::ConnectError::TlsFile { key, .. }) => assert_eq!(key, "nats.tls_cert_file"),
            other => panic!("expected the missing client certificate: {:?}", other.err()),
        }
    }

    #[test]
    fn several_servers_separated_by_commas() {
        let a = super::server_addrs(
            "nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224",
        )
        .expect("valid");
        assert_eq!(a.len(), 3);
        assert!(super::server_addrs("nats://127.0.0.1:99999").is_err());
    }
}
