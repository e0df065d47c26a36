//! Delegations of targets metadata: named roles with paths, and hash bins (TAP 15).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::keys::PublicKey;
use crate::pattern::path_matches;

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
