//! `warden-trigger`: events on the bus become jobs.
//!
//! A durable consumer (shared by every replica) reads the events stream;
//! each event is decoded ([`decode`]), matched against the configured rules
//! ([`rules`]) and each job it asks for is created with create-if-absent
//! under an id derived from message id + task, so a redelivered or
//! re-published event never makes a second job. Undecodable events go to
//! the dead-letter stream with the reason. An event is acked only once its
//! jobs (or its dead letter) are durable.

pub mod decode;
pub mod metrics;
pub mod rules;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warden_shared::consume::{self, Disposition};
use warden_shared::job::Job;
use warden_shared::store::{JobStore, StoreError};
use warden_shared::{runtime, subjects, Config};

use crate::metrics::metrics;
use crate::rules::Rules;

#[derive(Debug, Error)]
pub enum TriggerError {
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot set up the events consumer")]
    Consumer(#[from] runtime::SetupError),
}

struct Trigger {
    config: Arc<Config>,
    rules: Rules,
    store: JobStore,
}

/// How long before an event whose jobs (or dead letter) could not be
/// written is delivered again.
const RETRY: Duration = Duration::from_secs(2);

pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), TriggerError> {
    warden_shared::metrics::starting("trigger");
    metrics::init();
    let Some((client, handles)) = runtime::Connect::new(&config, "trigger")
        .topology(&shutdown)
        .await?
    else {
        return Ok(());
    };
    let Some(consumer) = runtime::durable_consumer(
        &handles.js,
        "trigger",
        subjects::EVENTS_STREAM,
        subjects::TRIGGER_CONSUMER,
        subjects::trigger_consumer(),
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let trigger = Arc::new(Trigger {
        rules: Rules::new(config.clone()),
        store: JobStore::new(handles.jobs.clone()),
        config: config.clone(),
    });
    warden_shared::metrics::ready("trigger");
    info!(rules = config.trigger.rules.len(), "trigger running");
    let t = trigger.clone();
    consume::consume(
        consume::Consume {
            service: "trigger",
            js: &handles.js,
            batch: config.trigger.batch,
            dead_letter_retry: RETRY,
            gather: Duration::ZERO,
        },
        &consumer,
        &shutdown,
        move |m| {
            let t = t.clone();
            async move { t.handle(&m).await }
        },
        |reason| {
            let m = metrics();
            m.events.with_label_values(&["dead_lettered"]).inc();
            m.dead_letters.with_label_values(&[reason]).inc();
        },
    )
    .await;
    warden_shared::runtime::flush(&client).await;
    info!("trigger stopped");
    Ok(())
}

impl Trigger {
    async fn handle(&self, msg: &jetstream::Message) -> Disposition {
        let m = metrics();
        let subject = msg.subject.as_str();
        let max = self.config.trigger.max_event_bytes;
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
        };
        let decoded = if header(subjects::HEADER_EVENT_SOURCE) == Some(subjects::EVENT_SOURCE_AMQP)
        {
            let bridged = decode::Bridged {
                message_id: header(async_nats::header::NATS_MESSAGE_ID.as_ref()),
                topic: header(subjects::HEADER_EVENT_TOPIC),
            };
            decode::decode_bridged(subject, bridged, &msg.payload, max)
        } else {
            decode::decode(subject, &msg.payload, max)
        };
        let event = match decoded {
            Ok(e) => e,
            Err(e) => {
                warn!(subject, reason = e.reason(), error = %e, "undecodable event");
                return self.dead_letter(subject, e.reason(), e.to_string());
            }
        };
        let plan = self.rules.plan(&event);
        for (rule, field) in &plan.incomplete {
            m.events.with_label_values(&["incomplete"]).inc();
            warn!(message.id = %event.message_id, rule, field, "rule matched but the message lacks an argument field");
        }
        if plan.jobs.is_empty() {
            if plan.incomplete.is_empty() {
                m.events.with_label_values(&["unmatched"]).inc();
                debug!(message.id = %event.message_id, topic = %event.topic, "no rule matched");
            }
            return Disposition::Ack;
        }
        let now = Utc::now();
        let mut created = 0;
        for p in plan.jobs {
            let job = Job::new(
                p.id,
                p.task.clone(),
                p.args,
                p.pool,
                p.priority,
                Some(p.source),
                "trigger",
                now,
            );
            match self.store.create(&job).await {
                Ok(_) => {
                    created += 1;
                    m.jobs_created.inc();
                    info!(job.id = %job.id, task = %job.task, message.id = %event.message_id, "job created");
                }
                Err(StoreError::AlreadyExists(_)) => {
                    debug!(job.id = %job.id, message.id = %event.message_id, "job exists: duplicate event");
                }
                Err(StoreError::TooLarge) => {
                    return self.dead_letter(
                        subject,
                        metrics::JOB_TOO_LARGE,
                        "the job this event asks for exceeds storage.max_job_bytes".into(),
                    );
                }
                Err(e) => {
                    warn!(message.id = %event.message_id, error = %e, "cannot create job; will retry the event");
                    m.events.with_label_values(&["retried"]).inc();
                    return Disposition::Nak(RETRY);
                }
            }
        }
        m.events
            .with_label_values(&[if created > 0 { "matched" } else { "duplicate" }])
            .inc();
        Disposition::Ack
    }

    fn dead_letter(&self, subject: &str, reason: &'static str, error: String) -> Disposition {
        warn!(subject, reason, error = %error, "event dead-lettered");
        Disposition::DeadLetter { reason, error }
    }
}
