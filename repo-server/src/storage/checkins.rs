//! Check-ins: the nonce used up, the verdict and device state recorded, the install
//! reports the device signed, and the director's decision, in one transaction.

use outpost_protocol::api::devices::Attestation;
use outpost_protocol::attest::{AttestationState, DeviceHealth, Verdict};
use outpost_protocol::slot::Slot;

use super::assignments::{director_tx, Decided, DirectorView};
use super::nonces::{consume_nonce_tx, NonceRefusal};
use super::reports::{report_args, ReportSource, INSERT_REPORT};
use super::{rfc3339_ms, InstallReport, SqlEnum, Store};
use crate::args;
use crate::error::ServerError;
use crate::storage::db::{Mode, Tx};

/// One check-in's outcome, recorded with the device's state.
pub struct CheckinRecord {
    pub device_id: String,
    pub verdict: Verdict,
    pub reason: Option<String>,
    pub slot: Slot,
    pub version: Option<String>,
    pub image_sha256: Option<String>,
    pub sbom_sha256: Option<String>,
    pub health: DeviceHealth,
    pub reports: Vec<InstallReport>,
    /// The policy status (JSON) the device reported.
    pub policy: Option<String>,
}

async fn record_checkin_tx(tx: &mut dyn Tx, c: &CheckinRecord, now_ms: i64) -> Result<(), ServerError> {
    let now = rfc3339_ms(now_ms);
    tx.execute(
        "INSERT INTO attestations (device_id, at, verdict, reason, slot, version, image_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        args![&c.device_id, &now, c.verdict.as_sql(), c.reason.as_deref(), c.slot.as_sql(), c.version.as_deref(), c.image_sha256.as_deref()],
    )
    .await?;
    tx.execute(
        "UPDATE devices SET last_checkin_at = ?1, slot = ?2, version = ?3, image_sha256 = ?4, health = ?5,
           attestation = ?6, attestation_reason = ?7, attested_at = ?1, sbom_sha256 = ?9, policy = ?10 WHERE device_id = ?8",
        args![&now, c.slot.as_sql(), c.version.as_deref(), c.image_sha256.as_deref(), c.health.as_sql(), AttestationState::from(c.verdict).as_sql(), c.reason.as_deref(), &c.device_id, c.sbom_sha256.as_deref(), c.policy.as_deref()],
    )
    .await?;
    for r in &c.reports {
        tx.execute(INSERT_REPORT, report_args(&now, r, ReportSource::AttestedCheckin)).await?;
    }
    Ok(())
}


impl Store {
    /// A whole check-in in one write transaction (one fsync): the director's decision
    /// (see [`super::assignments::director_tx`]; `decide` is the director's, run on what
    /// this transaction reads), the nonce used up, the verdict and state recorded. A
    /// refused nonce changes nothing.
    pub async fn checkin<T, F>(
        &self,
        nonce: &str,
        c: CheckinRecord,
        hardware_class: &str,
        mut decide: F,
        now_ms: i64,
    ) -> Result<Result<(T, u64), NonceRefusal>, ServerError>
    where
        F: FnMut(&DirectorView) -> Decided<T> + Send + 'static,
        T: Send + 'static,
    {
        let (nonce, hardware_class) = (nonce.to_owned(), hardware_class.to_owned());
        self.transaction(Mode::Write, move |mut tx| async move {
            // The director first: it may have to wait for other servers' decisions, and a
            // transaction that waits must hold no rows they may need.
            let decision = director_tx(tx.as_mut(), &c.device_id, &hardware_class, c.verdict, &mut decide, now_ms.div_euclid(1000)).await?;
            if let Err(r) = consume_nonce_tx(tx.as_mut(), &nonce, &c.device_id, now_ms).await? {
                return Ok(Err(r));
            }
            record_checkin_tx(tx.as_mut(), &c, now_ms).await?;
            tx.commit().await?;
            Ok(Ok(decision))
        })
        .await
    }

    pub async fn attestations(&self, device_id: &str, limit: u32) -> Result<Vec<Attestation>, ServerError> {
        let rows = self
            .query(
                "SELECT at, verdict, reason, slot, version, image_sha256 FROM attestations WHERE device_id = ?1 ORDER BY id DESC LIMIT ?2",
                args![device_id, limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Attestation {
                    at: r.text(0)?,
                    verdict: Verdict::from_sql("attestations.verdict", &r.text(1)?)?,
                    reason: r.opt_text(2)?,
                    slot: r.opt_text(3)?.map(|s| Slot::from_sql("attestations.slot", &s)).transpose()?,
                    version: r.opt_text(4)?,
                    image_sha256: r.opt_text(5)?,
                })
            })
            .collect()
    }
}
