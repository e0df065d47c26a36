//! EK certificates: with `[attestation] ek_ca_certificates` configured, a device must
//! enroll with an EK certificate that chains, signature by signature and within each
//! certificate's validity, to a self-signed CA in those files (TPM manufacturers' roots
//! and their intermediates), and that certifies exactly the EK it presents. Credential
//! activation proves the AK sits beside that EK; this proves the EK is a real TPM's.

use std::path::Path;

use outpost_protocol::attest::tpm::{PublicKey as TpmKey, TpmPublic};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

use crate::error::ServerError;

/// Trusted CA certificates (DER), loaded from PEM files at startup.
#[derive(Debug, Default, Clone)]
pub struct EkCaStore {
    certs: Vec<Vec<u8>>,
}

const MAX_DEPTH: usize = 6;

fn strip_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&x| x == 0).count();
    &b[n..]
}

impl EkCaStore {
    /// Loads every certificate of every PEM file; each must parse and be a CA.
    pub fn load(paths: &[std::path::PathBuf], config: &Path) -> Result<Self, ServerError> {
        let err = |reason: String| ServerError::Config { path: config.to_owned(), reason };
        let mut certs = Vec::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|e| err(format!("attestation.ek_ca_certificates: {}: {e}", path.display())))?;
            let mut found = 0;
            for pem in Pem::iter_from_buffer(&bytes) {
                let pem = pem.map_err(|e| err(format!("attestation.ek_ca_certificates: {}: not PEM: {e}", path.display())))?;
                let cert = pem
                    .parse_x509()
                    .map_err(|e| err(format!("attestation.ek_ca_certificates: {}: certificate {found}: {e}", path.display())))?;
                if !cert.is_ca() {
                    return Err(err(format!("attestation.ek_ca_certificates: {}: {} is not a CA certificate", path.display(), cert.subject())));
                }
                certs.push(pem.contents.clone());
                found += 1;
            }
            if found == 0 {
                return Err(err(format!("attestation.ek_ca_certificates: {} holds no certificate", path.display())));
            }
        }
        Ok(EkCaStore { certs })
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Checks `der` (the device's EK certificate) against the store and `ek`.
    pub fn verify(&self, der: &[u8], ek: &TpmPublic, now: ASN1Time) -> Result<(), String> {
        let (_, leaf) = X509Certificate::from_der(der).map_err(|e| format!("EK certificate does not parse: {e}"))?;
        // It must certify this EK.
        let TpmKey::Rsa { modulus, exponent, .. } = &ek.key else {
            return Err("EK certificate check needs the RSA EK".into());
        };
        match leaf.public_key().parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                let e = if *exponent == 0 { 65537u32 } else { *exponent };
                if strip_zeros(rsa.modulus) != strip_zeros(modulus) || strip_zeros(rsa.exponent) != strip_zeros(&e.to_be_bytes()) {
                    return Err("EK certificate certifies another key than the EK presented".into());
                }
            }
            Ok(_) => return Err("EK certificate does not hold an RSA key".into()),
            Err(e) => return Err(format!("EK certificate public key: {e}")),
        }
        let parsed: Vec<X509Certificate<'_>> = self.certs.iter().filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c)).collect();
        let mut cert = leaf;
        for _ in 0..MAX_DEPTH {
            if !cert.validity().is_valid_at(now) {
                return Err(format!("certificate {} is not valid now (valid {} to {})", cert.subject(), cert.validity().not_before, cert.validity().not_after));
            }
            let issuer = parsed
                .iter()
                .find(|ca| ca.subject() == cert.issuer() && cert.verify_signature(Some(ca.public_key())).is_ok())
                .ok_or_else(|| format!("certificate {} is not signed by a trusted EK CA (issuer {})", cert.subject(), cert.issuer()))?;
            if issuer.subject() == issuer.issuer() && issuer.verify_signature(None).is_ok() {
                if !issuer.validity().is_valid_at(now) {
                    return Err(format!("trusted root {} is not valid now", issuer.subject()));
                }
                return Ok(());
            }
            cert = issuer.clone();
        }
        Err(format!("EK certificate chain is longer than {MAX_DEPTH} certificates"))
    }
}
