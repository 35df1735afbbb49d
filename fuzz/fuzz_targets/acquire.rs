//! Acquire requests (`warden.sched.acquire`): decoded as the scheduler
//! does, then its decisions: limits, whose session, the dispatch record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_scheduler::acquire::{dispatched, grant, limits, request_resources, session_verdict};
use warden_shared::messages::AcquireRequest;
use warden_shared::session::SessionState;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<AcquireRequest>(data) else {
        return;
    };
    warden_fuzz::assert_round_trips(&req);
    let config = warden_fuzz::example_config();
    let (wait, max) = limits(&req, &config);
    assert!(wait <= config.scheduler.acquire_wait);
    assert!((1..=1000).contains(&max));
    let resources = request_resources(&req);
    if let Some(r) = &req.resource {
        assert!(resources.contains(r) || !req.resources.is_empty());
    }
    assert!(
        session_verdict(&req, None).is_err(),
        "a session never created"
    );
    let other = format!("{}-other", req.bot_id);
    assert!(
        session_verdict(&req, Some((SessionState::Active, &other))).is_err(),
        "another bot's session"
    );
    for state in SessionState::ALL {
        let v = session_verdict(&req, Some((state, &req.bot_id)));
        assert_eq!(v.is_ok(), state == SessionState::Active);
    }
    let job = warden_fuzz::scheduled(uuid::Uuid::from_u128(7), "t");
    let leased = dispatched(job, &req, warden_fuzz::at(1)).expect("SCHEDULED may be dispatched");
    assert!(leased.is_held_by(&req.session, leased.attempt));
    let g = grant(&leased);
    assert_eq!(g.epoch, leased.attempt);
    warden_fuzz::assert_job_round_trips(&leased);
});
