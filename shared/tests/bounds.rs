//! The streams' and buckets' bounds against a real nats-server with the
//! shipped permissions (and the deploy's 8 MB max_payload): an oversized
//! event from the publisher user is refused and nothing is stored; a work
//! queue at its max_bytes refuses the next report and keeps every one it
//! accepted; streams and buckets made without bounds get them on the next
//! start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream::{self, stream};
use warden_shared::{runtime, subjects, Config};
use warden_testsupport::{accounts_conf_with_bots, NatsServer, TestBot};

/// A server like deploy/nats/cluster's: the shipped users and an 8 MB
/// max_payload.
fn server(dir: &std::path::Path, bots: &[&str]) -> (NatsServer, Vec<TestBot>) {
    let (_, bots) = accounts_conf_with_bots(dir, bots);
    let conf = dir.join("server.conf");
    std::fs::write(&conf, "max_payload: 8MB\ninclude \"accounts.conf\"\n").unwrap();
    (
        NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]),
        bots,
    )
}

fn config(url: &str, login: &str, extra: &str) -> Config {
    Config::from_parts(
        Some(&format!("[nats]\nurl = \"{url}\"\n{login}\n{extra}")),
        Vec::new(),
    )
    .expect("config")
}

const SERVICE: &str = "user = \"warden-service\"\npassword = \"service-pw\"";

async fn messages(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (nats, _) = server(dir.path(), &[]);
    let services = config(&nats.url(), SERVICE, "");
    let (_c, handles) = runtime::Connect::new(&services, "test")
        .topology_forever()
        .await
        .expect("topology");
    let publisher = config(
        &nats.url(),
        "user = \"warden-publisher\"\npassword = \"publisher-pw\"",
        "",
    );
    let client = runtime::Connect::new(&publisher, "test")
        .client()
        .await
        .expect("publisher");
    let js = jetstream::new(client);
    let big = vec![b'x'; 7 * 1024 * 1024];
    let refused = match js.publish("warden.events.big", big.into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a 7 MiB event must be refused");
    assert_eq!(messages(&handles.js, subjects::EVENTS_STREAM).await, 0);
    // The publisher still publishes events of a sane size.
    js.publish("warden.events.small", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    assert_eq!(messages(&handles.js, subjects::EVENTS_STREAM).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_work_queue_refuses_the_next_report_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (nats, bots) = server(dir.path(), &["bot-a"]);
    let small = "[storage]\nreports_max_bytes = 1048576";
    let services = config(&nats.url(), SERVICE, small);
    let (_c, handles) = runtime::Connect::new(&services, "test")
        .topology_forever()
        .await
        .expect("topology");
    let bot = config(
        &nats.url(),
        &format!("nkey_file = \"{}\"", bots[0].nkey_file.display()),
        small,
    );
    let client = runtime::Connect::new(&bot, "test")
        .bot("bot-a")
        .client()
        .await
        .expect("bot");
    let js = jetstream::new(client);
    let report = vec![b'r'; 200 * 1024];
    let mut accepted = Vec::new();
    let mut refused = false;
    for _ in 0..20 {
        let job = uuid::Uuid::new_v4();
        let stored = match js
            .publish(
                subjects::bot_report_subject("bot-a", &job),
                report.clone().into(),
            )
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if !stored {
            refused = true;
            break;
        }
        accepted.push(job);
    }
    assert!(refused, "a full reports stream refuses");
    assert!(!accepted.is_empty());
    let mut stream = handles
        .js
        .get_stream(subjects::REPORTS_STREAM)
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        accepted.len() as u64,
        "every report it acknowledged is still there"
    );
    let first = stream.get_raw_message(1).await.expect("the first report");
    assert_eq!(
        first.subject.as_str(),
        subjects::bot_report_subject("bot-a", &accepted[0])
    );
    // A report larger than its bound is refused too.
    let job = uuid::Uuid::new_v4();
    let huge = vec![b'r'; 300 * 1024];
    assert!(match js
        .publish(subjects::bot_report_subject("bot-a", &job), huge.into())
        .await
    {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_buckets_without_bounds_get_them_on_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (nats, _) = server(dir.path(), &[]);
    let services = config(&nats.url(), SERVICE, "");
    let topo = services.topology();
    let client = runtime::Connect::new(&services, "test")
        .client()
        .await
        .expect("connect");
    let js = jetstream::new(client);
    // As an older Warden made them: no bounds, DiscardOld.
    let unbounded = |mut c: stream::Config| {
        c.max_bytes = -1;
        c.max_message_size = -1;
        c.discard = stream::DiscardPolicy::Old;
        c
    };
    for c in [
        topo.events_stream(),
        topo.deadletter_stream(),
        topo.reports_stream(),
        topo.notify_stream(),
    ] {
        js.create_stream(unbounded(c)).await.expect("old stream");
    }
    for mut b in [
        topo.jobs_bucket(),
        topo.sessions_bucket(),
        topo.resources_bucket(),
    ] {
        b.max_bytes = -1;
        b.max_value_size = -1;
        js.create_key_value(b).await.expect("old bucket");
    }
    js.publish("warden.events.kept", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    subjects::ensure(&js, &topo).await.expect("ensure");

    for want in [
        topo.events_stream(),
        topo.deadletter_stream(),
        topo.reports_stream(),
        topo.notify_stream(),
    ] {
        let got = js
            .get_stream(&want.name)
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        assert_eq!(got.max_bytes, want.max_bytes, "{}", want.name);
        assert!(got.max_bytes > 0);
        assert_eq!(got.max_message_size, want.max_message_size, "{}", want.name);
        assert_eq!(got.discard, want.discard, "{}", want.name);
    }
    for (bucket, max_bytes, max_value) in [
        (topo.jobs_bucket(), topo.jobs_max_bytes, topo.max_job_bytes),
        (
            topo.sessions_bucket(),
            topo.sessions.max_bytes,
            topo.sessions.max_msg,
        ),
        (
            topo.resources_bucket(),
            topo.resources.max_bytes,
            topo.resources.max_msg,
        ),
    ] {
        let got = js
            .get_stream(format!("KV_{}", bucket.bucket))
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        assert_eq!(got.max_bytes, max_bytes, "{}", bucket.bucket);
        assert_eq!(got.max_message_size, max_value, "{}", bucket.bucket);
    }
    assert_eq!(
        messages(&js, subjects::EVENTS_STREAM).await,
        1,
        "what the stream held is kept"
    );
}
