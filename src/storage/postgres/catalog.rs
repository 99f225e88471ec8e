//! The catalog in PostgreSQL: loading it, locking a project for an edit, persisting what an edit
//! wrote, forgetting a dropped project, and the listener that keeps a node's copy fresh.
//!
//! Every change of a project's records raises its `changes` counter (its stamp); a node replaces
//! its copy of a project only by one with a stamp at least as high, so a slow full reload never
//! undoes an edit published after it started.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::{unavailable, within, PgStorage};
use crate::blueprint::Ident;
use crate::catalog::edit::{self, Write};
use crate::catalog::{Project, Version, VersionStatus, WorkingCopy};
use crate::storage::StorageError;

/// A catalog row this build cannot decode, named: a node does not start (or serve the project)
/// rather than go on without a project's versions.
fn corrupt(what: String, error: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!(
        "postgresql storage: {what} is unreadable ({error}): a newer dstore wrote it; run the \
         newer dstore on every node"
    ))
}

/// A project as a node reads it: `stamp` counts its catalog changes, and `project` is `None` when
/// it does not exist or was dropped.
pub struct Loaded {
    pub name: Ident,
    pub stamp: u64,
    pub project: Option<Project>,
}

fn working_copy(row: &sqlx::postgres::PgRow, name: &Ident) -> Result<WorkingCopy, StorageError> {
    let Json(working): Json<WorkingCopy> = row
        .try_get("working")
        .map_err(|e| corrupt(format!("the working copy of project {name:?}"), e))?;
    Ok(working)
}

/// Every project the database knows, dropped ones included (so a node forgets them).
pub async fn load_all(pool: &super::Bounded) -> Result<Vec<Loaded>, StorageError> {
    let mut projects: BTreeMap<Ident, Loaded> = BTreeMap::new();
    let rows = super::bounded::read_twice(|| {
        sqlx::query("SELECT name, epoch, changes, live, working FROM projects").fetch_all(pool)
    })
    .await
    .map_err(|e| unavailable("read the catalog", &e))?;
    for row in rows {
        let Ok(name) = Ident::parse(&row.get::<String, _>("name")) else {
            continue;
        };
        let project = if row.get::<bool, _>("live") {
            let mut project = Project::new(name.clone());
            project.epoch = row.get::<i64, _>("epoch") as u64;
            project.working = working_copy(&row, &name)?;
            Some(project)
        } else {
            None
        };
        let stamp = row.get::<i64, _>("changes") as u64;
        projects.insert(
            name.clone(),
            Loaded {
                name,
                stamp,
                project,
            },
        );
    }
    let versions =
        sqlx::query("SELECT project, number, body FROM versions ORDER BY project, number")
            .fetch_all(pool)
            .await
            .map_err(|e| unavailable("read the catalog", &e))?;
    for row in versions {
        let name: String = row.get("project");
        let Json(version): Json<Version> = row.try_get("body").map_err(|e| {
            let number: i32 = row.get("number");
            corrupt(format!("version {number} of project {name:?}"), e)
        })?;
        if let Some(p) = projects
            .get_mut(name.as_str())
            .and_then(|l| l.project.as_mut())
        {
            p.versions.push(Arc::new(version));
        }
    }
    let statuses = sqlx::query("SELECT project, number, status FROM version_status")
        .fetch_all(pool)
        .await
        .map_err(|e| unavailable("read the catalog", &e))?;
    for row in statuses {
        let name: String = row.get("project");
        let Json(status): Json<VersionStatus> = row.try_get("status").map_err(|e| {
            let number: i32 = row.get("number");
            corrupt(
                format!("the status of version {number} of project {name:?}"),
                e,
            )
        })?;
        if let Some(p) = projects
            .get_mut(name.as_str())
            .and_then(|l| l.project.as_mut())
        {
            p.status.insert(row.get::<i32, _>("number") as u32, status);
        }
    }
    Ok(projects.into_values().collect())
}

/// One project as stored; `lock` takes its row lock (inside a transaction).
async fn read_project(
    conn: &mut PgConnection,
    name: &Ident,
    lock: bool,
) -> Result<Loaded, StorageError> {
    let query = if lock {
        "SELECT epoch, changes, live, working FROM projects WHERE name = $1 FOR UPDATE"
    } else {
        "SELECT epoch, changes, live, working FROM projects WHERE name = $1"
    };
    let row = sqlx::query(query)
        .bind(name.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| unavailable("read a project", &e))?;
    let mut loaded = Loaded {
        name: name.clone(),
        stamp: 0,
        project: None,
    };
    let Some(row) = row else {
        return Ok(loaded);
    };
    loaded.stamp = row.get::<i64, _>("changes") as u64;
    if !row.get::<bool, _>("live") {
        return Ok(loaded);
    }
    let mut project = Project::new(name.clone());
    project.epoch = row.get::<i64, _>("epoch") as u64;
    project.working = working_copy(&row, name)?;
    // Rows, not decoded values: a body this build cannot decode is named as such, not taken for
    // a storage that does not answer.
    let versions =
        sqlx::query("SELECT number, body FROM versions WHERE project = $1 ORDER BY number")
            .bind(name.as_str())
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| unavailable("read a project's versions", &e))?;
    for row in versions {
        let Json(version): Json<Version> = row.try_get("body").map_err(|e| {
            let number: i32 = row.get("number");
            corrupt(format!("version {number} of project {name:?}"), e)
        })?;
        project.versions.push(Arc::new(version));
    }
    let statuses = sqlx::query("SELECT number, status FROM version_status WHERE project = $1")
        .bind(name.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| unavailable("read a project's versions", &e))?;
    for row in statuses {
        let number: i32 = row.get("number");
        let Json(status): Json<VersionStatus> = row.try_get("status").map_err(|e| {
            corrupt(
                format!("the status of version {number} of project {name:?}"),
                e,
            )
        })?;
        project
            .status
            .insert(row.get::<i32, _>("number") as u32, status);
    }
    loaded.project = Some(project);
    Ok(loaded)
}

/// One project as stored.
pub async fn load_project(conn: &mut PgConnection, name: &Ident) -> Result<Loaded, StorageError> {
    read_project(conn, name, false).await
}

/// Takes a project's row lock for the rest of the transaction; answers the project and its stamp.
/// With `create` (the most projects the deployment holds), a project that does not exist (or was
/// dropped) is created with an empty working copy.
pub async fn lock_project(
    tx: &mut PgConnection,
    name: &Ident,
    create: Option<usize>,
) -> Result<(Project, u64), StorageError> {
    // A drop committed between the insertion's look and the lock leaves the project missing with
    // room to spare: it is made again, once. Only a missing project with no room left is one too
    // many.
    let mut loaded = create_and_lock(tx, name, create).await?;
    if let (None, Some(max_projects)) = (&loaded.project, create) {
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM projects WHERE live")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| unavailable("count projects", &e))?;
        if usize::try_from(live).is_ok_and(|live| live < max_projects) {
            loaded = create_and_lock(tx, name, create).await?;
        }
    }
    let project = loaded.project.ok_or_else(|| match create {
        Some(max) => StorageError::Conflict(edit::too_many_projects(name, max)),
        None => StorageError::NotFound(format!("project {name:?} does not exist")),
    })?;
    Ok((project, loaded.stamp))
}

/// [`lock_project`]'s one attempt: with `create`, inserts the project or revives a dropped one
/// when there is room; then reads it under its row lock.
async fn create_and_lock(
    tx: &mut PgConnection,
    name: &Ident,
    create: Option<usize>,
) -> Result<Loaded, StorageError> {
    if let Some(max_projects) = create {
        // Projects are counted only for a name not live; past the most, nothing is inserted or
        // revived: the project stays missing. Two nodes making projects at once may each pass the
        // count: the limit is kept within a few.
        let empty = as_text(&WorkingCopy::default());
        sqlx::query(
            "INSERT INTO projects (name, working) \
             SELECT $1, $2::json WHERE NOT EXISTS (SELECT 1 FROM projects WHERE name = $1 AND live) \
               AND (SELECT count(*) FROM projects WHERE live) < $3 \
             ON CONFLICT (name) DO UPDATE SET live = TRUE, changes = projects.changes + 1, \
               working = jsonb_set($2::jsonb, '{born}', to_jsonb(projects.revision))::json, \
               born = projects.revision \
             WHERE NOT projects.live",
        )
        .bind(name.as_str())
        .bind(&empty)
        .bind(max_projects as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("create a project", &e))?;
    }
    read_project(tx, name, true).await
}

/// Locks a dropped project's row (its revisions' counter) for the transaction; answers false when
/// the project is live (made again) or has never been.
pub async fn lock_dropped(tx: &mut PgConnection, name: &Ident) -> Result<bool, StorageError> {
    let live: Option<bool> =
        sqlx::query_scalar("SELECT live FROM projects WHERE name = $1 FOR UPDATE")
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| unavailable("read a project", &e))?;
    Ok(live == Some(false))
}

/// Persists what an edit wrote; moves the project's epoch when its live versions changed. Answers
/// the project's new stamp (`stamp`, unchanged, when nothing was written).
pub async fn persist(
    tx: &mut PgConnection,
    project: &mut Project,
    stamp: u64,
    writes: &[Write],
) -> Result<u64, StorageError> {
    if writes.is_empty() {
        return Ok(stamp);
    }
    let name = project.name.as_str();
    for write in writes {
        let result = match write {
            Write::WorkingCopy => {
                sqlx::query("UPDATE projects SET working = $2::json, born = $3 WHERE name = $1")
                    .bind(name)
                    .bind(as_text(&project.working))
                    .bind(project.working.born as i64)
                    .execute(&mut *tx)
                    .await
            }
            Write::Version(n) => {
                let version = project.version(*n).expect("written version exists");
                sqlx::query(
                    "INSERT INTO versions (project, number, body) VALUES ($1, $2, $3::json) \
                     ON CONFLICT (project, number) DO UPDATE SET body = EXCLUDED.body",
                )
                .bind(name)
                .bind(*n as i32)
                .bind(as_text(version.as_ref()))
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
    let moves = i64::from(writes.iter().any(|w| w.moves_epoch()));
    let (epoch, changes): (i64, i64) = sqlx::query_as(
        "UPDATE projects SET epoch = epoch + $2, changes = changes + 1 WHERE name = $1 \
         RETURNING epoch, changes",
    )
    .bind(name)
    .bind(moves)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| unavailable("move the project's epoch", &e))?;
    project.epoch = epoch as u64;
    Ok(changes as u64)
}

/// A working copy or a version as the JSON text stored (a `JSON` column, not `JSONB`, so that a
/// blueprint's columns keep their order); sent as text, never as a `JSONB` parameter, which would
/// reorder them on the way.
fn as_text<T: serde::Serialize + ?Sized>(record: &T) -> String {
    serde_json::to_string(record).expect("a catalog record has string keys only")
}

/// Forgets a dropped project: its catalog, items, back-fills and dead letters; answers its new
/// stamp. The row stays (not live), so the project's revisions and epochs keep growing if it is
/// made again; its journal stays until every projector has applied the drop.
pub async fn forget(tx: &mut PgConnection, name: &Ident) -> Result<u64, StorageError> {
    let stamp: i64 = sqlx::query_scalar(
        "UPDATE projects SET live = FALSE, epoch = epoch + 1, changes = changes + 1, \
           working = $2::json \
         WHERE name = $1 RETURNING changes",
    )
    .bind(name.as_str())
    .bind(as_text(&WorkingCopy::default()))
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| unavailable("drop a project", &e))?;
    for table in [
        "versions",
        "version_status",
        "items",
        "backfills",
        "dead_letters",
        "tombstones",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE project = $1"
        )))
        .bind(name.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("drop a project", &e))?;
    }
    Ok(stamp as u64)
}

/// Keeps the node's catalog fresh: reloads a project when another node notifies a change, and the
/// whole catalog after every reconnection (notifications may have been missed meanwhile).
///
/// A listening connection that the network cut off without a word (a partition that healed after
/// the server had ended the session) never hears of a change again: it sends nothing, so nothing
/// tells it. While quiet, the listener compares the sum of every project's stamp with the node's;
/// a storage ahead of the node twice in a row with the same sum (no notification came for it in
/// between) means notifications no longer arrive: the listener connects again, which reads the
/// whole catalog.
pub async fn listen(storage: Weak<PgStorage>) {
    let mut attempt = 0;
    loop {
        let Some(node) = storage.upgrade() else {
            return;
        };
        // The listener's connection is of a pool of its own: a listener given up on a connection
        // cut off leaves its `UNLISTEN` waiting there, never holding a place of the node's pool.
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(node.pool().limit())
            .connect_lazy_with(
                node.writer_options
                    .clone()
                    .application_name(&format!("dstore listener {}", node.lease_owner())),
            );
        let listener = within(node.pool().limit(), async {
            let mut listener = PgListener::connect_with(&own).await?;
            listener.listen(&node.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        })
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
        // A notification whose project could not be read again: the whole catalog is read at the
        // next quiet moment, until a read succeeds, so a change is never missed for good.
        let mut missed = false;
        // The storage's sum of stamps last seen ahead of the node's.
        let mut ahead: Option<i64> = None;
        loop {
            let notification =
                tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await;
            let Some(node) = storage.upgrade() else {
                return;
            };
            match notification {
                // Quiet: check the node is still wanted, and listen on.
                Err(_) => {
                    if missed {
                        missed = node.refresh_catalog_quietly().await.is_err();
                    }
                    // A check that could not be made (a pooled connection cut off too) says
                    // nothing either way: the last one that could stands.
                    if let Ok(now) = node.catalog_ahead().await {
                        if now.is_some() && now == ahead {
                            tracing::warn!(
                                "the catalog changed in the storage and no notification came: \
                                 listening again on a new connection"
                            );
                            break;
                        }
                        ahead = now;
                    }
                }
                Ok(Ok(Some(notification))) => {
                    if let Ok(project) = Ident::parse(notification.payload()) {
                        if let Err(error) = node.reload(&project).await {
                            tracing::warn!(%project, %error, "cannot reload a project's catalog; reading the whole catalog again at the next quiet moment");
                            missed = true;
                        }
                    }
                }
                // The connection was lost and re-established: anything may have been missed.
                Ok(Ok(None)) => {
                    missed = node.refresh_catalog_quietly().await.is_err();
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
    /// The sum of every project's stamp in the storage, when it is more than this node's (it has
    /// not seen some change); `None` when it is not; an error when it cannot be read.
    async fn catalog_ahead(&self) -> Result<Option<i64>, sqlx::Error> {
        let stored: i64 =
            sqlx::query_scalar("SELECT coalesce(sum(changes), 0)::bigint FROM projects")
                .fetch_one(self.pool())
                .await?;
        let known: u64 = self
            .catalog
            .read()
            .expect("catalog lock")
            .stamps
            .values()
            .sum();
        Ok((stored > known as i64).then_some(stored))
    }

    async fn refresh_catalog_quietly(&self) -> Result<(), StorageError> {
        use crate::storage::Storage;
        self.refresh_catalog().await
    }
}
