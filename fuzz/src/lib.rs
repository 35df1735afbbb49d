//! What the fuzz targets share: the configuration they decode against, a
//! fixed clock, and JSON comparison that allows for float rounding.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use serde_json::Value;
use warden_shared::job::{Job, Lease};
use warden_shared::{Config, JobState};

/// The shipped example configuration (deploy/warden.example.toml): real
/// trigger rules and tasks.
pub fn example_config() -> Arc<Config> {
    static CONFIG: OnceLock<Arc<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let text = include_str!("../../deploy/warden.example.toml");
            match Config::from_parts(Some(text), std::iter::empty()) {
                Ok(c) => Arc::new(c),
                Err(e) => panic!("deploy/warden.example.toml is invalid: {e}"),
            }
        })
        .clone()
}

/// A fixed instant, `s` seconds after an arbitrary origin (the targets
/// must be deterministic).
pub fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
}

/// A SCHEDULED job of `task` with id `id`, created at `at(0)`.
pub fn scheduled(id: uuid::Uuid, task: &str) -> Job {
    Job::builder(task).id(id).pool("p").at(at(0)).build()
}

/// A job RUNNING attempt `epoch` for `session` of `bot`, leased at `at(0)`.
pub fn running(id: uuid::Uuid, epoch: u32, session: &str, bot: &str) -> Job {
    let mut j = scheduled(id, "t");
    j.state = JobState::Running;
    j.attempt = epoch;
    j.lease = Some(Lease {
        session: session.into(),
        bot_id: bot.into(),
        resource: Some("r1".into()),
        resources: vec!["r1".into()],
        epoch,
        leased_at: at(0),
        started_at: None,
        secret_hash: None,
    });
    j
}

/// `job` survives the job store's encoding unchanged.
pub fn assert_job_round_trips(job: &Job) {
    let bytes = warden_shared::store::encode(job).expect("a job record encodes");
    let back = warden_shared::store::decode("fuzz", &bytes).expect("an encoded job decodes");
    assert_eq!(
        &back, job,
        "a job record changed through the store encoding"
    );
}

/// `value` encodes and decodes back to itself.
pub fn assert_round_trips<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = serde_json::to_vec(value).expect("a decoded value encodes");
    let back: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{} re-encoded as {} does not decode: {e}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&back, value, "changed through encode/decode");
}

/// JSON equality where numbers may differ by float rounding (serde_json
/// parses decimals to the nearest float only within an ulp).
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs()),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}
