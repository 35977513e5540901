//! `keybroker-sidecar`: runs next to the app in every opted-in pod (a native sidecar the
//! webhook injects). One thread: the work is a few requests per refresh period, and a
//! current-thread runtime keeps the resident set small.

mod atomic;
mod broker;
mod config;
mod files;
mod gateway;
mod http;
mod random;
mod reload;
mod schedule;
mod state;
mod tasks;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
// The endpoint's token, next to the ApiKey directories (`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`).
use keybroker_contract::files::AUTH_TOKEN;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::atomic::Writer;
use crate::broker::Broker;
use crate::config::Args;
use crate::state::Key;
use crate::tasks::Ctx;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("reading --broker-ca-file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error("preparing the output directory: {0}")]
    Files(#[from] atomic::Error),
    #[error("creating the output directory {path}: {source}")]
    OutputDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listening on {addr} ({flag}): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Random(#[from] random::Error),
    #[error("installing the signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&Error::Runtime(e)),
    };
    let outcome = runtime.block_on(run(args));
    // Do not wait for tasks blocked on the network: the files are already gone.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> ExitCode {
    error!(error = %e, "keybroker-sidecar cannot run");
    ExitCode::FAILURE
}

async fn run(args: Args) -> Result<(), Error> {
    let url = config::broker_url(&args.broker_url)?;
    let ca = match (args.broker_ca, &args.broker_ca_file) {
        (Some(pem), _) => pem.into_bytes(),
        (None, Some(path)) => std::fs::read(path).map_err(|source| Error::CaFile {
            path: path.clone(),
            source,
        })?,
        (None, None) => return Err(config::Error::NoCa.into()),
    };
    let broker = Broker::new(url, &ca, &args.token_file)?;
    let names = config::api_keys(&args.api_keys)?;
    let file_mode = config::file_mode(&args.file_mode)?;
    let credentials_addr = config::credentials_addr(args.credentials_addr)?;
    let gateway_addr = args.gateway_addr.map(gateway::check_addr).transpose()?;
    let refresh_fraction = config::refresh_fraction(args.refresh_fraction)?;
    let reload = args
        .reload_url
        .as_deref()
        .map(config::reload_url)
        .transpose()?;

    std::fs::create_dir_all(&args.output_dir).map_err(|source| Error::OutputDir {
        path: args.output_dir.clone(),
        source,
    })?;
    let writer = Writer::new(&args.output_dir, file_mode);
    // A restarted sidecar container finds the pod's volume as its predecessor left it: start
    // from nothing rather than serve credentials whose state nobody tracks.
    for name in &names {
        writer.remove(name)?;
    }
    writer.remove_state_dir()?;
    let token = random::token()?;
    writer.write_file(AUTH_TOKEN, token.as_bytes())?;

    let keys: Arc<[Key]> = names.iter().map(|n| Key::new(n)).collect();
    let bind = |addr, flag| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, flag, source })
    };
    let credentials = bind(credentials_addr, "--credentials-addr").await?;
    let health = bind(args.health_addr, "--health-addr").await?;
    let local_gateway = match gateway_addr {
        Some(addr) => Some(bind(addr, "--gateway-addr").await?),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signal)?;

    let served = Arc::clone(&keys);
    tokio::spawn(http::serve(credentials, move |method, path, auth| {
        http::credentials(&served, &token, method, path, auth)
    }));
    let probed = Arc::clone(&keys);
    tokio::spawn(http::serve(health, move |method, path, _| {
        http::health(&probed, method, path)
    }));
    if let Some(listener) = local_gateway {
        tokio::spawn(gateway::serve(
            listener,
            Arc::clone(&keys),
            broker.connector(),
        ));
    }
    let ctx = Arc::new(Ctx {
        broker,
        writer,
        refresh_fraction,
        reload,
    });
    for index in 0..keys.len() {
        tokio::spawn(tasks::refresher(Arc::clone(&ctx), Arc::clone(&keys), index));
        tokio::spawn(tasks::revocation_poller(
            Arc::clone(&ctx),
            Arc::clone(&keys),
            index,
        ));
    }
    info!(
        apikeys = names.join(","),
        output_dir = %args.output_dir.display(),
        broker = args.broker_url,
        credentials_addr = %credentials_addr,
        health_addr = %args.health_addr,
        "keybroker-sidecar started"
    );

    let signal = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    // No await from here on: on this one thread no task can run (and write) before we return.
    for key in keys.iter() {
        if let Err(e) = key.stop(&ctx.writer) {
            error!(apikey = key.name, error = %e, "removing credentials at shutdown failed");
        }
    }
    for removed in [
        ctx.writer.remove_file(AUTH_TOKEN),
        ctx.writer.remove_state_dir(),
    ] {
        if let Err(e) = removed {
            error!(error = %e, "cleaning up at shutdown failed");
        }
    }
    info!(signal, "credentials removed; exiting");
    Ok(())
}
