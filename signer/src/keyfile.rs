//! Key files on disk: private keys are created with mode 0600 and never overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use outpost_protocol::keys::{KeyFile, LoadedKey, SigningKey};

use crate::error::{Result, SignerError};

pub fn load(path: &Path) -> Result<LoadedKey> {
    let bytes = std::fs::read(path).map_err(|e| SignerError::io("read key", path, e))?;
    LoadedKey::from_bytes(&bytes, &path.display().to_string()).map_err(|e| SignerError::proto("load key", e))
}

pub fn load_signing(path: &Path) -> Result<SigningKey> {
    match load(path)? {
        LoadedKey::Private(k) => Ok(k),
        LoadedKey::Public(_) => Err(SignerError::input(path.display(), "a public key file; signing needs the private key file")),
    }
}

pub fn load_all_signing(paths: &[PathBuf]) -> Result<Vec<SigningKey>> {
    paths.iter().map(|p| load_signing(p)).collect()
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| SignerError::io("create key file (refusing to overwrite an existing key)", path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| SignerError::io("write", path, e))
}

/// Generates a key: FILE (private, 0600) and FILE.pub.
pub fn generate(path: &Path) -> Result<SigningKey> {
    let key = SigningKey::generate().map_err(|e| SignerError::proto("generate key", e))?;
    let private = key.to_key_file();
    let public = KeyFile { keyval: outpost_protocol::keys::KeyFileVal { private: None, ..private.keyval.clone() }, ..private.clone() };
    let mut priv_bytes = serde_json::to_vec_pretty(&private).map_err(SignerError::encode("the private key file"))?;
    priv_bytes.push(b'\n');
    let mut pub_bytes = serde_json::to_vec_pretty(&public).map_err(SignerError::encode("the public key file"))?;
    pub_bytes.push(b'\n');
    let public_path = pub_path(path);
    if public_path.exists() {
        return Err(SignerError::Usage(format!(
            "{} already exists; refusing to create a private key beside another key's public file",
            public_path.display()
        )));
    }
    write_new(path, &priv_bytes, 0o600)?;
    if let Err(e) = write_new(&public_path, &pub_bytes, 0o644) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(key)
}

pub fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}
