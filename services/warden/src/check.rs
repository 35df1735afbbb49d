//! `warden check WHAT`: a Nagios plugin (Monitoring Plugins development
//! guidelines). It prints ONE line on stdout,
//!
//! ```text
//! WARDEN QUEUE-AGE OK - oldest waiting job 12s (pool default) | 'oldest_wait'=12s;1800;3600;0; ...
//! ```
//!
//! and exits 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. Bad arguments, a bad
//! config and a service that does not answer are UNKNOWN (the check could
//! not measure), except for `bus`, whose whole point is that something does
//! not answer: CRITICAL. Nothing here writes to the bus beyond requests.
//!
//! The module is in two halves: pure parsing and evaluation ([`Plan`],
//! [`Range`], [`Outcome`] and one function per WHAT), unit-tested below,
//! and [`run`], the I/O that feeds them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::time::{Duration, Instant};

use clap::Args;
use thiserror::Error;
use warden_shared::messages::QueueReply;
use warden_shared::resource::{Resource, ResourceState};
use warden_shared::{subjects, Blame, Config, JobSummary};

/// `warden check`'s own arguments (`--config` and `--nats-url` are the
/// command's global ones). Values are taken as strings and checked here, so
/// a bad one is UNKNOWN with our words, not clap's usage error.
#[derive(Args, Debug, Clone, Default)]
pub struct CheckArgs {
    /// WARNING threshold: a number (alert above it; for `resources`, below
    /// it) or a Nagios range (N:, ~:N, N:M, @N:M)
    #[arg(long, short = 'w', value_name = "N", allow_hyphen_values = true)]
    pub warning: Option<String>,
    /// CRITICAL threshold, as --warning
    #[arg(long, short = 'c', value_name = "N", allow_hyphen_values = true)]
    pub critical: Option<String>,
    /// crash-rate: count only crashes with this blame (system, third_party, task, unknown)
    #[arg(long)]
    pub blame: Option<String>,
    /// resources: the pool (required); queue-age, shelved: only this pool
    #[arg(long)]
    pub pool: Option<String>,
    /// crash-rate: how far back [default: 15m]
    #[arg(long)]
    pub window: Option<String>,
    /// Give up after this long (10s, 500ms; a plain number is seconds)
    #[arg(long, short = 't', default_value = "10s")]
    pub timeout: String,
    /// bus, queue-age, shelved, crash-rate or resources
    pub what: String,
}

// ---------------------------------------------------------------------
// Status, thresholds, perfdata, the status line.

/// A plugin's result; the discriminant is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }

    /// The more serious of two (CRITICAL > WARNING > UNKNOWN > OK).
    pub fn worse(self, other: Status) -> Status {
        let rank = |s: Status| match s {
            Status::Ok => 0,
            Status::Unknown => 1,
            Status::Warning => 2,
            Status::Critical => 3,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("unknown check {0:?}: use bus, queue-age, shelved, crash-rate or resources")]
    UnknownWhat(String),
    #[error("--{flag} {value:?}: {why}")]
    Threshold {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("--blame {0:?}: use system, third_party, task or unknown")]
    Blame(String),
    #[error("--{flag} {value:?}: not a duration (e.g. 15m, 10s)")]
    Duration { flag: &'static str, value: String },
    #[error("--{flag} must be more than 0")]
    Zero { flag: &'static str },
    #[error("--{flag} does not apply to {what}")]
    NotApplicable {
        flag: &'static str,
        what: &'static str,
    },
    #[error("resources needs --pool P")]
    PoolMissing,
    #[error("--pool must not be empty")]
    PoolEmpty,
}

/// Which way a plain number N alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sense {
    /// Above N (N means the range 0:N).
    Above,
    /// Below N (N means the range N:).
    Below,
}

/// A Nagios threshold range, `[@][start:][end]`: alert when the value is
/// outside start..=end (inside, with `@`). `~` as start is minus
/// infinity; no end is infinity; a lone N is 0:N.
#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    low: f64,
    high: f64,
    inside: bool,
    /// As it goes in perfdata.
    text: String,
}

const RANGE_HELP: &str = "not a number or a range (N, N:, ~:N, N:M, @N:M)";

fn number(s: &str) -> Option<f64> {
    let s = s.trim();
    // f64's parser also takes "inf" and "NaN": no use as a threshold.
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

impl Range {
    /// Parses `value` (of `--flag`); a plain number is read by `sense`.
    pub fn parse(flag: &'static str, value: &str, sense: Sense) -> Result<Range, ArgError> {
        let err = |why| ArgError::Threshold {
            flag,
            value: value.to_string(),
            why,
        };
        let v = value.trim();
        if v.is_empty() {
            return Err(err("empty"));
        }
        if let Some(n) = number(v) {
            return Ok(match sense {
                Sense::Above => Range {
                    low: 0.0,
                    high: n,
                    inside: false,
                    text: v.to_string(),
                },
                Sense::Below => Range {
                    low: n,
                    high: f64::INFINITY,
                    inside: false,
                    text: format!("{v}:"),
                },
            });
        }
        let (inside, body) = match v.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, v),
        };
        let (low, high) = match body.split_once(':') {
            Some((lo, hi)) => {
                let low = match lo {
                    "~" => f64::NEG_INFINITY,
                    "" => 0.0,
                    lo => number(lo).ok_or_else(|| err(RANGE_HELP))?,
                };
                let high = match hi {
                    "" => f64::INFINITY,
                    hi => number(hi).ok_or_else(|| err(RANGE_HELP))?,
                };
                (low, high)
            }
            None => (0.0, number(body).ok_or_else(|| err(RANGE_HELP))?),
        };
        if low > high {
            return Err(err("its start is above its end"));
        }
        Ok(Range {
            low,
            high,
            inside,
            text: v.to_string(),
        })
    }

    /// Whether `value` raises the alert.
    pub fn alerts(&self, value: f64) -> bool {
        let within = self.low <= value && value <= self.high;
        within == self.inside
    }
}

/// `--warning` and `--critical`, either optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thresholds {
    pub warning: Option<Range>,
    pub critical: Option<Range>,
}

impl Thresholds {
    pub fn status(&self, value: f64) -> Status {
        if self.critical.as_ref().is_some_and(|r| r.alerts(value)) {
            Status::Critical
        } else if self.warning.as_ref().is_some_and(|r| r.alerts(value)) {
            Status::Warning
        } else {
            Status::Ok
        }
    }

    fn warn_text(&self) -> Option<String> {
        self.warning.as_ref().map(|r| r.text.clone())
    }

    fn crit_text(&self) -> Option<String> {
        self.critical.as_ref().map(|r| r.text.clone())
    }
}

/// A number as perfdata and status lines show it: integers without a
/// fraction, others with at most six decimals.
pub fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// One perfdata item: `'label'=value[UOM];[warn];[crit];[min];[max]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Perf {
    pub label: String,
    pub value: f64,
    pub uom: &'static str,
    pub warn: Option<String>,
    pub crit: Option<String>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Perf {
    pub fn with_uom(mut self, uom: &'static str) -> Perf {
        self.uom = uom;
        self
    }

    /// A value without thresholds, at least 0.
    pub fn count(label: impl Into<String>, value: f64) -> Perf {
        Perf {
            label: label.into(),
            value,
            uom: "",
            warn: None,
            crit: None,
            min: Some(0.0),
            max: None,
        }
    }

    /// A value judged by `t`, at least 0.
    pub fn judged(label: impl Into<String>, value: f64, uom: &'static str, t: &Thresholds) -> Perf {
        Perf {
            label: label.into(),
            value,
            uom,
            warn: t.warn_text(),
            crit: t.crit_text(),
            min: Some(0.0),
            max: None,
        }
    }
}

impl fmt::Display for Perf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The guidelines allow neither `=` nor `'` in a label.
        let label: String = self
            .label
            .chars()
            .map(|c| if c == '=' || c == '\'' { '_' } else { c })
            .collect();
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let optn = |v: Option<f64>| v.map(num).unwrap_or_default();
        write!(
            f,
            "'{label}'={}{};{};{};{};{}",
            num(self.value),
            self.uom,
            opt(&self.warn),
            opt(&self.crit),
            optn(self.min),
            optn(self.max)
        )
    }
}

/// What a check found: the status, one line of text and perfdata.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: Status,
    pub text: String,
    pub perf: Vec<Perf>,
}

impl Outcome {
    pub fn unknown(text: impl Into<String>) -> Outcome {
        Outcome {
            status: Status::Unknown,
            text: text.into(),
            perf: Vec::new(),
        }
    }

    /// The status line: `WARDEN <NAME> <STATUS> - text | perfdata`, with
    /// no `|` or line break inside the text. `name` is `None` when the
    /// check itself is not known (a bad WHAT).
    pub fn line(&self, name: Option<&str>) -> String {
        let text: String = self
            .text
            .chars()
            .map(|c| match c {
                '|' => '/',
                '\n' | '\r' => ' ',
                c => c,
            })
            .collect();
        let mut line = match name {
            Some(n) => format!("WARDEN {n} {} - {}", self.status.as_str(), text.trim()),
            None => format!("WARDEN {} - {}", self.status.as_str(), text.trim()),
        };
        if !self.perf.is_empty() {
            line.push_str(" |");
            for p in &self.perf {
                line.push(' ');
                line.push_str(&p.to_string());
            }
        }
        line
    }
}

// ---------------------------------------------------------------------
// Arguments.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Bus,
    QueueAge,
    Shelved,
    CrashRate,
    Resources,
}

impl What {
    pub fn parse(s: &str) -> Result<What, ArgError> {
        Ok(match s {
            "bus" => What::Bus,
            "queue-age" => What::QueueAge,
            "shelved" => What::Shelved,
            "crash-rate" => What::CrashRate,
            "resources" => What::Resources,
            other => return Err(ArgError::UnknownWhat(other.to_string())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            What::Bus => "bus",
            What::QueueAge => "queue-age",
            What::Shelved => "shelved",
            What::CrashRate => "crash-rate",
            What::Resources => "resources",
        }
    }

    /// The service name in the status line.
    pub fn name(self) -> &'static str {
        match self {
            What::Bus => "BUS",
            What::QueueAge => "QUEUE-AGE",
            What::Shelved => "SHELVED",
            What::CrashRate => "CRASH-RATE",
            What::Resources => "RESOURCES",
        }
    }
}

/// A check to run, its arguments validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub what: What,
    pub thresholds: Thresholds,
    pub pool: Option<String>,
    pub blame: Option<Blame>,
    pub window: Duration,
    /// `--window` as given, for the API and the text.
    pub window_text: String,
    pub timeout: Duration,
}

pub const DEFAULT_WINDOW: &str = "15m";

/// A duration as `10s`, `15m`, `500ms`, or a plain number of seconds.
fn duration(flag: &'static str, value: &str) -> Result<Duration, ArgError> {
    let v = value.trim();
    let d = match number(v) {
        Some(secs) if secs >= 0.0 => Duration::from_secs_f64(secs),
        Some(_) => return Err(ArgError::Zero { flag }),
        None => {
            humantime_serde::re::humantime::parse_duration(v).map_err(|_| ArgError::Duration {
                flag,
                value: value.to_string(),
            })?
        }
    };
    if d.is_zero() {
        return Err(ArgError::Zero { flag });
    }
    Ok(d)
}

impl Plan {
    pub fn from_args(a: &CheckArgs) -> Result<Plan, ArgError> {
        let what = What::parse(a.what.trim())?;
        let sense = if what == What::Resources {
            Sense::Below
        } else {
            Sense::Above
        };
        let thresholds = Thresholds {
            warning: a
                .warning
                .as_deref()
                .map(|w| Range::parse("warning", w, sense))
                .transpose()?,
            critical: a
                .critical
                .as_deref()
                .map(|c| Range::parse("critical", c, sense))
                .transpose()?,
        };
        let not_for = |flag| ArgError::NotApplicable {
            flag,
            what: what.as_str(),
        };
        let blame = match (&a.blame, what) {
            (None, _) => None,
            (Some(b), What::CrashRate) => Some(
                b.trim()
                    .parse::<Blame>()
                    .map_err(|_| ArgError::Blame(b.clone()))?,
            ),
            (Some(_), _) => return Err(not_for("blame")),
        };
        let window_text = match (&a.window, what) {
            (Some(w), What::CrashRate) => w.trim().to_string(),
            (None, _) => DEFAULT_WINDOW.to_string(),
            (Some(_), _) => return Err(not_for("window")),
        };
        let window = duration("window", &window_text)?;
        let pool = match (&a.pool, what) {
            (Some(p), _) if p.trim().is_empty() => return Err(ArgError::PoolEmpty),
            (Some(_), What::Bus | What::CrashRate) => return Err(not_for("pool")),
            (None, What::Resources) => return Err(ArgError::PoolMissing),
            (p, _) => p.as_ref().map(|p| p.trim().to_string()),
        };
        Ok(Plan {
            what,
            thresholds,
            pool,
            blame,
            window,
            window_text,
            timeout: duration("timeout", &a.timeout)?,
        })
    }
}

/// Whether the command line runs `warden check` (the first word that is
/// neither an option nor the value of a global option is `check`): its
/// usage errors must exit 3, not clap's 2, which Nagios reads as CRITICAL.
pub fn invoked(args: &[OsString]) -> bool {
    let mut it = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == "--nats-url" || a == "--config" {
            it.next();
            continue;
        }
        if a.starts_with('-') {
            continue;
        }
        return a == "check";
    }
    false
}

/// A clap error as one UNKNOWN line's text (its first line, without the
/// `error: ` prefix and the usage that follows).
pub fn usage_error_text(rendered: &str) -> String {
    // The message is the first paragraph (clap puts what is missing on
    // the lines under it); the usage follows a blank line.
    let words: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .flat_map(str::split_whitespace)
        .collect();
    let text = words.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    format!(
        "bad arguments: {} (see warden check --help)",
        if text.is_empty() { "unreadable" } else { text }
    )
}

// ---------------------------------------------------------------------
// Evaluation: one pure function per WHAT.

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// `queue-age`: the worst pool's oldest ready job (or only `pool`).
pub fn queue_age(reply: &QueueReply, pool: Option<&str>, t: &Thresholds) -> Outcome {
    let pools: Vec<_> = reply
        .pools
        .iter()
        .filter(|p| pool.is_none_or(|want| p.pool == want))
        .collect();
    let mut status = Status::Ok;
    // The pool that decides: the worst status, then the longest wait.
    let mut worst: Option<(Status, u64, usize)> = None;
    for (i, p) in pools.iter().enumerate() {
        let s = t.status(p.oldest_wait_seconds as f64);
        status = status.worse(s);
        let better = match worst {
            None => true,
            Some((ws, wait, _)) => {
                (s != ws && s.worse(ws) == s) || (s == ws && p.oldest_wait_seconds > wait)
            }
        };
        if better {
            worst = Some((s, p.oldest_wait_seconds, i));
        }
    }
    let oldest = pools
        .iter()
        .map(|p| p.oldest_wait_seconds)
        .max()
        .unwrap_or(0);
    let ready: u64 = pools.iter().map(|p| p.ready).sum();
    let text = match worst.map(|(_, _, i)| pools[i]) {
        Some(p) if p.ready > 0 => {
            let mut text = format!(
                "oldest waiting job {}s (pool {}: {} ready{})",
                p.oldest_wait_seconds,
                p.pool,
                p.ready,
                if p.served {
                    ""
                } else {
                    ", no worker on a healthy resource serves it"
                }
            );
            if ready > p.ready {
                text.push_str(&format!("; {ready} ready in all"));
            }
            text
        }
        _ => match pool {
            Some(want) => format!("no job waiting in pool {want}"),
            None => "no job waiting".to_string(),
        },
    };
    let mut perf = vec![Perf::judged("oldest_wait", oldest as f64, "s", t)];
    let mut listed: Vec<&str> = Vec::new();
    for p in &pools {
        perf.push(Perf::judged(
            format!("oldest_wait_{}", p.pool),
            p.oldest_wait_seconds as f64,
            "s",
            t,
        ));
        perf.push(Perf::count(format!("ready_{}", p.pool), p.ready as f64));
        listed.push(&p.pool);
    }
    if let Some(want) = pool {
        if !listed.contains(&want) {
            perf.push(Perf::judged(format!("oldest_wait_{want}"), 0.0, "s", t));
            perf.push(Perf::count(format!("ready_{want}"), 0.0));
        }
    }
    Outcome { status, text, perf }
}

/// `shelved`: how many SHELVED jobs there are (`newest` is the most recent).
pub fn shelved(
    total: u64,
    newest: Option<&JobSummary>,
    pool: Option<&str>,
    t: &Thresholds,
) -> Outcome {
    let place = pool.map(|p| format!(" in pool {p}")).unwrap_or_default();
    let mut text = if total == 0 {
        format!("no shelved job{place}")
    } else {
        format!("{}{place}", plural(total, "shelved job", "shelved jobs"))
    };
    if let Some(j) = newest.filter(|_| total > 0) {
        text.push_str(&format!(" (newest: {} {}", j.task, j.id));
        if let Some(b) = j.blame {
            text.push_str(&format!(
                ", {b}/{}",
                j.detail.as_deref().unwrap_or("unclassified")
            ));
        }
        text.push(')');
    }
    Outcome {
        status: t.status(total as f64),
        text,
        perf: vec![Perf::judged("shelved", total as f64, "", t)],
    }
}

/// `crash-rate`: jobs last changed within `window` that carry `blame` (any
/// blame when `None`), per minute of the window.
pub fn crash_rate(
    by_blame: &BTreeMap<String, usize>,
    blame: Option<Blame>,
    window: Duration,
    window_text: &str,
    t: &Thresholds,
) -> Outcome {
    let count: usize = match blame {
        Some(b) => by_blame.get(b.as_str()).copied().unwrap_or(0),
        None => by_blame.values().sum(),
    };
    let minutes = window.as_secs_f64() / 60.0;
    let rate = if minutes > 0.0 {
        count as f64 / minutes
    } else {
        0.0
    };
    let (which, suffix) = match blame {
        Some(b) => (format!("blame {b}"), format!("_{b}")),
        None => ("any blame".to_string(), String::new()),
    };
    let text = format!(
        "{:.2} crashes/min with {which} over {window_text} ({} last changed in the window carrying {})",
        rate,
        plural(count as u64, "job", "jobs"),
        if blame.is_some() { "that blame" } else { "a blame" },
    );
    Outcome {
        status: t.status(rate),
        text,
        perf: vec![
            Perf::judged(format!("crash_rate{suffix}"), rate, "", t),
            Perf::count(format!("crashed{suffix}"), count as f64),
        ],
    }
}

/// Whether a resource is capacity for its pools: open, with an agent (the
/// health service's `warden_health_pool_resources{state="open"}`).
pub fn healthy(r: &Resource) -> bool {
    r.state == ResourceState::Open && !r.sessions.is_empty()
}

/// `resources`: healthy resources serving `pool`; alerts when fewer.
pub fn resources(all: &[Resource], pool: &str, t: &Thresholds) -> Outcome {
    let mine: Vec<&Resource> = all
        .iter()
        .filter(|r| r.pools.iter().any(|p| p == pool))
        .collect();
    let good = mine.iter().filter(|r| healthy(r)).count() as u64;
    let mut others: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &mine {
        if healthy(r) || r.state == ResourceState::Closed {
            continue;
        }
        let what = if r.state == ResourceState::Open {
            "open without an agent"
        } else {
            r.state.as_str()
        };
        *others.entry(what).or_default() += 1;
    }
    let mut text = if good == 0 {
        format!("no healthy resource in pool {pool}")
    } else {
        format!(
            "{} in pool {pool}",
            plural(good, "healthy resource", "healthy resources")
        )
    };
    if !others.is_empty() {
        let list: Vec<String> = others.iter().map(|(k, n)| format!("{n} {k}")).collect();
        text.push_str(&format!(" ({})", list.join(", ")));
    }
    let unhealthy: u64 = others.values().sum();
    Outcome {
        status: t.status(good as f64),
        text,
        perf: vec![
            Perf::judged(format!("healthy_{pool}"), good as f64, "", t),
            Perf::count(format!("unhealthy_{pool}"), unhealthy as f64),
        ],
    }
}

/// The services `bus` expects on the service API (`$SRV.PING`), sorted
/// ([`warden_shared::services::pinged`]).
pub fn services() -> Vec<&'static str> {
    warden_shared::services::pinged()
}

/// What `bus` measured once connected.
#[derive(Debug, Clone, PartialEq)]
pub struct BusSeen {
    /// From start to connected (TCP, TLS, NATS handshake).
    pub connect: Duration,
    /// A flush's round trip.
    pub rtt: Duration,
    /// Service name → instances that answered `$SRV.PING`.
    pub answered: BTreeMap<String, usize>,
    /// The trigger: `Ok(true)` when its durable consumer has a waiting pull
    /// request, `Ok(false)` when it has none, `Err(why)` when it cannot be
    /// read (no stream or consumer, no permission).
    pub trigger: Result<bool, TriggerUnread>,
}

/// Why the trigger's consumer could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TriggerUnread {
    /// No stream or consumer, no permission: the server's words.
    #[error("cannot read its consumer: {0}")]
    Consumer(String),
    #[error("its consumer's info did not come within {}", human(*.0))]
    Late(Duration),
}

/// `bus`: every service answers; thresholds (seconds) judge the round trip.
pub fn bus(seen: &BusSeen, t: &Thresholds) -> Outcome {
    let mut missing: Vec<String> = services()
        .iter()
        .filter(|s| !seen.answered.contains_key(**s))
        .map(|s| s.to_string())
        .collect();
    let mut up: Vec<String> = services()
        .iter()
        .filter(|s| seen.answered.contains_key(**s))
        .map(|s| s.to_string())
        .collect();
    match &seen.trigger {
        Ok(true) => up.push(subjects::TRIGGER_CONSUMER.to_string()),
        Ok(false) => missing.push(format!(
            "{} (no pull request on its consumer)",
            subjects::TRIGGER_CONSUMER
        )),
        Err(why) => missing.push(format!("{} ({why})", subjects::TRIGGER_CONSUMER)),
    }
    let rtt = seen.rtt.as_secs_f64();
    let rtt_text = format!("NATS answers in {:.1} ms", rtt * 1000.0);
    let total = services().len() + 1;
    let rtt_status = t.status(rtt);
    let (status, text) = if missing.is_empty() {
        (
            rtt_status,
            format!(
                "{rtt_text}; all {} services answer ({})",
                up.len(),
                up.join(", ")
            ),
        )
    } else {
        (
            Status::Critical,
            format!(
                "not answering: {}; {rtt_text}; answering: {}",
                missing.join(", "),
                if up.is_empty() {
                    "none".to_string()
                } else {
                    up.join(", ")
                }
            ),
        )
    };
    let instances: usize = seen.answered.values().sum();
    Outcome {
        status,
        text,
        perf: vec![
            Perf::judged("rtt", rtt, "s", t),
            Perf::count("connect", seen.connect.as_secs_f64()).with_uom("s"),
            Perf {
                label: "services".into(),
                value: up.len() as f64,
                uom: "",
                warn: None,
                crit: Some(format!("{total}:")),
                min: Some(0.0),
                max: Some(total as f64),
            },
            Perf::count("instances", instances as f64),
        ],
    }
}

/// `bus` when NATS itself cannot be reached.
pub fn bus_down(why: &str) -> Outcome {
    let total = services().len() + 1;
    Outcome {
        status: Status::Critical,
        text: why.to_string(),
        perf: vec![Perf {
            label: "services".into(),
            value: 0.0,
            uom: "",
            warn: None,
            crit: Some(format!("{total}:")),
            min: Some(0.0),
            max: Some(total as f64),
        }],
    }
}

// ---------------------------------------------------------------------
// I/O.

/// A duration in seconds as a person reads it: `10s`, `3.3s`.
fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}s", s as u64)
    } else {
        format!("{s:.1}s")
    }
}

/// Runs `warden check` from its arguments and the loaded config (or the
/// reason it could not be loaded); returns the status line and exit code.
pub async fn main(
    config: Result<Config, warden_shared::config::ConfigError>,
    args: &CheckArgs,
) -> (String, i32) {
    let plan = match Plan::from_args(args) {
        Ok(p) => p,
        Err(e) => {
            let name = What::parse(args.what.trim()).ok().map(What::name);
            let o = Outcome::unknown(e.to_string());
            return (o.line(name), o.status.code());
        }
    };
    let name = Some(plan.what.name());
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            let o = Outcome::unknown(format!("bad configuration: {}", e.problems().join("; ")));
            return (o.line(name), o.status.code());
        }
    };
    let o = run(&config, &plan).await;
    (o.line(name), o.status.code())
}

/// Something the check could not get, as text for its status line.
struct Failure(String);

impl<E: fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

/// Connects, measures and judges, all within `plan.timeout`. When NATS or
/// a service does not answer, `bus` is CRITICAL and the others UNKNOWN.
pub async fn run(config: &Config, plan: &Plan) -> Outcome {
    let said = ServerSaid::default();
    let mut o = run_inner(config, plan, &said).await;
    // A permissions violation is not an answer to the request that caused
    // it (that one just times out): say what the server said.
    if o.status != Status::Ok {
        if let Some(e) = said.last() {
            o.text.push_str(&format!(" ({e})"));
        }
    }
    o
}

/// The last error the server sent on the connection (e.g. a permissions
/// violation of the user the check logs in as).
#[derive(Clone, Default)]
struct ServerSaid(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl ServerSaid {
    fn set(&self, e: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    fn last(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn run_inner(config: &Config, plan: &Plan, said: &ServerSaid) -> Outcome {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let url = warden_shared::redact::redact(&config.nats.url);
    let within = human(plan.timeout);
    let fail = |why: String| match plan.what {
        What::Bus => bus_down(&why),
        _ => Outcome::unknown(why),
    };
    let client = match tokio::time::timeout_at(deadline, connect(config, plan.timeout, said)).await
    {
        Ok(Ok(c)) => c,
        // Our own set-up (URL, credentials, login) is not the bus failing.
        Ok(Err(NoClient::Setup(why))) => return Outcome::unknown(why),
        Ok(Err(NoClient::Unreachable(why))) => {
            return fail(format!("cannot reach NATS at {url}: {why}"))
        }
        Err(_) => return fail(format!("cannot reach NATS at {url} within {within}")),
    };
    let connected = started.elapsed();
    match tokio::time::timeout_at(deadline, measure(&client, plan, connected)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => fail(e.0),
        Err(_) => fail(format!("no answer within {within}")),
    }
}

/// Why there is no connection.
enum NoClient {
    /// The check's own set-up: a bad URL, unreadable credentials, a login
    /// the server refuses (UNKNOWN for every check).
    Setup(String),
    /// NATS does not answer (CRITICAL for `bus`).
    Unreachable(String),
}

async fn connect(
    config: &Config,
    timeout: Duration,
    said: &ServerSaid,
) -> Result<async_nats::Client, NoClient> {
    use warden_shared::runtime::{Connect, ConnectError};
    let said = said.clone();
    Connect::new(config, "check")
        .name("warden-check")
        .short_lived(timeout, 1)
        .on_server_error(move |e| said.set(e))
        .client()
        .await
        .map_err(|e| match e {
            ConnectError::Credentials { path, source } => {
                NoClient::Setup(format!("cannot read credentials {path}: {source}"))
            }
            ConnectError::TlsFile { key, path, source } => {
                NoClient::Setup(format!("cannot read {key} {path}: {source}"))
            }
            ConnectError::Connect { url, source } => match source.kind() {
                async_nats::ConnectErrorKind::ServerParse => {
                    NoClient::Setup(format!("bad NATS URL {url:?}: {source}"))
                }
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication => NoClient::Setup(format!(
                    "NATS at {url} refused the login: {source} (check [nats] user/password or credentials)"
                )),
                _ => NoClient::Unreachable(source.to_string()),
            },
            other => NoClient::Unreachable(other.to_string()),
        })
}

async fn measure(
    client: &async_nats::Client,
    plan: &Plan,
    connected: Duration,
) -> Result<Outcome, Failure> {
    let t = &plan.thresholds;
    match plan.what {
        What::Bus => {
            let mut seen = see_bus(client, plan.timeout).await?;
            seen.connect = connected;
            Ok(bus(&seen, t))
        }
        What::QueueAge => {
            let request = async_nats::Request::new()
                .payload(bytes::Bytes::from_static(b"{}"))
                .timeout(Some(plan.timeout));
            let msg = client
                .send_request(subjects::SCHED_QUEUE, request)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => Failure(format!(
                        "no {} answers on {} (is it running?)",
                        subjects::SCHEDULER_SERVICE,
                        subjects::SCHED_QUEUE
                    )),
                    _ => Failure(format!("{} did not answer: {e}", subjects::SCHED_QUEUE)),
                })?;
            let reply: QueueReply = serde_json::from_slice(&msg.payload)
                .map_err(|e| Failure(format!("bad answer from the scheduler: {e}")))?;
            Ok(queue_age(&reply, plan.pool.as_deref(), t))
        }
        What::Shelved => {
            let api = warden_api::ApiClient::new(client.clone()).with_timeout(plan.timeout);
            let reply = api
                .list(warden_api::ListQuery {
                    state: Some("SHELVED".into()),
                    pool: plan.pool.clone(),
                    limit: Some(1),
                    ..Default::default()
                })
                .await
                .map_err(api_failure)?;
            Ok(shelved(
                reply.total as u64,
                reply.jobs.first(),
                plan.pool.as_deref(),
                t,
            ))
        }
        What::CrashRate => {
            let api = warden_api::ApiClient::new(client.clone()).with_timeout(plan.timeout);
            let stats = api
                .stats(warden_api::StatsQuery {
                    window: Some(plan.window_text.clone()),
                })
                .await
                .map_err(api_failure)?;
            Ok(crash_rate(
                &stats.by_blame,
                plan.blame,
                plan.window,
                &plan.window_text,
                t,
            ))
        }
        What::Resources => {
            let js = async_nats::jetstream::new(client.clone());
            let kv = js
                .get_key_value(subjects::RESOURCES_BUCKET)
                .await
                .map_err(|e| Failure(format!("cannot open the resources bucket: {e}")))?;
            let all = warden_shared::resource::list(&kv)
                .await
                .map_err(|e| Failure(format!("cannot read resources: {e}")))?;
            let pool = plan.pool.as_deref().unwrap_or_default();
            Ok(resources(&all, pool, t))
        }
    }
}

fn api_failure(e: warden_api::ClientError) -> Failure {
    match e {
        warden_api::ClientError::NoResponders => Failure(format!(
            "no {} answers (is it running?)",
            subjects::API_SERVICE
        )),
        warden_api::ClientError::Api(body) => {
            Failure(format!("the API refused: {}: {}", body.code, body.message))
        }
        other => Failure(format!("{}: {other}", subjects::API_SERVICE)),
    }
}

/// How long `bus` collects `$SRV.PING` answers (less when the timeout is
/// shorter).
const PING_WINDOW: Duration = Duration::from_secs(1);

#[derive(serde::Deserialize)]
struct PingAnswer {
    name: String,
}

async fn see_bus(client: &async_nats::Client, timeout: Duration) -> Result<BusSeen, Failure> {
    use futures::StreamExt;
    let t0 = Instant::now();
    client
        .flush()
        .await
        .map_err(|e| Failure(format!("NATS does not answer a flush: {e}")))?;
    let rtt = t0.elapsed();

    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subjects::SERVICE_PING, inbox, bytes::Bytes::new())
        .await?;
    client.flush().await?;
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let window = PING_WINDOW.min(timeout / 3);
    let deadline = tokio::time::Instant::now() + window;
    loop {
        let msg = tokio::select! {
            m = replies.next() => match m { Some(m) => m, None => break },
            _ = tokio::time::sleep_until(deadline) => break,
        };
        // Not every answer need be ours to read: skip what does not parse.
        if let Ok(a) = serde_json::from_slice::<PingAnswer>(&msg.payload) {
            *answered.entry(a.name).or_default() += 1;
        }
    }
    let _ = replies.unsubscribe().await;

    // A request the server refuses (permissions) is never answered: keep
    // time for the status line.
    let budget = timeout / 3;
    let js = async_nats::jetstream::new(client.clone());
    let info = js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
        subjects::TRIGGER_CONSUMER,
        subjects::EVENTS_STREAM,
    );
    let trigger = match tokio::time::timeout(budget, info).await {
        Ok(Ok(c)) => Ok(c.cached_info().num_waiting > 0),
        Ok(Err(e)) => Err(TriggerUnread::Consumer(e.to_string())),
        Err(_) => Err(TriggerUnread::Late(budget)),
    };
    Ok(BusSeen {
        connect: Duration::ZERO,
        rtt,
        answered,
        trigger,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use warden_shared::messages::PoolQueue;
    use warden_shared::resource::ResourceSession;

    #[tokio::test]
    async fn no_password_of_a_url_reaches_the_status_line() {
        // Nothing listens there (bound and released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("nats://warden-readonly:s3cret@127.0.0.1:{port}");
        // Refused by validation: the problem names the URL redacted.
        let file = format!("[nats]\nurl = {url:?}\n");
        let (line, code) = main(Config::from_parts(Some(&file), []), &args("bus")).await;
        assert_eq!(code, 3, "{line}");
        assert!(
            line.contains("nats.user") && !line.contains("s3cret"),
            "{line}"
        );
        // Even a URL that got past validation is printed redacted.
        let mut c = Config::defaults();
        c.nats.url = url;
        let mut a = args("bus");
        a.timeout = "2s".into();
        let (line, _) = main(Ok(c), &a).await;
        assert!(line.contains("127.0.0.1"), "{line}");
        assert!(!line.contains("s3cret"), "{line}");
    }

    fn args(what: &str) -> CheckArgs {
        CheckArgs {
            what: what.into(),
            timeout: "10s".into(),
            ..Default::default()
        }
    }

    fn above(w: &str, c: &str) -> Thresholds {
        Thresholds {
            warning: Some(Range::parse("warning", w, Sense::Above).expect("warning")),
            critical: Some(Range::parse("critical", c, Sense::Above).expect("critical")),
        }
    }

    #[test]
    fn a_plain_number_alerts_above_it_decimals_included() {
        let r = Range::parse("warning", "0.5", Sense::Above).expect("decimal");
        assert!(!r.alerts(0.0));
        assert!(!r.alerts(0.5), "at the threshold is not above it");
        assert!(r.alerts(0.51));
        assert!(r.alerts(-1.0), "N is 0:N, as in the guidelines");
        let zero = Range::parse("warning", "0", Sense::Above).expect("zero");
        assert!(!zero.alerts(0.0));
        assert!(zero.alerts(1.0));
        assert_eq!(zero.text, "0");
    }

    #[test]
    fn a_plain_number_for_resources_alerts_below_it() {
        let r = Range::parse("warning", "2", Sense::Below).expect("below");
        assert!(r.alerts(1.0));
        assert!(!r.alerts(2.0));
        assert!(!r.alerts(10.0));
        assert_eq!(r.text, "2:", "perfdata shows the range it means");
    }

    #[test]
    fn nagios_range_syntax() {
        let p = |s: &str| Range::parse("warning", s, Sense::Above).expect(s);
        // 10: alerts below 10.
        assert!(p("10:").alerts(9.9));
        assert!(!p("10:").alerts(10.0));
        // ~:10 alerts above 10, never below.
        assert!(p("~:10").alerts(10.5));
        assert!(!p("~:10").alerts(-100.0));
        // 10:20 alerts outside.
        assert!(p("10:20").alerts(9.0));
        assert!(!p("10:20").alerts(15.0));
        assert!(p("10:20").alerts(21.0));
        // @10:20 alerts inside.
        assert!(p("@10:20").alerts(10.0));
        assert!(!p("@10:20").alerts(21.0));
        assert!(p("@1.5:2.5").alerts(2.0));
        // The same meaning whatever the sense: only plain numbers differ.
        assert_eq!(
            Range::parse("warning", "~:3", Sense::Below).expect("range"),
            p("~:3")
        );
        assert_eq!(p("@10:20").text, "@10:20");
    }

    #[test]
    fn bad_thresholds_are_refused_with_the_flag_and_value() {
        for bad in [
            "abc", "", " ", "1:x", "20:10", "inf", "NaN", "@", "1:2:3", "--",
        ] {
            let e = Range::parse("warning", bad, Sense::Above).expect_err(bad);
            assert!(
                matches!(
                    e,
                    ArgError::Threshold {
                        flag: "warning",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        let e = Range::parse("critical", "abc", Sense::Above).expect_err("abc");
        assert_eq!(
            e.to_string(),
            "--critical \"abc\": not a number or a range (N, N:, ~:N, N:M, @N:M)"
        );
    }

    #[test]
    fn thresholds_map_to_status_critical_first() {
        let t = above("10", "20");
        assert_eq!(t.status(5.0), Status::Ok);
        assert_eq!(t.status(15.0), Status::Warning);
        assert_eq!(t.status(25.0), Status::Critical);
        assert_eq!(Thresholds::default().status(1e9), Status::Ok);
        let only_crit = Thresholds {
            warning: None,
            critical: Some(Range::parse("critical", "1", Sense::Above).expect("1")),
        };
        assert_eq!(only_crit.status(2.0), Status::Critical);
    }

    #[test]
    fn exit_codes_and_severity() {
        let codes: Vec<i32> = [
            Status::Ok,
            Status::Warning,
            Status::Critical,
            Status::Unknown,
        ]
        .iter()
        .map(|s| s.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3]);
        assert_eq!(Status::Ok.worse(Status::Warning), Status::Warning);
        assert_eq!(Status::Critical.worse(Status::Warning), Status::Critical);
        assert_eq!(Status::Unknown.worse(Status::Warning), Status::Warning);
        assert_eq!(Status::Ok.worse(Status::Unknown), Status::Unknown);
    }

    #[test]
    fn perfdata_has_the_standard_form() {
        let t = above("300", "900");
        let p = Perf::judged("oldest_wait_default", 12.0, "s", &t);
        assert_eq!(p.to_string(), "'oldest_wait_default'=12s;300;900;0;");
        assert_eq!(
            Perf::count("ready", 3.0).to_string(),
            "'ready'=3;;;0;",
            "no thresholds: empty fields"
        );
        let odd = Perf::count("it's=odd", 0.1 + 0.2);
        assert_eq!(odd.to_string(), "'it_s_odd'=0.3;;;0;");
        assert_eq!(num(0.000412), "0.000412");
        assert_eq!(num(2.0 / 15.0), "0.133333");
        assert_eq!(num(-0.0), "0");
    }

    #[test]
    fn the_status_line_is_one_line_with_perfdata_after_a_bar() {
        let o = Outcome {
            status: Status::Warning,
            text: "a | b\nc".into(),
            perf: vec![Perf::count("x", 1.0), Perf::count("y", 2.0)],
        };
        assert_eq!(
            o.line(Some("SHELVED")),
            "WARDEN SHELVED WARNING - a / b c | 'x'=1;;;0; 'y'=2;;;0;"
        );
        assert_eq!(
            Outcome::unknown("bad").line(None),
            "WARDEN UNKNOWN - bad",
            "no perfdata, no bar"
        );
    }

    #[test]
    fn plans_check_which_flags_apply() {
        let p = Plan::from_args(&args("queue-age")).expect("plain");
        assert_eq!(
            (p.what, p.timeout),
            (What::QueueAge, Duration::from_secs(10))
        );
        let mut a = args("crash-rate");
        a.blame = Some("third_party".into());
        a.window = Some("1h".into());
        a.warning = Some("0.5".into());
        let p = Plan::from_args(&a).expect("crash-rate");
        assert_eq!(p.blame, Some(Blame::ThirdParty));
        assert_eq!(p.window, Duration::from_secs(3600));
        assert_eq!(p.window_text, "1h");
        assert_eq!(
            Plan::from_args(&args("crash-rate"))
                .expect("default")
                .window,
            Duration::from_secs(900)
        );
        let mut r = args("resources");
        r.warning = Some("2".into());
        let e = Plan::from_args(&r).expect_err("no pool");
        assert_eq!(e, ArgError::PoolMissing);
        r.pool = Some("default".into());
        let p = Plan::from_args(&r).expect("resources");
        assert!(
            p.thresholds.status(1.0) == Status::Warning,
            "resources alert below"
        );

        let bad = |a: CheckArgs| Plan::from_args(&a).expect_err("refused").to_string();
        assert_eq!(
            bad(args("nope")),
            "unknown check \"nope\": use bus, queue-age, shelved, crash-rate or resources"
        );
        let mut a = args("shelved");
        a.blame = Some("system".into());
        assert_eq!(bad(a), "--blame does not apply to shelved");
        let mut a = args("crash-rate");
        a.blame = Some("everyone".into());
        assert!(bad(a).starts_with("--blame \"everyone\""));
        let mut a = args("bus");
        a.pool = Some("default".into());
        assert_eq!(bad(a), "--pool does not apply to bus");
        let mut a = args("crash-rate");
        a.window = Some("soon".into());
        assert_eq!(bad(a), "--window \"soon\": not a duration (e.g. 15m, 10s)");
        let mut a = args("bus");
        a.timeout = "0".into();
        assert_eq!(bad(a), "--timeout must be more than 0");
        let mut a = args("bus");
        a.timeout = "2.5".into();
        assert_eq!(
            Plan::from_args(&a).expect("seconds").timeout,
            Duration::from_millis(2500)
        );
        let mut a = args("shelved");
        a.warning = Some("abc".into());
        assert!(bad(a).starts_with("--warning \"abc\""));
    }

    #[test]
    fn check_is_recognised_behind_global_options() {
        let v = |s: &[&str]| -> Vec<OsString> { s.iter().map(OsString::from).collect() };
        assert!(invoked(&v(&["warden", "check", "bus"])));
        assert!(invoked(&v(&[
            "warden",
            "--config",
            "/etc/x.toml",
            "--nats-url",
            "nats://h:4222",
            "check"
        ])));
        assert!(invoked(&v(&["warden", "--config=/x", "check", "--bogus"])));
        assert!(!invoked(&v(&["warden", "--config", "check", "job"])));
        assert!(!invoked(&v(&["warden", "job", "check"])));
        assert!(!invoked(&v(&["warden"])));
        assert_eq!(
            usage_error_text(
                "error: unexpected argument '--bogus' found\n\nUsage: warden check <WHAT>\n"
            ),
            "bad arguments: unexpected argument '--bogus' found (see warden check --help)"
        );
        assert_eq!(
            usage_error_text(
                "error: the following required arguments were not provided:\n  <WHAT>\n\nUsage: warden check <WHAT>\n"
            ),
            "bad arguments: the following required arguments were not provided: <WHAT> \
             (see warden check --help)"
        );
    }

    fn pool(name: &str, ready: u64, wait: u64, served: bool) -> PoolQueue {
        PoolQueue {
            pool: name.into(),
            ready,
            delayed: 0,
            oldest_queued_at: (ready > 0).then(Utc::now),
            oldest_wait_seconds: wait,
            served,
        }
    }

    fn queue(pools: Vec<PoolQueue>) -> QueueReply {
        QueueReply {
            version: 1,
            at: Utc::now(),
            pools,
        }
    }

    #[test]
    fn queue_age_judges_the_worst_pool_and_lists_every_pool() {
        let t = above("300", "900");
        let q = queue(vec![
            pool("default", 2, 12, true),
            pool("gpu", 3, 400, false),
        ]);
        let o = queue_age(&q, None, &t);
        assert_eq!(o.status, Status::Warning);
        assert_eq!(
            o.line(Some("QUEUE-AGE")),
            "WARDEN QUEUE-AGE WARNING - oldest waiting job 400s (pool gpu: 3 ready, \
             no worker on a healthy resource serves it); 5 ready in all \
             | 'oldest_wait'=400s;300;900;0; 'oldest_wait_default'=12s;300;900;0; \
             'ready_default'=2;;;0; 'oldest_wait_gpu'=400s;300;900;0; 'ready_gpu'=3;;;0;"
        );
        let only = queue_age(&q, Some("default"), &t);
        assert_eq!(only.status, Status::Ok);
        assert!(
            only.text
                .starts_with("oldest waiting job 12s (pool default: 2 ready)"),
            "{}",
            only.text
        );
        let crit = queue_age(&queue(vec![pool("default", 1, 901, true)]), None, &t);
        assert_eq!(crit.status, Status::Critical);
    }

    #[test]
    fn an_empty_queue_is_ok_with_zero_perfdata() {
        let t = above("300", "900");
        let o = queue_age(&queue(vec![pool("idle", 0, 0, true)]), None, &t);
        assert_eq!(
            o.line(Some("QUEUE-AGE")),
            "WARDEN QUEUE-AGE OK - no job waiting | 'oldest_wait'=0s;300;900;0; \
             'oldest_wait_idle'=0s;300;900;0; 'ready_idle'=0;;;0;"
        );
        let o = queue_age(&queue(vec![]), Some("gpu"), &t);
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.text, "no job waiting in pool gpu");
        assert!(o.perf.iter().any(|p| p.label == "oldest_wait_gpu"));
    }

    fn summary(task: &str) -> JobSummary {
        JobSummary {
            id: uuid::Uuid::nil(),
            task: task.into(),
            pool: "default".into(),
            state: warden_shared::JobState::Shelved,
            priority: 0,
            attempt: 1,
            outcome: None,
            blame: Some(Blame::Task),
            detail: Some("task_failure".into()),
            bot_id: None,
            source_message_id: None,
            not_before: None,
            queued_at: Utc::now(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn shelved_counts_against_above_thresholds() {
        let t = above("0", "20");
        let none = shelved(0, None, None, &t);
        assert_eq!(
            none.line(Some("SHELVED")),
            "WARDEN SHELVED OK - no shelved job | 'shelved'=0;0;20;0;"
        );
        let j = summary("build");
        let one = shelved(1, Some(&j), None, &t);
        assert_eq!(one.status, Status::Warning);
        assert_eq!(
            one.text,
            format!("1 shelved job (newest: build {}, task/task_failure)", j.id)
        );
        let many = shelved(21, Some(&j), Some("gpu"), &t);
        assert_eq!(many.status, Status::Critical);
        assert!(many.text.starts_with("21 shelved jobs in pool gpu"));
    }

    #[test]
    fn crash_rate_is_jobs_with_the_blame_per_minute_of_the_window() {
        let t = above("0.5", "2");
        let by: BTreeMap<String, usize> = [("system".to_string(), 4), ("task".to_string(), 30)]
            .into_iter()
            .collect();
        let w = Duration::from_secs(900);
        let o = crash_rate(&by, Some(Blame::System), w, "15m", &t);
        assert_eq!(o.status, Status::Ok, "4 in 15 minutes: 0.27/min");
        assert_eq!(
            o.line(Some("CRASH-RATE")),
            "WARDEN CRASH-RATE OK - 0.27 crashes/min with blame system over 15m \
             (4 jobs last changed in the window carrying that blame) \
             | 'crash_rate_system'=0.266667;0.5;2;0; 'crashed_system'=4;;;0;"
        );
        let all = crash_rate(&by, None, w, "15m", &t);
        assert_eq!(all.status, Status::Critical, "34 in 15 minutes: 2.27/min");
        assert!(all.text.contains("with any blame"), "{}", all.text);
        let none = crash_rate(&by, Some(Blame::ThirdParty), w, "15m", &t);
        assert_eq!(none.status, Status::Ok);
        assert!(none.text.contains("(0 jobs"), "{}", none.text);
        let warn = crash_rate(&by, Some(Blame::System), Duration::from_secs(240), "4m", &t);
        assert_eq!(warn.status, Status::Warning, "4 in 4 minutes: 1/min");
    }

    fn resource(name: &str, pools: &[&str], state: ResourceState, agent: bool) -> Resource {
        let now = Utc::now();
        let mut r = Resource::register(
            &warden_shared::resource::ResourceDecl {
                name: name.into(),
                kind: "host".into(),
                path: None,
                depends_on: None,
            },
            1,
            "agent",
            "bot",
            "registered".into(),
            now,
        );
        r.state = state;
        r.pools = pools.iter().map(|p| p.to_string()).collect();
        r.sessions = if agent {
            vec![ResourceSession {
                session: "s".into(),
                bot_id: "bot".into(),
            }]
        } else {
            Vec::new()
        };
        r
    }

    #[test]
    fn resources_alert_when_fewer_are_healthy() {
        let t = Thresholds {
            warning: Some(Range::parse("warning", "2", Sense::Below).expect("2")),
            critical: Some(Range::parse("critical", "1", Sense::Below).expect("1")),
        };
        let all = vec![
            resource("a", &["default"], ResourceState::Open, true),
            resource("b", &["default", "gpu"], ResourceState::Open, true),
            resource("c", &["default"], ResourceState::Suspicious, true),
            resource("d", &["default"], ResourceState::Open, false),
            resource("e", &["default"], ResourceState::Closed, false),
            resource("f", &["other"], ResourceState::Open, true),
        ];
        let o = resources(&all, "default", &t);
        assert_eq!(o.status, Status::Ok);
        assert_eq!(
            o.line(Some("RESOURCES")),
            "WARDEN RESOURCES OK - 2 healthy resources in pool default \
             (1 open without an agent, 1 suspicious) \
             | 'healthy_default'=2;2:;1:;0; 'unhealthy_default'=2;;;0;"
        );
        let gpu = resources(&all, "gpu", &t);
        assert_eq!(gpu.status, Status::Warning, "1 < 2");
        let none = resources(&all, "nowhere", &t);
        assert_eq!(none.status, Status::Critical, "0 < 1");
        assert_eq!(none.text, "no healthy resource in pool nowhere");
    }

    #[test]
    fn bus_names_what_does_not_answer() {
        let mut seen = BusSeen {
            connect: Duration::from_millis(3),
            rtt: Duration::from_micros(1500),
            answered: services().iter().map(|s| (s.to_string(), 1)).collect(),
            trigger: Ok(true),
        };
        let t = Thresholds::default();
        let ok = bus(&seen, &t);
        assert_eq!(ok.status, Status::Ok);
        assert_eq!(
            ok.line(Some("BUS")),
            "WARDEN BUS OK - NATS answers in 1.5 ms; all 6 services answer \
             (warden-api, warden-classifier, warden-fencing, warden-health, \
             warden-scheduler, warden-trigger) \
             | 'rtt'=0.0015s;;;0; 'connect'=0.003s;;;0; 'services'=6;;6:;0;6 \
             'instances'=5;;;0;"
        );
        seen.answered.remove(subjects::SCHEDULER_SERVICE);
        seen.trigger = Ok(false);
        let down = bus(&seen, &t);
        assert_eq!(down.status, Status::Critical);
        assert!(
            down.text.starts_with(
                "not answering: warden-scheduler, warden-trigger (no pull request on its consumer)"
            ),
            "{}",
            down.text
        );
        seen.trigger = Err(TriggerUnread::Consumer("no such consumer".into()));
        assert!(bus(&seen, &t)
            .text
            .contains("warden-trigger (cannot read its consumer: no such consumer)"));
        let slow = bus(
            &BusSeen {
                connect: Duration::ZERO,
                rtt: Duration::from_millis(600),
                answered: services().iter().map(|s| (s.to_string(), 2)).collect(),
                trigger: Ok(true),
            },
            &above("0.5", "1"),
        );
        assert_eq!(
            slow.status,
            Status::Warning,
            "thresholds judge the round trip"
        );
        let gone = bus_down("cannot reach NATS at nats://127.0.0.1:1: connection refused");
        assert_eq!(
            gone.line(Some("BUS")),
            "WARDEN BUS CRITICAL - cannot reach NATS at nats://127.0.0.1:1: connection refused \
             | 'services'=0;;6:;0;6"
        );
    }
}
