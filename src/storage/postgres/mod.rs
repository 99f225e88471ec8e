//! The PostgreSQL backend (cluster mode): the catalog, the journal, the items' latest state and the
//! projectors' cursors in one database, shared by any number of stateless dstore nodes.
//!
//! Invariants:
//! - **Revisions** come from one counter per project (`projects.revision`), raised once per batch
//!   inside the batch's transaction. The row lock is held until the commit is visible, so a project's
//!   revisions are gap-free and in commit order: a reader that saw revision r has seen every r' < r.
//! - **Epochs**: freezes, retirements and drops take the project's row lock and move its epoch; a
//!   write carries the epoch it was prepared against and updates the counter only `WHERE epoch = $e`,
//!   so a write never commits against versions that changed (it is prepared again).
//! - **Batches**: a node groups concurrent writes into one transaction (`writer`); never one per item.
//! - **Catalog cache**: each node keeps a snapshot, updated by its own edits at once, by a
//!   `NOTIFY` on catalog changes (never per write), and whenever a write finds it stale.
//! - **Projection**: one cursor per (projector, project), leased to whichever node or worker claims
//!   it (`FOR UPDATE SKIP LOCKED`, expiring leases), reading the journal by revision (`projection`).
//!
//! Files: `catalog` (loading, edits, the listener), `writer` (batched item writes), `projection`
//! (leased cursors), `backfill` (leased back-fills), `watch` (cursor polling for waits and health).

mod backfill;
pub mod bounded;
mod catalog;
pub mod projection;
mod watch;
mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, Row};
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::usage::{Usage, UsageMeter, UsageRow};
use super::{KeyReplaced, Refusal, Stats, Storage, StorageError};
use crate::auth::audit::AuditEntry;
use crate::auth::ApiKey;
use crate::blueprint::{BlueprintInput, Change, Ident};
use crate::catalog::{edit, Compatibility, MigrationState, Snapshot, Version};
use crate::config::{ProjectionSettings, SecretUrl};
use crate::feed::signal::ChangeSignal;
use crate::feed::ChangesPage;
use crate::journal::backfill::BackfillState;
use crate::journal::codec;
use crate::journal::task::TaskOp;
use crate::journal::{
    DeadLetter, Entry, ItemRecord, LetterFilter, ProjectorProgress, LETTER_PAGE_BYTES, PURGE_BATCH,
    RETRY_PAGE,
};
use crate::supervise::supervised_until_gone;
use bounded::{within, within_write, Bounded};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a node holds a lease without renewing it; a dead node's leases expire after it.
pub const LEASE: Duration = Duration::from_secs(10);

/// What a PostgreSQL storage needs to know.
#[derive(Clone, Debug)]
pub struct PgStorageSettings {
    pub url: SecretUrl,
    pub schema: String,
    pub node: String,
    /// Every projector the deployment runs: writes wait for these, cursors are kept for these.
    pub projectors: Vec<&'static str>,
    pub projection: ProjectionSettings,
    /// Most projects the deployment holds (`storage.max_projects`).
    pub max_projects: usize,
    /// Most bytes of the catalog as JSON (`storage.max_catalog_bytes`), counted on this node's
    /// copy of it (two nodes growing it at once may each pass: it is kept within an edit or two).
    pub max_catalog_bytes: usize,
    /// How long a batch of writes may wait for the storage (`storage.commit_timeout_secs`).
    pub commit_timeout: Duration,
    /// How long any other exchange with the storage may wait (`storage.query_timeout_secs`).
    pub query_timeout: Duration,
}

/// This node's copy of the catalog, and the stamp of each project in it (dropped ones too).
#[derive(Default)]
struct CatalogCache {
    snapshot: Arc<Snapshot>,
    stamps: HashMap<Ident, u64>,
    /// What each project of `snapshot` takes as JSON (`edit::project_bytes`).
    bytes: HashMap<Ident, usize>,
}

/// Counters of this node, for health and metrics.
#[derive(Debug, Default)]
struct NodeProgress {
    applied: u64,
    failed: u64,
}

pub struct PgStorage {
    /// Every statement through it is bounded by `storage.query_timeout_secs` (`bounded`).
    pool: Bounded,
    /// A few connections of their own for the projection's leases (claims, renewals, settles):
    /// renewals waiting behind reads that hold every connection of [`PgStorage::pool`] (pages of
    /// the change feed) had each node give up every batch longer than a few seconds, again and
    /// again, while reads were heavy.
    leases: Bounded,
    /// How the write batcher connects: it keeps a connection of its own, so item writes never
    /// wait behind reads (a page of the change feed, a scan) for one of [`PgStorage::pool`]'s,
    /// and a batch costs no round trip to check a pooled connection.
    writer_options: PgConnectOptions,
    settings: PgStorageSettings,
    /// The `NOTIFY` channel of catalog changes.
    channel: String,
    catalog: RwLock<CatalogCache>,
    writes: mpsc::Sender<writer::WriteCommand>,
    /// Woken after every commit on this node, so its own projectors start at once.
    pub(super) committed: Notify,
    progress: Mutex<HashMap<String, NodeProgress>>,
    watch: watch::CursorWatch,
    journal_id: String,
    /// What this process's leases are held as: the node's name and a token of this process, so
    /// two processes started with one name (a copy-pasted `DSTORE_NODE`, a restart while the old
    /// process still runs) never hold a cursor at once.
    lease_owner: String,
    usage: UsageMeter,
    /// Wakes this node's change feed followers.
    pub(super) signal: ChangeSignal,
    /// Places for drops running at once on this node (see [`DROPS_AT_ONCE`]).
    drops: tokio::sync::Semaphore,
    /// Projects read again from the storage (for tests).
    #[cfg(test)]
    reloads: std::sync::atomic::AtomicU64,
    /// Parts of dead letters a retry read and queued (for tests).
    #[cfg(test)]
    retry_parts: std::sync::atomic::AtomicU64,
}

/// Most bytes of dead letters, as stored, one part of a retry reads and queues at once (one
/// letter at least). Stored large letters are compressed, so the part takes up to a few times
/// this in memory, `LETTER_PAGE_BYTES` or so.
const RETRY_PART_BYTES: usize = LETTER_PAGE_BYTES / 4;

/// Project drops one node runs at once, each on a connection of its own: a drop's transaction
/// may take minutes (every item of a large project goes in it), and drops holding the pool's
/// connections would leave none to the node's reads, catalog, keys and projection.
const DROPS_AT_ONCE: usize = 2;

impl PgStorage {
    /// `what` (the record, or a part of it: an expression of dstore's own, never a client's) of
    /// an item as stored, if it exists.
    async fn stored_item(
        &self,
        what: &'static str,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let sql =
            format!("SELECT {what} FROM items WHERE project = $1 AND blueprint = $2 AND id = $3");
        bounded::read_twice(|| {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .bind(project.as_str())
                .bind(blueprint.as_str())
                .bind(id)
                .fetch_optional(&self.pool)
        })
        .await
        .map_err(|e| unavailable("read an item", &e))
    }
}

/// How often a node looks for other nodes' commits to the projects its followers follow.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Wakes followers of projects that other nodes wrote to: one query per poll for every followed
/// project, only while someone follows. Failing for [`FOLLOW_WARN_AFTER`] polls in a row is
/// logged as a warning (followers then see other nodes' writes only when they read again on
/// their own: a stream at its heartbeat, a long poll every few seconds).
async fn poll_followed(storage: std::sync::Weak<PgStorage>) {
    /// About five seconds of polls.
    const FOLLOW_WARN_AFTER: u32 = 20;
    let mut failed = 0u32;
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        let Some(node) = storage.upgrade() else {
            return;
        };
        let followed = node.signal.followed();
        if followed.is_empty() {
            continue;
        }
        let names: Vec<&str> = followed.iter().map(Ident::as_str).collect();
        let rows: Result<Vec<(String, i64)>, _> =
            sqlx::query_as("SELECT name, revision FROM projects WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(node.pool())
                .await;
        match rows {
            Ok(rows) => {
                if failed >= FOLLOW_WARN_AFTER {
                    tracing::info!("looking for changes of followed projects works again");
                }
                failed = 0;
                for (name, revision) in rows {
                    if let Ok(project) = Ident::parse(&name) {
                        node.signal.publish(&project, revision as u64);
                    }
                }
            }
            Err(error) => {
                failed = failed.saturating_add(1);
                if failed == FOLLOW_WARN_AFTER {
                    tracing::warn!(
                        %error,
                        "cannot look for changes of followed projects: followers see other \
                         nodes' writes late"
                    );
                } else {
                    tracing::debug!(%error, "cannot look for changes of followed projects");
                }
            }
        }
    }
}

/// Writes counted version use every few seconds, while the storage lives.
async fn flush_usage(storage: std::sync::Weak<PgStorage>) {
    // Buckets older than this were deleted already; the cut-off moves once an hour.
    let mut pruned = i64::MIN;
    loop {
        tokio::time::sleep(super::usage::FLUSH).await;
        let Some(node) = storage.upgrade() else {
            return;
        };
        let rows = node.usage.take();
        if rows.is_empty() {
            continue;
        }
        let projects: Vec<&str> = rows.iter().map(|r| r.project.as_str()).collect();
        let versions: Vec<i32> = rows.iter().map(|r| r.version as i32).collect();
        let hours: Vec<i64> = rows.iter().map(|r| r.hour).collect();
        let writes: Vec<i64> = rows.iter().map(|r| r.writes as i64).collect();
        let last: Vec<DateTime<Utc>> = rows.iter().map(|r| r.last_write_at).collect();
        let written = sqlx::query(
            "INSERT INTO version_usage (project, version, hour, writes, last_write_at) \
             SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[], $5::timestamptz[]) \
             ON CONFLICT (project, version, hour) DO UPDATE SET \
             writes = version_usage.writes + EXCLUDED.writes, \
             last_write_at = greatest(version_usage.last_write_at, EXCLUDED.last_write_at)",
        )
        .bind(&projects)
        .bind(&versions)
        .bind(&hours)
        .bind(&writes)
        .bind(&last)
        .execute(node.pool())
        .await;
        let oldest = hours.iter().max().copied().unwrap_or_default() - super::usage::KEEP_HOURS;
        if written.is_err() {
            // Counted again with the next flush's, rather than lost with this one; those of a
            // project dropped meanwhile go with it (a project made again under its name starts
            // from none).
            drop((projects, versions, hours, writes, last));
            let catalog = node.snapshot();
            let mut rows = rows;
            rows.retain(|row| catalog.projects.contains_key(&row.project));
            node.usage.put_back(rows);
        }
        let written = match written {
            Ok(_) if oldest > pruned => {
                let deleted = sqlx::query("DELETE FROM version_usage WHERE hour < $1")
                    .bind(oldest)
                    .execute(node.pool())
                    .await;
                if deleted.is_ok() {
                    pruned = oldest;
                }
                deleted
            }
            written => written,
        };
        if let Err(error) = written {
            tracing::warn!(%error, "cannot record the use of versions");
        }
    }
}

/// `entry` as PostgreSQL can store it: `jsonb` cannot hold a NUL character, which a refused
/// request's path or project may carry (`/a%00b/…`), so each is written `\0`. Stored as sent, the
/// An API key as a row of `api_keys` holds it: its record, with the last use kept beside it.
fn key_of(row: &sqlx::postgres::PgRow) -> Result<ApiKey, StorageError> {
    let sqlx::types::Json(mut key): sqlx::types::Json<ApiKey> = row
        .try_get("record")
        .map_err(|e| StorageError::Corrupt(format!("an API key is unreadable: {e}")))?;
    let used: Option<DateTime<Utc>> = row.get("last_used_at");
    key.last_used_at = used.max(key.last_used_at);
    Ok(key)
}

/// batch would be refused for ever, and the audit log's queue, then every write, would wait on it.
fn storable_audit(entry: &AuditEntry) -> std::borrow::Cow<'_, AuditEntry> {
    let texts = [
        &*entry.key_id,
        &*entry.key_name,
        &*entry.action,
        &*entry.method,
    ];
    let has_nul = texts
        .into_iter()
        .chain([entry.path.as_str()])
        .chain(entry.project.as_deref())
        .chain(entry.created.as_deref())
        .any(|text| text.contains('\0'));
    if !has_nul {
        return std::borrow::Cow::Borrowed(entry);
    }
    let clean = |text: &str| text.replace('\0', "\\0");
    std::borrow::Cow::Owned(AuditEntry {
        at: entry.at,
        key_id: clean(&entry.key_id).into(),
        key_name: clean(&entry.key_name).into(),
        action: clean(&entry.action).into(),
        project: entry.project.as_deref().map(clean),
        method: clean(&entry.method).into(),
        path: clean(&entry.path),
        status: entry.status,
        created: entry.created.as_deref().map(clean),
    })
}

/// Decodes a run of the change feed's rows, in revision order, until their items take `room`
/// bytes decoded (the row that reaches it included, as a page always holds one change); answers
/// the changes and the bytes they take.
/// A page of a project's changes after `$2`: items and tombstones in one statement, so one
/// snapshot, at most `$3` of them, and none past the first whose stored records before it take
/// `$4` bytes or more (`octet_length` reads a stored value's size without reading the value), so
/// a page of large items sends only what it can hold, not `$3` items to be thrown away. Each row
/// carries the project's horizon, read in the same snapshot, and how many changes the statement
/// looked at and kept: fewer kept says the page was cut by its bytes.
const CHANGES_PAGE: &str = "\
    SELECT revision, blueprint, id, record, horizon, head, looked_at, count(*) OVER () AS kept FROM ( \
      SELECT c.*, \
             (SELECT horizon FROM projects WHERE name = $1) AS horizon, \
             (SELECT revision FROM projects WHERE name = $1) AS head, \
             coalesce(sum(octet_length(record)) OVER (ORDER BY revision \
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before, \
             count(*) OVER () AS looked_at \
      FROM ( \
        (SELECT revision, blueprint, id, record FROM items \
          WHERE project = $1 AND revision > $2 ORDER BY revision LIMIT $3) \
        UNION ALL \
        (SELECT revision, blueprint, id, NULL::bytea FROM tombstones \
          WHERE project = $1 AND revision > $2 ORDER BY revision LIMIT $3) \
        ORDER BY revision LIMIT $3 \
      ) c \
    ) s WHERE before < $4 ORDER BY revision";

fn decode_run(
    rows: Vec<(u64, Ident, Uuid, Option<Vec<u8>>)>,
    room: usize,
) -> Result<(Vec<crate::feed::Change>, usize), StorageError> {
    let mut changes = Vec::with_capacity(rows.len());
    let mut bytes = 0;
    for (revision, blueprint, id, record) in rows {
        if bytes >= room {
            break;
        }
        let record = record
            .map(|stored| codec::decode_record(&stored))
            .transpose()?;
        bytes += record
            .as_ref()
            .map_or(0, |record| crate::feed::decoded_size(&record.body));
        changes.push(crate::feed::Change {
            revision,
            blueprint,
            id,
            record,
        });
    }
    Ok((changes, bytes))
}

/// The connections of a node's projection leases: each projector claims, renews and settles one
/// at a time.
const LEASE_CONNECTIONS: u32 = 4;

/// How long a statement waits for a lock (PostgreSQL's `lock_timeout`): a table an operator or
/// another program holds locked makes requests answer 503 after it, instead of every request
/// waiting as long as the lock is held.
const LOCK_TIMEOUT: &str = "10s";

/// How long a node's batch of writes waits for a project's row (each batch takes the rows of the
/// projects it writes to): past it the writes to that project answer 503 and the batch goes on
/// without them, so a long transaction on one project (its drop deleting every item) holds the
/// node's writes to the others for at most this long, not [`LOCK_TIMEOUT`] at every batch. Longer
/// than [`IDLE_IN_TRANSACTION_TIMEOUT`], so a write waiting behind a stalled node's batch is still
/// taken once PostgreSQL ends that session, and far longer than another node's batch, a catalog
/// change or a back-fill's chunk holds a row.
const WRITER_LOCK_TIMEOUT: &str = "6s";

/// How long a node's session may sit inside a transaction without sending anything before
/// PostgreSQL ends it (`idle_in_transaction_session_timeout`), releasing its locks. A node's own
/// transactions send their statements back to back; one that stops (its process stopped, its host
/// gone from the network mid-write) would otherwise hold its project's row lock and stop every
/// other node's writes into that project for as long. Shorter than [`LOCK_TIMEOUT`], so a write
/// waiting behind a stalled node is taken rather than refused. A host that vanishes outright is
/// found by the server's TCP keepalives (`KEEPALIVES`) instead, in about 25 s.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

/// The server's TCP keepalive probes on a node's connections: idle seconds, interval, count.
const KEEPALIVES: [(&str, &str); 3] = [
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

/// The longest `storage.schema`: PostgreSQL's 63 bytes for a name, less the `_catalog` that
/// names the schema's notification channel.
const MAX_SCHEMA_BYTES: usize = 63 - "_catalog".len();

/// Refuses a `storage.schema` that PostgreSQL would read as another name: the connections' search
/// path takes it as written, where PostgreSQL folds capitals to lower case and a comma separates
/// two schemas, and the notification channel adds `_catalog` to it.
pub(crate) fn check_schema(schema: &str) -> Result<(), StorageError> {
    let valid = schema
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && schema.len() <= MAX_SCHEMA_BYTES;
    if valid {
        return Ok(());
    }
    Err(StorageError::Unavailable(format!(
        "storage.schema {:?} must be 1 to {MAX_SCHEMA_BYTES} lower-case letters, digits and \
         underscores, starting with a letter or an underscore (PostgreSQL reads other names as \
         another schema)",
        crate::blueprint::value::excerpt_str(schema)
    )))
}

/// A storage failure as callers act on it: the database is away or refused.
fn unavailable(what: &str, error: &sqlx::Error) -> StorageError {
    StorageError::Unavailable(format!("postgresql storage: cannot {what}: {error}"))
}

/// A failed COMMIT as callers act on it. The server's error answer (a deferred check, a
/// serialization failure, the server shutting down before it) means the transaction was rolled
/// back, and a statement for which the pool had no connection was never sent: nothing was
/// written. Any other failure (the connection broke or timed out while the
/// COMMIT was on its way or its answer was) leaves the outcome unknown: the server may have
/// committed, so the caller must not be told "not written".
fn commit_failed(what: &str, error: &sqlx::Error) -> StorageError {
    match error {
        // Refused by the server, or never sent (no connection to send it on).
        sqlx::Error::Database(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            unavailable(what, error)
        }
        _ => StorageError::Uncertain(format!(
            "postgresql storage: no answer to the commit of {what}: {error}; whether it was \
             made is unknown: sending it again is safe for a PUT to an id or a delete, while a \
             create or a POST sent again may make a second one (read it first)"
        )),
    }
}

/// The revision each item of `letters`' item writes has now in `project` (none: deleted).
async fn latest_revisions(
    tx: &mut sqlx::PgConnection,
    project: &str,
    letters: &[(String, i64, crate::journal::task::Task)],
) -> Result<HashMap<(String, Uuid), u64>, sqlx::Error> {
    let (blueprints, ids): (Vec<&str>, Vec<Uuid>) = letters
        .iter()
        .filter_map(|(_, _, task)| task.op.item())
        .map(|(blueprint, id)| (blueprint.as_str(), *id))
        .unzip();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, Uuid, i64)> = sqlx::query_as(
        "SELECT i.blueprint, i.id, i.revision FROM items i, \
         unnest($2::text[], $3::uuid[]) AS k(blueprint, id) \
         WHERE i.project = $1 AND i.blueprint = k.blueprint AND i.id = k.id",
    )
    .bind(project)
    .bind(&blueprints)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(blueprint, id, revision)| ((blueprint, id), revision as u64))
        .collect())
}

/// Whether an item write's letter is settled by a newer change of its item
/// ([`TaskOp::superseded_by`]); `latest` has the items there now.
fn superseded(latest: &HashMap<(String, Uuid), u64>, task: &crate::journal::task::Task) -> bool {
    task.op.item().is_some_and(|(blueprint, id)| {
        let now = latest.get(&(blueprint.to_string(), *id)).copied();
        task.op.superseded_by(now)
    })
}

/// Warns when another process with this node's name holds live leases: one that stopped without
/// giving them back (they lapse within [`LEASE`], a back-fill's within 30 s), or one still
/// running with the same name, which works beside this one (leases name the process too) but
/// makes logs ambiguous.
async fn warn_of_namesakes(pool: &Bounded, node: &str) {
    let held: Result<i64, _> = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM cursors WHERE lease_until > now() \
                   AND starts_with(lease_owner, $1 || '/')) \
              + (SELECT count(*) FROM backfills WHERE lease_until > now() \
                   AND starts_with(lease_owner, $1 || '/'))",
    )
    .bind(node)
    .fetch_one(pool)
    .await;
    if let Ok(held @ 1..) = held {
        tracing::warn!(
            node,
            held,
            "another process named like this node holds leases: one that stopped without giving \
             them back (a cursor's lapse within 10 s, a back-fill's within 30 s), or one still running; give every node and \
             worker its own storage.node (DSTORE_NODE)"
        );
    }
}

/// Runs the migrations on a connection of its own, without the lock timeout: they run under an
/// advisory lock of the database, which another node starting at the same time (or a deployment
/// in another schema of the database) holds for as long as its own take, an index built over a
/// large journal among them; a node waits for it, rather than failing to start after
/// [`LOCK_TIMEOUT`].
async fn migrate(options: PgConnectOptions) -> Result<(), StorageError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.options([("lock_timeout", "0")]));
    let ran = MIGRATOR.run(&pool).await;
    pool.close().await;
    ran.map_err(|e| StorageError::Unavailable(format!("postgresql storage: migrations: {e}")))
}

impl PgStorage {
    /// Connects, creates the schema and runs the migrations, loads the catalog and starts the
    /// node's background work (the write batcher, the catalog listener, the cursor watch, the
    /// back-fill runner). Projectors run with [`projection::run`].
    pub async fn open(settings: PgStorageSettings) -> Result<Arc<PgStorage>, StorageError> {
        check_schema(&settings.schema)?;
        let schema = crate::projector::postgres::ident::quote(&settings.schema)
            .map_err(|e| StorageError::Unavailable(format!("storage.schema: {e}")))?;
        let base: PgConnectOptions = settings
            .url
            .expose()
            .parse()
            .map_err(|e| StorageError::Unavailable(format!("storage.url is invalid: {e}")))?;
        let lease_owner = format!(
            "{}/{}",
            settings.node,
            &Uuid::new_v4().simple().to_string()[..8]
        );
        // Named after the node, so an operator (or a test) can tell its sessions.
        let options = base
            .clone()
            .application_name(&format!("dstore {lease_owner}"))
            .options(
                [
                    ("search_path", settings.schema.as_str()),
                    ("TimeZone", "UTC"),
                    ("lock_timeout", LOCK_TIMEOUT),
                    (
                        "idle_in_transaction_session_timeout",
                        IDLE_IN_TRANSACTION_TIMEOUT,
                    ),
                ]
                .into_iter()
                .chain(KEEPALIVES),
            );
        let pool = Bounded::connect_lazy(options.clone(), 10, settings.query_timeout);
        let leases = Bounded::connect_lazy(
            options
                .clone()
                .application_name(&format!("dstore leases {lease_owner}")),
            LEASE_CONNECTIONS,
            settings.query_timeout,
        );
        // Nodes starting together on a fresh database may all create it: the same statement made
        // by two sessions at once can fail on the name's unique index in one of them, which then
        // finds the schema there.
        let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
        if let Err(error) = pool.execute(sqlx::AssertSqlSafe(create.clone())).await {
            let raced = error
                .as_database_error()
                .is_some_and(|e| e.code().as_deref() == Some("23505"));
            if matches!(error, sqlx::Error::PoolTimedOut) {
                // The pool says only that it timed out: one connection says why (refused, no
                // such host, a password refused).
                use sqlx::Connection;
                if let Err(cause) = sqlx::PgConnection::connect_with(&options).await {
                    return Err(unavailable(
                        "connect with storage.url (DSTORE_STORAGE_URL)",
                        &cause,
                    ));
                }
            }
            if !raced {
                return Err(unavailable("create the storage schema", &error));
            }
            pool.execute(sqlx::AssertSqlSafe(create))
                .await
                .map_err(|e| unavailable("create the storage schema", &e))?;
        }
        migrate(options.clone()).await?;
        let journal_id: String =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'journal_id'")
                .fetch_one(&pool)
                .await
                .map_err(|e| unavailable("read the journal id", &e))?;
        warn_of_namesakes(&pool, &settings.node).await;
        let loaded = catalog::load_all(&pool).await?;
        let (writes, queue) = mpsc::channel(4096);
        let storage = Arc::new(PgStorage {
            channel: format!("{}_catalog", settings.schema),
            pool,
            leases,
            // Named after the node, so an operator (or a test) can tell its batcher's session.
            writer_options: options
                .clone()
                .application_name(&format!("dstore writer {lease_owner}"))
                .options([("lock_timeout", WRITER_LOCK_TIMEOUT)]),
            catalog: RwLock::new(CatalogCache::default()),
            writes,
            committed: Notify::new(),
            progress: Mutex::new(HashMap::new()),
            watch: watch::CursorWatch::default(),
            journal_id,
            lease_owner,
            usage: UsageMeter::default(),
            signal: ChangeSignal::default(),
            drops: tokio::sync::Semaphore::new(DROPS_AT_ONCE),
            #[cfg(test)]
            reloads: Default::default(),
            #[cfg(test)]
            retry_parts: Default::default(),
            settings,
        });
        storage.publish(loaded);
        // A project's row held past the lock wait (its drop on another node) must not stop the
        // start: the watch makes the missing cursors within a minute, and a cursor made late
        // starts at that moment's revision with a back-fill of every item, so nothing is missed.
        if let Err(error) = storage.ensure_cursors(None).await {
            tracing::warn!(%error, "cannot give every project a cursor of each projector yet; the node goes on and tries again");
        }
        // The node's loops hold it weakly and end with it; one that panics starts again.
        let node = Arc::downgrade(&storage);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        supervised_until_gone("cluster writer".into(), {
            let node = node.clone();
            move || writer::run(node.clone(), queue.clone())
        });
        supervised_until_gone("cluster catalog listener".into(), {
            let node = node.clone();
            move || catalog::listen(node.clone())
        });
        supervised_until_gone("cluster cursor watch".into(), {
            let node = node.clone();
            move || watch::run(node.clone())
        });
        supervised_until_gone("cluster back-fill".into(), {
            let node = node.clone();
            move || backfill::run(node.clone())
        });
        supervised_until_gone("cluster usage".into(), {
            let node = node.clone();
            move || flush_usage(node.clone())
        });
        supervised_until_gone("cluster feed poll".into(), move || {
            poll_followed(node.clone())
        });
        tracing::info!(node = %storage.settings.node, schema = %storage.settings.schema, "postgresql storage ready");
        Ok(storage)
    }

    pub fn pool(&self) -> &Bounded {
        &self.pool
    }

    /// The connections of the projection's leases (see [`PgStorage::leases`]'s field).
    pub fn leases(&self) -> &Bounded {
        &self.leases
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// What this process's leases are held as: the node's name and a token of this process.
    pub fn lease_owner(&self) -> &str {
        &self.lease_owner
    }

    /// The id of this journal (one per storage schema).
    pub fn journal_id(&self) -> &str {
        &self.journal_id
    }

    /// Puts projects as read into this node's catalog, each only if it is not older than the copy
    /// the node has (by stamp).
    fn publish(&self, loaded: Vec<catalog::Loaded>) {
        let mut cache = self.catalog.write().expect("catalog lock");
        let mut next = Snapshot::clone(&cache.snapshot);
        let mut changed = Vec::new();
        for catalog::Loaded {
            name,
            stamp,
            project,
        } in loaded
        {
            match cache.stamps.get(&name) {
                Some(known) if *known > stamp => continue,
                Some(known) if *known == stamp => {}
                _ => changed.push(name.clone()),
            }
            cache.stamps.insert(name.clone(), stamp);
            match project {
                Some(p) => {
                    cache.bytes.insert(name.clone(), edit::project_bytes(&p));
                    next.projects.insert(name, Arc::new(p));
                }
                None => {
                    cache.bytes.remove(&name);
                    next.projects.remove(&name);
                }
            }
        }
        cache.snapshot = Arc::new(next);
        drop(cache);
        // A new state of a project (this node's edit or another's, a retire among them): its
        // followers read again, as its versions may have changed.
        for name in &changed {
            self.signal.nudge(name);
        }
    }

    /// Reads again the projects (every one, or `project`) whose stamp moved since this node read
    /// them: one small read of the stamps, then only what changed. Reading every version of
    /// every project at each catalog-wide request (and every version of a project at each
    /// request that needs it fresh) cost the storage as much as the catalog is large.
    async fn refresh(&self, project: Option<&Ident>) -> Result<(), StorageError> {
        let stamps: Vec<(String, i64)> = bounded::read_twice(|| {
            sqlx::query_as("SELECT name, changes FROM projects WHERE $1::text IS NULL OR name = $1")
                .bind(project.map(Ident::as_str))
                .fetch_all(&self.pool)
        })
        .await
        .map_err(|e| unavailable("read the catalog's stamps", &e))?;
        let moved: Vec<Ident> = {
            let cache = self.catalog.read().expect("catalog lock");
            stamps
                .into_iter()
                .filter_map(|(name, changes)| {
                    let name = Ident::parse(&name).ok()?;
                    (cache.stamps.get(&name) != Some(&(changes as u64))).then_some(name)
                })
                .collect()
        };
        for name in moved {
            self.reload(&name).await?;
        }
        Ok(())
    }

    /// Refuses an edit that grew `p` from `before` bytes past `storage.max_catalog_bytes`
    /// ([`edit::room_in_catalog`]), the other projects counted as this node holds them.
    fn room_in_catalog(
        &self,
        p: &crate::catalog::Project,
        before: usize,
        writes: &[edit::Write],
    ) -> Result<(), StorageError> {
        if writes.is_empty() {
            return Ok(());
        }
        let others: usize = {
            let cache = self.catalog.read().expect("catalog lock");
            let all: usize = cache.bytes.values().sum();
            all.saturating_sub(cache.bytes.get(&p.name).copied().unwrap_or(0))
        };
        let after = edit::project_bytes(p);
        edit::room_in_catalog(
            &p.name,
            others,
            (before, after),
            self.settings.max_catalog_bytes,
        )
        .map_err(StorageError::from)
    }

    fn publish_one(&self, name: &Ident, stamp: u64, project: Option<crate::catalog::Project>) {
        self.publish(vec![catalog::Loaded {
            name: name.clone(),
            stamp,
            project,
        }]);
    }

    /// Makes sure every configured projector has a cursor for `project` (or for every project).
    /// A projector new to a project that already has a journal is caught up from the items, never
    /// from the journal before it (which is pruned once every cursor is past it): see
    /// [`PgStorage::add_cursors`].
    async fn ensure_cursors(&self, project: Option<&Ident>) -> Result<(), StorageError> {
        let projectors: Vec<String> = self
            .settings
            .projectors
            .iter()
            .map(|p| p.to_string())
            .collect();
        let missing: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT p.name, array_agg(x.projector ORDER BY x.projector) \
             FROM projects p, unnest($1::text[]) AS x(projector) \
             WHERE ($2::text IS NULL OR p.name = $2) AND NOT EXISTS \
                 (SELECT 1 FROM cursors c WHERE c.project = p.name AND c.projector = x.projector) \
             GROUP BY p.name ORDER BY p.name",
        )
        .bind(&projectors)
        .bind(project.map(Ident::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| unavailable("find missing projector cursors", &e))?;
        // One project that cannot have its cursors now (its row held) leaves the others theirs.
        let mut failed = Ok(());
        for (name, projectors) in missing {
            if let Ok(name) = Ident::parse(&name) {
                if let Err(error) = self.add_cursors(&name, &projectors).await {
                    tracing::warn!(project = %name, %error, "cannot add a project's cursors now");
                    failed = failed.and(Err(error));
                }
            }
        }
        failed
    }

    /// Gives `projectors` a cursor for `project` at its current revision, under its row lock: a
    /// write committed before is in the items, one after is read by the new cursor. When the project
    /// has a journal already, every live version is migrated and back-filled into these projectors
    /// alone, so a store added later gets every item in every live version.
    async fn add_cursors(
        &self,
        project: &Ident,
        projectors: &[String],
    ) -> Result<(), StorageError> {
        within(self.pool.limit(), async move {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| unavailable("begin creating projector cursors", &e))?;
            let row: Option<(i64, bool)> =
                sqlx::query_as("SELECT revision, live FROM projects WHERE name = $1 FOR UPDATE")
                    .bind(project.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| unavailable("create projector cursors", &e))?;
            let Some((revision, live)) = row else {
                return Ok(());
            };
            let added: Vec<String> = sqlx::query_scalar(
                "INSERT INTO cursors (projector, project, revision) \
                 SELECT x, $2, $3 FROM unnest($1::text[]) AS x ON CONFLICT DO NOTHING \
                 RETURNING projector",
            )
            .bind(projectors)
            .bind(project.as_str())
            .bind(revision)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| unavailable("create projector cursors", &e))?;
            let mut versions = Vec::new();
            if live && revision > 0 && !added.is_empty() {
                if let Some(p) = catalog::load_project(&mut tx, project).await?.project {
                    versions.extend(p.live_versions().map(|v| v.number));
                }
            }
            for version in &versions {
                let at = Self::next_revisions(&mut tx, project, 1).await?;
                let migrate = TaskOp::Migrate { version: *version };
                Self::append_task(&mut tx, project, at, &migrate, Some(&added)).await?;
                backfill::record_again(&mut tx, project, *version, &added).await?;
            }
            tx.commit()
                .await
                .map_err(|e| commit_failed("projector cursors", &e))?;
            if !versions.is_empty() {
                tracing::info!(%project, projectors = ?added, ?versions, "a store added later is back-filled with every live version");
                self.committed.notify_waiters();
            }
            Ok(())
        })
        .await
    }

    /// Runs a catalog edit under the project's row lock and publishes the new state.
    async fn edit<T: Send>(
        &self,
        project: &Ident,
        create: bool,
        apply: impl FnOnce(
                &mut crate::catalog::Project,
                &mut Vec<edit::Write>,
            ) -> Result<T, crate::catalog::CatalogError>
            + Send,
    ) -> Result<T, StorageError> {
        let known = self
            .catalog
            .read()
            .expect("catalog lock")
            .stamps
            .get(project)
            .copied();
        let (result, stamp, p) = within_write(self.pool.limit(), async move {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| unavailable("begin a catalog edit", &e))?;
            let (mut p, stamp) = catalog::lock_project(
                &mut tx,
                project,
                create.then_some(self.settings.max_projects),
            )
            .await?;
            let mut writes = Vec::new();
            let before = edit::project_bytes(&p);
            let result = apply(&mut p, &mut writes)?;
            self.room_in_catalog(&p, before, &writes)?;
            let stamp = catalog::persist(&mut tx, &mut p, stamp, &writes).await?;
            // A project made again with nothing in it writes nothing but moves the stamp: the
            // other nodes are told of it too.
            if !writes.is_empty() || known != Some(stamp) {
                self.notify(&mut tx, project).await?;
            }
            tx.commit()
                .await
                .map_err(|e| commit_failed("a catalog edit", &e))?;
            Ok::<_, StorageError>((result, stamp, p))
        })
        .await?;
        self.publish_one(project, stamp, Some(p));
        // The edit is committed: a failure to make the cursors of a new project must not answer it
        // as failed. Each node's watch makes missing cursors within a minute.
        if create {
            if let Err(error) = self.ensure_cursors(Some(project)).await {
                tracing::warn!(%project, %error, "cannot create projector cursors; the watch makes them later");
            }
        }
        Ok(result)
    }

    /// Removes at most [`PURGE_BATCH`] tombstones made before `before`, oldest revisions of each
    /// project first, after `after` (the last one an earlier batch of this purge looked at), in one
    /// transaction: a long backlog of deletes is purged in steps that each hold their projects'
    /// rows briefly, none looking again at what the others passed. Answers the last tombstone it
    /// looked at when the batch was full (more may follow), and how many went (one replaced since
    /// by a new delete of its item is younger, and stays).
    async fn purge_tombstone_batch(
        &self,
        before: DateTime<Utc>,
        after: Option<(String, i64)>,
    ) -> Result<(Option<(String, i64)>, u64), StorageError> {
        let failed = |e: sqlx::Error| unavailable("compact the change feed", &e);
        within(self.pool.limit(), async move {
            let batch: Vec<(String, i64)> = sqlx::query_as(
                "SELECT project, revision FROM tombstones WHERE deleted_at < $1 \
                 AND ($3::text IS NULL OR (project, revision) > ($3, $4)) \
                 ORDER BY project, revision LIMIT $2",
            )
            .bind(before)
            .bind(PURGE_BATCH as i64)
            .bind(after.as_ref().map(|(project, _)| project.as_str()))
            .bind(after.as_ref().map_or(0, |(_, revision)| *revision))
            .fetch_all(&self.pool)
            .await
            .map_err(failed)?;
            if batch.is_empty() {
                return Ok((None, 0));
            }
            let last = (batch.len() == PURGE_BATCH).then(|| batch[batch.len() - 1].clone());
            let (projects, revisions): (Vec<String>, Vec<i64>) = batch.iter().cloned().unzip();
            let mut tx = self.pool.begin().await.map_err(failed)?;
            // The projects' rows first, in the byte order of their names, as a batch of writes
            // takes them (sorted as Rust strings; the column's collation may order `_` and digits
            // otherwise) before it removes the tombstones of items written again: taken the other
            // way round, each would wait for the other until PostgreSQL ended one, and a batch of
            // writes failed with it.
            sqlx::query("SELECT 1 FROM projects WHERE name = ANY($1) ORDER BY name COLLATE \"C\" FOR UPDATE")
                .bind(&projects)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            let purged: i64 = sqlx::query_scalar(
                "WITH gone AS (DELETE FROM tombstones t \
                               USING unnest($1::text[], $2::bigint[]) AS b(project, revision) \
                               WHERE t.project = b.project AND t.revision = b.revision \
                                 AND t.deleted_at < $3 \
                               RETURNING t.project, t.revision), \
                 moved AS (UPDATE projects p SET horizon = greatest(p.horizon, g.top) \
                           FROM (SELECT project, max(revision) AS top FROM gone GROUP BY project) g \
                           WHERE p.name = g.project RETURNING 1) \
                 SELECT count(*) FROM gone",
            )
            .bind(&projects)
            .bind(&revisions)
            .bind(before)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
            tx.commit()
                .await
                .map_err(|e| commit_failed("a tombstone purge", &e))?;
            Ok((last, purged as u64))
        })
        .await
    }

    /// Tells the other nodes the project's catalog changed (delivered at commit).
    async fn notify(
        &self,
        tx: &mut sqlx::PgConnection,
        project: &Ident,
    ) -> Result<(), StorageError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(project.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable("notify the other nodes", &e))?;
        Ok(())
    }

    /// Reads one project again from the database into this node's catalog.
    async fn reload(&self, project: &Ident) -> Result<(), StorageError> {
        #[cfg(test)]
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        within(self.pool.limit(), async move {
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(|e| unavailable("read the catalog", &e))?;
            let loaded = catalog::load_project(&mut conn, project).await?;
            self.publish(vec![loaded]);
            Ok(())
        })
        .await
    }

    /// Queues again, in one transaction under `project`'s lock, the letters of `keys`
    /// (projector, revision: every one's task decodable; refused drops of the project when
    /// `drops`, none otherwise) still there, and forgets them; answers how many. An item's or a
    /// migration's letter needs its project, the one it was written to (one made again since was
    /// born past it); a drop's needs it dropped still (made again, the name is another project's,
    /// which the drop would remove). None another retry took, or a deletion removed, since they
    /// were read.
    async fn retry_letters(
        &self,
        project: &str,
        keys: &[(String, i64)],
        drops: bool,
    ) -> Result<usize, StorageError> {
        within_write(self.pool.limit(), async move {
            let Ok(name) = Ident::parse(project) else {
                return Ok(0);
            };
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| unavailable("begin a retry", &e))?;
            let born = match drops {
                true if catalog::lock_dropped(&mut tx, &name).await? => 0,
                true => return Ok(0),
                false => match catalog::lock_project(&mut tx, &name, None).await {
                    Ok((p, _)) => p.working.born,
                    Err(StorageError::NotFound(_)) => return Ok(0),
                    Err(error) => return Err(error),
                },
            };
            let queue = |e: sqlx::Error| unavailable("queue dead letters again", &e);
            let (projectors, revisions): (Vec<&str>, Vec<i64>) =
                keys.iter().map(|(p, r)| (p.as_str(), *r)).unzip();
            let rows = sqlx::query(
                "DELETE FROM dead_letters d USING unnest($2::text[], $3::bigint[]) AS k(projector, revision) \
                 WHERE d.project = $1 AND d.projector = k.projector AND d.revision = k.revision \
                 AND d.revision > $4 AND jsonb_typeof(d.letter->'task') = 'object' \
                 RETURNING d.projector, d.revision, d.letter",
            )
            .bind(project)
            .bind(&projectors)
            .bind(&revisions)
            .bind(born as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(queue)?;
            let mut taken = Vec::with_capacity(rows.len());
            for row in rows {
                let letter: sqlx::types::Json<DeadLetter> = row.try_get("letter").map_err(queue)?;
                let Some(task) = letter.0.task else {
                    continue; // none: the deletion takes letters with a task only
                };
                taken.push((
                    row.get::<String, _>("projector"),
                    row.get::<i64, _>("revision"),
                    task,
                ));
            }
            // Letters of items written again or deleted since are settled by that newer change, which
            // the store got with a task of its own: sent again they would bring back what it
            // replaced where the store forgot it (a delete's version in Elasticsearch, a deleted
            // row). They go, counted, without being sent.
            let settled = {
                let latest = latest_revisions(&mut tx, project, &taken).await.map_err(queue)?;
                let before = taken.len();
                taken.retain(|(_, _, task)| !superseded(&latest, task));
                before - taken.len()
            };
            if taken.is_empty() {
                tx.commit()
                    .await
                    .map_err(|e| commit_failed("a retry", &e))?;
                return Ok(settled);
            }
            // Each projector's letters queued in the order they were refused.
            taken.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            let last = Self::next_revisions(&mut tx, &name, taken.len() as u64).await?;
            let first = last + 1 - taken.len() as u64;
            let (mut at, mut tasks, mut names) = (Vec::new(), Vec::new(), Vec::new());
            for (n, (projector, _, task)) in taken.into_iter().enumerate() {
                let next = first + n as u64;
                let item_revision = match &task.op {
                    TaskOp::Upsert { revision, .. } | TaskOp::Delete { revision, .. } => *revision,
                    TaskOp::Migrate { .. } | TaskOp::DropProject => next,
                };
                let body = codec::task_body(&task.project, &task.op);
                at.push(next as i64);
                tasks.push(codec::task_value(next, item_revision, &body));
                names.push(projector);
            }
            sqlx::query(
                "INSERT INTO journal (project, revision, task, projectors) \
                 SELECT $1, r, t, ARRAY[p] FROM unnest($2::bigint[], $3::bytea[], $4::text[]) AS k(r, t, p)",
            )
            .bind(project)
            .bind(&at)
            .bind(&tasks)
            .bind(&names)
            .execute(&mut *tx)
            .await
            .map_err(queue)?;
            tx.commit()
                .await
                .map_err(|e| commit_failed("a retry", &e))?;
            Ok(at.len() + settled)
        })
        .await
    }

    /// Hands out `n` revisions of a locked project; answers the last.
    async fn next_revisions(
        tx: &mut sqlx::PgConnection,
        project: &Ident,
        n: u64,
    ) -> Result<u64, StorageError> {
        let last: i64 = sqlx::query_scalar(
            "UPDATE projects SET revision = revision + $2 WHERE name = $1 RETURNING revision",
        )
        .bind(project.as_str())
        .bind(n as i64)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| unavailable("hand out revisions", &e))?;
        Ok(last as u64)
    }

    /// Appends a task that is not an item write (a migration, a drop) at `revision`.
    async fn append_task(
        tx: &mut sqlx::PgConnection,
        project: &Ident,
        revision: u64,
        op: &TaskOp,
        projectors: Option<&[String]>,
    ) -> Result<(), StorageError> {
        let body = codec::task_body(project, op);
        sqlx::query(
            "INSERT INTO journal (project, revision, task, projectors) VALUES ($1, $2, $3, $4)",
        )
        .bind(project.as_str())
        .bind(revision as i64)
        .bind(codec::task_value(revision, revision, &body))
        .bind(projectors)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable("append to the journal", &e))?;
        Ok(())
    }

    fn note_applied(&self, projector: &str, applied: usize, failed: usize) {
        let mut progress = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = progress.entry(projector.to_string()).or_default();
        entry.applied += applied as u64;
        entry.failed += failed as u64;
    }
}

#[async_trait]
impl Storage for PgStorage {
    fn backend(&self) -> &'static str {
        "postgresql"
    }

    fn deployment(&self) -> &str {
        &self.journal_id
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.catalog.read().expect("catalog lock").snapshot.clone()
    }

    fn catalog_bytes(&self) -> usize {
        self.catalog
            .read()
            .expect("catalog lock")
            .bytes
            .values()
            .sum()
    }

    async fn refresh_catalog(&self) -> Result<(), StorageError> {
        self.refresh(None).await
    }

    async fn fresh_snapshot(&self, project: &Ident) -> Result<Arc<Snapshot>, StorageError> {
        self.refresh(Some(project)).await?;
        Ok(self.snapshot())
    }

    async fn put_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
        input: BlueprintInput,
    ) -> Result<Vec<Change>, StorageError> {
        self.edit(project, true, |p, writes| {
            edit::put_blueprint(p, name, input, writes)
        })
        .await
    }

    async fn put_blueprints(
        &self,
        project: &Ident,
        inputs: Vec<(Ident, BlueprintInput)>,
    ) -> Result<Vec<Change>, StorageError> {
        self.edit(project, true, |p, writes| {
            edit::put_blueprints(p, inputs, writes)
        })
        .await
    }

    async fn delete_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
    ) -> Result<Vec<Change>, StorageError> {
        self.edit(project, false, |p, writes| {
            edit::delete_blueprint(p, name, writes)
        })
        .await
    }

    async fn retire(&self, project: &Ident, version: u32) -> Result<(), StorageError> {
        self.edit(project, false, |p, writes| edit::retire(p, version, writes))
            .await
    }

    async fn set_migration(
        &self,
        project: &Ident,
        version: u32,
        projector: &str,
        state: MigrationState,
        task: Option<u64>,
    ) -> Result<(), StorageError> {
        self.edit(project, false, |p, writes| {
            edit::set_migration(p, version, projector, (state, task), writes)
        })
        .await
    }

    async fn write(
        &self,
        project: &Ident,
        epoch: u64,
        entries: Vec<Entry>,
    ) -> Result<Vec<u64>, StorageError> {
        match self.check_backlog() {
            Err(StorageError::Backlog {
                projector,
                pending,
                limit,
            }) if crate::storage::admits(
                &self.snapshot(),
                project,
                &projector,
                (pending, limit),
                &[],
            ) => {}
            other => other?,
        }
        let versions = UsageMeter::versions(&entries);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let command = writer::WriteCommand {
            project: project.clone(),
            epoch,
            entries,
            reply,
            queued: tokio::time::Instant::now(),
        };
        // A queue that stays full (the storage stalled) answers as a stalled batch does.
        let limit = self.settings.commit_timeout;
        match tokio::time::timeout(limit, self.writes.send(command)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(StorageError::Unavailable(
                    "the storage is shutting down".into(),
                ))
            }
            Err(_) => {
                return Err(StorageError::Unavailable(format!(
                    "postgresql storage: the node's queue of writes stayed full for {} s \
                     (storage.commit_timeout_secs); nothing was written, try again",
                    limit.as_secs()
                )))
            }
        }
        // The writer took the command and never answered: it stopped (a panic, then started
        // again; or the node stopping), perhaps after its commit.
        let revisions = answer.await.map_err(|_| {
            StorageError::Uncertain(
                "the node's writer stopped while this write was in its batch: it may have been \
                 committed; read the item before sending a create again"
                    .into(),
            )
        })??;
        self.usage.note(project, &versions);
        Ok(revisions)
    }

    async fn set_compatibility(
        &self,
        project: &Ident,
        compatibility: Compatibility,
    ) -> Result<(), StorageError> {
        self.edit(project, false, |p, writes| {
            edit::set_compatibility(p, compatibility, writes)
        })
        .await
    }

    async fn scan_items(
        &self,
        project: &Ident,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(Vec<(Ident, ItemRecord)>, Option<Vec<u8>>), StorageError> {
        let after = after.as_deref().and_then(backfill::parse_cursor);
        // At most `limit` items, and past the first none that would take the page over
        // SCAN_BYTES of records: the server sends no more than the page holds (a cut made here
        // would still have every record of the page sent, and read off the connection).
        let rows = sqlx::query(
            "WITH r AS (SELECT blueprint, id, record, \
                          sum(length(record)) OVER (ORDER BY blueprint, id) - length(record) AS before \
                        FROM items WHERE project = $1 \
                        AND ($2::text IS NULL OR (blueprint, id) > ($2, $3)) \
                        ORDER BY blueprint, id LIMIT $4) \
             SELECT blueprint, id, record, (SELECT count(*) FROM r) AS fetched \
             FROM r WHERE before < $5 ORDER BY blueprint, id",
        )
        .bind(project.as_str())
        .bind(after.as_ref().map(|(b, _)| b.as_str()))
        .bind(after.as_ref().map(|(_, id)| *id).unwrap_or_default())
        .bind(limit as i64)
        .bind(crate::storage::SCAN_BYTES as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| unavailable("read items", &e))?;
        let fetched: i64 = rows.first().map_or(0, |row| row.get("fetched"));
        let (mut items, mut cursor) = (Vec::with_capacity(rows.len()), None);
        for row in &rows {
            let (blueprint, id): (String, Uuid) = (row.get("blueprint"), row.get("id"));
            let record = codec::decode_record(row.get::<&[u8], _>("record"))?;
            cursor = Some(backfill::cursor_of(&blueprint, &id));
            if let Ok(blueprint) = Ident::parse(&blueprint) {
                items.push((blueprint, record));
            }
        }
        // The last page: fewer rows than asked for, none of them cut for their size.
        let last = fetched < limit as i64 && rows.len() as i64 == fetched;
        Ok((items, if last { None } else { cursor }))
    }

    async fn freeze_judged(
        &self,
        project: &Ident,
        forced: bool,
        judged: Option<crate::catalog::edit::Judged>,
    ) -> Result<(Arc<Version>, u64), StorageError> {
        within_write(self.pool.limit(), async move {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| unavailable("begin a freeze", &e))?;
            let (mut p, stamp) = catalog::lock_project(&mut tx, project, None).await?;
            let mut writes = Vec::new();
            let projectors = self.settings.projectors.clone();
            let before = edit::project_bytes(&p);
            let version = edit::freeze(
                &mut p,
                &projectors,
                &[],
                forced,
                judged.as_ref(),
                &mut writes,
            )?;
            self.room_in_catalog(&p, before, &writes)?;
            let stamp = catalog::persist(&mut tx, &mut p, stamp, &writes).await?;
            let revision = Self::next_revisions(&mut tx, project, 1).await?;
            let migrate = TaskOp::Migrate {
                version: version.number,
            };
            Self::append_task(&mut tx, project, revision, &migrate, None).await?;
            // The back-fill is recorded in the same transaction as the version.
            if version.number > 1 {
                backfill::record_new_version(&mut tx, project, version.number).await?;
            }
            self.notify(&mut tx, project).await?;
            tx.commit()
                .await
                .map_err(|e| commit_failed("a freeze", &e))?;
            self.publish_one(project, stamp, Some(p));
            self.committed.notify_waiters();
            Ok((version, revision))
        })
        .await
    }

    async fn remigrate(
        &self,
        project: &Ident,
        version: u32,
        projectors: Vec<String>,
    ) -> Result<u64, StorageError> {
        within_write(self.pool.limit(), async move {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| unavailable("begin a migration", &e))?;
            catalog::lock_project(&mut tx, project, None).await?;
            let revision = Self::next_revisions(&mut tx, project, 1).await?;
            Self::append_task(
                &mut tx,
                project,
                revision,
                &TaskOp::Migrate { version },
                Some(&projectors),
            )
            .await?;
            // A held project is tried again at once.
            sqlx::query(
                "UPDATE cursors SET held_until = NULL WHERE project = $1 AND projector = ANY($2)",
            )
            .bind(project.as_str())
            .bind(&projectors)
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable("release held cursors", &e))?;
            tx.commit()
                .await
                .map_err(|e| commit_failed("a migration", &e))?;
            self.committed.notify_waiters();
            Ok(revision)
        })
        .await
    }

    async fn ensure_backfill(&self, project: &Ident, version: u32) -> Result<bool, StorageError> {
        within(self.pool.limit(), async move {
            if version < 2 {
                return Ok(false);
            }
            // Under the project's row, which a drop takes too: a back-fill recorded for a
            // project dropped meanwhile would stay, finished, under the key of the same version
            // of a project made again under the name.
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| unavailable("start a back-fill", &e))?;
            let live = match catalog::lock_project(&mut tx, project, None).await {
                Ok((p, _)) => p.live_versions().any(|v| v.number == version),
                Err(StorageError::NotFound(_)) => false,
                Err(error) => return Err(error),
            };
            if !live {
                return Ok(false);
            }
            let recorded = backfill::record(&mut tx, project, version, None).await?;
            tx.commit()
                .await
                .map_err(|e| commit_failed("a back-fill's record", &e))?;
            Ok(recorded)
        })
        .await
    }

    async fn changes(
        &self,
        project: &Ident,
        since: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ChangesPage, StorageError> {
        // Items and tombstones in one statement, so one snapshot: revisions of a project commit
        // in order, so a change below one seen here is never committed later.
        // Rows are read as they come, so a page that reaches `max_bytes` holds no more. The
        // project's horizon is read in the same snapshot: one read after could be a drop's, newer
        // than the page's items, and a follower resyncing from `since=0` would go on past the
        // drop under it, keeping the dropped project's items, never told to start over.
        let mut rows = sqlx::query(CHANGES_PAGE)
            .bind(project.as_str())
            .bind(since.min(i64::MAX as u64) as i64)
            .bind(limit.min(i64::MAX as usize) as i64)
            .bind(max_bytes.min(i64::MAX as usize) as i64)
            .fetch(&self.pool);
        // Rows are decoded in runs of about `DECODE_RUN` stored bytes, a long run off the HTTP
        // worker (`aside`), as the embedded backend decodes its pages: a page of 8 MiB of items
        // takes tens of milliseconds to decode.
        const DECODE_RUN: usize = 256 * 1024;
        let mut changes = Vec::new();
        let mut bytes = 0;
        let mut run: Vec<(u64, Ident, Uuid, Option<Vec<u8>>)> = Vec::new();
        let mut run_bytes = 0;
        let mut ended = false;
        let mut horizon: Option<i64> = None;
        let mut head: Option<i64> = None;
        // Whether the statement left out changes past `max_bytes` of stored records.
        let mut cut = false;
        while bytes < max_bytes && !ended {
            match rows
                .try_next()
                .await
                .map_err(|e| unavailable("read the change feed", &e))?
            {
                None => ended = true,
                Some(row) => {
                    if horizon.is_none() {
                        horizon = row.get("horizon");
                        head = row.get("head");
                        cut = row.get::<i64, _>("kept") < row.get::<i64, _>("looked_at");
                    }
                    let blueprint: String = row.get("blueprint");
                    let Ok(blueprint) = Ident::parse(&blueprint) else {
                        continue;
                    };
                    let record: Option<Vec<u8>> = row.get("record");
                    run_bytes += record.as_ref().map_or(0, Vec::len);
                    run.push((
                        row.get::<i64, _>("revision") as u64,
                        blueprint,
                        row.get("id"),
                        record,
                    ));
                    if run_bytes < DECODE_RUN {
                        continue;
                    }
                }
            }
            let taken = std::mem::take(&mut run);
            let room = max_bytes - bytes;
            let (decoded, used) = crate::aside::sized(run_bytes, move || decode_run(taken, room))
                .await
                .map_err(|e| {
                    StorageError::Unavailable(format!("decoding the change feed: {e}"))
                })??;
            run_bytes = 0;
            bytes += used;
            changes.extend(decoded);
        }
        drop(rows);
        // A page without changes gives nothing the horizon could be newer than.
        if horizon.is_none() {
            let read: Option<(i64, i64)> =
                sqlx::query_as("SELECT horizon, revision FROM projects WHERE name = $1")
                    .bind(project.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| unavailable("read the change feed", &e))?;
            (horizon, head) = (read.map(|r| r.0), read.map(|r| r.1));
        }
        Ok(ChangesPage {
            changes,
            horizon: horizon.unwrap_or(0) as u64,
            head: head.unwrap_or(0) as u64,
            bytes,
            // Stored bytes are not what a change takes decoded: a page the statement cut may be
            // short of `max_bytes` decoded, and still end before the last change.
            cut: cut && ended,
        })
    }

    async fn revision(&self, project: &Ident) -> Result<u64, StorageError> {
        let revision: Option<i64> = bounded::read_twice(|| {
            sqlx::query_scalar("SELECT revision FROM projects WHERE name = $1")
                .bind(project.as_str())
                .fetch_optional(&self.pool)
        })
        .await
        .map_err(|e| unavailable("read the project's revision", &e))?;
        Ok(revision.unwrap_or(0) as u64)
    }

    fn follow(&self, project: &Ident) -> tokio::sync::watch::Receiver<u64> {
        self.signal.subscribe(project)
    }

    async fn purge_tombstones(&self, before: DateTime<Utc>) -> Result<u64, StorageError> {
        let (mut total, mut after) = (0, None);
        loop {
            let (last, purged) = self.purge_tombstone_batch(before, after.take()).await?;
            total += purged;
            match last {
                Some(last) => after = Some(last),
                None => return Ok(total),
            }
        }
    }

    async fn drop_project(&self, project: &Ident) -> Result<u64, StorageError> {
        // Not bounded by storage.query_timeout_secs: a large project's rows go in this one
        // transaction (`catalog::forget`), which may take longer; cut short, it would be undone and
        // made again, as long, at every retry. A client that gives up drops it with its request.
        let limit = self.pool.limit();
        let _place = tokio::time::timeout(limit, self.drops.acquire())
            .await
            .map_err(|_| {
                StorageError::Unavailable(format!(
                    "{DROPS_AT_ONCE} project drops are running on this node and none ended in {} s \
                     (storage.query_timeout_secs); nothing was dropped, try again",
                    limit.as_secs()
                ))
            })?
            .map_err(|_| StorageError::Unavailable("the storage is shutting down".into()))?;
        let options = self
            .writer_options
            .clone()
            .application_name(&format!("dstore drop {}", self.lease_owner));
        let mut connection = within(
            limit,
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
        )
        .await
        .map_err(|e| unavailable("connect for a drop", &e))?;
        let mut tx = within(limit, sqlx::Connection::begin(&mut connection))
            .await
            .map_err(|e| unavailable("begin a drop", &e))?;
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable("begin a drop", &e))?;
        catalog::lock_project(&mut tx, project, None).await?;
        let revision = Self::next_revisions(&mut tx, project, 1).await?;
        Self::append_task(&mut tx, project, revision, &TaskOp::DropProject, None).await?;
        let stamp = catalog::forget(&mut tx, project).await?;
        // The feed forgets the project's history: followers from before the drop start over.
        sqlx::query("UPDATE projects SET horizon = $2 WHERE name = $1")
            .bind(project.as_str())
            .bind(revision as i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable("drop a project", &e))?;
        sqlx::query("DELETE FROM version_usage WHERE project = $1")
            .bind(project.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable("drop a project's version use", &e))?;
        self.notify(&mut tx, project).await?;
        tx.commit().await.map_err(|e| commit_failed("a drop", &e))?;
        self.usage.forget(project);
        self.signal.publish(project, revision);
        self.publish_one(project, stamp, None);
        self.committed.notify_waiters();
        Ok(revision)
    }

    async fn item_bytes(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.stored_item("record", project, blueprint, id).await
    }

    async fn item_blueprint_uid(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<u64>, StorageError> {
        // The record's header only: its bytes 13 to 20 (from 1) hold the uid.
        let header = self
            .stored_item("substring(record from 1 for 20)", project, blueprint, id)
            .await?;
        Ok(header
            .map(|header| codec::record_blueprint_uid(&header))
            .transpose()?)
    }

    async fn backfill_state(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<Option<BackfillState>, StorageError> {
        let state: Option<sqlx::types::Json<BackfillState>> = sqlx::query_scalar(
            "SELECT state FROM backfills WHERE project = $1 AND version = $2 AND projectors = ''",
        )
        .bind(project.as_str())
        .bind(version as i32)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| unavailable("read a back-fill", &e))?;
        Ok(state.map(|s| s.0))
    }

    async fn wait_projected(
        &self,
        project: &Ident,
        revision: u64,
        timeout: Duration,
    ) -> Result<(), Vec<String>> {
        self.watch.wait(self, project, revision, timeout).await
    }

    async fn refusals(
        &self,
        project: &Ident,
        revisions: &[u64],
    ) -> Result<Vec<Refusal>, StorageError> {
        let revisions: Vec<i64> = revisions.iter().map(|r| *r as i64).collect();
        let projectors = self.watch.projectors(self);
        // Every key column named, so the look-ups use the primary key however many letters wait.
        let rows = sqlx::query(
            "SELECT projector, revision, letter->>'reason' AS reason FROM dead_letters \
             WHERE projector = ANY($1) AND project = $2 AND revision = ANY($3) \
             ORDER BY projector, revision",
        )
        .bind(&projectors)
        .bind(project.as_str())
        .bind(&revisions)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| unavailable("read dead letters", &e))?;
        Ok(rows
            .into_iter()
            .map(|row| Refusal {
                projector: row.get("projector"),
                revision: row.get::<i64, _>("revision") as u64,
                reason: row.get::<Option<String>, _>("reason").unwrap_or_default(),
            })
            .collect())
    }

    async fn progress(&self, projector: &str) -> ProjectorProgress {
        let mut progress = self.watch.progress(projector);
        if let Some(node) = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(projector)
        {
            progress.applied = node.applied;
            progress.failed = node.failed;
        }
        progress
    }

    fn check_backlog(&self) -> Result<(), StorageError> {
        let limit = self.settings.projection.max_pending_tasks;
        match self.watch.most_behind() {
            Some((projector, pending)) if pending > limit => Err(StorageError::Backlog {
                projector,
                pending,
                limit,
            }),
            _ => Ok(()),
        }
    }

    async fn dead_letters(
        &self,
        filter: LetterFilter<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<String>), StorageError> {
        // The cursor is the last letter's key: `projector/project/revision`.
        let after = match after {
            None => None,
            Some(cursor) => Some(dead_letter_cursor(cursor).ok_or_else(|| {
                StorageError::Cursor(format!(
                    "{:?} is not a cursor this cluster gave (the \"next\" of an earlier answer)",
                    crate::blueprint::value::excerpt_str(cursor)
                ))
            })?),
        };
        let query = match filter.project {
            // One project's, on `dead_letters_by_project`; a letter whose task cannot be decoded
            // belongs to no project (as in embedded mode, where only the task names it).
            Some(project) => {
                let (after_projector, after_revision) = match after {
                    Some((projector, of, revision)) if of == project => (projector, revision),
                    Some(_) => {
                        return Err(StorageError::Cursor(
                            "the cursor is another project's listing's".into(),
                        ))
                    }
                    None => (String::new(), i64::MIN),
                };
                sqlx::query(
                    "SELECT projector, project, revision, letter FROM dead_letters \
                     WHERE project = $1 AND (projector, revision) > ($2, $3) \
                     AND ($4::text IS NULL OR projector = $4) \
                     AND jsonb_typeof(letter->'task') = 'object' \
                     ORDER BY projector, revision LIMIT $5",
                )
                .bind(project)
                .bind(after_projector)
                .bind(after_revision)
                .bind(filter.projector)
                .bind(limit as i64 + 1)
            }
            None => {
                let paged = after.is_some();
                let (after_projector, after_project, after_revision) = after.unwrap_or_default();
                sqlx::query(
                    "SELECT projector, project, revision, letter FROM dead_letters \
                     WHERE ($1::text IS NULL OR projector = $1) \
                     AND ($2::bool IS FALSE OR (projector, project, revision) > ($3, $4, $5)) \
                     ORDER BY projector, project, revision LIMIT $6",
                )
                .bind(filter.projector)
                .bind(paged)
                .bind(after_projector)
                .bind(after_project)
                .bind(after_revision)
                .bind(limit as i64 + 1)
            }
        };
        // One row past the page says whether there is a next one. A page also ends after
        // `LETTER_PAGE_BYTES` of letters (one at least): a letter holds its item for every live
        // version, and a thousand large ones would not fit in memory.
        let (mut rows, mut bytes, mut more) = (Vec::new(), 0, false);
        let mut stream = query.fetch(&self.pool);
        while let Some(row) = stream
            .try_next()
            .await
            .map_err(|e| unavailable("read dead letters", &e))?
        {
            if rows.len() >= limit || bytes >= LETTER_PAGE_BYTES {
                more = true;
                break;
            }
            bytes += row
                .try_get_raw("letter")
                .ok()
                .and_then(|value| value.as_bytes().ok())
                .map_or(0, <[u8]>::len);
            rows.push(row);
        }
        drop(stream);
        let next = rows.last().filter(|_| more).map(|row| {
            let (projector, project, revision): (String, String, i64) = (
                row.get("projector"),
                row.get("project"),
                row.get("revision"),
            );
            format!("{projector}/{project}/{revision}")
        });
        let letters = rows
            .into_iter()
            .map(|row| row.get::<sqlx::types::Json<DeadLetter>, _>("letter").0)
            .collect();
        Ok((letters, next))
    }

    /// Reads and queues [`RETRY_PAGE`] letters at a time, project by project, in one transaction
    /// each (refused drops in another), so a flood of them never sits in memory at once; only
    /// those there when the call began (a letter queued again takes a revision past every one its
    /// project had, so one refused again waits for the next retry, and a store that keeps refusing
    /// cannot keep the call going).
    async fn retry_dead_letters(&self, filter: LetterFilter<'_>) -> Result<usize, StorageError> {
        let read = |e: sqlx::Error| unavailable("read dead letters", &e);
        let projector = filter.projector;
        // One row per project with letters: at most the projects kept, and the dropped ones.
        let bounds: Vec<(String, i64)> = sqlx::query_as(
            "SELECT project, max(revision) FROM dead_letters \
             WHERE ($1::text IS NULL OR projector = $1) AND ($2::text IS NULL OR project = $2) \
             GROUP BY project ORDER BY project",
        )
        .bind(projector)
        .bind(filter.project)
        .fetch_all(&self.pool)
        .await
        .map_err(read)?;
        let mut count = 0;
        for (project, until) in bounds {
            // Keyset paging on `dead_letters_by_project`, from before the first projector name.
            let mut after = (String::new(), i64::MIN);
            loop {
                // Keys only: the letters themselves are read as they are deleted. A letter whose
                // task cannot be decoded stays (no retry could apply it).
                let rows = sqlx::query(
                    "SELECT projector, revision, pg_column_size(letter) AS stored, \
                       jsonb_typeof(letter->'task') = 'object' AS decodable, \
                       letter->'task'->>'op' IS NOT DISTINCT FROM 'drop_project' AS dropped \
                     FROM dead_letters \
                     WHERE project = $1 AND (projector, revision) > ($4, $5) \
                     AND revision <= $2 AND ($3::text IS NULL OR projector = $3) \
                     ORDER BY projector, revision LIMIT $6",
                )
                .bind(&project)
                .bind(until)
                .bind(projector)
                .bind(&after.0)
                .bind(after.1)
                .bind(RETRY_PAGE as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(read)?;
                let full = rows.len() == RETRY_PAGE;
                // (Refused drops apart: they need the project dropped still.) The letters are
                // read whole as they are deleted, so they go in parts of at most
                // `RETRY_PART_BYTES` as stored (one at least): a letter holds its item for every
                // live version, and a thousand large ones at once would not fit in memory.
                let (mut drops, mut others, mut stored) = (Vec::new(), Vec::new(), 0);
                let last = rows.len().saturating_sub(1);
                for (index, row) in rows.into_iter().enumerate() {
                    let name: String = row.get("projector");
                    let revision: i64 = row.get("revision");
                    after = (name.clone(), revision);
                    if row.get::<Option<bool>, _>("decodable").unwrap_or(false) {
                        stored += row.get::<Option<i32>, _>("stored").unwrap_or(0).max(0) as usize;
                        match row.get::<bool, _>("dropped") {
                            true => drops.push((name, revision)),
                            false => others.push((name, revision)),
                        }
                    }
                    if stored < RETRY_PART_BYTES && index < last {
                        continue;
                    }
                    for (keys, dropped) in [(&mut drops, true), (&mut others, false)] {
                        if !keys.is_empty() {
                            count += self.retry_letters(&project, keys, dropped).await?;
                            #[cfg(test)]
                            self.retry_parts
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            keys.clear();
                        }
                    }
                    stored = 0;
                }
                if !full {
                    break;
                }
            }
        }
        self.committed.notify_waiters();
        Ok(count)
    }

    fn reachable(&self) -> Result<(), String> {
        self.watch.storage_error().map_or(Ok(()), Err)
    }

    fn write_failure(&self) -> Option<String> {
        None
    }

    async fn keys(&self) -> Result<Vec<ApiKey>, StorageError> {
        let rows = sqlx::query("SELECT id, record, last_used_at FROM api_keys")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| unavailable("read the API keys", &e))?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let id: String = row.try_get("id").unwrap_or_default();
                super::readable_key(id.as_bytes(), key_of(row))
            })
            .collect())
    }

    async fn put_key(&self, key: &ApiKey, most: usize) -> Result<bool, StorageError> {
        within_write(self.pool.limit(), async move {
            let failed = |e: sqlx::Error| unavailable("write an API key", &e);
            let mut tx = self.pool.begin().await.map_err(failed)?;
            // Creations wait for each other (this lock mode conflicts with itself, and with no read),
            // so two never both see room for one more key.
            sqlx::query("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
                .fetch_one(&mut *tx)
                .await
                .map_err(failed)?;
            if usize::try_from(count).unwrap_or(usize::MAX) >= most {
                return Ok(false);
            }
            sqlx::query("INSERT INTO api_keys (id, record) VALUES ($1, $2)")
                .bind(&key.id)
                .bind(sqlx::types::Json(key))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit()
                .await
                .map_err(|e| commit_failed("an API key", &e))?;
            Ok(true)
        })
        .await
    }

    async fn key(&self, id: &str) -> Result<Option<ApiKey>, StorageError> {
        let row = sqlx::query("SELECT record, last_used_at FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| unavailable("read an API key", &e))?;
        row.as_ref().map(key_of).transpose()
    }

    async fn replace_key(&self, key: &ApiKey, was: &ApiKey) -> Result<KeyReplaced, StorageError> {
        within_write(self.pool.limit(), async move {
            let failed = |e: sqlx::Error| unavailable("write an API key", &e);
            let mut tx = self.pool.begin().await.map_err(failed)?;
            let row =
                sqlx::query("SELECT record, last_used_at FROM api_keys WHERE id = $1 FOR UPDATE")
                    .bind(&key.id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(failed)?;
            let Some(row) = row else {
                return Ok(KeyReplaced::Revoked);
            };
            if !key_of(&row)?.same_apart_from_use(was) {
                return Ok(KeyReplaced::Changed);
            }
            sqlx::query("UPDATE api_keys SET record = $2 WHERE id = $1")
                .bind(&key.id)
                .bind(sqlx::types::Json(key))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit()
                .await
                .map_err(|e| commit_failed("an API key", &e))?;
            Ok(KeyReplaced::Done)
        })
        .await
    }

    async fn touch_key(&self, id: &str, at: DateTime<Utc>) -> Result<(), StorageError> {
        sqlx::query("UPDATE api_keys SET last_used_at = greatest(last_used_at, $2) WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(&self.pool)
            .await
            .map_err(|e| unavailable("record a key's use", &e))?;
        Ok(())
    }

    async fn delete_key(&self, id: &str) -> Result<bool, StorageError> {
        let deleted = sqlx::query("DELETE FROM api_keys WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| commit_failed("a key's revocation", &e))?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError> {
        let at: Vec<DateTime<Utc>> = entries.iter().map(|e| e.at).collect();
        let entries: Vec<std::borrow::Cow<'_, AuditEntry>> =
            entries.iter().map(storable_audit).collect();
        let json: Vec<sqlx::types::Json<&AuditEntry>> = entries
            .iter()
            .map(|e| sqlx::types::Json(e.as_ref()))
            .collect();
        sqlx::query(
            "INSERT INTO audit (at, entry) SELECT * FROM unnest($1::timestamptz[], $2::jsonb[])",
        )
        .bind(&at)
        .bind(&json)
        .execute(&self.pool)
        .await
        .map_err(|e| unavailable("append to the audit log", &e))?;
        Ok(())
    }

    async fn audit(
        &self,
        since: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        let entries: Vec<sqlx::types::Json<AuditEntry>> =
            sqlx::query_scalar("SELECT entry FROM audit WHERE at >= $1 ORDER BY at, id LIMIT $2")
                .bind(since)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| unavailable("read the audit log", &e))?;
        Ok(entries.into_iter().map(|e| e.0).collect())
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StorageError> {
        // In pages: a retention shortened by days may leave millions of entries to remove, which
        // one statement would hold in one transaction, and its locks, for as long.
        const PAGE: i64 = 10_000;
        let mut removed = 0;
        loop {
            let page = sqlx::query(
                "DELETE FROM audit WHERE id IN \
                 (SELECT id FROM audit WHERE at < $1 ORDER BY at LIMIT $2)",
            )
            .bind(before)
            .bind(PAGE)
            .execute(&self.pool)
            .await
            .map_err(|e| unavailable("prune the audit log", &e))?
            .rows_affected();
            removed += page;
            if page < PAGE as u64 {
                return Ok(removed);
            }
        }
    }

    async fn version_usage(&self, project: &Ident, version: u32) -> Result<Usage, StorageError> {
        let rows = sqlx::query(
            "SELECT hour, writes, last_write_at FROM version_usage \
             WHERE project = $1 AND version = $2 AND hour >= $3",
        )
        .bind(project.as_str())
        .bind(version as i32)
        .bind(Utc::now().timestamp().div_euclid(3600) - 24 * 7)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| unavailable("read the use of a version", &e))?;
        let mut rows: Vec<UsageRow> = rows
            .into_iter()
            .map(|row| UsageRow {
                project: project.clone(),
                version,
                hour: row.get("hour"),
                writes: row.get::<i64, _>("writes") as u64,
                last_write_at: row.get("last_write_at"),
            })
            .collect();
        rows.extend(self.usage.pending(project, version));
        Ok(Usage::of(&rows, Utc::now()))
    }

    async fn stats(&self) -> Stats {
        let row = sqlx::query(
            "SELECT (SELECT coalesce(max(revision), 0) FROM projects) AS last, \
                    (SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'items'::regclass) AS items, \
                    (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = current_schema() AND c.relkind = 'r') AS bytes",
        )
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok(row) => Stats {
                last_revision: row.get::<i64, _>("last") as u64,
                items: row.get::<i64, _>("items") as u64,
                bytes: row.get::<i64, _>("bytes") as u64,
                table_readers_bytes: 0,
            },
            Err(_) => Stats::default(),
        }
    }
}

/// A dead letters cursor, `projector/project/revision`, as `dead_letters` gives it (a projector's
/// name, a project's name, a revision: nothing PostgreSQL could refuse to compare, such as a NUL).
fn dead_letter_cursor(cursor: &str) -> Option<(String, String, i64)> {
    let mut parts = cursor.splitn(3, '/');
    let (projector, project, revision) = (parts.next()?, parts.next()?, parts.next()?);
    let revision = revision.parse().ok()?;
    let projector_name = |name: &str| {
        (1..=200).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    (projector_name(projector) && Ident::parse(project).is_ok())
        .then(|| (projector.to_owned(), project.to_owned(), revision))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sqlx::Connection;

    use crate::storage::conformance::{drop_schema, open_postgresql, put_article};
    use crate::storage::{Storage, StorageError};

    use sqlx::Row;

    use super::{Ident, TaskOp, Uuid};

    /// A COMMIT the server refused, or never sent for want of a connection, wrote nothing; one
    /// whose connection broke on the way may have been made.
    #[tokio::test]
    async fn a_commit_s_failure_is_uncertain_only_when_it_may_have_reached_the_server() {
        let (storage, schema) = open_postgresql("commit", vec![]).await;
        let mut tx = storage.pool().begin().await.unwrap();
        for statement in [
            "CREATE TEMP TABLE t (x INT UNIQUE DEFERRABLE INITIALLY DEFERRED)",
            "INSERT INTO t VALUES (1), (1)",
        ] {
            sqlx::query(statement).execute(&mut *tx).await.unwrap();
        }
        let refused = tx.commit().await.unwrap_err();
        assert!(matches!(
            super::commit_failed("a test", &refused),
            StorageError::Unavailable(_)
        ));
        for never_sent in [sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed] {
            assert!(matches!(
                super::commit_failed("a test", &never_sent),
                StorageError::Unavailable(_)
            ));
        }
        let broken = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert!(matches!(
            super::commit_failed("a test", &broken),
            StorageError::Uncertain(_)
        ));
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A page of large items sends only the changes it can hold, not its limit's worth to be
    /// thrown away, and says when it was cut short so that it is not taken for the last page.
    #[tokio::test]
    async fn a_feed_page_reads_only_as_many_large_items_as_it_holds() {
        let (storage, schema) = open_postgresql("feed", vec![]).await;
        let project = crate::storage::conformance::frozen(storage.as_ref()).await;
        let title = "x".repeat(100_000);
        for _ in 0..20 {
            crate::storage::conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &title)
                .await;
        }
        let sent = sqlx::query(super::CHANGES_PAGE)
            .bind(project.as_str())
            .bind(0i64)
            .bind(100i64)
            .bind(256i64 * 1024)
            .fetch_all(storage.pool())
            .await
            .unwrap();
        assert_eq!(
            sent.len(),
            3,
            "what 256 KiB holds, and the one that passes it"
        );
        assert_eq!(sent[0].get::<i64, _>("looked_at"), 20);
        assert_eq!(sent[0].get::<i64, _>("kept"), 3);
        let page = storage.changes(&project, 0, 100, 256 * 1024).await.unwrap();
        assert_eq!(page.changes.len(), 3);
        let all = storage.changes(&project, 0, 100, 8 << 20).await.unwrap();
        assert_eq!((all.changes.len(), all.cut), (20, false));
        let after = all.changes[19].revision;
        let none = storage.changes(&project, after, 100, 1024).await.unwrap();
        assert!(none.changes.is_empty() && !none.cut);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// Keys the storage cannot read refuse the request with 503 in words of dstore's own: the
    /// storage's (a table, a schema, a database user) go to the log, not to a caller who has
    /// proved nothing.
    #[tokio::test]
    async fn unreadable_keys_refuse_without_the_storages_words() {
        let (storage, schema) = open_postgresql("unreadable", vec![]).await;
        let shared: std::sync::Arc<dyn Storage> = storage.clone();
        let keys = crate::auth::keys::KeyStore::open(shared, Vec::new())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE \"{schema}\".api_keys RENAME TO hidden_keys"
        )))
        .execute(storage.pool())
        .await
        .unwrap();
        let token = format!("dstore_0123456789abcdef_{}", "1".repeat(64));
        let refused = keys.authenticate(Some(&token)).await.unwrap_err();
        let message = refused.to_string();
        assert!(message.contains("cannot be read now"), "{message}");
        for hidden in ["api_keys", "relation", schema.as_str()] {
            assert!(!message.contains(hidden), "{message}");
        }
        drop((keys, storage));
        drop_schema(&schema).await;
    }

    /// A key whose record this dstore cannot read (an action it does not know) is left out; the
    /// others still read, so their revocations still reach every node.
    #[tokio::test]
    async fn an_unreadable_key_is_left_out_and_the_others_read() {
        let (storage, schema) = open_postgresql("keys", vec![]).await;
        let key = crate::storage::conformance::test_key("0123456789abcdef");
        assert!(storage.put_key(&key, 10).await.unwrap());
        sqlx::query(
            "INSERT INTO api_keys (id, record) VALUES ('fedcba9876543210', \
             '{\"id\": \"fedcba9876543210\", \"actions\": [\"items.fly\"]}')",
        )
        .execute(storage.pool())
        .await
        .unwrap();
        let keys = storage.keys().await.unwrap();
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["0123456789abcdef"]);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A version this build cannot decode (a newer dstore froze it) stops a node's start naming
    /// the project and the version, not as an anonymous error or a storage that does not answer.
    #[tokio::test]
    async fn an_unreadable_version_is_named_when_a_node_starts() {
        let (storage, schema) = open_postgresql("first", vec![]).await;
        let project = Ident::parse("shop").unwrap();
        put_article(storage.as_ref(), &project, None).await;
        storage.freeze(&project, false).await.expect("version 1");
        sqlx::query("UPDATE versions SET body = (body::jsonb || '{\"changes\": 7}')::json")
            .execute(storage.pool())
            .await
            .unwrap();
        drop(storage);
        let error = crate::storage::conformance::try_open_postgresql_in(&schema, "second")
            .await
            .err()
            .expect("an unreadable version");
        let message = error.to_string();
        assert!(
            message.contains("version 1 of project \"shop\"") && message.contains("newer dstore"),
            "{message}"
        );
        drop_schema(&schema).await;
    }

    /// A dropped project made again by an edit that changes nothing else (a project put with no
    /// blueprints) is seen by another node's fresh read: reviving it moves its stamp.
    #[tokio::test]
    async fn a_project_made_again_empty_is_seen_by_another_node() {
        let (first, schema) = open_postgresql("revive", vec![]).await;
        let project = crate::storage::conformance::frozen(first.as_ref()).await;
        first.drop_project(&project).await.unwrap();
        let second =
            crate::storage::conformance::open_postgresql_in(&schema, "second", vec![]).await;
        assert!(!second
            .fresh_snapshot(&project)
            .await
            .unwrap()
            .projects
            .contains_key(&project));
        first.put_blueprints(&project, Vec::new()).await.unwrap();
        assert!(first.snapshot().projects.contains_key(&project));
        // Told at once: its plain snapshot has it within a second.
        let started = std::time::Instant::now();
        while !second.snapshot().projects.contains_key(&project) {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "not told it was made again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = second.fresh_snapshot(&project).await.unwrap();
        assert!(seen.projects.contains_key(&project), "made again elsewhere");
        drop((first, second));
        drop_schema(&schema).await;
    }

    /// The cursors of a few projects, read every few milliseconds while a write waits for its
    /// projection, are found through an index on their project (the primary key leads with the
    /// projector).
    #[tokio::test]
    async fn the_cursors_of_a_project_have_an_index() {
        let (storage, schema) = open_postgresql("cursorindex", vec![]).await;
        let indexed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = 'cursors' \
             AND indexdef LIKE '%(project)'",
        )
        .bind(&schema)
        .fetch_one(storage.pool())
        .await
        .unwrap();
        assert_eq!(indexed, 1);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A catalog-wide read, or a project's fresh snapshot, reads again only the projects whose
    /// stamp moved: before, each read every version of every project.
    #[tokio::test]
    async fn catalog_reads_read_again_only_what_changed() {
        use std::sync::atomic::Ordering;
        let (first, schema) = open_postgresql("stamps", vec![]).await;
        let project = crate::storage::conformance::frozen(first.as_ref()).await;
        let second =
            crate::storage::conformance::open_postgresql_in(&schema, "second", vec![]).await;
        let before = second.reloads.load(Ordering::Relaxed);
        for _ in 0..10 {
            second.refresh_catalog().await.unwrap();
            second.fresh_snapshot(&project).await.unwrap();
        }
        assert_eq!(
            second.reloads.load(Ordering::Relaxed),
            before,
            "nothing changed"
        );
        put_article(first.as_ref(), &project, Some("views")).await;
        let snapshot = second.fresh_snapshot(&project).await.unwrap();
        assert!(snapshot.projects[&project].working.blueprints["article"]
            .columns
            .contains_key("views"));
        assert!(second.reloads.load(Ordering::Relaxed) > before);
        drop((first, second));
        drop_schema(&schema).await;
    }

    /// Drops run on connections of their own, two at once: drops waiting on a lock (or deleting a
    /// large project's items for minutes) leave the pool's connections to reads. Before, ten
    /// drops held all ten, and every read of the node failed after the pool's wait.
    #[tokio::test]
    async fn drops_in_flight_leave_the_pool_to_reads() {
        use crate::storage::conformance::{frozen, holding};
        let (storage, schema) = open_postgresql("drops", vec![]).await;
        let p = frozen(storage.as_ref()).await;
        crate::storage::conformance::write(storage.as_ref(), &p, Uuid::new_v4(), "t").await;
        // Every drop's delete of the items waits behind this lock.
        let mut holder = holding(&format!("LOCK TABLE \"{schema}\".items IN SHARE MODE")).await;
        let drops: Vec<_> = (0..10)
            .map(|_| {
                let storage = storage.clone();
                let p = p.clone();
                tokio::spawn(async move { storage.drop_project(&p).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let read = tokio::time::timeout(Duration::from_secs(3), storage.revision(&p)).await;
        assert!(matches!(read, Ok(Ok(_))), "{read:?}");
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        for drop in drops {
            drop.abort();
        }
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A project whose row is held (its drop running elsewhere) costs a batch the writer's whole
    /// lock wait once: later batches wait for its row briefly, so the writes to other projects
    /// batched with its own are not held 6 s each time.
    #[tokio::test]
    async fn a_held_project_costs_the_others_its_lock_wait_once() {
        use crate::storage::conformance::{frozen, upsert};
        let (storage, schema) = open_postgresql("heldonce", vec![]).await;
        let p = frozen(storage.as_ref()).await;
        let q = Ident::parse("q").unwrap();
        put_article(storage.as_ref(), &q, None).await;
        storage.freeze(&q, false).await.unwrap();
        let mut holder = crate::storage::conformance::holding(&format!(
            "SELECT 1 FROM \"{schema}\".projects WHERE name = 'p' FOR UPDATE"
        ))
        .await;
        let write = |project: Ident| {
            let storage = storage.clone();
            async move {
                let (epoch, entry) = upsert(storage.as_ref(), &project, Uuid::new_v4(), "t");
                storage.write(&project, epoch, vec![entry]).await
            }
        };
        let refused = write(p.clone()).await;
        assert!(
            matches!(&refused, Err(StorageError::Unavailable(m)) if m.contains("held")),
            "{refused:?}"
        );
        let started = Instant::now();
        let (to_p, to_q) = tokio::join!(write(p.clone()), write(q.clone()));
        assert!(to_p.is_err(), "{to_p:?}");
        to_q.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "waited {:?} for a held project's row again",
            started.elapsed()
        );
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        write(p).await.unwrap();
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A write whose client left while its batch waited for the project's row (another node's
    /// transaction, a stalled link) is not committed once the row is free: its client may have
    /// sent it again through another node since, and a newer write after it, which this late
    /// commit would overwrite. Before, only a client gone before the batch began counted.
    #[tokio::test]
    async fn a_write_whose_client_left_while_it_waited_is_not_committed() {
        use crate::storage::conformance::{frozen, upsert};
        let (storage, schema) = open_postgresql("left", vec![]).await;
        let p = frozen(storage.as_ref()).await;
        let mut holder = crate::storage::conformance::holding(&format!(
            "SELECT 1 FROM \"{schema}\".projects WHERE name = 'p' FOR UPDATE"
        ))
        .await;
        let article = Ident::parse("article").unwrap();
        let (left, stayed) = (Uuid::new_v4(), Uuid::new_v4());
        let write = |id: Uuid| {
            let storage = storage.clone();
            let project = p.clone();
            tokio::spawn(async move {
                let (epoch, entry) = upsert(storage.as_ref(), &project, id, "t");
                storage.write(&project, epoch, vec![entry]).await
            })
        };
        // The leaving write's batch waits for the row first; the other one waits behind it.
        let leaving = write(left);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let staying = write(stayed);
        tokio::time::sleep(Duration::from_millis(800)).await;
        leaving.abort();
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        staying.await.unwrap().unwrap();
        assert!(storage
            .item_bytes(&p, &article, &stayed)
            .await
            .unwrap()
            .is_some());
        assert!(
            storage
                .item_bytes(&p, &article, &left)
                .await
                .unwrap()
                .is_none(),
            "committed after its client left"
        );
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A back-fill asked for (a freeze sent again) of a project dropped meanwhile records
    /// nothing, and a version frozen again under the same number, in a project made again under
    /// the name, is back-filled whatever an earlier one left: a finished back-fill of the dropped
    /// project stood in for it, and the new version never got the items written before it.
    #[tokio::test]
    async fn a_back_fill_of_a_dropped_project_does_not_stand_in_for_the_one_made_again() {
        use crate::storage::conformance::{frozen, write};
        let (storage, schema) = open_postgresql("again", vec![]).await;
        let p = frozen(storage.as_ref()).await;
        put_article(storage.as_ref(), &p, Some("views")).await;
        storage.freeze(&p, false).await.unwrap();
        storage.drop_project(&p).await.unwrap();
        assert!(!storage.ensure_backfill(&p, 2).await.unwrap());
        // What a back-fill recorded in a race with the drop would leave: a finished row.
        sqlx::query(
            "INSERT INTO backfills (project, version, projectors, state, finished) \
             VALUES ('p', 2, '', '{\"total\": 0, \"done\": 0, \"cursor\": null, \"finished\": true}', TRUE) \
             ON CONFLICT (project, version, projectors) DO UPDATE SET finished = TRUE, \
                 state = EXCLUDED.state",
        )
        .execute(storage.pool())
        .await
        .unwrap();

        let p = frozen(storage.as_ref()).await;
        for _ in 0..3 {
            write(storage.as_ref(), &p, Uuid::new_v4(), "t").await;
        }
        put_article(storage.as_ref(), &p, Some("views")).await;
        storage.freeze(&p, false).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = storage.backfill_state(&p, 2).await.unwrap();
            if state.as_ref().is_some_and(|s| s.finished && s.done == 3) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "version 2 never back-filled: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A write waits for a projector only another process runs (a `dstore worker` beside nodes
    /// without its settings), known from its cursors: it answered as soon as the node's own
    /// projectors had the write.
    #[tokio::test]
    async fn a_write_waits_for_a_projector_only_another_process_runs() {
        use crate::storage::conformance::{frozen, open_postgresql_in, write};
        let (node, schema) = open_postgresql("serving", vec!["counting"]).await;
        let worker = open_postgresql_in(&schema, "worker", vec!["other"]).await;
        let project = frozen(node.as_ref()).await;
        worker.ensure_cursors(None).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.watch.projectors(&node).contains(&"other".to_string()) {
            assert!(Instant::now() < deadline, "the worker's cursors never seen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let revision = write(node.as_ref(), &project, Uuid::new_v4(), "t").await;
        let reach = |projector: &'static str| {
            sqlx::query("UPDATE cursors SET revision = $1 WHERE projector = $2")
                .bind(revision as i64)
                .bind(projector)
                .execute(node.pool())
        };
        reach("counting").await.unwrap();
        let waited = node
            .wait_projected(&project, revision, Duration::from_secs(2))
            .await;
        assert_eq!(waited, Err(vec!["other".to_string()]));
        reach("other").await.unwrap();
        let waited = node
            .wait_projected(&project, revision, Duration::from_secs(10))
            .await;
        assert_eq!(waited, Ok(()));
        drop((node, worker));
        drop_schema(&schema).await;
    }

    /// A blueprint's columns keep the order its client gave them on every node and after a
    /// restart, in the working copy and in a frozen version: `JSONB` gave them an order of its own
    /// (shorter names first).
    #[tokio::test]
    async fn blueprint_columns_keep_their_order_on_another_node() {
        let (storage, schema) = open_postgresql("order", vec![]).await;
        let project = Ident::parse("shop").unwrap();
        let article = Ident::parse("article").unwrap();
        let names = ["zeta", "a", "middle", "b2"];
        let columns: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .map(|name| (name.to_string(), serde_json::json!({"type": "string"})))
            .collect();
        let body = serde_json::json!({"postgresql": {"table": "article"},
            "elasticsearch": {"type": "article"}, "columns": columns});
        let input = crate::blueprint::parse_blueprint(&body, "").unwrap();
        storage
            .put_blueprint(&project, &article, input)
            .await
            .unwrap();
        storage.freeze(&project, false).await.unwrap();
        let other = crate::storage::conformance::open_postgresql_in(&schema, "other", vec![]).await;
        let snapshot = other.snapshot();
        let p = snapshot.project(&project).unwrap();
        let order = |blueprints: &crate::blueprint::Blueprints| -> Vec<String> {
            blueprints[&article]
                .columns
                .keys()
                .map(|c| c.to_string())
                .collect()
        };
        assert_eq!(order(&p.working.blueprints), names);
        assert_eq!(order(&p.versions[0].blueprints), names);
        drop((storage, other));
        drop_schema(&schema).await;
    }

    /// A node starting while another runs the migrations (under sqlx's advisory lock of the
    /// database) waits for them, however long they take, rather than failing after the lock
    /// timeout.
    #[tokio::test]
    async fn a_node_starting_during_another_s_migrations_waits_for_them() {
        let (storage, schema) = open_postgresql("first", vec![]).await;
        // sqlx's lock id: 0x3d32ad9e times the CRC-32 (IEEE) of the database's name.
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &byte in bytes {
                crc ^= u32::from(byte);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xedb8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let mut holder = storage.pool().acquire().await.unwrap().detach();
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut holder)
            .await
            .unwrap();
        let lock = 0x3d32_ad9e * i64::from(crc32(database.as_bytes()));
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(lock)
            .execute(&mut holder)
            .await
            .unwrap();
        let second = tokio::spawn({
            let schema = schema.clone();
            async move {
                crate::storage::conformance::open_postgresql_in(&schema, "second", vec![]).await
            }
        });
        // Past the lock timeout (10 s), the second node still waits.
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(!second.is_finished(), "the node gave up waiting");
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(lock)
            .execute(&mut holder)
            .await
            .unwrap();
        let second = tokio::time::timeout(Duration::from_secs(20), second)
            .await
            .expect("opened once the migrations are done")
            .expect("opened");
        drop(second);
        drop(holder);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A node started with a projector more, while one project's row is held elsewhere (its drop
    /// on another node), starts: that project gets its cursor once the row is free. Before, the
    /// start failed after the lock wait, and again at every try while the row was held.
    #[tokio::test]
    async fn a_node_starts_while_a_project_s_row_is_held_and_adds_its_cursor_later() {
        let (storage, schema) = open_postgresql("held", vec!["a"]).await;
        let project = crate::storage::conformance::frozen(storage.as_ref()).await;
        let mut holder = crate::storage::conformance::holding(&format!(
            "SELECT 1 FROM \"{schema}\".projects WHERE name = 'p' FOR UPDATE"
        ))
        .await;
        let second = tokio::time::timeout(
            Duration::from_secs(30),
            crate::storage::conformance::open_postgresql_in(&schema, "second", vec!["a", "b"]),
        )
        .await
        .expect("the node started");
        sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
        second.ensure_cursors(None).await.unwrap();
        let cursors: Vec<String> = sqlx::query_scalar(
            "SELECT projector FROM cursors WHERE project = $1 ORDER BY projector",
        )
        .bind(project.as_str())
        .fetch_all(second.pool())
        .await
        .unwrap();
        assert_eq!(cursors, ["a", "b"]);
        drop((storage, second));
        drop_schema(&schema).await;
    }

    /// A project made again while a drop of it commits is made (or, the drop coming last, not
    /// there): never refused as one project too many in a deployment with room to spare.
    #[tokio::test]
    async fn a_project_made_while_it_is_dropped_is_never_one_too_many() {
        let (storage, schema) = open_postgresql("redrop", vec![]).await;
        let project = crate::blueprint::Ident::parse("p").unwrap();
        let article = || {
            crate::blueprint::parse_blueprint(
                &serde_json::json!({"postgresql": {"table": "articles"},
                    "elasticsearch": {"type": "article"},
                    "columns": {"title": {"type": "string"}}}),
                "",
            )
            .unwrap()
        };
        let name = crate::blueprint::Ident::parse("article").unwrap();
        for _ in 0..40 {
            storage
                .put_blueprint(&project, &name, article())
                .await
                .unwrap();
            let (_, made) = tokio::join!(
                storage.drop_project(&project),
                storage.put_blueprint(&project, &name, article())
            );
            if let Err(StorageError::Conflict(refused)) = made {
                panic!("{refused}");
            }
        }
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A storage that cannot be reached says why, not only that a pool timed out.
    #[tokio::test]
    async fn an_unreachable_storage_says_why() {
        let settings = super::PgStorageSettings {
            url: "postgres://postgres@127.0.0.1:9/dstore".to_string().into(),
            schema: "dstore".into(),
            node: "n".into(),
            projectors: vec![],
            projection: crate::config::ProjectionSettings::default(),
            max_projects: 10,
            max_catalog_bytes: crate::catalog::edit::MAX_CATALOG_BYTES,
            commit_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(30),
        };
        let Err(error) = super::PgStorage::open(settings).await else {
            panic!("opened a storage nobody serves");
        };
        let said = error.to_string();
        assert!(
            said.contains("storage.url") && said.to_lowercase().contains("refused"),
            "{said}"
        );
    }

    /// A write batch whose kept connection the server ended since the last batch (a restart, a
    /// failover, `pg_terminate_backend`) goes again on a new connection: nothing of it was sent
    /// but its `BEGIN`. Before, every write of that batch answered 503.
    #[tokio::test]
    async fn a_write_after_the_writers_session_was_ended_goes_on_a_new_one() {
        let (storage, schema) = open_postgresql("broken", vec![]).await;
        let project = crate::storage::conformance::frozen(storage.as_ref()).await;
        crate::storage::conformance::write(storage.as_ref(), &project, Uuid::new_v4(), "a").await;
        let name = format!("dstore writer {}", storage.lease_owner());
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&name)
        .fetch_all(storage.pool())
        .await
        .unwrap();
        assert_eq!(ended, vec![true], "the writer's session is ended");
        crate::storage::conformance::write(storage.as_ref(), &project, Uuid::new_v4(), "b").await;
        drop(storage);
        drop_schema(&schema).await;
    }

    /// The write batcher keeps its connection from batch to batch: a batch that made a new one
    /// each time wrote at a third of the rate.
    #[tokio::test]
    async fn the_writer_keeps_its_connection_from_batch_to_batch() {
        let (storage, schema) = open_postgresql("keptwriter", vec![]).await;
        let project = crate::storage::conformance::frozen(storage.as_ref()).await;
        let name = format!("dstore writer {}", storage.lease_owner());
        let mut sessions = Vec::new();
        for n in 0..3 {
            crate::storage::conformance::write(
                storage.as_ref(),
                &project,
                Uuid::new_v4(),
                &format!("{n}"),
            )
            .await;
            let pids: Vec<i32> =
                sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
                    .bind(&name)
                    .fetch_all(storage.pool())
                    .await
                    .unwrap();
            sessions.push(pids);
        }
        assert_eq!(sessions[0].len(), 1, "{sessions:?}");
        assert!(sessions.iter().all(|s| *s == sessions[0]), "{sessions:?}");
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A read whose pooled connection the server ended a moment ago (a restart, a failover) is
    /// read again on a checked one: before, it answered 503 once for each such connection.
    #[tokio::test]
    async fn a_read_after_the_pools_sessions_were_ended_is_read_again() {
        let (storage, schema) = open_postgresql("lostread", vec![]).await;
        let project = crate::storage::conformance::frozen(storage.as_ref()).await;
        let written =
            crate::storage::conformance::write(storage.as_ref(), &project, Uuid::new_v4(), "a")
                .await;
        assert_eq!(storage.revision(&project).await.unwrap(), written);
        let name = format!("dstore {}", storage.lease_owner());
        let mut admin = crate::storage::conformance::plain_connection().await;
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&name)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(!ended.is_empty(), "the pool's sessions are ended");
        assert_eq!(storage.revision(&project).await.unwrap(), written);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A node stopped inside a transaction (its process frozen, its host cut off) holds its
    /// project's row lock: PostgreSQL ends its session after the idle timeout, so another node's
    /// freeze waiting for that lock is taken instead of failing after the lock timeout.
    #[tokio::test]
    async fn a_node_stalled_inside_a_transaction_releases_its_locks() {
        let (storage, schema) = open_postgresql("stalled", vec![]).await;
        let project = crate::blueprint::Ident::parse("p").unwrap();
        put_article(storage.as_ref(), &project, None).await;
        // A connection of the node's own pool, with its session settings, stops mid-transaction.
        let mut stalled = storage.pool().acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *stalled).await.unwrap();
        sqlx::query("SELECT live FROM projects WHERE name = 'p' FOR UPDATE")
            .execute(&mut *stalled)
            .await
            .unwrap();
        let frozen = tokio::time::timeout(Duration::from_secs(30), storage.freeze(&project, false))
            .await
            .expect("answered");
        assert!(frozen.is_ok(), "{frozen:?}");
        drop(stalled);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A connection given back to the pool inside a transaction (a `BEGIN` cut short by a time
    /// limit before sqlx counted it) is closed, never handed out again: statements on it would
    /// never commit.
    #[tokio::test]
    async fn a_connection_given_back_inside_a_transaction_is_not_pooled_again() {
        let (storage, schema) = open_postgresql("leftopen", vec![]).await;
        let outside = "SELECT now() = statement_timestamp()";
        let mut conn = storage.pool().acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let open: bool = sqlx::raw_sql(outside)
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .get(0);
        assert!(!open, "the check sees the open transaction");
        drop(conn);
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..3 {
            let mut conn = storage.pool().acquire().await.unwrap();
            // A simple query, as the pool's own check: see `bounded`.
            let row = sqlx::raw_sql("SELECT pg_backend_pid(), now() = statement_timestamp()")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            let (now_pid, outside): (i32, bool) = (row.get(0), row.get(1));
            assert!(outside, "a connection handed out is outside a transaction");
            assert_ne!(
                now_pid, pid,
                "the connection left inside a transaction was closed"
            );
        }
        // The server ends a statement a little after the node gave up on it.
        let ended: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(storage.pool())
            .await
            .unwrap();
        assert_eq!(ended, "35s");
        // The others are pooled again, not made anew for every statement.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(storage.pool())
                .await
                .unwrap();
            seen.insert(pid);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            seen.len() <= 10,
            "{} connections for 20 statements",
            seen.len()
        );
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A retry of large dead letters reads them in parts of bounded bytes: a page of a thousand
    /// letters of large items was read whole, in one statement, gigabytes at once.
    #[tokio::test]
    async fn a_retry_of_large_letters_reads_them_in_parts() {
        use crate::journal::{DeadLetter, LetterFilter};
        use crate::storage::conformance::{frozen, write};
        let (storage, schema) = open_postgresql("largeletters", vec![]).await;
        let project = frozen(storage.as_ref()).await;
        // 600 KiB of random hex digits, which compression barely shortens.
        let title: String = (0..19_200)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        let revision = write(storage.as_ref(), &project, uuid::Uuid::new_v4(), &title).await;
        let raw: Vec<u8> = sqlx::query_scalar("SELECT task FROM journal WHERE revision = $1")
            .bind(revision as i64)
            .fetch_one(storage.pool())
            .await
            .unwrap();
        let letter = DeadLetter::from_raw("store", revision, &raw, "refused".into());
        let letters = 20;
        sqlx::query("UPDATE projects SET revision = revision + $1")
            .bind(letters)
            .execute(storage.pool())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO dead_letters (projector, project, revision, letter) \
             SELECT 'store', 'p', r, $1 FROM generate_series(1, $2) r",
        )
        .bind(sqlx::types::Json(&letter))
        .bind(letters)
        .execute(storage.pool())
        .await
        .unwrap();
        let retried = storage
            .retry_dead_letters(LetterFilter::default())
            .await
            .unwrap();
        assert_eq!(retried, letters as usize);
        let parts = storage
            .retry_parts
            .load(std::sync::atomic::Ordering::Relaxed);
        // About 12 MiB of letters: several parts, none of the whole page.
        assert!(parts >= 3, "{parts} parts");
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A retry reads and queues the dead letters a page at a time, every one of them once, across
    /// pages whose last letter shares its revision with another projector's.
    #[tokio::test]
    async fn a_retry_queues_every_letter_a_page_at_a_time() {
        use crate::journal::{decode_task, DeadLetter, LetterFilter, RETRY_PAGE};
        use crate::storage::conformance::{frozen, write};
        let (storage, schema) = open_postgresql("retrier", vec![]).await;
        let project = frozen(storage.as_ref()).await;
        let revision = write(storage.as_ref(), &project, uuid::Uuid::new_v4(), "t").await;
        let raw: Vec<u8> = sqlx::query_scalar("SELECT task FROM journal WHERE revision = $1")
            .bind(revision as i64)
            .fetch_one(storage.pool())
            .await
            .unwrap();
        let letter = DeadLetter::from_raw("store", revision, &raw, "refused".into());
        assert!(decode_task(&raw).is_ok() && letter.task.is_some());
        // Letters of two projectors at the same revisions, below the project's last one.
        let m = RETRY_PAGE + 7;
        sqlx::query("UPDATE projects SET revision = revision + $1")
            .bind(m as i64)
            .execute(storage.pool())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO dead_letters (projector, project, revision, letter) \
             SELECT name, 'p', r, $1 FROM generate_series(1, $2) r, \
             unnest(ARRAY['store', 'other']) name",
        )
        .bind(sqlx::types::Json(&letter))
        .bind(m as i64)
        .execute(storage.pool())
        .await
        .unwrap();
        let queued = |projector: &'static str| {
            let storage = storage.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM journal WHERE projectors = ARRAY[$1]::text[]",
                )
                .bind(projector)
                .fetch_one(storage.pool())
                .await
                .unwrap();
                n as usize
            }
        };
        // Two retries at once queue each letter once between them.
        let (first, second) = tokio::join!(
            storage.retry_dead_letters(LetterFilter::projector("other")),
            storage.retry_dead_letters(LetterFilter::projector("other"))
        );
        assert_eq!(first.unwrap() + second.unwrap(), m);
        assert_eq!((queued("other").await, queued("store").await), (m, 0));
        let (left, _) = storage
            .dead_letters(LetterFilter::default(), None, 10)
            .await
            .unwrap();
        assert!(left.iter().all(|l| l.projector == "store"), "{left:?}");
        assert_eq!(
            storage
                .retry_dead_letters(LetterFilter::default())
                .await
                .unwrap(),
            m
        );
        assert_eq!((queued("other").await, queued("store").await), (m, m));
        assert!(storage
            .dead_letters(LetterFilter::default(), None, 10)
            .await
            .unwrap()
            .0
            .is_empty());
        // Every one queued once, each at its own new revision.
        let distinct: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT revision) FROM journal \
             WHERE projectors && ARRAY['store', 'other']",
        )
        .fetch_one(storage.pool())
        .await
        .unwrap();
        assert_eq!(distinct as usize, 2 * m);
        drop(storage);
        drop_schema(&schema).await;
    }

    /// A letter whose item was written again or deleted since is settled by that newer change: a
    /// retry removes it without queuing it, so it never brings a deleted item back into a store.
    #[tokio::test]
    async fn a_retry_queues_no_letter_a_newer_change_of_its_item_settled() {
        use crate::journal::{DeadLetter, LetterFilter};
        use crate::storage::conformance::{frozen, write};
        let (storage, schema) = open_postgresql("settled", vec![]).await;
        let project = frozen(storage.as_ref()).await;
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            let revision = write(storage.as_ref(), &project, *id, "first").await;
            let raw: Vec<u8> = sqlx::query_scalar("SELECT task FROM journal WHERE revision = $1")
                .bind(revision as i64)
                .fetch_one(storage.pool())
                .await
                .unwrap();
            let letter = DeadLetter::from_raw("store", revision, &raw, "refused".into());
            sqlx::query(
                "INSERT INTO dead_letters (projector, project, revision, letter) \
                 VALUES ('store', 'p', $1, $2)",
            )
            .bind(revision as i64)
            .bind(sqlx::types::Json(&letter))
            .execute(storage.pool())
            .await
            .unwrap();
        }
        write(storage.as_ref(), &project, ids[0], "second").await;
        let snapshot = storage.snapshot();
        let article = Ident::parse("article").unwrap();
        let uid = snapshot.projects[&project].version(1).unwrap().blueprints[&article].uid;
        let delete =
            crate::write::prepare_delete(&snapshot, &project, &article, ids[1], Some(uid)).unwrap();
        let epoch = snapshot.projects[&project].epoch;
        storage.write(&project, epoch, vec![delete]).await.unwrap();

        let retried = storage
            .retry_dead_letters(LetterFilter::default())
            .await
            .unwrap();
        assert_eq!(retried, 3, "every letter is settled");
        let queued: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT task FROM journal WHERE projectors = ARRAY['store']")
                .fetch_all(storage.pool())
                .await
                .unwrap();
        assert_eq!(queued.len(), 1);
        let task = crate::journal::decode_task(&queued[0]).unwrap();
        assert!(
            matches!(&task.op, TaskOp::Upsert { id, .. } if *id == ids[2]),
            "only the letter of the item nothing changed since: {task:?}"
        );
        assert!(storage
            .dead_letters(LetterFilter::default(), None, 10)
            .await
            .unwrap()
            .0
            .is_empty());
        drop(storage);
        drop_schema(&schema).await;
    }

    #[test]
    fn schema_names_postgresql_would_read_otherwise_are_refused() {
        for good in ["dstore", "_x", "a1_b2", &"s".repeat(55)] {
            assert!(super::check_schema(good).is_ok(), "{good}");
        }
        for bad in [
            "Dstore",
            "s1,dstore",
            "my store",
            "1st",
            "",
            &"s".repeat(56),
            "dstore\0",
        ] {
            let error = super::check_schema(bad).unwrap_err().to_string();
            assert!(error.contains("storage.schema"), "{bad}: {error}");
        }
    }

    /// A dstore table held locked by someone else makes a request fail as unavailable (503) after
    /// the lock timeout, instead of waiting as long as the lock is held.
    #[tokio::test]
    async fn a_table_locked_by_someone_else_is_a_503_after_the_lock_timeout() {
        let (storage, schema) = open_postgresql("locked", vec![]).await;
        let project = crate::blueprint::Ident::parse("p").unwrap();
        put_article(storage.as_ref(), &project, None).await;
        let url = storage.settings.url.expose().to_string();
        let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE \"{schema}\".projects IN ACCESS EXCLUSIVE MODE"
        )))
        .execute(&mut holder)
        .await
        .unwrap();
        let started = Instant::now();
        let refused =
            tokio::time::timeout(Duration::from_secs(30), storage.freeze(&project, false))
                .await
                .expect("answered before the lock was released");
        assert!(
            matches!(&refused, Err(StorageError::Unavailable(m)) if m.contains("lock")),
            "{refused:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        drop(storage);
        drop_schema(&schema).await;
    }
}
