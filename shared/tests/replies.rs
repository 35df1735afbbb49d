//! Replies against a real nats-server with the shipped permissions
//! (`deploy/nats/cluster/accounts.conf`, two bots): every client's replies
//! arrive below its own identity's inbox prefix, and nobody else may
//! subscribe there. A bot and another role's user that subscribe to
//! `_INBOX.>`, to a role's or to another bot's prefix are refused and
//! receive nothing, while the victims' requests, JetStream publishes, KV
//! reads and watches, pull fetches and service-API requests are answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use warden_shared::{runtime, subjects, Config};
use warden_testsupport::{accounts_conf_with_bots, eventually, never_within, NatsServer};

fn config(url: &str, login: &str) -> Config {
    Config::from_parts(
        Some(&format!("[nats]\nurl = \"{url}\"\n{login}")),
        Vec::new(),
    )
    .expect("config")
}

fn user(url: &str, user: &str, password: &str) -> Config {
    config(
        url,
        &format!("user = \"{user}\"\npassword = \"{password}\""),
    )
}

/// An attacker's raw connection (the library's default inbox prefix), and
/// the errors the server sent it.
async fn attacker(
    url: &str,
    opts: async_nats::ConnectOptions,
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let client = opts
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .expect("attacker connects");
    (client, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_one_reads_another_clients_replies() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, bots) = accounts_conf_with_bots(dir.path(), &["victim", "attacker"]);
    let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let url = nats.url();
    let (victim_bot, attacker_bot) = (&bots[0], &bots[1]);

    // The services' side: the topology, a stand-in responder for a read
    // API and a bot's session create, and a service API.
    let service_config = user(&url, "warden-service", "service-pw");
    let (service, handles) = runtime::Connect::new(&service_config, "test")
        .topology_forever()
        .await
        .expect("service connects");
    let mut answers = service
        .subscribe(subjects::API_STATS)
        .await
        .expect("subscribe");
    let mut creates = service
        .subscribe(subjects::session_create_subject("victim"))
        .await
        .expect("subscribe");
    let responder = service.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                Some(m) = answers.next() => m,
                Some(m) = creates.next() => m,
                else => break,
            };
            if let Some(reply) = msg.reply {
                let secret = format!("secret answer to {}", msg.subject);
                responder.publish(reply, secret.into()).await.unwrap();
            }
        }
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _api = runtime::start_service_api(
        &service,
        "test",
        "warden-replies-test",
        "a service API",
        "1.0.0",
        &shutdown,
    )
    .await
    .expect("service API")
    .expect("not stopped");

    // The attackers: a bot and another role's user, each subscribing to
    // every inbox but its own.
    let seed = std::fs::read_to_string(&attacker_bot.nkey_file).unwrap();
    let (bot_spy, bot_errors) = attacker(&url, async_nats::ConnectOptions::with_nkey(seed)).await;
    let (role_spy, role_errors) = attacker(
        &url,
        async_nats::ConnectOptions::with_user_and_password(
            "warden-executor".into(),
            "executor-pw".into(),
        ),
    )
    .await;
    let victim_prefix = subjects::bot_inbox_prefix("victim");
    let targets = [
        "_INBOX.>".to_string(),
        "_INBOX.*.>".to_string(),
        "_INBOX.warden-readonly.>".to_string(),
        "_INBOX.warden-service.>".to_string(),
        "_INBOX.warden-publisher.>".to_string(),
        "_INBOX.bot.>".to_string(),
        format!("{victim_prefix}.>"),
    ];
    let overheard = Arc::new(AtomicUsize::new(0));
    for spy in [&bot_spy, &role_spy] {
        for subject in &targets {
            let mut sub = spy.subscribe(subject.clone()).await.expect("subscribe");
            let overheard = overheard.clone();
            tokio::spawn(async move {
                while sub.next().await.is_some() {
                    overheard.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        spy.flush().await.expect("flush");
    }
    for (who, errors) in [("bot", &bot_errors), ("executor", &role_errors)] {
        eventually(
            Duration::from_secs(5),
            &format!("the {who}'s subscriptions refused"),
            || async {
                let errors = errors.lock().unwrap();
                targets
                    .iter()
                    .all(|t| {
                        errors
                            .iter()
                            .any(|e| e.contains("Permissions Violation") && e.contains(t.as_str()))
                    })
                    .then_some(())
            },
        )
        .await;
    }

    // The victims, connected the one way Warden connects.
    let readonly_config = user(&url, "warden-readonly", "readonly-pw");
    let readonly = runtime::Connect::new(&readonly_config, "test")
        .client()
        .await
        .expect("read-only connects");
    let answer = readonly
        .request(subjects::API_STATS, "".into())
        .await
        .expect("the read-only user's request is answered");
    assert_eq!(&answer.payload[..], b"secret answer to warden.api.stats");
    let ping = readonly
        .request("$SRV.PING.warden-replies-test", "".into())
        .await
        .expect("service discovery answers the read-only user");
    assert!(!ping.payload.is_empty());
    // KV reads and watches (an ordered consumer delivering to its inbox).
    let ro_js = async_nats::jetstream::new(readonly.clone());
    let resources = ro_js
        .get_key_value(subjects::RESOURCES_BUCKET)
        .await
        .expect("the read-only user opens the resources bucket");
    let mut watch = resources.watch_all().await.expect("watch");
    handles
        .resources
        .put("r1", "secret resource".into())
        .await
        .expect("put");
    let seen = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch delivers")
        .expect("an entry")
        .expect("no error");
    assert_eq!(seen.key, "r1");
    assert_eq!(
        resources.get("r1").await.expect("direct get").as_deref(),
        Some(&b"secret resource"[..])
    );

    let bot_config = config(
        &url,
        &format!("nkey_file = \"{}\"", victim_bot.nkey_file.display()),
    );
    let bot = runtime::Connect::new(&bot_config, "test")
        .bot("victim")
        .client()
        .await
        .expect("the victim bot connects");
    let created = bot
        .request(subjects::session_create_subject("victim"), "{}".into())
        .await
        .expect("the bot's request is answered");
    assert!(created.payload.starts_with(b"secret answer"));
    // A report's JetStream ack arrives on the bot's own inbox.
    let job = uuid::Uuid::new_v4();
    async_nats::jetstream::new(bot.clone())
        .publish(subjects::bot_report_subject("victim", &job), "r".into())
        .await
        .expect("publish")
        .await
        .expect("the stream acknowledges the bot's report");
    // The services' pull consumer fetches it through their inbox.
    let reports = handles
        .js
        .get_stream(subjects::REPORTS_STREAM)
        .await
        .expect("stream");
    let consumer = reports
        .get_or_create_consumer("replies-test", subjects::scheduler_reports_consumer())
        .await
        .expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("fetch");
    let got = batch.next().await.expect("a report").expect("no error");
    got.ack().await.expect("ack");

    let publisher_config = user(&url, "warden-publisher", "publisher-pw");
    let publisher = runtime::Connect::new(&publisher_config, "test")
        .client()
        .await
        .expect("the publisher connects");
    async_nats::jetstream::new(publisher)
        .publish("warden.events.replies-test", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("the stream acknowledges the publisher's event");

    never_within(Duration::from_millis(500), "a reply overheard", || async {
        let n = overheard.load(Ordering::SeqCst);
        (n > 0).then_some(n)
    })
    .await;
    shutdown.cancel();
}

#[test]
fn each_login_has_its_own_prefix() {
    let url = "nats://127.0.0.1:1";
    let c = user(url, "warden-readonly", "pw");
    assert_eq!(
        runtime::Connect::new(&c, "t").reply_prefix(),
        "_INBOX.warden-readonly"
    );
    assert_eq!(
        runtime::Connect::new(&c, "t").bot("b").reply_prefix(),
        "_INBOX.warden-readonly",
        "a user login's permissions are its role's"
    );
    let bot = config(url, "nkey_file = \"/x.nk\"");
    assert_eq!(
        runtime::Connect::new(&bot, "t").bot("b").reply_prefix(),
        format!("_INBOX.bot.{}", subjects::bot_token("b"))
    );
    let open = config(url, "");
    assert_eq!(runtime::Connect::new(&open, "t").reply_prefix(), "_INBOX");
    let set = config(
        url,
        "inbox_prefix = \"_INBOX.mine\"\nuser = \"u\"\npassword = \"p\"",
    );
    assert_eq!(
        runtime::Connect::new(&set, "t").reply_prefix(),
        "_INBOX.mine"
    );
}
