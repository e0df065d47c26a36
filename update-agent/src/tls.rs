//! The agent's TLS client configuration (rustls, ring): which servers it trusts — only
//! the CAs of `[http] ca_certificates`, or else the system's trust store (rustls'
//! platform verifier); a system without one (no `ca-certificates` package, as on many
//! devices) trusts no TLS server at all, says so, and still speaks plain `http://` —
//! and, for a device with a TPM, the client certificate it presents
//! ([`crate::devicecert`]: a TPM-resident key, renewed by check-ins).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::devicecert::DeviceIdentity;
use crate::error::{AgentError, Result};

/// A client from `builder` that trusts `ca_file`'s CAs, or the system's store, and
/// presents `identity`'s certificate when it has one.
pub fn client(builder: reqwest::ClientBuilder, ca_file: Option<&Path>, identity: Option<Arc<DeviceIdentity>>) -> Result<reqwest::Client> {
    let built_err = |why: String| AgentError::Fetch { url: String::new(), reason: format!("building HTTP client: {why}") };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| built_err(e.to_string()))?;
    let verifying = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in ca_certificates(path)? {
                roots.add(cert).map_err(|e| AgentError::Config { path: path.to_owned(), reason: format!("[http] ca_certificates: {e}") })?;
            }
            versions.with_root_certificates(roots)
        }
        None => match rustls_platform_verifier::Verifier::new(provider.clone()) {
            Ok(verifier) => versions.dangerous().with_custom_certificate_verifier(Arc::new(verifier)),
            Err(e) => {
                tracing::warn!(error = %e, "no CA certificates on this system and no [http] ca_certificates: no TLS server will be trusted");
                versions.with_root_certificates(rustls::RootCertStore::empty())
            }
        },
    };
    let client_auth = identity.is_some();
    let mut config = match identity {
        Some(identity) => {
            let sessions = identity.sessions();
            let mut config = verifying.with_client_cert_resolver(identity);
            config.resumption = rustls::client::Resumption::store(sessions);
            config
        }
        None => verifying.with_no_client_auth(),
    };
    // reqwest is built without HTTP/2 here: offer HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A device's identity changes when its certificate is renewed or dropped, and an
    // open connection keeps the identity of its handshake: no connection is kept for
    // reuse (a new one resumes its TLS session, which costs no TPM signature, and the
    // session cache is emptied whenever the certificate changes).
    let builder = if client_auth { builder.pool_max_idle_per_host(0) } else { builder };
    builder.tls_backend_preconfigured(config).build().map_err(|e| built_err(outpost_protocol::display_chain(&e)))
}

/// The certificates of `[http] ca_certificates`; a file with none is an error.
fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |why: String| AgentError::Config { path: path.to_owned(), reason: format!("[http] ca_certificates: {why}") };
    std::fs::metadata(path).map_err(|e| AgentError::io("read the CA certificates", path, e))?;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("not PEM certificates: {e:?}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file (PEM \"BEGIN CERTIFICATE\" blocks)".into()));
    }
    Ok(certs)
}
