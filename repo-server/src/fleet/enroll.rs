//! Enrollment by credential activation: one-time tokens (operators), a challenge only
//! the TPM holding both the endorsement key and the attestation key can answer, and
//! the nonces an enrolled device's check-ins use.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_protocol::attest::{self, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled, NonceGrant, TpmPublic};
use outpost_protocol::api::tokens::EnrollmentToken;
use outpost_protocol::release::HardwareClass;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{rfc3339, rfc3339_ms, Refusal};
use crate::ekcert::EkCaStore;
use crate::error::ServerError;
use crate::storage::{NewChallenge, NonceIssue, Store, MAX_OPEN_NONCES};

/// What enrollment trusts: the TPM makers' CAs, and whether uncertified EKs may enroll.
pub struct EnrollPolicy<'a> {
    pub ek_cas: &'a EkCaStore,
    pub accept_uncertified_eks: bool,
    pub challenge_lifetime: Duration,
}

/// The audit log's detail of a new enrollment token: all but the token.
#[derive(Serialize)]
struct TokenCreated<'a> {
    hardware_class: &'a str,
    labels: &'a BTreeMap<String, String>,
    expires_at: &'a str,
}

/// A new enrollment token (its answer: token, class, labels, expiry), recorded in the
/// audit log as made by `by`.
pub async fn create_token(
    store: &Store,
    class: &HardwareClass,
    labels: &BTreeMap<String, String>,
    ttl: Duration,
    by: &str,
    now: i64,
) -> Result<EnrollmentToken, ServerError> {
    let expires = now + ttl.as_secs().max(1) as i64;
    let token = store.create_enrollment_token(class.as_str(), labels, by, expires).await?;
    let answer = EnrollmentToken { token, hardware_class: class.as_str().to_owned(), labels: labels.clone(), expires_at: rfc3339(expires) };
    // The audit log records everything but the secret.
    let detail = TokenCreated { hardware_class: &answer.hardware_class, labels: &answer.labels, expires_at: &answer.expires_at };
    store.log(by, "device_token_create", &detail).await?;
    Ok(answer)
}

fn tpm_bad(code: &'static str) -> impl FnOnce(outpost_protocol::Error) -> Refusal {
    move |e| Refusal::invalid(code, e.to_string())
}

/// Checks the EK certificate against the configured CAs (or the explicit opt-out).
fn check_ek(policy: &EnrollPolicy<'_>, ek: &TpmPublic, ek_cert: Option<&[u8]>) -> Result<(), Refusal> {
    if policy.ek_cas.is_empty() && !policy.accept_uncertified_eks {
        return Err(Refusal::forbidden(
            "no_ek_ca",
            "this server trusts no TPM maker yet: the operator must configure attestation.ek_ca_certificates \
             (or, for software TPMs, attestation.accept_uncertified_eks = true)",
        ));
    }
    if !policy.ek_cas.is_empty() {
        let cert = ek_cert.ok_or_else(|| {
            Refusal::forbidden("ek_certificate_required", "this server requires an EK certificate from a trusted TPM manufacturer; the device sent none")
        })?;
        policy.ek_cas.verify(cert, ek, x509_parser::time::ASN1Time::now()).map_err(|reason| {
            tracing::warn!(%reason, "EK certificate refused");
            Refusal::forbidden("ek_certificate_refused", format!("EK certificate refused: {reason}"))
        })?;
    }
    Ok(())
}

/// The first enrollment step: checks the token, the keys and the EK certificate, and
/// answers with a credential only the device's TPM can activate.
pub async fn enroll(store: &Store, policy: &EnrollPolicy<'_>, req: &EnrollRequest, now: i64) -> Result<EnrollChallenge, Refusal> {
    let class: HardwareClass = req.hardware_class.parse().map_err(|e: outpost_protocol::Error| Refusal::invalid("invalid_hardware_class", e.to_string()))?;
    // The token first: without a valid one, no certificate checks and no RSA work.
    store.check_enrollment_token(&req.token, class.as_str(), now).await?.map_err(Refusal::Enroll)?;
    let ek_bytes = attest::unhex("ek_public", &req.ek_public, 1024).map_err(tpm_bad("invalid_ek"))?;
    let ak_bytes = attest::unhex("ak_public", &req.ak_public, 1024).map_err(tpm_bad("invalid_ak"))?;
    let ek_cert = match &req.ek_certificate {
        Some(c) => Some(attest::unhex("ek_certificate", c, 8192).map_err(tpm_bad("invalid_ek_certificate"))?),
        None => None,
    };
    let ek = TpmPublic::parse(&ek_bytes, "endorsement key").map_err(tpm_bad("invalid_ek"))?;
    ek.check_endorsement_key().map_err(tpm_bad("invalid_ek"))?;
    let ak = TpmPublic::parse(&ak_bytes, "attestation key").map_err(tpm_bad("invalid_ak"))?;
    ak.check_attestation_key().map_err(tpm_bad("invalid_ak"))?;
    check_ek(policy, &ek, ek_cert.as_deref())?;
    let secret: [u8; 32] = attest::credential::random_bytes();
    let made = attest::credential::make_credential(&ek, &ak.name(), &secret).map_err(tpm_bad("invalid_ek"))?;
    let id = hex::encode(attest::credential::random_bytes::<16>());
    let device_id = attest::device_id(&ek_bytes);
    let expires = now + policy.challenge_lifetime.as_secs().max(1) as i64;
    let secret_sha256 = hex::encode(Sha256::digest(secret));
    let challenge = NewChallenge {
        id: &id,
        token: &req.token,
        device_id: &device_id,
        hardware_class: class.as_str(),
        ek_public: &ek_bytes,
        ek_certificate: ek_cert.as_deref(),
        ak_public: &ak_bytes,
        secret_sha256: &secret_sha256,
        expires_at: expires,
    };
    store.open_challenge(&challenge, now).await?.map_err(Refusal::Enroll)?;
    tracing::info!(%device_id, class = class.as_str(), challenge = %id, "enrollment challenge issued");
    Ok(EnrollChallenge {
        challenge_id: id,
        device_id,
        credential_blob: hex::encode(made.credential_blob),
        encrypted_secret: hex::encode(made.encrypted_secret),
        expires_at: rfc3339(expires),
    })
}

/// The second step: the secret the TPM recovered completes the challenge and records
/// the device.
pub async fn prove(store: &Store, challenge: &str, proof: &EnrollProof, now: i64) -> Result<Enrolled, Refusal> {
    let secret = attest::unhex("secret", &proof.secret, 64).map_err(tpm_bad("invalid_secret"))?;
    let digest = hex::encode(Sha256::digest(&secret));
    match store.complete_challenge(challenge, &digest, now).await? {
        Ok((device_id, hardware_class)) => {
            store.log(&format!("device:{device_id}"), "device_enroll", &json!({"device_id": device_id, "hardware_class": hardware_class})).await?;
            tracing::info!(%device_id, %hardware_class, "device enrolled");
            Ok(Enrolled { device_id, hardware_class })
        }
        Err(r) => {
            tracing::warn!(%challenge, refusal = ?r, "enrollment proof refused");
            Err(Refusal::Enroll(r))
        }
    }
}

/// How far a nonce request's `at` may be from the server's clock.
const NONCE_REQUEST_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// A check-in nonce for device `id`, which must ask for it signed by its AK.
pub async fn nonce(store: &Store, id: &str, req: &attest::NonceRequest, lifetime: Duration, now: chrono::DateTime<chrono::Utc>) -> Result<NonceGrant, Refusal> {
    let device = store.device(id).await?.ok_or_else(|| Refusal::unknown_device(id))?;
    let ak = TpmPublic::parse(&device.ak_public, "attestation key").map_err(|e| ServerError::State(format!("stored AK of {id}: {e}")))?;
    // Only the device may take its nonces: the request is quoted by its AK.
    let ask = attest::verify_nonce_request(&ak, req).map_err(|e| {
        tracing::warn!(device = %id, error = %e, "nonce request refused");
        Refusal::unauthenticated("nonce_request_refused", format!("nonce request not signed by this device's attestation key: {e}"))
    })?;
    if ask.device_id != id {
        return Err(Refusal::unauthenticated("nonce_request_refused", format!("nonce request is for device {:?}, not {id:?}", ask.device_id)));
    }
    let at = chrono::DateTime::parse_from_rfc3339(&ask.at)
        .map_err(|e| Refusal::invalid("invalid_request", format!("at {:?}: {e}", ask.at)))?
        .with_timezone(&chrono::Utc);
    if (now - at).abs() > NONCE_REQUEST_SKEW {
        return Err(Refusal::unauthenticated(
            "nonce_request_stale",
            format!("nonce request made at {} is more than {} minutes from the server's clock (a replay, or a clock to fix)", ask.at, NONCE_REQUEST_SKEW.num_minutes()),
        ));
    }
    // Nonce lifetimes are short (seconds): they are kept in milliseconds, so rounding
    // to whole seconds never shortens them.
    let issued = now.timestamp_millis();
    let expires = issued + lifetime.as_millis().max(1) as i64;
    match store.issue_nonce(id, expires, issued).await? {
        NonceIssue::Issued(nonce) => Ok(NonceGrant { nonce, expires_at: rfc3339_ms(expires), issues_client_certificates: false }),
        NonceIssue::UnknownDevice => Err(Refusal::unknown_device(id)),
        NonceIssue::TooMany => Err(Refusal::TooMany {
            code: "too_many_nonces",
            message: format!("device {id:?} already has {MAX_OPEN_NONCES} unused nonces; use one or wait for them to expire"),
        }),
    }
}
