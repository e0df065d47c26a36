//! Who may use a device's routes. With a device CA that requires client certificates,
//! a device's nonce, check-in and other routes are for the holder of a certificate
//! naming that device, unexpired and not revoked — checked on every request, since a
//! resumed TLS session carries the certificate of the handshake it resumed without the
//! handshake's checks. Without a certificate, only the two requests that prove the
//! device by its TPM pass: the nonce request (quoted by the attestation key) and a
//! check-in that asks for a certificate (quoted too, and carrying the TLS key's
//! certification); that is how a device gets its first certificate, and a new one
//! after being offline past its certificate's expiry.

use super::deviceca::{ClientIdentity, DeviceCa};
use super::{rfc3339, Refusal};
use crate::storage::Store;

/// The device route being asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRoute {
    Nonce,
    Checkin { asks_for_certificate: bool },
}

/// Passes or refuses `caller` (the certificate its connection presented) on `route`
/// of device `device_id` at `now` (Unix seconds).
pub async fn check(ca: Option<&DeviceCa>, store: &Store, caller: Option<&ClientIdentity>, device_id: &str, route: DeviceRoute, now: i64) -> Result<(), Refusal> {
    let Some(ca) = ca else { return Ok(()) };
    match caller {
        Some(c) => {
            let named = c.device_id.as_deref();
            if named != Some(device_id) {
                let who = c.spiffe_id.as_deref().unwrap_or("no device (no SPIFFE ID of this trust domain)");
                return Err(Refusal::forbidden(
                    "certificate_for_another_device",
                    format!("the client certificate (serial {}) names {who}; it cannot act for device {device_id:?}", c.serial),
                ));
            }
            if c.not_after <= now {
                return Err(Refusal::unauthenticated(
                    "certificate_expired",
                    format!("the client certificate (serial {}) expired at {}; check in attested for a new one", c.serial, rfc3339(c.not_after)),
                ));
            }
            if store.certificate_revoked(&c.serial, device_id).await? {
                return Err(Refusal::forbidden("certificate_revoked", format!("the client certificate (serial {}) is revoked", c.serial)));
            }
            if let Some(why) = store.certificates_blocked(device_id).await? {
                return Err(Refusal::forbidden("certificate_revoked", format!("the client certificate (serial {}) is revoked: {why}", c.serial)));
            }
            Ok(())
        }
        None if !ca.settings.require_client_certificate => Ok(()),
        None => match route {
            DeviceRoute::Nonce | DeviceRoute::Checkin { asks_for_certificate: true } => Ok(()),
            DeviceRoute::Checkin { asks_for_certificate: false } => Err(Refusal::unauthenticated(
                "client_certificate_required",
                format!(
                    "device {device_id:?}: this server's device routes need the device's client certificate; without one, a \
                     check-in must ask for one (carry its TPM-resident TLS key's certification)"
                ),
            )),
        },
    }
}

/// The repository's target files when `[device_ca]
/// targets_require_client_certificate` is set: for any device holding an
/// unexpired, unrevoked certificate of the device CA (callers with an API token pass
/// before this is asked).
pub async fn check_target_access(ca: &DeviceCa, store: &Store, caller: Option<&ClientIdentity>, now: i64) -> Result<(), Refusal> {
    let Some(c) = caller else {
        return Err(Refusal::unauthenticated(
            "client_certificate_required",
            "this server serves its target files to devices with a client certificate (or to callers with an API token)",
        ));
    };
    let Some(device) = c.device_id.as_deref() else {
        return Err(Refusal::forbidden("certificate_for_another_device", format!("the client certificate (serial {}) names no device of trust domain {}", c.serial, ca.settings.trust_domain)));
    };
    check(Some(ca), store, Some(c), device, DeviceRoute::Nonce, now).await
}
