//! Edits and changes: applying a PUT body to a working copy, and the changes between two snapshots.
//!
//! Columns and blueprints are matched by `uid`, never by name, so renames, swaps and a column removed
//! and created again under the same name are all told apart. [`diff`] works on any two snapshots, in
//! either direction: `diff(a, b)` and `diff(b, a)` are each other's inverse.

use std::collections::HashMap;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ident::Ident;
use super::model::{Blueprint, Blueprints, Column, ColumnDef, Uid};
use super::parse::{BlueprintInput, MAX_DEFAULT_BYTES, MAX_ENUM_VALUES, MAX_PATTERN_BYTES};
use super::FieldError;

/// One recorded change (docs/design.md §1 change kinds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    #[serde(rename = "blueprint.create")]
    BlueprintCreate { blueprint: Ident, definition: Value },
    #[serde(rename = "blueprint.remove")]
    BlueprintRemove { blueprint: Ident, definition: Value },
    #[serde(rename = "blueprint.update")]
    BlueprintUpdate {
        blueprint: Ident,
        option: String,
        from: Value,
        to: Value,
    },
    #[serde(rename = "column.create")]
    ColumnCreate {
        blueprint: Ident,
        column: Ident,
        definition: Value,
    },
    #[serde(rename = "column.update")]
    ColumnUpdate {
        blueprint: Ident,
        column: Ident,
        option: String,
        from: Value,
        to: Value,
    },
    #[serde(rename = "column.rename")]
    ColumnRename {
        blueprint: Ident,
        from: Ident,
        to: Ident,
    },
    #[serde(rename = "column.remove")]
    ColumnRemove {
        blueprint: Ident,
        column: Ident,
        definition: Value,
    },
}

/// Hands out project-wide uids.
pub trait UidSource {
    fn next_uid(&mut self) -> Uid;
}

impl UidSource for Uid {
    fn next_uid(&mut self) -> Uid {
        *self += 1;
        *self
    }
}

/// Applies a client's blueprint body to the current definition (if any), keeping uids of the columns
/// it keeps or renames. `base` prefixes error paths.
pub fn apply_edit(
    current: Option<&Blueprint>,
    input: BlueprintInput,
    uids: &mut impl UidSource,
    base: &str,
) -> Result<Blueprint, Vec<FieldError>> {
    let empty = IndexMap::new();
    let existing = current.map_or(&empty, |bp| &bp.columns);
    // The current column each body entry stands for: its key, or — when the rename was already
    // applied by an earlier, identical request — its target, unless another entry is keyed by
    // that name (`{"a": {"column_id": "b"}, "new": {"column_id": "a"}}` renames `a` and adds a
    // column under its old name; the second entry does not stand for `a` too).
    let keyed = |name: &Ident| input.columns.iter().any(|c| &c.name == name);
    let sources: Vec<Option<&Ident>> = input
        .columns
        .iter()
        .map(|c| {
            existing
                .get_key_value(&c.name)
                .or_else(|| {
                    (!keyed(c.target()))
                        .then(|| existing.get_key_value(c.target()))
                        .flatten()
                })
                .map(|(k, _)| k)
        })
        .collect();
    let renamed_away: Vec<&Ident> = input
        .columns
        .iter()
        .zip(&sources)
        .filter_map(|(c, source)| source.filter(|s| *s != c.target()))
        .collect();
    let mut errors = Vec::new();
    // Two entries standing for one stored column would give two columns its uid, and with it its
    // values in every version.
    for (index, (column, source)) in input.columns.iter().zip(&sources).enumerate() {
        let Some(source) = source else { continue };
        if let Some(first) = input.columns[..index]
            .iter()
            .zip(&sources)
            .find(|(_, other)| *other == &Some(*source))
        {
            errors.push(FieldError::new(
                format!("{base}/columns/{}", column.name),
                format!(
                    "{:?} and {:?} both stand for the stored column {:?} (by name or by \
                     column_id): a stored column is kept or renamed by one entry only",
                    first.0.name.as_str(),
                    column.name.as_str(),
                    source.as_str()
                ),
            ));
        }
    }
    for (column, source) in input.columns.iter().zip(&sources) {
        let stored = source.and_then(|s| existing.get(s)).map(|c| &c.def);
        let at = format!("{base}/columns/{}", column.name);
        check_sizes(&column.def, stored, &at, &mut errors);
        let target = column.target();
        let is_rename = source.is_some_and(|s| s != target);
        // Only a column taking the name now: one stored under it before this rule keeps loading
        // and being edited.
        if *source != Some(target) && SYSTEM_COLUMNS.contains(&target.as_str()) {
            errors.push(FieldError::new(
                at.clone(),
                format!(
                    "{:?} is the name of a PostgreSQL system column, which no table may use \
                     ({}); choose another",
                    target.as_str(),
                    SYSTEM_COLUMNS.join(", ")
                ),
            ));
        }
        if is_rename && existing.contains_key(target) && !renamed_away.contains(&target) {
            errors.push(FieldError::new(
                format!("{base}/columns/{}/column_id", column.name),
                format!(
                    "cannot rename {:?} to {:?}: a column named {:?} already exists",
                    column.name.as_str(),
                    target.as_str(),
                    target.as_str()
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let columns = input
        .columns
        .into_iter()
        .zip(sources)
        .map(|(column, source)| {
            let uid = match source {
                Some(name) => existing[name].uid,
                None => uids.next_uid(),
            };
            (
                column.target().clone(),
                Column {
                    uid,
                    def: column.def,
                },
            )
        })
        .collect();
    Ok(Blueprint {
        uid: current.map_or_else(|| uids.next_uid(), |bp| bp.uid),
        table: input.table,
        es_type: input.es_type,
        columns,
    })
}

/// PostgreSQL's system columns: every table has them, so a column of one of these names cannot be
/// created there (`oid` is one no longer, since PostgreSQL 12).
const SYSTEM_COLUMNS: [&str; 6] = ["tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"];

/// Refuses a `pattern` longer than [`MAX_PATTERN_BYTES`], an `enum` of more than
/// [`MAX_ENUM_VALUES`] values or a `default` of more than [`MAX_DEFAULT_BYTES`], unless the
/// column (`at`) holds the same one already (stored before the limits, it stays as it is).
fn check_sizes(
    def: &ColumnDef,
    stored: Option<&ColumnDef>,
    at: &str,
    errors: &mut Vec<FieldError>,
) {
    let validation = &def.validation;
    let kept = stored.map(|d| &d.validation);
    if let Some(pattern) = &validation.pattern {
        let length = pattern.as_str().len();
        if length > MAX_PATTERN_BYTES && kept.and_then(|v| v.pattern.as_ref()) != Some(pattern) {
            errors.push(FieldError::new(
                format!("{at}/validation/pattern"),
                format!(
                    "is {length} bytes long, longer than the {MAX_PATTERN_BYTES} a pattern may be"
                ),
            ));
        }
    }
    if let Some(values) = &validation.one_of {
        if values.len() > MAX_ENUM_VALUES && kept.and_then(|v| v.one_of.as_ref()) != Some(values) {
            errors.push(FieldError::new(
                format!("{at}/validation/enum"),
                format!(
                    "lists {} values, more than the {MAX_ENUM_VALUES} an enum may",
                    values.len()
                ),
            ));
        }
    }
    if let Some(default) = &def.default {
        let length = default.to_string().len();
        if length > MAX_DEFAULT_BYTES && stored.and_then(|d| d.default.as_ref()) != Some(default) {
            errors.push(FieldError::new(
                format!("{at}/default"),
                format!("is {length} bytes of JSON, more than the {MAX_DEFAULT_BYTES} a default may be (every item that leaves the column out stores it)"),
            ));
        }
    }
}

/// The changes that turn snapshot `from` into snapshot `to`.
pub fn diff(from: &Blueprints, to: &Blueprints) -> Vec<Change> {
    let by_uid = |set: &Blueprints| -> HashMap<Uid, (Ident, Blueprint)> {
        set.iter()
            .map(|(name, bp)| (bp.uid, (name.clone(), bp.clone())))
            .collect()
    };
    let (old, new) = (by_uid(from), by_uid(to));
    let mut changes = Vec::new();
    for (name, bp) in from {
        if !new.contains_key(&bp.uid) {
            changes.push(Change::BlueprintRemove {
                blueprint: name.clone(),
                definition: bp.to_public(),
            });
        }
    }
    for (name, bp) in to {
        match old.get(&bp.uid) {
            None => changes.push(Change::BlueprintCreate {
                blueprint: name.clone(),
                definition: bp.to_public(),
            }),
            Some((_, before)) => diff_blueprint(name, before, bp, &mut changes),
        }
    }
    changes
}

fn diff_blueprint(name: &Ident, before: &Blueprint, after: &Blueprint, changes: &mut Vec<Change>) {
    let update = |option: &str, from: &Ident, to: &Ident| Change::BlueprintUpdate {
        blueprint: name.clone(),
        option: option.into(),
        from: Value::from(from.as_str()),
        to: Value::from(to.as_str()),
    };
    if before.table != after.table {
        changes.push(update("postgresql.table", &before.table, &after.table));
    }
    if before.es_type != after.es_type {
        changes.push(update(
            "elasticsearch.type",
            &before.es_type,
            &after.es_type,
        ));
    }
    for (old_name, column) in &before.columns {
        match after.column_by_uid(column.uid) {
            Some((new_name, _)) if new_name != old_name => changes.push(Change::ColumnRename {
                blueprint: name.clone(),
                from: old_name.clone(),
                to: new_name.clone(),
            }),
            Some(_) => {}
            None => changes.push(Change::ColumnRemove {
                blueprint: name.clone(),
                column: old_name.clone(),
                definition: column.def.to_public(),
            }),
        }
    }
    for (new_name, column) in &after.columns {
        let Some((_, old)) = before.column_by_uid(column.uid) else {
            changes.push(Change::ColumnCreate {
                blueprint: name.clone(),
                column: new_name.clone(),
                definition: column.def.to_public(),
            });
            continue;
        };
        for ((option, from), (_, to)) in old.def.options().into_iter().zip(column.def.options()) {
            if from != to {
                changes.push(Change::ColumnUpdate {
                    blueprint: name.clone(),
                    column: new_name.clone(),
                    option: option.into(),
                    from,
                    to,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::blueprint::model::Pattern;
    use crate::blueprint::parse_blueprint;

    /// A blueprint of table `t` with these columns, as a client sends it.
    fn blueprint(columns: Value) -> BlueprintInput {
        let body = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
            "columns": columns});
        parse_blueprint(&body, "").expect("parses")
    }

    /// A long `pattern` or `enum` is refused when new, and kept when the column holds it already
    /// (stored before the limits).
    #[test]
    fn a_long_pattern_or_enum_is_refused_when_new_and_kept_when_stored() {
        let body = |validation: Value| {
            blueprint(json!({"title": {"type": "string", "validation": validation}}))
        };
        let long = format!("(?x)a{}", " ".repeat(MAX_PATTERN_BYTES));
        let values: Vec<String> = (0..=MAX_ENUM_VALUES).map(|i| format!("v{i}")).collect();
        let mut uid = 0;
        for (validation, at) in [
            (
                json!({"pattern": long}),
                "/columns/title/validation/pattern",
            ),
            (json!({"enum": values}), "/columns/title/validation/enum"),
        ] {
            let refused = apply_edit(None, body(validation.clone()), &mut uid, "").unwrap_err();
            assert_eq!(refused[0].path, at);
            // Stored before the limits: the same value again is an edit like any other.
            let mut stored = apply_edit(None, body(json!({})), &mut uid, "").unwrap();
            let column = &mut stored.columns[0].def.validation;
            match validation.get("pattern") {
                Some(p) => column.pattern = Some(Pattern::compile(p.as_str().unwrap()).unwrap()),
                None => {
                    column.one_of = body(validation.clone()).columns[0]
                        .def
                        .validation
                        .one_of
                        .clone()
                }
            }
            apply_edit(Some(&stored), body(validation), &mut uid, "").expect("kept");
        }
    }

    /// A PostgreSQL system column name is refused for a new column or a rename, and kept by a
    /// column stored under it before the rule.
    #[test]
    fn a_system_column_name_is_refused_when_new_and_kept_when_stored() {
        let body = blueprint;
        let mut uid = 0;
        let refused = apply_edit(
            None,
            body(json!({"xmin": {"type": "integer"}})),
            &mut uid,
            "",
        )
        .unwrap_err();
        assert_eq!(refused[0].path, "/columns/xmin");
        assert!(
            refused[0].message.contains("system column"),
            "{}",
            refused[0].message
        );
        let stored =
            apply_edit(None, body(json!({"a": {"type": "integer"}})), &mut uid, "").unwrap();
        let renamed = body(json!({"a": {"type": "integer", "column_id": "ctid"}}));
        let refused = apply_edit(Some(&stored), renamed, &mut uid, "").unwrap_err();
        assert_eq!(refused[0].path, "/columns/a");
        // Stored before the rule: an edit that keeps its name goes through.
        let mut stored = stored;
        let column = stored.columns.shift_remove("a").unwrap();
        stored.columns.insert(Ident::parse("xmin").unwrap(), column);
        let kept = body(json!({"xmin": {"type": "integer", "nullable": true}}));
        apply_edit(Some(&stored), kept, &mut uid, "").expect("kept");
    }

    /// A default larger than [`MAX_DEFAULT_BYTES`] is refused when new, and kept when stored.
    #[test]
    fn a_large_default_is_refused_when_new_and_kept_when_stored() {
        let body = |default: Value| blueprint(json!({"doc": {"type": "json", "default": default}}));
        let large = json!(vec![1; MAX_DEFAULT_BYTES]);
        let mut uid = 0;
        let refused = apply_edit(None, body(large.clone()), &mut uid, "").unwrap_err();
        assert_eq!(refused[0].path, "/columns/doc/default");
        apply_edit(None, body(json!([1, 2, 3])), &mut uid, "").expect("a small default");
        let mut stored = apply_edit(None, body(json!(null)), &mut uid, "").unwrap();
        stored.columns[0].def.default = Some(large.clone());
        apply_edit(Some(&stored), body(large), &mut uid, "").expect("kept");
    }

    /// Renaming a column and adding a new one under its old name keeps the stored column's uid
    /// (and values) with the renamed one only; the new one gets a uid of its own.
    #[test]
    fn a_column_renamed_and_a_new_one_under_its_old_name_do_not_share_a_uid() {
        let mut uid = 0;
        let stored = apply_edit(
            None,
            blueprint(json!({"a": {"type": "string"}})),
            &mut uid,
            "",
        )
        .unwrap();
        let old = stored.columns["a"].uid;
        for body in [
            json!({"a": {"type": "string", "column_id": "b"},
                   "a_new": {"type": "integer", "column_id": "a"}}),
            json!({"a_new": {"type": "integer", "column_id": "a"},
                   "a": {"type": "string", "column_id": "b"}}),
        ] {
            let edited = apply_edit(Some(&stored), blueprint(body), &mut uid, "").unwrap();
            assert_eq!(edited.columns["b"].uid, old);
            assert_ne!(edited.columns["a"].uid, old);
        }
        // A rename already applied, sent again, still keeps the uid.
        let renamed = apply_edit(
            Some(&stored),
            blueprint(json!({"a": {"type": "string", "column_id": "b"}})),
            &mut uid,
            "",
        )
        .unwrap();
        let again = apply_edit(
            Some(&renamed),
            blueprint(json!({"a": {"type": "string", "column_id": "b"}})),
            &mut uid,
            "",
        )
        .unwrap();
        assert_eq!(again.columns["b"].uid, old);
    }
}
