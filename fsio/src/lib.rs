//! File I/O shared by Outpost's binaries.
//!
//! Durable file writes: a reader sees the old file or the new one, never a torn one,
//! and after `write_atomic` returns the new file survives a power cut. File and slot
//! hashing: `hash_file` streams a file (or a slot's first bytes) through SHA-256.
//! [`sdnotify`]: readiness, watchdog and stopping notices to systemd, for both daemons.

pub mod sdnotify;

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Writes `data` to a temporary file beside `path`, fsyncs it, renames it over `path`,
/// fsyncs the file again and then the directory. Creates the directory if needed. On
/// error the temporary file is removed and `path` is untouched.
///
/// The second fsync is for FAT (the EFI system partition, where GRUB's environment
/// block lives): there a file's first cluster and size are in its directory entry, and
/// a rename over an existing name writes the renamed file's entry into the target's
/// slot only when that file's inode is written back. Fsyncing the directory does not
/// write it, so for up to half a minute a power cut brought back the old contents
/// under the name. The VM test cuts the power right after a commit to show it holds.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        f.sync_all()?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory, so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// SHA-256 (lower-case hex) and length of a file's first `length` bytes, or of the whole
/// file when `None`. A partition is larger than the image in it, and what counts is
/// exactly the signed length: a slot shorter than that reads back short (the returned
/// length says so). Reads in 1 MiB chunks; blocking, so async callers run it in
/// `spawn_blocking`.
pub fn hash_file(path: &Path, length: Option<u64>) -> std::io::Result<(String, u64)> {
    let f = std::fs::File::open(path)?;
    match length {
        Some(n) => sha256_reader(f.take(n)),
        None => sha256_reader(f),
    }
}

fn sha256_reader(mut reader: impl Read) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((hex::encode(h.finalize()), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_file_hashes_the_whole_file_or_its_first_bytes() {
        let dir = std::env::temp_dir().join(format!("outpost-fsio-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("slot");
        let data: Vec<u8> = (0..(3u32 << 20) + 7).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let whole = hex::encode(Sha256::digest(&data));
        assert_eq!(hash_file(&p, None).unwrap(), (whole.clone(), data.len() as u64));
        assert_eq!(hash_file(&p, Some(data.len() as u64 + 10)).unwrap(), (whole, data.len() as u64), "a short slot reads back short");
        assert_eq!(hash_file(&p, Some(5)).unwrap(), (hex::encode(Sha256::digest(&data[..5])), 5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("outpost-fsio-{}", std::process::id()));
        let p = dir.join("sub/file.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
