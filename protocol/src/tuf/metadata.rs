//! TUF 1.0 metadata: the signed envelope and the four role types, parsed strictly
//! (as the reference implementation does) with unknown fields preserved.
//!
//! Signatures are always checked over the canonical form of the `signed` object as it
//! was received, never over a re-serialization of our types, so unknown fields and
//! foreign formatting cannot change what was signed.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cjson::to_canonical;
use crate::error::{Error, Result};
use crate::keys::{PublicKey, SigningKey};
use crate::pattern::path_matches;

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timestamp {
    #[serde(rename = "_type")]
    pub typ: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    pub meta: BTreeMap<String, MetaFile>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Timestamp {
    pub fn snapshot_meta(&self) -> &MetaFile {
        // Presence is checked when parsing.
        &self.meta["snapshot.json"]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(rename = "_type")]
    pub typ: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    pub meta: BTreeMap<String, MetaFile>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
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
pub struct DelegatedRole {
    pub name: String,
    pub keyids: Vec<String>,
    pub threshold: u64,
    #[serde(default)]
    pub terminating: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hash_prefixes: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl DelegatedRole {
    /// Is `target_path` within this role's delegated paths?
    pub fn is_delegated_path(&self, target_path: &str) -> bool {
        if let Some(paths) = &self.paths {
            return paths.iter().any(|p| path_matches(p, target_path));
        }
        if let Some(prefixes) = &self.path_hash_prefixes {
            let digest = hex::encode(Sha256::digest(target_path.as_bytes()));
            return prefixes.iter().any(|p| digest.starts_with(p.as_str()));
        }
        false
    }
}

/// Hash-bin delegation (TAP 15).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuccinctRoles {
    pub keyids: Vec<String>,
    pub threshold: u64,
    pub bit_length: u32,
    pub name_prefix: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl SuccinctRoles {
    fn suffix_len(&self) -> usize {
        (self.bit_length as usize).div_ceil(4)
    }

    pub fn role_for_target(&self, target_path: &str) -> String {
        let digest = Sha256::digest(target_path.as_bytes());
        let first = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let bin = if self.bit_length == 0 { 0 } else { first >> (32 - self.bit_length) };
        format!("{}-{:0width$x}", self.name_prefix, bin, width = self.suffix_len())
    }

    pub fn is_delegated_role(&self, name: &str) -> bool {
        let Some(suffix) = name.strip_prefix(&format!("{}-", self.name_prefix)) else { return false };
        if suffix.len() != self.suffix_len() {
            return false;
        }
        match u64::from_str_radix(suffix, 16) {
            Ok(n) => n < (1u64 << self.bit_length),
            Err(_) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delegations {
    pub keys: BTreeMap<String, PublicKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<DelegatedRole>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succinct_roles: Option<SuccinctRoles>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Delegations {
    /// The delegated roles responsible for `target_path`, in order, with their
    /// `terminating` flags. A succinct hash-bin delegation names one bin, and is
    /// terminating (TAP 15; python-tuf treats it so): a path's bin is the only place
    /// it can be, so the search does not go on to the delegator's later siblings.
    pub fn roles_for_target(&self, target_path: &str) -> Vec<(String, bool)> {
        if let Some(roles) = &self.roles {
            roles
                .iter()
                .filter(|r| r.is_delegated_path(target_path))
                .map(|r| (r.name.clone(), r.terminating))
                .collect()
        } else if let Some(s) = &self.succinct_roles {
            vec![(s.role_for_target(target_path), true)]
        } else {
            Vec::new()
        }
    }

    /// Keys and threshold for delegated role `name`, if this delegates it.
    pub fn role_keys(&self, name: &str) -> Option<(Vec<String>, u64)> {
        if let Some(roles) = &self.roles {
            return roles.iter().find(|r| r.name == name).map(|r| (r.keyids.clone(), r.threshold));
        }
        if let Some(s) = &self.succinct_roles {
            if s.is_delegated_role(name) {
                return Some((s.keyids.clone(), s.threshold));
            }
        }
        None
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

/// What every role type shares.
pub trait Role: DeserializeOwned + Serialize {
    const TYPE: &'static str;
    fn version(&self) -> u64;
    fn expires(&self) -> &str;
    fn spec_version(&self) -> &str;
    fn typ(&self) -> &str;
    /// Schema rules beyond what serde checks.
    fn validate(&self, role: &str) -> Result<()>;
}

macro_rules! role_common {
    ($t:ty, $name:literal) => {
        impl Role for $t {
            const TYPE: &'static str = $name;
            fn version(&self) -> u64 {
                self.version
            }
            fn expires(&self) -> &str {
                &self.expires
            }
            fn spec_version(&self) -> &str {
                &self.spec_version
            }
            fn typ(&self) -> &str {
                &self.typ
            }
            fn validate(&self, role: &str) -> Result<()> {
                self.validate_body(role)
            }
        }
    };
}
role_common!(Root, "root");
role_common!(Timestamp, "timestamp");
role_common!(Snapshot, "snapshot");
role_common!(Targets, "targets");

fn unique(ids: &[String], role: &str, what: &str) -> Result<()> {
    let set: BTreeSet<&String> = ids.iter().collect();
    if set.len() != ids.len() {
        return Err(Error::schema(role, format!("{what} has duplicate key ids")));
    }
    Ok(())
}

impl Root {
    fn validate_body(&self, role: &str) -> Result<()> {
        let names: BTreeSet<&str> = self.roles.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = TOP_LEVEL_ROLES.into_iter().collect();
        if names != want {
            return Err(Error::schema(role, "roles must be exactly root, timestamp, snapshot and targets"));
        }
        for (name, r) in &self.roles {
            if r.threshold < 1 {
                return Err(Error::schema(role, format!("role {name} threshold must be at least 1")));
            }
            unique(&r.keyids, role, &format!("role {name}"))?;
        }
        Ok(())
    }

    pub fn role(&self, name: &str) -> Result<&RoleKeys> {
        self.roles.get(name).ok_or_else(|| Error::Missing(format!("root has no {name} role")))
    }
}

fn validate_meta(meta: &BTreeMap<String, MetaFile>, role: &str) -> Result<()> {
    for (name, m) in meta {
        if m.version < 1 {
            return Err(Error::schema(role, format!("meta {name} version must be at least 1")));
        }
        if m.length == Some(0) {
            return Err(Error::schema(role, format!("meta {name} length must be positive")));
        }
        if m.hashes.as_ref().is_some_and(|h| h.is_empty()) {
            return Err(Error::schema(role, format!("meta {name} hashes must not be empty")));
        }
    }
    Ok(())
}

impl Timestamp {
    fn validate_body(&self, role: &str) -> Result<()> {
        if !self.meta.contains_key("snapshot.json") {
            return Err(Error::schema(role, "meta has no snapshot.json"));
        }
        validate_meta(&self.meta, role)
    }
}

impl Snapshot {
    fn validate_body(&self, role: &str) -> Result<()> {
        validate_meta(&self.meta, role)
    }
}

impl Targets {
    fn validate_body(&self, role: &str) -> Result<()> {
        for (path, t) in &self.targets {
            if t.hashes.is_empty() {
                return Err(Error::schema(role, format!("target {path:?} has no hashes")));
            }
        }
        if let Some(d) = &self.delegations {
            match (&d.roles, &d.succinct_roles) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(Error::schema(role, "delegations need exactly one of roles and succinct_roles"))
                }
                _ => {}
            }
            if let Some(roles) = &d.roles {
                let mut seen = BTreeSet::new();
                for r in roles {
                    if !seen.insert(r.name.as_str()) {
                        return Err(Error::schema(role, format!("delegated role {:?} appears twice", r.name)));
                    }
                    if TOP_LEVEL_ROLES.contains(&r.name.as_str()) {
                        return Err(Error::schema(role, format!("delegated role name {:?} is a top-level role", r.name)));
                    }
                    if r.paths.is_some() && r.path_hash_prefixes.is_some() {
                        return Err(Error::schema(
                            role,
                            format!("delegated role {:?} sets both paths and path_hash_prefixes", r.name),
                        ));
                    }
                    if r.threshold < 1 {
                        return Err(Error::schema(role, format!("delegated role {:?} threshold must be at least 1", r.name)));
                    }
                    unique(&r.keyids, role, &format!("delegated role {:?}", r.name))?;
                }
            }
            if let Some(s) = &d.succinct_roles {
                if !(1..=32).contains(&s.bit_length) {
                    return Err(Error::schema(role, "succinct_roles bit_length must be 1..=32"));
                }
                if s.threshold < 1 {
                    return Err(Error::schema(role, "succinct_roles threshold must be at least 1"));
                }
            }
        }
        Ok(())
    }
}

/// Parsed metadata plus what is needed to verify it: the signatures and the canonical
/// bytes of `signed` exactly as received.
#[derive(Debug, Clone)]
pub struct Envelope<T> {
    pub signed: T,
    pub signatures: Vec<Signature>,
    pub canonical_signed: Vec<u8>,
}

#[derive(Deserialize)]
struct RawEnvelope {
    signatures: Vec<Signature>,
    signed: Value,
}

impl<T: Role> Envelope<T> {
    /// Parses metadata of role type `T`; `role` is the role name (for errors).
    pub fn parse(bytes: &[u8], role: &str) -> Result<Self> {
        let raw: RawEnvelope =
            serde_json::from_slice(bytes).map_err(|e| Error::schema(role, format!("not a signed envelope: {e}")))?;
        let found = raw.signed.get("_type").and_then(Value::as_str).unwrap_or("<missing>").to_owned();
        if found != T::TYPE {
            return Err(Error::WrongType { expected: T::TYPE.into(), found });
        }
        let canonical_signed = to_canonical(&raw.signed).map_err(|e| Error::schema(role, e))?;
        let signed: T = serde_json::from_value(raw.signed).map_err(|e| Error::schema(role, e))?;
        check_spec_version(signed.spec_version(), role)?;
        if signed.version() < 1 {
            return Err(Error::schema(role, "version must be at least 1"));
        }
        parse_expires(signed.expires(), role)?;
        signed.validate(role)?;
        let mut seen = BTreeSet::new();
        for s in &raw.signatures {
            if !seen.insert(s.keyid.as_str()) {
                return Err(Error::schema(role, format!("more than one signature by key {}", s.keyid)));
            }
        }
        Ok(Envelope { signed, signatures: raw.signatures, canonical_signed })
    }

    pub fn expires_at(&self) -> Result<DateTime<Utc>> {
        parse_expires(self.signed.expires(), T::TYPE)
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        // Unparseable expiry was refused in `parse`.
        self.expires_at().map(|e| e <= now).unwrap_or(true)
    }
}

fn check_spec_version(v: &str, role: &str) -> Result<()> {
    let parts: Vec<&str> = v.split('.').collect();
    if !(parts.len() == 2 || parts.len() == 3) || !parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(Error::schema(role, format!("spec_version {v:?} is not MAJOR.MINOR[.PATCH]")));
    }
    if parts[0] != "1" {
        return Err(Error::schema(role, format!("spec_version {v:?} is not supported (major version 1 only)")));
    }
    Ok(())
}

/// Counts distinct keys whose signature over `canonical` verifies; errors below
/// `threshold`. Keys not listed for the role, unknown key types and duplicate
/// signatures never count, and neither does one key listed under several key ids
/// (keys are compared by their material, not by id: the same public key written
/// twice is still one holder).
pub fn verify_threshold(
    role: &str,
    canonical: &[u8],
    signatures: &[Signature],
    keyids: &[String],
    threshold: u64,
    keys: &BTreeMap<String, PublicKey>,
) -> Result<()> {
    let mut valid: BTreeSet<Vec<u8>> = BTreeSet::new();
    for keyid in keyids {
        let Some(key) = keys.get(keyid) else { continue };
        let Some(material) = key.material() else { continue };
        if valid.contains(&material) {
            continue;
        }
        if signatures.iter().any(|s| &s.keyid == keyid && key.verify(canonical, &s.sig)) {
            valid.insert(material);
        }
    }
    if (valid.len() as u64) < threshold {
        return Err(Error::Threshold { role: role.to_owned(), valid: valid.len(), threshold });
    }
    Ok(())
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
    }
}
