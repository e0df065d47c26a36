//! How a bundle is published: its TUF target's `custom` and the devices it selects.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{PolicyBundle, TARGET_PREFIX};

/// Selector of a published bundle: the devices it is meant for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// Hardware classes; empty means every class.
    #[serde(default)]
    pub hardware_classes: Vec<String>,
    /// Labels a device must all have; empty means no constraint.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, hardware_class: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.hardware_classes.is_empty() || self.hardware_classes.iter().any(|c| c == hardware_class))
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// How specific the selector is: a device takes the most specific bundle that
    /// selects it (labels count more than hardware class).
    pub fn specificity(&self) -> (usize, bool) {
        (self.labels.len(), !self.hardware_classes.is_empty())
    }
}

/// The `custom` of a policy bundle's TUF target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTargetCustom {
    /// Always `"policy"`.
    pub kind: String,
    pub name: String,
    pub version: u64,
    pub not_after: DateTime<Utc>,
    pub selector: Selector,
}

impl PolicyTargetCustom {
    pub fn from_bundle(b: &PolicyBundle, selector: Selector) -> Self {
        PolicyTargetCustom { kind: "policy".into(), name: b.name.clone(), version: b.version, not_after: b.not_after, selector }
    }

    /// The target path a bundle is published under.
    pub fn target_path(&self) -> String {
        format!("{TARGET_PREFIX}{}/v{}.yaml", self.name, self.version)
    }
}
