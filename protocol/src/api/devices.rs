//! `GET /api/v1/devices`, `GET /api/v1/devices/{id}`, `PUT /api/v1/devices/{id}/labels`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::reports::ReportRow;
use crate::attest::DeviceHealth;
use crate::slot::Slot;

pub use crate::attest::{AttestationState, Verdict};

/// A device's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub device_id: String,
    pub hardware_class: String,
    pub has_ek_certificate: bool,
    pub enrolled_at: String,
    pub last_checkin_at: Option<String>,
    /// The active slot at the last attested check-in.
    pub slot: Option<Slot>,
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
    pub labels: BTreeMap<String, String>,
    /// The network policy status the device reported at its last attested check-in.
    pub policy: Option<serde_json::Value>,
}

/// A device in the list, with the deny-list entries affecting the release it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedDevice {
    #[serde(flatten)]
    pub device: Device,
    pub vulnerable: Vec<String>,
}

/// `GET /api/v1/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<ListedDevice>,
}

/// One attestation of a device, newest first in [`DeviceDetail::attestations`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub at: String,
    pub verdict: Verdict,
    pub reason: Option<String>,
    pub slot: Option<Slot>,
    pub version: Option<String>,
    pub image_sha256: Option<String>,
}

/// `GET /api/v1/devices/{id}`: the record, its attestation history and the install
/// reports it made in attested check-ins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDetail {
    pub device: Device,
    pub vulnerable: Vec<String>,
    pub attestations: Vec<Attestation>,
    pub reports: Vec<ReportRow>,
}

/// `PUT /api/v1/devices/{id}/labels` body: the device's new labels (replacing all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsRequest {
    pub labels: BTreeMap<String, String>,
}

/// `PUT /api/v1/devices/{id}/labels`: the device's labels now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLabels {
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::round_trip;
    use serde_json::{json, Value};

    fn device() -> Value {
        json!({
            "device_id": "d1", "hardware_class": "gw", "has_ek_certificate": false, "enrolled_at": "2026-12-05T06:00:00+00:00",
            "last_checkin_at": "2026-12-05T06:01:00+00:00", "slot": "B", "version": "1.2.0", "image_sha256": "ab",
            "sbom_sha256": null, "health": "healthy", "attestation": "failed", "attestation_reason": "measured image unknown",
            "attested_at": "2026-12-05T06:01:00+00:00", "quarantined": true, "labels": {"site": "lab"},
            "policy": {"name": "base", "version": 3}
        })
    }

    #[test]
    fn the_device_list_round_trips() {
        let fresh = json!({
            "device_id": "d2", "hardware_class": "gw", "has_ek_certificate": true, "enrolled_at": "2026-12-05T06:00:00+00:00",
            "last_checkin_at": null, "slot": null, "version": null, "image_sha256": null, "sbom_sha256": null, "health": null,
            "attestation": "pending", "attestation_reason": null, "attested_at": null, "quarantined": false, "labels": {},
            "policy": null, "vulnerable": []
        });
        let mut listed = device();
        listed["vulnerable"] = json!(["CVE-1"]);
        let list: DeviceList = round_trip(json!({"devices": [listed, fresh]}));
        assert_eq!(list.devices[0].device.health, Some(DeviceHealth::Healthy));
        assert_eq!(list.devices[0].device.attestation, AttestationState::Failed);
        assert_eq!(list.devices[1].device.attestation, AttestationState::Pending);
        assert_eq!(list.devices[0].vulnerable, ["CVE-1"]);
    }

    #[test]
    fn the_device_detail_and_labels_round_trip() {
        let detail: DeviceDetail = round_trip(json!({
            "device": device(), "vulnerable": [],
            "attestations": [{"at": "2026-12-05T06:01:00+00:00", "verdict": "attested", "reason": null, "slot": "A", "version": "1.1.0", "image_sha256": "cd"}],
            "reports": [{"received_at": "2026-12-05T06:01:00+00:00", "device_id": "d1", "hardware_class": "gw", "target": "firmware/gw/1.2.0/fw.img",
                         "version": "1.2.0", "outcome": "rolled_back", "reason": "health check failed", "slot": "B", "at": "2026-12-05T06:00:59+00:00", "attested": true}]
        }));
        assert_eq!(detail.attestations[0].verdict, Verdict::Attested);
        let labels: DeviceLabels = round_trip(json!({"device_id": "d1", "labels": {"ring": "canary"}}));
        assert_eq!(labels.labels.len(), 1);
        let _: LabelsRequest = round_trip(json!({"labels": {"ring": "canary"}}));
    }

    #[test]
    fn an_unknown_attestation_state_is_refused() {
        let mut d = device();
        d["attestation"] = json!("maybe");
        assert!(serde_json::from_value::<Device>(d).is_err());
    }
}
