//! What a chaos run does and when, drawn from its seed: the same seed
//! gives the same schedule of faults and the same stream of jobs (the
//! timing of the system under test still varies, so a replay hits the
//! same kinds of faults at the same moments, not the same races).

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Kind;

/// The services that run as two replicas each.
pub const SERVICES: [&str; 6] = [
    "trigger",
    "scheduler",
    "fencing",
    "api",
    "classifier",
    "health",
];

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL worker `n`, start it again after `restart_after`.
    KillWorker {
        worker: usize,
        restart_after: Duration,
    },
    /// SIGSTOP worker `n` for `paused` (past its session timeout, or
    /// 60–90% of it), then SIGCONT.
    StopWorker { worker: usize, paused: Duration },
    /// SIGKILL replica `replica` of service `SERVICES[service]`, start it
    /// again after `restart_after`.
    KillService {
        service: usize,
        replica: usize,
        restart_after: Duration,
    },
    /// SIGKILL NATS node `node`, start it again after `down`.
    KillNatsNode { node: usize, down: Duration },
    /// SIGKILL all three NATS nodes, start them again after `down`.
    RestartNats { down: Duration },
}

impl Fault {
    /// Names of every kind, for the summary.
    pub const KINDS: [&'static str; 5] = [
        "kill_worker",
        "stop_worker",
        "kill_service",
        "kill_nats_node",
        "restart_nats",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillWorker { .. } => "kill_worker",
            Fault::StopWorker { .. } => "stop_worker",
            Fault::KillService { .. } => "kill_service",
            Fault::KillNatsNode { .. } => "kill_nats_node",
            Fault::RestartNats { .. } => "restart_nats",
        }
    }

    /// How long the fault lasts before things are put back.
    pub fn duration(&self) -> Duration {
        match *self {
            Fault::KillWorker { restart_after, .. } => restart_after,
            Fault::StopWorker { paused, .. } => paused,
            Fault::KillService { restart_after, .. } => restart_after,
            Fault::KillNatsNode { down, .. } => down,
            Fault::RestartNats { down } => down,
        }
    }
}

/// One job to submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    pub kind: Kind,
    /// How long it runs, in 200 ms ticks.
    pub ticks: u32,
    /// Send it as a bus event rather than through the API.
    pub as_event: bool,
    /// Also send it a second time (the same key or message id), as a
    /// client or a bridge retrying would.
    pub twice: bool,
}

/// What a run does, at offsets from its start.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub faults: Vec<(Duration, Fault)>,
    pub jobs: Vec<(Duration, Submit)>,
    /// When malformed events are published.
    pub malformed: Vec<Duration>,
}

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub duration: Duration,
    pub workers: usize,
    pub session_timeout: Duration,
    /// Mean time between faults.
    pub fault_every: Duration,
    /// Jobs per second.
    pub job_rate: f64,
    /// Include one restart of all three NATS nodes.
    pub restart_all_nats: bool,
}

/// The schedule for `seed`. Faults never overlap on one target, at most
/// one NATS node is down at a time (a 3-node cluster keeps its quorum),
/// and nothing is injected in the last fifth of the run, so every fault
/// has ended before the drain starts.
pub fn plan(seed: u64, shape: &Shape) -> Plan {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let end = shape.duration.mul_f64(0.8);
    let mut faults = Vec::new();
    // Until when each target is busy with a fault.
    let mut worker_busy = vec![Duration::ZERO; shape.workers];
    let mut nats_busy = Duration::ZERO;
    let mut service_busy = [[Duration::ZERO; 2]; SERVICES.len()];
    let mut at = Duration::from_secs(3);
    let restart_at = if shape.restart_all_nats {
        Some(shape.duration.mul_f64(rng.gen_range(0.35..0.55)))
    } else {
        None
    };
    let mut restarted = false;
    // Every kind of fault at least once, early, in a seeded order; then
    // drawn at random.
    let mut forced: Vec<f64> = vec![0.1, 0.4, 0.6, 0.9];
    for i in (1..forced.len()).rev() {
        forced.swap(i, rng.gen_range(0..=i));
    }
    while at < end {
        if let (Some(r), false) = (restart_at, restarted) {
            if at >= r && nats_busy <= at {
                let down = Duration::from_millis(rng.gen_range(1000..3000));
                faults.push((at, Fault::RestartNats { down }));
                nats_busy = at + down + Duration::from_secs(5);
                restarted = true;
                at += Duration::from_millis(rng.gen_range(500..1500));
                continue;
            }
        }
        let drawn: f64 = rng.gen();
        let roll = forced.last().copied().unwrap_or(drawn);
        let fault = if roll < 0.30 {
            let w = rng.gen_range(0..shape.workers);
            (worker_busy[w] <= at).then(|| {
                let f = Fault::KillWorker {
                    worker: w,
                    restart_after: Duration::from_millis(rng.gen_range(500..3000)),
                };
                worker_busy[w] = at + f.duration() + shape.session_timeout;
                f
            })
        } else if roll < 0.45 {
            let w = rng.gen_range(0..shape.workers);
            (worker_busy[w] <= at).then(|| {
                // Half past the session timeout (the session expires, the
                // job is leased again); half a freeze long enough for the
                // task's guard to fire but not always for the session to
                // expire (the worker comes back to a current session).
                let t = shape.session_timeout.as_millis() as u64;
                let paused = if rng.gen_bool(0.5) {
                    Duration::from_millis(t + rng.gen_range(2000..5000))
                } else {
                    Duration::from_millis(rng.gen_range(t * 6 / 10..t * 9 / 10))
                };
                let f = Fault::StopWorker { worker: w, paused };
                worker_busy[w] = at + f.duration() + shape.session_timeout;
                f
            })
        } else if roll < 0.85 {
            let s = rng.gen_range(0..SERVICES.len());
            let r = rng.gen_range(0..2);
            (service_busy[s][r] <= at).then(|| {
                let f = Fault::KillService {
                    service: s,
                    replica: r,
                    restart_after: Duration::from_millis(rng.gen_range(300..2500)),
                };
                service_busy[s][r] = at + f.duration() + Duration::from_secs(2);
                f
            })
        } else {
            let node = rng.gen_range(0..3);
            (nats_busy <= at).then(|| {
                let f = Fault::KillNatsNode {
                    node,
                    down: Duration::from_millis(rng.gen_range(2000..8000)),
                };
                // The cluster needs a while to catch the node up.
                nats_busy = at + f.duration() + Duration::from_secs(5);
                f
            })
        };
        if let Some(f) = fault {
            faults.push((at, f));
            if forced.last() == Some(&roll) {
                forced.pop();
            }
        }
        let gap = shape.fault_every.as_secs_f64() * rng.gen_range(0.5..1.5);
        at += Duration::from_secs_f64(gap);
    }

    let mut jobs = Vec::new();
    let mut malformed = Vec::new();
    let mut t = Duration::from_millis(500);
    let job_end = shape.duration.mul_f64(0.85);
    while t < job_end {
        let roll: f64 = rng.gen();
        let kind = if roll < 0.40 {
            Kind::Quick
        } else if roll < 0.65 {
            Kind::Slow
        } else if roll < 0.80 {
            Kind::Transient
        } else if roll < 0.88 {
            Kind::Crash
        } else if roll < 0.97 {
            Kind::Failed
        } else {
            Kind::Poison
        };
        let ticks = match kind {
            Kind::Slow => rng.gen_range(20..60),
            _ => rng.gen_range(1..4),
        };
        let as_event = kind == Kind::Quick && rng.gen_bool(0.4);
        let twice = rng.gen_bool(0.15);
        jobs.push((
            t,
            Submit {
                kind,
                ticks,
                as_event,
                twice,
            },
        ));
        if rng.gen_bool(0.03) {
            malformed.push(t);
        }
        t += Duration::from_secs_f64(rng.gen_range(0.5..1.5) / shape.job_rate);
    }
    Plan {
        faults,
        jobs,
        malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            duration: Duration::from_secs(120),
            workers: 4,
            session_timeout: Duration::from_secs(10),
            fault_every: Duration::from_secs(3),
            job_rate: 1.5,
            restart_all_nats: true,
        }
    }

    #[test]
    fn a_seed_replays_and_another_differs() {
        assert_eq!(plan(7, &shape()), plan(7, &shape()));
        assert_ne!(plan(7, &shape()), plan(8, &shape()));
    }

    #[test]
    fn every_kind_of_fault_and_job_appears_and_faults_end_before_the_drain() {
        for seed in 0..20 {
            let p = plan(seed, &shape());
            for kind in Fault::KINDS {
                assert!(
                    p.faults.iter().any(|(_, f)| f.kind() == kind),
                    "seed {seed}: no {kind}"
                );
            }
            assert_eq!(
                p.faults
                    .iter()
                    .filter(|(_, f)| f.kind() == "restart_nats")
                    .count(),
                1
            );
            for (at, f) in &p.faults {
                assert!(
                    *at + f.duration() < shape().duration,
                    "seed {seed}: {f:?} at {at:?}"
                );
            }
            assert!(p.jobs.iter().any(|(_, j)| j.as_event));
            assert!(p.jobs.iter().any(|(_, j)| j.twice));
        }
    }

    #[test]
    fn at_most_one_nats_node_is_down_at_a_time() {
        for seed in 0..50 {
            let p = plan(seed, &shape());
            let mut windows: Vec<(Duration, Duration)> = p
                .faults
                .iter()
                .filter(|(_, f)| {
                    matches!(f, Fault::KillNatsNode { .. } | Fault::RestartNats { .. })
                })
                .map(|(at, f)| (*at, *at + f.duration()))
                .collect();
            windows.sort();
            for w in windows.windows(2) {
                assert!(w[0].1 <= w[1].0, "seed {seed}: {w:?}");
            }
        }
    }

    #[test]
    fn one_worker_has_one_fault_at_a_time() {
        for seed in 0..50 {
            let p = plan(seed, &shape());
            for w in 0..4 {
                let mut windows: Vec<(Duration, Duration)> = p
                    .faults
                    .iter()
                    .filter_map(|(at, f)| match f {
                        Fault::KillWorker { worker, .. } | Fault::StopWorker { worker, .. }
                            if *worker == w =>
                        {
                            Some((*at, *at + f.duration()))
                        }
                        _ => None,
                    })
                    .collect();
                windows.sort();
                for pair in windows.windows(2) {
                    assert!(pair[0].1 <= pair[1].0, "seed {seed} worker {w}: {pair:?}");
                }
            }
        }
    }
}
