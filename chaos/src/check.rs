//! The invariant checker: what must be true of every job record, every
//! live agent's resources and the tasks' own log after a chaos run has
//! drained, whatever faults were injected. Pure: the runner gathers the
//! evidence, this decides.

use std::collections::{BTreeMap, BTreeSet};

use warden_shared::job::Job;
use warden_shared::resource::{Resource, ResourceState};
use warden_shared::state::Action;
use warden_shared::{Blame, JobState};

use crate::runlog::{self, Run};
use crate::Kind;

/// What the run knows besides the records: what it asked for.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Every job record in the bucket after the drain.
    pub jobs: Vec<Job>,
    /// What the tasks logged.
    pub runs: Vec<Run>,
    /// Idempotency keys of the creates the API acknowledged, with the kind
    /// asked for (a key may have been sent several times).
    pub submitted: BTreeMap<String, Kind>,
    /// Message ids of the well-formed events published, with their task.
    pub events: BTreeMap<String, Kind>,
    /// Every resource record after the drain.
    pub resources: Vec<Resource>,
    /// Host resources of the agents alive at the end.
    pub live_hosts: Vec<String>,
    /// The policy's attempt limit and poison limit.
    pub max_attempts: u32,
    pub poison_limit: u32,
}

/// A broken promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// A job not in a final state after the drain.
    NotTerminal,
    /// A submitted create or published event without its job.
    Lost,
    /// Two jobs for one idempotency key or one (message, task).
    Duplicated,
    /// One attempt dispatched twice.
    DoubleDispatch,
    /// Two accepted terminal reports for one attempt.
    DoubleTerminal,
    /// A report accepted from a session that did not hold that attempt's
    /// lease, or for an attempt that was no longer the job's.
    StaleReportWon,
    /// More attempts than the policy allows.
    AttemptsOverLimit,
    /// A poison job dispatched past its limit, or not shelved.
    PoisonNotContained,
    /// An end that is not what the task's kind implies.
    WrongOutcome,
    /// A kill Warden did (SIGKILL) recorded as the task's crash.
    KillBlamedOnTask,
    /// One job's task running twice at once, or one attempt run twice.
    RanTwiceAtOnce,
    /// A live agent's resource not open at the end.
    ResourceNotRecovered,
}

impl Rule {
    pub const ALL: [Rule; 12] = [
        Rule::NotTerminal,
        Rule::Lost,
        Rule::Duplicated,
        Rule::DoubleDispatch,
        Rule::DoubleTerminal,
        Rule::StaleReportWon,
        Rule::AttemptsOverLimit,
        Rule::PoisonNotContained,
        Rule::WrongOutcome,
        Rule::KillBlamedOnTask,
        Rule::RanTwiceAtOnce,
        Rule::ResourceNotRecovered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NotTerminal => "not_terminal",
            Rule::Lost => "lost",
            Rule::Duplicated => "duplicated",
            Rule::DoubleDispatch => "double_dispatch",
            Rule::DoubleTerminal => "double_terminal",
            Rule::StaleReportWon => "stale_report_won",
            Rule::AttemptsOverLimit => "attempts_over_limit",
            Rule::PoisonNotContained => "poison_not_contained",
            Rule::WrongOutcome => "wrong_outcome",
            Rule::KillBlamedOnTask => "kill_blamed_on_task",
            Rule::RanTwiceAtOnce => "ran_twice_at_once",
            Rule::ResourceNotRecovered => "resource_not_recovered",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    /// The job or resource it is about.
    pub subject: String,
    pub detail: String,
}

const SIGKILL: i32 = 9;

fn is_final(state: JobState) -> bool {
    matches!(
        state,
        JobState::Finished | JobState::Crashed | JobState::Shelved | JobState::Cancelled
    )
}

/// Entries a worker's report made: their actor is the session's name (a
/// UUID); services and people write under their own names.
fn by_session(actor: &str) -> bool {
    actor.parse::<uuid::Uuid>().is_ok()
}

/// Every violation in `ev`, in a stable order.
pub fn check(ev: &Evidence) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut v = |rule: Rule, subject: String, detail: String| {
        out.push(Violation {
            rule,
            subject,
            detail,
        })
    };

    // Exactly one job per idempotency key and per (message, task).
    let mut by_key: BTreeMap<&str, Vec<&Job>> = BTreeMap::new();
    let mut by_message: BTreeMap<(&str, &str), Vec<&Job>> = BTreeMap::new();
    for j in &ev.jobs {
        if let Some(k) = j.idempotency_key.as_deref() {
            by_key.entry(k).or_default().push(j);
        }
        if let Some(s) = &j.source {
            by_message
                .entry((s.message_id.as_str(), j.task.as_str()))
                .or_default()
                .push(j);
        }
    }
    for (key, jobs) in &by_key {
        if jobs.len() > 1 {
            v(
                Rule::Duplicated,
                format!("key {key}"),
                format!("{} jobs for one idempotency key", jobs.len()),
            );
        }
    }
    for ((msg, task), jobs) in &by_message {
        if jobs.len() > 1 {
            v(
                Rule::Duplicated,
                format!("message {msg}"),
                format!("{} jobs of task {task} for one message", jobs.len()),
            );
        }
    }
    for (key, kind) in &ev.submitted {
        if !by_key.contains_key(key.as_str()) {
            v(
                Rule::Lost,
                format!("key {key}"),
                format!(
                    "the API acknowledged a {} job that is not in the bucket",
                    kind.as_str()
                ),
            );
        }
    }
    for (msg, kind) in &ev.events {
        if !by_message.contains_key(&(msg.as_str(), kind.task())) {
            v(
                Rule::Lost,
                format!("message {msg}"),
                format!("a published event made no {} job", kind.task()),
            );
        }
    }

    for j in &ev.jobs {
        check_job(j, ev, &mut v);
    }

    let mut starts: BTreeSet<(uuid::Uuid, u32)> = BTreeSet::new();
    for r in &ev.runs {
        if r.starts > 1 || !starts.insert((r.job, r.attempt)) {
            v(
                Rule::RanTwiceAtOnce,
                r.job.to_string(),
                format!("attempt {} started {} times", r.attempt, r.starts),
            );
        }
    }
    for (a, b) in runlog::overlaps(&ev.runs) {
        v(
            Rule::RanTwiceAtOnce,
            a.job.to_string(),
            format!(
                "attempt {} ran {}..{} and attempt {} ran {}..{} (unix ms)",
                a.attempt, a.first_ms, a.last_ms, b.attempt, b.first_ms, b.last_ms
            ),
        );
    }

    for host in &ev.live_hosts {
        match ev.resources.iter().find(|r| &r.name == host) {
            Some(r) if r.state == ResourceState::Open => {}
            Some(r) => v(
                Rule::ResourceNotRecovered,
                format!("resource {host}"),
                format!(
                    "its agent is alive but it is {} ({}), incarnation {}",
                    r.state, r.reason, r.incarnation
                ),
            ),
            None => v(
                Rule::ResourceNotRecovered,
                format!("resource {host}"),
                "its agent is alive but it is not registered".into(),
            ),
        }
    }
    out.sort_by(|a, b| (a.rule, &a.subject).cmp(&(b.rule, &b.subject)));
    out
}

fn check_job(j: &Job, ev: &Evidence, v: &mut impl FnMut(Rule, String, String)) {
    let id = j.id.to_string();
    if !is_final(j.state) {
        v(
            Rule::NotTerminal,
            id.clone(),
            format!("{} {} at attempt {}", j.task, j.state, j.attempt),
        );
    }

    // Per attempt: its dispatches (with the session), and the entries
    // reports made, in history order.
    let mut dispatched: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    let mut terminal: BTreeMap<u32, u32> = BTreeMap::new();
    let mut latest_dispatch = 0u32;
    for e in &j.history {
        match e.action {
            Action::Dispatch => {
                dispatched.entry(e.attempt).or_default().push(&e.actor);
                latest_dispatch = latest_dispatch.max(e.attempt);
            }
            Action::Start | Action::Finish | Action::Crash | Action::Requeue
                if by_session(&e.actor) =>
            {
                let holder = dispatched.get(&e.attempt).and_then(|d| d.last().copied());
                if holder != Some(e.actor.as_str()) {
                    v(
                        Rule::StaleReportWon,
                        id.clone(),
                        format!(
                            "{:?} of attempt {} accepted from session {} that did not hold its lease ({})",
                            e.action,
                            e.attempt,
                            e.actor,
                            holder.unwrap_or("never dispatched")
                        ),
                    );
                } else if e.attempt != latest_dispatch {
                    v(
                        Rule::StaleReportWon,
                        id.clone(),
                        format!(
                            "{:?} of attempt {} accepted while attempt {latest_dispatch} held the lease",
                            e.action, e.attempt
                        ),
                    );
                }
            }
            _ => {}
        }
        // An attempt ends once: a worker's Finish/Crash/release, or the
        // scheduler taking the lease back (a loss: Crash, Retry, Shelve or
        // Requeue recorded by a service for a RUNNING job).
        let ends = match e.action {
            Action::Finish | Action::Crash => true,
            Action::Requeue | Action::Retry | Action::Shelve | Action::Cancel => {
                e.from == Some(JobState::Running)
            }
            _ => false,
        };
        if ends && e.attempt > 0 {
            *terminal.entry(e.attempt).or_default() += 1;
        }
    }
    for (attempt, sessions) in &dispatched {
        if sessions.len() > 1 {
            v(
                Rule::DoubleDispatch,
                id.clone(),
                format!("attempt {attempt} dispatched {} times", sessions.len()),
            );
        }
    }
    if j.history_dropped == 0 {
        for (attempt, n) in &terminal {
            if *n > 1 {
                v(
                    Rule::DoubleTerminal,
                    id.clone(),
                    format!("attempt {attempt} ended {n} times"),
                );
            }
        }
    }

    let limit = j.max_attempts.unwrap_or(ev.max_attempts);
    let used = j.attempt.saturating_sub(j.budget_from);
    if used > limit {
        v(
            Rule::AttemptsOverLimit,
            id.clone(),
            format!("{used} attempts counted, limit {limit}"),
        );
    }

    let Some(kind) = Kind::from_task(&j.task) else {
        return;
    };
    let what = format!(
        "{} job ended {} {}{}",
        kind.as_str(),
        j.state,
        j.outcome.as_deref().unwrap_or(""),
        match (j.blame, j.detail.as_deref()) {
            (Some(b), Some(d)) => format!(" {b}/{d}"),
            _ => String::new(),
        }
    );
    if !is_final(j.state) {
        return;
    }
    // A shelved job is explained only by its retries running out or by
    // the poison rule, both on losses and retryable failures.
    let justly_shelved = j.state == JobState::Shelved
        && (used >= limit || j.lost_workers.len() as u32 >= ev.poison_limit);
    let killed = j.crash.as_ref().is_some_and(|c| c.signal == Some(SIGKILL));
    match kind {
        Kind::Poison => {
            if j.state != JobState::Shelved {
                v(Rule::PoisonNotContained, id.clone(), what.clone());
            }
            // Attempts that were not its doing (an undelivered lease, a
            // recycled resource, a hand-back) are not counted: what may
            // not exceed the limit is the rest.
            let runs = (dispatched.len() as u32).saturating_sub(j.budget_from);
            if runs > limit.max(ev.poison_limit) {
                v(
                    Rule::PoisonNotContained,
                    id.clone(),
                    format!(
                        "dispatched {} times, {} of them not counted",
                        dispatched.len(),
                        j.budget_from
                    ),
                );
            }
        }
        Kind::Crash => {
            let ok =
                (j.state == JobState::Crashed && j.blame == Some(Blame::Task)) || justly_shelved;
            if !ok {
                v(Rule::WrongOutcome, id.clone(), what.clone());
            }
        }
        Kind::Quick | Kind::Slow | Kind::Transient | Kind::Failed => {
            let want = if kind == Kind::Failed {
                "failed"
            } else {
                "passed"
            };
            let ok = (j.state == JobState::Finished && j.outcome.as_deref() == Some(want))
                || justly_shelved;
            if !ok {
                let rule = if j.state == JobState::Crashed
                    && killed
                    && matches!(j.blame, Some(Blame::Task | Blame::Unknown))
                {
                    Rule::KillBlamedOnTask
                } else {
                    Rule::WrongOutcome
                };
                v(rule, id.clone(), what.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use warden_shared::job::{CrashInfo, HistoryEntry, Lease};

    fn t(s: i64) -> chrono::DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0)
            .single()
            .expect("time")
    }

    fn session(n: u128) -> String {
        uuid::Uuid::from_u128(n).to_string()
    }

    fn entry(
        at: i64,
        action: Action,
        attempt: u32,
        from: JobState,
        to: JobState,
        actor: &str,
    ) -> HistoryEntry {
        HistoryEntry {
            at: t(at),
            action,
            attempt,
            from: Some(from),
            to: Some(to),
            actor: actor.into(),
            bot_id: None,
            resource: None,
            note: None,
        }
    }

    /// A job of `kind` dispatched to session 1 and finished by it.
    fn finished(n: u128, kind: Kind, outcome: &str) -> Job {
        let mut j = Job::builder(kind.task())
            .id(uuid::Uuid::from_u128(n))
            .actor("api")
            .at(t(0))
            .build();
        j.idempotency_key = Some(format!("k{n}"));
        j.history.push(entry(
            1,
            Action::Dispatch,
            1,
            JobState::Scheduled,
            JobState::Running,
            &session(1),
        ));
        j.history.push(entry(
            2,
            Action::Start,
            1,
            JobState::Running,
            JobState::Running,
            &session(1),
        ));
        j.history.push(entry(
            3,
            Action::Finish,
            1,
            JobState::Running,
            JobState::Finished,
            &session(1),
        ));
        j.state = JobState::Finished;
        j.attempt = 1;
        j.outcome = Some(outcome.into());
        j
    }

    fn evidence(jobs: Vec<Job>) -> Evidence {
        let submitted = jobs
            .iter()
            .filter_map(|j| Some((j.idempotency_key.clone()?, Kind::from_task(&j.task)?)))
            .collect();
        Evidence {
            jobs,
            submitted,
            max_attempts: 4,
            poison_limit: 2,
            ..Default::default()
        }
    }

    fn rules(ev: &Evidence) -> Vec<Rule> {
        check(ev).into_iter().map(|v| v.rule).collect()
    }

    #[test]
    fn a_clean_run_has_no_violations() {
        let ev = evidence(vec![
            finished(1, Kind::Quick, "passed"),
            finished(2, Kind::Failed, "failed"),
        ]);
        assert_eq!(check(&ev), vec![]);
    }

    #[test]
    fn a_job_left_running_and_a_lost_create_are_found() {
        let mut j = finished(1, Kind::Slow, "passed");
        j.state = JobState::Running;
        j.history.pop();
        let mut ev = evidence(vec![j]);
        ev.submitted.insert("k9".into(), Kind::Quick);
        assert_eq!(rules(&ev), vec![Rule::NotTerminal, Rule::Lost]);
    }

    #[test]
    fn two_jobs_for_one_key_or_message_are_duplicates() {
        let a = finished(1, Kind::Quick, "passed");
        let mut b = finished(2, Kind::Quick, "passed");
        b.idempotency_key = a.idempotency_key.clone();
        let src = warden_shared::job::Source {
            message_id: "m1".into(),
            subject: "warden.events.chaos".into(),
            rule: None,
        };
        let mut c = finished(3, Kind::Quick, "passed");
        c.source = Some(src.clone());
        let mut d = finished(4, Kind::Quick, "passed");
        d.source = Some(src);
        assert_eq!(
            rules(&evidence(vec![a, b, c, d])),
            vec![Rule::Duplicated, Rule::Duplicated]
        );
    }

    #[test]
    fn a_finish_from_the_superseded_session_is_a_stale_report_that_won() {
        // Attempt 1 on session 1 was taken back (lost), attempt 2 went to
        // session 2, and then session 1's late Finish was applied.
        let mut j = finished(1, Kind::Slow, "passed");
        j.history.truncate(2);
        j.history.push(entry(
            12,
            Action::Retry,
            1,
            JobState::Running,
            JobState::Scheduled,
            "retry-policy",
        ));
        j.history.push(entry(
            14,
            Action::Dispatch,
            2,
            JobState::Scheduled,
            JobState::Running,
            &session(2),
        ));
        j.history.push(entry(
            15,
            Action::Finish,
            1,
            JobState::Running,
            JobState::Finished,
            &session(1),
        ));
        j.attempt = 2;
        let r = rules(&evidence(vec![j]));
        assert!(r.contains(&Rule::StaleReportWon), "{r:?}");
        assert!(r.contains(&Rule::DoubleTerminal), "{r:?}");
    }

    #[test]
    fn an_attempt_dispatched_twice_is_found() {
        let mut j = finished(1, Kind::Quick, "passed");
        j.history.insert(
            2,
            entry(
                1,
                Action::Dispatch,
                1,
                JobState::Scheduled,
                JobState::Running,
                &session(2),
            ),
        );
        let r = rules(&evidence(vec![j]));
        assert!(r.contains(&Rule::DoubleDispatch), "{r:?}");
    }

    #[test]
    fn a_sigkill_recorded_as_the_tasks_crash_is_found() {
        let mut j = finished(1, Kind::Slow, "passed");
        j.history.pop();
        j.history.push(entry(
            3,
            Action::Crash,
            1,
            JobState::Running,
            JobState::Crashed,
            &session(1),
        ));
        j.state = JobState::Crashed;
        j.outcome = None;
        j.blame = Some(Blame::Unknown);
        j.detail = Some("unclassified".into());
        j.crash = Some(CrashInfo {
            signal: Some(9),
            ..Default::default()
        });
        assert_eq!(rules(&evidence(vec![j])), vec![Rule::KillBlamedOnTask]);
    }

    #[test]
    fn shelving_is_right_only_when_retries_ran_out_or_for_poison() {
        let mut j = finished(1, Kind::Quick, "passed");
        j.state = JobState::Shelved;
        j.outcome = None;
        j.attempt = 2;
        assert_eq!(rules(&evidence(vec![j.clone()])), vec![Rule::WrongOutcome]);
        j.lost_workers = vec!["a".into(), "b".into()];
        assert_eq!(rules(&evidence(vec![j])), vec![]);
        // A poison job must be shelved; a finished one escaped.
        let p = finished(2, Kind::Poison, "passed");
        assert_eq!(rules(&evidence(vec![p])), vec![Rule::PoisonNotContained]);
        // Dispatched five times with one attempt not counted: within the
        // limit of four; with none uncounted, past it.
        let mut p = finished(3, Kind::Poison, "passed");
        p.state = JobState::Shelved;
        p.outcome = None;
        p.history.truncate(1);
        for a in 1..=5 {
            p.history.push(entry(
                a as i64,
                Action::Dispatch,
                a,
                JobState::Scheduled,
                JobState::Running,
                &session(a as u128),
            ));
        }
        p.attempt = 5;
        p.budget_from = 1;
        assert_eq!(rules(&evidence(vec![p.clone()])), vec![]);
        p.budget_from = 0;
        assert_eq!(
            rules(&evidence(vec![p])),
            vec![Rule::AttemptsOverLimit, Rule::PoisonNotContained]
        );
    }

    #[test]
    fn attempts_over_the_limit_are_found() {
        let mut j = finished(1, Kind::Transient, "passed");
        j.attempt = 5;
        let r = rules(&evidence(vec![j.clone()]));
        assert!(r.contains(&Rule::AttemptsOverLimit), "{r:?}");
        j.budget_from = 1; // one attempt uncounted (a recycled resource)
        assert!(!rules(&evidence(vec![j])).contains(&Rule::AttemptsOverLimit));
    }

    #[test]
    fn overlapping_runs_and_unrecovered_resources_are_found() {
        let j = finished(1, Kind::Slow, "passed");
        let mut ev = evidence(vec![j]);
        let (runs, _) = runlog::parse(&format!(
            "start {a} 1 1000\nalive {a} 1 9000\nstart {a} 2 5000\nend {a} 2 6000\n",
            a = uuid::Uuid::from_u128(1)
        ));
        ev.runs = runs;
        ev.live_hosts = vec!["host-1".into()];
        assert_eq!(
            rules(&ev),
            vec![Rule::RanTwiceAtOnce, Rule::ResourceNotRecovered]
        );
    }

    #[test]
    fn lease_fields_do_not_matter_to_a_finished_job() {
        let mut j = finished(1, Kind::Quick, "passed");
        j.lease = Some(Lease {
            session: session(1),
            bot_id: "b".into(),
            resource: None,
            resources: vec![],
            epoch: 1,
            leased_at: t(1),
            started_at: None,
            secret_hash: None,
        });
        assert_eq!(check(&evidence(vec![j])), vec![]);
    }
}
