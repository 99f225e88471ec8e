//! Writing a planned batch (see [`super::plan`]): one statement per table and kind, in the caller's
//! transaction.
//!
//! Upserts go in as one `INSERT … SELECT … FROM unnest($2, $3, …) … ON CONFLICT (id) DO UPDATE …
//! WHERE t._revision < EXCLUDED._revision` per table, one array per column, skipping ids whose
//! tombstone is at least as new; deletes record or raise the tombstone and remove older rows. Each
//! statement runs under a savepoint: when PostgreSQL refuses rows for good, the statement is
//! replayed row by row, each under its own savepoint, so only the refused rows' tasks fail and the
//! rest of the batch is applied. A task whose row is refused in one version keeps what it wrote
//! into the others.
//!
//! A table's upserts of at least [`COPY_MIN_ROWS`] rows are first tried as new rows: the ids without
//! a tombstone go in by one `COPY` (about half of PostgreSQL's work per row of the upsert, which
//! probes for a conflict and a tombstone per row), under its own savepoint. When a row is already
//! there (or PostgreSQL refuses any row, or `COPY` itself), the `COPY` is rolled back whole and
//! every row takes the upsert, in task order, so the outcome is always the upsert's; the table is
//! then not tried again for [`COPY_PAUSE`] batches, so a load of updates rarely pays for a failed
//! attempt. A table with a unique column never takes `COPY`: its rows must meet in task order (the
//! earlier write gets a contested value). Deletes go first, freeing the unique values their items
//! held, and a row refused for a value another row of the batch lets go of later (an item's last
//! write comes after the row that takes its old value) is tried again once the rest are in. The
//! tombstone look-up and the `COPY` are two statements; a tombstone committed between them by
//! another transaction would be missed, which cannot happen while one writer applies a
//! projector's tasks and lanes split the ids (see `plan::split`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::Value;
use sqlx::postgres::PgConnection;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::ddl::{column_type, BLUEPRINTS, TOMBSTONES};
use super::error::{brief, classify, classify_code, detail, sqlstate, Failure};
use super::ident::{qualified, quote, NameError};
use super::plan::{may_share, Delete, Group, Upsert};
use super::values::{is_converted, to_input};
use crate::blueprint::{BaseType, Blueprint, ColumnDef, ColumnType};
use crate::projector::{Outcome, ProjectorError};

/// The columns an upsert sends as text arrays, in the order of its parameters from `$4` on: the two
/// every row has, then the blueprint's.
fn text_columns(blueprint: &Blueprint) -> impl Iterator<Item = (&str, ColumnType)> {
    [
        ("project_version", ColumnType::One(BaseType::Integer)),
        ("links", ColumnType::Many(BaseType::Uuid)),
    ]
    .into_iter()
    .chain(
        blueprint
            .columns
            .iter()
            .map(|(name, column)| (name.as_str(), column.def.ty)),
    )
}

/// The upsert statement of a blueprint's table. `$1` is the table name, `$2` the ids and `$3` the
/// revisions; then comes one array per [`text_columns`] entry, each value as the text PostgreSQL
/// reads with the column type's own input function (as `COPY` does).
pub fn upsert_sql(schema: &str, blueprint: &Blueprint) -> Result<String, NameError> {
    let mut arrays = vec!["$2::uuid[]".to_owned(), "$3::bigint[]".into()];
    let mut targets = vec!["id".to_owned(), "_revision".into()];
    let mut sources = vec!["i.id".to_owned(), "i._revision".into()];
    for (n, (name, ty)) in text_columns(blueprint).enumerate() {
        let q = quote(name)?;
        arrays.push(format!("${}::text[]", n + 4));
        let value = format!("i.{q}{}", input_cast(ty));
        // A row without links gets the column's empty array, not NULL.
        sources.push(if name == "links" {
            format!("COALESCE({value}, '{{}}')")
        } else {
            value
        });
        targets.push(q);
    }
    let updates: Vec<String> = targets[1..]
        .iter()
        .map(|t| format!("{t} = EXCLUDED.{t}"))
        .collect();
    Ok(format!(
        "WITH i AS (SELECT * FROM unnest({arrays}) AS r({targets})) \
         INSERT INTO {table} AS t ({targets}) \
         SELECT {sources} FROM i \
         WHERE NOT EXISTS (SELECT 1 FROM {tombstones} d WHERE d.table_name = $1 AND d.id = i.id AND d._revision >= i._revision) \
         ON CONFLICT (id) DO UPDATE SET {updates} WHERE t._revision < EXCLUDED._revision",
        arrays = arrays.join(", "),
        table = qualified(schema, blueprint.table.as_str())?,
        targets = targets.join(", "),
        sources = sources.join(", "),
        tombstones = qualified(schema, TOMBSTONES)?,
        updates = updates.join(", "),
    ))
}

/// The `COPY` of new rows into a blueprint's table, in the text format: the columns of
/// [`upsert_sql`] in its order, each value its type's input text (see [`copy_data`]).
pub fn copy_sql(schema: &str, blueprint: &Blueprint) -> Result<String, NameError> {
    let mut targets = vec!["id".to_owned(), "_revision".into()];
    for (name, _) in text_columns(blueprint) {
        targets.push(quote(name)?);
    }
    Ok(format!(
        "COPY {} ({}) FROM STDIN",
        qualified(schema, blueprint.table.as_str())?,
        targets.join(", ")
    ))
}

/// The ids among `$2` with a tombstone in the table `$1`; the tombstones are only looked at when
/// the table has any (a one-time filter), which a table that only ever took writes never has.
fn tombstoned_sql(schema: &str) -> Result<String, NameError> {
    let tombstones = qualified(schema, TOMBSTONES)?;
    Ok(format!(
        "SELECT d.id FROM {tombstones} d \
         WHERE EXISTS (SELECT 1 FROM {tombstones} e WHERE e.table_name = $1) \
         AND d.table_name = $1 AND d.id = ANY($2::uuid[])"
    ))
}

/// How a column's text becomes its value: a cast to the column's type, except for strings, which
/// the insert's own assignment checks (a cast to `VARCHAR(n)` would cut an over-long one short).
fn input_cast(ty: ColumnType) -> String {
    match ty {
        ColumnType::One(BaseType::String | BaseType::Text) => String::new(),
        _ => format!("::{}", column_type(&ColumnDef::of_type(ty))),
    }
}

/// The delete statement: `$1` ids, `$2` revisions, `$3` the table name.
pub fn delete_sql(schema: &str, blueprint: &Blueprint) -> Result<String, NameError> {
    Ok(format!(
        "WITH i AS (SELECT * FROM UNNEST($1::uuid[], $2::bigint[]) AS r(id, _revision)), \
         tomb AS (INSERT INTO {tombstones} AS d (table_name, id, _revision) SELECT $3, id, _revision FROM i \
                  ON CONFLICT (table_name, id) DO UPDATE SET _revision = EXCLUDED._revision \
                  WHERE d._revision < EXCLUDED._revision) \
         DELETE FROM {table} AS t USING i WHERE t.id = i.id AND t._revision < i._revision",
        tombstones = qualified(schema, TOMBSTONES)?,
        table = qualified(schema, blueprint.table.as_str())?,
    ))
}

/// The statement that records which table holds a blueprint (part of a migration).
pub fn register_sql(schema: &str) -> Result<String, NameError> {
    Ok(format!(
        "INSERT INTO {} (blueprint, table_name, definition) VALUES ($1, $2, $3) \
         ON CONFLICT (blueprint) DO UPDATE SET table_name = EXCLUDED.table_name, definition = EXCLUDED.definition",
        qualified(schema, BLUEPRINTS)?
    ))
}

/// A column's value as the text PostgreSQL's input function for its type reads; `None` is NULL.
/// Strings lose their JSON escapes, JSON columns keep their JSON text, arrays become array literals;
/// geometries and datetimes are converted first (see `values`).
fn column_text(ty: ColumnType, text: &str) -> Result<Option<String>, serde_json::Error> {
    Ok(match column_input(ty, text)? {
        Input::Null => None,
        Input::Text(text, suffix) => Some([text, suffix].concat()),
        Input::Owned(text) => Some(text),
    })
}

/// A column's input text: most of the time a part of its JSON text as it is, then followed by a
/// fixed suffix, so a row's `COPY` text is written without a string per column.
enum Input<'a> {
    Null,
    Text(&'a str, &'static str),
    Owned(String),
}

/// [`column_text`], borrowing the JSON text where it can.
fn column_input(ty: ColumnType, text: &str) -> Result<Input<'_>, serde_json::Error> {
    let value: Value = match ty {
        _ if text == "null" => return Ok(Input::Null),
        ColumnType::One(BaseType::Json) => return Ok(Input::Text(text, "")),
        // Every item has `links`, most of them none; and a datetime without escapes is its text
        // with the zone: neither needs decoding (a third of the cost of a row's `COPY` text). An
        // empty array of geometries is still converted: it is an empty Multi geometry.
        ColumnType::Many(_) if text == "[]" && !is_converted(ty) => {
            return Ok(Input::Text("{}", ""))
        }
        ColumnType::One(BaseType::DateTime) if !text.contains('\\') => {
            if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                return Ok(Input::Text(inner, "+00"));
            }
            serde_json::from_str(text)?
        }
        // A number or a boolean is its input text; a string without escapes is its JSON text
        // between the quotes.
        ColumnType::One(_) if !is_converted(ty) => {
            match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                None => return Ok(Input::Text(text, "")),
                Some(inner) if !inner.contains('\\') => return Ok(Input::Text(inner, "")),
                Some(_) => serde_json::from_str(text)?,
            }
        }
        _ => serde_json::from_str(text)?,
    };
    let value = if is_converted(ty) {
        to_input(ty, &value)
    } else {
        value
    };
    Ok(match value {
        Value::Null => Input::Null,
        Value::Array(items) => Input::Owned(array_literal(ty.base(), &items)),
        Value::String(s) => Input::Owned(s),
        other => Input::Owned(other.to_string()),
    })
}

/// A one-dimensional PostgreSQL array literal: every element quoted, `"` and `\` escaped.
fn array_literal(base: BaseType, items: &[Value]) -> String {
    let mut out = String::from("{");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let element: Cow<'_, str> = match item {
            Value::Null => {
                out.push_str("NULL");
                continue;
            }
            Value::String(s) if base != BaseType::Json => Cow::Borrowed(s),
            other => Cow::Owned(other.to_string()),
        };
        out.push('"');
        for c in element.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// `rows` in `COPY`'s text format: a line per row, values separated by tabs, `\N` for NULL, and
/// backslash, tab, newline and carriage return escaped with a backslash.
fn copy_data(blueprint: &Blueprint, rows: &[&Upsert<'_>]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(rows.len() * 128);
    let mut uuid = [0u8; 36];
    for row in rows {
        out.extend_from_slice(row.id.hyphenated().encode_lower(&mut uuid).as_bytes());
        out.push(b'\t');
        out.extend_from_slice(itoa::Buffer::new().format(row.revision).as_bytes());
        for (name, ty) in text_columns(blueprint) {
            out.push(b'\t');
            let input = match row.fields.get(name) {
                Some(raw) => column_input(ty, raw)?,
                None => Input::Null,
            };
            match input {
                Input::Text(text, suffix) => {
                    copy_escape(&mut out, text.as_bytes());
                    out.extend_from_slice(suffix.as_bytes());
                }
                Input::Owned(text) => copy_escape(&mut out, text.as_bytes()),
                // As the upsert does: a row without links gets the empty array.
                Input::Null if name == "links" => out.extend_from_slice(b"{}"),
                Input::Null => out.extend_from_slice(b"\\N"),
            }
        }
        out.push(b'\n');
    }
    Ok(out)
}

fn copy_escape(out: &mut Vec<u8>, text: &[u8]) {
    let special = |byte: &u8| matches!(byte, b'\\' | b'\t' | b'\n' | b'\r');
    if !text.iter().any(special) {
        out.extend_from_slice(text);
        return;
    }
    for &byte in text {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(byte),
        }
    }
}

/// Fewest upserts into one table that are tried as a `COPY` of new rows: below it, the two more
/// round trips (the tombstones, the `COPY`'s start) cost more than `COPY` saves.
pub const COPY_MIN_ROWS: usize = 200;
/// Batches of a table that skip the `COPY` after one met a row that was already there.
const COPY_PAUSE: u32 = 16;
/// Most tables remembered as paused; past it the memory starts over.
const COPY_PAUSED_TABLES: usize = 10_000;

/// The tables whose last `COPY` of new rows failed, with the batches each still skips (the lanes
/// of one batch count one each), and how many rows were sent by a `COPY` that succeeded (in a
/// transaction that may still have failed and been retried).
#[derive(Default)]
pub struct CopyPauses {
    paused: Mutex<HashMap<String, u32>>,
    pub rows: AtomicU64,
}

impl CopyPauses {
    /// Whether a batch of `table` should try `COPY`; a paused table counts the batch.
    fn try_copy(&self, table: &str) -> bool {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        match paused.get_mut(table) {
            Some(left) if *left > 0 => {
                *left -= 1;
                false
            }
            Some(_) => {
                paused.remove(table);
                true
            }
            None => true,
        }
    }

    fn pause(&self, table: &str) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused.len() >= COPY_PAUSED_TABLES {
            paused.clear();
        }
        paused.insert(table.to_owned(), COPY_PAUSE);
    }
}

/// A failure of the batch as a whole (not of single rows): the transaction must be abandoned.
pub struct Abort {
    pub what: String,
    pub error: sqlx::Error,
}

/// PostgreSQL's SQLSTATE for a value a unique index holds already.
const UNIQUE_VIOLATION: &str = "23505";

/// Writes one group inside the caller's transaction, recording refused rows in `outcomes`.
pub async fn apply_group(
    conn: &mut PgConnection,
    group: &Group<'_>,
    pauses: &CopyPauses,
    outcomes: &mut [Outcome],
) -> Result<(), Abort> {
    let table = group.blueprint.table.as_str();
    let place = format!("{}.{table}", group.schema);
    let abort = |what: &str| aborted(what, &place);
    let name_error = |e: NameError| named(e, &place);
    // Deletes first: the plan keeps one operation per item, so they touch no row an upsert
    // writes, and a unique value a deleted item held is free for the item that takes it next.
    if !group.deletes.is_empty() {
        let sql = delete_sql(&group.schema, group.blueprint).map_err(name_error)?;
        let all: Vec<&Delete> = group.deletes.iter().collect();
        if guarded(conn, delete_query(&sql, table, &all))
            .await
            .map_err(abort("delete from"))?
            .is_err()
        {
            for delete in &group.deletes {
                if let Err(error) = guarded(conn, delete_query(&sql, table, &[delete]))
                    .await
                    .map_err(abort("delete from"))?
                {
                    refuse(outcomes, delete.task, &place, delete.id, &error);
                }
            }
        }
    }
    let upserts =
        if group.upserts.len() >= COPY_MIN_ROWS && may_share(group) && pauses.try_copy(&place) {
            copy_new_rows(conn, group, &place, pauses).await?
        } else {
            group.upserts.iter().collect()
        };
    if !upserts.is_empty() {
        let sql = upsert_sql(&group.schema, group.blueprint).map_err(name_error)?;
        let batch =
            upsert_query(&sql, group.blueprint, &upserts).map_err(abort("encode rows for"))?;
        if let Err(error) = guarded(conn, batch).await.map_err(abort("upsert into"))? {
            tracing::warn!(table = %place, error = %brief(&error), "postgresql refused rows; applying them one by one");
            // A row that meets a unique value another row of the batch lets go of later (an item
            // that changes its value after this one took it, as the plan keeps each item's last
            // write) is tried again, once, after the others.
            let mut rows = upserts;
            for last in [false, true] {
                let mut again = Vec::new();
                for upsert in rows {
                    let one = upsert_query(&sql, group.blueprint, &[upsert])
                        .map_err(abort("encode a row for"))?;
                    if let Err(error) = guarded(conn, one).await.map_err(abort("upsert into"))? {
                        if !last && sqlstate(&error).as_deref() == Some(UNIQUE_VIOLATION) {
                            again.push(upsert);
                        } else {
                            refuse(outcomes, upsert.task, &place, upsert.id, &error);
                        }
                    }
                }
                rows = again;
            }
        }
    }
    Ok(())
}

/// What makes a failed statement into `place`'s [`Abort`].
fn aborted(what: &str, place: &str) -> impl FnOnce(sqlx::Error) -> Abort {
    let what = format!("{what} {place}");
    move |error| Abort { what, error }
}

fn named(error: NameError, place: &str) -> Abort {
    Abort {
        what: place.to_owned(),
        error: sqlx::Error::Protocol(error.to_string()),
    }
}

/// Writes the group's rows whose ids have no tombstone by one `COPY`; answers the rows the upsert
/// still has to write: those with a tombstone, or, when the `COPY` was refused and rolled back,
/// all of them in task order (and the table pauses `COPY`).
async fn copy_new_rows<'g, 'a>(
    conn: &mut PgConnection,
    group: &'g Group<'a>,
    place: &str,
    pauses: &CopyPauses,
) -> Result<Vec<&'g Upsert<'a>>, Abort> {
    let sql = tombstoned_sql(&group.schema).map_err(|e| named(e, place))?;
    let ids: Vec<Uuid> = group.upserts.iter().map(|row| row.id).collect();
    let tombstoned: HashSet<Uuid> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(group.blueprint.table.as_str())
        .bind(ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(aborted("read the tombstones of", place))?
        .into_iter()
        .collect();
    let (new, guarded_rows): (Vec<_>, Vec<_>) = group
        .upserts
        .iter()
        .partition(|row| !tombstoned.contains(&row.id));
    if new.is_empty() {
        return Ok(guarded_rows);
    }
    let sql = copy_sql(&group.schema, group.blueprint).map_err(|e| named(e, place))?;
    let data = copy_data(group.blueprint, &new)
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))
        .map_err(aborted("encode rows for", place))?;
    match copied(conn, &sql, data)
        .await
        .map_err(aborted("copy into", place))?
    {
        Ok(()) => {
            pauses.rows.fetch_add(new.len() as u64, Ordering::Relaxed);
            Ok(guarded_rows)
        }
        Err(error) => {
            tracing::debug!(table = %place, error = %brief(&error), "not all rows are new; upserting them");
            pauses.pause(place);
            Ok(group.upserts.iter().collect())
        }
    }
}

type PgQuery = sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn upsert_query(
    sql: &str,
    blueprint: &Blueprint,
    rows: &[&Upsert<'_>],
) -> Result<PgQuery, sqlx::Error> {
    // Column by column, as arrays: PostgreSQL reads each value with its type's input function,
    // without parsing a JSON document per row.
    let encode = |e: serde_json::Error| sqlx::Error::Encode(Box::new(e));
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let revisions: Vec<i64> = rows.iter().map(|row| row.revision).collect();
    let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()))
        .bind(blueprint.table.to_string())
        .bind(ids)
        .bind(revisions);
    for (name, ty) in text_columns(blueprint) {
        let texts = rows
            .iter()
            .map(|row| match row.fields.get(name) {
                Some(raw) => column_text(ty, raw),
                None => Ok(None),
            })
            .collect::<Result<Vec<Option<String>>, _>>()
            .map_err(encode)?;
        query = query.bind(texts);
    }
    Ok(query)
}

fn delete_query(sql: &str, table: &str, rows: &[&Delete]) -> PgQuery {
    let ids: Vec<Uuid> = rows.iter().map(|d| d.id).collect();
    let revisions: Vec<i64> = rows.iter().map(|d| d.revision).collect();
    sqlx::query(AssertSqlSafe(sql.to_owned()))
        .bind(ids)
        .bind(revisions)
        .bind(table.to_owned())
}

fn refuse(outcomes: &mut [Outcome], task: usize, place: &str, id: Uuid, error: &sqlx::Error) {
    if outcomes[task].is_ok() {
        outcomes[task] = Err(ProjectorError::permanent(format!(
            "postgresql refused {place} row {id}: {}",
            brief(error)
        ))
        .with_detail(detail(error)));
    }
}

/// Sends `data` by the `COPY` statement `sql` under a savepoint, as [`guarded`] runs a query.
async fn copied(
    conn: &mut PgConnection,
    sql: &str,
    data: Vec<u8>,
) -> Result<Result<(), sqlx::Error>, sqlx::Error> {
    sqlx::raw_sql("SAVEPOINT dstore_rows")
        .execute(&mut *conn)
        .await?;
    let result = async {
        let mut copy = conn.copy_in_raw(sql).await?;
        copy.send(data).await?;
        copy.finish().await
    }
    .await;
    settle_savepoint(conn, result, copy_refused).await
}

/// Whether PostgreSQL refused a `COPY`'s rows, or the `COPY` as a statement (feature not
/// supported, a privilege, a syntax it does not take), which the upsert may still write; not the
/// connection's failures, nor a missing table (the version must then be migrated again).
fn copy_refused(error: &sqlx::Error) -> bool {
    rows_refused(error)
        || sqlstate(error).is_some_and(|code| {
            code == "0A000" || (code.starts_with("42") && classify_code(&code) != Failure::Missing)
        })
}

/// Whether PostgreSQL refused a statement's rows for good.
fn rows_refused(error: &sqlx::Error) -> bool {
    classify(error) == Failure::Row
}

/// Runs `query` under a savepoint. `Ok(Err(_))`: PostgreSQL refused the rows for good and the
/// savepoint was rolled back, so the transaction goes on; `Err(_)`: the batch must be retried.
async fn guarded(
    conn: &mut PgConnection,
    query: PgQuery,
) -> Result<Result<(), sqlx::Error>, sqlx::Error> {
    sqlx::raw_sql("SAVEPOINT dstore_rows")
        .execute(&mut *conn)
        .await?;
    let result = query.execute(&mut *conn).await;
    settle_savepoint(conn, result, rows_refused).await
}

/// Releases the savepoint after a statement that succeeded, rolls back to it after one that
/// `refused` says PostgreSQL refused for good (`Ok(Err(_))`), and answers any other failure as the
/// batch's (`Err(_)`).
async fn settle_savepoint<T>(
    conn: &mut PgConnection,
    result: Result<T, sqlx::Error>,
    refused: fn(&sqlx::Error) -> bool,
) -> Result<Result<(), sqlx::Error>, sqlx::Error> {
    match result {
        Ok(_) => {
            sqlx::raw_sql("RELEASE SAVEPOINT dstore_rows")
                .execute(&mut *conn)
                .await?;
            Ok(Ok(()))
        }
        Err(error) if refused(&error) => {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT dstore_rows")
                .execute(&mut *conn)
                .await?;
            Ok(Err(error))
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn text(ty: ColumnType, value: serde_json::Value) -> Option<String> {
        column_text(ty, &value.to_string()).unwrap()
    }

    #[test]
    fn copy_text_escapes_backslashes_tabs_and_line_ends_only() {
        for (text, expected) in [
            ("plain ✓", "plain ✓"),
            ("a\\b\tc\nd\re", "a\\\\b\\tc\\nd\\re"),
            ("", ""),
            ("\\N", "\\\\N"),
        ] {
            let mut out = b"x".to_vec();
            copy_escape(&mut out, text.as_bytes());
            assert_eq!(out, format!("x{expected}").into_bytes(), "{text:?}");
        }
    }

    #[test]
    fn strings_read_between_their_quotes_lose_every_escape() {
        let string = ColumnType::One(BaseType::String);
        for (json, expected) in [
            (r#""plain""#, "plain"),
            (r#""""#, ""),
            ("\"naïve ✓ 𝄞\"", "naïve ✓ 𝄞"),
            (r#""caf\u00e9 \"x\" \\""#, "café \"x\" \\"),
            (r#""\ud834\udd1e""#, "𝄞"),
        ] {
            assert_eq!(
                column_text(string, json).unwrap().as_deref(),
                Some(expected),
                "{json}"
            );
        }
    }

    #[test]
    fn scalars_are_their_input_text_and_json_keeps_its_quotes() {
        let one = ColumnType::One;
        assert_eq!(
            text(one(BaseType::String), json!("a \"b\" \\ c")).as_deref(),
            Some("a \"b\" \\ c")
        );
        assert_eq!(
            text(one(BaseType::Integer), json!(-42)).as_deref(),
            Some("-42")
        );
        assert_eq!(
            text(one(BaseType::Float), json!(1.5e-3)).as_deref(),
            Some("0.0015")
        );
        assert_eq!(
            text(one(BaseType::Boolean), json!(true)).as_deref(),
            Some("true")
        );
        assert_eq!(
            text(one(BaseType::Json), json!("s")).as_deref(),
            Some("\"s\"")
        );
        assert_eq!(
            text(one(BaseType::Json), json!({"a": [1]})).as_deref(),
            Some("{\"a\":[1]}")
        );
        assert_eq!(
            text(one(BaseType::DateTime), json!("2021-03-04 05:06:07")).as_deref(),
            Some("2021-03-04 05:06:07+00")
        );
        // Read without decoding, or decoded: the same input text.
        let datetime = ColumnType::One(BaseType::DateTime);
        for (json, expected) in [
            (
                r#""2021-03-04 05:06:07.000120""#,
                "2021-03-04 05:06:07.000120+00",
            ),
            (r#""2021-03-04 05:06:07 ""#, "2021-03-04 05:06:07 +00"),
        ] {
            let got = column_text(datetime, json).unwrap();
            assert_eq!(got.as_deref(), Some(expected), "{json}");
        }
        assert_eq!(text(one(BaseType::String), json!(null)), None);
    }

    #[test]
    fn arrays_are_literals_with_every_element_quoted_and_escaped() {
        let many = ColumnType::Many;
        assert_eq!(
            text(
                many(BaseType::String),
                json!(["", "NULL", "a,b", "{x}", "\"q\"", "b\\s"])
            )
            .as_deref(),
            Some(r#"{"","NULL","a,b","{x}","\"q\"","b\\s"}"#)
        );
        assert_eq!(
            text(many(BaseType::Integer), json!([1, null])).as_deref(),
            Some(r#"{"1",NULL}"#)
        );
        assert_eq!(
            text(many(BaseType::Json), json!([{"k": "v"}, "s"])).as_deref(),
            Some(r#"{"{\"k\":\"v\"}","\"s\""}"#)
        );
        assert_eq!(text(many(BaseType::Uuid), json!([])).as_deref(), Some("{}"));
        assert_ne!(
            text(many(BaseType::Point), json!([])).as_deref(),
            Some("{}")
        );
    }
}
