//! The RabbitMQ harness and the fedora-messaging tools, against a real
//! RabbitMQ node and the real Python client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use warden_testsupport::fedora_messaging::{self as fm, CiConsumer, Kind, PublishOpts};
use warden_testsupport::{eventually, RabbitMq, TestPki};

const KOJI_TOPIC: &str = "org.fedoraproject.prod.buildsys.build.state.change";

/// Pids of processes whose environment holds `needle` (e.g.
/// `RABBITMQ_NODENAME=<node>`: the script, the VM, the CLI, epmd, all get
/// the node's environment).
fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let cmd = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            out.push(format!("{name} {}", cmd.replace('\0', " ")));
        }
    }
    out
}

#[test]
fn a_node_starts_and_a_koji_message_published_by_fedora_messaging_reads_back() {
    let mq = RabbitMq::start();
    eprintln!("rabbitmq started in {:?}", mq.started_in());
    assert!(std::net::TcpStream::connect(("127.0.0.1", mq.port())).is_ok());
    fm::declare_queue(
        &mq.amqp_url(),
        "koji-in",
        &["org.fedoraproject.prod.buildsys.#"],
    );
    assert_eq!(mq.queue_messages("koji-in"), (0, 0));

    let sent = fm::publish(
        &mq.amqp_url(),
        Kind::Koji,
        &PublishOpts {
            id_prefix: Some("koji-test".into()),
            ..Default::default()
        },
    );
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].id, "koji-test-0");
    assert_eq!(sent[0].routing_key, KOJI_TOPIC);
    assert_eq!(mq.queue_messages("koji-in"), (1, 0));

    let got = fm::get_messages(&mq.amqp_url(), "koji-in", 10);
    assert_eq!(got.len(), 1);
    let m = &got[0];
    eprintln!("{}", serde_json::to_string_pretty(m).unwrap());
    assert_eq!(m["routing_key"], KOJI_TOPIC);
    assert_eq!(m["exchange"], "amq.topic");
    let p = &m["properties"];
    assert_eq!(p["message_id"], "koji-test-0");
    assert_eq!(p["content_type"], "application/json");
    assert_eq!(p["content_encoding"], "utf-8");
    assert_eq!(p["delivery_mode"], 2);
    let h = &m["headers"];
    assert_eq!(
        h["fedora_messaging_schema"],
        "koji_fedoramessaging.build.BuildStateChangeV1"
    );
    assert_eq!(h["fedora_messaging_severity"], 20);
    assert!(h["sent-at"].as_str().unwrap().ends_with("+00:00"));
    let body: serde_json::Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["name"], "chromium");
    assert_eq!(mq.queue_messages("koji-in"), (0, 0));
}

#[test]
fn a_bodhi_message_and_raw_bytes_arrive_with_their_routing_keys() {
    let mq = RabbitMq::start();
    fm::declare_queue(&mq.amqp_url(), "all", &["#"]);
    let sent = fm::publish(&mq.amqp_url(), Kind::Bodhi, &PublishOpts::default());
    assert_eq!(
        sent[0].routing_key,
        "org.fedoraproject.prod.bodhi.update.request.testing"
    );
    fm::publish_raw_with_id(
        &mq.amqp_url(),
        KOJI_TOPIC,
        b"\xff\xfe not json",
        Some("raw-1"),
    );
    let got = fm::get_messages(&mq.amqp_url(), "all", 10);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["properties"]["message_id"], sent[0].id.as_str());
    assert_eq!(
        got[0]["headers"]["fedora_messaging_schema"],
        "bodhi.update.request.testing.v1"
    );
    assert_eq!(got[1]["routing_key"], KOJI_TOPIC);
    assert_eq!(got[1]["properties"]["message_id"], "raw-1");
    assert!(got[1]["body"].is_null(), "not UTF-8: no text");
    assert_eq!(got[1]["headers"], serde_json::json!({}));
}

#[test]
fn a_durable_queues_persistent_message_survives_stop_and_start_again() {
    let mut mq = RabbitMq::start();
    let url = mq.amqp_url();
    fm::declare_queue(&url, "keep", &[KOJI_TOPIC]);
    fm::publish(
        &url,
        Kind::Koji,
        &PublishOpts {
            id_prefix: Some("kept".into()),
            ..Default::default()
        },
    );
    mq.stop();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", mq.port())).is_err(),
        "stopped"
    );
    mq.start_again();
    eprintln!("rabbitmq started again in {:?}", mq.started_in());
    assert_eq!(mq.amqp_url(), url);
    assert_eq!(mq.queue_messages("keep"), (1, 0));
    // And after a SIGKILL too (the publish was confirmed).
    mq.kill();
    mq.start_again();
    let got = fm::get_messages(&url, "keep", 10);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["properties"]["message_id"], "kept-0");
}

#[test]
fn two_nodes_run_at_once_and_drop_leaves_no_process_behind() {
    let a = RabbitMq::start();
    let b = RabbitMq::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.epmd_port(), b.epmd_port());
    fm::declare_queue(&a.amqp_url(), "only-on-a", &["#"]);
    assert!(b.queues().iter().all(|(n, _, _)| n != "only-on-a"));
    let (node, epmd) = (
        format!("RABBITMQ_NODENAME={}", a.node_name()),
        a.epmd_port(),
    );
    let pid = a.beam_pid().unwrap();
    assert!(!processes_with(&node).is_empty(), "the node runs");
    drop(a);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "beam {pid} gone"
    );
    assert_eq!(processes_with(&node), Vec::<String>::new());
    // epmd's command line does not name its port: ask for it by port.
    let epmd_alive = std::net::TcpStream::connect(("127.0.0.1", epmd)).is_ok();
    assert!(!epmd_alive, "epmd on {epmd} was killed");
    // The other node is untouched.
    assert!(b.queues().is_empty());
}

#[test]
fn the_tls_listener_requires_a_client_certificate_and_accepts_one() {
    let pki = TestPki::new();
    let mq = RabbitMq::start_tls(&pki);
    let client = pki.client("fm-test");
    mq.add_cert_user("fm-test");
    fm::declare_queue(&mq.amqp_url(), "tls-in", &["#"]);
    let sent = fm::publish(
        &mq.amqps_url(),
        Kind::Koji,
        &PublishOpts {
            tls: Some((pki.ca(), client.cert.clone(), client.key.clone())),
            ..Default::default()
        },
    );
    assert_eq!(sent.len(), 1);
    assert_eq!(mq.queue_messages("tls-in"), (1, 0));
    // The server's certificate verifies against the test CA (a bare
    // handshake, no client certificate offered)...
    let out = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", mq.tls_port().unwrap()))
        .arg("-CAfile")
        .arg(pki.ca())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Verify return code: 0"),
        "server cert verified: {text}"
    );
    // ...and a handshake with a client certificate completes.
    let out = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", mq.tls_port().unwrap()))
        .arg("-CAfile")
        .arg(pki.ca())
        .arg("-cert")
        .arg(&client.cert)
        .arg("-key")
        .arg(&client.key)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A koji-build.test.complete body per the ci-messages schemas (0.2.5).
fn ci_complete_body() -> serde_json::Value {
    serde_json::json!({
        "contact": {"name": "Warden", "team": "warden", "docs": "https://example.org/docs",
                    "email": "warden@example.org"},
        "run": {"url": "https://warden.example.org/jobs/j1", "log": "https://warden.example.org/jobs/j1/log"},
        "artifact": {"type": "koji-build", "id": 1478312, "issuer": "spot",
                     "component": "chromium", "nvr": "chromium-80.0.3987.132-1.fc33",
                     "scratch": false},
        "pipeline": {"id": "j1", "name": "warden"},
        "test": {"category": "functional", "namespace": "warden", "type": "smoke",
                 "result": "passed"},
        "system": [],
        "generated_at": "2026-01-01T00:00:00Z",
        "version": "0.2.5"
    })
}

#[tokio::test]
async fn the_ci_consumer_validates_what_it_receives() {
    let mq = RabbitMq::start();
    let consumer = CiConsumer::start(&mq.amqp_url(), "ci-out", "org.fedoraproject.prod.ci.#");
    let topic = "org.fedoraproject.prod.ci.koji-build.test.complete";
    let good = ci_complete_body();
    let mut bad = ci_complete_body();
    bad["test"]["result"] = "green".into();
    bad.as_object_mut().unwrap().remove("run");
    fm::publish_raw_with_id(
        &mq.amqp_url(),
        topic,
        good.to_string().as_bytes(),
        Some("ci-good"),
    );
    fm::publish_raw_with_id(
        &mq.amqp_url(),
        topic,
        bad.to_string().as_bytes(),
        Some("ci-bad"),
    );
    let got = eventually(Duration::from_secs(30), "two CI messages", || {
        let m = consumer.messages();
        async move { (m.len() >= 2).then_some(m) }
    })
    .await;
    eprintln!("{}", serde_json::to_string_pretty(&got).unwrap());
    let by_id = |id: &str| got.iter().find(|m| m["id"] == id).unwrap().clone();
    let g = by_id("ci-good");
    assert_eq!(g["valid"], true, "{g}");
    assert_eq!(g["schema"], "koji-build.test.complete.json");
    assert_eq!(g["topic"], topic);
    let b = by_id("ci-bad");
    assert_eq!(b["valid"], false, "{b}");
    assert!(b["errors"].as_array().unwrap().len() >= 2, "{b}");
    // A field whose schema is not in the spec's files: invalid, no crash.
    let mut with_system = ci_complete_body();
    with_system["system"] =
        serde_json::json!([{"os": "fedora-33", "provider": "warden", "architecture": "x86_64"}]);
    fm::publish_raw_with_id(
        &mq.amqp_url(),
        topic,
        with_system.to_string().as_bytes(),
        Some("ci-system"),
    );
    let s = eventually(Duration::from_secs(30), "the third CI message", || {
        let m = consumer.messages();
        async move { m.into_iter().find(|m| m["id"] == "ci-system") }
    })
    .await;
    assert_eq!(s["valid"], false, "{s}");
    assert!(
        s["errors"][0].as_str().unwrap().contains("unresolvable"),
        "{s}"
    );
}
