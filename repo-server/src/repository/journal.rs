//! Every change to the served repository (a publish, a re-signing, the first root) is
//! one transaction, so that a crash at any instant leaves clients either the old
//! repository or the new one, and never two contents under one versioned name.
//!
//! 1. Everything is decided and signed in memory; nothing under `metadata/` or
//!    `targets/` changes while a publish is being verified.
//! 2. **Commit**: the whole transaction (every metadata file's bytes, the staged
//!    uploads to place, the files to drop) is written to `publish-journal.json` beside
//!    `metadata/` with [`outpost_fsio::write_atomic`] (temporary file, fsync, rename,
//!    directory fsync). That rename is the one atomic step: before it the publish did
//!    not happen, after it the publish has happened, whatever comes next.
//! 3. **Apply**: targets are placed (hard link, or a durable copy) and their
//!    directories fsynced; versioned metadata files are written, then the unversioned
//!    ones, `timestamp.json` last but one (`root.json` after it). A versioned file that
//!    already exists is left alone when its bytes are the same and is never
//!    overwritten when they differ.
//! 4. The journal file is removed.
//!
//! At start, a journal left by a crash is applied again (every step is idempotent)
//! before the repository is read or served: a half-done publish is rolled forward. A
//! publish that crashed before step 2 left nothing visible (uploads stay in staging),
//! so the pipeline's retry starts from the old repository.
//!
//! Versioned names are only created from committed transactions, so a versioned file
//! that exists was (or may have been) served, and is final: the publish code checks
//! before committing that every versioned name it writes is new or byte-identical.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ServerError;

/// The journal file, in the repository directory (not under the served `metadata/`).
pub const JOURNAL_FILE: &str = "publish-journal.json";

/// One change to the served repository, in the order it is made visible.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transaction {
    /// Uploads to place under `targets/`.
    pub targets: Vec<PlacedTarget>,
    /// Metadata files to write under `metadata/`, in this order.
    pub files: Vec<MetadataFile>,
    /// Unversioned metadata files to remove (roles no delegation reaches any more).
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacedTarget {
    /// File name under `staging/` (the upload's sha256).
    pub staged: String,
    /// Path under `targets/` (consistent-snapshot name).
    pub served: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataFile {
    /// File name under `metadata/`.
    pub name: String,
    /// The file's bytes (metadata is JSON text).
    pub content: String,
}

impl MetadataFile {
    pub fn new(name: impl Into<String>, bytes: &[u8]) -> Result<Self, ServerError> {
        let name = name.into();
        let content = String::from_utf8(bytes.to_vec()).map_err(|_| ServerError::State(format!("metadata {name} is not UTF-8 JSON text")))?;
        Ok(MetadataFile { name, content })
    }
}

/// What a metadata file's name promises the clients that fetch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataName {
    /// `N.something.json`: once served, one content forever (cacheable for good).
    Versioned,
    /// `timestamp.json`, `root.json`, `ROLE.json`: replaced by each change.
    Current,
}

impl MetadataName {
    pub fn of(name: &str) -> Self {
        if name.split('.').next().is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())) {
            MetadataName::Versioned
        } else {
            MetadataName::Current
        }
    }
}

/// `N.something.json`: a name that, once served, means one content forever.
pub fn is_versioned(name: &str) -> bool {
    MetadataName::of(name) == MetadataName::Versioned
}

/// The served directories and the journal beside them.
pub struct Journal {
    dir: PathBuf,
    metadata_dir: PathBuf,
    targets_dir: PathBuf,
    staging_dir: PathBuf,
}

impl Journal {
    pub fn new(dir: &Path, metadata_dir: &Path, targets_dir: &Path, staging_dir: &Path) -> Self {
        Journal { dir: dir.to_owned(), metadata_dir: metadata_dir.to_owned(), targets_dir: targets_dir.to_owned(), staging_dir: staging_dir.to_owned() }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Whether a committed transaction has not been applied to the end.
    pub fn pending(&self) -> bool {
        self.path().exists()
    }

    /// Commits `tx`, applies it and removes the journal. An error after the commit
    /// leaves the journal: the transaction is then applied by [`Self::recover`] (the
    /// next change, or the next start) before anything else.
    pub fn run(&self, tx: &Transaction) -> Result<(), ServerError> {
        let bytes = serde_json::to_vec(tx).map_err(|e| ServerError::State(format!("encode publish journal: {e}")))?;
        let path = self.path();
        outpost_fsio::write_atomic(&path, &bytes).map_err(|e| ServerError::io("commit publish journal", &path, e))?;
        self.apply(tx)?;
        self.finish()
    }

    /// Applies a transaction left by a crash, if any; returns how many metadata files
    /// it names.
    pub fn recover(&self) -> Result<Option<usize>, ServerError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ServerError::io("read publish journal", &path, e)),
        };
        // The journal is written by write_atomic: it is complete or absent. Anything
        // else was made by hand, and applying a guess could serve two contents.
        let tx: Transaction = serde_json::from_slice(&bytes).map_err(|e| {
            ServerError::State(format!(
                "{} is not a publish journal ({e}); it holds a committed publish that was not fully applied. \
                 Restore it from a backup of the data directory, or move it away to drop that publish",
                path.display()
            ))
        })?;
        self.apply(&tx)?;
        self.finish()?;
        Ok(Some(tx.files.len()))
    }

    fn finish(&self) -> Result<(), ServerError> {
        let path = self.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ServerError::io("remove publish journal", &path, e)),
        }
        outpost_fsio::sync_dir(&self.dir).map_err(|e| ServerError::io("fsync", &self.dir, e))
    }

    /// Every step is idempotent: this runs again after a crash in the middle.
    fn apply(&self, tx: &Transaction) -> Result<(), ServerError> {
        for t in &tx.targets {
            self.place_target(t)?;
        }
        for f in &tx.files {
            let path = self.metadata_dir.join(&f.name);
            if is_versioned(&f.name) {
                match std::fs::read(&path) {
                    Ok(existing) if existing == f.content.as_bytes() => continue,
                    Ok(_) => {
                        return Err(ServerError::State(format!(
                            "metadata/{} already exists with other content; a versioned metadata file is never rewritten \
                             (the publish journal {} stays until this is resolved)",
                            f.name,
                            self.path().display()
                        )))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ServerError::io("read", &path, e)),
                }
            }
            outpost_fsio::write_atomic(&path, f.content.as_bytes()).map_err(|e| ServerError::io("write", &path, e))?;
        }
        for name in &tx.remove {
            if is_versioned(name) {
                continue;
            }
            let path = self.metadata_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ServerError::io("remove", &path, e)),
            }
        }
        if !tx.remove.is_empty() {
            outpost_fsio::sync_dir(&self.metadata_dir).map_err(|e| ServerError::io("fsync", &self.metadata_dir, e))?;
        }
        // The uploads are served now; staging keeps nothing it placed.
        for t in &tx.targets {
            let staged = self.staging_dir.join(&t.staged);
            match std::fs::remove_file(&staged) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(file = %staged.display(), error = %e, "cannot remove a placed upload from staging"),
            }
        }
        Ok(())
    }

    fn place_target(&self, t: &PlacedTarget) -> Result<(), ServerError> {
        let served = self.targets_dir.join(&t.served);
        let dir = served.parent().unwrap_or(&self.targets_dir).to_owned();
        if served.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).map_err(|e| ServerError::io("create", &dir, e))?;
        let staged = self.staging_dir.join(&t.staged);
        if std::fs::hard_link(&staged, &served).is_err() {
            // Another file system: a durable copy under a temporary name, then rename.
            let tmp = dir.join(format!(".{}.partial", t.staged));
            let copy = || -> std::io::Result<()> {
                std::fs::copy(&staged, &tmp)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &served)
            };
            if let Err(e) = copy() {
                let _ = std::fs::remove_file(&tmp);
                return Err(ServerError::io("place target", &served, e));
            }
        }
        // The new directory entries must survive a power cut before the journal goes.
        let mut d = dir.as_path();
        loop {
            outpost_fsio::sync_dir(d).map_err(|e| ServerError::io("fsync", d, e))?;
            if d == self.targets_dir {
                break;
            }
            match d.parent() {
                Some(p) if p.starts_with(&self.targets_dir) => d = p,
                _ => break,
            }
        }
        Ok(())
    }
}

/// Removes what `write_atomic` leaves when the process dies between creating its
/// temporary file and renaming it (`.name.tmp-PID`), and interrupted target copies.
pub fn remove_temporary_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(".tmp-") || name.ends_with(".partial")) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, Journal) {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::new(t.path(), &t.path().join("metadata"), &t.path().join("targets"), &t.path().join("staging"));
        for d in ["metadata", "targets", "staging"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        (t, j)
    }

    fn tx(files: &[(&str, &str)]) -> Transaction {
        Transaction {
            targets: vec![PlacedTarget { staged: "ab".repeat(32), served: format!("fw/{}.img", "ab".repeat(32)) }],
            files: files.iter().map(|(n, c)| MetadataFile { name: (*n).into(), content: (*c).into() }).collect(),
            remove: vec!["gone.json".into()],
        }
    }

    #[test]
    fn a_committed_transaction_is_rolled_forward_and_is_idempotent() {
        let (t, j) = dirs();
        std::fs::write(t.path().join("staging").join("ab".repeat(32)), b"image").unwrap();
        std::fs::write(t.path().join("metadata/gone.json"), b"{}").unwrap();
        let tx = tx(&[("2.targets.json", "two"), ("targets.json", "two"), ("timestamp.json", "ts")]);
        // A crash right after the commit: the journal alone.
        std::fs::write(t.path().join(JOURNAL_FILE), serde_json::to_vec(&tx).unwrap()).unwrap();
        assert!(j.pending());
        assert_eq!(j.recover().unwrap(), Some(3));
        assert!(!j.pending());
        assert_eq!(std::fs::read(t.path().join("metadata/2.targets.json")).unwrap(), b"two");
        assert_eq!(std::fs::read(t.path().join(format!("targets/fw/{}.img", "ab".repeat(32)))).unwrap(), b"image");
        assert!(!t.path().join("metadata/gone.json").exists());
        assert!(!t.path().join("staging").join("ab".repeat(32)).exists(), "a placed upload stays in staging");
        // Applying it again (a crash before the journal was removed) changes nothing.
        std::fs::write(t.path().join(JOURNAL_FILE), serde_json::to_vec(&tx).unwrap()).unwrap();
        assert_eq!(j.recover().unwrap(), Some(3));
        assert_eq!(j.recover().unwrap(), None);
    }

    #[test]
    fn a_versioned_file_is_never_rewritten_with_other_bytes() {
        let (t, j) = dirs();
        std::fs::write(t.path().join("staging").join("ab".repeat(32)), b"image").unwrap();
        std::fs::write(t.path().join("metadata/2.targets.json"), b"served before").unwrap();
        let err = j.run(&tx(&[("2.targets.json", "other"), ("timestamp.json", "ts")])).unwrap_err().to_string();
        assert!(err.contains("2.targets.json already exists with other content"), "{err}");
        assert_eq!(std::fs::read(t.path().join("metadata/2.targets.json")).unwrap(), b"served before");
        assert!(!t.path().join("metadata/timestamp.json").exists(), "files after the conflict were written");
        assert!(j.pending(), "the committed transaction must stay until resolved");
        // The same bytes are fine.
        let same = tx(&[("2.targets.json", "served before"), ("timestamp.json", "ts")]);
        std::fs::write(t.path().join(JOURNAL_FILE), serde_json::to_vec(&same).unwrap()).unwrap();
        j.recover().unwrap();
        assert_eq!(std::fs::read(t.path().join("metadata/timestamp.json")).unwrap(), b"ts");
    }

    #[test]
    fn a_journal_that_is_not_one_is_named_and_kept() {
        let (t, j) = dirs();
        std::fs::write(t.path().join(JOURNAL_FILE), b"{not json").unwrap();
        let err = j.recover().unwrap_err().to_string();
        assert!(err.contains(JOURNAL_FILE) && err.contains("not a publish journal"), "{err}");
        assert!(j.pending());
    }

    #[test]
    fn versioned_names() {
        assert!(is_versioned("12.snapshot.json") && is_versioned("1.root.json") && is_versioned("3.a%2Fb.json"));
        assert!(!is_versioned("timestamp.json") && !is_versioned("root.json") && !is_versioned(".1.root.json.tmp-3"));
    }
}
