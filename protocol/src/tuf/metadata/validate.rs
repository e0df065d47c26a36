//! The schema rules of each role type beyond what serde checks.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{MetaFile, Root, Snapshot, Targets, Timestamp, TOP_LEVEL_ROLES};
use crate::error::{Error, Result};

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
