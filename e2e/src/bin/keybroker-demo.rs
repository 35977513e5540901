//! `make demo`: see `keybroker_e2e::demo`. Ctrl-C stops and deletes everything it started.

use keybroker_e2e::demo::{self, Narrator};

#[tokio::main]
async fn main() {
    let narrator = Narrator::default();
    let mut run = Box::pin(demo::run(&narrator));
    let finished = tokio::select! {
        report = &mut run => Some(report),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some(report) = finished else {
        // Dropping the demo stops every process it started and deletes its files.
        drop(run);
        eprintln!("\ninterrupted: everything the demo started is stopped and deleted");
        std::process::exit(130);
    };
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("\nmake demo failed (everything it started is stopped): {e:#}");
            std::process::exit(1);
        }
    };
    println!(
        "\nkeybroker: the app's upload → {}; outside its scope → {}; after the revocation → {} (a copy of the keys: {}); files gone {} ms after the revocation.",
        report.inside,
        report.outside.lines().last().unwrap_or_default(),
        report.after_revocation,
        report.copy_after,
        report.files_gone.as_millis()
    );
}
