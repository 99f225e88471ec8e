//! Strict validation of items against a blueprint (docs/design.md §2, §4 step 1).
//!
//! [`check_item`] either returns the item in canonical form — `id`, `project_version`, `links`, then
//! every column of the blueprint in blueprint order, absent ones filled with their default or null — or
//! every problem at once, each under its JSON pointer. It never touches a store.
//!
//! The canonical form is a [`Canonical`]: its fields in order, named by the blueprint. Most writes only
//! serialize it (a project with one live version), so it is a list rather than a map: no key is
//! copied or hashed until something needs to look one up ([`Canonical::into_map`]).

use serde_json::{Map, Value};
use uuid::Uuid;

use super::model::{Blueprint, ColumnDef};
use super::parse::pointer_segment;
use super::types::{BaseType, ColumnType};
use super::value::{canonicalize, excerpt_str};
use super::FieldError;
use crate::document::Fields;

/// Longest text, in bytes, an indexed or unique string or text column (or element of one) holds:
/// a PostgreSQL index row holds at most about 2700 bytes, and a longer value there would be a
/// write every other store accepted and PostgreSQL refused for ever.
pub const MAX_INDEXED_TEXT_BYTES: usize = 2000;

/// Keys every item carries besides its columns.
pub const ITEM_KEYS: [&str; 3] = ["id", "project_version", "links"];

/// Checks one non-null value against a column's type and validation rules; returns its canonical form.
pub fn check_column_value(def: &ColumnDef, value: &Value) -> Result<Value, String> {
    let canonical = canonicalize(def.ty, value)?;
    check_canonical(def, &canonical)?;
    Ok(canonical)
}

/// Checks a value already canonical for `def`'s type (one stored in a column of that type)
/// against `def`'s rules, each element of an array: all a column of the same type may refuse of
/// it, without canonicalizing it again (a polygon's validity is checked in time that grows with
/// the square of its points).
pub fn check_canonical(def: &ColumnDef, canonical: &Value) -> Result<(), String> {
    match (&def.ty, canonical) {
        (ColumnType::Many(_), Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check_rules(def, item).map_err(|e| format!("element {i}: {e}"))?;
            }
            Ok(())
        }
        _ => check_rules(def, canonical),
    }
}

/// Refuses a value PostgreSQL could not put in the index of a `unique` or `index` column (what
/// [`check_rules`] does not check already): a unique array, JSON value or geometry is one B-tree
/// index row, and each element of an indexed `json[]` a GIN index entry, both held to
/// [`MAX_INDEXED_TEXT_BYTES`] as a text is, counted uncompressed (PostgreSQL compresses an index
/// value past about 512 bytes first, which only values that repeat themselves gain from). An
/// indexed `json` column's GIN index hashes long keys and strings; an indexed geometry's holds its
/// bounding box.
pub fn check_index_entry(def: &ColumnDef, value: &Value) -> Result<(), String> {
    let whole = match def.ty {
        ColumnType::One(base) => base == BaseType::Json || base.is_geometry(),
        ColumnType::Many(_) => true,
    };
    if def.unique && whole {
        let bytes = stored_bytes_at_most(def.ty, value);
        if bytes > MAX_INDEXED_TEXT_BYTES {
            return Err(format!(
                "takes up to {bytes} bytes in PostgreSQL; a unique column's value holds at most \
                 {MAX_INDEXED_TEXT_BYTES} (PostgreSQL's index rows hold about 2700)"
            ));
        }
    }
    if def.index && def.ty == ColumnType::Many(BaseType::Json) {
        let elements = value.as_array().map(Vec::as_slice).unwrap_or_default();
        for (i, element) in elements.iter().enumerate() {
            let bytes = 8 + jsonb_bytes(element);
            if bytes > MAX_INDEXED_TEXT_BYTES {
                return Err(format!(
                    "element {i} takes up to {bytes} bytes in PostgreSQL; an indexed json[] \
                     column's elements hold at most {MAX_INDEXED_TEXT_BYTES} each (PostgreSQL's \
                     index entries hold about 2700)"
                ));
            }
        }
    }
    Ok(())
}

/// The most bytes PostgreSQL takes to store `value` (canonical) in a column of type `ty`,
/// uncompressed: each value's header and alignment counted generously.
fn stored_bytes_at_most(ty: ColumnType, value: &Value) -> usize {
    fn element(base: BaseType, value: &Value) -> usize {
        match (base, value) {
            (_, Value::Null) => 0,
            (BaseType::Uuid, _) => 16,
            (BaseType::DateTime, _) => 8,
            (BaseType::Boolean, _) => 1,
            (BaseType::Date | BaseType::Integer | BaseType::Float, _) => 4,
            (BaseType::String | BaseType::Text, Value::String(s)) => 8 + s.len(),
            (BaseType::Json, _) => 8 + jsonb_bytes(value),
            (_, _) => geometry_bytes(value),
        }
    }
    match (ty, value) {
        (ColumnType::Many(base), Value::Array(items)) => {
            24 + items.len().div_ceil(8) + items.iter().map(|i| element(base, i)).sum::<usize>()
        }
        (ColumnType::One(base) | ColumnType::Many(base), _) => element(base, value),
    }
}

/// What `jsonb` takes for `value`, counted generously: a 4-byte entry and 4 of alignment for each
/// value, a number's digits and header, strings and keys in full.
fn jsonb_bytes(value: &Value) -> usize {
    8 + match value {
        Value::Null | Value::Bool(_) => 0,
        Value::Number(n) => 8 + n.to_string().len(),
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(jsonb_bytes).sum(),
        Value::Object(map) => map
            .iter()
            .map(|(key, item)| 8 + key.len() + jsonb_bytes(item))
            .sum(),
    }
}

/// What PostGIS takes for a GeoJSON geometry, generously: a header, then 8 bytes a coordinate and
/// 8 a ring or part.
fn geometry_bytes(value: &Value) -> usize {
    fn walk(value: &Value) -> usize {
        match value {
            Value::Number(_) => 8,
            Value::Array(items) if items.first().is_some_and(Value::is_number) => {
                items.iter().map(walk).sum()
            }
            Value::Array(items) => 8 + items.iter().map(walk).sum::<usize>(),
            Value::Object(map) => 8 + map.values().map(walk).sum::<usize>(),
            _ => 0,
        }
    }
    64 + walk(value)
}

fn check_rules(def: &ColumnDef, value: &Value) -> Result<(), String> {
    let rules = &def.validation;
    if let Some(f) = value.as_f64() {
        if let Some(min) = rules.min.filter(|min| f < *min) {
            return Err(format!("{value} is less than the minimum {min}"));
        }
        if let Some(max) = rules.max.filter(|max| f > *max) {
            return Err(format!("{value} is greater than the maximum {max}"));
        }
    }
    if let Value::String(s) = value {
        if def.ty.base().is_textual() {
            let length = s.chars().count() as u64;
            if let Some(min) = rules.min_length.filter(|min| length < *min) {
                return Err(format!(
                    "is {length} characters long, shorter than min_length {min}"
                ));
            }
            if let Some(max) = rules.max_length.filter(|max| length > *max) {
                return Err(format!(
                    "is {length} characters long, longer than max_length {max}"
                ));
            }
            if (def.index || def.unique) && s.len() > MAX_INDEXED_TEXT_BYTES {
                return Err(format!(
                    "is {} bytes long; an indexed or unique column holds at most {MAX_INDEXED_TEXT_BYTES} bytes (PostgreSQL's index rows hold about 2700)",
                    s.len()
                ));
            }
            if let Some(pattern) = rules.pattern.as_ref().filter(|p| !p.is_match(s)) {
                return Err(format!(
                    "does not match the pattern {:?}",
                    super::value::excerpt_str(pattern.as_str())
                ));
            }
        }
    }
    if let Some(allowed) = &rules.one_of {
        let found = allowed.iter().any(|a| match (a.as_f64(), value.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => a == value,
        });
        if !found {
            return Err(format!(
                "{} is not one of the allowed values {}",
                super::value::excerpt(value),
                super::value::excerpt(&Value::Array(allowed.clone()))
            ));
        }
    }
    Ok(())
}

/// An item in canonical form, as [`check_item`] answers it: every field once, in order. Its JSON
/// text ([`Canonical::to_json`]) is the object of those fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Canonical<'a> {
    fields: Vec<(&'a str, Value)>,
}

impl Canonical<'_> {
    /// The values of the blueprint's columns, in its order (after the keys every item carries).
    pub fn column_values(&self) -> impl Iterator<Item = &Value> {
        self.fields
            .iter()
            .skip(ITEM_KEYS.len())
            .map(|(_, value)| value)
    }

    /// The item as a JSON map (for what looks fields up by name: transforms, reads).
    pub fn into_map(self) -> Map<String, Value> {
        self.fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect()
    }

    /// The item's JSON object, byte for byte what serde writes for its map, without serde's
    /// table look-up of every byte of every string (`json::write_object`).
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(64 + 32 * self.fields.len());
        crate::json::write_object(
            &mut out,
            self.fields.iter().map(|(name, value)| (*name, value)),
        );
        String::from_utf8(out).expect("JSON text of strings is UTF-8")
    }
}

/// Checks an item body against `blueprint` (as frozen in `version`) and returns its canonical form.
///
/// `id` is the item's id from the URL; a body `id` must equal it.
pub fn check_item<'a, 'b>(
    blueprint: &'a Blueprint,
    version: u32,
    id: Uuid,
    body: impl Into<Fields<'b>>,
) -> Result<Canonical<'a>, Vec<FieldError>> {
    let body = body.into();
    let mut errors = Vec::new();
    // Column names are never `id`, `project_version` or `links` (parse refuses them), so every
    // name below is pushed once.
    let mut item: Vec<(&'a str, Value)> = Vec::with_capacity(blueprint.columns.len() + 3);
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text: &str = id.hyphenated().encode_lower(&mut text);
    item.push(("id", Value::String(text.to_owned())));
    item.push(("project_version", Value::from(version)));

    match body.get("id") {
        None => {}
        Some(Value::String(raw)) if Uuid::parse_str(raw).is_ok_and(|u| u == id) => {}
        Some(other) => errors.push(FieldError::new(
            "/id",
            format!(
                "{} does not equal the item's id ({id}: the URL's, or the one POST and a _bulk \
                 create give it, where the body's `id` must be left out)",
                super::value::excerpt(other)
            ),
        )),
    }
    let links = match body.get("links") {
        None | Some(Value::Null) => Value::Array(Vec::new()),
        Some(links) => canonicalize(ColumnType::Many(super::types::BaseType::Uuid), links)
            .unwrap_or_else(|reason| {
                errors.push(FieldError::new("/links", reason));
                Value::Null
            }),
    };
    item.push(("links", links));

    // The first unknown keys are named one by one, the rest counted, so the list of known
    // columns, said once, and the errors of the known ones stay within the answer's errors.
    const UNKNOWN_LISTED: usize = 20;
    let mut unknown = 0;
    for key in body.keys() {
        let known = ITEM_KEYS.contains(&key) || blueprint.has_column(key);
        if !known {
            unknown += 1;
            if unknown <= UNKNOWN_LISTED {
                errors.push(FieldError::new(
                    format!("/{}", pointer_segment(&excerpt_str(key))),
                    "unknown column",
                ));
            }
        }
    }
    if unknown > 0 {
        let listed = match unknown > UNKNOWN_LISTED {
            true => format!(" (the first {UNKNOWN_LISTED} named)"),
            false => String::new(),
        };
        errors.push(FieldError::new(
            "",
            format!(
                "{unknown} unknown column(s){listed}; version {version} of this blueprint has {}",
                column_list(blueprint)
            ),
        ));
    }

    for (name, column) in &blueprint.columns {
        let def = &column.def;
        let path = || format!("/{name}");
        let value = match body.get(name.as_str()) {
            Some(Value::Null) if !def.nullable => {
                errors.push(FieldError::new(
                    path(),
                    "must not be null (nullable: false)",
                ));
                continue;
            }
            Some(Value::Null) => Value::Null,
            // The index rule holds what a client writes, not what an earlier write left for a
            // conversion into another version to read (stored before the rule, or by a column
            // the version indexes where the other did not: PostgreSQL refuses it there alone).
            Some(value) => match check_column_value(def, value)
                .and_then(|value| check_index_entry(def, &value).map(|()| value))
            {
                Ok(value) => value,
                Err(reason) => {
                    errors.push(FieldError::new(path(), reason));
                    continue;
                }
            },
            None if def.validation.required => {
                errors.push(FieldError::new(path(), "is required"));
                continue;
            }
            None => {
                let fallback = def.fallback();
                if fallback.is_null() && !def.nullable {
                    errors.push(FieldError::new(
                        path(),
                        "is required: it is not nullable and has no default",
                    ));
                    continue;
                }
                fallback
            }
        };
        item.push((name.as_str(), value));
    }
    if errors.is_empty() {
        Ok(Canonical { fields: item })
    } else {
        Err(errors)
    }
}

fn column_list(blueprint: &Blueprint) -> String {
    if blueprint.columns.is_empty() {
        return "no columns".into();
    }
    const SHOWN: usize = 50;
    let mut list = blueprint
        .columns
        .keys()
        .take(SHOWN)
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if blueprint.columns.len() > SHOWN {
        list.push_str(&format!(" … ({} in all)", blueprint.columns.len()));
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blueprint::{apply_edit, parse_blueprint};
    use serde_json::json;

    #[test]
    fn a_checked_item_serializes_as_its_map_does_in_canonical_order() {
        let body = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": {
            "title": {"type": "string"}, "views": {"type": "integer", "default": 7},
            "at": {"type": "datetime"}}});
        let mut uid = 0;
        let bp = apply_edit(
            None,
            parse_blueprint(&body, "").expect("valid"),
            &mut uid,
            "",
        )
        .expect("valid");
        let id = Uuid::from_u128(1);
        let Value::Object(item) = json!({"at": "2026-11-22T10:00:00Z", "title": "a\"b"}) else {
            unreachable!()
        };
        let checked = check_item(&bp, 3, id, &item).expect("valid");
        let text = checked.to_json();
        let map = checked.into_map();
        let names: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["id", "project_version", "links", "title", "views", "at"]
        );
        assert_eq!(text, serde_json::to_string(&map).expect("serializes"));
        assert_eq!(
            text,
            format!(
                r#"{{"id":"{id}","project_version":3,"links":[],"title":"a\"b","views":7,"at":"2026-11-22 10:00:00"}}"#
            )
        );
    }

    /// An indexed or unique text longer than PostgreSQL's index rows hold is refused, naming the
    /// column (an element of an indexed array too); the same text in a plain column is taken.
    #[test]
    fn an_indexed_text_longer_than_an_index_row_is_refused() {
        let body = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": {
            "code": {"type": "string", "unique": true}, "tags": {"type": "string[]", "index": true},
            "note": {"type": "text"}}});
        let mut uid = 0;
        let bp = apply_edit(None, parse_blueprint(&body, "").unwrap(), &mut uid, "").unwrap();
        let long = "é".repeat(MAX_INDEXED_TEXT_BYTES / 2 + 1);
        let fits = "x".repeat(MAX_INDEXED_TEXT_BYTES);
        let item = |value: Value| -> Map<String, Value> {
            let Value::Object(item) = value else {
                unreachable!()
            };
            item
        };
        let id = Uuid::from_u128(1);
        check_item(
            &bp,
            1,
            id,
            &item(json!({"code": fits, "tags": [fits], "note": long})),
        )
        .expect("within the bound, and a plain text of any length");
        let errors = check_item(
            &bp,
            1,
            id,
            &item(json!({"code": long, "tags": ["a", long]})),
        )
        .unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/code", "/tags"], "{errors:?}");
        assert!(
            errors[0].message.contains("at most 2000 bytes"),
            "{}",
            errors[0].message
        );
    }

    /// A unique array, JSON value or geometry is one index row, held to the same bound as a text;
    /// an indexed json[]'s elements each; an indexed json value's index hashes long strings, and
    /// an indexed geometry's holds its box.
    #[test]
    fn a_unique_array_json_or_geometry_past_an_index_row_is_refused() {
        let body = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": {
            "doc": {"type": "json", "unique": true}, "codes": {"type": "string[]", "unique": true},
            "ns": {"type": "integer[]", "unique": true}, "area": {"type": "polygon", "unique": true},
            "meta": {"type": "json[]", "index": true}, "zone": {"type": "polygon", "index": true},
            "keyed": {"type": "json", "index": true}}});
        let mut uid = 0;
        let bp = apply_edit(None, parse_blueprint(&body, "").unwrap(), &mut uid, "").unwrap();
        let ring = |points: usize| {
            let mut ring: Vec<Value> = (0..points)
                .map(|i| {
                    let a = i as f64 / points as f64 * std::f64::consts::TAU;
                    json!([a.cos(), a.sin()])
                })
                .collect();
            ring.push(ring[0].clone());
            json!({"type": "Polygon", "coordinates": [ring]})
        };
        let id = Uuid::from_u128(1);
        let check = |value: Value| {
            let Value::Object(item) = value else {
                unreachable!()
            };
            check_item(&bp, 1, id, &item)
        };
        check(json!({"doc": {"a": "x".repeat(1500)}, "codes": ["x".repeat(900), "y".repeat(900)],
            "ns": (0..300).collect::<Vec<i32>>(), "area": ring(100),
            "meta": [{"a": "x".repeat(1900)}], "zone": ring(1000), "keyed": {"a": "x".repeat(9000)}}))
        .expect("within the bound, and a large indexed geometry");
        let errors = check(json!({"doc": {"a": "x".repeat(3000)},
            "codes": ["x".repeat(1900), "y".repeat(1900)], "ns": (0..1000).collect::<Vec<i32>>(),
            "area": ring(1000), "meta": [1, {"k": ["x".repeat(2001)]}]}))
        .unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/doc", "/codes", "/ns", "/area", "/meta"],
            "{errors:?}"
        );
        assert!(
            errors[0]
                .message
                .contains("a unique column's value holds at most 2000"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[4].message.starts_with("element 1 "),
            "{}",
            errors[4].message
        );
    }
}
