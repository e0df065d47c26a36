//! `outpost keys generate | show`: ed25519 signing key files.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use crate::error::{Result, SignerError};
use crate::keyfile;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new private key to FILE (mode 0600) and its public key to FILE.pub.
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a key file's TUF key id and public key (never the private part).
    Show { file: PathBuf },
}

pub fn run(cmd: KeysCommand, out: &Output) -> Result<()> {
    match cmd {
        KeysCommand::Generate { out: path } => {
            let key = keyfile::generate(&path)?;
            out.emit(
                &json!({"keyid": key.key_id(), "keytype": "ed25519", "public": key.public().keyval.public, "private_key_file": path, "public_key_file": keyfile::pub_path(&path)}),
                &format!("{}  (private: {}, public: {})", key.key_id(), path.display(), keyfile::pub_path(&path).display()),
            );
        }
        KeysCommand::Show { file } => {
            let key = keyfile::load(&file)?;
            let id = key.key_id().map_err(|e| SignerError::proto("key id", e))?;
            out.emit(
                &json!({"keyid": id, "keytype": key.public().keytype, "scheme": key.public().scheme, "public": key.public().keyval.public, "has_private": key.signing().is_some()}),
                &format!(
                    "keyid:   {id}\ntype:    {}\npublic:  {}\nprivate: {}",
                    key.public().keytype,
                    key.public().keyval.public,
                    if key.signing().is_some() { "present in this file (not shown)" } else { "no" }
                ),
            );
        }
    }
    Ok(())
}
