//! The pure part of recording: what rows a job revision makes, how a batch
//! of revisions folds into one write per job, and what a newer revision
//! does to a row that was archived.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;
use warden_shared::{Action, Job, JobState};

use crate::micros;

/// One revision of one job, as the recorder read it off the bucket's
/// stream: `rev` is its stream sequence (the bucket's revision).
#[derive(Debug, Clone, PartialEq)]
pub struct Revision {
    pub rev: u64,
    pub job: Job,
}

/// The `jobs` row of a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub id: String,
    pub rev: i64,
    pub state: &'static str,
    /// Whether the state is one no worker leaves on its own.
    pub terminal: bool,
    pub task: String,
    pub pool: String,
    pub priority: i64,
    pub attempt: i64,
    pub blame: Option<&'static str>,
    pub detail: Option<String>,
    pub bot_id: Option<String>,
    pub source_message_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub search_text: String,
    pub body: String,
}

/// Full-text search looks in a job's description, and its last crash's
/// log tail and status file (an outcome is a filter of its own).
pub fn search_text(job: &Job) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if let Some(d) = &job.description {
        parts.push(d);
    }
    if let Some(c) = &job.crash {
        parts.push(&c.log_tail);
        if let Some(s) = &c.status_file {
            parts.push(s);
        }
    }
    parts.join("\n")
}

impl JobRow {
    pub fn of(rev: u64, job: &Job) -> Result<JobRow, serde_json::Error> {
        Ok(JobRow {
            id: job.id.to_string(),
            rev: rev_i64(rev),
            state: job.state.as_str(),
            terminal: job.state.is_terminal(),
            task: job.task.clone(),
            pool: job.pool.clone(),
            priority: i64::from(job.priority),
            attempt: i64::from(job.attempt),
            blame: job.blame.map(|b| b.as_str()),
            detail: job.detail.clone(),
            bot_id: job.lease.as_ref().map(|l| l.bot_id.clone()),
            source_message_id: job.source.as_ref().map(|s| s.message_id.clone()),
            created_at: micros(job.created_at),
            updated_at: micros(job.updated_at),
            search_text: search_text(job),
            body: serde_json::to_string(job)?,
        })
    }

    /// The statistics key the row counts under once archived.
    pub fn tally_key(&self) -> TallyKey {
        TallyKey::new(
            self.updated_at,
            self.state,
            self.blame,
            self.detail.as_deref(),
            self.attempt,
        )
    }
}

/// A revision number as the database keeps it (stream sequences stay far
/// below `i64::MAX`).
pub fn rev_i64(rev: u64) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

/// One `history` row: entry number `idx` counted from the job's first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub job_id: String,
    pub idx: i64,
    pub at: i64,
    pub action: String,
    pub attempt: i64,
    pub from_state: Option<&'static str>,
    pub to_state: Option<&'static str>,
    pub actor: String,
    pub bot_id: Option<String>,
    pub resource: Option<String>,
    pub note: Option<String>,
}

/// One `attempts` row as far as the entries at hand tell it; rows from
/// several batches merge (a value once known is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    pub job_id: String,
    pub attempt: i64,
    pub bot_id: Option<String>,
    pub resource: Option<String>,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    /// The state the attempt ended in, or the action that ended it.
    pub ended_as: Option<String>,
    pub note: Option<String>,
}

fn action_name(a: Action) -> String {
    serde_json::to_value(a)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{a:?}"))
}

/// The history rows of `job`'s record (its entries keep their number past
/// those the record dropped).
pub fn history_rows(job: &Job) -> Vec<HistoryRow> {
    let id = job.id.to_string();
    let first = i64::from(job.history_dropped);
    job.history
        .iter()
        .enumerate()
        .map(|(i, h)| HistoryRow {
            job_id: id.clone(),
            idx: first + i as i64,
            at: micros(h.at),
            action: action_name(h.action),
            attempt: i64::from(h.attempt),
            from_state: h.from.map(JobState::as_str),
            to_state: h.to.map(JobState::as_str),
            actor: h.actor.clone(),
            bot_id: h.bot_id.clone(),
            resource: h.resource.clone(),
            note: h.note.clone(),
        })
        .collect()
}

/// The attempts the history rows tell of: each dispatch starts one; the
/// first later entry of that attempt that moves the job out of RUNNING
/// ends it.
pub fn attempt_rows(history: &[HistoryRow]) -> Vec<AttemptRow> {
    let mut out: BTreeMap<i64, AttemptRow> = BTreeMap::new();
    for h in history {
        if h.action == action_name(Action::Dispatch) {
            out.entry(h.attempt).or_insert_with(|| AttemptRow {
                job_id: h.job_id.clone(),
                attempt: h.attempt,
                bot_id: h.bot_id.clone(),
                resource: h.resource.clone(),
                started_at: h.at,
                ended_at: None,
                ended_as: None,
                note: None,
            });
        } else if h.from_state == Some(JobState::Running.as_str())
            && h.to_state.is_some_and(|t| t != JobState::Running.as_str())
        {
            if let Some(a) = out.get_mut(&h.attempt) {
                if a.ended_at.is_none() {
                    a.ended_at = Some(h.at);
                    a.ended_as = h.to_state.map(str::to_string);
                    a.note = h.note.clone();
                }
            }
        }
    }
    out.into_values().collect()
}

/// What one job's rows in a batch come to: its highest revision, and
/// every history entry any of its revisions carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    pub row: JobRow,
    pub history: Vec<HistoryRow>,
    pub attempts: Vec<AttemptRow>,
}

/// Folds a batch: one [`Folded`] per job, in the order jobs first came.
/// A revision whose record cannot be written as JSON is impossible for a
/// record that was read as JSON; it is left out.
pub fn fold(revisions: &[Revision]) -> Vec<Folded> {
    let mut order: Vec<Uuid> = Vec::new();
    let mut latest: HashMap<Uuid, &Revision> = HashMap::new();
    let mut entries: HashMap<Uuid, BTreeMap<i64, HistoryRow>> = HashMap::new();
    for r in revisions {
        let id = r.job.id;
        match latest.get(&id) {
            Some(prev) if prev.rev >= r.rev => {}
            Some(_) => {
                latest.insert(id, r);
            }
            None => {
                order.push(id);
                latest.insert(id, r);
            }
        }
        let rows = entries.entry(id).or_default();
        for h in history_rows(&r.job) {
            rows.entry(h.idx).or_insert(h);
        }
    }
    order
        .into_iter()
        .filter_map(|id| {
            let r = latest.get(&id)?;
            let row = JobRow::of(r.rev, &r.job).ok()?;
            let history: Vec<HistoryRow> = entries.remove(&id)?.into_values().collect();
            let attempts = attempt_rows(&history);
            Some(Folded {
                row,
                history,
                attempts,
            })
        })
        .collect()
}

/// What the database holds of a job before a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub rev: i64,
    pub archived: bool,
    pub tally: TallyKey,
}

/// What a folded revision does to the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Apply {
    /// The database has this revision or a later one: nothing changes
    /// (history entries still merge in).
    Stale,
    /// Write the row; `untally` is the key an archived row counted under,
    /// taken back because the job is live again (retried).
    Write { untally: Option<TallyKey> },
}

/// The decision: only a higher revision replaces a row, and a row that
/// was archived is live again (out of the statistics of archived jobs)
/// once a newer revision of it is written.
pub fn apply(existing: Option<&Existing>, row: &JobRow) -> Apply {
    match existing {
        None => Apply::Write { untally: None },
        Some(e) if e.rev >= row.rev => Apply::Stale,
        Some(e) => Apply::Write {
            untally: e.archived.then(|| e.tally.clone()),
        },
    }
}

/// The cell of the statistics an archived job counts in: the minute of
/// its last change, its state, blame, detail and whether it was retried.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TallyKey {
    /// Minutes since the epoch.
    pub minute: i64,
    pub state: String,
    /// `""` for none.
    pub blame: String,
    /// `""` for none.
    pub detail: String,
    pub retried: bool,
}

pub const MINUTE_MICROS: i64 = 60_000_000;

impl TallyKey {
    pub fn new(
        updated_at: i64,
        state: &str,
        blame: Option<&str>,
        detail: Option<&str>,
        attempt: i64,
    ) -> TallyKey {
        TallyKey {
            minute: updated_at.div_euclid(MINUTE_MICROS),
            state: state.to_string(),
            blame: blame.unwrap_or("").to_string(),
            detail: detail.unwrap_or("").to_string(),
            retried: attempt > 1,
        }
    }

    /// The hour the minute falls in (hours since the epoch).
    pub fn hour(&self) -> i64 {
        self.minute.div_euclid(60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};
    use warden_shared::Blame;

    fn job() -> Job {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 1, 12, 0, 0)
            .single()
            .unwrap_or_default();
        let mut j = Job::builder("build").pool("builders").at(t).build();
        j.description = Some("rebuild of glibc".into());
        j
    }

    fn run(j: &mut Job, attempt: u32, to: JobState, minutes: i64) {
        let at = j.created_at + Duration::minutes(minutes);
        j.history.push(warden_shared::job::HistoryEntry {
            at,
            action: Action::Dispatch,
            attempt,
            from: Some(JobState::Scheduled),
            to: Some(JobState::Running),
            actor: "scheduler".into(),
            bot_id: Some("bot-a".into()),
            resource: Some("host-1".into()),
            note: None,
        });
        j.history.push(warden_shared::job::HistoryEntry {
            at: at + Duration::seconds(30),
            action: if to == JobState::Finished {
                Action::Finish
            } else {
                Action::Crash
            },
            attempt,
            from: Some(JobState::Running),
            to: Some(to),
            actor: "session-1".into(),
            bot_id: Some("bot-a".into()),
            resource: None,
            note: Some("exit 1".into()),
        });
        j.attempt = attempt;
        j.state = to;
        j.updated_at = at + Duration::seconds(30);
    }

    #[test]
    fn a_batch_folds_to_the_highest_revision_and_every_entry() {
        let mut a = job();
        let r1 = Revision {
            rev: 5,
            job: a.clone(),
        };
        run(&mut a, 1, JobState::Crashed, 1);
        let r2 = Revision {
            rev: 9,
            job: a.clone(),
        };
        // The record dropped its first two entries by the third revision.
        run(&mut a, 2, JobState::Finished, 5);
        a.history.drain(..2);
        a.history_dropped = 2;
        let r3 = Revision {
            rev: 12,
            job: a.clone(),
        };
        // Out of order, and a replay of the first.
        let folded = fold(&[r2, r3, r1.clone(), r1]);
        assert_eq!(folded.len(), 1);
        let f = &folded[0];
        assert_eq!(f.row.rev, 12);
        assert_eq!(f.row.state, "FINISHED");
        let idx: Vec<i64> = f.history.iter().map(|h| h.idx).collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 4]);
        assert_eq!(f.attempts.len(), 2);
        assert_eq!(f.attempts[0].ended_as.as_deref(), Some("CRASHED"));
        assert_eq!(f.attempts[1].ended_as.as_deref(), Some("FINISHED"));
        assert_eq!(f.attempts[1].bot_id.as_deref(), Some("bot-a"));
        assert_eq!(f.attempts[1].resource.as_deref(), Some("host-1"));
    }

    #[test]
    fn only_a_higher_revision_writes_and_it_takes_an_archived_row_out_of_the_tallies() {
        let mut j = job();
        run(&mut j, 1, JobState::Crashed, 1);
        j.blame = Some(Blame::ThirdParty);
        j.detail = Some("network".into());
        let row = JobRow::of(10, &j).unwrap_or_else(|e| panic!("{e}"));
        let key = row.tally_key();
        assert_eq!(key.blame, "third_party");
        assert!(!key.retried);
        let live = Existing {
            rev: 7,
            archived: false,
            tally: key.clone(),
        };
        let archived = Existing {
            rev: 7,
            archived: true,
            tally: key.clone(),
        };
        let newer = Existing {
            rev: 10,
            archived: true,
            tally: key.clone(),
        };
        assert_eq!(apply(None, &row), Apply::Write { untally: None });
        assert_eq!(apply(Some(&live), &row), Apply::Write { untally: None });
        assert_eq!(
            apply(Some(&archived), &row),
            Apply::Write { untally: Some(key) }
        );
        assert_eq!(apply(Some(&newer), &row), Apply::Stale);
    }

    #[test]
    fn search_text_holds_what_full_text_search_promises() {
        let mut j = job();
        j.crash = Some(warden_shared::job::CrashInfo {
            log_tail: "error: could not resolve host mirrors.fedoraproject.org".into(),
            status_file: Some("{\"stage\": \"setup\"}".into()),
            ..Default::default()
        });
        let t = search_text(&j);
        assert!(
            t.contains("glibc") && t.contains("mirrors.fedoraproject.org") && t.contains("setup")
        );
    }

    #[test]
    fn tally_keys_fall_in_the_minute_and_hour_of_the_last_change() {
        let k = TallyKey::new(61 * MINUTE_MICROS + 5, "FINISHED", None, None, 2);
        assert_eq!((k.minute, k.hour(), k.retried), (61, 1, true));
        assert_eq!(k.blame, "");
        let before_epoch = TallyKey::new(-1, "FINISHED", None, None, 1);
        assert_eq!((before_epoch.minute, before_epoch.hour()), (-1, -1));
    }
}
