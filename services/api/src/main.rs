//! `warden-api`: the job API (HTTP and NATS) as its own process.

fn main() -> anyhow::Result<()> {
    let about = "Warden job API over HTTP and NATS";
    Ok(warden_shared::runtime::service_main(
        "warden-api",
        about,
        warden_api::run,
    )?)
}
