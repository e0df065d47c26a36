//! Golden values: the events a good boot of a release produces, signed with the
//! release (per hardware class), and the matcher that holds a quoted event log
//! against them and names the first event that is not golden.
//!
//! What is measured where (UEFI firmware + GRUB 2.06's `tpm` module):
//! - PCR 4: the firmware measures each EFI application it starts (shim, GRUB) as
//!   EV_EFI_BOOT_SERVICES_APPLICATION with the image's Authenticode SHA-256, plus
//!   EV_EFI_ACTION strings and an EV_SEPARATOR whose digests hash their own data.
//! - PCR 8: GRUB measures every command it runs ("grub_cmd: linux /vmlinuz ..."), the
//!   kernel command line ("kernel_cmdline: /vmlinuz ...") and module command lines, as
//!   EV_IPL events whose data is prefix + string + NUL and whose digest is the SHA-256
//!   of the string alone: no prefix, no NUL.
//! - PCR 9: GRUB measures every file it opens for verification (kernel, initrd,
//!   grub.cfg, modules, fonts) as EV_IPL with the file name + NUL as data and the
//!   SHA-256 of the file's bytes as digest. The grubenv is read without verification
//!   and is not measured; what it changes shows in the commands of PCR 8.
//!
//! The rules, written against root on the device, who can change the grubenv, the
//! command line, the kernel or initrd of a slot, and send any log it likes. An event's
//! type and data are not covered by the PCR (only its digest is), so the rules judge
//! digests and never trust a label for what a digest is:
//! - The quote must cover PCRs 4, 8 and 9; the log must replay to it (`QuotedLog`).
//! - PCR 4: every extended event is a golden bootloader digest, or an EV_EFI_ACTION or
//!   EV_SEPARATOR whose digest is the SHA-256 of its own data (so an unknown EFI
//!   application relabelled as an action does not pass); a golden bootloader appears.
//! - PCR 8: every event is one of GRUB's strings, with a digest that is the SHA-256 of
//!   its text after the prefix. Every "kernel_cmdline" is a golden command line, and
//!   one appears. "grub_cmd" events are allowed (the grubenv and the try-once logic
//!   make them vary from boot to boot), except that a `linux`/`linuxefi`/`linux16`
//!   command's arguments must be a golden command line: otherwise root could boot a
//!   changed command line, relabel its "kernel_cmdline" event as a "grub_cmd" (same
//!   digest) and extend a golden one after boot. "module_cmdline" events are refused
//!   (Outpost's boot loads no multiboot modules).
//! - PCR 9: every event's digest is the golden kernel, initrd or one of the golden
//!   boot files, whatever its name says; the kernel and the initrd both appear.
//! - PCRs 0-3 and 5-7 (firmware, its configuration, Secure Boot state) are replayed
//!   when quoted but not matched here.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::attest::eventlog::{Event, EventType};
use crate::attest::replay::QuotedLog;
pub use crate::error::BootMismatch;
use crate::error::{Error, Result};

pub const BOOTLOADER_PCR: u32 = 4;
pub const GRUB_STRING_PCR: u32 = 8;
pub const GRUB_FILE_PCR: u32 = 9;
/// The PCRs a quote must cover for the golden values to mean anything.
pub const GOLDEN_PCRS: [u32; 3] = [BOOTLOADER_PCR, GRUB_STRING_PCR, GRUB_FILE_PCR];

const KERNEL_CMDLINE: &str = "kernel_cmdline: ";
const GRUB_CMD: &str = "grub_cmd: ";
const MODULE_CMDLINE: &str = "module_cmdline: ";
const LINUX_COMMANDS: [&str; 3] = ["linux", "linuxefi", "linux16"];

/// A named digest: a file GRUB loads, or an EFI application's Authenticode digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenFile {
    /// What it is, for people (`grubx64.efi`, `/boot/vmlinuz-6.1.0-18-amd64`).
    pub name: String,
    /// SHA-256, 64 lower-case hex digits.
    pub sha256: String,
}

/// The events a good boot produces. Signed into the release's metadata by
/// `outpost release publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenValues {
    /// EFI applications the firmware may start (PCR 4, Authenticode SHA-256).
    pub bootloaders: Vec<GoldenFile>,
    /// The kernel file (PCR 9, SHA-256 of its bytes).
    pub kernel: GoldenFile,
    /// The initrd file (PCR 9).
    pub initrd: GoldenFile,
    /// The kernel command lines a good boot may have, as GRUB measures them (PCR 8):
    /// the `linux` command's arguments joined by single spaces, the kernel path first,
    /// without the "kernel_cmdline: " prefix and the NUL. One per slot the release can
    /// boot from, since the command line names the slot and its root partition.
    pub kernel_cmdlines: Vec<String>,
    /// Other files GRUB may load (grub.cfg, modules, fonts) (PCR 9).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot_files: Vec<GoldenFile>,
}

/// What an event of a golden boot was matched to: the golden file's name where the
/// golden value is a file (`{"kind": "kernel", "name": "/boot/vmlinuz"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Role {
    Bootloader(String),
    Kernel(String),
    Initrd(String),
    BootFile(String),
    KernelCmdline,
    GrubCommand,
    /// EV_EFI_ACTION or EV_SEPARATOR: a digest of its own data.
    FirmwareString,
}

/// One event of PCRs 4, 8 and 9 and the golden value it matched: the measured boot
/// shown beside the golden values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub record: usize,
    pub pcr: u32,
    pub event_type: EventType,
    pub text: Option<String>,
    pub sha256: String,
    pub role: Role,
}

fn mismatch(e: &Event, reason: impl Into<String>, expected: Vec<String>) -> Error {
    Error::Golden(Box::new(BootMismatch {
        record: Some(e.record),
        pcr: e.pcr,
        event_type: Some(e.event_type.to_string()),
        text: e.text().map(str::to_owned),
        found: Some(hex::encode(e.sha256)),
        expected,
        reason: reason.into(),
    }))
}

fn missing(pcr: u32, reason: impl Into<String>, expected: Vec<String>) -> Error {
    Error::Golden(Box::new(BootMismatch { record: None, pcr, event_type: None, text: None, found: None, expected, reason: reason.into() }))
}

fn named(f: &GoldenFile) -> String {
    format!("{} {}", f.name, f.sha256)
}

impl GoldenValues {
    /// Digests are 64 lower-case hex digits, there is a bootloader, and the command
    /// line is one GRUB measures as written: printable ASCII without quotes or
    /// backslashes (GRUB escapes those), single spaces between arguments.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::schema("golden values", m));
        if self.bootloaders.is_empty() {
            return bad("bootloaders is empty: name the EFI application(s) the firmware starts".into());
        }
        let files = self.bootloaders.iter().map(|f| ("bootloaders", f));
        let files = files.chain([("kernel", &self.kernel), ("initrd", &self.initrd)]);
        for (field, f) in files.chain(self.boot_files.iter().map(|f| ("boot_files", f))) {
            let hex_ok = f.sha256.len() == 64 && f.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return bad(format!("{field} {:?}: sha256 {:?} is not 64 lower-case hex digits", f.name, f.sha256));
            }
            if f.name.is_empty() {
                return bad(format!("{field}: a digest without a name ({})", f.sha256));
            }
        }
        if self.kernel_cmdlines.is_empty() {
            return bad("kernel_cmdlines is empty: name the command line(s) GRUB passes to the kernel".into());
        }
        for c in &self.kernel_cmdlines {
            let printable = c.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' ') && !c.contains(['"', '\'', '\\']);
            if c.is_empty() || !printable || c.starts_with(' ') || c.ends_with(' ') || c.contains("  ") {
                return bad(format!(
                    "kernel_cmdlines {c:?} must be printable ASCII without quotes or backslashes, arguments separated by single spaces"
                ));
            }
        }
        Ok(())
    }

    /// Holds a quoted log against these golden values. Ok lists every event of PCRs 4,
    /// 8 and 9 with what it matched; an error names the first event that is not golden
    /// (see the module's rules).
    pub fn check(&self, log: &QuotedLog<'_>) -> Result<Vec<Matched>> {
        self.validate()?;
        if let Some(p) = GOLDEN_PCRS.iter().find(|p| !log.covers(**p)) {
            return Err(missing(*p, format!("the quote covers PCRs {:?}, not PCR {p}: nothing vouches for its events", log.pcrs()), vec![]));
        }
        let mut matched = self.check_bootloader(log)?;
        matched.extend(self.check_strings(log)?);
        matched.extend(self.check_files(log)?);
        Ok(matched)
    }

    fn check_bootloader(&self, log: &QuotedLog<'_>) -> Result<Vec<Matched>> {
        let mut out = Vec::new();
        for e in log.events(BOOTLOADER_PCR).filter(|e| e.event_type != EventType::NoAction) {
            let digest = hex::encode(e.sha256);
            let role = if let Some(b) = self.bootloaders.iter().find(|b| b.sha256 == digest) {
                Role::Bootloader(b.name.clone())
            } else if matches!(e.event_type, EventType::EfiAction | EventType::Separator) && e.digest_is_of_data() {
                Role::FirmwareString
            } else {
                let expected = self.bootloaders.iter().map(named).collect();
                return Err(mismatch(e, "not a golden bootloader, nor a firmware action or separator measuring its own data", expected));
            };
            out.push(matched(e, role));
        }
        if !out.iter().any(|m| matches!(m.role, Role::Bootloader(_))) {
            return Err(missing(BOOTLOADER_PCR, "no golden bootloader was started", self.bootloaders.iter().map(named).collect()));
        }
        Ok(out)
    }

    fn check_strings(&self, log: &QuotedLog<'_>) -> Result<Vec<Matched>> {
        let mut out = Vec::new();
        let golden = || self.kernel_cmdlines.iter().map(|c| format!("{c:?}")).collect();
        let is_golden = |c: &str| self.kernel_cmdlines.iter().any(|g| g == c);
        for e in log.events(GRUB_STRING_PCR).filter(|e| e.event_type != EventType::NoAction) {
            let text = e.text().unwrap_or_default();
            let split = [KERNEL_CMDLINE, GRUB_CMD, MODULE_CMDLINE].into_iter().find_map(|p| text.strip_prefix(p).map(|s| (p, s)));
            let Some((prefix, measured)) = split.filter(|_| e.event_type == EventType::Ipl) else {
                return Err(mismatch(e, "not a string GRUB measures (EV_IPL \"grub_cmd: \", \"kernel_cmdline: \" or \"module_cmdline: \")", vec![]));
            };
            if Sha256::digest(measured.as_bytes())[..] != e.sha256 {
                let want = hex::encode(Sha256::digest(measured.as_bytes()));
                return Err(mismatch(e, "the digest is not the SHA-256 of the event's text: the text was changed", vec![want]));
            }
            let role = match prefix {
                KERNEL_CMDLINE if is_golden(measured) => Role::KernelCmdline,
                KERNEL_CMDLINE => return Err(mismatch(e, "the kernel command line is not the golden one", golden())),
                GRUB_CMD => match measured.split_once(' ') {
                    Some((cmd, args)) if LINUX_COMMANDS.contains(&cmd) && !is_golden(args) => {
                        return Err(mismatch(e, format!("GRUB's {cmd} command loaded a kernel with a command line that is not the golden one"), golden()))
                    }
                    None if LINUX_COMMANDS.contains(&measured) => {
                        return Err(mismatch(e, "GRUB's linux command without arguments", golden()))
                    }
                    _ => Role::GrubCommand,
                },
                _ => return Err(mismatch(e, "a module command line: Outpost's boot loads no multiboot modules", vec![])),
            };
            out.push(matched(e, role));
        }
        if !out.iter().any(|m| m.role == Role::KernelCmdline) {
            return Err(missing(GRUB_STRING_PCR, "GRUB measured no kernel command line", golden()));
        }
        Ok(out)
    }

    fn check_files(&self, log: &QuotedLog<'_>) -> Result<Vec<Matched>> {
        let mut out = Vec::new();
        for e in log.events(GRUB_FILE_PCR).filter(|e| e.event_type != EventType::NoAction) {
            let digest = hex::encode(e.sha256);
            let role = if digest == self.kernel.sha256 {
                Role::Kernel(self.kernel.name.clone())
            } else if digest == self.initrd.sha256 {
                Role::Initrd(self.initrd.name.clone())
            } else if let Some(f) = self.boot_files.iter().find(|f| f.sha256 == digest) {
                Role::BootFile(f.name.clone())
            } else {
                let all = [&self.kernel, &self.initrd].into_iter().chain(&self.boot_files);
                return Err(mismatch(e, "a file GRUB loaded is not a golden kernel, initrd or boot file", all.map(named).collect()));
            };
            out.push(matched(e, role));
        }
        if !out.iter().any(|m| matches!(m.role, Role::Kernel(_))) {
            return Err(missing(GRUB_FILE_PCR, "the golden kernel was not loaded", vec![named(&self.kernel)]));
        }
        if !out.iter().any(|m| matches!(m.role, Role::Initrd(_))) {
            return Err(missing(GRUB_FILE_PCR, "the golden initrd was not loaded", vec![named(&self.initrd)]));
        }
        Ok(out)
    }
}

/// What the server checks of a boot-chain measured check-in once the quote's signature
/// and nonce verified: the log parses, replays to the quoted PCRs, and its events are
/// these golden values. An error is a parse error (`Error::EventLog`), a log that is
/// not this boot's (`Error::Replay`) or a named non-golden event (`Error::Golden`).
pub fn check_boot(log: &[u8], quote: &crate::attest::tpm::Quote, golden: &GoldenValues) -> Result<Vec<Matched>> {
    let log = crate::attest::eventlog::EventLog::parse(log)?;
    golden.check(&QuotedLog::check(&log, quote)?)
}

/// A named file's bytes.
pub type Artifact<'a> = (&'a str, &'a [u8]);

/// The build artifacts a golden boot is computed from: what the pipeline ships.
pub struct BootArtifacts<'a> {
    /// EFI applications the firmware starts (shim, GRUB), as PE/COFF images.
    pub bootloaders: Vec<Artifact<'a>>,
    pub kernel: Artifact<'a>,
    pub initrd: Artifact<'a>,
    /// The kernel command line(s) as written after `linux` in grub.cfg (after GRUB
    /// expands variables), kernel path first: one per slot.
    pub kernel_cmdlines: Vec<&'a str>,
    /// grub.cfg, modules, fonts: every other file GRUB loads.
    pub boot_files: Vec<Artifact<'a>>,
}

impl GoldenValues {
    /// The golden values of a boot of these artifacts: Authenticode digests of the EFI
    /// applications (what firmware measures), SHA-256 of the files GRUB loads, and the
    /// command line. Fails on an image that is not PE/COFF or a command line GRUB
    /// would not measure as written.
    pub fn compute(a: &BootArtifacts<'_>) -> Result<Self> {
        let file = |(name, bytes): &Artifact<'_>| GoldenFile { name: (*name).to_owned(), sha256: hex::encode(Sha256::digest(bytes)) };
        let mut bootloaders = Vec::new();
        for (name, image) in &a.bootloaders {
            let digest = crate::attest::authenticode::authenticode_sha256(image)
                .map_err(|e| Error::Build(format!("bootloader {name}: {e}")))?;
            bootloaders.push(GoldenFile { name: (*name).to_owned(), sha256: hex::encode(digest) });
        }
        let golden = GoldenValues {
            bootloaders,
            kernel: file(&a.kernel),
            initrd: file(&a.initrd),
            kernel_cmdlines: a.kernel_cmdlines.iter().map(|c| (*c).to_owned()).collect(),
            boot_files: a.boot_files.iter().map(file).collect(),
        };
        golden.validate()?;
        Ok(golden)
    }
}

fn matched(e: &Event, role: Role) -> Matched {
    Matched { record: e.record, pcr: e.pcr, event_type: e.event_type, text: e.text().map(str::to_owned), sha256: hex::encode(e.sha256), role }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::eventlog::EventLog;
    use crate::attest::testlog::LogBuilder;

    const CMDLINE: &str = "/boot/vmlinuz root=/dev/mapper/root ro verity.roothash=ab12";
    const QUOTED: [u32; 5] = [0, 4, 7, 8, 9];

    fn file(name: &str, content: &[u8]) -> GoldenFile {
        GoldenFile { name: name.into(), sha256: hex::encode(Sha256::digest(content)) }
    }

    fn golden() -> GoldenValues {
        GoldenValues {
            bootloaders: vec![file("grubx64.efi", b"grub")],
            kernel: file("/boot/vmlinuz", b"kernel"),
            initrd: file("/boot/initrd.img", b"initrd"),
            kernel_cmdlines: vec![CMDLINE.into(), CMDLINE.replace("root=/dev/mapper/root", "root=/dev/mapper/root-b")],
            boot_files: vec![file("/EFI/debian/grub.cfg", b"grub.cfg")],
        }
    }

    /// What a device boots: root may change any of it.
    struct Boot {
        slot: &'static str,
        cmdline: String,
        kernel: &'static [u8],
        initrd: &'static [u8],
    }

    fn good() -> Boot {
        Boot { slot: "a", cmdline: CMDLINE.into(), kernel: b"kernel", initrd: b"initrd" }
    }

    /// The log firmware and GRUB write for `boot`, up to the kernel's start.
    fn firmware_and_grub(l: &mut LogBuilder) {
        l.measure(0, EventType::SCrtmVersion, b"\0\0", b"\0\0");
        l.self_measured(4, EventType::EfiAction, b"Calling EFI Application from Boot Option");
        for pcr in 0..=7 {
            l.self_measured(pcr, EventType::Separator, &[0; 4]);
        }
        l.measure(4, EventType::EfiBootServicesApplication, b"PciRoot(0x0)/.../grubx64.efi", b"grub");
        l.grub_file("/EFI/debian/grub.cfg", b"grub.cfg");
        l.grub_string("grub_cmd: ", "load_env");
    }

    fn log_of(boot: &Boot) -> LogBuilder {
        let mut l = LogBuilder::new();
        firmware_and_grub(&mut l);
        l.grub_string("grub_cmd: ", &format!("[ {} = a ]", boot.slot));
        l.grub_string("grub_cmd: ", &format!("linux {}", boot.cmdline));
        l.grub_file("/boot/vmlinuz", boot.kernel);
        l.grub_string("kernel_cmdline: ", &boot.cmdline);
        l.grub_string("grub_cmd: ", "initrd /boot/initrd.img");
        l.grub_file("/boot/initrd.img", boot.initrd);
        l
    }

    /// Parses the log, replays it against the quote of what the TPM holds, matches.
    fn verdict(sent: &LogBuilder, tpm: &LogBuilder) -> Result<Vec<Matched>> {
        let log = EventLog::parse(&sent.bytes())?;
        let quoted = QuotedLog::check(&log, &tpm.quote(&QUOTED))?;
        golden().check(&quoted)
    }

    fn refused(sent: &LogBuilder, tpm: &LogBuilder) -> BootMismatch {
        match verdict(sent, tpm) {
            Err(Error::Golden(m)) => *m,
            other => panic!("not a golden mismatch: {other:?}"),
        }
    }

    #[test]
    fn a_golden_boot_matches_and_shows_what_each_event_is() {
        let l = log_of(&good());
        let matched = verdict(&l, &l).unwrap_or_else(|e| panic!("{e}"));
        let roles: Vec<&Role> = matched.iter().map(|m| &m.role).collect();
        for want in [Role::Bootloader("grubx64.efi".into()), Role::Kernel("/boot/vmlinuz".into()), Role::Initrd("/boot/initrd.img".into()), Role::KernelCmdline, Role::BootFile("/EFI/debian/grub.cfg".into())] {
            assert!(roles.contains(&&want), "{want:?} not in {roles:?}");
        }
        let cmdline = matched.iter().find(|m| m.role == Role::KernelCmdline).map(|m| m.text.clone());
        assert_eq!(cmdline, Some(Some(format!("kernel_cmdline: {CMDLINE}"))));
    }

    /// The grubenv changes which commands GRUB runs (try-once, slot choice); as long
    /// as the kernel, initrd and command line stay golden, the boot is golden.
    #[test]
    fn a_changed_grubenv_that_boots_the_golden_kernel_passes() {
        let l = log_of(&Boot { slot: "b", ..good() });
        assert!(verdict(&l, &l).is_ok());
    }

    #[test]
    fn a_changed_kernel_command_line_is_named() {
        let l = log_of(&Boot { cmdline: CMDLINE.replace("ab12", "evil"), ..good() });
        let m = refused(&l, &l);
        assert_eq!((m.pcr, m.event_type.as_deref()), (8, Some("EV_IPL")));
        assert!(m.record.is_some() && m.text.as_deref().is_some_and(|t| t.contains("verity.roothash=evil")), "{m}");
        assert_eq!(m.expected[0], format!("{CMDLINE:?}"));
        // Without the linux command's own event the kernel_cmdline event is named.
        let mut l = LogBuilder::new();
        firmware_and_grub(&mut l);
        l.grub_file("/boot/vmlinuz", b"kernel").grub_file("/boot/initrd.img", b"initrd");
        l.grub_string("kernel_cmdline: ", &CMDLINE.replace("ab12", "evil"));
        let m = refused(&l, &l);
        assert!(m.to_string().contains("kernel command line is not the golden one") && m.to_string().contains("kernel_cmdline: "), "{m}");
    }

    #[test]
    fn a_changed_kernel_or_initrd_is_named_with_both_digests() {
        let l = log_of(&Boot { kernel: b"kernel with a backdoor", ..good() });
        let m = refused(&l, &l);
        assert_eq!((m.pcr, m.text.as_deref()), (9, Some("/boot/vmlinuz")));
        assert_eq!(m.found, Some(hex::encode(Sha256::digest(b"kernel with a backdoor"))));
        assert!(m.expected.iter().any(|e| e.contains(&golden().kernel.sha256)), "{m}");
        let text = m.to_string();
        assert!(text.contains(&format!("record {}", m.record.unwrap_or(0))) && text.contains("EV_IPL"), "{text}");
        let l = log_of(&Boot { initrd: b"initrd that skips verity", ..good() });
        assert_eq!(refused(&l, &l).text.as_deref(), Some("/boot/initrd.img"));
    }

    /// Root boots a changed command line, rewrites its "kernel_cmdline" event as a
    /// "grub_cmd" (same string, same digest), and after boot extends PCR 8 with a
    /// golden "kernel_cmdline" it appends to the log. The log replays; the `linux`
    /// command GRUB measured before it still shows the real command line.
    #[test]
    fn a_kernel_cmdline_relabelled_as_a_grub_command_is_caught() {
        let evil = CMDLINE.replace("ab12", "evil");
        let mut forged = LogBuilder::new();
        firmware_and_grub(&mut forged);
        forged.grub_string("grub_cmd: ", &format!("linux {evil}"));
        forged.grub_file("/boot/vmlinuz", b"kernel");
        forged.grub_string("grub_cmd: ", &evil); // was "kernel_cmdline: {evil}"
        forged.grub_string("grub_cmd: ", "initrd /boot/initrd.img");
        forged.grub_file("/boot/initrd.img", b"initrd");
        forged.grub_string("kernel_cmdline: ", CMDLINE); // extended from user space
        let m = refused(&forged, &forged);
        assert!(m.reason.contains("linux command") && m.text.as_deref().is_some_and(|t| t.contains("evil")), "{m}");
    }

    /// The text of GRUB's string events is not covered by the PCR: root changes the
    /// text of the real kernel_cmdline event to the golden one and keeps the digest.
    #[test]
    fn a_string_event_whose_text_is_not_what_was_hashed_is_caught() {
        let mut l = LogBuilder::new();
        firmware_and_grub(&mut l);
        l.grub_file("/boot/vmlinuz", b"kernel").grub_file("/boot/initrd.img", b"initrd");
        let evil: [u8; 32] = Sha256::digest(CMDLINE.replace("ab12", "evil").as_bytes()).into();
        l.extend(8, EventType::Ipl, format!("kernel_cmdline: {CMDLINE}\0").as_bytes(), evil);
        let m = refused(&l, &l);
        assert!(m.reason.contains("text was changed"), "{m}");
    }

    /// An EFI application the firmware started that is not golden, sent as itself or
    /// relabelled as an EV_EFI_ACTION; and a kernel started directly by the firmware
    /// (GRUB's chainloader) instead of GRUB's linux loader.
    #[test]
    fn an_unknown_efi_application_in_pcr_4_is_caught_however_it_is_labelled() {
        for event_type in [EventType::EfiBootServicesApplication, EventType::EfiAction, EventType::Separator] {
            let mut l = log_of(&good());
            l.measure(4, event_type, b"Calling EFI Application from Boot Option", b"evil.efi");
            let m = refused(&l, &l);
            assert_eq!((m.pcr, m.event_type.clone()), (4, Some(event_type.to_string())), "{m}");
            assert_eq!(m.found, Some(hex::encode(Sha256::digest(b"evil.efi"))));
        }
        let mut l = LogBuilder::new();
        l.self_measured(4, EventType::EfiAction, b"Calling EFI Application from Boot Option");
        l.measure(4, EventType::EfiBootServicesApplication, b"shell", b"UEFI shell");
        assert_eq!(refused(&l, &l).pcr, 4);
        let mut l = LogBuilder::new();
        l.self_measured(4, EventType::EfiAction, b"Calling EFI Application from Boot Option");
        let m = refused(&l, &l);
        assert!(m.record.is_none() && m.reason.contains("no golden bootloader"), "{m}");
    }

    #[test]
    fn files_and_strings_grub_never_measured_for_a_golden_boot_are_caught() {
        // An extra module GRUB loaded, a file with a golden name but another digest
        // appended after boot, a module command line, a non-GRUB event in PCR 8.
        let mut extra = log_of(&good());
        extra.grub_file("/boot/grub/x86_64-efi/evil.mod", b"evil module");
        assert!(refused(&extra, &extra).reason.contains("not a golden kernel, initrd or boot file"));
        let mut module = log_of(&good());
        module.grub_string("module_cmdline: ", "/boot/evil");
        assert!(refused(&module, &module).reason.contains("module command line"));
        let mut tag = log_of(&good());
        tag.measure(8, EventType::EventTag, b"whatever", b"whatever");
        assert!(refused(&tag, &tag).reason.contains("not a string GRUB measures"));
        // A GRUB command with UTF-8 text is a GRUB string like any other.
        let mut utf8 = log_of(&good());
        utf8.grub_string("grub_cmd: ", "echo démarrage");
        assert!(verdict(&utf8, &utf8).is_ok());
        // Appending a golden file again changes nothing golden.
        let mut again = log_of(&good());
        again.grub_file("/boot/vmlinuz", b"kernel");
        assert!(verdict(&again, &again).is_ok());
    }

    #[test]
    fn a_boot_without_the_kernel_initrd_or_command_line_is_not_golden() {
        let mut no_initrd = LogBuilder::new();
        firmware_and_grub(&mut no_initrd);
        no_initrd.grub_string("grub_cmd: ", &format!("linux {CMDLINE}"));
        no_initrd.grub_file("/boot/vmlinuz", b"kernel");
        no_initrd.grub_string("kernel_cmdline: ", CMDLINE);
        let m = refused(&no_initrd, &no_initrd);
        assert!(m.reason.contains("golden initrd was not loaded") && m.record.is_none(), "{m}");
        let mut no_cmdline = LogBuilder::new();
        firmware_and_grub(&mut no_cmdline);
        no_cmdline.grub_file("/boot/vmlinuz", b"kernel").grub_file("/boot/initrd.img", b"initrd");
        assert!(refused(&no_cmdline, &no_cmdline).reason.contains("no kernel command line"));
    }

    /// A log rewritten to be golden, sent with the quote of the boot that happened.
    #[test]
    fn a_golden_log_sent_for_another_boot_does_not_replay() {
        let evil = log_of(&Boot { kernel: b"kernel with a backdoor", ..good() });
        assert!(matches!(verdict(&log_of(&good()), &evil), Err(Error::Replay(_))));
    }

    #[test]
    fn a_quote_that_leaves_out_a_golden_pcr_proves_nothing() {
        let l = log_of(&good());
        let log = EventLog::parse(&l.bytes()).unwrap_or_else(|e| panic!("{e}"));
        let quoted = QuotedLog::check(&log, &l.quote(&[0, 4, 9])).unwrap_or_else(|e| panic!("{e}"));
        let e = golden().check(&quoted).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not PCR 8"), "{e}");
    }

    /// Golden values computed from the artifacts match a boot of those artifacts,
    /// with the bootloader's digest the Authenticode digest firmware extends.
    #[test]
    fn golden_values_computed_from_artifacts_match_their_boot() {
        let efi: &[u8] = include_bytes!("testdata/small-pe32plus.efi");
        let artifacts = BootArtifacts {
            bootloaders: vec![("grubx64.efi", efi)],
            kernel: ("/boot/vmlinuz", b"kernel"),
            initrd: ("/boot/initrd.img", b"initrd"),
            kernel_cmdlines: vec![CMDLINE],
            boot_files: vec![("/EFI/debian/grub.cfg", b"grub.cfg")],
        };
        let computed = GoldenValues::compute(&artifacts).unwrap_or_else(|e| panic!("{e}"));
        let want = include_str!("testdata/small-pe32plus.efi.authenticode-sha256").trim().to_owned();
        assert_eq!(computed.bootloaders[0].sha256, want);
        let mut l = LogBuilder::new();
        l.self_measured(4, EventType::EfiAction, b"Calling EFI Application from Boot Option");
        let authenticode: [u8; 32] = hex::decode(&want).ok().and_then(|d| d.try_into().ok()).unwrap_or([0; 32]);
        l.extend(4, EventType::EfiBootServicesApplication, b"dp", authenticode);
        l.grub_file("/EFI/debian/grub.cfg", b"grub.cfg");
        l.grub_string("grub_cmd: ", &format!("linux {CMDLINE}"));
        l.grub_file("/boot/vmlinuz", b"kernel");
        l.grub_string("kernel_cmdline: ", CMDLINE);
        l.grub_file("/boot/initrd.img", b"initrd");
        let log = EventLog::parse(&l.bytes()).unwrap_or_else(|e| panic!("{e}"));
        let quoted = QuotedLog::check(&log, &l.quote(&QUOTED)).unwrap_or_else(|e| panic!("{e}"));
        assert!(computed.check(&quoted).is_ok(), "{:?}", computed.check(&quoted));
        // A plain SHA-256 of the EFI file is not what firmware measures.
        assert_ne!(computed.bootloaders[0].sha256, hex::encode(Sha256::digest(efi)));
        let not_pe = BootArtifacts { bootloaders: vec![("grubx64.efi", b"not a PE image")], ..artifacts };
        assert!(GoldenValues::compute(&not_pe).is_err());
    }

    /// A real boot of the virtual device: OVMF (OVMF_CODE_4M.fd) with a swtpm
    /// `tpm-crb`, Debian GRUB 2.06 with its tpm module (linuxefi), a Debian 6.1 cloud
    /// kernel. The log is the kernel's `binary_bios_measurements`, the PCRs were read
    /// from `/sys/class/tpm/tpm0/pcr-sha256/N` in the same boot (0-20 recorded).
    const REAL_LOG: &[u8] = include_bytes!("testdata/ovmf-grub-debian.binary_bios_measurements");
    const REAL_PCRS: &str = include_str!("testdata/ovmf-grub-debian.pcrs-sha256.txt");
    const REAL_CMDLINE: &str = "(hd0,gpt2)/boot/vmlinuz root=PARTUUID=8d0a1c2e-0a5a-4f61-9e0b-6f7574706f41 ro console=ttyS0,115200 panic=5 loglevel=4 outpost.slot=A";

    fn recorded_pcrs() -> Vec<(u32, [u8; 32])> {
        REAL_PCRS
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(i, v)| Some((i.parse().ok()?, hex::decode(v).ok()?.try_into().ok()?)))
            .collect()
    }

    fn real_golden(log: &EventLog) -> GoldenValues {
        let digest = |text: &str| log.pcr_events(9).find(|e| e.text() == Some(text)).map(|e| hex::encode(e.sha256)).unwrap_or_default();
        let named = |name: &str| GoldenFile { name: name.into(), sha256: digest(name) };
        GoldenValues {
            // The Authenticode digest of the BOOTX64.EFI this boot ran: what
            // `authenticode_sha256` computes for that file (checked by hand; the 745 KB
            // binary is not in the repository), and what osslsigncode calculates.
            bootloaders: vec![GoldenFile { name: "BOOTX64.EFI".into(), sha256: "4698fc89336335ba8c5fe657709b6df0ba0917f3c5628fa1110a1be346020e88".into() }],
            // `sha256sum` of the image's /boot/vmlinuz and /boot/initrd.img (checked by
            // hand against the VM build's files): GRUB measures the files' bytes.
            kernel: GoldenFile { name: "vmlinuz".into(), sha256: "3d616aa853fe11b1c0ea99a1cdb4fb6ddc9010ba7c4562de700ad94264989654".into() },
            initrd: GoldenFile { name: "initrd.img".into(), sha256: "3c272a2923491756af5af0f2de7b2386fe9622db6650593b2e3038c43023c25c".into() },
            kernel_cmdlines: vec![REAL_CMDLINE.into(), REAL_CMDLINE.replace("gpt2", "gpt3").replace("slot=A", "slot=B")],
            // Taken from the log. This image's GRUB still read the grubenv through the
            // verifiers (later images use load_env --skip-sig: the grubenv is not measured).
            boot_files: vec![named("(hd0,gpt1)/EFI/outpost/grub.cfg"), named("(hd0,gpt1)/EFI/outpost/grubenv")],
        }
    }

    #[test]
    fn a_real_ovmf_grub_boot_replays_to_its_pcrs() {
        let log = EventLog::parse(REAL_LOG).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(log.events.len(), 62);
        let replayed = log.replay_sha256().unwrap_or_else(|e| panic!("{e}"));
        let recorded = recorded_pcrs();
        assert_eq!(recorded.len(), 21);
        let mut values = crate::attest::replay::reset_values();
        for (pcr, value) in &recorded {
            values[*pcr as usize] = *value;
            // PCR 10 is IMA's, extended after the firmware log ends.
            if *pcr != 10 {
                assert_eq!(hex::encode(replayed[*pcr as usize]), hex::encode(value), "PCR {pcr}");
            }
        }
        // The quote of what the TPM held (the recorded values, not the replay).
        let quote = crate::attest::testlog::quote_of(&values, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(QuotedLog::check(&log, &quote).is_ok());
        assert!(QuotedLog::check(&log, &crate::attest::testlog::quote_of(&values, &[9, 10])).is_err(), "IMA's PCR 10 is not in this log");
    }

    #[test]
    fn a_real_grub_boot_has_the_events_the_rules_expect_and_matches_its_golden_values() {
        let log = EventLog::parse(REAL_LOG).unwrap_or_else(|e| panic!("{e}"));
        let values = log.replay_sha256().unwrap_or_else(|e| panic!("{e}"));
        // GRUB's kernel command line: data is the prefixed text and a NUL, the digest is
        // the SHA-256 of the command line alone.
        let cmdline = log.pcr_events(8).find(|e| e.text().is_some_and(|t| t.starts_with("kernel_cmdline: "))).unwrap_or_else(|| panic!("no cmdline"));
        assert_eq!((cmdline.record, cmdline.event_type), (57, EventType::Ipl));
        assert_eq!(cmdline.data, format!("kernel_cmdline: {REAL_CMDLINE}\0").into_bytes());
        assert_eq!(cmdline.sha256[..], Sha256::digest(REAL_CMDLINE.as_bytes())[..]);
        // Every PCR 8 event is a GRUB string whose digest hashes its text after the prefix.
        for e in log.pcr_events(8) {
            let text = e.text().unwrap_or_default();
            let measured = text.split_once(": ").map(|(_, m)| m).unwrap_or_default();
            assert_eq!(e.sha256[..], Sha256::digest(measured.as_bytes())[..], "record {}: {text:?}", e.record);
        }
        let quote = crate::attest::testlog::quote_of(&values, &QUOTED);
        let quoted = QuotedLog::check(&log, &quote).unwrap_or_else(|e| panic!("{e}"));
        let golden = real_golden(&log);
        let matched = golden.check(&quoted).unwrap_or_else(|e| panic!("{e}"));
        let role = |r: usize| matched.iter().find(|m| m.record == r).map(|m| m.role.clone());
        assert_eq!(role(29), Some(Role::Bootloader("BOOTX64.EFI".into())));
        assert_eq!((role(56), role(59), role(57)), (Some(Role::Kernel("vmlinuz".into())), Some(Role::Initrd("initrd.img".into())), Some(Role::KernelCmdline)));
        assert_eq!(role(55), Some(Role::GrubCommand), "linuxefi with a golden command line");
        // The matched events as JSON, for showing beside the golden values.
        let kernel = matched.iter().find(|m| m.record == 56).map(serde_json::to_value);
        let kernel = kernel.and_then(|v| v.ok()).unwrap_or_default();
        assert_eq!((kernel["event_type"].as_str(), kernel["role"]["kind"].as_str()), (Some("EV_IPL"), Some("kernel")));
        assert_eq!(kernel["role"]["name"].as_str(), Some("vmlinuz"), "the golden file's name");
        // The same in one call, from the bytes; and each kind of failure as its own error.
        assert_eq!(check_boot(REAL_LOG, &quote, &golden).ok(), Some(matched.clone()));
        assert!(matches!(check_boot(&REAL_LOG[..100], &quote, &golden), Err(Error::EventLog { .. })));
        let mut other = quote.clone();
        other.pcr_digest[0] ^= 1;
        assert!(matches!(check_boot(REAL_LOG, &other, &golden), Err(Error::Replay(_))));
        // Golden values for slot B only: the linuxefi command that booted slot A is named.
        let slot_b = GoldenValues { kernel_cmdlines: vec![golden.kernel_cmdlines[1].clone()], ..golden.clone() };
        let m = match slot_b.check(&quoted) {
            Err(Error::Golden(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!((m.record, m.pcr), (Some(55), 8), "{m}");
        assert!(m.text.as_deref().is_some_and(|t| t.starts_with("grub_cmd: linuxefi ")), "{m}");
        // Another kernel build: the kernel event is named, with its path.
        let other_kernel = GoldenValues { kernel: GoldenFile { name: "vmlinuz".into(), sha256: "00".repeat(32) }, ..golden };
        let e = other_kernel.check(&quoted).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("record 56") && e.contains("(hd0,gpt2)/boot/vmlinuz"), "{e}");
    }

    #[test]
    fn golden_values_are_validated_and_round_trip() {
        let g = golden();
        let json = serde_json::to_value(&g).unwrap_or_default();
        assert_eq!(serde_json::from_value::<GoldenValues>(json.clone()).ok(), Some(g.clone()));
        let mut extra = json;
        extra["pcr23"] = serde_json::json!(1);
        assert!(serde_json::from_value::<GoldenValues>(extra).is_err());
        for cmdline in ["", " a", "a  b", "a \"b c\"", "a\\b", "a\tb"] {
            let g = GoldenValues { kernel_cmdlines: vec![CMDLINE.into(), cmdline.into()], ..golden() };
            assert!(g.validate().is_err(), "{cmdline:?} accepted");
        }
        let g = GoldenValues { kernel: GoldenFile { name: "k".into(), sha256: "AB".repeat(32) }, ..golden() };
        assert!(g.validate().is_err());
        let g = GoldenValues { bootloaders: vec![], ..golden() };
        assert!(g.validate().is_err());
        let g = GoldenValues { kernel_cmdlines: vec![], ..golden() };
        assert!(g.validate().is_err());
    }
}
