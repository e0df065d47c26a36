//! Which TLS servers the agent's HTTP clients trust: only the CAs of `[http]
//! ca_certificates`, or else the system's trust store (rustls' platform verifier). A
//! system without one (no `ca-certificates` package, as on many devices) trusts no
//! TLS server at all, says so, and still speaks plain `http://`.

use std::path::Path;

use crate::error::{AgentError, Result};

/// A client from `builder` (called again for a fallback) that trusts `ca_file`'s CAs,
/// or the system's store.
pub fn client(builder: impl Fn() -> reqwest::ClientBuilder, ca_file: Option<&Path>) -> Result<reqwest::Client> {
    let built = match ca_file {
        Some(path) => builder().tls_certs_only(ca_certificates(path)?).build(),
        None => builder().build().or_else(|e| {
            tracing::warn!(
                error = %outpost_protocol::display_chain(&e),
                "no CA certificates on this system and no [http] ca_certificates: no TLS server will be trusted"
            );
            builder().tls_certs_only(Vec::new()).build()
        }),
    };
    built.map_err(|e| AgentError::Fetch { url: String::new(), reason: format!("building HTTP client: {}", outpost_protocol::display_chain(&e)) })
}

/// The certificates of `[http] ca_certificates`; a file with none is an error.
fn ca_certificates(path: &Path) -> Result<Vec<reqwest::Certificate>> {
    let bad = |why: String| AgentError::Config { path: path.to_owned(), reason: format!("[http] ca_certificates: {why}") };
    let pem = std::fs::read(path).map_err(|e| AgentError::io("read the CA certificates", path, e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file (PEM \"BEGIN CERTIFICATE\" blocks)".into()));
    }
    Ok(certs)
}
