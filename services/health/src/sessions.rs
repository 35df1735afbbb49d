//! Follows `warden_sessions`: registers the resources of active sessions
//! and lets gone ones leave (decisions in `decide::sessions`).

use std::sync::Arc;

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warden_shared::resource::{reason, ResourceDecl, ResourceState};
use warden_shared::runtime;
use warden_shared::session::Session;

use crate::decide::sessions::{self as decide, SessionAction};
use crate::store::OpError;
use crate::Health;

pub(crate) async fn sessions_loop(
    health: Arc<Health>,
    sessions: kv::Store,
    shutdown: CancellationToken,
) {
    runtime::follow_kv(&sessions, "session.>", "sessions", &shutdown, |entry| {
        let health = health.clone();
        async move {
            if let Ok(s) = serde_json::from_slice::<Session>(&entry.value) {
                health.on_session(&s).await;
            }
        }
    })
    .await;
}

impl Health {
    async fn on_session(self: &Arc<Self>, s: &Session) {
        for d in decide::decls(s) {
            let pair = (s.name.clone(), d.name.clone());
            let seen = decide::seen(&mut self.registered(), &pair, s.state);
            if seen {
                continue;
            }
            let res = match decide::action(s.state) {
                SessionAction::Register => self.register(s, &d).await,
                SessionAction::Leave { expired } => self.leave(s, &d.name, expired).await,
            };
            if let Err(e) = res {
                warn!(resource = %d.name, session = %s.name, error = %e, "cannot record the session on its resource");
                // Try again at the session's next heartbeat.
                self.registered().remove(&pair);
            }
        }
    }

    pub(crate) async fn register(&self, s: &Session, d: &ResourceDecl) -> Result<(), OpError> {
        let now = self.now();
        let written = self
            .modify(&d.name, |current| decide::register(current, s, d, now))
            .await?;
        if let Some(r) = written {
            info!(resource = %r.name, kind = %r.kind, state = %r.state, incarnation = r.incarnation, bot.id = %s.bot_id, "resource registered");
        }
        Ok(())
    }

    /// A session leaves its resource; when it expired and was the last one
    /// there, the resource vanished: broken, then recycled.
    async fn leave(
        self: &Arc<Self>,
        s: &Session,
        name: &str,
        expired: bool,
    ) -> Result<(), OpError> {
        let now = self.now();
        let written = self
            .modify(name, |current| decide::leave(current, s, expired, now))
            .await?;
        if let Some(r) = written {
            if r.state == ResourceState::Broken {
                warn!(resource = %r.name, bot.id = %s.bot_id, "resource vanished: its agent stopped heartbeating");
                self.recycle(name, reason::VANISHED, &r.reason).await?;
            }
        }
        Ok(())
    }
}
