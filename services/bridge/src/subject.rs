//! Routing key -> NATS subject, and back.
//!
//! An AMQP routing key is up to 255 bytes of anything; fedora-messaging
//! topics are dot-separated words (`org.fedoraproject.prod.buildsys.tag`)
//! and map to the identical subject. What NATS does not allow in a
//! subject token is escaped as `%XX` (two upper-case hex digits of the
//! byte): white space, control bytes, DEL, bytes above 0x7F, `*` and `>`
//! (wildcards on the NATS side) and `%` itself. An empty token (two dots
//! in a row, or a dot at either end) becomes a lone `%`, which no escaped
//! token can be. So the mapping is one to one and [`routing_key`] undoes
//! it.

use std::fmt::Write as _;

/// The subject for `routing_key` (without any prefix).
pub fn subject(routing_key: &str) -> String {
    let mut out = String::with_capacity(routing_key.len());
    for (i, token) in routing_key.as_bytes().split(|b| *b == b'.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        if token.is_empty() {
            out.push('%');
            continue;
        }
        for &b in token {
            if plain(b) {
                out.push(b as char);
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The subject with a configured prefix ("" for none).
pub fn prefixed(prefix: &str, routing_key: &str) -> String {
    let s = subject(routing_key);
    if prefix.is_empty() {
        s
    } else {
        format!("{prefix}.{s}")
    }
}

fn plain(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'%' | b'*' | b'>')
}

/// The routing key [`subject`] made `subject` from; `None` if `subject`
/// is not one [`subject`] makes.
pub fn routing_key(subject: &str) -> Option<String> {
    let mut out: Vec<u8> = Vec::with_capacity(subject.len());
    for (i, token) in subject.split('.').enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if token == "%" {
            continue;
        }
        let bytes = token.as_bytes();
        if bytes.is_empty() {
            return None;
        }
        let mut j = 0;
        while j < bytes.len() {
            let b = bytes[j];
            if b == b'%' {
                let hex = token.get(j + 1..j + 3)?;
                let v = u8::from_str_radix(hex, 16).ok()?;
                if plain(v) || hex.bytes().any(|h| h.is_ascii_lowercase()) {
                    return None;
                }
                out.push(v);
                j += 3;
            } else if plain(b) {
                out.push(b);
                j += 1;
            } else {
                return None;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use warden_shared::xorshift::XorShift;

    /// What nats-server accepts as a publish subject: no empty token, no
    /// white space or control byte, no wildcard token.
    fn valid_publish_subject(s: &str) -> bool {
        !s.is_empty()
            && s.split('.').all(|t| {
                !t.is_empty()
                    && t != "*"
                    && t != ">"
                    && !t
                        .bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            })
    }

    #[test]
    fn fedora_topics_are_their_own_subject() {
        for t in [
            "org.fedoraproject.prod.buildsys.build.state.change",
            "org.fedoraproject.prod.bodhi.update.request.testing",
            "io.pagure.prod.pagure.pull-request.comment.added",
            "org.centos.prod.ci.koji-build.test.complete",
        ] {
            assert_eq!(subject(t), t);
            assert_eq!(routing_key(t).as_deref(), Some(t));
        }
    }

    #[test]
    fn what_nats_does_not_allow_is_escaped() {
        assert_eq!(subject("a b.c*d.>"), "a%20b.c%2Ad.%3E");
        assert_eq!(subject("100%.x"), "100%25.x");
        assert_eq!(subject("a..b"), "a.%.b");
        assert_eq!(subject(".a."), "%.a.%");
        assert_eq!(subject(""), "%");
        assert_eq!(subject("caf\u{e9}"), "caf%C3%A9");
        assert_eq!(subject("tab\there"), "tab%09here");
    }

    #[test]
    fn prefix_goes_before() {
        assert_eq!(prefixed("amqp", "a.b"), "amqp.a.b");
        assert_eq!(prefixed("", "a.b"), "a.b");
    }

    #[test]
    fn subjects_not_made_by_subject_have_no_routing_key() {
        for s in ["a..b", "a%2", "a%zz", "a%41", "a%2a", "a b", "a.*"] {
            assert_eq!(routing_key(s), None, "{s}");
        }
    }

    /// Property: for any routing key (random bytes from an alphabet heavy
    /// in the awkward ones), the subject is a valid publish subject and
    /// maps back to the same key.
    #[test]
    fn any_routing_key_round_trips_through_a_valid_subject() {
        let alphabet: Vec<char> = "ab.%*> \t\r\n\u{7f}\u{0}-_#é€Z9".chars().collect();
        let mut rng = XorShift::new(0x5eed_0016);
        for _ in 0..20_000 {
            let len = (rng.next_u64() % 24) as usize;
            let key: String = (0..len)
                .map(|_| alphabet[(rng.next_u64() % alphabet.len() as u64) as usize])
                .collect();
            let s = subject(&key);
            assert!(valid_publish_subject(&s), "{key:?} -> {s:?}");
            assert_eq!(routing_key(&s).as_deref(), Some(key.as_str()), "{key:?}");
        }
    }

    /// Property: two different keys never share a subject.
    #[test]
    fn distinct_keys_get_distinct_subjects() {
        let keys = ["a.b", "a%2Eb", "a..b", "a.%.b", "a.", "a.%", "a*", "a%2A"];
        let subjects: std::collections::BTreeSet<String> =
            keys.iter().map(|k| subject(k)).collect();
        assert_eq!(subjects.len(), keys.len());
    }
}
