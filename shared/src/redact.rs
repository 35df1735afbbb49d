//! URLs as they may be shown: without a login. `nats.url` must not carry
//! one (config validation refuses it), but a URL given on the command line
//! or by a test may, and a URL goes into errors, logs and monitoring
//! output, so whatever prints one prints [`redact`]'s result.

/// `url` (one URL or several separated by commas) with the login
/// (`user:password@`, or a token `token@`) of each replaced by `***@`;
/// anything else as it was.
pub fn redact(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

/// Whether any URL of `url` carries a login.
pub fn has_userinfo(url: &str) -> bool {
    url.split(',').any(|u| userinfo(u).is_some())
}

/// The byte range of one URL's login (without the `@`).
fn userinfo(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')?;
    Some((start, start + at))
}

fn redact_one(url: &str) -> String {
    match userinfo(url) {
        Some((start, end)) => format!("{}***{}", &url[..start], &url[end..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_is_replaced_and_nothing_else() {
        assert_eq!(
            redact("nats://warden-worker:s3cret@nats1:4222"),
            "nats://***@nats1:4222"
        );
        assert_eq!(redact("tls://tok@h:4222/x"), "tls://***@h:4222/x");
        assert_eq!(redact("user:pw@127.0.0.1:4222"), "***@127.0.0.1:4222");
        // A password holding '@' is hidden whole.
        assert_eq!(redact("nats://u:p@ss@h:1"), "nats://***@h:1");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact(""), "");
        // An '@' after the host is not a login.
        assert_eq!(redact("nats://h:1/a@b"), "nats://h:1/a@b");
    }

    #[test]
    fn every_server_of_a_list_is_redacted() {
        let r = redact("nats://a:pw1@n1:4222, nats://n2:4222,nats://b:pw2@n3:4222");
        assert_eq!(r, "nats://***@n1:4222, nats://n2:4222,nats://***@n3:4222");
        assert!(!r.contains("pw"));
    }

    #[test]
    fn has_userinfo_sees_a_login_in_any_server() {
        assert!(has_userinfo("nats://n1:4222,nats://u:p@n2:4222"));
        assert!(has_userinfo("tok@n1"));
        assert!(!has_userinfo("nats://n1:4222,tls://n2:4222"));
    }
}
