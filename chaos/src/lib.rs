//! `warden chaos`: Warden's promise tried as an operator would run it.
//!
//! A run starts a 3-node JetStream cluster on loopback (replicas 3), two
//! replicas of every service as separate processes restarted when they die
//! (as `deploy/systemd/warden@.service` does), and several workers, each
//! on its own host resource. It submits a steady stream of jobs of every
//! kind ([`Kind`]) through the API (with idempotency keys and client
//! retries) and as bus events (some duplicated, some malformed), and
//! meanwhile injects faults drawn from a seed ([`plan`]): SIGKILL and
//! restart of workers and service replicas, SIGSTOP of workers past their
//! session timeout, SIGKILL of one NATS node at a time and once of all
//! three. Then it drains, reads every job record, resource and the tasks'
//! own log of what ran ([`runlog`]), and [`check`] decides whether the
//! promise held: no job lost, none finished twice, no stale report won,
//! retries within their limits, the fleet recovered by itself.
//!
//! The decisions ([`plan`], [`check`], [`runlog`]) are pure and unit
//! tested; [`run`] is the I/O around them.

pub mod check;
pub mod cluster;
pub mod plan;
pub mod procs;
pub mod runlog;
mod runner;
pub mod tasks;

pub use runner::{run, ChaosArgs, Summary};

/// What a chaos job is made to do, which decides what its end must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Runs a fraction of a second and passes.
    Quick,
    /// Runs 4 to 12 s and passes: the one faults usually hit.
    Slow,
    /// Fails with a third-party fault on its first attempt, passes later.
    Transient,
    /// Crashes in its own code (a Python traceback): task blame.
    Crash,
    /// Runs to its end with the verdict `failed`.
    Failed,
    /// Kills the worker that runs it: shelved as poison.
    Poison,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Quick,
        Kind::Slow,
        Kind::Transient,
        Kind::Crash,
        Kind::Failed,
        Kind::Poison,
    ];

    /// The task that does it (configured by [`tasks::config`]).
    pub fn task(self) -> &'static str {
        match self {
            Kind::Quick => "chaos-quick",
            Kind::Slow => "chaos-slow",
            Kind::Transient => "chaos-transient",
            Kind::Crash => "chaos-crash",
            Kind::Failed => "chaos-failed",
            Kind::Poison => "chaos-poison",
        }
    }

    pub fn from_task(task: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.task() == task)
    }

    pub fn as_str(self) -> &'static str {
        self.task().trim_start_matches("chaos-")
    }
}
