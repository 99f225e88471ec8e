//! Strict validation of items against a blueprint (docs/design.md §2, §4 step 1).
//!
//! [`check_item`] either returns the item in canonical form — `id`, `project_version`, `links`, then
//! every column of the blueprint in blueprint order, absent ones filled with their default or null — or
//! every problem at once, each under its JSON pointer. It never touches a store.

use serde_json::{Map, Value};
use uuid::Uuid;

use super::model::{Blueprint, ColumnDef};
use super::parse::pointer_segment;
use super::types::ColumnType;
use super::value::{canonicalize, excerpt_str};
use super::FieldError;

/// Keys every item carries besides its columns.
pub const ITEM_KEYS: [&str; 3] = ["id", "project_version", "links"];

/// Checks one non-null value against a column's type and validation rules; returns its canonical form.
pub fn check_column_value(def: &ColumnDef, value: &Value) -> Result<Value, String> {
    let canonical = canonicalize(def.ty, value)?;
    match (&def.ty, &canonical) {
        (ColumnType::Many(_), Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check_rules(def, item).map_err(|e| format!("element {i}: {e}"))?;
            }
        }
        _ => check_rules(def, &canonical)?,
    }
    Ok(canonical)
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
            if let Some(pattern) = rules.pattern.as_ref().filter(|p| !p.0.is_match(s)) {
                return Err(format!("does not match the pattern {:?}", pattern.as_str()));
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

/// Checks an item body against `blueprint` (as frozen in `version`) and returns its canonical form.
///
/// `id` is the item's id from the URL; a body `id` must equal it.
pub fn check_item(
    blueprint: &Blueprint,
    version: u32,
    id: Uuid,
    body: &Map<String, Value>,
) -> Result<Map<String, Value>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut item = Map::with_capacity(blueprint.columns.len() + 3);
    item.insert("id".into(), Value::String(id.hyphenated().to_string()));
    item.insert("project_version".into(), Value::from(version));

    match body.get("id") {
        None => {}
        Some(Value::String(raw)) if Uuid::parse_str(raw).is_ok_and(|u| u == id) => {}
        Some(other) => errors.push(FieldError::new(
            "/id",
            format!(
                "{} does not equal the id in the URL ({id})",
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
    item.insert("links".into(), links);

    let mut unknown = 0;
    for key in body.keys() {
        let known =
            ITEM_KEYS.contains(&key.as_str()) || blueprint.columns.contains_key(key.as_str());
        if !known {
            unknown += 1;
            errors.push(FieldError::new(
                format!("/{}", pointer_segment(&excerpt_str(key))),
                "unknown column",
            ));
        }
    }
    if unknown > 0 {
        // The list of known columns is said once, not once per unknown key.
        errors.push(FieldError::new(
            "",
            format!(
                "{unknown} unknown column(s); version {version} of this blueprint has {}",
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
            Some(value) => match check_column_value(def, value) {
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
        item.insert(name.to_string(), value);
    }
    if errors.is_empty() {
        Ok(item)
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
