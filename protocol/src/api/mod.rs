//! The server's HTTP API answers as types: what `outpost-server` sends and what the
//! `outpost` CLI (and later the agent) reads, so neither side builds or picks apart
//! JSON by hand. Each struct serializes to exactly the JSON the server sends (field
//! names, `null` for absent optional values, fields left out where the server leaves
//! them out); the tests beside each resource deserialize a sample of the server's
//! answer and check that it serializes back to the same JSON.
//!
//! One module per resource: [`errors`] (the error body every refusal carries),
//! [`tokens`] (enrollment tokens), [`devices`], [`reports`] (install reports and the
//! audit log), [`rollouts`], [`sbom`] (component search, deny-list views) and
//! [`repository`] (status, target upload, publish).

pub mod devices;
pub mod errors;
pub mod reports;
pub mod repository;
pub mod rollouts;
pub mod sbom;
pub mod tokens;

pub use errors::ErrorBody;

/// Test helper: `sample` (the server's JSON) deserializes into `T` and `T` serializes
/// back to the same JSON value.
#[cfg(test)]
pub(crate) fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(sample: serde_json::Value) -> T {
    let typed: T = serde_json::from_value(sample.clone()).unwrap_or_else(|e| panic!("{sample}: {e}"));
    let back = serde_json::to_value(&typed).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, sample);
    typed
}
