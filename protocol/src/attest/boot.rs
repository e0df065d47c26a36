//! Judging a check-in of a class measured by its boot chain: the firmware's event log
//! the device sent must replay to its quote and match the golden values signed into
//! one of the class's releases. The release it matches is what the device runs, by
//! measurement. Releases whose golden values are the same (the same kernel, initrd
//! and command lines: without a root hash on the command line the root filesystem is
//! not measured) cannot be told apart by the boot: among those, the device's claim
//! decides (docs/devices.md, "Not there yet").

use base64::Engine;

use super::eventlog::EventLog;
use super::golden::{GoldenValues, Matched};
use super::replay::QuotedLog;
use super::tpm::Quote;
use crate::error::Error;

/// The largest event log accepted (its base64 text is a third larger).
pub const MAX_BOOT_LOG: usize = 4 << 20;

/// A release the boot may match: its version, image digest and golden values.
pub struct Candidate<'a> {
    pub version: &'a str,
    pub image_sha256: &'a str,
    pub golden: &'a GoldenValues,
}

/// The release a boot matched, and its events beside their golden values.
#[derive(Debug, Clone)]
pub struct BootMatch {
    /// Index into the candidates.
    pub release: usize,
    pub events: Vec<Matched>,
}

/// Decodes the check-in's `boot_log` (base64, at most [`MAX_BOOT_LOG`] bytes).
pub fn decode_boot_log(text: &str) -> Result<Vec<u8>, String> {
    if text.len() > MAX_BOOT_LOG / 3 * 4 + 4 {
        return Err(format!("boot event log is {} bytes of base64, more than the {MAX_BOOT_LOG}-byte log limit", text.len()));
    }
    base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| format!("boot event log is not base64: {e}"))
}

/// What the device says it runs (either may be absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Claim<'a> {
    pub version: Option<&'a str>,
    pub image_sha256: Option<&'a str>,
}

/// Which candidate's golden values the boot matches. The release the device says it
/// runs is tried first, and its mismatch is the reason given when none matches (else
/// the first candidate's): that names the event that differs. A claimed image digest
/// must be the matched release's.
pub fn judge_boot_log(log: &[u8], quote: &Quote, candidates: &[Candidate<'_>], claim: Claim<'_>) -> Result<BootMatch, String> {
    let found = match_boot(log, quote, candidates, claim.version)?;
    let release = &candidates[found.release];
    match claim.image_sha256 {
        Some(claimed) if claimed != release.image_sha256 => {
            Err(format!("reported image {claimed} is not the image of release {}, whose boot chain was measured", release.version))
        }
        _ => Ok(found),
    }
}

fn match_boot(log: &[u8], quote: &Quote, candidates: &[Candidate<'_>], claimed: Option<&str>) -> Result<BootMatch, String> {
    // Parsed and replayed against the quote once: a log that fails either fails the
    // same against every release.
    let parsed = EventLog::parse(log).map_err(|e| format!("boot event log: {e}"))?;
    let quoted = QuotedLog::check(&parsed, quote).map_err(|e| format!("boot event log: {e}"))?;
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|i| Some(candidates[*i].version) != claimed);
    let mut first: Option<(usize, Error)> = None;
    for i in order {
        match candidates[i].golden.check(&quoted) {
            Ok(events) => return Ok(BootMatch { release: i, events }),
            Err(e) => {
                first.get_or_insert((i, e));
            }
        }
    }
    Err(match first {
        Some((i, e)) => format!("the measured boot is not release {}'s: {e}", candidates[i].version),
        None => "no signed release of this hardware class carries golden boot values (release publish --boot-*): nothing to match the boot against".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::eventlog::{EventLog, EventType};
    use crate::attest::golden::GoldenFile;

    const REAL_LOG: &[u8] = include_bytes!("testdata/ovmf-grub-debian.binary_bios_measurements");

    /// Golden values read off the real boot's own events (the golden module's tests
    /// check them against the build's files): what a release of this boot signs.
    fn golden_of(log: &EventLog) -> GoldenValues {
        let hexd = |e: &crate::attest::eventlog::Event| hex::encode(e.sha256);
        let file = |suffix: &str| {
            let e = log.pcr_events(9).find(|e| e.text().is_some_and(|t| t.ends_with(suffix))).unwrap_or_else(|| panic!("{suffix}"));
            GoldenFile { name: suffix.into(), sha256: hexd(e) }
        };
        let efi = log.pcr_events(4).find(|e| e.event_type == EventType::EfiBootServicesApplication).unwrap_or_else(|| panic!("no EFI app"));
        let cmdline = log.pcr_events(8).find_map(|e| e.text().and_then(|t| t.strip_prefix("kernel_cmdline: "))).unwrap_or_else(|| panic!("no cmdline"));
        GoldenValues {
            bootloaders: vec![GoldenFile { name: "BOOTX64.EFI".into(), sha256: hexd(efi) }],
            kernel: file("/boot/vmlinuz"),
            initrd: file("/boot/initrd.img"),
            kernel_cmdlines: vec![cmdline.to_owned()],
            boot_files: vec![file("/EFI/outpost/grub.cfg"), file("/EFI/outpost/grubenv")],
        }
    }

    #[test]
    fn the_boot_matches_the_release_whose_golden_values_it_measured_whatever_the_device_claims() {
        let log = EventLog::parse(REAL_LOG).unwrap_or_else(|e| panic!("{e}"));
        let values = log.replay_sha256().unwrap_or_else(|e| panic!("{e}"));
        let quote = crate::attest::testlog::quote_of(&values, &super::super::golden::GOLDEN_PCRS);
        let good = golden_of(&log);
        let mut other = good.clone();
        other.kernel.sha256 = "ab".repeat(32);
        let candidates = [
            Candidate { version: "2.0.0", image_sha256: &"22".repeat(32), golden: &other },
            Candidate { version: "1.0.0", image_sha256: &"11".repeat(32), golden: &good },
        ];
        // The device claims 2.0.0; its boot is 1.0.0's.
        let m = judge_boot_log(REAL_LOG, &quote, &candidates, Claim { version: Some("2.0.0"), image_sha256: None }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.release, 1);
        assert!(m.events.iter().any(|e| e.text.as_deref().is_some_and(|t| t.starts_with("kernel_cmdline: "))));
        // Only 2.0.0 signed: the reason names the kernel event that differs.
        let err = judge_boot_log(REAL_LOG, &quote, &candidates[..1], Claim { version: Some("2.0.0"), image_sha256: None }).unwrap_err();
        assert!(err.contains("release 2.0.0") && err.contains("record 56"), "{err}");
        // A log that does not replay to the quote fails whatever the release.
        let stale = crate::attest::testlog::quote_of(&crate::attest::replay::reset_values(), &super::super::golden::GOLDEN_PCRS);
        let err = judge_boot_log(REAL_LOG, &stale, &candidates, Claim::default()).unwrap_err();
        assert!(err.starts_with("boot event log:"), "{err}");
        assert!(judge_boot_log(REAL_LOG, &quote, &[], Claim::default()).unwrap_err().contains("no signed release"));
        // A device that booted 1.0.0 and reports 2.0.0's image digest (to be counted as
        // running it) is refused, whichever version it names.
        for version in [Some("1.0.0"), Some("2.0.0"), None] {
            let lie = Claim { version, image_sha256: Some(candidates[0].image_sha256) };
            let err = judge_boot_log(REAL_LOG, &quote, &candidates, lie).unwrap_err();
            assert!(err.contains("is not the image of release 1.0.0"), "{err}");
        }
        let truth = Claim { version: Some("1.0.0"), image_sha256: Some(candidates[1].image_sha256) };
        assert_eq!(judge_boot_log(REAL_LOG, &quote, &candidates, truth).map(|m| m.release), Ok(1));
    }

    #[test]
    fn the_boot_log_text_is_bounded_base64() {
        assert_eq!(decode_boot_log("aGk=").unwrap(), b"hi");
        assert!(decode_boot_log("not base64!").unwrap_err().contains("not base64"));
        assert!(decode_boot_log(&"A".repeat(MAX_BOOT_LOG * 2)).unwrap_err().contains("limit"));
    }
}
