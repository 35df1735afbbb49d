//! The classifier client, and the durable publishes of a classified
//! crash's events (decisions in [`crate::classification`]).

use chrono::Utc;
use tracing::{debug, warn};
use warden_shared::job::Job;
use warden_shared::messages::{Classification, ClassifyReply, Report};
use warden_shared::{runtime, subjects};

use crate::classification::{self, CrashEvent, Publish, CLASSIFY_GIVE_UP, CLASSIFY_TIMEOUT};
use crate::metrics::metrics;
use crate::Shared;

/// Asks the classifier about the crash in `r`; `None` when it did not
/// answer (the report is retried), a stand-in when it never will.
pub async fn classify(
    shared: &Shared,
    job: &Job,
    r: &Report,
    deliveries: i64,
) -> Option<Classification> {
    let req = classification::request(job, r)?;
    let failure = match serde_json::to_vec(&req) {
        Err(e) => format!("cannot encode: {e}"),
        Ok(body) => {
            match tokio::time::timeout(
                CLASSIFY_TIMEOUT,
                shared.client.request(subjects::CLASSIFY, body.into()),
            )
            .await
            {
                Ok(Ok(msg)) => match serde_json::from_slice::<ClassifyReply>(&msg.payload) {
                    Ok(ClassifyReply {
                        classification: Some(c),
                        ..
                    }) => return Some(c),
                    Ok(ClassifyReply { error, .. }) => format!(
                        "classifier error: {}",
                        error.map(|e| e.message).unwrap_or_default()
                    ),
                    Err(e) => format!("bad classifier reply: {e}"),
                },
                Ok(Err(e)) => format!("classifier request failed: {e}"),
                Err(_) => "classifier did not answer in time".to_string(),
            }
        }
    };
    metrics().classify_failures.inc();
    if deliveries < CLASSIFY_GIVE_UP {
        debug!(job.id = %job.id, deliveries, failure, "crash not classified yet; will retry");
    } else {
        warn!(job.id = %job.id, deliveries, failure, "classifier unavailable; crash recorded without classification");
    }
    classification::stand_in(r, deliveries)
}

/// After a classified crash is written: tell the party the catalogue names
/// and flag every resource the attempt ran on when they may be at fault.
/// Both are durable publishes with a message id per attempt, so a retried
/// write never notifies twice; a failed publish is logged and counted, the
/// crash stays recorded, and false is returned (the report is then not
/// acked).
pub async fn act_on_classification(shared: &Shared, job: &Job, e: &CrashEvent) -> bool {
    let m = metrics();
    let events = classification::events(job, e, &shared.config, Utc::now());
    let mut all = true;
    if let Some(n) = events.notify {
        let party = n.body.party;
        let ok = publish_durable(shared, n).await;
        all &= ok;
        m.notifications
            .with_label_values(&[party.as_str(), if ok { "published" } else { "failed" }])
            .inc();
    }
    for s in events.suspects {
        if publish_durable(shared, s).await {
            m.suspects.inc();
        } else {
            all = false;
        }
    }
    all
}

async fn publish_durable<T: serde::Serialize>(shared: &Shared, p: Publish<T>) -> bool {
    match runtime::publish_with_id(&shared.js, p.subject.clone(), &p.msg_id, &p.body).await {
        Ok(()) => true,
        Err(e) => {
            warn!(subject = p.subject, error = %e, "durable publish failed");
            false
        }
    }
}
