//! Session requests (`warden.session.{create,heartbeat,close}`): decoded
//! as the fencing service does; a create is validated and made into the
//! session record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_fencing::decide::{new_session, validate_create};
use warden_shared::messages::{CloseSession, CreateSession, Heartbeat};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<CreateSession>(data) {
        warden_fuzz::assert_round_trips(&req);
        if validate_create(&req).is_ok() {
            assert!(!req.bot_id.trim().is_empty());
            let s = new_session(&req, "s-fuzz".into(), warden_fuzz::at(0));
            assert_eq!(s.bot_id, req.bot_id);
            let bytes = serde_json::to_vec(&s).expect("a session encodes");
            let back: warden_shared::session::Session =
                serde_json::from_slice(&bytes).expect("an encoded session decodes");
            assert_eq!(back, s);
            let _ = warden_shared::session::bot_key(&req.bot_id);
        }
    }
    if let Ok(req) = serde_json::from_slice::<Heartbeat>(data) {
        warden_fuzz::assert_round_trips(&req);
        let _ = warden_shared::session::session_key(&req.session);
    }
    if let Ok(req) = serde_json::from_slice::<CloseSession>(data) {
        warden_fuzz::assert_round_trips(&req);
    }
});
