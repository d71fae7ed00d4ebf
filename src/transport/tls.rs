//! App-terminated mutual TLS, for `--identity-source mtls` (no mesh): the service holds the
//! server certificate, requires a client certificate from `--tls-client-ca`, and the caller's
//! principal is the client certificate's single URI SAN, a SPIFFE ID.
//!
//! - rustls verifies the chain only (webpki checks no URI names), so the SAN is read here with
//!   `x509-parser`; a certificate with no URI SAN, two, or a non-SPIFFE one has no identity.
//! - tonic's own TLS takes one fixed identity; the acceptor here builds each connection from
//!   the current configuration, which a watcher rebuilds when any of the three files changes,
//!   so certificate rotation (cert-manager, SPIRE) needs no restart.
//! - Handshakes run apart from the accept loop, each bounded by the handshake timeout.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use x509_parser::extensions::GeneralName;

use crate::access::identity::{self, PeerIdentity, Principal};
use crate::transport::connection::{Connection, Listener};

/// Handshakes finished but not yet taken by the server: a small buffer, the server takes them
/// as fast as they come.
const HANDSHAKES_BUFFERED: usize = 64;

/// Where the server's certificate, its key and the client CA are read from (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// The CA (or CAs) client certificates must chain to.
    pub client_ca: PathBuf,
}

/// The current TLS configuration, rebuilt when its files change.
#[derive(Debug)]
pub struct TlsFiles {
    settings: TlsSettings,
    current: RwLock<(Arc<ServerConfig>, Vec<u8>)>,
}

impl TlsFiles {
    /// Reads and checks the three files.
    pub fn load(settings: TlsSettings) -> Result<Self, String> {
        let contents = read_all(&settings)?;
        let config = build(&contents)?;
        Ok(Self {
            settings,
            current: RwLock::new((Arc::new(config), contents.concat())),
        })
    }

    fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current.0),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().0),
        }
    }

    /// Rebuilds the configuration when a file changed; a change that does not make a valid
    /// configuration (a half-written rotation, a key that does not match) keeps the old one.
    fn reload(&self) -> Result<bool, String> {
        let contents = read_all(&self.settings)?;
        let joined = contents.concat();
        let unchanged = self
            .current
            .read()
            .map(|current| current.1 == joined)
            .unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        let config = build(&contents)?;
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = (Arc::new(config), joined);
        tracing::info!("TLS certificates reloaded");
        Ok(true)
    }

    /// Looks at the files every [`crate::reload::RELOAD_INTERVAL`] until the process ends.
    pub async fn watch(self: Arc<Self>) {
        crate::reload::every_interval("TLS certificates", || self.reload()).await;
    }
}

fn read_all(settings: &TlsSettings) -> Result<[Vec<u8>; 3], String> {
    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    Ok([
        read(&settings.cert)?,
        read(&settings.key)?,
        read(&settings.client_ca)?,
    ])
}

/// A server configuration that requires a client certificate chaining to the client CA.
fn build([cert, key, client_ca]: &[Vec<u8>; 3]) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert: {e}"))?;
    if chain.is_empty() {
        return Err("--tls-cert: no certificate in the file".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("--tls-key: {e}"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_ca) {
        let ca = ca.map_err(|e| format!("--tls-client-ca: {e}"))?;
        roots.add(ca).map_err(|e| format!("--tls-client-ca: {e}"))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| format!("--tls-client-ca: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The principal of a verified client certificate: its one URI SAN, a SPIFFE ID.
pub fn principal_of(certificate: &CertificateDer<'_>) -> Result<Principal, &'static str> {
    let (_, certificate) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|_| "the client certificate cannot be parsed")?;
    let names = certificate
        .subject_alternative_name()
        .map_err(|_| "the client certificate's SAN extension is malformed")?
        .ok_or("the client certificate has no URI SAN")?;
    let mut uris = names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris.next().ok_or("the client certificate has no URI SAN")?;
    if uris.next().is_some() {
        return Err("the client certificate has more than one URI SAN");
    }
    if !identity::is_spiffe_id(uri) {
        return Err("the client certificate's URI SAN is not a SPIFFE ID");
    }
    Ok(Principal::named(uri))
}

/// Accepted connections after their TLS handshake, as the stream tonic serves. Handshakes
/// run in tasks of their own, so a slow one never holds up the next connection.
pub fn incoming(
    mut listener: Listener,
    files: Arc<TlsFiles>,
    handshake_timeout: Duration,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, Infallible>> {
    let (ready_tx, ready_rx) = mpsc::channel(HANDSHAKES_BUFFERED);
    tokio::spawn(async move {
        while !ready_tx.is_closed() {
            let (connection, peer) = listener.accept().await;
            let acceptor = TlsAcceptor::from(files.config());
            let ready_tx = ready_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(connection)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready_tx.send(Ok(TlsConnection::new(stream))).await;
                    }
                    Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(ready_rx)
}

/// A connection after its handshake, with its client's identity worked out once.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<Connection>,
    peer: PeerIdentity,
}

impl TlsConnection {
    fn new(stream: TlsStream<Connection>) -> Self {
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map_or(Err("no client certificate"), principal_of);
        Self {
            stream,
            peer: PeerIdentity(peer),
        }
    }
}

/// What tonic puts in each request's extensions for a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    /// The TCP addresses.
    pub tcp: TcpConnectInfo,
    /// The client certificate's identity.
    pub peer: PeerIdentity,
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        TlsConnectInfo {
            tcp: self.stream.get_ref().0.connect_info(),
            peer: self.peer.clone(),
        }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

crate::transport::connection::write_through_stream!(TlsConnection);
