//! Integrity incidents (protocol::incident): dm-verity blocks that failed verification
//! on a device. Enrolled devices send them inside attested check-ins (stored in the
//! check-in's transaction); devices without identity post them unattested, bounded
//! like unattested install reports. Each is stored once per device, record, dev and
//! block (an agent that crashed after sending sends it again), and a new one is
//! written to the audit log.

use outpost_protocol::api::reports::IncidentRow;
use outpost_protocol::incident::{IncidentKind, IntegrityIncident};
use outpost_protocol::slot::Slot;

use super::reports::{ReportFilter, ReportSource};
use super::{SqlEnum, Store};
use crate::args;
use crate::error::ServerError;
use crate::storage::db::{Mode, Tx};

/// Unattested incidents kept at most, in all and per device id (anyone can send them).
pub const MAX_UNATTESTED_INCIDENTS: i64 = 10_000;
pub const MAX_UNATTESTED_INCIDENTS_PER_DEVICE: i64 = 100;

/// How an unattested incident was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Stored (and logged).
    New,
    /// The same incident was stored before.
    Duplicate,
    /// The device id is enrolled: its incidents count only inside attested check-ins.
    Enrolled,
}

/// Stores `i` unless it is there already; true when stored.
pub(super) async fn insert_incident_tx(tx: &mut dyn Tx, received_at: &str, i: &IntegrityIncident, source: ReportSource) -> Result<bool, ServerError> {
    let attested = i64::from(source == ReportSource::AttestedCheckin);
    let block = i64::try_from(i.block).map_err(|_| ServerError::State(format!("incident block {} beyond i64", i.block)))?;
    let stored = tx
        .execute(
            "INSERT INTO integrity_incidents (received_at, device_id, hardware_class, kind, dev, block_no, slot, release, boot_at, record, line, attested)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) ON CONFLICT DO NOTHING",
            args![received_at, &i.device_id, &i.hardware_class, i.kind.as_sql(), &i.dev, block, i.slot.map(Slot::as_sql), i.release.as_deref(), &i.boot_at, &i.record, &i.line, attested],
        )
        .await?;
    if stored > 0 {
        let detail = serde_json::to_string(&serde_json::json!({"incident": i, "attested": attested == 1}))
            .map_err(|e| ServerError::State(format!("audit detail of an integrity incident: {e}")))?;
        tx.execute(
            "INSERT INTO repository_log (at, actor, action, detail) VALUES (?1, ?2, 'integrity_incident', ?3)",
            args![received_at, format!("device:{}", i.device_id), detail],
        )
        .await?;
    }
    Ok(stored > 0)
}

impl Store {
    /// Takes an incident no device signed, for a device id that is not enrolled, and
    /// drops the oldest unattested incidents beyond the bounds.
    pub async fn add_unattested_incident(&self, i: &IntegrityIncident) -> Result<Taken, ServerError> {
        let i = i.clone();
        self.transaction(Mode::Shared, move |mut tx| async move {
            let i = &i;
            if tx.opt("SELECT 1 FROM devices WHERE device_id = ?1", args![&i.device_id]).await?.is_some() {
                return Ok(Taken::Enrolled);
            }
            if !insert_incident_tx(tx.as_mut(), &chrono::Utc::now().to_rfc3339(), i, ReportSource::Unattested).await? {
                return Ok(Taken::Duplicate);
            }
            tx.execute(
                "DELETE FROM integrity_incidents WHERE attested = 0 AND device_id = ?1 AND id <=
                   (SELECT id FROM integrity_incidents WHERE attested = 0 AND device_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                args![&i.device_id, MAX_UNATTESTED_INCIDENTS_PER_DEVICE],
            )
            .await?;
            tx.execute(
                "DELETE FROM integrity_incidents WHERE attested = 0 AND id <=
                   (SELECT id FROM integrity_incidents WHERE attested = 0 ORDER BY id DESC LIMIT 1 OFFSET ?1)",
                args![MAX_UNATTESTED_INCIDENTS],
            )
            .await?;
            tx.commit().await?;
            Ok(Taken::New)
        })
        .await
    }

    /// Incidents, newest first, of one device or all; `filter` may leave out the ones
    /// no device signed.
    pub async fn recent_incidents(&self, device: Option<&str>, limit: u32, filter: ReportFilter) -> Result<Vec<IncidentRow>, ServerError> {
        let rows = self
            .query(
                "SELECT received_at, device_id, hardware_class, kind, dev, block_no, slot, release, boot_at, record, line, attested
                 FROM integrity_incidents WHERE (?1 IS NULL OR device_id = ?1) AND (?3 = 0 OR attested = 1) ORDER BY id DESC LIMIT ?2",
                args![device, limit, i64::from(filter == ReportFilter::AttestedOnly)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let block = u64::try_from(r.int(5)?).map_err(|_| ServerError::State("stored integrity_incidents.block_no is negative".into()))?;
                let slot = r.opt_text(6)?.map(|s| Slot::from_sql("integrity_incidents.slot", &s)).transpose()?;
                Ok(IncidentRow {
                    received_at: r.text(0)?,
                    attested: r.int(11)? == 1,
                    incident: IntegrityIncident {
                        device_id: r.text(1)?,
                        hardware_class: r.text(2)?,
                        kind: IncidentKind::from_sql("integrity_incidents.kind", &r.text(3)?)?,
                        dev: r.text(4)?,
                        block,
                        slot,
                        release: r.opt_text(7)?,
                        boot_at: r.text(8)?,
                        record: r.text(9)?,
                        line: r.text(10)?,
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::{add_devices, ok, on_both_backends};
    use crate::storage::Backend;

    fn incident(device: &str, block: u64) -> IntegrityIncident {
        IntegrityIncident {
            device_id: device.into(),
            hardware_class: "qemu-x86_64".into(),
            kind: IncidentKind::VerityData,
            dev: "254:3".into(),
            block,
            slot: Some(Slot::B),
            release: Some("2.0.0".into()),
            boot_at: "2026-12-05T19:00:00Z".into(),
            record: "dmesg-efi-176496120001001".into(),
            line: format!("<3>[   95.123456] device-mapper: verity: 254:3: data block {block} is corrupted"),
        }
    }

    on_both_backends! {
        incidents_are_stored_once_logged_and_refused_for_enrolled_ids;
        unattested_incidents_are_bounded_per_device;
        attested_incidents_come_in_check_ins_once_each;
        a_database_from_before_incidents_migrates_and_keeps_its_reports;
    }

    /// Two attested check-ins of an enrolled device carry the same incident (the agent
    /// crashed after the first, before forgetting it): stored once, as attested.
    async fn attested_incidents_come_in_check_ins_once_each(b: Backend) {
        use crate::storage::{CheckinRecord, DirectorChanges, Judged, NonceIssue};
        use outpost_protocol::attest::DeviceHealth;
        let s = ok(Store::open(&b).await);
        add_devices(&s, ["dev-a".to_owned()].into_iter()).await;
        for _ in 0..2 {
            let nonce = match ok(s.issue_nonce("dev-a", NOW + 60_000, NOW).await) {
                NonceIssue::Issued(n) => n,
                other => panic!("no nonce: {other:?}"),
            };
            let record = CheckinRecord {
                device_id: "dev-a".into(),
                judged: Judged::Attested { boot_events: None },
                slot: Slot::B,
                version: Some("2.0.0".into()),
                image_sha256: None,
                sbom_sha256: None,
                health: DeviceHealth::Healthy,
                reports: vec![],
                incidents: vec![incident("dev-a", 50558)],
                policy: None,
            };
            let decided = s.checkin(&nonce, record, "rpi4", |_| Ok((DirectorChanges::default(), ())), NOW).await;
            assert!(ok(decided).is_ok());
        }
        let rows = ok(s.recent_incidents(Some("dev-a"), 10, ReportFilter::AttestedOnly).await);
        assert_eq!(rows.iter().map(|r| (r.incident.block, r.attested)).collect::<Vec<_>>(), [(50558, true)]);
        let logged = ok(s.recent_log(10).await).into_iter().filter(|e| e.action == "integrity_incident").count();
        assert_eq!(logged, 1);
    }

    const NOW: i64 = 1_796_498_627_000;

    /// A database of the schema before incidents (version 6) migrates, keeps its rows,
    /// and takes incidents.
    async fn a_database_from_before_incidents_migrates_and_keeps_its_reports(b: Backend) {
        use crate::storage::schema::ALTERATIONS;
        const BEFORE_INCIDENTS: [&str; 6] = [ALTERATIONS[0], ALTERATIONS[1], ALTERATIONS[2], ALTERATIONS[3], ALTERATIONS[4], ALTERATIONS[5]];
        let old = ok(Store::open_migrated(&b, &BEFORE_INCIDENTS).await);
        ok(old
            .execute(
                "INSERT INTO install_reports (received_at, device_id, hardware_class, target, version, outcome, reason, slot, reported_at, attested)
                 VALUES ('then', 'vm-1', 'qemu-x86_64', 't', '2.0.0', 'committed', NULL, 'B', 'then', 0)",
                crate::args![],
            )
            .await);
        assert!(old.recent_incidents(None, 10, ReportFilter::All).await.is_err(), "the old schema has no incidents");
        drop(old);
        let s = ok(Store::open(&b).await);
        assert_eq!(ok(s.recent_reports(Some("vm-1"), 10, ReportFilter::All).await).len(), 1);
        assert!(ok(s.recent_incidents(None, 10, ReportFilter::All).await).is_empty());
        assert_eq!(ok(s.add_unattested_incident(&incident("vm-1", 3)).await), Taken::New);
    }

    async fn incidents_are_stored_once_logged_and_refused_for_enrolled_ids(b: Backend) {
        let s = ok(Store::open(&b).await);
        assert_eq!(ok(s.add_unattested_incident(&incident("vm-1", 2931)).await), Taken::New);
        // Sent again (the agent crashed before forgetting it): stored once, logged once.
        assert_eq!(ok(s.add_unattested_incident(&incident("vm-1", 2931)).await), Taken::Duplicate);
        let rows = ok(s.recent_incidents(Some("vm-1"), 10, ReportFilter::All).await);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].incident.clone(), rows[0].attested), (incident("vm-1", 2931), false));
        assert!(ok(s.recent_incidents(Some("vm-1"), 10, ReportFilter::AttestedOnly).await).is_empty());
        let log = ok(s.recent_log(10).await);
        let logged: Vec<_> = log.iter().filter(|e| e.action == "integrity_incident").collect();
        assert_eq!(logged.len(), 1);
        assert_eq!((logged[0].actor.as_str(), &logged[0].detail["incident"]["block"]), ("device:vm-1", &serde_json::json!(2931)));
        // An enrolled id's incidents come only inside its attested check-ins.
        add_devices(&s, ["enrolled".to_owned()].into_iter()).await;
        assert_eq!(ok(s.add_unattested_incident(&incident("enrolled", 7)).await), Taken::Enrolled);
        assert!(ok(s.recent_incidents(Some("enrolled"), 10, ReportFilter::All).await).is_empty());
    }

    async fn unattested_incidents_are_bounded_per_device(b: Backend) {
        let s = ok(Store::open(&b).await);
        let over = MAX_UNATTESTED_INCIDENTS_PER_DEVICE as u64 + 5;
        for block in 0..over {
            assert_eq!(ok(s.add_unattested_incident(&incident("flood", block)).await), Taken::New);
        }
        let rows = ok(s.recent_incidents(Some("flood"), 1000, ReportFilter::All).await);
        assert_eq!(rows.len() as i64, MAX_UNATTESTED_INCIDENTS_PER_DEVICE);
        assert_eq!(rows[0].incident.block, over - 1, "the newest are kept");
    }
}
