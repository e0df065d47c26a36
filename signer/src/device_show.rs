//! `outpost device show` for people: the record, its integrity incidents (dm-verity
//! blocks that failed verification, from attested check-ins), the attestation history, and the
//! newest attested boot's measured events beside the golden values they matched (the
//! server keeps them only for an attested check-in of a class its boot chain
//! measures). `--json` prints the whole `DeviceDetail`, every event included.

use outpost_protocol::api::devices::{Attestation, BootEvent, BootEvents, DeviceDetail, IssuedCertificate, Role, Verdict};
use outpost_protocol::api::reports::IncidentRow;
use outpost_protocol::attest::DeviceHealth;
use outpost_protocol::slot::Slot;

/// How much of a digest the table shows.
const SHORT_DIGEST: usize = 12;

fn or_dash(v: Option<&str>) -> &str {
    v.unwrap_or("-")
}

/// What an event matched, for people.
pub(crate) fn golden_label(role: &Role) -> String {
    match role {
        Role::Bootloader(name) => format!("bootloader {name}"),
        Role::Kernel(name) => format!("kernel {name}"),
        Role::Initrd(name) => format!("initrd {name}"),
        Role::BootFile(name) => format!("boot file {name}"),
        Role::KernelCmdline => "kernel command line".to_owned(),
        Role::GrubCommand => "grub command".to_owned(),
        // EV_EFI_ACTION or EV_SEPARATOR whose digest hashes its own data.
        Role::FirmwareString => "firmware action/separator".to_owned(),
    }
}

fn short(digest: &str) -> &str {
    digest.get(..SHORT_DIGEST).unwrap_or(digest)
}

/// The events as a table: record, PCR, type, digest (short), golden value, text.
pub(crate) fn boot_table(boot: &BootEvents) -> String {
    let row = |record: &str, pcr: &str, ty: &str, digest: &str, golden: &str, text: &str| {
        format!("{record:<6}  {pcr:<3}  {ty:<32}  {digest:<12}  {golden:<28}  {text}").trim_end().to_owned()
    };
    let mut lines = vec![row("record", "pcr", "type", "digest", "matched golden value", "text")];
    for BootEvent { record, pcr, event_type, text, sha256, golden } in &boot.events {
        lines.push(row(&record.to_string(), &pcr.to_string(), event_type, short(sha256), &golden_label(golden), or_dash(text.as_deref())));
    }
    if boot.omitted > 0 {
        lines.push(format!("({} later events not kept: the server keeps a boot's events up to a size limit)", boot.omitted));
    }
    lines.join("\n")
}

fn history_line(a: &Attestation) -> String {
    let line = format!(
        "  {:<32} {:<8} {:<10} {:<4} {}",
        a.at,
        a.verdict.as_str(),
        or_dash(a.version.as_deref()),
        or_dash(a.slot.map(Slot::as_str)),
        a.reason.as_deref().unwrap_or("")
    );
    line.trim_end().to_owned()
}

fn incident_line(row: &IncidentRow) -> String {
    let i = &row.incident;
    format!(
        "  {} block {} of {} (slot {}, release {}) in the boot of {}: {}",
        i.kind.as_str(),
        i.block,
        i.dev,
        or_dash(i.slot.map(Slot::as_str)),
        or_dash(i.release.as_deref()),
        i.boot_at,
        i.line
    )
}

fn certificate_line(c: &IssuedCertificate) -> String {
    let reason = c.revoked_reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
    let state = c.revoked_at.as_deref().map(|at| format!("REVOKED {at}{reason}")).unwrap_or_default();
    format!("  {} issued {} expires {} {state}", c.serial, c.issued_at, c.not_after).trim_end().to_owned()
}

/// The device as `device show` prints it without `--json`.
pub(crate) fn detail_text(v: &DeviceDetail) -> String {
    let d = &v.device;
    let mut out = vec![
        format!("device {} (class {}, enrolled {})", d.device_id, d.hardware_class, d.enrolled_at),
        format!(
            "runs {} (image {}) in slot {}, health {}",
            or_dash(d.version.as_deref()),
            or_dash(d.image_sha256.as_deref()),
            or_dash(d.slot.map(Slot::as_str)),
            or_dash(d.health.map(DeviceHealth::as_str))
        ),
    ];
    let state = if d.quarantined { "QUARANTINED" } else { d.attestation.as_str() };
    out.push(format!("attestation {state}{}", d.attestation_reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()));
    if !v.vulnerable.is_empty() {
        out.push(format!("VULNERABLE: {}", v.vulnerable.join(", ")));
    }
    if !v.incidents.is_empty() {
        out.push(format!("\nINTEGRITY INCIDENTS, newest first ({}):", v.incidents.len()));
        out.extend(v.incidents.iter().map(incident_line));
    }
    out.push(format!("\nattestations, newest first ({}):", v.attestations.len()));
    out.extend(v.attestations.iter().map(history_line));
    let newest_boot = v.attestations.iter().find_map(|a| match (&a.verdict, &a.boot_events) {
        (Verdict::Attested, Some(boot)) => Some((a, boot)),
        _ => None,
    });
    match newest_boot {
        Some((a, boot)) => {
            out.push(format!("\nmeasured boot of the attested check-in at {} ({}), beside the golden values:", a.at, or_dash(a.version.as_deref())));
            out.push(boot_table(boot));
        }
        None => out.push("\nno measured-boot events (none kept: the class is not measured by its boot chain, or no check-in attested)".to_owned()),
    }
    if !v.certificates.is_empty() {
        out.push(format!("\nclient certificates, latest expiry first ({}):", v.certificates.len()));
        out.extend(v.certificates.iter().map(certificate_line));
    }
    out.push(format!("\ninstall reports from attested check-ins: {} (--json shows them)", v.reports.len()));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn detail() -> DeviceDetail {
        let event = |record: u32, pcr: u32, ty: &str, text: Option<&str>, fill: &str, golden: serde_json::Value| {
            json!({"record": record, "pcr": pcr, "event_type": ty, "text": text, "sha256": fill.repeat(32), "golden": golden})
        };
        let boot = json!({"omitted": 0, "events": [
            event(29, 4, "EV_EFI_BOOT_SERVICES_APPLICATION", None, "46", json!({"kind": "bootloader", "name": "BOOTX64.EFI"})),
            event(30, 4, "EV_EFI_ACTION", Some("Calling EFI Application from Boot Option"), "3d", json!({"kind": "firmware_string"})),
            event(55, 8, "EV_IPL", Some("grub_cmd: linux /vmlinuz ro"), "5a", json!({"kind": "grub_command"})),
            event(56, 9, "EV_IPL", Some("/vmlinuz"), "3e", json!({"kind": "kernel", "name": "vmlinuz"})),
            event(57, 8, "EV_IPL", Some("kernel_cmdline: /vmlinuz ro"), "ee", json!({"kind": "kernel_cmdline"})),
            event(59, 9, "EV_IPL", Some("/initrd.img"), "3c", json!({"kind": "initrd", "name": "initrd.img"})),
        ]});
        let older = boot.clone();
        let row = |at: &str, verdict: &str, reason: Option<&str>, version: Option<&str>, boot: serde_json::Value| {
            json!({"at": at, "verdict": verdict, "reason": reason, "slot": "A", "version": version, "image_sha256": null, "boot_events": boot})
        };
        serde_json::from_value(json!({
            "device": {"device_id": "d1", "hardware_class": "vm", "has_ek_certificate": true, "enrolled_at": "t0", "last_checkin_at": "t3",
                       "slot": "A", "version": null, "image_sha256": null, "sbom_sha256": null, "health": "healthy", "attestation": "failed",
                       "attestation_reason": "record 56 (PCR 9) is not golden", "attested_at": "t3", "quarantined": true, "labels": {}, "policy": null},
            "vulnerable": [],
            "attestations": [
                row("t3", "failed", Some("record 56 (PCR 9) is not golden"), None, json!(null)),
                row("t2", "attested", None, Some("2.0.0"), boot),
                row("t1", "attested", None, Some("1.0.0"), older),
            ],
            "reports": [],
            "incidents": [{"received_at": "t4", "attested": true, "device_id": "d1", "hardware_class": "vm", "kind": "verity_data", "dev": "254:3",
                           "block": 50558, "slot": "B", "release": "2.0.0", "boot_at": "2026-12-05T19:24:00Z", "record": "dmesg-efi-176496264001001",
                           "line": "<3>[   23.915531] device-mapper: verity: 254:3: data block 50558 is corrupted"}],
            "certificates": [
                {"serial": "5a01", "issued_at": "t3", "not_after": "t3+1h"},
                {"serial": "5a00", "issued_at": "t2", "not_after": "t2+1h", "revoked_at": "t2+5m", "revoked_reason": "lost"}
            ]
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_newest_attested_boot_is_shown_beside_its_golden_values() {
        let text = detail_text(&detail());
        assert!(text.contains("attestation QUARANTINED: record 56 (PCR 9) is not golden"), "{text}");
        assert!(text.contains("INTEGRITY INCIDENTS, newest first (1):\n  verity_data block 50558 of 254:3 (slot B, release 2.0.0) in the boot of 2026-12-05T19:24:00Z: <3>["), "{text}");
        assert!(text.contains("measured boot of the attested check-in at t2 (2.0.0)"), "the failed one keeps none: {text}");
        assert!(
            text.contains("client certificates, latest expiry first (2):\n  5a01 issued t3 expires t3+1h\n  5a00 issued t2 expires t2+1h REVOKED t2+5m: lost\n"),
            "{text}"
        );
        let table: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.starts_with("record"))
            .take_while(|l| !l.is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(table[0], ["record", "pcr", "type", "digest", "matched", "golden", "value", "text"]);
        assert_eq!(table[1], ["29", "4", "EV_EFI_BOOT_SERVICES_APPLICATION", "464646464646", "bootloader", "BOOTX64.EFI", "-"]);
        assert_eq!(table[2][4..], ["firmware", "action/separator", "Calling", "EFI", "Application", "from", "Boot", "Option"]);
        assert_eq!(table[3][4..], ["grub", "command", "grub_cmd:", "linux", "/vmlinuz", "ro"]);
        assert_eq!(table[4][3..], ["3e3e3e3e3e3e", "kernel", "vmlinuz", "/vmlinuz"]);
        assert_eq!(table[5][4..], ["kernel", "command", "line", "kernel_cmdline:", "/vmlinuz", "ro"]);
        assert_eq!(table[6][4..], ["initrd", "initrd.img", "/initrd.img"]);
        assert_eq!(table.len(), 7);
    }

    #[test]
    fn a_device_without_boot_events_says_so_and_left_out_events_are_counted() {
        let mut d = detail();
        for a in &mut d.attestations {
            a.boot_events = None;
        }
        assert!(detail_text(&d).contains("no measured-boot events"));
        let mut boot = detail().attestations[1].boot_events.clone().unwrap_or_else(|| panic!("events"));
        boot.omitted = 7;
        assert!(boot_table(&boot).ends_with("(7 later events not kept: the server keeps a boot's events up to a size limit)"));
    }
}
