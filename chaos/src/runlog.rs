//! The tasks' own log of what ran: every chaos task appends
//! `start|alive|end <job> <attempt> <unix ms>` lines to one file (each line
//! one `O_APPEND` write, so processes never interleave within a line),
//! and ticks `alive` every 200 ms while it runs. A task that outlives its
//! worker keeps ticking, which is how two runs of one job at once show.

use std::collections::BTreeMap;

use uuid::Uuid;

/// One attempt of one job as the task saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub job: Uuid,
    pub attempt: u32,
    /// First line's time (unix ms).
    pub first_ms: i64,
    /// Last line's time (unix ms).
    pub last_ms: i64,
    /// How many `start` lines it logged (more than one: ran twice).
    pub starts: u32,
    pub ended: bool,
}

/// The runs in `text`, by (job, attempt); lines that do not parse (a
/// task killed mid-write) are skipped and counted.
pub fn parse(text: &str) -> (Vec<Run>, usize) {
    let mut runs: BTreeMap<(Uuid, u32), Run> = BTreeMap::new();
    let mut bad = 0;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(what), Some(job), Some(attempt), Some(ms), None) = (
            parts.next(),
            parts.next().and_then(|s| s.parse::<Uuid>().ok()),
            parts.next().and_then(|s| s.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<i64>().ok()),
            parts.next(),
        ) else {
            bad += 1;
            continue;
        };
        if !matches!(what, "start" | "alive" | "end") {
            bad += 1;
            continue;
        }
        let run = runs.entry((job, attempt)).or_insert(Run {
            job,
            attempt,
            first_ms: ms,
            last_ms: ms,
            starts: 0,
            ended: false,
        });
        run.first_ms = run.first_ms.min(ms);
        run.last_ms = run.last_ms.max(ms);
        match what {
            "start" => run.starts += 1,
            "end" => run.ended = true,
            _ => {}
        }
    }
    (runs.into_values().collect(), bad)
}

/// Pairs of attempts of one job whose runs overlapped in time: the same
/// job running twice at once.
pub fn overlaps(runs: &[Run]) -> Vec<(Run, Run)> {
    let mut by_job: BTreeMap<Uuid, Vec<Run>> = BTreeMap::new();
    for r in runs {
        by_job.entry(r.job).or_default().push(*r);
    }
    let mut out = Vec::new();
    for list in by_job.values() {
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if a.first_ms < b.last_ms && b.first_ms < a.last_ms {
                    out.push((*a, *b));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn lines_fold_into_runs_and_bad_lines_are_counted() {
        let text = format!(
            "start {a} 1 1000\nalive {a} 1 1200\nend {a} 1 1300\nstart {a} 2 2000\nalive {a} 2\ngarbage\nalive {a} 2 2600\n",
            a = id(1)
        );
        let (runs, bad) = parse(&text);
        assert_eq!(bad, 2);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            runs[0],
            Run {
                job: id(1),
                attempt: 1,
                first_ms: 1000,
                last_ms: 1300,
                starts: 1,
                ended: true
            }
        );
        assert_eq!(
            (runs[1].first_ms, runs[1].last_ms, runs[1].ended),
            (2000, 2600, false)
        );
    }

    #[test]
    fn overlapping_attempts_of_one_job_are_found_and_others_are_not() {
        let text = format!(
            "start {a} 1 1000\nalive {a} 1 5000\nstart {a} 2 4000\nalive {a} 2 6000\n\
             start {b} 1 1000\nalive {b} 1 2000\nstart {b} 2 2001\nend {b} 2 3000\n\
             start {c} 1 1000\nalive {c} 1 9000\n",
            a = id(1),
            b = id(2),
            c = id(3)
        );
        let (runs, _) = parse(&text);
        let o = overlaps(&runs);
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!((o[0].0.job, o[0].0.attempt, o[0].1.attempt), (id(1), 1, 2));
    }
}
