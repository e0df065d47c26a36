//! Replaying a TCG event log's SHA-256 bank and holding it against a TPM quote.
//!
//! The log itself proves nothing: whoever has root on the device can write any bytes.
//! What the TPM signs is a digest over the PCR values it holds, and PCRs 0-15 can only
//! be extended, never set, until the platform resets. A log whose events, extended in
//! order from the reset values, give exactly the quoted digest is the log of this boot
//! for those PCRs: an event dropped, added, changed or moved within its PCR gives
//! another digest. Events of PCRs the quote does not cover are not vouched for, so
//! [`QuotedLog`] only hands out events of quoted PCRs.

use sha2::{Digest, Sha256};

use crate::attest::eventlog::{Event, EventLog, EventType, MAX_PCR};
use crate::attest::tpm::Quote;
use crate::error::{Error, Result};

/// SHA-256 values of PCRs 0-23.
pub type PcrValues = [[u8; 32]; 24];

/// The values PCRs hold after TPM2_Startup(CLEAR) on a PC Client TPM: zero, except the
/// dynamic-launch PCRs 17-22, which hold all ones until a dynamic launch resets them.
pub fn reset_values() -> PcrValues {
    let mut values = [[0u8; 32]; 24];
    for v in &mut values[17..=22] {
        *v = [0xff; 32];
    }
    values
}

impl EventLog {
    /// The SHA-256 PCR values this log leads to. EV_NO_ACTION events are not extended;
    /// the StartupLocality one sets PCR 0's starting value to the locality the TPM was
    /// started from, and must come before anything is extended into PCR 0.
    pub fn replay_sha256(&self) -> Result<PcrValues> {
        let mut values = reset_values();
        let mut pcr0_extended = false;
        for e in &self.events {
            if e.event_type == EventType::NoAction {
                if let Some(locality) = e.startup_locality() {
                    if pcr0_extended || locality > 4 {
                        return Err(Error::Replay(format!(
                            "record {} (byte {}): StartupLocality {locality} {}",
                            e.record,
                            e.offset,
                            if pcr0_extended { "comes after PCR 0 was extended" } else { "is not a TPM locality (0-4)" }
                        )));
                    }
                    values[0] = [0; 32];
                    values[0][31] = locality;
                }
                continue;
            }
            pcr0_extended |= e.pcr == 0;
            let value = &mut values[e.pcr as usize];
            let mut h = Sha256::new();
            h.update(*value);
            h.update(e.sha256);
            value.copy_from_slice(&h.finalize());
        }
        Ok(values)
    }
}

/// The quote's `pcrDigest` for `values`: SHA-256 over the selected PCRs' values in
/// ascending index order.
pub fn pcr_digest(values: &PcrValues, pcrs: &[u32]) -> [u8; 32] {
    let mut sorted = pcrs.to_vec();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for p in sorted {
        if let Some(v) = values.get(p as usize) {
            h.update(v);
        }
    }
    h.finalize().into()
}

/// An event log that replays to a quote: its events in the quoted PCRs are the ones
/// the TPM holds.
#[derive(Debug)]
pub struct QuotedLog<'a> {
    log: &'a EventLog,
    pcrs: Vec<u32>,
    values: PcrValues,
}

impl<'a> QuotedLog<'a> {
    /// Replays `log` and checks it against `quote`'s PCR selection (one SHA-256 bank)
    /// and digest. The quote's signature and nonce are the caller's to check first
    /// (`Quote::verify`, `verify_checkin_quote`).
    pub fn check(log: &'a EventLog, quote: &Quote) -> Result<Self> {
        let pcrs = quote.sha256_pcrs()?.to_vec();
        if let Some(p) = pcrs.iter().find(|p| **p > MAX_PCR) {
            return Err(Error::Replay(format!("the quote selects PCR {p}, which a PC Client TPM does not have")));
        }
        let values = log.replay_sha256()?;
        let replayed = pcr_digest(&values, &pcrs);
        if quote.pcr_digest != replayed {
            return Err(Error::Replay(format!(
                "{} events replayed over PCRs {pcrs:?} give digest {}, the TPM quoted {}: the log is not this boot's \
                 (an event was changed, dropped, added or moved)",
                log.events.len(),
                hex::encode(replayed),
                hex::encode(&quote.pcr_digest)
            )));
        }
        Ok(QuotedLog { log, pcrs, values })
    }

    /// The PCRs the quote covers, ascending.
    pub fn pcrs(&self) -> &[u32] {
        &self.pcrs
    }

    pub fn covers(&self, pcr: u32) -> bool {
        self.pcrs.contains(&pcr)
    }

    /// The quoted value of `pcr`, or None when the quote does not cover it.
    pub fn value(&self, pcr: u32) -> Option<&[u8; 32]> {
        self.covers(pcr).then(|| &self.values[pcr as usize])
    }

    /// The events of `pcr`, in order; empty when the quote does not cover it (nothing
    /// vouches for them).
    pub fn events(&self, pcr: u32) -> impl Iterator<Item = &'a Event> {
        let covered = self.covers(pcr);
        self.log.events.iter().filter(move |e| covered && e.pcr == pcr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::testlog::{quote_of, LogBuilder};

    fn boot() -> LogBuilder {
        let mut b = LogBuilder::new();
        b.measure(0, EventType::SCrtmVersion, b"\0\0", b"\0\0");
        b.self_measured(4, EventType::EfiAction, b"Calling EFI Application from Boot Option");
        b.measure(4, EventType::EfiBootServicesApplication, b"dp", b"grub");
        b.self_measured(4, EventType::Separator, &[0; 4]);
        b.grub_string("grub_cmd: ", "linux /boot/vmlinuz ro");
        b.grub_string("kernel_cmdline: ", "/boot/vmlinuz ro");
        b.grub_file("/boot/vmlinuz", b"kernel");
        b.grub_file("/boot/initrd.img", b"initrd");
        b
    }

    fn parse(bytes: &[u8]) -> EventLog {
        EventLog::parse(bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn replay_gives_the_values_a_tpm_would_hold() {
        let b = boot();
        let log = parse(&b.bytes());
        assert_eq!(log.replay_sha256().ok(), Some(b.pcrs));
        let quoted = QuotedLog::check(&log, &b.quote(&[0, 4, 8, 9])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(quoted.value(9), Some(&b.pcrs[9]));
        assert_eq!(quoted.events(9).count(), 2);
        assert_eq!(quoted.events(7).count(), 0);
        assert!(quoted.value(7).is_none());
    }

    #[test]
    fn the_startup_locality_sets_pcr_0s_starting_value() {
        let mut b = LogBuilder::new();
        b.startup_locality(3);
        b.measure(0, EventType::SCrtmVersion, b"v", b"v");
        let log = parse(&b.bytes());
        assert_eq!(log.replay_sha256().ok().map(|v| v[0]), Some(b.pcrs[0]));
        assert!(QuotedLog::check(&log, &b.quote(&[0])).is_ok());
        // The same log without the locality event gives another PCR 0.
        let mut zero = LogBuilder::new();
        zero.measure(0, EventType::SCrtmVersion, b"v", b"v");
        assert_ne!(zero.pcrs[0], b.pcrs[0]);
        // A locality event after PCR 0 was extended is refused.
        let mut late = LogBuilder::new();
        late.measure(0, EventType::SCrtmVersion, b"v", b"v");
        late.startup_locality(3);
        let e = parse(&late.bytes()).replay_sha256().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("record 2") && e.contains("after PCR 0"), "{e}");
    }

    /// The attacker sends a log that does not end where the boot ended: the last
    /// measurement (the kernel's initrd) left out, so a changed initrd would not show.
    #[test]
    fn a_truncated_log_does_not_replay() {
        let b = boot();
        let bytes = b.bytes();
        let last = b.offsets()[b.offsets().len() - 1];
        let log = parse(&bytes[..last]);
        let e = QuotedLog::check(&log, &b.quote(&[0, 4, 8, 9])).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("does not replay") && e.contains("TPM quoted"), "{e}");
    }

    /// Two events of one PCR swapped: every event is genuine, but a PCR is an ordered
    /// chain. Swapping events of different PCRs changes nothing the TPM holds, and
    /// nothing Outpost's checks depend on.
    #[test]
    fn reordered_events_in_one_pcr_do_not_replay() {
        let b = boot();
        let quote = b.quote(&[0, 4, 8, 9]);
        let log = parse(&b.bytes());
        let mut swapped = log.clone();
        swapped.events.swap(6, 7); // kernel and initrd, both PCR 9
        assert!(matches!(QuotedLog::check(&swapped, &quote), Err(Error::Replay(_))));
        let mut across = log.clone();
        across.events.swap(5, 6); // kernel_cmdline (PCR 8) and kernel (PCR 9)
        assert!(QuotedLog::check(&across, &quote).is_ok());
    }

    /// A log of a good boot sent with the quote of another boot (a changed kernel).
    #[test]
    fn a_log_that_replays_to_other_values_is_refused() {
        let good = boot();
        let mut evil = boot();
        evil.grub_file("/boot/vmlinuz", b"another kernel");
        let log = parse(&good.bytes());
        assert!(QuotedLog::check(&log, &evil.quote(&[4, 8, 9])).is_err());
        assert!(QuotedLog::check(&log, &good.quote(&[4, 8, 9])).is_ok());
        // The quote must be one SHA-256 bank.
        let mut sha1 = good.quote(&[4, 8, 9]);
        sha1.selection[0].hash = 0x0004;
        assert!(QuotedLog::check(&log, &sha1).is_err());
        let mut values = good.pcrs;
        values[9] = [0; 32];
        assert!(QuotedLog::check(&log, &quote_of(&values, &[9])).is_err());
    }
}
