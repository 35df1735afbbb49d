//! The browser kit against a real headless Chromium: a page served from a
//! loopback listener here, a click that changes it, a screenshot, and the
//! page's console log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warden_testsupport::browser::Browser;

/// A page whose button replaces the status text when clicked.
const BUTTON_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>kit</title></head>
<body>
<p id="status">waiting</p>
<button id="go" onclick="document.getElementById('status').textContent = 'clicked ' + 6 * 7">go</button>
</body></html>"#;

/// A page that logs an error to the console as it loads.
const ERROR_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>boom</title></head>
<body><p id="done">loaded</p><script>console.error("boom")</script></body></html>"#;

/// Serves `page` to every request on a loopback port; returns its URL.
async fn serve(page: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback listener");
    let addr = listener.local_addr().expect("the listener's address");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Read the request head; its content does not matter.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    format!("http://{addr}/")
}

#[tokio::test]
async fn click_changes_the_page_and_a_screenshot_is_a_png() {
    let url = serve(BUTTON_PAGE).await;
    let browser = Browser::start().await;
    browser.goto(&url).await;
    assert_eq!(browser.wait_text("#status", "waiting").await, "waiting");
    browser
        .wait_for("#go")
        .await
        .click()
        .await
        .expect("click the button");
    assert_eq!(browser.wait_text("#status", "clicked").await, "clicked 42");

    browser.set_size(800, 600).await;
    let width = browser
        .client()
        .execute("return window.innerWidth", vec![])
        .await
        .expect("read the viewport's width");
    assert_eq!(width, 800);

    let path = browser.screenshot("testsupport-browser-kit").await;
    assert!(path.ends_with("console-screenshots/testsupport-browser-kit.png"));
    let png = std::fs::read(&path).expect("read the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        path.display()
    );
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    browser.close().await;
}

#[tokio::test]
async fn console_error_shows_in_console_errors() {
    let url = serve(ERROR_PAGE).await;
    let browser = Browser::start().await;
    browser.goto(&url).await;
    browser.wait_for("#done").await;
    let errors = browser.console_errors().await;
    assert!(
        errors.len() == 1
            && errors[0].starts_with("SEVERE console-api: ")
            && errors[0].contains("\"boom\""),
        "{errors:?}"
    );
    browser.close().await;
}
