//! `warden-trigger`: the trigger as its own process.

fn main() -> anyhow::Result<()> {
    let about = "Warden trigger (events to jobs)";
    Ok(warden_shared::runtime::service_main(
        "warden-trigger",
        about,
        warden_trigger::run,
    )?)
}
