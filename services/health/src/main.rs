//! `warden-health`: the resource health service as its own process.

fn main() -> anyhow::Result<()> {
    let about = "Warden resource health service";
    Ok(warden_shared::runtime::service_main(
        "warden-health",
        about,
        warden_health::run,
    )?)
}
