//! The classifier as a NATS service: requests on
//! [`subjects::CLASSIFY`], answered by whichever replica the service API's
//! queue group picks.

use std::sync::Arc;
use std::time::Instant;

use async_nats::service::ServiceExt;
use bytes::Bytes;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warden_shared::classify::detail_label;
use warden_shared::error::ErrorCode;
use warden_shared::messages::{ClassifyReply, ClassifyRequest, ErrorBody, MESSAGE_VERSION};
use warden_shared::{runtime, serve, subjects, Config};

use crate::metrics::metrics;
use crate::{Classifier, CrashInput};

#[derive(Debug, Error)]
pub enum ClassifierError {
    #[error("invalid classifier rules:\n  - {}", .0.join("\n  - "))]
    Rules(Vec<String>),
    #[error(transparent)]
    Connect(#[from] runtime::ConnectError),
    #[error("cannot register the classifier service")]
    Service(#[source] async_nats::Error),
}

/// Runs one classifier replica until `shutdown`.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), ClassifierError> {
    warden_shared::metrics::starting("classifier");
    let classifier = Arc::new(Classifier::from_config(&config).map_err(ClassifierError::Rules)?);
    crate::metrics::init(classifier.catalogue());
    let client = runtime::Connect::new(&config, "classifier")
        .client()
        .await?;
    let service = client
        .service_builder()
        .description("Warden crash classifier")
        .start(subjects::CLASSIFIER_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(ClassifierError::Service)?;
    let requests = service
        .endpoint_builder()
        .name("classify")
        .add(subjects::CLASSIFY)
        .await
        .map_err(ClassifierError::Service)?;
    warden_shared::metrics::ready("classifier");
    info!(
        rules = classifier.rule_names().count(),
        "classifier running"
    );
    serve::serve(
        "classifier",
        serve::endpoint(requests),
        &shutdown,
        move |msg| answer(classifier.clone(), msg.payload),
    )
    .await;
    let _ = service.stop().await;
    warden_shared::runtime::flush(&client).await;
    info!("classifier stopped");
    Ok(())
}

async fn answer(classifier: Arc<Classifier>, payload: Bytes) -> serve::Reply {
    serve::answer_json(
        &payload,
        |e| {
            metrics().invalid.inc();
            warn!(error = %e.message, "undecodable classify request");
        },
        |req| classify(classifier, req),
    )
    .await
}

async fn classify(classifier: Arc<Classifier>, req: ClassifyRequest) -> ClassifyReply {
    let m = metrics();
    let started = Instant::now();
    // Bounded work, but CPU work: keep it off the I/O threads.
    let decided = tokio::task::spawn_blocking(move || {
        let c = classifier.classify(&CrashInput {
            task: &req.task,
            crash: &req.crash,
            resource: req.resource.as_deref(),
        });
        let label = detail_label(classifier.catalogue(), &c.detail).to_string();
        (c, label, req)
    })
    .await;
    m.duration.observe(started.elapsed().as_secs_f64());
    match decided {
        Ok((c, label, req)) => {
            m.classified
                .with_label_values(&[c.blame.as_str(), &label])
                .inc();
            debug!(job.id = %req.job_id, attempt = req.attempt, blame = %c.blame, detail = %c.detail, rule = %c.rule, "crash classified");
            ClassifyReply {
                version: MESSAGE_VERSION,
                classification: Some(c),
                error: None,
            }
        }
        Err(e) => ClassifyReply {
            version: MESSAGE_VERSION,
            classification: None,
            error: Some(ErrorBody::new(
                ErrorCode::Internal,
                format!("classification failed: {e}"),
            )),
        },
    }
}
