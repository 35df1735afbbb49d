//! `warden-recorder`: the recorder as its own process.

fn main() -> anyhow::Result<()> {
    let about = "Warden recorder (job history into the execution database, archival)";
    Ok(warden_shared::runtime::service_main(
        "warden-recorder",
        about,
        warden_recorder::run,
    )?)
}
