//! Devices: their records, labels and attestation state.

use std::collections::BTreeMap;

use outpost_protocol::attest::{AttestationState, DeviceHealth};
use serde::Serialize;

use super::{json, SqlEnum, Store};
use crate::storage::db::{Mode, Row};
use crate::args;
use crate::error::ServerError;

/// A device's record.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    pub device_id: String,
    pub hardware_class: String,
    #[serde(skip)]
    pub ak_public: Vec<u8>,
    pub has_ek_certificate: bool,
    pub enrolled_at: String,
    pub last_checkin_at: Option<String>,
    pub slot: Option<String>,
    pub version: Option<String>,
    pub image_sha256: Option<String>,
    pub sbom_sha256: Option<String>,
    pub health: Option<DeviceHealth>,
    pub attestation: AttestationState,
    pub attestation_reason: Option<String>,
    pub attested_at: Option<String>,
    /// The latest attestation failed: nothing may be assigned to this device.
    pub quarantined: bool,
    /// Labels rollout selectors match.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The network policy the device reported at its last attested check-in.
    pub policy: Option<serde_json::Value>,
}

impl Store {
    fn device_from_row(r: &Row) -> Result<Device, ServerError> {
        let attestation = AttestationState::from_sql("devices.attestation", &r.text(9)?)?;
        Ok(Device {
            device_id: r.text(0)?,
            hardware_class: r.text(1)?,
            ak_public: r.blob(2)?,
            has_ek_certificate: r.opt_blob(3)?.is_some(),
            enrolled_at: r.text(4)?,
            last_checkin_at: r.opt_text(5)?,
            slot: r.opt_text(6)?,
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
        })
    }

    const DEVICE_COLUMNS: &'static str = "device_id, hardware_class, ak_public, ek_certificate, enrolled_at, last_checkin_at, slot, version, image_sha256, attestation, attestation_reason, attested_at, health, sbom_sha256, labels, policy";

    pub async fn device(&self, id: &str) -> Result<Option<Device>, ServerError> {
        let sql = format!("SELECT {} FROM devices WHERE device_id = ?1", Self::DEVICE_COLUMNS);
        self.query(&sql, args![id]).await?.first().map(Self::device_from_row).transpose()
    }

    pub async fn devices(&self) -> Result<Vec<Device>, ServerError> {
        let sql = format!("SELECT {} FROM devices ORDER BY device_id", Self::DEVICE_COLUMNS);
        self.query(&sql, args![]).await?.iter().map(Self::device_from_row).collect()
    }

    /// Sets a device's labels (rollout selectors match them).
    pub async fn set_device_labels(&self, device_id: &str, labels: &BTreeMap<String, String>) -> Result<bool, ServerError> {
        let mut tx = self.tx(Mode::Autocommit).await?;
        Ok(tx.execute("UPDATE devices SET labels = ?1 WHERE device_id = ?2", args![json(labels), device_id]).await? == 1)
    }
}
