//! Integrity incidents: what a device learned about its own slot that nobody chose.
//! Today one kind: a block of a dm-verity root that failed verification. The kernel
//! restarts the machine at once (`restart_on_corruption`); its last messages survive in
//! pstore (EFI variables), and the next boot's agent reads the kernel's line from there
//! and reports it. The line is the kernel's; the fields beside it are what the agent
//! read out of it, and the server checks the two agree.

use serde::{Deserialize, Serialize};

use crate::slot::Slot;

/// The longest kernel line an incident carries (dm-verity's is under 100 characters).
pub const MAX_LINE: usize = 512;
/// The most incidents one message (a check-in, or a POST) carries: a device whose
/// pstore held more sends the rest next time.
pub const MAX_PER_MESSAGE: usize = 16;

/// What failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    /// A data block of the verified device (the filesystem's bytes).
    VerityData,
    /// A block of its hash tree.
    VerityMetadata,
}

impl IncidentKind {
    pub const ALL: [IncidentKind; 2] = [IncidentKind::VerityData, IncidentKind::VerityMetadata];

    pub fn as_str(self) -> &'static str {
        match self {
            IncidentKind::VerityData => "verity_data",
            IncidentKind::VerityMetadata => "verity_metadata",
        }
    }

    /// The word dm-verity prints for this kind ("data block N is corrupted").
    pub fn kernel_word(self) -> &'static str {
        match self {
            IncidentKind::VerityData => "data",
            IncidentKind::VerityMetadata => "metadata",
        }
    }
}

/// One block that failed verification, as a device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrityIncident {
    pub device_id: String,
    pub hardware_class: String,
    pub kind: IncidentKind,
    /// The kernel's name of the verified device's data device ("major:minor").
    pub dev: String,
    /// The block number dm-verity printed (4096-byte blocks from the device's start).
    pub block: u64,
    /// The slot whose partition that device is, when it is one of the two.
    pub slot: Option<Slot>,
    /// The release that slot ran, when the device knows it.
    pub release: Option<String>,
    /// When the boot the record came from wrote it (RFC 3339): the pstore record's time.
    pub boot_at: String,
    /// The pstore record it was read from ("dmesg-efi-…"): with the device id, dev and
    /// block it names the incident, so a record sent twice (the agent crashed after
    /// sending, before forgetting) is stored once.
    pub record: String,
    /// The kernel's line, as it printed it.
    pub line: String,
}

/// A dm-verity corruption line of the kernel's log: `device-mapper: verity: 254:3:
/// data block 2931 is corrupted` (possibly after a `<3>[ 12.345678] ` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityLine {
    pub kind: IncidentKind,
    pub dev: String,
    pub block: u64,
}

const VERITY_PREFIX: &str = "device-mapper: verity: ";

/// Reads a dm-verity corruption line; None for any other line.
pub fn parse_verity_line(line: &str) -> Option<VerityLine> {
    let rest = &line[line.find(VERITY_PREFIX)? + VERITY_PREFIX.len()..];
    let (dev, rest) = rest.split_once(": ")?;
    let (major, minor) = dev.split_once(':')?;
    if major.is_empty() || minor.is_empty() || !(major.bytes().chain(minor.bytes()).all(|b| b.is_ascii_digit())) || dev.len() > 16 {
        return None;
    }
    let (word, rest) = rest.split_once(" block ")?;
    let kind = IncidentKind::ALL.into_iter().find(|k| k.kernel_word() == word)?;
    let number = rest.trim_end().strip_suffix(" is corrupted")?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(VerityLine { kind, dev: dev.to_owned(), block: number.parse().ok()? })
}

impl IntegrityIncident {
    /// Field limits and agreement with the kernel's line; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value, max) in [
            ("device_id", &self.device_id, 128),
            ("hardware_class", &self.hardware_class, 64),
            ("dev", &self.dev, 16),
            ("boot_at", &self.boot_at, 64),
            ("record", &self.record, 64),
            ("line", &self.line, MAX_LINE),
        ] {
            if value.is_empty() || value.len() > max {
                return Err(format!("{name} must be 1-{max} characters"));
            }
        }
        if i64::try_from(self.block).is_err() {
            return Err(format!("block {} is beyond any device", self.block));
        }
        if self.release.as_ref().is_some_and(|r| r.is_empty() || r.len() > 64) {
            return Err("release must be 1-64 characters".into());
        }
        if self.line.chars().any(char::is_control) {
            return Err("line must be one line of printable text".into());
        }
        if !self.record.starts_with("dmesg-") || !self.record.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("record {:?} is not a pstore dmesg record name (dmesg-<backend>-<id>)", self.record));
        }
        if chrono::DateTime::parse_from_rfc3339(&self.boot_at).is_err() {
            return Err(format!("boot_at {:?} is not an RFC 3339 time", self.boot_at));
        }
        let read = parse_verity_line(&self.line).ok_or_else(|| "line is not a dm-verity corruption line (device-mapper: verity: MAJ:MIN: data|metadata block N is corrupted)".to_owned())?;
        if read.kind != self.kind {
            return Err(format!("kind {} disagrees with the line, which says {}", self.kind.as_str(), read.kind.as_str()));
        }
        if read.dev != self.dev {
            return Err(format!("dev {} disagrees with the line, which says {}", self.dev, read.dev));
        }
        if read.block != self.block {
            return Err(format!("block {} disagrees with the line, which says {}", self.block, read.block));
        }
        Ok(())
    }
}

/// An incident a check-in carried that the server did not store, and why. The
/// check-in itself stands: one bad incident (a queue file edited on the device, an
/// agent older or newer than the server) must not cost the device its check-ins, and
/// with them its updates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedIncident {
    /// Its place in the message's `incidents`.
    pub index: usize,
    pub reason: String,
}

/// Sorts a message's incidents: those that are valid and of the device that sends them,
/// and the refused ones with the reason naming the field. More than
/// [`MAX_PER_MESSAGE`] is an error for the whole message (no agent sends that many).
pub fn sort_out(device_id: &str, incidents: &[IntegrityIncident]) -> Result<(Vec<IntegrityIncident>, Vec<RefusedIncident>), String> {
    if incidents.len() > MAX_PER_MESSAGE {
        return Err(format!("incidents: {} in one message, at most {MAX_PER_MESSAGE}", incidents.len()));
    }
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    for (index, incident) in incidents.iter().enumerate() {
        let check = incident.validate().and_then(|()| {
            if incident.device_id == device_id {
                Ok(())
            } else {
                Err(format!("device_id {} is not the sending device {device_id}", incident.device_id))
            }
        });
        match check {
            Ok(()) => kept.push(incident.clone()),
            Err(m) => refused.push(RefusedIncident { index, reason: format!("incidents[{index}]: {m}") }),
        }
    }
    Ok((kept, refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn incident() -> IntegrityIncident {
        IntegrityIncident {
            device_id: "vm-1".into(),
            hardware_class: "qemu-x86_64".into(),
            kind: IncidentKind::VerityData,
            dev: "254:3".into(),
            block: 2931,
            slot: Some(Slot::B),
            release: Some("2.0.0".into()),
            boot_at: "2026-12-05T19:00:00Z".into(),
            record: "dmesg-efi-176496120001001".into(),
            line: "<3>[   95.123456] device-mapper: verity: 254:3: data block 2931 is corrupted".into(),
        }
    }

    #[test]
    fn dm_verity_lines_are_read_and_nothing_else_is() {
        let read = parse_verity_line("<3>[   95.123456] device-mapper: verity: 254:3: data block 2931 is corrupted");
        assert_eq!(read, Some(VerityLine { kind: IncidentKind::VerityData, dev: "254:3".into(), block: 2931 }));
        let meta = parse_verity_line("device-mapper: verity: 8:2: metadata block 7 is corrupted\n");
        assert_eq!(meta.map(|l| (l.kind, l.block)), Some((IncidentKind::VerityMetadata, 7)));
        for other in [
            "<3>[   95.2] device-mapper: verity: 254:3: reached maximum errors",
            "<0>[   95.3] Restarting system with command 'dm-verity device corrupted'",
            "device-mapper: verity: 254:3: data block -1 is corrupted",
            "device-mapper: verity: 254:3: data block 99999999999999999999999 is corrupted",
            "device-mapper: verity: x:3: data block 1 is corrupted",
            "device-mapper: verity: 254:3: inode block 1 is corrupted",
            "device-mapper: verity: 254:3: data block 1 is fine",
            "",
        ] {
            assert_eq!(parse_verity_line(other), None, "{other:?}");
        }
    }

    #[test]
    fn an_incident_must_agree_with_its_kernel_line_and_stay_within_bounds() {
        assert_eq!(incident().validate(), Ok(()));
        let refused = |f: &dyn Fn(&mut IntegrityIncident)| {
            let mut i = incident();
            f(&mut i);
            i.validate().err().unwrap_or_default()
        };
        assert!(refused(&|i| i.block = 2932).starts_with("block 2932 disagrees"), "{}", refused(&|i| i.block = 2932));
        assert!(refused(&|i| i.dev = "254:2".into()).starts_with("dev 254:2 disagrees"));
        assert!(refused(&|i| i.kind = IncidentKind::VerityMetadata).starts_with("kind verity_metadata disagrees"));
        assert!(refused(&|i| i.line = "x".repeat(MAX_LINE + 1)).starts_with("line must be 1-512"));
        assert!(refused(&|i| i.line = "kernel: hello".into()).starts_with("line is not a dm-verity corruption line"));
        assert!(refused(&|i| i.line.push_str("\n<3>device-mapper: verity: 254:3: data block 1 is corrupted")).starts_with("line must be one line"));
        assert!(refused(&|i| i.record = "../../etc".into()).starts_with("record \"../../etc\" is not a pstore"));
        assert!(refused(&|i| i.boot_at = "yesterday".into()).starts_with("boot_at \"yesterday\" is not"));
        assert!(refused(&|i| i.device_id = String::new()).starts_with("device_id must be 1-128"));
        assert!(refused(&|i| i.release = Some("v".repeat(65))).starts_with("release must be 1-64"));
    }

    #[test]
    fn a_message_keeps_its_own_device_s_valid_incidents_and_names_the_others() {
        assert_eq!(sort_out("vm-1", &[incident()]), Ok((vec![incident()], vec![])));
        let (kept, refused) = sort_out("vm-2", &[incident()]).unwrap_or_default();
        assert!(kept.is_empty());
        assert_eq!(refused, [RefusedIncident { index: 0, reason: "incidents[0]: device_id vm-1 is not the sending device vm-2".into() }]);
        let many = vec![incident(); MAX_PER_MESSAGE + 1];
        assert!(sort_out("vm-1", &many).err().unwrap_or_default().starts_with("incidents: 17 in one message"));
        let mut bad = incident();
        bad.block = 1;
        let (kept, refused) = sort_out("vm-1", &[bad, incident()]).unwrap_or_default();
        assert_eq!(kept, [incident()], "the valid one after a refused one is kept");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].index, 0);
        assert!(refused[0].reason.starts_with("incidents[0]: block 1 disagrees with the line, which says 2931"), "{refused:?}");
    }

    #[test]
    fn the_wire_form_is_strict() {
        let json = serde_json::to_value(incident()).unwrap_or_default();
        assert_eq!(json["kind"], "verity_data");
        let mut extra = json.clone();
        extra["note"] = "x".into();
        assert!(serde_json::from_value::<IntegrityIncident>(extra).is_err());
        let mut kind = json;
        kind["kind"] = "rootkit".into();
        assert!(serde_json::from_value::<IntegrityIncident>(kind).is_err());
    }
}
