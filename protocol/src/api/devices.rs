//! `GET /api/v1/devices`, `GET /api/v1/devices/{id}`, `PUT /api/v1/devices/{id}/labels`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::reports::ReportRow;
use crate::attest::golden::Matched;
use crate::attest::DeviceHealth;
use crate::slot::Slot;

pub use crate::attest::golden::Role;
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
    /// For a class its boot chain measures, an attested check-in's measured-boot events
    /// beside the golden values they matched; null otherwise (a failed attestation's
    /// reason names the event that is not golden).
    #[serde(default)]
    pub boot_events: Option<BootEvents>,
}

/// The most JSON one check-in's boot events take when stored and shown: a real boot
/// (OVMF + GRUB) has about 35 events of PCRs 4, 8 and 9 in about 8 KiB.
pub const MAX_BOOT_EVENTS_JSON: usize = 64 << 10;

/// The events of PCRs 4, 8 and 9 of a boot that matched a release's golden values:
/// PCR 4's, then 8's, then 9's, each in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEvents {
    pub events: Vec<BootEvent>,
    /// Events after the last one shown, left out to keep within
    /// [`MAX_BOOT_EVENTS_JSON`] (0 for any real boot).
    pub omitted: usize,
}

/// One measured-boot event and the golden value it matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEvent {
    /// Its place in the event log (the header is record 0).
    pub record: usize,
    pub pcr: u32,
    /// The TCG name (`EV_IPL`), or `event type 0x…` for a code the spec does not name.
    pub event_type: String,
    /// The event's data as text, for string events (GRUB's commands and file names,
    /// firmware actions).
    pub text: Option<String>,
    /// The SHA-256 digest extended into the PCR.
    pub sha256: String,
    /// The golden value it matched.
    pub golden: Role,
}

impl From<&Matched> for BootEvent {
    fn from(m: &Matched) -> Self {
        BootEvent { record: m.record, pcr: m.pcr, event_type: m.event_type.to_string(), text: m.text.clone(), sha256: m.sha256.clone(), golden: m.role.clone() }
    }
}

impl BootEvents {
    /// A matched boot's events in the matcher's order, as many as fit in
    /// [`MAX_BOOT_EVENTS_JSON`] bytes of JSON; the rest are counted in `omitted`.
    pub fn bounded(matched: &[Matched]) -> Self {
        let mut events = Vec::new();
        let mut size = 0usize;
        for (i, m) in matched.iter().enumerate() {
            let event = BootEvent::from(m);
            let len = serde_json::to_vec(&event).map_or(usize::MAX, |v| v.len());
            size = size.saturating_add(len).saturating_add(1);
            if size > MAX_BOOT_EVENTS_JSON {
                return BootEvents { events, omitted: matched.len() - i };
            }
            events.push(event);
        }
        BootEvents { events, omitted: 0 }
    }
}

/// `GET /api/v1/devices/{id}`: the record, its attestation history and the install
/// reports it made in attested check-ins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDetail {
    pub device: Device,
    pub vulnerable: Vec<String>,
    pub attestations: Vec<Attestation>,
    pub reports: Vec<ReportRow>,
    /// Integrity incidents from attested check-ins, newest first.
    #[serde(default)]
    pub incidents: Vec<crate::api::reports::IncidentRow>,
    /// Client certificates the device CA issued the device, latest expiry first (the
    /// newest few). Servers before device certificates sent none.
    #[serde(default)]
    pub certificates: Vec<IssuedCertificate>,
}

/// A client certificate the device CA issued, as `GET /api/v1/devices/{id}` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub issued_at: String,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339, when an operator revoked it.
    #[serde(default)]
    pub revoked_at: Option<String>,
    #[serde(default)]
    pub revoked_reason: Option<String>,
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

/// `POST /api/v1/devices/{id}/certificates/revoke`: revokes the device's client
/// certificates and issues it none until `.../certificates/allow`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeCertificates {
    pub reason: String,
}

/// The answer to a revocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificatesRevoked {
    pub device_id: String,
    /// Unexpired certificates revoked now.
    pub revoked: u64,
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
            "attestations": [
                {"at": "2026-12-05T06:02:00+00:00", "verdict": "attested", "reason": null, "slot": "A", "version": "1.1.0", "image_sha256": "cd",
                 "boot_events": {"omitted": 0, "events": [
                    {"record": 29, "pcr": 4, "event_type": "EV_EFI_BOOT_SERVICES_APPLICATION", "text": null, "sha256": "46", "golden": {"kind": "bootloader", "name": "BOOTX64.EFI"}},
                    {"record": 30, "pcr": 4, "event_type": "EV_EFI_ACTION", "text": "Calling EFI Application from Boot Option", "sha256": "3d", "golden": {"kind": "firmware_string"}},
                    {"record": 55, "pcr": 8, "event_type": "EV_IPL", "text": "grub_cmd: linux /vmlinuz ro", "sha256": "5a", "golden": {"kind": "grub_command"}},
                    {"record": 56, "pcr": 9, "event_type": "EV_IPL", "text": "/vmlinuz", "sha256": "3d", "golden": {"kind": "kernel", "name": "vmlinuz"}},
                    {"record": 57, "pcr": 8, "event_type": "EV_IPL", "text": "kernel_cmdline: /vmlinuz ro", "sha256": "ee", "golden": {"kind": "kernel_cmdline"}},
                    {"record": 59, "pcr": 9, "event_type": "EV_IPL", "text": "/initrd.img", "sha256": "3c", "golden": {"kind": "initrd", "name": "initrd.img"}},
                    {"record": 60, "pcr": 9, "event_type": "event type 0x0000abcd", "text": null, "sha256": "77", "golden": {"kind": "boot_file", "name": "grub.cfg"}}
                 ]}},
                {"at": "2026-12-05T06:01:00+00:00", "verdict": "failed", "reason": "record 56 is not golden", "slot": "A", "version": null, "image_sha256": null, "boot_events": null}
            ],
            "reports": [{"received_at": "2026-12-05T06:01:00+00:00", "device_id": "d1", "hardware_class": "gw", "target": "firmware/gw/1.2.0/fw.img",
                         "version": "1.2.0", "outcome": "rolled_back", "reason": "health check failed", "slot": "B", "at": "2026-12-05T06:00:59+00:00", "attested": true}],
            "incidents": [{"received_at": "2026-12-05T06:03:00+00:00", "attested": true, "device_id": "d1", "hardware_class": "gw", "kind": "verity_data",
                           "dev": "254:3", "block": 2931, "slot": "B", "release": "1.2.0", "boot_at": "2026-12-05T06:02:30+00:00", "record": "dmesg-efi-176496120001001",
                           "line": "<3>[   95.123456] device-mapper: verity: 254:3: data block 2931 is corrupted"}],
            "certificates": [{"serial": "5a01", "issued_at": "2026-12-05T06:01:00+00:00", "not_after": "2026-12-05T07:01:00+00:00",
                              "revoked_at": "2026-12-05T06:30:00+00:00", "revoked_reason": "lost"}]
        }));
        assert_eq!(detail.incidents[0].incident.block, 2931);
        assert_eq!(detail.certificates[0].revoked_reason.as_deref(), Some("lost"));
        assert_eq!(detail.attestations[0].verdict, Verdict::Attested);
        let events = detail.attestations[0].boot_events.as_ref().map(|b| b.events.iter().map(|e| e.golden.clone()).collect::<Vec<_>>());
        assert_eq!(events.map(|g| g[3].clone()), Some(Role::Kernel("vmlinuz".into())));
        assert_eq!(detail.attestations[1].boot_events, None);
        // A server from before boot events sends none.
        let old: Attestation = serde_json::from_value(json!({"at": "t", "verdict": "attested", "reason": null, "slot": null, "version": null, "image_sha256": null}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(old.boot_events, None);
        let labels: DeviceLabels = round_trip(json!({"device_id": "d1", "labels": {"ring": "canary"}}));
        assert_eq!(labels.labels.len(), 1);
        let _: LabelsRequest = round_trip(json!({"labels": {"ring": "canary"}}));
    }

    fn matched(record: usize, text: String) -> Matched {
        use crate::attest::eventlog::EventType;
        Matched { record, pcr: 8, event_type: EventType::Ipl, text: Some(text), sha256: "ab".repeat(32), role: Role::GrubCommand }
    }

    /// Root on a device can append any number of GRUB command events to a log that
    /// still matches (they are allowed, and PCR 8 extends from user space): what is
    /// stored and shown of a check-in stays bounded, and says how much was left out.
    #[test]
    fn boot_events_are_bounded_and_say_how_many_were_left_out() {
        let few: Vec<Matched> = (1..=40).map(|r| matched(r, format!("grub_cmd: set slot={r}"))).collect();
        let kept = BootEvents::bounded(&few);
        assert_eq!((kept.events.len(), kept.omitted), (40, 0));
        assert_eq!(kept.events[0], BootEvent::from(&few[0]));
        assert_eq!(kept.events[0].event_type, "EV_IPL");
        let flood: Vec<Matched> = (1..=5000).map(|r| matched(r, format!("grub_cmd: echo {}", "x".repeat(200)))).collect();
        let kept = BootEvents::bounded(&flood);
        let size = serde_json::to_vec(&kept).map(|v| v.len()).unwrap_or(usize::MAX);
        assert!(size <= MAX_BOOT_EVENTS_JSON + 64, "{size} bytes");
        assert!(!kept.events.is_empty() && kept.omitted > 0);
        assert_eq!(kept.events.len() + kept.omitted, 5000);
        assert_eq!(kept.events.last().map(|e| e.record), Some(kept.events.len()), "the first events, in log order");
        // One event larger than the whole budget: nothing shown, and it is counted.
        let huge = BootEvents::bounded(&[matched(1, "x".repeat(MAX_BOOT_EVENTS_JSON))]);
        assert_eq!((huge.events.len(), huge.omitted), (0, 1));
    }

    #[test]
    fn an_unknown_attestation_state_is_refused() {
        let mut d = device();
        d["attestation"] = json!("maybe");
        assert!(serde_json::from_value::<Device>(d).is_err());
    }
}
