//! CI messages out: job state changes as Fedora CI messages (placeholder;
//! filled in by the CI-messages work).

use std::sync::Arc;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use warden_shared::Config;

pub async fn run(_config: Arc<Config>, _js: jetstream::Context, shutdown: CancellationToken) {
    shutdown.cancelled().await;
}
