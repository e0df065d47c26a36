//! TUF 1.0: metadata schema, signatures, the client's trusted metadata set, and the
//! rules every side shares (root rotation, online signing, file naming).

pub mod layout;
pub mod metadata;
pub mod online;
pub mod rotation;
pub mod search;
pub mod trusted;

pub use metadata::{
    format_expires, parse_expires, sign, verify_threshold, DelegatedRole, Delegations, Envelope, MetaFile, Role,
    RoleKeys, Root, Signature, Snapshot, SuccinctRoles, TargetFile, Targets, Timestamp, SPEC_VERSION, TOP_LEVEL_ROLES,
};
pub use layout::consistent_name;
pub use rotation::{verify_next_root, RootRotationError};
pub use search::{Resolved, RoleGraph, MAX_DELEGATIONS};
pub use trusted::{SnapshotSource, TrustedSet};

/// Percent-encodes a role name for a metadata URL or file name (nothing is safe).
pub fn quote_role(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, QUOTE_ALL).to_string()
}

/// Percent-encodes a target path for a URL (`/` stays, as a path separator).
pub fn quote_target_path(path: &str) -> String {
    percent_encoding::utf8_percent_encode(path, QUOTE_PATH).to_string()
}

/// Percent-encodes a target path into a single file name (`/` becomes `%2F`).
pub fn quote_file_name(path: &str) -> String {
    quote_role(path)
}

const QUOTE_ALL: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
const QUOTE_PATH: &percent_encoding::AsciiSet = &QUOTE_ALL.remove(b'/');
