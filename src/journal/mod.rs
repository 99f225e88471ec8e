//! dstore's own durable journal: accepted writes and pending projector tasks, committed atomically.
//!
//! Every change goes through one writer thread ([`writer`]) that groups concurrent requests into one
//! RocksDB write batch (and one fsync, with `Durability::Sync`), hands out the sequence numbers that
//! order tasks (a write's revision is its sequence number), and only then answers. The batch holds the
//! item's latest state (`items`), one task per enabled projector (`tasks`) and the last sequence number,
//! so a crash leaves a write either fully accepted with all its tasks or absent. Projectors take tasks
//! in sequence order ([`Journal::pending`]) and remove them once applied ([`Journal::ack`]).
//!
//! Beside the writer: [`read`] (items and the change feed), [`lanes`] (each projector's pending
//! tasks, acknowledgements and progress), [`backfill`], and at start [`import`] (the keyspaces moved
//! between their two homes) and [`rewrite`] (what an older journal needs once).

pub mod backfill;
pub mod codec;
mod disk;
mod import;
pub(crate) mod keys;
mod lanes;
pub mod outbox;
mod read;
mod rewrite;
pub mod task;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;
use tokio::sync::{oneshot, watch, Notify};
use uuid::Uuid;

use crate::blueprint::{Ident, Uid};
use crate::catalog::{Catalog, CatalogError, Version};
use crate::projector::ProjectorKind;
pub use codec::decode_task;
use lanes::count_tasks;
pub(crate) use lanes::{LETTER_PAGE_BYTES, RETRY_PAGE};
use rewrite::{index_changes, move_deleted};
use task::{Task, TaskOp, VersionDoc};
pub use writer::Command;

/// A raw key and value read from RocksDB.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// A task's seq and its stored value.
pub type RawTask = (u64, Box<[u8]>);

/// The store layout this version of dstore makes: Elasticsearch names joined by `-`, PostgreSQL
/// schemas of long project names with a 64-bit hash. Journals of layout 1 (no `layout` key) are
/// upgraded at start (see [`Journal::upgrade_layout`]).
pub const LAYOUT: u32 = 2;

/// A batch of pending tasks ends after this many stored bytes, however many tasks it holds, so
/// large items make small batches.
pub(crate) const BATCH_BYTES: usize = 8 << 20;

/// Tombstones one command of the writer purges at most (see [`Journal::purge_tombstones`]).
pub(crate) const PURGE_BATCH: usize = 1_000;

pub(crate) const CF_ITEMS: &str = "items";
const CF_TASKS: &str = "tasks";
const CF_DEAD: &str = "dead";
const CF_META: &str = "meta";
/// The change feed's index: the latest change of each item by revision, and tombstones.
const CF_CHANGES: &str = "changes";
/// The items deleted now, each with its delete's revision: every write looks its item up here
/// (and in `items`), and this family stays as small as the set of deleted items, where `changes`
/// holds a key per item.
const CF_DELETED: &str = "deleted";

/// How hard the journal works to keep an acknowledged write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// fsync before answering (concurrent writes share one fsync): survives power loss.
    Sync,
    /// Written to the operating system before answering: survives a crash of dstore, not of the machine.
    Buffered,
}

#[derive(Clone, Debug)]
pub struct JournalSettings {
    pub durability: Durability,
    /// Refuse writes (503) when a projector has this many tasks waiting.
    pub max_pending: u64,
    /// The journal writes the local keyspaces itself, in the batch of each write
    /// (`projector/rocksdb`); they get no tasks.
    pub keyspaces: bool,
    /// Refuse item writes and freezes (503) while the journal's filesystem has fewer bytes free
    /// (`disk`); 0: never.
    pub min_free_bytes: u64,
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal storage failed: {0}{hint}", hint = crate::rocks::hint(.0))]
    Storage(#[from] rocksdb::Error),
    #[error("version {version} of {project} is frozen, but the journal could not queue its migrations and back-fill: {source}{hint}; POST /{project}/_version again once it can write, which queues them", hint = crate::rocks::hint(.source))]
    FrozenUnqueued {
        project: Ident,
        version: u32,
        source: rocksdb::Error,
    },
    #[error("cannot start the journal writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the keyspaces are in the journal now, but {path} could not be removed: {source}")]
    Leftover {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("journal is shutting down")]
    Closed,
    /// Staging a batch panicked (logged): nothing of the batch was written; the journal goes on.
    #[error("a fault in dstore stopped the journal from writing this request (logged); nothing of it was written")]
    Fault,
    /// The writer dropped the request's answer (a fault, logged): whether it was written is
    /// unknown.
    #[error("a fault in dstore (logged) left this request unanswered by the journal: whether it was written is unknown; read it before sending again what cannot be sent twice")]
    Unanswered,
    #[error("the versions of the project changed while the write was prepared")]
    Stale,
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("projector {projector} is {pending} tasks behind (limit {limit}); try again later")]
    Backlog {
        projector: String,
        pending: u64,
        limit: u64,
    },
    #[error("journal record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// The catalog opened is not the one this journal was written with.
    #[error(
        "{0}: storage.catalog_dir (DSTORE_CATALOG_DIR, PROJECT_FILE_PATH) and storage.data_dir \
         (DSTORE_DATA_DIR, LEVEL_PATH) must name the places they named before; a catalog beside \
         another journal would show one deployment's items in another's projects"
    )]
    Unpaired(String),
    /// A record the journal cannot go on without is not what this version writes.
    #[error("the journal's {0}; the data directory is damaged: restore it from a backup")]
    Damaged(String),
    #[error("the journal's disk has {free_mb} MiB free, less than storage.min_free_disk_mb ({min_mb} MiB): item writes, blueprint edits and freezes are refused until space is freed; {going_on}")]
    DiskLow {
        free_mb: u64,
        min_mb: u64,
        /// What is still accepted (see `disk::going_on`).
        going_on: &'static str,
    },
    #[error("the journal's disk has {free_mb} MiB free, less than the {floor_mb} MiB RocksDB needs to recover from a full disk: item writes are refused, deletes too, until space is freed; reads and project drops go on")]
    DiskFull { free_mb: u64, floor_mb: u64 },
    #[error("the journal's disk has {free_mb} MiB free once the writes under way are counted; this write would take about {needed_mb} MiB of it (its items land several times: the log, the items, a task per store), leaving less than storage.min_free_disk_mb ({min_mb} MiB): send fewer items at once, or free space; {going_on}")]
    DiskTooSmallFor {
        needed_mb: u64,
        free_mb: u64,
        min_mb: u64,
        going_on: &'static str,
    },
}

/// One item write or delete, validated, transformed and encoded, ready to be journaled.
#[derive(Clone, Debug)]
pub enum Entry {
    Upsert {
        blueprint: Ident,
        blueprint_uid: Uid,
        id: Uuid,
        /// The version the client wrote at.
        version: u32,
        /// The canonical body at that version, as JSON.
        record: Vec<u8>,
        /// The task body (see `codec`), carrying the item as every live version holding it sees it.
        task: codec::UpsertBody,
    },
    Delete {
        blueprint: Ident,
        id: Uuid,
        /// The live versions the item is deleted from.
        versions: Vec<u32>,
        task: Vec<u8>,
    },
}

impl Entry {
    /// What journaling the entry takes on disk, roughly: an upsert's record, and its task body
    /// `copies` times (once per projector and once for the keyspaces), each twice (the log, then
    /// the table files); 0 for a delete.
    fn disk_estimate(&self, copies: u64) -> u64 {
        match self {
            Entry::Upsert { record, task, .. } => {
                2 * (record.len() as u64 + copies * task.bytes.len() as u64)
            }
            Entry::Delete { .. } => 0,
        }
    }

    /// The bytes the entry holds until it is journaled: an upsert's record and task body (every
    /// live version's document), a delete's task.
    pub fn held_bytes(&self) -> usize {
        match self {
            Entry::Upsert { record, task, .. } => record.capacity() + task.bytes.capacity(),
            Entry::Delete { task, .. } => task.capacity(),
        }
    }

    /// The key of the item this entry writes or deletes (`keys::item`).
    pub fn key(&self, project: &Ident) -> Vec<u8> {
        match self {
            Entry::Upsert { blueprint, id, .. } | Entry::Delete { blueprint, id, .. } => {
                keys::item(project, blueprint, id)
            }
        }
    }

    /// The versions an upsert leaves its item out of: those that allow no null where it has none
    /// (`VersionDoc::absent`, after a forced breaking freeze).
    pub fn absent_versions(&self) -> Vec<u32> {
        match self {
            Entry::Upsert { task, .. } => task
                .docs()
                .filter(|(_, doc)| task::is_absent(doc))
                .map(|(version, _)| version)
                .collect(),
            Entry::Delete { .. } => Vec::new(),
        }
    }

    /// Encodes an upsert; the documents were serialized once (`VersionDoc`), and the client's own
    /// version's text becomes the record.
    pub fn upsert(
        project: &Ident,
        blueprint: Ident,
        blueprint_uid: Uid,
        id: Uuid,
        version: u32,
        docs: Vec<VersionDoc>,
    ) -> Entry {
        let slices: Vec<(u32, &[u8])> = docs
            .iter()
            .map(|d| (d.version, d.doc.get().as_bytes()))
            .collect();
        let task = codec::upsert_body(project, &blueprint, &id, &slices);
        let record = docs
            .into_iter()
            .find(|d| d.version == version)
            .map_or_else(Vec::new, |d| d.doc.into_string().into_bytes());
        Entry::Upsert {
            blueprint,
            blueprint_uid,
            id,
            version,
            record,
            task,
        }
    }

    pub fn delete(project: &Ident, blueprint: Ident, id: Uuid, versions: Vec<u32>) -> Entry {
        let op = TaskOp::Delete {
            blueprint: blueprint.clone(),
            id,
            revision: 0,
            versions: versions.clone(),
        };
        Entry::Delete {
            blueprint,
            id,
            versions,
            task: codec::task_body(project, &op),
        }
    }
}

/// The latest accepted state of an item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemRecord {
    pub revision: u64,
    pub version: u32,
    pub blueprint_uid: Uid,
    pub body: Map<String, Value>,
    /// The bytes it was stored in: what reading it costs, roughly.
    #[serde(skip)]
    pub stored_bytes: usize,
}

/// A task that a projector refused for good, or could not even decode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub projector: String,
    /// The task's seq in its projector's queue.
    #[serde(default)]
    pub seq: u64,
    /// The task; `None` when its stored form could not be decoded (then retrying cannot help, and
    /// `reason` says why).
    pub task: Option<Task>,
    pub reason: String,
    pub at: String,
}

/// Which dead letters a listing or a retry takes: every one, or those of one projector, of one
/// project, or both. A letter whose task cannot be decoded belongs to no project.
#[derive(Clone, Copy, Debug, Default)]
pub struct LetterFilter<'a> {
    pub projector: Option<&'a str>,
    pub project: Option<&'a str>,
}

impl<'a> LetterFilter<'a> {
    /// The letters of `projector` only.
    pub fn projector(projector: &'a str) -> Self {
        LetterFilter {
            projector: Some(projector),
            project: None,
        }
    }
}

impl DeadLetter {
    /// A dead letter for the task stored as `raw` (see [`decode_task`]), decoded when it can be.
    pub fn from_raw(projector: &str, seq: u64, raw: &[u8], reason: String) -> DeadLetter {
        let (task, reason) = match codec::decode_task(raw) {
            Ok(task) => (Some(task), reason),
            Err(error) => (
                None,
                format!("{reason}; the task cannot be decoded: {error}"),
            ),
        };
        DeadLetter {
            projector: projector.to_string(),
            seq,
            task,
            reason,
            at: now(),
        }
    }
}

/// The current time as dead letters and states record it.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What the journal knows of one projector's progress.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProjectorProgress {
    /// Every task with a lower or equal seq has been applied or dead-lettered. Only with the
    /// embedded journal, whose seqs are one order: in cluster mode each project's cursor moves on
    /// its own, and `pending` says how far behind they are together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_through: Option<u64>,
    pub pending: u64,
    /// Tasks applied since the service started.
    pub applied: u64,
    /// Tasks refused for good since the service started.
    pub failed: u64,
    /// Dead letters waiting now.
    pub dead_letters: u64,
    pub last_error: Option<String>,
}

/// What [`Journal::pending_from`] found.
#[derive(Debug, Default)]
pub struct Pending {
    pub tasks: Vec<Task>,
    /// Tasks left out because their project is held.
    pub skipped: usize,
    /// The first seq the scan met, if any.
    pub first_seen: Option<u64>,
    /// The last seq the scan looked at (0 when it met none).
    pub last_seen: u64,
    /// Whether the scan stopped because it passed over as many held tasks as one scan may, not
    /// because it took a full batch or met the end: the next scan goes on after `last_seen` at once.
    pub cut_short: bool,
}

/// A projector's dead letters as counted (see `Lane::dead_letters`).
#[derive(Default)]
struct DeadLetterCount {
    count: Option<u64>,
    /// Moves whenever letters are recorded or removed: a count read from the journal while it
    /// moved may have missed some, and is not kept.
    generation: u64,
}

struct Lane {
    /// No task of this projector below this seq is pending. Scans start here, so they never wade
    /// through the deletion markers of tasks already acknowledged (new tasks only get higher seqs).
    floor: AtomicU64,
    applied: watch::Sender<u64>,
    /// How many tasks of this projector are pending: added by the writer before its batch is
    /// written, taken off as they are acknowledged, counted at start. What back-pressure
    /// measures: a held project's old task keeps `applied` back, yet only its own tasks wait.
    pending: Arc<AtomicU64>,
    /// Counts acknowledgements, so a waiter can check its own task even when an older one of a
    /// held project keeps `applied` from moving.
    acks: watch::Sender<u64>,
    wake: Notify,
    /// Cuts a retry backoff short (a client asked to retry now).
    retry: Notify,
    progress: Mutex<ProjectorProgress>,
    /// Held while an acknowledgement counts what it settles and writes it, so two reports of the
    /// same task (a redelivery) never both count it as still pending.
    settling: Mutex<()>,
    /// The projects this projector's dispatcher holds back (`queue::hold`): a failed migration's,
    /// and those whose tasks the store refused for a cause that may be their own, which the
    /// catalog does not show. Back-pressure refuses their writes first.
    held: Mutex<Vec<Ident>>,
    /// How many dead letters the projector has, once counted (`Journal::progress`): raised as
    /// acknowledgements record new ones, forgotten when a drop or a retry removes some, so the
    /// letters are counted again only then, not at every readiness report or metrics scrape.
    dead_letters: Mutex<DeadLetterCount>,
}

pub struct Journal {
    db: Arc<DB>,
    catalog: Arc<Catalog>,
    commands: std::sync::mpsc::SyncSender<Command>,
    last_seq: Arc<AtomicU64>,
    /// The revisions, after `.0` and before `.1`, that a start found handed out and not written: a
    /// machine's crash under buffered durability lost their batches after the change feed had
    /// shown them. A follower that read up to one of them holds changes that never were, and is
    /// told to read again from 0 (see `Journal::changes`). The newest [`LOST_KEPT`] crashes.
    lost: Vec<(u64, u64)>,
    /// Made once, when the journal is created: tells its tasks from those of another journal.
    id: String,
    /// The store layout of what the projectors made so far (see [`LAYOUT`]).
    layout: AtomicU32,
    lanes: HashMap<&'static str, Lane>,
    /// Notified after every commit (the broker relay waits on it).
    committed: Notify,
    /// Wakes the change feed's followers of the projects a commit touched.
    pub(crate) signal: crate::feed::signal::ChangeSignal,
    settings: JournalSettings,
    /// The free space writes leave (`disk`).
    disk: disk::DiskGuard,
    /// Where background work (back-fills) runs: the runtime that opened the journal.
    runtime: tokio::runtime::Handle,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set by [`Journal::close`]: background work stops at its next step.
    closing: std::sync::atomic::AtomicBool,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Back-fills that may read at once (`backfill::AT_ONCE`); the others wait their turn, so a
    /// start resuming hundreds of them (or a store added to every live version) holds a few
    /// chunks in memory, not one per back-fill.
    backfill_slots: Arc<tokio::sync::Semaphore>,
    /// The back-fills running or waiting for a place, by where their state is kept and the
    /// project's `born`: a state found again (`resume_backfills` after `keep_keyspaces` wrote
    /// it at the same start) starts no second walk over the same items.
    backfills_running: backfill::Running,
    /// The last write that failed, and when, while none has succeeded since (see
    /// [`Journal::write_failure`]).
    write_failure: Mutex<Option<(std::time::Instant, String)>>,
    /// Item writes and deletes the writer applied to the local keyspaces since the start: their
    /// projector's `applied`, since no worker applies their tasks.
    keyspace_writes: AtomicU64,
    /// Shared with the writer (see `Writer::disk_reads_fail`).
    #[cfg(test)]
    disk_reads_fail: Arc<std::sync::atomic::AtomicBool>,
    /// Shared with the writer (see `Writer::disk_writes_fail`).
    #[cfg(test)]
    disk_writes_fail: Arc<std::sync::atomic::AtomicBool>,
    /// Shared with the writer (see `Writer::stage_panics`).
    #[cfg(test)]
    stage_panics: Arc<std::sync::atomic::AtomicBool>,
    /// Shared with the writer (see `Writer::unsynced_drops`).
    #[cfg(test)]
    unsynced_drops: Arc<AtomicU64>,
    /// While set, back-fills wait before each chunk (a test's way to act before one runs).
    #[cfg(test)]
    backfills_held: std::sync::atomic::AtomicBool,
    /// How many back-fills were started (not counting one found running already).
    #[cfg(test)]
    backfills_spawned: AtomicU64,
    /// How many times dead letters were counted by reading them.
    #[cfg(test)]
    dead_letter_counts: AtomicU64,
}

/// How many crashes' lost revisions a journal remembers (see `Journal::lost`).
const LOST_KEPT: usize = 64;

/// The lost revisions recorded in `db`, after recording those a crash left now: handed out up to
/// `reserved`, written up to `written` (see `Journal::lost`).
fn lost_revisions(db: &DB, written: u64, reserved: u64) -> Result<Vec<(u64, u64)>, JournalError> {
    let meta = db.cf_handle(CF_META).expect("meta cf");
    if reserved > written {
        let mut synced = rocksdb::WriteOptions::default();
        synced.set_sync(true);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(meta, keys::lost(written), reserved.to_be_bytes());
        db.write_opt(batch, &synced)?;
    }
    let mut lost = Vec::new();
    for entry in db.prefix_iterator_cf(meta, keys::LOST_PREFIX) {
        let (key, value) = entry?;
        if !key.starts_with(keys::LOST_PREFIX) {
            break;
        }
        let from = std::str::from_utf8(&key[keys::LOST_PREFIX.len()..])
            .ok()
            .and_then(|from| from.parse().ok());
        let to = <[u8; 8]>::try_from(value.as_ref())
            .ok()
            .map(u64::from_be_bytes);
        if let (Some(from), Some(to)) = (from, to) {
            lost.push((from, to));
        }
    }
    while lost.len() > LOST_KEPT {
        let (from, _) = lost.remove(0);
        db.delete_cf(meta, keys::lost(from))?;
    }
    Ok(lost)
}

impl Drop for Journal {
    /// Stops the writer thread and waits for it. The database closes with its last handle: the
    /// journal's, or the reader of the keyspaces it keeps (`Journal::keyspaces`).
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        // The writer thread itself may drop the last reference; it must not wait for itself.
        if let Some(writer) = writer.filter(|w| w.thread().id() != std::thread::current().id()) {
            let _ = writer.join();
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, JournalError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Every column family of the journal.
const FAMILIES: [&str; 7] = [
    CF_ITEMS,
    CF_TASKS,
    CF_DEAD,
    CF_META,
    CF_CHANGES,
    CF_DELETED,
    crate::projector::rocksdb::CF_KEYSPACES,
];

impl Journal {
    /// Opens (or creates) the journal and starts its writer thread. Must be called inside a Tokio
    /// runtime, which then runs the journal's background work.
    pub fn open(
        path: &Path,
        catalog: Arc<Catalog>,
        projectors: Vec<&'static str>,
        settings: JournalSettings,
    ) -> Result<Arc<Journal>, JournalError> {
        // Memory: memtables and table blocks count in the process's one budget (`crate::rocks`).
        let mut options = crate::rocks::db_options();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.increase_parallelism(2);
        // Start writing the log back every MiB, so the fsync of a synced batch has less left to
        // write (embedded PUT 12-23 % faster in five alternating pairs; docs/performance.md). The
        // fsync itself is unchanged: a batch is durable before it is answered.
        options.set_wal_bytes_per_sync(1 << 20);
        let families = FAMILIES.map(|name| {
            let mut cf = Options::default();
            crate::rocks::family(&mut cf, |tables| {
                if name == CF_ITEMS || name == CF_DELETED {
                    // Writes, deletes and back-fills look items (and deleted items) up; a bloom
                    // filter answers for absent ones.
                    tables.set_bloom_filter(10.0, false);
                }
            });
            if name == CF_ITEMS || name == CF_DELETED {
                // Each write looks its item's previous change up, and a new item is in no
                // memtable: a bloom filter over the memtable's whole keys answers without searching
                // it (embedded `_bulk` 9 % faster, into PostgreSQL 11-13 % faster end to end, in
                // alternating runs; docs/performance.md). A tenth of the memtable's size each.
                cf.set_memtable_prefix_bloom_ratio(0.1);
                cf.set_memtable_whole_key_filtering(true);
            }
            if name == CF_ITEMS || name == crate::projector::rocksdb::CF_KEYSPACES {
                crate::rocks::keyed_by_item(&mut cf);
            }
            if name == CF_TASKS {
                // Tasks live for milliseconds: most never reach a file, and those that do are
                // read once; compressing them costs more than it saves.
                cf.set_compression_type(rocksdb::DBCompressionType::None);
            }
            ColumnFamilyDescriptor::new(name, cf)
        });
        let db = Arc::new(DB::open_cf_descriptors(&options, path, families)?);
        let meta = db.cf_handle(CF_META).expect("meta cf");
        // Taken as 0, a damaged counter would number new tasks over pending ones, and give new
        // writes revisions below those the stores hold, which they would then ignore.
        let counter = |key: &[u8]| -> Result<u64, JournalError> {
            match db.get_cf(meta, key)? {
                Some(bytes) => Ok(u64::from_be_bytes(bytes.as_slice().try_into().map_err(
                    |_| {
                        JournalError::Damaged(format!(
                            "sequence counter is {} bytes, not 8",
                            bytes.len()
                        ))
                    },
                )?)),
                None => Ok(0),
            }
        };
        // Under buffered durability a machine's crash loses the last batches, whose tasks the
        // stores may have taken: the journal goes on past every seq it could have handed out.
        let (written, reserved) = (counter(keys::LAST_SEQ)?, counter(keys::SEQ_RESERVED)?);
        let last_seq = written.max(reserved);
        let lost = lost_revisions(&db, written, reserved)?;
        let layout = match db.get_cf(meta, keys::LAYOUT)? {
            Some(bytes) => u32::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                JournalError::Damaged(format!("layout mark is {} bytes, not 4", bytes.len()))
            })?),
            // A journal that never wrote anything starts with today's layout.
            None if last_seq == 0 => {
                db.put_cf(meta, keys::LAYOUT, LAYOUT.to_be_bytes())?;
                LAYOUT
            }
            None => 1,
        };
        index_changes(&db)?;
        move_deleted(&db)?;
        crate::rocks::partition_old_tables(&db, &FAMILIES, CF_META)?;
        let last_seq = Arc::new(AtomicU64::new(last_seq));
        let id = outbox::journal_id(&db)?;
        pair_with_catalog(&catalog, &id, last_seq.load(Ordering::Relaxed) > 0)?;
        catalog_not_behind(&db, &catalog)?;
        let (commands, receiver) = std::sync::mpsc::sync_channel(4096);
        let lanes = projectors
            .iter()
            .map(|name| {
                let lane = Lane {
                    floor: AtomicU64::new(0),
                    applied: watch::channel(0).0,
                    pending: Arc::new(AtomicU64::new(count_tasks(&db, name)?)),
                    acks: watch::channel(0).0,
                    wake: Notify::new(),
                    retry: Notify::new(),
                    progress: Mutex::new(ProjectorProgress::default()),
                    settling: Mutex::new(()),
                    held: Mutex::new(Vec::new()),
                    dead_letters: Mutex::new(DeadLetterCount::default()),
                };
                Ok((*name, lane))
            })
            .collect::<Result<_, JournalError>>()?;
        let journal = Arc::new(Journal {
            db: db.clone(),
            catalog: catalog.clone(),
            commands,
            last_seq: last_seq.clone(),
            lost,
            id,
            layout: AtomicU32::new(layout),
            lanes,
            committed: Notify::new(),
            signal: Default::default(),
            settings: settings.clone(),
            disk: disk::DiskGuard::new(path, settings.min_free_bytes),
            runtime: tokio::runtime::Handle::current(),
            writer: Mutex::new(None),
            closing: std::sync::atomic::AtomicBool::new(false),
            background: Mutex::new(Vec::new()),
            backfill_slots: Arc::new(tokio::sync::Semaphore::new(backfill::AT_ONCE)),
            backfills_running: backfill::Running::default(),
            #[cfg(test)]
            backfills_spawned: AtomicU64::new(0),
            write_failure: Mutex::new(None),
            keyspace_writes: AtomicU64::new(0),
            #[cfg(test)]
            disk_reads_fail: Arc::default(),
            #[cfg(test)]
            disk_writes_fail: Arc::default(),
            #[cfg(test)]
            stage_panics: Arc::default(),
            #[cfg(test)]
            unsynced_drops: Arc::default(),
            #[cfg(test)]
            backfills_held: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            dead_letter_counts: AtomicU64::new(0),
        });
        for name in &projectors {
            journal.refresh_progress(name)?;
        }
        let weak = Arc::downgrade(&journal);
        let counts = projectors
            .iter()
            .map(|name| (*name, journal.lanes[name].pending.clone()))
            .collect();
        let worker = writer::Writer::new(
            db,
            catalog,
            counts,
            settings.keyspaces,
            last_seq,
            settings.durability,
        );
        #[cfg(test)]
        let worker = {
            let mut worker = worker;
            worker.disk_reads_fail = journal.disk_reads_fail.clone();
            worker.disk_writes_fail = journal.disk_writes_fail.clone();
            worker.stage_panics = journal.stage_panics.clone();
            worker.unsynced_drops = journal.unsynced_drops.clone();
            worker
        };
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || worker.run(receiver, weak))
            .map_err(JournalError::Thread)?;
        *journal.writer.lock().expect("writer lock") = Some(thread);
        Ok(journal)
    }

    /// Stops background work (back-fills resume at the next start) and the writer, and waits for
    /// them to end; writes after it fail. Without it the writer could drop the database's last
    /// handle on its own thread while the process exits, which RocksDB does not survive.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        // Back-fills waiting for a place end at once, their state journaled for the next start.
        self.backfill_slots.close();
        let tasks = std::mem::take(&mut *self.background.lock().expect("background lock"));
        for task in tasks {
            let _ = task.await;
        }
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let commands = self.commands.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = commands.send(Command::Shutdown);
                writer.join()
            })
            .await;
        }
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The local keyspaces, when this journal writes them itself (see [`JournalSettings`]).
    pub fn keyspaces(&self) -> Option<crate::projector::rocksdb::RocksProjector> {
        self.settings
            .keyspaces
            .then(|| crate::projector::rocksdb::RocksProjector::in_journal(self.db.clone()))
    }

    /// Whether `projector` is the local keyspaces this journal writes itself.
    pub(crate) fn writes_itself(&self, projector: &str) -> bool {
        self.settings.keyspaces && projector == crate::projector::ProjectorKind::Rocksdb.name()
    }

    pub fn projectors(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.lanes.keys().copied()
    }

    /// This journal's id, made when it was created.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family exists")
    }

    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Command,
    ) -> Result<T, JournalError> {
        let (reply, answer) = oneshot::channel();
        let command = make(reply);
        let commands = self.commands.clone();
        // The channel is bounded: block a helper thread, not the async runtime, when it is full.
        match commands.try_send(command) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(command)) => {
                tokio::task::spawn_blocking(move || commands.send(command).is_ok())
                    .await
                    .map_err(|_| JournalError::Closed)?
                    .then_some(())
                    .ok_or(JournalError::Closed)?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(JournalError::Closed)
            }
        }
        // Dropped unanswered: the journal is closing, or its writer met a fault (logged) while
        // staging this command (nothing of it written) or after writing its batch.
        answer.await.map_err(|_| match self.is_closing() {
            true => JournalError::Closed,
            false => JournalError::Unanswered,
        })?
    }

    /// Journals item writes transformed against catalog `epoch`; answers their revisions.
    pub async fn write(
        &self,
        epoch: u64,
        project: Ident,
        entries: Vec<Entry>,
    ) -> Result<Vec<u64>, JournalError> {
        // Deletes add little, and are accepted until the disk is all but full.
        let copies = self.lanes.len() as u64 + 1;
        let bytes: u64 = entries.iter().map(|e| e.disk_estimate(copies)).sum();
        let _admitted = match bytes {
            0 => self.disk.check_floor().map(|()| None)?,
            bytes => Some(self.disk.admit(bytes)?),
        };
        self.check_backlog_of(&project)?;
        self.send(|reply| Command::Write {
            epoch,
            project,
            entries,
            reply,
        })
        .await
    }

    /// Whether writes are accepted now: refused (503) while a projector has too many tasks
    /// pending; the refusal names the projector furthest behind. Counted in tasks, not seqs: a
    /// project held by a failing migration keeps `applied` at its oldest task, but only its own
    /// tasks wait behind it, so the other projects' writes go on until those alone reach the limit.
    pub fn check_backlog(&self) -> Result<(), JournalError> {
        let most_behind = self
            .lanes
            .iter()
            .map(|(name, lane)| (lane.pending.load(Ordering::Acquire), name))
            .max();
        match most_behind {
            Some((pending, name)) if pending > self.settings.max_pending => {
                Err(JournalError::Backlog {
                    projector: name.to_string(),
                    pending,
                    limit: self.settings.max_pending,
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether the journal's disk has room for item writes now (see `disk`).
    pub fn check_disk(&self) -> Result<(), JournalError> {
        self.disk.check()
    }

    /// Why the journal's writes fail, while the last one failed and none has succeeded since (a
    /// full disk, an I/O error): `/_health/ready` says so, since such a failure refuses every
    /// write whatever the disk guard measures.
    pub fn write_failure(&self) -> Option<String> {
        let failure = self.write_failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.as_ref().map(|(at, error)| {
            format!(
                "the journal's last write failed {} s ago and none has succeeded since: {error}",
                at.elapsed().as_secs()
            )
        })
    }

    /// Records how a group's write ended (the writer, after each).
    fn note_write(&self, error: Option<String>) {
        let mut failure = self.write_failure.lock().unwrap_or_else(|p| p.into_inner());
        match error {
            Some(error) => *failure = Some((std::time::Instant::now(), error)),
            None if failure.is_some() => *failure = None,
            None => {}
        }
    }

    /// Whether a write into `project` is accepted now ([`crate::storage::admits`]).
    fn check_backlog_of(&self, project: &Ident) -> Result<(), JournalError> {
        match self.check_backlog() {
            Err(JournalError::Backlog {
                projector,
                pending,
                limit,
            }) if crate::storage::admits(
                &self.catalog.snapshot(),
                project,
                &projector,
                (pending, limit),
                &self.held_by(&projector),
            ) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Brings what an older dstore made in the stores to today's layout. Elasticsearch index and
    /// alias names changed (parts joined by `-`), so its indexes are rebuilt from the journal: every
    /// live version is migrated again under the new names (the migration deletes the index of the
    /// old name) and back-filled into Elasticsearch only. PostgreSQL schemas are renamed by their
    /// migrations, on first use. Runs once; the layout is recorded with the queued work.
    pub async fn upgrade_layout(&self) -> Result<(), JournalError> {
        if self.layout.load(Ordering::Acquire) >= LAYOUT {
            return Ok(());
        }
        let projectors: Vec<String> = self
            .lanes
            .keys()
            .filter(|name| ProjectorKind::parse(name) == Some(ProjectorKind::Elasticsearch))
            .map(|name| name.to_string())
            .collect();
        tracing::info!(
            ?projectors,
            "upgrading the store layout: rebuilding what these projectors hold from the journal"
        );
        let record = (keys::LAYOUT, LAYOUT.to_be_bytes().to_vec());
        self.send(|reply| Command::Rebuild {
            projectors,
            record,
            reply,
        })
        .await?;
        self.layout.store(LAYOUT, Ordering::Release);
        Ok(())
    }

    /// Freezes the working copy and queues its migrations ahead of any write into it.
    pub async fn freeze(
        &self,
        project: Ident,
        forced: bool,
        judged: Option<crate::catalog::edit::Judged>,
    ) -> Result<(Arc<Version>, u64), JournalError> {
        // A freeze back-fills its version: as much new data as the project holds.
        self.disk.check()?;
        let newest = |journal: &Journal, project: &Ident| {
            let snapshot = journal.catalog.snapshot();
            let project = snapshot.projects.get(project);
            project.and_then(|p| p.versions.last().map(|v| v.number))
        };
        let before = newest(self, &project);
        let frozen = self
            .send(|reply| Command::Freeze {
                project: project.clone(),
                forced,
                judged,
                reply,
            })
            .await;
        let Err(JournalError::Storage(source)) = frozen else {
            return frozen;
        };
        // The catalog may have taken the version, and the journal not its migrations and
        // back-fill.
        match newest(self, &project) {
            Some(version) if Some(version) > before => Err(JournalError::FrozenUnqueued {
                project,
                version,
                source,
            }),
            _ => Err(JournalError::Storage(source)),
        }
    }

    /// Queues the migrations of `version` again for the projectors that have not finished them, and
    /// has those projectors retry at once instead of at the end of their backoff.
    pub async fn remigrate(
        &self,
        project: Ident,
        version: u32,
        projectors: Vec<String>,
    ) -> Result<u64, JournalError> {
        let names = projectors.clone();
        let seq = self
            .send(|reply| Command::Migrate {
                project,
                version,
                projectors,
                reply,
            })
            .await?;
        for name in names {
            if let Some(lane) = self.lanes.get(name.as_str()) {
                lane.retry.notify_one();
            }
        }
        Ok(seq)
    }

    /// Waits until a client asks the projector to retry now (true), or `timeout` passes (false).
    pub async fn wait_for_retry(&self, projector: &str, timeout: Duration) -> bool {
        match self.lanes.get(projector) {
            Some(lane) => tokio::time::timeout(timeout, lane.retry.notified())
                .await
                .is_ok(),
            None => {
                tokio::time::sleep(timeout).await;
                false
            }
        }
    }

    /// Whether a client asked `projector` to retry since this was last asked, without waiting
    /// (see [`Journal::wait_for_retry`]): a dispatcher busy with other projects' tasks still ends
    /// its holds at once.
    pub fn retry_asked(&self, projector: &str) -> bool {
        use futures::FutureExt;
        self.lanes
            .get(projector)
            .is_some_and(|lane| lane.retry.notified().now_or_never().is_some())
    }

    /// Forgets a project in the catalog and the journal and queues its removal from every store.
    /// A drop the catalog made whose journal batch failed (an I/O error; the client was answered
    /// 503) is finished when asked again, as the next start would finish it: until then the name
    /// could not be made again.
    pub async fn drop_project(&self, project: Ident) -> Result<u64, JournalError> {
        let exists = self.catalog.snapshot().projects.contains_key(&project);
        let again = !exists && self.catalog.is_dropping(&project)?;
        // A project that does not exist is a 404 from the catalog, with nothing to look for.
        let dead = match exists || again {
            true => self.dead_letters_of(&project).await?,
            false => Vec::new(),
        };
        self.send(|reply| Command::DropProject {
            project,
            again,
            dead,
            reply,
        })
        .await
    }

    /// The keys of `project`'s dead letters, which its drop removes: they hold whole items, and
    /// retrying them into a project made again later would bring old items back. Every dead letter
    /// of the journal is looked at, so it is done on a blocking thread, not on the journal's
    /// writer (whose every write would wait for it). A letter a projector records after the look
    /// (of a task it took before the drop) stays, as it would have after a look on the writer.
    async fn dead_letters_of(&self, project: &Ident) -> Result<Vec<Vec<u8>>, JournalError> {
        let (db, project) = (self.db.clone(), project.clone());
        let scan = tokio::task::spawn_blocking(move || {
            let dead = db.cf_handle(CF_DEAD).expect("dead cf");
            let mut keys = Vec::new();
            for entry in db.iterator_cf(dead, rocksdb::IteratorMode::Start) {
                let (key, value) = entry?;
                if lanes::dead_letter_project(&value).is_some_and(|p| p == project.as_str()) {
                    keys.push(key.into_vec());
                }
            }
            Ok::<_, JournalError>(keys)
        });
        match scan.await {
            Ok(keys) => keys,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Its runtime is shutting down.
            Err(_) => Err(JournalError::Closed),
        }
    }

    /// Finishes the drops the catalog made and the journal did not write (a crash between the
    /// two): the project's items, feed and keyspaces go and its removal from every store is
    /// queued, as the drop would have done. Run at start, before any request.
    pub async fn finish_drops(&self) -> Result<(), JournalError> {
        for project in self.catalog.pending_drops()? {
            if self.catalog.snapshot().projects.contains_key(&project) {
                self.catalog.drop_done(&project, None)?;
                continue;
            }
            tracing::warn!(%project, "finishing the drop of a project a crash interrupted");
            let dead = self.dead_letters_of(&project).await?;
            self.send(|reply| Command::DropProject {
                project,
                again: true,
                dead,
                reply,
            })
            .await?;
        }
        Ok(())
    }

    /// Purges tombstones written before `before_millis`; answers how many went.
    ///
    /// The journal's writer does it in commands of at most [`PURGE_BATCH`] tombstones, each
    /// going on where the last stopped, so the writes queued meanwhile wait for one such command
    /// at most.
    pub async fn purge_tombstones(&self, before_millis: u64) -> Result<u64, JournalError> {
        let (mut total, mut from) = (0, None);
        loop {
            let (purged, resume) = self
                .send(|reply| Command::PurgeTombstones {
                    before_millis,
                    limit: PURGE_BATCH,
                    from: from.take(),
                    reply,
                })
                .await?;
            total += purged as u64;
            match resume {
                Some(key) => from = Some(key),
                None => return Ok(total),
            }
        }
    }

    /// A RocksDB integer property of one column family (0 where RocksDB cannot say).
    fn property(&self, cf: &str, name: &str) -> u64 {
        self.db
            .property_int_value_cf(self.cf(cf), name)
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Estimated (items, bytes) the journal holds, from RocksDB's own statistics.
    pub fn size(&self) -> (u64, u64) {
        let items = self.property(CF_ITEMS, "rocksdb.estimate-num-keys");
        let bytes = [CF_ITEMS, CF_TASKS, CF_DEAD, CF_META]
            .iter()
            .map(|cf| {
                self.property(cf, "rocksdb.total-sst-files-size")
                    + self.property(cf, "rocksdb.cur-size-all-mem-tables")
            })
            .sum();
        (items, bytes)
    }

    /// What RocksDB's table readers of every column family hold in memory (an estimate).
    pub fn table_readers_bytes(&self) -> u64 {
        FAMILIES
            .iter()
            .map(|cf| self.property(cf, "rocksdb.estimate-table-readers-mem"))
            .sum()
    }
}

/// The catalog's record of the journal it goes with.
const CATALOG_PAIR: &[u8] = b"journal/id";

/// Makes sure `catalog` goes with the journal `id` (which `written` says holds writes): it names
/// this journal, or names none yet and is not empty beside a journal that was written to (a
/// catalog directory pointed somewhere new: the journal's items would surface in projects made
/// again), and then it is made to name this journal.
fn pair_with_catalog(catalog: &Catalog, id: &str, written: bool) -> Result<(), JournalError> {
    match catalog.record(CATALOG_PAIR)? {
        Some(paired) if paired == id.as_bytes() => Ok(()),
        Some(paired) => Err(JournalError::Unpaired(format!(
            "the catalog was written with journal {}, not with this one ({id})",
            String::from_utf8_lossy(&paired)
        ))),
        None if written && catalog.records(b"", b"\xff", 1)?.is_empty() => {
            Err(JournalError::Unpaired(format!(
                "the catalog is empty, and the journal ({id}) holds writes"
            )))
        }
        None => Ok(catalog.put_records(&[(CATALOG_PAIR.to_vec(), id.as_bytes().to_vec())], true)?),
    }
}

/// Refuses a catalog older than the journal: one that lacks a version the journal froze (its
/// `frozen/` marks), or a project it froze and did not drop. Restored from another backup than the
/// journal's, or copied file by file while dstore ran, such a catalog would have the tasks of the
/// versions it lacks acknowledged unwritten, and number the next freeze and its columns as those
/// versions were, so that the journal's records of them are read with other blueprints. A catalog
/// ahead of the journal is normal (a freeze writes the catalog first; the next start completes it).
fn catalog_not_behind(db: &DB, catalog: &Catalog) -> Result<(), JournalError> {
    let meta = db.cf_handle(CF_META).expect("meta cf");
    let snapshot = catalog.snapshot();
    let dropping = catalog.pending_drops()?;
    let marks = db.iterator_cf(
        meta,
        rocksdb::IteratorMode::From(keys::FROZEN_PREFIX, rocksdb::Direction::Forward),
    );
    for entry in marks {
        let (key, value) = entry?;
        let Some(name) = key.strip_prefix(keys::FROZEN_PREFIX) else {
            break;
        };
        let (Ok(name), Ok(number)) = (
            Ident::parse(&String::from_utf8_lossy(name)),
            <[u8; 4]>::try_from(value.as_ref()).map(u32::from_be_bytes),
        ) else {
            continue;
        };
        let has = snapshot.projects.get(&name).map_or(0, |p| p.versions.len());
        if (has as u64) < u64::from(number) && !dropping.contains(&name) {
            return Err(JournalError::Unpaired(format!(
                "the journal froze project {name:?} at version {number}, and the catalog holds {}: \
                 the catalog is older than the journal (restored from another backup, or copied \
                 while dstore ran); restore the catalog and the journal from the same backup",
                match has {
                    0 => "no such project".to_string(),
                    n => format!("its versions up to {n} only"),
                }
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::blueprint::parse_blueprint;
    use crate::catalog::MigrationState;
    use crate::storage::conformance;
    use crate::storage::embedded::EmbeddedStorage;
    use crate::storage::{Storage, StorageError};
    use crate::write::{prepare_delete, prepare_upsert};

    /// A journal keeping its keyspaces, with project `p` frozen at version 1 holding blueprint
    /// `article` (one string column).
    struct Fixture {
        _dir: tempfile::TempDir,
        journal: Arc<Journal>,
        storage: Arc<EmbeddedStorage>,
        project: Ident,
        article: Ident,
    }

    async fn fixture(durability: Durability, projectors: Vec<&'static str>) -> Fixture {
        limited(durability, projectors, u64::MAX).await
    }

    /// [`fixture`], with writes refused past `max_pending` tasks.
    async fn limited(
        durability: Durability,
        projectors: Vec<&'static str>,
        max_pending: u64,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let journal = open(dir.path(), durability, projectors, max_pending);
        let storage = EmbeddedStorage::open(journal.clone());
        let (project, article) = (Ident::parse("p").unwrap(), Ident::parse("article").unwrap());
        let blueprint = json!({"postgresql": {"table": "articles"},
            "elasticsearch": {"type": "article"}, "columns": {"title": {"type": "string"}}});
        storage
            .put_blueprint(&project, &article, parse_blueprint(&blueprint, "").unwrap())
            .await
            .unwrap();
        storage.freeze(&project, false).await.unwrap();
        Fixture {
            _dir: dir,
            journal,
            storage,
            project,
            article,
        }
    }

    /// Writes a new item of the fixture's blueprint at version 1.
    async fn write_new(
        storage: &EmbeddedStorage,
        project: &Ident,
        article: &Ident,
    ) -> Result<Vec<u64>, StorageError> {
        let snapshot = storage.snapshot();
        let body = json!({"project_version": 1, "title": "t"});
        let entry = prepare_upsert(&snapshot, project, article, Uuid::new_v4(), &body).unwrap();
        let epoch = snapshot.projects[project].epoch;
        storage.write(project, epoch, vec![entry]).await
    }

    /// Puts the fixture's blueprint with a `views` column more: the next freeze makes version 2.
    async fn add_views(storage: &EmbeddedStorage, project: &Ident, article: &Ident) {
        let blueprint = json!({"postgresql": {"table": "articles"},
            "elasticsearch": {"type": "article"},
            "columns": {"title": {"type": "string"}, "views": {"type": "integer"}}});
        storage
            .put_blueprint(project, article, parse_blueprint(&blueprint, "").unwrap())
            .await
            .unwrap();
    }

    /// Opens the journal (and its catalog) in `dir`, again after an earlier opening was closed.
    fn open(
        dir: &Path,
        durability: Durability,
        projectors: Vec<&'static str>,
        max_pending: u64,
    ) -> Arc<Journal> {
        // A closed journal's background tasks may hold the catalog for a moment longer.
        let mut tries = 0;
        let catalog = loop {
            match Catalog::open(&dir.join("catalog")) {
                Ok(catalog) => break Arc::new(catalog),
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("the catalog does not open: {e}"),
            }
        };
        Journal::open(
            &dir.join("journal"),
            catalog,
            projectors,
            settings(durability, max_pending),
        )
        .unwrap()
    }

    /// The tests' journal settings: keyspaces kept, no disk limit.
    fn settings(durability: Durability, max_pending: u64) -> JournalSettings {
        JournalSettings {
            durability,
            max_pending,
            keyspaces: true,
            min_free_bytes: 0,
        }
    }

    /// Dead letters are counted once, then kept up to date as reports record more (a report
    /// delivered twice records none more): readiness reports and metrics scrapes do not read
    /// them all each time. A retry (or a drop) has them counted again.
    #[tokio::test]
    async fn dead_letters_are_counted_once_and_kept_up_to_date() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        for n in 0..3 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{n}")).await;
        }
        let tasks = journal.pending("store", 100).unwrap();
        let letter = |seq| refused(&journal, seq);
        let counts = || journal.dead_letter_counts.load(Ordering::Relaxed);
        assert_eq!(journal.progress("store").dead_letters, 0);
        let counted = counts();
        let first = letter(tasks[1].seq);
        journal.ack("store", &[], vec![first.clone()]).unwrap();
        journal.ack("store", &[], vec![first]).unwrap();
        journal
            .ack("store", &[], vec![letter(tasks[2].seq)])
            .unwrap();
        assert_eq!(journal.progress("store").dead_letters, 2);
        assert_eq!(journal.progress("store").dead_letters, 2);
        assert_eq!(counts(), counted, "not read again");
        journal
            .retry_dead_letters(LetterFilter::default())
            .await
            .unwrap();
        assert_eq!(journal.progress("store").dead_letters, 0);
        assert_eq!(counts(), counted + 1, "read again after the retry");
        journal.close().await;
    }

    /// A projector keeps one dead letter per item, its newest: a client rewriting an item the
    /// store keeps refusing does not grow the letters, whether the refusals come one report at
    /// a time, several in one, or late.
    #[tokio::test]
    async fn an_items_newer_dead_letter_replaces_its_older_one() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        let (same, other) = (Uuid::new_v4(), Uuid::new_v4());
        for n in 0..6 {
            conformance::write(storage.as_ref(), &project, same, &format!("t{n}")).await;
        }
        conformance::write(storage.as_ref(), &project, other, "other").await;
        let tasks: Vec<Task> = journal
            .pending("store", 100)
            .unwrap()
            .into_iter()
            .filter(|t| matches!(t.op, TaskOp::Upsert { .. }))
            .collect();
        assert_eq!(tasks.len(), 7);
        let letters: Vec<DeadLetter> = tasks
            .iter()
            .map(|task| refused(&journal, task.seq))
            .collect();
        let letter = |n: usize| letters[n].clone();
        // One at a time, then two in one report, then one delivered late.
        for n in 0..3 {
            journal.ack("store", &[], vec![letter(n)]).unwrap();
        }
        let report = vec![letter(4), letter(3), letter(6)];
        journal.ack("store", &[], report).unwrap();
        journal.ack("store", &[], vec![letter(5)]).unwrap();
        journal.ack("store", &[], vec![letter(2)]).unwrap();
        let (letters, _) = journal
            .dead_letters(LetterFilter::default(), None, 100)
            .unwrap();
        let seqs: Vec<u64> = letters.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![tasks[5].seq, tasks[6].seq], "{letters:?}");
        assert_eq!(journal.progress("store").dead_letters, 2);
        assert_eq!(
            journal
                .retry_dead_letters(LetterFilter::default())
                .await
                .unwrap(),
            2
        );
        let meta = journal.cf(CF_META);
        let indexed = journal
            .db
            .prefix_iterator_cf(meta, b"dead_item/")
            .filter_map(Result::ok)
            .filter(|(key, _)| key.starts_with(b"dead_item/"))
            .count();
        assert_eq!(indexed, 0, "the retried letters' items have none");
        journal.close().await;
    }

    /// Under buffered durability a drop's batch is still synced before its catalog mark is
    /// cleared: lost with the machine, it would leave a journal holding the project the catalog
    /// forgot, which a start refuses, and drop tasks nothing would queue again.
    #[tokio::test]
    async fn a_drop_is_synced_before_its_mark_is_cleared_under_buffered_durability() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        conformance::write(storage.as_ref(), &project, Uuid::new_v4(), "x").await;
        storage.drop_project(&project).await.unwrap();
        assert_eq!(journal.unsynced_drops.load(Ordering::Relaxed), 0);
        journal.close().await;
    }

    /// A purge whose read of a project's horizon fails purges nothing and answers the error:
    /// taken for 0, the horizon could be set below one already there, and followers under it would
    /// be served pages missing the deletes purged.
    #[tokio::test]
    async fn a_purge_whose_horizon_cannot_be_read_purges_nothing() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Sync, vec![]).await;
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [first, second] {
            conformance::write(storage.as_ref(), &project, id, "t").await;
        }
        conformance::delete(storage.as_ref(), &project, first).await;
        let later = || (chrono::Utc::now().timestamp_millis() + 5000) as u64;
        assert_eq!(journal.purge_tombstones(later()).await.unwrap(), 1);
        let horizon = journal
            .changes(&project, 0, 10, usize::MAX)
            .unwrap()
            .horizon;
        assert!(horizon > 0);
        conformance::delete(storage.as_ref(), &project, second).await;
        // The horizon is in a table file now, none of its blocks read yet.
        journal.db.flush_cf(journal.cf(CF_META)).unwrap();
        journal.disk_reads_fail.store(true, Ordering::Relaxed);
        assert!(journal.purge_tombstones(later()).await.is_err());
        journal.disk_reads_fail.store(false, Ordering::Relaxed);
        let page = journal.changes(&project, 0, 10, usize::MAX).unwrap();
        assert_eq!(page.horizon, horizon, "nothing purged");
        assert_eq!(journal.purge_tombstones(later()).await.unwrap(), 1);
        assert!(
            journal
                .changes(&project, 0, 10, usize::MAX)
                .unwrap()
                .horizon
                > horizon
        );
        journal.close().await;
    }

    /// A back-fill of a project since dropped (one waiting for a place while the project was
    /// dropped, made again and frozen as far) writes nothing into the project made again: its
    /// state would take the key of the new project's own back-fill of that version, whose items
    /// below the old cursor would then never get the version after a restart.
    #[tokio::test]
    async fn a_back_fill_of_a_dropped_project_writes_nothing_into_the_one_made_again() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec!["store"]).await;
        add_views(&storage, &project, &article).await;
        storage.freeze(&project, false).await.unwrap();
        let old = journal.backfill_state(&project, 2).unwrap().unwrap();
        assert_eq!(old.born, Some(0));
        storage.drop_project(&project).await.unwrap();
        assert_eq!(conformance::frozen(storage.as_ref()).await, project);
        add_views(&storage, &project, &article).await;
        storage.freeze(&project, false).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let new = loop {
            let state = journal.backfill_state(&project, 2).unwrap().unwrap();
            if state.finished {
                break state;
            }
            assert!(std::time::Instant::now() < deadline, "{state:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_ne!(new.born, Some(0));
        let late = backfill::BackfillState {
            cursor: Some(b"far".to_vec()),
            done: 1000,
            ..old
        };
        let written = journal
            .send(|reply| Command::Backfill {
                project: project.clone(),
                version: 2,
                items: Vec::new(),
                state: late,
                reply,
            })
            .await
            .unwrap();
        assert!(!written, "not the project it was started for");
        assert_eq!(journal.backfill_state(&project, 2).unwrap().unwrap(), new);
        journal.close().await;
    }

    /// A back-fill or a rebuild writes an item again at its revision, one task per version: when
    /// the store refuses several of them, each letter is kept, whether they come in one report or
    /// one at a time, and a retry sends every version again, not only the last letter's.
    #[tokio::test]
    async fn letters_of_one_revision_for_other_versions_are_all_kept_and_retried() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
        conformance::write(storage.as_ref(), &project, one, "one").await;
        conformance::write(storage.as_ref(), &project, two, "two").await;
        // Two more writes, whose seqs the letters a back-fill's tasks would leave take.
        for spare in ["three", "four"] {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), spare).await;
        }
        let tasks = journal.pending("store", 100).unwrap();
        let last = tasks.iter().map(|t| t.seq).max().unwrap();
        // Each item's write, and the same revision's task for version 2 a back-fill would queue.
        let letters = |id: Uuid, seq: u64| {
            let task = tasks
                .iter()
                .find(|t| t.op.item().map(|(_, i)| *i) == Some(id));
            let task = task.expect("the item's write");
            let first = refused(&journal, task.seq);
            let mut again = first.clone();
            again.seq = seq;
            if let Some(TaskOp::Upsert { docs, .. }) = again.task.as_mut().map(|t| &mut t.op) {
                docs.iter_mut().for_each(|doc| doc.version = 2);
            }
            (first, again)
        };
        let (a, b) = letters(one, last - 1);
        journal.ack("store", &[], vec![a]).unwrap();
        journal.ack("store", &[], vec![b]).unwrap();
        let (c, d) = letters(two, last);
        journal.ack("store", &[], vec![d, c]).unwrap();
        let (listed, _) = journal
            .dead_letters(LetterFilter::default(), None, 100)
            .unwrap();
        assert_eq!(listed.len(), 4, "{listed:?}");
        assert_eq!(journal.progress("store").dead_letters, 4);
        // A newer write of one item refused too: its letter replaces both of the older revision.
        conformance::write(storage.as_ref(), &project, one, "one again").await;
        let newer = journal
            .pending("store", 100)
            .unwrap()
            .into_iter()
            .find(|t| t.seq > last)
            .expect("the newer write");
        let letter = refused(&journal, newer.seq);
        journal.ack("store", &[], vec![letter]).unwrap();
        let (listed, _) = journal
            .dead_letters(LetterFilter::default(), None, 100)
            .unwrap();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert_eq!(journal.progress("store").dead_letters, 3);
        let last = newer.seq;
        assert_eq!(
            journal
                .retry_dead_letters(LetterFilter::default())
                .await
                .unwrap(),
            3
        );
        let mut sent: Vec<(Uuid, u32)> = journal
            .pending("store", 100)
            .unwrap()
            .into_iter()
            .filter(|t| t.seq > last)
            .flat_map(|t| match t.op {
                TaskOp::Upsert { id, docs, .. } => {
                    docs.into_iter().map(|d| (id, d.version)).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        sent.sort();
        let mut expected = vec![(one, 1), (two, 1), (two, 2)];
        expected.sort();
        assert_eq!(sent, expected);
        journal.close().await;
    }

    /// A dead letter that does not decode (damaged, or written by a newer dstore) is listed as
    /// unreadable and belongs to no project: the listing and the retries of the others go on.
    #[tokio::test]
    async fn an_unreadable_dead_letter_stops_no_listing_or_retry_of_the_others() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        for n in 0..2 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{n}")).await;
        }
        let tasks = journal.pending("store", 100).unwrap();
        let letters: Vec<DeadLetter> = tasks[tasks.len() - 2..]
            .iter()
            .map(|task| refused(&journal, task.seq))
            .collect();
        journal.ack("store", &[], letters).unwrap();
        journal
            .db
            .put_cf(
                journal.cf(CF_DEAD),
                keys::task("store", 1),
                b"{\"projector\": 7",
            )
            .unwrap();
        let (all, _) = journal
            .dead_letters(LetterFilter::default(), None, 100)
            .unwrap();
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(
            all[0].task.is_none() && all[0].reason.contains("not readable"),
            "{all:?}"
        );
        assert_eq!(all[0].projector, "store");
        let own = LetterFilter {
            project: Some(project.as_str()),
            ..LetterFilter::default()
        };
        assert_eq!(journal.dead_letters(own, None, 100).unwrap().0.len(), 2);
        assert_eq!(journal.retry_dead_letters(own).await.unwrap(), 2);
        journal.close().await;
    }

    /// A letter of a dropped project recorded after its drop looked for them (a projector that
    /// refused the task while the drop was on its way) is not retried into a project made again
    /// under the name: it goes.
    #[tokio::test]
    async fn a_letter_of_a_dropped_project_is_not_retried_into_the_one_made_again() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        conformance::write(storage.as_ref(), &project, Uuid::new_v4(), "old").await;
        let task = journal.pending("store", 100).unwrap().pop().unwrap();
        let raw = journal.pending_raw("store", task.seq).unwrap().unwrap();
        storage.drop_project(&project).await.unwrap();
        let letter = DeadLetter::from_raw("store", task.seq, &raw, "refused".into());
        journal.ack("store", &[], vec![letter]).unwrap();
        assert_eq!(conformance::frozen(storage.as_ref()).await, project);
        let retried = journal
            .retry_dead_letters(LetterFilter::default())
            .await
            .unwrap();
        assert_eq!(retried, 0);
        let (letters, _) = journal
            .dead_letters(LetterFilter::default(), None, 100)
            .unwrap();
        assert!(letters.is_empty(), "{letters:?}");
        let pending = journal.pending("store", 100).unwrap();
        assert!(
            pending
                .iter()
                .all(|t| !matches!(t.op, TaskOp::Upsert { .. })),
            "{pending:?}"
        );
        journal.close().await;
    }

    /// A write prepared against a project that is dropped and made again under its name before
    /// the write is staged is refused as stale and prepared again, never staged into the new
    /// project: every project read at start had epoch 0, and so had one made since, so after a
    /// restart the old project's write passed for one of the new.
    #[tokio::test]
    async fn a_write_prepared_before_a_drop_never_lands_in_the_project_made_again() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec![]).await;
        journal.close().await;
        drop((journal, storage));
        let journal = open(_dir.path(), Durability::Buffered, vec![], u64::MAX);
        let storage = EmbeddedStorage::open(journal.clone());
        let id = Uuid::new_v4();
        let (epoch, entry) = conformance::upsert(storage.as_ref(), &project, id, "old");
        storage.drop_project(&project).await.unwrap();
        conformance::put_article(storage.as_ref(), &project, None).await;
        let written = storage.write(&project, epoch, vec![entry]).await;
        assert!(matches!(written, Err(StorageError::Stale)), "{written:?}");
        assert!(storage
            .item_bytes(&project, &article, &id)
            .await
            .unwrap()
            .is_none());
        journal.close().await;
    }

    #[tokio::test]
    async fn back_pressure_counts_the_tasks_that_wait_not_how_far_an_old_one_holds_progress() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = limited(Durability::Buffered, vec!["store"], 3).await;
        journal.close().await;
        drop((journal, storage));
        // Counted at start.
        let journal = open(_dir.path(), Durability::Buffered, vec!["store"], 3);
        let storage = EmbeddedStorage::open(journal.clone());
        let counted = journal.progress("store").pending;
        assert_eq!(counted, 1, "the migration of version 1 is counted at start");

        // The migration stays pending, as a held project's does, while every later task is
        // applied: progress stays at the migration, yet one task waits.
        for n in 0..10 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{n}")).await;
            let tasks = journal.pending("store", 100).unwrap();
            let last = tasks.last().unwrap().seq;
            journal
                .ack_run("store", tasks[1].seq..=last, tasks.len() - 1, Vec::new())
                .unwrap();
        }
        let progress = journal.progress("store");
        assert!(journal.last_seq() - progress.applied_through.unwrap() > 3);
        assert_eq!(progress.pending, 1);
        journal
            .check_backlog()
            .expect("one task waits: writes go on");

        // Tasks that wait count, a task named twice in a report, or in two reports, counts once, and
        // a restart counts them all again.
        for n in 0..3 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("w{n}")).await;
        }
        let waiting = journal.pending("store", 100).unwrap();
        assert_eq!(journal.progress("store").pending, 4);
        assert!(matches!(
            journal.check_backlog(),
            Err(JournalError::Backlog {
                pending: 4,
                limit: 3,
                ..
            })
        ));
        let newest = waiting.last().unwrap().seq;
        journal.ack("store", &[newest, newest], Vec::new()).unwrap();
        journal.ack("store", &[newest], Vec::new()).unwrap();
        assert_eq!(journal.progress("store").pending, 3);
        journal
            .check_backlog()
            .expect("three tasks are within the limit");
        // Reports of one task settled at the same time (a redelivery) count it once too.
        let second = waiting[waiting.len() - 2].seq;
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|threads| {
            for _ in 0..8 {
                threads.spawn(|| {
                    start.wait();
                    journal.ack("store", &[second], Vec::new()).unwrap()
                });
            }
        });
        assert_eq!(journal.progress("store").pending, 2);
        journal.close().await;
        drop((journal, storage));
        let journal = open(_dir.path(), Durability::Buffered, vec!["store"], 3);
        assert_eq!(journal.progress("store").pending, 2);
        journal.close().await;
    }

    /// The directory of a journal (and its catalog) that one item was written to, closed.
    async fn written_and_closed() -> tempfile::TempDir {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec!["store"]).await;
        write_new(&storage, &project, &article).await.unwrap();
        journal.close().await;
        drop((journal, storage));
        _dir
    }

    /// A journal opened beside an empty catalog, or beside another journal's, is refused naming
    /// both settings: a catalog directory pointed somewhere new would show its old items in
    /// projects made again under the same names.
    #[tokio::test]
    async fn a_journal_opened_beside_another_catalog_is_refused() {
        let _dir = written_and_closed().await;
        let settings = || settings(Durability::Sync, u64::MAX);
        let other = tempfile::tempdir().unwrap();
        // A closed journal's background tasks may hold its catalog for a moment longer.
        let catalog = || async {
            for _ in 0..100 {
                if let Ok(catalog) = Catalog::open(&other.path().join("catalog")) {
                    return Arc::new(catalog);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the catalog does not open");
        };
        // An empty catalog, then one another journal was written with.
        for attempt in 0..2 {
            if attempt == 1 {
                let journal = Journal::open(
                    &other.path().join("journal"),
                    catalog().await,
                    vec![],
                    settings(),
                );
                journal.unwrap().close().await;
            }
            let catalog = catalog().await;
            let opened = Journal::open(&_dir.path().join("journal"), catalog, vec![], settings());
            let Err(error) = opened else {
                panic!("a journal opened beside another catalog ({attempt})");
            };
            assert!(matches!(error, JournalError::Unpaired(_)), "{error}");
            assert!(error.to_string().contains("storage.catalog_dir"), "{error}");
        }
        // Its own catalog still opens it.
        let reopened = open(_dir.path(), Durability::Sync, vec!["store"], u64::MAX);
        reopened.close().await;
    }

    /// Under buffered durability the writer syncs a mark ahead of every revision it hands out,
    /// and the journal opens past it: after a crash of the machine lost its last batches (which
    /// the stores may have taken), a later write is never numbered below one they hold. A clean
    /// stop leaves no gap.
    #[tokio::test]
    async fn after_a_lost_tail_revisions_go_on_past_every_one_handed_out() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        let mut last = 0;
        for n in 0..3 {
            last = conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("{n}"))
                .await;
        }
        let mark = |db: &DB| {
            let bytes = db.get_cf(db.cf_handle(CF_META).unwrap(), keys::SEQ_RESERVED);
            u64::from_be_bytes(bytes.unwrap().unwrap().try_into().unwrap())
        };
        assert!(
            mark(&journal.db) > last,
            "the mark is ahead of what was handed out"
        );
        // Tests reserve four seqs at a time: writes one by one reach the mark, and each is
        // handed out below the one synced before it, never at it.
        for n in 0..12 {
            last = conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("{n}"))
                .await;
            assert!(mark(&journal.db) > last, "{last} at the mark");
        }
        journal.close().await;
        drop((journal, storage));
        let journal = open(_dir.path(), Durability::Buffered, vec!["store"], u64::MAX);
        let storage = EmbeddedStorage::open(journal.clone());
        let next = conformance::write(storage.as_ref(), &project, Uuid::new_v4(), "clean").await;
        assert_eq!(next, last + 1, "a clean stop leaves no gap");
        journal.close().await;
        drop((journal, storage));
        // What a crash leaves: the mark synced, the last batches (and their counter) lost.
        {
            let db =
                DB::open_cf(&Options::default(), _dir.path().join("journal"), FAMILIES).unwrap();
            let meta = db.cf_handle(CF_META).unwrap();
            db.put_cf(meta, keys::SEQ_RESERVED, (next + 500).to_be_bytes())
                .unwrap();
            db.put_cf(meta, keys::LAST_SEQ, (last - 1).to_be_bytes())
                .unwrap();
        }
        let journal = open(_dir.path(), Durability::Buffered, vec!["store"], u64::MAX);
        let storage = EmbeddedStorage::open(journal.clone());
        let after = conformance::write(storage.as_ref(), &project, Uuid::new_v4(), "after").await;
        assert!(after > next + 500, "{after}");
        // A follower that read up to a lost revision holds a change that never was: it is told
        // to read again from 0, after this start and the next. One that read up to the last
        // written revision goes on.
        let check = |journal: &Journal| {
            let place = |since| {
                let page = journal.changes(&project, since, 100, usize::MAX).unwrap();
                crate::feed::Place {
                    last_revision: since,
                    horizon: page.horizon,
                    pass: page.horizon,
                }
            };
            assert!(crate::feed::check_horizon(last, None, place(last)).is_err());
            assert!(crate::feed::check_horizon(next, None, place(next)).is_err());
            assert!(crate::feed::check_horizon(last - 1, None, place(last - 1)).is_ok());
            assert!(crate::feed::check_horizon(after, None, place(after)).is_ok());
            // The mark the journal opened at, where `since=now` stood before any write.
            let mark = next + 500;
            assert!(crate::feed::check_horizon(mark, None, place(mark)).is_ok());
        };
        check(&journal);
        journal.close().await;
        drop((journal, storage));
        let journal = open(_dir.path(), Durability::Buffered, vec!["store"], u64::MAX);
        check(&journal);
        journal.close().await;
    }

    /// A catalog restored from an older backup than the journal (it lacks a version the journal
    /// froze) stops the journal, naming the project, rather than have that version's tasks
    /// acknowledged unwritten and the next freeze numbered as it was.
    #[tokio::test]
    async fn a_catalog_older_than_the_journal_stops_it() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec!["store"]).await;
        journal.close().await;
        drop((journal, storage));
        let (catalog, old) = (_dir.path().join("catalog"), _dir.path().join("old"));
        let copy = |from: &Path, to: &Path| {
            let _ = std::fs::remove_dir_all(to);
            std::fs::create_dir_all(to).unwrap();
            for file in std::fs::read_dir(from).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
            }
        };
        copy(&catalog, &old);
        let journal = open(_dir.path(), Durability::Sync, vec!["store"], u64::MAX);
        let storage = EmbeddedStorage::open(journal.clone());
        let blueprint = json!({"postgresql": {"table": "articles"},
            "elasticsearch": {"type": "article"},
            "columns": {"title": {"type": "string"}, "n": {"type": "integer"}}});
        storage
            .put_blueprint(&project, &article, parse_blueprint(&blueprint, "").unwrap())
            .await
            .unwrap();
        storage.freeze(&project, false).await.unwrap();
        journal.close().await;
        drop((journal, storage));
        copy(&old, &catalog);
        let restored = Arc::new(Catalog::open(&catalog).unwrap());
        let opened = Journal::open(
            &_dir.path().join("journal"),
            restored,
            vec!["store"],
            settings(Durability::Sync, u64::MAX),
        );
        let Err(error) = opened else {
            panic!("a journal opened beside an older catalog");
        };
        assert!(matches!(error, JournalError::Unpaired(_)), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("froze project \"p\" at version 2")
                && message.contains("up to 1 only"),
            "{message}"
        );
    }

    /// A damaged sequence counter stops the journal, naming it, rather than reading as 0: new
    /// tasks would be numbered over pending ones and new writes get revisions the stores ignore.
    #[tokio::test]
    async fn a_damaged_sequence_counter_stops_the_journal_rather_than_starting_it_at_zero() {
        let _dir = written_and_closed().await;
        {
            let db =
                DB::open_cf(&Options::default(), _dir.path().join("journal"), FAMILIES).unwrap();
            db.put_cf(db.cf_handle(CF_META).unwrap(), keys::LAST_SEQ, [0u8, 7, 1])
                .unwrap();
        }
        let catalog = Arc::new(Catalog::open(&_dir.path().join("catalog")).unwrap());
        let settings = settings(Durability::Sync, u64::MAX);
        let opened = Journal::open(
            &_dir.path().join("journal"),
            catalog,
            vec!["store"],
            settings,
        );
        let Err(error) = opened else {
            panic!("a journal with a damaged counter opened");
        };
        assert!(matches!(error, JournalError::Damaged(_)), "{error}");
        assert!(error.to_string().contains("sequence counter"), "{error}");
    }

    /// A chunk of a back-fill ends after a few megabytes of records, however few items: 512
    /// items of a megabyte each were half a gigabyte in memory, per back-fill.
    #[tokio::test]
    async fn a_back_fill_chunk_ends_after_a_few_megabytes_and_the_walk_reads_every_item() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec![]).await;
        let title = "x".repeat(900_000);
        for _ in 0..20 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &title).await;
        }
        journal
            .backfills_held
            .store(true, std::sync::atomic::Ordering::Relaxed);
        add_views(&storage, &project, &article).await;
        storage.freeze(&project, false).await.unwrap();
        let (mut cursor, mut read, mut chunks) = (None, 0, 0);
        loop {
            let chunk = journal
                .backfill_chunk(&project, 2, cursor.as_deref())
                .unwrap();
            assert!(chunk.looked_at <= 10, "{} items", chunk.looked_at);
            assert_eq!(chunk.items.len() as u64, chunk.looked_at);
            read += chunk.looked_at;
            chunks += 1;
            if chunk.ended {
                break;
            }
            cursor = chunk.cursor;
        }
        assert_eq!(read, 20);
        assert!(chunks >= 2, "{chunks} chunks");
        journal
            .backfills_held
            .store(false, std::sync::atomic::Ordering::Relaxed);
        journal.close().await;
    }

    /// A change entry whose item moved on since is passed over and counts nothing toward the
    /// page's bytes: a page of such entries alone would be full and never move.
    #[tokio::test]
    async fn a_change_whose_item_moved_on_counts_nothing_toward_its_page() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        let (id, title) = (Uuid::new_v4(), "x".repeat(300_000));
        let first = conformance::write(storage.as_ref(), &project, id, &title).await;
        let second = conformance::write(storage.as_ref(), &project, id, &title).await;
        // The entry of the first write, as if left behind.
        let entry = codec::change_value(false, 0, &id, &article);
        journal
            .db
            .put_cf(journal.cf(CF_CHANGES), keys::change(&project, first), entry)
            .unwrap();
        let stale = journal.changes(&project, first - 1, 100, 1 << 20).unwrap();
        let kept = journal.changes(&project, first, 100, 1 << 20).unwrap();
        assert_eq!(stale.changes.len(), 1);
        assert_eq!(stale.changes[0].revision, second);
        assert_eq!(stale.bytes, kept.bytes);
        journal.close().await;
    }

    /// A chunk counts the copies it makes, not only the records it reads: a version that adds
    /// columns with long defaults makes each small item a copy of about 200 KB there, and 512 of
    /// them were a hundred megabytes in memory, per back-fill.
    #[tokio::test]
    async fn a_back_fill_chunk_counts_the_copies_a_version_makes_of_small_items() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec![]).await;
        for n in 0..100 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{n}")).await;
        }
        journal
            .backfills_held
            .store(true, std::sync::atomic::Ordering::Relaxed);
        conformance::put_wide_article(storage.as_ref(), &project, 50).await;
        storage.freeze(&project, false).await.unwrap();
        let (mut cursor, mut read) = (None, 0);
        loop {
            let chunk = journal
                .backfill_chunk(&project, 2, cursor.as_deref())
                .unwrap();
            assert!(chunk.looked_at <= 50, "{} items", chunk.looked_at);
            read += chunk.looked_at;
            if chunk.ended {
                break;
            }
            cursor = chunk.cursor;
        }
        assert_eq!(read, 100);
        journal
            .backfills_held
            .store(false, std::sync::atomic::Ordering::Relaxed);
        journal.close().await;
    }

    #[tokio::test]
    async fn past_the_limit_a_held_projects_writes_are_refused_first_and_the_others_go_on() {
        held_first(|journal, project| {
            // `p`'s migration failed on the store: it is held, its tasks wait.
            let failed = MigrationState::Failed {
                error: "not dstore's schema".into(),
            };
            journal
                .catalog
                .set_migration(project, 1, "store", (failed, None))
                .unwrap();
        })
        .await;
    }

    /// A project the dispatcher holds for a refusal that may be its own (a table locked, a
    /// permission taken away), which the catalog does not show, is refused first too.
    #[tokio::test]
    async fn past_the_limit_a_project_held_for_its_own_refusal_is_refused_first() {
        held_first(|journal, project| journal.note_held("store", vec![project.clone()])).await;
    }

    /// Holds `p` by `hold`, fills the store's backlog to its limit with `p`'s tasks, and checks
    /// that `p`'s writes are refused while another project keeps a tenth more.
    async fn held_first(hold: impl FnOnce(&Journal, &Ident)) {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = limited(Durability::Buffered, vec!["store"], 10).await;
        let other = Ident::parse("q").unwrap();
        conformance::put_article(storage.as_ref(), &other, None).await;
        storage.freeze(&other, false).await.unwrap();
        hold(&journal, &project);
        for n in 0..9 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("{n}")).await;
        }
        assert_eq!(journal.progress("store").pending, 11);
        let write = |project: Ident| {
            let storage = storage.clone();
            async move {
                let snapshot = storage.snapshot();
                let body = json!({"project_version": 1, "title": "t"});
                let article = Ident::parse("article").unwrap();
                let entry =
                    prepare_upsert(&snapshot, &project, &article, Uuid::new_v4(), &body).unwrap();
                let epoch = snapshot.projects[&project].epoch;
                storage.write(&project, epoch, vec![entry]).await
            }
        };
        assert!(
            matches!(
                write(project.clone()).await,
                Err(StorageError::Backlog { pending: 11, .. })
            ),
            "the held project is refused past the limit"
        );
        write(other.clone())
            .await
            .expect("another project keeps a tenth more");
        let snapshot = storage.snapshot();
        let held = storage.held_by("store");
        assert_eq!(
            crate::storage::refused(&snapshot, "store", (11, 10), &held),
            crate::storage::Refused::HeldProjects
        );
        assert!(
            matches!(
                write(other.clone()).await,
                Err(StorageError::Backlog { pending: 12, .. })
            ),
            "past the tenth more, every write is refused"
        );
        journal.close().await;
    }

    /// What a broker relay reads at once ends after `BATCH_BYTES` of tasks, however many it may
    /// take: a thousand large items read at once were gigabytes.
    #[tokio::test]
    async fn an_outbox_read_ends_after_a_batch_of_bytes() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        let title = "x".repeat(BATCH_BYTES / 3 + 1);
        for _ in 0..6 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &title).await;
        }
        // The migration, then the large items: the read ends with the third of them.
        let read = journal.outbox("store", 0, 1000).unwrap();
        assert_eq!(read.len(), 4);
        assert_eq!(journal.outbox("store", read[3].0, 1000).unwrap().len(), 3);
    }

    /// A page of dead letters ends after `LETTER_PAGE_BYTES` of letters, however many it may
    /// hold: a letter holds its item, and a thousand large ones listed at once were gigabytes.
    /// Paging goes on to every one, and a retry queues every one.
    #[tokio::test]
    async fn a_page_of_dead_letters_ends_after_a_page_of_bytes() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        ack_migration(&journal);
        let title = "x".repeat(LETTER_PAGE_BYTES / 3 + 1);
        for _ in 0..5 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &title).await;
        }
        // A read of pending tasks ends after a batch of bytes too.
        let (mut letters, mut from) = (Vec::new(), 0);
        loop {
            let pending = journal.pending_from("store", from, 100, |_| false).unwrap();
            let Some(last) = pending.tasks.last() else {
                break;
            };
            from = last.seq + 1;
            letters.extend(pending.tasks.iter().map(|t| refused(&journal, t.seq)));
        }
        assert_eq!(letters.len(), 5);
        journal.ack("store", &[], letters).unwrap();
        let (first, next) = journal
            .dead_letters(LetterFilter::default(), None, 1000)
            .unwrap();
        assert_eq!(
            first.len(),
            3,
            "the page ends with the letter that passes the bytes"
        );
        let (rest, end) = journal
            .dead_letters(LetterFilter::default(), next.as_deref(), 1000)
            .unwrap();
        assert_eq!(rest.len(), 2);
        assert!(end.is_none());
        assert_eq!(
            journal
                .retry_dead_letters(LetterFilter::default())
                .await
                .unwrap(),
            5
        );
        journal.close().await;
    }

    /// The dead letter of the store's pending task `seq`, refused.
    fn refused(journal: &Journal, seq: u64) -> DeadLetter {
        let raw = journal.pending_raw("store", seq).unwrap().unwrap();
        DeadLetter::from_raw("store", seq, &raw, "refused".into())
    }

    /// Acknowledges the fixture's first task, its migration, so the store's next tasks are items.
    fn ack_migration(journal: &Journal) {
        let migration = journal.pending("store", 10).unwrap();
        journal
            .ack("store", &[migration[0].seq], Vec::new())
            .unwrap();
    }

    /// A retry reads and queues the dead letters a page at a time, every one of them, and only
    /// those there when it began: a task queued again and refused again waits for the next retry.
    #[tokio::test]
    async fn a_retry_queues_every_letter_a_page_at_a_time_and_only_those_there_before_it() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        ack_migration(&journal);
        let n = 2 * lanes::RETRY_PAGE + 7;
        for i in 0..n {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{i}")).await;
        }
        let refuse_all = |journal: &Journal| {
            let tasks = journal.pending("store", 10 * n).unwrap();
            let letters: Vec<DeadLetter> = tasks.iter().map(|t| refused(journal, t.seq)).collect();
            let run = tasks[0].seq..=tasks[tasks.len() - 1].seq;
            journal.ack_run("store", run, 0, letters).unwrap();
            tasks.len()
        };
        assert_eq!(refuse_all(&journal), n);
        assert_eq!(
            journal
                .retry_dead_letters(LetterFilter::projector("store"))
                .await
                .unwrap(),
            n
        );
        assert_eq!(journal.pending("store", 10 * n).unwrap().len(), n);
        assert!(journal
            .dead_letters(LetterFilter::default(), None, 10)
            .unwrap()
            .0
            .is_empty());
        // Refused again: a second retry takes them all again, the first never looped on them.
        assert_eq!(refuse_all(&journal), n);
        assert_eq!(
            journal
                .retry_dead_letters(LetterFilter::default())
                .await
                .unwrap(),
            n
        );
    }

    /// A letter whose item was written again or deleted since is settled by that newer change,
    /// whose own task the store got: a retry removes it without sending it, so it never brings a
    /// deleted item back (nor an older state over a newer one) in a store that forgot the delete.
    #[tokio::test]
    async fn a_retry_sends_no_letter_a_newer_change_of_its_item_settled() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec!["store"]).await;
        ack_migration(&journal);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            conformance::write(storage.as_ref(), &project, *id, "first").await;
        }
        let tasks = journal.pending("store", 10).unwrap();
        let letters: Vec<DeadLetter> = tasks.iter().map(|t| refused(&journal, t.seq)).collect();
        let run = tasks[0].seq..=tasks[2].seq;
        journal.ack_run("store", run, 0, letters).unwrap();
        // The first item written again, the second deleted; the stores take both.
        conformance::write(storage.as_ref(), &project, ids[0], "second").await;
        let snapshot = storage.snapshot();
        let uid = snapshot.projects[&project].version(1).unwrap().blueprints[&article].uid;
        let delete = prepare_delete(&snapshot, &project, &article, ids[1], Some(uid)).unwrap();
        let epoch = snapshot.projects[&project].epoch;
        storage.write(&project, epoch, vec![delete]).await.unwrap();
        let newer: Vec<u64> = journal
            .pending("store", 10)
            .unwrap()
            .iter()
            .map(|t| t.seq)
            .collect();
        journal.ack("store", &newer, Vec::new()).unwrap();

        let retried = journal
            .retry_dead_letters(LetterFilter::default())
            .await
            .unwrap();
        assert_eq!(retried, 3, "every letter is settled");
        let queued = journal.pending("store", 10).unwrap();
        assert_eq!(queued.len(), 1, "{queued:?}");
        assert!(
            matches!(&queued[0].op, TaskOp::Upsert { id, .. } if *id == ids[2]),
            "only the letter of the item nothing changed since: {queued:?}"
        );
        assert!(journal
            .dead_letters(LetterFilter::default(), None, 10)
            .unwrap()
            .0
            .is_empty());
    }

    #[tokio::test]
    async fn a_settled_run_goes_with_one_range_deletion_and_moves_the_floor_past_it() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            ..
        } = fixture(Durability::Buffered, vec!["store"]).await;
        ack_migration(&journal);
        for n in 0..6 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{n}")).await;
        }
        let tasks = journal.pending("store", 100).unwrap();
        let seqs: Vec<u64> = tasks.iter().map(|t| t.seq).collect();
        assert_eq!(seqs.len(), 6);

        // The first four settled: three applied, the third refused.
        let letter = refused(&journal, seqs[2]);
        journal
            .ack_run("store", seqs[0]..=seqs[3], 3, vec![letter])
            .unwrap();
        let left: Vec<u64> = journal
            .pending("store", 100)
            .unwrap()
            .iter()
            .map(|t| t.seq)
            .collect();
        assert_eq!(left, seqs[4..]);
        let letters = journal
            .dead_letters(LetterFilter::projector("store"), None, 10)
            .unwrap()
            .0;
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].seq, seqs[2]);
        assert!(letters[0].task.is_some(), "the letter keeps its task");
        assert_eq!(
            journal.refusals(&seqs).unwrap(),
            [crate::storage::Refusal {
                projector: "store".into(),
                revision: seqs[2],
                reason: "refused".into(),
            }],
            "a waiting writer hears of the refused write alone"
        );
        let progress = journal.progress("store");
        assert_eq!(progress.applied_through, Some(seqs[3]));
        assert_eq!((progress.applied, progress.failed), (4, 1));
        assert_eq!(progress.pending, 2);
        let floor = journal.lanes["store"].floor.load(Ordering::Acquire);
        assert_eq!(floor, seqs[3] + 1, "the next scan starts after the run");

        // A run that does not start at the floor leaves it: tasks below may still be pending.
        journal
            .ack_run("store", seqs[5]..=seqs[5], 1, Vec::new())
            .unwrap();
        assert_eq!(journal.lanes["store"].floor.load(Ordering::Acquire), floor);
        assert_eq!(journal.progress("store").applied_through, Some(seqs[4] - 1));
        let left = journal.pending("store", 100).unwrap();
        assert_eq!(left.iter().map(|t| t.seq).collect::<Vec<_>>(), [seqs[4]]);
        journal.close().await;
    }

    #[tokio::test]
    async fn deleted_items_kept_in_changes_by_an_older_journal_are_moved_and_written_again_cleanly()
    {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, Vec::new()).await;
        let id = Uuid::new_v4();
        let write = |entry: Entry| {
            let storage = storage.clone();
            let project = project.clone();
            async move {
                let epoch = storage.snapshot().projects[&project].epoch;
                storage.write(&project, epoch, vec![entry]).await.unwrap()[0]
            }
        };
        let body = json!({"project_version": 1, "title": "one"});
        write(prepare_upsert(&storage.snapshot(), &project, &article, id, &body).unwrap()).await;
        let deleted =
            write(prepare_delete(&storage.snapshot(), &project, &article, id, None).unwrap()).await;

        // As an older journal kept it: the marker in `changes`, and not yet moved.
        let db = &journal.db;
        let marker = keys::deleted(&keys::item(&project, &article, &id));
        let value = db.get_cf(journal.cf(CF_DELETED), &marker).unwrap().unwrap();
        db.delete_cf(journal.cf(CF_DELETED), &marker).unwrap();
        db.put_cf(journal.cf(CF_CHANGES), &marker, &value).unwrap();
        db.delete_cf(journal.cf(CF_META), keys::DELETED_MOVED)
            .unwrap();
        move_deleted(db).unwrap();
        assert_eq!(db.get_cf(journal.cf(CF_CHANGES), &marker).unwrap(), None);
        assert_eq!(
            db.get_cf(journal.cf(CF_DELETED), &marker).unwrap(),
            Some(deleted.to_be_bytes().to_vec())
        );

        // Written again, the item's delete leaves the feed: its change, tombstone and marker.
        let again = json!({"project_version": 1, "title": "two"});
        write(prepare_upsert(&storage.snapshot(), &project, &article, id, &again).unwrap()).await;
        let changes = journal.cf(CF_CHANGES);
        assert_eq!(
            db.get_cf(changes, keys::change(&project, deleted)).unwrap(),
            None
        );
        assert_eq!(
            db.get_cf(changes, keys::tombstone(&project, deleted))
                .unwrap(),
            None
        );
        assert_eq!(db.get_cf(journal.cf(CF_DELETED), &marker).unwrap(), None);
        journal.close().await;
    }

    /// The feed's index holds the last change of each of `ids` (its record's revision, or its
    /// delete's) and nothing else of the project.
    fn assert_one_change_each(journal: &Journal, project: &Ident, article: &Ident, ids: &[Uuid]) {
        // Each item's last change: its record's revision, or its delete's.
        let db = &journal.db;
        let mut last: Vec<u64> = ids
            .iter()
            .map(|id| {
                let key = keys::item(project, article, id);
                let put = db.get_cf(journal.cf(CF_ITEMS), &key).unwrap();
                let delete = db
                    .get_cf(journal.cf(CF_DELETED), keys::deleted(&key))
                    .unwrap();
                put.or(delete)
                    .and_then(|v| codec::record_revision(&v))
                    .expect("every item was changed")
            })
            .collect();
        last.sort_unstable();
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(keys::project_end(project));
        let start = keys::change(project, 0);
        let indexed: Vec<u64> = db
            .iterator_cf_opt(
                journal.cf(CF_CHANGES),
                options,
                rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
            )
            .map(|entry| keys::task_seq(&entry.unwrap().0))
            .collect();
        assert_eq!(
            indexed, last,
            "the feed's index holds each item's last change only"
        );
    }

    /// A start that rebuilds the local keyspaces walks each version's items once: the rebuild
    /// `keep_keyspaces` started is not started a second time by `resume_backfills` finding its
    /// recorded state. A command that starts it over replaces the walk that runs.
    #[tokio::test]
    async fn a_keyspace_rebuild_runs_once_at_a_start() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec![]).await;
        for _ in 0..3 {
            write_new(&storage, &project, &article).await.unwrap();
        }
        let spawned = || journal.backfills_spawned.load(Ordering::Relaxed);
        let before = spawned();
        journal.backfills_held.store(true, Ordering::Relaxed);
        journal.keep_keyspaces().await.unwrap();
        journal.resume_backfills().unwrap();
        assert_eq!(spawned(), before + 1, "one walk over version 1's items");
        // Started over by a command (a store added, a layout rebuilt), it takes the running
        // walk's place: the walk stops at its next chunk, the new one goes on to the end.
        let key = backfill::BackfillState {
            projectors: Some(vec![ProjectorKind::Rocksdb.name().to_string()]),
            ..backfill::BackfillState::default()
        }
        .key(&project, 1);
        let recorded = journal
            .db
            .get_cf(journal.cf(CF_META), &key)
            .unwrap()
            .unwrap();
        let state: backfill::BackfillState = decode(&recorded).unwrap();
        journal.spawn_backfill(project.clone(), 1, state, backfill::Start::Fresh);
        assert_eq!(spawned(), before + 2, "a walk started over");
        assert_eq!(journal.backfills_running.lock().unwrap().len(), 1);
        journal.backfills_held.store(false, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let state = journal.db.get_cf(journal.cf(CF_META), &key).unwrap();
            let state: Option<backfill::BackfillState> = state.map(|bytes| decode(&bytes).unwrap());
            if state.as_ref().is_some_and(|s| s.finished)
                && journal.backfills_running.lock().unwrap().is_empty()
            {
                assert_eq!(state.unwrap().done, 3);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the rebuild never ended: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        journal.close().await;
    }

    #[tokio::test]
    async fn a_back_fill_whose_journal_cannot_write_waits_and_goes_on_once_it_can() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        for _ in 0..10 {
            write_new(&storage, &project, &article).await.unwrap();
        }
        add_views(&storage, &project, &article).await;
        journal.backfills_held.store(true, Ordering::Relaxed);
        storage.freeze(&project, false).await.unwrap();
        // The back-fill's first chunk meets a journal that cannot write, as on a full disk.
        journal.disk_writes_fail.store(true, Ordering::Relaxed);
        journal.backfills_held.store(false, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while journal.write_failure().is_none() {
            assert!(std::time::Instant::now() < deadline, "no chunk was tried");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let state = storage.backfill_state(&project, 2).await.unwrap().unwrap();
        assert!(!state.finished && state.done == 0, "{state:?}");
        journal.disk_writes_fail.store(false, Ordering::Relaxed);
        loop {
            let state = storage.backfill_state(&project, 2).await.unwrap().unwrap();
            if state.finished {
                assert_eq!(state.done, 10, "{state:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the back-fill never went on: {state:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        journal.close().await;
    }

    /// A freeze asked again while the first one's back-fill runs (its answer lost) says that the
    /// back-fill goes on, not only that nothing changed; once the version is retired, that its
    /// back-fill stopped.
    #[tokio::test]
    async fn a_freeze_asked_again_during_its_back_fill_says_the_back_fill_goes_on() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        write_new(&storage, &project, &article).await.unwrap();
        add_views(&storage, &project, &article).await;
        journal.backfills_held.store(true, Ordering::Relaxed);
        storage.freeze(&project, false).await.unwrap();
        let wait = std::time::Duration::from_secs(1);
        let again = crate::write::freeze(storage.as_ref(), &project, wait, false, None).await;
        let Err(crate::write::WriteError::Conflict(said)) = again else {
            panic!("{again:?}");
        };
        assert!(
            said.contains("nothing changed since version 2") && said.contains("back-fill goes on"),
            "{said}"
        );
        // Retired, the version's back-fill stops where it is: said so, never "goes on".
        storage.retire(&project, 2).await.unwrap();
        journal.backfills_held.store(false, Ordering::Relaxed);
        let again = crate::write::freeze(storage.as_ref(), &project, wait, false, None).await;
        let Err(crate::write::WriteError::Conflict(said)) = again else {
            panic!("{again:?}");
        };
        assert!(
            said.contains("retired, which stopped its back-fill") && !said.contains("goes on"),
            "{said}"
        );
        journal.close().await;
    }

    #[tokio::test]
    async fn a_freeze_whose_journal_batch_fails_says_the_version_is_frozen_and_what_to_do() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        add_views(&storage, &project, &article).await;
        journal.disk_writes_fail.store(true, Ordering::Relaxed);
        let failed = storage
            .freeze(&project, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            failed.contains("version 2 of p is frozen")
                && failed.contains("POST /p/_version again"),
            "{failed}"
        );
        assert_eq!(storage.snapshot().projects[&project].versions.len(), 2);
        journal.disk_writes_fail.store(false, Ordering::Relaxed);
        journal.close().await;
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_by_the_storage_until_a_write_succeeds() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        write_new(&storage, &project, &article).await.unwrap();
        assert_eq!(storage.write_failure(), None);
        let before = journal.last_seq();
        journal.disk_writes_fail.store(true, Ordering::Relaxed);
        let failed = write_new(&storage, &project, &article).await;
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(journal.last_seq(), before, "nothing was journaled");
        let reason = storage.write_failure().expect("the failure is reported");
        assert!(
            reason.contains("the journal's last write failed") && reason.contains("WAL"),
            "{reason}"
        );
        journal.disk_writes_fail.store(false, Ordering::Relaxed);
        write_new(&storage, &project, &article).await.unwrap();
        assert_eq!(storage.write_failure(), None, "a write succeeded since");
        journal.close().await;
    }

    /// A fault while a batch is staged fails that batch's requests, writes none of it, and the
    /// writer goes on: before, the writer's thread ended and every later write failed until a
    /// restart.
    #[tokio::test]
    async fn a_batch_whose_staging_panics_is_dropped_whole_and_the_journal_goes_on() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        write_new(&storage, &project, &article).await.unwrap();
        let before = journal.last_seq();
        journal.stage_panics.store(true, Ordering::Relaxed);
        let failed = write_new(&storage, &project, &article).await;
        // Its own answer was dropped with the command: never told "not written", though it was not.
        let Err(StorageError::Uncertain(said)) = failed else {
            panic!("{failed:?}");
        };
        assert!(said.contains("unknown"), "{said}");
        assert_eq!(journal.last_seq(), before, "nothing was journaled");
        let written = write_new(&storage, &project, &article).await.unwrap();
        assert_eq!(
            written,
            vec![before + 1],
            "the next write goes on from there"
        );
        journal.close().await;
    }

    #[tokio::test]
    async fn a_write_whose_previous_change_cannot_be_read_is_refused_not_journaled_blind() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        let upsert = |id: &Uuid, title: &str| {
            let body = json!({"project_version": 1, "title": title});
            prepare_upsert(&storage.snapshot(), &project, &article, *id, &body).unwrap()
        };
        let epoch = storage.snapshot().projects[&project].epoch;
        let ids: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
        let first = ids.iter().map(|id| upsert(id, &"x".repeat(200))).collect();
        storage.write(&project, epoch, first).await.unwrap();
        let before = journal.last_seq();
        journal.db.flush_cf(journal.cf(CF_ITEMS)).unwrap();
        // The items are in a table file now, none of its blocks read yet: a read that must go to
        // the disk fails, as it would on an I/O error. (A batched read of several items reports
        // blocks it may not read as absent, not as an error, so only a write of one item is refused
        // here; both paths pass a read error on the same way.)
        journal.disk_reads_fail.store(true, Ordering::Relaxed);
        let one = storage
            .write(&project, epoch, vec![upsert(&ids[0], "again")])
            .await;
        assert!(one.is_err(), "{one:?}");
        assert_eq!(journal.last_seq(), before, "nothing was journaled");
        // A new item has no previous change to read (the table's filter, in memory, says so): its
        // write goes on, and so do the others once the journal reads again. The filter answers
        // "may hold it" for about one new id in a hundred, and such a write is refused like the
        // one above: of twenty new items written one by one, nearly all go through.
        let mut written = 0;
        for _ in 0..20 {
            let new = vec![upsert(&Uuid::new_v4(), "new")];
            if storage.write(&project, epoch, new).await.is_ok() {
                written += 1;
            }
        }
        assert!(written >= 15, "{written} of 20 new items were written");
        journal.disk_reads_fail.store(false, Ordering::Relaxed);
        storage
            .write(&project, epoch, vec![upsert(&ids[0], "again")])
            .await
            .unwrap();
        journal.close().await;
    }

    #[tokio::test]
    async fn a_write_of_many_items_finds_their_previous_changes_in_table_files_too() {
        // The previous changes are read in batches (`Stage::look_up`): from table files here, for
        // rewrites, revivals, deletes, new items, and items written twice or written then deleted
        // in the same write.
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
        let upsert = |id: &Uuid, title: &str| {
            let body = json!({"project_version": 1, "title": title});
            prepare_upsert(&storage.snapshot(), &project, &article, *id, &body).unwrap()
        };
        let delete =
            |id: &Uuid| prepare_delete(&storage.snapshot(), &project, &article, *id, None).unwrap();
        let epoch = storage.snapshot().projects[&project].epoch;
        let first = ids[..30].iter().map(|id| upsert(id, "first")).collect();
        storage.write(&project, epoch, first).await.unwrap();
        let deletes = ids[10..20].iter().map(delete).collect();
        storage.write(&project, epoch, deletes).await.unwrap();
        for cf in [CF_ITEMS, CF_DELETED, CF_CHANGES] {
            journal.db.flush_cf(journal.cf(cf)).unwrap();
        }
        // Rewrites (0..10), revivals (10..20), deletes (20..30), new items (30..40), one item
        // written twice and one written then deleted.
        let mut entries: Vec<Entry> = Vec::new();
        entries.extend(ids[..20].iter().map(|id| upsert(id, "again")));
        entries.extend(ids[20..30].iter().map(delete));
        entries.extend(ids[30..].iter().map(|id| upsert(id, "new")));
        entries.push(upsert(&ids[0], "twice"));
        entries.push(delete(&ids[35]));
        storage.write(&project, epoch, entries).await.unwrap();
        assert_one_change_each(&journal, &project, &article, &ids);
        let record = journal
            .db
            .get_cf(
                journal.cf(CF_ITEMS),
                keys::item(&project, &article, &ids[0]),
            )
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&record).contains("twice"));
        journal.close().await;
    }

    #[tokio::test]
    async fn a_writer_looks_for_delete_markers_once_the_journal_may_hold_one() {
        // A writer that starts on a journal without markers skips the look-up of an absent item's
        // marker (`Writer::markers`) until it stages a delete; one that starts on a journal with
        // markers looks them up from the first write.
        let f = fixture(Durability::Sync, vec![]).await;
        let (journal, storage, project, article) = (&f.journal, &f.storage, &f.project, &f.article);
        let writer = || {
            writer::Writer::new(
                journal.db.clone(),
                journal.catalog().clone(),
                Vec::new(),
                true,
                Arc::new(AtomicU64::new(0)),
                Durability::Sync,
            )
        };
        assert!(!writer().may_hold_markers());
        let id = Uuid::new_v4();
        let body = json!({"project_version": 1, "title": "t"});
        let epoch = storage.snapshot().projects[project].epoch;
        let put = prepare_upsert(&storage.snapshot(), project, article, id, &body).unwrap();
        storage.write(project, epoch, vec![put]).await.unwrap();
        assert!(!writer().may_hold_markers(), "no delete yet");
        let delete = prepare_delete(&storage.snapshot(), project, article, id, None).unwrap();
        storage.write(project, epoch, vec![delete]).await.unwrap();
        assert!(writer().may_hold_markers(), "the marker of the delete");
        journal.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn table_files_hold_their_indexes_and_filters_in_the_block_cache() {
        // Held outside the cache, they grow with the journal (`crate::rocks::family`): 30 000
        // items in one table file per family held about 90 KiB of them; in the cache, what the
        // readers keep is a fixed part per file, about 1 KiB.
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec![]).await;
        let epoch = storage.snapshot().projects[&project].epoch;
        let ids: Vec<Uuid> = (0..30_000).map(|_| Uuid::new_v4()).collect();
        for chunk in ids.chunks(1000) {
            let entries = chunk
                .iter()
                .map(|id| {
                    let body = json!({"project_version": 1, "title": "a title of some length"});
                    prepare_upsert(&storage.snapshot(), &project, &article, *id, &body).unwrap()
                })
                .collect();
            storage.write(&project, epoch, entries).await.unwrap();
        }
        for cf in FAMILIES {
            journal.db.flush_cf(journal.cf(cf)).unwrap();
        }
        let readers = journal.table_readers_bytes();
        assert!(
            readers < 32 << 10,
            "table readers hold {readers} bytes outside the block cache"
        );
        // The items are found through the partitioned indexes and filters.
        for id in ids.iter().step_by(997) {
            let record = journal.item(&project, &article, id).await.unwrap();
            assert!(record.is_some(), "item {id} is not found after the flush");
        }
        let absent = journal
            .item(&project, &article, &Uuid::new_v4())
            .await
            .unwrap();
        assert!(absent.is_none());
        journal.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn items_changed_within_and_across_batches_keep_one_change_each_their_last() {
        // 32 clients change 8 items: an item changes several times in one group commit, and again
        // in the next one.
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec![]).await;
        let frozen = journal.last_seq();
        let ids: Arc<Vec<Uuid>> = Arc::new((0..8).map(|_| Uuid::new_v4()).collect());
        let mut clients = Vec::new();
        for client in 0..32 {
            let (storage, ids) = (storage.clone(), ids.clone());
            let (project, article) = (project.clone(), article.clone());
            clients.push(tokio::spawn(async move {
                for n in 0..20 {
                    let id = ids[(client + n) % ids.len()];
                    let snapshot = storage.snapshot();
                    let entry = if (client + n) % 5 == 0 {
                        prepare_delete(&snapshot, &project, &article, id, None)
                    } else {
                        let body = json!({"project_version": 1, "title": format!("{client}/{n}")});
                        prepare_upsert(&snapshot, &project, &article, id, &body)
                    };
                    let epoch = snapshot.projects[&project].epoch;
                    storage
                        .write(&project, epoch, vec![entry.unwrap()])
                        .await
                        .unwrap();
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }

        assert_one_change_each(&journal, &project, &article, &ids);
        assert_eq!(
            journal.last_seq(),
            frozen + 32 * 20,
            "one revision per write"
        );
        journal.close().await;
    }

    #[tokio::test]
    async fn an_items_own_version_refers_to_its_record_until_a_write_leaves_that_version() {
        use crate::projector::rocksdb::{self as keyspace, DOCUMENT, RECORD};
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec![]).await;
        let keyspaces = journal.keyspaces().unwrap();
        let kind = |version: u32, id: &Uuid| {
            let key = keyspace::key(&project, version, &article, id);
            let value = journal.db.get_cf(journal.cf(keyspace::CF_KEYSPACES), key);
            value.unwrap().expect("stored")[8]
        };
        let title = |version: u32, id: &Uuid| {
            let doc = keyspaces.get(&project, version, &article, id);
            doc.expect("live")["title"].as_str().unwrap().to_string()
        };
        let write = |entries: Vec<Entry>| {
            let snapshot = storage.snapshot();
            let epoch = snapshot.projects[&project].epoch;
            let storage = storage.clone();
            let project = project.clone();
            async move { storage.write(&project, epoch, entries).await.unwrap() }
        };
        let upsert = |version: u32, id: Uuid, title: &str| {
            let body = json!({"project_version": version, "title": title});
            prepare_upsert(&storage.snapshot(), &project, &article, id, &body).unwrap()
        };
        let [a, b, c, d] = [(); 4].map(|_| Uuid::new_v4());
        let at_one = [(a, "a1"), (b, "b1"), (c, "c1"), (d, "d1")];
        write(at_one.map(|(id, title)| upsert(1, id, title)).to_vec()).await;
        // Stored once: the keyspace names the record, and reads resolve it.
        assert_eq!((kind(1, &a), title(1, &a)), (RECORD, "a1".into()));

        // Version 2, then version 1 retired: a write at 2 no longer carries 1.
        let blueprint = json!({"postgresql": {"table": "articles"},
            "elasticsearch": {"type": "article"},
            "columns": {"title": {"type": "string"}, "body": {"type": "text"}}});
        let input = parse_blueprint(&blueprint, "").unwrap();
        storage
            .put_blueprint(&project, &article, input)
            .await
            .unwrap();
        storage.freeze(&project, false).await.unwrap();
        // The back-fill of version 2 (one chunk) is done once it wrote every item.
        for _ in 0..3000 {
            if keyspaces.count(&project, 2, &article) == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(keyspaces.count(&project, 2, &article), 4, "back-filled");
        storage.retire(&project, 1).await.unwrap();
        // The records are in a table file: the look-up of the previous change brings the body
        // along, for a write of one item and for a write of several (a batched read).
        journal.db.flush_cf(journal.cf(CF_ITEMS)).unwrap();
        write(vec![upsert(2, a, "a2")]).await;
        write(vec![upsert(2, c, "c2"), upsert(2, d, "d2")]).await;
        // Version 1 keeps the item's last state there as a document of its own.
        for (id, before, now) in [(a, "a1", "a2"), (c, "c1", "c2"), (d, "d1", "d2")] {
            assert_eq!((kind(1, &id), title(1, &id)), (DOCUMENT, before.into()));
            assert_eq!((kind(2, &id), title(2, &id)), (RECORD, now.into()));
        }

        // The same in one batch: a record this batch wrote at 1 (a write prepared before the
        // retirement, as the writer may stage it), then replaced by a write at 2.
        let snapshot = storage.snapshot();
        let uid = snapshot.projects[&project].versions[0].blueprints[&article].uid;
        let doc = json!({"id": b.to_string(), "project_version": 1, "links": [], "title": "b2"});
        let at_one = Entry::upsert(
            &project,
            article.clone(),
            uid,
            b,
            1,
            vec![VersionDoc::new(1, &doc)],
        );
        write(vec![at_one, upsert(2, b, "b3")]).await;
        assert_eq!((kind(1, &b), title(1, &b)), (DOCUMENT, "b2".into()));
        assert_eq!((kind(2, &b), title(2, &b)), (RECORD, "b3".into()));
        assert_eq!(keyspaces.count(&project, 1, &article), 4);
        journal.close().await;
    }

    /// A batch is readable a moment before the writer publishes its last revision: a page of the
    /// feed read in that moment stops at what is published, so the revision it gives a follower
    /// is never past the project's last one (which would answer its next request 410).
    #[tokio::test]
    async fn a_page_of_changes_stops_at_the_published_revision() {
        let Fixture {
            journal,
            storage,
            project,
            article,
            ..
        } = fixture(Durability::Sync, vec!["store"]).await;
        write_new(&storage, &project, &article).await.unwrap();
        let last = write_new(&storage, &project, &article).await.unwrap()[0];
        let revisions = || -> Vec<u64> {
            let page = journal.changes(&project, 0, 10, crate::feed::PAGE_BYTES);
            page.unwrap().changes.iter().map(|c| c.revision).collect()
        };
        assert_eq!(revisions().len(), 2);
        // The writer between its batch and publishing it.
        journal.last_seq.store(last - 1, Ordering::Release);
        assert_eq!(revisions().len(), 1);
        assert!(revisions().iter().all(|r| *r < last));
        journal.last_seq.store(last, Ordering::Release);
        assert_eq!(revisions().len(), 2);
    }

    /// A crash after the catalog forgot a project and before the journal's batch was written
    /// leaves the drop's mark: the next start finishes it (items gone, the drop queued for every
    /// store, the mark cleared).
    #[tokio::test]
    async fn a_drop_the_journal_did_not_write_is_finished_at_the_next_start() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec!["store"]).await;
        let id = Uuid::new_v4();
        conformance::write(storage.as_ref(), &project, id, "kept by mistake").await;
        // The catalog's half of a drop, as a crash would leave it.
        journal.catalog.delete_project(&project).unwrap();
        assert_eq!(
            journal.catalog.pending_drops().unwrap(),
            vec![project.clone()]
        );
        assert!(journal
            .item(&project, &article, &id)
            .await
            .unwrap()
            .is_some());
        // Until the journal has written the drop, the name cannot be made again: the new
        // project's records would go with the old one's, or the old items stay to it.
        let input = crate::blueprint::parse_blueprint(
            &serde_json::json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
                "columns": {"title": {"type": "string"}}}),
            "",
        )
        .unwrap();
        assert!(matches!(
            journal.catalog.put_blueprint(&project, &article, input),
            Err(CatalogError::Conflict(_))
        ));

        journal.finish_drops().await.unwrap();
        expect_dropped(&journal, &project, &article, id).await;

        // A drop written whole leaves no mark, and the name can be made again.
        conformance::put_article(storage.as_ref(), &project, None).await;
        storage.drop_project(&project).await.unwrap();
        assert!(journal.catalog.pending_drops().unwrap().is_empty());
        conformance::put_article(storage.as_ref(), &project, None).await;
        journal.close().await;
    }

    /// What a finished drop leaves: the item `id` and the project's feed gone, the drop queued
    /// for the store, no mark.
    async fn expect_dropped(journal: &Journal, project: &Ident, article: &Ident, id: Uuid) {
        assert!(journal.item(project, article, &id).await.unwrap().is_none());
        assert!(journal
            .changes(project, 0, 10, crate::feed::PAGE_BYTES)
            .unwrap()
            .changes
            .is_empty());
        let queued = journal.pending("store", 100).unwrap();
        assert!(
            queued
                .iter()
                .any(|t| matches!(t.op, TaskOp::DropProject) && &t.project == project),
            "{queued:?}"
        );
        assert!(journal.catalog.pending_drops().unwrap().is_empty());
    }

    /// A drop whose journal batch fails (its client answered 503) has forgotten the project in
    /// the catalog: asked again, it is finished, as the next start would (items gone, the drop
    /// queued, the mark cleared, the name free), where it answered 404 and kept the name from
    /// being made again until a restart. Asked once more, it is a 404.
    #[tokio::test]
    async fn a_drop_whose_journal_batch_fails_is_finished_when_asked_again() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Sync, vec!["store"]).await;
        let id = Uuid::new_v4();
        conformance::write(storage.as_ref(), &project, id, "dropped").await;
        journal.disk_writes_fail.store(true, Ordering::Relaxed);
        assert!(storage.drop_project(&project).await.is_err());
        journal.disk_writes_fail.store(false, Ordering::Relaxed);
        assert!(!storage.snapshot().projects.contains_key(&project));
        assert_eq!(
            journal.catalog.pending_drops().unwrap(),
            vec![project.clone()]
        );
        storage.drop_project(&project).await.unwrap();
        expect_dropped(&journal, &project, &article, id).await;
        let gone = storage.drop_project(&project).await.unwrap_err();
        assert!(matches!(gone, StorageError::NotFound(_)), "{gone:?}");
        conformance::put_article(storage.as_ref(), &project, None).await;
        journal.close().await;
    }
}
