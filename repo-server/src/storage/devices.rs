//! Devices: their records, labels and attestation state.

use std::collections::BTreeMap;

use outpost_protocol::api::devices::Device;
use outpost_protocol::attest::{AttestationState, DeviceHealth};
use outpost_protocol::slot::Slot;

use super::{json, SqlEnum, Store};
use crate::storage::db::{Mode, Row};
use crate::args;
use crate::error::ServerError;

/// A device's record with the attestation key it enrolled (which the API never shows).
#[derive(Debug, Clone)]
pub struct DeviceRecord {
    pub device: Device,
    pub ak_public: Vec<u8>,
}

/// A record reads as the device it records (the key is the one field added).
impl std::ops::Deref for DeviceRecord {
    type Target = Device;
    fn deref(&self) -> &Device {
        &self.device
    }
}

impl Store {
    fn device_from_row(r: &Row) -> Result<DeviceRecord, ServerError> {
        let attestation = AttestationState::from_sql("devices.attestation", &r.text(9)?)?;
        let device = Device {
            device_id: r.text(0)?,
            hardware_class: r.text(1)?,
            has_ek_certificate: r.opt_blob(3)?.is_some(),
            enrolled_at: r.text(4)?,
            last_checkin_at: r.opt_text(5)?,
            slot: r.opt_text(6)?.map(|s| Slot::from_sql("devices.slot", &s)).transpose()?,
            version: r.opt_text(7)?,
            image_sha256: r.opt_text(8)?,
            quarantined: attestation == AttestationState::Failed,
            attestation,
            attestation_reason: r.opt_text(10)?,
            attested_at: r.opt_text(11)?,
            health: r.opt_text(12)?.map(|h| DeviceHealth::from_sql("devices.health", &h)).transpose()?,
            sbom_sha256: r.opt_text(13)?,
            labels: serde_json::from_str(&r.text(14)?).unwrap_or_default(),
            policy: r.opt_text(15)?.and_then(|p| serde_json::from_str(&p).ok()),
        };
        Ok(DeviceRecord { device, ak_public: r.blob(2)? })
    }

    const DEVICE_COLUMNS: &'static str = "device_id, hardware_class, ak_public, ek_certificate, enrolled_at, last_checkin_at, slot, version, image_sha256, attestation, attestation_reason, attested_at, health, sbom_sha256, labels, policy";

    /// A device's record and its attestation key.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRecord>, ServerError> {
        let sql = format!("SELECT {} FROM devices WHERE device_id = ?1", Self::DEVICE_COLUMNS);
        self.query(&sql, args![id]).await?.first().map(Self::device_from_row).transpose()
    }

    pub async fn devices(&self) -> Result<Vec<Device>, ServerError> {
        let sql = format!("SELECT {} FROM devices ORDER BY device_id", Self::DEVICE_COLUMNS);
        self.query(&sql, args![]).await?.iter().map(|r| Self::device_from_row(r).map(|d| d.device)).collect()
    }

    /// Sets a device's labels (rollout selectors match them).
    pub async fn set_device_labels(&self, device_id: &str, labels: &BTreeMap<String, String>) -> Result<bool, ServerError> {
        let update = args![json(labels), device_id];
        self.transaction(Mode::Autocommit, move |mut tx| async move {
            Ok(tx.execute("UPDATE devices SET labels = ?1 WHERE device_id = ?2", update).await? == 1)
        })
        .await
    }
}
