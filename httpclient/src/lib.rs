//! The TLS side of Outpost's HTTP clients — the agent, the `outpost` CLI and the fleet
//! simulator — in one place, so that all three trust servers the same way:
//!
//! - only the CAs of a configured PEM file (the agent's `[http] ca_certificates`, the
//!   tools' `--ca-file`), when one is given;
//! - else the system's trust store, through rustls' platform verifier;
//! - else, on a system without one (many devices have no `ca-certificates`), no TLS
//!   server at all: plain `http://` still works and an `https://` server is refused
//!   with rustls' `UnknownIssuer`. [`Trust::without_roots`] says why, for a warning.
//!
//! A client may also present a certificate of its own from PEM files ([`Identity`]):
//! operator tooling behind a proxy or load balancer that requires one.
//!
//! rustls with ring throughout: reqwest's `rustls` feature brings a second crypto
//! provider into the build, so nothing here relies on a process-wide default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ConfigBuilder, RootCertStore};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file named by a setting (CA certificates, a client certificate or key) is
    /// missing, unreadable or holds nothing usable.
    #[error("{setting} {}: {reason}", path.display())]
    PemFile { setting: String, path: PathBuf, reason: String },
    #[error("building the HTTP client: {0}")]
    Build(String),
}

/// Whom a client trusts: a rustls configuration that still needs its client
/// authentication (none, or a certificate resolver).
pub struct Trust {
    pub config: ConfigBuilder<ClientConfig, WantsClientCert>,
    /// Set when no CA file was given and the system has no trust store: no TLS server
    /// will be trusted (the reason, for the caller to warn with).
    pub without_roots: Option<String>,
}

/// The trust of a client given `ca_file` by `setting` (named in errors: "--ca-file",
/// "[http] ca_certificates"), or the system's store when there is none.
pub fn trust(ca_file: Option<&Path>, setting: &str) -> Result<Trust, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Build(e.to_string()))?;
    Ok(match ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in pem_certificates(path, setting)? {
                roots.add(cert).map_err(|e| pem_error(setting, path, e.to_string()))?;
            }
            Trust { config: versions.with_root_certificates(roots), without_roots: None }
        }
        None => match rustls_platform_verifier::Verifier::new(provider) {
            Ok(verifier) => Trust { config: versions.dangerous().with_custom_certificate_verifier(Arc::new(verifier)), without_roots: None },
            Err(e) => Trust {
                config: versions.with_root_certificates(RootCertStore::empty()),
                without_roots: Some(format!("no CA certificates on this system and no {setting}: {e}")),
            },
        },
    })
}

/// A client certificate chain and its private key, from PEM files.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The chain in `certificate` (leaf first) and the key in `key` (PKCS#8, SEC1 or
    /// PKCS#1), each with the setting that named it (for errors).
    pub fn load(certificate: (&Path, &str), key: (&Path, &str)) -> Result<Identity, Error> {
        let ((cert_path, cert_setting), (key_path, key_setting)) = (certificate, key);
        let chain = pem_certificates(cert_path, cert_setting)?;
        let pem = std::fs::read(key_path).map_err(|e| pem_error(key_setting, key_path, format!("cannot read: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| pem_error(key_setting, key_path, format!("no PEM private key in the file: {e:?}")))?;
        Ok(Identity { chain, key })
    }
}

/// A client from `builder` with the trust of [`trust`], presenting `identity` when
/// given; the reason there are no roots, if so, is dropped (an `https://` server is
/// then refused by name).
pub fn client(builder: reqwest::ClientBuilder, ca_file: Option<&Path>, setting: &str, identity: Option<Identity>) -> Result<reqwest::Client, Error> {
    let trust = trust(ca_file, setting)?.config;
    let config = match identity {
        None => trust.with_no_client_auth(),
        Some(Identity { chain, key }) => {
            trust.with_client_auth_cert(chain, key).map_err(|e| Error::Build(format!("the client certificate and key: {e}")))?
        }
    };
    build(builder, config)
}

/// The client from `builder` on the finished rustls `config`.
pub fn build(builder: reqwest::ClientBuilder, mut config: ClientConfig) -> Result<reqwest::Client, Error> {
    // reqwest is built without HTTP/2 in this workspace: offer HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    builder.tls_backend_preconfigured(config).build().map_err(|e| Error::Build(outpost_protocol::display_chain(&e)))
}

fn pem_error(setting: &str, path: &Path, reason: String) -> Error {
    Error::PemFile { setting: setting.to_owned(), path: path.to_owned(), reason }
}

/// The certificates of a PEM file; a file with none is an error.
fn pem_certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = std::fs::read(path).map_err(|e| pem_error(setting, path, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(setting, path, format!("not PEM certificates: {e:?}")))?;
    if certs.is_empty() {
        return Err(pem_error(setting, path, "no certificate in the file (PEM \"BEGIN CERTIFICATE\" blocks)".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_file_of_certificates_makes_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca_pem() + &ca_pem()).unwrap();
        let trust = trust(Some(&path), "--ca-file").unwrap();
        assert!(trust.without_roots.is_none());
        client(reqwest::Client::builder(), Some(&path), "--ca-file", None).unwrap();
    }

    #[test]
    fn a_bad_ca_file_is_named_with_its_setting_and_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = trust(Some(&missing), "--ca-file").err().unwrap().to_string();
        assert!(e.starts_with(&format!("--ca-file {}: cannot read", missing.display())), "{e}");

        // A private key is PEM, but not a certificate; nothing at all neither.
        let key = dir.path().join("key.pem");
        std::fs::write(&key, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"").unwrap();
        for path in [&key, &empty] {
            let e = trust(Some(path), "[http] ca_certificates").err().unwrap().to_string();
            assert!(e.starts_with(&format!("[http] ca_certificates {}: no certificate in the file", path.display())), "{e}");
        }

        // A block that says CERTIFICATE but is not base64 of one.
        let garbled = dir.path().join("garbled.pem");
        std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap();
        let e = trust(Some(&garbled), "--ca-file").err().unwrap().to_string();
        assert!(e.contains("garbled.pem") && e.contains("not PEM certificates"), "{e}");
    }

    #[test]
    fn a_client_identity_needs_a_certificate_and_its_key_and_names_the_file_that_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["operator".to_owned()]).unwrap().self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.path().join("op.pem"), dir.path().join("op.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let id = Identity::load((&cert_file, "--client-certificate"), (&key_file, "--client-key")).unwrap();
        client(reqwest::Client::builder(), None, "--ca-file", Some(id)).unwrap();

        let e = Identity::load((&cert_file, "--client-certificate"), (&cert_file, "--client-key")).err().unwrap().to_string();
        assert!(e.starts_with(&format!("--client-key {}: no PEM private key", cert_file.display())), "{e}");
        let e = Identity::load((&key_file, "--client-certificate"), (&key_file, "--client-key")).err().unwrap().to_string();
        assert!(e.starts_with(&format!("--client-certificate {}: no certificate", key_file.display())), "{e}");
    }
}
