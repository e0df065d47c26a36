//! The agent's TLS client configuration: which servers it trusts, as every Outpost
//! client does (`outpost_httpclient`: the CAs of `[http] ca_certificates`, else the
//! system's trust store, else none, with a warning) — and, for a device with a TPM,
//! the client certificate it presents ([`crate::devicecert`]: a TPM-resident key,
//! renewed by check-ins).

use std::path::Path;
use std::sync::Arc;

use crate::devicecert::DeviceIdentity;
use crate::error::{AgentError, Result};

/// A client from `builder` that trusts `ca_file`'s CAs, or the system's store, and
/// presents `identity`'s certificate when it has one.
pub fn client(builder: reqwest::ClientBuilder, ca_file: Option<&Path>, identity: Option<Arc<DeviceIdentity>>) -> Result<reqwest::Client> {
    let trust = outpost_httpclient::trust(ca_file, "[http] ca_certificates").map_err(error)?;
    if let Some(why) = &trust.without_roots {
        tracing::warn!(reason = %why, "no TLS server will be trusted");
    }
    let client_auth = identity.is_some();
    let config = match identity {
        Some(identity) => {
            let sessions = identity.sessions();
            let mut config = trust.config.with_client_cert_resolver(identity);
            config.resumption = rustls::client::Resumption::store(sessions);
            config
        }
        None => trust.config.with_no_client_auth(),
    };
    // A device's identity changes when its certificate is renewed or dropped, and an
    // open connection keeps the identity of its handshake: no connection is kept for
    // reuse (a new one resumes its TLS session, which costs no TPM signature, and the
    // session cache is emptied whenever the certificate changes).
    let builder = if client_auth { builder.pool_max_idle_per_host(0) } else { builder };
    outpost_httpclient::build(builder, config).map_err(error)
}

fn error(e: outpost_httpclient::Error) -> AgentError {
    match e {
        outpost_httpclient::Error::PemFile { setting, path, reason } => AgentError::Config { path, reason: format!("{setting}: {reason}") },
        other => AgentError::Fetch { url: String::new(), reason: other.to_string() },
    }
}
