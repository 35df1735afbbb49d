//! The scheduler's I/O: one module per loop, each small, each calling the
//! pure decisions of the crate's top-level modules.

pub mod acquire;
pub mod classify;
pub mod queue;
pub mod reports;
pub mod requeue;
pub mod timers;
pub mod watch;
