//! Projection in cluster mode: one cursor per (projector, project), leased to whichever node or
//! worker claims it, reading the journal by revision. No row per task.
//!
//! A node claims cursors that have work (`revision < projects.revision`), are not leased by a live
//! node and are not held back, with `FOR UPDATE SKIP LOCKED`, so two nodes never claim the same one.
//! It applies the project's next tasks by the shared [`step`] rule and moves the cursor — only while it
//! still holds the lease, so a node that lost its lease (it stalled past [`LEASE`]) changes nothing; its
//! writes to the store were idempotent. Before each batch it renews a lease older than half of
//! [`LEASE`] and reads the cursor again, so a project claimed with others and reached late, after
//! its lease lapsed and another node went on, is never projected from a stale cursor (a drop or a
//! migration replayed into a project made again since). A dead node's leases expire and another node takes over. A
//! failed step holds the project back with its own backoff; the other projects go on.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::watch;

use super::{commit_failed, unavailable, within, PgStorage, LEASE};
use crate::blueprint::Ident;
use crate::journal::task::{Task, TaskOp};
use crate::journal::{decode_task, DeadLetter};
use crate::projector::{backoff, Projector};
use crate::queue::step::{self, Step};
use crate::storage::{Storage, StorageError};

/// Cursors a node claims at once, per projector.
const CLAIM: i64 = 8;
/// How often an idle projector looks for work other nodes committed.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How long a node works through one project's tasks before it turns to the other projects it
/// claimed (and claims again, the projects no node leases first): a project that always has
/// more tasks never keeps a node's projector to itself. It keeps its lease meanwhile: given back
/// each second, a project written to steadily would move between nodes every second, each
/// taking it up from the cursor.
const TURN: Duration = Duration::from_secs(1);

/// Runs one projector on this node until `shutdown` turns true.
pub async fn run(
    storage: Arc<PgStorage>,
    projector: Arc<dyn Projector>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = projector.name();
    let mut attempt = 0;
    while !*shutdown.borrow() {
        let claimed = match claim_leases(&storage, name).await {
            Ok(claimed) => {
                attempt = 0;
                claimed
            }
            Err(error) => {
                tracing::warn!(projector = name, %error, "cannot claim cursors; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = shutdown.changed() => {}
                }
                attempt += 1;
                continue;
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                _ = storage.committed.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        for (project, lease) in claimed {
            if *shutdown.borrow() {
                break;
            }
            if let Err(error) =
                work(&storage, projector.as_ref(), &project, lease, batch_size).await
            {
                // Held back with its backoff, the lease given up: a project whose batches fail
                // to settle is not read and applied again at once, again and again.
                // A failure of the storage, not of the project's store: its backoff alone.
                let failed = error.to_string();
                if let Err(held) = hold(&storage, name, &project, &failed, Duration::ZERO).await {
                    tracing::warn!(projector = name, %project, %error, %held, "projection failed; the project is retried later");
                }
            }
        }
    }
    release(&storage, name).await;
}

/// Claims cursors with work for `projector`; answers each project and its lease, counted from
/// before the claim was sent. The server dates a lease from the statement's start: counted from
/// the answer, a claim that waited for a lock (up to `lock_timeout`) would have this node apply a
/// batch past the lease's end, while another node may take the cursor.
async fn claim_leases(
    storage: &PgStorage,
    projector: &str,
) -> Result<Vec<(Ident, Lease)>, StorageError> {
    let sent = tokio::time::Instant::now();
    let claimed = claim(storage, projector).await?;
    Ok(claimed
        .into_iter()
        .map(|(project, cursor)| {
            let lease = Lease {
                renewed: sent,
                cursor,
            };
            (project, lease)
        })
        .collect())
}

/// Claims cursors with work for `projector`; answers each project and its cursor.
async fn claim(storage: &PgStorage, projector: &str) -> Result<Vec<(Ident, u64)>, StorageError> {
    let rows = sqlx::query(
        "WITH candidates AS ( \
             SELECT c.projector, c.project FROM cursors c JOIN projects p ON p.name = c.project \
             WHERE c.projector = $1 AND c.revision < p.revision \
               AND (c.lease_owner IS NULL OR c.lease_owner = $2 OR c.lease_until < now()) \
               AND (c.held_until IS NULL OR c.held_until < now()) \
             ORDER BY c.lease_until NULLS FIRST, c.project LIMIT $3 \
             FOR UPDATE OF c SKIP LOCKED) \
         UPDATE cursors c SET lease_owner = $2, lease_until = now() + make_interval(secs => $4) \
         FROM candidates WHERE c.projector = candidates.projector AND c.project = candidates.project \
         RETURNING c.project, c.revision",
    )
    .bind(projector)
    .bind(storage.lease_owner())
    .bind(CLAIM)
    .bind(LEASE.as_secs_f64())
    .fetch_all(storage.leases())
    .await
    .map_err(|e| unavailable("claim cursors", &e))?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let project = Ident::parse(&row.get::<String, _>("project")).ok()?;
            Some((project, row.get::<i64, _>("revision") as u64))
        })
        .collect())
}

/// Gives up this node's leases of `projector` and of back-fills (a clean stop): another node, or
/// this one started again, takes over at once.
async fn release(storage: &PgStorage, projector: &str) {
    let _ = sqlx::query(
        "UPDATE cursors SET lease_owner = NULL, lease_until = NULL \
         WHERE projector = $1 AND lease_owner = $2",
    )
    .bind(projector)
    .bind(storage.lease_owner())
    .execute(storage.pool())
    .await;
    let _ = sqlx::query(
        "UPDATE backfills SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
    )
    .bind(storage.lease_owner())
    .execute(storage.pool())
    .await;
}

/// A claimed cursor: its revision and when its lease was last made or renewed.
struct Lease {
    renewed: tokio::time::Instant,
    cursor: u64,
}

impl Lease {
    /// Renews the lease when it is older than half its term, so what comes next starts on a
    /// fresh one; answers false when it was lost to another node. Every way on from a renewal
    /// settles (which renews again) or returns.
    async fn keep(
        &mut self,
        storage: &PgStorage,
        projector: &str,
        project: &Ident,
    ) -> Result<bool, StorageError> {
        if self.renewed.elapsed() <= LEASE / 2 {
            return Ok(true);
        }
        let sent = tokio::time::Instant::now();
        let Some(revision) = renew(storage, projector, project).await? else {
            tracing::info!(projector, %project, "lease lost to another node; leaving the project to it");
            return Ok(false);
        };
        self.cursor = self.cursor.max(revision);
        self.renewed = sent;
        Ok(true)
    }
}

/// Renews this node's lease of a cursor; answers the cursor's revision, `None` when the lease
/// was lost to another node.
async fn renew(
    storage: &PgStorage,
    projector: &str,
    project: &Ident,
) -> Result<Option<u64>, StorageError> {
    let revision: Option<i64> = sqlx::query_scalar(
        "UPDATE cursors SET lease_until = now() + make_interval(secs => $4)          WHERE projector = $1 AND project = $2 AND lease_owner = $3 RETURNING revision",
    )
    .bind(projector)
    .bind(project.as_str())
    .bind(storage.lease_owner())
    .bind(LEASE.as_secs_f64())
    .fetch_optional(storage.leases())
    .await
    .map_err(|e| unavailable("renew a lease", &e))?;
    Ok(revision.map(|r| r as u64))
}

/// Applies the next tasks of one project after the leased cursor, until it is caught up, its
/// [`TURN`] is over, the lease is lost or a step fails.
async fn work(
    storage: &PgStorage,
    projector: &dyn Projector,
    project: &Ident,
    mut lease: Lease,
    batch_size: usize,
) -> Result<(), StorageError> {
    let name = projector.name();
    let turn = tokio::time::Instant::now() + TURN;
    loop {
        if tokio::time::Instant::now() >= turn {
            return Ok(());
        }
        if !lease.keep(storage, name, project).await? {
            return Ok(());
        }
        let cursor = lease.cursor;
        let Read {
            tasks,
            last: mut last_read,
            poison,
            born,
        } = read(storage, name, project, cursor, batch_size).await?;
        if tasks.is_empty() && poison.is_empty() {
            if last_read > cursor {
                // Only rows meant for other projectors: nothing to apply.
                settle(storage, name, project, last_read, Vec::new()).await?;
            }
            return Ok(());
        }
        let step = if tasks.is_empty() {
            Step::default()
        } else {
            let snapshot = snapshot_for(storage, project, born, &tasks).await?;
            // The reads may have taken a while (a large batch, a project's versions read again):
            // the batch starts on a fresh lease rather than being given up before a renewal is
            // even tried.
            if !lease.keep(storage, name, project).await? {
                return Ok(());
            }
            let Some(step) = leased(
                storage,
                name,
                project,
                lease.renewed,
                step::apply(projector, &snapshot, &tasks),
            )
            .await
            else {
                tracing::info!(projector = name, %project, "lease lost to another node while applying; leaving the project to it");
                return Ok(());
            };
            step
        };
        if let Some(m) = &step.migration {
            // Recorded only by the lease's holder: a node that lost it while migrating (paused
            // past its term) would otherwise write its outcome over the new holder's, a stale
            // failure over a success.
            if renew(storage, name, project).await?.is_none() {
                tracing::info!(projector = name, %project, "lease lost to another node while migrating; leaving the project to it");
                return Ok(());
            }
            // Not recorded, nothing of the step is settled: it is applied again (a migration is
            // idempotent) and recorded then, rather than leave the version's status saying it
            // waits for a migration done.
            match storage
                .set_migration(&m.project, m.version, name, m.state.clone(), m.task)
                .await
            {
                // The project or its version went meanwhile: nothing to record.
                Ok(()) | Err(StorageError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        let settled = step.settled();
        if settled < tasks.len() {
            // Everything before the first unsettled task is done.
            last_read = tasks[settled].seq - 1;
        }
        let mut dead = poison;
        dead.extend(step.dead);
        let (applied, failed) = (step.applied.len(), dead.len());
        // Settling resets the hold's backoff: a step that is to be retried and settled nothing
        // leaves it, so a project failing the same way is tried ever less often (up to 10 s).
        let progressed = last_read > cursor || !dead.is_empty();
        // The server dates the renewed lease from the start of the settling transaction: so does
        // this node, or it would count on the lease for longer than the server grants it.
        let sent = tokio::time::Instant::now();
        if (progressed || step.retry.is_none())
            && !settle(storage, name, project, last_read, dead).await?
        {
            return Ok(());
        }
        lease.renewed = sent;
        storage.note_applied(name, applied, failed);
        lease.cursor = last_read;
        if let Some(error) = step.retry {
            hold(storage, name, project, &error.message, step.held_cost).await?;
            return Ok(());
        }
    }
}

/// Runs `applying` while renewing the lease of the cursor every third of a lease, so a batch that
/// takes longer than a lease (a large migration, a slow store) is not taken over by another node in
/// the middle, which would apply the same tasks, and the drop among them, twice and out of order.
/// Answers `None`, having given up `applying` where it was, when the lease is found lost all the same
/// (this node stalled, or cut off from the database past a lease): what it applied is applied
/// again by the node that took the lease, as after a crash.
/// `renewed`: when the lease was last made or renewed. Renewals run beside `applying`; a node that
/// has not renewed for three quarters of a lease (the database away, or too slow to answer) gives
/// the batch up before the lease can lapse, so it never goes on applying (a drop, a migration)
/// after another node may have taken the cursor.
async fn leased<T>(
    storage: &PgStorage,
    projector: &str,
    project: &Ident,
    renewed: tokio::time::Instant,
    applying: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(applying);
    let mut held = renewed;
    let give_up = LEASE - LEASE / 4;
    let mut next = held + LEASE / 3;
    loop {
        let renewal = async {
            tokio::time::sleep_until(next).await;
            // The lease runs from when the server takes the renewal: from no earlier than this.
            let sent = tokio::time::Instant::now();
            let renewed = tokio::time::timeout(LEASE / 4, renew(storage, projector, project)).await;
            (sent, renewed)
        };
        // The give-up first: a node that stalled past it (a paused process) gives the batch up
        // before `applying` is polled again, rather than send its next statement (a drop) to a
        // store another node may have moved on since.
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(held + give_up) => {
                tracing::warn!(projector, %project, "cannot renew a lease while applying; giving the batch up before the lease lapses");
                return None;
            }
            done = &mut applying => return Some(done),
            (sent, renewed) = renewal => match renewed {
                Ok(Ok(Some(_))) => {
                    held = sent;
                    next = held + LEASE / 3;
                }
                Ok(Ok(None)) => return None,
                // The database away for a moment: the lease holds until `give_up`.
                Ok(Err(error)) => {
                    tracing::warn!(projector, %project, %error, "cannot renew a lease while applying; trying again");
                    next = tokio::time::Instant::now() + LEASE / 20;
                }
                Err(_) => {
                    tracing::warn!(projector, %project, "a lease's renewal took too long; trying again");
                    next = tokio::time::Instant::now();
                }
            }
        }
    }
}

/// The next rows of the journal after a cursor, as [`read`] answers them.
struct Read {
    /// The tasks for this projector.
    tasks: Vec<Task>,
    /// The last revision read.
    last: u64,
    /// Dead letters for tasks that cannot be decoded.
    poison: Vec<DeadLetter>,
    /// The revision the project was born at (see `WorkingCopy::born`), read in the same statement
    /// as the rows; `None` when it is dropped or no row was read.
    born: Option<u64>,
}

/// The next rows of the journal after `cursor`.
async fn read(
    storage: &PgStorage,
    projector: &str,
    project: &Ident,
    cursor: u64,
    limit: usize,
) -> Result<Read, StorageError> {
    // Cut at `BATCH_BYTES` of stored tasks (past the first), as the embedded journal cuts its
    // batches: a batch of large items would be gigabytes read at once, on every node that took
    // the cursor over in turn.
    let rows = sqlx::query(
        "SELECT revision, task, projectors, born FROM ( \
           SELECT revision, task, projectors, \
             (SELECT born FROM projects WHERE name = $1 AND live) AS born, \
             coalesce(sum(octet_length(task)) OVER (ORDER BY revision \
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before \
           FROM journal WHERE project = $1 AND revision > $2 ORDER BY revision LIMIT $3 \
         ) j WHERE before < $4 ORDER BY revision",
    )
    .bind(project.as_str())
    .bind(cursor as i64)
    .bind(limit as i64)
    .bind(crate::journal::BATCH_BYTES as i64)
    .fetch_all(storage.pool())
    .await
    .map_err(|e| unavailable("read the journal", &e))?;
    let mut tasks = Vec::with_capacity(rows.len());
    let mut poison = Vec::new();
    let mut last = cursor;
    let born = rows
        .first()
        .and_then(|row| row.get::<Option<i64>, _>("born"))
        .map(|born| born as u64);
    for row in rows {
        let revision = row.get::<i64, _>("revision") as u64;
        last = revision;
        let only: Option<Vec<String>> = row.get("projectors");
        if only.is_some_and(|only| !only.iter().any(|p| p == projector)) {
            continue;
        }
        let raw: Vec<u8> = row.get("task");
        match decode_task(&raw) {
            Ok(task) => tasks.push(task),
            Err(error) => {
                tracing::error!(projector, %project, revision, %error, "a task that cannot be decoded becomes a dead letter");
                poison.push(DeadLetter::from_raw(
                    projector,
                    revision,
                    &raw,
                    "the stored task is unreadable".into(),
                ));
            }
        }
    }
    Ok(Read {
        tasks,
        last,
        poison,
        born,
    })
}

/// A catalog that holds `project` as its tasks were written: every version they name (another
/// node may have frozen it a moment ago), of the same project (one made again under its name since
/// this node read it is another, whose version 1 is not the old one's: this node may have missed
/// the notification, or not have read it yet). `born`, the project's birth, was read in the same
/// statement as the tasks, so a project made again later has none of them.
async fn snapshot_for(
    storage: &PgStorage,
    project: &Ident,
    born: Option<u64>,
    tasks: &[Task],
) -> Result<Arc<crate::catalog::Snapshot>, StorageError> {
    let knows = |snapshot: &crate::catalog::Snapshot| {
        tasks.iter().all(|task| {
            let Some(p) = snapshot.projects.get(&task.project) else {
                // A dropped project needs no catalog; one made elsewhere does.
                return !matches!(task.op, TaskOp::Migrate { .. });
            };
            match &task.op {
                TaskOp::Migrate { version } => p.version(*version).is_some(),
                TaskOp::DropProject => true,
                TaskOp::Upsert { .. } | TaskOp::Delete { .. } => task
                    .version_writes()
                    .all(|w| p.version(w.version).is_some()),
            }
        })
    };
    let snapshot = storage.snapshot();
    // A dropped project's tasks are its own up to the drop: the catalog read has it, or not.
    let same = born.is_none_or(|born| {
        snapshot
            .projects
            .get(project)
            .is_some_and(|p| p.working.born == born)
    });
    if same && knows(&snapshot) {
        return Ok(snapshot);
    }
    storage.reload(project).await?;
    Ok(storage.snapshot())
}

/// Moves the cursor to `revision` and keeps the dead letters, while this node holds the lease;
/// answers false when it lost it.
async fn settle(
    storage: &PgStorage,
    projector: &str,
    project: &Ident,
    revision: u64,
    dead: Vec<DeadLetter>,
) -> Result<bool, StorageError> {
    within(storage.leases().limit(), async move {
        let mut tx = storage
            .leases()
            .begin()
            .await
            .map_err(|e| unavailable("begin settling tasks", &e))?;
        let moved = sqlx::query(
            "UPDATE cursors SET revision = greatest(revision, $3), last_error = NULL, attempts = 0, \
                 held_until = NULL, lease_until = now() + make_interval(secs => $5) \
             WHERE projector = $1 AND project = $2 AND lease_owner = $4",
        )
        .bind(projector)
        .bind(project.as_str())
        .bind(revision as i64)
        .bind(storage.lease_owner())
        .bind(LEASE.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("move a cursor", &e))?
        .rows_affected()
            == 1;
        if !moved {
            tracing::info!(projector, %project, "lease lost to another node; leaving the project to it");
            return Ok(false);
        }
        // In one statement: a batch may refuse thousands of tasks, one round trip each of
        // which took longer than the limit the whole settling has.
        if !dead.is_empty() {
            let revisions: Vec<i64> = dead.iter().map(|letter| letter.seq as i64).collect();
            let letters: Vec<sqlx::types::Json<&DeadLetter>> =
                dead.iter().map(sqlx::types::Json).collect();
            sqlx::query(
                "INSERT INTO dead_letters (projector, project, revision, letter) \
                 SELECT $1, $2, r, l FROM unnest($3::bigint[], $4::jsonb[]) AS k(r, l) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(projector)
            .bind(project.as_str())
            .bind(&revisions)
            .bind(&letters)
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable("keep dead letters", &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| commit_failed("settled tasks", &e))?;
        storage.watch.note(projector, project, revision);
        Ok(true)
    })
    .await
}

/// Holds a project back after a failed step, for longer each time, and gives up the lease.
async fn hold(
    storage: &PgStorage,
    projector: &str,
    project: &Ident,
    error: &str,
    cost: Duration,
) -> Result<(), StorageError> {
    tracing::warn!(projector, %project, %error, "projection failed; the project waits, the others go on");
    // Its backoff, or as `queue::hold` holds a project for every transport, at least
    // `COST_FACTOR` times as long as the failed try took (up to `MAX_HOLD`): a migration that
    // waits out a lock each time would otherwise take most of the node's projector time.
    let for_cost = cost
        .saturating_mul(crate::queue::hold::COST_FACTOR)
        .min(crate::queue::hold::MAX_HOLD);
    sqlx::query(
        "UPDATE cursors SET attempts = attempts + 1, last_error = $4, lease_owner = NULL, \
             held_until = now() + make_interval(secs => greatest( \
                 least(0.1 * power(2, least(attempts, 7)), 10.0), $5)) \
         WHERE projector = $1 AND project = $2 AND lease_owner = $3",
    )
    .bind(projector)
    .bind(project.as_str())
    .bind(storage.lease_owner())
    .bind(error)
    .bind(for_cost.as_secs_f64())
    .execute(storage.leases())
    .await
    .map_err(|e| unavailable("hold a project back", &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use serde_json::Value;
    use uuid::Uuid;

    use super::*;
    use crate::catalog::{MigrationState, Snapshot, Version};
    use crate::projector::{Health, Outcome, ProjectorError};
    use crate::storage::conformance::{
        drop_schema, frozen, open_postgresql, put_article, upsert, write,
    };

    /// Counts every task, migration and drop it is given; with `fail_migrations`, refuses every
    /// migration; each migration takes the first time given, each batch the second (none by
    /// default).
    #[derive(Default)]
    struct Counting(AtomicUsize, bool, Duration, Duration);

    #[async_trait]
    impl Projector for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn migrate(&self, _: &Ident, _: &Version, _: &[u32]) -> Result<(), ProjectorError> {
            tokio::time::sleep(self.2).await;
            if self.1 {
                return Err(ProjectorError::permanent("the store refuses this schema"));
            }
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn apply(
            &self,
            _: &Snapshot,
            tasks: &[Task],
        ) -> Result<Vec<Outcome>, ProjectorError> {
            tokio::time::sleep(self.3).await;
            self.0.fetch_add(tasks.len(), Ordering::SeqCst);
            Ok(tasks.iter().map(|_| Ok(())).collect())
        }
        async fn drop_project(&self, _: &Ident) -> Result<(), ProjectorError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn read(
            &self,
            _: &Ident,
            _: u32,
            _: &Ident,
            _: &Uuid,
        ) -> Result<Option<Value>, ProjectorError> {
            Ok(None)
        }
        async fn health(&self) -> Health {
            Health {
                reachable: true,
                detail: "test double".into(),
            }
        }
    }

    /// A cursor claimed with others and reached after its lease lapsed, once another node has
    /// taken it and gone on: nothing is applied from the stale cursor. With the lease fresh, the
    /// same node applies its tasks.
    #[tokio::test]
    async fn a_cursor_reached_after_its_lease_lapsed_is_left_to_the_node_that_took_it() {
        let (storage, schema) = open_postgresql("late", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        write(storage.as_ref(), &project, Uuid::new_v4(), "t").await;

        let claimed = claim(&storage, "counting").await.unwrap();
        assert_eq!(claimed.len(), 1);
        let (_, cursor) = claimed[0].clone();
        // Another node took the lapsed lease and projected everything.
        sqlx::query(
            "UPDATE cursors SET lease_owner = 'other', lease_until = now() + interval '10 seconds', \
                 revision = (SELECT revision FROM projects WHERE name = 'p') \
             WHERE projector = 'counting' AND project = 'p'",
        )
        .execute(storage.pool())
        .await
        .unwrap();
        let counting = Counting::default();
        let lapsed = Lease {
            renewed: tokio::time::Instant::now()
                .checked_sub(LEASE)
                .expect("the clock is past one lease"),
            cursor,
        };
        work(&storage, &counting, &project, lapsed, 100)
            .await
            .unwrap();
        assert_eq!(
            counting.0.load(Ordering::SeqCst),
            0,
            "applied from a stale cursor"
        );

        // Given back to this node at the old revision, the same cursor is projected.
        sqlx::query(
            "UPDATE cursors SET lease_owner = $2, revision = $1 \
             WHERE projector = 'counting' AND project = 'p'",
        )
        .bind(cursor as i64)
        .bind(storage.lease_owner())
        .execute(storage.pool())
        .await
        .unwrap();
        let fresh = Lease {
            renewed: tokio::time::Instant::now(),
            cursor,
        };
        work(&storage, &counting, &project, fresh, 100)
            .await
            .unwrap();
        assert!(
            counting.0.load(Ordering::SeqCst) >= 2,
            "the migration and the write"
        );

        drop(storage);
        drop_schema(&schema).await;
    }

    /// A node that lost its lease while migrating does not record its outcome: the node that took
    /// the lease recorded the migration done meanwhile, and a stale failure must not replace it.
    #[tokio::test]
    async fn a_migration_outcome_is_not_recorded_by_a_node_that_lost_its_lease() {
        let (storage, schema) = open_postgresql("stale_migration", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        let claimed = claim(&storage, "counting").await.unwrap();
        let (_, cursor) = claimed[0].clone();
        // Its migration fails, half a second in; meanwhile another node takes the lease and
        // records the migration done.
        let failing = Counting(
            AtomicUsize::new(0),
            true,
            Duration::from_millis(500),
            Duration::ZERO,
        );
        let other = {
            let (storage, project) = (storage.clone(), project.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                sqlx::query(
                    "UPDATE cursors SET lease_owner = 'other', \
                         lease_until = now() + interval '10 seconds' \
                     WHERE projector = 'counting' AND project = 'p'",
                )
                .execute(storage.pool())
                .await
                .unwrap();
                storage
                    .set_migration(&project, 1, "counting", MigrationState::Done, None)
                    .await
                    .unwrap();
            })
        };
        let lease = Lease {
            renewed: tokio::time::Instant::now(),
            cursor,
        };
        work(&storage, &failing, &project, lease, 100)
            .await
            .unwrap();
        other.await.unwrap();
        let snapshot = storage.fresh_snapshot(&project).await.unwrap();
        assert_eq!(
            snapshot.projects[&project].status[&1]
                .migrations
                .get("counting"),
            Some(&MigrationState::Done)
        );
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A project that always has more tasks does not keep a node's projector to itself: after
    /// its turn (`TURN`) the node goes on to the other projects it claimed, so a project with one
    /// write is projected while another's backlog is worked through. Before, `work` returned only
    /// once its project was caught up, and a project written to steadily kept the others waiting.
    #[tokio::test]
    async fn a_busy_project_leaves_the_others_their_turn() {
        let (storage, schema) = open_postgresql("turns", vec!["counting"]).await;
        let busy = frozen(storage.as_ref()).await;
        let (epoch, _) = upsert(storage.as_ref(), &busy, Uuid::new_v4(), "t");
        let entries = (0..200)
            .map(|n| upsert(storage.as_ref(), &busy, Uuid::new_v4(), &format!("t{n}")).1)
            .collect();
        let busy_last = *storage
            .write(&busy, epoch, entries)
            .await
            .unwrap()
            .last()
            .unwrap();
        let quiet = Ident::parse("q").unwrap();
        put_article(storage.as_ref(), &quiet, None).await;
        storage.freeze(&quiet, false).await.unwrap();
        let quiet_last = write(storage.as_ref(), &quiet, Uuid::new_v4(), "t").await;

        // A batch of one task at a time, 20 ms each: the busy project's 200 take 4 s at least.
        let slow = Arc::new(Counting(
            AtomicUsize::new(0),
            false,
            Duration::ZERO,
            Duration::from_millis(20),
        ));
        let (stop, shutdown) = watch::channel(false);
        let running = tokio::spawn(run(storage.clone(), slow, 1, shutdown));
        let cursor = |project: &'static str| {
            let storage = storage.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT revision FROM cursors WHERE projector = 'counting' AND project = $1",
                )
                .bind(project)
                .fetch_one(storage.pool())
                .await
                .unwrap() as u64
            }
        };
        let started = std::time::Instant::now();
        while cursor("q").await < quiet_last {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the quiet project waited behind the busy one"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            cursor("p").await < busy_last,
            "the busy project was not busy"
        );
        stop.send(true).unwrap();
        running.await.unwrap();
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A batch of the journal is cut at `BATCH_BYTES` of tasks, not read whole: a project of large
    /// items was read 5000 tasks at once, gigabytes, on every node that took its cursor in turn.
    #[tokio::test]
    async fn a_batch_of_large_items_is_read_in_parts_of_bounded_bytes() {
        let (storage, schema) = open_postgresql("large", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        let title = "x".repeat(600 << 10);
        for _ in 0..20 {
            write(storage.as_ref(), &project, Uuid::new_v4(), &title).await;
        }
        let claimed = claim(&storage, "counting").await.unwrap();
        let cursor = claimed[0].1;
        let first = read(&storage, "counting", &project, cursor, 5000)
            .await
            .unwrap();
        // The migration and about 8 MiB of items: not all 20 of them.
        assert!(
            (2..20).contains(&first.tasks.len()),
            "{} tasks read at once",
            first.tasks.len()
        );
        assert_eq!(first.last, first.tasks.last().unwrap().seq);
        let counting = Counting::default();
        let lease = Lease {
            renewed: tokio::time::Instant::now(),
            cursor,
        };
        work(&storage, &counting, &project, lease, 5000)
            .await
            .unwrap();
        assert_eq!(
            counting.0.load(Ordering::SeqCst),
            21,
            "the migration and every write, in parts"
        );
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A node that cannot renew its lease while it applies a batch (cut off from the database, or
    /// the cursors table locked) gives the batch up before the lease can lapse: before, it went on
    /// applying, a drop among them, while another node may have taken the cursor.
    #[tokio::test]
    async fn a_node_that_cannot_renew_its_lease_gives_the_batch_up_before_it_lapses() {
        let (storage, schema) = open_postgresql("fenced", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        claim(&storage, "counting").await.unwrap();
        let renewed = tokio::time::Instant::now();
        // Every renewal waits behind this lock, as on a database that does not answer.
        let mut locker = crate::storage::conformance::holding(&format!(
            "LOCK TABLE \"{schema}\".cursors IN ACCESS EXCLUSIVE MODE"
        ))
        .await;
        let given_up = tokio::time::timeout(
            LEASE,
            leased(
                &storage,
                "counting",
                &project,
                renewed,
                std::future::pending::<()>(),
            ),
        )
        .await;
        assert_eq!(given_up, Ok(None), "still applying past the lease");
        assert!(renewed.elapsed() >= LEASE - LEASE / 4);
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut locker)
            .await
            .unwrap();
        drop(storage);
        drop_schema(&schema).await;
    }

    /// Reads holding every connection of the node's pool (pages of the change feed) do not stop
    /// its leases: renewals have connections of their own, so a batch longer than a lease is
    /// not given up while reads are heavy.
    #[tokio::test]
    async fn reads_holding_the_pool_do_not_stop_a_lease_being_renewed() {
        let (storage, schema) = open_postgresql("leasepool", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        claim(&storage, "counting").await.unwrap();
        let renewed = tokio::time::Instant::now();
        let reads = futures::future::join_all((0..10).map(|_| async {
            sqlx::query("SELECT pg_sleep(10)")
                .execute(storage.pool())
                .await
                .unwrap();
        }));
        let applying = async {
            // The reads take every connection first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            leased(&storage, "counting", &project, renewed, async {
                tokio::time::sleep(LEASE - LEASE / 5).await;
            })
            .await
        };
        let (applied, _) = tokio::join!(applying, reads);
        assert_eq!(applied, Some(()), "the batch was given up");
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A node that stalled past the give-up (a paused process) gives the batch up before it
    /// applies any more of it, even when the batch could go on at once: its next statement could
    /// be a drop sent after another node moved on.
    #[tokio::test]
    async fn a_node_that_stalled_past_its_lease_applies_no_more_of_the_batch() {
        let (storage, schema) = open_postgresql("stalled", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        claim(&storage, "counting").await.unwrap();
        let stalled = tokio::time::Instant::now()
            .checked_sub(LEASE)
            .expect("the clock is past one lease");
        for _ in 0..20 {
            let applied = AtomicUsize::new(0);
            let given_up = leased(&storage, "counting", &project, stalled, async {
                applied.fetch_add(1, Ordering::SeqCst);
            })
            .await;
            assert_eq!(given_up, None);
            assert_eq!(applied.load(Ordering::SeqCst), 0);
        }
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A batch that takes longer than a lease keeps its lease: another node does not take the
    /// cursor in the middle and apply the same tasks again.
    #[tokio::test]
    async fn a_batch_longer_than_a_lease_keeps_its_lease() {
        use crate::storage::conformance::open_postgresql_in;

        let (first, schema) = open_postgresql("slow", vec!["counting"]).await;
        let project = frozen(first.as_ref()).await;
        write(first.as_ref(), &project, Uuid::new_v4(), "t").await;
        let second = open_postgresql_in(&schema, "other", vec!["counting"]).await;
        let claimed = claim(&first, "counting").await.unwrap();
        let lease = Lease {
            renewed: tokio::time::Instant::now(),
            cursor: claimed[0].1,
        };
        // Takes longer than a lease to migrate.
        let slow = Counting(
            AtomicUsize::new(0),
            false,
            LEASE + LEASE / 5,
            Duration::ZERO,
        );
        let (worked, taken) = tokio::join!(work(&first, &slow, &project, lease, 100), async {
            tokio::time::sleep(LEASE + LEASE / 10).await;
            claim(&second, "counting").await.unwrap()
        });
        worked.unwrap();
        assert!(
            taken.is_empty(),
            "taken in the middle of a batch: {taken:?}"
        );
        // The migration took longer than a turn: the write waits for the project's next one.
        assert_eq!(slow.0.load(Ordering::SeqCst), 1, "the migration");
        drop((first, second));
        drop_schema(&schema).await;
    }

    /// Two processes started with one node name (a copied `DSTORE_NODE`) are two lease owners:
    /// a cursor one holds is not claimed by the other, and a clean stop of one gives back its
    /// leases only.
    #[tokio::test]
    async fn two_processes_with_one_node_name_never_hold_a_cursor_at_once() {
        use crate::storage::conformance::open_postgresql_in;
        let (first, schema) = open_postgresql("twin", vec!["counting"]).await;
        let project = frozen(first.as_ref()).await;
        write(first.as_ref(), &project, Uuid::new_v4(), "t").await;
        let second = open_postgresql_in(&schema, "twin", vec!["counting"]).await;
        assert_ne!(first.lease_owner(), second.lease_owner());
        assert_eq!(claim(&first, "counting").await.unwrap().len(), 1);
        assert!(claim(&second, "counting").await.unwrap().is_empty());
        release(&second, "counting").await;
        assert!(claim(&second, "counting").await.unwrap().is_empty());
        release(&first, "counting").await;
        assert_eq!(claim(&second, "counting").await.unwrap().len(), 1);
        drop((first, second));
        drop_schema(&schema).await;
    }

    /// A project whose migration fails the same way again and again is held ever longer, and the
    /// failure, recorded once, does not move the project's epoch on every retry.
    #[tokio::test]
    async fn a_migration_failing_again_is_held_ever_longer_and_recorded_once() {
        let (storage, schema) = open_postgresql("held", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        let mut epochs = Vec::new();
        for attempt in 1..=3 {
            sqlx::query("UPDATE cursors SET held_until = NULL WHERE projector = 'counting'")
                .execute(storage.pool())
                .await
                .unwrap();
            let claimed = claim(&storage, "counting").await.unwrap();
            assert_eq!(claimed.len(), 1, "attempt {attempt}");
            let lease = Lease {
                renewed: tokio::time::Instant::now(),
                cursor: claimed[0].1,
            };
            let failing = Counting(AtomicUsize::new(0), true, Duration::ZERO, Duration::ZERO);
            // The hold is counted from the failure, which comes after this (however long the
            // machine takes in between).
            let (before,): (f64,) = sqlx::query_as("SELECT extract(epoch FROM now())::float8")
                .fetch_one(storage.pool())
                .await
                .unwrap();
            work(&storage, &failing, &project, lease, 100)
                .await
                .unwrap();
            let (attempts, held_until): (i32, f64) = sqlx::query_as(
                "SELECT attempts, extract(epoch FROM held_until)::float8 FROM cursors \
                 WHERE projector = 'counting'",
            )
            .fetch_one(storage.pool())
            .await
            .unwrap();
            assert_eq!(attempts, attempt, "the backoff grows with each failure");
            let held_for = held_until - before;
            let backoff = 0.1 * 2f64.powi(attempt - 1);
            assert!(held_for >= backoff - 0.001, "{held_for} s, not {backoff} s");
            storage.refresh_catalog().await.unwrap();
            epochs.push(storage.snapshot().projects[&project].epoch);
        }
        assert_eq!(
            epochs[0], epochs[2],
            "the same failure moved the epoch again"
        );

        drop(storage);
        drop_schema(&schema).await;
    }

    /// A project whose failed try was slow (a migration waiting out a lock) is held for at least
    /// `COST_FACTOR` times as long as the try took, as every other transport holds it: held 10 s
    /// at most, a try of 10 s took half of a node's projector time from the other projects.
    #[tokio::test]
    async fn a_slow_failure_is_held_for_several_times_what_it_cost() {
        let (storage, schema) = open_postgresql("costly", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        let claimed = claim(&storage, "counting").await.unwrap();
        let lease = Lease {
            renewed: tokio::time::Instant::now(),
            cursor: claimed[0].1,
        };
        let slow = Counting(
            AtomicUsize::new(0),
            true,
            Duration::from_secs(3),
            Duration::ZERO,
        );
        work(&storage, &slow, &project, lease, 100).await.unwrap();
        let (held_for,): (f64,) = sqlx::query_as(
            "SELECT extract(epoch FROM held_until - now())::float8 FROM cursors \
             WHERE projector = 'counting'",
        )
        .fetch_one(storage.pool())
        .await
        .unwrap();
        // Four times the 3 s try, less the moments since.
        assert!(held_for > 10.0, "held {held_for} s");
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A node whose catalog still holds a project since dropped and made again (it missed the
    /// notification, or has not read it yet) applies the new project's tasks with the new
    /// project's catalog, not the old one's version 1.
    #[tokio::test]
    async fn tasks_of_a_project_made_again_are_applied_with_its_own_catalog() {
        let (storage, schema) = open_postgresql("reborn", Vec::new()).await;
        let project = frozen(storage.as_ref()).await;
        let old = storage.snapshot();
        let old_stamps = storage.catalog.read().unwrap().stamps.clone();
        assert_eq!(old.projects[&project].working.born, 0);
        storage.drop_project(&project).await.unwrap();
        frozen(storage.as_ref()).await;
        let revision = write(storage.as_ref(), &project, Uuid::new_v4(), "new").await;
        let born = storage.snapshot().projects[&project].working.born;
        assert!(born > 0 && born < revision);
        // The notification of the drop and of the new freeze missed.
        *storage.catalog.write().unwrap() = super::super::CatalogCache {
            snapshot: old,
            stamps: old_stamps,
            bytes: Default::default(),
        };
        let tasks = [Task {
            seq: revision,
            project: project.clone(),
            op: TaskOp::Migrate { version: 1 },
        }];
        let read = read(&storage, "counting", &project, 0, 100).await.unwrap();
        let snapshot = snapshot_for(&storage, &project, read.born, &tasks)
            .await
            .unwrap();
        assert_eq!(snapshot.projects[&project].working.born, born);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// Dead letters kept in the database count in every node's progress (health and metrics),
    /// whichever node made them.
    #[tokio::test]
    async fn every_node_counts_the_dead_letters_kept() {
        let (storage, schema) = open_postgresql("counter", vec!["counting"]).await;
        frozen(storage.as_ref()).await;
        sqlx::query(
            "INSERT INTO dead_letters (projector, project, revision, letter) \
             VALUES ('counting', 'p', 1, '{}'), ('counting', 'p', 2, '{}'), ('other', 'p', 3, '{}')",
        )
        .execute(storage.pool())
        .await
        .unwrap();
        // Counted every ten seconds, not at every poll of the backlog (each second).
        let counted = storage.watch.letter_counts();
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(
            storage.watch.letter_counts() <= counted + 1,
            "counted at every poll"
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let progress = storage.progress("counting").await;
            if progress.dead_letters == 2 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{progress:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        drop(storage);
        drop_schema(&schema).await;
    }

    /// The journal keeps a project's rows until every cursor is past them: up to the slowest
    /// cursor, then the drop's row too once every projector applied it; a project made again
    /// keeps its rows from its birth on until they are applied.
    #[tokio::test]
    async fn the_journal_is_trimmed_up_to_the_slowest_cursor() {
        use crate::storage::postgres::watch::prune_journal;
        let (storage, schema) = open_postgresql("trim", vec!["counting", "other"]).await;
        let project = frozen(storage.as_ref()).await;
        let mut written = Vec::new();
        for title in ["a", "b", "c"] {
            written.push(write(storage.as_ref(), &project, Uuid::new_v4(), title).await);
        }
        let rows = |storage: Arc<PgStorage>| async move {
            sqlx::query_scalar::<_, i64>("SELECT revision FROM journal ORDER BY revision")
                .fetch_all(storage.pool())
                .await
                .unwrap()
        };
        let cursor = |projector: &'static str, revision: u64| {
            let storage = storage.clone();
            async move {
                sqlx::query("UPDATE cursors SET revision = $2 WHERE projector = $1")
                    .bind(projector)
                    .bind(revision as i64)
                    .execute(storage.pool())
                    .await
                    .unwrap();
            }
        };
        assert_eq!(rows(storage.clone()).await.len(), 4);
        cursor("counting", written[2]).await;
        assert_eq!(prune_journal(&storage).await.unwrap(), 0, "a cursor at 0");
        cursor("other", written[0]).await;
        assert_eq!(
            prune_journal(&storage).await.unwrap(),
            2,
            "up to the slowest"
        );
        assert_eq!(
            rows(storage.clone()).await,
            vec![written[1] as i64, written[2] as i64]
        );

        let dropped = storage.drop_project(&project).await.unwrap();
        cursor("counting", dropped).await;
        cursor("other", dropped).await;
        assert_eq!(prune_journal(&storage).await.unwrap(), 3);
        assert!(rows(storage.clone()).await.is_empty());

        let again = frozen(storage.as_ref()).await;
        let born = write(storage.as_ref(), &again, Uuid::new_v4(), "new").await;
        assert_eq!(prune_journal(&storage).await.unwrap(), 0);
        assert_eq!(rows(storage.clone()).await.last(), Some(&(born as i64)));
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A projector a deployment runs from some day on starts at each project's revision and gets
    /// every live version's migration and every item from a back-fill into it alone, so it needs
    /// none of the journal the others trimmed.
    #[tokio::test]
    async fn a_projector_added_later_is_back_filled_from_the_items() {
        use crate::storage::conformance::open_postgresql_in;
        use crate::storage::postgres::watch::prune_journal;
        let (first, schema) = open_postgresql("first", vec!["counting"]).await;
        let project = frozen(first.as_ref()).await;
        let mut ids = Vec::new();
        for title in ["a", "b", "c"] {
            ids.push(Uuid::new_v4());
            write(first.as_ref(), &project, ids[ids.len() - 1], title).await;
        }
        let last = first.revision(&project).await.unwrap();
        sqlx::query("UPDATE cursors SET revision = $1")
            .bind(last as i64)
            .execute(first.pool())
            .await
            .unwrap();
        assert_eq!(prune_journal(&first).await.unwrap(), 4);

        let second = open_postgresql_in(&schema, "second", vec!["counting", "other"]).await;
        let cursor: i64 =
            sqlx::query_scalar("SELECT revision FROM cursors WHERE projector = 'other'")
                .fetch_one(second.pool())
                .await
                .unwrap();
        assert_eq!(cursor as u64, last, "starts at the project's revision");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        let tasks = loop {
            let rows: Vec<(Vec<u8>, Option<Vec<String>>)> = sqlx::query_as(
                "SELECT task, projectors FROM journal WHERE revision > $1 ORDER BY revision",
            )
            .bind(cursor)
            .fetch_all(second.pool())
            .await
            .unwrap();
            if rows.len() == 4 {
                break rows;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} rows",
                rows.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let mut upserted = Vec::new();
        for (raw, projectors) in &tasks {
            assert_eq!(projectors.as_deref(), Some(&["other".to_string()][..]));
            match decode_task(raw).unwrap().op {
                TaskOp::Migrate { version } => assert_eq!(version, 1),
                TaskOp::Upsert { id, .. } => upserted.push(id),
                op => panic!("{op:?}"),
            }
        }
        upserted.sort();
        ids.sort();
        assert_eq!(upserted, ids);
        // Another start finds the cursor and back-fills nothing again.
        drop(second);
        let third = open_postgresql_in(&schema, "third", vec!["counting", "other"]).await;
        let backfills: i64 = sqlx::query_scalar("SELECT count(*) FROM backfills")
            .fetch_one(third.pool())
            .await
            .unwrap();
        assert_eq!(backfills, 1);
        drop((first, third));
        drop_schema(&schema).await;
    }

    /// A lease counts from before its claim was sent, as the server dates it: a claim that waited
    /// for a lock held elsewhere does not leave this node believing its lease runs longer than
    /// it does.
    #[tokio::test]
    async fn a_claimed_lease_counts_from_before_the_claim_waited() {
        let (storage, schema) = open_postgresql("claimwait", vec!["counting"]).await;
        let project = frozen(storage.as_ref()).await;
        write(storage.as_ref(), &project, Uuid::new_v4(), "t").await;
        let mut holder = crate::storage::conformance::holding(&format!(
            "LOCK TABLE \"{schema}\".projects IN ACCESS EXCLUSIVE MODE"
        ))
        .await;
        let release = async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            sqlx::raw_sql("ROLLBACK")
                .execute(&mut holder)
                .await
                .unwrap();
        };
        let (claimed, ()) = tokio::join!(claim_leases(&storage, "counting"), release);
        let claimed = claimed.unwrap();
        assert_eq!(claimed.len(), 1);
        let held = claimed[0].1.renewed.elapsed();
        assert!(held >= Duration::from_millis(1900), "{held:?}");
        drop(storage);
        drop_schema(&schema).await;
    }
}
