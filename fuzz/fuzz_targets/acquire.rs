//! Acquire requests (`warden.sched.acquire.<bot>`): decoded as the
//! scheduler does, then its decisions: limits, whose session, the
//! dispatch record and the grant with its secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_scheduler::acquire::{dispatched, grant, limits, request_resources, session_verdict};
use warden_shared::messages::{AcquireRequest, MESSAGE_VERSION};
use warden_shared::session::{Session, SessionState};

/// `req`'s session as fencing would have written it, for bot `bot`.
fn session_of(req: &AcquireRequest, bot: &str, state: SessionState) -> Session {
    Session {
        version: MESSAGE_VERSION,
        name: req.session.clone(),
        bot_id: bot.into(),
        resource: None,
        resources: Vec::new(),
        agent_instance: String::new(),
        pools: req.pools.clone(),
        capacity: 4,
        agent_version: String::new(),
        timeout_ms: None,
        state,
        created_at: warden_fuzz::at(0),
        last_heartbeat: warden_fuzz::at(0),
        superseded_by: None,
        leases: Vec::new(),
        ended_at: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<AcquireRequest>(data) else {
        return;
    };
    warden_fuzz::assert_round_trips(&req);
    let config = warden_fuzz::example_config();
    let (wait, max) = limits(&req, &config, 4);
    assert!(wait <= config.scheduler.acquire_wait);
    assert!((1..=4).contains(&max), "never more than the capacity");
    let resources = request_resources(&req);
    if let Some(r) = &req.resource {
        assert!(resources.contains(r) || !req.resources.is_empty());
    }
    let bot = req.bot_id.as_str();
    assert!(
        session_verdict(&req, bot, None).is_err(),
        "a session never created"
    );
    let other = format!("{bot}-other");
    assert!(
        session_verdict(
            &req,
            &other,
            Some(&session_of(&req, bot, SessionState::Active))
        )
        .is_err(),
        "credentials of another bot"
    );
    assert!(
        session_verdict(
            &req,
            bot,
            Some(&session_of(&req, &other, SessionState::Active))
        )
        .is_err(),
        "another bot's session"
    );
    for state in SessionState::ALL {
        let v = session_verdict(&req, bot, Some(&session_of(&req, bot, state)));
        assert_eq!(v.is_ok(), state == SessionState::Active);
    }
    let mut narrower = session_of(&req, bot, SessionState::Active);
    narrower.pools.pop();
    if req.pools.iter().any(|p| !narrower.pools.contains(p)) {
        assert!(
            session_verdict(&req, bot, Some(&narrower)).is_err(),
            "a pool the session does not serve"
        );
    }
    let job = warden_fuzz::scheduled(uuid::Uuid::from_u128(7), "t");
    let secret = warden_shared::lease_secret::generate();
    let hash = warden_shared::lease_secret::hash(&secret);
    let leased =
        dispatched(job, &req, hash, warden_fuzz::at(1)).expect("SCHEDULED may be dispatched");
    assert!(leased.is_held_by(&req.session, leased.attempt));
    let g = grant(&leased, &secret);
    assert_eq!(g.epoch, leased.attempt);
    assert_eq!(g.secret.as_deref(), Some(secret.as_str()));
    warden_fuzz::assert_job_round_trips(&leased);
});
