//! Status files (`$WARDEN_STATUS_FILE`, written by the task: `OK`, a JSON
//! verdict or a JSON fault): read by the worker for the verdict and by the
//! classifier for a crash's blame. The two must agree on a valid fault.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use warden_classifier::{Classifier, CrashInput, MAX_DESCRIPTION};
use warden_shared::config::valid_name;
use warden_shared::job::CrashInfo;
use warden_worker::exec::{verdict, Verdict};

fn classifier() -> &'static Classifier {
    static C: OnceLock<Classifier> = OnceLock::new();
    C.get_or_init(|| {
        Classifier::from_config(&warden_fuzz::example_config())
            .unwrap_or_else(|e| panic!("the example config's classifier: {e:?}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let config = warden_fuzz::example_config();
    let Some((task_name, task)) = config.tasks.iter().next() else {
        return;
    };
    // The worker reads the file as bytes and decodes it lossily.
    let text = String::from_utf8_lossy(data);
    for (exit, signal) in [(Some(0), None), (Some(1), None), (None, Some(9))] {
        let v = verdict(task, exit, signal, Some(&text), false);
        assert_eq!(
            verdict(task, exit, signal, Some(&text), true),
            Verdict::Crashed(None),
            "a timed-out task has crashed whatever it wrote"
        );
        if let Verdict::Finished(outcome) = &v {
            assert!(!outcome.is_empty());
        }
        let crash = CrashInfo {
            exit_code: exit,
            signal,
            log_tail: text.to_string(),
            status_file: Some(text.to_string()),
            ..Default::default()
        };
        let c = classifier().classify(&CrashInput {
            task: task_name,
            crash: &crash,
            resource: Some("r1"),
        });
        assert!(c.description.chars().count() <= MAX_DESCRIPTION);
        assert!(!c.detail.is_empty() && !c.rule.is_empty());
        if let Verdict::Crashed(Some(fault)) = &v {
            if fault.detail.len() <= 64 && valid_name(&fault.detail) {
                assert_eq!(c.rule, "status_file", "the classifier ignored a fault");
                assert_eq!(
                    (c.blame, c.detail.as_str()),
                    (fault.blame, fault.detail.as_str())
                );
            }
        }
    }
});
