//! Fedora's real bus: messages the real fedora-messaging client publishes
//! to a real RabbitMQ become Warden jobs through `warden bridge amqp`
//! (bridge → events stream → trigger → worker → FINISHED), each exactly
//! once: delivered twice, the bridge killed between the JetStream publish
//! and the AMQP ack, RabbitMQ restarted, NATS restarted. What cannot be an
//! event is dead-lettered with its reason and counted, and the bridge goes
//! on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_e2e::{eventually, js, never_within, Bridge, Scenario, Stack};
use warden_shared::subjects;
use warden_testsupport::fedora_messaging::{self, Kind, PublishOpts};
use warden_testsupport::rabbitmq::RabbitMq;

/// Koji build completed → rpmlint; Bodhi update pushed to testing → a
/// check of the update. Both as Fedora's production topics.
const RULES: &str = r#"
[tasks.bodhi-check]
command = ["sh", "-c", "echo \"would test $WARDEN_ARG_ALIAS\""]
verdicts = { 0 = "passed", 1 = "failed" }

[[trigger.rules]]
name = "koji-build-completed"
topic = "org.fedoraproject.*.buildsys.build.state.change"
when = { new = 1 }
tasks = ["rpmlint"]
args = { nvr = "{name}-{version}-{release}", owner = "{owner}", build_id = "{build_id}", name = "{name}" }

[[trigger.rules]]
name = "bodhi-update-testing"
topic = "org.fedoraproject.*.bodhi.update.request.testing"
tasks = ["bodhi-check"]
args = { alias = "{update.alias}" }
"#;

/// The bridge's config: the same rules (the config is validated whole)
/// and its queue on `rabbit`.
fn bridge_config(rabbit: &RabbitMq, queue: &str, keys: &[&str]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    format!(
        "{RULES}\n[amqp]\nurl = {:?}\nqueue = {queue:?}\nrouting_keys = [{}]\nretry_delay = \"200ms\"\nreconnect_max = \"2s\"\n",
        rabbit.amqp_url(),
        keys.join(", ")
    )
}

fn queue_name() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn jobs_of(s: &Stack, task: &str) -> Vec<serde_json::Value> {
    let v = s.get(&format!("/api/v1/jobs?task={task}&limit=1000")).await;
    v["jobs"].as_array().cloned().unwrap_or_default()
}

async fn events_in_stream(url: &str) -> u64 {
    let (_c, jsx) = js(url).await;
    let mut stream = jsx.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Waits for exactly `n` jobs of `task`, all FINISHED; each in full
/// (args, source, history).
async fn wait_finished(s: &Stack, task: &str, n: usize) -> Vec<serde_json::Value> {
    let listed = eventually(
        Duration::from_secs(90),
        &format!("{n} FINISHED {task} jobs"),
        || async {
            let jobs = jobs_of(s, task).await;
            (jobs.len() == n && jobs.iter().all(|j| j["state"] == "FINISHED")).then_some(jobs)
        },
    )
    .await;
    let mut full = Vec::with_capacity(n);
    for j in listed {
        full.push(s.job(j["id"].as_str().unwrap()).await);
    }
    full
}

fn koji(id_prefix: &str, count: usize) -> PublishOpts {
    PublishOpts {
        count: Some(count),
        id_prefix: Some(id_prefix.to_string()),
        ..PublishOpts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn koji_and_bodhi_messages_become_finished_jobs_exactly_once() {
    let rabbit = RabbitMq::start();
    let s = Scenario::new().config(RULES).workers(2).up();
    let queue = queue_name();
    let bridge = Bridge::start(
        &s.url(),
        &bridge_config(&rabbit, &queue, &["org.fedoraproject.prod.#"]),
    );
    let url = rabbit.amqp_url();

    let k = fedora_messaging::publish(&url, Kind::Koji, &koji("koji-e2e", 1));
    let b = fedora_messaging::publish(&url, Kind::Bodhi, &koji("bodhi-e2e", 1));
    let rpmlint = wait_finished(&s, "rpmlint", 1).await;
    let bodhi = wait_finished(&s, "bodhi-check", 1).await;
    assert_eq!(rpmlint[0]["outcome"], "passed", "{}", rpmlint[0]);
    assert_eq!(rpmlint[0]["args"]["nvr"], "chromium-80.0.3987.132-1.fc33");
    assert_eq!(rpmlint[0]["source"]["message_id"], k[0].id.as_str());
    assert_eq!(
        rpmlint[0]["source"]["subject"],
        "org.fedoraproject.prod.buildsys.build.state.change"
    );
    assert_eq!(bodhi[0]["args"]["alias"], "FEDORA-2019-f1ca3c00e5");
    assert_eq!(bodhi[0]["source"]["message_id"], b[0].id.as_str());

    // The event as stored: the body byte for byte, the id and headers
    // fedora-messaging sent.
    let (_c, jsx) = js(&s.url()).await;
    let stream = jsx.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject("org.fedoraproject.prod.buildsys.build.state.change")
        .await
        .unwrap();
    let headers = stored.headers;
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(k[0].id.as_str())
    );
    assert_eq!(
        headers.get("fedora_messaging_schema").map(|v| v.as_str()),
        Some("koji_fedoramessaging.build.BuildStateChangeV1")
    );
    assert!(headers.get("sent-at").is_some(), "{headers:?}");
    assert_eq!(
        headers
            .get(subjects::HEADER_EVENT_SOURCE)
            .map(|v| v.as_str()),
        Some(subjects::EVENT_SOURCE_AMQP)
    );
    let body: serde_json::Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(body["build_id"], 1478312);

    // The same two messages again (same ids): no new event, no new job.
    fedora_messaging::publish(&url, Kind::Koji, &koji("koji-e2e", 1));
    fedora_messaging::publish(&url, Kind::Bodhi, &koji("bodhi-e2e", 1));
    eventually(Duration::from_secs(30), "4 messages received", || async {
        (bridge.sample("warden_bridge_received_total").await >= 4.0).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "the queue drained", || async {
        (rabbit.queue_messages(&queue) == (0, 0)).then_some(())
    })
    .await;
    assert_eq!(events_in_stream(&s.url()).await, 2);
    never_within(Duration::from_secs(3), "a second job", || async {
        let n = jobs_of(&s, "rpmlint").await.len() + jobs_of(&s, "bodhi-check").await.len();
        (n != 2).then_some(n)
    })
    .await;
    assert_eq!(bridge.sample("warden_bridge_published_total").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_between_publish_and_ack_makes_one_job() {
    let rabbit = RabbitMq::start();
    let s = Scenario::new().config(RULES).workers(1).up();
    let queue = queue_name();
    let config = bridge_config(&rabbit, &queue, &["org.fedoraproject.prod.#"]);
    // Declared before the bridge first runs, so the message waits for it.
    fedora_messaging::declare_queue(&rabbit.amqp_url(), &queue, &["org.fedoraproject.prod.#"]);
    let k = fedora_messaging::publish(&rabbit.amqp_url(), Kind::Koji, &koji("koji-kill", 1));

    // Exits right after JetStream acknowledged the event, before the AMQP
    // ack: the event is stored, the broker still holds the message.
    let mut bridge = Bridge::spawn(&s.url(), &config, &["--crash-after-publish", "1"]);
    assert_eq!(
        bridge.wait_exit(Duration::from_secs(60)),
        Some(137),
        "{}",
        bridge.log_text()
    );
    assert_eq!(events_in_stream(&s.url()).await, 1);
    eventually(
        Duration::from_secs(30),
        "the broker requeued the unacknowledged message",
        || async { (rabbit.queue_messages(&queue) == (1, 0)).then_some(()) },
    )
    .await;

    // Started again: the message comes again, is one event still
    // (Nats-Msg-Id), is acknowledged this time, and makes one job.
    bridge.start_again();
    eventually(Duration::from_secs(30), "the queue drained", || async {
        (rabbit.queue_messages(&queue) == (0, 0)).then_some(())
    })
    .await;
    assert_eq!(bridge.sample("warden_bridge_redelivered_total").await, 1.0);
    assert_eq!(events_in_stream(&s.url()).await, 1);
    let jobs = wait_finished(&s, "rpmlint", 1).await;
    assert_eq!(jobs[0]["source"]["message_id"], k[0].id.as_str());
    assert_eq!(jobs[0]["attempt"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_survives_rabbitmq_and_nats_restarts_with_nothing_lost_or_doubled() {
    let mut rabbit = RabbitMq::start();
    let mut s = Scenario::new().config(RULES).workers(2).up();
    let queue = queue_name();
    let bridge = Bridge::start(
        &s.url(),
        &bridge_config(&rabbit, &queue, &["org.fedoraproject.prod.#"]),
    );
    let url = rabbit.amqp_url();

    // 1. Ten messages, bridged.
    fedora_messaging::publish(&url, Kind::Koji, &koji("before", 10));
    eventually(Duration::from_secs(60), "10 events", || async {
        (events_in_stream(&s.url()).await == 10).then_some(())
    })
    .await;

    // 2. RabbitMQ restarts; ten more published once it is back.
    rabbit.restart();
    fedora_messaging::publish(&url, Kind::Koji, &koji("after-rabbit", 10));
    eventually(Duration::from_secs(90), "20 events", || async {
        (events_in_stream(&s.url()).await == 20).then_some(())
    })
    .await;
    assert!(
        bridge
            .sample("warden_bridge_amqp_connects_total{result=\"ok\"}")
            .await
            >= 2.0,
        "the bridge reconnected: {}",
        bridge.log_text()
    );

    // 3. NATS goes away; ten more reach RabbitMQ meanwhile and wait there
    // (handed back, delivered again) until NATS is back.
    s.nats.stop();
    fedora_messaging::publish(&url, Kind::Koji, &koji("during-nats", 10));
    eventually(Duration::from_secs(30), "a publish handed back", || async {
        (bridge.sample("warden_bridge_publish_retries_total").await >= 1.0).then_some(())
    })
    .await;
    s.nats.start_again();
    eventually(Duration::from_secs(90), "the queue drained", || async {
        (rabbit.queue_messages(&queue) == (0, 0)).then_some(())
    })
    .await;

    // Every message once: 30 events, 30 jobs, all FINISHED.
    assert_eq!(events_in_stream(&s.url()).await, 30);
    let jobs = wait_finished(&s, "rpmlint", 30).await;
    let mut ids: Vec<&str> = jobs
        .iter()
        .map(|j| j["source"]["message_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 30);
    assert_eq!(bridge.sample("warden_bridge_published_total").await, 30.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_dead_lettered_with_a_reason_and_the_bridge_goes_on() {
    let rabbit = RabbitMq::start();
    let s = Scenario::new().config(RULES).workers(1).up();
    let queue = queue_name();
    let bridge = Bridge::start(
        &s.url(),
        &bridge_config(
            &rabbit,
            &queue,
            &["org.fedoraproject.prod.#", "com.example.#"],
        ),
    );
    let url = rabbit.amqp_url();
    let koji_key = "org.fedoraproject.prod.buildsys.build.state.change";
    fedora_messaging::publish_raw(&url, koji_key, b"{not json");
    fedora_messaging::publish_raw(&url, koji_key, b"[1, 2, 3]");
    fedora_messaging::publish_raw(&url, koji_key, &[0xff, 0xfe, 0x00]);
    // Valid, but on a topic the events stream does not listen on.
    fedora_messaging::publish_raw(&url, "com.example.elsewhere", b"{}");

    for (reason, n) in [
        ("invalid_json", 2.0),
        ("not_an_object", 1.0),
        ("no_events_subject", 1.0),
    ] {
        let series = format!("warden_bridge_dead_lettered_total{{reason=\"{reason}\"}}");
        eventually(Duration::from_secs(30), &series, || async {
            (bridge.sample(&series).await == n).then_some(())
        })
        .await;
    }
    // Each on the dead-letter stream with its reason, the body kept.
    let (_c, jsx) = js(&s.url()).await;
    let dl = jsx.get_stream(subjects::DEADLETTER_STREAM).await.unwrap();
    let letter = dl
        .get_last_raw_message_by_subject(&subjects::deadletter_subject(
            "bridge",
            "no_events_subject",
        ))
        .await
        .unwrap();
    let letter: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["reason"], "no_events_subject");
    assert_eq!(letter["subject"], "com.example.elsewhere");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("com.example.elsewhere"),
        "{letter}"
    );

    // Nothing reached the events stream, nothing is left in the queue,
    // and a good message after them still becomes a job.
    assert_eq!(events_in_stream(&s.url()).await, 0);
    fedora_messaging::publish(&url, Kind::Koji, &koji("after-garbage", 1));
    wait_finished(&s, "rpmlint", 1).await;
    eventually(Duration::from_secs(30), "the queue drained", || async {
        (rabbit.queue_messages(&queue) == (0, 0)).then_some(())
    })
    .await;
}

/// As against Fedora's broker: amqps with the broker's CA and a client
/// certificate, logging in with SASL EXTERNAL (the certificate is the
/// login, as fedora-messaging does it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_consumes_over_tls_with_a_client_certificate() {
    let pki = warden_testsupport::TestPki::new();
    let rabbit = RabbitMq::start_tls(&pki);
    let client = pki.client("warden-bridge");
    rabbit.add_cert_user("warden-bridge");
    let s = Scenario::new().config(RULES).workers(1).up();
    let queue = queue_name();
    let tls_port = rabbit.tls_port().unwrap();
    let config = format!(
        "{RULES}\n[amqp]\nurl = \"amqps://127.0.0.1:{tls_port}/%2F\"\ntls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\nqueue = {queue:?}\nrouting_keys = [\"org.fedoraproject.prod.#\"]\n",
        pki.ca(),
        client.cert,
        client.key
    );
    let bridge = Bridge::start(&s.url(), &config);
    let k = fedora_messaging::publish(&rabbit.amqp_url(), Kind::Koji, &koji("koji-tls", 1));
    let jobs = wait_finished(&s, "rpmlint", 1).await;
    assert_eq!(jobs[0]["source"]["message_id"], k[0].id.as_str());
    let conns = rabbit.ctl(&["list_connections", "-q", "user", "ssl", "auth_mechanism"]);
    assert!(
        conns.lines().any(|l| l.starts_with("warden-bridge")
            && l.contains("true")
            && l.contains("EXTERNAL")),
        "the bridge's connection: {conns}"
    );
    assert_eq!(bridge.sample("warden_bridge_published_total").await, 1.0);
}

/// Two bridges share one queue (the broker spreads the deliveries); one
/// is SIGKILLed while messages flow. What it held unacknowledged comes
/// again to the other: every message is one event, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_share_a_queue_and_one_dying_loses_nothing() {
    let rabbit = RabbitMq::start();
    let nats = warden_e2e::NatsServer::start();
    // The bridge creates no stream (the services do): make them here.
    warden_e2e::ensure_topology(&nats.url()).await;
    let queue = queue_name();
    let url = rabbit.amqp_url();
    let koji_key = "org.fedoraproject.prod.buildsys.build.state.change";
    fedora_messaging::declare_queue(&url, &queue, &[koji_key]);
    // A small prefetch, so both get deliveries from the first messages on.
    let config = format!(
        "{}prefetch = 4\n",
        bridge_config(&rabbit, &queue, &[koji_key])
    );
    let mut a = Bridge::start(&nats.url(), &config);
    let b = Bridge::start(&nats.url(), &config);
    fedora_messaging::publish(
        &url,
        Kind::Koji,
        &PublishOpts {
            count: Some(200),
            id_prefix: Some("shared".into()),
            fast: true,
            ..PublishOpts::default()
        },
    );
    eventually(Duration::from_secs(60), "both bridges at work", || async {
        (a.sample("warden_bridge_published_total").await >= 1.0
            && b.sample("warden_bridge_published_total").await >= 1.0)
            .then_some(())
    })
    .await;
    a.kill();
    eventually(Duration::from_secs(90), "the queue drained", || async {
        (rabbit.queue_messages(&queue) == (0, 0)).then_some(())
    })
    .await;
    assert_eq!(events_in_stream(&nats.url()).await, 200);
}

/// `warden up` runs the bridge when `amqp.url` is set: the two commands of
/// the README are all a Fedora deployment needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warden_up_runs_the_bridge_when_amqp_is_configured() {
    let rabbit = RabbitMq::start();
    let queue = queue_name();
    let s = Scenario::new()
        .config(&bridge_config(
            &rabbit,
            &queue,
            &["org.fedoraproject.prod.#"],
        ))
        .workers(1)
        .up();
    // `up` is healthy only once the bridge consumes: its queue exists.
    assert_eq!(rabbit.queue_messages(&queue), (0, 0));
    let k = fedora_messaging::publish(&rabbit.amqp_url(), Kind::Koji, &koji("koji-up", 1));
    let jobs = wait_finished(&s, "rpmlint", 1).await;
    assert_eq!(jobs[0]["source"]["message_id"], k[0].id.as_str());
    let m = s.metrics().await;
    assert_eq!(
        warden_e2e::sample(&m, "warden_bridge_published_total"),
        Some(1.0),
        "{m}"
    );
}

/// With the shipped NATS permissions: the bridge logs in as its own user
/// (`warden-bridge`, no JetStream administration), brings a Koji message
/// in and the finished job's CI message out, valid to the real
/// fedora-messaging client, with no permission refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_works_in_and_out_with_its_own_nats_user() {
    let rabbit = RabbitMq::start();
    let s = Scenario::new().config(RULES).secured(&["bot-a"]).up();
    let _worker = s.bot_worker("bot-a");
    let ci = fedora_messaging::CiConsumer::start(
        &rabbit.amqp_url(),
        &queue_name(),
        "org.fedoraproject.prod.ci.#",
    );
    let queue = queue_name();
    let config = format!(
        "{}\n[amqp.ci_messages]\nenabled = true\n\n[amqp.ci_messages.tasks.rpmlint]\nartifact = \"koji-build\"\ncategory = \"static-analysis\"\nartifact_args = {{ id = \"{{build_id}}\", nvr = \"{{nvr}}\", issuer = \"{{owner}}\", component = \"{{name}}\", scratch = \"false\" }}\n",
        bridge_config(&rabbit, &queue, &["org.fedoraproject.prod.#"])
    );
    let login = vec![
        ("WARDEN_NATS_USER".to_string(), "warden-bridge".to_string()),
        (
            "WARDEN_NATS_PASSWORD".to_string(),
            warden_e2e::role_password("warden-bridge"),
        ),
    ];
    let bridge = Bridge::spawn_with_env(&s.url(), &config, &[], &login);
    bridge.wait_healthy();
    // The CI consumer is ready before the first job change.
    eventually(
        Duration::from_secs(60),
        "the CI publisher pulling",
        || async { (bridge.log_text().contains("CI messages: AMQP connected")).then_some(()) },
    )
    .await;
    let k = fedora_messaging::publish(&rabbit.amqp_url(), Kind::Koji, &koji("koji-secured", 1));
    let jobs = wait_finished(&s, "rpmlint", 1).await;
    assert_eq!(jobs[0]["source"]["message_id"], k[0].id.as_str());
    let complete = eventually(Duration::from_secs(60), "a complete CI message", || {
        let m = ci.messages();
        async move {
            m.into_iter().find(|m| {
                m["topic"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(".test.complete"))
            })
        }
    })
    .await;
    assert_eq!(complete["valid"], true, "{complete}");
    assert_eq!(complete["client_validated"], true, "{complete}");
    assert_eq!(complete["body"]["test"]["result"], "passed");
    assert_eq!(
        complete["body"]["pipeline"]["id"],
        jobs[0]["id"].as_str().unwrap()
    );
    assert_eq!(complete["body"]["artifact"]["id"], 1478312);
    assert_eq!(complete["body"]["artifact"]["component"], "chromium");
    // One complete message, and not a warning in the bridge's log: a
    // permission the bridge lacks shows as a refused or timed-out request
    // (and a CI message published again for a marker it cannot write).
    never_within(Duration::from_secs(3), "a second complete message", || {
        let n = ci
            .messages()
            .iter()
            .filter(|m| {
                m["topic"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(".test.complete"))
            })
            .count();
        async move { (n != 1).then_some(n) }
    })
    .await;
    let log = bridge.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}
