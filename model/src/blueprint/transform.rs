//! Moving an item between versions of its blueprint (docs/design.md §4 step 2).
//!
//! Columns are matched by uid: a renamed column moves to its new name, a column the target does not
//! know disappears, a column the source does not know gets its default or null. A type change keeps the
//! value when the conversion loses nothing (integer→float, anything→string/text, date→datetime, a text
//! that parses as the new type …), converts it as the column's declared `convert` says, and gives null
//! otherwise. The result always passes the target column's own checks, so every projected item is
//! valid at its version; `compat` says beforehand which changes can lose values.

use std::collections::HashMap;

use chrono::Datelike;
use serde_json::{Map, Value};

use super::check::{check_canonical, check_column_value};
use super::ident::Ident;
use super::model::{Blueprint, Column, ColumnDef, Convert, Uid};
use super::types::{BaseType, ColumnType};
use super::value::{canonicalize_scalar, parse_datetime};

/// Past this many columns in the source, [`transform`] finds them by uid in an index it builds
/// once, not one by one for each column of the target: a blueprint of 900 columns made 810,000
/// comparisons per item and version, on every write. Below it, the linear look-up (a thousand
/// comparisons at most) costs less than building the index.
const INDEXED_FROM: usize = 32;

/// `item` (canonical, as checked against `from`) as a client of `to` (frozen as `to_version`) sees it.
pub fn transform(
    item: &Map<String, Value>,
    from: &Blueprint,
    to: &Blueprint,
    to_version: u32,
) -> Map<String, Value> {
    let mut out = Map::with_capacity(to.columns.len() + 3);
    for key in ["id", "project_version", "links"] {
        out.insert(key.into(), item.get(key).cloned().unwrap_or(Value::Null));
    }
    out.insert("project_version".into(), Value::from(to_version));
    let index: Option<HashMap<Uid, (&Ident, &Column)>> =
        (from.columns.len() > INDEXED_FROM).then(|| {
            let mut index = HashMap::with_capacity(from.columns.len());
            for (name, column) in &from.columns {
                // The first of a uid, as the linear look-up finds it.
                index.entry(column.uid).or_insert((name, column));
            }
            index
        });
    let source = |uid: Uid| match &index {
        Some(index) => index.get(&uid).copied(),
        None => from.column_by_uid(uid),
    };
    for (name, column) in &to.columns {
        let value = match source(column.uid) {
            Some((old_name, old)) => match item.get(old_name.as_str()) {
                None | Some(Value::Null) => Value::Null,
                Some(value) => convert(&old.def, &column.def, value),
            },
            None => column.def.fallback(),
        };
        // A column that allows no null takes its default instead (`compat` counts on it: with a
        // default, no null is refused).
        let value = match value {
            Value::Null if !column.def.nullable => column.def.fallback(),
            value => value,
        };
        out.insert(name.to_string(), value);
    }
    out
}

/// `item` as a client of version `to_version` sees it ([`transform`]), or, when that version
/// cannot hold it, the column it leaves null although `to` allows none ([`forbidden_null`]): the
/// one rule of what a version holds, for writes, back-fills, reads and the change feed.
pub fn into_version<'a>(
    item: &Map<String, Value>,
    from: &Blueprint,
    to: &'a Blueprint,
    to_version: u32,
) -> Result<Map<String, Value>, &'a str> {
    let seen = transform(item, from, to, to_version);
    match forbidden_null(to, &seen) {
        Some(column) => Err(column),
        None => Ok(seen),
    }
}

/// The first column of `to` that `item` — as [`transform`] made it — leaves null although `to`
/// allows none: such an item is not in version `to` (a forced breaking freeze; `compat` counts these
/// items as refused). `transform` gives a column that allows no null its default, so only a column
/// without one can be named.
pub fn forbidden_null<'a>(to: &'a Blueprint, item: &Map<String, Value>) -> Option<&'a str> {
    to.columns
        .iter()
        .find(|(name, column)| {
            !column.def.nullable && item.get(name.as_str()).is_none_or(Value::is_null)
        })
        .map(|(name, _)| name.as_str())
}

/// Converts a non-null value between two column definitions: kept when the conversion loses
/// nothing, converted as the column's declared `convert` says (the target's, else the source's), and
/// null otherwise (or the target's default, with `convert: default`). `value` is one a column of
/// `from` holds, canonical for its type: between columns of one type only the target's rules are
/// checked, since canonicalizing it again would find nothing (and costs most for the largest
/// values: a polygon's validity, on every read at another version).
pub fn convert(from: &ColumnDef, to: &ColumnDef, value: &Value) -> Value {
    let how = to.convert.or(from.convert);
    let same = from.ty == to.ty;
    let converted = if same {
        Some(value.clone())
    } else {
        convert_type(from.ty, to.ty, value, how)
    };
    let checked = converted.and_then(|v| {
        let checked = match same {
            true => check_canonical(to, &v).map(|()| None),
            false => check_column_value(to, &v).map(Some),
        };
        match checked {
            Ok(canonical) => Some(canonical.unwrap_or(v)),
            Err(_) if how == Some(Convert::Truncate) => truncate_text(to, &v),
            Err(_) => None,
        }
    });
    match checked {
        Some(v) => v,
        None if how == Some(Convert::Default) => to.fallback(),
        None => Value::Null,
    }
}

/// A text cut to the column's `max_length` (`convert: truncate`), if that makes it valid.
fn truncate_text(to: &ColumnDef, value: &Value) -> Option<Value> {
    let max = to.validation.max_length? as usize;
    let cut = |v: &Value| -> Option<Value> {
        let text = v.as_str()?;
        Some(Value::String(text.chars().take(max).collect()))
    };
    let cut = match value {
        Value::Array(items) => Value::Array(items.iter().map(cut).collect::<Option<_>>()?),
        other => cut(other)?,
    };
    check_column_value(to, &cut).ok()
}

fn convert_type(
    from: ColumnType,
    to: ColumnType,
    value: &Value,
    how: Option<Convert>,
) -> Option<Value> {
    match (from, to) {
        (ColumnType::One(a), ColumnType::One(b)) => convert_scalar(a, b, value, how),
        (ColumnType::One(a), ColumnType::Many(b)) => {
            convert_scalar(a, b, value, how).map(|v| Value::Array(vec![v]))
        }
        (ColumnType::Many(a), ColumnType::One(b)) => match value.as_array()?.as_slice() {
            [single] => convert_scalar(a, b, single, how),
            _ => None,
        },
        (ColumnType::Many(a), ColumnType::Many(b)) => value
            .as_array()?
            .iter()
            .map(|v| convert_scalar(a, b, v, how))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array),
    }
}

fn convert_scalar(
    from: BaseType,
    to: BaseType,
    value: &Value,
    how: Option<Convert>,
) -> Option<Value> {
    use BaseType::*;
    if from == to {
        return Some(value.clone());
    }
    match (from, to) {
        (Date | DateTime, String | Text) if how == Some(Convert::Format) => {
            let t = parse_datetime(value.as_str()?).ok()?;
            Some(Value::String(
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ))
        }
        (_, String | Text) => Some(Value::String(to_text(from, value))),
        // What reads strictly is read so (`"1e3"` is 1000, not the 1 at its start).
        (String | Text, _) if how == Some(Convert::Parse) => {
            from_text(to, value.as_str()?).or_else(|| parse_leniently(to, value.as_str()?))
        }
        (String | Text, _) => from_text(to, value.as_str()?),
        (_, Json) => Some(value.clone()),
        (Json, _) => canonicalize_scalar(to, value).ok(),
        (Integer, Float) => Some(value.clone()),
        (Float, Integer) => {
            let f = value.as_f64()?;
            let whole = match how {
                Some(Convert::Round) => f.round(),
                Some(Convert::Truncate) => f.trunc(),
                _ => f,
            };
            canonicalize_scalar(Integer, &Value::from(whole)).ok()
        }
        (Date, DateTime) => Some(Value::String(format!("{} 00:00:00", value.as_str()?))),
        (DateTime, Date) => {
            let t = parse_datetime(value.as_str()?).ok()?;
            let day = match how {
                Some(Convert::Truncate) => t.date_naive(),
                // The last day there is rounds to itself: a date past 9999 is no date here.
                Some(Convert::Round) if t.time() >= chrono::NaiveTime::from_hms_opt(12, 0, 0)? => {
                    let day = t.date_naive().succ_opt().filter(|d| d.year() <= 9999);
                    day.unwrap_or(t.date_naive())
                }
                Some(Convert::Round) => t.date_naive(),
                _ if t.time() == chrono::NaiveTime::MIN => t.date_naive(),
                _ => return None,
            };
            Some(Value::String(day.format("%Y-%m-%d").to_string()))
        }
        _ => None,
    }
}

fn to_text(from: BaseType, value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if from == BaseType::Float => n.as_f64().map_or(n.to_string(), float_text),
        other => other.to_string(),
    }
}

/// A float as text: `2.5`, `2` for a whole one, and with an exponent past the digits JavaScript
/// writes out in full (`3.4e38`, `1.2e-38`, where every digit would take 39 characters and a
/// `max_length` would lose the value).
fn float_text(f: f64) -> String {
    if f != 0.0 && (f.abs() >= 1e21 || f.abs() < 1e-7) {
        format!("{f:e}")
    } else {
        f.to_string()
    }
}

fn from_text(to: BaseType, text: &str) -> Option<Value> {
    use BaseType::*;
    let value = match to {
        Integer => Value::from(text.trim().parse::<i64>().ok()?),
        Float => Value::from(text.trim().parse::<f64>().ok().filter(|f| f.is_finite())?),
        Boolean => Value::Bool(text.trim().parse::<bool>().ok()?),
        // A text that is JSON, as a client could write it in the column, is read as it; others
        // stay strings: what is not JSON, and what dstore refuses in a body (nested deeper than
        // an element of an item's `json[]` member may be, a key named twice, a whole number
        // beyond 64 bits, a NUL a json column refuses), which would be read as another value or
        // could not be written back. So does `null`, which would arrive as no value.
        Json => match crate::json::parse_nested(text.as_bytes(), crate::json::MAX_DEPTH - 2) {
            Ok(value) if !value.is_null() && canonicalize_scalar(Json, &value).is_ok() => value,
            Ok(_) | Err(_) => Value::String(text.into()),
        },
        Point | LineString | Polygon => crate::json::parse(text.as_bytes()).ok()?,
        Uuid | Date | DateTime | String | Text => Value::String(text.into()),
    };
    canonicalize_scalar(to, &value).ok()
}

/// The number a text starts with, when a space or a sign follows it (see [`parse_leniently`]).
fn leading_number(text: &str) -> Option<(f64, &str)> {
    let end = text
        .char_indices()
        .take_while(|(i, c)| {
            c.is_ascii_digit() || *c == '.' || (*i == 0 && (*c == '-' || *c == '+'))
        })
        .map(|(i, c)| i + c.len_utf8())
        .last()?;
    let next = text[end..].chars().next();
    if next.is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | ',' | '.')) {
        return None;
    }
    Some((text[..end].parse().ok()?, &text[..end]))
}

/// `convert: parse`, for a text that does not read strictly: a number in full in any notation
/// Rust reads (`"1e3"` for an integer column), else the number at the start of a text followed by a
/// space or a sign (`" 12 kg"`, `"5%"`); yes/no words; dates written with `/` or `.`. A number is
/// never taken from the start of a text in another notation (`"0x10"`, `"1_000"`, `"1,5"`) or one
/// running on into letters (`"12kg"`, `"3.5e38"` past a float's range): no value it surely meant,
/// so it stays lost, and the freeze's report counts it.
fn parse_leniently(to: BaseType, text: &str) -> Option<Value> {
    use BaseType::*;
    let text = text.trim();
    let value = match to {
        Integer | Float => {
            let (number, token) = match text.parse::<f64>() {
                Ok(number) => (number, text),
                Err(_) => leading_number(text)?,
            };
            if !number.is_finite() {
                return None;
            }
            if to == Integer {
                if number.fract() != 0.0 || !crate::json::whole_decimal(token) {
                    return None;
                }
                Value::from(number as i64)
            } else {
                Value::from(number)
            }
        }
        Boolean => match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "on" | "1" => Value::Bool(true),
            "false" | "no" | "n" | "off" | "0" => Value::Bool(false),
            _ => return None,
        },
        Date | DateTime => {
            let normal = text.replace('/', "-");
            let normal = match normal.split('.').collect::<Vec<_>>().as_slice() {
                [d, m, y] if y.len() == 4 => format!("{y}-{m:0>2}-{d:0>2}"),
                _ => normal,
            };
            Value::String(normal)
        }
        _ => return None,
    };
    canonicalize_scalar(to, &value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A blueprint of `names`, the uid of each given, every column an integer.
    fn wide(names: impl IntoIterator<Item = (String, Uid)>) -> Blueprint {
        Blueprint {
            uid: 1000,
            table: Ident::parse("t").unwrap(),
            es_type: Ident::parse("t").unwrap(),
            columns: names
                .into_iter()
                .map(|(name, uid)| {
                    let def = ColumnDef::of_type(ColumnType::One(BaseType::Integer));
                    (Ident::parse(&name).unwrap(), Column { uid, def })
                })
                .collect(),
        }
    }

    /// Between columns of one type a stored value is checked against the target's rules only, not
    /// canonicalized again: a polygon's validity was checked on every read and write at another
    /// version (a self-crossing ring stands for what that would refuse, which a stored value
    /// never is). A rule the target tightened still refuses it, and another type still converts.
    #[test]
    fn a_value_moves_between_columns_of_one_type_by_their_rules_alone() {
        let polygon = ColumnDef::of_type(ColumnType::One(BaseType::Polygon));
        let crossing =
            json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]});
        assert!(check_column_value(&polygon, &crossing).is_err());
        assert_eq!(convert(&polygon, &polygon, &crossing), crossing);
        let text = ColumnDef::of_type(ColumnType::One(BaseType::String));
        let mut short = text.clone();
        short.validation.max_length = Some(3);
        assert_eq!(convert(&text, &short, &json!("abc")), json!("abc"));
        assert_eq!(convert(&text, &short, &json!("abcd")), Value::Null);
        let integer = ColumnDef::of_type(ColumnType::One(BaseType::Integer));
        assert_eq!(convert(&integer, &text, &json!(12)), json!("12"));
    }

    /// A wide blueprint's columns (found through the index) move by uid as a narrow one's do:
    /// renamed and reordered columns keep their values, new ones are null, gone ones go.
    #[test]
    fn the_columns_of_a_wide_blueprint_move_by_uid() {
        let from = wide((1..=900).map(|uid| (format!("c{uid}"), uid)));
        let to = wide(
            (1..=890)
                .rev()
                .map(|uid| (format!("r{uid}"), uid))
                .chain((901..=910).map(|uid| (format!("n{uid}"), uid))),
        );
        let mut item = Map::new();
        item.insert("id".into(), json!("x"));
        for uid in 1..=900 {
            item.insert(format!("c{uid}"), json!(uid));
        }
        let moved = transform(&item, &from, &to, 2);
        assert_eq!(moved.len(), 900 + 3);
        for uid in 1..=890 {
            assert_eq!(moved[&format!("r{uid}")], json!(uid));
        }
        for uid in 901..=910 {
            assert_eq!(moved[&format!("n{uid}")], Value::Null);
        }
        assert!(!moved.contains_key("c900"));
        assert_eq!(moved["project_version"], json!(2));
    }

    fn parsed(to: BaseType, text: &str) -> Option<Value> {
        convert_scalar(BaseType::String, to, &json!(text), Some(Convert::Parse))
    }

    #[test]
    fn parse_reads_what_reads_strictly_as_so_and_takes_a_leading_number_only_before_a_space_or_sign(
    ) {
        use BaseType::{Boolean, Date, Float, Integer};
        for (text, integer, float) in [
            ("1e3", Some(json!(1000)), Some(json!(1000.0))),
            ("-1.5e-3", None, Some(json!(-0.0015))),
            (" 12 kg", Some(json!(12)), Some(json!(12.0))),
            ("5%", Some(json!(5)), Some(json!(5.0))),
            ("-7 C", Some(json!(-7)), Some(json!(-7.0))),
            ("2.5 l", None, Some(json!(2.5))),
            // Another notation, or a number running on into letters: no value it surely meant.
            ("0x10", None, None),
            ("1_000", None, None),
            ("1,5", None, None),
            ("12kg", None, None),
            ("12e", None, None),
            ("1.2.3", None, None),
            ("NaN", None, None),
            ("inf", None, None),
            ("", None, None),
            ("kg 12", None, None),
            // Not a whole number, though the nearest double is one.
            ("4.9999999999999999", None, Some(json!(5.0))),
            ("0.99999999999999999 m", None, Some(json!(1.0))),
            ("1200e-2", Some(json!(12)), Some(json!(12.0))),
            ("5.000", Some(json!(5)), Some(json!(5.0))),
        ] {
            assert_eq!(parsed(Integer, text), integer, "{text:?} as an integer");
            assert_eq!(parsed(Float, text), float, "{text:?} as a float");
        }
        // Past a column's range: none, not the digits before the exponent.
        assert_eq!(parsed(Integer, "1e30"), None);
        assert_eq!(parsed(Integer, "3000000000"), None);
        assert_eq!(parsed(Float, "3.5e38"), None);
        assert_eq!(parsed(Boolean, " Yes "), Some(json!(true)));
        assert_eq!(parsed(Date, "01.05.2024"), Some(json!("2024-05-01")));
        assert_eq!(parsed(Date, "2024/05/01"), Some(json!("2024-05-01")));
    }

    #[test]
    fn text_becomes_a_json_value_only_as_a_client_could_write_it_in_the_column() {
        let json = |text: &str| {
            convert_scalar(BaseType::String, BaseType::Json, &json!(text), None).unwrap()
        };
        assert_eq!(json(r#"{"a":[1,"b"]}"#), json!({"a": [1, "b"]}));
        assert_eq!(json("12"), json!(12));
        // An element of an item's `json[]` member nests two levels less than a body: the deepest
        // text that becomes a value still makes an item a client can write back.
        let nested = |levels: usize| "[".repeat(levels) + &"]".repeat(levels);
        let deepest = json(&nested(crate::json::MAX_DEPTH - 2));
        let item = json!({ "c": [deepest] }).to_string();
        assert!(crate::json::parse(item.as_bytes()).is_ok());
        // What a body may not hold stays the text it was: too deep (serde alone reads 127
        // levels), a key named twice, a whole number beyond 64 bits; and what is not JSON.
        for text in [
            nested(crate::json::MAX_DEPTH - 1),
            nested(127),
            r#"{"a":1,"a":2}"#.into(),
            "123456789012345678901234567890".into(),
            "[1,".into(),
            "null".into(),
            r#""a\u0000""#.into(),
            r#"{"k":"\u0000"}"#.into(),
        ] {
            assert_eq!(json(&text), json!(text), "{text}");
        }
    }

    #[test]
    fn a_float_becomes_the_text_a_person_would_write() {
        let text = |f: f64| convert_scalar(BaseType::Float, BaseType::String, &json!(f), None);
        for (f, expected) in [
            (2.5, "2.5"),
            (2.0, "2"),
            (-0.0015, "-0.0015"),
            (0.0, "0"),
            (1e20, "100000000000000000000"),
            (3.4e38, "3.4e38"),
            (1.2e-38, "1.2e-38"),
            (-1e21, "-1e21"),
        ] {
            assert_eq!(text(f), Some(json!(expected)), "{f}");
            // Read back, it is the same number.
            assert_eq!(expected.parse::<f64>().unwrap(), f);
        }
    }
}
