//! Read-modify-compare-and-set, with one retry policy, for every such loop
//! in Warden: [`run`] reads a record from a [`CasStore`] (a job in
//! [`crate::store::JobStore`], or a JSON record under a [`KvKey`]), hands
//! it to a [`Change`] step (which may wait on other reads, e.g. another
//! bucket or the classifier), and writes what the step returns if the
//! record's revision has not moved. [`Retry`] says what happens when it
//! did not land:
//! - the write lost the race for its key (by error kind,
//!   [`crate::store::lost_race`], never text): read again, at once or
//!   after a few jittered milliseconds ([`OnConflict`]);
//! - the store failed (a NATS node down, a timeout): read again after a
//!   growing pause, a bounded number of times ([`Backoff`]), or give up at
//!   once ([`Backoff::NONE`]);
//! - anything else (a record that cannot be decoded, one too large): give
//!   up.
//!
//! Every attempt, whatever ended it, counts against [`Retry::attempts`];
//! a [`Change`] hears of each lost race ([`Change::lost_race`], e.g. to
//! count it). Records: [`KvKey`] (JSON under a KV key), [`KvText`] (raw
//! text under a KV key), [`crate::store::JobStore::at`] (a job).

use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// [`OnConflict::pause`] with its randomness given: 2 ms plus a jitter below
/// `5·min(attempt, 10) + 5` ms.
fn pause_with(attempt: u32, random: u128) -> Duration {
    let ceiling = 5 * u64::from(attempt.min(10)) + 5;
    let jitter = (random % u128::from(ceiling)) as u64;
    Duration::from_millis(2 + jitter)
}

/// What a compare-and-set does after losing the race for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Read again at once: the winner's write is already readable from the
    /// node that refused ours.
    AtOnce,
    /// Read again after [`OnConflict::pause`].
    Jittered,
}

impl OnConflict {
    /// The pause before retry `attempt` (1…) after a lost race: none
    /// [`OnConflict::AtOnce`]; [`OnConflict::Jittered`], a few
    /// milliseconds, growing, jittered so that replicas that collided do
    /// not collide again in step (and one whose read came from a lagging
    /// follower reads again after it caught up).
    pub fn pause(&self, attempt: u32) -> Duration {
        match self {
            OnConflict::AtOnce => Duration::ZERO,
            OnConflict::Jittered => pause_with(attempt, uuid::Uuid::new_v4().as_u128()),
        }
    }
}

/// Retries after a store error (not a lost race): `retries` of them at
/// most, the first after `first`, each pause twice the last, at most
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub retries: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Give up at the first store error.
    pub const NONE: Backoff = Backoff {
        retries: 0,
        first: Duration::ZERO,
        max: Duration::ZERO,
    };

    /// The pause before store-error retry `n` (1…).
    pub fn pause(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.first
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// The one retry policy of [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (the first one included), whatever ended them.
    pub attempts: u32,
    pub on_conflict: OnConflict,
    pub store_errors: Backoff,
}

impl Retry {
    /// The policy every Warden compare-and-set uses unless it has a
    /// reason: 16 attempts, lost races retried after a jittered pause, a
    /// store error returned at once.
    pub const DEFAULT: Retry = Retry {
        attempts: 16,
        on_conflict: OnConflict::Jittered,
        store_errors: Backoff::NONE,
    };
}

impl Default for Retry {
    fn default() -> Self {
        Retry::DEFAULT
    }
}

/// How [`run`] treats a store error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The write lost the race for the key: read again.
    LostRace,
    /// The store failed; it may not next time.
    Transient,
    /// Trying again cannot help (the record cannot be decoded, or is too
    /// large).
    Fatal,
}

/// Which step of an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Read,
    Write,
}

/// One record that can be read with its revision and written by
/// compare-and-set.
pub trait CasStore {
    type Value;
    type Error: std::error::Error + Send + Sync + 'static;
    /// The record's key, for errors and logs.
    fn key(&self) -> String;
    /// The record and its revision; `None` when absent (or deleted).
    fn get(&self) -> impl Future<Output = Result<Option<(Self::Value, u64)>, Self::Error>>;
    /// Writes `value` only if the record is absent.
    fn create(&self, value: &Self::Value) -> impl Future<Output = Result<u64, Self::Error>>;
    /// Writes `value` only if the record's revision is still `revision`.
    fn update(
        &self,
        value: &Self::Value,
        revision: u64,
    ) -> impl Future<Output = Result<u64, Self::Error>>;
    /// What an error of this store means for a retry (by kind).
    fn fault(error: &Self::Error) -> Fault;
}

/// What a [`Change`] step decided.
#[derive(Debug)]
pub enum Step<V, W, S> {
    /// Write `V`; once it lands [`run`] returns [`Outcome::Written`] with
    /// `W`.
    Write(V, W),
    /// Write nothing; [`run`] returns [`Outcome::Stopped`].
    Stop(S),
}

/// What [`run`] did.
#[derive(Debug)]
pub enum Outcome<V, W, S> {
    Written { value: V, revision: u64, with: W },
    Stopped(S),
}

/// The change of a [`run`]: given the current record (`None`: absent),
/// what to write. Called once per attempt, on the latest record each time;
/// state kept in `self` lives across attempts.
pub trait Change<V> {
    type Write;
    type Stop;
    type Error;
    fn step(
        &mut self,
        current: Option<V>,
    ) -> impl Future<Output = Result<Step<V, Self::Write, Self::Stop>, Self::Error>>;
    /// The write of attempt `attempt` (0…) lost the race for the key;
    /// called for each lost race, the last attempt's too. Does nothing
    /// unless the change counts or logs them.
    fn lost_race(&mut self, attempt: u32) {
        let _ = attempt;
    }
}

impl<V, C: Change<V>> Change<V> for &mut C {
    type Write = C::Write;
    type Stop = C::Stop;
    type Error = C::Error;
    fn step(
        &mut self,
        current: Option<V>,
    ) -> impl Future<Output = Result<Step<V, C::Write, C::Stop>, C::Error>> {
        (**self).step(current)
    }
    fn lost_race(&mut self, attempt: u32) {
        (**self).lost_race(attempt)
    }
}

/// A synchronous [`Change`]: `decide(f)` is a step that calls `f`.
pub struct Decide<F>(pub F);

/// A synchronous change step.
pub fn decide<F>(f: F) -> Decide<F> {
    Decide(f)
}

impl<V, W, S, E, F> Change<V> for Decide<F>
where
    F: FnMut(Option<V>) -> Result<Step<V, W, S>, E>,
{
    type Write = W;
    type Stop = S;
    type Error = E;
    fn step(&mut self, current: Option<V>) -> impl Future<Output = Result<Step<V, W, S>, E>> {
        std::future::ready((self.0)(current))
    }
}

/// Why [`run`] did not land a write.
#[derive(Debug, Error)]
pub enum Failure<SE: std::error::Error + 'static, E> {
    /// Every attempt lost the race for the key.
    #[error("{key}: still changing after {attempts} attempts")]
    Conflict { key: String, attempts: u32 },
    /// The store failed (and retrying did not help, or was not allowed).
    #[error("{key}: store failed ({phase:?})")]
    Store {
        key: String,
        phase: Phase,
        #[source]
        source: SE,
    },
    /// The change refused.
    #[error("the change refused")]
    Refused(E),
}

/// Reads the record of `store`, gives it to `change`, writes what it
/// returns by compare-and-set, and retries under `retry` (see the module
/// documentation).
pub async fn run<St, C>(
    store: &St,
    retry: Retry,
    change: C,
) -> Result<Outcome<St::Value, C::Write, C::Stop>, Failure<St::Error, C::Error>>
where
    St: CasStore,
    C: Change<St::Value>,
{
    run_from(store, retry, change, None).await
}

/// [`run`], whose first attempt starts from `guess` (a value and its
/// revision the caller already holds: its own last write, a watch's
/// latest) instead of a read. A right guess saves the read; a stale one
/// costs a lost race, after which every attempt reads, at once (a stale
/// cache is not a collision to back off from). A [`Step::Stop`] decided
/// on a guess is not trusted: the step runs again on a fresh read, so a
/// step must have no effect outside `self` when it stops.
pub async fn run_from<St, C>(
    store: &St,
    retry: Retry,
    mut change: C,
    guess: Option<(St::Value, u64)>,
) -> Result<Outcome<St::Value, C::Write, C::Stop>, Failure<St::Error, C::Error>>
where
    St: CasStore,
    C: Change<St::Value>,
{
    let attempts = retry.attempts.max(1);
    let mut store_errors = 0u32;
    let mut last: Option<(Phase, St::Error)> = None;
    let mut guess = guess;
    // Whether the attempt before this one started from the guess.
    let mut guessed = false;
    for attempt in 0..attempts {
        if attempt > 0 && !guessed {
            let pause = match &last {
                Some(_) => retry.store_errors.pause(store_errors),
                None => retry.on_conflict.pause(attempt),
            };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        guessed = guess.is_some();
        let (current, revision) = match guess.take() {
            Some((v, rev)) => (Some(v), Some(rev)),
            None => match store.get().await {
                Ok(Some((v, rev))) => (Some(v), Some(rev)),
                Ok(None) => (None, None),
                Err(e) => {
                    let phase = Phase::Read;
                    give_up_unless_transient::<St, C::Error>(
                        store,
                        phase,
                        e,
                        &mut store_errors,
                        retry,
                        &mut last,
                    )?;
                    continue;
                }
            },
        };
        let (next, with) = match change.step(current).await.map_err(Failure::Refused)? {
            Step::Write(next, with) => (next, with),
            Step::Stop(_) if guessed => continue,
            Step::Stop(s) => return Ok(Outcome::Stopped(s)),
        };
        let written = match revision {
            None => store.create(&next).await,
            Some(rev) => store.update(&next, rev).await,
        };
        match written {
            Ok(revision) => {
                return Ok(Outcome::Written {
                    value: next,
                    revision,
                    with,
                })
            }
            Err(e) if St::fault(&e) == Fault::LostRace => {
                tracing::trace!(key = %store.key(), attempt, guessed, "compare-and-set lost the race");
                change.lost_race(attempt);
                last = None;
            }
            Err(e) => give_up_unless_transient::<St, C::Error>(
                store,
                Phase::Write,
                e,
                &mut store_errors,
                retry,
                &mut last,
            )?,
        }
    }
    Err(match last {
        Some((phase, source)) => Failure::Store {
            key: store.key(),
            phase,
            source,
        },
        None => Failure::Conflict {
            key: store.key(),
            attempts,
        },
    })
}

/// Keeps a transient store error in `last` if another retry is allowed;
/// otherwise the failure to return.
fn give_up_unless_transient<St: CasStore, E>(
    store: &St,
    phase: Phase,
    e: St::Error,
    store_errors: &mut u32,
    retry: Retry,
    last: &mut Option<(Phase, St::Error)>,
) -> Result<(), Failure<St::Error, E>> {
    if St::fault(&e) == Fault::Transient && *store_errors < retry.store_errors.retries {
        *store_errors += 1;
        tracing::debug!(key = %store.key(), ?phase, error = %e, retry = *store_errors, "store failed; retrying");
        *last = Some((phase, e));
        return Ok(());
    }
    Err(Failure::Store {
        key: store.key(),
        phase,
        source: e,
    })
}

/// A JSON record of type `T` under `key` in `kv`.
pub struct KvKey<'a, T> {
    kv: &'a kv::Store,
    key: &'a str,
    record: PhantomData<fn() -> T>,
}

impl<'a, T> KvKey<'a, T> {
    pub fn new(kv: &'a kv::Store, key: &'a str) -> Self {
        KvKey {
            kv,
            key,
            record: PhantomData,
        }
    }
}

/// A failure of a [`KvKey`].
#[derive(Debug, Error)]
pub enum KvError {
    #[error("cannot read the key")]
    Read(#[source] kv::EntryError),
    #[error("cannot create the key")]
    Create(#[source] kv::CreateError),
    #[error("cannot update the key")]
    Update(#[source] kv::UpdateError),
    #[error("the record cannot be decoded")]
    Decode(#[source] serde_json::Error),
    #[error("the record cannot be encoded")]
    Encode(#[source] serde_json::Error),
}

impl<T: Serialize + DeserializeOwned> CasStore for KvKey<'_, T> {
    type Value = T;
    type Error = KvError;

    fn key(&self) -> String {
        self.key.to_string()
    }

    async fn get(&self) -> Result<Option<(T, u64)>, KvError> {
        match self.kv.entry(self.key).await.map_err(KvError::Read)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let value = serde_json::from_slice(&e.value).map_err(KvError::Decode)?;
                Ok(Some((value, e.revision)))
            }
            // A deleted or purged key: `create` writes over its marker.
            _ => Ok(None),
        }
    }

    async fn create(&self, value: &T) -> Result<u64, KvError> {
        let body = encode(value)?;
        self.kv
            .create(self.key, body)
            .await
            .map_err(KvError::Create)
    }

    async fn update(&self, value: &T, revision: u64) -> Result<u64, KvError> {
        let body = encode(value)?;
        self.kv
            .update(self.key, body, revision)
            .await
            .map_err(KvError::Update)
    }

    fn fault(error: &KvError) -> Fault {
        error.fault()
    }
}

impl KvError {
    /// What the error means for a retry (by kind).
    pub fn fault(&self) -> Fault {
        match self {
            KvError::Create(e)
                if e.kind() == kv::CreateErrorKind::AlreadyExists || crate::store::lost_race(e) =>
            {
                Fault::LostRace
            }
            KvError::Update(e)
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision
                    || crate::store::lost_race(e) =>
            {
                Fault::LostRace
            }
            KvError::Read(_) | KvError::Create(_) | KvError::Update(_) => Fault::Transient,
            KvError::Decode(_) | KvError::Encode(_) => Fault::Fatal,
        }
    }

    /// The record under `key` cannot be decoded (not a store failure).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, KvError::Decode(_))
    }

    /// The error as one line with its cause, naming `key`:
    /// `{key}: store unavailable: …`, `{key}: record cannot be decoded: …`
    /// or `{key}: record cannot be encoded: …`.
    pub fn describe(&self, key: &str) -> String {
        match self {
            KvError::Read(e) => format!("{key}: store unavailable: {e}"),
            KvError::Create(e) => format!("{key}: store unavailable: {e}"),
            KvError::Update(e) => format!("{key}: store unavailable: {e}"),
            KvError::Decode(e) => format!("{key}: record cannot be decoded: {e}"),
            KvError::Encode(e) => format!("{key}: record cannot be encoded: {e}"),
        }
    }
}

/// Raw text (not JSON) under `key` in `kv`, e.g. a bot's pointer to its
/// current session. Bytes that are not UTF-8 are read lossily.
pub struct KvText<'a> {
    kv: &'a kv::Store,
    key: &'a str,
}

impl<'a> KvText<'a> {
    pub fn new(kv: &'a kv::Store, key: &'a str) -> Self {
        KvText { kv, key }
    }
}

impl CasStore for KvText<'_> {
    type Value = String;
    type Error = KvError;

    fn key(&self) -> String {
        self.key.to_string()
    }

    async fn get(&self) -> Result<Option<(String, u64)>, KvError> {
        match self.kv.entry(self.key).await.map_err(KvError::Read)? {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some((
                String::from_utf8_lossy(&e.value).into_owned(),
                e.revision,
            ))),
            // A deleted or purged key: `create` writes over its marker.
            _ => Ok(None),
        }
    }

    async fn create(&self, value: &String) -> Result<u64, KvError> {
        self.kv
            .create(self.key, Bytes::from(value.clone()))
            .await
            .map_err(KvError::Create)
    }

    async fn update(&self, value: &String, revision: u64) -> Result<u64, KvError> {
        self.kv
            .update(self.key, Bytes::from(value.clone()), revision)
            .await
            .map_err(KvError::Update)
    }

    fn fault(error: &KvError) -> Fault {
        error.fault()
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, KvError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(KvError::Encode)
}

/// A change that cannot refuse.
#[derive(Debug, Error)]
#[error("never")]
pub enum Never {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_short_grow_and_are_bounded() {
        for attempt in 1..40 {
            for random in [0u128, 1, 7, 54, u128::MAX] {
                let p = pause_with(attempt, random);
                assert!(p >= Duration::from_millis(2));
                assert!(p < Duration::from_millis(2 + 5 * u64::from(attempt.min(10)) + 5));
            }
        }
        assert_eq!(pause_with(1, 0), Duration::from_millis(2));
        assert_eq!(pause_with(1, 9), Duration::from_millis(11));
        assert_eq!(pause_with(20, 54), Duration::from_millis(56));
    }

    #[test]
    fn the_default_policy_is_sixteen_attempts() {
        assert_eq!(Retry::default().attempts, 16);
    }

    #[test]
    fn a_plain_policy_jitters_on_conflicts_and_gives_up_on_store_errors() {
        let r = Retry {
            attempts: 5,
            ..Retry::DEFAULT
        };
        assert_eq!(r.attempts, 5);
        assert_eq!(r.on_conflict, OnConflict::Jittered);
        assert_eq!(r.store_errors, Backoff::NONE);
        assert_eq!(OnConflict::AtOnce.pause(3), Duration::ZERO);
        let p = OnConflict::Jittered.pause(3);
        assert!(p >= Duration::from_millis(2) && p < Duration::from_millis(22));
    }

    #[test]
    fn store_error_pauses_double_up_to_the_ceiling() {
        let b = Backoff {
            retries: 30,
            first: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let ms: Vec<u128> = (1..=7).map(|n| b.pause(n).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.pause(1000), Duration::from_secs(2));
        assert_eq!(Backoff::NONE.pause(1), Duration::ZERO);
    }

    /// An in-memory record whose reads and writes fail as scripted: the
    /// retry policy of [`run`] without a server.
    struct Scripted {
        value: std::sync::Mutex<(Option<u32>, u64)>,
        /// How the next operations (reads and writes, front first) fail;
        /// `None`, or an empty script: they work.
        faults: std::sync::Mutex<std::collections::VecDeque<Option<Fault>>>,
        calls: std::sync::atomic::AtomicU32,
        reads: std::sync::atomic::AtomicU32,
    }

    #[derive(Debug, Error)]
    #[error("scripted {0:?}")]
    struct ScriptedError(Fault);

    impl Scripted {
        fn new(value: Option<u32>, faults: &[Option<Fault>]) -> Scripted {
            Scripted {
                value: std::sync::Mutex::new((value, 1)),
                faults: std::sync::Mutex::new(faults.iter().copied().collect()),
                calls: Default::default(),
                reads: Default::default(),
            }
        }
        fn next_fault(&self) -> Result<(), ScriptedError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match self.faults.lock().expect("lock").pop_front().flatten() {
                Some(f) => Err(ScriptedError(f)),
                None => Ok(()),
            }
        }
        fn value(&self) -> Option<u32> {
            self.value.lock().expect("lock").0
        }
        fn reads(&self) -> u32 {
            self.reads.load(std::sync::atomic::Ordering::SeqCst)
        }
        /// A write (scripted faults first); an update on another revision
        /// than the record's loses the race.
        fn write(&self, value: &u32, revision: Option<u64>) -> Result<u64, ScriptedError> {
            self.next_fault()?;
            let mut v = self.value.lock().expect("lock");
            if revision.is_some_and(|r| r != v.1) {
                return Err(ScriptedError(Fault::LostRace));
            }
            *v = (Some(*value), v.1 + 1);
            Ok(v.1)
        }
    }

    impl CasStore for Scripted {
        type Value = u32;
        type Error = ScriptedError;
        fn key(&self) -> String {
            "scripted".into()
        }
        async fn get(&self) -> Result<Option<(u32, u64)>, ScriptedError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match self.next_fault() {
                Err(ScriptedError(Fault::LostRace)) => unreachable!("reads do not race"),
                Err(e) => Err(e),
                Ok(()) => {
                    let (v, rev) = *self.value.lock().expect("lock");
                    Ok(v.map(|v| (v, rev)))
                }
            }
        }
        async fn create(&self, value: &u32) -> Result<u64, ScriptedError> {
            self.write(value, None)
        }
        async fn update(&self, value: &u32, revision: u64) -> Result<u64, ScriptedError> {
            self.write(value, Some(revision))
        }
        fn fault(e: &ScriptedError) -> Fault {
            e.0
        }
    }

    const QUICK: Retry = Retry {
        attempts: 6,
        on_conflict: OnConflict::AtOnce,
        store_errors: Backoff {
            retries: 3,
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
        },
    };

    type Plain = Result<Step<u32, (), ()>, Never>;

    fn add_one() -> Decide<impl FnMut(Option<u32>) -> Plain> {
        decide(|cur: Option<u32>| Ok(Step::Write(cur.unwrap_or(0) + 1, ())))
    }

    #[tokio::test]
    async fn lost_races_and_transient_errors_are_retried_within_their_budgets() {
        const T: Option<Fault> = Some(Fault::Transient);
        const RACE: Option<Fault> = Some(Fault::LostRace);
        // A read fails; the write after the next one loses; a read fails;
        // the next read and write work.
        let s = Scripted::new(Some(1), &[T, None, RACE, T, None, None]);
        let out = run(&s, QUICK, add_one()).await.expect("lands");
        assert!(matches!(out, Outcome::Written { value: 2, .. }));
        assert_eq!(s.value(), Some(2));
        assert_eq!(s.calls.load(std::sync::atomic::Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn store_errors_beyond_the_budget_give_up_with_the_phase() {
        const T: Option<Fault> = Some(Fault::Transient);
        let s = Scripted::new(Some(1), &[T, T, T, T]);
        match run(&s, QUICK, add_one()).await {
            Err(Failure::Store {
                phase: Phase::Read, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(s.value(), Some(1));
        // A plain policy gives up at the first one.
        let s = Scripted::new(Some(1), &[T]);
        let plain = Retry::DEFAULT;
        match run(&s, plain, add_one()).await {
            Err(Failure::Store { .. }) => {}
            other => panic!("{other:?}"),
        }
        let s = Scripted::new(Some(1), &[Some(Fault::Fatal)]);
        match run(&s, QUICK, add_one()).await {
            Err(Failure::Store { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(s.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_write_that_fails_reports_the_write_phase() {
        let s = Scripted::new(None, &[]);
        let step = decide(|cur: Option<u32>| {
            // The write that follows this read fails for good.
            s.faults.lock().expect("lock").push_back(Some(Fault::Fatal));
            Ok::<Step<u32, (), ()>, Never>(Step::Write(cur.unwrap_or(7), ()))
        });
        match run(&s, QUICK, step).await {
            Err(Failure::Store {
                phase: Phase::Write,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(s.value(), None);
    }

    #[tokio::test]
    async fn every_attempt_counts_against_the_total() {
        const T: Option<Fault> = Some(Fault::Transient);
        const RACE: Option<Fault> = Some(Fault::LostRace);
        let s = Scripted::new(Some(1), &[None, RACE].repeat(6));
        match run(&s, QUICK, add_one()).await {
            Err(Failure::Conflict { attempts: 6, .. }) => {}
            other => panic!("{other:?}"),
        }
        // Conflicts and store errors share the total: the last one decides.
        let script = [[None, RACE].repeat(3), vec![T, T, T]].concat();
        let s = Scripted::new(Some(1), &script);
        match run(&s, QUICK, add_one()).await {
            Err(Failure::Store { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// Counts the lost races it hears of, and the steps it took.
    struct Counting {
        steps: u32,
        lost: Vec<u32>,
    }

    impl Change<u32> for Counting {
        type Write = ();
        type Stop = ();
        type Error = Never;
        async fn step(&mut self, current: Option<u32>) -> Plain {
            self.steps += 1;
            Ok(Step::Write(current.unwrap_or(0) + 1, ()))
        }
        fn lost_race(&mut self, attempt: u32) {
            self.lost.push(attempt);
        }
    }

    #[tokio::test]
    async fn the_change_hears_of_every_lost_race_and_of_nothing_else() {
        const T: Option<Fault> = Some(Fault::Transient);
        const RACE: Option<Fault> = Some(Fault::LostRace);
        // Attempt 0 loses, attempt 1's read fails, attempt 2 loses,
        // attempt 3 lands.
        let s = Scripted::new(Some(1), &[None, RACE, T, None, RACE, None, None]);
        let mut c = Counting {
            steps: 0,
            lost: Vec::new(),
        };
        let out = run(&s, QUICK, &mut c).await.expect("lands");
        assert!(matches!(out, Outcome::Written { value: 2, .. }));
        assert_eq!(c.lost, vec![0, 2]);
        assert_eq!(c.steps, 3);
        // Every attempt lost: each is heard of, the last one too.
        let s = Scripted::new(Some(1), &[None, RACE].repeat(6));
        let mut c = Counting {
            steps: 0,
            lost: Vec::new(),
        };
        match run(&s, QUICK, &mut c).await {
            Err(Failure::Conflict { attempts: 6, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(c.lost, (0..6).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_stop_or_a_refusal_writes_nothing() {
        let s = Scripted::new(Some(1), &[]);
        let out = run(
            &s,
            QUICK,
            decide(|_| Ok::<Step<u32, (), &str>, Never>(Step::Stop("moved on"))),
        )
        .await
        .expect("stops");
        assert!(matches!(out, Outcome::Stopped("moved on")));
        #[derive(Debug, Error)]
        #[error("no")]
        struct No;
        let refused = run(&s, QUICK, decide(|_| Err::<Step<u32, (), ()>, No>(No))).await;
        assert!(matches!(refused, Err(Failure::Refused(No))));
        assert_eq!(s.value(), Some(1));
    }

    #[tokio::test]
    async fn a_right_guess_saves_the_read() {
        // The record is 1 at revision 1; the caller holds just that.
        let s = Scripted::new(Some(1), &[]);
        let out = run_from(&s, QUICK, add_one(), Some((1, 1)))
            .await
            .expect("lands");
        assert!(matches!(
            out,
            Outcome::Written {
                value: 2,
                revision: 2,
                ..
            }
        ));
        assert_eq!(s.reads(), 0);
        assert_eq!(s.value(), Some(2));
    }

    #[tokio::test]
    async fn a_stale_guess_loses_once_then_reads_and_lands_on_the_latest() {
        // The record moved on to 5 (revision 1); the caller still holds 0
        // at revision 0.
        let s = Scripted::new(Some(5), &[]);
        let mut c = Counting {
            steps: 0,
            lost: Vec::new(),
        };
        let out = run_from(&s, QUICK, &mut c, Some((0, 0)))
            .await
            .expect("lands");
        // Built on the record read, not on the guess.
        assert!(matches!(out, Outcome::Written { value: 6, .. }));
        assert_eq!((s.reads(), c.steps, c.lost.clone()), (1, 2, vec![0]));
    }

    #[tokio::test]
    async fn a_stop_on_a_guess_is_decided_again_on_a_read() {
        // The guess says the work is done (odd); the record says it is not.
        let s = Scripted::new(Some(2), &[]);
        let mut seen = Vec::new();
        let step = decide(|cur: Option<u32>| {
            let cur = cur.unwrap_or(0);
            seen.push(cur);
            Ok::<_, Never>(match cur % 2 {
                1 => Step::Stop("done"),
                _ => Step::Write(cur + 2, ()),
            })
        });
        let out = run_from(&s, QUICK, step, Some((1, 1)))
            .await
            .expect("lands");
        assert!(matches!(out, Outcome::Written { value: 4, .. }));
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(s.reads(), 1);
        // A stop the read confirms stands.
        let s = Scripted::new(Some(3), &[]);
        let step = decide(|cur: Option<u32>| {
            Ok::<Step<u32, (), &str>, Never>(match cur {
                Some(_) => Step::Stop("done"),
                None => Step::Write(0, ()),
            })
        });
        let out = run_from(&s, QUICK, step, Some((3, 1)))
            .await
            .expect("stops");
        assert!(matches!(out, Outcome::Stopped("done")));
        assert_eq!((s.reads(), s.value()), (1, Some(3)));
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use async_nats::jetstream;
    use warden_testsupport::NatsServer;

    #[tokio::test]
    async fn raw_text_is_written_as_is_and_over_a_deleted_key() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.expect("connects");
        let js = jetstream::new(client);
        let kv = js
            .create_key_value(kv::Config {
                bucket: "cas_text".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .expect("bucket");
        // Each write names what it replaced.
        let point = |to: &'static str| {
            decide(move |cur: Option<String>| Ok::<_, Never>(Step::Write(to.to_string(), cur)))
        };
        let at = KvText::new(&kv, "p");
        for (to, before) in [("a", None), ("b", Some("a")), ("c", Some("b"))] {
            match run(&at, Retry::DEFAULT, point(to)).await.expect("lands") {
                Outcome::<_, _, ()>::Written { value, with, .. } => {
                    assert_eq!(value, to);
                    assert_eq!(with.as_deref(), before);
                }
                Outcome::Stopped(()) => panic!("stopped"),
            }
            let raw = kv.get("p").await.expect("reads").expect("written");
            assert_eq!(&raw[..], to.as_bytes());
        }
        kv.delete("p").await.expect("deletes");
        assert!(at.get().await.expect("reads").is_none());
        match run(&at, Retry::DEFAULT, point("d")).await.expect("lands") {
            Outcome::<_, _, ()>::Written { with, .. } => assert_eq!(with, None),
            Outcome::Stopped(()) => panic!("stopped"),
        }
        let (v, _) = at.get().await.expect("reads").expect("written");
        assert_eq!(v, "d");
    }

    #[tokio::test]
    async fn concurrent_modifiers_both_land() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.expect("connects");
        let js = jetstream::new(client);
        let kv = js
            .create_key_value(kv::Config {
                bucket: "cas_test".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .expect("bucket");
        let add = |who: &'static str| {
            let kv = kv.clone();
            async move {
                for i in 0..20 {
                    let retry = Retry {
                        attempts: 64,
                        ..Retry::DEFAULT
                    };
                    let step = decide(|cur: Option<Vec<String>>| {
                        let mut v = cur.unwrap_or_default();
                        v.push(format!("{who}{i}"));
                        Ok::<_, Never>(Step::Write(v, ()))
                    });
                    let out = run(&KvKey::new(&kv, "k"), retry, step)
                        .await
                        .expect("lands");
                    assert!(matches!(out, Outcome::<_, (), ()>::Written { .. }));
                }
            }
        };
        tokio::join!(add("a"), add("b"));
        let (v, _) = KvKey::<Vec<String>>::new(&kv, "k")
            .get()
            .await
            .expect("reads")
            .expect("written");
        assert_eq!(v.len(), 40, "{v:?}");
        for who in ["a", "b"] {
            for i in 0..20 {
                assert!(v.contains(&format!("{who}{i}")));
            }
        }
        // Nothing to write: the record stays.
        let none = run(
            &KvKey::new(&kv, "k"),
            Retry::DEFAULT,
            decide(|_: Option<Vec<String>>| Ok::<Step<_, (), ()>, Never>(Step::Stop(()))),
        )
        .await
        .expect("reads");
        assert!(matches!(none, Outcome::Stopped(())));
        let (after, _) = KvKey::<Vec<String>>::new(&kv, "k")
            .get()
            .await
            .expect("reads")
            .expect("written");
        assert_eq!(after, v);
    }
}

#[cfg(test)]
mod job_server_tests {
    use super::*;
    use crate::job::Job;
    use crate::store::{JobStore, StoreError};
    use async_nats::jetstream;
    use warden_testsupport::NatsServer;

    async fn jobs(server: &NatsServer) -> (JobStore, kv::Store) {
        let client = async_nats::connect(server.url()).await.expect("connects");
        let js = jetstream::new(client);
        let kv = js
            .create_key_value(kv::Config {
                bucket: "cas_jobs".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .expect("bucket");
        (JobStore::new(kv.clone()), kv)
    }

    /// Adds one to the job's priority after reading another key (an async
    /// step between read and decide, as the requeue's look at the
    /// resources bucket).
    struct Bump<'a> {
        other: &'a kv::Store,
        steps: u32,
    }

    impl Change<Job> for Bump<'_> {
        type Write = ();
        type Stop = ();
        type Error = StoreError;
        async fn step(&mut self, current: Option<Job>) -> Result<Step<Job, (), ()>, StoreError> {
            self.steps += 1;
            let Some(mut job) = current else {
                return Ok(Step::Stop(()));
            };
            self.other
                .get("elsewhere")
                .await
                .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
            job.priority += 1;
            Ok(Step::Write(job, ()))
        }
    }

    #[tokio::test]
    async fn async_steps_on_a_job_store_serialise_by_revision() {
        let server = NatsServer::start();
        let (store, kv) = jobs(&server).await;
        let job = Job::builder("build").priority(0).build();
        store.create(&job).await.expect("create");
        let retry = Retry {
            attempts: 64,
            on_conflict: OnConflict::AtOnce,
            store_errors: Backoff::NONE,
        };
        let bump = || {
            let (store, kv) = (store.clone(), kv.clone());
            async move {
                let mut steps = 0;
                for _ in 0..20 {
                    let at = store.at(job.id);
                    let mut change = Bump {
                        other: &kv,
                        steps: 0,
                    };
                    let out = run(&at, retry, &mut change).await.expect("lands");
                    assert!(matches!(out, Outcome::Written { .. }));
                    steps += change.steps;
                }
                steps
            }
        };
        // Spawned: the helper's future is Send with an async step.
        let (a, b) = tokio::join!(tokio::spawn(bump()), tokio::spawn(bump()));
        let steps = a.expect("joins") + b.expect("joins");
        let v = store.get(&job.id).await.expect("reads").expect("exists");
        assert_eq!(v.job.priority, 40);
        assert!(steps >= 40);
        // An absent job: the step stops, nothing is created.
        let missing = uuid::Uuid::new_v4();
        let mut change = Bump {
            other: &kv,
            steps: 0,
        };
        let out = run(&store.at(missing), retry, &mut change)
            .await
            .expect("reads");
        assert!(matches!(out, Outcome::Stopped(())));
        assert!(store.get(&missing).await.expect("reads").is_none());
    }

    #[tokio::test]
    async fn store_errors_are_ridden_out_within_the_budget() {
        let mut server = NatsServer::start();
        let (store, kv) = jobs(&server).await;
        let job = Job::builder("build").priority(0).build();
        store.create(&job).await.expect("create");
        server.stop();
        let retry = Retry {
            attempts: 200,
            on_conflict: OnConflict::AtOnce,
            store_errors: Backoff {
                retries: 199,
                first: Duration::from_millis(20),
                max: Duration::from_millis(200),
            },
        };
        let landed = tokio::spawn({
            let store = store.clone();
            let kv = kv.clone();
            async move {
                let mut change = Bump {
                    other: &kv,
                    steps: 0,
                };
                run(&store.at(job.id), retry, &mut change).await.map(|_| ())
            }
        });
        // The first attempts fail while the server is down.
        warden_testsupport::eventually(Duration::from_secs(10), "a read fails", || {
            let store = store.clone();
            async move { store.get(&job.id).await.is_err().then_some(()) }
        })
        .await;
        server.start_again();
        tokio::time::timeout(Duration::from_secs(60), landed)
            .await
            .expect("lands in time")
            .expect("joins")
            .expect("lands");
        let v = store.get(&job.id).await.expect("reads").expect("exists");
        assert_eq!(v.job.priority, 1);
    }
}
