//! Crashes and the classifier: the question to ask, the stand-in answer
//! when it never answers, and the events a classified crash sends out
//! (the party to notify, the resources to suspect). Pure: the classifier
//! client and the publishes are `loops::classify`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use warden_shared::job::Job;
use warden_shared::messages::{
    Classification, ClassifyRequest, Notification, Party, Report, ReportKind, ResourceSuspect,
    MESSAGE_VERSION,
};
use warden_shared::{subjects, Config, JobState};

use crate::apply;

/// How long one classification may take before the report is retried.
pub const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// After this many deliveries of a crash report without an answer from
/// the classifier, the crash is recorded unclassified (the task's own
/// fault if it declared one) rather than leave the job RUNNING forever.
pub const CLASSIFY_GIVE_UP: i64 = 20;

/// A classified crash of one attempt, written: what its events need.
#[derive(Debug, Clone, PartialEq)]
pub struct CrashEvent {
    pub classification: Classification,
    pub attempt: u32,
    /// Every resource the attempt ran on (the first is named in the
    /// notification).
    pub resources: Vec<String>,
    pub leased_at: Option<DateTime<Utc>>,
    /// The job's state after the crash (and the retry policy).
    pub state: JobState,
}

/// The question for the classifier about the crash in `r`; `None` when `r`
/// is no crash.
pub fn request(job: &Job, r: &Report) -> Option<ClassifyRequest> {
    let ReportKind::Crashed { crash, .. } = &r.kind else {
        return None;
    };
    Some(ClassifyRequest {
        version: MESSAGE_VERSION,
        job_id: job.id,
        task: job.task.clone(),
        attempt: r.epoch,
        resource: job.lease.as_ref().and_then(|l| l.resource.clone()),
        crash: crash.clone(),
    })
}

/// When the classifier did not answer the crash in `r`: `None` while the
/// report may be retried, after [`CLASSIFY_GIVE_UP`] deliveries the
/// stand-in classification to record (the task's own fault if it declared
/// one, else unknown).
pub fn stand_in(r: &Report, deliveries: i64) -> Option<Classification> {
    let ReportKind::Crashed { crash, fault } = &r.kind else {
        return None;
    };
    if deliveries < CLASSIFY_GIVE_UP {
        return None;
    }
    let (blame, detail, mut description) = apply::unclassified(crash, fault.as_ref());
    if fault.is_none() {
        description.push_str(" (the classifier did not answer)");
    }
    Some(Classification {
        blame,
        detail,
        description,
        rule: "classifier_unavailable".into(),
        notify: Party::Operators,
        suspect_resource: false,
    })
}

/// The [`CrashEvent`] of a redelivered crash report already recorded on
/// `job` (its events are sent again), given its classification.
pub fn redelivered(job: &Job, r: &Report, classification: Classification) -> Option<CrashEvent> {
    let crash = apply::applied_crash(job, r)?;
    Some(CrashEvent {
        classification,
        attempt: r.epoch,
        resources: crash.resources.clone(),
        leased_at: apply::leased_at(job, r.epoch),
        state: job.state,
    })
}

/// One durable publish: subject, message id (one per attempt, so a
/// retried write never notifies twice) and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish<T> {
    pub subject: String,
    pub msg_id: String,
    pub body: T,
}

/// What a classified crash sends out.
#[derive(Debug, Clone, PartialEq)]
pub struct Events {
    /// The party the catalogue names, unless it names none.
    pub notify: Option<Publish<Notification>>,
    /// Every resource the attempt ran on, when they may be at fault.
    pub suspects: Vec<Publish<ResourceSuspect>>,
}

/// The events of crash `e` of `job`.
pub fn events(job: &Job, e: &CrashEvent, config: &Config, now: DateTime<Utc>) -> Events {
    let c = &e.classification;
    let attempt = e.attempt;
    let notify = (c.notify != Party::None).then(|| {
        let recipients = match c.notify {
            Party::Owners => config
                .tasks
                .get(&job.task)
                .map(|t| t.owners.clone())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Publish {
            subject: subjects::notify_subject(c.notify),
            msg_id: format!("{}:{attempt}:notify", job.id),
            body: Notification {
                version: MESSAGE_VERSION,
                party: c.notify,
                recipients,
                job_id: job.id,
                task: job.task.clone(),
                attempt,
                blame: c.blame,
                detail: c.detail.clone(),
                description: c.description.clone(),
                state: e.state,
                resource: e.resources.first().cloned(),
                links: vec![
                    format!("/api/v1/jobs/{}", job.id),
                    format!("warden job show {}", job.id),
                ],
                at: now,
            },
        }
    });
    let suspects = if c.suspect_resource {
        e.resources
            .iter()
            .map(|resource| Publish {
                subject: subjects::suspect_subject(resource),
                msg_id: format!("{}:{attempt}:suspect:{resource}", job.id),
                body: ResourceSuspect {
                    version: MESSAGE_VERSION,
                    resource: resource.clone(),
                    job_id: job.id,
                    attempt,
                    detail: c.detail.clone(),
                    leased_at: e.leased_at,
                    at: now,
                },
            })
            .collect()
    } else {
        Vec::new()
    };
    Events { notify, suspects }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, classification, crashed, finished, report, running};
    use warden_shared::Blame;

    #[test]
    fn only_a_crash_is_asked_about() {
        let job = running(2, "s1");
        let q = request(&job, &report(&job, 2, "s1", crashed())).expect("a question");
        assert_eq!(
            (q.job_id, q.attempt, q.resource.as_deref()),
            (job.id, 2, Some("r1"))
        );
        assert!(request(&job, &report(&job, 2, "s1", finished())).is_none());
    }

    #[test]
    fn the_stand_in_comes_only_after_enough_deliveries() {
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", crashed());
        assert_eq!(stand_in(&r, CLASSIFY_GIVE_UP - 1), None);
        let c = stand_in(&r, CLASSIFY_GIVE_UP).expect("a stand-in");
        assert_eq!(
            (c.blame, c.detail.as_str()),
            (Blame::Unknown, "unclassified")
        );
        assert_eq!(
            (c.rule.as_str(), c.notify),
            ("classifier_unavailable", Party::Operators)
        );
        assert!(c.description.ends_with("(the classifier did not answer)"));
        assert!(!c.suspect_resource);
        assert_eq!(stand_in(&report(&job, 1, "s1", finished()), 100), None);
    }

    fn event(c: Classification) -> CrashEvent {
        CrashEvent {
            classification: c,
            attempt: 3,
            resources: vec!["host".into(), "gpu".into()],
            leased_at: Some(at(0)),
            state: JobState::Scheduled,
        }
    }

    #[test]
    fn a_suspect_crash_notifies_once_and_flags_every_resource() {
        let job = running(3, "s1");
        let e = event(classification(Blame::System, "disk_full"));
        let ev = events(&job, &e, &Config::defaults(), at(9));
        let n = ev.notify.expect("a notification");
        assert_eq!(n.msg_id, format!("{}:3:notify", job.id));
        assert_eq!(n.subject, subjects::notify_subject(Party::Operators));
        assert_eq!(
            (n.body.resource.as_deref(), n.body.state, n.body.at),
            (Some("host"), JobState::Scheduled, at(9))
        );
        let ids: Vec<&str> = ev.suspects.iter().map(|s| s.msg_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                format!("{}:3:suspect:host", job.id),
                format!("{}:3:suspect:gpu", job.id)
            ]
        );
        assert_eq!(ev.suspects[1].subject, subjects::suspect_subject("gpu"));
        assert_eq!(ev.suspects[0].body.leased_at, Some(at(0)));
    }

    #[test]
    fn nobody_to_tell_and_no_suspect_means_no_events() {
        let job = running(3, "s1");
        let mut c = classification(Blame::Task, "test_failed");
        c.notify = Party::None;
        c.suspect_resource = false;
        let ev = events(&job, &event(c), &Config::defaults(), at(9));
        assert_eq!(ev.notify, None);
        assert!(ev.suspects.is_empty());
    }

    #[test]
    fn a_redelivered_crash_is_one_already_recorded() {
        let job = running(1, "s1");
        let r = report(&job, 1, "s1", crashed());
        let c = classification(Blame::System, "x");
        assert_eq!(redelivered(&job, &r, c.clone()), None);
        let f = crate::reports::fold(
            &job,
            &[&r],
            &std::collections::HashMap::new(),
            &Config::defaults(),
            at(2),
        );
        let e = redelivered(&f.job, &r, c).expect("recorded");
        assert_eq!((e.attempt, e.resources), (1, vec!["r1".to_string()]));
    }
}
