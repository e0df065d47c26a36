//! The `outpost` CLI as a library: offline key management, repository signing and
//! releases, and upload to `outpost-server`.

pub mod cli;
mod device_cmd;
mod device_show;
mod director_cmd;
mod error;
mod keyfile;
mod keys_cmd;
mod localrepo;
mod output;
mod policy_cmd;
mod release_cmd;
mod release_golden;
mod repo_cmd;
mod role_edit;
mod rollout_cmd;
mod sbom_cmd;
mod sigstore_out;
mod upload;

pub use error::{Result, SignerError};
