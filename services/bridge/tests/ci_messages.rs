//! CI messages out, against a real nats-server and a real RabbitMQ: a job
//! moved SCHEDULED → RUNNING → FINISHED through the job store (as the
//! scheduler writes it, with repeated writes of one state) comes out as
//! exactly `queued`, `running`, `complete`, in order, with
//! fedora-messaging's properties; a crashed job as an `error`. The real
//! fedora-messaging consumer validates every one against the ci-messages
//! schemas.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use warden_shared::job::{Blame, Lease};
use warden_shared::store::JobStore;
use warden_shared::{subjects, Config, Job, JobState};
use warden_testsupport::fedora_messaging::CiConsumer;
use warden_testsupport::rabbitmq::RabbitMq;
use warden_testsupport::{eventually, never_within, NatsServer};

fn config(nats: &NatsServer, rmq: &RabbitMq) -> Config {
    let toml = format!(
        r#"
[nats]
url = {nats:?}

[amqp]
url = {amqp:?}
reconnect_max = "2s"
retry_delay = "200ms"

[amqp.ci_messages]
enabled = true
api_url = "https://warden.example.org"

[amqp.ci_messages.tasks.rpmlint]
artifact = "koji-build"
category = "static-analysis"
artifact_args = {{ id = "{{build_id}}", nvr = "{{nvr}}", issuer = "{{owner}}", component = "{{name}}", scratch = "false" }}
"#,
        nats = nats.url(),
        amqp = rmq.amqp_url(),
    );
    Config::from_parts(Some(&toml), Vec::new()).expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_queued_running_complete_on_the_bus() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let nats = NatsServer::start();
    let rmq = RabbitMq::start();
    let config = Arc::new(config(&nats, &rmq));

    // A queue on the CI topics, as ResultsDB's listener binds one.
    let conn = Connection::connect(&rmq.amqp_url(), ConnectionProperties::default())
        .await
        .expect("AMQP");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            "ci-listener".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue");
    ch.queue_bind(
        q.name().clone(),
        "amq.topic".into(),
        "org.fedoraproject.prod.ci.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");

    // And the real fedora-messaging consumer, validating each message
    // against the ci-messages schemas (as ResultsDB's listener would).
    let url = rmq.amqp_url();
    let fm = tokio::task::spawn_blocking(move || {
        CiConsumer::start(
            &url,
            "5d1e3c2a-9f0b-4c7e-8a61-2b4f6d8e0c13",
            "org.fedoraproject.prod.ci.#",
        )
    })
    .await
    .expect("the fedora-messaging consumer starts");

    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let js = jetstream::new(client);
    let handles = subjects::ensure(&js, &config.topology())
        .await
        .expect("topology");
    let store = JobStore::new(handles.jobs.clone());

    let shutdown = CancellationToken::new();
    let publisher = tokio::spawn(warden_bridge::ci::run(
        config.clone(),
        js.clone(),
        shutdown.clone(),
    ));
    // Deliver-new: only revisions after the consumer exists count, and
    // a revision superseded before the publisher pulled it is gone (the
    // bucket keeps one per job): wait until it is pulling, as a running
    // bridge is.
    eventually(
        Duration::from_secs(30),
        "the CI publisher is pulling",
        || {
            let js = js.clone();
            async move {
                let s = js
                    .get_stream(subjects::kv_stream(subjects::JOBS_BUCKET))
                    .await
                    .ok()?;
                let info = s.consumer_info(subjects::CI_MESSAGES_CONSUMER).await.ok()?;
                (info.num_waiting > 0).then_some(())
            }
        },
    )
    .await;

    // A job's life as the trigger and the scheduler write it.
    let mut job = Job::builder("rpmlint")
        .arg("build_id", "2345678")
        .arg("nvr", "bash-5.2-1.fc40")
        .arg("owner", "alice")
        .arg("name", "bash")
        .actor("trigger")
        .build();
    let mut rev = store.create(&job).await.expect("create");
    // A job of a task that publishes nothing, in between.
    store
        .create(&Job::builder("noop").build())
        .await
        .expect("create noop");
    let now = Utc::now();
    job.state = JobState::Running;
    job.attempt = 1;
    job.lease = Some(Lease {
        session: "s1".into(),
        bot_id: "bot-1".into(),
        resource: None,
        resources: Vec::new(),
        epoch: 1,
        leased_at: now,
        started_at: None,
        secret_hash: None,
    });
    job.updated_at = now;
    rev = store.update(&job, rev).await.expect("dispatch");
    // The worker's start: RUNNING again, written again.
    if let Some(l) = job.lease.as_mut() {
        l.started_at = Some(now);
    }
    rev = store.update(&job, rev).await.expect("start");
    job.state = JobState::Finished;
    job.outcome = Some("passed".into());
    job.updated_at = now + chrono::Duration::seconds(3);
    store.update(&job, rev).await.expect("finish");

    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut got = Vec::new();
    while got.len() < 3 {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a CI message within 30 s")
            .expect("the consumer runs")
            .expect("a delivery");
        d.ack(BasicAckOptions::default()).await.expect("ack");
        got.push(d);
    }
    let topics: Vec<String> = got.iter().map(|d| d.routing_key.to_string()).collect();
    assert_eq!(
        topics,
        [
            "org.fedoraproject.prod.ci.warden.koji-build.test.queued",
            "org.fedoraproject.prod.ci.warden.koji-build.test.running",
            "org.fedoraproject.prod.ci.warden.koji-build.test.complete",
        ]
    );
    let mut ids = std::collections::HashSet::new();
    for d in &got {
        let p = &d.properties;
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.content_encoding().as_ref().map(|s| s.as_str()),
            Some("utf-8")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        let id = p.message_id().as_ref().expect("message id").to_string();
        uuid::Uuid::parse_str(&id).expect("a UUID message id");
        assert!(ids.insert(id), "a fresh id per message");
        let h = p.headers().as_ref().expect("headers");
        let h = h.inner();
        assert_eq!(
            h.get("fedora_messaging_schema"),
            Some(&AMQPValue::LongString("ci_messages.CIMessageV1".into()))
        );
        assert_eq!(
            h.get("fedora_messaging_severity"),
            Some(&AMQPValue::LongInt(20))
        );
        assert!(matches!(h.get("sent-at"), Some(AMQPValue::LongString(_))));
        let body: serde_json::Value = serde_json::from_slice(&d.data).expect("JSON body");
        assert_eq!(
            body["pipeline"]["id"],
            serde_json::json!(job.id.to_string())
        );
        assert_eq!(body["artifact"]["id"], serde_json::json!(2345678));
        assert_eq!(body["artifact"]["scratch"], serde_json::json!(false));
        assert_eq!(
            body["run"]["url"],
            serde_json::json!(format!("https://warden.example.org/api/v1/jobs/{}", job.id))
        );
    }
    let last: serde_json::Value = serde_json::from_slice(&got[2].data).expect("JSON");
    assert_eq!(last["test"]["result"], serde_json::json!("passed"));
    assert_eq!(last["test"]["runtime"], serde_json::json!(3.0));

    // Nothing more: the repeated RUNNING write and the noop job publish
    // nothing.
    ch.basic_cancel("test".into(), BasicCancelOptions::default())
        .await
        .expect("cancel the consumer");
    never_within(Duration::from_secs(2), "a fourth CI message", || {
        let ch = ch.clone();
        async move {
            ch.basic_get("ci-listener".into(), BasicGetOptions::default())
                .await
                .ok()
                .flatten()
                .map(|m| m.delivery.routing_key.to_string())
        }
    })
    .await;

    // A crash that is not retried: queued, running, error.
    let mut job2 = Job::builder("rpmlint")
        .arg("build_id", "2345679")
        .arg("nvr", "bash-5.2-2.fc40")
        .arg("owner", "alice")
        .arg("name", "bash")
        .build();
    job2.retry = false;
    let mut rev = store.create(&job2).await.expect("create");
    job2.state = JobState::Running;
    job2.attempt = 1;
    job2.lease = job.lease.clone();
    rev = store.update(&job2, rev).await.expect("dispatch");
    job2.state = JobState::Crashed;
    job2.blame = Some(Blame::Task);
    job2.detail = Some("segfault".into());
    job2.description = Some("the task died of SIGSEGV".into());
    store.update(&job2, rev).await.expect("crash");

    let valid = eventually(
        Duration::from_secs(60),
        "six CI messages at the fedora-messaging consumer",
        || {
            let m = fm.messages();
            async move { (m.len() >= 6).then_some(m) }
        },
    )
    .await;
    for m in &valid {
        // Valid twice: the real client's own check (the schema class its
        // `fedora_messaging_schema` header names, `ci_messages.CIMessageV1`)
        // let it through to the callback, and the consumer's jsonschema
        // check against the spec's schemas found nothing.
        assert_eq!(m["client_validated"], serde_json::json!(true), "{m}");
        let errors: Vec<&serde_json::Value> = m["errors"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        assert!(errors.is_empty(), "{m}\n{}", fm.stderr());
        let status = m["topic"]
            .as_str()
            .and_then(|t| t.rsplit('.').next())
            .expect("a topic");
        assert_eq!(
            m["schema"],
            serde_json::json!(format!("koji-build.test.{status}.json"))
        );
        assert_eq!(
            m["headers"]["fedora_messaging_schema_package"],
            serde_json::json!("ci_messages")
        );
        assert_eq!(m["headers"]["priority"], serde_json::json!(0));
    }
    let error = valid
        .iter()
        .find(|m| {
            m["topic"]
                .as_str()
                .is_some_and(|t| t.ends_with(".test.error"))
        })
        .expect("an error message");
    assert_eq!(
        error["body"]["pipeline"]["id"],
        serde_json::json!(job2.id.to_string())
    );
    assert_eq!(
        error["body"]["error"]["reason"],
        serde_json::json!("crashed (blame: task, detail: segfault): the task died of SIGSEGV")
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publisher stops on shutdown")
        .expect("no panic");
}
