//! `warden-fencing`: the fencing (bot sessions) service as its own process.

fn main() -> anyhow::Result<()> {
    let about = "Warden fencing (bot sessions) service";
    Ok(warden_shared::runtime::service_main(
        "warden-fencing",
        about,
        warden_fencing::run,
    )?)
}
