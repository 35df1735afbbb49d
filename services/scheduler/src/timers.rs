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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;
    use warden_shared::Config;

    #[test]
    fn the_sweep_runs_every_two_seconds_and_the_gauges_every_second() {
        let sweeps: Vec<u64> = (1..=60).filter(|n| tick(*n).sweep).collect();
        assert_eq!(sweeps, [5, 25, 45]);
        let gauges: Vec<u64> = (1..=30).filter(|n| tick(*n).gauges).collect();
        assert_eq!(gauges, [1, 11, 21]);
    }

    #[test]
    fn unconfigured_priorities_share_a_label_with_the_oldest_age() {
        let priorities = PriorityLabels::new(&Config::defaults());
        let waiting = BTreeMap::from([
            (("p".to_string(), 0), (2, at(5))),
            (("p".to_string(), 77), (1, at(3))),
            (("p".to_string(), 78), (4, at(1))),
        ]);
        let rows = by_label(&waiting, &priorities);
        assert_eq!(rows.get(&("p", "0".to_string())), Some(&(2, at(5))));
        assert_eq!(rows.get(&("p", "other".to_string())), Some(&(5, at(1))));
        assert_eq!(age_seconds(at(1), at(11)), 10);
        assert_eq!(age_seconds(at(11), at(1)), 0);
    }

    #[test]
    fn only_unserved_pools_count_their_waiting_jobs() {
        let waiting = BTreeMap::from([
            (("served".to_string(), 0), (2, at(0))),
            (("lonely".to_string(), 0), (3, at(0))),
            (("lonely".to_string(), 1), (1, at(0))),
        ]);
        let served = HashSet::from(["served".to_string()]);
        let rows = unserved(vec!["idle".into(), "served".into()], &waiting, &served);
        assert_eq!(
            rows,
            BTreeMap::from([
                ("idle".to_string(), 0),
                ("lonely".to_string(), 4),
                ("served".to_string(), 0)
            ])
        );
    }
}
