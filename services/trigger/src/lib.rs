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

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use futures::StreamExt;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
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
    js: jetstream::Context,
}

/// What happens to an event message; decided in one place.
#[derive(Debug, PartialEq, Eq)]
enum Disposition {
    Ack,
    /// Try again later (the store or the bus is unavailable).
    Retry,
}

pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), TriggerError> {
    warden_shared::metrics::starting("trigger");
    metrics::init();
    let Some((client, handles)) =
        runtime::connect_with_topology_until(&config, "trigger", &shutdown).await?
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
        js: handles.js.clone(),
        config: config.clone(),
    });
    warden_shared::metrics::ready("trigger");
    info!(rules = config.trigger.rules.len(), "trigger running");
    while !shutdown.is_cancelled() {
        let messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull events; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut chunks = messages.ready_chunks(config.trigger.batch);
        loop {
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = chunks.next() => match c { Some(c) => c, None => break },
            };
            let msgs: Vec<jetstream::Message> = chunk.into_iter().filter_map(Result::ok).collect();
            futures::future::join_all(msgs.into_iter().map(|m| {
                let t = trigger.clone();
                async move {
                    let d = t.handle(&m).await;
                    let kind = match d {
                        Disposition::Ack => AckKind::Ack,
                        Disposition::Retry => AckKind::Nak(Some(Duration::from_secs(2))),
                    };
                    if let Err(e) = m.ack_with(kind).await {
                        debug!(error = %e, "cannot ack event");
                    }
                }
            }))
            .await;
        }
    }
    warden_shared::runtime::flush(&client).await;
    info!("trigger stopped");
    Ok(())
}

impl Trigger {
    async fn handle(&self, msg: &jetstream::Message) -> Disposition {
        let m = metrics();
        let subject = msg.subject.as_str();
        let event = match decode::decode(subject, &msg.payload, self.config.trigger.max_event_bytes)
        {
            Ok(e) => e,
            Err(e) => {
                warn!(subject, reason = e.reason(), error = %e, "undecodable event");
                return self
                    .dead_letter(subject, e.reason(), &e.to_string(), &msg.payload)
                    .await;
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
                    return self
                        .dead_letter(
                            subject,
                            metrics::JOB_TOO_LARGE,
                            "the job this event asks for exceeds storage.max_job_bytes",
                            &msg.payload,
                        )
                        .await;
                }
                Err(e) => {
                    warn!(message.id = %event.message_id, error = %e, "cannot create job; will retry the event");
                    m.events.with_label_values(&["retried"]).inc();
                    return Disposition::Retry;
                }
            }
        }
        m.events
            .with_label_values(&[if created > 0 { "matched" } else { "duplicate" }])
            .inc();
        Disposition::Ack
    }

    async fn dead_letter(
        &self,
        subject: &str,
        reason: &str,
        error: &str,
        payload: &[u8],
    ) -> Disposition {
        let res = runtime::dead_letter(&self.js, "trigger", reason, subject, error, payload).await;
        match res {
            Ok(()) => {
                let m = metrics();
                m.events.with_label_values(&["dead_lettered"]).inc();
                m.dead_letters.with_label_values(&[reason]).inc();
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = %e, "cannot dead-letter an event; will retry");
                Disposition::Retry
            }
        }
    }
}
