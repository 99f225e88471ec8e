//! The PostgreSQL/PostGIS projector against a real server: each test in its own fresh database.
//!
//! The server comes from `DSTORE_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432`,
//! without a database); `scripts/test.sh` installs and starts one with PostGIS. A missing server fails
//! the tests with a message saying so: they never skip silently.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstore::blueprint::Ident;
use dstore::catalog::Catalog;
use dstore::config::PostgresSettings;
use dstore::journal::task::{Task, TaskOp, VersionDoc};
use dstore::projector::postgres::ident::quote;
use dstore::projector::postgres::PostgresProjector;
use dstore::projector::{conformance, ErrorKind, Projector};
use serde_json::{json, Value};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use uuid::Uuid;

use crate::helpers::{spawn_app_with, Answer, TestApp};
use crate::kitchensink::{blueprint_v1, blueprint_v2, item_v1, item_v2, sample};

pub(crate) fn server_url() -> String {
    std::env::var("DSTORE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
        .trim_end_matches('/')
        .to_owned()
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach the test postgresql server at {url}: {e}\n\
             start one with PostGIS (scripts/test.sh does) or point DSTORE_TEST_POSTGRES_URL at one"
        )
    })
}

/// A database of its own for one test, dropped by [`TestDatabase::drop`].
pub(crate) struct TestDatabase {
    pub(crate) name: String,
}

impl TestDatabase {
    fn unique_name() -> String {
        format!("dstore_test_{}", Uuid::new_v4().simple())
    }

    pub(crate) async fn create() -> TestDatabase {
        let name = TestDatabase::unique_name();
        let mut admin = connect(&format!("{}/postgres", server_url())).await;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote(&name).unwrap()
        )))
        .execute(&mut admin)
        .await
        .expect("test database created");
        TestDatabase { name }
    }

    pub(crate) fn settings(&self) -> PostgresSettings {
        PostgresSettings {
            url: Some(format!("{}/{}", server_url(), self.name).into()),
            max_connections: 4,
            ..PostgresSettings::default()
        }
    }

    fn projector(&self) -> Arc<PostgresProjector> {
        Arc::new(PostgresProjector::new(&self.settings()).expect("valid settings"))
    }

    pub(crate) async fn sql(&self) -> PgConnection {
        connect(&format!("{}/{}", server_url(), self.name)).await
    }

    pub(crate) async fn drop(self) {
        let mut admin = connect(&format!("{}/postgres", server_url())).await;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote(&self.name).unwrap()
        )))
        .execute(&mut admin)
        .await
        .expect("test database dropped");
    }
}

fn ident(name: &str) -> Ident {
    Ident::parse(name).expect("an identifier")
}

fn upsert(project: &Ident, id: Uuid, revision: u64, doc: Value) -> Task {
    let Value::Object(doc) = doc else {
        panic!("a document is an object")
    };
    Task {
        seq: revision,
        project: project.clone(),
        op: TaskOp::Upsert {
            blueprint: ident("sample"),
            id,
            revision,
            docs: vec![VersionDoc::new(1, &doc)],
        },
    }
}

fn delete(project: &Ident, id: Uuid, revision: u64) -> Task {
    Task {
        seq: revision,
        project: project.clone(),
        op: TaskOp::Delete {
            blueprint: ident("sample"),
            id,
            revision,
            versions: vec![1],
        },
    }
}

fn sample_doc(id: Uuid, title: &str) -> Value {
    Value::Object(conformance::sample_doc(id, title))
}

/// Numbers as floats: PostGIS prints `0` where dstore's canonical GeoJSON holds `0.0`.
fn floats(value: Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(floats).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, floats(v))).collect()),
        Value::Number(n) => json!(n.as_f64().expect("a finite number")),
        other => other,
    }
}

async fn schemas(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname ~ '_v[0-9]+$' ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .expect("schemas listed")
}

/// Polls `check` until it holds or 10 seconds pass.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that the PostgreSQL projector's own read of an item in version 1 equals what the API
/// serves for it.
async fn assert_read_back_as_served(
    app: &TestApp,
    db: &TestDatabase,
    path: (&str, &str),
    id: Uuid,
) {
    let (project, blueprint) = path;
    let served = app.get(&format!("/{project}/{blueprint}/{id}")).await.body;
    let stored = db
        .projector()
        .read(&ident(project), 1, &ident(blueprint), &id)
        .await
        .unwrap();
    assert_eq!(stored, Some(served));
}

async fn app_with(db: &TestDatabase) -> TestApp {
    let settings = db.settings();
    spawn_app_with(|s| s.postgresql = Some(settings)).await
}

/// A fresh database, a catalog in `dir` with the sample blueprint frozen as version 1 of each of
/// `projects`, and a projector on that database.
async fn sample_projects(
    dir: &tempfile::TempDir,
    projects: &[&str],
) -> (TestDatabase, Catalog, Arc<PostgresProjector>) {
    let db = TestDatabase::create().await;
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    for project in projects {
        conformance::freeze_sample(&catalog, &ident(project));
    }
    let projector = db.projector();
    (db, catalog, projector)
}

#[tokio::test]
async fn the_postgres_projector_passes_the_conformance_suite() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    conformance::run(db.projector(), &catalog, &ident("conformance")).await;
    db.drop().await;
}

#[tokio::test]
async fn kitchensink_items_written_over_http_read_back_from_sql_in_both_versions() {
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    assert_eq!(
        app.put_and_freeze("dstore", "kitchensink", &blueprint_v1())
            .await,
        1
    );
    let first = Uuid::new_v4();
    app.put_projected(
        &format!("/dstore/kitchensink/{first}?wait=true"),
        &item_v1(first),
    )
    .await;
    assert_eq!(
        app.put_and_freeze("dstore", "kitchensink", &blueprint_v2())
            .await,
        2
    );
    let second = Uuid::new_v4();
    app.put_projected(
        &format!("/dstore/kitchensink/{second}?wait=true"),
        &item_v2(second, first),
    )
    .await;

    let mut sql = db.sql().await;
    for (schema, prefix) in [("dstore_v1", "c"), ("dstore_v2", "s")] {
        let query = format!(
            "SELECT ST_AsGeoJSON({p}_point)::jsonb AS point, ST_AsGeoJSON({p}_linestring)::jsonb AS linestring, \
                    ST_AsGeoJSON({p}_polygon)::jsonb AS polygon, {p}_uuid::text AS uuid, {p}_string AS string, \
                    {p}_text AS text, {p}_date::text AS date, \
                    to_char({p}_datetime AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS datetime, \
                    {p}_float::float8 AS float, {p}_integer AS integer, {p}_boolean AS boolean, {p}_json AS json, \
                    links::text[] AS links, project_version \
             FROM {schema}.kitchensinks WHERE id = $1",
            p = prefix
        );
        let row = sqlx::query(AssertSqlSafe(query))
            .bind(second)
            .fetch_one(&mut sql)
            .await
            .expect("the row is in postgresql");
        for geometry in ["point", "linestring", "polygon"] {
            assert_eq!(
                floats(row.get::<Value, _>(geometry)),
                sample(geometry),
                "{schema} {geometry}"
            );
        }
        for text in ["uuid", "string", "text", "date", "datetime"] {
            assert_eq!(
                json!(row.get::<String, _>(text)),
                sample(text),
                "{schema} {text}"
            );
        }
        assert_eq!(
            row.get::<f64, _>("float"),
            f64::from(11.11111f32),
            "{schema}: REAL holds single precision"
        );
        assert_eq!(row.get::<i32, _>("integer"), 42);
        assert!(row.get::<bool, _>("boolean"));
        assert_eq!(row.get::<Value, _>("json"), sample("json"));
        assert_eq!(row.get::<Vec<String>, _>("links"), vec![first.to_string()]);
        assert_eq!(
            row.get::<i32, _>("project_version"),
            if prefix == "c" { 1 } else { 2 }
        );
    }
    sqlx::raw_sql("SET extra_float_digits = 0")
        .execute(&mut sql)
        .await
        .unwrap();
    let real: String =
        sqlx::query_scalar("SELECT c_float::text FROM dstore_v1.kitchensinks WHERE id = $1")
            .bind(second)
            .fetch_one(&mut sql)
            .await
            .unwrap();
    assert_eq!(real, "11.1111", "REAL keeps 11.11111 as 11.1111");

    let arrays = sqlx::query(
        "SELECT ST_AsGeoJSON(a_point)::jsonb AS point, ST_AsGeoJSON(a_polygon)::jsonb AS polygon, \
                ST_NumGeometries(a_linestring) AS lines, a_datetime::text[] AS datetimes, a_json, a_integer, a_uuid::text[] AS uuids \
         FROM dstore_v2.kitchensinks WHERE id = $1",
    )
    .bind(second)
    .fetch_one(&mut sql)
    .await
    .unwrap();
    let coordinates = sample("point")["coordinates"].clone();
    assert_eq!(
        floats(arrays.get::<Value, _>("point")),
        json!({"type": "MultiPoint", "coordinates": [coordinates, coordinates]})
    );
    assert_eq!(arrays.get::<Value, _>("polygon")["type"], "MultiPolygon");
    assert_eq!(arrays.get::<i32, _>("lines"), 2);
    assert_eq!(
        arrays.get::<Vec<String>, _>("datetimes"),
        vec!["2021-03-04 05:06:07+00"; 2]
    );
    assert_eq!(
        arrays.get::<Vec<Value>, _>("a_json"),
        vec![sample("json"), sample("json")]
    );
    assert_eq!(arrays.get::<Vec<i32>, _>("a_integer"), vec![42, 42]);
    assert_eq!(
        arrays.get::<Vec<String>, _>("uuids"),
        vec![sample("uuid").as_str().unwrap().to_owned(); 2]
    );

    // The projector's own read gives back exactly what the API serves, in both versions.
    let reader = db.projector();
    for version in [1, 2] {
        let served = app
            .get(&format!("/dstore/kitchensink/{second}?version={version}"))
            .await
            .body;
        let stored = reader
            .read(&ident("dstore"), version, &ident("kitchensink"), &second)
            .await
            .unwrap();
        assert_eq!(stored, Some(served), "version {version}");
    }
    // The item written before v2 existed is back-filled into it.
    eventually("the first item is back-filled into version 2", || {
        let reader = reader.clone();
        async move {
            reader
                .read(&ident("dstore"), 2, &ident("kitchensink"), &first)
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;

    let deleted = app
        .delete(&format!("/dstore/kitchensink/{second}?wait=true"))
        .await;
    assert_eq!(deleted.body["projected"], true, "{}", deleted.body);
    for schema in ["dstore_v1", "dstore_v2"] {
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {schema}.kitchensinks WHERE id = $1"
        )))
        .bind(second)
        .fetch_one(&mut sql)
        .await
        .unwrap();
        assert_eq!(left, 0, "{schema} still holds the deleted item");
    }
    app.stop().await;
    db.drop().await;
}

/// PostgreSQL enabled on a deployment that has items: at its first start with the store, every
/// item of every live version reaches it (migrations and a back-fill into that store alone), and
/// the next start does not do it again.
#[tokio::test]
async fn a_store_enabled_on_a_deployment_with_items_gets_every_item() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    {
        let app = spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
        app.put_and_freeze("dstore", "kitchensink", &blueprint_v1())
            .await;
        for id in &ids {
            let written = app
                .put(&format!("/dstore/kitchensink/{id}"), &item_v1(*id))
                .await;
            assert_eq!(written.status, 200, "{}", written.body);
        }
        app.put_and_freeze("dstore", "kitchensink", &blueprint_v2())
            .await;
        app.stop().await;
    }
    let db = TestDatabase::create().await;
    let url = format!("{}/{}", server_url(), db.name);
    let rows = |schema: &'static str| {
        let url = url.clone();
        async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                "SELECT count(*) FROM {schema}.kitchensinks"
            )))
            .fetch_one(&mut connect(&url).await)
            .await
            .unwrap_or(0)
        }
    };
    let start = || {
        let settings = db.settings();
        spawn_app_with(|s| {
            s.storage.data_dir = path.clone();
            s.postgresql = Some(settings);
        })
    };
    let app = start().await;
    eventually("every item is in both versions' tables", || async {
        rows("dstore_v1").await == 3 && rows("dstore_v2").await == 3
    })
    .await;
    let last = app.journal.as_ref().unwrap().last_seq();
    app.stop().await;
    let again = start().await;
    assert_eq!(
        again.journal.as_ref().unwrap().last_seq(),
        last,
        "the store was caught up again"
    );
    again.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn strings_that_look_like_array_syntax_or_escapes_read_back_exactly() {
    // Columns travel to PostgreSQL as text arrays; quotes, backslashes, commas, braces, the word
    // NULL, empty strings and odd unicode must come back as they were sent.
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    let blueprint = json!({
        "postgresql": {"table": "notes"}, "elasticsearch": {"type": "note"},
        "columns": {
            "title": {"type": "string", "validation": {"max_length": 80}},
            "body": {"type": "text"},
            "tags": {"type": "string[]"},
            "meta": {"type": "json"},
            "metas": {"type": "json[]"},
            "when": {"type": "datetime[]"}
        }
    });
    app.put_and_freeze("notes", "note", &blueprint).await;
    let awkward = [
        "",
        "NULL",
        "null",
        "a,b",
        "{x}",
        "\"q\"",
        "back\\slash",
        "ünï 😀 \u{2028}",
        " padded ",
    ];
    let id = Uuid::new_v4();
    let item = json!({
        "project_version": 1,
        "title": "say \"hi\", {then} \\ leave",
        "body": awkward.join("\n"),
        "tags": awkward,
        "meta": "a JSON string, not an object",
        "metas": [{"k": "\"quoted\" {brace}"}, "text", 1.5, [1, "2"]],
        "when": ["2021-03-04 05:06:07", "1999-12-31 23:59:59"]
    });
    app.put_projected(&format!("/notes/note/{id}?wait=true"), &item)
        .await;

    let mut sql = db.sql().await;
    let row = sqlx::query(
        "SELECT title, body, tags, meta, metas, \"when\"::text[] AS stamps FROM notes_v1.notes WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&mut sql)
    .await
    .expect("the row is in postgresql");
    assert_eq!(row.get::<String, _>("title"), item["title"]);
    assert_eq!(row.get::<String, _>("body"), item["body"]);
    assert_eq!(row.get::<Vec<String>, _>("tags"), awkward);
    assert_eq!(row.get::<Value, _>("meta"), item["meta"]);
    assert_eq!(
        Value::Array(row.get::<Vec<Value>, _>("metas")),
        item["metas"]
    );
    assert_eq!(
        row.get::<Vec<String>, _>("stamps"),
        ["2021-03-04 05:06:07+00", "1999-12-31 23:59:59+00"]
    );
    assert_read_back_as_served(&app, &db, ("notes", "note"), id).await;
    app.stop().await;
    db.drop().await;
}

/// The same through `_bulk`, where enough new rows go in by `COPY` (and, written again, by the
/// upsert): every string comes back as it was sent.
#[tokio::test]
async fn awkward_strings_of_a_large_bulk_read_back_exactly_whether_copied_or_upserted() {
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    let blueprint = json!({
        "postgresql": {"table": "notes"}, "elasticsearch": {"type": "note"},
        "columns": {
            "title": {"type": "string", "validation": {"max_length": 80}},
            "tags": {"type": "string[]"},
            "meta": {"type": "json"}
        }
    });
    app.put_and_freeze("bulky", "note", &blueprint).await;
    let awkward = [
        "tab\there",
        "cr\rlf\r\n",
        "\\",
        "\\N",
        "\\.",
        "a\\tb",
        "",
        "NULL",
        "ünï 😀 \u{2028}",
    ];
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    let item = |n: usize, round: &str| {
        json!({
            "project_version": 1,
            "title": format!("{round} {}", awkward[n % awkward.len()]),
            "tags": awkward,
            "meta": {"s": awkward[n % awkward.len()]}
        })
    };
    let mut sql = db.sql().await;
    for round in ["first", "second"] {
        let mut body = String::new();
        for (n, id) in ids.iter().enumerate() {
            body.push_str(&format!(
                "{{\"put\": {{\"blueprint\": \"note\", \"id\": \"{id}\"}}}}\n{}\n",
                item(n, round)
            ));
        }
        let bulk = app
            .send(reqwest::Method::POST, "/bulky/_bulk?wait=true", Some(body))
            .await;
        assert_eq!(bulk.status, 200, "{}", bulk.body);
        assert_eq!(bulk.body["projected"], true, "{}", bulk.body);
        let metrics = app.metrics().await;
        // The first round's rows went in by COPY, the second's by the upsert.
        assert!(
            metrics.contains("\ndstore_postgresql_rows_copied_total 300\n"),
            "{metrics}"
        );
        let rows: Vec<(Uuid, String, Vec<String>, Value)> =
            sqlx::query_as("SELECT id, title, tags, meta FROM bulky_v1.notes")
                .fetch_all(&mut sql)
                .await
                .unwrap();
        let rows: HashMap<Uuid, (String, Vec<String>, Value)> = rows
            .into_iter()
            .map(|(id, title, tags, meta)| (id, (title, tags, meta)))
            .collect();
        assert_eq!(rows.len(), ids.len());
        for (n, id) in ids.iter().enumerate() {
            let expected = item(n, round);
            let (title, tags, meta) = &rows[id];
            assert_eq!(title, &expected["title"], "{round} {n}");
            assert_eq!(tags, &awkward, "{round} {n}");
            assert_eq!(meta, &expected["meta"], "{round} {n}");
        }
    }
    app.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn an_item_of_a_blueprint_with_the_most_columns_allowed_is_written_whole() {
    // One array per column goes to PostgreSQL: 900 columns and the four every row has. Mostly
    // fixed-size values: a PostgreSQL row holds at most 8160 bytes of what it cannot move out of
    // line (a wider row is refused and dead-lettered, with that reason).
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    let kinds = ["integer", "boolean", "string", "datetime"];
    let mut columns = serde_json::Map::new();
    let mut item = serde_json::Map::new();
    for i in 0..dstore::blueprint::parse::MAX_COLUMNS {
        let kind = match i % 100 {
            0 => "string[]",
            1 => "json",
            _ => kinds[i % kinds.len()],
        };
        columns.insert(format!("c{i}"), json!({"type": kind}));
        let value = match kind {
            "string" => json!("s"),
            "integer" => json!(i),
            "boolean" => json!(i % 3 == 0),
            "json" => json!({"i": i}),
            "string[]" => json!([format!("{i}"), "x"]),
            _ => json!("2021-03-04 05:06:07"),
        };
        item.insert(format!("c{i}"), value);
    }
    let blueprint = json!({
        "postgresql": {"table": "wides"}, "elasticsearch": {"type": "wide"}, "columns": columns
    });
    app.put_and_freeze("wide", "wide", &blueprint).await;
    item.insert("project_version".into(), json!(1));
    let id = Uuid::new_v4();
    app.put_projected(&format!("/wide/wide/{id}?wait=true"), &Value::Object(item))
        .await;
    let mut sql = db.sql().await;
    let filled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wide_v1.wides w, jsonb_each(to_jsonb(w)) e \
         WHERE w.id = $1 AND e.key LIKE 'c%' AND e.value <> 'null'",
    )
    .bind(id)
    .fetch_one(&mut sql)
    .await
    .unwrap();
    assert_eq!(filled, dstore::blueprint::parse::MAX_COLUMNS as i64);
    assert_read_back_as_served(&app, &db, ("wide", "wide"), id).await;
    app.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn every_column_has_the_exact_postgresql_type_of_the_type_table() {
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    app.put_and_freeze("dstore", "kitchensink", &blueprint_v1())
        .await;
    app.put_and_freeze("dstore", "kitchensink", &blueprint_v2())
        .await;
    let mut sql = db.sql().await;
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, udt_name::text FROM information_schema.columns \
         WHERE table_schema = 'dstore_v2' AND table_name = 'kitchensinks' ORDER BY ordinal_position",
    )
    .fetch_all(&mut sql)
    .await
    .unwrap();
    let found = |name: &str| {
        columns
            .iter()
            .find(|(column, ..)| column == name)
            .map(|(_, data_type, udt)| (data_type.as_str(), udt.as_str()))
            .unwrap_or_else(|| panic!("no column {name} in {columns:?}"))
    };
    assert_eq!(found("id"), ("uuid", "uuid"));
    assert_eq!(found("project_version"), ("integer", "int4"));
    assert_eq!(found("links"), ("ARRAY", "_uuid"));
    let scalars = [
        ("uuid", "uuid", "uuid"),
        ("string", "text", "text"),
        ("text", "text", "text"),
        ("point", "USER-DEFINED", "geometry"),
        ("linestring", "USER-DEFINED", "geometry"),
        ("polygon", "USER-DEFINED", "geometry"),
        ("date", "date", "date"),
        ("datetime", "timestamp with time zone", "timestamptz"),
        ("float", "real", "float4"),
        ("integer", "integer", "int4"),
        ("boolean", "boolean", "bool"),
        ("json", "jsonb", "jsonb"),
    ];
    for (ty, data_type, udt) in scalars {
        assert_eq!(found(&format!("s_{ty}")), (data_type, udt), "s_{ty}");
        let array = if data_type == "USER-DEFINED" {
            (data_type, udt.to_owned())
        } else {
            ("ARRAY", format!("_{udt}"))
        };
        assert_eq!(
            found(&format!("a_{ty}")),
            (array.0, array.1.as_str()),
            "a_{ty}"
        );
    }
    let geometries: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT f_geometry_column::text, type::text, srid FROM geometry_columns \
         WHERE f_table_schema = 'dstore_v2' AND f_table_name = 'kitchensinks' ORDER BY 1",
    )
    .fetch_all(&mut sql)
    .await
    .unwrap();
    let expected: Vec<(String, String, i32)> = [
        ("a_linestring", "MULTILINESTRING"),
        ("a_point", "MULTIPOINT"),
        ("a_polygon", "MULTIPOLYGON"),
        ("s_linestring", "LINESTRING"),
        ("s_point", "POINT"),
        ("s_polygon", "POLYGON"),
    ]
    .into_iter()
    .map(|(c, t)| (c.to_owned(), t.to_owned(), 4326))
    .collect();
    assert_eq!(geometries, expected);
    assert_eq!(schemas(&mut sql).await, ["dstore_v1", "dstore_v2"]);
    app.stop().await;
    db.drop().await;
}

/// name, is_nullable, data_type, character_maximum_length, column_default
type ColumnFacts = (String, String, String, Option<i32>, Option<String>);

#[tokio::test]
async fn column_options_become_not_null_defaults_unique_indexes_and_comments() {
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    let blueprint = json!({
        "postgresql": {"table": "places"}, "elasticsearch": {"type": "place"},
        "columns": {
            "name": {"type": "string", "nullable": false, "unique": true, "validation": {"max_length": 80}, "comment": "the name"},
            "kind": {"type": "string", "default": "shop"},
            "at": {"type": "point", "index": true}
        }
    });
    assert_eq!(app.put_and_freeze("geo", "place", &blueprint).await, 1);
    let mut sql = db.sql().await;
    let columns: Vec<ColumnFacts> = sqlx::query_as(
        "SELECT column_name::text, is_nullable::text, data_type::text, character_maximum_length::int, column_default::text \
         FROM information_schema.columns WHERE table_schema = 'geo_v1' AND table_name = 'places' ORDER BY ordinal_position",
    )
    .fetch_all(&mut sql)
    .await
    .unwrap();
    let name = columns.iter().find(|c| c.0 == "name").unwrap();
    assert_eq!(
        (name.1.as_str(), name.2.as_str(), name.3),
        ("NO", "character varying", Some(80))
    );
    let kind = columns.iter().find(|c| c.0 == "kind").unwrap();
    assert_eq!(kind.4.as_deref(), Some("'shop'::text"));
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'geo_v1' AND tablename = 'places'",
    )
    .fetch_all(&mut sql)
    .await
    .unwrap();
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("UNIQUE") && d.contains("(name)")),
        "{indexes:?}"
    );
    assert!(
        indexes.iter().any(|d| d.contains("USING gist (at)")),
        "{indexes:?}"
    );
    let comment: Option<String> = sqlx::query_scalar(
        "SELECT col_description('geo_v1.places'::regclass, (SELECT attnum FROM pg_attribute \
         WHERE attrelid = 'geo_v1.places'::regclass AND attname = 'name'))::text",
    )
    .fetch_one(&mut sql)
    .await
    .unwrap();
    assert_eq!(comment.as_deref(), Some("the name"));
    app.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn a_row_postgresql_refuses_goes_to_the_dead_letters_without_blocking_the_rest() {
    refused_rows_are_dead_lettered_and_said_so_to_a_waiting_writer(false).await;
}

#[tokio::test]
async fn in_cluster_mode_a_waiting_writer_is_told_which_store_refused_its_write() {
    refused_rows_are_dead_lettered_and_said_so_to_a_waiting_writer(true).await;
}

/// A unique column refuses a second row with the same code: the write is durable, the row is a dead
/// letter, the others go on, and a writer that waits (`wait=true`) hears `projected: false` with
/// the store's reason, for a PUT and for `_bulk`; with the catalog and journal in PostgreSQL
/// (`cluster`) too.
async fn refused_rows_are_dead_lettered_and_said_so_to_a_waiting_writer(cluster: bool) {
    let db = TestDatabase::create().await;
    let settings = db.settings();
    let storage_url = settings.url.clone();
    let app = spawn_app_with(|s| {
        s.postgresql = Some(settings);
        if cluster {
            s.storage.backend = dstore::config::Backend::Postgresql;
            s.storage.url = storage_url;
        }
    })
    .await;
    let blueprint = json!({
        "postgresql": {"table": "coupons"}, "elasticsearch": {"type": "coupon"},
        "columns": {"code": {"type": "string", "unique": true}}
    });
    assert_eq!(app.put_and_freeze("shop", "coupon", &blueprint).await, 1);
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut answers = Vec::new();
    for (id, code) in [(a, "x"), (b, "x"), (c, "y")] {
        let put = app
            .put(
                &format!("/shop/coupon/{id}?wait=true"),
                &json!({"project_version": 1, "code": code}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        answers.push(put.body);
    }
    assert_eq!(answers[0]["projected"], true, "{}", answers[0]);
    assert_eq!(answers[2]["projected"], true, "{}", answers[2]);
    let refused = &answers[1];
    assert_eq!(refused["projected"], false, "{refused}");
    assert_eq!(
        refused["refused"][0]["projector"], "postgresql",
        "{refused}"
    );
    assert_eq!(refused["refused"][0]["revision"], refused["revision"]);
    assert!(
        refused["refused"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("duplicate key"),
        "{refused}"
    );
    let letters = app.get("/_dead_letters").await.body;
    let letters = letters["dead_letters"]
        .as_array()
        .expect("a list of dead letters")
        .clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["projector"], "postgresql");
    let reason = letters[0]["reason"].as_str().unwrap();
    // PostgreSQL's detail, which quotes the value, is kept in the dead letter (not in the log).
    assert!(
        reason.contains("duplicate key")
            && reason.contains(&b.to_string())
            && reason.contains("23505")
            && reason.contains("(code)=(x)"),
        "{reason}"
    );
    let mut sql = db.sql().await;
    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM shop_v1.coupons ORDER BY code")
        .fetch_all(&mut sql)
        .await
        .unwrap();
    assert_eq!(stored, vec![a, c]);

    // In `_bulk`, the answer names each refused write by its revision, and only those.
    let (d, e, f) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut body = String::new();
    for (id, code) in [(d, "z"), (e, "y"), (f, "x")] {
        body.push_str(&format!(
            "{{\"put\": {{\"blueprint\": \"coupon\", \"id\": \"{id}\"}}}}\n\
             {{\"project_version\": 1, \"code\": \"{code}\"}}\n"
        ));
    }
    let bulk = app
        .send(reqwest::Method::POST, "/shop/_bulk?wait=true", Some(body))
        .await;
    assert_eq!(bulk.status, 200, "{}", bulk.body);
    assert_eq!(bulk.body["errors"], false, "{}", bulk.body);
    assert_eq!(bulk.body["projected"], false, "{}", bulk.body);
    let refused: Vec<&Value> = bulk.body["refused"].as_array().unwrap().iter().collect();
    assert_eq!(refused.len(), 2, "{}", bulk.body);
    assert_eq!(
        refused[0]["revision"],
        bulk.body["items"][1]["put"]["revision"]
    );
    assert_eq!(
        refused[1]["revision"],
        bulk.body["items"][2]["put"]["revision"]
    );
    app.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn inside_one_batch_a_refused_row_fails_alone_and_the_newest_revision_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (db, catalog, projector) = sample_projects(&dir, &["batch"]).await;
    let project = ident("batch");
    let (kept, refused, stale_delete, new_delete) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let mut too_long = sample_doc(refused, "ok");
    // VARCHAR(40) refuses this title (dstore's validation would have stopped it first).
    too_long["title"] = json!("x".repeat(41));
    let nul = Uuid::new_v4();
    // PostgreSQL text cannot hold NUL, which JSON can.
    let with_nul = sample_doc(nul, "a\u{0}b");
    let tasks = vec![
        upsert(&project, kept, 1, sample_doc(kept, "one")),
        upsert(&project, refused, 2, too_long),
        upsert(&project, stale_delete, 3, sample_doc(stale_delete, "kept")),
        upsert(&project, new_delete, 4, sample_doc(new_delete, "gone")),
        delete(&project, new_delete, 5),
        upsert(&project, kept, 7, sample_doc(kept, "seven")),
        upsert(&project, kept, 6, sample_doc(kept, "six")),
        delete(&project, stale_delete, 2),
        upsert(&project, nul, 8, with_nul),
    ];
    let outcomes = projector
        .apply(&catalog.snapshot(), &tasks)
        .await
        .expect("the batch is applied");
    let failed: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.is_err())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(failed, vec![1, 8], "{outcomes:?}");
    let error = outcomes[1].as_ref().unwrap_err();
    assert_eq!(error.kind, ErrorKind::Permanent);
    assert!(
        error.message.contains("value too long") && error.message.contains("22001"),
        "{}",
        error.message
    );
    let read = |id| {
        let projector = projector.clone();
        let project = project.clone();
        async move {
            projector
                .read(&project, 1, &ident("sample"), &id)
                .await
                .unwrap()
        }
    };
    assert_eq!(read(kept).await.unwrap()["title"], "seven");
    assert_eq!(read(refused).await, None);
    assert_eq!(read(nul).await, None);
    let message = &outcomes[8].as_ref().unwrap_err().message;
    assert!(
        message.contains(&nul.to_string()) && message.contains("sqlstate 22"),
        "{message}"
    );
    assert_eq!(read(stale_delete).await.unwrap()["title"], "kept");
    assert_eq!(read(new_delete).await, None);
    db.drop().await;
}

/// Each row of `schema.samples`: id → (title, `(null)` for NULL, revision).
async fn samples(conn: &mut PgConnection, schema: &str) -> HashMap<Uuid, (String, i64)> {
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, COALESCE(title, '(null)'), _revision FROM {schema}.samples"
    )))
    .fetch_all(conn)
    .await
    .expect("rows read");
    rows.into_iter()
        .map(|(id, title, revision)| (id, (title, revision)))
        .collect()
}

/// A batch of at least 1000 rows goes in `parallel_transactions` transactions at once, split by item
/// id; the result is the batch's as one transaction would write it: the newest write of each item
/// wins, a refused row fails alone, and deletes leave their tombstones.
#[tokio::test]
async fn a_large_batch_is_written_in_parallel_transactions_with_the_result_of_one() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    let (lanes, unique) = (ident("lanes"), ident("unique"));
    conformance::freeze_sample(&catalog, &lanes);
    let mut blueprint = conformance::sample_blueprint();
    blueprint["columns"]["count"]["unique"] = json!(true);
    catalog
        .put_blueprint(
            &unique,
            &ident("sample"),
            dstore::blueprint::parse_blueprint(&blueprint, "").unwrap(),
        )
        .unwrap();
    catalog.freeze(&unique, &[], &[], false).unwrap();
    let projector = Arc::new(
        PostgresProjector::new(&PostgresSettings {
            parallel_transactions: 3,
            ..db.settings()
        })
        .unwrap(),
    );
    let ids: Vec<Uuid> = (0..1200).map(|_| Uuid::new_v4()).collect();
    let mut tasks: Vec<Task> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| upsert(&lanes, *id, n as u64 + 1, sample_doc(*id, "first")))
        .collect();
    for (n, id) in ids.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
        let revision = 10_000 + n as u64;
        tasks.push(match n % 2 {
            0 => delete(&lanes, *id, revision),
            _ => upsert(&lanes, *id, revision, sample_doc(*id, "second")),
        });
    }
    let outcomes = projector
        .apply(&catalog.snapshot(), &tasks)
        .await
        .expect("the batch is applied");
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(
        projector.rows_copied(),
        1000,
        "each lane's new rows went in by COPY"
    );
    let mut conn = connect(&format!("{}/{}", server_url(), db.name)).await;
    let written = samples(&mut conn, "lanes_v1").await;
    for (n, id) in ids.iter().enumerate() {
        let expected = match (n % 3, n % 2) {
            (0, 0) => None,
            (0, _) => Some(("second".to_owned(), 10_000 + n as i64)),
            _ => Some(("first".to_owned(), n as i64 + 1)),
        };
        assert_eq!(written.get(id).cloned(), expected, "item {n}");
    }
    let tombstones: i64 = sqlx::query_scalar("SELECT count(*) FROM lanes_v1._tombstones")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(tombstones, 200);
    // Each lane's statement runs under one savepoint, whose transaction id the rows carry.
    let transactions =
        |schema: &str| format!("SELECT count(DISTINCT xmin::text) FROM {schema}.samples");
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(transactions("lanes_v1")))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 3, "three transactions wrote the rows");

    // A row PostgreSQL refuses fails its own task only, in whichever lane it is.
    let more: Vec<Uuid> = (0..1200).map(|_| Uuid::new_v4()).collect();
    let tasks: Vec<Task> = more
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let mut doc = sample_doc(*id, "third");
            if n % 100 == 7 {
                // VARCHAR(40) refuses it.
                doc["title"] = json!("x".repeat(41));
            }
            upsert(&lanes, *id, 20_000 + n as u64, doc)
        })
        .collect();
    let outcomes = projector
        .apply(&catalog.snapshot(), &tasks)
        .await
        .expect("the batch is applied");
    let failed: Vec<usize> = (0..tasks.len()).filter(|i| outcomes[*i].is_err()).collect();
    let refused: Vec<usize> = (0..more.len()).filter(|n| n % 100 == 7).collect();
    assert_eq!(failed, refused, "only the refused rows fail");
    let written = samples(&mut conn, "lanes_v1").await;
    for (n, id) in more.iter().enumerate() {
        assert_eq!(written.contains_key(id), n % 100 != 7, "item {n}");
    }

    // A unique column keeps the batch in one transaction: which write takes a value is the
    // earlier task's, as without lanes.
    let tasks: Vec<Task> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let mut doc = sample_doc(*id, "unique");
            doc["count"] = json!(n);
            upsert(&unique, *id, n as u64 + 1, doc)
        })
        .collect();
    let copied = projector.rows_copied();
    let outcomes = projector
        .apply(&catalog.snapshot(), &tasks)
        .await
        .expect("the batch is applied");
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(
        projector.rows_copied(),
        copied,
        "rows with a unique column meet in task order, never by COPY"
    );
    let written: i64 = sqlx::query_scalar(AssertSqlSafe(transactions("unique_v1")))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        written, 1,
        "one transaction for a table with a unique column"
    );
    db.drop().await;
}

/// Every row of `schema.samples` as JSON, by id.
async fn rows_as_json(conn: &mut PgConnection, schema: &str) -> HashMap<Uuid, Value> {
    let rows: Vec<(Uuid, Value)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, to_jsonb(t) FROM {schema}.samples t"
    )))
    .fetch_all(conn)
    .await
    .expect("rows read");
    rows.into_iter().collect()
}

/// A batch's new rows of one table go in by `COPY` when there are enough of them: each reads back
/// exactly as the upsert writes it (escapes, NULLs, arrays, geometries, JSON), ids with a tombstone
/// keep its guard, and rows that are already there make the batch an upsert and pause `COPY` for
/// that table.
#[tokio::test]
async fn new_rows_of_a_large_batch_go_in_by_copy_exactly_as_the_upsert_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (db, catalog, projector) = sample_projects(&dir, &["copied", "upserted"]).await;
    let (copied, upserted) = (ident("copied"), ident("upserted"));
    let awkward = [
        "tab\there",
        "line\nbreak\r\n",
        "back\\slash \\N \\.",
        "\\.",
        "\\N",
        "NULL",
        "",
        "\"q\" {x} a,b",
        "ünï 😀 \u{2028}",
    ];
    let docs: Vec<(Uuid, Value)> = (0..250)
        .map(|n| {
            let id = Uuid::new_v4();
            let mut doc = sample_doc(id, awkward[n % awkward.len()]);
            doc["body"] = json!(awkward.join("\t|\n"));
            doc["tags"] = json!(awkward);
            doc["extra"] = json!({"text": awkward[n % awkward.len()], "n": n});
            match n % 5 {
                0 => doc["title"] = Value::Null,
                1 => {
                    doc.as_object_mut().unwrap().remove("links");
                }
                2 => doc["stops"] = json!([]),
                3 => doc["counts"] = json!([1, null, -2_147_483_648i64]),
                _ => doc["ratio"] = json!(-1.5e-30),
            }
            (id, doc)
        })
        .collect();
    let tasks = |project: &Ident, revision: u64, docs: &[(Uuid, Value)]| -> Vec<Task> {
        docs.iter()
            .enumerate()
            .map(|(n, (id, doc))| upsert(project, *id, revision + n as u64, doc.clone()))
            .collect()
    };
    let apply = |tasks: Vec<Task>| {
        let projector = projector.clone();
        let snapshot = catalog.snapshot();
        async move {
            let outcomes = projector.apply(&snapshot, &tasks).await.expect("applied");
            assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        }
    };
    apply(tasks(&copied, 1, &docs)).await;
    assert_eq!(projector.rows_copied(), 250, "the new rows went in by COPY");
    for chunk in tasks(&upserted, 1, &docs).chunks(10) {
        apply(chunk.to_vec()).await;
    }
    assert_eq!(projector.rows_copied(), 250, "small batches are upserted");
    let mut conn = db.sql().await;
    let by_copy = rows_as_json(&mut conn, "copied_v1").await;
    let by_upsert = rows_as_json(&mut conn, "upserted_v1").await;
    assert_eq!(by_copy.len(), 250);
    for (id, _) in &docs {
        assert_eq!(by_copy.get(id), by_upsert.get(id), "item {id}");
    }
    assert_eq!(
        by_copy[&docs[1].0]["links"],
        json!([]),
        "no links: the empty array"
    );
    assert_eq!(by_copy[&docs[0].0]["title"], Value::Null);
    assert_eq!(by_copy[&docs[2].0]["title"], awkward[2]);

    // Deleted ids keep their tombstone's guard while the batch's new rows are copied.
    let deleted: Vec<Uuid> = docs[..10].iter().map(|(id, _)| *id).collect();
    apply(
        deleted
            .iter()
            .map(|id| delete(&copied, *id, 1000))
            .collect(),
    )
    .await;
    let fresh: Vec<(Uuid, Value)> = (0..200)
        .map(|_| {
            let id = Uuid::new_v4();
            (id, sample_doc(id, "fresh"))
        })
        .collect();
    let mut batch = tasks(&copied, 3000, &fresh);
    for (n, id) in deleted.iter().enumerate() {
        // The first five are older than their delete, the others newer.
        let revision = if n < 5 { 500 } else { 2000 } + n as u64;
        batch.push(upsert(&copied, *id, revision, sample_doc(*id, "back")));
    }
    apply(batch).await;
    assert_eq!(projector.rows_copied(), 450);
    let rows = samples(&mut conn, "copied_v1").await;
    for (n, id) in deleted.iter().enumerate() {
        let expected = (n >= 5).then(|| ("back".to_owned(), 2000 + n as i64));
        assert_eq!(rows.get(id).cloned(), expected, "deleted item {n}");
    }
    assert!(fresh.iter().all(|(id, _)| rows[id].0 == "fresh"));

    // Rows that are already there: the batch is an upsert (the newest revision wins), and the
    // next batches of the table are upserted without trying COPY, until it is tried again.
    // Among them items that came back after a delete, whose tombstone keeps them out of the COPY.
    let again: Vec<(Uuid, Value)> = docs[15..]
        .iter()
        .chain(&docs[5..10])
        .map(|(id, _)| (*id, sample_doc(*id, "updated")))
        .collect();
    apply(tasks(&copied, 10_000, &again)).await;
    assert_eq!(projector.rows_copied(), 450, "nothing was copied");
    let rows = samples(&mut conn, "copied_v1").await;
    for (n, (id, _)) in again.iter().enumerate() {
        assert_eq!(rows[id], ("updated".to_owned(), 10_000 + n as i64));
    }
    let mut batches = 0;
    while projector.rows_copied() == 450 {
        batches += 1;
        assert!(batches <= 20, "COPY is tried again");
        let new: Vec<(Uuid, Value)> = (0..200)
            .map(|_| {
                let id = Uuid::new_v4();
                (id, sample_doc(id, "later"))
            })
            .collect();
        apply(tasks(&copied, 20_000 + batches * 1000, &new)).await;
    }
    assert!(
        batches > 1,
        "the table paused COPY after it met existing rows"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM copied_v1.samples")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 250 - 5 + 200 + 200 * batches as i64);
    db.drop().await;
}

/// A batch dropped at any point (a broker link lost mid-step drops it) never leaves a connection
/// out of step with its replies: every batch after it is applied whole.
#[tokio::test]
async fn a_batch_dropped_at_any_point_leaves_the_connections_usable() {
    let dir = tempfile::tempdir().unwrap();
    let (db, catalog, projector) = sample_projects(&dir, &["dropped"]).await;
    let project = ident("dropped");
    let batch = |revision: u64| -> (Vec<Uuid>, Vec<Task>) {
        let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
        let tasks = ids
            .iter()
            .enumerate()
            .map(|(n, id)| upsert(&project, *id, revision + n as u64, sample_doc(*id, "x")))
            .collect();
        (ids, tasks)
    };
    let mut conn = db.sql().await;
    for step in 0..40u64 {
        let (_, tasks) = batch(step * 1000);
        let cut = Duration::from_micros(500 * step);
        let _ = tokio::time::timeout(cut, projector.apply(&catalog.snapshot(), &tasks)).await;
        let (ids, tasks) = batch(step * 1000 + 500);
        let outcomes = projector
            .apply(&catalog.snapshot(), &tasks)
            .await
            .unwrap_or_else(|e| panic!("the batch after one cut at {cut:?}: {e}"));
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let rows = samples(&mut conn, "dropped_v1").await;
        assert!(ids.iter().all(|id| rows.contains_key(id)), "after {cut:?}");
    }
    db.drop().await;
}

/// A unique value let go of and taken again within one batch goes to the item that takes it, as
/// one write after another would: a delete frees it, and an item that changes its value later in
/// the batch than another takes it (the batch keeps each item's last write) frees it too.
#[tokio::test]
async fn a_unique_value_let_go_of_and_taken_in_one_batch_is_taken() {
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    let user = json!({"postgresql": {"table": "users"}, "elasticsearch": {"type": "user"},
        "columns": {"email": {"type": "string", "unique": true, "validation": {"max_length": 100}},
                    "name": {"type": "string"}}});
    app.put_and_freeze("crm", "user", &user).await;
    let (a, b, c, d) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let lines = |ops: &[(&str, Uuid, Value)]| {
        let mut body = String::new();
        for (op, id, item) in ops {
            body.push_str(&format!(
                "{}\n",
                json!({*op: {"blueprint": "user", "id": id}})
            ));
            if *op == "put" {
                body.push_str(&format!("{item}\n"));
            }
        }
        body
    };
    let user =
        |email: &str, name: &str| json!({"project_version": 1, "email": email, "name": name});
    let first = lines(&[
        ("put", b, user("x@example.com", "b")),
        ("put", d, user("y@example.com", "d")),
    ]);
    let bulk = app
        .send(reqwest::Method::POST, "/crm/_bulk?wait=true", Some(first))
        .await;
    assert_eq!(bulk.body["projected"], true, "{}", bulk.body);
    // b is deleted, then a takes its value; d moves to another value, c takes d's, then d is
    // written again (its last write comes after c's).
    let second = lines(&[
        ("delete", b, Value::Null),
        ("put", a, user("x@example.com", "a")),
        ("put", d, user("z@example.com", "d")),
        ("put", c, user("y@example.com", "c")),
        ("put", d, user("z@example.com", "d again")),
    ]);
    let bulk = app
        .send(reqwest::Method::POST, "/crm/_bulk?wait=true", Some(second))
        .await;
    assert_eq!(bulk.status, 200, "{}", bulk.body);
    assert_eq!(bulk.body["projected"], true, "{}", bulk.body);
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, email FROM crm_v1.users ORDER BY email")
            .fetch_all(&mut db.sql().await)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (a, "x@example.com".to_string()),
            (c, "y@example.com".to_string()),
            (d, "z@example.com".to_string())
        ]
    );
    let letters = app.get("/_dead_letters").await;
    assert_eq!(letters.body["dead_letters"], json!([]), "{}", letters.body);
    app.stop().await;
    db.drop().await;
}

/// A lock someone else holds on one project's table (an operator's `ALTER TABLE`, a long dump)
/// holds back only that project once `lock_timeout_secs` passed: the other projects' writes
/// arrive meanwhile, and its own once the lock is let go.
#[tokio::test]
async fn a_table_locked_by_someone_else_holds_back_only_its_project() {
    let db = TestDatabase::create().await;
    let settings = PostgresSettings {
        lock_timeout_secs: 1,
        ..db.settings()
    };
    let app = spawn_app_with(|s| {
        s.postgresql = Some(settings);
        s.projection.wait_timeout_secs = 30;
    })
    .await;
    let blueprint = crate::helpers::article();
    for project in ["locked", "free"] {
        app.put_and_freeze(project, "article", &blueprint).await;
    }
    let item = json!({"project_version": 1, "title": "t", "date_created": "2020-01-02 03:04:05"});
    let mut holder = db.sql().await;
    let mut lock = holder.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE locked_v1.articles IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let put = app
        .put(&format!("/locked/article/{}", Uuid::new_v4()), &item)
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    for _ in 0..2 {
        app.put_projected(
            &format!("/free/article/{}?wait=true", Uuid::new_v4()),
            &item,
        )
        .await;
    }
    lock.rollback().await.unwrap();
    eventually("the locked project's write arrives", || {
        let url = format!("{}/{}", server_url(), db.name);
        async move {
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM locked_v1.articles")
                .fetch_one(&mut connect(&url).await)
                .await
                .unwrap();
            count == 1
        }
    })
    .await;
    app.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn dropping_a_project_drops_all_its_schemas_and_no_other() {
    let db = TestDatabase::create().await;
    let app = app_with(&db).await;
    let blueprint = crate::helpers::article();
    app.put_and_freeze("a", "article", &blueprint).await;
    let mut second = blueprint.clone();
    second["columns"]["summary"] = json!({"type": "text"});
    app.put_and_freeze("a", "article", &second).await;
    // `a_v1` is another project, whose schema `a_v1_v1` must survive the drop of `a`.
    app.put_and_freeze("a_v1", "article", &blueprint).await;
    let mut sql = db.sql().await;
    // And a schema named like one of `a`'s that dstore did not make.
    sqlx::raw_sql("CREATE SCHEMA a_v9")
        .execute(&mut sql)
        .await
        .unwrap();
    assert_eq!(schemas(&mut sql).await, ["a_v1", "a_v1_v1", "a_v2", "a_v9"]);
    let dropped = app.delete("/a/_project").await;
    assert!(dropped.status < 300, "{}", dropped.body);
    eventually("the schemas of project a are dropped", || {
        let url = format!("{}/{}", server_url(), db.name);
        async move { schemas(&mut connect(&url).await).await == ["a_v1_v1", "a_v9"] }
    })
    .await;
    app.stop().await;
    db.drop().await;
}

/// Puts `blueprint` as `article` of `project` and freezes it, expecting the migration to be refused:
/// the 503 that says why. Under load the failure may not be known within the time the freeze
/// waits: asking again says how the migration ended, as the 503 tells a client to.
async fn freeze_refused(app: &TestApp, project: &str, blueprint: &Value) -> Answer {
    let put = app
        .put(&format!("/{project}/article/_blueprint"), blueprint)
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let mut frozen = app.post(&format!("/{project}/_version"), None).await;
    for _ in 0..30 {
        let pending = frozen.body["status"]
            .as_str()
            .is_some_and(|s| s.contains("still pending"));
        if !pending {
            break;
        }
        frozen = app.post(&format!("/{project}/_version"), None).await;
    }
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    frozen
}

/// A database where `sql` made a schema dstore did not, and an app projecting into it whose writes
/// and freezes wait `wait_secs` for the stores.
async fn with_foreign_schema(sql: &str, wait_secs: u64) -> (TestDatabase, TestApp) {
    let db = TestDatabase::create().await;
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(&mut db.sql().await)
        .await
        .unwrap();
    let settings = db.settings();
    let app = spawn_app_with(|s| {
        s.postgresql = Some(settings);
        s.projection.wait_timeout_secs = wait_secs;
    })
    .await;
    (db, app)
}

/// A freeze whose migration failed for good answers at once, not when its wait is out.
#[tokio::test]
async fn a_freeze_whose_migration_fails_answers_without_waiting_out_its_time() {
    let (_db, app) = with_foreign_schema("CREATE SCHEMA held_v1", 3600).await;
    let put = app
        .put("/held/article/_blueprint", &crate::helpers::article())
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let frozen = tokio::time::timeout(Duration::from_secs(120), app.post("/held/_version", None))
        .await
        .expect("answered once the migration failed, not after an hour");
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    assert!(
        frozen.body["status"]
            .as_str()
            .is_some_and(|s| s.contains("not dstore's schema")),
        "{}",
        frozen.body
    );
    app.stop().await;
}

#[tokio::test]
async fn a_schema_dstore_did_not_make_holds_back_its_project_only_and_is_never_written() {
    let (db, app) = with_foreign_schema(
        "CREATE SCHEMA bad_v1; COMMENT ON SCHEMA bad_v1 IS 'the billing team''s'",
        2,
    )
    .await;
    let mut sql = db.sql().await;
    let blueprint = crate::helpers::article();
    let frozen = freeze_refused(&app, "bad", &blueprint).await;
    assert!(
        frozen.body["status"]
            .as_str()
            .unwrap()
            .contains("not dstore's schema"),
        "{}",
        frozen.body
    );
    assert_eq!(
        app.put("/good/article/_blueprint", &blueprint).await.status,
        200
    );
    // The other project's migration goes on. Its freeze waits 2 s here (so that the held one
    // answers quickly); under load the migration can take longer, and asking again says when it
    // is done, as the 503 tells a client to: 200, or 409 once it finished between two calls.
    let mut frozen = app.post("/good/_version", None).await;
    for _ in 0..30 {
        if frozen.status != 503 {
            break;
        }
        frozen = app.post("/good/_version", None).await;
    }
    let done = frozen.status == 200
        || (frozen.status == 409
            && frozen.body["status"]
                == "nothing changed since version 1, which every store has migrated");
    assert!(done, "{} {}", frozen.status, frozen.body);
    let item = json!({"project_version": 1, "date_created": "2020-01-02"});
    app.put_projected(
        &format!("/good/article/{}?wait=true", Uuid::new_v4()),
        &item,
    )
    .await;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'bad_v1'")
            .fetch_all(&mut sql)
            .await
            .unwrap();
    assert!(
        tables.is_empty(),
        "dstore wrote into a schema it does not own: {tables:?}"
    );
    app.stop().await;
    db.drop().await;
}

/// `PUT /_project` changes and freezes its projects one after the other: when one fails then (its
/// migration refused here), the answer names it, the projects changed before it and those left
/// as they were, and says that sending the request again finishes it.
#[tokio::test]
async fn a_multi_project_put_that_fails_half_way_says_what_it_changed() {
    let (db, app) = with_foreign_schema(
        "CREATE SCHEMA bbb_v1; COMMENT ON SCHEMA bbb_v1 IS 'the billing team''s'",
        10,
    )
    .await;
    let blueprint = crate::helpers::article();
    let body = json!({"aaa": {"article": blueprint}, "bbb": {"article": blueprint},
        "ccc": {"article": blueprint}});
    let answer = app.put("/_project", &body).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    let status = answer.body["status"].as_str().unwrap();
    assert!(
        status.starts_with("project bbb: ")
            && status.contains("changed before it: aaa;")
            && status.contains("not changed: ccc;")
            && status.contains("send the request again"),
        "{status}"
    );
    let projects = app.get("/_project").await.body;
    assert!(
        projects.get("aaa").is_some() && projects.get("ccc").is_none(),
        "{projects}"
    );
    app.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn a_deployment_never_writes_into_nor_drops_another_deployments_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let (db, catalog, first) = sample_projects(&dir, &["shared"]).await;
    let project = ident("shared");
    let version = catalog.snapshot().projects[&project]
        .version(1)
        .unwrap()
        .clone();
    assert!(first.work_for("deployment-a"));
    assert!(!first.work_for("deployment-b"), "a deployment is set once");
    first
        .migrate(&project, &version, &[])
        .await
        .expect("migrated");
    let id = Uuid::new_v4();
    let snapshot = catalog.snapshot();
    let written = first
        .apply(&snapshot, &[upsert(&project, id, 1, sample_doc(id, "a's"))])
        .await
        .unwrap();
    assert!(written[0].is_ok(), "{written:?}");
    let mut sql = db.sql().await;
    let comment = || {
        sqlx::query_scalar::<_, String>(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = 'shared_v1'",
        )
    };
    assert_eq!(
        comment().fetch_one(&mut sql).await.unwrap(),
        "dstore project shared, version 1, deployment deployment-a"
    );

    // A second deployment on the same database: its migration is refused and says why, its
    // writes and its drop of the project touch nothing of the first's.
    let second = db.projector();
    assert!(second.work_for("deployment-b"));
    let refused = second.migrate(&project, &version, &[]).await.unwrap_err();
    assert!(
        refused
            .message
            .contains("belongs to another dstore deployment")
            && refused.message.contains("deployment-a")
            && refused.message.contains("POSTGRESQL_DATABASE"),
        "{}",
        refused.message
    );
    let other = Uuid::new_v4();
    let outcomes = second
        .apply(
            &snapshot,
            &[upsert(&project, other, 1, sample_doc(other, "b's"))],
        )
        .await;
    assert!(
        outcomes.is_err(),
        "a write waits behind the refused migration: {outcomes:?}"
    );
    second.drop_project(&project).await.expect("dropped");
    assert_eq!(schemas(&mut sql).await, ["shared_v1"]);
    let kept = first
        .read(&project, 1, &ident("sample"), &id)
        .await
        .unwrap();
    assert_eq!(
        kept.expect("the first deployment's item stays")["title"],
        "a's"
    );
    assert_eq!(
        first
            .read(&project, 1, &ident("sample"), &other)
            .await
            .unwrap(),
        None
    );

    // A schema an older dstore made names no deployment: the first deployment to migrate it
    // takes it over, and from then on it is that deployment's.
    sqlx::raw_sql("COMMENT ON SCHEMA shared_v1 IS 'dstore project shared, version 1'")
        .execute(&mut sql)
        .await
        .unwrap();
    second
        .migrate(&project, &version, &[])
        .await
        .expect("taken over");
    assert_eq!(
        comment().fetch_one(&mut sql).await.unwrap(),
        "dstore project shared, version 1, deployment deployment-b"
    );
    let restarted = db.projector();
    assert!(restarted.work_for("deployment-a"));
    assert!(restarted.migrate(&project, &version, &[]).await.is_err());
    restarted.drop_project(&project).await.expect("dropped");
    assert_eq!(schemas(&mut sql).await, ["shared_v1"]);
    second.drop_project(&project).await.expect("dropped");
    assert!(schemas(&mut sql).await.is_empty());
    db.drop().await;
}

#[tokio::test]
async fn a_new_data_directory_on_a_database_another_deployment_uses_is_refused_its_schemas() {
    let db = TestDatabase::create().await;
    let first = app_with(&db).await;
    let blueprint = crate::helpers::article();
    first.put_and_freeze("blog", "article", &blueprint).await;
    let id = Uuid::new_v4();
    let item = json!({"project_version": 1, "date_created": "2020-01-02"});
    first
        .put_projected(&format!("/blog/article/{id}?wait=true"), &item)
        .await;
    // Another deployment (its own data directory) on the same database.
    let settings = db.settings();
    let second = spawn_app_with(|s| {
        s.postgresql = Some(settings);
        s.projection.wait_timeout_secs = 2;
    })
    .await;
    let frozen = freeze_refused(&second, "blog", &blueprint).await;
    // The refusal names both deployments as `GET /_health/ready` shows them.
    let deployment = |ready: Answer| {
        ready.body["storage"]["deployment"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (ours, theirs) = (
        deployment(second.get("/_health/ready").await),
        deployment(first.get("/_health/ready").await),
    );
    assert_ne!(ours, theirs);
    let status = frozen.body["status"].as_str().unwrap();
    assert!(
        status.contains("belongs to another dstore deployment")
            && status.contains(&ours)
            && status.contains(&theirs),
        "{}",
        frozen.body
    );
    assert!(second.delete("/blog/_project").await.status < 300);
    // The first deployment's schema and item are untouched, and it goes on writing.
    let again = Uuid::new_v4();
    first
        .put_projected(&format!("/blog/article/{again}?wait=true"), &item)
        .await;
    let mut sql = db.sql().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM blog_v1.articles")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    second.stop().await;
    first.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn a_long_project_schema_named_by_an_older_dstore_is_renamed_and_kept() {
    let db = TestDatabase::create().await;
    let project = ident(&format!("p{}", "x".repeat(60)));
    let legacy = dstore::projector::postgres::ident::legacy_schema_name(&project, 1).unwrap();
    let current = dstore::projector::postgres::ident::schema_name(&project, 1);
    assert_ne!(legacy, current);
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    let version = conformance::freeze_sample(&catalog, &project);
    let projector = db.projector();
    projector
        .migrate(&project, &version, &[])
        .await
        .expect("migrated");
    let id = Uuid::new_v4();
    let outcomes = projector
        .apply(
            &catalog.snapshot(),
            &[upsert(&project, id, 1, sample_doc(id, "kept"))],
        )
        .await
        .expect("applied");
    assert!(outcomes[0].is_ok());
    let mut sql = db.sql().await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER SCHEMA {} RENAME TO {}",
        quote(&current).unwrap(),
        quote(&legacy).unwrap()
    )))
    .execute(&mut sql)
    .await
    .unwrap();
    // A fresh projector (a restart) migrates before its first write, which renames the schema.
    let restarted = db.projector();
    restarted
        .migrate(&project, &version, &[])
        .await
        .expect("migrated again");
    let read = restarted
        .read(&project, 1, &ident("sample"), &id)
        .await
        .expect("read");
    assert_eq!(read.expect("the item is kept")["title"], "kept");
    db.drop().await;
}

#[tokio::test]
async fn a_half_done_migration_is_finished_by_running_it_again() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    let project = ident("resume");
    let version = conformance::freeze_sample(&catalog, &project);
    let projector = db.projector();
    projector
        .migrate(&project, &version, &[])
        .await
        .expect("first migration");
    let mut sql = db.sql().await;
    sqlx::raw_sql("DROP TABLE resume_v1.samples; DROP TABLE resume_v1._tombstones")
        .execute(&mut sql)
        .await
        .unwrap();
    projector
        .migrate(&project, &version, &[])
        .await
        .expect("the migration runs again");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'resume_v1' ORDER BY 1",
    )
    .fetch_all(&mut sql)
    .await
    .unwrap();
    assert_eq!(tables, ["_blueprints", "_tombstones", "samples"]);
    db.drop().await;
}

#[tokio::test]
async fn writes_into_a_version_never_migrated_by_this_projector_migrate_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let (db, catalog, projector) = sample_projects(&dir, &["late"]).await;
    let project = ident("late");
    let id = Uuid::new_v4();
    let outcomes = projector
        .apply(
            &catalog.snapshot(),
            &[upsert(&project, id, 1, sample_doc(id, "hello"))],
        )
        .await
        .unwrap();
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    assert_eq!(
        projector
            .read(&project, 1, &ident("sample"), &id)
            .await
            .unwrap()
            .unwrap()["title"],
        "hello"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_missing_database_is_created_on_first_use() {
    let name = TestDatabase::unique_name();
    let db = TestDatabase { name: name.clone() };
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    let project = ident("fresh");
    let version = conformance::freeze_sample(&catalog, &project);
    let projector = db.projector();
    assert_eq!(
        projector
            .read(&project, 1, &ident("sample"), &Uuid::new_v4())
            .await
            .unwrap(),
        None
    );
    projector
        .migrate(&project, &version, &[])
        .await
        .expect("the database is created and migrated");
    let mut admin = connect(&format!("{}/postgres", server_url())).await;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(exists);
    assert!(projector.health().await.reachable);
    db.drop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_reported_by_health_and_the_service_still_serves() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(|s| {
        s.projection.wait_timeout_secs = 2;
        s.postgresql = Some(PostgresSettings {
            host: "127.0.0.1".into(),
            port,
            ..PostgresSettings::default()
        });
    })
    .await;
    let ready = app.get("/_health/ready").await.body;
    let postgresql = &ready["projectors"]["postgresql"];
    assert_eq!(postgresql["health"]["reachable"], false, "{ready}");
    let detail = postgresql["health"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("POSTGRESQL_HOST") && detail.contains(&port.to_string()),
        "{detail}"
    );
    assert_eq!(ready["projectors"]["rocksdb"]["status"], "ready", "{ready}");
    assert_eq!(
        app.put("/myblog/article/_blueprint", &crate::helpers::article())
            .await
            .status,
        200
    );
    let frozen = app.post("/myblog/_version", None).await;
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    assert!(
        frozen.body["status"]
            .as_str()
            .unwrap()
            .contains("postgresql"),
        "{}",
        frozen.body
    );
    app.stop().await;
}

/// Forwards connections from `port` on 127.0.0.1 to the test server, from the moment it is called.
async fn forward(port: u16) {
    let options: sqlx::postgres::PgConnectOptions = server_url().parse().expect("a postgres url");
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the port is free again");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
}

#[tokio::test]
async fn writes_wait_in_the_journal_while_postgresql_is_down_and_arrive_when_it_returns() {
    let db = TestDatabase::create().await;
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    let app = spawn_app_with(|s| {
        s.projection.wait_timeout_secs = 1;
        s.postgresql = Some(PostgresSettings {
            url: Some(url.into()),
            ..PostgresSettings::default()
        });
    })
    .await;
    assert_eq!(
        app.put("/myblog/article/_blueprint", &crate::helpers::article())
            .await
            .status,
        200
    );
    assert_eq!(app.post("/myblog/_version", None).await.status, 503);
    let id = Uuid::new_v4();
    let item =
        json!({"project_version": 1, "title": "waiting", "date_created": "2021-01-02 03:04:05"});
    let put = app.put(&format!("/myblog/article/{id}"), &item).await;
    assert_eq!(put.status, 200, "{}", put.body);

    forward(port).await;
    let mut sql = db.sql().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let title: Result<String, _> =
            sqlx::query_scalar("SELECT title FROM myblog_v1.articles WHERE id = $1")
                .bind(id)
                .fetch_one(&mut sql)
                .await;
        if let Ok(title) = title {
            assert_eq!(title, "waiting");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiting write never reached postgresql"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(
        ready["projectors"]["postgresql"]["health"]["reachable"], true,
        "{ready}"
    );
    // The migration done, asking again says so.
    let done = app.post("/myblog/_version", None).await;
    assert_eq!(done.status, 409, "{}", done.body);
    app.stop().await;
    db.drop().await;
}

/// A retired version whose schema was never built (its migration failed, here on a schema of the
/// same name that is not dstore's) is not migrated by a batch that reaches it (a delete reaches
/// retired versions): the batch, another project's write in it, is applied, and nothing is made
/// for the retired version. Before, the batch failed as a whole and every project waited.
#[tokio::test]
async fn a_batch_reaching_a_retired_version_never_built_applies_the_other_projects_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (db, catalog, projector) = sample_projects(&dir, &["gone", "kept"]).await;
    let (gone, kept) = (ident("gone"), ident("kept"));
    let mut sql = db.sql().await;
    sqlx::query("CREATE SCHEMA gone_v1")
        .execute(&mut sql)
        .await
        .unwrap();
    catalog.retire(&gone, 1).unwrap();
    let id = Uuid::new_v4();
    let tasks = vec![
        delete(&gone, Uuid::new_v4(), 1),
        upsert(&kept, id, 2, sample_doc(id, "kept")),
    ];
    let outcomes = projector
        .apply(&catalog.snapshot(), &tasks)
        .await
        .expect("the batch is applied");
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let stored = projector
        .read(&kept, 1, &ident("sample"), &id)
        .await
        .unwrap();
    assert!(stored.is_some());
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'gone_v1'")
            .fetch_one(&mut sql)
            .await
            .unwrap();
    assert_eq!(tables, 0, "nothing is made for the retired version");
    drop(sql);
    db.drop().await;
}
