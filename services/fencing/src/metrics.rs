//! Every fencing metric, declared once; [`init`] registers them and
//! exports every closed label value when the service starts.

use std::sync::OnceLock;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
use warden_shared::error::ErrorCode;
use warden_shared::metrics::{register, touch, touch_each};
use warden_shared::session::SessionState;

pub struct Metrics {
    pub requests: IntCounterVec,
    pub rejected: IntCounterVec,
    pub expired: IntCounter,
    pub deleted: IntCounter,
    pub corrupt: IntCounter,
    pub sessions: IntGaugeVec,
}

/// `op` and `result` of `warden_fencing_requests_total`.
pub const OPS: [&str; 4] = ["create", "executor_create", "heartbeat", "close"];
pub const RESULTS: [&str; 2] = ["ok", "error"];
/// `code` of `warden_fencing_rejected_total`: a request that could not be
/// decoded or a create without a bot id, the two fencing errors, the
/// identity refusals (a bot acting as another, a subject naming no bot,
/// what the registry does not allow) and the bounds.
pub const REJECT_CODES: [ErrorCode; 12] = [
    ErrorCode::InvalidRequest,
    ErrorCode::UnknownSession,
    ErrorCode::SessionSuperseded,
    ErrorCode::BotUnidentified,
    ErrorCode::BotMismatch,
    ErrorCode::NotYourSession,
    ErrorCode::BotNotRegistered,
    ErrorCode::BotRegistered,
    ErrorCode::PoolNotAllowed,
    ErrorCode::CapacityNotAllowed,
    ErrorCode::RateLimited,
    ErrorCode::TooManyLeases,
];

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        requests: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_fencing_requests_total",
                    "Session requests by operation and result",
                ),
                &["op", "result"],
            )
            .expect("valid metric"),
        ),
        rejected: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_fencing_rejected_total",
                    "Session requests rejected, by error code",
                ),
                &["code"],
            )
            .expect("valid metric"),
        ),
        sessions: register(
            IntGaugeVec::new(
                Opts::new(
                    "warden_fencing_sessions",
                    "Bot sessions on record, by state (active, quarantined, expired, closed; an active one past its timeout counts as expired), as of the last sweep",
                ),
                &["state"],
            )
            .expect("valid metric"),
        ),
        expired: register(
            IntCounter::new(
                "warden_fencing_sessions_expired_total",
                "Sessions expired for missing heartbeats",
            )
            .expect("valid metric"),
        ),
        deleted: register(
            IntCounter::new(
                "warden_fencing_sessions_deleted_total",
                "Ended sessions deleted after fencing.closed_session_retention",
            )
            .expect("valid metric"),
        ),
        corrupt: register(
            IntCounter::new(
                "warden_fencing_corrupt_sessions_total",
                "Undecodable session records skipped by the expiry sweep (counted each sweep they are seen)",
            )
            .expect("valid metric"),
        ),
    })
}

/// Registers every fencing metric with every operation, result and
/// rejection code at zero. The sessions gauge is left to the first sweep:
/// a zero before the bucket was read would claim an empty fleet.
pub fn init() {
    let m = metrics();
    for op in OPS {
        for result in RESULTS {
            touch(&m.requests, &[op, result]);
        }
    }
    touch_each(&m.rejected, &REJECT_CODES.map(ErrorCode::as_str));
}

/// Publishes one sweep's count of sessions per state; every state is
/// exported, 0 when none is in it.
pub fn set_sessions(count: impl Fn(SessionState) -> i64) {
    let m = metrics();
    for state in SessionState::ALL {
        m.sessions
            .with_label_values(&[state.as_str()])
            .set(count(state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counters_at_zero_and_every_session_state() {
        init();
        set_sessions(|s| i64::from(s == SessionState::Active) * 3);
        let text = warden_shared::metrics::render();
        for series in [
            r#"warden_fencing_requests_total{op="heartbeat",result="error"} 0"#,
            r#"warden_fencing_rejected_total{code="session_superseded"} 0"#,
            r#"warden_fencing_sessions{state="active"} 3"#,
            r#"warden_fencing_sessions{state="quarantined"} 0"#,
            "warden_fencing_sessions_expired_total 0",
            "warden_fencing_sessions_deleted_total 0",
            r#"warden_fencing_rejected_total{code="bot_mismatch"} 0"#,
            "warden_fencing_corrupt_sessions_total 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }
}
