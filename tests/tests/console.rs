//! The operators' web console in a real headless Chromium (Debian's
//! `chromium` through `chromium-driver`), driving a live `warden up` with
//! an API token: jobs of every kind, each page opened, a filter used, a
//! crashed job followed through its attempts, a shelved job retried and a
//! running one cancelled from the page, and a live update arriving without
//! a reload. Screenshots of every page, at laptop and phone widths, are
//! written under `target/console-screenshots/` on every run.
//!
//! `every_link_leads_somewhere_and_every_error_reads_as_a_message` checks
//! the HTML without a browser: every link and asset on every page
//! answers, and every API error, refused write and unknown page is a page
//! that says what went wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use fantoccini::Locator;
use serde_json::Value;
use warden_e2e::{eventually, sample, Scenario, Stack};
use warden_testsupport::browser::Browser;

const TOKEN: &str = "console-test-token-0123456789";

fn config() -> String {
    format!(
        r#"
[http]
token = "{TOKEN}"

[retry]
max_attempts = 2
initial_delay = "1s"
jitter = 0.0

[tasks.pass]
command = ["true"]

[tasks.fail]
command = ["sh", "-c", "echo 'test_login ... FAILED'; exit 1"]
verdicts = {{ "0" = "passed", "1" = "failed" }}

# The kernel's OOM killer took the task: system/oom, never retried.
[tasks.oom]
command = ["sh", "-c", "echo 'building chromium...'; echo 'Out of memory: Killed process 4242 (cc1plus) total-vm:9000000kB' >&2; kill -9 $$"]

# A mirror outage: third_party/network, retried once, then shelved.
[tasks.mirror]
command = ["sh", "-c", "echo 'curl: (6) Could not resolve host: mirrors.fedoraproject.org' >&2; echo '{{\"blame\":\"third_party\",\"detail\":\"network\",\"description\":\"mirror unreachable\"}}' > \"$WARDEN_STATUS_FILE\"; exit 3"]

# The same outage, with an hour before its retry.
[tasks.mirror-later]
command = ["sh", "-c", "echo '{{\"blame\":\"third_party\",\"detail\":\"network\",\"description\":\"mirror unreachable\"}}' > \"$WARDEN_STATUS_FILE\"; exit 3"]
retry = {{ initial_delay = "1h", max_delay = "1h", max_attempts = 3 }}

[tasks.sleeper]
command = ["sleep", "300"]

# No bot serves this pool.
[tasks.nobody]
command = ["true"]
pool = "unserved"
"#
    )
}

async fn job(s: &Stack, id: &str) -> Value {
    warden_e2e::get_json(&s.warden.url(&format!("/api/v1/jobs/{id}"))).await
}

async fn wait_state(s: &Stack, id: &str, state: &str) -> Value {
    eventually(
        Duration::from_secs(60),
        &format!("job {id} {state}"),
        || async move {
            let j = job(s, id).await;
            (j["state"] == state).then_some(j)
        },
    )
    .await
}

/// Every kind of job, each in the state it ends up in.
struct Jobs {
    passed: String,
    failed: String,
    oom: String,
    shelved: String,
    delayed: String,
    running: String,
    waiting: String,
}

async fn submit_every_kind(s: &Stack) -> Jobs {
    let j = Jobs {
        passed: s.submit(&["pass", "--arg", "nvr=bash-5.2.26-3.fc40"]),
        failed: s.submit(&["fail"]),
        oom: s.submit(&["oom", "--arg", "nvr=chromium-131.0-1.fc41"]),
        shelved: s.submit(&["mirror"]),
        delayed: s.submit(&["mirror-later"]),
        running: s.submit(&["sleeper"]),
        waiting: s.submit(&["nobody", "--priority", "5"]),
    };
    wait_state(s, &j.passed, "FINISHED").await;
    wait_state(s, &j.failed, "FINISHED").await;
    wait_state(s, &j.oom, "CRASHED").await;
    wait_state(s, &j.shelved, "SHELVED").await;
    eventually(Duration::from_secs(60), "the delayed retry", || async {
        let v = job(s, &j.delayed).await;
        (v["state"] == "SCHEDULED" && v["attempt"] == 1).then_some(())
    })
    .await;
    wait_state(s, &j.running, "RUNNING").await;
    j
}

async fn text(b: &Browser, css: &str) -> String {
    b.wait_for(css).await.text().await.expect("element text")
}

async fn no_console_errors(b: &Browser, page: &str) {
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "{page}: {errors:#?}");
}

/// Opens `path`, checks it rendered its heading without a script error,
/// and takes its screenshot.
async fn visit(b: &Browser, s: &Stack, path: &str, h1: &str, shot: &str) {
    b.goto(&s.warden.url(path)).await;
    b.wait_text("h1", h1).await;
    no_console_errors(b, path).await;
    let png = b.screenshot(shot).await;
    eprintln!("screenshot {path}: {}", png.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_answers_why_a_job_crashed_and_acts_from_the_console() {
    let s = Scenario::new().config(&config()).workers(2).up();
    let jobs = submit_every_kind(&s).await;
    let b = Browser::start().await;

    // Signed out: the pages read, task output stays hidden, no buttons.
    visit(&b, &s, "/", "Overview", "01-overview-signed-out").await;
    b.goto(&s.warden.url(&format!("/jobs/{}", jobs.oom))).await;
    b.wait_text("#status-line", "system/oom").await;
    let page = b.client().source().await.unwrap();
    assert!(page.contains("[redacted]"), "the log tail is hidden");
    // The description (the classifier's quote of the deciding line) is
    // shown, as by the API; the rest of the log is not.
    assert!(!page.contains("building chromium"), "the log tail leaked");
    assert!(b.client().find(Locator::Css("#retry")).await.is_err());
    no_console_errors(&b, "job signed out").await;

    // Sign in with the token, and come back to the page.
    b.client()
        .find(Locator::LinkText("Sign in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text("h1", "Sign in").await;
    let field = b.wait_for("#token").await;
    field.send_keys(TOKEN).await.unwrap();
    b.click("form.login button[type=submit]").await;
    b.wait_text(".notice.ok", "Signed in").await;
    assert!(b
        .client()
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains(&jobs.oom));

    // Why did the job crash, on which host, and was it retried?
    let status = text(&b, "#status-line").await;
    assert!(
        status.contains("Crashed at attempt 1: system/oom"),
        "{status}"
    );
    let attempt = text(&b, "#attempt-1 h3").await;
    assert!(attempt.contains("Attempt 1 on bot"), "{attempt}");
    assert!(attempt.contains(", resource "), "{attempt}");
    let why = text(&b, "#why-not-retried").await;
    assert!(why.contains("does not retry system/oom"), "{why}");
    let log = text(&b, "pre.log").await;
    assert!(
        log.contains("building chromium") && log.contains("Killed process 4242"),
        "{log}"
    );
    b.screenshot("02-job-crashed-oom").await;

    // The job list, filtered from the form.
    visit(&b, &s, "/jobs", "Jobs", "03-jobs-all").await;
    let count = text(&b, "p.count").await;
    assert!(count.contains("7 jobs match"), "{count}");
    b.click("#f-state option[value=SHELVED]").await;
    b.click("form.filters button[type=submit]").await;
    b.wait_text("p.count", "1 job match").await;
    b.screenshot("04-jobs-filtered-shelved").await;

    // Follow the shelved job: two attempts, each crashed, then shelved.
    let short = &jobs.shelved.replace('-', "")[..8];
    b.client()
        .find(Locator::LinkText(short))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let status = text(&b, "#status-line").await;
    assert!(status.contains("retries used up: 2 of 2"), "{status}");
    for n in [1, 2] {
        let h = text(&b, &format!("#attempt-{n} h3")).await;
        assert!(h.contains("crash"), "attempt {n}: {h}");
    }
    let history = text(&b, "#attempt-1 table").await;
    assert!(
        history.contains("retry 1 of 1"),
        "the retry and its delay: {history}"
    );
    b.screenshot("05-job-shelved").await;

    // Retry it from the page; the page then follows it live, without a
    // reload, until it is shelved again after two more attempts.
    b.click("#retry").await;
    b.wait_text(".notice.ok", "Retried").await;
    b.client()
        .execute("window.__sameDocument = 'yes';", vec![])
        .await
        .unwrap();
    b.wait_text("#status-line", "retries used up: 2 of 2").await;
    b.wait_for("#attempt-4").await;
    let same = b
        .client()
        .execute("return window.__sameDocument || 'reloaded';", vec![])
        .await
        .unwrap();
    assert_eq!(same, "yes", "the update arrived without a reload");
    let refreshed = b
        .client()
        .execute(
            "return document.getElementById('live').dataset.refreshed;",
            vec![],
        )
        .await
        .unwrap();
    assert!(refreshed.as_str().is_some_and(|n| n != "0"), "{refreshed}");
    b.screenshot("06-job-retried-live").await;
    assert_eq!(job(&s, &jobs.shelved).await["attempt"], 4);

    // Cancel the running job from its page.
    b.goto(&s.warden.url(&format!("/jobs/{}", jobs.running)))
        .await;
    b.wait_text("#status-line", "Running attempt 1 on bot")
        .await;
    b.wait_for("#cancel-reason")
        .await
        .send_keys("not needed any more")
        .await
        .unwrap();
    b.click("#cancel").await;
    b.wait_text(".notice.ok", "Cancelled").await;
    b.wait_text("#status-line", "not needed any more").await;
    assert_eq!(job(&s, &jobs.running).await["state"], "CANCELLED");
    b.screenshot("07-job-cancelled").await;

    // Why waiting jobs wait.
    b.goto(&s.warden.url(&format!("/jobs/{}", jobs.waiting)))
        .await;
    b.wait_text(
        "#why-waiting",
        "no active bot on an open resource serves pool unserved",
    )
    .await;
    b.screenshot("08-job-waiting-unserved").await;
    b.goto(&s.warden.url(&format!("/jobs/{}", jobs.delayed)))
        .await;
    b.wait_text("#why-waiting", "Waiting for a delayed retry")
        .await;
    b.screenshot("09-job-delayed-retry").await;
    b.goto(&s.warden.url(&format!("/jobs/{}", jobs.passed)))
        .await;
    b.wait_text("#status-line", "outcome passed").await;
    b.goto(&s.warden.url(&format!("/jobs/{}", jobs.failed)))
        .await;
    b.wait_text("#status-line", "outcome failed").await;

    // The other pages.
    visit(&b, &s, "/bots", "Bots and sessions", "10-bots").await;
    let bots = text(&b, "#live table").await;
    assert!(bots.contains("active"), "{bots}");
    visit(&b, &s, "/resources", "Resources", "11-resources").await;
    b.wait_text("#live", "Incarnation").await;
    visit(&b, &s, "/queues", "Queues", "12-queues").await;
    let q = text(&b, "#live").await;
    assert!(q.contains("unserved") && q.contains("no bot"), "{q}");
    visit(&b, &s, "/stats", "Statistics", "13-stats").await;
    b.wait_for("figure.chart svg rect").await;
    let top = text(&b, "#live").await;
    assert!(
        top.contains("system/oom") && top.contains("third_party/network"),
        "{top}"
    );
    visit(&b, &s, "/", "Overview", "14-overview").await;

    // A resource checked by hand from its page.
    b.goto(&s.warden.url("/resources")).await;
    b.click("form[action='/resources/check'] button").await;
    b.wait_text(".notice", "its check").await;
    b.screenshot("15-resource-checked").await;

    // Phone width: the same pages, nothing wider than the screen but the
    // tables, which scroll in their own box.
    b.set_size(390, 844).await;
    for (path, h1, shot) in [
        ("/", "Overview", "16-phone-overview"),
        ("/jobs", "Jobs", "17-phone-jobs"),
    ] {
        visit(&b, &s, path, h1, shot).await;
        let overflow = b
            .client()
            .execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(overflow.as_i64(), Some(0), "{path} scrolls sideways");
    }
    b.goto(&s.warden.url(&format!("/jobs/{}", jobs.oom))).await;
    b.wait_text("#status-line", "system/oom").await;
    b.screenshot("18-phone-job").await;

    // Keyboard: the skip link is the first stop and leads to the content;
    // every form field has a label.
    b.set_size(1280, 900).await;
    b.goto(&s.warden.url("/jobs")).await;
    let unlabelled = b
        .client()
        .execute(
            "return Array.from(document.querySelectorAll('input:not([type=hidden]), select'))\
               .filter(e => !(e.id && document.querySelector('label[for=\"' + e.id + '\"]'))).length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unlabelled.as_i64(), Some(0), "every field has a label");
    b.client()
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys("\u{E004}") // Tab
        .await
        .unwrap();
    let focused = b
        .client()
        .execute("return document.activeElement.className;", vec![])
        .await
        .unwrap();
    assert_eq!(focused, "skip", "Tab reaches the skip link first");

    no_console_errors(&b, "the whole session").await;
    b.close().await;
}

/// Every `href`, `src` and form `action` in `html` that stays on this
/// site, fragment dropped.
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\"", "action=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let Some(end) = rest.find('"') else { break };
            let link = rest[..end].replace("&amp;", "&");
            let link = link.split('#').next().unwrap_or("").to_string();
            if link.starts_with('/') {
                out.push(link);
            }
            rest = &rest[end..];
        }
    }
    out
}

/// The form actions (POST) in `html`, which the crawl does not GET.
fn actions(html: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = html;
    while let Some(i) = rest.find("method=\"post\" action=\"") {
        rest = &rest[i + 22..];
        if let Some(end) = rest.find('"') {
            out.insert(rest[..end].to_string());
        }
    }
    out
}

fn csrf_of(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("warden_csrf="))
        .map(|c| c.split(';').next().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_link_leads_somewhere_and_every_error_reads_as_a_message() {
    let s = Scenario::new().config(&config()).workers(2).up();
    let jobs = submit_every_kind(&s).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Crawl from the overview: every page and asset linked answers 200.
    let mut seen = BTreeSet::new();
    let mut posts = BTreeSet::new();
    let mut queue = VecDeque::from(["/".to_string()]);
    while let Some(path) = queue.pop_front() {
        if !seen.insert(path.clone()) || seen.len() > 400 {
            continue;
        }
        let resp = http
            .get(s.warden.url(&path))
            .header("accept", "text/html")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path} is a broken link");
        let kind = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !kind.starts_with("text/html") {
            continue;
        }
        let csp = resp.headers().get("content-security-policy").cloned();
        assert!(csp.is_some(), "{path} has no CSP");
        let body = resp.text().await.unwrap();
        posts.extend(actions(&body));
        let post_set = actions(&body);
        for l in links(&body) {
            if !post_set.contains(&l) && !l.starts_with("/events") {
                queue.push_back(l);
            }
        }
    }
    for must in [
        "/",
        "/jobs",
        "/bots",
        "/resources",
        "/queues",
        "/stats",
        "/login?next=%2F",
    ] {
        assert!(seen.contains(must), "{must} is not linked: {seen:#?}");
    }
    assert!(
        seen.iter().any(|p| p.contains(&jobs.oom)),
        "the crashed job is linked"
    );
    assert!(seen.len() > 30, "{seen:#?}");
    eprintln!(
        "crawled {} pages and assets, {} write forms",
        seen.len(),
        posts.len()
    );

    // Every API error is a page saying what went wrong, with its status.
    let missing = uuid::Uuid::new_v4();
    for (path, status, code, words) in [
        ("/jobs?state=bogus", 400, "invalid_state", "bogus"),
        ("/jobs?blame=everyone", 400, "invalid_blame", "everyone"),
        ("/jobs?since=yesterday", 400, "invalid_time", "RFC 3339"),
        ("/jobs?limit=many", 400, "invalid_query", "limit"),
        ("/jobs/not-a-job", 400, "invalid_id", "not a job id"),
        (&format!("/jobs/{missing}"), 404, "not_found", "no job"),
        ("/stats?window=forever", 400, "invalid_window", "forever"),
        ("/bots?state=asleep", 400, "invalid_state", "asleep"),
        (
            "/no/such/page",
            404,
            "not_found",
            "no page at /no/such/page",
        ),
    ] {
        let resp = http
            .get(s.warden.url(path))
            .header("accept", "text/html")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path}");
        let body = resp.text().await.unwrap();
        assert!(body.contains("role=\"alert\""), "{path}: {body}");
        assert!(
            body.contains(&format!("<code>{code}</code>")),
            "{path}: {body}"
        );
        assert!(body.contains(words), "{path}: no {words:?} in {body}");
        assert!(
            body.contains("<nav aria-label=\"Sections\">"),
            "{path} is a whole page"
        );
    }
    // An API client still gets JSON for an unknown route.
    let resp = http
        .get(s.warden.url("/no/such/page"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");

    // Writes: refused without CSRF, from another site, or signed out;
    // a refused transition is a readable 409.
    let first = http.get(s.warden.url("/jobs")).send().await.unwrap();
    let csrf = csrf_of(&first).expect("a CSRF cookie on the first page");
    let retry_finished = format!("/jobs/{}/retry", jobs.passed);
    let post =
        |path: &str, cookie: String, form: Vec<(&'static str, String)>, origin: Option<&str>| {
            let mut r = http
                .post(s.warden.url(path))
                .header("cookie", cookie)
                .form(&form);
            if let Some(o) = origin {
                r = r.header("origin", o);
            }
            r.send()
        };
    let origin = s.warden.url("");
    let cases = [
        (
            format!("warden_csrf={csrf}"),
            vec![],
            Some(origin.as_str()),
            403,
            "out of date",
        ),
        (
            format!("warden_csrf={csrf}"),
            vec![("csrf", csrf.clone())],
            Some("http://evil.example"),
            403,
            "another site",
        ),
        (
            format!("warden_csrf={csrf}"),
            vec![("csrf", csrf.clone())],
            Some(origin.as_str()),
            401,
            "sign in",
        ),
    ];
    for (cookie, form, origin, status, words) in cases {
        let resp = post(&retry_finished, cookie, form, origin).await.unwrap();
        assert_eq!(resp.status(), status, "{words}");
        let body = resp.text().await.unwrap();
        assert!(
            body.contains(words) && body.contains("role=\"alert\""),
            "{body}"
        );
    }
    // A wrong token does not sign in; the right one does.
    let resp = post(
        "/login",
        format!("warden_csrf={csrf}"),
        vec![
            ("csrf", csrf.clone()),
            ("token", "guess".into()),
            ("next", "/".into()),
        ],
        Some(&origin),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("That is not the API token"));
    let resp = post(
        "/login",
        format!("warden_csrf={csrf}"),
        vec![
            ("csrf", csrf.clone()),
            ("token", TOKEN.into()),
            ("next", "//evil.example".into()),
        ],
        Some(&origin),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/?done=signed_in",
        "never to another site"
    );
    let session = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("warden_console="))
        .map(|c| c.split(';').next().unwrap().to_string())
        .expect("a sign-in cookie");
    assert!(!session.contains(TOKEN));
    let cookies = format!("warden_csrf={csrf}; warden_console={session}");
    let resp = post(
        &retry_finished,
        cookies.clone(),
        vec![("csrf", csrf.clone())],
        Some(&origin),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 409);
    let body = resp.text().await.unwrap();
    assert!(body.contains("<code>illegal_transition</code>"), "{body}");
    assert!(
        body.contains(&format!("href=\"/jobs/{}\"", jobs.passed)),
        "a way back: {body}"
    );
    let resp = post(
        "/resources/close",
        cookies.clone(),
        vec![("csrf", csrf.clone()), ("name", "no-such-host".into())],
        Some(&origin),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("role=\"alert\""));
    // Signed in, the log tail reads whole.
    let page = http
        .get(s.warden.url(&format!("/jobs/{}", jobs.oom)))
        .header("cookie", cookies)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("building chromium"), "{page}");

    let m = s.metrics().await;
    for (reason, at_least) in [("csrf", 1.0), ("cross_site", 1.0), ("no_token", 2.0)] {
        let n = sample(
            &m,
            &format!("warden_api_http_refusals_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(n >= at_least, "{reason}: {n}\n{m}");
    }
}
