//! The one list of Warden's services: what `warden up` starts, what
//! `/healthz` waits for, what `warden check bus` pings on `$SRV`.

use crate::subjects;

/// One Warden service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// Its name: the binary is `warden-<name>`, logs and metrics say it.
    pub name: &'static str,
    /// What it is, in a few words (the binary's `--help`).
    pub about: &'static str,
    /// Its NATS service API name (`$SRV.PING.<srv>`), if it has one.
    pub srv: Option<&'static str>,
    /// Whether `warden up` runs one of it (workers are started apart, N of
    /// them, by `--workers`).
    pub in_up: bool,
}

impl Service {
    /// Whether `warden check bus` expects it to answer `$SRV.PING`.
    pub fn pinged(&self) -> bool {
        self.srv.is_some()
    }
}

/// Every service, in the order `warden up` starts them.
pub const ALL: [Service; 9] = [
    Service {
        name: "trigger",
        about: "Warden trigger: bus events become jobs",
        srv: None,
        in_up: true,
    },
    Service {
        name: "scheduler",
        about: "Warden scheduler: leases jobs to bots, applies their reports",
        srv: Some(subjects::SCHEDULER_SERVICE),
        in_up: true,
    },
    Service {
        name: "fencing",
        about: "Warden fencing: bot sessions and their epochs",
        srv: Some(subjects::FENCING_SERVICE),
        in_up: true,
    },
    Service {
        name: "api",
        about: "Warden API: jobs over HTTP and NATS",
        srv: Some(subjects::API_SERVICE),
        in_up: true,
    },
    Service {
        name: "health",
        about: "Warden health: resources, their checks and recycling",
        srv: Some(subjects::HEALTH_SERVICE),
        in_up: true,
    },
    Service {
        name: "classifier",
        about: "Warden crash classifier",
        srv: Some(subjects::CLASSIFIER_SERVICE),
        in_up: true,
    },
    // Only where `[history] database` is set (`warden up` sets it).
    Service {
        name: "recorder",
        about: "Warden recorder: job history into the execution database, archival",
        srv: None,
        in_up: true,
    },
    // Only where `[amqp] url` is set: `warden up` starts it then.
    Service {
        name: "bridge",
        about: "Warden AMQP bridge: fedora-messaging in, CI messages out",
        srv: None,
        in_up: false,
    },
    Service {
        name: "worker",
        about: "Warden worker: runs jobs on one bot",
        srv: None,
        in_up: false,
    },
];

/// The services `warden up` runs one of, in start order.
pub fn in_up() -> impl Iterator<Item = &'static Service> {
    ALL.iter().filter(|s| s.in_up)
}

/// The `$SRV` names `warden check bus` expects to answer, sorted.
pub fn pinged() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = ALL.iter().filter_map(|s| s.srv).collect();
    v.sort_unstable();
    v
}

/// The service named `name`.
pub fn by_name(name: &str) -> Option<&'static Service> {
    ALL.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_and_srv_names_are_unique() {
        let mut names = std::collections::BTreeSet::new();
        for s in super::ALL {
            assert!(names.insert(s.name), "{} twice", s.name);
        }
        let pinged = super::pinged();
        let unique: std::collections::BTreeSet<_> = pinged.iter().collect();
        assert_eq!(unique.len(), pinged.len());
        assert_eq!(pinged.len(), 5);
        assert_eq!(super::in_up().count(), 7);
        assert!(super::by_name("worker").is_some_and(|w| !w.in_up && !w.pinged()));
    }
}
