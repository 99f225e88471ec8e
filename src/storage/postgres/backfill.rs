//! Back-fills in cluster mode: a frozen version gets the items written before it, leased to one node
//! at a time like the projectors' cursors, so a node that dies mid-way is replaced by another.
//!
//! Each chunk is one transaction under the project's row lock: items changed since the chunk was
//! read are skipped (their newer write already carried the version), the rest get journal rows with
//! the revision they already have, and the back-fill's state moves with them. A write during the
//! back-fill always wins, whichever store applies what first.

use std::sync::Weak;
use std::time::Duration;

use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{catalog, commit_failed, unavailable, within, PgStorage};
use crate::blueprint::Ident;
use crate::journal::backfill::{item_task, BackfillState};
use crate::journal::codec;
use crate::storage::{Storage, StorageError};

/// Items per chunk.
const CHUNK: i64 = 512;

/// Most bytes of item records one chunk reads (past its first item).
const CHUNK_BYTES: i64 = 8 << 20;

/// How long a back-fill lease lasts without a chunk.
const LEASE_SECS: f64 = 30.0;

/// The longest a back-fill counts its items before its first chunk. The count runs under the
/// lease taken when it was claimed, which only a chunk renews: one that outlasted the lease (a
/// very large project) let another runner take the back-fill and count again, and so on, with
/// no chunk ever written.
const COUNT_TIMEOUT: Duration = Duration::from_secs(10);
const _: () = assert!(COUNT_TIMEOUT.as_secs_f64() * 2.0 < LEASE_SECS);

/// How many items `project` has, counted for at most `limit`. The total is for progress
/// reports only: past the limit, it grows with the walk instead.
async fn count_items(
    node: &PgStorage,
    project: &Ident,
    limit: Duration,
) -> Result<u64, StorageError> {
    let failed = |e: sqlx::Error| unavailable("count the items to back-fill", &e);
    let mut tx = node.pool().begin().await.map_err(failed)?;
    let timeout = format!("SET LOCAL statement_timeout = {}", limit.as_millis().max(1));
    sqlx::query(sqlx::AssertSqlSafe(timeout))
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE project = $1")
        .bind(project.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
    Ok(total as u64)
}

/// Records a new back-fill of `version` (into `projectors` only, when given) unless one exists;
/// answers whether it recorded one.
pub async fn record(
    conn: &mut PgConnection,
    project: &Ident,
    version: u32,
    projectors: Option<Vec<String>>,
) -> Result<bool, StorageError> {
    insert(conn, project, version, projectors, false).await
}

/// Records the back-fill of a version just frozen, starting over one recorded before under its
/// key: that one can only be of a project of the same name since dropped (a version is frozen
/// once), and left finished it would have the new version never back-filled.
pub async fn record_new_version(
    conn: &mut PgConnection,
    project: &Ident,
    version: u32,
) -> Result<(), StorageError> {
    insert(conn, project, version, None, true).await.map(drop)
}

/// Records a back-fill of `version` into `projectors` alone (a store added later), starting over
/// one that ran before for the same projectors.
pub async fn record_again(
    conn: &mut PgConnection,
    project: &Ident,
    version: u32,
    projectors: &[String],
) -> Result<(), StorageError> {
    insert(conn, project, version, Some(projectors.to_vec()), true)
        .await
        .map(drop)
}

/// Records a back-fill; over one recorded under the same key only when `over`. Answers whether
/// it recorded one.
async fn insert(
    conn: &mut PgConnection,
    project: &Ident,
    version: u32,
    projectors: Option<Vec<String>>,
    over: bool,
) -> Result<bool, StorageError> {
    let key = projectors
        .as_deref()
        .map(|p| p.join(","))
        .unwrap_or_default();
    let state = BackfillState {
        projectors,
        ..BackfillState::default()
    };
    let conflict = if over {
        "ON CONFLICT (project, version, projectors) DO UPDATE SET state = EXCLUDED.state, \
             finished = FALSE, lease_owner = NULL, lease_until = NULL"
    } else {
        "ON CONFLICT DO NOTHING"
    };
    let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO backfills (project, version, projectors, state) VALUES ($1, $2, $3, $4) \
         {conflict}"
    )))
    .bind(project.as_str())
    .bind(version as i32)
    .bind(key)
    .bind(Json(&state))
    .execute(&mut *conn)
    .await
    .map_err(|e| unavailable("record a back-fill", &e))?
    .rows_affected();
    Ok(inserted == 1)
}

/// Runs back-fills while the storage lives, one at a time on this node.
pub async fn run(storage: Weak<PgStorage>) {
    loop {
        let Some(node) = storage.upgrade() else {
            return;
        };
        let worked = match claim(&node).await {
            Ok(Some((project, version, key, state))) => {
                match backfill(&node, &project, version, &key, state).await {
                    Ok(()) => true,
                    Err(error) => {
                        // Claimed again after a pause, not at once: a storage that keeps failing
                        // it is not asked in a loop.
                        tracing::warn!(%project, version, %error, "back-fill interrupted; it resumes");
                        false
                    }
                }
            }
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(%error, "cannot claim back-fills");
                false
            }
        };
        drop(node);
        if !worked {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

type Claimed = (Ident, u32, String, BackfillState);

async fn claim(node: &PgStorage) -> Result<Option<Claimed>, StorageError> {
    let row = sqlx::query(
        "UPDATE backfills b SET lease_owner = $1, lease_until = now() + make_interval(secs => $2) \
         FROM (SELECT project, version, projectors FROM backfills \
               WHERE NOT finished AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until < now()) \
               ORDER BY project, version LIMIT 1 FOR UPDATE SKIP LOCKED) c \
         WHERE b.project = c.project AND b.version = c.version AND b.projectors = c.projectors \
         RETURNING b.project, b.version, b.projectors, b.state",
    )
    .bind(node.lease_owner())
    .bind(LEASE_SECS)
    .fetch_optional(node.pool())
    .await
    .map_err(|e| unavailable("claim a back-fill", &e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let Ok(project) = Ident::parse(&row.get::<String, _>("project")) else {
        return Ok(None);
    };
    let Json(state): Json<BackfillState> = row
        .try_get("state")
        .map_err(|e| StorageError::Corrupt(format!("a back-fill state is unreadable: {e}")))?;
    Ok(Some((
        project,
        row.get::<i32, _>("version") as u32,
        row.get("projectors"),
        state,
    )))
}

/// `blueprint \0 id` of an item: where a back-fill stands.
pub(super) fn cursor_of(blueprint: &str, id: &Uuid) -> Vec<u8> {
    let mut key = blueprint.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

pub(super) fn parse_cursor(cursor: &[u8]) -> Option<(String, Uuid)> {
    let split = cursor.iter().position(|b| *b == 0)?;
    let id = Uuid::from_slice(&cursor[split + 1..]).ok()?;
    Some((String::from_utf8_lossy(&cursor[..split]).into_owned(), id))
}

async fn backfill(
    node: &PgStorage,
    project: &Ident,
    version: u32,
    key: &str,
    mut state: BackfillState,
) -> Result<(), StorageError> {
    if state.cursor.is_none() && state.done == 0 {
        match count_items(node, project, COUNT_TIMEOUT).await {
            Ok(total) => state.total = total,
            Err(error) => {
                tracing::warn!(%project, version, %error, "cannot count the items to back-fill; going on without a total");
            }
        }
    }
    tracing::info!(%project, version, total = state.total, "back-fill started");
    while !state.finished {
        let after = state.cursor.as_deref().and_then(parse_cursor);
        // At most CHUNK items, and past the first none that would take the chunk over
        // CHUNK_BYTES of records: large items make short chunks.
        let rows = sqlx::query(
            "WITH r AS (SELECT blueprint, id, revision, record, \
                          sum(length(record)) OVER (ORDER BY blueprint, id) - length(record) AS before \
                        FROM items WHERE project = $1 \
                        AND ($2::text IS NULL OR (blueprint, id) > ($2, $3)) \
                        ORDER BY blueprint, id LIMIT $4) \
             SELECT blueprint, id, revision, record, (SELECT count(*) FROM r) AS fetched \
             FROM r WHERE before < $5 ORDER BY blueprint, id",
        )
        .bind(project.as_str())
        .bind(after.as_ref().map(|(b, _)| b.as_str()))
        .bind(after.as_ref().map(|(_, id)| *id).unwrap_or_default())
        .bind(CHUNK)
        .bind(CHUNK_BYTES)
        .fetch_all(node.pool())
        .await
        .map_err(|e| unavailable("read items to back-fill", &e))?;
        let fetched: i64 = rows.first().map_or(0, |row| row.get("fetched"));
        let last_chunk = fetched < CHUNK && rows.len() as i64 == fetched;
        let mut snapshot = node.snapshot();
        if snapshot
            .projects
            .get(project)
            .and_then(|p| p.version(version))
            .is_none()
        {
            node.refresh_catalog().await?;
            snapshot = node.snapshot();
        }
        let Some(p) = snapshot.projects.get(project) else {
            return finish(node, project, version, key, &state, true).await;
        };
        let Some(target) = p.version(version) else {
            return finish(node, project, version, key, &state, true).await;
        };
        let mut chunk = Vec::with_capacity(rows.len());
        // The version's copies can be many times the records (a column it added takes its
        // default in every item): past CHUNK_BYTES of them, the chunk ends.
        let (mut taken, mut copies) = (0, 0);
        for row in &rows {
            if copies >= CHUNK_BYTES as usize {
                break;
            }
            taken += 1;
            let (blueprint, id): (String, Uuid) = (row.get("blueprint"), row.get("id"));
            state.cursor = Some(cursor_of(&blueprint, &id));
            // A record this version cannot read is left out, said once; stopping at it would stop
            // the back-fill there for good, and the version would never get the items after.
            let record = match codec::decode_record(&row.get::<Vec<u8>, _>("record")) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(%project, version, %error, "back-fill leaves out an item record it cannot read");
                    continue;
                }
            };
            if let Some((_, task)) = item_task(p, target, id, &record) {
                copies += task.bytes.len();
                chunk.push((blueprint, id, record.revision, task.bytes));
            }
        }
        state.done += taken as u64;
        state.total = state.total.max(state.done);
        state.finished = last_chunk && taken == rows.len();
        let born = p.working.born;
        if !commit_chunk(node, project, version, (key, born), &state, chunk).await? {
            tracing::info!(%project, version, "back-fill stopped: the version was retired or removed, or another node took the back-fill over");
            return Ok(());
        }
    }
    tracing::info!(%project, version, done = state.done, "back-fill finished");
    Ok(())
}

/// Journals one chunk and the state after it; false when the version is gone or retired, when the
/// project was made again since the chunk's tasks were made from the catalog of the one `born`
/// then (another version of the same number), or when this node lost the back-fill's lease.
async fn commit_chunk(
    node: &PgStorage,
    project: &Ident,
    version: u32,
    (key, born): (&str, u64),
    state: &BackfillState,
    chunk: Vec<(String, Uuid, u64, Vec<u8>)>,
) -> Result<bool, StorageError> {
    within(node.pool().limit(), async move {
        let mut tx = node
            .pool()
            .begin()
            .await
            .map_err(|e| unavailable("begin a back-fill chunk", &e))?;
        // A project gone stops its back-fill; a storage that cannot lock it now (a lock wait
        // past its limit, a lost connection) is a failure to try again after a pause.
        let p = match catalog::lock_project(&mut tx, project, None).await {
            Ok((p, _)) => p,
            Err(StorageError::NotFound(_)) => return Ok(false),
            Err(error) => return Err(error),
        };
        if p.working.born != born {
            // The back-fill of the project made again, if any, is its own to run.
            return Ok(false);
        }
        if p.version(version).is_none() || p.is_retired(version) {
            drop(tx);
            finish(node, project, version, key, state, true).await?;
            return Ok(false);
        }
        // Items written or deleted since the chunk was read need nothing: the write carried the version.
        let blueprints: Vec<&str> = chunk.iter().map(|c| c.0.as_str()).collect();
        let ids: Vec<Uuid> = chunk.iter().map(|c| c.1).collect();
        let current: Vec<(String, Uuid, i64)> = sqlx::query_as(
            "SELECT i.blueprint, i.id, i.revision FROM items i \
             JOIN unnest($2::text[], $3::uuid[]) AS c(blueprint, id) \
               ON i.blueprint = c.blueprint AND i.id = c.id \
             WHERE i.project = $1",
        )
        .bind(project.as_str())
        .bind(&blueprints)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| unavailable("check back-filled items", &e))?;
        let unchanged: Vec<&(String, Uuid, u64, Vec<u8>)> = chunk
            .iter()
            .filter(|(b, id, revision, _)| {
                current
                    .iter()
                    .any(|(cb, cid, cr)| cb == b && cid == id && *cr as u64 == *revision)
            })
            .collect();
        if !unchanged.is_empty() {
            let last = PgStorage::next_revisions(&mut tx, project, unchanged.len() as u64).await?;
            let first = last - unchanged.len() as u64 + 1;
            let revisions: Vec<i64> = (first..=last).map(|r| r as i64).collect();
            let tasks: Vec<Vec<u8>> = unchanged
                .iter()
                .zip(first..)
                .map(|((_, _, item_revision, task), journal)| {
                    codec::task_value(journal, *item_revision, task)
                })
                .collect();
            sqlx::query(
                "INSERT INTO journal (project, revision, task, projectors) \
                 SELECT $1, r, t, $4 FROM unnest($2::bigint[], $3::bytea[]) AS x(r, t)",
            )
            .bind(project.as_str())
            .bind(&revisions)
            .bind(&tasks)
            .bind(state.projectors.as_deref())
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable("journal a back-fill chunk", &e))?;
        }
        if !save_state(&mut tx, node, project, version, key, state).await? {
            // The lease lapsed (this node stalled) and another node goes on with the back-fill:
            // nothing of this chunk is journaled twice.
            tracing::info!(%project, version, "back-fill left to the node that took its lease");
            return Ok(false);
        }
        tx.commit()
            .await
            .map_err(|e| commit_failed("a back-fill chunk", &e))?;
        node.committed.notify_waiters();
        Ok(true)
    })
    .await
}

/// Saves the state of a back-fill this node holds the lease of; false when it does not.
async fn save_state(
    conn: &mut PgConnection,
    node: &PgStorage,
    project: &Ident,
    version: u32,
    key: &str,
    state: &BackfillState,
) -> Result<bool, StorageError> {
    let saved = sqlx::query(
        "UPDATE backfills SET state = $4, finished = $5, lease_until = now() + make_interval(secs => $7) \
         WHERE project = $1 AND version = $2 AND projectors = $3 AND lease_owner = $6",
    )
    .bind(project.as_str())
    .bind(version as i32)
    .bind(key)
    .bind(Json(state))
    .bind(state.finished)
    .bind(node.lease_owner())
    .bind(LEASE_SECS)
    .execute(&mut *conn)
    .await
    .map_err(|e| unavailable("save a back-fill's state", &e))?;
    Ok(saved.rows_affected() == 1)
}

/// Marks a back-fill finished (its version is gone or retired, or it is done).
async fn finish(
    node: &PgStorage,
    project: &Ident,
    version: u32,
    key: &str,
    state: &BackfillState,
    stopped: bool,
) -> Result<(), StorageError> {
    within(node.pool().limit(), async move {
        let mut state = state.clone();
        state.finished = true;
        let mut conn = node
            .pool()
            .acquire()
            .await
            .map_err(|e| unavailable("finish a back-fill", &e))?;
        save_state(&mut conn, node, project, version, key, &state).await?;
        if stopped {
            tracing::info!(%project, version, "back-fill stopped: the version was retired or removed, or another node took the back-fill over");
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::{drop_schema, frozen, holding, open_postgresql, write};

    /// The count of a back-fill's items gives up at its limit (`COUNT_TIMEOUT`, well within the
    /// back-fill's lease): a count kept waiting, or of a very large project, let the lease lapse
    /// before the first chunk, and another runner counted again, for good.
    #[tokio::test]
    async fn counting_a_back_fills_items_gives_up_at_its_limit() {
        let (storage, schema) = open_postgresql("counted", vec![]).await;
        let project = frozen(storage.as_ref()).await;
        write(storage.as_ref(), &project, Uuid::new_v4(), "t").await;
        let counted = count_items(&storage, &project, Duration::from_secs(10)).await;
        assert_eq!(counted.unwrap(), 1);
        let locker = holding(&format!(
            "LOCK TABLE \"{schema}\".items IN ACCESS EXCLUSIVE MODE"
        ))
        .await;
        let started = std::time::Instant::now();
        let counted = count_items(&storage, &project, Duration::from_millis(300)).await;
        assert!(counted.is_err(), "{counted:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "counted for {:?}",
            started.elapsed()
        );
        drop(locker);
        drop(storage);
        drop_schema(&schema).await;
    }
}
