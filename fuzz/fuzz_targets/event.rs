//! Bus events (fedmsg and fedora-messaging JSON): the trigger's decoder,
//! then the rules that turn an event into jobs.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use warden_shared::job::{derived_job_id, Job};
use warden_trigger::decode::{decode, DecodeError};
use warden_trigger::rules::Rules;

const SUBJECT: &str = "org.fedoraproject.prod.buildsys.build.state.change";

fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| Rules::new(warden_fuzz::example_config()))
}

fuzz_target!(|data: &[u8]| {
    let config = warden_fuzz::example_config();
    let max = config.trigger.max_event_bytes;
    let event = match decode(SUBJECT, data, max) {
        Ok(e) => e,
        Err(e) => {
            assert!(DecodeError::REASONS.contains(&e.reason()));
            let _ = e.to_string();
            return;
        }
    };
    assert!(event.body.is_object());
    assert!(!event.message_id.is_empty() && !event.topic.is_empty());

    // The same message re-encoded is the same event.
    let value: Value = serde_json::from_slice(data).expect("decoded once already");
    let again = serde_json::to_vec(&value).expect("a JSON value encodes");
    if again.len() <= max {
        let back = decode(SUBJECT, &again, max).expect("a re-encoded event decodes");
        assert_eq!(back.topic, event.topic);
        assert!(warden_fuzz::same_json(&back.body, &event.body));
        let reparsed: Value = serde_json::from_slice(&again).expect("re-encoded JSON");
        if reparsed == value {
            assert_eq!(back.message_id, event.message_id);
        }
    }

    let plan = rules().plan(&event);
    assert_eq!(plan, rules().plan(&event), "planning is deterministic");
    for p in plan.jobs {
        assert_eq!(p.id, derived_job_id(&event.message_id, &p.task));
        assert!(config.tasks.contains_key(&p.task));
        let job = Job::new(
            p.id,
            p.task,
            p.args,
            p.pool,
            p.priority,
            Some(p.source),
            "trigger",
            warden_fuzz::at(0),
        );
        warden_fuzz::assert_job_round_trips(&job);
    }
});
