//! `warden-bridge`: the AMQP bridge as its own process (also
//! `warden bridge amqp`).

fn main() -> anyhow::Result<()> {
    let about = "Warden AMQP bridge (fedora-messaging in, CI messages out)";
    Ok(warden_shared::runtime::service_main(
        "warden-bridge",
        about,
        warden_bridge::run,
    )?)
}
