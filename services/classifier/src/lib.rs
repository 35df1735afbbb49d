//! `warden-classifier`: why did an attempt crash, and who should act?
//!
//! [`Classifier::classify`] decides, in this order:
//! 1. a fault the task wrote to its status file (`{"blame", "detail",
//!    "description"}`): the task knows best (rule `status_file`);
//! 2. the configured rules, the user's first, then the shipped ones
//!    (`deploy/classifier/rules.toml`); the first whose every condition
//!    holds decides;
//! 3. a status file that is neither `OK`, a verdict nor a fault: the task
//!    broke its own contract (`task/status_file_invalid`);
//! 4. `unknown/unclassified` (rule `fallback`).
//!
//! Matching uses the `regex` crate, whose matching time is linear in the
//! input whatever the pattern, on at most `classifier.max_scan_bytes` of
//! the log; compiled patterns are size-limited. No input can hang or take
//! down the classifier.
//!
//! A bare SIGKILL (signal 9, or exit 137 with nothing in the log) is not
//! called `oom`: operators, runners and time limits send it too. The
//! shipped rules want evidence (a kernel OOM line, an allocation failure,
//! or a shell's `Killed` with exit 137); a site where SIGKILL does mean OOM
//! can add its own rule.

pub mod metrics;
pub mod service;

use std::collections::BTreeMap;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder, SetMatches};
use serde::Deserialize;
use warden_shared::classify::{signal_name, ClassifyRule, DetailEntry};
use warden_shared::job::{Blame, CrashInfo};
use warden_shared::messages::Party;
use warden_shared::Config;

/// What [`Classifier::classify`] decides (with the catalogue's party and
/// suspect flag, so callers need not look the detail up again).
pub use warden_shared::messages::Classification;

/// The detail catalogue: code → default blame, meaning, who is told,
/// whether the resource is suspect. Read from `[classifier.details.CODE]`.
pub type Catalogue = BTreeMap<String, DetailEntry>;

/// The shipped rule set, appended after the user's rules.
pub const DEFAULT_RULES_TOML: &str = include_str!("../../../deploy/classifier/rules.toml");

/// Longest description a classification carries.
pub const MAX_DESCRIPTION: usize = 1000;
/// Longest excerpt (`{match}`, a bad status file) quoted in a description.
const MAX_EXCERPT: usize = 300;
/// Compiled size limit of one pattern.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// What the classifier looks at.
pub struct CrashInput<'a> {
    pub task: &'a str,
    pub crash: &'a CrashInfo,
    pub resource: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rules: Vec<ClassifyRule>,
}

struct Compiled {
    rule: ClassifyRule,
    origin: Origin,
    blame: Blame,
    tasks: Vec<String>,
    codes: Vec<(i64, i64)>,
    signals: Vec<i32>,
    log: Option<Regex>,
    /// `log`'s index in [`Classifier::log_set`].
    log_in_set: Option<usize>,
    status: Option<Regex>,
}

/// Compiled rules and the catalogue.
pub struct Classifier {
    rules: Vec<Compiled>,
    /// Every rule's log pattern in one automaton: one pass over the log
    /// says which rules' patterns occur, so a log costs one scan however
    /// many rules there are, and only a rule whose pattern occurs scans
    /// again for its line. `None` when the patterns together exceed the
    /// size limit: then each rule scans on its own.
    log_set: Option<RegexSet>,
    catalogue: Catalogue,
    max_scan: usize,
}

/// A rule's pattern that does not compile.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{at}: {what} pattern: {reason}")]
pub struct PatternError {
    /// Which rule (`classifier.rules[0] (name)`).
    pub at: String,
    /// `log` or `status`.
    pub what: &'static str,
    /// The regex engine's last line.
    pub reason: String,
}

/// Patterns match ASCII-minded: `\w`, `\d`, `\s`, `\b` and `(?i)` are
/// ASCII (non-ASCII literals still match), which keeps every pattern on the
/// regex crate's lazy DFA: a Unicode `\b` makes it give up on the first
/// non-ASCII byte and fall back to an engine two orders of magnitude
/// slower on a log full of them. A pattern that needs Unicode classes
/// (`\p{L}`) says `(?u:...)`; one that does not compile ASCII-minded at all
/// is compiled with Unicode on, so no existing rule stops working.
///
/// Returns the pattern as compiled (as written, or wrapped in `(?u:…)`,
/// the form [`compile_set`] takes) and its regex; an error is reported
/// against the operator's own text.
fn compile(pattern: &str, what: &'static str, at: &str) -> Result<(String, Regex), PatternError> {
    let build = |p: &str| {
        RegexBuilder::new(p)
            .multi_line(true)
            .unicode(false)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(4 * REGEX_SIZE_LIMIT)
            .build()
    };
    let problem = |e: regex::Error| {
        let e = e.to_string();
        let first = e.lines().last().unwrap_or_default();
        PatternError {
            at: at.to_string(),
            what,
            reason: first.to_string(),
        }
    };
    match build(pattern) {
        Ok(re) => Ok((pattern.to_string(), re)),
        Err(ascii @ regex::Error::Syntax(_)) => {
            let wrapped = format!("(?u:{pattern})");
            match build(&wrapped) {
                Ok(re) => Ok((wrapped, re)),
                Err(regex::Error::Syntax(_)) => Err(problem(ascii)),
                Err(e) => Err(problem(e)),
            }
        }
        Err(e) => Err(problem(e)),
    }
}

/// [`Classifier::log_set`] over `patterns` (as [`compile`] returned them), or
/// `None` if together they are too big.
fn compile_set(patterns: &[String]) -> Option<RegexSet> {
    RegexSetBuilder::new(patterns)
        .multi_line(true)
        .unicode(false)
        .size_limit(REGEX_SIZE_LIMIT.saturating_mul(patterns.len().max(1)))
        .dfa_size_limit(4 * REGEX_SIZE_LIMIT.saturating_mul(patterns.len().max(1)))
        .build()
        .ok()
}

impl Classifier {
    /// The user's rules, then (with `default_rules`) the shipped ones,
    /// compiled; every problem reported at once.
    pub fn from_config(config: &Config) -> Result<Classifier, Vec<String>> {
        let c = &config.classifier;
        let mut problems = Vec::new();
        let mut sources: Vec<(String, Origin, Vec<ClassifyRule>)> =
            vec![("classifier.rules".into(), Origin::Operator, c.rules.clone())];
        if c.default_rules {
            match toml::from_str::<RuleFile>(DEFAULT_RULES_TOML) {
                Ok(f) => {
                    problems.extend(c.problems("default rules", &f.rules));
                    // A decision names its rule: it must say which one.
                    for (i, r) in c.rules.iter().enumerate() {
                        if f.rules.iter().any(|s| s.name == r.name) {
                            problems.push(format!(
                                "classifier.rules[{i}] ({}): a shipped rule has this name; choose another",
                                r.name
                            ));
                        }
                    }
                    sources.push(("default rules".into(), Origin::Shipped, f.rules));
                }
                Err(e) => problems.push(format!("default rules: {e}")),
            }
        }
        let mut rules = Vec::new();
        let mut set_patterns = Vec::new();
        for (from, origin, list) in sources {
            for (i, rule) in list.into_iter().enumerate() {
                let at = format!("{from}[{i}] ({})", rule.name);
                let log = rule.log.as_deref().map(|p| compile(p, "log", &at));
                let status = rule
                    .status
                    .as_deref()
                    .map(|p| compile(p, "status", &at).map(|(_, re)| re));
                let (log, status) = match (log.transpose(), status.transpose()) {
                    (Ok(l), Ok(s)) => (l, s),
                    (l, s) => {
                        problems.extend(l.err().map(|e| e.to_string()));
                        problems.extend(s.err().map(|e| e.to_string()));
                        continue;
                    }
                };
                let blame = rule
                    .blame
                    .or_else(|| c.details.get(&rule.detail).map(|d| d.blame))
                    .unwrap_or(Blame::Unknown);
                let (log_in_set, log) = match log {
                    Some((p, re)) => {
                        set_patterns.push(p);
                        (Some(set_patterns.len() - 1), Some(re))
                    }
                    None => (None, None),
                };
                rules.push(Compiled {
                    origin,
                    log_in_set,
                    blame,
                    tasks: rule
                        .task
                        .as_ref()
                        .map(|t| t.items().to_vec())
                        .unwrap_or_default(),
                    codes: rule
                        .exit_code
                        .iter()
                        .flat_map(|c| c.items())
                        .filter_map(|c| c.range().ok())
                        .collect(),
                    signals: rule
                        .signal
                        .iter()
                        .flat_map(|s| s.items())
                        .filter_map(|s| s.number())
                        .collect(),
                    log,
                    status,
                    rule,
                });
            }
        }
        if problems.is_empty() {
            Ok(Classifier {
                log_set: compile_set(&set_patterns),
                rules,
                catalogue: c.details.clone(),
                max_scan: c.max_scan_bytes,
            })
        } else {
            Err(problems)
        }
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// Rules in the order they are tried.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.rule.name.as_str())
    }

    /// Who is told, and whether the resource is suspect, for `detail`.
    fn finish(
        &self,
        blame: Blame,
        detail: String,
        description: String,
        rule: String,
    ) -> Classification {
        let entry = self.catalogue.get(&detail);
        let notify = match entry {
            Some(e) => e.notify,
            None if blame == Blame::Task => Party::Owners,
            None => Party::Operators,
        };
        Classification {
            blame,
            description: bounded(&description, MAX_DESCRIPTION),
            detail,
            rule,
            notify,
            suspect_resource: entry.is_some_and(|e| e.suspect_resource),
        }
    }

    /// Never panics; time and memory are bounded by `max_scan_bytes`.
    pub fn classify(&self, input: &CrashInput) -> Classification {
        let crash = input.crash;
        let status = crash.status_file.as_deref().map(str::trim).unwrap_or("");
        let status_verdict = read_status(status);
        if let Some(fault) = self.declared_fault(&status_verdict) {
            return fault;
        }
        let scanned = self.scan(crash, status);
        for r in &self.rules {
            if let RuleCheck::Matched { line } = check(r, input, &scanned) {
                return self.decide(r, &line, input);
            }
        }
        self.without_rule(status_verdict, status, crash)
    }

    /// A fault the task declared in its status file decides before any
    /// rule: the task knows best.
    fn declared_fault(&self, status: &StatusFile) -> Option<Classification> {
        let StatusFile::Fault {
            blame,
            detail,
            description,
        } = status
        else {
            return None;
        };
        Some(self.finish(
            *blame,
            detail.clone(),
            if description.is_empty() {
                format!("the task reported {blame}/{detail}")
            } else {
                description.clone()
            },
            "status_file".into(),
        ))
    }

    /// What the rules look at: the scanned tails of the log and the status
    /// file, and which rules' log patterns occur in the log (one pass).
    fn scan<'a>(&self, crash: &'a CrashInfo, status: &'a str) -> Scanned<'a> {
        let log = tail(&crash.log_tail, self.max_scan);
        Scanned {
            log,
            status: tail(status, self.max_scan),
            in_log: self.log_set.as_ref().map(|set| set.matches(log.as_bytes())),
        }
    }

    fn decide(&self, r: &Compiled, line: &str, input: &CrashInput) -> Classification {
        let description = render(&r.rule.description, line, input);
        self.finish(
            r.blame,
            r.rule.detail.clone(),
            description,
            r.rule.name.clone(),
        )
    }

    /// The decision when no rule matched.
    fn without_rule(
        &self,
        status_verdict: StatusFile,
        status: &str,
        crash: &CrashInfo,
    ) -> Classification {
        if let StatusFile::Invalid(why) = status_verdict {
            return self.finish(
                Blame::Task,
                "status_file_invalid".into(),
                format!(
                    "the status file is not OK, a verdict or a fault ({why}): {}",
                    escaped_excerpt(status)
                ),
                "status_file_invalid".into(),
            );
        }
        self.finish(
            Blame::Unknown,
            "unclassified".into(),
            format!("no rule recognised this crash ({})", how_it_ended(crash)),
            "fallback".into(),
        )
    }

    /// Every rule tried against `input`, in order, with why it matched or
    /// not, and the decision [`Classifier::classify`] makes (`warden
    /// classify --explain`). Costs a full pass of every rule, where
    /// `classify` stops at the first match.
    pub fn explain(&self, input: &CrashInput) -> Explanation {
        let crash = input.crash;
        let status = crash.status_file.as_deref().map(str::trim).unwrap_or("");
        let status_verdict = read_status(status);
        let status_file = match &status_verdict {
            StatusFile::None => StatusFileRead::Absent,
            StatusFile::Verdict => StatusFileRead::Verdict,
            StatusFile::Fault { .. } => StatusFileRead::Fault,
            StatusFile::Invalid(why) => StatusFileRead::Invalid {
                why: (*why).to_string(),
            },
        };
        let scanned = self.scan(crash, status);
        let rules: Vec<RuleTrace> = self
            .rules
            .iter()
            .map(|r| RuleTrace {
                rule: r.rule.name.clone(),
                origin: r.origin,
                blame: r.blame,
                detail: r.rule.detail.clone(),
                check: check(r, input, &scanned),
            })
            .collect();
        // What classify decides, from the same checks (one pass, not two).
        let decision = match self.declared_fault(&status_verdict) {
            Some(fault) => fault,
            None => match self
                .rules
                .iter()
                .zip(&rules)
                .find_map(|(r, t)| match &t.check {
                    RuleCheck::Matched { line } => Some((r, line)),
                    _ => None,
                }) {
                Some((r, line)) => self.decide(r, line, input),
                None => self.without_rule(status_verdict, status, crash),
            },
        };
        let matched: Vec<&str> = rules
            .iter()
            .filter(|t| matches!(t.check, RuleCheck::Matched { .. }))
            .map(|t| t.rule.as_str())
            .collect();
        let why = why_it_won(&decision, &status_file, &matched);
        Explanation {
            status_file,
            rules,
            decision,
            why,
        }
    }
}

/// Where a rule comes from: an operator's `[[classifier.rules]]` are tried
/// before the shipped ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Operator,
    Shipped,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Operator => "operator",
            Origin::Shipped => "shipped",
        }
    }
}

/// One rule against one crash: it matched (on which line), or the first
/// of its conditions, in the order they are checked, that did not hold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RuleCheck {
    /// Every condition held; `line` is the matched line ("" when the rule
    /// has no pattern).
    Matched { line: String },
    /// The rule names other tasks.
    OtherTask,
    /// The rule wants other exit codes (or the task did not exit).
    ExitCode { exit_code: Option<i32> },
    /// The rule wants other signals (or no signal ended the task).
    Signal { signal: Option<i32> },
    /// The rule wants `timed_out` to be the other way.
    TimedOut { timed_out: bool },
    /// The status-file pattern found nothing.
    NoStatusMatch,
    /// The log pattern found nothing in the scanned tail.
    NoLogMatch,
}

impl RuleCheck {
    /// One line for a person.
    pub fn describe(&self) -> String {
        match self {
            RuleCheck::Matched { line } if line.is_empty() => "matched".into(),
            RuleCheck::Matched { line } => format!("matched: {line}"),
            RuleCheck::OtherTask => "not this task".into(),
            RuleCheck::ExitCode { exit_code: Some(c) } => format!("not for exit code {c}"),
            RuleCheck::ExitCode { exit_code: None } => {
                "wants an exit code; the task did not exit".into()
            }
            RuleCheck::Signal { signal: Some(s) } => format!("not for {}", signal_name(*s)),
            RuleCheck::Signal { signal: None } => "wants a signal; none ended the task".into(),
            RuleCheck::TimedOut { timed_out: true } => {
                "not for a task killed at its time limit".into()
            }
            RuleCheck::TimedOut { timed_out: false } => {
                "only for a task killed at its time limit".into()
            }
            RuleCheck::NoStatusMatch => "its status pattern is not in the status file".into(),
            RuleCheck::NoLogMatch => "its log pattern is not in the log".into(),
        }
    }
}

/// One line of [`Explanation::rules`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleTrace {
    pub rule: String,
    pub origin: Origin,
    pub blame: Blame,
    pub detail: String,
    pub check: RuleCheck,
}

/// What the status file said, as the classifier read it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "read", rename_all = "snake_case")]
pub enum StatusFileRead {
    Absent,
    Verdict,
    /// A fault (`{"blame", "detail"}`): it decides, before any rule.
    Fault,
    Invalid {
        why: String,
    },
}

/// [`Classifier::explain`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    pub status_file: StatusFileRead,
    /// Every rule in the order tried.
    pub rules: Vec<RuleTrace>,
    /// What `classify` decides.
    pub decision: Classification,
    /// Why that rule (or the status file, or the fallback) decided.
    pub why: String,
}

/// Why `decision` won, given which rules matched.
fn why_it_won(decision: &Classification, status: &StatusFileRead, matched: &[&str]) -> String {
    let others = |skip: usize| -> String {
        let rest: Vec<&str> = matched.iter().skip(skip).copied().collect();
        if rest.is_empty() {
            "no other rule matched".into()
        } else {
            format!(
                "{} later rule{} also matched ({}) but the first match decides",
                rest.len(),
                if rest.len() == 1 { "" } else { "s" },
                rest.join(", ")
            )
        }
    };
    if *status == StatusFileRead::Fault {
        return format!(
            "the task's status file declared a fault, which wins over every rule; {}",
            others(0).replace("later ", "")
        );
    }
    match matched.first() {
        Some(first) => format!(
            "{first} is the first rule that matched (an operator's rules are tried before the shipped ones, each in file order); {}",
            others(1)
        ),
        None if decision.rule == "status_file_invalid" => {
            "no rule matched, and the status file is not OK, a verdict or a fault".into()
        }
        None => "no rule matched".into(),
    }
}

/// Every condition of `r` against `input`, cheapest first: the matched
/// line, or the first condition that does not hold.
/// [`Classifier::scan`]'s answer, which every rule is checked against.
struct Scanned<'a> {
    log: &'a str,
    status: &'a str,
    /// `None` when the rules have no [`Classifier::log_set`].
    in_log: Option<SetMatches>,
}

fn check(r: &Compiled, input: &CrashInput, scanned: &Scanned) -> RuleCheck {
    let Scanned {
        log,
        status,
        in_log,
    } = scanned;
    let c = input.crash;
    if !r.tasks.is_empty() && !r.tasks.iter().any(|t| t == input.task) {
        return RuleCheck::OtherTask;
    }
    if !r.codes.is_empty() {
        let code = c.exit_code.map(i64::from);
        if !code.is_some_and(|code| r.codes.iter().any(|(a, b)| (*a..=*b).contains(&code))) {
            return RuleCheck::ExitCode {
                exit_code: c.exit_code,
            };
        }
    }
    if !r.signals.is_empty() && !c.signal.is_some_and(|s| r.signals.contains(&s)) {
        return RuleCheck::Signal { signal: c.signal };
    }
    if let Some(t) = r.rule.timed_out {
        if c.timed_out != t {
            return RuleCheck::TimedOut {
                timed_out: c.timed_out,
            };
        }
    }
    let mut line = String::new();
    if let Some(re) = &r.status {
        let Some(m) = re.find(status.as_bytes()) else {
            return RuleCheck::NoStatusMatch;
        };
        line = line_of(status, m.start(), m.end());
    }
    if let Some(re) = &r.log {
        if let (Some(found), Some(i)) = (in_log, r.log_in_set) {
            if !found.matched(i) {
                return RuleCheck::NoLogMatch;
            }
        }
        // The last match: the line nearest the end is the likeliest cause.
        let Some(m) = re.find_iter(log.as_bytes()).last() else {
            return RuleCheck::NoLogMatch;
        };
        line = line_of(log, m.start(), m.end());
    }
    RuleCheck::Matched { line }
}

/// `docs/crash-details.md`: the catalogue as operators read it, generated
/// from the config so it cannot drift (a test compares the checked-in
/// file). "Retried" is the retry policy's answer for the default blame.
pub fn catalogue_markdown(config: &Config) -> String {
    let mut out = String::from(
        "# Crash details\n\n\
         Generated from the built-in configuration by `warden-classifier`'s tests\n\
         (`WARDEN_BLESS=1 cargo test -p warden-classifier --test catalogue`); do\n\
         not edit by hand. Add a code with a `[classifier.details.CODE]` table in\n\
         the config: no schema change is needed.\n\n\
         A crash's blame and detail come from, in order: a fault the task wrote\n\
         to its status file; the first matching rule (an operator's, then the\n\
         shipped ones in `deploy/classifier/rules.toml`); an invalid status file;\n\
         else `unknown/unclassified`. A rule may give another blame than the\n\
         default below (`dependency_missing` is `task` when the repository\n\
         answered and the package is not there). *Retried* follows `[retry]\n\
         retryable` for the default blame; *suspect resource* means the\n\
         resource the attempt ran on is checked (health service).\n\n\
         | code | default blame | meaning | notified | retried | suspect resource |\n\
         |---|---|---|---|---|---|\n",
    );
    for (code, d) in &config.classifier.details {
        out.push_str(&format!(
            "| `{code}` | {} | {} | {} | {} | {} |\n",
            d.blame,
            d.meaning.replace('|', "\\|"),
            d.notify.as_str(),
            if config.retry.is_retryable(d.blame, code) {
                "yes"
            } else {
                "no"
            },
            if d.suspect_resource { "yes" } else { "no" },
        ));
    }
    out
}

enum StatusFile {
    None,
    Verdict,
    Fault {
        blame: Blame,
        detail: String,
        description: String,
    },
    Invalid(&'static str),
}

/// The status file (docs/design.md "Tasks, verdicts and the status
/// file"): `OK`, a JSON verdict, or a JSON fault.
fn read_status(text: &str) -> StatusFile {
    if text.is_empty() {
        return StatusFile::None;
    }
    if text == "OK" {
        return StatusFile::Verdict;
    }
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(text) else {
        return StatusFile::Invalid("not JSON");
    };
    if obj
        .get("outcome")
        .or_else(|| obj.get("verdict"))
        .and_then(|v| v.as_str())
        .is_some_and(|s| !s.is_empty())
    {
        return StatusFile::Verdict;
    }
    let blame = obj.get("blame").and_then(|v| v.as_str());
    let detail = obj.get("detail").and_then(|v| v.as_str());
    match (blame, detail) {
        (Some(b), Some(d)) => {
            let Ok(blame) = b.parse::<Blame>() else {
                return StatusFile::Invalid("unknown blame");
            };
            if d.is_empty() || d.len() > 64 || !warden_shared::config::valid_name(d) {
                return StatusFile::Invalid("detail is not a code of letters, digits and _");
            }
            let description = obj
                .get("description")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            StatusFile::Fault {
                blame,
                detail: d.to_string(),
                description: bounded(&clean(description), MAX_DESCRIPTION),
            }
        }
        _ => StatusFile::Invalid("a JSON object without outcome, or blame and detail"),
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The line around a match, trimmed and bounded: the whole line when it
/// is short, else a window around the match with `…` where it was cut, so
/// a long line (a log without line breaks) still shows what matched.
/// `start..end` are byte offsets (a byte pattern may match inside a
/// character); cuts are moved to character boundaries.
fn line_of(text: &str, start: usize, end: usize) -> String {
    /// Context kept on each side of the match in a long line.
    const CONTEXT: usize = 100;
    let bytes = text.as_bytes();
    let from = bytes[..start]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let to = bytes[end..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| end + i);
    let mut lo = from.max(start.saturating_sub(CONTEXT));
    while !text.is_char_boundary(lo) {
        lo -= 1;
    }
    let mut hi = to.min(end.saturating_add(CONTEXT));
    while !text.is_char_boundary(hi) {
        hi += 1;
    }
    let mut line = String::new();
    if lo > from {
        line.push('…');
    }
    line.push_str(&text[lo..hi]);
    if hi < to {
        line.push('…');
    }
    excerpt(&line)
}

/// Control characters replaced, so a description is one printable line.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn bounded(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn excerpt(s: &str) -> String {
    bounded(clean(s).trim(), MAX_EXCERPT)
}

/// A bounded excerpt with control characters shown escaped (`\n`,
/// `\u{0}`), so a description says exactly what a bad status file held
/// and is still one printable line.
fn escaped_excerpt(s: &str) -> String {
    // Bound first so escaping a huge input costs no more than the excerpt.
    let head: String = s.trim().chars().take(MAX_EXCERPT).collect();
    let mut out = String::new();
    for c in head.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    let cut = s.trim().chars().nth(MAX_EXCERPT).is_some();
    let mut out = bounded(&out, MAX_EXCERPT);
    if cut && !out.ends_with('…') {
        out.push('…');
    }
    out
}

fn how_it_ended(c: &CrashInfo) -> String {
    match (c.exit_code, c.signal) {
        (_, Some(sig)) => format!("killed by {} after {} ms", signal_name(sig), c.duration_ms),
        (Some(code), None) => format!("exit code {code} after {} ms", c.duration_ms),
        (None, None) => "no exit status".into(),
    }
}

fn render(template: &str, found: &str, input: &CrashInput) -> String {
    let c = input.crash;
    template
        .replace("{match}", found)
        .replace(
            "{exit_code}",
            &c.exit_code
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into()),
        )
        .replace(
            "{signal}",
            &c.signal.map(signal_name).unwrap_or_else(|| "-".into()),
        )
        .replace("{task}", input.task)
        .replace("{duration}", &format!("{} ms", c.duration_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier(extra: &str) -> Classifier {
        let config = Config::from_parts(Some(extra), Vec::new()).expect("config");
        Classifier::from_config(&config).expect("rules compile")
    }

    fn crash(log: &str, exit: Option<i32>, signal: Option<i32>) -> CrashInfo {
        CrashInfo {
            exit_code: exit,
            signal,
            log_tail: log.into(),
            ..Default::default()
        }
    }

    fn run(c: &Classifier, info: &CrashInfo) -> Classification {
        c.classify(&CrashInput {
            task: "t",
            crash: info,
            resource: None,
        })
    }

    #[test]
    fn status_file_fault_wins_over_rules() {
        let c = classifier("");
        let mut info = crash("Could not resolve host: example.org", Some(3), None);
        info.status_file = Some(
            r#"{"blame":"task","detail":"task_failure","description":"3 tests failed"}"#.into(),
        );
        let got = run(&c, &info);
        assert_eq!(
            (got.blame, got.detail.as_str(), got.rule.as_str()),
            (Blame::Task, "task_failure", "status_file")
        );
        assert_eq!(got.notify, Party::Owners);
    }

    #[test]
    fn malformed_status_file_is_classified_not_fatal() {
        let c = classifier("");
        for bad in [
            "{not json",
            r#"{"blame":"gremlins","detail":"x"}"#,
            "[1,2]",
            "\u{0}\u{1}garbage",
        ] {
            let mut info = crash("", Some(2), None);
            info.status_file = Some(bad.into());
            let got = run(&c, &info);
            assert_eq!(got.detail, "status_file_invalid", "{bad:?}: {got:?}");
            assert_eq!(got.blame, Blame::Task);
            assert!(!got.description.chars().any(char::is_control));
        }
        // What was wrong is shown, escaped.
        let mut info = crash("", Some(2), None);
        info.status_file = Some("\u{0}\u{1}garbage\nmore".into());
        let got = run(&c, &info);
        assert!(
            got.description
                .ends_with(r"(not JSON): \u{0}\u{1}garbage\nmore"),
            "{}",
            got.description
        );
    }

    #[test]
    fn catalogue_has_every_promised_code() {
        let c = classifier("");
        for code in [
            "oom",
            "disk_full",
            "watchdog_timeout",
            "time_limit",
            "host_failure",
            "killed",
            "network",
            "dependency_missing",
            "upstream_error",
            "setup_failed",
            "worker_lost",
            "task_exception",
            "task_failure",
            "unclassified",
            "worker_crash_loop",
            "status_file_invalid",
        ] {
            assert!(c.catalogue().contains_key(code), "{code}");
        }
    }

    #[test]
    fn a_bare_kill_is_not_called_oom() {
        let c = classifier("");
        // SIGKILL, exit 137 and a shell's "Killed" are what the OOM killer
        // leaves, and operators, runners and time limits too: unknown.
        for (log, exit, signal) in [
            ("", None, Some(9)),
            ("compiling...\n", Some(137), None),
            ("compiling...\nKilled\n", Some(137), None),
            (
                "g++: fatal error: Killed signal terminated program cc1plus\n",
                Some(1),
                None,
            ),
        ] {
            let got = run(&c, &crash(log, exit, signal));
            assert_eq!(
                (got.blame, got.detail.as_str()),
                (Blame::Unknown, "killed"),
                "{log:?} {exit:?} {signal:?}"
            );
        }
        // With the OOM killer's banner it is OOM.
        let got = run(
            &c,
            &crash(
                "Out of memory: Killed process 4242 (cc1plus)\nKilled\n",
                Some(137),
                None,
            ),
        );
        assert_eq!(
            (got.detail.as_str(), got.rule.as_str()),
            ("oom", "oom-killer")
        );
        // A site can decide otherwise with its own rule.
        let c = classifier(
            r#"
[[classifier.rules]]
name = "sigkill-is-oom-here"
signal = "KILL"
detail = "oom"
description = "killed by {signal}"
"#,
        );
        let got = run(&c, &crash("", None, Some(9)));
        assert_eq!(
            (got.detail.as_str(), got.description.as_str()),
            ("oom", "killed by SIGKILL")
        );
    }

    #[test]
    fn a_time_limit_is_the_tasks_and_a_watchdog_the_hosts() {
        let c = classifier("");
        let mut timed_out = crash("sleeping\n", None, Some(9));
        timed_out.timed_out = true;
        let got = run(&c, &timed_out);
        assert_eq!(
            (got.blame, got.detail.as_str(), got.notify),
            (Blame::Task, "time_limit", Party::Owners)
        );
        assert!(!got.suspect_resource);
        let got = run(
            &c,
            &crash(
                "[  672.55] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [make:978]\n",
                Some(2),
                None,
            ),
        );
        assert_eq!(
            (got.blame, got.detail.as_str()),
            (Blame::System, "watchdog_timeout")
        );
        assert!(got.suspect_resource, "the host is checked");
    }

    #[test]
    fn user_rules_come_first_and_fill_templates() {
        let c = classifier(
            r#"
[[classifier.rules]]
name = "ours"
task = "t"
exit_code = "100-110"
log = "mirror (\\S+) is down"
detail = "network"
description = "{task} exit {exit_code}: {match}"
"#,
        );
        let got = run(
            &c,
            &crash("x\nmirror a.example is down today\ny", Some(105), None),
        );
        assert_eq!(got.rule, "ours");
        assert_eq!(got.blame, Blame::ThirdParty, "the catalogue's blame");
        assert_eq!(
            got.description,
            "t exit 105: mirror a.example is down today"
        );
        // The exit code is outside the range: the rule does not match.
        assert_ne!(
            run(&c, &crash("mirror a is down", Some(99), None)).rule,
            "ours"
        );
    }

    fn trace<'a>(e: &'a Explanation, rule: &str) -> &'a RuleTrace {
        e.rules
            .iter()
            .find(|t| t.rule == rule)
            .unwrap_or_else(|| panic!("no rule {rule}"))
    }

    #[test]
    fn explain_lists_every_rule_and_agrees_with_classify() {
        let c = classifier(
            r#"
[[classifier.rules]]
name = "ours"
exit_code = 3
log = "mirror is down"
detail = "network"
description = "{match}"
"#,
        );
        let info = crash(
            "Could not resolve host: example.org\nmirror is down\n",
            Some(3),
            None,
        );
        let input = CrashInput {
            task: "t",
            crash: &info,
            resource: None,
        };
        let e = c.explain(&input);
        assert_eq!(e.decision, c.classify(&input));
        assert_eq!(e.rules.len(), c.rule_names().count());
        assert_eq!(e.rules[0].rule, "ours");
        assert_eq!(e.rules[0].origin, Origin::Operator);
        assert_eq!(
            e.rules[0].check,
            RuleCheck::Matched {
                line: "mirror is down".into()
            }
        );
        let network = trace(&e, "network");
        assert_eq!(network.origin, Origin::Shipped);
        assert!(matches!(network.check, RuleCheck::Matched { .. }));
        assert!(
            e.why.starts_with("ours is the first rule that matched") && e.why.contains("network"),
            "{}",
            e.why
        );
        // Each condition that rules a rule out is named.
        let time = trace(&e, "time-limit");
        assert_eq!(time.check, RuleCheck::TimedOut { timed_out: false });
        let sig = trace(&e, "segfault");
        assert_eq!(sig.check, RuleCheck::Signal { signal: None });
        let exit = trace(&e, "killed-exit-code");
        assert_eq!(exit.check, RuleCheck::ExitCode { exit_code: Some(3) });

        // A status-file fault decides before every rule, and says so.
        let mut info = info.clone();
        info.status_file = Some(r#"{"blame":"task","detail":"task_failure"}"#.into());
        let e = c.explain(&CrashInput {
            task: "t",
            crash: &info,
            resource: None,
        });
        assert_eq!(e.status_file, StatusFileRead::Fault);
        assert_eq!(e.decision.rule, "status_file");
        assert!(e.why.starts_with("the task's status file declared a fault"));

        // Nothing matches: the fallback, and the explanation says so.
        let info = crash("all good\n", Some(42), None);
        let e = c.explain(&CrashInput {
            task: "t",
            crash: &info,
            resource: None,
        });
        assert!(e
            .rules
            .iter()
            .all(|t| !matches!(t.check, RuleCheck::Matched { .. })));
        assert_eq!(
            (e.decision.rule.as_str(), e.why.as_str()),
            ("fallback", "no rule matched")
        );
    }

    #[test]
    fn patterns_are_ascii_minded_unless_they_ask_for_unicode() {
        let c = classifier(
            r#"
[[classifier.rules]]
name = "greek"
log = "\\p{Greek}+ failed"
detail = "network"
description = "{match}"

[[classifier.rules]]
name = "word"
log = "^\\w+ crashed$"
detail = "task_failure"
description = "{match}"
"#,
        );
        // A Unicode class still works (compiled with Unicode on).
        let got = run(&c, &crash("αβγ failed\n", Some(1), None));
        assert_eq!(got.rule, "greek");
        // \\w is ASCII: a non-ASCII word is not one, an ASCII one is, and
        // a non-ASCII literal still matches.
        assert_ne!(
            run(&c, &crash("données crashed\n", Some(1), None)).rule,
            "word"
        );
        assert_eq!(
            run(&c, &crash("data crashed\n", Some(1), None)).rule,
            "word"
        );
        // The matched line is whole even when the match starts inside a
        // character.
        let c = classifier(
            r#"
[[classifier.rules]]
name = "any"
log = ".{2}ailed here"
detail = "network"
description = "{match}"
"#,
        );
        let got = run(&c, &crash("x\nüfailed here\ny", Some(1), None));
        assert_eq!(
            (got.rule.as_str(), got.description.as_str()),
            ("any", "üfailed here")
        );
    }

    #[test]
    fn nothing_known_is_unclassified() {
        let c = classifier("");
        let got = run(&c, &crash("all good here\n", Some(42), None));
        assert_eq!(
            (got.blame, got.detail.as_str(), got.rule.as_str()),
            (Blame::Unknown, "unclassified", "fallback")
        );
    }

    #[test]
    fn bad_patterns_are_reported_with_the_rule_name() {
        let config = Config::from_parts(
            Some(
                r#"
[[classifier.rules]]
name = "broken"
log = "(unclosed"
detail = "network"
description = "x"

[[classifier.rules]]
name = "huge"
log = "\\w{1000}{1000}"
detail = "network"
description = "x"
"#,
            ),
            Vec::new(),
        )
        .expect("config");
        let Err(problems) = Classifier::from_config(&config) else {
            panic!("accepted")
        };
        assert!(
            problems.iter().any(|p| p.contains("(broken)")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("(huge)")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_user_rule_may_not_take_a_shipped_rules_name() {
        let config = Config::from_parts(
            Some(
                r#"
[[classifier.rules]]
name = "network"
log = "x"
detail = "network"
description = "x"
"#,
            ),
            Vec::new(),
        )
        .expect("config");
        let Err(problems) = Classifier::from_config(&config) else {
            panic!("accepted")
        };
        assert!(
            problems[0].contains("classifier.rules[0] (network): a shipped rule has this name"),
            "{problems:?}"
        );
        // Without the shipped rules the name is free.
        let mut config = config;
        config.classifier.default_rules = false;
        assert!(Classifier::from_config(&config).is_ok());
    }
}
