//! `keybroker-operator`: one binary for the controller, admission-webhook and broker roles.

use clap::{Parser, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keybroker operator: controller, sidecar-injecting webhook and credential broker",
    long_about = "keybroker operator: reconciles KeyProviders and ApiKeys (controller), injects the \
credential sidecar into opted-in pods (webhook) and exchanges pod-bound service-account tokens for \
short-lived scoped credentials (broker). Each role can run in its own Deployment.\n\n\
This build does not implement any role yet: it validates its arguments and exits with an error \
naming the roles that are missing."
)]
struct Args {
    /// Roles to run in this process (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "controller,webhook,broker",
        env = "KEYBROKER_ROLES"
    )]
    roles: Vec<Role>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Reconcile KeyProviders and ApiKeys (leader-elected).
    Controller,
    /// Serve the mutating admission webhook that injects the sidecar.
    Webhook,
    /// Serve the token-exchange endpoint for sidecars.
    Broker,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let names: Vec<String> = args
        .roles
        .iter()
        .filter_map(|r| r.to_possible_value().map(|v| v.get_name().to_owned()))
        .collect();
    anyhow::bail!("not implemented in this build: {}", names.join(", "))
}
