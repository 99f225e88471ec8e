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
use super::ident::{legacy_schema_name, quote, schema_comment, schema_name};
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

    /// Makes sure `schema` is dstore's own for this project and version before anything is written
    /// into it: a schema of that name must carry the comment dstore gives its schemas, and a schema
    /// under the name an older dstore gave long project names is renamed to today's name.
    async fn claim_schema(
        &self,
        conn: &mut PgConnection,
        project: &Ident,
        version: u32,
        schema: &str,
    ) -> Result<(), ProjectorError> {
        let what = format!("check the owner of schema {schema}");
        let expected = schema_comment(project, version);
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
        match found {
            Some(Some(c)) if c == expected => return Ok(()),
            Some(c) => {
                return Err(ProjectorError::permanent(format!(
                    "schema {schema} exists but is not dstore's schema of project {project}, version {version} \
                     (its comment is {:?}); rename or drop it, then freeze again",
                    c.unwrap_or_default()
                )))
            }
            None => {}
        }
        let Some(legacy) = legacy_schema_name(project, version) else {
            return Ok(());
        };
        let legacy_comment = comment(legacy.clone())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.failed(&what, &e))?;
        if legacy_comment == Some(Some(expected)) {
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
        Ok(())
    }

    /// Whether dstore's schema of this project version exists (under today's name or an older
    /// dstore's): a migration that failed left nothing, since DDL is transactional.
    pub(super) async fn is_built(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<bool, ProjectorError> {
        let schema = schema_name(project, version);
        let names: Vec<String> = std::iter::once(schema.clone())
            .chain(legacy_schema_name(project, version))
            .collect();
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = ANY($1) \
             AND obj_description(oid, 'pg_namespace') = $2)",
        )
        .bind(names)
        .bind(schema_comment(project, version))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.failed(&format!("look for schema {schema}"), &e))
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
        let mut statements = ddl::schema_statements(&schema, project, version.number)?;
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
