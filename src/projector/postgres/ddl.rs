//! The PostgreSQL shape of a frozen version: SQL types of docs/design.md §2 and the DDL of a migration.
//!
//! Pure functions of a blueprint, snapshot-tested. Every statement is idempotent (`IF NOT EXISTS`,
//! `COMMENT ON` overwrites), so running the whole list again finishes a half-done migration. Column
//! options live inline in `CREATE TABLE` (versions are frozen, so a table is created once, whole);
//! only indexes and comments are separate statements. Values written into DDL go through
//! [`literal`]; names through [`quote`].

use serde_json::Value;

use super::ident::{derived_name, literal, qualified, quote, NameError};
use super::values::{to_geojson, to_input};
use crate::blueprint::{BaseType, Blueprint, ColumnDef, ColumnType, Ident};

/// Longest `VARCHAR(n)` PostgreSQL accepts; a longer `max_length` stays TEXT.
const MAX_VARCHAR: u64 = 10_485_760;

/// Per schema: the tombstones of deleted items, so a late write never brings one back.
pub const TOMBSTONES: &str = "_tombstones";
/// Per schema: which table holds which blueprint, and its definition, so reads need no catalog.
pub const BLUEPRINTS: &str = "_blueprints";

/// The SQL type of a column, exactly as docs/design.md §2 lists it.
pub fn column_type(def: &ColumnDef) -> String {
    match def.ty {
        ColumnType::One(base) => scalar_type(base, def.validation.max_length),
        ColumnType::Many(base) => array_type(base).to_owned(),
    }
}

fn scalar_type(base: BaseType, max_length: Option<u64>) -> String {
    let name = match base {
        BaseType::Uuid => "UUID",
        BaseType::String => match max_length.filter(|n| (1..=MAX_VARCHAR).contains(n)) {
            Some(n) => return format!("VARCHAR({n})"),
            None => "TEXT",
        },
        BaseType::Text => "TEXT",
        BaseType::Point => "GEOMETRY(Point,4326)",
        BaseType::LineString => "GEOMETRY(LineString,4326)",
        BaseType::Polygon => "GEOMETRY(Polygon,4326)",
        BaseType::Date => "DATE",
        BaseType::DateTime => "TIMESTAMPTZ",
        BaseType::Float => "REAL",
        BaseType::Integer => "INTEGER",
        BaseType::Boolean => "BOOLEAN",
        BaseType::Json => "JSONB",
    };
    name.to_owned()
}

fn array_type(base: BaseType) -> &'static str {
    match base {
        BaseType::Uuid => "UUID[]",
        BaseType::String | BaseType::Text => "TEXT[]",
        BaseType::Point => "GEOMETRY(MultiPoint,4326)",
        BaseType::LineString => "GEOMETRY(MultiLineString,4326)",
        BaseType::Polygon => "GEOMETRY(MultiPolygon,4326)",
        BaseType::Date => "DATE[]",
        BaseType::DateTime => "TIMESTAMPTZ[]",
        BaseType::Float => "REAL[]",
        BaseType::Integer => "INTEGER[]",
        BaseType::Boolean => "BOOLEAN[]",
        BaseType::Json => "JSONB[]",
    }
}

/// The most bytes a row of a PostgreSQL table may take (a heap page holds one row at least).
pub const MAX_ROW_BYTES: usize = 8160;

/// The bytes a row of `blueprint`'s table can take at most once PostgreSQL has moved every value
/// it can out of the row: its header, its null bitmap, every fixed-size column in full and every
/// other (text, arrays, JSON, geometries) as the most a value it moves no further can take (see
/// [`KEPT_WHOLE`]), each aligned.
/// Within [`MAX_ROW_BYTES`], every item fits; past it, [`row_bytes_at_least`] tells an item that
/// cannot.
pub fn row_bytes(blueprint: &Blueprint) -> usize {
    let columns = blueprint
        .columns
        .values()
        .map(|c| fixed_size(c.def.ty).unwrap_or((KEPT_WHOLE, 4)));
    OWN_COLUMNS
        .into_iter()
        .chain(columns)
        .fold(row_header(blueprint), |at, (size, align)| {
            at.next_multiple_of(align) + size
        })
}

/// A value of variable size of at most this many bytes (its header counted) stays in the row as
/// it is: PostgreSQL compresses or moves out of a row only values larger than the pointer it would
/// leave, aligned (`MAXALIGN(TOAST_POINTER_SIZE)`, 24 bytes on 64-bit machines); a larger one leaves
/// at least [`LEAST_MOVED`] bytes.
const KEPT_WHOLE: usize = 24;

/// The fewest bytes a value PostgreSQL compressed or moved out of a row leaves in it (its pointer
/// takes 18).
const LEAST_MOVED: usize = 16;

/// dstore's own columns of every table, as (size, alignment): id, project_version, links,
/// _revision (links may be moved out of the row).
const OWN_COLUMNS: [(usize, usize); 4] = [(16, 1), (4, 4), (KEPT_WHOLE, 4), (8, 8)];

/// A row's header and null bitmap.
fn row_header(blueprint: &Blueprint) -> usize {
    23 + (OWN_COLUMNS.len() + blueprint.columns.len()).div_ceil(8)
}

/// The size and alignment of a column of fixed size; `None` for one of variable size (text,
/// arrays, JSON, geometries), which PostgreSQL may move out of the row.
fn fixed_size(ty: ColumnType) -> Option<(usize, usize)> {
    match ty {
        ColumnType::One(BaseType::Uuid) => Some((16, 1)),
        ColumnType::One(BaseType::DateTime) => Some((8, 8)),
        ColumnType::One(BaseType::Date | BaseType::Float | BaseType::Integer) => Some((4, 4)),
        ColumnType::One(BaseType::Boolean) => Some((1, 1)),
        _ => None,
    }
}

/// The fewest bytes the row of an item of `blueprint` can take, its column values given in the
/// blueprint's order: fixed-size values in full, a text that PostgreSQL keeps whole
/// ([`KEPT_WHOLE`]) as itself and its one-byte header, and any other value as the
/// [`LEAST_MOVED`] bytes PostgreSQL leaves in the row when it moves one out, no alignment counted.
/// Past [`MAX_ROW_BYTES`] PostgreSQL refuses the row for ever ("row is too big"), so the write is
/// refused before any store takes it.
pub fn row_bytes_at_least<'a>(
    blueprint: &Blueprint,
    values: impl Iterator<Item = &'a serde_json::Value>,
) -> usize {
    let own: usize = OWN_COLUMNS
        .iter()
        .map(|&(size, _)| size.min(LEAST_MOVED))
        .sum();
    let columns = blueprint
        .columns
        .values()
        .zip(values)
        .map(|(column, value)| match (fixed_size(column.def.ty), value) {
            (_, serde_json::Value::Null) => 0,
            (Some((size, _)), _) => size,
            (None, serde_json::Value::String(s)) if s.len() < KEPT_WHOLE => s.len() + 1,
            (None, _) => LEAST_MOVED,
        });
    row_header(blueprint) + own + columns.sum::<usize>()
}

/// The least bytes a row of `blueprint` holding `values` (in column order) takes, when that is
/// more than [`MAX_ROW_BYTES`] (PostgreSQL refuses the row for ever); `None` when it fits.
pub fn row_past_limit<'a>(
    blueprint: &Blueprint,
    values: impl Iterator<Item = &'a serde_json::Value>,
) -> Option<usize> {
    if row_bytes(blueprint) <= MAX_ROW_BYTES {
        return None;
    }
    let least = row_bytes_at_least(blueprint, values);
    (least > MAX_ROW_BYTES).then_some(least)
}

/// Whether the column is stored as a PostGIS geometry (scalar or multi).
pub fn is_geometry(ty: ColumnType) -> bool {
    ty.base().is_geometry()
}

/// The index method that serves a column: GiST for geometries, GIN for arrays and JSON.
fn index_method(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::One(BaseType::Point | BaseType::LineString | BaseType::Polygon)
        | ColumnType::Many(BaseType::Point | BaseType::LineString | BaseType::Polygon) => "gist",
        ColumnType::One(BaseType::Json) | ColumnType::Many(_) => "gin",
        ColumnType::One(
            BaseType::Uuid
            | BaseType::String
            | BaseType::Text
            | BaseType::Date
            | BaseType::DateTime
            | BaseType::Float
            | BaseType::Integer
            | BaseType::Boolean,
        ) => "btree",
    }
}

/// The statements that create a version's schema and its bookkeeping tables.
pub fn schema_statements(
    schema: &str,
    project: &Ident,
    version: u32,
    deployment: Option<&str>,
) -> Result<Vec<String>, NameError> {
    let s = quote(schema)?;
    Ok(vec![
        format!("CREATE SCHEMA IF NOT EXISTS {s}"),
        format!(
            "COMMENT ON SCHEMA {s} IS {}",
            literal(&super::ident::schema_comment(project, version, deployment))?
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (table_name TEXT NOT NULL, id UUID NOT NULL, _revision BIGINT NOT NULL, PRIMARY KEY (table_name, id))",
            qualified(schema, TOMBSTONES)?
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (blueprint TEXT PRIMARY KEY, table_name TEXT NOT NULL, definition JSONB NOT NULL)",
            qualified(schema, BLUEPRINTS)?
        ),
    ])
}

/// Every name a blueprint's table takes in its version's schema, with what it names: the table,
/// the index of its primary key and of each unique column (named as PostgreSQL first names them),
/// and dstore's index of each indexed column. Tables and indexes share one namespace there, and
/// `IF NOT EXISTS` skips a statement whose name is taken, so two blueprints of a version must not
/// share any of these names (checked when a blueprint is edited).
pub fn relation_names(blueprint: &Blueprint) -> Vec<(String, String)> {
    let table = blueprint.table.as_str();
    let mut names = vec![
        (table.to_owned(), "its table".to_owned()),
        (
            constraint_name(table, None, "pkey"),
            "its primary key's index".to_owned(),
        ),
    ];
    for (name, column) in &blueprint.columns {
        if column.def.unique {
            names.push((
                constraint_name(table, Some(name.as_str()), "key"),
                format!("the unique index of column {:?}", name.as_str()),
            ));
        }
        if column.def.index {
            names.push((
                derived_name(&[table, name.as_str(), "idx"]),
                format!("the index of column {:?}", name.as_str()),
            ));
        }
    }
    names
}

/// The name PostgreSQL first gives a constraint's index (`makeObjectName`): `table[_column]_label`,
/// the longer of table and column shortened a byte at a time until the whole fits in 63 bytes.
fn constraint_name(table: &str, column: Option<&str>, label: &str) -> String {
    let overhead = label.len() + 1 + usize::from(column.is_some());
    let available = super::ident::MAX_NAME_BYTES - overhead;
    let (mut first, mut second) = (table.len(), column.map_or(0, str::len));
    while first + second > available {
        if first > second {
            first -= 1;
        } else {
            second -= 1;
        }
    }
    match column {
        Some(column) => format!("{}_{}_{label}", &table[..first], &column[..second]),
        None => format!("{}_{label}", &table[..first]),
    }
}

/// The statements that create one blueprint's table, its indexes and its comments.
pub fn table_statements(schema: &str, blueprint: &Blueprint) -> Result<Vec<String>, NameError> {
    let table = qualified(schema, blueprint.table.as_str())?;
    let mut columns = vec![
        "id UUID PRIMARY KEY".to_owned(),
        "project_version INTEGER NOT NULL".to_owned(),
        "links UUID[] NOT NULL DEFAULT '{}'".to_owned(),
        "_revision BIGINT NOT NULL".to_owned(),
    ];
    for (name, column) in &blueprint.columns {
        columns.push(column_definition(name, &column.def)?);
    }
    let mut statements = vec![format!(
        "CREATE TABLE IF NOT EXISTS {table} (\n  {}\n)",
        columns.join(",\n  ")
    )];
    for (name, column) in blueprint.columns.iter().filter(|(_, c)| c.def.index) {
        let index = derived_name(&[blueprint.table.as_str(), name.as_str(), "idx"]);
        statements.push(format!(
            "CREATE INDEX IF NOT EXISTS {} ON {table} USING {} ({})",
            quote(&index)?,
            index_method(column.def.ty),
            quote(name.as_str())?
        ));
    }
    for (name, column) in &blueprint.columns {
        if let Some(comment) = &column.def.comment {
            statements.push(format!(
                "COMMENT ON COLUMN {table}.{} IS {}",
                quote(name.as_str())?,
                literal(comment)?
            ));
        }
    }
    Ok(statements)
}

fn column_definition(name: &Ident, def: &ColumnDef) -> Result<String, NameError> {
    let mut sql = format!("{} {}", quote(name.as_str())?, column_type(def));
    if !def.nullable {
        sql.push_str(" NOT NULL");
    }
    if let Some(default) = def.default.as_ref().filter(|d| !d.is_null()) {
        sql.push_str(" DEFAULT ");
        sql.push_str(&default_expression(def, default)?);
    }
    if def.unique {
        sql.push_str(" UNIQUE");
    }
    Ok(sql)
}

/// A column default as a constant SQL expression of the column's type.
fn default_expression(def: &ColumnDef, default: &Value) -> Result<String, NameError> {
    if is_geometry(def.ty) {
        let geojson = to_geojson(def.ty, default).to_string();
        return Ok(format!(
            "ST_SetSRID(ST_GeomFromGeoJSON({}), 4326)",
            literal(&geojson)?
        ));
    }
    let input = to_input(def.ty, default);
    let ty = column_type(def);
    match (def.ty, &input) {
        (ColumnType::Many(base), Value::Array(items)) if !items.is_empty() => {
            let element = scalar_type(base, None);
            let items = items
                .iter()
                .map(|item| Ok(format!("{}::{element}", literal(&text_of(item))?)))
                .collect::<Result<Vec<_>, NameError>>()?;
            Ok(format!("ARRAY[{}]::{ty}", items.join(", ")))
        }
        (ColumnType::Many(_), _) => Ok(format!("'{{}}'::{ty}")),
        (ColumnType::One(BaseType::Json), value) => {
            Ok(format!("{}::JSONB", literal(&value.to_string())?))
        }
        (ColumnType::One(_), value) => Ok(format!("{}::{ty}", literal(&text_of(value))?)),
    }
}

/// The text PostgreSQL parses a scalar from: strings unquoted, anything else as JSON.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blueprint::parse_blueprint;
    use crate::catalog::Catalog;
    use crate::projector::conformance;
    use serde_json::json;

    /// Constraint index names follow PostgreSQL's `makeObjectName`: the longer part is shortened
    /// first until the name fits in 63 bytes.
    #[test]
    fn constraint_names_are_shortened_as_postgresql_shortens_them() {
        assert_eq!(constraint_name("articles", None, "pkey"), "articles_pkey");
        assert_eq!(
            constraint_name("articles", Some("slug"), "key"),
            "articles_slug_key"
        );
        let long = "t".repeat(63);
        assert_eq!(
            constraint_name(&long, None, "pkey"),
            format!("{}_pkey", "t".repeat(58))
        );
        let name = constraint_name(&long, Some(&"c".repeat(40)), "key");
        assert_eq!(name, format!("{}_{}_key", "t".repeat(29), "c".repeat(29)));
        assert_eq!(name.len(), 63);
    }

    fn frozen(body: Value) -> Blueprint {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        let project = Ident::parse("snap").unwrap();
        let input = parse_blueprint(&body, "").unwrap();
        catalog
            .put_blueprint(&project, &Ident::parse("sample").unwrap(), input)
            .unwrap();
        let version = catalog.freeze(&project, &[], &[], false).unwrap();
        version.blueprints.values().next().unwrap().clone()
    }

    fn options_blueprint() -> Value {
        json!({
            "postgresql": {"table": "places"}, "elasticsearch": {"type": "place"},
            "columns": {
                "name": {"type": "string", "nullable": false, "unique": true, "validation": {"max_length": 80},
                         "comment": "the place's name"},
                "kind": {"type": "string", "default": "it's a shop", "index": true},
                "at": {"type": "point", "index": true, "default": {"type": "Point", "coordinates": [1.5, 2.5]}},
                "opened": {"type": "datetime", "default": "2020-01-02 03:04:05"},
                "tags": {"type": "string[]", "default": ["a", "b"], "index": true},
                "none": {"type": "integer[]", "default": []},
                "meta": {"type": "json", "default": {"k": "v'"}},
                "rating": {"type": "float", "default": 2.5, "nullable": false}
            }
        })
    }

    /// Compares with the stored snapshot; `UPDATE_SNAPSHOTS=1` rewrites it.
    fn assert_snapshot(file: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/projector/postgres/snapshots")
            .join(file);
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            actual,
            expected,
            "DDL differs from {}; rerun with UPDATE_SNAPSHOTS=1 to accept",
            path.display()
        );
    }

    fn ddl(blueprint: &Blueprint) -> String {
        let mut statements =
            schema_statements("snap_v1", &Ident::parse("snap").unwrap(), 1, None).unwrap();
        statements.extend(table_statements("snap_v1", blueprint).unwrap());
        statements.join(";\n") + ";\n"
    }

    #[test]
    fn the_sample_blueprint_becomes_the_type_table_of_design_section_2() {
        assert_snapshot("sample.sql", &ddl(&frozen(conformance::sample_blueprint())));
    }

    #[test]
    fn column_options_become_not_null_defaults_unique_indexes_and_comments() {
        assert_snapshot("options.sql", &ddl(&frozen(options_blueprint())));
    }

    #[test]
    fn every_type_of_the_table_has_its_postgresql_type() {
        let expected = [
            ("uuid", "UUID"),
            ("string", "TEXT"),
            ("text", "TEXT"),
            ("point", "GEOMETRY(Point,4326)"),
            ("linestring", "GEOMETRY(LineString,4326)"),
            ("polygon", "GEOMETRY(Polygon,4326)"),
            ("date", "DATE"),
            ("datetime", "TIMESTAMPTZ"),
            ("float", "REAL"),
            ("integer", "INTEGER"),
            ("boolean", "BOOLEAN"),
            ("json", "JSONB"),
            ("uuid[]", "UUID[]"),
            ("string[]", "TEXT[]"),
            ("text[]", "TEXT[]"),
            ("point[]", "GEOMETRY(MultiPoint,4326)"),
            ("linestring[]", "GEOMETRY(MultiLineString,4326)"),
            ("polygon[]", "GEOMETRY(MultiPolygon,4326)"),
            ("date[]", "DATE[]"),
            ("datetime[]", "TIMESTAMPTZ[]"),
            ("float[]", "REAL[]"),
            ("integer[]", "INTEGER[]"),
            ("boolean[]", "BOOLEAN[]"),
            ("json[]", "JSONB[]"),
        ];
        for (ty, sql) in expected {
            assert_eq!(
                column_type(&ColumnDef::of_type(ty.parse().unwrap())),
                sql,
                "{ty}"
            );
        }
        assert_eq!(ColumnType::all().count(), expected.len());
    }
}
