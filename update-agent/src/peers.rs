//! Offline checks of peers' device certificates. While online, the agent keeps the
//! device CA's signed revocation list in its state directory (`device-ca.crl`, fetched
//! from `GET /api/v1/device-ca/crl` at each attested check-in, and kept only when its
//! signature verifies under the device CA and it is not older than the list already
//! cached: a replayed older list would un-revoke what was revoked since). With no
//! server, `outpost-agent peer check --certificate FILE` then tells whether another
//! device's client certificate is one the device CA issued, unexpired, for client
//! authentication, and not revoked as of the cached list — and which device it names.
//!
//! The device CA is the one in the agent's own certificate (`client-certificate.json`),
//! so a device that never had a certificate checks no peers.

use std::path::{Path, PathBuf};

use outpost_protocol::attest::tlskey::{self, DeviceCertificate};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::error::{AgentError, Result};
use crate::fetch::Fetcher;

/// The cached list, in the state directory.
pub const CRL_FILE: &str = "device-ca.crl";
/// The agent's certificate (written by [`crate::devicecert`]).
const CERT_FILE: &str = "client-certificate.json";
/// A revocation list larger than this is refused.
const CRL_LIMIT: u64 = 4 << 20;

/// What `peer check` found.
#[derive(Debug, Serialize)]
pub struct PeerVerdict {
    pub trusted: bool,
    /// Why not, when not trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub serial: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The cached list's thisUpdate and nextUpdate (RFC 3339), and whether it is past
    /// its nextUpdate (revocations since then are unknown here).
    pub revocation_list: Option<ListTimes>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListTimes {
    /// The list's CRL number (decimal), when it carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    pub this_update: String,
    pub next_update: Option<String>,
    pub stale: bool,
}

/// A list that verified under the device CA: where it stands in the CA's sequence of
/// lists (its CRL number, then its thisUpdate) and until when it holds (Unix seconds).
struct VerifiedList {
    number: Option<BigUint>,
    this_update: i64,
    next_update: Option<i64>,
}

impl VerifiedList {
    /// Whether it comes before `other` in the CA's sequence: a smaller CRL number, or
    /// without numbers on both, an earlier thisUpdate.
    fn older_than(&self, other: &VerifiedList) -> bool {
        match (&self.number, &other.number) {
            (Some(mine), Some(theirs)) => mine < theirs,
            _ => self.this_update < other.this_update,
        }
    }

    fn times(&self, now: i64) -> ListTimes {
        ListTimes {
            number: self.number.as_ref().map(ToString::to_string),
            this_update: rfc3339(self.this_update),
            next_update: self.next_update.map(rfc3339),
            stale: self.next_update.is_some_and(|n| n < now),
        }
    }
}

/// The device CA (DER) and trust domain of the agent's own certificate.
fn own_ca(state_dir: &Path) -> Result<(CertificateDer<'static>, String)> {
    let path = state_dir.join(CERT_FILE);
    let bytes = std::fs::read(&path).map_err(|e| AgentError::io("read the device certificate (none: this device checks no peers)", &path, e))?;
    let cert: DeviceCertificate = serde_json::from_slice(&bytes).map_err(|e| AgentError::Corrupt { path: path.clone(), reason: e.to_string() })?;
    let ca = CertificateDer::from_pem_slice(cert.ca_certificate.as_bytes())
        .map_err(|e| AgentError::Corrupt { path: path.clone(), reason: format!("ca_certificate: {e:?}") })?;
    let domain = cert.spiffe_id.strip_prefix("spiffe://").and_then(|r| r.split('/').next()).unwrap_or_default().to_owned();
    Ok((ca, domain))
}

/// Checks that `der` is a revocation list the CA `ca` signed; its number and times.
fn verify_list(ca: &CertificateDer<'_>, der: &[u8]) -> std::result::Result<VerifiedList, String> {
    let (_, ca) = X509Certificate::from_der(ca.as_ref()).map_err(|e| format!("the device CA certificate: {e}"))?;
    let (rest, crl) = CertificateRevocationList::from_der(der).map_err(|e| format!("not a DER revocation list: {e}"))?;
    if !rest.is_empty() {
        return Err("bytes after the revocation list".into());
    }
    if crl.issuer() != ca.subject() {
        return Err(format!("issued by {}, not the device CA {}", crl.issuer(), ca.subject()));
    }
    crl.verify_signature(ca.public_key()).map_err(|e| format!("its signature does not verify under the device CA: {e}"))?;
    Ok(VerifiedList {
        number: crl.crl_number().cloned(),
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().map(|t| t.timestamp()),
    })
}

/// Whether the fetched list `new` may replace the `cached` one: it must verify under
/// the device CA, and must not be older than a cached list of the same CA (a larger
/// CRL number wins; without numbers on both, the later thisUpdate). A cached list the
/// CA does not verify (the CA was rotated, the file was damaged) is simply replaced.
fn accept_list(ca: &CertificateDer<'_>, cached: Option<&[u8]>, new: &[u8], now: i64) -> std::result::Result<ListTimes, String> {
    let fresh = verify_list(ca, new)?;
    let Some(old) = cached.and_then(|old| verify_list(ca, old).ok()) else { return Ok(fresh.times(now)) };
    if fresh.older_than(&old) {
        let (fresh, old) = (fresh.times(now), old.times(now));
        return Err(format!(
            "older (number {}, thisUpdate {}) than the one cached (number {}, thisUpdate {}): \
             an older list would un-revoke certificates revoked since, so the cached one stays",
            fresh.number.as_deref().unwrap_or("none"),
            fresh.this_update,
            old.number.as_deref().unwrap_or("none"),
            old.this_update
        ));
    }
    Ok(fresh.times(now))
}

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map(|t| t.to_rfc3339()).unwrap_or_default()
}

/// Fetches the device CA's revocation list (at each attested check-in of a device
/// with a certificate: a small signed file) and keeps it if it verifies; a list that
/// does not is refused with the reason and the cached one stays.
pub async fn refresh(fetcher: &Fetcher, server_url: &str, state_dir: &Path) -> Result<()> {
    let Ok((ca, _)) = own_ca(state_dir) else { return Ok(()) };
    let now = chrono::Utc::now().timestamp();
    let url = format!("{server_url}/api/v1/device-ca/crl");
    let der = fetcher.fetch_bytes(&url, CRL_LIMIT).await?;
    let path = state_dir.join(CRL_FILE);
    let cached = match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(AgentError::io("read the cached revocation list", &path, e)),
    };
    let times = accept_list(&ca, cached.as_deref(), &der, now)
        .map_err(|reason| AgentError::Fetch { url: url.clone(), reason: format!("revocation list refused: {reason}") })?;
    outpost_fsio::write_atomic(&path, &der).map_err(|e| AgentError::io("write", &path, e))?;
    tracing::info!(number = ?times.number, this_update = %times.this_update, next_update = ?times.next_update, "device CA revocation list cached");
    Ok(())
}

/// Checks the peer certificate in `pem` against the device CA and the cached list,
/// with no server.
pub fn check(state_dir: &Path, pem: &Path) -> Result<PeerVerdict> {
    let (ca, domain) = own_ca(state_dir)?;
    let bad = |reason: String| AgentError::Corrupt { path: pem.to_owned(), reason };
    let peer = CertificateDer::from_pem_file(pem).map_err(|e| bad(format!("no PEM certificate: {e:?}")))?;
    let (_, parsed) = X509Certificate::from_der(peer.as_ref()).map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let serial = hex::encode(parsed.raw_serial());
    let spiffe_id = spiffe_uri(&parsed);
    let device_id = spiffe_id.as_deref().and_then(|u| tlskey::device_of_spiffe_id(&domain, u)).map(str::to_owned);
    let crl_path: PathBuf = state_dir.join(CRL_FILE);
    let now = chrono::Utc::now().timestamp();
    let list = std::fs::read(&crl_path).map_err(|e| AgentError::io("read the cached revocation list (fetched while online)", &crl_path, e))?;
    let times = verify_list(&ca, &list).map_err(|reason| AgentError::Corrupt { path: crl_path.clone(), reason })?.times(now);
    let verdict = verify_peer(&ca, &peer, &list).err().or_else(|| device_id.is_none().then(|| format!("names no device of trust domain {domain}")));
    Ok(PeerVerdict { trusted: verdict.is_none(), reason: verdict, serial, spiffe_id, device_id, revocation_list: Some(times) })
}

/// The chain (device CA → peer), validity now, client authentication, and the list.
fn verify_peer(ca: &CertificateDer<'_>, peer: &CertificateDer<'_>, list: &[u8]) -> std::result::Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("the device CA: {e}"))?;
    let end = webpki::EndEntityCert::try_from(peer).map_err(|e| format!("the certificate: {e}"))?;
    let crl = webpki::CertRevocationList::from(webpki::OwnedCertRevocationList::from_der(list).map_err(|e| format!("the revocation list: {e}"))?);
    let crls = [&crl];
    let revocation = webpki::RevocationOptionsBuilder::new(&crls)
        .map_err(|e| format!("{e:?}"))?
        .with_depth(webpki::RevocationCheckDepth::EndEntity)
        .with_status_policy(webpki::UnknownStatusPolicy::Deny)
        // A list past its nextUpdate still says what it says: the verdict reports it as stale.
        .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
        .build();
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    end.verify_for_usage(algorithms, &[anchor], &[], UnixTime::now(), webpki::KeyUsage::client_auth(), Some(revocation), None)
        .map(|_| ())
        .map_err(|e| match e {
            webpki::Error::CertRevoked => "revoked (the device CA's revocation list names its serial)".to_owned(),
            other => format!("{other}"),
        })
}

/// The certificate's first URI subject alternative name.
fn spiffe_uri(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber,
    };

    /// A device CA named `name` with a fresh key: its certificate (DER) and issuer.
    fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.key_identifier_method = KeyIdMethod::PreSpecified(vec![7; 20]);
        let cert = p.self_signed(&key).unwrap();
        (cert.der().clone(), Issuer::new(p, key))
    }

    /// A list signed by `issuer` with CRL number `number`, issued `age` seconds ago.
    fn list(issuer: &Issuer<'static, KeyPair>, number: u64, age: i64) -> Vec<u8> {
        let at = ::time::OffsetDateTime::now_utc() - ::time::Duration::seconds(age);
        let params = CertificateRevocationListParams {
            this_update: at,
            next_update: at + ::time::Duration::hours(1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: KeyIdMethod::PreSpecified(vec![7; 20]),
        };
        params.signed_by(issuer).unwrap().der().to_vec()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn lists_the_device_ca_did_not_sign_are_refused() {
        let (real, _) = ca("Outpost device CA for fleet.example");
        // Another key under the device CA's exact name (the signature gives it away),
        // and another CA (its name does).
        for (signer, says) in [("Outpost device CA for fleet.example", "signature does not verify under the device CA"), ("Someone else's CA", "not the device CA")] {
            let (_, forger) = ca(signer);
            let e = accept_list(&real, None, &list(&forger, 5, 0), now()).unwrap_err();
            assert!(e.contains(says), "{signer}: {e}");
        }
    }

    #[test]
    fn an_older_list_does_not_replace_a_newer_one() {
        // The replay: a list from before a revocation, validly signed, served again.
        let (der, issuer) = ca("Outpost device CA for fleet.example");
        let newer = list(&issuer, 20, 0);
        let older = list(&issuer, 10, 600);
        let e = accept_list(&der, Some(&newer), &older, now()).unwrap_err();
        assert!(e.contains("older (number 10") && e.contains("than the one cached (number 20"), "{e}");
        // A smaller number is older even with a later thisUpdate (a CA's clock set back).
        let e = accept_list(&der, Some(&newer), &list(&issuer, 19, -60), now()).unwrap_err();
        assert!(e.contains("older (number 19"), "{e}");
    }

    #[test]
    fn newer_and_identical_lists_are_accepted() {
        let (der, issuer) = ca("Outpost device CA for fleet.example");
        let cached = list(&issuer, 10, 600);
        let times = accept_list(&der, Some(&cached), &list(&issuer, 11, 0), now()).unwrap();
        assert_eq!(times.number.as_deref(), Some("11"));
        assert!(!times.stale);
        accept_list(&der, Some(&cached), &cached, now()).expect("the same list again");
    }

    #[test]
    fn a_cached_list_of_a_rotated_ca_or_a_damaged_one_is_replaced() {
        let (_, old_issuer) = ca("Outpost device CA for fleet.example (old)");
        let (der, issuer) = ca("Outpost device CA for fleet.example");
        let from_old_ca = list(&old_issuer, 99, 0);
        accept_list(&der, Some(&from_old_ca), &list(&issuer, 1, 0), now()).expect("the old CA's list says nothing about the new CA's");
        accept_list(&der, Some(b"not a list"), &list(&issuer, 1, 0), now()).expect("a damaged cache is replaced");
    }

    #[test]
    fn a_list_past_its_next_update_is_marked_stale() {
        let (der, issuer) = ca("Outpost device CA for fleet.example");
        let times = accept_list(&der, None, &list(&issuer, 3, 7200), now()).unwrap();
        assert!(times.stale, "{times:?}");
    }
}
