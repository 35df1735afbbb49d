//! When a worker must stop its own tasks: the fencing service expires a
//! session one session timeout after the last heartbeat it recorded, and
//! then the scheduler may lease the job to another bot. So a worker whose
//! heartbeats go unanswered must have stopped its tasks before that.
//!
//! The worker counts its silence from when it *sent* the last heartbeat
//! the fencing service answered (which the service recorded later, so the
//! count never runs behind the service's), and stops its tasks at
//! [`self_fence_after`] of the timeout, on a timer of its own
//! ([`watchdog_tick`]), leaving the rest of the timeout for the kill to
//! land. It takes no new work once half the timeout passed without an
//! answer ([`may_acquire`]). A heartbeat waits for its answer
//! [`heartbeat_timeout`], so a lost one is retried well within the limit:
//! one or two lost heartbeats in a row do not fence.
//!
//! The scheduler leans on the same timing when it takes a lease back from
//! a holder that may still be running it ([`holder_stopped_within`]).

use std::time::Duration;

/// Silence after which the worker stops its tasks: four fifths of the
/// session timeout.
pub fn self_fence_after(timeout: Duration) -> Duration {
    timeout.mul_f64(0.8)
}

/// Whether `silence` (since the last answered heartbeat was sent) calls
/// for stopping every task.
pub fn fence_due(silence: Duration, timeout: Duration) -> bool {
    silence >= self_fence_after(timeout)
}

/// Whether the worker may ask for new work after `silence`: not once half
/// the timeout went by without an answer (heartbeats go every third of
/// it, so that is at least one lost).
pub fn may_acquire(silence: Duration, timeout: Duration) -> bool {
    silence < timeout / 2
}

/// How long after a lease was taken back from a live session its holder
/// has surely stopped the attempt: a heartbeat sent after the take-back
/// was answered with the lease to cancel (killed at once), or no such
/// answer came and the watchdog stopped every task by
/// [`self_fence_after`] plus one [`watchdog_tick`] of the silence, which
/// began before the take-back. A full session timeout covers both; until
/// then the job must not be leased again, or it runs twice at once.
pub fn holder_stopped_within(timeout: Duration) -> Duration {
    timeout
}

/// How long a heartbeat waits for its answer: a sixth of the timeout
/// (half the heartbeat period), at least 100 ms.
pub fn heartbeat_timeout(timeout: Duration) -> Duration {
    (timeout / 6).max(Duration::from_millis(100))
}

/// How often the watchdog looks: a fortieth of the timeout, between
/// 25 ms and 250 ms.
pub fn watchdog_tick(timeout: Duration) -> Duration {
    (timeout / 40).clamp(Duration::from_millis(25), Duration::from_millis(250))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Property: for any timeout, the worker's last look after the
    /// limit plus the kill margin still falls before the session can
    /// expire, with a fifth of the timeout left at most one tick late.
    #[test]
    fn the_tasks_stop_before_the_session_can_expire() {
        for t in [
            MS(1000),
            MS(3000),
            MS(8000),
            MS(10_000),
            MS(60_000),
            MS(600_000),
        ] {
            let latest_stop = self_fence_after(t) + watchdog_tick(t);
            assert!(latest_stop < t, "{t:?}: {latest_stop:?}");
            assert!(t - latest_stop >= t.mul_f64(0.15), "{t:?}");
            assert!(!fence_due(self_fence_after(t) - MS(1), t));
            assert!(fence_due(self_fence_after(t), t));
        }
    }

    /// Property: a holder whose heartbeats all go unanswered from the
    /// take-back on has fenced itself before the job may be leased again.
    #[test]
    fn a_taken_back_lease_waits_for_a_silent_holder_to_fence_itself() {
        for t in [MS(1000), MS(3000), MS(10_000), MS(60_000), MS(600_000)] {
            let fenced_by = self_fence_after(t) + watchdog_tick(t);
            assert!(holder_stopped_within(t) >= fenced_by, "{t:?}");
        }
    }

    /// One lost heartbeat (it waits its timeout, then is retried half a
    /// second later) does not fence at the usual timeouts.
    #[test]
    fn one_lost_heartbeat_does_not_fence() {
        for t in [MS(3000), MS(10_000), MS(60_000)] {
            let period = t / 3;
            // The answered one was sent at 0; the next, at one period, is
            // lost; the retry goes out after its timeout and 500 ms.
            let retry_sent = period + heartbeat_timeout(t) + MS(500);
            assert!(!fence_due(retry_sent, t), "{t:?}");
        }
    }

    #[test]
    fn no_new_work_once_a_heartbeat_was_lost() {
        let t = MS(9000);
        // Between two answered heartbeats silence reaches one period.
        assert!(may_acquire(t / 3 + MS(200), t));
        assert!(!may_acquire(t / 2, t));
        assert!(!may_acquire(self_fence_after(t), t));
    }

    #[test]
    fn timers_scale_with_the_timeout_within_bounds() {
        assert_eq!(heartbeat_timeout(MS(300)), MS(100));
        assert_eq!(heartbeat_timeout(MS(60_000)), MS(10_000));
        assert_eq!(watchdog_tick(MS(100)), MS(25));
        assert_eq!(watchdog_tick(MS(4000)), MS(100));
        assert_eq!(watchdog_tick(MS(600_000)), MS(250));
    }
}
