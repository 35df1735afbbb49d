//! A real headless Chromium for tests, driven through ChromeDriver with
//! [`fantoccini`]: never a mock, never ChromeDriver's default port.
//!
//! [`Browser::start`] runs `chromedriver --port=N` on a free loopback port
//! ([`crate::free_port`]) in its own process group, with its log in a
//! temporary directory, waits for its `/status` to say ready and opens a
//! headless Chromium session (window 1280x900) whose profile is another
//! temporary directory. Dropping the [`Browser`], also while a test panics,
//! SIGKILLs the whole process group: ChromeDriver and every Chromium
//! process it started.
//!
//! The binaries are `$WARDEN_CHROMEDRIVER` and `$WARDEN_CHROMIUM` (set by
//! `scripts/ensure-tools`, which installs Debian's `chromium-driver` and
//! `chromium`); default `/usr/bin/chromedriver` and `/usr/bin/chromium`.
//!
//! Chromium runs with background networking, component updates, sync and
//! QUIC off, so it makes no connection of its own: only the pages a test
//! opens (on loopback) are fetched.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::free_port;

/// How long ChromeDriver may take to answer `/status` with ready.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Chromium may take to start and open the session (a loaded
/// 2-core machine needs a few seconds).
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Browser::wait_for`] and [`Browser::wait_text`] poll.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(20);
/// The polling interval of the bounded waits.
const POLL: Duration = Duration::from_millis(100);
/// The window size a session starts with.
const WINDOW: (u32, u32) = (1280, 900);

/// `$WARDEN_CHROMIUM`, else `/usr/bin/chromium`.
pub fn chromium_bin() -> PathBuf {
    std::env::var_os("WARDEN_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// `$WARDEN_CHROMEDRIVER`, else `/usr/bin/chromedriver`.
pub fn chromedriver_bin() -> PathBuf {
    std::env::var_os("WARDEN_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

/// The workspace's cargo target directory: the nearest ancestor of the
/// running executable that holds cargo's `CACHEDIR.TAG` (test binaries are
/// `<target>/debug/deps/<name>-<hash>`, or `<target>/<triple>/debug/deps/…`
/// with `--target`), which is right whoever built it, whatever the current
/// directory; else `$CARGO_TARGET_DIR` if it is absolute; else the
/// workspace's `target/` (beside this crate's directory).
pub fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
        {
            return dir.to_path_buf();
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// Where [`Browser::screenshot`] writes: `<target>/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    target_dir().join("console-screenshots")
}

/// A headless Chromium session and the ChromeDriver serving it.
///
/// Dropping it (also while a test panics) kills ChromeDriver's whole
/// process group, Chromium with it.
pub struct Browser {
    client: Client,
    driver: Driver,
}

/// A running ChromeDriver and its temporary directory. Dropping it kills
/// ChromeDriver's process group, so a panic in [`Browser::start`] leaves
/// nothing running either.
struct Driver {
    /// Leader of its own process group (the Chromium it starts is in it);
    /// `None` once killed.
    child: Option<Child>,
    /// ChromeDriver's log (`--log-path`) and Chromium's profile.
    dir: tempfile::TempDir,
}

/// A POST to a session endpoint WebDriver does not standardise
/// (ChromeDriver's `se/log` and `goog/cdp/execute`).
#[derive(Debug)]
struct SessionPost {
    /// Below `session/<id>/`.
    path: &'static str,
    body: Value,
}

impl WebDriverCompatibleCommand for SessionPost {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        let id = session_id.expect("a WebDriver session is open");
        base_url.join(&format!("session/{id}/{}", self.path))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(self.body.to_string()))
    }
}

impl Browser {
    /// Starts ChromeDriver on a free loopback port, waits (bounded) for
    /// its `/status` to be ready and opens a headless Chromium session
    /// with a 1280x900 window. Panics, with ChromeDriver's log, if either
    /// does not happen in time.
    pub async fn start() -> Browser {
        let driver_bin = chromedriver_bin();
        let chromium = chromium_bin();
        for bin in [&driver_bin, &chromium] {
            assert!(
                bin.exists(),
                "{} does not exist: run `. scripts/ensure-tools`",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("warden-browser-")
            .tempdir()
            .expect("create the browser's temporary directory");
        let profile = dir.path().join("profile");
        std::fs::create_dir(&profile).expect("create Chromium's profile directory");
        let log = dir.path().join("chromedriver.log");
        let port = free_port();
        let child = {
            use std::os::unix::process::CommandExt as _;
            Command::new(&driver_bin)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver_bin.display()))
        };
        let mut driver = Driver {
            child: Some(child),
            dir,
        };
        let url = format!("http://127.0.0.1:{port}/");
        wait_ready(port, &mut driver).await;

        let (w, h) = WINDOW;
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-extensions",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--window-size={w},{h}"),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let session = tokio::time::timeout(
            SESSION_TIMEOUT,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url),
        )
        .await;
        let client = match session {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!(
                "ChromeDriver on {url} opened no Chromium session: {e}\n{}",
                driver.log()
            ),
            Err(_) => panic!(
                "ChromeDriver on {url} opened no Chromium session within {SESSION_TIMEOUT:?}\n{}",
                driver.log()
            ),
        };
        Browser { client, driver }
    }

    /// The WebDriver client, for anything this kit does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Sets the window's outer size. In headless Chromium the viewport
    /// (`window.innerWidth` x `innerHeight`) is as wide, but less high by
    /// the size of the browser's frame.
    pub async fn set_size(&self, w: u32, h: u32) {
        self.client
            .set_window_size(w, h)
            .await
            .unwrap_or_else(|e| panic!("set the window size to {w}x{h}: {e}"));
    }

    /// A PNG of the whole page (beyond the viewport too, through CDP's
    /// `Page.captureScreenshot` with `captureBeyondViewport`), written to
    /// `<target>/console-screenshots/<name>.png` ([`screenshot_dir`]);
    /// returns its path. `name` is a file name without extension.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        assert!(
            !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..",
            "screenshot name {name:?} is not a plain file name"
        );
        let metrics = self
            .cdp("Page.getLayoutMetrics", json!({}))
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: read the page's size: {e}"));
        let size = &metrics["cssContentSize"];
        let (w, h) = (size["width"].as_f64(), size["height"].as_f64());
        let (Some(w), Some(h)) = (w, h) else {
            panic!("screenshot {name}: no cssContentSize in {metrics}");
        };
        let shot = self
            .cdp(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": w, "height": h, "scale": 1 },
                }),
            )
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: capture: {e}"));
        let Some(data) = shot["data"].as_str() else {
            panic!("screenshot {name}: no data in CDP's answer");
        };
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|e| panic!("screenshot {name}: CDP's data is not base64: {e}"));
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// The errors and warnings (levels SEVERE and WARNING) in the page's
    /// browser log since the last call (ChromeDriver hands each entry out
    /// once): `console.error`/`console.warn` calls, uncaught exceptions,
    /// failed loads. Each is `"<LEVEL> <source>: <message>"`, e.g.
    /// `SEVERE console-api: http://127.0.0.1:4000/ 0:16 "boom"`.
    pub async fn console_errors(&self) -> Vec<String> {
        let entries = self
            .client
            .issue_cmd(SessionPost {
                path: "se/log",
                body: json!({ "type": "browser" }),
            })
            .await
            .unwrap_or_else(|e| panic!("read the browser log: {e}"));
        let Value::Array(entries) = entries else {
            panic!("the browser log is not a list: {entries}");
        };
        entries
            .iter()
            .filter_map(|e| {
                let level = e["level"].as_str().unwrap_or("");
                matches!(level, "SEVERE" | "WARNING").then(|| {
                    format!(
                        "{level} {}: {}",
                        e["source"].as_str().unwrap_or("?"),
                        e["message"].as_str().unwrap_or("")
                    )
                })
            })
            .collect()
    }

    /// The first element matching `css`, waiting up to [`WAIT_TIMEOUT`]
    /// for one to appear.
    pub async fn wait_for(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(WAIT_TIMEOUT)
            .every(POLL)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => panic!(
                "no element matches {css:?} on {} within {WAIT_TIMEOUT:?}: {e}",
                self.current_url().await
            ),
        }
    }

    /// Clicks the first element matching `css`, once [`Browser::wait_for`]
    /// finds it.
    pub async fn click(&self, css: &str) {
        let element = self.wait_for(css).await;
        if let Err(e) = element.click().await {
            panic!("cannot click {css:?} on {}: {e}", self.current_url().await);
        }
    }

    /// Waits up to [`WAIT_TIMEOUT`] until the first element matching `css`
    /// has a text containing `contains` (a live update); returns that
    /// text. Looks the element up again each time, so a re-rendered one
    /// is found too.
    pub async fn wait_text(&self, css: &str, contains: &str) -> String {
        let start = Instant::now();
        let mut last: Option<String> = None;
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(element) => match element.text().await {
                    Ok(text) if text.contains(contains) => return text,
                    Ok(text) => last = Some(text),
                    Err(e) if is_gone(&e) => {}
                    Err(e) => panic!("read the text of {css:?}: {e}"),
                },
                Err(e) if is_gone(&e) => {}
                Err(e) => panic!("look for {css:?}: {e}"),
            }
            if start.elapsed() >= WAIT_TIMEOUT {
                let seen = match last {
                    Some(text) => format!("its text was {text:?}"),
                    None => "no element matched".to_string(),
                };
                panic!(
                    "{css:?} on {} did not contain {contains:?} within {WAIT_TIMEOUT:?}: {seen}",
                    self.current_url().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Ends the session (Chromium quits), then kills what is left of
    /// ChromeDriver's process group.
    pub async fn close(self) {
        match tokio::time::timeout(SESSION_TIMEOUT, self.client.clone().close()).await {
            Ok(result) => result.unwrap_or_else(|e| panic!("close the browser session: {e}")),
            Err(_) => panic!("the browser session did not close within {SESSION_TIMEOUT:?}"),
        }
        // Dropping `self` kills the rest of the group.
    }

    /// A CDP command through ChromeDriver (`goog/cdp/execute`).
    async fn cdp(&self, cmd: &str, params: Value) -> Result<Value, CmdError> {
        self.client
            .issue_cmd(SessionPost {
                path: "goog/cdp/execute",
                body: json!({ "cmd": cmd, "params": params }),
            })
            .await
    }

    /// The page's URL, for panic messages.
    async fn current_url(&self) -> String {
        match self.client.current_url().await {
            Ok(url) => url.to_string(),
            Err(e) => format!("(current URL unknown: {e})"),
        }
    }
}

/// Whether `e` says the element is not (or no longer) there.
fn is_gone(e: &CmdError) -> bool {
    use fantoccini::error::ErrorStatus;
    matches!(
        e,
        CmdError::Standard(w)
            if matches!(w.error, ErrorStatus::NoSuchElement | ErrorStatus::StaleElementReference)
    )
}

impl Driver {
    /// ChromeDriver's log so far, headed by its path, for panic messages.
    fn log(&self) -> String {
        let path = self.dir.path().join("chromedriver.log");
        match std::fs::read_to_string(&path) {
            Ok(text) => format!("--- {} ---\n{text}", path.display()),
            Err(e) => format!("(no ChromeDriver log at {}: {e})", path.display()),
        }
    }

    /// SIGKILLs the process group (ChromeDriver leads it) and reaps
    /// ChromeDriver; once (the group's id may be reused after that).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.driver.kill();
    }
}

/// Polls ChromeDriver's `/status` on `port` until it says `"ready":true`,
/// for up to [`DRIVER_READY_TIMEOUT`]; panics with its log if it exits or
/// does not get ready.
async fn wait_ready(port: u16, driver: &mut Driver) {
    let start = Instant::now();
    let mut last = String::from("(no answer)");
    while start.elapsed() < DRIVER_READY_TIMEOUT {
        if let Some(Ok(Some(status))) = driver.child.as_mut().map(Child::try_wait) {
            panic!(
                "chromedriver on port {port} exited early with {status}\n{}",
                driver.log()
            );
        }
        match get_status(port).await {
            Ok(body) if body.contains("\"ready\":true") => return,
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(POLL).await;
    }
    panic!(
        "chromedriver on port {port} was not ready within {DRIVER_READY_TIMEOUT:?} (last /status: {last})\n{}",
        driver.log()
    );
}

/// `GET /status` on loopback `port`: the response, headers and all, read
/// up to its `Content-Length` (ChromeDriver keeps the connection open).
async fn get_status(port: u16) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if response_complete(&buf) {
                break;
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no whole /status answer"))?
}

/// Whether `buf` holds an HTTP response's head and all of its
/// `Content-Length` body.
fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|len| buf.len() >= end + 4 + len)
}
