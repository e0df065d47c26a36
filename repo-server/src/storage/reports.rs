//! Install reports: attested ones (inside check-ins) and bounded unattested ones.

use outpost_protocol::api::reports::ReportRow;
use outpost_protocol::slot::Slot;

use super::{InstallReport, ReportOutcome, SqlEnum, Store};
use crate::storage::db::{Mode, Value};
use crate::args;
use crate::error::ServerError;

pub(super) const INSERT_REPORT: &str = "INSERT INTO install_reports (received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at, attested)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// Unattested reports (devices that follow no director and have no identity) kept at
/// most, in all and per device id: anyone can send them, so they must not grow without
/// bound, and they never sit beside an enrolled device's attested ones.
pub const MAX_UNATTESTED_REPORTS: i64 = 10_000;
pub const MAX_UNATTESTED_REPORTS_PER_DEVICE: i64 = 100;

/// Where an install report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportSource {
    /// Inside a check-in the device's TPM quote vouches for.
    AttestedCheckin,
    /// Sent on its own, signed by nobody.
    Unattested,
}

/// Which install reports a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFilter {
    All,
    /// Only those from attested check-ins.
    AttestedOnly,
}

pub(super) fn report_args(received_at: &str, r: &InstallReport, source: ReportSource) -> Vec<Value> {
    let attested = i64::from(source == ReportSource::AttestedCheckin);
    args![received_at, &r.device_id, &r.hardware_class, &r.target, &r.version, r.outcome.as_str(), r.reason.as_deref(), r.slot.as_sql(), &r.at, attested]
}

impl Store {
    /// Records a report no device signed, for a device id that is not enrolled
    /// (`false`: the id is enrolled, whose reports come only in attested check-ins),
    /// and drops the oldest unattested reports beyond the bounds.
    pub async fn add_unattested_report(&self, r: &InstallReport) -> Result<bool, ServerError> {
        let r = r.clone();
        self.transaction(Mode::Shared, move |mut tx| async move {
            let r = &r;
            if tx.opt("SELECT 1 FROM devices WHERE device_id = ?1", args![&r.device_id]).await?.is_some() {
                return Ok(false);
            }
            tx.execute(INSERT_REPORT, report_args(&chrono::Utc::now().to_rfc3339(), r, ReportSource::Unattested)).await?;
            tx.execute(
                "DELETE FROM install_reports WHERE attested = 0 AND device_id = ?1 AND id <=
                   (SELECT id FROM install_reports WHERE attested = 0 AND device_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                args![&r.device_id, MAX_UNATTESTED_REPORTS_PER_DEVICE],
            )
            .await?;
            tx.execute(
                "DELETE FROM install_reports WHERE attested = 0 AND id <=
                   (SELECT id FROM install_reports WHERE attested = 0 ORDER BY id DESC LIMIT 1 OFFSET ?1)",
                args![MAX_UNATTESTED_REPORTS],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    /// Install reports, newest first, of one device or all; `filter` may leave out the
    /// ones no device signed.
    pub async fn recent_reports(&self, device: Option<&str>, limit: u32, filter: ReportFilter) -> Result<Vec<ReportRow>, ServerError> {
        let rows = self
            .query(
                "SELECT received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at, attested
                 FROM install_reports WHERE (?1 IS NULL OR device_id = ?1) AND (?3 = 0 OR attested = 1) ORDER BY id DESC LIMIT ?2",
                args![device, limit, i64::from(filter == ReportFilter::AttestedOnly)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ReportRow {
                    received_at: r.text(0)?,
                    device_id: r.text(1)?,
                    hardware_class: r.text(2)?,
                    target: r.text(3)?,
                    version: r.text(4)?,
                    outcome: ReportOutcome::from_sql("install_reports.outcome", &r.text(5)?)?,
                    reason: r.opt_text(6)?,
                    slot: Slot::from_sql("install_reports.slot", &r.text(7)?)?,
                    at: r.text(8)?,
                    attested: r.int(9)? == 1,
                })
            })
            .collect()
    }
}
