//! `warden-worker`: the worker agent as its own process.

use warden_worker::WorkerArgs;

fn main() -> anyhow::Result<()> {
    // First: as a guard this process only runs its task (see
    // warden_shared::guard); otherwise tasks run under a guard.
    warden_shared::guard::run_if_requested();
    let adjust = |c: &mut warden_shared::Config, a: WorkerArgs| a.apply(&mut c.worker);
    let about = "Warden worker agent";
    Ok(warden_shared::runtime::service_main_with(
        "warden-worker",
        about,
        adjust,
        warden_worker::run,
    )?)
}
