//! Measures dstore's projection rate into PostgreSQL beside two baselines, with the same rows in the
//! same database: `PostgresProjector::apply` with batches of tasks, one INSERT per transaction over
//! sqlx, and COPY (text format, one COPY per batch). Prints rows per second; never a timed test.
//!
//!     cargo run --release --bin dstore-pg-bench -- --rows 10000 --batch 1000 --rounds 3
//!
//! The server is `--url` (default `DSTORE_TEST_POSTGRES_URL`, else postgres://postgres@127.0.0.1:5432);
//! a throwaway database is created and dropped.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use uuid::Uuid;

use dstore::blueprint::Ident;
use dstore::catalog::Catalog;
use dstore::config::PostgresSettings;
use dstore::journal::task::{Task, TaskOp, VersionDoc};
use dstore::projector::postgres::ident::quote;
use dstore::projector::postgres::PostgresProjector;
use dstore::projector::{conformance, Projector};

#[derive(Parser)]
struct Args {
    #[arg(
        long,
        env = "DSTORE_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    url: String,
    /// Rows written by each method in each round.
    #[arg(long, default_value_t = 10_000)]
    rows: usize,
    /// Rounds; each method's best round is reported (the machine is shared, so single runs vary).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Tasks per projector batch, rows per COPY.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
}

type Failure = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args = Args::parse();
    let server = args.url.trim_end_matches('/').to_owned();
    let database = format!("dstore_bench_{}", Uuid::new_v4().simple());
    let settings = PostgresSettings {
        url: Some(format!("{server}/{database}").into()),
        max_connections: 4,
        ..PostgresSettings::default()
    };
    let projector = Arc::new(PostgresProjector::new(&settings)?);
    let dir = tempfile_dir()?;
    let catalog = Catalog::open(&dir.join("catalog"))?;
    let projects: Vec<Ident> = ["bench_dstore", "bench_single", "bench_copy"]
        .iter()
        .map(|p| Ident::parse(p))
        .collect::<Result<_, _>>()?;
    for project in &projects {
        let version = conformance::freeze_sample(&catalog, project);
        projector.migrate(project, &version, &[]).await?;
    }
    let docs: Vec<Map<String, Value>> = (0..args.rows)
        .map(|i| conformance::sample_doc(Uuid::new_v4(), &format!("title {i}")))
        .collect();
    println!("dstore-pg-bench: {} rows of the conformance sample blueprint (15 columns, 4 geometries), batches of {}", args.rows, args.batch);

    let mut conn = PgConnection::connect(&format!("{server}/{database}")).await?;
    let (mut projected, mut single, mut copied) = (0f64, 0f64, 0f64);
    for round in 1..=args.rounds.max(1) {
        sqlx::raw_sql(
            "TRUNCATE bench_dstore_v1.samples, bench_dstore_v1._tombstones, bench_single_v1.samples, bench_copy_v1.samples",
        )
        .execute(&mut conn)
        .await?;
        let rates = (
            projection(&projector, &catalog, &projects[0], &docs, args.batch).await?,
            single_row(&mut conn, &docs).await?,
            copy(&mut conn, &docs, args.batch).await?,
        );
        println!(
            "round {round}: dstore {:.0}, single-row {:.0}, copy {:.0} rows/s",
            rates.0, rates.1, rates.2
        );
        projected = projected.max(rates.0);
        single = single.max(rates.1);
        copied = copied.max(rates.2);
        for (schema, name) in [
            ("bench_dstore_v1", "dstore"),
            ("bench_single_v1", "single"),
            ("bench_copy_v1", "copy"),
        ] {
            let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT count(*) FROM {schema}.samples"
            )))
            .fetch_one(&mut conn)
            .await?;
            if count as usize != args.rows {
                return Err(format!("{name} wrote {count} rows instead of {}", args.rows).into());
            }
        }
    }
    conn.close().await?;
    println!("best of {} rounds:", args.rounds.max(1));
    println!("{:<44} {:>12}", "method", "rows/s");
    println!(
        "{:<44} {:>12.0}",
        format!("dstore PostgresProjector::apply ({} tasks)", args.batch),
        projected
    );
    println!(
        "{:<44} {:>12.0}",
        "one INSERT per transaction (sqlx)", single
    );
    println!(
        "{:<44} {:>12.0}",
        format!("COPY FROM STDIN ({} rows per COPY)", args.batch),
        copied
    );
    println!(
        "dstore / COPY = {:.0} % (target >= 50 %); dstore / single-row = {:.1}x (target >= 5x)",
        100.0 * projected / copied,
        projected / single
    );

    projector.pool().close().await;
    let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE {} WITH (FORCE)",
        quote(&database)?
    )))
    .execute(&mut admin)
    .await?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf, Failure> {
    let dir = std::env::temp_dir().join(format!("dstore-pg-bench-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn projection(
    projector: &PostgresProjector,
    catalog: &Catalog,
    project: &Ident,
    docs: &[Map<String, Value>],
    batch: usize,
) -> Result<f64, Failure> {
    let blueprint = Ident::parse("sample")?;
    let tasks: Vec<Task> = docs
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            let id = doc["id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .unwrap_or_else(Uuid::new_v4);
            let revision = i as u64 + 1;
            Task {
                seq: revision,
                project: project.clone(),
                op: TaskOp::Upsert {
                    blueprint: blueprint.clone(),
                    id,
                    revision,
                    docs: vec![VersionDoc::new(1, doc)],
                },
            }
        })
        .collect();
    let started = Instant::now();
    for chunk in tasks.chunks(batch) {
        let outcomes = projector.apply(&catalog.snapshot(), chunk).await?;
        if let Some(Err(e)) = outcomes.into_iter().find(Result::is_err) {
            return Err(e.into());
        }
    }
    Ok(docs.len() as f64 / started.elapsed().as_secs_f64())
}

const COLUMNS: &str = "id, project_version, links, _revision, title, body, owner, place, route, area, day, at, ratio, count, done, extra, tags, stops, counts";

async fn single_row(conn: &mut PgConnection, docs: &[Map<String, Value>]) -> Result<f64, Failure> {
    let sql = format!(
        "INSERT INTO bench_single_v1.samples ({COLUMNS}) VALUES ($1::uuid, $2, $3::uuid[], $4, $5, $6, $7::uuid, \
         ST_SetSRID(ST_GeomFromGeoJSON($8), 4326), ST_SetSRID(ST_GeomFromGeoJSON($9), 4326), ST_SetSRID(ST_GeomFromGeoJSON($10), 4326), \
         $11::date, $12::timestamptz, $13, $14, $15, $16, $17, ST_SetSRID(ST_GeomFromGeoJSON($18), 4326), $19)"
    );
    let started = Instant::now();
    for (i, doc) in docs.iter().enumerate() {
        let text = |key: &str| doc[key].as_str().unwrap_or_default().to_owned();
        let strings = |key: &str| {
            doc[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(text("id"))
            .bind(1i32)
            .bind(strings("links"))
            .bind(i as i64 + 1)
            .bind(text("title"))
            .bind(text("body"))
            .bind(text("owner"))
            .bind(doc["place"].to_string())
            .bind(doc["route"].to_string())
            .bind(doc["area"].to_string())
            .bind(text("day"))
            .bind(format!("{}+00", text("at")))
            .bind(doc["ratio"].as_f64().unwrap_or_default() as f32)
            .bind(doc["count"].as_i64().unwrap_or_default() as i32)
            .bind(doc["done"].as_bool().unwrap_or_default())
            .bind(sqlx::types::Json(doc["extra"].clone()))
            .bind(strings("tags"))
            .bind(multi_point(&doc["stops"]).to_string())
            .bind(
                doc["counts"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_i64().map(|n| n as i32))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default(),
            )
            .execute(&mut *conn)
            .await?;
    }
    Ok(docs.len() as f64 / started.elapsed().as_secs_f64())
}

async fn copy(
    conn: &mut PgConnection,
    docs: &[Map<String, Value>],
    batch: usize,
) -> Result<f64, Failure> {
    let statement = format!("COPY bench_copy_v1.samples ({COLUMNS}) FROM STDIN");
    let started = Instant::now();
    for (n, chunk) in docs.chunks(batch).enumerate() {
        let mut data = String::with_capacity(chunk.len() * 512);
        for (i, doc) in chunk.iter().enumerate() {
            let text = |key: &str| escape(doc[key].as_str().unwrap_or_default());
            let fields = [
                text("id"),
                "1".into(),
                array(&doc["links"]),
                (n * batch + i + 1).to_string(),
                text("title"),
                text("body"),
                text("owner"),
                wkt(&doc["place"]),
                wkt(&doc["route"]),
                wkt(&doc["area"]),
                text("day"),
                format!("{}+00", text("at")),
                doc["ratio"].to_string(),
                doc["count"].to_string(),
                doc["done"].to_string(),
                escape(&doc["extra"].to_string()),
                array(&doc["tags"]),
                wkt(&multi_point(&doc["stops"])),
                array(&doc["counts"]),
            ];
            data.push_str(&fields.join("\t"));
            data.push('\n');
        }
        let mut copy = conn.copy_in_raw(&statement).await?;
        copy.send(data.into_bytes()).await?;
        copy.finish().await?;
    }
    Ok(docs.len() as f64 / started.elapsed().as_secs_f64())
}

fn multi_point(points: &Value) -> Value {
    let coordinates: Vec<Value> = points
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["coordinates"].clone())
        .collect();
    serde_json::json!({"type": "MultiPoint", "coordinates": coordinates})
}

/// COPY text format: backslash, tab, newline and carriage return are escaped.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// A PostgreSQL array literal of scalars, escaped for COPY.
fn array(values: &Value) -> String {
    let items: Vec<String> = values
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| match v {
            Value::String(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            other => other.to_string(),
        })
        .collect();
    escape(&format!("{{{}}}", items.join(",")))
}

/// GeoJSON to EWKT for the geometry types of the sample blueprint.
fn wkt(geometry: &Value) -> String {
    fn position(p: &Value) -> String {
        format!("{} {}", p[0], p[1])
    }
    fn ring(r: &Value) -> String {
        format!(
            "({})",
            r.as_array()
                .into_iter()
                .flatten()
                .map(position)
                .collect::<Vec<_>>()
                .join(",")
        )
    }
    let c = &geometry["coordinates"];
    let body = match geometry["type"].as_str().unwrap_or_default() {
        "Point" => format!("POINT({})", position(c)),
        "LineString" => format!("LINESTRING{}", ring(c)),
        "Polygon" => format!(
            "POLYGON({})",
            c.as_array()
                .into_iter()
                .flatten()
                .map(ring)
                .collect::<Vec<_>>()
                .join(",")
        ),
        "MultiPoint" => format!(
            "MULTIPOINT({})",
            c.as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("({})", position(p)))
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => panic!("no WKT for {other}"),
    };
    format!("SRID=4326;{body}")
}
