//! Human or `--json` output.

use serde::Serialize;

pub struct Output {
    pub json: bool,
}

/// `value` as a JSON value: objects print with their keys sorted, whatever the field
/// order of the type (the order `outpost` has always printed).
fn sorted<T: Serialize + ?Sized>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// `value` as indented JSON, keys sorted.
pub fn pretty<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string_pretty(&sorted(value)).unwrap_or_default()
}

/// `value` as JSON on one line, keys sorted.
pub fn compact<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(&sorted(value)).unwrap_or_default()
}

impl Output {
    /// Prints `value` as JSON with --json, else the human line.
    pub fn emit<T: Serialize + ?Sized>(&self, value: &T, human: &str) {
        if self.json {
            println!("{}", pretty(value));
        } else {
            println!("{human}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize)]
    struct Unordered {
        zeta: u8,
        alpha: u8,
    }

    #[test]
    fn json_output_sorts_keys_whatever_the_field_order() {
        assert_eq!(super::compact(&Unordered { zeta: 1, alpha: 2 }), r#"{"alpha":2,"zeta":1}"#);
        assert_eq!(super::pretty(&Unordered { zeta: 1, alpha: 2 }), "{\n  \"alpha\": 2,\n  \"zeta\": 1\n}");
    }
}
