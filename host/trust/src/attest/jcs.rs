//! RFC 8785 (JSON Canonicalization Scheme) for the values edgeward
//! measures: objects with their members sorted by the UTF-16 code units of
//! their names, no whitespace, strings escaped as ECMAScript's
//! `JSON.stringify` does (only `"`, `\` and control characters; `\b \t \n
//! \f \r`, else `\u00xx` in lower case), integers in decimal. Event content
//! never holds fractional numbers; one is refused rather than written in a
//! form a verifier might canonicalize differently.

use serde_json::Value;

/// `v` in canonical form.
///
/// # Errors
///
/// A number that is not an integer within ±2^53 (I-JSON's exact range).
pub fn canonical(v: &Value) -> Result<String, String> {
    let mut out = String::new();
    write(v, &mut out)?;
    Ok(out)
}

fn write(v: &Value, out: &mut String) -> Result<(), String> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            const EXACT: u64 = 1 << 53;
            match (n.as_u64(), n.as_i64()) {
                (Some(u), _) if u <= EXACT => out.push_str(&u.to_string()),
                (_, Some(i)) if i.unsigned_abs() <= EXACT => out.push_str(&i.to_string()),
                _ => return Err(format!("number {n} is not an integer within ±2^53")),
            }
        }
        Value::String(s) => string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(e, out)?;
            }
            out.push(']');
        }
        Value::Object(o) => {
            let mut members: Vec<(&String, &Value)> = o.iter().collect();
            members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (k, e)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(k, out);
                out.push(':');
                write(e, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc8785_examples() {
        // Members sorted by UTF-16 code units (RFC 8785 §3.2.3's example:
        // "\u20ac" sorts after "\r" and before "\ud83d\ude00", which a
        // sort by UTF-8 or by code point gets wrong against U+FB33).
        let v = json!({
            "\u{20ac}": "Euro Sign",
            "\r": "Carriage Return",
            "\u{fb33}": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\u{1f600}": "Emoji: Grinning Face",
            "\u{80}": "Control",
            "\u{f6}": "Latin Small Letter O With Diaeresis"
        });
        let c = canonical(&v).unwrap();
        let order = [
            "\r",
            "1",
            "\u{80}",
            "\u{f6}",
            "\u{20ac}",
            "\u{1f600}",
            "\u{fb33}",
        ];
        let mut at = 0;
        for k in order {
            let needle = format!("{}:", serde_json::to_string(k).unwrap());
            let i = c[at..]
                .find(&needle)
                .unwrap_or_else(|| panic!("{k:?} out of order in {c}"));
            at += i + needle.len();
        }
        assert_eq!(
            canonical(&json!({"b": [1, -2, true, null], "a": "x\u{1}\"\\/\n"})).unwrap(),
            r#"{"a":"x\u0001\"\\/\n","b":[1,-2,true,null]}"#
        );
        assert!(canonical(&json!({"x": 1.5})).is_err());
        assert!(canonical(&json!(u64::MAX)).is_err());
    }
}
