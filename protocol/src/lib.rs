//! Outpost's shared formats and pure logic: TUF metadata (schema, canonical JSON,
//! signatures, the client's trusted metadata set) and release metadata. No I/O;
//! the clock is always passed in.

pub mod api;
pub mod attest;
pub mod cjson;
pub mod codec;
pub mod director;
pub mod error;
pub mod hashing;
pub mod incident;
pub mod keys;
pub mod pattern;
pub mod policy;
pub mod release;
pub mod report;
pub mod rollout;
pub mod slot;
pub mod tuf;
pub mod verity;
pub mod wpatch;

pub use error::{display_chain, Error, Result};
