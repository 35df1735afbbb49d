//! The job state machine of docs/design.md as one pure transition table.
//!
//! Every writer of job state (scheduler, API, fencing, health) asks
//! [`transition`] first; nothing else decides what is legal.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Scheduled,
    Running,
    Finished,
    Crashed,
    Shelved,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Scheduled,
        JobState::Running,
        JobState::Finished,
        JobState::Crashed,
        JobState::Shelved,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "SCHEDULED",
            JobState::Running => "RUNNING",
            JobState::Finished => "FINISHED",
            JobState::Crashed => "CRASHED",
            JobState::Shelved => "SHELVED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    /// No worker will touch the job again unless a person (or the retry
    /// policy, for CRASHED) asks.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Scheduled | JobState::Running)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A name that is not a [`JobState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown state {0:?} (expected SCHEDULED, RUNNING, FINISHED, CRASHED, SHELVED or CANCELLED)"
)]
pub struct UnknownState(pub String);

/// The message of an error reply.
impl From<UnknownState> for String {
    fn from(e: UnknownState) -> String {
        e.to_string()
    }
}

impl std::str::FromStr for JobState {
    type Err = UnknownState;
    /// Accepts the design's spelling in any case (`finished`, `FINISHED`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// What happens to a job. History entries name the action that made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The job was made (API, trigger, CLI).
    Create,
    /// The scheduler leased the job to a session: a new attempt begins.
    Dispatch,
    /// The worker reports it started the task (RUNNING stays RUNNING).
    Start,
    /// The task ran to its end with a verdict.
    Finish,
    /// The execution broke.
    Crash,
    /// The attempt's lease is gone (worker lost, released on shutdown,
    /// session superseded): the job waits for a worker again.
    Requeue,
    /// A crashed, shelved or cancelled job is put back to SCHEDULED by a
    /// person or by the retry policy.
    Retry,
    /// Retries used up or a poison job: waits for a person.
    Shelve,
    /// A person or policy stopped it.
    Cancel,
    /// A report that was not applied (stale epoch, unknown session, illegal
    /// transition). Recorded, never a state change.
    RejectReport,
}

impl Action {
    pub const ALL: [Action; 10] = [
        Action::Create,
        Action::Dispatch,
        Action::Start,
        Action::Finish,
        Action::Crash,
        Action::Requeue,
        Action::Retry,
        Action::Shelve,
        Action::Cancel,
        Action::RejectReport,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Dispatch => "dispatch",
            Action::Start => "start",
            Action::Finish => "finish",
            Action::Crash => "crash",
            Action::Requeue => "requeue",
            Action::Retry => "retry",
            Action::Shelve => "shelve",
            Action::Cancel => "cancel",
            Action::RejectReport => "reject_report",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("illegal transition: cannot {action} a {from} job")]
pub struct IllegalTransition {
    pub from: JobState,
    pub action: Action,
}

/// The state `action` leads to from `from`, or why it cannot happen.
///
/// `Create` has no source state and `RejectReport` changes nothing, so both
/// are illegal here: callers record them without a transition.
pub fn transition(from: JobState, action: Action) -> Result<JobState, IllegalTransition> {
    use Action as A;
    use JobState as S;
    let to = match (from, action) {
        (S::Scheduled, A::Dispatch) => S::Running,
        (S::Running, A::Start) => S::Running,
        (S::Running, A::Finish) => S::Finished,
        (S::Running, A::Crash) => S::Crashed,
        (S::Running, A::Requeue) => S::Scheduled,
        (S::Crashed | S::Shelved | S::Cancelled, A::Retry) => S::Scheduled,
        // A scheduled job can be shelved as poison before its next dispatch,
        // a running one when its lease is broken for the last allowed time,
        // a crashed one when the retry policy gives up.
        (S::Scheduled | S::Running | S::Crashed, A::Shelve) => S::Shelved,
        (S::Scheduled | S::Running, A::Cancel) => S::Cancelled,
        _ => return Err(IllegalTransition { from, action }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use JobState as S;

    /// The whole table, written out independently of `transition`: every
    /// (state, action) pair not listed here must be rejected.
    const LEGAL: &[(JobState, Action, JobState)] = &[
        (S::Scheduled, A::Dispatch, S::Running),
        (S::Scheduled, A::Shelve, S::Shelved),
        (S::Scheduled, A::Cancel, S::Cancelled),
        (S::Running, A::Start, S::Running),
        (S::Running, A::Finish, S::Finished),
        (S::Running, A::Crash, S::Crashed),
        (S::Running, A::Requeue, S::Scheduled),
        (S::Running, A::Shelve, S::Shelved),
        (S::Running, A::Cancel, S::Cancelled),
        (S::Crashed, A::Retry, S::Scheduled),
        (S::Crashed, A::Shelve, S::Shelved),
        (S::Shelved, A::Retry, S::Scheduled),
        (S::Cancelled, A::Retry, S::Scheduled),
    ];

    #[test]
    fn every_pair_matches_the_table() {
        let mut legal = 0;
        for from in JobState::ALL {
            for action in Action::ALL {
                let expected = LEGAL
                    .iter()
                    .find(|(f, a, _)| *f == from && *a == action)
                    .map(|(_, _, to)| *to);
                match (transition(from, action), expected) {
                    (Ok(to), Some(want)) => {
                        assert_eq!(to, want, "{from} --{action}-->");
                        legal += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(e, IllegalTransition { from, action });
                    }
                    (got, want) => panic!("{from} --{action}--> gave {got:?}, table says {want:?}"),
                }
            }
        }
        assert_eq!(legal, LEGAL.len());
    }

    #[test]
    fn finished_is_final() {
        for action in Action::ALL {
            assert!(
                transition(S::Finished, action).is_err(),
                "FINISHED --{action}-->"
            );
        }
    }

    #[test]
    fn only_scheduled_jobs_are_dispatched() {
        for from in JobState::ALL {
            assert_eq!(transition(from, A::Dispatch).is_ok(), from == S::Scheduled);
        }
    }

    #[test]
    fn worker_reports_need_a_running_job() {
        for from in JobState::ALL {
            for action in [A::Start, A::Finish, A::Crash, A::Requeue] {
                assert_eq!(
                    transition(from, action).is_ok(),
                    from == S::Running,
                    "{from} {action}"
                );
            }
        }
    }

    #[test]
    fn states_parse_case_insensitively_and_serialize_upper() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().to_lowercase().parse::<JobState>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).expect("json"),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("DONE".parse::<JobState>().is_err());
    }

    #[test]
    fn error_message_names_both_sides() {
        let e = transition(S::Finished, A::Dispatch).expect_err("illegal");
        assert_eq!(
            e.to_string(),
            "illegal transition: cannot dispatch a FINISHED job"
        );
    }
}
