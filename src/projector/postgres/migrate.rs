//! Migrations: PostGIS, the version's schema, its bookkeeping tables and one table per blueprint, all
//! in one transaction.
//!
//! DDL is transactional in PostgreSQL, so a migration that fails leaves nothing behind; and since every
//! statement is idempotent, running it again over a schema changed or half-built by hand finishes the
//! job. The version's blueprints are recorded in `_blueprints` so reads need no catalog.

use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use sqlx::AssertSqlSafe;

use super::error::describe;
use super::ident::{comment_owner, legacy_schema_name, quote, schema_name};
use super::read::Shape;
use super::{ddl, write, PostgresProjector};
use crate::blueprint::Ident;
use crate::catalog::Version;
use crate::projector::ProjectorError;

impl PostgresProjector {
    /// Enables PostGIS, or says precisely why it cannot.
    async fn ensure_postgis(&self, conn: &mut PgConnection) -> Result<(), ProjectorError> {
        let (enabled, available, major): (bool, bool, i32) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'postgis'), \
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'), \
                    current_setting('server_version_num')::int / 10000",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| self.failed("check postgis", &e))?;
        if enabled {
            return Ok(());
        }
        if !available {
            return Err(ProjectorError::transient(format!(
                "postgis is not installed on the postgresql server at {}; install it \
                 (Debian/Ubuntu: apt-get install postgresql-{major}-postgis-3) and freeze again",
                self.target()
            )));
        }
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS postgis")
            .execute(&mut *conn)
            .await
            .map_err(|e| {
                ProjectorError::transient(format!(
                    "cannot enable postgis in {}: {}; a superuser can run CREATE EXTENSION postgis there",
                    self.target(),
                    describe(&e)
                ))
            })?;
        Ok(())
    }

    /// Whether `schema`, carrying `comment`, is this deployment's schema of a version of `project`
    /// (or an older dstore's, unmarked): the only schemas dstore writes into or drops.
    pub(super) fn owns(&self, schema: &str, comment: Option<&str>, project: &Ident) -> bool {
        let version = schema
            .rsplit_once("_v")
            .and_then(|(_, n)| n.parse::<u32>().ok());
        match (version, comment) {
            (Some(version), Some(comment)) => comment_owner(comment, project, version)
                .is_some_and(|owner| self.deployment.admits(owner)),
            _ => false,
        }
    }

    /// Makes sure `schema` is dstore's own for this project and version, and this deployment's,
    /// before anything is written into it: a schema of that name must carry the comment dstore
    /// gives its schemas (one an older dstore made without naming its deployment is taken over),
    /// and a schema under the name an older dstore gave long project names is renamed to today's
    /// name.
    async fn claim_schema(
        &self,
        conn: &mut PgConnection,
        project: &Ident,
        version: u32,
        schema: &str,
    ) -> Result<(), ProjectorError> {
        let what = format!("check the owner of schema {schema}");
        let comment = |name: String| {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
            )
            .bind(name)
        };
        let found = comment(schema.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.failed(&what, &e))?;
        if let Some(found) = found {
            let found = found.unwrap_or_default();
            return match comment_owner(&found, project, version) {
                Some(owner) if self.deployment.admits(owner) => Ok(()),
                Some(owner) => Err(ProjectorError::permanent(format!(
                    "schema {schema} in {} belongs to another dstore deployment (deployment {}; this \
                     one is {}): two deployments cannot share a database. Give this one its own \
                     (postgresql.database / POSTGRESQL_DATABASE), or drop that deployment's schemas \
                     if it is gone, then freeze again",
                    self.target(),
                    owner.unwrap_or_default(),
                    self.deployment.get().unwrap_or_default(),
                ))),
                None => Err(ProjectorError::permanent(format!(
                    "schema {schema} exists but is not dstore's schema of project {project}, version {version} \
                     (its comment is {found:?}); rename or drop it, then freeze again"
                ))),
            };
        }
        let Some(legacy) = legacy_schema_name(project, version) else {
            return Ok(());
        };
        let legacy_comment = comment(legacy.clone())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.failed(&what, &e))?;
        if let Some(Some(found)) = legacy_comment {
            if self.owns(&legacy, Some(&found), project) {
                let rename = format!(
                    "ALTER SCHEMA {} RENAME TO {}",
                    quote(&legacy)?,
                    quote(schema)?
                );
                sqlx::raw_sql(AssertSqlSafe(rename))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| self.failed(&what, &e))?;
                tracing::info!(from = %legacy, to = %schema, "schema renamed to its current name");
            }
        }
        Ok(())
    }

    /// Whether this deployment's schema of this project version exists (under today's name or an
    /// older dstore's): a migration that failed left nothing, since DDL is transactional.
    pub(super) async fn is_built(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<bool, ProjectorError> {
        let schema = schema_name(project, version);
        let names: Vec<String> = std::iter::once(schema.clone())
            .chain(legacy_schema_name(project, version))
            .collect();
        let found: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT nspname::text, obj_description(oid, 'pg_namespace') FROM pg_namespace \
             WHERE nspname = ANY($1)",
        )
        .bind(names)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.failed(&format!("look for schema {schema}"), &e))?;
        Ok(found
            .iter()
            .any(|(name, comment)| self.owns(name, comment.as_deref(), project)))
    }

    pub(super) async fn migrate_version(
        &self,
        project: &Ident,
        version: &Version,
    ) -> Result<(), ProjectorError> {
        self.ensure_database().await?;
        let schema = schema_name(project, version.number);
        let what = format!("migrate {schema}");
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.failed(&what, &e))?;
        self.ensure_postgis(&mut tx).await?;
        self.claim_schema(&mut tx, project, version.number, &schema)
            .await?;
        let mut statements =
            ddl::schema_statements(&schema, project, version.number, self.deployment.get())?;
        for blueprint in version.blueprints.values() {
            statements.extend(ddl::table_statements(&schema, blueprint)?);
        }
        for statement in statements {
            sqlx::raw_sql(AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.failed(&what, &e))?;
        }
        let register = write::register_sql(&schema)?;
        for (name, blueprint) in &version.blueprints {
            sqlx::query(AssertSqlSafe(register.clone()))
                .bind(name.as_str())
                .bind(blueprint.table.as_str())
                .bind(Json(Shape::of(blueprint)))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.failed(&what, &e))?;
        }
        tx.commit().await.map_err(|e| self.failed(&what, &e))?;
        self.migrated
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(schema);
        Ok(())
    }
}
