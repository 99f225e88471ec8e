//! Conversions between dstore's canonical item values and what PostgreSQL is given and gives back.
//!
//! Writes: geometries travel as hex EWKB with SRID 4326, which PostGIS parses several times faster
//! than GeoJSON; an array of geometries becomes one Multi geometry (`point[]` → MultiPoint …); a
//! datetime gets an explicit `+00` so PostgreSQL never reads it in the session's time zone. Reads do
//! the opposite, so a stored row reads back as the document the journal handed over. Pure functions.
//!
//! The geometry columns are two-dimensional (docs/design.md §2), so a third coordinate (altitude) that GeoJSON
//! allows is not written to PostgreSQL.

use serde_json::{json, Map, Value};

use crate::blueprint::value::{format_datetime, parse_datetime};
use crate::blueprint::{BaseType, ColumnType};

/// Whether [`to_input`] changes values of this type (the others are sent as they are).
pub fn is_converted(ty: ColumnType) -> bool {
    ty.base().is_geometry() || ty.base() == BaseType::DateTime
}

/// The value a write sends for a column of type `ty`.
pub fn to_input(ty: ColumnType, value: &Value) -> Value {
    match (ty, value) {
        (_, Value::Null) => Value::Null,
        (ColumnType::One(BaseType::DateTime), Value::String(s)) => Value::String(format!("{s}+00")),
        (ColumnType::Many(BaseType::DateTime), Value::Array(items)) => Value::Array(
            items
                .iter()
                .map(|item| to_input(ColumnType::One(BaseType::DateTime), item))
                .collect(),
        ),
        (ColumnType::One(base) | ColumnType::Many(base), _) if base.is_geometry() => {
            let geojson = to_geojson(ty, value);
            // Not expected after validation; PostGIS then refuses the row with its own message.
            Value::String(ewkb_hex(&geojson).unwrap_or_else(|| geojson.to_string()))
        }
        _ => value.clone(),
    }
}

/// The GeoJSON stored for a column: arrays of geometries become one Multi geometry.
pub fn to_geojson(ty: ColumnType, value: &Value) -> Value {
    match (ty, value) {
        (ColumnType::Many(base), Value::Array(items)) if base.is_geometry() => json!({
            "type": multi_name(base),
            "coordinates": items.iter().map(|g| g.get("coordinates").cloned().unwrap_or(Value::Null)).collect::<Vec<_>>(),
        }),
        _ => value.clone(),
    }
}

const SRID_FLAG: u32 = 0x2000_0000;
const WGS84: u32 = 4326;

/// Hex EWKB (little endian, SRID 4326, 2D) of a GeoJSON Point, LineString, Polygon or their Multi
/// forms; `None` when the GeoJSON is not one of them.
pub fn ewkb_hex(geojson: &Value) -> Option<String> {
    let kind = geojson.get("type")?.as_str()?;
    let coordinates = geojson.get("coordinates")?;
    let mut out = Vec::with_capacity(64);
    let code = |kind: &str| match kind {
        "Point" => Some(1),
        "LineString" => Some(2),
        "Polygon" => Some(3),
        "MultiPoint" => Some(4),
        "MultiLineString" => Some(5),
        "MultiPolygon" => Some(6),
        _ => None,
    };
    out.push(1);
    out.extend_from_slice(&(code(kind)? | SRID_FLAG).to_le_bytes());
    out.extend_from_slice(&WGS84.to_le_bytes());
    let part = |out: &mut Vec<u8>, kind: &str, coordinates: &Value| -> Option<()> {
        out.push(1);
        out.extend_from_slice(&code(kind)?.to_le_bytes());
        body(out, kind, coordinates)
    };
    match kind {
        "MultiPoint" | "MultiLineString" | "MultiPolygon" => {
            let parts = coordinates.as_array()?;
            count(&mut out, parts.len())?;
            for coordinates in parts {
                part(&mut out, &kind[5..], coordinates)?;
            }
        }
        _ => body(&mut out, kind, coordinates)?,
    }
    let mut hex = String::with_capacity(out.len() * 2);
    for byte in out {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 15)]));
    }
    Some(hex)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn count(out: &mut Vec<u8>, n: usize) -> Option<()> {
    out.extend_from_slice(&u32::try_from(n).ok()?.to_le_bytes());
    Some(())
}

fn body(out: &mut Vec<u8>, kind: &str, coordinates: &Value) -> Option<()> {
    let position = |out: &mut Vec<u8>, p: &Value| -> Option<()> {
        out.extend_from_slice(&p.get(0)?.as_f64()?.to_le_bytes());
        out.extend_from_slice(&p.get(1)?.as_f64()?.to_le_bytes());
        Some(())
    };
    let line = |out: &mut Vec<u8>, l: &Value| -> Option<()> {
        let points = l.as_array()?;
        count(out, points.len())?;
        points.iter().try_for_each(|p| position(out, p))
    };
    match kind {
        "Point" => position(out, coordinates),
        "LineString" => line(out, coordinates),
        "Polygon" => {
            let rings = coordinates.as_array()?;
            count(out, rings.len())?;
            rings.iter().try_for_each(|r| line(out, r))
        }
        _ => None,
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
            items
                .into_iter()
                .map(|item| from_stored(ColumnType::One(BaseType::DateTime), item))
                .collect(),
        ),
        (ColumnType::Many(base), Value::Object(mut multi)) if base.is_geometry() => {
            let single = single_name(base);
            let parts = match multi.remove("coordinates") {
                Some(Value::Array(parts)) => parts,
                _ => Vec::new(),
            };
            Value::Array(
                parts
                    .into_iter()
                    .map(|c| json!({"type": single, "coordinates": floats(c)}))
                    .collect(),
            )
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
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Number(n), Value::Number),
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
pub fn document(
    mut row: Map<String, Value>,
    columns: &[(String, ColumnType)],
) -> Map<String, Value> {
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
        let multi = to_geojson(ColumnType::Many(BaseType::Point), &points);
        assert_eq!(
            multi,
            json!({"type": "MultiPoint", "coordinates": [[1.0, 2.0], [3.0, 4.0]]})
        );
        assert_eq!(
            from_stored(ColumnType::Many(BaseType::Point), multi),
            points
        );
        let empty = to_geojson(ColumnType::Many(BaseType::Polygon), &json!([]));
        assert_eq!(
            from_stored(ColumnType::Many(BaseType::Polygon), empty),
            json!([])
        );
    }

    #[test]
    fn geometries_are_sent_as_hex_ewkb_with_srid_4326() {
        // SELECT ST_AsHEXEWKB('SRID=4326;POINT(1 2)'::geometry, 'NDR')
        let point = json!({"type": "Point", "coordinates": [1.0, 2.0]});
        assert_eq!(
            to_input(ColumnType::One(BaseType::Point), &point),
            json!("0101000020e6100000000000000000f03f0000000000000040")
        );
        let none = to_input(ColumnType::Many(BaseType::Point), &json!([]));
        assert_eq!(none, json!("0104000020e610000000000000"));
        assert_eq!(
            ewkb_hex(&json!({"type": "Circle", "coordinates": [1.0]})),
            None
        );
    }

    #[test]
    fn coordinates_read_back_as_floats_like_the_canonical_geojson() {
        let stored = json!({"type": "Point", "coordinates": [0, 47.25]});
        assert_eq!(
            from_stored(ColumnType::One(BaseType::Point), stored),
            json!({"type": "Point", "coordinates": [0.0, 47.25]})
        );
    }

    #[test]
    fn datetimes_are_sent_in_utc_and_read_back_in_canonical_form() {
        let ty = ColumnType::One(BaseType::DateTime);
        assert_eq!(
            to_input(ty, &json!("2021-03-04 05:06:07")),
            json!("2021-03-04 05:06:07+00")
        );
        assert_eq!(
            from_stored(ty, json!("2021-03-04T05:06:07+00:00")),
            json!("2021-03-04 05:06:07")
        );
        assert_eq!(
            from_stored(ty, json!("2021-03-04T05:06:07.25+00:00")),
            json!("2021-03-04 05:06:07.250000")
        );
    }
}
