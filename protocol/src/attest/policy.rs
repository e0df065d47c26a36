//! Which measurements prove the booted image for a hardware class: the PCRs and event
//! types the agent's own measurement may use (testbeds), or the boot chain's event log.

use super::{golden, CheckinReport, EventKind};

/// PCRs that software can reset without a platform reset: 16 (debug) and 23
/// (application) from locality 0, 17-22 from the dynamic-launch localities. A value in
/// one of them proves nothing against root on the device, which can reset it and
/// extend whatever the server expects.
pub const RESETTABLE_PCRS: std::ops::RangeInclusive<u32> = 16..=23;

/// What measures a hardware class's boots, and so which PCRs may prove one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A boot chain that extends static PCRs: resettable PCRs prove nothing.
    BootChain,
    /// A testbed, where a forgeable measurement (resettable PCRs) is accepted knowingly.
    Testbed,
    /// Firmware and bootloader measure (PCRs 4, 8, 9) before the device's software
    /// runs; the device sends their TCG event log, which must replay to its quote and
    /// match the golden values signed into a release (see [`golden`]).
    EventLog,
}

/// Which PCRs and event types prove the booted slot for one hardware class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurementPolicy {
    pcrs: std::collections::BTreeSet<u32>,
    event_types: std::collections::BTreeSet<EventKind>,
    platform: Platform,
}

impl MeasurementPolicy {
    /// Refuses an empty policy, PCRs past 23, and resettable PCRs unless the class is
    /// a [`Platform::Testbed`].
    pub fn new(pcrs: impl IntoIterator<Item = u32>, event_types: impl IntoIterator<Item = EventKind>, platform: Platform) -> std::result::Result<Self, String> {
        let pcrs: std::collections::BTreeSet<u32> = pcrs.into_iter().collect();
        let event_types: std::collections::BTreeSet<EventKind> = event_types.into_iter().collect();
        if pcrs.is_empty() {
            return Err("pcrs is empty: name the PCRs that prove which image booted".into());
        }
        if event_types.is_empty() {
            return Err("event_types is empty: name the event types that prove which image booted".into());
        }
        if let Some(p) = pcrs.iter().find(|p| **p > 23) {
            return Err(format!("PCR {p} does not exist (a TPM 2.0 PC Client has PCRs 0-23)"));
        }
        if platform == Platform::BootChain {
            if let Some(p) = pcrs.iter().find(|p| RESETTABLE_PCRS.contains(p)) {
                return Err(format!(
                    "PCR {p} can be reset by software on the device (PCRs 16-23), so root there could forge it; \
                     use PCRs the boot chain extends, or mark the class as a testbed (testbed = true)"
                ));
            }
        }
        Ok(MeasurementPolicy { pcrs, event_types, platform })
    }

    /// A class measured by its boot chain: the quote covers [`golden::GOLDEN_PCRS`]
    /// and the check-in carries the firmware's event log.
    pub fn event_log() -> Self {
        MeasurementPolicy { pcrs: golden::GOLDEN_PCRS.into_iter().collect(), event_types: Default::default(), platform: Platform::EventLog }
    }

    pub fn platform(&self) -> Platform {
        self.platform
    }

    pub fn testbed(&self) -> bool {
        self.platform == Platform::Testbed
    }

    pub fn pcrs(&self) -> impl Iterator<Item = u32> + '_ {
        self.pcrs.iter().copied()
    }

    /// Does the report's measurement come from PCRs and events this policy trusts?
    pub fn check(&self, report: &CheckinReport) -> std::result::Result<(), String> {
        if self.platform == Platform::EventLog {
            if report.boot_log.is_none() {
                return Err("this class is measured by its boot chain, and the check-in carries no boot event log (agent: [tpm] boot_event_log)".into());
            }
            if !report.event_log.events.is_empty() {
                return Err("the check-in carries the agent's own measurements, which this class, measured by its boot chain, does not accept".into());
            }
            return Ok(());
        }
        if report.boot_log.is_some() {
            return Err("the check-in carries a boot event log, and this class is not configured to judge one (attestation.classes: boot_event_log = true)".into());
        }
        if !self.pcrs.contains(&report.pcr) {
            let why = if RESETTABLE_PCRS.contains(&report.pcr) { " (software can reset it)" } else { "" };
            return Err(format!("the measurement is in PCR {}{why}, which does not prove the booted image for this hardware class (accepted: {:?})", report.pcr, self.pcrs));
        }
        if let Some(e) = report.event_log.events.iter().find(|e| !self.event_types.contains(&e.event)) {
            return Err(format!("event type {:?} does not prove the booted image for this hardware class", e.event));
        }
        Ok(())
    }
}
