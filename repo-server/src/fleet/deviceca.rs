//! The device CA: short-lived client certificates for keys that live in devices' TPMs,
//! issued only in the answer to an attested check-in (see `checkin`), and the list of
//! certificates it revoked.
//!
//! The CA's key and certificate are provisioned like the director key: made once
//! (`outpost-server device-ca init`, or any CA tool: a P-256 key, PKCS#8), kept out of
//! the repository, and named in `[device_ca]`. Rotation: make a new pair, name the old
//! certificate in `previous_certificates` (still trusted for the certificates it issued,
//! which expire within one lifetime), restart. The server never makes a CA key itself.

use std::path::PathBuf;
use std::time::Duration;

use outpost_protocol::attest::tlskey::{self, DeviceCertificate};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, RevokedCertParams, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::*;

use super::rfc3339;
use crate::error::ServerError;
use crate::storage::certificates::Revoked;

/// The shortest lifetime a production configuration may give certificates.
pub const MIN_LIFETIME: Duration = Duration::from_secs(300);
/// The longest.
pub const MAX_LIFETIME: Duration = Duration::from_secs(86400);

/// `[device_ca]` of server.toml, paths resolved.
#[derive(Debug, Clone)]
pub struct DeviceCaSettings {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// Earlier CA certificates still trusted for client certificates (rotation).
    pub previous_certificates: Vec<PathBuf>,
    /// `spiffe://<trust_domain>/device/<id>`.
    pub trust_domain: String,
    pub lifetime: Duration,
    /// Device routes refuse a caller without this device's certificate (but for the
    /// AK-signed nonce and a check-in that asks for a certificate).
    pub require_client_certificate: bool,
    /// The repository's target files too are served only to devices with a
    /// certificate (or callers with an API token); metadata stays public.
    pub targets_require_client_certificate: bool,
}

/// Who presented a client certificate on a connection, as the handshake verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The device its SPIFFE ID names, or None for a certificate of this CA naming none.
    pub device_id: Option<String>,
    pub spiffe_id: Option<String>,
    /// Lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// The device CA, loaded.
pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    /// How the CA's key identifier is made (its certificate's, when it has one).
    key_id: KeyIdMethod,
    ca_pem: String,
    /// The current CA certificate first, then the previous ones.
    roots: Vec<CertificateDer<'static>>,
    /// When the current CA certificate expires (Unix seconds): no certificate it issues
    /// outlives it, and every one it issued stops chaining then.
    ca_not_after: i64,
    pub settings: DeviceCaSettings,
}

/// A device CA certificate that expires sooner than this is warned of at start.
const CA_EXPIRY_WARNING: chrono::Duration = chrono::Duration::days(30);

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa").field("settings", &self.settings).field("key", &"<redacted>").finish()
    }
}

fn ca_err(reason: String) -> ServerError {
    ServerError::Tls(format!("device CA: {reason}"))
}

/// The P-256 point of a device's TPM-resident key, for rcgen.
struct DevicePoint(Vec<u8>);

impl PublicKeyData for DevicePoint {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A certificate just issued, and what the store keeps of it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub answer: DeviceCertificate,
    pub not_after: i64,
}

impl DeviceCa {
    /// Reads the CA's certificate and key and checks that they make a CA that can
    /// issue: the key is the certificate's, the certificate is a CA that may sign
    /// certificates and revocation lists, and its subject can be written again as it is.
    pub fn load(settings: &DeviceCaSettings) -> Result<Self, ServerError> {
        let read = |p: &PathBuf, what: &str| std::fs::read_to_string(p).map_err(|e| ca_err(format!("{what} {}: cannot read: {e}", p.display())));
        let ca_file = read(&settings.certificate, "device_ca.certificate")?;
        let ca_der = CertificateDer::from_pem_slice(ca_file.as_bytes())
            .map_err(|e| ca_err(format!("device_ca.certificate {}: no PEM certificate: {e:?}", settings.certificate.display())))?;
        let key = KeyPair::from_pem(&read(&settings.key, "device_ca.key")?)
            .map_err(|e| ca_err(format!("device_ca.key {}: not a PKCS#8 P-256 private key in PEM: {e}", settings.key.display())))?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(ca_err(format!("device_ca.key {}: not a P-256 key (Outpost's device CA signs with ECDSA P-256)", settings.key.display())));
        }
        let (issuer, key_id, ca_not_after) =
            issuer_for(&ca_der, key).map_err(|r| ca_err(format!("device_ca.certificate {}: {r}", settings.certificate.display())))?;
        let now = chrono::Utc::now();
        let expires = rfc3339(ca_not_after);
        if ca_not_after <= now.timestamp() {
            return Err(ca_err(format!(
                "device_ca.certificate {}: expired at {expires}; no device certificate chains to it any more (make a new CA with `outpost-server device-ca init` and name it in [device_ca])",
                settings.certificate.display()
            )));
        }
        if ca_not_after <= (now + CA_EXPIRY_WARNING).timestamp() {
            tracing::warn!(certificate = %settings.certificate.display(), expires = %expires, "the device CA's certificate expires within 30 days: rotate it before then, or every device certificate stops chaining");
        }
        let mut roots = vec![ca_der.clone()];
        for p in &settings.previous_certificates {
            let pem = read(p, "device_ca.previous_certificates")?;
            roots.push(
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| ca_err(format!("device_ca.previous_certificates {}: no PEM certificate: {e:?}", p.display())))?,
            );
        }
        // What devices are sent is the certificate alone, written again from its DER
        // (never the file's text: a file holding the key too must not reach them).
        let ca = DeviceCa { issuer, key_id, ca_pem: pem_certificate(&ca_der), roots, ca_not_after, settings: settings.clone() };
        // Issue one for the CA's own key and check it chains: the key is the
        // certificate's and the issuer name is written as the CA's subject.
        let point = ca.issuer_point();
        let probe = ca.issue("probe", &point, chrono::Utc::now())?;
        let leaf_der = CertificateDer::from_pem_slice(probe.answer.certificate.as_bytes()).map_err(|e| ca_err(format!("probe certificate: {e:?}")))?;
        check_issued_by(&leaf_der, &ca_der).map_err(|r| ca_err(format!("device_ca.key {} and certificate {}: {r}", settings.key.display(), settings.certificate.display())))?;
        Ok(ca)
    }

    fn issuer_point(&self) -> Vec<u8> {
        self.issuer.key().der_bytes().to_vec()
    }

    /// When the current CA certificate expires (Unix seconds).
    pub fn ca_not_after(&self) -> i64 {
        self.ca_not_after
    }

    /// The CA certificates client certificates may chain to (current first).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// A client certificate for `device_id`'s key (an uncompressed P-256 point the
    /// caller has checked is TPM-resident), valid from a minute ago for the lifetime,
    /// or until the CA certificate expires when that is sooner (a certificate that
    /// outlives its CA's would not chain for its last part).
    pub fn issue(&self, device_id: &str, point: &[u8], now: chrono::DateTime<chrono::Utc>) -> Result<Issued, ServerError> {
        let spiffe_id = tlskey::spiffe_id(&self.settings.trust_domain, device_id);
        let not_before = now - chrono::Duration::seconds(60);
        if self.ca_not_after <= now.timestamp() {
            return Err(ca_err(format!("its certificate expired at {}: no certificate issued (rotate the device CA)", rfc3339(self.ca_not_after))));
        }
        let full = now + chrono::Duration::from_std(self.settings.lifetime).map_err(|e| ca_err(format!("lifetime: {e}")))?;
        let not_after = chrono::DateTime::from_timestamp(self.ca_not_after, 0).map_or(full, |ca_end| full.min(ca_end));
        let mut serial = outpost_protocol::attest::credential::random_bytes::<16>();
        serial[0] &= 0x7f; // a positive INTEGER of 16 bytes
        serial[0] |= 0x01;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, device_id);
        p.subject_alt_names = vec![SanType::URI(spiffe_id.clone().try_into().map_err(|e| ca_err(format!("SPIFFE ID {spiffe_id:?}: {e}")))?)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.is_ca = IsCa::ExplicitNoCa;
        p.use_authority_key_identifier_extension = true;
        p.not_before = to_time(not_before)?;
        p.not_after = to_time(not_after)?;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = p.signed_by(&DevicePoint(point.to_vec()), &self.issuer).map_err(|e| ca_err(format!("issuing for {device_id}: {e}")))?;
        Ok(Issued {
            answer: DeviceCertificate {
                certificate: cert.pem(),
                ca_certificate: self.ca_pem.clone(),
                serial: hex::encode(serial),
                spiffe_id,
                not_before: not_before.to_rfc3339(),
                not_after: not_after.to_rfc3339(),
            },
            not_after: not_after.timestamp(),
        })
    }

    /// The signed revocation list (DER) naming `revoked`, valid until `next_update`.
    pub fn crl(&self, revoked: &[Revoked], number: u64, now: chrono::DateTime<chrono::Utc>, next_update: chrono::DateTime<chrono::Utc>) -> Result<Vec<u8>, ServerError> {
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let serial = hex::decode(&r.serial).map_err(|e| ca_err(format!("stored serial {:?}: {e}", r.serial)))?;
                let at = chrono::DateTime::from_timestamp(r.revoked_at, 0).unwrap_or(now);
                Ok(RevokedCertParams { serial_number: SerialNumber::from_slice(&serial), revocation_time: to_time(at)?, reason_code: None, invalidity_date: None })
            })
            .collect::<Result<Vec<_>, ServerError>>()?;
        let params = CertificateRevocationListParams {
            this_update: to_time(now)?,
            next_update: to_time(next_update)?,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id.clone(),
        };
        let crl = params.signed_by(&self.issuer).map_err(|e| ca_err(format!("signing the revocation list: {e}")))?;
        Ok(crl.der().to_vec())
    }

    /// What a verified client certificate says about its holder.
    pub fn identify(&self, leaf: &CertificateDer<'_>) -> Option<ClientIdentity> {
        identify(&self.settings.trust_domain, leaf)
    }
}

/// What a client certificate (already verified by the handshake) says: its serial,
/// expiry, and the device its SPIFFE ID names in `trust_domain`.
pub fn identify(trust_domain: &str, leaf: &CertificateDer<'_>) -> Option<ClientIdentity> {
    let (_, cert) = parse_x509_certificate(leaf.as_ref()).ok()?;
    let spiffe_id = cert.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        })
    });
    let device_id = spiffe_id.as_deref().and_then(|u| tlskey::device_of_spiffe_id(trust_domain, u)).map(str::to_owned);
    Some(ClientIdentity { device_id, spiffe_id, serial: hex::encode(cert.raw_serial()), not_after: cert.validity().not_after.timestamp() })
}

fn to_time(t: chrono::DateTime<chrono::Utc>) -> Result<::time::OffsetDateTime, ServerError> {
    ::time::OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| ca_err(format!("time {t}: {e}")))
}

/// An rcgen issuer with the CA certificate's subject (each attribute in the string type
/// it has there), key usages and subject key identifier; and the certificate's notAfter
/// (Unix seconds).
fn issuer_for(ca_der: &CertificateDer<'_>, key: KeyPair) -> Result<(Issuer<'static, KeyPair>, KeyIdMethod, i64), String> {
    let (_, ca) = parse_x509_certificate(ca_der.as_ref()).map_err(|e| format!("does not parse: {e}"))?;
    match ca.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => return Err("is not a CA certificate (basicConstraints CA:TRUE)".into()),
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for rdn in ca.subject().iter() {
        for attr in rdn.iter() {
            let oid = attr.attr_type();
            let kind = match oid.to_id_string().as_str() {
                "2.5.4.3" => DnType::CommonName,
                "2.5.4.10" => DnType::OrganizationName,
                "2.5.4.11" => DnType::OrganizationalUnitName,
                "2.5.4.6" => DnType::CountryName,
                "2.5.4.7" => DnType::LocalityName,
                "2.5.4.8" => DnType::StateOrProvinceName,
                other => return Err(format!("subject attribute {other} is not one Outpost writes (CN, O, OU, C, L, ST)")),
            };
            let text = attr.as_str().map_err(|e| format!("subject attribute {}: {e}", oid.to_id_string()))?.to_owned();
            let value = match attr.attr_value().header.tag() {
                x509_parser::der_parser::asn1_rs::Tag::PrintableString => {
                    DnValue::PrintableString(text.as_str().try_into().map_err(|e| format!("subject {text:?}: {e}"))?)
                }
                x509_parser::der_parser::asn1_rs::Tag::Utf8String => DnValue::Utf8String(text),
                t => return Err(format!("subject attribute {} is a {t:?}; Outpost writes UTF8String and PrintableString", oid.to_id_string())),
            };
            params.distinguished_name.push(kind, value);
        }
    }
    params.key_usages = match ca.key_usage() {
        Ok(Some(ku)) => {
            if !ku.value.key_cert_sign() || !ku.value.crl_sign() {
                return Err("key usage lacks keyCertSign or cRLSign (the device CA signs certificates and revocation lists)".into());
            }
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
        }
        _ => Vec::new(),
    };
    if let Ok(Some(ski)) = ca.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER) {
        if let ParsedExtension::SubjectKeyIdentifier(id) = ski.parsed_extension() {
            params.key_identifier_method = KeyIdMethod::PreSpecified(id.0.to_vec());
        }
    }
    let key_id = params.key_identifier_method.clone();
    Ok((Issuer::new(params, key), key_id, ca.validity().not_after.timestamp()))
}

/// A certificate as PEM.
fn pem_certificate(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Checks that `leaf` names `ca`'s subject as its issuer, byte for byte, and that its
/// signature verifies with `ca`'s key.
fn check_issued_by(leaf: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> Result<(), String> {
    let (_, leaf) = parse_x509_certificate(leaf.as_ref()).map_err(|e| format!("issued certificate does not parse: {e}"))?;
    let (_, ca) = parse_x509_certificate(ca.as_ref()).map_err(|e| format!("does not parse: {e}"))?;
    if leaf.issuer().as_raw() != ca.subject().as_raw() {
        return Err("the CA's subject cannot be written again as it is in the certificate".into());
    }
    leaf.verify_signature(Some(ca.public_key())).map_err(|_| "the key is not the certificate's (a certificate it signs does not verify with the CA certificate)".to_string())
}

/// Makes a new device CA: a P-256 key and a self-signed CA certificate for
/// `trust_domain`, valid for `validity`. Returns (certificate PEM, key PEM).
pub fn make_ca(trust_domain: &str, validity: Duration, now: chrono::DateTime<chrono::Utc>) -> Result<(String, String), ServerError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| ca_err(format!("making a key: {e}")))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "Outpost");
    p.distinguished_name.push(DnType::CommonName, format!("Outpost device CA for {trust_domain}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = to_time(now - chrono::Duration::seconds(60))?;
    p.not_after = to_time(now + chrono::Duration::from_std(validity).map_err(|e| ca_err(format!("validity: {e}")))?)?;
    let mut serial = outpost_protocol::attest::credential::random_bytes::<16>();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = p.self_signed(&key).map_err(|e| ca_err(format!("self-signing: {e}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_in(dir: &std::path::Path, lifetime: Duration) -> DeviceCa {
        ca_valid_for(dir, lifetime, Duration::from_secs(86400), chrono::Utc::now()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A CA made at `made` valid for `validity`, issuing for `lifetime`.
    fn ca_valid_for(dir: &std::path::Path, lifetime: Duration, validity: Duration, made: chrono::DateTime<chrono::Utc>) -> Result<DeviceCa, ServerError> {
        let (cert, key) = make_ca("fleet.test", validity, made).unwrap();
        std::fs::write(dir.join("ca.pem"), cert).unwrap();
        std::fs::write(dir.join("ca.key"), key).unwrap();
        DeviceCa::load(&DeviceCaSettings {
            certificate: dir.join("ca.pem"),
            key: dir.join("ca.key"),
            previous_certificates: Vec::new(),
            trust_domain: "fleet.test".into(),
            lifetime,
            require_client_certificate: true,
            targets_require_client_certificate: false,
        })
    }

    #[test]
    fn no_certificate_outlives_the_ca_and_an_expired_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // The CA has 10 minutes left; certificates would get an hour.
        let ca = ca_valid_for(dir.path(), Duration::from_secs(3600), Duration::from_secs(600), chrono::Utc::now()).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let now = chrono::Utc::now();
        let issued = ca.issue("dev-1", key.der_bytes(), now).unwrap();
        assert_eq!(issued.not_after, ca.ca_not_after());
        assert!(issued.not_after <= now.timestamp() + 600, "{} vs {}", issued.not_after, now.timestamp());
        // Past the CA's end the server issues nothing.
        let e = ca.issue("dev-1", key.der_bytes(), now + chrono::Duration::seconds(700)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("expired at"), "{e}");
        // And a CA that has expired is refused at load, naming the file.
        let e = ca_valid_for(dir.path(), Duration::from_secs(600), Duration::from_secs(60), chrono::Utc::now() - chrono::Duration::days(1))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("ca.pem") && e.contains("expired at"), "{e}");
    }

    #[test]
    fn a_certificate_names_the_device_and_expires_after_one_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_in(dir.path(), Duration::from_secs(600));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let now = chrono::Utc::now();
        let issued = ca.issue("dev-1", key.der_bytes(), now).unwrap();
        let der = CertificateDer::from_pem_slice(issued.answer.certificate.as_bytes()).unwrap();
        check_issued_by(&der, &ca.roots()[0]).unwrap();
        let id = ca.identify(&der).unwrap();
        assert_eq!(id.device_id.as_deref(), Some("dev-1"));
        assert_eq!(id.spiffe_id.as_deref(), Some("spiffe://fleet.test/device/dev-1"));
        assert_eq!(id.serial, issued.answer.serial);
        assert_eq!(id.not_after, now.timestamp() + 600);
        // Another trust domain's reading of the same certificate names no device.
        assert_eq!(identify("other.test", &der).unwrap().device_id, None);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let _ = ca_in(dir.path(), Duration::from_secs(600));
        let (_, other_key) = make_ca("fleet.test", Duration::from_secs(86400), chrono::Utc::now()).unwrap();
        std::fs::write(dir.path().join("ca.key"), other_key).unwrap();
        let err = DeviceCa::load(&DeviceCaSettings {
            certificate: dir.path().join("ca.pem"),
            key: dir.path().join("ca.key"),
            previous_certificates: Vec::new(),
            trust_domain: "fleet.test".into(),
            lifetime: Duration::from_secs(600),
            require_client_certificate: true,
            targets_require_client_certificate: false,
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("the key is not the certificate's"), "{err}");
    }

    #[test]
    fn the_revocation_list_is_signed_by_the_ca_and_names_the_serials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_in(dir.path(), Duration::from_secs(600));
        let now = chrono::Utc::now();
        let revoked = vec![Revoked { serial: "0102030405".into(), device_id: "dev-1".into(), revoked_at: now.timestamp() }];
        let der = ca.crl(&revoked, 7, now, now + chrono::Duration::hours(1)).unwrap();
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let (_, cacert) = parse_x509_certificate(ca.roots()[0].as_ref()).unwrap();
        crl.verify_signature(cacert.public_key()).unwrap();
        let serials: Vec<String> = crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect();
        assert_eq!(serials, ["0102030405"]);
    }
}
