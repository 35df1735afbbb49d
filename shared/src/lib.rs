//! `warden-shared`: the contract between Warden's services in code.
//!
//! - [`job`] and [`state`]: the job record and its state machine;
//! - [`messages`]: every message services exchange, versioned;
//! - [`subjects`]: every subject, stream, bucket and consumer, and their
//!   idempotent creation;
//! - [`config`]: defaults + file + environment, validated all at once;
//! - [`runtime`] and [`metrics`]: connecting, logging, shutdown, `/metrics`;
//! - [`guard`]: children (tasks, a local nats-server) that die with their
//!   parent.
//! - [`ready`]: waiting for JetStream at start, by error kind.
//! - [`error`]: every error code on the wire, as one enum;
//! - [`serve`], [`consume`], [`cas`]: the request/reply loop, the
//!   JetStream pull loop and the compare-and-set retry every service uses;
//! - [`clock`]: the time, injectable in tests;
//! - [`services`]: the one list of Warden's services;
//! - [`task_env`]: the environment and user a task starts with;
//! - [`xorshift`]: reproducible pseudo-random numbers (tests, benchmarks).

pub mod amqp;
pub mod bots;
pub mod cas;
pub mod classify;
pub mod clock;
pub mod config;
pub mod consume;
pub mod error;
pub mod guard;
pub mod job;
pub mod lease_secret;
pub mod messages;
pub mod metrics;
pub mod nats_ports;
pub mod ready;
pub mod redact;
pub mod resource;
pub mod retry;
pub mod runtime;
pub mod self_fence;
pub mod serve;
pub mod services;
pub mod session;
pub mod state;
pub mod store;
pub mod subjects;
pub mod task_env;
pub mod template;
pub mod xorshift;

pub use config::Config;
pub use job::{Blame, Job, JobSummary};
pub use state::{Action, JobState};
