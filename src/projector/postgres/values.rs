//! Conversions between dstore's canonical item values and what PostgreSQL is given and gives back.
//!
//! Writes: an array of geometries becomes one Multi geometry (`point[]` → MultiPoint …), and a
//! datetime gets an explicit `+00` so PostgreSQL never reads it in the session's time zone. Reads do
//! the opposite, so a stored row reads back as the document the journal handed over. Pure functions.

use serde_json::{json, Map, Value};

use crate::blueprint::value::{format_datetime, parse_datetime};
use crate::blueprint::{BaseType, ColumnType};

/// The value a write sends for a column of type `ty`.
pub fn to_input(ty: ColumnType, value: &Value) -> Value {
    match (ty, value) {
        (_, Value::Null) => Value::Null,
        (ColumnType::One(BaseType::DateTime), Value::String(s)) => Value::String(format!("{s}+00")),
        (ColumnType::Many(BaseType::DateTime), Value::Array(items)) => {
            Value::Array(items.iter().map(|item| to_input(ColumnType::One(BaseType::DateTime), item)).collect())
        }
        (ColumnType::Many(base), Value::Array(items)) if base.is_geometry() => json!({
            "type": multi_name(base),
            "coordinates": items.iter().map(|g| g.get("coordinates").cloned().unwrap_or(Value::Null)).collect::<Vec<_>>(),
        }),
        _ => value.clone(),
    }
}

/// The canonical value of a column as read back (geometries already as GeoJSON).
pub fn from_stored(ty: ColumnType, value: Value) -> Value {
    match (ty, value) {
        (_, Value::Null) => Value::Null,
        (ColumnType::One(BaseType::DateTime), Value::String(s)) => {
            Value::String(parse_datetime(&s).map_or(s, |t| format_datetime(&t)))
        }
        (ColumnType::Many(BaseType::DateTime), Value::Array(items)) => Value::Array(
            items.into_iter().map(|item| from_stored(ColumnType::One(BaseType::DateTime), item)).collect(),
        ),
        (ColumnType::Many(base), Value::Object(mut multi)) if base.is_geometry() => {
            let single = single_name(base);
            let parts = match multi.remove("coordinates") {
                Some(Value::Array(parts)) => parts,
                _ => Vec::new(),
            };
            Value::Array(parts.into_iter().map(|c| json!({"type": single, "coordinates": floats(c)})).collect())
        }
        (ColumnType::One(base), Value::Object(mut geometry)) if base.is_geometry() => {
            if let Some(coordinates) = geometry.remove("coordinates") {
                geometry.insert("coordinates".into(), floats(coordinates));
            }
            Value::Object(geometry)
        }
        (_, value) => value,
    }
}

/// Coordinates as floats, as dstore's canonical GeoJSON has them (PostGIS prints `0`, not `0.0`).
fn floats(value: Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(floats).collect()),
        Value::Number(n) => n.as_f64().and_then(serde_json::Number::from_f64).map_or(Value::Number(n), Value::Number),
        other => other,
    }
}

fn multi_name(base: BaseType) -> &'static str {
    match base {
        BaseType::Point => "MultiPoint",
        BaseType::LineString => "MultiLineString",
        BaseType::Polygon => "MultiPolygon",
        _ => "GeometryCollection",
    }
}

fn single_name(base: BaseType) -> &'static str {
    match base {
        BaseType::Point => "Point",
        BaseType::LineString => "LineString",
        BaseType::Polygon => "Polygon",
        _ => "Geometry",
    }
}

/// Orders a read row like the journal's documents: `id`, `project_version`, `links`, then columns.
pub fn document(mut row: Map<String, Value>, columns: &[(String, ColumnType)]) -> Map<String, Value> {
    let mut doc = Map::with_capacity(columns.len() + 3);
    for key in ["id", "project_version", "links"] {
        doc.insert(key.into(), row.remove(key).unwrap_or(Value::Null));
    }
    for (name, ty) in columns {
        let value = row.remove(name).unwrap_or(Value::Null);
        doc.insert(name.clone(), from_stored(*ty, value));
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_of_geometries_travel_as_multi_geometries_and_come_back_as_arrays() {
        let points = json!([{"type": "Point", "coordinates": [1.0, 2.0]}, {"type": "Point", "coordinates": [3.0, 4.0]}]);
        let multi = to_input(ColumnType::Many(BaseType::Point), &points);
        assert_eq!(multi, json!({"type": "MultiPoint", "coordinates": [[1.0, 2.0], [3.0, 4.0]]}));
        assert_eq!(from_stored(ColumnType::Many(BaseType::Point), multi), points);
        let empty = to_input(ColumnType::Many(BaseType::Polygon), &json!([]));
        assert_eq!(from_stored(ColumnType::Many(BaseType::Polygon), empty), json!([]));
    }

    #[test]
    fn coordinates_read_back_as_floats_like_the_canonical_geojson() {
        let stored = json!({"type": "Point", "coordinates": [0, 47.25]});
        assert_eq!(from_stored(ColumnType::One(BaseType::Point), stored), json!({"type": "Point", "coordinates": [0.0, 47.25]}));
    }

    #[test]
    fn datetimes_are_sent_in_utc_and_read_back_in_canonical_form() {
        let ty = ColumnType::One(BaseType::DateTime);
        assert_eq!(to_input(ty, &json!("2021-03-04 05:06:07")), json!("2021-03-04 05:06:07+00"));
        assert_eq!(from_stored(ty, json!("2021-03-04T05:06:07+00:00")), json!("2021-03-04 05:06:07"));
        assert_eq!(from_stored(ty, json!("2021-03-04T05:06:07.25+00:00")), json!("2021-03-04 05:06:07.250000"));
    }
}
