//! A stack on the shipped permissions (`deploy/nats/cluster/accounts.conf`)
//! with one NATS user per bot: what the security tests build on.

use std::time::Duration;

use warden_e2e::Scenario;

/// The services run as `warden-service` under the shipped permissions, the
/// CLI submits with that login, and a bot logs in with its own nkey and
/// only with it.
#[tokio::test]
async fn a_secured_stack_serves_its_services_and_knows_its_bots() {
    let s = Scenario::new().secured(&["bot-1"]).up();
    let id = s.submit(&["noop"]);
    let job = s
        .wait_job_where(&id, "scheduled", Duration::from_secs(20), |j| {
            j["state"] == "SCHEDULED"
        })
        .await;
    assert_eq!(job["task"], "noop");
    let bot = s.connect_bot("bot-1").await;
    bot.flush().await.expect("a bot's nkey logs in");
    let anonymous = async_nats::ConnectOptions::new()
        .max_reconnects(Some(0))
        .connect(s.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous client got in");
}
