//! Moving an item between versions of its blueprint (docs/design.md §4 step 2).
//!
//! Columns are matched by uid: a renamed column moves to its new name, a column the target does not
//! know disappears, a column the source does not know gets its default or null. A type change keeps the
//! value when the conversion loses nothing (integer→float, anything→string/text, date→datetime, a text
//! that parses as the new type …) and gives null otherwise. The result always passes the target
//! column's own checks, so every projected item is valid at its version.

use serde_json::{Map, Value};

use super::check::check_column_value;
use super::model::{Blueprint, ColumnDef};
use super::types::{BaseType, ColumnType};
use super::value::{canonicalize_scalar, parse_datetime};

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
    for (name, column) in &to.columns {
        let value = match from.column_by_uid(column.uid) {
            Some((old_name, old)) => match item.get(old_name.as_str()) {
                None | Some(Value::Null) => Value::Null,
                Some(value) => convert(&old.def, &column.def, value),
            },
            None => column.def.fallback(),
        };
        out.insert(name.to_string(), value);
    }
    out
}

/// Converts a non-null value between two column definitions; null when that would lose information.
pub fn convert(from: &ColumnDef, to: &ColumnDef, value: &Value) -> Value {
    let converted = if from.ty == to.ty {
        Some(value.clone())
    } else {
        convert_type(from.ty, to.ty, value)
    };
    converted
        .and_then(|v| check_column_value(to, &v).ok())
        .unwrap_or(Value::Null)
}

fn convert_type(from: ColumnType, to: ColumnType, value: &Value) -> Option<Value> {
    match (from, to) {
        (ColumnType::One(a), ColumnType::One(b)) => convert_scalar(a, b, value),
        (ColumnType::One(a), ColumnType::Many(b)) => {
            convert_scalar(a, b, value).map(|v| Value::Array(vec![v]))
        }
        (ColumnType::Many(a), ColumnType::One(b)) => match value.as_array()?.as_slice() {
            [single] => convert_scalar(a, b, single),
            _ => None,
        },
        (ColumnType::Many(a), ColumnType::Many(b)) => value
            .as_array()?
            .iter()
            .map(|v| convert_scalar(a, b, v))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array),
    }
}

fn convert_scalar(from: BaseType, to: BaseType, value: &Value) -> Option<Value> {
    use BaseType::*;
    if from == to {
        return Some(value.clone());
    }
    match (from, to) {
        (_, String | Text) => Some(Value::String(to_text(from, value))),
        (String | Text, _) => from_text(to, value.as_str()?),
        (_, Json) => Some(value.clone()),
        (Json, _) => canonicalize_scalar(to, value).ok(),
        (Integer, Float) => Some(value.clone()),
        (Float, Integer) => canonicalize_scalar(Integer, value).ok(),
        (Date, DateTime) => Some(Value::String(format!("{} 00:00:00", value.as_str()?))),
        (DateTime, Date) => {
            let t = parse_datetime(value.as_str()?).ok()?;
            (t.time() == chrono::NaiveTime::MIN)
                .then(|| Value::String(t.format("%Y-%m-%d").to_string()))
        }
        _ => None,
    }
}

fn to_text(from: BaseType, value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if from == BaseType::Float => {
            n.as_f64().map_or(n.to_string(), |f| f.to_string())
        }
        other => other.to_string(),
    }
}

fn from_text(to: BaseType, text: &str) -> Option<Value> {
    use BaseType::*;
    let value = match to {
        Integer => Value::from(text.trim().parse::<i64>().ok()?),
        Float => Value::from(text.trim().parse::<f64>().ok().filter(|f| f.is_finite())?),
        Boolean => Value::Bool(text.trim().parse::<bool>().ok()?),
        Json => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into())),
        Point | LineString | Polygon => serde_json::from_str(text).ok()?,
        Uuid | Date | DateTime | String | Text => Value::String(text.into()),
    };
    canonicalize_scalar(to, &value).ok()
}
