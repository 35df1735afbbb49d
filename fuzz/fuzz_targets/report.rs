//! Worker reports (the reports stream): decoded as the scheduler does,
//! then folded into the job they name, as the scheduler applies them.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use warden_scheduler::reports::fold;
use warden_shared::messages::{Classification, Party, Report};
use warden_shared::Blame;

fuzz_target!(|data: &[u8]| {
    let Ok(report) = serde_json::from_slice::<Report>(data) else {
        return;
    };
    warden_fuzz::assert_round_trips(&report);
    let _ = report.msg_id();
    let config = warden_fuzz::example_config();
    let now = warden_fuzz::at(10);
    let classified = HashMap::from([(
        0,
        Classification {
            blame: Blame::ThirdParty,
            detail: "network".into(),
            description: "fuzz".into(),
            rule: "fuzz".into(),
            notify: Party::Operators,
            suspect_resource: true,
        },
    )]);
    let jobs = [
        // The attempt the report names, held by its session and bot.
        warden_fuzz::running(report.job_id, report.epoch, &report.session, &report.bot_id),
        // Another attempt of the same job (a zombie's report).
        warden_fuzz::running(
            report.job_id,
            report.epoch.wrapping_add(1),
            "other-session",
            "other-bot",
        ),
        // Not running at all.
        warden_fuzz::scheduled(report.job_id, "t"),
    ];
    for job in &jobs {
        for c in [&HashMap::new(), &classified] {
            let f = fold(job, &[&report, &report], c, &config, now);
            assert_eq!(f.outcomes.len(), 2);
            warden_fuzz::assert_job_round_trips(&f.job);
        }
    }
});
