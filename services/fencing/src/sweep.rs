//! The expiry sweep.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::metrics;
use crate::sessions::Sessions;

/// Expires sessions silent past the timeout. The clock only counts time
/// during which heartbeats could have been recorded: after this service's
/// start, after any stretch in which it was blind (disconnected, sweeps
/// stalled), and after the last time the session store failed (a sweep,
/// or a create, heartbeat or close of any bot), every session gets a full
/// timeout to heartbeat again, so an outage of NATS, of the store or of
/// this service never evicts the whole fleet.
pub(crate) async fn sweep_loop(
    client: async_nats::Client,
    sessions: Arc<Sessions>,
    timeout: std::time::Duration,
    shutdown: CancellationToken,
) {
    let period = (timeout / 4).max(std::time::Duration::from_millis(50));
    let mut available_since = sessions.now();
    let mut last_good = std::time::Instant::now();
    // The first sweep runs at once (nothing can expire in it: every
    // session's clock starts now) so the sessions gauge is exported from
    // the start.
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
        first = false;
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        if last_good.elapsed() > period * 3 {
            available_since = sessions.now();
            info!(
                blind_ms = last_good.elapsed().as_millis() as u64,
                "bus visible again; grace period for every session"
            );
        }
        match sessions.sweep(timeout, available_since, period).await {
            Ok(Some(expired)) => {
                last_good = std::time::Instant::now();
                for (bot, name) in expired {
                    metrics().expired.inc();
                    warn!(bot.id = %bot, session = %name, "session expired: no heartbeat within the timeout");
                }
            }
            // Too slow to trust: the bus may have been away meanwhile.
            Ok(None) => {}
            Err(e) => {
                sessions.store_failed();
                warn!(error = %e, "cannot sweep sessions; every session's clock restarts when the store works again");
            }
        }
    }
}
