//! `kubectl keybroker`: see [`keybroker_operator::cli`].

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    keybroker_operator::cli::run(keybroker_operator::cli::Args::parse()).await
}
