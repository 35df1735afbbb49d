//! Runs a check: claims it on the record, asks the agent on the resource
//! (`warden.agent.<bot>.check`), writes the outcome, recycles a broken
//! resource (decisions in `decide::checks`).

use std::sync::Arc;

use tracing::info;
use warden_shared::messages::{CheckReply, CheckRequest, MESSAGE_VERSION};
use warden_shared::resource::{CheckRecord, Resource, ResourceState};
use warden_shared::subjects;

use crate::decide::checks::{self as decide, Outcome, Trigger};
use crate::metrics::metrics;
use crate::store::OpError;
use crate::Health;

impl Health {
    /// The state of resource `name` in the cache.
    fn state_of(&self, name: &str) -> Option<ResourceState> {
        self.cache().get(name).map(|d| d.state)
    }

    /// Claims and runs a check of `name` (who may: [`decide::claim`]). A
    /// closed resource that passes opens as a new incarnation. Returns the
    /// record after it and the agent's answer.
    pub(crate) async fn check(
        self: &Arc<Self>,
        name: &str,
        trigger: Trigger,
    ) -> Result<(Resource, Option<CheckReply>), OpError> {
        let cfg = &self.config.health;
        let now = self.now();
        let mut refusal = None;
        let claimed = self
            .modify(name, |current| {
                let r = current?;
                match decide::claim(r, trigger, &self.id, cfg, now, |d| self.state_of(d)) {
                    Ok(r) => Some(r),
                    Err(why) => {
                        refusal = Some(why);
                        None
                    }
                }
            })
            .await?;
        let Some(r) = claimed else {
            return Err(match refusal {
                Some(why) => OpError::Refused(why.to_string()),
                None => OpError::NotFound(name.into()),
            });
        };
        let started = std::time::Instant::now();
        let (outcome, summary, reply) = self.ask_agent(&r).await;
        metrics()
            .checks
            .with_label_values(&[outcome.as_str()])
            .inc();
        let record = CheckRecord {
            at: self.now(),
            result: outcome.as_str().into(),
            summary: summary.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
            trigger: trigger.as_str().into(),
        };
        let claim = (r.incarnation, r.state);
        let after = self
            .modify(name, |current| {
                let now = self.now();
                decide::apply_result(current?, claim, outcome, record.clone(), trigger, cfg, now)
            })
            .await?;
        let Some(after) = after else {
            return Err(OpError::Refused(format!(
                "resource {name} changed while it was checked"
            )));
        };
        info!(resource = %name, trigger = trigger.as_str(), result = outcome.as_str(), state = %after.state, incarnation = after.incarnation, summary = %summary, check_after = ?after.check_after, "resource checked");
        if after.state == ResourceState::Broken {
            let why = after.reason.clone();
            self.recycle(name, outcome.reason_code(), &why).await?;
            let closed = self.get(name).await?.map(|(r, _)| r).unwrap_or(after);
            return Ok((closed, reply));
        }
        Ok((after, reply))
    }

    /// Asks the agent of record to run the resource's checks.
    async fn ask_agent(&self, r: &Resource) -> (Outcome, String, Option<CheckReply>) {
        let limit = self.config.health.check_timeout;
        let Some(bot) = r
            .sessions
            .last()
            .map(|s| s.bot_id.clone())
            .or(r.bot_id.clone())
        else {
            return (Outcome::Timeout, "no agent on record".into(), None);
        };
        let req = CheckRequest {
            version: MESSAGE_VERSION,
            resource: r.name.clone(),
            kind: r.kind.clone(),
        };
        let Ok(body) = serde_json::to_vec(&req) else {
            return (
                Outcome::Failed,
                "cannot encode the check request".into(),
                None,
            );
        };
        let answer = tokio::time::timeout(
            limit,
            self.client
                .request(subjects::agent_check_subject(&bot), body.into()),
        )
        .await;
        match answer {
            Err(_) => (
                Outcome::Timeout,
                format!("bot {bot} did not answer within {limit:?}"),
                None,
            ),
            Ok(Err(e)) => (
                Outcome::Timeout,
                format!("bot {bot} cannot be reached: {e}"),
                None,
            ),
            Ok(Ok(msg)) => match serde_json::from_slice::<CheckReply>(&msg.payload) {
                Err(e) => (
                    Outcome::Failed,
                    format!("bad answer from bot {bot}: {e}"),
                    None,
                ),
                Ok(reply) => {
                    let (outcome, summary) = decide::judge_reply(&bot, &r.kind, &reply);
                    (outcome, summary, Some(reply))
                }
            },
        }
    }
}
