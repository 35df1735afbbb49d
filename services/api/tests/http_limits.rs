//! The HTTP edge: a client that trickles its request head or its body is
//! cut off within the configured timeouts, and the API refuses to serve
//! writes beyond loopback without a token (docs/security.md "HTTP").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warden_shared::{Config, JobState};
use warden_testsupport::NatsServer;

const SHORT: &str = "header_timeout = \"500ms\"\nbody_timeout = \"500ms\"\n";

fn host_port(api: &Api) -> String {
    api.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `bound` passes):
/// what it sent, and whether it closed.
async fn read_to_close(stream: &mut TcpStream, bound: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn refusals(text: &str, reason: &str) -> f64 {
    let series = format!("warden_api_http_refusals_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn half_a_request_head_is_cut_off_at_the_header_timeout() {
    let api = Api::start_with_http(NatsServer::start(), None, None, SHORT).await;
    let mut stream = TcpStream::connect(host_port(&api)).await.unwrap();
    let t0 = Instant::now();
    stream
        .write_all(b"GET /api/v1/jobs HTTP/1.1\r\nHost: warden\r\nX-Slow: ")
        .await
        .unwrap();
    let (_, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "the connection is still open after 5 s");
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "closed before the timeout: {:?}",
        t0.elapsed()
    );
    let text = reqwest::get(api.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(refusals(&text, "header_timeout") >= 1.0, "{text}");
    // A whole request on a fresh connection is still served.
    assert!(reqwest::get(api.url("/api/v1/jobs"))
        .await
        .unwrap()
        .status()
        .is_success());
}

#[tokio::test]
async fn a_trickled_body_is_refused_at_the_body_timeout() {
    let api = Api::start_with_http(NatsServer::start(), None, None, SHORT).await;
    let mut stream = TcpStream::connect(host_port(&api)).await.unwrap();
    let t0 = Instant::now();
    stream
        .write_all(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: warden\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"task\":",
        )
        .await
        .unwrap();
    let (answer, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "the connection is still open after 5 s: {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("invalid_body"), "{answer:?}");
    assert!(answer.contains("http.body_timeout"), "{answer:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    let text = reqwest::get(api.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(refusals(&text, "body_timeout") >= 1.0, "{text}");
}

#[tokio::test]
async fn no_token_beyond_loopback_is_refused_before_serving() {
    let nats = NatsServer::start();
    let toml = format!(
        "[nats]\nurl = {:?}\n[http]\nlisten = \"0.0.0.0:0\"\n",
        nats.url()
    );
    let config = Arc::new(Config::from_parts(Some(&toml), Vec::new()).expect("valid config"));
    assert_eq!(config.http_serving_problems().len(), 1);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = warden_api::serve(config, listener, CancellationToken::new())
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        matches!(err, warden_api::ApiError::Exposed(_)) && text.contains("WARDEN_HTTP_TOKEN"),
        "{text}"
    );
}

#[tokio::test]
async fn reads_without_the_token_show_no_session_names_or_argument_values() {
    let api = Api::start_with_token(Some("s3cret")).await;
    let store = api.store().await;
    let (mut job, _) = api.put_job(JobState::Running, 1).await;
    // A job with an argument and a history entry by the session.
    job.args.insert("nvr".into(), "private-pkg-1.0".into());
    let mut by_session = job.history[0].clone();
    by_session.actor = "session-1".into();
    job.history.push(by_session);
    let v = store.get(&job.id).await.unwrap().unwrap();
    store.update(&job, v.revision).await.unwrap();

    let url = api.url(&format!("/api/v1/jobs/{}", job.id));
    let open = api.http.get(&url).send().await.unwrap();
    assert!(open.status().is_success());
    let open = open.text().await.unwrap();
    for secret in ["session-1", "private-pkg-1.0"] {
        assert!(!open.contains(secret), "{secret} in {open}");
    }
    assert!(
        open.contains("[redacted]") && open.contains("bot-c"),
        "{open}"
    );
    let wrong = api
        .http
        .get(&url)
        .bearer_auth("guess")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!wrong.contains("session-1"), "{wrong}");
    let whole = api
        .http
        .get(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        whole.contains("session-1") && whole.contains("private-pkg-1.0"),
        "{whole}"
    );
}
