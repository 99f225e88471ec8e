//! When PostgreSQL's unique index takes two values of a column as the same one: [`unique_key`]
//! gives equal keys exactly for those (up to a 64-bit hash's collisions), so the freeze report can
//! count the stored items a column made unique would refuse without asking a store.
//!
//! The rules are the column types' (docs/design.md §2): texts, uuids and dates compare as their
//! canonical text, floats as PostgreSQL's `REAL` reads the number's text (32 bits: two doubles
//! that round to one float are one value), datetimes to the microsecond whatever their offset,
//! arrays element by element, `json` as `JSONB` (keys in any order, `1` and `1.0` equal) and
//! geometries as PostGIS compares them: the same points in the same order, two coordinates each
//! (the columns are two-dimensional: a third is not written), `-0` and `0` apart (PostGIS compares
//! the stored bytes). A null never collides: a unique index holds any number of them.

use std::hash::{DefaultHasher, Hasher};

use serde_json::Value;

use super::types::{BaseType, ColumnType};
use super::value::parse_datetime;

/// The key of `value` (canonical for `ty`, as `transform` gives it) in a unique index of a `ty`
/// column; `None` for null.
pub fn unique_key(ty: ColumnType, value: &Value) -> Option<u64> {
    if value.is_null() {
        return None;
    }
    let mut hasher = DefaultHasher::new();
    match (ty, value) {
        _ if ty.base().is_geometry() => geometry(value, &mut hasher),
        (ColumnType::Many(base), Value::Array(items)) => {
            hasher.write_usize(items.len());
            for item in items {
                scalar(base, item, &mut hasher);
            }
        }
        (ColumnType::One(base), _) => scalar(base, value, &mut hasher),
        _ => json(value, &mut hasher),
    }
    Some(hasher.finish())
}

fn scalar(base: BaseType, value: &Value, hasher: &mut DefaultHasher) {
    match (base, value) {
        (BaseType::Float, Value::Number(n)) => {
            // PostgreSQL reads the number's text into 32 bits, rounding once (a double rounded
            // again to 32 bits can land elsewhere); its -0 equals 0.
            let f: f32 = n.to_string().parse().unwrap_or_default();
            hasher.write_u32(if f == 0.0 { 0 } else { f.to_bits() });
        }
        (BaseType::DateTime, Value::String(text)) => match parse_datetime(text) {
            Ok(t) => {
                // TIMESTAMPTZ keeps microseconds, rounded.
                let micros = t.timestamp() as i128 * 1_000_000
                    + (i128::from(t.timestamp_subsec_nanos()) + 500) / 1000;
                hasher.write_i128(micros);
            }
            Err(_) => json(value, hasher),
        },
        _ => json(value, hasher),
    }
}

/// A geometry (or an array of them, one Multi geometry in PostgreSQL) as PostGIS compares it: its
/// positions' first two coordinates, bit for bit, in order.
fn geometry(value: &Value, hasher: &mut DefaultHasher) {
    match value {
        Value::Array(items) if items.first().is_some_and(Value::is_number) => {
            for coordinate in items.iter().take(2) {
                hasher.write_u64(coordinate.as_f64().unwrap_or_default().to_bits());
            }
        }
        Value::Array(items) => {
            hasher.write_usize(items.len());
            for item in items {
                geometry(item, hasher);
            }
        }
        Value::Object(map) => geometry(map.get("coordinates").unwrap_or(&Value::Null), hasher),
        _ => hasher.write_u8(0),
    }
}

/// A number as `JSONB`'s `numeric` holds it: the decimal its text says (a double is written as
/// its shortest text, which is what PostgreSQL reads), so `1`, `1.0` and `1e0` are one value, and
/// `1.2345678901234567e19` is `12345678901234567000`, not the double's exact value.
fn decimal(text: &str, hasher: &mut DefaultHasher) {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (
            m,
            e.trim_start_matches('+').parse::<i64>().unwrap_or_default(),
        ),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    let significant = digits.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.is_empty() {
        hasher.write_u8(0); // zero, whatever its sign or scale
        return;
    }
    // The value is 0.d1d2d3… × 10^point.
    let point = exponent + whole.len() as i64 - (digits.len() - significant.len()) as i64;
    hasher.write_u8(if negative { 1 } else { 2 });
    hasher.write_i64(point);
    hasher.write(trimmed.as_bytes());
}

/// `JSONB`'s equality: object keys in any order, numbers by value.
fn json(value: &Value, hasher: &mut DefaultHasher) {
    match value {
        Value::Null => hasher.write_u8(0),
        Value::Bool(b) => {
            hasher.write_u8(1);
            hasher.write_u8(u8::from(*b));
        }
        Value::Number(n) => {
            hasher.write_u8(2);
            decimal(&n.to_string(), hasher);
        }
        Value::String(s) => {
            hasher.write_u8(4);
            hasher.write_usize(s.len());
            hasher.write(s.as_bytes());
        }
        Value::Array(items) => {
            hasher.write_u8(5);
            hasher.write_usize(items.len());
            for item in items {
                json(item, hasher);
            }
        }
        Value::Object(map) => {
            hasher.write_u8(6);
            hasher.write_usize(map.len());
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            for key in keys {
                hasher.write_usize(key.len());
                hasher.write(key.as_bytes());
                json(&map[key], hasher);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(ty: &str, value: Value) -> Option<u64> {
        unique_key(ty.parse().unwrap(), &value)
    }

    #[test]
    fn values_postgresql_takes_as_one_have_one_key() {
        let same = [
            ("float", json!(1), json!(1.0)),
            ("float", json!(0.1), json!(0.10000000149011612)),
            ("float", json!(-0.0), json!(0)),
            (
                "datetime",
                json!("2020-01-02 03:04:05"),
                json!("2020-01-02T05:04:05+02:00"),
            ),
            (
                "datetime",
                json!("2020-01-02 03:04:05.5"),
                json!("2020-01-02 03:04:05.500000"),
            ),
            (
                "json",
                json!({"a": 1, "b": [1.0, "x"]}),
                json!({"b": [1, "x"], "a": 1.0}),
            ),
            ("integer[]", json!([1, 2]), json!([1, 2])),
            (
                "json",
                json!(12345678901234567000u64),
                json!(1.2345678901234567e19),
            ),
            ("json", json!([0.5, -0.0, 100]), json!([5e-1, 0, 1e2])),
            (
                "point",
                json!({"type": "Point", "coordinates": [1, 2.5]}),
                json!({"coordinates": [1.0, 2.5], "type": "Point"}),
            ),
            (
                "point",
                json!({"type": "Point", "coordinates": [1, 2.5, 100]}),
                json!({"type": "Point", "coordinates": [1, 2.5]}),
            ),
        ];
        for (ty, a, b) in same {
            assert_eq!(key(ty, a.clone()), key(ty, b.clone()), "{ty}: {a} and {b}");
        }
    }

    #[test]
    fn values_postgresql_tells_apart_have_other_keys() {
        let other = [
            ("string", json!("a"), json!("A")),
            ("string", json!("a"), json!("a ")),
            ("float", json!(0.1), json!(0.2)),
            ("integer[]", json!([1, 2]), json!([2, 1])),
            ("integer[]", json!([1]), json!([1, 1])),
            ("json", json!({"a": 1}), json!({"a": "1"})),
            ("json", json!([]), json!({})),
            (
                "json",
                json!(9007199254740993u64),
                json!(9007199254740992u64),
            ),
            (
                "json",
                json!(12345678901234567168u64),
                json!(1.2345678901234567e19),
            ),
            ("json", json!(0.5), json!(5)),
            ("json", json!(-1), json!(1)),
            ("json", json!(0.012), json!(0.12)),
            ("json", json!(120), json!(12)),
            (
                "datetime",
                json!("2020-01-02 03:04:05"),
                json!("2020-01-02 03:04:06"),
            ),
            // 1 + 2^-24 written shortest is a little past the half-way point between two 32-bit
            // floats, which PostgreSQL's one rounding of the text takes up to 1.0000001.
            ("float", json!(1.0000000596046448), json!(1.0)),
            (
                "point",
                json!({"type": "Point", "coordinates": [-0.0, 1]}),
                json!({"type": "Point", "coordinates": [0.0, 1]}),
            ),
            (
                "point[]",
                json!([{"type": "Point", "coordinates": [1, 2]}]),
                json!([{"type": "Point", "coordinates": [2, 1]}]),
            ),
        ];
        for (ty, a, b) in other {
            assert_ne!(key(ty, a.clone()), key(ty, b.clone()), "{ty}: {a} and {b}");
        }
    }

    #[test]
    fn a_null_never_collides() {
        assert_eq!(key("string", Value::Null), None);
        assert!(key("json", json!(null)).is_none());
        assert!(key("json", json!([null])).is_some());
    }
}
