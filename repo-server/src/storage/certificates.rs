//! Client certificates the device CA issued, and which of them are revoked: what the
//! device routes check a presented certificate against (a revoked one is refused even
//! before it expires) and what the signed revocation list names.

use outpost_protocol::api::devices::IssuedCertificate;

use super::{rfc3339, Store};
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

    /// The certificates issued to `device_id`, latest expiry first, at most `limit`.
    pub async fn device_certificates(&self, device_id: &str, limit: u32) -> Result<Vec<IssuedCertificate>, ServerError> {
        let rows = self
            .query(
                "SELECT serial, issued_at, not_after, revoked_at, revoked_reason FROM device_certificates WHERE device_id = ?1 \
                 ORDER BY not_after DESC, serial LIMIT ?2",
                args![device_id, i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(IssuedCertificate {
                    serial: r.text(0)?,
                    issued_at: r.text(1)?,
                    not_after: rfc3339(r.int(2)?),
                    revoked_at: r.opt_int(3)?.map(rfc3339),
                    revoked_reason: r.opt_text(4)?,
                })
            })
            .collect()
    }

    /// For each enrolled device that was ever issued a certificate, when its latest
    /// unrevoked one expires (Unix seconds; in the past when it lapsed), by device id.
    pub async fn certificate_horizons(&self) -> Result<Vec<(String, i64)>, ServerError> {
        let rows = self
            .query(
                "SELECT c.device_id, MAX(c.not_after) FROM device_certificates c JOIN devices d ON d.device_id = c.device_id \
                 WHERE c.revoked_at IS NULL GROUP BY c.device_id ORDER BY c.device_id",
                args![],
            )
            .await?;
        rows.iter().map(|r| Ok((r.text(0)?, r.int(1)?))).collect()
    }

    /// Removes certificates that expired before `before` (Unix seconds), but for each
    /// device's latest one: a device renews every half lifetime, so without this the
    /// table grows by a row per device per renewal for ever; the latest stays so a
    /// lapsed device still shows (in `device show` and the metrics). The number removed.
    pub async fn purge_certificates(&self, before: i64) -> Result<u64, ServerError> {
        self.execute(
            "DELETE FROM device_certificates WHERE not_after < ?1 \
             AND not_after < (SELECT MAX(c.not_after) FROM device_certificates c WHERE c.device_id = device_certificates.device_id)",
            args![before],
        )
        .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::{add_devices, ok, on_both_backends};
    use crate::storage::Backend;

    const NOW: i64 = 1_796_000_000;

    on_both_backends! {
        horizons_are_each_devices_latest_unrevoked_certificate;
        expired_certificates_are_purged_but_each_devices_latest;
    }

    /// A week of hourly renewals leaves one row per device after the purge, and a
    /// device that stopped renewing keeps its last certificate on record.
    async fn expired_certificates_are_purged_but_each_devices_latest(b: Backend) {
        let s = ok(Store::open(&b).await);
        add_devices(&s, ["dev-a", "dev-b"].map(str::to_owned).into_iter()).await;
        for h in 0..168 {
            let serial = format!("0a{h:04x}");
            ok(s.record_certificate(&serial, "dev-a", "2026-12-01T00:00:00+00:00", NOW - 7 * 86_400 + h * 3600 + 3600).await);
        }
        ok(s.record_certificate("0b01", "dev-b", "2026-11-01T00:00:00+00:00", NOW - 30 * 86_400).await);
        ok(s.record_certificate("0b00", "dev-b", "2026-10-31T00:00:00+00:00", NOW - 31 * 86_400).await);
        // Kept: what expired less than a day ago, and each device's latest.
        let removed = ok(s.purge_certificates(NOW - 86_400).await);
        assert_eq!(removed, 143 + 1);
        let a = ok(s.device_certificates("dev-a", 1000).await);
        assert_eq!(a.len(), 25, "those that expired at the cutoff or since");
        assert_eq!(a[0].serial, "0a00a7");
        assert_eq!(ok(s.device_certificates("dev-b", 10).await).iter().map(|c| c.serial.as_str()).collect::<Vec<_>>(), ["0b01"]);
        assert_eq!(ok(s.certificate_horizons().await), [("dev-a".to_owned(), NOW), ("dev-b".to_owned(), NOW - 30 * 86_400)]);
        assert_eq!(ok(s.purge_certificates(NOW - 86_400).await), 0, "nothing more to remove");
    }

    /// What the metrics and `device show` read: a device's newest unrevoked expiry
    /// (a lapsed one stays, in the past, so an alert can fire on it), nothing for a
    /// device whose every certificate was revoked, and the history newest first.
    async fn horizons_are_each_devices_latest_unrevoked_certificate(b: Backend) {
        let s = ok(Store::open(&b).await);
        add_devices(&s, ["dev-a", "dev-b", "dev-c"].map(str::to_owned).into_iter()).await;
        ok(s.record_certificate("0a01", "dev-a", "2026-12-06T10:00:00+00:00", NOW + 600).await);
        ok(s.record_certificate("0a02", "dev-a", "2026-12-06T10:05:00+00:00", NOW + 900).await);
        ok(s.record_certificate("0b01", "dev-b", "2026-12-06T09:00:00+00:00", NOW - 3600).await);
        ok(s.record_certificate("0c01", "dev-c", "2026-12-06T10:00:00+00:00", NOW + 600).await);
        // A certificate naming a device that is not enrolled (any more) is no horizon.
        ok(s.record_certificate("0d01", "gone", "2026-12-06T10:00:00+00:00", NOW + 600).await);
        assert_eq!(ok(s.revoke_certificates("dev-c", "ops", "stolen", NOW).await), 1);

        let horizons = ok(s.certificate_horizons().await);
        assert_eq!(horizons, [("dev-a".to_owned(), NOW + 900), ("dev-b".to_owned(), NOW - 3600)]);

        let listed = ok(s.device_certificates("dev-a", 10).await);
        assert_eq!(listed.iter().map(|c| c.serial.as_str()).collect::<Vec<_>>(), ["0a02", "0a01"]);
        assert_eq!(listed[0].not_after, rfc3339(NOW + 900));
        assert_eq!(ok(s.device_certificates("dev-a", 1).await).len(), 1);
        let revoked = ok(s.device_certificates("dev-c", 10).await);
        assert_eq!(revoked[0].revoked_at.as_deref(), Some(rfc3339(NOW).as_str()));
        assert_eq!(revoked[0].revoked_reason.as_deref(), Some("stolen"));
    }
}
