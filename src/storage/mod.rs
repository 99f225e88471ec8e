//! The storage contract: where the catalog and the journal live, as every part of dstore that is not
//! a backend sees them.
//!
//! Two backends implement [`Storage`]: [`embedded`] (RocksDB in the data directory, one process, the
//! default) and [`postgres`] (a shared PostgreSQL database, any number of stateless nodes: cluster
//! mode). The contract, which `storage::conformance` checks against both, one test per behaviour:
//!
//! - a write is acknowledged only once durable, with its revision; revisions of one project strictly
//!   increase in the order writes commit (in cluster mode they are also gap-free, per project);
//! - a write prepared against a project's `epoch` is refused with [`StorageError::Stale`] once the
//!   project's live versions changed, so it is prepared again and never misses a version;
//! - a freeze queues its migrations and its back-fill together: a version never lacks items written
//!   before it;
//! - the catalog a node reads ([`Storage::snapshot`]) is never older than its own edits, and a node
//!   refreshes it when a write finds it stale;
//! - an item reads back as its latest acknowledged state from any node;
//! - the change feed gives, after any revision, the latest change of every item changed since, in
//!   revision order, and never a revision below one it gave before for the same read.
//!
//! Projection is the backend's own: the embedded journal feeds its dispatchers (or the RabbitMQ
//! relay), the PostgreSQL backend leases a cursor per projector and project to whichever node asks.

pub mod embedded;
pub mod postgres;
pub mod usage;

#[cfg(test)]
pub(crate) mod conformance;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use thiserror::Error;
use uuid::Uuid;

use crate::auth::audit::AuditEntry;
use crate::auth::ApiKey;
use crate::blueprint::{BlueprintInput, Change, FieldError, Ident};
use crate::catalog::{CatalogError, Compatibility, MigrationState, Project, Snapshot, Version};
use crate::feed::ChangesPage;
use crate::journal::backfill::BackfillState;
use crate::journal::{
    DeadLetter, Entry, ItemRecord, JournalError, LetterFilter, ProjectorProgress,
};
use usage::Usage;

/// What [`Storage::replace_key`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyReplaced {
    Done,
    /// The key is not stored (revoked).
    Revoked,
    /// The key is no longer what the change was made from.
    Changed,
}

/// What can go wrong in storage, as callers act on it.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("invalid blueprint")]
    Invalid(Vec<FieldError>),
    /// The project's live versions changed since the write was prepared: prepare it again.
    #[error("the versions of the project changed while the write was prepared")]
    Stale,
    /// A projector is too far behind; writes wait until it catches up.
    #[error("projector {projector} is {pending} tasks behind (limit {limit}); try again later")]
    Backlog {
        projector: String,
        pending: u64,
        limit: u64,
    },
    /// The store cannot take the request now (down, shutting down); retrying later can succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The store took too long to say whether it wrote what it was sent: it may have. Sending it
    /// again is safe only where writing twice is (a PUT to an id, a delete).
    #[error("{0}")]
    Uncertain(String),
    /// Something stored cannot be read: a bug or a damaged store.
    #[error("{0}")]
    Corrupt(String),
    /// A paging cursor this backend never gave.
    #[error("{0}")]
    Cursor(String),
}

/// Whether a write into `project` goes on while `projector`, the projector furthest behind, has
/// `pending` tasks waiting against a back-pressure `limit`. Past the limit, a project whose
/// migration failed on that projector is refused first: its tasks are what waits, and none of them
/// can be applied until the migration is fixed. The others keep a tenth of the limit more for
/// their own tasks in flight, so a held project alone never stops them; past that, every write is
/// refused.
/// `held`: the projects the projector holds back for other causes (a refusal of their tasks that
/// may be their own), which count as held too.
pub fn admits(
    snapshot: &Snapshot,
    project: &Ident,
    projector: &str,
    (pending, limit): (u64, u64),
    held: &[Ident],
) -> bool {
    if pending <= limit {
        return true;
    }
    let held = held.contains(project)
        || snapshot
            .projects
            .get(project)
            .is_some_and(|p| holds(p, projector));
    !held && pending <= headroom(limit)
}

/// Whose writes back-pressure refuses (see [`admits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Nobody,
    /// Only the projects the projector holds; the others are within the headroom.
    HeldProjects,
    Everyone,
}

/// Whose writes are refused while `projector`, the projector furthest behind, has `pending` tasks
/// waiting against `limit`: within the headroom, nobody's when it holds no project.
pub fn refused(
    snapshot: &Snapshot,
    projector: &str,
    (pending, limit): (u64, u64),
    held: &[Ident],
) -> Refused {
    if pending <= limit {
        Refused::Nobody
    } else if pending > headroom(limit) {
        Refused::Everyone
    } else if !held.is_empty() || snapshot.projects.values().any(|p| holds(p, projector)) {
        Refused::HeldProjects
    } else {
        Refused::Nobody
    }
}

/// Whether `projector` holds `project`: a migration of it failed there, so its tasks wait.
fn holds(project: &Project, projector: &str) -> bool {
    project.status.values().any(|status| {
        matches!(
            status.migrations.get(projector),
            Some(MigrationState::Failed { .. })
        )
    })
}

/// How many tasks may wait for a projector before writes into projects it does not hold are
/// refused too: a tenth more than `limit`, past which only held projects' writes are refused.
fn headroom(limit: u64) -> u64 {
    limit.saturating_add(limit / 10)
}

impl From<CatalogError> for StorageError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::NotFound(m) => StorageError::NotFound(m),
            CatalogError::Conflict(m) => StorageError::Conflict(m),
            CatalogError::Invalid(errors) => StorageError::Invalid(errors),
            CatalogError::Storage(e) => {
                StorageError::Unavailable(format!("the catalog cannot be written: {e}"))
            }
            CatalogError::Corrupt(e) => {
                StorageError::Corrupt(format!("corrupt catalog record: {e}"))
            }
            e @ CatalogError::Unreadable { .. } => StorageError::Corrupt(e.to_string()),
        }
    }
}

impl From<JournalError> for StorageError {
    fn from(error: JournalError) -> Self {
        match error {
            e @ JournalError::Unanswered => StorageError::Uncertain(e.to_string()),
            JournalError::Catalog(e) => e.into(),
            JournalError::Stale => StorageError::Stale,
            JournalError::Backlog {
                projector,
                pending,
                limit,
            } => StorageError::Backlog {
                projector,
                pending,
                limit,
            },
            e @ (JournalError::Storage(_)
            | JournalError::FrozenUnqueued { .. }
            | JournalError::Closed
            | JournalError::DiskLow { .. }
            | JournalError::DiskFull { .. }
            | JournalError::DiskTooSmallFor { .. }) => StorageError::Unavailable(e.to_string()),
            e @ (JournalError::Corrupt(_)
            | JournalError::Damaged(_)
            | JournalError::Unpaired(_)
            | JournalError::Fault
            | JournalError::Thread(_)
            | JournalError::Leftover { .. }) => StorageError::Corrupt(e.to_string()),
        }
    }
}

/// A write a store refused for good (see [`Storage::refusals`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    pub projector: String,
    pub revision: u64,
    pub reason: String,
}

/// Figures for `/_metrics`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// The newest revision (embedded: the journal's last sequence number).
    pub last_revision: u64,
    /// Items whose latest state is kept (an estimate).
    pub items: u64,
    /// Bytes the catalog and journal take (an estimate; 0 where the backend cannot say).
    pub bytes: u64,
    /// Memory the journal's RocksDB table readers hold: each table file's index and bloom filter,
    /// outside the block cache, growing with the data (0 where the backend has none).
    pub table_readers_bytes: u64,
}

/// The catalog and the journal, whichever backend holds them. See the module documentation for
/// the contract every implementation keeps.
/// How many bytes of stored records one [`Storage::scan_items`] page reads at most (beyond its
/// first item).
pub const SCAN_BYTES: usize = 4 << 20;

#[async_trait]
pub trait Storage: Send + Sync {
    /// `rocksdb` or `postgresql`.
    fn backend(&self) -> &'static str;

    /// The deployment's id: its journal's, made with the data directory (embedded) or the shared
    /// database (cluster). Projectors mark what they create in their stores with it.
    fn deployment(&self) -> &str;

    /// The catalog as this node knows it: never older than this node's own edits.
    fn snapshot(&self) -> Arc<Snapshot>;

    /// What every project of [`Storage::snapshot`] takes as JSON (`edit::project_bytes`), the
    /// measure of `storage.max_catalog_bytes`.
    fn catalog_bytes(&self) -> usize;

    /// Reads the catalog again from where it is kept (a write found this node's copy stale).
    async fn refresh_catalog(&self) -> Result<(), StorageError>;

    /// The catalog with `project` as stored right now: what reads of the catalog and freezes use,
    /// so a change made through another node a moment ago is seen (this node's copy follows other
    /// nodes' changes only within milliseconds).
    async fn fresh_snapshot(&self, project: &Ident) -> Result<Arc<Snapshot>, StorageError>;

    /// Creates or edits one blueprint of a project's working copy (creating the project).
    async fn put_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
        input: BlueprintInput,
    ) -> Result<Vec<Change>, StorageError>;

    /// Replaces every blueprint of a project's working copy (creating the project).
    async fn put_blueprints(
        &self,
        project: &Ident,
        inputs: Vec<(Ident, BlueprintInput)>,
    ) -> Result<Vec<Change>, StorageError>;

    async fn delete_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
    ) -> Result<Vec<Change>, StorageError>;

    /// Stops projecting into a version; writes against it are refused from now on.
    async fn retire(&self, project: &Ident, version: u32) -> Result<(), StorageError>;

    /// Records how a projector's migration of a version went, for the `Migrate` task `task` when
    /// known: one of an earlier project of the name, dropped since, is not recorded.
    async fn set_migration(
        &self,
        project: &Ident,
        version: u32,
        projector: &str,
        state: MigrationState,
        task: Option<u64>,
    ) -> Result<(), StorageError>;

    /// Journals item writes prepared against the project's `epoch`; answers their revisions, in
    /// order. [`StorageError::Stale`] when the project's live versions moved meanwhile.
    async fn write(
        &self,
        project: &Ident,
        epoch: u64,
        entries: Vec<Entry>,
    ) -> Result<Vec<u64>, StorageError>;

    /// Freezes the working copy as the next version, with its migrations and its back-fill, in one
    /// step (`forced`: marked as frozen despite a lossy report). Answers the version and the
    /// revision of its migration.
    async fn freeze(
        &self,
        project: &Ident,
        forced: bool,
    ) -> Result<(Arc<Version>, u64), StorageError> {
        self.freeze_judged(project, forced, None).await
    }

    /// Like [`Storage::freeze`], refused (a conflict, nothing frozen) when the working copy is not
    /// `judged`, what the caller judged the freeze on, is checked under the project's lock, so an
    /// edit, a freeze or a setting racing the freeze never has it go through unjudged.
    async fn freeze_judged(
        &self,
        project: &Ident,
        forced: bool,
        judged: Option<crate::catalog::edit::Judged>,
    ) -> Result<(Arc<Version>, u64), StorageError>;

    /// Sets a project's compatibility setting.
    async fn set_compatibility(
        &self,
        project: &Ident,
        compatibility: Compatibility,
    ) -> Result<(), StorageError>;

    /// Up to `limit` items of a project after `after` (a cursor this answered before), in a stable
    /// order, with the cursor after them (`None` at the end); fewer once [`SCAN_BYTES`] of stored
    /// records were read (one at least), so a page of large items stays small in memory.
    async fn scan_items(
        &self,
        project: &Ident,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(Vec<(Ident, ItemRecord)>, Option<Vec<u8>>), StorageError>;

    /// Queues the migrations of `version` again for `projectors`; answers their revision.
    async fn remigrate(
        &self,
        project: &Ident,
        version: u32,
        projectors: Vec<String>,
    ) -> Result<u64, StorageError>;

    /// Starts the back-fill of `version` unless one was recorded; answers whether it started one.
    async fn ensure_backfill(&self, project: &Ident, version: u32) -> Result<bool, StorageError>;

    /// Forgets a project and queues its removal from every store; answers the drop's revision.
    async fn drop_project(&self, project: &Ident) -> Result<u64, StorageError>;

    /// The latest acknowledged state of an item, as stored (`journal::codec::record_value`): a
    /// reader decodes it where its memory is counted.
    async fn item_bytes(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Vec<u8>>, StorageError>;

    /// The latest acknowledged state of an item, decoded.
    async fn item(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<ItemRecord>, StorageError> {
        match self.item_bytes(project, blueprint, id).await? {
            Some(bytes) => Ok(Some(
                crate::journal::codec::decode_record_aside(bytes).await?,
            )),
            None => Ok(None),
        }
    }

    /// The blueprint uid an item was stored with, if it exists, without reading the item whole:
    /// a `_bulk` delete needs only that.
    async fn item_blueprint_uid(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<u64>, StorageError>;

    async fn backfill_state(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<Option<BackfillState>, StorageError>;

    /// Waits until every projector applied the write `revision` of `project`; on time-out, names
    /// the projectors still behind.
    async fn wait_projected(
        &self,
        project: &Ident,
        revision: u64,
        timeout: Duration,
    ) -> Result<(), Vec<String>>;

    /// Which of the writes `revisions` of `project` a projector refused for good: each is a dead
    /// letter now (`dead_letters`), with the store's reason. A projector that has not settled a
    /// write yet has not refused it.
    async fn refusals(
        &self,
        project: &Ident,
        revisions: &[u64],
    ) -> Result<Vec<Refusal>, StorageError>;

    /// How far a projector got.
    async fn progress(&self, projector: &str) -> ProjectorProgress;

    /// Whether writes are accepted now (refused while a projector is too far behind).
    fn check_backlog(&self) -> Result<(), StorageError>;

    /// The projects `projector` holds back for a cause the catalog does not show (a refusal of
    /// their tasks that may be their own), which back-pressure refuses first (see [`admits`]).
    fn held_by(&self, _projector: &str) -> Vec<Ident> {
        Vec::new()
    }

    /// Dead letters `filter` takes, in order, at most `limit` of them after `after` (a cursor this
    /// backend gave as `next`: opaque to clients), and the cursor to go on from when there may be
    /// more (a page of one project's letters may hold fewer than `limit` and still have a next).
    /// A cursor that is not this backend's is `StorageError::Cursor`.
    async fn dead_letters(
        &self,
        filter: LetterFilter<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<String>), StorageError>;

    /// Queues the dead letters `filter` takes again, those there when the call began; answers how
    /// many.
    async fn retry_dead_letters(&self, filter: LetterFilter<'_>) -> Result<usize, StorageError>;

    async fn stats(&self) -> Stats;

    /// Whether this node can reach where the catalog and the journal live (cluster mode: the
    /// shared database, as of the last poll); the reason when it cannot.
    fn reachable(&self) -> Result<(), String>;

    /// Why writes into the journal fail now, if its last write failed (a full disk, an I/O error)
    /// and none has succeeded since. Cluster mode: never (`reachable` says when the database
    /// fails).
    fn write_failure(&self) -> Option<String>;

    /// Every API key (digests only, never secrets). A key whose record cannot be read (written by
    /// a newer dstore with an action this one does not know, or damaged) is left out and logged:
    /// it stops working (refused as unknown) while every other key's changes, revocations among
    /// them, still reach this node.
    async fn keys(&self) -> Result<Vec<ApiKey>, StorageError>;

    /// Creates an API key unless `most` keys exist already; answers false, writing nothing, then.
    /// Concurrent creations (through any node) never pass `most` together.
    async fn put_key(&self, key: &ApiKey, most: usize) -> Result<bool, StorageError>;

    /// One API key as stored now (not a node's copy), if it exists.
    async fn key(&self, id: &str) -> Result<Option<ApiKey>, StorageError>;

    /// Replaces an API key with `key`, changed from `was`, as one step: unless it was revoked
    /// meanwhile (it stays revoked) or changed since it was `was` (its use aside), when nothing is
    /// written: a change made from an older copy would undo a narrowing or a rotation.
    async fn replace_key(&self, key: &ApiKey, was: &ApiKey) -> Result<KeyReplaced, StorageError>;

    /// Records when a key was last used, changing nothing else of it (nor making it again).
    async fn touch_key(&self, id: &str, at: DateTime<Utc>) -> Result<(), StorageError>;

    /// Revokes an API key; answers whether it existed.
    async fn delete_key(&self, id: &str) -> Result<bool, StorageError>;

    /// Appends entries to the audit log.
    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError>;

    /// Audit entries at or after `since`, oldest first.
    async fn audit(
        &self,
        since: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError>;

    /// Removes audit entries older than `before`; answers how many.
    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StorageError>;

    /// How much a version is written to, lately.
    async fn version_usage(&self, project: &Ident, version: u32) -> Result<Usage, StorageError>;

    /// Up to `limit` changes of a project after revision `since`, in revision order: the latest
    /// change of each item (its state, or its delete), with the project's horizon (see `feed`).
    /// The page ends early, after at least one change, once its items hold `max_bytes` decoded
    /// (`feed::decoded_size`; [`crate::feed::PAGE_BYTES`] for an answer, less for a stream).
    async fn changes(
        &self,
        project: &Ident,
        since: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ChangesPage, StorageError>;

    /// The highest revision the project has committed (every change up to it is readable).
    async fn revision(&self, project: &Ident) -> Result<u64, StorageError>;

    /// A receiver woken when the project commits item changes: at once on this node; in cluster
    /// mode, within a fraction of a second of another node's commit.
    fn follow(&self, project: &Ident) -> tokio::sync::watch::Receiver<u64>;

    /// Removes the feed's tombstones (deletes) made before `before`, moving the horizons of their
    /// projects; answers how many went.
    async fn purge_tombstones(&self, before: DateTime<Utc>) -> Result<u64, StorageError>;
}

/// The storage of a running service.
pub type SharedStorage = Arc<dyn Storage>;

/// A key read by [`Storage::keys`], or `None`, logged, when its record (named by `record`) cannot
/// be read.
fn readable_key(record: &[u8], read: Result<ApiKey, StorageError>) -> Option<ApiKey> {
    read.map_err(|error| {
        let record = String::from_utf8_lossy(record);
        tracing::error!(%record, %error, "an API key cannot be read; it is refused until it is written again");
    })
    .ok()
}
