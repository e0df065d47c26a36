//! The `outpost` CLI as a library: offline key management, repository signing and
//! releases, and upload to `outpost-server`.

pub mod cli;
pub mod device_cmd;
pub mod director_cmd;
pub mod error;
pub mod keyfile;
pub mod keys_cmd;
pub mod localrepo;
pub mod output;
pub mod policy_cmd;
pub mod release_cmd;
pub mod repo_cmd;
pub mod role_edit;
pub mod rollout_cmd;
pub mod sbom_cmd;
pub mod sigstore_out;
pub mod upload;

pub use error::{Result, SignerError};
