//! `warden-scheduler`: one scheduler replica as its own process.

fn main() -> anyhow::Result<()> {
    let about = "Warden scheduler replica";
    Ok(warden_shared::runtime::service_main(
        "warden-scheduler",
        about,
        warden_scheduler::run,
    )?)
}
