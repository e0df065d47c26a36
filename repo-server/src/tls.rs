//! TLS on the server's listener: the certificate chain and key named in server.toml's
//! `[tls]`, HTTP/2 and HTTP/1.1 offered by ALPN, every handshake in a task of its own
//! with a time limit (a client that stalls its handshake holds neither the accept loop
//! nor more than one task), and the certificate read again on SIGHUP: connections
//! already open keep the keys they agreed on; handshakes from then on get the new one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::error::ServerError;
use crate::fleet::deviceca::{ClientIdentity, DeviceCa};

/// `[tls]` of server.toml: PEM files, paths already resolved against the config file.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The server's certificate first, then the intermediates up to (not including)
    /// the root clients trust.
    pub certificate: PathBuf,
    /// The certificate's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// A handshake not finished in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 512;

/// Sessions the server remembers for TLS 1.2 resumption.
const SESSION_STORE: usize = 16_384;

/// What a loaded certificate says about itself, for the log.
#[derive(Debug)]
pub struct CertSummary {
    pub subject: String,
    pub serial: String,
    pub not_after: String,
    /// Seconds until it expires (negative once it has).
    pub expires_in: i64,
}

/// The certificate handshakes get; replaced whole on reload.
#[derive(Debug)]
pub struct ServerCert {
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCert {
    /// Reads the chain and key; refuses files that hold none, a key that is not the
    /// certificate's, or a certificate that does not parse.
    pub fn load(settings: &TlsSettings) -> Result<(Arc<Self>, CertSummary), ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (key, summary) = read(settings, &provider)?;
        let cert = Arc::new(ServerCert { settings: settings.clone(), provider, current: RwLock::new(key) });
        Ok((cert, summary))
    }

    /// Reads the files again and, if they are good, serves them to new handshakes; if
    /// not, the certificate served so far stays.
    pub fn reload(&self) -> Result<CertSummary, ServerError> {
        let (key, summary) = read(&self.settings, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(summary)
    }

    /// The listener's TLS configuration. With a device CA, clients may present a
    /// certificate it issued (verified in the handshake: chain and expiry); clients
    /// without one are let in too (operators with tokens, enrolling devices), and the
    /// device routes decide what each caller may do.
    fn server_config(self: &Arc<Self>, device_ca: Option<&DeviceCa>) -> Result<rustls::ServerConfig, ServerError> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(format!("protocol versions: {e}")))?;
        let builder = match device_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for root in ca.roots() {
                    roots.add(root.clone()).map_err(|e| tls_error(format!("device CA certificate: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| tls_error(format!("device CA client verifier: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // A resumed handshake costs a device no TPM signature. Stateless TLS 1.3
        // tickets (rustls rotates their keys every 6 h) resume any number of devices;
        // rustls' default in-memory store held 256 sessions, which a fleet of a few
        // dozen devices checking in outgrew (docs/benchmarks.md). The store stays, larger,
        // for TLS 1.2 clients. Device routes check the certificate of a resumed session
        // on every request (expiry, revocation), as for a full handshake.
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| tls_error(format!("session tickets: {e}")))?;
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_STORE);
        Ok(config)
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn read(settings: &TlsSettings, provider: &CryptoProvider) -> Result<(Arc<CertifiedKey>, CertSummary), ServerError> {
    let chain = read_chain(&settings.certificate)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| pem_error("tls.key", &settings.key, "private key", e))?;
    let summary = summarize(&settings.certificate, &chain[0])?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        tls_error(format!(
            "tls.key {} does not go with the certificate in tls.certificate {}: {e}",
            settings.key.display(),
            settings.certificate.display()
        ))
    })?;
    Ok((Arc::new(certified), summary))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error("tls.certificate", path, "certificates", e))?;
    if chain.is_empty() {
        return Err(tls_error(format!(
            "tls.certificate {}: no certificate in the file (PEM \"BEGIN CERTIFICATE\" blocks, the server's first)",
            path.display()
        )));
    }
    Ok(chain)
}

fn summarize(path: &Path, leaf: &CertificateDer<'_>) -> Result<CertSummary, ServerError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| tls_error(format!("tls.certificate {}: the first certificate does not parse: {e}", path.display())))?;
    let not_after = cert.validity().not_after;
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string(),
        not_after: not_after.to_string(),
        expires_in: not_after.timestamp() - chrono::Utc::now().timestamp(),
    })
}

fn pem_error(setting: &str, path: &Path, what: &str, e: rustls::pki_types::pem::Error) -> ServerError {
    use rustls::pki_types::pem::Error as E;
    let why = match e {
        E::Io(e) => format!("cannot read: {e}"),
        E::NoItemsFound => format!("no {what} in the file (PEM)"),
        other => format!("not PEM {what}: {other:?}"),
    };
    tls_error(format!("{setting} {}: {why}", path.display()))
}

fn tls_error(reason: String) -> ServerError {
    ServerError::Tls(reason)
}

/// Logs a certificate just loaded; one that has expired or soon will is a warning.
pub fn log_loaded(what: &str, s: &CertSummary) {
    const WEEK: i64 = 7 * 86400;
    if s.expires_in <= 0 {
        tracing::error!(subject = %s.subject, serial = %s.serial, not_after = %s.not_after,
            "{what}: the server's TLS certificate has expired: clients will refuse every connection");
    } else if s.expires_in < WEEK {
        tracing::warn!(subject = %s.subject, serial = %s.serial, not_after = %s.not_after,
            "{what}: the server's TLS certificate expires within a week");
    } else {
        tracing::info!(subject = %s.subject, serial = %s.serial, not_after = %s.not_after, "{what}: TLS certificate");
    }
}

/// Reads the certificate again on every SIGHUP.
pub fn reload_on_sighup(cert: Arc<ServerCert>) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| ServerError::io("install a handler for", "SIGHUP", e))?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match cert.reload() {
                Ok(summary) => log_loaded("reloaded on SIGHUP", &summary),
                Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the TLS certificate served so far"),
            }
        }
    }))
}

/// A connection's peer: its address, and the device CA certificate it presented
/// (verified in the handshake; on a resumed session, the one of the session it
/// resumed, which the device routes check again for expiry and revocation).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub client: Option<Arc<ClientIdentity>>,
}

/// A listener whose connections have finished their TLS handshake (axum serves it).
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, cert: &Arc<ServerCert>, device_ca: Option<Arc<DeviceCa>>) -> Result<Self, ServerError> {
        let local = listener.local_addr().map_err(|e| ServerError::io("local address of", "the listener", e))?;
        let acceptor = TlsAcceptor::from(Arc::new(cert.server_config(device_ca.as_deref())?));
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(listener, acceptor, tx, device_ca));
        Ok(TlsListener { ready, local, accepting })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, ready: mpsc::Sender<(TlsStream<TcpStream>, Peer)>, device_ca: Option<Arc<DeviceCa>>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if !is_connection_error(&e) {
                    // Out of file descriptors and the like: give the server a moment.
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        // TLS writes small records back to back (session tickets, then the answer):
        // with Nagle's algorithm the second waits for the client's delayed ACK, 40 ms.
        let _ = tcp.set_nodelay(true);
        let (acceptor, ready, device_ca) = (acceptor.clone(), ready.clone(), device_ca.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let client = match (&device_ca, tls.get_ref().1.peer_certificates().and_then(|c| c.first())) {
                        (Some(ca), Some(leaf)) => ca.identify(leaf).map(Arc::new),
                        _ => None,
                    };
                    let _ = ready.send((tls, Peer { addr: peer, client })).await;
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake not finished in time; connection closed"),
            }
        });
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (it does not, short of a panic): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { addr: self.local, client: None })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
