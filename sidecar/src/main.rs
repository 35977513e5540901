//! `keybroker-sidecar`: runs next to the app in every opted-in pod.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keybroker sidecar: keeps short-lived scoped credentials on a tmpfs volume",
    long_about = "keybroker sidecar: exchanges the pod's projected service-account token at the \
keybroker broker for short-lived credentials, writes them atomically under /var/run/keybroker, \
refreshes them before expiry and removes them on revocation.\n\n\
This build does not implement the exchange yet: it exits with an error."
)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let Args {} = Args::parse();
    anyhow::bail!("the credential exchange is not implemented in this build")
}
