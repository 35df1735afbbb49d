//! Bus events in the two formats Fedora's bridges use.
//!
//! - fedmsg: `{"topic", "msg_id", "msg", ...}`; messages from before 2015
//!   carry no `msg_id`, so the id is a hash of the whole message.
//! - fedora-messaging: `{"id", "topic", "headers", "body"}`.
//! - fedora-messaging as the AMQP bridge publishes it ([`decode_bridged`]):
//!   the body alone, id and topic in NATS headers.

use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// A decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub message_id: String,
    pub topic: String,
    pub body: Value,
}

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("event of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("not JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("JSON is neither a fedmsg message (msg) nor a fedora-messaging message (body)")]
    UnknownFormat,
    #[error("field {0:?} has the wrong type")]
    InvalidField(&'static str),
}

impl DecodeError {
    /// Every [`DecodeError::reason`].
    pub const REASONS: [&'static str; 4] = [
        "too_large",
        "invalid_json",
        "unknown_format",
        "invalid_field",
    ];

    /// Stable reason code for the dead-letter stream and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::UnknownFormat => "unknown_format",
            DecodeError::InvalidField(_) => "invalid_field",
        }
    }
}

pub fn decode(subject: &str, payload: &[u8], max: usize) -> Result<Event, DecodeError> {
    if payload.len() > max {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max,
        });
    }
    let value: Value = serde_json::from_slice(payload).map_err(DecodeError::InvalidJson)?;
    let Value::Object(obj) = &value else {
        return Err(DecodeError::UnknownFormat);
    };
    let (body, id_field) = if obj.contains_key("msg") {
        (obj.get("msg"), "msg_id")
    } else if obj.contains_key("body") {
        (obj.get("body"), "id")
    } else {
        return Err(DecodeError::UnknownFormat);
    };
    let body = match body {
        Some(b @ Value::Object(_)) => b.clone(),
        _ => {
            return Err(DecodeError::InvalidField(if id_field == "id" {
                "body"
            } else {
                "msg"
            }))
        }
    };
    let topic = match obj.get("topic") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        None | Some(Value::Null) => subject.to_string(),
        Some(_) => return Err(DecodeError::InvalidField("topic")),
    };
    let message_id = match obj.get(id_field) {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        None | Some(Value::Null) => content_id(&value),
        Some(_) => {
            return Err(DecodeError::InvalidField(if id_field == "id" {
                "id"
            } else {
                "msg_id"
            }))
        }
    };
    Ok(Event {
        message_id,
        topic,
        body,
    })
}

/// What the AMQP bridge said about an event in its headers
/// (`warden_shared::subjects::HEADER_EVENT_*`, `Nats-Msg-Id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bridged<'a> {
    pub message_id: Option<&'a str>,
    pub topic: Option<&'a str>,
}

/// An event the AMQP bridge published: `payload` is the fedora-messaging
/// body itself (a JSON object); the id is the AMQP message id the bridge
/// put in `Nats-Msg-Id`, the topic its routing key (else the subject).
pub fn decode_bridged(
    subject: &str,
    bridged: Bridged<'_>,
    payload: &[u8],
    max: usize,
) -> Result<Event, DecodeError> {
    if payload.len() > max {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max,
        });
    }
    let body: Value = serde_json::from_slice(payload).map_err(DecodeError::InvalidJson)?;
    if !body.is_object() {
        return Err(DecodeError::InvalidField("body"));
    }
    let topic = match bridged.topic {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => subject.to_string(),
    };
    let message_id = match bridged.message_id {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => content_id(&body),
    };
    Ok(Event {
        message_id,
        topic,
        body,
    })
}

/// `sha256:<hex>` of the message in canonical form (keys sorted at every
/// level, no whitespace), so key order on the wire does not matter.
pub fn content_id(value: &Value) -> String {
    let mut text = String::new();
    canonical(value, &mut text);
    let digest = Sha256::digest(text.as_bytes());
    let mut id = String::with_capacity(7 + 64);
    id.push_str("sha256:");
    for b in digest {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            out.push('{');
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                canonical(&m[*k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bridged_event_is_the_body_with_id_and_topic_from_headers() {
        let body = br#"{"build_id": 1, "new": 1}"#;
        let b = Bridged {
            message_id: Some("7a4d7c9e-0b5a-4d0e-8c3b-2f1e7e8b9c01"),
            topic: Some("org.fedoraproject.prod.buildsys.build.state.change"),
        };
        let e = decode_bridged(
            "org.fedoraproject.prod.buildsys.build.state.change",
            b,
            body,
            1024,
        )
        .expect("decodes");
        assert_eq!(e.message_id, "7a4d7c9e-0b5a-4d0e-8c3b-2f1e7e8b9c01");
        assert_eq!(
            e.topic,
            "org.fedoraproject.prod.buildsys.build.state.change"
        );
        assert_eq!(e.body["build_id"], 1);
        // A body that has a `body` field of its own is still the body.
        let nested = br#"{"body": {"x": 1}, "id": "inner"}"#;
        let e = decode_bridged("s", b, nested, 1024).expect("decodes");
        assert_eq!(e.message_id, "7a4d7c9e-0b5a-4d0e-8c3b-2f1e7e8b9c01");
        assert_eq!(e.body["id"], "inner");
    }

    #[test]
    fn a_bridged_event_without_headers_falls_back_to_subject_and_content_id() {
        let none = Bridged {
            message_id: None,
            topic: None,
        };
        let e = decode_bridged("org.x.y", none, br#"{"a": 1}"#, 1024).expect("decodes");
        assert_eq!(e.topic, "org.x.y");
        assert!(e.message_id.starts_with("sha256:"));
        for (payload, reason) in [
            (&b"[1]"[..], "invalid_field"),
            (&b"nope"[..], "invalid_json"),
            (&[b' '; 2048][..], "too_large"),
        ] {
            assert_eq!(
                decode_bridged("s", none, payload, 1024)
                    .expect_err("refused")
                    .reason(),
                reason
            );
        }
    }
    use serde_json::Map;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/../../tests/fixtures/messages/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture")
    }

    #[test]
    fn fedmsg_with_msg_id() {
        let e = decode(
            "x",
            &fixture("10_buildsys.build.state.change__TestKojiBuildStateChangeComplete.json"),
            1 << 20,
        )
        .expect("decode");
        assert_eq!(e.message_id, "2015-6395fb7a-e5a7-4b95-858a-ff7b80410e7f");
        assert_eq!(
            e.topic,
            "org.fedoraproject.prod.buildsys.build.state.change"
        );
        assert_eq!(e.body["name"], "ansible");
    }

    #[test]
    fn old_fedmsg_without_msg_id_gets_a_stable_content_id() {
        let raw = fixture("06_buildsys.build.state.change__TestKojiBuildStateChangeStart.json");
        let a = decode("x", &raw, 1 << 20).expect("decode");
        assert!(a.message_id.starts_with("sha256:"));
        // Same content, keys in another order and other spacing: same id.
        let v: Value = serde_json::from_slice(&raw).expect("json");
        let Value::Object(m) = v else { panic!() };
        let mut rev = Map::new();
        for (k, v) in m.into_iter().rev() {
            rev.insert(k, v);
        }
        let b = decode(
            "x",
            serde_json::to_string_pretty(&Value::Object(rev))
                .expect("json")
                .as_bytes(),
            1 << 20,
        )
        .expect("decode");
        assert_eq!(a.message_id, b.message_id);
        let other =
            fixture("07_buildsys.build.state.change__TestKojiBuildStateChangeStartNoOwner.json");
        assert_ne!(
            a.message_id,
            decode("x", &other, 1 << 20).expect("decode").message_id
        );
    }

    #[test]
    fn fedora_messaging_envelope() {
        let e = decode(
            "org.fedoraproject.prod.buildsys.tag",
            &fixture("fedora_messaging_envelope.json"),
            1 << 20,
        )
        .expect("decode");
        assert!(!e.message_id.is_empty());
        assert!(e.body.is_object());
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert_eq!(
            decode("x", b"{not json", 1000).expect_err("bad").reason(),
            "invalid_json"
        );
        assert_eq!(
            decode("x", b"[1,2]", 1000).expect_err("bad").reason(),
            "unknown_format"
        );
        assert_eq!(
            decode("x", br#"{"hello":"world"}"#, 1000)
                .expect_err("bad")
                .reason(),
            "unknown_format"
        );
        assert_eq!(
            decode("x", br#"{"msg":"text"}"#, 1000)
                .expect_err("bad")
                .reason(),
            "invalid_field"
        );
        assert_eq!(
            decode("x", br#"{"msg":{},"msg_id":5}"#, 1000)
                .expect_err("bad")
                .reason(),
            "invalid_field"
        );
        assert_eq!(
            decode("x", &[b' '; 2000], 1000).expect_err("bad").reason(),
            "too_large"
        );
        // Metrics export every reason at zero from this list.
        for bad in [
            &b"{not json"[..],
            b"[1,2]",
            br#"{"msg":"text"}"#,
            &[b' '; 2000],
        ] {
            let reason = decode("x", bad, 1000).expect_err("bad").reason();
            assert!(DecodeError::REASONS.contains(&reason), "{reason}");
        }
    }

    #[test]
    fn topic_falls_back_to_the_subject() {
        let e = decode("warden.events.x", br#"{"id":"1","body":{"a":1}}"#, 1000).expect("decode");
        assert_eq!(
            (e.topic.as_str(), e.message_id.as_str()),
            ("warden.events.x", "1")
        );
    }
}
