//! The catalog in PostgreSQL: loading it, locking a project for an edit, persisting what an edit
//! wrote, forgetting a dropped project, and the listener that keeps a node's copy fresh.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::{unavailable, PgStorage};
use crate::blueprint::Ident;
use crate::catalog::edit::Write;
use crate::catalog::{Project, Snapshot, Version, VersionStatus, WorkingCopy};
use crate::storage::StorageError;

fn corrupt(what: &str, error: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("postgresql storage: {what} is unreadable: {error}"))
}

/// Every live project.
pub async fn load_all(pool: &PgPool) -> Result<Snapshot, StorageError> {
    let mut projects: BTreeMap<Ident, Project> = BTreeMap::new();
    let rows = sqlx::query("SELECT name, epoch, working FROM projects WHERE live")
        .fetch_all(pool)
        .await
        .map_err(|e| unavailable("read the catalog", &e))?;
    for row in rows {
        let name: String = row.get("name");
        let Ok(name) = Ident::parse(&name) else {
            continue;
        };
        let mut project = Project::new(name.clone());
        project.epoch = row.get::<i64, _>("epoch") as u64;
        let Json(working): Json<WorkingCopy> = row
            .try_get("working")
            .map_err(|e| corrupt("a working copy", e))?;
        project.working = working;
        projects.insert(name, project);
    }
    let versions = sqlx::query(
        "SELECT v.project, v.body FROM versions v JOIN projects p ON p.name = v.project \
         WHERE p.live ORDER BY v.project, v.number",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| unavailable("read the catalog", &e))?;
    for row in versions {
        let name: String = row.get("project");
        let Json(version): Json<Version> =
            row.try_get("body").map_err(|e| corrupt("a version", e))?;
        if let Some(p) = projects.get_mut(name.as_str()) {
            p.versions.push(Arc::new(version));
        }
    }
    let statuses = sqlx::query(
        "SELECT s.project, s.number, s.status FROM version_status s \
         JOIN projects p ON p.name = s.project WHERE p.live",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| unavailable("read the catalog", &e))?;
    for row in statuses {
        let name: String = row.get("project");
        let Json(status): Json<VersionStatus> = row
            .try_get("status")
            .map_err(|e| corrupt("a version status", e))?;
        if let Some(p) = projects.get_mut(name.as_str()) {
            p.status.insert(row.get::<i32, _>("number") as u32, status);
        }
    }
    Ok(Snapshot {
        epoch: 0,
        projects: projects
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
    })
}

/// One project as stored, if it is live; `lock` takes its row lock (inside a transaction).
async fn read_project(
    conn: &mut PgConnection,
    name: &Ident,
    lock: bool,
) -> Result<Option<Project>, StorageError> {
    let query = if lock {
        "SELECT epoch, live, working FROM projects WHERE name = $1 FOR UPDATE"
    } else {
        "SELECT epoch, live, working FROM projects WHERE name = $1"
    };
    let Some(row) = sqlx::query(query)
        .bind(name.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| unavailable("read a project", &e))?
    else {
        return Ok(None);
    };
    if !row.get::<bool, _>("live") {
        return Ok(None);
    }
    let mut project = Project::new(name.clone());
    project.epoch = row.get::<i64, _>("epoch") as u64;
    let Json(working): Json<WorkingCopy> = row
        .try_get("working")
        .map_err(|e| corrupt("a working copy", e))?;
    project.working = working;
    let versions: Vec<Json<Version>> =
        sqlx::query_scalar("SELECT body FROM versions WHERE project = $1 ORDER BY number")
            .bind(name.as_str())
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| unavailable("read a project's versions", &e))?;
    project.versions = versions.into_iter().map(|v| Arc::new(v.0)).collect();
    let statuses = sqlx::query("SELECT number, status FROM version_status WHERE project = $1")
        .bind(name.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| unavailable("read a project's versions", &e))?;
    for row in statuses {
        let Json(status): Json<VersionStatus> = row
            .try_get("status")
            .map_err(|e| corrupt("a version status", e))?;
        project
            .status
            .insert(row.get::<i32, _>("number") as u32, status);
    }
    Ok(Some(project))
}

/// One project as stored, if it is live.
pub async fn load_project(
    conn: &mut PgConnection,
    name: &Ident,
) -> Result<Option<Project>, StorageError> {
    read_project(conn, name, false).await
}

/// Takes a project's row lock for the rest of the transaction and answers the project. With
/// `create`, a project that does not exist (or was dropped) is created with an empty working copy.
pub async fn lock_project(
    tx: &mut PgConnection,
    name: &Ident,
    create: bool,
) -> Result<Project, StorageError> {
    if create {
        let empty = Json(WorkingCopy::default());
        sqlx::query(
            "INSERT INTO projects (name, working) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET live = TRUE, working = $2 WHERE NOT projects.live",
        )
        .bind(name.as_str())
        .bind(&empty)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("create a project", &e))?;
    }
    read_project(tx, name, true)
        .await?
        .ok_or_else(|| StorageError::NotFound(format!("project {name:?} does not exist")))
}

/// Persists what an edit wrote; moves the project's epoch when its live versions changed.
pub async fn persist(
    tx: &mut PgConnection,
    project: &mut Project,
    writes: &[Write],
) -> Result<(), StorageError> {
    let name = project.name.as_str();
    for write in writes {
        let result = match write {
            Write::WorkingCopy => {
                sqlx::query("UPDATE projects SET working = $2 WHERE name = $1")
                    .bind(name)
                    .bind(Json(&project.working))
                    .execute(&mut *tx)
                    .await
            }
            Write::Version(n) => {
                let version = project.version(*n).expect("written version exists");
                sqlx::query(
                    "INSERT INTO versions (project, number, body) VALUES ($1, $2, $3) \
                     ON CONFLICT (project, number) DO UPDATE SET body = EXCLUDED.body",
                )
                .bind(name)
                .bind(*n as i32)
                .bind(Json(version.as_ref()))
                .execute(&mut *tx)
                .await
            }
            Write::Status(n) => {
                sqlx::query(
                    "INSERT INTO version_status (project, number, status) VALUES ($1, $2, $3) \
                     ON CONFLICT (project, number) DO UPDATE SET status = EXCLUDED.status",
                )
                .bind(name)
                .bind(*n as i32)
                .bind(Json(&project.status[n]))
                .execute(&mut *tx)
                .await
            }
        };
        result.map_err(|e| unavailable("write the catalog", &e))?;
    }
    if writes.iter().any(|w| w.moves_epoch()) {
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE projects SET epoch = epoch + 1 WHERE name = $1 RETURNING epoch",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| unavailable("move the project's epoch", &e))?;
        project.epoch = epoch as u64;
    }
    Ok(())
}

/// Forgets a dropped project: its catalog, items, back-fills and dead letters. The row stays (not
/// live), so the project's revisions and epochs keep growing if it is made again; its journal stays
/// until every projector has applied the drop.
pub async fn forget(tx: &mut PgConnection, name: &Ident) -> Result<(), StorageError> {
    sqlx::query(
        "UPDATE projects SET live = FALSE, epoch = epoch + 1, working = $2 WHERE name = $1",
    )
    .bind(name.as_str())
    .bind(Json(WorkingCopy::default()))
    .execute(&mut *tx)
    .await
    .map_err(|e| unavailable("drop a project", &e))?;
    for table in [
        "versions",
        "version_status",
        "items",
        "backfills",
        "dead_letters",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE project = $1"
        )))
        .bind(name.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("drop a project", &e))?;
    }
    Ok(())
}

/// Keeps the node's catalog fresh: reloads a project when another node notifies a change, and the
/// whole catalog after every reconnection (notifications may have been missed meanwhile).
pub async fn listen(storage: Weak<PgStorage>) {
    let mut attempt = 0;
    loop {
        let Some(node) = storage.upgrade() else {
            return;
        };
        let listener = async {
            let mut listener = PgListener::connect_with(node.pool()).await?;
            listener.listen(&node.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "catalog listener cannot connect; retrying");
                drop(node);
                tokio::time::sleep(crate::projector::backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        if let Err(error) = node.refresh_catalog_quietly().await {
            tracing::warn!(%error, "cannot reload the catalog");
        }
        drop(node);
        loop {
            let notification =
                tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await;
            let Some(node) = storage.upgrade() else {
                return;
            };
            match notification {
                // Quiet: check the node is still wanted, and listen on.
                Err(_) => continue,
                Ok(Ok(Some(notification))) => {
                    if let Ok(project) = Ident::parse(notification.payload()) {
                        if let Err(error) = node.reload(&project).await {
                            tracing::warn!(%project, %error, "cannot reload a project's catalog");
                        }
                    }
                }
                // The connection was lost and re-established: anything may have been missed.
                Ok(Ok(None)) => {
                    let _ = node.refresh_catalog_quietly().await;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "catalog listener lost its connection");
                    break;
                }
            }
        }
    }
}

impl PgStorage {
    async fn refresh_catalog_quietly(&self) -> Result<(), StorageError> {
        use crate::storage::Storage;
        self.refresh_catalog().await
    }
}
