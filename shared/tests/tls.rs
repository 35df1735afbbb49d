//! TLS against a real nats-server with certificates made at test time:
//! the `nats.tls_*` keys through `runtime::Connect`, a plain client and a
//! client without a certificate refused, and the shipped three-node
//! cluster config (TLS with `verify`, per-role users) running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warden_shared::runtime::{Connect, ConnectError};
use warden_shared::Config;
use warden_testsupport::{accounts_conf, plain_client_answer, Cluster, NatsServer, TestPki};

/// A server with the shipped per-role users and `pki`'s TLS block.
fn tls_server(pki: &TestPki, verify: bool) -> (NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    accounts_conf(dir.path());
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "{}include \"accounts.conf\"\n",
            pki.server_tls_block(verify)
        ),
    )
    .unwrap();
    let server = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    (server, dir)
}

fn config(url: &str, role: &str, tls: &str) -> Config {
    let text =
        format!("[nats]\nurl = {url:?}\nuser = \"warden-{role}\"\npassword = \"{role}-pw\"\n{tls}");
    Config::from_parts(Some(&text), []).expect("valid config")
}

async fn connect(config: &Config) -> Result<async_nats::Client, ConnectError> {
    Connect::new(config, "test")
        .short_lived(Duration::from_secs(5), 0)
        .client()
        .await
}

#[tokio::test]
async fn a_client_with_the_tls_keys_connects_and_one_without_is_refused() {
    let pki = TestPki::new();
    let (server, _dir) = tls_server(&pki, true);
    let client_cert = pki.client("warden-service");

    let c = config(&server.url(), "service", &pki.client_toml(&client_cert));
    let client = connect(&c).await.expect("connects over TLS");
    client.flush().await.expect("talks");
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );

    // The server's certificate is not trusted without nats.tls_ca_file.
    let no_ca = config(&server.url(), "service", "");
    assert!(
        connect(&no_ca).await.is_err(),
        "untrusted server certificate"
    );

    // Trusting the server but presenting no certificate: verify refuses.
    let ca_only = format!("tls_ca_file = {:?}\n", pki.ca().display().to_string());
    let c = config(&server.url(), "service", &ca_only);
    assert!(
        connect(&c).await.is_err(),
        "a client without a certificate is refused when the server verifies"
    );

    // A certificate from another CA is refused too.
    let other = TestPki::new();
    let foreign = other.client("intruder");
    let mixed = format!(
        "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.ca().display().to_string(),
        foreign.cert.display().to_string(),
        foreign.key.display().to_string()
    );
    assert!(connect(&config(&server.url(), "service", &mixed))
        .await
        .is_err());

    // No TLS at all: never a PONG.
    let said = plain_client_answer(server.port());
    assert!(
        said.contains("tls_required"),
        "the server asks for TLS: {said}"
    );
    assert!(!said.contains("PONG"), "a plain client is refused: {said}");
}

#[tokio::test]
async fn a_missing_tls_file_is_an_error_naming_it() {
    let pki = TestPki::new();
    let (server, dir) = tls_server(&pki, true);
    let missing = dir.path().join("no-such-client.pem");
    let tls = format!(
        "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.ca().display().to_string(),
        missing.display().to_string(),
        pki.server().key.display().to_string()
    );
    match connect(&config(&server.url(), "service", &tls)).await {
        Err(e @ ConnectError::TlsFile { key, .. }) => {
            assert_eq!(key, "nats.tls_cert_file");
            assert!(e.to_string().contains("no-such-client.pem"), "{e}");
        }
        other => panic!("expected a TlsFile error, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn tls_required_refuses_a_server_without_tls() {
    let server = NatsServer::start();
    let text = format!("[nats]\nurl = {:?}\ntls_required = true\n", server.url());
    let c = Config::from_parts(Some(&text), []).unwrap();
    assert!(connect(&c).await.is_err(), "no TLS offered: refused");
    let text = format!("[nats]\nurl = {:?}\n", server.url());
    let c = Config::from_parts(Some(&text), []).unwrap();
    connect(&c)
        .await
        .expect("without tls_required a plain server is fine");
}

#[tokio::test]
async fn the_shipped_cluster_config_runs_with_tls_and_a_warden_client_connects() {
    let pki = TestPki::new();
    let cluster = Cluster::start_shipped(&pki);
    let client_cert = pki.client("warden-service");
    let mut c = config(&cluster.url(), "service", &pki.client_toml(&client_cert));
    c.nats.replicas = 3;
    let (client, _handles) = tokio::time::timeout(
        Duration::from_secs(60),
        Connect::new(&c, "test").topology_forever(),
    )
    .await
    .expect("streams and buckets within 60 s")
    .expect("connects over TLS and creates the topology with 3 replicas");
    client.flush().await.unwrap();

    for i in 0..3 {
        let port: u16 = cluster
            .node_url(i)
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap();
        let said = plain_client_answer(port);
        assert!(
            !said.contains("PONG"),
            "node {i} refuses a plain client: {said}"
        );
    }
    let ca_only = format!("tls_ca_file = {:?}\n", pki.ca().display().to_string());
    assert!(
        connect(&config(&cluster.node_url(0), "service", &ca_only))
            .await
            .is_err(),
        "the shipped config verifies client certificates"
    );
}
