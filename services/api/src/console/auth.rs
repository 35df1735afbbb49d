//! Who may do what in the console, as pure functions: the sign-in cookie,
//! the CSRF token, and the same-origin check on writes.
//!
//! - **Reads** follow the API's rules (`crate::redact`): with a token
//!   configured, a reader who has not signed in sees redacted pages.
//! - **Signing in** means giving the API token once on `/login`; the
//!   console then sets [`SESSION_COOKIE`] to `v1.<expiry>.<mac>`, an
//!   HMAC-SHA256 keyed by the token over the expiry. The token itself never
//!   sits in the browser; changing the token signs everyone out; every API
//!   replica with the same token accepts the cookie.
//! - **Writes** (retry, cancel, resource check and close, sign-in and
//!   sign-out) are POSTed forms. They need the sign-in cookie when a token
//!   is set, and always (also on an open loopback API, where any web page
//!   the operator visits could otherwise post to it) a CSRF token: the
//!   form's `csrf` field must equal the [`CSRF_COOKIE`] cookie
//!   (double submit), and the request must not come from another site
//!   (`Origin` or `Sec-Fetch-Site`). Both cookies are `HttpOnly` and
//!   `SameSite=Strict`.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The sign-in cookie.
pub const SESSION_COOKIE: &str = "warden_console";
/// The CSRF cookie (double submit).
pub const CSRF_COOKIE: &str = "warden_csrf";
/// How long a sign-in lasts.
pub const SESSION_HOURS: i64 = 12;

const SESSION_PREFIX: &str = "v1";

fn mac(token: &str, expiry: i64) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    m.update(format!("warden-console|{SESSION_PREFIX}|{expiry}").as_bytes());
    hex(&m.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sign-in cookie's value for `token`, valid until `now` plus
/// [`SESSION_HOURS`].
pub fn session_value(token: &str, now: DateTime<Utc>) -> String {
    let expiry = now.timestamp() + SESSION_HOURS * 3600;
    format!("{SESSION_PREFIX}.{expiry}.{}", mac(token, expiry))
}

/// Whether `value` is a sign-in made with `token` that has not expired.
pub fn session_valid(token: &str, value: &str, now: DateTime<Utc>) -> bool {
    let mut parts = value.splitn(3, '.');
    let (Some(SESSION_PREFIX), Some(expiry), Some(given)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Ok(expiry) = expiry.parse::<i64>() else {
        return false;
    };
    expiry > now.timestamp()
        && crate::http::constant_time_eq(mac(token, expiry).as_bytes(), given.as_bytes())
}

/// The value of cookie `name` in a `Cookie` header, if present.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A fresh CSRF token: 122 random bits (a v4 UUID), hex.
pub fn new_csrf() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether a CSRF token has the shape [`new_csrf`] makes (so a cookie
/// someone else set cannot smuggle markup or separators into a page).
pub fn csrf_well_formed(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A token is set and the request is not signed in.
    NotSignedIn,
    /// The form's CSRF field is missing or differs from the cookie.
    BadCsrf,
    /// `Origin` names another site, or `Sec-Fetch-Site` says cross-site.
    CrossSite,
}

/// What a write request brings, as the checks need it.
#[derive(Debug, Clone, Default)]
pub struct WriteRequest<'a> {
    /// The `Host` header.
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub sec_fetch_site: Option<&'a str>,
    pub csrf_cookie: Option<&'a str>,
    pub csrf_field: Option<&'a str>,
    /// Whether the request is signed in (or presents the token), or no
    /// token is set.
    pub signed_in: bool,
}

/// Whether a console write may go ahead; `check_sign_in` is false for the
/// sign-in itself.
pub fn allow_write(r: &WriteRequest<'_>, check_sign_in: bool) -> Result<(), Refusal> {
    if r.sec_fetch_site
        .is_some_and(|s| !matches!(s, "same-origin" | "none"))
    {
        return Err(Refusal::CrossSite);
    }
    if let Some(origin) = r.origin {
        // "null" (a sandboxed frame, a redirect) is not this site either.
        let host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if host.is_none() || host != r.host {
            return Err(Refusal::CrossSite);
        }
    }
    match (r.csrf_cookie, r.csrf_field) {
        (Some(c), Some(f))
            if csrf_well_formed(c) && crate::http::constant_time_eq(c.as_bytes(), f.as_bytes()) => {
        }
        _ => return Err(Refusal::BadCsrf),
    }
    if check_sign_in && !r.signed_in {
        return Err(Refusal::NotSignedIn);
    }
    Ok(())
}

/// Where to go after signing in: only a path on this site (`/jobs?x`),
/// never another site (`//evil`, `https://...`).
pub fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).single().expect("time")
    }

    #[test]
    fn a_sign_in_holds_for_its_token_until_it_expires() {
        let v = session_value("s3cret", now());
        assert!(session_valid("s3cret", &v, now()));
        assert!(session_valid(
            "s3cret",
            &v,
            now() + chrono::Duration::hours(SESSION_HOURS) - chrono::Duration::seconds(1)
        ));
        assert!(!session_valid(
            "s3cret",
            &v,
            now() + chrono::Duration::hours(SESSION_HOURS)
        ));
        assert!(!session_valid("other", &v, now()), "a new token signs out");
        assert!(!v.contains("s3cret"), "the token is not in the cookie");
    }

    #[test]
    fn a_forged_or_stretched_sign_in_is_refused() {
        let v = session_value("s3cret", now());
        let (head, mac) = v.rsplit_once('.').expect("three parts");
        let later = now().timestamp() + 10 * 365 * 86400;
        for forged in [
            format!("v1.{later}.{mac}"),
            format!("{head}.{}", "0".repeat(64)),
            format!("{head}."),
            "v2.1.2".to_string(),
            String::new(),
            "v1.notanumber.abc".to_string(),
        ] {
            assert!(!session_valid("s3cret", &forged, now()), "{forged}");
        }
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h = "a=1; warden_csrfx=no; warden_csrf=abc ; warden_console=v1.2.3";
        assert_eq!(cookie(h, CSRF_COOKIE), Some("abc"));
        assert_eq!(cookie(h, SESSION_COOKIE), Some("v1.2.3"));
        assert_eq!(cookie(h, "missing"), None);
    }

    fn good<'a>(csrf: &'a str) -> WriteRequest<'a> {
        WriteRequest {
            host: Some("127.0.0.1:8080"),
            origin: Some("http://127.0.0.1:8080"),
            sec_fetch_site: Some("same-origin"),
            csrf_cookie: Some(csrf),
            csrf_field: Some(csrf),
            signed_in: true,
        }
    }

    #[test]
    fn writes_need_a_matching_csrf_token_from_this_site() {
        let t = new_csrf();
        assert!(csrf_well_formed(&t));
        assert_eq!(allow_write(&good(&t), true), Ok(()));
        // Old browsers and curl send neither header: the token decides.
        let bare = WriteRequest {
            origin: None,
            sec_fetch_site: None,
            ..good(&t)
        };
        assert_eq!(allow_write(&bare, true), Ok(()));
        let other = new_csrf();
        for (r, why) in [
            (
                WriteRequest {
                    csrf_field: Some(&other),
                    ..good(&t)
                },
                Refusal::BadCsrf,
            ),
            (
                WriteRequest {
                    csrf_field: None,
                    ..good(&t)
                },
                Refusal::BadCsrf,
            ),
            (
                WriteRequest {
                    csrf_cookie: Some("<b>"),
                    csrf_field: Some("<b>"),
                    ..good(&t)
                },
                Refusal::BadCsrf,
            ),
            (
                WriteRequest {
                    origin: Some("http://evil.example"),
                    ..good(&t)
                },
                Refusal::CrossSite,
            ),
            (
                WriteRequest {
                    origin: Some("null"),
                    ..good(&t)
                },
                Refusal::CrossSite,
            ),
            (
                WriteRequest {
                    sec_fetch_site: Some("cross-site"),
                    ..good(&t)
                },
                Refusal::CrossSite,
            ),
            (
                WriteRequest {
                    signed_in: false,
                    ..good(&t)
                },
                Refusal::NotSignedIn,
            ),
        ] {
            assert_eq!(allow_write(&r, true), Err(why), "{r:?}");
        }
        let signing_in = WriteRequest {
            signed_in: false,
            ..good(&t)
        };
        assert_eq!(allow_write(&signing_in, false), Ok(()));
    }

    #[test]
    fn sign_in_only_returns_to_this_site() {
        assert_eq!(
            safe_next(Some("/jobs?state=crashed")),
            "/jobs?state=crashed"
        );
        for bad in ["//evil.example", "https://evil.example", "/\\evil", "jobs"] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
