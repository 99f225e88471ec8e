//! Writing a planned batch (see [`super::plan`]): one statement per table and kind, in the caller's
//! transaction.
//!
//! Upserts go in as one `INSERT … SELECT … FROM json_to_recordset($1) … ON CONFLICT (id) DO UPDATE
//! … WHERE t._revision < EXCLUDED._revision` per table, skipping ids whose tombstone is at least as
//! new; deletes record or raise the tombstone and remove older rows. Each statement runs under a
//! savepoint: when PostgreSQL refuses rows for good, the statement is replayed row by row, each under
//! its own savepoint, so only the refused rows' tasks fail and the rest of the batch is applied. A
//! task whose row is refused in one version keeps what it wrote into the others.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;
use sqlx::postgres::PgConnection;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::ddl::{column_type, BLUEPRINTS, TOMBSTONES};
use super::error::{classify, describe, Failure};
use super::ident::{qualified, quote, NameError};
use super::plan::{Delete, Group, Upsert};
use super::values::{is_converted, to_input};
use crate::blueprint::Blueprint;
use crate::projector::{Outcome, ProjectorError};

/// The upsert statement of a blueprint's table; `$1` is a JSON array of rows (as text), `$2` the
/// table name.
pub fn upsert_sql(schema: &str, blueprint: &Blueprint) -> Result<String, NameError> {
    let mut record = vec![
        "id UUID".to_owned(),
        "project_version INTEGER".into(),
        "links UUID[]".into(),
        "_revision BIGINT".into(),
    ];
    let mut targets = vec![
        "id".to_owned(),
        "project_version".into(),
        "links".into(),
        "_revision".into(),
    ];
    let mut sources = vec![
        "i.id".to_owned(),
        "i.project_version".into(),
        "COALESCE(i.links, '{}')".into(),
        "i._revision".into(),
    ];
    for (name, column) in &blueprint.columns {
        let q = quote(name.as_str())?;
        record.push(format!("{q} {}", column_type(&column.def)));
        sources.push(format!("i.{q}"));
        targets.push(q);
    }
    let updates: Vec<String> = targets[1..]
        .iter()
        .map(|t| format!("{t} = EXCLUDED.{t}"))
        .collect();
    Ok(format!(
        "WITH i AS (SELECT * FROM json_to_recordset($1::text::json) AS r({record})) \
         INSERT INTO {table} AS t ({targets}) \
         SELECT {sources} FROM i \
         WHERE NOT EXISTS (SELECT 1 FROM {tombstones} d WHERE d.table_name = $2 AND d.id = i.id AND d._revision >= i._revision) \
         ON CONFLICT (id) DO UPDATE SET {updates} WHERE t._revision < EXCLUDED._revision",
        record = record.join(", "),
        table = qualified(schema, blueprint.table.as_str())?,
        targets = targets.join(", "),
        sources = sources.join(", "),
        tombstones = qualified(schema, TOMBSTONES)?,
        updates = updates.join(", "),
    ))
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

/// The row a write sends for one document: the item keys, the revision and every column. Serialized
/// straight from the journal's document; only geometries and datetimes are converted.
struct Row<'a> {
    blueprint: &'a Blueprint,
    upsert: &'a Upsert<'a>,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = &self.upsert.fields;
        let get = |key: &str| fields.get(key).copied();
        let mut row = serializer.serialize_map(Some(self.blueprint.columns.len() + 4))?;
        row.serialize_entry("id", &self.upsert.id)?;
        row.serialize_entry("project_version", &get("project_version"))?;
        row.serialize_entry("links", &get("links"))?;
        row.serialize_entry("_revision", &self.upsert.revision)?;
        for (name, column) in &self.blueprint.columns {
            let value = get(name.as_str());
            match value {
                Some(text) if is_converted(column.def.ty) => {
                    let value: Value =
                        serde_json::from_str(text.get()).map_err(serde::ser::Error::custom)?;
                    row.serialize_entry(name.as_str(), &to_input(column.def.ty, &value))?;
                }
                _ => row.serialize_entry(name.as_str(), &value)?,
            }
        }
        row.end()
    }
}

/// A failure of the batch as a whole (not of single rows): the transaction must be abandoned.
pub struct Abort {
    pub what: String,
    pub error: sqlx::Error,
}

/// Writes one group inside the caller's transaction, recording refused rows in `outcomes`.
pub async fn apply_group(
    conn: &mut PgConnection,
    group: &Group<'_>,
    outcomes: &mut [Outcome],
) -> Result<(), Abort> {
    let table = group.blueprint.table.as_str();
    let place = format!("{}.{table}", group.schema);
    let abort = |what: &str| {
        let what = format!("{what} {place}");
        move |error: sqlx::Error| Abort { what, error }
    };
    let name_error = |e: NameError| Abort {
        what: place.clone(),
        error: sqlx::Error::Protocol(e.to_string()),
    };
    if !group.upserts.is_empty() {
        let sql = upsert_sql(&group.schema, group.blueprint).map_err(name_error)?;
        let all: Vec<&Upsert<'_>> = group.upserts.iter().collect();
        let batch = upsert_query(&sql, group.blueprint, &all).map_err(abort("encode rows for"))?;
        if let Err(error) = guarded(conn, batch).await.map_err(abort("upsert into"))? {
            tracing::warn!(table = %place, error = %describe(&error), "postgresql refused rows; applying them one by one");
            for upsert in &group.upserts {
                let one = upsert_query(&sql, group.blueprint, &[upsert])
                    .map_err(abort("encode a row for"))?;
                if let Err(error) = guarded(conn, one).await.map_err(abort("upsert into"))? {
                    refuse(outcomes, upsert.task, &place, upsert.id, &error);
                }
            }
        }
    }
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
    Ok(())
}

type PgQuery = sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn upsert_query(
    sql: &str,
    blueprint: &Blueprint,
    rows: &[&Upsert<'_>],
) -> Result<PgQuery, sqlx::Error> {
    // Sent as text and read with json_to_recordset: one parse on the server, no jsonb conversion.
    let rows: Vec<Row<'_>> = rows
        .iter()
        .map(|upsert| Row { blueprint, upsert })
        .collect();
    let json = serde_json::to_string(&rows).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    Ok(sqlx::query(AssertSqlSafe(sql.to_owned()))
        .bind(json)
        .bind(blueprint.table.to_string()))
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
            describe(error)
        )));
    }
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
    match query.execute(&mut *conn).await {
        Ok(_) => {
            sqlx::raw_sql("RELEASE SAVEPOINT dstore_rows")
                .execute(&mut *conn)
                .await?;
            Ok(Ok(()))
        }
        Err(error) if classify(&error) == Failure::Row => {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT dstore_rows")
                .execute(&mut *conn)
                .await?;
            Ok(Err(error))
        }
        Err(error) => Err(error),
    }
}
