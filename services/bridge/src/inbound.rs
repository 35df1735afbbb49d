//! One AMQP message -> one event for the events stream, or the reason it
//! cannot be one. Pure: the consume loop ([`crate::consume`]) does the I/O.
//!
//! The event's payload is the message body, byte for byte (the trigger
//! reads it as the fedora-messaging body, [`warden_shared::subjects::
//! HEADER_EVENT_SOURCE`]); its subject comes from the routing key
//! ([`crate::subject`]); `Nats-Msg-Id` is the AMQP `message_id` (or, for a
//! message without one, a hash of routing key and body, so a message
//! delivered twice is still one event); every AMQP header is kept as a
//! NATS header of the same name.

use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;
use warden_shared::subjects;

/// What the bridge needs of a delivery (the consume loop fills it from
/// lapin's `Delivery`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub message_id: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    /// AMQP `timestamp` property: seconds since the epoch.
    pub timestamp: Option<u64>,
    /// AMQP headers, already rendered as text ([`render_headers`]).
    pub headers: Vec<(String, String)>,
    pub body: &'a [u8],
}

/// What to publish on the events stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub subject: String,
    pub msg_id: String,
    pub headers: Vec<(String, String)>,
}

/// Limits and where events may go.
#[derive(Debug, Clone)]
pub struct Rules {
    pub subject_prefix: String,
    /// The events stream's subjects (patterns with NATS wildcards).
    pub event_subjects: Vec<String>,
    /// Largest body accepted.
    pub max_bytes: usize,
}

#[derive(Debug, Error, PartialEq)]
pub enum Undecodable {
    #[error("the message has no routing key")]
    NoRoutingKey,
    #[error("body of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("content encoding {0:?} is not supported (only utf-8 JSON)")]
    UnsupportedEncoding(String),
    #[error("body is not JSON: {0}")]
    InvalidJson(String),
    #[error("body is JSON but not an object")]
    NotAnObject,
    #[error("subject {0:?} is not one the events stream listens on (trigger.subjects)")]
    NoEventsSubject(String),
}

impl Undecodable {
    /// Every [`Undecodable::reason`].
    pub const REASONS: [&'static str; 6] = [
        "no_routing_key",
        "too_large",
        "unsupported_encoding",
        "invalid_json",
        "not_an_object",
        "no_events_subject",
    ];

    /// Stable reason code for the dead-letter stream and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Undecodable::NoRoutingKey => "no_routing_key",
            Undecodable::TooLarge { .. } => "too_large",
            Undecodable::UnsupportedEncoding(_) => "unsupported_encoding",
            Undecodable::InvalidJson(_) => "invalid_json",
            Undecodable::NotAnObject => "not_an_object",
            Undecodable::NoEventsSubject(_) => "no_events_subject",
        }
    }
}

/// The event `msg` becomes, or why it cannot become one.
pub fn to_event(msg: &Message<'_>, rules: &Rules) -> Result<Event, Undecodable> {
    if msg.routing_key.is_empty() {
        return Err(Undecodable::NoRoutingKey);
    }
    if msg.body.len() > rules.max_bytes {
        return Err(Undecodable::TooLarge {
            size: msg.body.len(),
            max: rules.max_bytes,
        });
    }
    if let Some(enc) = msg.content_encoding {
        let e = enc.trim().to_ascii_lowercase();
        if !(e.is_empty() || e == "utf-8" || e == "utf8") {
            return Err(Undecodable::UnsupportedEncoding(enc.to_string()));
        }
    }
    // Parsed as the trigger parses it, so nothing the trigger would
    // refuse for its form reaches the events stream (a syntax-only pass
    // lets through invalid UTF-8 inside strings and lone surrogate
    // escapes, which the trigger refuses: found by fuzz/amqp).
    let value: Value =
        serde_json::from_slice(msg.body).map_err(|e| Undecodable::InvalidJson(e.to_string()))?;
    if !value.is_object() {
        return Err(Undecodable::NotAnObject);
    }
    let subject = crate::subject::prefixed(&rules.subject_prefix, msg.routing_key);
    if !rules
        .event_subjects
        .iter()
        .any(|p| subjects::subject_matches(p, &subject))
    {
        return Err(Undecodable::NoEventsSubject(subject));
    }
    let msg_id = match msg.message_id.map(str::trim) {
        Some(id) if !id.is_empty() && header_safe(id) => id.to_string(),
        _ => content_id(msg.routing_key, msg.body),
    };
    let mut headers = Vec::with_capacity(msg.headers.len() + 6);
    headers.push((
        subjects::HEADER_EVENT_SOURCE.to_string(),
        subjects::EVENT_SOURCE_AMQP.to_string(),
    ));
    headers.push((
        subjects::HEADER_EVENT_TOPIC.to_string(),
        header_value(msg.routing_key),
    ));
    headers.push((
        subjects::HEADER_AMQP_EXCHANGE.to_string(),
        header_value(msg.exchange),
    ));
    if let Some(ct) = msg.content_type {
        headers.push((
            subjects::HEADER_AMQP_CONTENT_TYPE.to_string(),
            header_value(ct),
        ));
    }
    if let Some(ce) = msg.content_encoding {
        headers.push((
            subjects::HEADER_AMQP_CONTENT_ENCODING.to_string(),
            header_value(ce),
        ));
    }
    if let Some(ts) = msg.timestamp {
        headers.push((subjects::HEADER_AMQP_TIMESTAMP.to_string(), ts.to_string()));
    }
    for (name, value) in &msg.headers {
        let name = header_name(name);
        // The bridge's own headers and JetStream's are not the sender's
        // to set.
        if name.starts_with("Warden-") || name.starts_with("Nats-") || name.is_empty() {
            continue;
        }
        headers.push((name, header_value(value)));
    }
    Ok(Event {
        subject,
        msg_id,
        headers,
    })
}

/// `sha256:<hex>` of routing key and body: the id of a message that
/// carries none, the same on every delivery.
pub fn content_id(routing_key: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(routing_key.as_bytes());
    h.update([0u8]);
    h.update(body);
    let digest = h.finalize();
    let mut id = String::with_capacity(7 + 64);
    id.push_str("sha256:");
    for b in digest {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// A NATS header value holds no CR or LF and no other control byte.
fn header_safe(v: &str) -> bool {
    !v.chars().any(char::is_control)
}

/// `v` as a header value: each control character (CR, LF, DEL, ...)
/// written `\uXXXX` as JSON would, a backslash before one doubled (a value
/// with none is unchanged).
fn header_value(v: &str) -> String {
    if header_safe(v) {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `n` as a header name: visible ASCII but `:`; anything else becomes `_`.
fn header_name(n: &str) -> String {
    n.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// AMQP headers as `(name, text)`: strings as they are, numbers and
/// booleans in decimal, arrays and tables as JSON.
pub fn render_headers(table: Option<&FieldTable>) -> Vec<(String, String)> {
    let Some(t) = table else {
        return Vec::new();
    };
    t.inner()
        .iter()
        .map(|(k, v)| {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                other => match json(other) {
                    Value::String(s) => s,
                    j => j.to_string(),
                },
            };
            (k.as_str().to_string(), text)
        })
        .collect()
}

fn json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => serde_json::Number::from_f64(f64::from(*f))
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AMQPValue::DecimalValue(d) => {
            let scaled = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(scaled)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json).collect()),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => Value::String(
            b.as_slice()
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            subject_prefix: String::new(),
            event_subjects: vec!["org.fedoraproject.>".into(), "warden.events.>".into()],
            max_bytes: 1024,
        }
    }

    fn koji<'a>(body: &'a [u8]) -> Message<'a> {
        Message {
            exchange: "amq.topic",
            routing_key: "org.fedoraproject.prod.buildsys.build.state.change",
            message_id: Some("7a4d7c9e-0b5a-4d0e-8c3b-2f1e7e8b9c01"),
            content_type: Some("application/json"),
            content_encoding: Some("utf-8"),
            timestamp: None,
            headers: vec![
                (
                    "fedora_messaging_schema".into(),
                    "koji_fedoramessaging.build.BuildStateChangeV1".into(),
                ),
                ("fedora_messaging_severity".into(), "20".into()),
                ("sent-at".into(), "2026-12-01T17:00:00+00:00".into()),
            ],
            body,
        }
    }

    fn header<'e>(e: &'e Event, name: &str) -> Option<&'e str> {
        e.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_fedora_message_becomes_an_event_with_its_id_topic_and_headers() {
        let e = to_event(&koji(br#"{"build_id": 1}"#), &rules()).unwrap();
        assert_eq!(
            e.subject,
            "org.fedoraproject.prod.buildsys.build.state.change"
        );
        assert_eq!(e.msg_id, "7a4d7c9e-0b5a-4d0e-8c3b-2f1e7e8b9c01");
        assert_eq!(header(&e, "Warden-Event-Source"), Some("amqp"));
        assert_eq!(
            header(&e, "Warden-Topic"),
            Some("org.fedoraproject.prod.buildsys.build.state.change")
        );
        assert_eq!(
            header(&e, "fedora_messaging_schema"),
            Some("koji_fedoramessaging.build.BuildStateChangeV1")
        );
        assert_eq!(header(&e, "sent-at"), Some("2026-12-01T17:00:00+00:00"));
        assert_eq!(header(&e, "Warden-Amqp-Exchange"), Some("amq.topic"));
    }

    #[test]
    fn a_message_without_an_id_gets_the_same_one_on_every_delivery() {
        let body = br#"{"a": 1}"#;
        let mut m = koji(body);
        m.message_id = None;
        let a = to_event(&m, &rules()).unwrap();
        let b = to_event(&m, &rules()).unwrap();
        assert!(a.msg_id.starts_with("sha256:"));
        assert_eq!(a.msg_id, b.msg_id);
        m.routing_key = "org.fedoraproject.prod.other";
        assert_ne!(to_event(&m, &rules()).unwrap().msg_id, a.msg_id);
        // An id a header cannot carry is replaced the same way.
        let mut m = koji(body);
        m.message_id = Some("bad\r\nid");
        assert!(to_event(&m, &rules())
            .unwrap()
            .msg_id
            .starts_with("sha256:"));
    }

    #[test]
    fn what_cannot_be_an_event_says_why() {
        let r = rules();
        let cases: Vec<(Message<'_>, &str)> = vec![
            (
                Message {
                    routing_key: "",
                    ..koji(b"{}")
                },
                "no_routing_key",
            ),
            (koji(&[b' '; 2000]), "too_large"),
            (
                Message {
                    content_encoding: Some("gzip"),
                    ..koji(b"{}")
                },
                "unsupported_encoding",
            ),
            (koji(b"\xff\xfe not json"), "invalid_json"),
            (koji(b"{\"a\": "), "invalid_json"),
            // Invalid UTF-8 in a string, and a lone surrogate: the trigger
            // refuses both (found by fuzz/amqp).
            (koji(b"{\"a\": \"x\x8fy\"}"), "invalid_json"),
            (koji(br#"{"a": "\ud800"}"#), "invalid_json"),
            (koji(b"[1, 2]"), "not_an_object"),
            (koji(b"\"text\""), "not_an_object"),
            (
                Message {
                    routing_key: "com.example.elsewhere",
                    ..koji(b"{}")
                },
                "no_events_subject",
            ),
        ];
        for (m, reason) in cases {
            let e = to_event(&m, &r).unwrap_err();
            assert_eq!(e.reason(), reason, "{e}");
            assert!(Undecodable::REASONS.contains(&e.reason()));
        }
    }

    #[test]
    fn the_prefix_decides_which_subjects_are_allowed() {
        let r = Rules {
            subject_prefix: "amqp".into(),
            event_subjects: vec!["amqp.>".into()],
            max_bytes: 1024,
        };
        let e = to_event(&koji(b"{}"), &r).unwrap();
        assert_eq!(
            e.subject,
            "amqp.org.fedoraproject.prod.buildsys.build.state.change"
        );
        assert!(to_event(&koji(b"{}"), &rules()).is_ok());
    }

    #[test]
    fn senders_cannot_set_the_bridges_or_jetstreams_headers() {
        let mut m = koji(b"{}");
        m.headers.push(("Warden-Topic".into(), "forged".into()));
        m.headers.push(("Nats-Msg-Id".into(), "forged".into()));
        m.headers
            .push(("bad:name\n".into(), "line\r\nbreak".into()));
        let e = to_event(&m, &rules()).unwrap();
        assert_eq!(
            e.headers
                .iter()
                .filter(|(n, _)| n == "Warden-Topic")
                .count(),
            1
        );
        assert_ne!(header(&e, "Warden-Topic"), Some("forged"));
        assert!(header(&e, "Nats-Msg-Id").is_none());
        assert_eq!(header(&e, "bad_name_"), Some("line\\u000d\\u000abreak"));
        // DEL too (found by fuzz/amqp: a routing key with one).
        let mut m = koji(b"{}");
        m.routing_key = "org.fedoraproject.a\u{7f}b";
        let e = to_event(&m, &rules()).unwrap();
        assert_eq!(
            header(&e, "Warden-Topic"),
            Some("org.fedoraproject.a\\u007fb")
        );
        assert_eq!(e.subject, "org.fedoraproject.a%7Fb");
    }

    #[test]
    fn amqp_header_values_render_as_text() {
        let mut t = FieldTable::default();
        t.insert("s".into(), AMQPValue::LongString("x".into()));
        t.insert("n".into(), AMQPValue::LongLongInt(20));
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert(
            "a".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), AMQPValue::Void].into()),
        );
        let mut h = render_headers(Some(&t));
        h.sort();
        assert_eq!(
            h,
            vec![
                ("a".to_string(), "[1,null]".to_string()),
                ("b".to_string(), "true".to_string()),
                ("n".to_string(), "20".to_string()),
                ("s".to_string(), "x".to_string()),
            ]
        );
    }
}
