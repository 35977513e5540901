//! go-httpbin as a real plain-HTTP upstream for the gateway tests: it echoes what it receives
//! (`/headers`, `/anything`), streams (`/sse`, `/drip`, `/stream/N`), and answers any status
//! (`/status/N`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

use crate::cluster::{free_ports, http_ok};
use crate::process::{Component, Lifetime};
use crate::tools::UpstreamTools;

/// How long go-httpbin may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// go-httpbin's limits (its own defaults: 1 MiB, 10 s).
#[derive(Clone, Debug)]
pub struct Options {
    /// `-max-body-size`: the largest request or response body, in bytes.
    pub max_body_size: u64,
    /// `-max-duration`: the longest a response (`/drip`, `/sse`, `/delay`) may take.
    pub max_duration: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_body_size: 1024 * 1024,
            max_duration: Duration::from_secs(10),
        }
    }
}

/// A running go-httpbin on 127.0.0.1. Dropping it stops the server.
#[derive(Debug)]
pub struct Httpbin {
    url: String,
    addr: SocketAddr,
    dir: PathBuf,
    server: Component,
}

impl Httpbin {
    /// Starts go-httpbin with its default limits in a fresh run directory (see
    /// [`crate::run_dir`]) and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = crate::run_dir().context("creating go-httpbin's run directory")?;
        Self::start_in(&dir, Options::default()).await
    }

    /// Starts go-httpbin with `opts`, its log in `dir/go-httpbin.log`, on a free port.
    pub async fn start_in(dir: &Path, opts: Options) -> anyhow::Result<Self> {
        let tools = UpstreamTools::locate()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let [port] = free_ports()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let args = vec![
            "-host".into(),
            "127.0.0.1".into(),
            "-port".into(),
            port.to_string(),
            "-max-body-size".into(),
            opts.max_body_size.to_string(),
            "-max-duration".into(),
            format!("{}ms", opts.max_duration.as_millis()),
        ];
        let mut server = Component::spawn(
            "go-httpbin",
            &tools.go_httpbin,
            &args,
            &[],
            &dir.join("go-httpbin.log"),
            Lifetime::TiedToProcess,
        )?;
        let url = format!("http://{addr}");
        let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let probe = format!("{url}/status/200");
        server
            .wait_ready("GET /status/200", READY_TIMEOUT, || {
                http_ok(&http, &probe, None)
            })
            .await?;
        Ok(Self {
            url,
            addr,
            dir: dir.to_owned(),
            server,
        })
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory holding its log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` lines of its log (one line per request served), for failure reports.
    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }
}
