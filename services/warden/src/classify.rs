//! `warden classify`: run the classifier on a log without a bus, so an
//! operator can test rules before deploying them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context;
use warden_classifier::{Classifier, CrashInput, Explanation, RuleCheck, StatusFileRead};
use warden_shared::classify::signal_number;
use warden_shared::job::CrashInfo;
use warden_shared::Config;

#[derive(clap::Args)]
pub struct ClassifyArgs {
    /// The task's output; only its last classifier.max_scan_bytes are read,
    /// as only those are scanned
    #[arg(long)]
    pub log: PathBuf,
    /// The task's status file; only its first worker.status_file_bytes are
    /// read, as the worker does
    #[arg(long)]
    pub status: Option<PathBuf>,
    #[arg(long)]
    pub exit_code: Option<i32>,
    /// Signal that ended the task: a number or a name (9, KILL, SIGKILL)
    #[arg(long)]
    pub signal: Option<String>,
    /// Task name, for rules that match on it
    #[arg(long, default_value = "")]
    pub task: String,
    /// The worker killed the task for its time limit
    #[arg(long)]
    pub timed_out: bool,
    /// Also show every rule tried, in order, whether it matched (and on
    /// which line) or which condition ruled it out, and why the decision
    /// won
    #[arg(long)]
    pub explain: bool,
    /// Print a JSON object (with --explain: the decision, every rule's
    /// result and why)
    #[arg(long)]
    pub json: bool,
}

/// The last `max` bytes of a file as text (invalid UTF-8 replaced, as the
/// worker does), so a log of any size costs at most `max` of memory.
fn read_tail(path: &Path, max: usize) -> anyhow::Result<String> {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max as u64)))?;
        let mut buf = Vec::new();
        file.take(max as u64).read_to_end(&mut buf)?;
        Ok(buf)
    };
    let bytes = read().with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The first `max` bytes of a file as text, as the worker reads a status
/// file.
fn read_head(path: &Path, max: usize) -> anyhow::Result<String> {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        File::open(path)?.take(max as u64).read_to_end(&mut buf)?;
        Ok(buf)
    };
    let bytes = read().with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `--explain` as text: the status file, every rule with its result (the
/// deciding one marked), and why it decided.
fn explanation_text(e: &Explanation) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\nstatus file: {}\n",
        match &e.status_file {
            StatusFileRead::Absent => "none".to_string(),
            StatusFileRead::Verdict => "a verdict (rules decide)".to_string(),
            StatusFileRead::Fault => "a fault: it decides before any rule".to_string(),
            StatusFileRead::Invalid { why } => format!("invalid ({why})"),
        }
    ));
    out.push_str("rules, in the order tried:\n");
    let width = e.rules.iter().map(|t| t.rule.len()).max().unwrap_or(0);
    let mut decided = false;
    for (i, t) in e.rules.iter().enumerate() {
        let matched = matches!(t.check, RuleCheck::Matched { .. });
        let mark = if matched && !decided && e.decision.rule == t.rule {
            decided = true;
            "=>"
        } else if matched {
            " +"
        } else {
            "  "
        };
        out.push_str(&format!(
            "{mark} {:>3}. {:<width$}  {:<8}  {}/{}: {}\n",
            i + 1,
            t.rule,
            t.origin.as_str(),
            t.blame,
            t.detail,
            t.check.describe(),
        ));
    }
    out.push_str(&format!("why: {}\n", e.why));
    out
}

pub fn run(config: &Config, args: &ClassifyArgs) -> anyhow::Result<i32> {
    let classifier = match Classifier::from_config(config) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!(
                "warden: invalid classifier rules:\n  - {}",
                problems.join("\n  - ")
            );
            return Ok(warden_shared::config::EXIT_CONFIG);
        }
    };
    let signal = match &args.signal {
        Some(s) => match signal_number(s) {
            Some(n) => Some(n),
            None => {
                eprintln!("warden: --signal {s:?} is not a signal number or name");
                return Ok(warden_shared::config::EXIT_CONFIG);
            }
        },
        None => None,
    };
    let (log, status) = match (
        read_tail(&args.log, config.classifier.max_scan_bytes),
        args.status
            .as_deref()
            .map(|p| read_head(p, config.worker.status_file_bytes))
            .transpose(),
    ) {
        (Ok(l), Ok(s)) => (l, s),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("warden: {e:#}");
            return Ok(warden_shared::config::EXIT_CONFIG);
        }
    };
    let crash = CrashInfo {
        exit_code: args.exit_code,
        signal,
        duration_ms: 0,
        log_tail: log,
        status_file: status,
        timed_out: args.timed_out,
        resources: Vec::new(),
    };
    let input = CrashInput {
        task: &args.task,
        crash: &crash,
        resource: None,
    };
    let explained = args.explain.then(|| classifier.explain(&input));
    let c = match &explained {
        Some(e) => e.decision.clone(),
        None => classifier.classify(&input),
    };
    match (&explained, args.json) {
        (Some(e), true) => println!("{}", serde_json::to_string_pretty(e)?),
        (None, true) => println!("{}", serde_json::to_string_pretty(&c)?),
        (_, false) => {
            println!("blame:       {}", c.blame);
            println!("detail:      {}", c.detail);
            println!("description: {}", c.description);
            println!("rule:        {}", c.rule);
            println!("notify:      {}", c.notify.as_str());
            println!(
                "suspect:     {}",
                if c.suspect_resource { "resource" } else { "no" }
            );
        }
    }
    if let (Some(e), false) = (&explained, args.json) {
        print!("{}", explanation_text(e));
    }
    Ok(0)
}
