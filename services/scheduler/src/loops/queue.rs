//! Answers [`warden_shared::subjects::SCHED_QUEUE`] from the snapshot the
//! timer refreshes, with each pool's oldest wait computed now; it never
//! takes the queue lock the acquire path needs.

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{queue, Shared};

pub async fn serve(
    shared: Arc<Shared>,
    mut endpoint: async_nats::service::endpoint::Endpoint,
    shutdown: CancellationToken,
) {
    loop {
        let req = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = endpoint.next() => match r { Some(r) => r, None => return },
        };
        let mut reply = shared.snapshot().clone();
        queue::age(&mut reply, Utc::now());
        let answer = match serde_json::to_vec(&reply) {
            Ok(body) => req.respond(Ok(body.into())).await,
            Err(e) => {
                warn!(error = %e, "cannot encode queue reply");
                continue;
            }
        };
        if let Err(e) = answer {
            debug!(error = %e, "cannot answer queue request");
        }
    }
}
