//! The state store's bottom layer: the only SQL in the server.

pub mod enums;

pub use enums::{ChallengeState, SqlEnum};
