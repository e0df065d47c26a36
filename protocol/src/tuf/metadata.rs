//! TUF 1.0 metadata: the signed envelope and the four role types, parsed strictly
//! (as the reference implementation does) with unknown fields preserved.
//!
//! Signatures are always checked over the canonical form of the `signed` object as it
//! was received, never over a re-serialization of our types, so unknown fields and
//! foreign formatting cannot change what was signed.

mod delegation;
mod envelope;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cjson::to_canonical;
use crate::error::{Error, Result};
use crate::keys::{PublicKey, SigningKey};

pub use delegation::{DelegatedRole, Delegations, SuccinctRoles};
pub use envelope::{verify_threshold, Envelope};
pub use validate::Role;

/// The specification version this implementation writes.
pub const SPEC_VERSION: &str = "1.0.31";
/// The top-level role names; delegated roles may not use them.
pub const TOP_LEVEL_ROLES: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];

/// `expires` as TUF writes it: whole seconds, UTC, `Z` suffix.
pub fn parse_expires(s: &str, role: &str) -> Result<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%SZ")
        .map(|n| n.and_utc())
        .map_err(|e| Error::schema(role, format!("expires {s:?} is not YYYY-MM-DDTHH:MM:SSZ ({e})")))
}

pub fn format_expires(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    pub sig: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// `keyids` + `threshold` of a top-level role in root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleKeys {
    pub keyids: Vec<String>,
    pub threshold: u64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Root {
    #[serde(rename = "_type")]
    pub typ: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    #[serde(default)]
    pub consistent_snapshot: bool,
    pub keys: BTreeMap<String, PublicKey>,
    pub roles: BTreeMap<String, RoleKeys>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Version, and optionally length and hashes, of a metadata file (snapshot/timestamp `meta`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaFile {
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl MetaFile {
    pub fn version_only(version: u64) -> Self {
        MetaFile { version, length: None, hashes: None, extra: BTreeMap::new() }
    }

    /// Version, length and sha256 of `bytes`.
    pub fn describing(version: u64, bytes: &[u8]) -> Self {
        let mut hashes = BTreeMap::new();
        hashes.insert("sha256".to_owned(), hex::encode(Sha256::digest(bytes)));
        MetaFile { version, length: Some(bytes.len() as u64), hashes: Some(hashes), extra: BTreeMap::new() }
    }

    pub fn verify(&self, data: &[u8], what: &str) -> Result<()> {
        crate::hashing::verify_bytes(data, self.length, self.hashes.as_ref(), what)
    }
}

/// The body of snapshot and timestamp metadata: the same fields, and a `meta` map of
/// the metadata files the role lists. `R` tells the two apart (their `_type` and
/// schema rules differ); build one with [`new_snapshot`] or [`new_timestamp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct MetaList<R> {
    #[serde(rename = "_type")]
    pub typ: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    pub meta: BTreeMap<String, MetaFile>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
    #[serde(skip)]
    role: PhantomData<R>,
}

/// Marks a [`MetaList`] as timestamp metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampRole;
/// Marks a [`MetaList`] as snapshot metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRole;

pub type Timestamp = MetaList<TimestampRole>;
pub type Snapshot = MetaList<SnapshotRole>;

impl Timestamp {
    pub fn snapshot_meta(&self) -> &MetaFile {
        // Presence is checked when parsing.
        &self.meta["snapshot.json"]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetFile {
    pub length: u64,
    pub hashes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl TargetFile {
    /// The hash used to name the file on a consistent-snapshot repository: sha256
    /// when present, else the strongest listed.
    pub fn naming_hash(&self) -> Option<&str> {
        for algo in ["sha256", "sha512", "sha384", "sha224"] {
            if let Some(h) = self.hashes.get(algo) {
                return Some(h);
            }
        }
        self.hashes.values().next().map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    #[serde(rename = "_type")]
    pub typ: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    pub targets: BTreeMap<String, TargetFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegations: Option<Delegations>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Root {
    pub fn role(&self, name: &str) -> Result<&RoleKeys> {
        self.roles.get(name).ok_or_else(|| Error::Missing(format!("root has no {name} role")))
    }
}

/// Signs `signed` with `keys` and returns the file bytes (pretty JSON; signatures are
/// over the canonical form).
pub fn sign<T: Serialize>(signed: &T, keys: &[&SigningKey]) -> Result<Vec<u8>> {
    let value = serde_json::to_value(signed).map_err(|e| Error::Build(e.to_string()))?;
    let canonical = to_canonical(&value)?;
    let mut seen = BTreeSet::new();
    let signatures: Vec<Value> = keys
        .iter()
        .filter(|k| seen.insert(k.key_id().to_owned()))
        .map(|k| serde_json::json!({"keyid": k.key_id(), "sig": k.sign_hex(&canonical)}))
        .collect();
    let env = serde_json::json!({"signatures": signatures, "signed": value});
    let mut out = serde_json::to_vec_pretty(&env).map_err(|e| Error::Build(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

/// A fresh, empty metadata body of each type, with the common fields filled in.
pub fn new_targets(version: u64, expires: DateTime<Utc>) -> Targets {
    Targets {
        typ: "targets".into(),
        spec_version: SPEC_VERSION.into(),
        version,
        expires: format_expires(expires),
        targets: BTreeMap::new(),
        delegations: None,
        extra: BTreeMap::new(),
    }
}

pub fn new_snapshot(version: u64, expires: DateTime<Utc>, meta: BTreeMap<String, MetaFile>) -> Snapshot {
    Snapshot {
        typ: "snapshot".into(),
        spec_version: SPEC_VERSION.into(),
        version,
        expires: format_expires(expires),
        meta,
        extra: BTreeMap::new(),
        role: PhantomData,
    }
}

pub fn new_timestamp(version: u64, expires: DateTime<Utc>, snapshot: MetaFile) -> Timestamp {
    let mut meta = BTreeMap::new();
    meta.insert("snapshot.json".to_owned(), snapshot);
    Timestamp {
        typ: "timestamp".into(),
        spec_version: SPEC_VERSION.into(),
        version,
        expires: format_expires(expires),
        meta,
        extra: BTreeMap::new(),
        role: PhantomData,
    }
}
