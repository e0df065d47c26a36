//! The TCG PC Client crypto-agile event log, as a device's firmware and boot loader
//! wrote it (`/sys/kernel/security/tpm0/binary_bios_measurements`), parsed without
//! trusting one byte of it (TCG PC Client Platform Firmware Profile, section 10).
//!
//! Layout, all little-endian: the first record is a `TCG_PCR_EVENT` in the old SHA-1
//! shape (pcrIndex, eventType, a 20-byte digest, eventSize, event) that must be the
//! EV_NO_ACTION "Spec ID Event03", listing the PCR banks and their digest sizes. Every
//! later record is a `TCG_PCR_EVENT2`: pcrIndex, eventType, `TPML_DIGEST_VALUES`
//! (count, then algId and digest for each bank, sizes from the Spec ID event),
//! eventSize, event. A device's root can send any bytes here, so every length is
//! checked against what is left, the whole log and the number of records are capped,
//! and every error names the record, its byte offset and the field.
//!
//! Record 0 is the Spec ID header; the events of [`EventLog::events`] are numbered from
//! 1 in the order they appear, and those numbers are what errors and mismatches name.

use sha2::{Digest, Sha256};

use crate::attest::tpm::ALG_SHA256;
use crate::error::{Error, Result};

/// Largest log accepted. Real logs of a UEFI + GRUB boot are tens of KiB; Secure Boot
/// databases (db, dbx) make them a few hundred.
pub const MAX_LOG_BYTES: usize = 4 << 20;
/// Most records accepted.
pub const MAX_EVENTS: usize = 16_384;
/// Most PCR banks a Spec ID event may list (TPMs have a handful).
const MAX_BANKS: u32 = 16;
/// The highest PCR of a PC Client TPM.
pub const MAX_PCR: u32 = 23;
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";

macro_rules! event_types {
    ($($name:ident = $code:literal, $text:literal;)*) => {
        /// A `TCG_EVENTTYPE` (PFP section 10.4.1). Codes the spec does not name are
        /// kept as [`EventType::Other`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType {
            $($name,)*
            Other(u32),
        }

        impl EventType {
            pub fn from_code(code: u32) -> Self {
                match code {
                    $($code => EventType::$name,)*
                    other => EventType::Other(other),
                }
            }

            pub fn code(self) -> u32 {
                match self {
                    $(EventType::$name => $code,)*
                    EventType::Other(code) => code,
                }
            }

            /// The spec's name (`EV_IPL`), or None for a code it does not name.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $(EventType::$name => Some($text),)*
                    EventType::Other(_) => None,
                }
            }
        }
    };
}

event_types! {
    PrebootCert = 0x0000_0000, "EV_PREBOOT_CERT";
    PostCode = 0x0000_0001, "EV_POST_CODE";
    Unused = 0x0000_0002, "EV_UNUSED";
    NoAction = 0x0000_0003, "EV_NO_ACTION";
    Separator = 0x0000_0004, "EV_SEPARATOR";
    Action = 0x0000_0005, "EV_ACTION";
    EventTag = 0x0000_0006, "EV_EVENT_TAG";
    SCrtmContents = 0x0000_0007, "EV_S_CRTM_CONTENTS";
    SCrtmVersion = 0x0000_0008, "EV_S_CRTM_VERSION";
    CpuMicrocode = 0x0000_0009, "EV_CPU_MICROCODE";
    PlatformConfigFlags = 0x0000_000A, "EV_PLATFORM_CONFIG_FLAGS";
    TableOfDevices = 0x0000_000B, "EV_TABLE_OF_DEVICES";
    CompactHash = 0x0000_000C, "EV_COMPACT_HASH";
    Ipl = 0x0000_000D, "EV_IPL";
    IplPartitionData = 0x0000_000E, "EV_IPL_PARTITION_DATA";
    NonhostCode = 0x0000_000F, "EV_NONHOST_CODE";
    NonhostConfig = 0x0000_0010, "EV_NONHOST_CONFIG";
    NonhostInfo = 0x0000_0011, "EV_NONHOST_INFO";
    OmitBootDeviceEvents = 0x0000_0012, "EV_OMIT_BOOT_DEVICE_EVENTS";
    EfiVariableDriverConfig = 0x8000_0001, "EV_EFI_VARIABLE_DRIVER_CONFIG";
    EfiVariableBoot = 0x8000_0002, "EV_EFI_VARIABLE_BOOT";
    EfiBootServicesApplication = 0x8000_0003, "EV_EFI_BOOT_SERVICES_APPLICATION";
    EfiBootServicesDriver = 0x8000_0004, "EV_EFI_BOOT_SERVICES_DRIVER";
    EfiRuntimeServicesDriver = 0x8000_0005, "EV_EFI_RUNTIME_SERVICES_DRIVER";
    EfiGptEvent = 0x8000_0006, "EV_EFI_GPT_EVENT";
    EfiAction = 0x8000_0007, "EV_EFI_ACTION";
    EfiPlatformFirmwareBlob = 0x8000_0008, "EV_EFI_PLATFORM_FIRMWARE_BLOB";
    EfiHandoffTables = 0x8000_0009, "EV_EFI_HANDOFF_TABLES";
    EfiPlatformFirmwareBlob2 = 0x8000_000A, "EV_EFI_PLATFORM_FIRMWARE_BLOB2";
    EfiHandoffTables2 = 0x8000_000B, "EV_EFI_HANDOFF_TABLES2";
    EfiVariableBoot2 = 0x8000_000C, "EV_EFI_VARIABLE_BOOT2";
    EfiGptEvent2 = 0x8000_000D, "EV_EFI_GPT_EVENT2";
    EfiHcrtmEvent = 0x8000_0010, "EV_EFI_HCRTM_EVENT";
    EfiVariableAuthority = 0x8000_00E0, "EV_EFI_VARIABLE_AUTHORITY";
    EfiSpdmFirmwareBlob = 0x8000_00E1, "EV_EFI_SPDM_FIRMWARE_BLOB";
    EfiSpdmFirmwareConfig = 0x8000_00E2, "EV_EFI_SPDM_FIRMWARE_CONFIG";
}

/// Serialized as its spec name (`"EV_IPL"`), or `"event type 0x..."` for others.
impl serde::Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "event type 0x{:08x}", self.code()),
        }
    }
}

/// One PCR bank the log records: TPM algorithm id and digest size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bank {
    pub alg: u16,
    pub digest_size: u16,
}

/// What the Spec ID event says about the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecId {
    pub platform_class: u32,
    pub spec_version: (u8, u8, u8),
    pub uintn_size: u8,
    pub banks: Vec<Bank>,
}

/// One `TCG_PCR_EVENT2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The record's number in the log (the Spec ID header is 0).
    pub record: usize,
    /// Byte offset of the record in the log.
    pub offset: usize,
    pub pcr: u32,
    pub event_type: EventType,
    /// The SHA-256 bank's digest (every log Outpost accepts has that bank).
    pub sha256: [u8; 32],
    /// Every bank's digest, in the record's order.
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

impl Event {
    /// The event data as text when it is UTF-8 without control characters (a trailing
    /// NUL dropped), as GRUB's and the firmware's string events are.
    pub fn text(&self) -> Option<&str> {
        let data = self.data.strip_suffix(&[0]).unwrap_or(&self.data);
        std::str::from_utf8(data).ok().filter(|t| t.chars().all(|c| !c.is_control() || c == '\t'))
    }

    /// Does the SHA-256 digest hash this event's own data (EV_SEPARATOR, EV_EFI_ACTION)?
    pub fn digest_is_of_data(&self) -> bool {
        Sha256::digest(&self.data)[..] == self.sha256
    }

    /// The locality of a StartupLocality EV_NO_ACTION event in PCR 0.
    pub fn startup_locality(&self) -> Option<u8> {
        match (self.pcr, self.event_type, self.data.as_slice()) {
            (0, EventType::NoAction, [sig @ .., locality]) if sig == STARTUP_LOCALITY_SIGNATURE => Some(*locality),
            _ => None,
        }
    }
}

/// A parsed crypto-agile event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    pub spec: SpecId,
    pub events: Vec<Event>,
}

/// A little-endian cursor that names the record, offset and field of a short read.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    record: usize,
    record_start: usize,
}

impl<'a> Cursor<'a> {
    fn fail(&self, field: &'static str, reason: impl Into<String>) -> Error {
        Error::EventLog { record: self.record, offset: self.record_start, field, reason: reason.into() }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(self.fail(field, format!("needs {n} bytes at byte {}, only {left} left: the log is truncated", self.pos)));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u32 length followed by that many bytes, checked against what is left before
    /// anything is sliced.
    fn sized(&mut self, field: &'static str) -> Result<&'a [u8]> {
        let n = self.u32(field)? as usize;
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(self.fail(field, format!("says {n} bytes of event data, only {left} are left in the log")));
        }
        self.take(n, field)
    }

    fn pcr(&mut self) -> Result<u32> {
        let pcr = self.u32("pcrIndex")?;
        if pcr > MAX_PCR {
            return Err(self.fail("pcrIndex", format!("PCR {pcr} does not exist (a PC Client TPM has PCRs 0-{MAX_PCR})")));
        }
        Ok(pcr)
    }
}

impl EventLog {
    /// Parses a whole crypto-agile log. Anything short, long, unknown or inconsistent
    /// is an error naming where it is.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_LOG_BYTES {
            return Err(Error::EventLog {
                record: 0,
                offset: 0,
                field: "log",
                reason: format!("{} bytes, more than the {MAX_LOG_BYTES} accepted", bytes.len()),
            });
        }
        let mut c = Cursor { buf: bytes, pos: 0, record: 0, record_start: 0 };
        let spec = parse_spec_id(&mut c)?;
        let mut events = Vec::new();
        while c.pos < bytes.len() {
            c.record += 1;
            c.record_start = c.pos;
            if c.record > MAX_EVENTS {
                return Err(c.fail("log", format!("more than {MAX_EVENTS} records")));
            }
            events.push(parse_event2(&mut c, &spec)?);
        }
        Ok(EventLog { spec, events })
    }

    /// The events extended into `pcr`, in order.
    pub fn pcr_events(&self, pcr: u32) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |e| e.pcr == pcr)
    }
}

/// Record 0: a SHA-1-shaped `TCG_PCR_EVENT` that must carry the Spec ID Event03.
fn parse_spec_id(c: &mut Cursor<'_>) -> Result<SpecId> {
    let pcr = c.u32("pcrIndex")?;
    let event_type = EventType::from_code(c.u32("eventType")?);
    if pcr != 0 || event_type != EventType::NoAction {
        return Err(c.fail("eventType", format!("the first record is {event_type} in PCR {pcr}, not the EV_NO_ACTION Spec ID event of a crypto-agile log")));
    }
    let digest = c.take(20, "digest")?;
    if digest.iter().any(|b| *b != 0) {
        return Err(c.fail("digest", "the Spec ID event's digest must be zero"));
    }
    let data = c.sized("eventSize")?;
    let mut d = Cursor { buf: data, pos: 0, record: 0, record_start: 0 };
    let signature = d.take(16, "SpecIdEvent.signature")?;
    if signature != SPEC_ID_SIGNATURE {
        return Err(c.fail(
            "SpecIdEvent.signature",
            format!("{:?} is not \"Spec ID Event03\": not a crypto-agile (TPM 2.0) log", String::from_utf8_lossy(signature)),
        ));
    }
    let platform_class = d.u32("SpecIdEvent.platformClass")?;
    let minor = d.u8("SpecIdEvent.specVersionMinor")?;
    let major = d.u8("SpecIdEvent.specVersionMajor")?;
    let errata = d.u8("SpecIdEvent.specErrata")?;
    let uintn_size = d.u8("SpecIdEvent.uintnSize")?;
    let count = d.u32("SpecIdEvent.numberOfAlgorithms")?;
    if count == 0 || count > MAX_BANKS {
        return Err(c.fail("SpecIdEvent.numberOfAlgorithms", format!("{count} algorithms (1-{MAX_BANKS} accepted)")));
    }
    let mut banks: Vec<Bank> = Vec::new();
    for _ in 0..count {
        let alg = d.u16("SpecIdEvent.digestSizes.algorithmId")?;
        let digest_size = d.u16("SpecIdEvent.digestSizes.digestSize")?;
        check_bank(c, &banks, alg, digest_size)?;
        banks.push(Bank { alg, digest_size });
    }
    let vendor = d.u8("SpecIdEvent.vendorInfoSize")? as usize;
    d.take(vendor, "SpecIdEvent.vendorInfo")?;
    if d.pos != data.len() {
        return Err(c.fail("eventSize", format!("{} bytes after the Spec ID event's vendorInfo", data.len() - d.pos)));
    }
    if !banks.iter().any(|b| b.alg == ALG_SHA256) {
        return Err(c.fail("SpecIdEvent.digestSizes", "the log has no SHA-256 bank, which Outpost replays"));
    }
    Ok(SpecId { platform_class, spec_version: (major, minor, errata), uintn_size, banks })
}

/// A bank's digest size must be the one its algorithm has (when Outpost knows it), and
/// each bank may be listed once.
fn check_bank(c: &Cursor<'_>, banks: &[Bank], alg: u16, size: u16) -> Result<()> {
    let known = match alg {
        0x0004 => Some(20),                   // SHA-1
        ALG_SHA256 | 0x0012 | 0x0027 => Some(32), // SHA-256, SM3-256, SHA3-256
        0x000C | 0x0028 => Some(48),          // SHA-384, SHA3-384
        0x000D | 0x0029 => Some(64),          // SHA-512, SHA3-512
        _ => None,
    };
    if known.is_some_and(|k| k != size) || size == 0 || size > 64 {
        return Err(c.fail("SpecIdEvent.digestSizes.digestSize", format!("algorithm 0x{alg:04x} with a {size}-byte digest")));
    }
    if banks.iter().any(|b| b.alg == alg) {
        return Err(c.fail("SpecIdEvent.digestSizes.algorithmId", format!("algorithm 0x{alg:04x} is listed twice")));
    }
    Ok(())
}

/// One `TCG_PCR_EVENT2`: exactly one digest per bank of the Spec ID event, each of the
/// size it said.
fn parse_event2(c: &mut Cursor<'_>, spec: &SpecId) -> Result<Event> {
    let (record, offset) = (c.record, c.record_start);
    let pcr = c.pcr()?;
    let event_type = EventType::from_code(c.u32("eventType")?);
    let count = c.u32("digests.count")?;
    if count as usize != spec.banks.len() {
        return Err(c.fail("digests.count", format!("{count} digests, the Spec ID event lists {} banks", spec.banks.len())));
    }
    let mut digests: Vec<(u16, Vec<u8>)> = Vec::with_capacity(spec.banks.len());
    for _ in 0..count {
        let alg = c.u16("digests.hashAlg")?;
        let bank = spec
            .banks
            .iter()
            .find(|b| b.alg == alg)
            .ok_or_else(|| c.fail("digests.hashAlg", format!("algorithm 0x{alg:04x} is not a bank of the Spec ID event")))?;
        if digests.iter().any(|(a, _)| *a == alg) {
            return Err(c.fail("digests.hashAlg", format!("algorithm 0x{alg:04x} appears twice")));
        }
        digests.push((alg, c.take(bank.digest_size as usize, "digests.digest")?.to_vec()));
    }
    let sha256 = digests
        .iter()
        .find(|(a, _)| *a == ALG_SHA256)
        .and_then(|(_, d)| <[u8; 32]>::try_from(d.as_slice()).ok())
        .ok_or_else(|| c.fail("digests", "no SHA-256 digest"))?;
    let data = c.sized("eventSize")?.to_vec();
    Ok(Event { record, offset, pcr, event_type, sha256, digests, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::testlog::LogBuilder;

    fn err(bytes: &[u8]) -> String {
        match EventLog::parse(bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_built_log_parses_back() {
        let mut b = LogBuilder::new();
        b.measure(4, EventType::EfiBootServicesApplication, b"\x02\x01", b"grubx64.efi bytes");
        b.grub_file("/boot/vmlinuz", b"kernel");
        b.grub_string("kernel_cmdline: ", "/boot/vmlinuz root=/dev/vda2 ro");
        let log = EventLog::parse(&b.bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(log.spec.banks.len(), 2);
        assert_eq!(log.events.len(), 3);
        let file = &log.events[1];
        assert_eq!((file.record, file.pcr, file.event_type), (2, 9, EventType::Ipl));
        assert_eq!(file.text(), Some("/boot/vmlinuz"));
        assert_eq!(file.sha256[..], Sha256::digest(b"kernel")[..]);
        assert_eq!(log.events[2].text(), Some("kernel_cmdline: /boot/vmlinuz root=/dev/vda2 ro"));
        assert_eq!(log.events[0].text(), None, "binary data is not text");
        assert_eq!(EventType::from_code(0x8000_00E0), EventType::EfiVariableAuthority);
        assert_eq!(EventType::from_code(0x8000_00E0).to_string(), "EV_EFI_VARIABLE_AUTHORITY");
        assert_eq!(EventType::from_code(0x1234).to_string(), "event type 0x00001234");
    }

    #[test]
    fn a_truncated_record_is_named() {
        let mut b = LogBuilder::new();
        b.grub_file("/boot/vmlinuz", b"kernel");
        b.grub_file("/boot/initrd.img", b"initrd");
        let bytes = b.bytes();
        let second = b.offsets()[1];
        // Cut inside the second record's digests, and inside its event data.
        let e = err(&bytes[..second + 20]);
        assert!(e.contains("record 2") && e.contains(&format!("byte {second}")) && e.contains("digests"), "{e}");
        let e = err(&bytes[..bytes.len() - 3]);
        assert!(e.contains("record 2") && e.contains("eventSize") && e.contains("left"), "{e}");
    }

    #[test]
    fn a_huge_event_size_is_refused_before_anything_is_read() {
        let mut b = LogBuilder::new();
        b.grub_file("/boot/vmlinuz", b"kernel");
        let mut bytes = b.bytes();
        let at = b.event_size_at(0);
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = err(&bytes);
        assert!(e.contains("record 1") && e.contains("eventSize") && e.contains("4294967295"), "{e}");
    }

    #[test]
    fn an_algorithm_not_in_the_spec_id_event_is_refused() {
        let mut b = LogBuilder::new();
        b.grub_file("/boot/vmlinuz", b"kernel");
        let mut bytes = b.bytes();
        // The first digest's hashAlg (SHA-1) becomes SHA-384, which the header never listed.
        let at = b.offsets()[0] + 12;
        bytes[at..at + 2].copy_from_slice(&0x000Cu16.to_le_bytes());
        let e = err(&bytes);
        assert!(e.contains("digests.hashAlg") && e.contains("0x000c"), "{e}");
    }

    #[test]
    fn a_digest_count_that_is_not_the_bank_count_is_refused() {
        let mut b = LogBuilder::new();
        b.grub_file("/boot/vmlinuz", b"kernel");
        let mut bytes = b.bytes();
        let at = b.offsets()[0] + 8;
        bytes[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        let e = err(&bytes);
        assert!(e.contains("digests.count") && e.contains("1 digests"), "{e}");
        // A repeated bank (SHA-256 twice instead of SHA-1 then SHA-256) is refused too.
        let mut b = LogBuilder::with_banks(&[(ALG_SHA256, 32), (ALG_SHA256, 32)]);
        b.grub_file("/x", b"x");
        assert!(err(&b.bytes()).contains("listed twice"));
    }

    #[test]
    fn a_log_without_the_spec_id_event_or_sha256_is_refused() {
        let b = LogBuilder::new();
        let mut bytes = b.bytes();
        bytes[32..36].copy_from_slice(b"Spex"); // signature becomes "Spex ID Event03"
        assert!(err(&bytes).contains("not a crypto-agile"), "{}", err(&bytes));
        let b = LogBuilder::with_banks(&[(0x0004, 20)]);
        assert!(err(&b.bytes()).contains("no SHA-256 bank"));
        let b = LogBuilder::with_banks(&[(ALG_SHA256, 20)]);
        assert!(err(&b.bytes()).contains("20-byte digest"));
        assert!(err(&[]).contains("pcrIndex"));
    }

    #[test]
    fn pcr_indices_past_23_and_oversized_logs_are_refused() {
        let mut b = LogBuilder::new();
        b.extend(24, EventType::Ipl, b"x", [0; 32]);
        assert!(err(&b.bytes()).contains("PCR 24 does not exist"));
        let big = vec![0u8; MAX_LOG_BYTES + 1];
        assert!(err(&big).contains("more than"));
    }

    #[test]
    fn too_many_records_are_refused() {
        let mut b = LogBuilder::new();
        for _ in 0..=MAX_EVENTS {
            b.extend(1, EventType::NoAction, b"", [0; 32]);
        }
        let e = err(&b.bytes());
        assert!(e.contains(&format!("more than {MAX_EVENTS} records")), "{e}");
    }
}
