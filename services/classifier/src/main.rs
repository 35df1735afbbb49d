//! `warden-classifier`: the crash classifier service as its own process.

fn main() -> anyhow::Result<()> {
    let about = "Warden crash classifier service";
    Ok(warden_shared::runtime::service_main(
        "warden-classifier",
        about,
        warden_classifier::service::run,
    )?)
}
