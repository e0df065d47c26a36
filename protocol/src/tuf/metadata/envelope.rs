//! The signed envelope as received, and threshold verification of its signatures.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::{parse_expires, Role, Signature};
use crate::cjson::to_canonical;
use crate::error::{Error, Result};
use crate::keys::PublicKey;

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
