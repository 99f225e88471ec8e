//! Preparing item writes: from a client's body to journal entries (validate, then transform into
//! every live version; see ARCHITECTURE.md), and reading an item as a version sees it.
//!
//! Everything here reads one catalog snapshot and nothing else, so a prepared entry is consistent with
//! exactly one set of live versions; storage refuses it if that set changed before it was committed
//! (see `Project::epoch`), and the caller prepares it again.

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::blueprint::check::{check_index_entry, check_item};
use crate::blueprint::transform::into_version;
use crate::blueprint::{Blueprint, FieldError, Ident, Uid};
use crate::catalog::{Project, Snapshot};
use crate::document::AsFields;
use crate::journal::task::VersionDoc;
use crate::journal::{Entry, ItemRecord};

use super::WriteError;

fn invalid(path: &str, message: impl Into<String>) -> WriteError {
    WriteError::Invalid(vec![FieldError::new(path, message)])
}

/// Refuses an item whose PostgreSQL row could not fit in a row however PostgreSQL moved its values
/// out ("row is too big"): only a blueprint with many fixed-size columns can make one, and every
/// other store would have taken what PostgreSQL refused for ever.
///
/// `seen_at`: the version whose row it is, when it is not the one the item was written for (the
/// item transformed, with the defaults of columns that version added).
fn check_row<'a>(
    bp: &Blueprint,
    values: impl Iterator<Item = &'a Value>,
    seen_at: Option<u32>,
) -> Result<(), WriteError> {
    use crate::projector::postgres::{row_past_limit, MAX_ROW_BYTES};
    let Some(least) = row_past_limit(bp, values) else {
        return Ok(());
    };
    let which = match seen_at {
        Some(version) => format!("as version {version} sees it (with its defaults), this item"),
        None => "this item".into(),
    };
    Err(invalid(
        "",
        format!("{which} takes at least {least} bytes in a PostgreSQL row, more than the {MAX_ROW_BYTES} a row may: leave more of its columns null"),
    ))
}

/// Refuses a write whose value another live version would index past PostgreSQL's limit (a
/// column that version makes unique or indexes where the written one does not): refused now,
/// naming the column, rather than a dead letter in that version's store.
fn check_index_entries(
    bp: &Blueprint,
    seen: &Map<String, Value>,
    version: u32,
) -> Result<(), WriteError> {
    let errors: Vec<FieldError> = bp
        .columns
        .iter()
        .filter_map(|(name, column)| {
            let value = seen.get(name.as_str()).filter(|v| !v.is_null())?;
            let reason = check_index_entry(&column.def, value).err()?;
            Some(FieldError::new(
                format!("/{name}"),
                format!("as version {version} sees it: {reason}"),
            ))
        })
        .collect();
    match errors.is_empty() {
        true => Ok(()),
        false => Err(WriteError::Invalid(errors)),
    }
}

/// The newest version's definition of a blueprint, for requests that name no version.
fn newest<'a>(project: &'a Project, name: &Ident) -> Result<(u32, &'a Blueprint), WriteError> {
    project
        .versions
        .iter()
        .rev()
        .find_map(|v| v.blueprints.get(name).map(|bp| (v.number, bp)))
        .ok_or_else(|| {
            WriteError::NotFound(format!(
                "blueprint {name:?} is in no frozen version of project {:?}",
                project.name.as_str()
            ))
        })
}

/// Validates an upsert of `id` and transforms it into every live version holding its blueprint.
pub fn prepare_upsert(
    snapshot: &Snapshot,
    project: &Ident,
    blueprint: &Ident,
    id: Uuid,
    body: &impl AsFields,
) -> Result<Entry, WriteError> {
    let p = snapshot
        .projects
        .get(project)
        .ok_or_else(|| WriteError::NotFound(format!("project {project:?} does not exist")))?;
    newest(p, blueprint)?;
    let Some(body) = body.fields() else {
        return Err(invalid("", "an item must be a JSON object"));
    };
    let number = match body.get("project_version") {
        None => {
            return Err(invalid(
                "/project_version",
                "is required: the version of the blueprint this item is written for",
            ))
        }
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                invalid(
                    "/project_version",
                    format!(
                        "{} is not a version number",
                        crate::blueprint::value::excerpt(v)
                    ),
                )
            })?,
    };
    let version = p.version(number).ok_or_else(|| {
        invalid(
            "/project_version",
            format!(
                "version {number} does not exist (latest is {})",
                p.latest().map_or(0, |v| v.number)
            ),
        )
    })?;
    if p.is_retired(number) {
        return Err(invalid(
            "/project_version",
            format!("version {number} is retired and takes no more writes"),
        ));
    }
    let bp = version.blueprints.get(blueprint).ok_or_else(|| {
        invalid(
            "/project_version",
            format!("version {number} has no blueprint {:?}", blueprint.as_str()),
        )
    })?;
    let item = check_item(bp, number, id, body).map_err(WriteError::Invalid)?;
    check_row(bp, item.column_values(), None)?;
    // Each document is serialized here, once: the record and every store take its text. The
    // checked item is looked into by name only to transform it into other versions.
    let holders = p.live_holders(bp.uid);
    let mut own = Some(VersionDoc::canonical(number, &item));
    let others = holders.iter().any(|(w, _)| *w != number);
    let item = others.then(|| item.into_map());
    let mut docs = Vec::with_capacity(holders.len());
    for (w, target) in holders {
        match &item {
            _ if w == number => docs.extend(own.take()),
            Some(item) => {
                let Ok(seen) = into_version(item, bp, target, w) else {
                    docs.push(VersionDoc::absent(w));
                    continue;
                };
                check_row(
                    target,
                    target.columns.keys().map(|c| &seen[c.as_str()]),
                    Some(w),
                )?;
                check_index_entries(target, &seen, w)?;
                docs.push(VersionDoc::new(w, &seen));
            }
            None => {}
        }
    }
    Ok(Entry::upsert(
        project,
        blueprint.clone(),
        bp.uid,
        id,
        number,
        docs,
    ))
}

/// A delete of `id` from every version that holds the blueprint, retired ones included: a deleted
/// item must not stay readable in any store. `stored_uid` is the blueprint uid the stored item
/// was written with, when it exists (only that is needed of it, so a `_bulk` of deletes holds
/// no item bodies).
pub fn prepare_delete(
    snapshot: &Snapshot,
    project: &Ident,
    blueprint: &Ident,
    id: Uuid,
    stored_uid: Option<Uid>,
) -> Result<Entry, WriteError> {
    let p = snapshot
        .projects
        .get(project)
        .ok_or_else(|| WriteError::NotFound(format!("project {project:?} does not exist")))?;
    let uid = match stored_uid {
        Some(uid) => uid,
        None => newest(p, blueprint)?.1.uid,
    };
    let versions = p.holders(uid);
    Ok(Entry::delete(project, blueprint.clone(), id, versions))
}

/// An item as a client of `version` (default: the newest version holding its blueprint) sees it.
pub fn read_at(
    snapshot: &Snapshot,
    project: &Ident,
    blueprint: &Ident,
    record: &ItemRecord,
    version: Option<u32>,
) -> Result<Map<String, Value>, WriteError> {
    let p = snapshot
        .projects
        .get(project)
        .ok_or_else(|| WriteError::NotFound(format!("project {project:?} does not exist")))?;
    let holds = |number: u32| {
        p.version(number).and_then(|v| {
            v.blueprints
                .values()
                .find(|bp| bp.uid == record.blueprint_uid)
        })
    };
    let number = match version {
        Some(n) if p.version(n).is_none() => {
            return Err(WriteError::NotFound(format!(
                "version {n} of project {:?} does not exist",
                project.as_str()
            )))
        }
        Some(n) => n,
        None => p
            .versions
            .iter()
            .rev()
            .map(|v| v.number)
            .find(|n| holds(*n).is_some())
            .unwrap_or(record.version),
    };
    let to = holds(number).ok_or_else(|| {
        WriteError::NotFound(format!(
            "version {number} has no blueprint {:?}",
            blueprint.as_str()
        ))
    })?;
    let from = holds(record.version)
        .ok_or_else(|| WriteError::NotFound("the item's own version is gone".into()))?;
    if number == record.version {
        return Ok(record.body.clone());
    }
    into_version(&record.body, from, to, number)
        .map_err(|column| WriteError::NotFound(absent_reason(number, column, record.version)))
}

/// Why an item written at `written` is not in `version`: it leaves `column` null, which that
/// version allows not (a forced breaking freeze). Its stores hold no copy of it, and its change
/// feed shows it deleted; the version it was written at still has it.
fn absent_reason(version: u32, column: &str, written: u32) -> String {
    format!("the item is not in version {version}: it has no value for {column:?}, which version {version} requires (frozen with force); it was written at version {written}, where ?version={written} reads it, and writing it with a value brings it back")
}
