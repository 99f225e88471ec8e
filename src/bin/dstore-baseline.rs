//! The two baselines dstore's write path is measured against (`scripts/bench.sh`), as servers the
//! same load generator drives:
//!
//! - `ceiling`: an actix-web handler that reads the item's JSON body, parses it and answers, with
//!   nothing stored: what the machine's HTTP and JSON can do at best.
//! - `floor`: the same handler doing one durable PostgreSQL upsert per request in its own
//!   transaction: what a user would write instead of dstore.
//!
//! Both take `PUT /{project}/{blueprint}/{id}` like dstore and answer `{"success": true}`.

use actix_web::{web, App, HttpResponse, HttpServer};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "dstore-baseline",
    about = "Baseline servers for dstore's benchmarks"
)]
struct Args {
    #[command(subcommand)]
    kind: Kind,
    /// Port to listen on (127.0.0.1).
    #[arg(long, global = true, default_value_t = 2030)]
    port: u16,
    /// HTTP worker threads (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    workers: usize,
}

#[derive(Subcommand)]
enum Kind {
    /// Parse the body and answer.
    Ceiling,
    /// One durable upsert per request.
    Floor {
        /// The database (a table `bench_floor` is created in it).
        #[arg(long, env = "DSTORE_TEST_POSTGRES_URL")]
        url: String,
    },
}

/// The benchmark item: what `scripts/bench.sh` sends.
#[derive(Deserialize)]
struct Item {
    #[allow(dead_code)]
    project_version: u32,
    title: Option<String>,
    views: Option<i32>,
    date_created: String,
}

async fn ceiling(body: web::Bytes) -> HttpResponse {
    match serde_json::from_slice::<Item>(&body) {
        Ok(_) => HttpResponse::Ok().json(serde_json::json!({"success": true})),
        Err(e) => HttpResponse::BadRequest().body(e.to_string()),
    }
}

async fn floor(
    pool: web::Data<PgPool>,
    path: web::Path<(String, String, Uuid)>,
    body: web::Bytes,
) -> HttpResponse {
    let item = match serde_json::from_slice::<Item>(&body) {
        Ok(item) => item,
        Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
    };
    let written = sqlx::query(
        "INSERT INTO bench_floor (id, title, views, date_created) VALUES ($1, $2, $3, $4::timestamptz) \
         ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, views = EXCLUDED.views, \
         date_created = EXCLUDED.date_created",
    )
    .bind(path.2)
    .bind(item.title)
    .bind(item.views)
    .bind(item.date_created)
    .execute(pool.get_ref())
    .await;
    match written {
        Ok(_) => HttpResponse::Ok().json(serde_json::json!({"success": true})),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    actix_web::rt::System::new().block_on(async move {
        match args.kind {
            Kind::Ceiling => {
                HttpServer::new(|| {
                    App::new().route("/{project}/{blueprint}/{id}", web::put().to(ceiling))
                })
                .workers(workers)
                .backlog(4096)
                .bind(("127.0.0.1", args.port))?
                .run()
                .await
            }
            Kind::Floor { url } => {
                let pool = PgPoolOptions::new()
                    .max_connections(64)
                    .connect(&url)
                    .await
                    .map_err(std::io::Error::other)?;
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS bench_floor (id UUID PRIMARY KEY, title TEXT, \
                     views INTEGER, date_created TIMESTAMPTZ NOT NULL)",
                )
                .execute(&pool)
                .await
                .map_err(std::io::Error::other)?;
                let pool = web::Data::new(pool);
                HttpServer::new(move || {
                    App::new()
                        .app_data(pool.clone())
                        .route("/{project}/{blueprint}/{id}", web::put().to(floor))
                })
                .workers(workers)
                .backlog(4096)
                .bind(("127.0.0.1", args.port))?
                .run()
                .await
            }
        }
    })
}
