//! The floor of the gateway path: two byte relays in the places of the sidecar and the gateway,
//! the second hop over TLS as the sidecar's is. They parse nothing, check nothing and copy
//! bytes both ways, so what the gateway path costs beyond them is keybroker's own work, and what
//! they cost against the direct call is what any design with those two hops pays on this
//! machine.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use keybroker_e2e::pki::Ca;

/// Bytes each relay copies per read and write, each way: large enough that a 1 MiB body is not
/// a thousand syscalls per hop (tokio's default is 8 KiB).
const COPY_BUFFER: usize = 64 * 1024;

/// Two relays in a chain: the app connects to `port`.
pub(crate) struct Relays {
    pub(crate) port: u16,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Relays {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// Starts app → relay (plain) → TLS → relay → `upstream` (plain), with a fresh CA in `dir`.
pub(crate) async fn start(dir: &Path, upstream: SocketAddr) -> anyhow::Result<Relays> {
    std::fs::create_dir_all(dir)?;
    let ca = Ca::create(dir, "bench relay CA")?;
    let served = ca.issue_server(dir, "relay", &["127.0.0.1"])?;
    let certs = CertificateDer::pem_file_iter(&served.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&served.key)?;
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca.cert)? {
        roots.add(cert?)?;
    }
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();

    // The gateway's place: terminates TLS, forwards plain to the upstream.
    let inner = TcpListener::bind("127.0.0.1:0").await?;
    let inner_addr = inner.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let gateway = tokio::spawn(accept_each(inner, move |app| {
        let acceptor = acceptor.clone();
        async move {
            let mut app = acceptor.accept(app).await?;
            let mut up = connect(upstream).await?;
            tokio::io::copy_bidirectional_with_sizes(&mut app, &mut up, COPY_BUFFER, COPY_BUFFER)
                .await?;
            Ok(())
        }
    }));

    // The sidecar's place: plain from the app, TLS to the other relay.
    let outer = TcpListener::bind("127.0.0.1:0").await?;
    let port = outer.local_addr()?.port();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let sidecar = tokio::spawn(accept_each(outer, move |mut app| {
        let connector = connector.clone();
        async move {
            let tcp = connect(inner_addr).await?;
            let name = ServerName::IpAddress(inner_addr.ip().into());
            let mut up = connector.connect(name, tcp).await?;
            tokio::io::copy_bidirectional_with_sizes(&mut app, &mut up, COPY_BUFFER, COPY_BUFFER)
                .await?;
            Ok(())
        }
    }));
    Ok(Relays {
        port,
        tasks: [gateway, sidecar],
    })
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Serves every connection `listener` accepts with `relay`, each on a task of its own.
async fn accept_each<F, Fut>(listener: TcpListener, relay: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    while let Ok((tcp, _)) = listener.accept().await {
        if tcp.set_nodelay(true).is_err() {
            continue;
        }
        let served = relay(tcp);
        tokio::spawn(async move {
            // A connection closed by either side ends its relay; nothing to report.
            let _ = served.await;
        });
    }
}
