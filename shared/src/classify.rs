//! Configuration of crash classification (`[classifier]`): the ordered
//! rules and the detail catalogue. Matching lives in `warden-classifier`;
//! these are the types every service reads the config with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::Blame;
use crate::messages::Party;

/// `[classifier]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Only the last this many bytes of a log are scanned.
    pub max_scan_bytes: usize,
    /// Append the shipped rules (`deploy/classifier/rules.toml`) after
    /// the rules given here.
    pub default_rules: bool,
    /// Ordered; the first rule whose every condition holds decides.
    #[serde(default)]
    pub rules: Vec<ClassifyRule>,
    /// The detail catalogue: every code a rule or a task may give.
    #[serde(default)]
    pub details: BTreeMap<String, DetailEntry>,
}

/// One entry of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailEntry {
    /// Who is to blame by default when this detail is given.
    pub blame: Blame,
    /// What it means, in one sentence.
    pub meaning: String,
    /// Who is told.
    #[serde(default)]
    pub notify: Party,
    /// The resource the attempt ran on may be at fault.
    #[serde(default)]
    pub suspect_resource: bool,
}

/// Detail codes the services give themselves, whatever the catalogue
/// holds: a lost worker, a poison job, a crash nobody classified, a status
/// file that says nothing usable.
pub const BUILTIN_DETAILS: [&str; 4] = [
    crate::retry::WORKER_LOST,
    crate::retry::WORKER_CRASH_LOOP,
    "unclassified",
    "status_file_invalid",
];

/// The `detail` label of a code that is neither in the catalogue nor
/// built in (a task's status file may name anything): metric labels stay
/// a set bounded by the config.
pub const OTHER_DETAIL: &str = "other";

/// Every value a metric's `detail` label can take with this catalogue:
/// its codes, the built-in ones and [`OTHER_DETAIL`], sorted.
pub fn detail_labels(catalogue: &BTreeMap<String, DetailEntry>) -> Vec<&str> {
    let mut all: std::collections::BTreeSet<&str> = catalogue.keys().map(String::as_str).collect();
    all.extend(BUILTIN_DETAILS);
    all.insert(OTHER_DETAIL);
    all.into_iter().collect()
}

/// `detail` as a metric label: itself when the catalogue has it or it is
/// built in, else [`OTHER_DETAIL`].
pub fn detail_label<'a>(catalogue: &BTreeMap<String, DetailEntry>, detail: &'a str) -> &'a str {
    if catalogue.contains_key(detail) || BUILTIN_DETAILS.contains(&detail) {
        detail
    } else {
        OTHER_DETAIL
    }
}

/// One value or a list of them (`exit_code = 137`, `task = ["a", "b"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn items(&self) -> &[T] {
        match self {
            OneOrMany::One(x) => std::slice::from_ref(x),
            OneOrMany::Many(v) => v,
        }
    }
}

/// An exit code condition: a code (`137`) or a range (`"1-127"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CodeSpec {
    Code(i64),
    Range(String),
}

/// An exit code condition that is neither a code nor a range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a code or a range like \"1-127\"")]
pub struct BadCodeRange(pub String);

impl CodeSpec {
    /// The inclusive range this stands for, or why it is not one.
    pub fn range(&self) -> Result<(i64, i64), BadCodeRange> {
        match self {
            CodeSpec::Code(c) => Ok((*c, *c)),
            CodeSpec::Range(s) => {
                let (a, b) = s.split_once('-').unwrap_or((s, s));
                match (a.trim().parse::<i64>(), b.trim().parse::<i64>()) {
                    (Ok(a), Ok(b)) if a <= b => Ok((a, b)),
                    _ => Err(BadCodeRange(s.clone())),
                }
            }
        }
    }
}

/// A signal by number (`9`) or name (`"SIGKILL"`, `"KILL"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SignalSpec {
    Number(i32),
    Name(String),
}

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("XCPU", 24),
    ("XFSZ", 25),
];

/// The number of a signal name (`SIGKILL`, `kill`, `9`).
pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim();
    if let Ok(x) = n.parse::<i32>() {
        return Some(x);
    }
    let upper = n.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(s, _)| *s == bare).map(|(_, x)| *x)
}

/// The name of a signal number (`SIGKILL`), or its number as text.
pub fn signal_name(n: i32) -> String {
    SIGNALS
        .iter()
        .find(|(_, x)| *x == n)
        .map(|(s, _)| format!("SIG{s}"))
        .unwrap_or_else(|| n.to_string())
}

impl SignalSpec {
    pub fn number(&self) -> Option<i32> {
        match self {
            SignalSpec::Number(n) => Some(*n),
            SignalSpec::Name(s) => signal_number(s),
        }
    }
}

/// `[[classifier.rules]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRule {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<OneOrMany<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<OneOrMany<CodeSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<OneOrMany<SignalSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    /// Regex over the log tail (multi-line mode: `^`/`$` match per line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Regex over the status file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Default: the catalogue's blame for `detail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blame: Option<Blame>,
    pub detail: String,
    /// Template: `{match}`, `{exit_code}`, `{signal}`, `{task}`, `{duration}`.
    pub description: String,
}

impl ClassifierConfig {
    /// What can be checked without compiling patterns; `known` are the
    /// catalogue's codes (rules may only give those).
    pub fn problems(&self, rules_from: &str, rules: &[ClassifyRule]) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_scan_bytes < 1024 {
            p.push("classifier.max_scan_bytes: must be at least 1024".into());
        }
        for (code, d) in &self.details {
            if code.is_empty() || !crate::config::valid_name(code) {
                p.push(format!(
                    "classifier.details.{code}: codes are letters, digits and _"
                ));
            }
            if d.meaning.trim().is_empty() {
                p.push(format!(
                    "classifier.details.{code}.meaning: must not be empty"
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in rules.iter().enumerate() {
            let at = format!("{rules_from}[{i}] ({})", r.name);
            if r.name.trim().is_empty() {
                p.push(format!("{at}: name must not be empty"));
            } else if !names.insert(r.name.as_str()) {
                p.push(format!("{at}: duplicate rule name"));
            }
            if !self.details.contains_key(&r.detail) {
                p.push(format!(
                    "{at}: detail {:?} is not in the catalogue ([classifier.details.{}])",
                    r.detail, r.detail
                ));
            }
            for c in r.exit_code.iter().flat_map(|c| c.items()) {
                if let Err(e) = c.range() {
                    p.push(format!("{at}: exit_code {e}"));
                }
            }
            for s in r.signal.iter().flat_map(|s| s.items()) {
                if s.number().is_none() {
                    p.push(format!("{at}: signal {s:?} is not a signal number or name"));
                }
            }
            if r.description.trim().is_empty() {
                p.push(format!("{at}: description must not be empty"));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_labels_are_the_catalogue_the_built_ins_and_other() {
        let mut catalogue = BTreeMap::new();
        catalogue.insert(
            "oom".to_string(),
            DetailEntry {
                blame: Blame::System,
                meaning: "out of memory".into(),
                notify: Party::Operators,
                suspect_resource: true,
            },
        );
        let labels = detail_labels(&catalogue);
        for d in ["oom", "worker_lost", "unclassified", "other"] {
            assert!(labels.contains(&d), "{d}: {labels:?}");
        }
        assert_eq!(labels.len(), 1 + BUILTIN_DETAILS.len() + 1);
        assert_eq!(detail_label(&catalogue, "oom"), "oom");
        assert_eq!(
            detail_label(&catalogue, "worker_crash_loop"),
            "worker_crash_loop"
        );
        assert_eq!(detail_label(&catalogue, "my-own-words"), OTHER_DETAIL);
    }

    #[test]
    fn signals_and_ranges_parse() {
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("kill"), Some(9));
        assert_eq!(signal_number("15"), Some(15));
        assert_eq!(signal_number("SIGWHAT"), None);
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(CodeSpec::Range("1-127".into()).range(), Ok((1, 127)));
        assert_eq!(CodeSpec::Range("42".into()).range(), Ok((42, 42)));
        assert!(CodeSpec::Range("9-1".into()).range().is_err());
        assert_eq!(CodeSpec::Code(137).range(), Ok((137, 137)));
    }
}
