//! dstore's own durable journal: accepted writes and pending projector tasks, committed atomically.
//!
//! Every change goes through one writer thread ([`writer`]) that groups concurrent requests into one
//! RocksDB write batch (and one fsync, with `Durability::Sync`), hands out the sequence numbers that
//! order tasks (a write's revision is its sequence number), and only then answers. The batch holds the
//! item's latest state (`items`), one task per enabled projector (`tasks`) and the last sequence number,
//! so a crash leaves a write either fully accepted with all its tasks or absent. Projectors take tasks
//! in sequence order ([`Journal::pending`]) and remove them once applied ([`Journal::ack`]).

pub mod backfill;
pub mod codec;
mod import;
pub(crate) mod keys;
pub mod outbox;
pub mod task;
mod writer;

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;
use tokio::sync::{oneshot, watch, Notify};
use uuid::Uuid;

use crate::blueprint::{Ident, Uid};
use crate::catalog::{Catalog, CatalogError, Version};
use crate::projector::ProjectorKind;
pub use codec::decode_task;
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
const BATCH_BYTES: usize = 8 << 20;

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
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal storage failed: {0}")]
    Storage(#[from] rocksdb::Error),
    #[error("cannot start the journal writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the keyspaces are in the journal now, but {path} could not be removed: {source}")]
    Leftover {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("journal is shutting down")]
    Closed,
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
    /// The key of the item this entry writes or deletes (`keys::item`).
    pub fn key(&self, project: &Ident) -> Vec<u8> {
        match self {
            Entry::Upsert { blueprint, id, .. } | Entry::Delete { blueprint, id, .. } => {
                keys::item(project, blueprint, id)
            }
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
    /// Every task with a lower or equal seq has been applied or dead-lettered.
    pub applied_through: u64,
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
}

struct Lane {
    /// No task of this projector below this seq is pending. Scans start here, so they never wade
    /// through the deletion markers of tasks already acknowledged (new tasks only get higher seqs).
    floor: AtomicU64,
    applied: watch::Sender<u64>,
    /// Counts acknowledgements, so a waiter can check its own task even when an older one of a
    /// held project keeps `applied` from moving.
    acks: watch::Sender<u64>,
    wake: Notify,
    /// Cuts a retry backoff short (a client asked to retry now).
    retry: Notify,
    progress: Mutex<ProjectorProgress>,
}

pub struct Journal {
    db: Arc<DB>,
    catalog: Arc<Catalog>,
    commands: std::sync::mpsc::SyncSender<Command>,
    last_seq: Arc<AtomicU64>,
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
    /// Where background work (back-fills) runs: the runtime that opened the journal.
    runtime: tokio::runtime::Handle,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set by [`Journal::close`]: background work stops at its next step.
    closing: std::sync::atomic::AtomicBool,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
        let last_seq = match db.get_cf(db.cf_handle(CF_META).expect("meta cf"), keys::LAST_SEQ)? {
            Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().unwrap_or_default()),
            None => 0,
        };
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let layout = match db.get_cf(meta, keys::LAYOUT)? {
            Some(bytes) => u32::from_be_bytes(bytes.as_slice().try_into().unwrap_or_default()),
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
        let (commands, receiver) = std::sync::mpsc::sync_channel(4096);
        let lanes = projectors
            .iter()
            .map(|name| {
                let lane = Lane {
                    floor: AtomicU64::new(0),
                    applied: watch::channel(0).0,
                    acks: watch::channel(0).0,
                    wake: Notify::new(),
                    retry: Notify::new(),
                    progress: Mutex::new(ProjectorProgress::default()),
                };
                (*name, lane)
            })
            .collect();
        let journal = Arc::new(Journal {
            db: db.clone(),
            catalog: catalog.clone(),
            commands,
            last_seq: last_seq.clone(),
            id,
            layout: AtomicU32::new(layout),
            lanes,
            committed: Notify::new(),
            signal: Default::default(),
            settings: settings.clone(),
            runtime: tokio::runtime::Handle::current(),
            writer: Mutex::new(None),
            closing: std::sync::atomic::AtomicBool::new(false),
            background: Mutex::new(Vec::new()),
        });
        for name in &projectors {
            journal.refresh_progress(name)?;
        }
        let weak = Arc::downgrade(&journal);
        let worker = writer::Writer::new(
            db,
            catalog,
            projectors,
            settings.keyspaces,
            last_seq,
            settings.durability,
        );
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || worker.run(receiver, weak))
            .map_err(JournalError::Thread)?;
        *journal.writer.lock().expect("writer lock") = Some(thread);
        Ok(journal)
    }

    /// Stops background work (back-fills resume at the next start) and waits for it to end.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let tasks = std::mem::take(&mut *self.background.lock().expect("background lock"));
        for task in tasks {
            let _ = task.await;
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
        answer.await.map_err(|_| JournalError::Closed)?
    }

    /// Journals item writes transformed against catalog `epoch`; answers their revisions.
    pub async fn write(
        &self,
        epoch: u64,
        project: Ident,
        entries: Vec<Entry>,
    ) -> Result<Vec<u64>, JournalError> {
        self.check_backlog()?;
        self.send(|reply| Command::Write {
            epoch,
            project,
            entries,
            reply,
        })
        .await
    }

    /// Whether writes are accepted now: refused (503) while a projector is too far behind; the
    /// refusal names the projector furthest behind.
    pub fn check_backlog(&self) -> Result<(), JournalError> {
        let last = self.last_seq();
        let most_behind = self
            .lanes
            .iter()
            .map(|(name, lane)| (last.saturating_sub(*lane.applied.borrow()), name))
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
        self.send(|reply| Command::UpgradeLayout { projectors, reply })
            .await?;
        self.layout.store(LAYOUT, Ordering::Release);
        Ok(())
    }

    /// Freezes the working copy and queues its migrations ahead of any write into it.
    pub async fn freeze(
        &self,
        project: Ident,
        forced: bool,
    ) -> Result<(Arc<Version>, u64), JournalError> {
        self.send(|reply| Command::Freeze {
            project,
            forced,
            reply,
        })
        .await
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

    /// Forgets a project in the catalog and the journal and queues its removal from every store.
    pub async fn drop_project(&self, project: Ident) -> Result<u64, JournalError> {
        self.send(|reply| Command::DropProject { project, reply })
            .await
    }

    /// The latest accepted state of an item, if it exists.
    pub fn item(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<ItemRecord>, JournalError> {
        match self
            .db
            .get_cf(self.cf(CF_ITEMS), keys::item(project, blueprint, id))?
        {
            Some(bytes) => Ok(Some(codec::decode_record(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` items of a project after the key `after`, with the key to continue from
    /// (`None` at the end of the project).
    #[allow(clippy::type_complexity)]
    pub fn scan_items(
        &self,
        project: &Ident,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(Vec<(Ident, ItemRecord)>, Option<Vec<u8>>), JournalError> {
        let prefix = keys::project_prefix(project);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(keys::project_end(project));
        let start = after.clone().unwrap_or_else(|| prefix.clone());
        let mut items = Vec::new();
        let mut last = None;
        for entry in self.db.iterator_cf_opt(
            self.cf(CF_ITEMS),
            options,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (key, value) = entry?;
            if after.as_deref() == Some(&key[..]) {
                continue;
            }
            if items.len() >= limit {
                return Ok((items, last));
            }
            let name = &key[prefix.len()..key.len().saturating_sub(17)];
            if let Ok(blueprint) = Ident::parse(&String::from_utf8_lossy(name)) {
                items.push((blueprint, codec::decode_record(&value)?));
            }
            last = Some(key.to_vec());
        }
        Ok((items, None))
    }

    /// Up to `limit` changes of a project after revision `since`, read from one snapshot, with the
    /// project's horizon (see `feed`).
    pub fn changes(
        &self,
        project: &Ident,
        since: u64,
        limit: usize,
    ) -> Result<crate::feed::ChangesPage, JournalError> {
        let snapshot = self.db.snapshot();
        let horizon = snapshot
            .get_cf(self.cf(CF_META), keys::horizon(project))?
            .and_then(|v| codec::record_revision(&v))
            .unwrap_or(0);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(keys::project_end(project));
        let start = keys::change(project, since.saturating_add(1));
        let mut changes = Vec::new();
        for entry in snapshot.iterator_cf_opt(
            self.cf(CF_CHANGES),
            options,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            if changes.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            let revision = keys::task_seq(&key);
            let (delete, id, blueprint) = codec::decode_change(&value)?;
            let record = if delete {
                None
            } else {
                let item = snapshot
                    .get_cf(self.cf(CF_ITEMS), keys::item(project, &blueprint, &id))?
                    .map(|v| codec::decode_record(&v))
                    .transpose()?;
                // The index and the items are written in one batch and read from one snapshot.
                match item {
                    Some(record) if record.revision == revision => Some(record),
                    _ => continue,
                }
            };
            changes.push(crate::feed::Change {
                revision,
                blueprint,
                id,
                record,
            });
        }
        Ok(crate::feed::ChangesPage { changes, horizon })
    }

    /// Purges tombstones written before `before_millis`; answers how many went.
    pub async fn purge_tombstones(&self, before_millis: u64) -> Result<u64, JournalError> {
        const LIMIT: usize = 10_000;
        let mut total = 0;
        loop {
            let purged = self
                .send(|reply| Command::PurgeTombstones {
                    before_millis,
                    limit: LIMIT,
                    reply,
                })
                .await?;
            total += purged as u64;
            if purged < LIMIT {
                return Ok(total);
            }
        }
    }

    /// A receiver woken whenever `project` commits item changes.
    pub fn follow(&self, project: &Ident) -> watch::Receiver<u64> {
        self.signal.subscribe(project)
    }

    /// Iterates a projector's pending tasks from its floor, oldest first.
    fn scan_tasks(
        &self,
        projector: &str,
    ) -> impl Iterator<Item = Result<KeyValue, rocksdb::Error>> + '_ {
        let floor = self
            .lanes
            .get(projector)
            .map_or(0, |lane| lane.floor.load(Ordering::Acquire));
        let options = keys::task_range(projector, floor, u64::MAX - 1);
        self.db
            .iterator_cf_opt(self.cf(CF_TASKS), options, IteratorMode::Start)
    }

    /// Up to `limit` pending tasks of a projector, oldest first.
    pub fn pending(&self, projector: &str, limit: usize) -> Result<Vec<Task>, JournalError> {
        Ok(self.pending_from(projector, 0, limit, |_| false)?.tasks)
    }

    /// Up to `limit` pending tasks of a projector with a seq of at least `from`, oldest first,
    /// leaving out the tasks of projects `held` names. A task that cannot be decoded is moved to the
    /// dead letters on the way, with the reason: retrying could never apply it.
    pub fn pending_from(
        &self,
        projector: &str,
        from: u64,
        limit: usize,
        held: impl Fn(&Ident) -> bool,
    ) -> Result<Pending, JournalError> {
        let floor = self
            .lanes
            .get(projector)
            .map_or(0, |lane| lane.floor.load(Ordering::Acquire));
        let options = keys::task_range(projector, from.max(floor), u64::MAX - 1);
        let mut pending = Pending::default();
        let mut poison = Vec::new();
        let mut bytes = 0;
        for entry in self
            .db
            .iterator_cf_opt(self.cf(CF_TASKS), options, IteratorMode::Start)
        {
            let (key, value) = entry?;
            let seq = keys::task_seq(&key);
            if pending.first_seen.is_none() {
                pending.first_seen = Some(seq);
            }
            pending.last_seen = seq;
            match codec::decode_own_task(&value) {
                Ok(task) if held(&task.project) => pending.skipped += 1,
                Ok(task) => pending.tasks.push(task),
                Err(error) => {
                    tracing::error!(projector, seq, %error, "a task that cannot be decoded becomes a dead letter");
                    poison.push(DeadLetter::from_raw(
                        projector,
                        seq,
                        &value,
                        "the stored task is unreadable".into(),
                    ));
                }
            }
            bytes += value.len();
            if pending.tasks.len() >= limit || bytes >= BATCH_BYTES {
                break;
            }
        }
        if let (Some(first), Some(lane)) = (pending.first_seen, self.lanes.get(projector)) {
            if from <= floor {
                lane.floor.fetch_max(first, Ordering::AcqRel);
            }
        }
        if !poison.is_empty() {
            self.ack(projector, &[], poison)?;
        }
        Ok(pending)
    }

    /// One pending task of a projector in its stored form, if it is still pending.
    pub fn pending_raw(&self, projector: &str, seq: u64) -> Result<Option<Vec<u8>>, JournalError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_TASKS), keys::task(projector, seq))?)
    }

    /// Removes applied tasks and moves refused ones to the dead letters, in one batch.
    pub fn ack(
        &self,
        projector: &str,
        applied: &[u64],
        dead: Vec<DeadLetter>,
    ) -> Result<(), JournalError> {
        let mut batch = WriteBatch::default();
        for seq in applied.iter().chain(dead.iter().map(|letter| &letter.seq)) {
            batch.delete_cf(self.cf(CF_TASKS), keys::task(projector, *seq));
        }
        self.settle(projector, batch, applied.len(), dead, None)
    }

    /// Acknowledges a run a step settled: every pending task of the projector with a seq in
    /// `run` was in the step (a batch read whole, no held project's task left out), `applied` of
    /// them applied and the `dead` ones refused. One range deletion removes them all, which is cheaper
    /// to write than a deletion marker per task and lets the next scan skip the run at once.
    pub fn ack_run(
        &self,
        projector: &str,
        run: RangeInclusive<u64>,
        applied: usize,
        dead: Vec<DeadLetter>,
    ) -> Result<(), JournalError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_TASKS),
            keys::task(projector, *run.start()),
            keys::task(projector, run.end().saturating_add(1)),
        );
        self.settle(projector, batch, applied, dead, Some(run))
    }

    /// Writes an acknowledgement (`batch` removes the tasks) with the dead letters, then moves the
    /// projector's progress.
    fn settle(
        &self,
        projector: &str,
        mut batch: WriteBatch,
        applied: usize,
        dead: Vec<DeadLetter>,
        run: Option<RangeInclusive<u64>>,
    ) -> Result<(), JournalError> {
        for letter in &dead {
            batch.put_cf(
                self.cf(CF_DEAD),
                keys::task(projector, letter.seq),
                serde_json::to_vec(letter)?,
            );
        }
        self.db.write(batch)?;
        if let Some(lane) = self.lanes.get(projector) {
            if let Some(run) = run {
                // Nothing below the floor is pending; a run from at most the floor leaves nothing
                // pending up to its end either, and new tasks only get higher seqs.
                if *run.start() <= lane.floor.load(Ordering::Acquire) {
                    lane.floor
                        .fetch_max(run.end().saturating_add(1), Ordering::AcqRel);
                }
            }
            let mut progress = lane.progress.lock().expect("progress lock");
            progress.applied += applied as u64;
            progress.failed += dead.len() as u64;
        }
        let refreshed = self.refresh_progress(projector);
        if let Some(lane) = self.lanes.get(projector) {
            lane.acks.send_modify(|n| *n += 1);
        }
        refreshed
    }

    /// Recomputes how far a projector got: everything before its oldest pending task is done.
    pub fn refresh_progress(&self, projector: &str) -> Result<(), JournalError> {
        let Some(lane) = self.lanes.get(projector) else {
            return Ok(());
        };
        let last = self.last_seq();
        let oldest = self
            .scan_tasks(projector)
            .next()
            .transpose()?
            .map(|(key, _)| keys::task_seq(&key));
        if let Some(oldest) = oldest {
            lane.floor.fetch_max(oldest, Ordering::AcqRel);
        }
        let through = oldest.map_or(last, |seq| seq - 1);
        lane.applied.send_if_modified(|current| {
            let moved = *current != through;
            *current = through;
            moved
        });
        lane.progress.lock().expect("progress lock").applied_through = through;
        Ok(())
    }

    pub fn note_error(&self, projector: &str, error: Option<String>) {
        if let Some(lane) = self.lanes.get(projector) {
            lane.progress.lock().expect("progress lock").last_error = error;
        }
    }

    pub fn progress(&self, projector: &str) -> ProjectorProgress {
        let mut progress = match self.lanes.get(projector) {
            Some(lane) => lane.progress.lock().expect("progress lock").clone(),
            // The keyspaces the writer keeps have every write the moment it is accepted.
            None => ProjectorProgress {
                applied_through: self.last_seq(),
                ..ProjectorProgress::default()
            },
        };
        progress.pending = self.last_seq().saturating_sub(progress.applied_through);
        let prefix = keys::projector_prefix(projector);
        progress.dead_letters = self
            .db
            .iterator_cf(
                self.cf(CF_DEAD),
                IteratorMode::From(&prefix, rocksdb::Direction::Forward),
            )
            .map_while(Result::ok)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .count() as u64;
        progress
    }

    /// Wakes the dispatchers after a commit.
    fn wake_all(&self) {
        for lane in self.lanes.values() {
            lane.wake.notify_one();
        }
        self.committed.notify_one();
    }

    /// Waits until something is committed or `timeout` passes.
    pub async fn wait_for_commit(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.committed.notified()).await;
    }

    /// Waits until the projector has new tasks or `timeout` passes.
    pub async fn wait_for_tasks(&self, projector: &str, timeout: Duration) {
        if let Some(lane) = self.lanes.get(projector) {
            let _ = tokio::time::timeout(timeout, lane.wake.notified()).await;
        }
    }

    /// Waits until every projector has applied `seq`; on time-out, names the ones still behind.
    pub async fn wait_projected(
        &self,
        seq: u64,
        timeout: Duration,
    ) -> Result<(), Vec<&'static str>> {
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(365 * 86_400));
        let mut behind = Vec::new();
        for (name, lane) in &self.lanes {
            let mut acks = lane.acks.subscribe();
            let reached =
                tokio::time::timeout_at(deadline, acks.wait_for(|_| self.settled(name, lane, seq)))
                    .await;
            if !matches!(reached, Ok(Ok(_))) {
                behind.push(*name);
            }
        }
        if behind.is_empty() {
            Ok(())
        } else {
            behind.sort_unstable();
            Err(behind)
        }
    }

    /// Which of the writes `seqs` a projector refused: those whose task is one of its dead letters.
    pub fn refusals(&self, seqs: &[u64]) -> Result<Vec<crate::storage::Refusal>, JournalError> {
        #[derive(Deserialize)]
        struct Reason {
            reason: String,
        }
        let mut refusals = Vec::new();
        let mut names: Vec<&str> = self.lanes.keys().copied().collect();
        names.sort_unstable();
        for name in names {
            for seq in seqs {
                if let Some(value) = self
                    .db
                    .get_pinned_cf(self.cf(CF_DEAD), keys::task(name, *seq))?
                {
                    refusals.push(crate::storage::Refusal {
                        projector: name.to_string(),
                        revision: *seq,
                        reason: decode::<Reason>(&value)?.reason,
                    });
                }
            }
        }
        Ok(refusals)
    }

    /// Whether a projector is done with the task `seq` (applied or dead-lettered): everything up to
    /// it is, or that task alone is (tasks of a held project may still wait before it).
    fn settled(&self, projector: &str, lane: &Lane, seq: u64) -> bool {
        *lane.applied.borrow() >= seq
            || (seq <= self.last_seq()
                && matches!(
                    self.db
                        .get_pinned_cf(self.cf(CF_TASKS), keys::task(projector, seq)),
                    Ok(None)
                ))
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

    /// Dead letters, oldest first; only those of `projector` when given.
    pub fn dead_letters(
        &self,
        projector: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, JournalError> {
        Ok(self
            .dead_entries(projector, limit)?
            .into_iter()
            .map(|(_, letter)| letter)
            .collect())
    }

    fn dead_entries(
        &self,
        projector: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeadLetter)>, JournalError> {
        let prefix = projector.map(keys::projector_prefix).unwrap_or_default();
        let mut out = Vec::new();
        for entry in self.db.iterator_cf(
            self.cf(CF_DEAD),
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        ) {
            let (key, value) = entry?;
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let mut letter: DeadLetter = decode(&value)?;
            letter.seq = keys::task_seq(&key);
            out.push((key.to_vec(), letter));
        }
        Ok(out)
    }

    /// Queues dead letters again (after the cause was fixed), behind every pending task; the
    /// revision guard keeps them from undoing anything newer. Answers how many were queued.
    pub async fn retry_dead_letters(&self, projector: Option<&str>) -> Result<usize, JournalError> {
        let mut letters = self.dead_entries(projector, usize::MAX)?;
        // A task that cannot be decoded stays a dead letter: no retry could apply it.
        letters.retain(|(_, letter)| letter.task.is_some());
        if letters.is_empty() {
            return Ok(0);
        }
        let names: Vec<String> = letters.iter().map(|(_, l)| l.projector.clone()).collect();
        let count = self
            .send(|reply| Command::Requeue { letters, reply })
            .await?;
        for name in names {
            if let Some(lane) = self.lanes.get(name.as_str()) {
                lane.retry.notify_one();
            }
        }
        Ok(count)
    }
}

/// Builds the change feed's index of a journal made before it had one: one put per stored item, at
/// the item's revision. Runs once, before the writer starts.
fn index_changes(db: &DB) -> Result<(), JournalError> {
    let Some(mut rewrite) = Rewrite::start(db, keys::CHANGES_INDEXED)? else {
        return Ok(());
    };
    let (items, changes) = (
        db.cf_handle(CF_ITEMS).expect("items cf"),
        db.cf_handle(CF_CHANGES).expect("changes cf"),
    );
    let millis = chrono::Utc::now().timestamp_millis().max(0) as u64;
    for entry in db.iterator_cf(items, IteratorMode::Start) {
        let (key, value) = entry?;
        // `project \0 blueprint \0 id(16)`
        let Some(split) = key.iter().position(|b| *b == 0) else {
            continue;
        };
        let (Ok(project), Ok(blueprint), Ok(id), Some(revision)) = (
            Ident::parse(&String::from_utf8_lossy(&key[..split])),
            Ident::parse(&String::from_utf8_lossy(
                &key[split + 1..key.len().saturating_sub(17).max(split + 1)],
            )),
            Uuid::from_slice(&key[key.len().saturating_sub(16)..]),
            codec::record_revision(&value),
        ) else {
            continue;
        };
        rewrite.batch.put_cf(
            changes,
            keys::change(&project, revision),
            codec::change_value(false, millis, &id, &blueprint),
        );
        rewrite.counted()?;
    }
    rewrite.finish("indexed the stored items for the change feed")
}

/// Moves the deleted items' markers out of `changes`, where journals made before the `deleted`
/// family kept them (keys unchanged), once.
fn move_deleted(db: &DB) -> Result<(), JournalError> {
    let Some(mut rewrite) = Rewrite::start(db, keys::DELETED_MOVED)? else {
        return Ok(());
    };
    let (changes, deleted) = (
        db.cf_handle(CF_CHANGES).expect("changes cf"),
        db.cf_handle(CF_DELETED).expect("deleted cf"),
    );
    let from = [keys::DELETED];
    for entry in db.iterator_cf(
        changes,
        IteratorMode::From(&from, rocksdb::Direction::Forward),
    ) {
        let (key, value) = entry?;
        if key.first() != Some(&keys::DELETED) {
            break;
        }
        rewrite.batch.put_cf(deleted, &key, value);
        rewrite.batch.delete_cf(changes, &key);
        rewrite.counted()?;
    }
    rewrite.finish("moved the deleted items' markers to their own family")
}

/// A one-time rewrite of the journal at start, before the writer runs: written in batches of
/// 10,000 entries, the last of which sets its `flag` in `meta`, so one interrupted midway is done
/// again at the next start and one finished is never done again.
struct Rewrite<'a> {
    db: &'a DB,
    flag: &'static [u8],
    batch: WriteBatch,
    count: u64,
}

impl<'a> Rewrite<'a> {
    /// The rewrite flagged `flag`, unless it was done.
    fn start(db: &'a DB, flag: &'static [u8]) -> Result<Option<Rewrite<'a>>, JournalError> {
        let meta = db.cf_handle(CF_META).expect("meta cf");
        if db.get_cf(meta, flag)?.is_some() {
            return Ok(None);
        }
        Ok(Some(Rewrite {
            db,
            flag,
            batch: WriteBatch::default(),
            count: 0,
        }))
    }

    /// Counts one entry staged in `batch`, and writes the batch once it is full.
    fn counted(&mut self) -> Result<(), JournalError> {
        self.count += 1;
        if self.batch.len() >= 10_000 {
            self.db.write(std::mem::take(&mut self.batch))?;
        }
        Ok(())
    }

    /// Writes the rest with the flag, and says `done` in the log when there was anything to do.
    fn finish(mut self, done: &str) -> Result<(), JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        self.batch.put_cf(meta, self.flag, []);
        self.db.write(self.batch)?;
        if self.count > 0 {
            tracing::info!(items = self.count, "{done}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::blueprint::parse_blueprint;
    use crate::storage::embedded::EmbeddedStorage;
    use crate::storage::Storage;
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
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Catalog::open(&dir.path().join("catalog")).unwrap());
        let settings = JournalSettings {
            durability,
            max_pending: u64::MAX,
            keyspaces: true,
        };
        let journal =
            Journal::open(&dir.path().join("journal"), catalog, projectors, settings).unwrap();
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

    #[tokio::test]
    async fn a_settled_run_goes_with_one_range_deletion_and_moves_the_floor_past_it() {
        let Fixture {
            _dir,
            journal,
            storage,
            project,
            article,
        } = fixture(Durability::Buffered, vec!["store"]).await;
        let migration = journal.pending("store", 10).unwrap();
        journal
            .ack("store", &[migration[0].seq], Vec::new())
            .unwrap();
        for n in 0..6 {
            let snapshot = storage.snapshot();
            let body = json!({"project_version": 1, "title": format!("t{n}")});
            let entry =
                prepare_upsert(&snapshot, &project, &article, Uuid::new_v4(), &body).unwrap();
            let epoch = snapshot.projects[&project].epoch;
            storage.write(&project, epoch, vec![entry]).await.unwrap();
        }
        let tasks = journal.pending("store", 100).unwrap();
        let seqs: Vec<u64> = tasks.iter().map(|t| t.seq).collect();
        assert_eq!(seqs.len(), 6);

        // The first four settled: three applied, the third refused.
        let raw = journal.pending_raw("store", seqs[2]).unwrap().unwrap();
        let letter = DeadLetter::from_raw("store", seqs[2], &raw, "refused".into());
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
        let letters = journal.dead_letters(Some("store"), 10).unwrap();
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
        assert_eq!(progress.applied_through, seqs[3]);
        assert_eq!((progress.applied, progress.failed), (4, 1));
        assert_eq!(progress.pending, 2);
        let floor = journal.lanes["store"].floor.load(Ordering::Acquire);
        assert_eq!(floor, seqs[3] + 1, "the next scan starts after the run");

        // A run that does not start at the floor leaves it: tasks below may still be pending.
        journal
            .ack_run("store", seqs[5]..=seqs[5], 1, Vec::new())
            .unwrap();
        assert_eq!(journal.lanes["store"].floor.load(Ordering::Acquire), floor);
        assert_eq!(journal.progress("store").applied_through, seqs[4] - 1);
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
                IteratorMode::From(&start, rocksdb::Direction::Forward),
            )
            .map(|entry| keys::task_seq(&entry.unwrap().0))
            .collect();
        assert_eq!(
            indexed, last,
            "the feed's index holds each item's last change only"
        );
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
            let record = journal.item(&project, &article, id).unwrap();
            assert!(record.is_some(), "item {id} is not found after the flush");
        }
        let absent = journal.item(&project, &article, &Uuid::new_v4()).unwrap();
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
        let [a, b] = [(); 2].map(|_| Uuid::new_v4());
        write(vec![upsert(1, a, "a1"), upsert(1, b, "b1")]).await;
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
        // The back-fill of version 2 (one chunk) is done once it wrote both items.
        for _ in 0..500 {
            if keyspaces.count(&project, 2, &article) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(keyspaces.count(&project, 2, &article), 2, "back-filled");
        storage.retire(&project, 1).await.unwrap();
        write(vec![upsert(2, a, "a2")]).await;
        // Version 1 keeps the item's last state there as a document of its own.
        assert_eq!((kind(1, &a), title(1, &a)), (DOCUMENT, "a1".into()));
        assert_eq!((kind(2, &a), title(2, &a)), (RECORD, "a2".into()));

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
        assert_eq!(keyspaces.count(&project, 1, &article), 2);
        journal.close().await;
    }
}
