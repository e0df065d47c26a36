//! Client certificates the device CA issued, and which of them are revoked: what the
//! device routes check a presented certificate against (a revoked one is refused even
//! before it expires) and what the signed revocation list names.

use super::Store;
use crate::args;
use crate::storage::db::Mode;
use crate::error::ServerError;

/// A revoked certificate that has not expired yet (an expired one is refused anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Serial number, lowercase hex.
    pub serial: String,
    pub device_id: String,
    /// Unix seconds.
    pub revoked_at: i64,
}

impl Store {
    /// Records a certificate just issued to `device_id`.
    pub async fn record_certificate(&self, serial: &str, device_id: &str, issued_at: &str, not_after: i64) -> Result<(), ServerError> {
        self.execute(
            "INSERT INTO device_certificates (serial, device_id, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
            args![serial, device_id, issued_at, not_after],
        )
        .await
        .map(|_| ())
    }

    /// Revokes every unexpired certificate of `device_id` not revoked yet, and blocks
    /// new ones until [`Store::allow_certificates`]; how many were revoked.
    pub async fn revoke_certificates(&self, device_id: &str, by: &str, reason: &str, now: i64) -> Result<u64, ServerError> {
        let (device_id, by, reason) = (device_id.to_owned(), by.to_owned(), reason.to_owned());
        self.transaction(Mode::Exclusive, move |mut tx| async move {
            let n = tx
                .execute(
                    "UPDATE device_certificates SET revoked_at = ?2, revoked_reason = ?3 WHERE device_id = ?1 AND revoked_at IS NULL AND not_after > ?2",
                    args![&device_id, now, &reason],
                )
                .await?;
            tx.execute("DELETE FROM device_certificate_blocks WHERE device_id = ?1", args![&device_id]).await?;
            tx.execute(
                "INSERT INTO device_certificate_blocks (device_id, blocked_at, blocked_by, reason) VALUES (?1, ?2, ?3, ?4)",
                args![&device_id, now, &by, &reason],
            )
            .await?;
            tx.commit().await?;
            Ok(n)
        })
        .await
    }

    /// Lets a revoked device get certificates again; whether it was blocked.
    pub async fn allow_certificates(&self, device_id: &str) -> Result<bool, ServerError> {
        Ok(self.execute("DELETE FROM device_certificate_blocks WHERE device_id = ?1", args![device_id]).await? > 0)
    }

    /// Why `device_id` gets no certificate, when an operator revoked it.
    pub async fn certificates_blocked(&self, device_id: &str) -> Result<Option<String>, ServerError> {
        let rows = self.query("SELECT blocked_by, reason FROM device_certificate_blocks WHERE device_id = ?1", args![device_id]).await?;
        rows.first().map(|r| Ok(format!("{} revoked this device's certificates: {}", r.text(0)?, r.text(1)?))).transpose()
    }

    /// Whether the certificate with `serial` naming `device_id` was revoked. A serial
    /// this server never issued to that device counts as revoked: the CA key signs
    /// nothing else, so such a certificate means the key or the store is not what it
    /// should be.
    pub async fn certificate_revoked(&self, serial: &str, device_id: &str) -> Result<bool, ServerError> {
        let rows = self
            .query(
                "SELECT CASE WHEN revoked_at IS NULL THEN 0 ELSE 1 END FROM device_certificates WHERE serial = ?1 AND device_id = ?2",
                args![serial, device_id],
            )
            .await?;
        match rows.first() {
            None => Ok(true),
            Some(r) => Ok(r.int(0)? != 0),
        }
    }

    /// Revoked certificates that have not expired at `now`, oldest revocation first.
    pub async fn revoked_certificates(&self, now: i64) -> Result<Vec<Revoked>, ServerError> {
        let rows = self
            .query(
                "SELECT serial, device_id, revoked_at FROM device_certificates WHERE revoked_at IS NOT NULL AND not_after > ?1 ORDER BY revoked_at, serial",
                args![now],
            )
            .await?;
        rows.iter().map(|r| Ok(Revoked { serial: r.text(0)?, device_id: r.text(1)?, revoked_at: r.int(2)? })).collect()
    }
}
