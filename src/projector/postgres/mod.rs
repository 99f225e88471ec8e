//! The PostgreSQL/PostGIS projector: a schema per project version (`myblog_v2`), a table per
//! blueprint, every item as that version sees it.
//!
//! Invariants: per item and version the table keeps the row of the highest revision seen, and a
//! delete leaves a tombstone in the schema's `_tombstones`, so redelivered, stale or late tasks never
//! move an item backwards or bring it back. Failures the server may recover from are transient (the
//! journal keeps the tasks); only rows PostgreSQL refuses for good are permanent, one task at a time.
//! A down or misconfigured server never stops dstore: the pool is lazy, the database is created on
//! first use, and `health` explains what to fix. Names reach SQL only through [`ident::quote`].

mod connect;
mod ddl;
mod error;
pub mod ident;
mod migrate;
mod plan;
mod read;
mod values;
mod write;

pub use ddl::{relation_names, row_bytes, row_bytes_at_least, row_past_limit, MAX_ROW_BYTES};

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, Postgres};
use sqlx::types::Json;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

pub use error::{sqlstate, PgError};

use super::{Deployment, Health, Outcome, Projector, ProjectorError, ProjectorKind};
use crate::blueprint::Ident;
use crate::catalog::{Snapshot, Version};
use crate::config::PostgresSettings;
use crate::journal::task::Task;
use error::{classify, Failure};
use ident::{qualified, quote, schema_name, schema_pattern};
use read::Shape;

pub struct PostgresProjector {
    pool: PgPool,
    options: PgConnectOptions,
    /// Set once the configured database is known to exist; cleared when it disappears.
    database_ready: AtomicBool,
    /// Schemas migrated by this process, so writes into a version never migrated here (the
    /// projector was added after the freeze, or the schema was dropped by hand) migrate it first.
    migrated: Mutex<HashSet<String>>,
    /// How many transactions a large batch is split into, by item id (`plan::split`).
    lanes: usize,
    /// Tables whose last `COPY` of new rows met existing ones (`write`).
    copy_pauses: write::CopyPauses,
    /// Whose schemas this projector makes and uses (`migrate`).
    deployment: Deployment,
}

/// The connection a batch is written on. A batch that ends early (it failed, or its step was
/// dropped: a broker link lost mid-batch) closes the connection instead of giving it back to the
/// pool: a `COPY` cut short leaves replies on it that the pool would not wait for, and every later
/// statement on it would read the answer of the one before.
struct Writing {
    conn: PoolConnection<Postgres>,
    done: bool,
}

impl Drop for Writing {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

/// A batch holding fewer rows than this is one transaction: under small writes a second commit
/// costs more than it saves.
const LANE_MIN_ROWS: usize = 1000;

impl PostgresProjector {
    /// Builds the projector without connecting; only malformed settings are an error.
    pub fn new(settings: &PostgresSettings) -> Result<PostgresProjector, PgError> {
        let options = connect::options(settings)?;
        Ok(PostgresProjector {
            pool: connect::lazy_pool(&options, settings.max_connections),
            options,
            database_ready: AtomicBool::new(false),
            migrated: Mutex::new(HashSet::new()),
            lanes: settings
                .parallel_transactions
                .clamp(1, settings.max_connections.max(1)) as usize,
            copy_pauses: write::CopyPauses::default(),
            deployment: Deployment::default(),
        })
    }

    /// How many rows this projector wrote by `COPY` (see `write`), rather than by the upsert.
    pub fn rows_copied(&self) -> u64 {
        self.copy_pauses.rows.load(Ordering::Relaxed)
    }

    /// The connection pool (benchmarks and tests query the store through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `host:port/database`.
    pub fn target(&self) -> String {
        connect::target(&self.options)
    }

    /// Checks the server once at startup, creates the database when missing, and logs the result.
    pub async fn announce(&self) {
        match self.ensure_database().await {
            Ok(()) => tracing::info!(target = %self.target(), "postgresql projector connected"),
            Err(error) => tracing::warn!(
                %error,
                "postgresql projector cannot use its store; its tasks wait in the journal until it can"
            ),
        }
    }

    /// Forgets the schemas matching `pattern` (all of them with `None`) as migrated.
    fn forget_migrations(&self, pattern: Option<&str>) {
        let mut migrated = self
            .migrated
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match pattern {
            Some(pattern) => {
                let pattern = regex::Regex::new(pattern).ok();
                migrated.retain(|schema| !pattern.as_ref().is_some_and(|p| p.is_match(schema)));
            }
            None => migrated.clear(),
        }
    }

    fn is_migrated(&self, schema: &str) -> bool {
        self.migrated
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(schema)
    }

    /// Turns a failed statement into a projector error, noting what it reveals about the store.
    fn failed(&self, what: &str, error: &sqlx::Error) -> ProjectorError {
        match classify(error) {
            Failure::Missing => self.forget_migrations(None),
            Failure::NoDatabase => self.database_ready.store(false, Ordering::SeqCst),
            Failure::Row | Failure::Transient => {}
        }
        if error.as_database_error().is_none() {
            // Connection trouble: the next attempt checks the server directly and explains it.
            self.database_ready.store(false, Ordering::SeqCst);
            return ProjectorError::transient(format!(
                "postgresql: {what}: {}",
                connect::explain(&self.options, error)
            ));
        }
        error::transient(what, error)
    }

    /// Makes sure the configured database exists, creating it on first use. Connects directly, not
    /// through the pool, so a refused connection is reported at once and with its cause.
    async fn ensure_database(&self) -> Result<(), ProjectorError> {
        if self.database_ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        match connect::probe(&self.options).await {
            Ok(()) => {}
            Err(Some(error)) if classify(&error) == Failure::NoDatabase => {
                connect::create_database(&self.options)
                    .await
                    .map_err(ProjectorError::transient)?;
            }
            Err(Some(error)) => {
                return Err(ProjectorError::transient(connect::explain(
                    &self.options,
                    &error,
                )))
            }
            Err(None) => return Err(ProjectorError::transient(connect::no_answer(&self.options))),
        }
        self.database_ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Writes groups in one transaction; answers each of the batch's `tasks` outcomes (refused
    /// rows), or why the transaction failed as a whole. Lanes of one batch run this at the same
    /// time; a lane that fails makes the batch fail, and the lanes that committed are written again
    /// when it is retried, which the revision guards make harmless.
    async fn write(
        &self,
        groups: &[plan::Group<'_>],
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        let mut outcomes: Vec<Outcome> = (0..tasks.len()).map(|_| Ok(())).collect();
        let mut writing = Writing {
            conn: self
                .pool
                .acquire()
                .await
                .map_err(|e| self.failed("connect for a batch", &e))?,
            done: false,
        };
        let mut tx = sqlx::Connection::begin(&mut *writing.conn)
            .await
            .map_err(|e| self.failed("begin a batch", &e))?;
        for group in groups {
            write::apply_group(&mut tx, group, &self.copy_pauses, &mut outcomes)
                .await
                .map_err(|abort| {
                    let error = self.failed(&abort.what, &abort.error);
                    match group.first_task() {
                        Some(task) => error.of_project(&tasks[task].project),
                        None => error,
                    }
                })?;
        }
        tx.commit()
            .await
            .map_err(|e| self.failed("commit a batch", &e))?;
        writing.done = true;
        Ok(outcomes)
    }
}

#[async_trait]
impl Projector for PostgresProjector {
    fn name(&self) -> &'static str {
        ProjectorKind::Postgresql.name()
    }

    async fn migrate(
        &self,
        project: &Ident,
        version: &Version,
        _: &[u32],
    ) -> Result<(), ProjectorError> {
        self.migrate_version(project, version).await
    }

    fn work_for(&self, deployment: &str) -> bool {
        self.deployment.set(deployment)
    }

    async fn apply(
        &self,
        snapshot: &Snapshot,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        let plan = plan::plan(snapshot, tasks);
        let mut outcomes = plan.outcomes;
        if plan.groups.is_empty() {
            return Ok(outcomes);
        }
        self.ensure_database().await?;
        // Schemas of retired versions never built here: nothing of theirs to write or delete.
        let mut unbuilt = Vec::new();
        for (project, version) in &plan.versions {
            let schema = schema_name(project, version.number);
            if self.is_migrated(&schema) {
                continue;
            }
            // A retired version is migrated no more (its `Migrate` task is settled without it):
            // only one built before its retirement still takes the writes that reach it (deletes,
            // so it keeps no deleted item). Migrating one that never was could only fail again, as
            // when PostgreSQL refuses its blueprint, for a version nobody projects into.
            let retired = snapshot
                .projects
                .get(*project)
                .is_some_and(|p| p.is_retired(version.number));
            if retired && !self.is_built(project, version.number).await? {
                unbuilt.push(schema);
                continue;
            }
            self.migrate_version(project, version).await?;
        }
        let groups: Vec<plan::Group<'_>> = plan
            .groups
            .into_iter()
            .filter(|group| !unbuilt.contains(&group.schema))
            .collect();
        if groups.is_empty() {
            return Ok(outcomes);
        }
        let lanes = plan::split(groups, self.lanes, LANE_MIN_ROWS);
        let written =
            futures::future::join_all(lanes.iter().map(|groups| self.write(groups, tasks))).await;
        for lane in written {
            for (outcome, refused) in outcomes.iter_mut().zip(lane?) {
                if outcome.is_ok() {
                    *outcome = refused;
                }
            }
        }
        Ok(outcomes)
    }

    async fn drop_project(&self, project: &Ident) -> Result<(), ProjectorError> {
        let pattern = schema_pattern(project);
        let what = format!("drop the schemas of {project}");
        // Only schemas whose comment says they are this project's, made by this deployment or by
        // an older dstore that did not say: a schema someone else named like `myblog_v9`, or
        // another deployment's in the same database, stays.
        let found: Vec<(String, Option<String>)> = match sqlx::query_as(
            "SELECT nspname::text, obj_description(oid, 'pg_namespace') FROM pg_namespace \
             WHERE nspname ~ $1 ORDER BY 1",
        )
        .bind(&pattern)
        .fetch_all(&self.pool)
        .await
        {
            Ok(found) => found,
            // No database yet: nothing was ever projected, so nothing to drop.
            Err(e) if classify(&e) == Failure::NoDatabase => return Ok(()),
            Err(e) => return Err(self.failed(&what, &e)),
        };
        let schemas: Vec<String> = found
            .into_iter()
            .filter(|(schema, comment)| self.owns(schema, comment.as_deref(), project))
            .map(|(schema, _)| schema)
            .collect();
        // One schema at a time, each in a transaction of its own: dropping every table of a
        // project with many versions in one would take a lock per table, index and type at once,
        // past what PostgreSQL's lock table holds (53200), and the drop would fail every time.
        // A drop cut off half-way is finished when it is tried again.
        for schema in &schemas {
            let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(schema)?);
            sqlx::raw_sql(AssertSqlSafe(statement))
                .execute(&self.pool)
                .await
                .map_err(|e| self.failed(&what, &e))?;
        }
        self.forget_migrations(Some(&pattern));
        Ok(())
    }

    async fn read(
        &self,
        project: &Ident,
        version: u32,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Value>, ProjectorError> {
        let schema = schema_name(project, version);
        let what = format!("read {schema}");
        let lookup = format!(
            "SELECT definition FROM {} WHERE blueprint = $1",
            qualified(&schema, ddl::BLUEPRINTS)?
        );
        let shape: Option<Json<Shape>> = match sqlx::query_scalar(AssertSqlSafe(lookup))
            .bind(blueprint.as_str())
            .fetch_optional(&self.pool)
            .await
        {
            Ok(shape) => shape,
            Err(e) if matches!(classify(&e), Failure::Missing | Failure::NoDatabase) => {
                return Ok(None)
            }
            Err(e) => return Err(self.failed(&what, &e)),
        };
        let Some(Json(shape)) = shape else {
            return Ok(None);
        };
        let select = read::select_sql(&schema, &shape)?;
        let row: Option<Json<Map<String, Value>>> = match sqlx::query_scalar(AssertSqlSafe(select))
            .bind(*id)
            .fetch_optional(&self.pool)
            .await
        {
            Ok(row) => row,
            Err(e) if classify(&e) == Failure::Missing => return Ok(None),
            Err(e) => return Err(self.failed(&what, &e)),
        };
        Ok(row.map(|Json(row)| Value::Object(values::document(row, &shape.columns))))
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![(
            "dstore_postgresql_rows_copied_total",
            "Rows written into PostgreSQL by COPY (new rows of large batches) rather than by the upsert.",
            self.rows_copied(),
        )]
    }

    fn preview(&self, project: &Ident, version: &Version) -> Value {
        let schema = schema_name(project, version.number);
        let mut statements =
            ddl::schema_statements(&schema, project, version.number, self.deployment.get())
                .unwrap_or_default();
        for blueprint in version.blueprints.values() {
            statements.extend(ddl::table_statements(&schema, blueprint).unwrap_or_default());
        }
        serde_json::json!({"schema": schema, "statements": statements})
    }

    async fn health(&self) -> Health {
        if let Err(error) = self.ensure_database().await {
            return Health {
                reachable: false,
                detail: error.message,
            };
        }
        let probe = async {
            let version: String = sqlx::query_scalar("SELECT current_setting('server_version')")
                .fetch_one(&self.pool)
                .await?;
            Ok::<_, sqlx::Error>(version)
        };
        match tokio::time::timeout(Duration::from_secs(3), probe).await {
            Ok(Ok(version)) => Health {
                reachable: true,
                detail: format!("postgresql {version} at {}", self.target()),
            },
            Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) => Health {
                reachable: false,
                detail: connect::diagnose(&self.options).await,
            },
            Ok(Err(error)) => Health {
                reachable: false,
                detail: connect::explain(&self.options, &error),
            },
        }
    }
}
