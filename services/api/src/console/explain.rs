//! The sentences and groupings the job page is built from, as pure
//! functions: a job's attempts from its history, why a waiting job waits,
//! and how a job ended.

use chrono::{DateTime, Utc};
use warden_shared::job::{HistoryEntry, Job};
use warden_shared::messages::PoolQueue;
use warden_shared::state::Action;
use warden_shared::JobState;

/// One attempt of a job as the timeline shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt<'a> {
    /// The attempt number (0: what happened before the first dispatch).
    pub number: u32,
    pub bot_id: Option<&'a str>,
    pub resource: Option<&'a str>,
    pub leased_at: Option<DateTime<Utc>>,
    /// The entry that ended it (finish, crash, requeue, cancel), if any.
    pub end: Option<&'a HistoryEntry>,
    /// Reports that were refused during it (stale epoch, unknown session).
    pub rejected: usize,
    pub entries: Vec<&'a HistoryEntry>,
}

/// The job's history grouped by attempt, oldest first.
pub fn attempts(job: &Job) -> Vec<Attempt<'_>> {
    let mut out: Vec<Attempt<'_>> = Vec::new();
    for e in &job.history {
        let i = match out.iter().position(|a| a.number == e.attempt) {
            Some(i) => i,
            None => {
                out.push(Attempt {
                    number: e.attempt,
                    bot_id: None,
                    resource: None,
                    leased_at: None,
                    end: None,
                    rejected: 0,
                    entries: Vec::new(),
                });
                out.len() - 1
            }
        };
        let a = &mut out[i];
        match e.action {
            Action::Dispatch => {
                a.bot_id = e.bot_id.as_deref().or(a.bot_id);
                a.resource = e.resource.as_deref().or(a.resource);
                a.leased_at = Some(e.at);
            }
            Action::RejectReport => a.rejected += 1,
            Action::Finish | Action::Crash | Action::Requeue | Action::Cancel
                if a.end.is_none() && a.number > 0 =>
            {
                a.end = Some(e);
            }
            _ => {}
        }
        if a.bot_id.is_none() {
            a.bot_id = e.bot_id.as_deref();
        }
        a.entries.push(e);
    }
    out.sort_by_key(|a| a.number);
    out
}

/// Why a SCHEDULED job has not run yet, in words; `None` when it is not
/// waiting. `pool` is the scheduler's view of the job's pool, when it
/// answered.
pub fn why_waiting(job: &Job, pool: Option<&PoolQueue>, now: DateTime<Utc>) -> Option<String> {
    if job.state != JobState::Scheduled {
        return None;
    }
    if let Some(due) = job.not_before.filter(|d| *d > now) {
        let secs = (due - now).num_milliseconds() as f64 / 1000.0;
        return Some(format!(
            "Waiting for a delayed retry: due at {} (in {secs:.1} s).",
            due.format("%Y-%m-%d %H:%M:%S UTC")
        ));
    }
    Some(match pool {
        None => format!(
            "Ready in pool {}; the scheduler did not say how its queue stands.",
            job.pool
        ),
        Some(p) if !p.served => format!(
            "Ready, but no active bot on an open resource serves pool {}: it runs when one does.",
            job.pool
        ),
        Some(p) => format!(
            "Ready in pool {}, waiting for a free bot ({} ready in the pool, oldest waiting {} s).",
            job.pool, p.ready, p.oldest_wait_seconds
        ),
    })
}

/// How the job stands, in one sentence.
pub fn status_line(job: &Job) -> String {
    let cause = || {
        let mut s = job.blame_detail();
        if let Some(d) = job.description.as_deref().filter(|d| !d.is_empty()) {
            s.push_str(": ");
            s.push_str(d);
        }
        s
    };
    let last_note = |action: Action| {
        job.history
            .iter()
            .rev()
            .find(|e| e.action == action)
            .and_then(|e| e.note.clone())
    };
    match job.state {
        JobState::Scheduled if job.attempt == 0 => "Scheduled: not run yet.".to_string(),
        JobState::Scheduled => match job.blame {
            Some(_) => format!(
                "Scheduled again after attempt {} ({}).",
                job.attempt,
                cause()
            ),
            None => format!("Scheduled again after attempt {}.", job.attempt),
        },
        JobState::Running => match &job.lease {
            Some(l) => format!(
                "Running attempt {} on bot {}{}.",
                job.attempt,
                l.bot_id,
                l.resource
                    .as_deref()
                    .map(|r| format!(" (resource {r})"))
                    .unwrap_or_default()
            ),
            None => format!("Running attempt {}.", job.attempt),
        },
        JobState::Finished => format!(
            "Finished at attempt {} with outcome {}.",
            job.attempt,
            job.outcome.as_deref().unwrap_or("(none)")
        ),
        JobState::Crashed => format!("Crashed at attempt {}: {}.", job.attempt, cause()),
        JobState::Shelved => format!(
            "Shelved, waiting for a person: {}.",
            last_note(Action::Shelve).unwrap_or_else(cause)
        ),
        JobState::Cancelled => format!(
            "Cancelled: {}.",
            last_note(Action::Cancel).unwrap_or_else(|| "by a person".to_string())
        ),
    }
}

/// Why a CRASHED job was not retried by the policy, in words; `retryable`
/// is the policy's answer for its blame and detail.
pub fn not_retried_because(job: &Job, retryable: bool) -> Option<String> {
    if job.state != JobState::Crashed {
        return None;
    }
    let what = job.blame_detail();
    Some(if !job.retry {
        "Not retried: the job was submitted with automatic retries off.".to_string()
    } else if !retryable {
        format!("Not retried: the retry policy does not retry {what} (running it again would fail the same way, or it needs a person). Retry it by hand once the cause is fixed.")
    } else {
        format!("Not retried automatically ({what}).")
    })
}

/// Whether the console offers Retry / Cancel for a job in `state` (the
/// API decides; these only say which buttons to show).
pub fn can_retry(state: JobState) -> bool {
    matches!(
        state,
        JobState::Shelved | JobState::Crashed | JobState::Cancelled
    )
}

pub fn can_cancel(state: JobState) -> bool {
    matches!(state, JobState::Scheduled | JobState::Running)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use uuid::Uuid;
    use warden_shared::Blame;

    fn entry(at: i64, action: Action, attempt: u32, bot: Option<&str>) -> HistoryEntry {
        HistoryEntry {
            at: DateTime::from_timestamp(1_800_000_000 + at, 0).expect("time"),
            action,
            attempt,
            from: None,
            to: None,
            actor: "scheduler".into(),
            bot_id: bot.map(str::to_string),
            resource: bot.map(|b| format!("{b}-host")),
            note: None,
        }
    }

    fn job(state: JobState) -> Job {
        let mut j = Job::new(
            Uuid::nil(),
            "t".into(),
            BTreeMap::new(),
            "p".into(),
            0,
            None,
            "api",
            DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
        );
        j.state = state;
        j
    }

    #[test]
    fn attempts_follow_the_history_with_who_ran_them_and_how_they_ended() {
        let mut j = job(JobState::Finished);
        j.history = vec![
            entry(0, Action::Create, 0, None),
            entry(1, Action::Dispatch, 1, Some("bot-a")),
            entry(2, Action::Start, 1, Some("bot-a")),
            entry(3, Action::Crash, 1, Some("bot-a")),
            entry(3, Action::Retry, 1, None),
            entry(9, Action::Dispatch, 2, Some("bot-b")),
            entry(10, Action::RejectReport, 1, Some("bot-a")),
            entry(12, Action::Finish, 2, Some("bot-b")),
        ];
        j.attempt = 2;
        let a = attempts(&j);
        assert_eq!(a.iter().map(|a| a.number).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(a[1].bot_id, Some("bot-a"));
        assert_eq!(a[1].resource, Some("bot-a-host"));
        assert_eq!(a[1].end.map(|e| e.action), Some(Action::Crash));
        assert_eq!(
            a[1].rejected, 1,
            "the stale report of attempt 1 stays with it"
        );
        assert_eq!(a[1].entries.len(), 5);
        assert_eq!(a[2].bot_id, Some("bot-b"));
        assert_eq!(a[2].end.map(|e| e.action), Some(Action::Finish));
        assert_eq!(a[0].end, None);
    }

    #[test]
    fn a_waiting_job_says_what_it_waits_for() {
        let now = DateTime::from_timestamp(1_800_000_100, 0).expect("time");
        let mut j = job(JobState::Scheduled);
        let pool = |served| PoolQueue {
            pool: "p".into(),
            ready: 3,
            delayed: 0,
            oldest_queued_at: None,
            oldest_wait_seconds: 42,
            served,
        };
        assert!(
            why_waiting(&j, Some(&pool(false)), now).is_some_and(|s| s.contains("no active bot"))
        );
        assert!(why_waiting(&j, Some(&pool(true)), now)
            .is_some_and(|s| s.contains("free bot") && s.contains("42 s")));
        assert!(why_waiting(&j, None, now).is_some_and(|s| s.contains("did not say")));
        j.not_before = Some(now + chrono::Duration::milliseconds(12_500));
        assert!(why_waiting(&j, Some(&pool(true)), now)
            .is_some_and(|s| s.contains("delayed retry") && s.contains("12.5 s")));
        j.state = JobState::Running;
        assert_eq!(why_waiting(&j, None, now), None);
    }

    #[test]
    fn the_status_line_names_blame_detail_and_the_shelving_reason() {
        let mut j = job(JobState::Crashed);
        j.attempt = 2;
        j.blame = Some(Blame::System);
        j.detail = Some("oom".into());
        j.description = Some("Out of memory: Killed process 7".into());
        assert_eq!(
            status_line(&j),
            "Crashed at attempt 2: system/oom: Out of memory: Killed process 7."
        );
        j.state = JobState::Shelved;
        let mut e = entry(5, Action::Shelve, 2, None);
        e.note = Some("retries used up: 2 of 2 attempts failed; last system/oom".into());
        j.history.push(e);
        assert!(status_line(&j).contains("retries used up"));
        assert!(can_retry(j.state) && !can_cancel(j.state));
        assert_eq!(
            not_retried_because(&j, false),
            None,
            "only a crash says this"
        );
        j.state = JobState::Crashed;
        assert!(
            not_retried_because(&j, false).is_some_and(|s| s.contains("does not retry system/oom"))
        );
        j.retry = false;
        assert!(not_retried_because(&j, true).is_some_and(|s| s.contains("retries off")));
        assert!(can_cancel(JobState::Running) && !can_retry(JobState::Running));
    }
}
