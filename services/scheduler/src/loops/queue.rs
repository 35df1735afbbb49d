//! Answers [`warden_shared::subjects::SCHED_QUEUE`] from the snapshot the
//! timer refreshes, with each pool's oldest wait computed now; it never
//! takes the queue lock the acquire path needs.

use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use warden_shared::serve::{self, Reply};

use crate::{queue, Shared};

pub async fn serve(
    shared: Arc<Shared>,
    endpoint: async_nats::service::endpoint::Endpoint,
    shutdown: CancellationToken,
) {
    serve::serve("queue", serve::endpoint(endpoint), &shutdown, move |_| {
        let mut reply = shared.snapshot().clone();
        queue::age(&mut reply, Utc::now());
        std::future::ready(Reply::json(&reply))
    })
    .await;
}
