//! The two slots of an A/B device, named the same by the agent, the server and the
//! wire ("A" and "B").

use std::fmt;

use serde::{Deserialize, Serialize};

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The slot that is not this one.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The slot's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_their_wire_names_and_nothing_else_is_a_slot() {
        for s in Slot::ALL {
            assert_eq!(serde_json::to_value(s).ok(), Some(serde_json::Value::String(s.as_str().to_owned())));
            assert_eq!(s.other().other(), s);
        }
        for bad in ["a", "C", "", "AB"] {
            let e = serde_json::from_value::<Slot>(serde_json::Value::String(bad.to_owned())).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("unknown variant"), "{bad:?}: {e}");
        }
    }
}
