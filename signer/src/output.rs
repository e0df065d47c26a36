//! Human or `--json` output.

use serde::Serialize;

pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `value` as JSON with --json, else the human line.
    pub fn emit<T: Serialize>(&self, value: &T, human: &str) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        } else {
            println!("{human}");
        }
    }
}
