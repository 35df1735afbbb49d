//! AMQP messages (fedora-messaging on RabbitMQ) as the bridge gets them:
//! routing key, message id and body from a sender on the broker. The
//! bridge never panics on one; what it lets through maps to a valid NATS
//! subject that maps back to the routing key, carries only headers NATS
//! can hold, and is an event the trigger decodes (the bridge never passes
//! on what the trigger would dead-letter for its form).
//!
//! Input: one byte n, then n bytes of routing key, one byte m, m bytes of
//! message id, the rest the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_bridge::inbound::{to_event, Message, Rules, Undecodable};
use warden_bridge::subject;
use warden_trigger::decode::{decode_bridged, Bridged};

const MAX: usize = 64 * 1024;

fn take(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    rest.split_at((n as usize).min(rest.len()))
}

fuzz_target!(|data: &[u8]| {
    let (key, rest) = take(data);
    let (id, body) = take(rest);
    let key = String::from_utf8_lossy(key);
    let id = String::from_utf8_lossy(id);

    // The subject mapping alone: any routing key round-trips.
    let s = subject::subject(&key);
    assert!(
        s.split('.').all(|t| !t.is_empty()
            && t != "*"
            && t != ">"
            && !t.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())),
        "{key:?} -> {s:?}"
    );
    assert_eq!(subject::routing_key(&s).as_deref(), Some(key.as_ref()));

    let rules = Rules {
        subject_prefix: String::new(),
        event_subjects: vec![">".into()],
        max_bytes: MAX,
    };
    let msg = Message {
        exchange: "amq.topic",
        routing_key: &key,
        message_id: (!id.is_empty()).then_some(id.as_ref()),
        content_type: Some("application/json"),
        content_encoding: Some("utf-8"),
        timestamp: None,
        headers: vec![("sent-at".into(), id.to_string())],
        body,
    };
    let event = match to_event(&msg, &rules) {
        Ok(e) => e,
        Err(e) => {
            assert!(Undecodable::REASONS.contains(&e.reason()));
            let _ = e.to_string();
            return;
        }
    };
    for (name, value) in &event.headers {
        assert!(!name.is_empty() && !name.contains(':'), "{name:?}");
        assert!(!value.chars().any(char::is_control), "{value:?}");
    }
    assert!(!event.msg_id.chars().any(char::is_control));
    let topic = event
        .headers
        .iter()
        .find(|(n, _)| n == "Warden-Topic")
        .map(|(_, v)| v.as_str());
    let decoded = decode_bridged(
        &event.subject,
        Bridged {
            message_id: Some(&event.msg_id),
            topic,
        },
        body,
        MAX,
    )
    .expect("the trigger decodes what the bridge let through");
    assert!(decoded.body.is_object());
    assert_eq!(decoded.message_id, event.msg_id);
});
