//! The timer's decisions: what each 100 ms tick does, and the gauge rows
//! from the queue. Pure: the loop is `loops::timers`.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use crate::metrics::PriorityLabels;

/// How often the timer ticks (delayed retries are promoted within this).
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// What tick number `n` (from 1) does besides promoting delayed retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Sweep orphaned leases (every two seconds).
    pub sweep: bool,
    /// Refresh the queue gauges and the snapshot (every second).
    pub gauges: bool,
}

pub fn tick(n: u64) -> Tick {
    Tick {
        sweep: n % 20 == 5,
        gauges: n % 10 == 1,
    }
}

/// Jobs waiting per (pool, priority label): priorities outside the config
/// share one label, their counts add up and the oldest of them is the age.
pub fn by_label<'a>(
    waiting: &'a BTreeMap<(String, i32), (usize, DateTime<Utc>)>,
    priorities: &PriorityLabels,
) -> BTreeMap<(&'a str, String), (usize, DateTime<Utc>)> {
    let mut out: BTreeMap<(&str, String), (usize, DateTime<Utc>)> = BTreeMap::new();
    for ((pool, priority), (count, oldest)) in waiting {
        let e = out
            .entry((pool.as_str(), priorities.label(*priority)))
            .or_insert((0, *oldest));
        e.0 += count;
        e.1 = e.1.min(*oldest);
    }
    out
}

/// Jobs waiting per pool that no session on open resources serves; every
/// pool a worker knows is listed, 0 when nothing waits.
pub fn unserved(
    known: Vec<String>,
    waiting: &BTreeMap<(String, i32), (usize, DateTime<Utc>)>,
    served: &HashSet<String>,
) -> BTreeMap<String, i64> {
    let mut out: BTreeMap<String, i64> = known.into_iter().map(|p| (p, 0)).collect();
    for ((pool, _), (count, _)) in waiting {
        let e = out.entry(pool.clone()).or_default();
        if !served.contains(pool) {
            *e += *count as i64;
        }
    }
    out
}

/// Age in whole seconds of the oldest job, never negative.
pub fn age_seconds(oldest: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (now - oldest).num_seconds().max(0)
}
