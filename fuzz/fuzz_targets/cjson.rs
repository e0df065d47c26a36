//! Canonical JSON (protocol/src/cjson.rs): every signature in the TUF and director
//! repositories and every check-in's qualifying data is computed over it, from JSON
//! that arrived over the network.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::cjson::to_canonical;
use serde_json::Value;

fn has_control_char(v: &Value) -> bool {
    let bad = |s: &str| s.bytes().any(|b| b < 0x20);
    match v {
        Value::String(s) => bad(s),
        Value::Array(a) => a.iter().any(has_control_char),
        Value::Object(m) => m.iter().any(|(k, v)| bad(k) || has_control_char(v)),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let Ok(canonical) = to_canonical(&value) else { return };
    // The same value written any other way has the same canonical form.
    let pretty = serde_json::to_vec_pretty(&value).unwrap_or_default();
    let reparsed: Value = serde_json::from_slice(&pretty).unwrap_or_else(|e| panic!("serde_json cannot read its own output: {e}"));
    assert_eq!(to_canonical(&reparsed).ok().as_deref(), Some(&canonical[..]), "canonical form depends on formatting");
    // OLPC canonical JSON escapes only `"` and `\`: control characters stay raw, so only
    // values without them are also strict JSON; those must read back as the same value.
    match serde_json::from_slice::<Value>(&canonical) {
        Ok(again) => {
            assert_eq!(again, value, "canonical form denotes another value");
            assert_eq!(to_canonical(&again).ok().as_deref(), Some(&canonical[..]), "canonical form is not a fixed point");
        }
        Err(e) => assert!(has_control_char(&value), "canonical form of a value without control characters is not JSON: {e}"),
    }
});
