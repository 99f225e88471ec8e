//! Item writes, grouped: every write a node receives while the previous batch commits goes into
//! the next batch, one transaction, one commit.
//!
//! A batch raises each project's revision counter once (projects in name order, so two nodes never
//! deadlock), `WHERE epoch = $e`: a command prepared against another epoch gets
//! [`StorageError::Stale`] and adds nothing. Journal rows and the items' latest state are written
//! with one statement each. If the transaction fails, every command of the batch gets the error;
//! none is half-written. One exception: a project whose row another transaction holds past the
//! writer's lock wait (a drop deleting its items) has its commands answered 503, and the batch
//! goes again at once without them, so one project's long change does not fail or hold the
//! others' writes.
//!
//! The batcher keeps a connection of its own from batch to batch, so writes never wait behind reads
//! for one and a batch pays no round trip to check it (only one idle for a while is checked). A
//! batch gets `storage.commit_timeout_secs` from connecting, when it must, to its commit's answer. A
//! storage that stops answering (a partition, a host gone with its TCP connections half-open)
//! would otherwise hold every write of the node for as long as the kernel retransmits, about a
//! quarter of an hour; past the limit the batch's writes answer 503 saying their outcome is
//! unknown (the commit may have reached the storage), and the connection is dropped: the next batch
//! connects again.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::{commit_failed, unavailable, PgStorage};
use crate::blueprint::Ident;
use crate::journal::{codec, Entry};
use crate::storage::StorageError;

/// Most commands in one batch.
const MAX_BATCH: usize = 512;

pub struct WriteCommand {
    pub project: Ident,
    pub epoch: u64,
    pub entries: Vec<Entry>,
    pub reply: oneshot::Sender<Result<Vec<u64>, StorageError>>,
    /// When the command was queued.
    pub queued: tokio::time::Instant,
}

/// Answers and leaves out the commands of `batch` that must not be written any more: those whose
/// caller is gone (its client gave up), and those that waited in the queue longer than `limit`
/// (`storage.commit_timeout_secs`), which answer 503 "nothing was written". A write that waited
/// out a long stall of the storage is never committed once its client has been told, or may have
/// concluded, that it failed: the client may have sent it again through another node since, and
/// a newer write after it, which this late commit would overwrite.
fn expire(batch: &mut Vec<WriteCommand>, limit: std::time::Duration) {
    batch.retain(|command| !command.reply.is_closed());
    let (late, live): (Vec<_>, Vec<_>) = std::mem::take(batch)
        .into_iter()
        .partition(|command| command.queued.elapsed() > limit);
    *batch = live;
    for command in late {
        let _ = command.reply.send(Err(StorageError::Unavailable(format!(
            "postgresql storage: this write waited more than {} s (storage.commit_timeout_secs) \
             for the node's writer; nothing was written, try again",
            limit.as_secs()
        ))));
    }
}

pub async fn run(storage: Weak<PgStorage>, queue: Arc<Mutex<mpsc::Receiver<WriteCommand>>>) {
    // Held for the loop's life; a run started again after a panic takes it over (the writes of
    // the batch that panicked were answered with an error when their reply senders dropped).
    let mut queue = queue.lock().await;
    let mut connection = Kept::default();
    let mut held = Held::default();
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let Some(node) = storage.upgrade() else {
            return;
        };
        commit(&node, &mut connection, &mut held, batch).await;
        node.committed.notify_waiters();
    }
}

/// How long the batcher's connection may sit unused before a batch checks it first: a connection
/// idle that long may have been closed on the way (a firewall, a proxy), and a batch that found
/// out by failing would answer 503 for nothing.
const CHECK_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long that check waits for an answer: a connection the network stopped forwarding on
/// answers never, and the batch goes on a new one instead.
const PING_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The batcher's connection, kept from batch to batch (none after a failure), and when it was
/// last used.
#[derive(Default)]
struct Kept {
    connection: Option<sqlx::PgConnection>,
    used: Option<tokio::time::Instant>,
}

impl Kept {
    /// The connection, made again when there is none, and checked after [`CHECK_AFTER_IDLE`].
    async fn get(&mut self, node: &PgStorage) -> Result<&mut sqlx::PgConnection, StorageError> {
        use sqlx::Connection;
        let idle = self
            .used
            .is_some_and(|used| used.elapsed() >= CHECK_AFTER_IDLE);
        // Taken out while it is checked: a batch cut off by its time limit meanwhile sent
        // nothing of its own, and says so (`late`), rather than that its outcome is unknown.
        if idle {
            if let Some(mut connection) = self.connection.take() {
                let answered = tokio::time::timeout(PING_LIMIT, connection.ping()).await;
                if matches!(answered, Ok(Ok(()))) {
                    self.connection = Some(connection);
                }
            }
        }
        if self.connection.is_none() {
            let made = sqlx::PgConnection::connect_with(&node.writer_options)
                .await
                .map_err(|e| unavailable("connect for a batch of writes", &e))?;
            self.connection = Some(made);
        }
        self.used = Some(tokio::time::Instant::now());
        Ok(self
            .connection
            .as_mut()
            .expect("a connection was just made"))
    }
}

/// One row of the journal and what it does to `items`.
struct Row {
    project: String,
    revision: i64,
    task: Vec<u8>,
    item: ItemChange,
}

enum ItemChange {
    Put {
        blueprint: String,
        id: Uuid,
        record: Vec<u8>,
    },
    Delete {
        blueprint: String,
        id: Uuid,
    },
}

/// Why [`stage`] did not write its batch.
enum Unstaged {
    /// Another transaction held `project`'s row past the writer's lock wait
    /// (`WRITER_LOCK_TIMEOUT`), or PostgreSQL ended the batch to break a deadlock over it: nothing
    /// was written, and the batch can go again without that project's commands.
    Held {
        project: String,
        why: String,
    },
    /// The kept connection was found broken before anything of the batch was sent but its
    /// `BEGIN` (a server restarted, a session ended): the batch can go again on a new one.
    Broken(StorageError),
    /// A caller left, or its write outlasted `storage.commit_timeout_secs`, while the batch
    /// waited for its projects' rows: nothing was written, and the batch goes again without it.
    Left,
    Failed(StorageError),
}

impl From<StorageError> for Unstaged {
    fn from(error: StorageError) -> Self {
        Unstaged::Failed(error)
    }
}

/// How long a project whose row was found held is waited for only [`HELD_WAIT`] by later
/// batches.
const RECENTLY_HELD: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a batch waits for the row of a project found held within [`RECENTLY_HELD`].
const HELD_WAIT: &str = "100ms";

/// Projects whose rows a batch found held by another transaction (a drop deleting its items for
/// minutes), and when: while their clients keep sending writes, every batch holding one would
/// otherwise wait the whole lock wait (`WRITER_LOCK_TIMEOUT`) for it, and hold the rows of the
/// projects before it in name order as long, which other nodes' batches wait for in turn.
#[derive(Default)]
struct Held(std::collections::HashMap<String, tokio::time::Instant>);

impl Held {
    fn recently(&self, project: &str) -> bool {
        self.0
            .get(project)
            .is_some_and(|at| at.elapsed() < RECENTLY_HELD)
    }

    /// Notes `project` found held, unless it was within the window already: a short wait that
    /// failed (ordinary contention with another node's batch) never stretches the window, so
    /// the next batch after it waits the whole lock wait again and finds whether the row is
    /// still held.
    fn note(&mut self, project: String) {
        self.0.retain(|_, at| at.elapsed() < RECENTLY_HELD);
        self.0
            .entry(project)
            .or_insert_with(tokio::time::Instant::now);
    }
}

async fn commit(node: &PgStorage, kept: &mut Kept, held: &mut Held, mut batch: Vec<WriteCommand>) {
    let limit = node.settings.commit_timeout;
    expire(&mut batch, limit);
    if batch.is_empty() {
        return;
    }
    let mut reconnected = false;
    let staged = tokio::time::timeout(limit, async {
        loop {
            let connection = kept.get(node).await?;
            match stage(node, connection, held, &mut batch, limit).await {
                Ok(answers) => return Ok(answers),
                Err(Unstaged::Failed(error)) => return Err(error),
                Err(Unstaged::Left) => {
                    expire(&mut batch, limit);
                    if batch.is_empty() {
                        return Ok(Vec::new());
                    }
                }
                Err(Unstaged::Broken(error)) if reconnected => return Err(error),
                Err(Unstaged::Broken(error)) => {
                    tracing::info!(%error, "the writer's connection broke; the batch goes again on a new one");
                    kept.connection = None;
                    reconnected = true;
                    expire(&mut batch, limit);
                    if batch.is_empty() {
                        return Ok(Vec::new());
                    }
                }
                // One project's long transaction (a drop deleting its items) holds its writes
                // only: the others go again at once, rather than wait or fail with them.
                Err(Unstaged::Held { project, why }) => {
                    let (refused, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut batch)
                        .into_iter()
                        .partition(|command| command.project.as_str() == project);
                    batch = rest;
                    expire(&mut batch, limit);
                    held.note(project.clone());
                    for command in refused {
                        let _ = command.reply.send(Err(StorageError::Unavailable(format!(
                            "postgresql storage: project {project:?} is held by another \
                             transaction (a project's drop, a long catalog change, a stalled \
                             node): {why}; nothing was written, try again"
                        ))));
                    }
                    if batch.is_empty() {
                        return Ok(Vec::new());
                    }
                }
            }
        }
    })
    .await;
    let staged = match staged {
        Ok(staged) => staged,
        // Cut off while connecting (nothing was written) or in the transaction (its commit may
        // have reached the storage).
        Err(_) => Err(late(limit, kept.connection.is_some())),
    };
    if staged.is_err() {
        // Dropped, not closed: a connection that stopped answering would not answer a goodbye.
        kept.connection = None;
    }
    match staged {
        Ok(answers) => {
            for (command, answer) in batch.into_iter().zip(answers) {
                let _ = command.reply.send(answer);
            }
        }
        Err(error) => {
            tracing::warn!(%error, "a batch of writes failed");
            for command in batch {
                // Each command of a batch whose commit may have been made may have been written:
                // its caller must hear so (a `_bulk` reports its part "perhaps written").
                let answer = match &error {
                    StorageError::Uncertain(why) => StorageError::Uncertain(why.clone()),
                    _ => StorageError::Unavailable(error.to_string()),
                };
                let _ = command.reply.send(Err(answer));
            }
        }
    }
}

/// Writes the batch in one transaction; answers each command's revisions (or why it was refused),
/// in the batch's order. The entries are taken out of the commands once every project's revisions
/// are handed out, so a batch refused for one project's row ([`Unstaged::Held`]) can go again
/// without it.
async fn stage(
    node: &PgStorage,
    connection: &mut sqlx::PgConnection,
    held: &Held,
    batch: &mut [WriteCommand],
    limit: std::time::Duration,
) -> Result<Vec<Result<Vec<u64>, StorageError>>, Unstaged> {
    // Commands of one project and epoch share one counter update.
    let mut groups: BTreeMap<(String, u64), Vec<usize>> = BTreeMap::new();
    for (index, command) in batch.iter().enumerate() {
        groups
            .entry((command.project.to_string(), command.epoch))
            .or_default()
            .push(index);
    }
    let mut answers: Vec<Result<Vec<u64>, StorageError>> =
        batch.iter().map(|_| Ok(Vec::new())).collect();
    let mut tx = match sqlx::Connection::begin(connection).await {
        Ok(tx) => tx,
        Err(e) if super::bounded::connection_lost(&e) => {
            return Err(Unstaged::Broken(unavailable("begin a batch", &e)))
        }
        Err(e) => return Err(unavailable("begin a batch", &e).into()),
    };
    let mut handed = Vec::with_capacity(groups.len());
    for ((project, epoch), indexes) in groups {
        let count: u64 = indexes.iter().map(|i| batch[*i].entries.len() as u64).sum();
        // Rows are still taken in name order (no deadlock between nodes), only waited for less.
        let quick = held.recently(&project);
        let wait = |timeout: &str| format!("SET LOCAL lock_timeout = '{timeout}'");
        if quick {
            sqlx::query(sqlx::AssertSqlSafe(wait(HELD_WAIT)))
                .execute(&mut *tx)
                .await
                .map_err(|e| unavailable("shorten the lock wait", &e))?;
        }
        let updated = sqlx::query_scalar(
            "UPDATE projects SET revision = revision + $3 \
             WHERE name = $1 AND epoch = $2 AND live RETURNING revision",
        )
        .bind(&project)
        .bind(epoch as i64)
        .bind(count as i64)
        .fetch_optional(&mut *tx)
        .await;
        if quick && updated.is_ok() {
            sqlx::query(sqlx::AssertSqlSafe(wait(super::WRITER_LOCK_TIMEOUT)))
                .execute(&mut *tx)
                .await
                .map_err(|e| unavailable("restore the lock wait", &e))?;
        }
        let last: Option<i64> = match updated {
            Ok(last) => last,
            Err(error) if held_elsewhere(&error) => {
                let why = error.to_string();
                return Err(Unstaged::Held { project, why });
            }
            Err(error) => return Err(unavailable("hand out revisions", &error).into()),
        };
        let Some(last) = last else {
            for index in indexes {
                answers[index] = Err(StorageError::Stale);
            }
            continue;
        };
        handed.push((project, indexes, last as u64 - count));
    }
    // The rows were waited for (another node's batch, a stalled link): a write whose caller left
    // meanwhile, or that is past its time, is not written (see `expire`). Past this point, a
    // stall leaves the session idle in its transaction, which the server ends after a few
    // seconds (`idle_in_transaction_session_timeout`), writing nothing.
    if batch
        .iter()
        .any(|command| command.reply.is_closed() || command.queued.elapsed() > limit)
    {
        return Err(Unstaged::Left);
    }
    let mut rows: Vec<Row> = Vec::new();
    for (project, indexes, first) in handed {
        let mut revision = first;
        for index in indexes {
            let entries = std::mem::take(&mut batch[index].entries);
            let mut revisions = Vec::with_capacity(entries.len());
            for entry in entries {
                revision += 1;
                revisions.push(revision);
                rows.push(row(&project, revision, entry));
            }
            answers[index] = Ok(revisions);
        }
    }
    write_rows(&mut tx, &rows).await?;
    tx.commit()
        .await
        .map_err(|e| commit_failed("a batch of writes", &e))?;
    let mut touched: BTreeMap<&str, i64> = BTreeMap::new();
    for row in &rows {
        let last = touched.entry(row.project.as_str()).or_default();
        *last = (*last).max(row.revision);
    }
    for (project, revision) in touched {
        if let Ok(project) = Ident::parse(project) {
            node.signal.publish(&project, revision as u64);
        }
    }
    Ok(answers)
}

/// Whether `error` is PostgreSQL's refusal of a row another transaction holds: a lock wait past
/// `lock_timeout` (55P03) or the end of a deadlock (40P01).
fn held_elsewhere(error: &sqlx::Error) -> bool {
    crate::projector::postgres::sqlstate(error)
        .is_some_and(|code| code == "55P03" || code == "40P01")
}

/// Why a batch that took too long answers 503: without a connection nothing was written; with
/// one, its commit may have reached the storage.
fn late(waited: std::time::Duration, begun: bool) -> StorageError {
    let said = |outcome: &str| {
        format!(
            "postgresql storage: no answer from the storage in {} s \
             (storage.commit_timeout_secs); {outcome}",
            waited.as_secs()
        )
    };
    if begun {
        StorageError::Uncertain(said(
            "whether it was written is unknown: sending it again is safe for a PUT to an id or \
             a delete, while a create or a POST sent again may make a second item (read it \
             first)",
        ))
    } else {
        StorageError::Unavailable(said("nothing was written"))
    }
}

fn row(project: &str, revision: u64, entry: Entry) -> Row {
    match entry {
        Entry::Upsert {
            blueprint,
            blueprint_uid,
            id,
            version,
            record,
            task,
        } => Row {
            project: project.to_string(),
            revision: revision as i64,
            task: codec::task_value(revision, revision, &task.bytes),
            item: ItemChange::Put {
                blueprint: blueprint.to_string(),
                id,
                record: codec::record_value(revision, version, blueprint_uid, &record),
            },
        },
        Entry::Delete {
            blueprint,
            id,
            task,
            ..
        } => Row {
            project: project.to_string(),
            revision: revision as i64,
            task: codec::task_value(revision, revision, &task),
            item: ItemChange::Delete {
                blueprint: blueprint.to_string(),
                id,
            },
        },
    }
}

/// The journal rows, then the items' latest state: the newest change of each item wins.
async fn write_rows(tx: &mut sqlx::PgConnection, rows: &[Row]) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let projects: Vec<&str> = rows.iter().map(|r| r.project.as_str()).collect();
    let revisions: Vec<i64> = rows.iter().map(|r| r.revision).collect();
    let tasks: Vec<&[u8]> = rows.iter().map(|r| r.task.as_slice()).collect();
    sqlx::query(
        "INSERT INTO journal (project, revision, task) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])",
    )
    .bind(&projects)
    .bind(&revisions)
    .bind(&tasks)
    .execute(&mut *tx)
    .await
    .map_err(|e| unavailable("append to the journal", &e))?;

    // One statement cannot change a row twice: keep each item's last change only.
    let mut last: BTreeMap<(&str, &str, Uuid), &Row> = BTreeMap::new();
    for row in rows {
        let (blueprint, id) = match &row.item {
            ItemChange::Put { blueprint, id, .. } | ItemChange::Delete { blueprint, id } => {
                (blueprint.as_str(), *id)
            }
        };
        last.insert((row.project.as_str(), blueprint, id), row);
    }
    let (mut put, mut gone) = (Columns::default(), Columns::default());
    for ((project, blueprint, id), row) in last {
        match &row.item {
            ItemChange::Put { record, .. } => {
                put.push(project, blueprint, id, row.revision, Some(record))
            }
            ItemChange::Delete { .. } => gone.push(project, blueprint, id, row.revision, None),
        }
    }
    if !put.ids.is_empty() {
        sqlx::query(
            "INSERT INTO items (project, blueprint, id, revision, record) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::bigint[], $5::bytea[]) \
             ON CONFLICT (project, blueprint, id) DO UPDATE \
             SET revision = EXCLUDED.revision, record = EXCLUDED.record",
        )
        .bind(&put.projects)
        .bind(&put.blueprints)
        .bind(&put.ids)
        .bind(&put.revisions)
        .bind(&put.records)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("write items", &e))?;
        // An item written again is no longer deleted: its put is its latest change.
        sqlx::query(
            "DELETE FROM tombstones t USING unnest($1::text[], $2::text[], $3::uuid[]) AS d(project, blueprint, id) \
             WHERE t.project = d.project AND t.blueprint = d.blueprint AND t.id = d.id",
        )
        .bind(&put.projects)
        .bind(&put.blueprints)
        .bind(&put.ids)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("write items", &e))?;
    }
    if !gone.ids.is_empty() {
        sqlx::query(
            "DELETE FROM items i USING unnest($1::text[], $2::text[], $3::uuid[]) AS d(project, blueprint, id) \
             WHERE i.project = d.project AND i.blueprint = d.blueprint AND i.id = d.id",
        )
        .bind(&gone.projects)
        .bind(&gone.blueprints)
        .bind(&gone.ids)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("delete items", &e))?;
        sqlx::query(
            "INSERT INTO tombstones (project, blueprint, id, revision) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::bigint[]) \
             ON CONFLICT (project, blueprint, id) DO UPDATE \
             SET revision = EXCLUDED.revision, deleted_at = now()",
        )
        .bind(&gone.projects)
        .bind(&gone.blueprints)
        .bind(&gone.ids)
        .bind(&gone.revisions)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("delete items", &e))?;
    }
    Ok(())
}

/// Column arrays for `unnest`.
#[derive(Default)]
struct Columns<'a> {
    projects: Vec<&'a str>,
    blueprints: Vec<&'a str>,
    ids: Vec<Uuid>,
    revisions: Vec<i64>,
    records: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn push(
        &mut self,
        project: &'a str,
        blueprint: &'a str,
        id: Uuid,
        revision: i64,
        record: Option<&'a Vec<u8>>,
    ) {
        self.projects.push(project);
        self.blueprints.push(blueprint);
        self.ids.push(id);
        self.revisions.push(revision);
        if let Some(record) = record {
            self.records.push(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    /// A write whose caller gave up, or that waited in the queue past the commit limit, is left
    /// out of the batch: never committed after its client may have sent it again elsewhere.
    #[tokio::test]
    async fn a_write_whose_caller_is_gone_or_that_waited_too_long_is_not_written() {
        let limit = Duration::from_secs(30);
        let command = |queued| {
            let (reply, answer) = oneshot::channel();
            let project = Ident::parse("p").unwrap();
            let command = WriteCommand {
                project,
                epoch: 1,
                entries: Vec::new(),
                reply,
                queued,
            };
            (command, answer)
        };
        let (gone, caller) = command(Instant::now());
        drop(caller);
        let (late, late_answer) = command(Instant::now().checked_sub(2 * limit).unwrap());
        let (fresh, mut fresh_answer) = command(Instant::now());
        let mut batch = vec![gone, late, fresh];
        expire(&mut batch, limit);
        assert_eq!(batch.len(), 1, "only the fresh write is left");
        let said = late_answer.await.unwrap();
        assert!(
            matches!(&said, Err(StorageError::Unavailable(m)) if m.contains("nothing was written")),
            "{said:?}"
        );
        assert!(
            fresh_answer.try_recv().is_err(),
            "the fresh write waits for its batch"
        );
    }
}
