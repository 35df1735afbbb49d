//! Every bridge metric, declared once; [`init`] registers them and exports
//! every closed label value at zero when the bridge starts.

use std::sync::OnceLock;

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts};
use warden_shared::metrics::{register, touch_each};

use crate::inbound::Undecodable;

pub struct Metrics {
    pub received: IntCounter,
    pub redelivered: IntCounter,
    pub published: IntCounter,
    pub dead_lettered: IntCounterVec,
    pub publish_retries: IntCounter,
    pub connected: IntGauge,
    pub connects: IntCounterVec,
    pub queue_messages: IntGauge,
    pub lag_seconds: Gauge,
    pub in_flight: IntGauge,
    pub ci_published: IntCounterVec,
    pub ci_skipped: IntCounterVec,
    pub ci_failures: IntCounter,
}

/// `result` of `warden_bridge_amqp_connects_total`.
pub const CONNECT_RESULTS: [&str; 2] = ["ok", "failed"];
/// `status` of `warden_bridge_ci_messages_published_total`.
pub const CI_STATUSES: [&str; 4] = ["queued", "running", "complete", "error"];

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        received: register(
            IntCounter::new(
                "warden_bridge_received_total",
                "AMQP messages delivered to the bridge (redeliveries included)",
            )
            .expect("valid metric"),
        ),
        redelivered: register(
            IntCounter::new(
                "warden_bridge_redelivered_total",
                "AMQP deliveries flagged as redelivered by the broker (an earlier delivery was not acknowledged)",
            )
            .expect("valid metric"),
        ),
        published: register(
            IntCounter::new(
                "warden_bridge_published_total",
                "AMQP messages acknowledged to the broker after JetStream acknowledged their event",
            )
            .expect("valid metric"),
        ),
        dead_lettered: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_bridge_dead_lettered_total",
                    "AMQP messages that cannot be events, kept on the dead-letter stream (then acknowledged), by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        ),
        publish_retries: register(
            IntCounter::new(
                "warden_bridge_publish_retries_total",
                "AMQP messages handed back to the broker (nack, requeue) because JetStream did not acknowledge their event",
            )
            .expect("valid metric"),
        ),
        connected: register(
            IntGauge::new(
                "warden_bridge_amqp_connected",
                "1 while the bridge holds an open AMQP connection and channel, else 0",
            )
            .expect("valid metric"),
        ),
        connects: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_bridge_amqp_connects_total",
                    "AMQP connection attempts, by result (ok, failed)",
                ),
                &["result"],
            )
            .expect("valid metric"),
        ),
        queue_messages: register(
            IntGauge::new(
                "warden_bridge_queue_messages",
                "Messages ready in the consumed queue, as the broker said when last asked (lag in messages)",
            )
            .expect("valid metric"),
        ),
        lag_seconds: register(
            Gauge::new(
                "warden_bridge_lag_seconds",
                "Age of the last bridged message when JetStream acknowledged it (from its sent-at header or AMQP timestamp)",
            )
            .expect("valid metric"),
        ),
        in_flight: register(
            IntGauge::new(
                "warden_bridge_in_flight",
                "AMQP messages received and not yet acknowledged or handed back",
            )
            .expect("valid metric"),
        ),
        ci_published: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_bridge_ci_messages_published_total",
                    "CI messages the broker confirmed, by status (queued, running, complete, error)",
                ),
                &["status"],
            )
            .expect("valid metric"),
        ),
        ci_skipped: register(
            IntCounterVec::new(
                Opts::new(
                    "warden_bridge_ci_messages_skipped_total",
                    "Job changes that published no CI message, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        ),
        ci_failures: register(
            IntCounter::new(
                "warden_bridge_ci_messages_failures_total",
                "CI message publishes the broker did not confirm (retried)",
            )
            .expect("valid metric"),
        ),
    })
}

/// Registers every bridge metric, each closed label value at zero.
pub fn init() {
    let m = metrics();
    touch_each(&m.dead_lettered, &Undecodable::REASONS);
    touch_each(&m.connects, &CONNECT_RESULTS);
    touch_each(&m.ci_published, &CI_STATUSES);
    touch_each(&m.ci_skipped, &crate::ci::Skip::REASONS);
}
