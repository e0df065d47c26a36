//! Integrity incidents: dm-verity blocks that failed verification in an earlier boot.
//!
//! A slot's root is mapped through dm-verity with `restart_on_corruption`: a block that
//! fails verification restarts the machine before any program sees it, and the kernel
//! dumps its last messages to pstore on the way down (the initramfs loads efi_pstore
//! and sets printk.always_kmsg_dump, testbeds/vm/files/initramfs-verity). EFI variables
//! keep the dump across the restart; the kernel shows it again as
//! `/sys/fs/pstore/dmesg-efi-<id>` files. At start the agent:
//!
//! 1. reads every `dmesg-*` record and finds dm-verity corruption lines in it;
//! 2. journals them in `incidents.json` in its state directory (write temp, fsync,
//!    rename) — merged with what is already queued there, one per record, device and
//!    block;
//! 3. only then deletes the records (every dmesg record, reported or not: EFI variable
//!    space is small, and a full store would lose the next corruption's record);
//! 4. sends the queue, in attested check-ins (enrolled devices) or to the incident
//!    route (others), and forgets what the server accepted.
//!
//! A record without a corruption line but with the kernel's panic line ("Kernel panic -
//! not syncing: …", a boot that died) is journaled the same way, as a crash note: the
//! boot step gives the notes to the installer, and a trial whose attempts ran out is
//! rolled back with them in its reason; they are dropped once that step is journaled.
//!
//! A crash between 2 and 3 reads the same records again and queues nothing twice; one
//! between sending and forgetting sends an incident twice, which the server stores once
//! (the record name, device and block name it). systemd-pstore.service is masked on
//! the image: it would move the records to /var/lib/systemd/pstore and delete them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::incident::{parse_verity_line, IntegrityIncident, MAX_LINE, MAX_PER_MESSAGE};
use outpost_protocol::slot::Slot;
use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, BootBackend};
use crate::error::{AgentError, Result};

/// Records read at most per start, and bytes of each (a dump is about 10 KiB in parts
/// of about 1 KiB compressed); the rest waits for the next start.
const MAX_RECORDS: usize = 64;
const MAX_RECORD_BYTES: u64 = 64 << 10;
/// Incidents kept queued at most; later ones are dropped (and logged): the first ones
/// tell the operator what happened.
const MAX_QUEUED: usize = 256;

/// One pstore record of a kernel log dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The file's name (`dmesg-efi-176496120001001`).
    pub name: String,
    /// When the dumping kernel wrote it (the file's modification time).
    pub time: chrono::DateTime<chrono::Utc>,
    pub text: String,
}

/// What the agent knows to put beside a kernel line.
#[derive(Debug, Clone)]
pub struct Context {
    pub device_id: String,
    pub hardware_class: String,
    /// The kernel's "major:minor" of each slot's partition.
    pub slots: Vec<(Slot, String)>,
    /// The slot booted now and the release it runs.
    pub running: Option<(Slot, String)>,
}

/// The dm-verity corruptions in `record`, once each (dev, kind, block).
pub fn incidents_in(record: &Record, cx: &Context) -> Vec<IntegrityIncident> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for line in record.text.lines() {
        let Some(v) = parse_verity_line(line) else { continue };
        if line.len() > MAX_LINE || !seen.insert((v.dev.clone(), v.kind, v.block)) {
            continue;
        }
        let slot = cx.slots.iter().find(|(_, dev)| *dev == v.dev).map(|(s, _)| *s);
        let release = cx.running.as_ref().filter(|(s, _)| Some(*s) == slot).map(|(_, r)| r.clone());
        found.push(IntegrityIncident {
            device_id: cx.device_id.clone(),
            hardware_class: cx.hardware_class.clone(),
            kind: v.kind,
            dev: v.dev,
            block: v.block,
            slot,
            release,
            boot_at: record.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            record: record.name.clone(),
            line: line.trim_end().to_owned(),
        });
    }
    found
}

/// The kernel log dumps in `dir`, oldest name first (none when `dir` does not exist).
pub fn read_records(dir: &Path) -> Result<Vec<Record>> {
    use std::io::Read;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AgentError::io("list pstore records", dir, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("dmesg-"))
        .collect();
    names.sort();
    names.truncate(MAX_RECORDS);
    let mut records = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let file = std::fs::File::open(&path).map_err(|e| AgentError::io("open pstore record", &path, e))?;
        let time = file.metadata().and_then(|m| m.modified()).map_err(|e| AgentError::io("stat pstore record", &path, e))?;
        let mut bytes = Vec::new();
        file.take(MAX_RECORD_BYTES).read_to_end(&mut bytes).map_err(|e| AgentError::io("read pstore record", &path, e))?;
        records.push(Record { name, time: time.into(), text: String::from_utf8_lossy(&bytes).into_owned() });
    }
    Ok(records)
}

/// Crash notes kept at most, and characters of each line.
const MAX_CRASHES: usize = 4;
const MAX_CRASH_LINE: usize = 300;

/// The queue of incidents not yet delivered, and the crash notes for the next boot
/// step, on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub pending: Vec<IntegrityIncident>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crashes: Vec<Crash>,
}

/// A kernel panic found in a pstore record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crash {
    pub record: String,
    pub line: String,
}

impl Crash {
    /// The panic in `record`: its first "Kernel panic - not syncing" line, printable
    /// characters only, at most [`MAX_CRASH_LINE`] of them.
    pub fn in_record(record: &Record) -> Option<Crash> {
        let line = record.text.lines().find(|l| l.contains("Kernel panic - not syncing"))?;
        let line: String = line.trim().chars().filter(|c| !c.is_control()).take(MAX_CRASH_LINE).collect();
        Some(Crash { record: record.name.clone(), line })
    }

    /// One line for a rollback's reason.
    pub fn describe(&self) -> String {
        format!("{} (pstore record {})", self.line, self.record)
    }
}

fn key(i: &IntegrityIncident) -> (&str, &str, u64) {
    (&i.record, &i.dev, i.block)
}

impl Queue {
    /// Adds what is not queued yet; returns how many were added.
    fn merge(&mut self, found: Vec<IntegrityIncident>) -> usize {
        let mut added = 0;
        for incident in found {
            if self.pending.iter().any(|q| key(q) == key(&incident)) {
                continue;
            }
            if self.pending.len() >= MAX_QUEUED {
                tracing::warn!(record = %incident.record, block = incident.block, "incident queue full: not queued");
                continue;
            }
            self.pending.push(incident);
            added += 1;
        }
        added
    }
}

/// The queue's file and the pstore directory it is filled from.
pub struct Incidents {
    path: PathBuf,
    pstore: Option<PathBuf>,
    queue: Queue,
}

impl Incidents {
    /// Opens the queue in `config`'s state directory. A corrupt queue is an error
    /// naming the file.
    pub fn open(config: &AgentConfig) -> Result<Self> {
        let path = config.state_dir.join("incidents.json");
        let pstore = match &config.install.boot_backend {
            BootBackend::Grub { pstore, .. } => Some(pstore.clone()),
            BootBackend::File => None,
        };
        let queue = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::Corrupt { path: path.clone(), reason: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Queue::default(),
            Err(e) => return Err(AgentError::io("read incident queue", &path, e)),
        };
        Ok(Incidents { path, pstore, queue })
    }

    pub fn pending(&self) -> &[IntegrityIncident] {
        &self.queue.pending
    }

    fn store(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.queue).map_err(|e| AgentError::Serialize { what: "incident queue".into(), reason: e.to_string() })?;
        outpost_fsio::write_atomic(&self.path, &bytes).map_err(|e| AgentError::io("write incident queue", &self.path, e))
    }

    /// Steps 1-3 of the module header: read the records, journal their incidents,
    /// then delete them. Returns how many incidents were queued anew.
    pub fn collect(&mut self, cx: &Context) -> Result<usize> {
        let Some(dir) = self.pstore.clone() else { return Ok(0) };
        let records = read_records(&dir)?;
        let mut found = Vec::new();
        let mut crashed = 0;
        for record in &records {
            let incidents = incidents_in(record, cx);
            if incidents.is_empty() {
                match Crash::in_record(record) {
                    Some(crash) if !self.queue.crashes.contains(&crash) && self.queue.crashes.len() < MAX_CRASHES => {
                        tracing::warn!(record = %record.name, line = %crash.line, "the kernel panicked in an earlier boot");
                        self.queue.crashes.push(crash);
                        crashed += 1;
                    }
                    _ => {
                        let first = record.text.lines().next().unwrap_or("");
                        tracing::info!(record = %record.name, header = first, "pstore record without a dm-verity corruption: deleted");
                    }
                }
            }
            for i in &incidents {
                tracing::warn!(record = %i.record, dev = %i.dev, block = i.block, slot = ?i.slot, "dm-verity corruption in an earlier boot: reporting");
            }
            found.extend(incidents);
        }
        let added = self.queue.merge(found);
        if added > 0 || crashed > 0 {
            self.store()?;
        }
        for record in &records {
            let path = dir.join(&record.name);
            std::fs::remove_file(&path).map_err(|e| AgentError::io("delete pstore record", &path, e))?;
        }
        Ok(added)
    }

    /// The kernel panics of earlier boots, for the boot step.
    pub fn crashes(&self) -> &[Crash] {
        &self.queue.crashes
    }

    /// The boot step has journaled what it made of the crash notes: they are dropped.
    pub fn clear_crashes(&mut self) -> Result<()> {
        if self.queue.crashes.is_empty() {
            return Ok(());
        }
        self.queue.crashes.clear();
        self.store()
    }

    /// The first `sent` queued incidents reached the server: they leave the queue.
    pub fn sent(&mut self, sent: usize) -> Result<()> {
        if sent > 0 {
            self.queue.pending.drain(..sent.min(self.queue.pending.len()));
            self.store()?;
        }
        Ok(())
    }

    /// Names the device `device_id` in every queued incident: a device enrolled while
    /// running queued earlier ones under its configured name, and a check-in refuses
    /// incidents that name another device. Returns how many were renamed.
    pub fn name_device(&mut self, device_id: &str) -> Result<usize> {
        let mut renamed = 0;
        for incident in self.queue.pending.iter_mut().filter(|i| i.device_id != device_id) {
            incident.device_id = device_id.to_owned();
            renamed += 1;
        }
        if renamed > 0 {
            self.store()?;
        }
        Ok(renamed)
    }

    /// What the next message may carry.
    pub fn batch(&self) -> Vec<IntegrityIncident> {
        self.queue.pending.iter().take(MAX_PER_MESSAGE).cloned().collect()
    }

    /// Sends the queue one by one to `server_url`'s incident route (devices that do not
    /// attest), in order. One the server finds invalid (422) is dropped with a warning,
    /// since it would be refused again; any other refusal or failure stops the flush,
    /// and the rest stays queued.
    pub async fn flush_unattested(&mut self, http: &reqwest::Client, server_url: &str, timeout: Duration) {
        if self.queue.pending.is_empty() {
            return;
        }
        let url = format!("{server_url}/api/v1/incidents");
        let mut sent = 0;
        for incident in &self.queue.pending {
            match tokio::time::timeout(timeout, http.post(&url).json(incident).send()).await {
                Ok(Ok(r)) if r.status().is_success() => sent += 1,
                Ok(Ok(r)) if r.status() == reqwest::StatusCode::UNPROCESSABLE_ENTITY => {
                    // The server's reason, read as every API answer is (bounded).
                    let answer = tokio::time::timeout(timeout, crate::attest::api::<serde_json::Value>("send an integrity incident", r)).await;
                    let reason = match answer {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no reason given".to_owned(),
                    };
                    tracing::warn!(record = %incident.record, %reason, "the server refused a queued integrity incident as invalid; dropped from the queue");
                    sent += 1;
                }
                Ok(Ok(r)) => {
                    tracing::warn!(status = %r.status(), "server refused an integrity incident");
                    break;
                }
                _ => {
                    tracing::warn!("server unreachable; integrity incidents stay queued");
                    break;
                }
            }
        }
        if let Err(e) = self.sent(sent) {
            tracing::error!(error = %e, "cannot journal sent incidents");
        }
    }
}

/// The kernel's "major:minor" of the block device at `path` (following links).
pub fn dev_name(path: &Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let dev = meta.rdev();
    // glibc's gnu_dev_major / gnu_dev_minor.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Some(format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records captured from the virtual device (tests/vm.py, slot A on /dev/vda2, a
    /// byte of a file flipped on the partition and read): part 1 of the kernel log dump
    /// efi_pstore kept across the dm-verity restart, and part 2 (older messages).
    const CAPTURED: &str = include_str!("testdata/pstore-verity-restart.txt");
    const CAPTURED_PART2: &str = include_str!("testdata/pstore-shutdown-part2.txt");

    fn cx() -> Context {
        Context {
            device_id: "vm-1".into(),
            hardware_class: "qemu-x86_64".into(),
            slots: vec![(Slot::A, "254:2".into()), (Slot::B, "254:3".into())],
            running: Some((Slot::A, "1.0.0".into())),
        }
    }

    fn record(text: &str) -> Record {
        Record { name: "dmesg-efi-176496120001001".into(), time: chrono::DateTime::from_timestamp(1_764_961_200, 0).unwrap_or_default(), text: text.into() }
    }

    #[test]
    fn a_captured_dm_verity_restart_becomes_one_valid_incident_per_block() {
        let found = incidents_in(&record(CAPTURED), &cx());
        assert_eq!(found.len(), 1, "{found:?}");
        let i = &found[0];
        assert_eq!(i.validate(), Ok(()), "{i:?}");
        assert_eq!((i.kind, i.block, i.dev.as_str()), (outpost_protocol::incident::IncidentKind::VerityData, 50558, "254:2"));
        assert_eq!((i.slot, i.release.as_deref()), (Some(Slot::A), Some("1.0.0")));
        assert_eq!(i.line, "<3>[   23.915531] device-mapper: verity: 254:2: data block 50558 is corrupted");
        assert_eq!((i.record.as_str(), i.boot_at.as_str()), ("dmesg-efi-176496120001001", "2025-12-05T19:00:00Z"));
        // A line printed twice (the read retried) is one incident.
        let twice = format!("{CAPTURED}\n<3>[   23.9] device-mapper: verity: 254:2: data block 50558 is corrupted\n");
        assert_eq!(incidents_in(&record(&twice), &cx()).len(), 1);
    }

    #[test]
    fn a_record_without_a_verity_line_yields_nothing_and_an_unknown_device_no_slot() {
        assert!(incidents_in(&record(CAPTURED_PART2), &cx()).is_empty());
        let reboot = "Shutdown#1 Part1\n<6>[  50.1] systemd-shutdown[1]: Rebooting.\n<0>[  50.2] reboot: Restarting system\n";
        assert!(incidents_in(&record(reboot), &cx()).is_empty());
        let other = incidents_in(&record("<3>[ 1.0] device-mapper: verity: 8:1: metadata block 9 is corrupted\n"), &cx());
        assert_eq!(other.iter().map(|i| (i.slot, i.release.clone())).collect::<Vec<_>>(), [(None, None)]);
        let long = format!("<3>[ 1.0] {} device-mapper: verity: 254:3: data block 1 is corrupted", "x".repeat(MAX_LINE));
        assert!(incidents_in(&record(&long), &cx()).is_empty(), "a line beyond the bound is not reported");
    }

    fn agent_config(dir: &Path) -> AgentConfig {
        let toml = format!(
            "server_url = \"http://127.0.0.1:9\"\nhardware_class = \"qemu-x86_64\"\nstate_dir = \"{}\"\ntrusted_root = \"root.json\"\ndevice_id = \"vm-1\"\n\
             [install]\nboot_backend = \"grub\"\ngrub_env = \"grubenv\"\nslot_a = \"a\"\nslot_b = \"b\"\npstore_dir = \"pstore\"\n",
            dir.join("state").display()
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, toml).unwrap_or_else(|e| panic!("{e}"));
        AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A device's config (state directory made) and its pstore directory holding
    /// `records` (name, text).
    fn device_with_records(dir: &Path, records: &[(&str, &str)]) -> (AgentConfig, PathBuf) {
        let config = agent_config(dir);
        let pstore = dir.join("pstore");
        std::fs::create_dir_all(&pstore).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(&config.state_dir).unwrap_or_else(|e| panic!("{e}"));
        for (name, text) in records {
            std::fs::write(pstore.join(name), text).unwrap_or_else(|e| panic!("{e}"));
        }
        (config, pstore)
    }

    #[test]
    fn incidents_are_journaled_before_their_records_go_and_queued_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (config, pstore) =
            device_with_records(dir.path(), &[("dmesg-efi-176496120001001", CAPTURED), ("dmesg-efi-176496120002001", CAPTURED_PART2)]);

        // The queue file cannot be written (a directory stands in its place): nothing
        // is journaled, so no record may be deleted.
        let queue = config.state_dir.join("incidents.json");
        std::fs::create_dir_all(queue.join("x")).unwrap_or_else(|e| panic!("{e}"));
        let mut incidents = Incidents::open(&config).err().map(|e| e.to_string());
        assert!(incidents.take().is_some_and(|e| e.contains("incidents.json")), "a queue that cannot be read is named");
        std::fs::remove_dir_all(&queue).unwrap_or_else(|e| panic!("{e}"));
        let mut inc = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(queue.join("x")).unwrap_or_else(|e| panic!("{e}"));
        assert!(inc.collect(&cx()).is_err());
        assert_eq!(std::fs::read_dir(&pstore).map(|d| d.count()).unwrap_or(0), 2, "records kept while the queue is not durable");
        std::fs::remove_dir_all(&queue).unwrap_or_else(|e| panic!("{e}"));

        // A crash after journaling, before deleting: the records are read again at the
        // next start and nothing is queued twice.
        let mut inc = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        let first = inc.collect(&cx()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first, 1);
        assert_eq!(std::fs::read_dir(&pstore).map(|d| d.count()).unwrap_or(99), 0, "every dmesg record deleted once journaled");
        std::fs::write(pstore.join("dmesg-efi-176496120001001"), CAPTURED).unwrap_or_else(|e| panic!("{e}"));
        let mut again = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.pending().len(), first, "the queue survived");
        assert_eq!(again.collect(&cx()).unwrap_or_else(|e| panic!("{e}")), 0);
        assert_eq!(again.pending().len(), first);

        // What the server accepted leaves the queue, durably.
        again.sent(1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Incidents::open(&config).map(|i| i.pending().len()).unwrap_or(99), first - 1);
    }

    #[test]
    fn incidents_queued_before_an_enrollment_are_renamed_durably_to_the_enrolled_device() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (config, _) = device_with_records(dir.path(), &[("dmesg-efi-176496120001001", CAPTURED)]);
        let mut inc = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inc.collect(&cx()).unwrap_or_else(|e| panic!("{e}")), 1);
        assert_eq!(inc.name_device("vm-1").unwrap_or_else(|e| panic!("{e}")), 0, "already its name");
        assert_eq!(inc.name_device("dev-0123").unwrap_or_else(|e| panic!("{e}")), 1);
        let reopened = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reopened.pending().iter().map(|i| i.device_id.as_str()).collect::<Vec<_>>(), ["dev-0123"]);
        assert!(outpost_protocol::incident::sort_out("dev-0123", &reopened.batch()).is_ok_and(|(_, refused)| refused.is_empty()));
    }

    #[test]
    fn a_kernel_panic_in_a_record_is_journaled_as_a_crash_note_until_the_boot_step_has_used_it() {
        // What the kernel dumps when a slot's init dies (tests/test_vm.py's 4.0.0).
        let panic = "Panic#1 Part1\n<6>[    9.12] Run /sbin/init as init process\n\
                     <0>[    9.50] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\x07\n<4>[    9.51] CPU: 0 PID: 1\n";
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (config, pstore) =
            device_with_records(dir.path(), &[("dmesg-efi-176496120003001", panic), ("dmesg-efi-176496120004001", "Oops#1 Part1\nnothing here\n")]);
        let mut inc = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inc.collect(&cx()).unwrap_or_else(|e| panic!("{e}")), 0, "a panic is not an integrity incident");
        assert!(inc.pending().is_empty());
        let want = Crash {
            record: "dmesg-efi-176496120003001".into(),
            line: "<0>[    9.50] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100".into(),
        };
        assert_eq!(inc.crashes(), [want.clone()], "one note, its line without control characters");
        assert_eq!(std::fs::read_dir(&pstore).map(|d| d.count()).unwrap_or(99), 0, "both records deleted once journaled");
        // Journaled: a restart before the boot step still has it; the same record read
        // again (a crash before deleting) is not noted twice.
        std::fs::write(pstore.join("dmesg-efi-176496120003001"), panic).unwrap_or_else(|e| panic!("{e}"));
        let mut again = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        again.collect(&cx()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.crashes(), [want.clone()]);
        assert!(want.describe().ends_with("exitcode=0x00000100 (pstore record dmesg-efi-176496120003001)"), "{}", want.describe());
        again.clear_crashes().unwrap_or_else(|e| panic!("{e}"));
        assert!(Incidents::open(&config).map(|i| i.crashes().is_empty()).unwrap_or(false), "cleared durably");
    }

    #[test]
    fn a_flood_of_forged_panic_records_keeps_the_notes_bounded() {
        // Root on the device writes many records whose panic lines are long: the notes
        // stay few and short, so a rollback reason stays within what a report may carry.
        let long = format!("<0>[ 1.0] Kernel panic - not syncing: {}\n", "x".repeat(5000));
        let names: Vec<String> = (0..10).map(|i| format!("dmesg-efi-1764961200{i:05}")).collect();
        let records: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), long.as_str())).collect();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (config, pstore) = device_with_records(dir.path(), &records);
        let mut inc = Incidents::open(&config).unwrap_or_else(|e| panic!("{e}"));
        inc.collect(&cx()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inc.crashes().len(), MAX_CRASHES);
        assert!(inc.crashes().iter().all(|c| c.line.chars().count() == MAX_CRASH_LINE));
        let reason: String = inc.crashes().iter().map(|c| c.describe()).collect::<Vec<_>>().join("; ");
        assert!(reason.len() + 200 < 4096, "{} characters", reason.len());
        assert_eq!(std::fs::read_dir(&pstore).map(|d| d.count()).unwrap_or(99), 0, "every record deleted all the same");
    }

    #[test]
    fn no_pstore_directory_is_no_record() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_records(&dir.path().join("absent")).map(|r| r.len()).ok(), Some(0));
    }
}
