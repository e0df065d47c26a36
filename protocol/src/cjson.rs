//! Canonical JSON as TUF signs it (OLPC canonical JSON, as produced by
//! securesystemslib): object keys sorted by code point, no insignificant white
//! space, strings with only `"` and `\` escaped, integers only.

use serde_json::Value;

use crate::error::{Error, Result};

/// Encodes `value` canonically. Floats are refused: TUF metadata has none.
pub fn to_canonical(value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out)?;
    Ok(out)
}

fn write(value: &Value, out: &mut Vec<u8>) -> Result<()> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                return Err(Error::Build(format!("canonical JSON has no floats (found {n})")));
            }
        }
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Code point order equals UTF-8 byte order.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write(&map[key], out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_escapes_only_quote_and_backslash() {
        let v = json!({"b": 1, "a": [true, null, "x\"y\\z\n"], "A": -3});
        let got = String::from_utf8(to_canonical(&v).unwrap()).unwrap();
        assert_eq!(got, "{\"A\":-3,\"a\":[true,null,\"x\\\"y\\\\z\n\"],\"b\":1}");
    }

    #[test]
    fn refuses_floats() {
        assert!(to_canonical(&json!({"x": 1.5})).is_err());
    }
}
