//! The journal's single writer thread: group commit, sequence numbers, atomic batches.
//!
//! Commands waiting in the channel when the thread wakes are staged into one `WriteBatch`, written with
//! one (optionally synced) write, and answered only after it. A command that cannot be staged (a stale
//! epoch, an unknown project) is answered at once and adds nothing to the batch. Sequence numbers are
//! published after the batch is durable, so a reader that sees `last_seq = n` finds every task ≤ n.
//!
//! When the journal keeps the local keyspaces (`projector/rocksdb`), the same batch writes each
//! item's documents into them (a delete, tombstones with its revision), and they need no task of
//! their own. Batches are written in sequence order, so a write wins without reading what the
//! keyspace holds; a back-fill skips items changed since its chunk was read (in this batch too),
//! and a retried dead letter is checked against the item's latest change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};

use rocksdb::{WriteBatch, WriteOptions, DB};
use tokio::sync::oneshot;

use super::backfill::BackfillState;
use super::codec::UpsertBody;
use super::task::{self, TaskOp};
use super::{
    codec, keys, Durability, Entry, Journal, JournalError, CF_CHANGES, CF_DELETED, CF_ITEMS,
    CF_META, CF_TASKS, FAMILIES,
};
use crate::blueprint::Ident;
use crate::catalog::{Catalog, MigrationState, Version};
use crate::projector::rocksdb as keyspace;
use crate::projector::ProjectorKind;

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// An item a back-fill projects into its new version, with the revision it already has.
#[derive(Debug)]
pub struct BackfillItem {
    /// The item's key in the `items` column family.
    pub key: Vec<u8>,
    pub revision: u64,
    /// The item's blueprint as the new version names it, and its id.
    pub blueprint: Ident,
    pub id: uuid::Uuid,
    /// The encoded `Upsert` task body (see `codec`).
    pub task: UpsertBody,
}

pub enum Command {
    Write {
        epoch: u64,
        project: Ident,
        entries: Vec<Entry>,
        reply: Reply<Vec<u64>>,
    },
    /// Removes up to `limit` tombstones older than `before_millis` from the change feed, moving
    /// their projects' horizons; answers how many went.
    PurgeTombstones {
        before_millis: u64,
        limit: usize,
        /// The tombstone key to start from (`None`: the first).
        from: Option<Vec<u8>>,
        /// How many went, and the key to go on from (`None`: every tombstone was looked at).
        reply: Reply<(usize, Option<Vec<u8>>)>,
    },
    Freeze {
        project: Ident,
        forced: bool,
        /// What the freeze was judged on (see `edit::freeze`).
        judged: Option<crate::catalog::edit::Judged>,
        reply: Reply<(Arc<Version>, u64)>,
    },
    Migrate {
        project: Ident,
        version: u32,
        projectors: Vec<String>,
        reply: Reply<u64>,
    },
    /// Rebuilds what `projectors` hold of every live version: migrations again, then back-fills into
    /// those projectors only; writes `record` (a meta key and its value) in the same batch.
    Rebuild {
        projectors: Vec<String>,
        record: (&'static [u8], Vec<u8>),
        reply: Reply<()>,
    },
    /// Starts keeping the local keyspaces when they are not current: empties them, rebuilds every
    /// live version into them by back-fills, and records them as kept in the same batch.
    KeepKeyspaces { reply: Reply<()> },
    /// Starts (again) the back-fill of a version whose state is missing.
    StartBackfill {
        project: Ident,
        version: u32,
        reply: Reply<()>,
    },
    DropProject {
        project: Ident,
        /// Finishing a drop the catalog has made already (a start after a crash in between).
        again: bool,
        /// The keys of the project's dead letters, found before the command was sent.
        dead: Vec<Vec<u8>>,
        reply: Reply<u64>,
    },
    Backfill {
        project: Ident,
        version: u32,
        items: Vec<BackfillItem>,
        state: BackfillState,
        /// Answers false when the version is gone or retired and the back-fill should stop.
        reply: Reply<bool>,
    },
    /// Moves dead letters back into the queue of their projector, behind every pending task.
    Requeue {
        letters: Vec<(Vec<u8>, super::DeadLetter)>,
        reply: Reply<usize>,
    },
    /// Ends the writer thread after the commands before it.
    Shutdown,
}

/// How many seqs one synced [`keys::SEQ_RESERVED`] mark reserves (`Writer::reserve`): a crash
/// of the machine under buffered durability skips at most this many revisions. Every seq handed
/// out is below the mark synced before it (the mark itself never is: `Journal::lost` counts on
/// it). Tests reserve a few at a time, so that batches reach the mark.
const SEQ_RESERVE: u64 = if cfg!(test) { 4 } else { 1 << 20 };

pub struct Writer {
    db: Arc<DB>,
    catalog: Arc<Catalog>,
    /// The projectors that get tasks.
    projectors: Vec<&'static str>,
    /// Each projector's count of pending tasks (in the order of `projectors`): raised before a
    /// batch is written, so an acknowledgement can never find it lower than its tasks.
    pending: Vec<Arc<AtomicU64>>,
    /// Whether the batch also writes the local keyspaces (`keyspace::CF_KEYSPACES`).
    keyspaces: bool,
    last_seq: Arc<AtomicU64>,
    durability: Durability,
    /// Whether the `deleted` family may hold a marker: false while it was empty at start and no
    /// delete has been staged since. Until then an item absent from `items` has no previous change
    /// at all, and its marker is not looked for (under `_bulk` of new items, that look-up was about
    /// 3 % of the writer's instructions). The writer is the only one that writes markers once the
    /// journal is open.
    markers: AtomicBool,
    /// Set by tests: reads that would go to the disk fail, as an I/O error would.
    #[cfg(test)]
    pub(super) disk_reads_fail: Arc<AtomicBool>,
    /// Set by tests: batch writes fail, as on a full disk.
    #[cfg(test)]
    pub(super) disk_writes_fail: Arc<AtomicBool>,
    /// Set by tests: staging the next item write panics, as a fault in dstore would.
    #[cfg(test)]
    pub(super) stage_panics: Arc<AtomicBool>,
    /// Read by tests: drops whose batch was written unsynced before their catalog mark was
    /// cleared.
    #[cfg(test)]
    pub(super) unsynced_drops: Arc<AtomicU64>,
}

/// An answer to send once the batch is written.
type Answer = Box<dyn FnOnce(Option<&Unwritten>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, value: T) -> Answer {
    Box::new(move |failure| {
        let _ = reply.send(match failure {
            None => Ok(value),
            Some(Unwritten::Storage(e)) => Err(JournalError::Storage(e.clone())),
            Some(Unwritten::Fault) => Err(JournalError::Fault),
        });
    })
}

/// Why a batch was not written.
#[derive(Debug)]
enum Unwritten {
    /// RocksDB refused it (a full disk, an I/O error).
    Storage(rocksdb::Error),
    /// Staging one of its commands panicked: a fault in dstore, logged. The batch is dropped
    /// whole, so nothing half-staged is ever written, and the writer goes on with the next.
    Fault,
}

impl std::fmt::Display for Unwritten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unwritten::Storage(e) => write!(f, "{e}"),
            Unwritten::Fault => write!(f, "{}", JournalError::Fault),
        }
    }
}

/// Whether staging `command` changes the catalog at once (a freeze, a migration marked done, a
/// drop, a rebuild): such a command is staged in a batch of its own and never under
/// [`stage_caught`], so a fault in another command can never drop the journal's part of a
/// catalog change already made, nor answer it as though nothing were.
fn changes_catalog(command: &Command) -> bool {
    matches!(
        command,
        Command::Freeze { .. }
            | Command::Migrate { .. }
            | Command::Rebuild { .. }
            | Command::DropProject { .. }
    )
}

/// Stages `command`; false when staging it panicked, which leaves `stage` unfit to be written.
fn stage_caught(stage: &mut Stage, command: Command) -> bool {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stage_command(stage, command)
    })) {
        Ok(()) => true,
        Err(panic) => {
            let message = crate::supervise::panic_message(panic.as_ref());
            tracing::error!(%message, commands = stage.answers.len() + 1, "staging a journal command panicked; its batch is dropped");
            false
        }
    }
}

/// The batch being built, with the next sequence numbers.
struct Stage<'a> {
    batch: WriteBatch,
    seq: u64,
    answers: Vec<Answer>,
    /// What to start once the batch is written (back-fills).
    after: Vec<AfterCommit>,
    /// Back-fill keys this batch starts.
    backfills: std::collections::HashSet<Vec<u8>>,
    /// Tasks this batch queues for each projector (in the order of `Writer::projectors`).
    queued: Vec<u64>,
    /// The last change this batch makes to each item, so a second write of the same item in the
    /// batch replaces the first one's change. Keyed by item keys, which clients choose: foldhash,
    /// seeded per process, so they cannot aim them at one bucket (SipHash took 1.7 % of dstore's
    /// CPU under `_bulk`).
    staged: HashMap<Vec<u8>, Previous, foldhash::fast::RandomState>,
    /// Projects this batch drops.
    dropped: std::collections::HashSet<Ident>,
    /// Horizons this batch moves.
    horizons: HashMap<Ident, u64>,
    /// The highest revision this batch gives each project's items (for the feed's followers).
    touched: HashMap<Ident, u64>,
    /// Item writes and deletes this batch applies to the local keyspaces.
    kept: u64,
    /// Unix millis of the batch, stamped on its changes.
    millis: u64,
    /// The journal's column families (in the order of `FAMILIES`), looked up once per batch: by
    /// name, each look-up searched the database's map of families, several times per item (5 % of
    /// the writer's instructions under `_bulk`).
    families: [&'a rocksdb::ColumnFamily; FAMILIES.len()],
    writer: &'a Writer,
}

/// An item's change before the one being staged.
#[derive(Clone, Copy)]
enum Previous {
    None,
    Put {
        revision: u64,
        /// The version the item was written for.
        version: u32,
        /// Where this batch holds the record (start, length), when this batch wrote it.
        staged: Option<(usize, usize)>,
    },
    Delete(u64),
}

/// An item's previous change as [`Stage::look_up`] read it, with its record's body when the write
/// leaves the version the item was last written for.
#[derive(Clone)]
struct Found {
    previous: Previous,
    body: Option<Vec<u8>>,
}

impl From<Previous> for Found {
    fn from(previous: Previous) -> Self {
        Found {
            previous,
            body: None,
        }
    }
}

/// The body of an item record, if it is the record of `revision`.
fn record_body_at(record: &[u8], revision: u64) -> Option<Vec<u8>> {
    codec::record_body(record)
        .filter(|(at, _)| *at == revision)
        .map(|(_, body)| body.to_vec())
}

/// The change an item record stands for, if it decodes.
fn put_of(record: &[u8]) -> Option<Previous> {
    Some(Previous::Put {
        revision: codec::record_revision(record)?,
        version: codec::record_version(record)?,
        staged: None,
    })
}

/// The change a deleted item's marker stands for (none without a marker).
fn delete_of(marker: Option<&[u8]>) -> Previous {
    match marker.and_then(codec::record_revision) {
        Some(delete) => Previous::Delete(delete),
        None => Previous::None,
    }
}

/// Work that may only start once its batch is durable.
type AfterCommit = Box<dyn FnOnce(&Arc<Journal>) + Send>;

impl<'a> Stage<'a> {
    fn cf(&self, name: &str) -> &'a rocksdb::ColumnFamily {
        let index = FAMILIES
            .iter()
            .position(|family| *family == name)
            .expect("a journal column family");
        self.families[index]
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Queues an encoded task once for each projector in `to`; answers its seq. The revision of an
    /// item task is its own seq unless given (back-fills keep the item's revision).
    fn task<'p>(
        &mut self,
        revision: Option<u64>,
        body: &[u8],
        to: impl IntoIterator<Item = &'p str>,
    ) -> u64 {
        let seq = self.next_seq();
        let tasks = self.cf(CF_TASKS);
        // Encoded only for a projector that gets it: with the keyspaces alone there is none.
        let mut value = None;
        for projector in to {
            let value =
                value.get_or_insert_with(|| codec::task_value(seq, revision.unwrap_or(seq), body));
            self.batch
                .put_cf(tasks, keys::task(projector, seq), &*value);
            if let Some(lane) = self.writer.projectors.iter().position(|p| *p == projector) {
                self.queued[lane] += 1;
            }
        }
        seq
    }

    /// The item's change before this one, from this batch, else as [`Stage::look_up`] read it
    /// from the journal (`looked_up`), else read now.
    fn previous(&self, key: &[u8], looked_up: Option<Previous>) -> Previous {
        if let Some(staged) = self.staged.get(key) {
            return *staged;
        }
        if let Some(looked_up) = looked_up {
            return looked_up;
        }
        self.read_previous(key).unwrap_or(Previous::None)
    }

    /// The item's latest change: from this batch, else read from the journal.
    fn latest(&self, key: &[u8]) -> Result<Previous, rocksdb::Error> {
        match self.staged.get(key) {
            Some(staged) => Ok(*staged),
            None => self.read_previous(key),
        }
    }

    /// The previous change of an item this batch has not changed, read from the journal.
    fn read_previous(&self, key: &[u8]) -> Result<Previous, rocksdb::Error> {
        let found = self.read_one(key, |record| put_of(record).map(Found::from))?;
        Ok(found.previous)
    }

    /// An item's previous change read from the journal: its record as `found_in` reads it, else
    /// its delete marker.
    fn read_one(
        &self,
        key: &[u8],
        found_in: impl Fn(&[u8]) -> Option<Found>,
    ) -> Result<Found, rocksdb::Error> {
        let reads = self.writer.reads();
        let record = self
            .writer
            .db
            .get_pinned_cf_opt(self.cf(CF_ITEMS), key, &reads)?;
        match record.and_then(|record| found_in(&record)) {
            Some(put) => Ok(put),
            None => Ok(Found::from(self.read_marker(key)?)),
        }
    }

    /// The delete an item's marker names, if the journal may hold markers and holds this one.
    fn read_marker(&self, key: &[u8]) -> Result<Previous, rocksdb::Error> {
        if !self.writer.markers.load(Ordering::Relaxed) {
            return Ok(Previous::None);
        }
        let reads = self.writer.reads();
        let marker = keys::deleted(key);
        let deleted = self
            .writer
            .db
            .get_pinned_cf_opt(self.cf(CF_DELETED), marker, &reads)?;
        Ok(delete_of(deleted.as_deref()))
    }

    /// The journal's previous change of each item of a write of several (by its key), for
    /// [`Stage::previous`]: one batched read of the records and one of the delete markers of those
    /// with none. RocksDB's batched `MultiGet` probes each table file's filter for all the keys at
    /// once, where one look-up per item probed every file's filter for each (a sixth of the
    /// writer's time under `_bulk`, which the writer bounds). `None` for an item this batch has
    /// changed already and for the second write of an item in the same write (the first stages
    /// it). Where `leaves(i, version)` says the `i`th write leaves the version its item was last
    /// written for, the found record's body comes along (see [`keep_retired_document`]), so
    /// nothing is read once staging has begun. An error when the journal cannot be read: the
    /// write is refused rather than journaled with a history it could not see.
    fn look_up(
        &self,
        keys: &[Vec<u8>],
        leaves: impl Fn(usize, u32) -> bool,
    ) -> Result<Vec<Option<Found>>, rocksdb::Error> {
        let found_in = |i: usize, record: &[u8]| {
            let previous = put_of(record)?;
            let body = match previous {
                Previous::Put {
                    revision, version, ..
                } if leaves(i, version) => record_body_at(record, revision),
                _ => None,
            };
            Some(Found { previous, body })
        };
        let mut found: Vec<Option<Found>> = vec![None; keys.len()];
        if let [key] = keys {
            if !self.staged.contains_key(key) {
                found[0] = Some(self.read_one(key, |record| found_in(0, record))?);
            }
            return Ok(found);
        }
        let mut order: Vec<usize> = (0..keys.len())
            .filter(|i| !self.staged.contains_key(&keys[*i]))
            .collect();
        order.sort_unstable_by(|a, b| keys[*a].cmp(&keys[*b]).then(a.cmp(b)));
        order.dedup_by(|later, first| keys[*later] == keys[*first]);
        let db = &self.writer.db;
        let items = order.iter().map(|i| &keys[*i]);
        let reads = self.writer.reads();
        let records = db.batched_multi_get_cf_opt(self.cf(CF_ITEMS), items, true, &reads);
        let mut unwritten = Vec::new();
        for (i, record) in order.into_iter().zip(records) {
            match record?.and_then(|record| found_in(i, &record)) {
                Some(put) => found[i] = Some(put),
                None => unwritten.push(i),
            }
        }
        if !self.writer.markers.load(Ordering::Relaxed) {
            for i in unwritten {
                found[i] = Some(Found::from(Previous::None));
            }
            return Ok(found);
        }
        // A marker's key is the item's behind one byte: in the same order.
        let markers: Vec<Vec<u8>> = unwritten.iter().map(|i| keys::deleted(&keys[*i])).collect();
        let deletes = db.batched_multi_get_cf_opt(self.cf(CF_DELETED), &markers, true, &reads);
        for (i, marker) in unwritten.into_iter().zip(deletes) {
            found[i] = Some(Found::from(delete_of(marker?.as_deref())));
        }
        Ok(found)
    }

    /// The text of the item record `previous` names: from this batch when it wrote it, else the
    /// body [`Stage::look_up`] brought along.
    fn previous_body(&self, previous: Previous, looked_up: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let Previous::Put {
            revision, staged, ..
        } = previous
        else {
            return None;
        };
        match staged {
            Some((start, length)) => {
                record_body_at(self.batch.data().get(start..start + length)?, revision)
            }
            None => looked_up,
        }
    }

    /// Moves a project's horizon up to `revision` (never down).
    fn raise_horizon(&mut self, project: &Ident, revision: u64) {
        let meta = self.cf(CF_META);
        // Read by `load_horizon` before a purge stages anything; a drop's horizon is its own
        // seq, past any there was.
        let current = self.load_horizon(project).unwrap_or(0);
        if revision > current {
            self.horizons.insert(project.clone(), revision);
            self.batch
                .put_cf(meta, keys::horizon(project), revision.to_be_bytes());
        }
    }

    /// A project's horizon, read once a batch. A read that fails is an error, never 0: a purge
    /// that took it for 0 could set the horizon below one already there, and followers under it
    /// would be served pages missing the deletes purged.
    fn load_horizon(&mut self, project: &Ident) -> Result<u64, rocksdb::Error> {
        if let Some(horizon) = self.horizons.get(project) {
            return Ok(*horizon);
        }
        let meta = self.cf(CF_META);
        let stored =
            self.writer
                .db
                .get_pinned_cf_opt(meta, keys::horizon(project), &self.writer.reads())?;
        let horizon = stored.and_then(|v| codec::record_revision(&v)).unwrap_or(0);
        self.horizons.insert(project.clone(), horizon);
        Ok(horizon)
    }

    fn all_projectors(&self) -> impl Iterator<Item = &'static str> + 'a {
        let writer: &'a Writer = self.writer;
        writer.projectors.iter().copied()
    }

    /// Writes an item's documents into their versions' keyspaces, when the journal keeps them. The
    /// document of `own`, the version the item was written for, is its record in this batch: the
    /// keyspace refers to it (`keyspace::RECORD`) rather than holding a second copy.
    fn keyspace_put<'d>(
        &mut self,
        project: &Ident,
        blueprint: &Ident,
        id: &uuid::Uuid,
        revision: u64,
        docs: impl Iterator<Item = (u32, &'d [u8])>,
        own: Option<u32>,
    ) {
        if !self.writer.keyspaces {
            return;
        }
        self.kept += 1;
        let cf = self.cf(keyspace::CF_KEYSPACES);
        for (version, doc) in docs {
            let key = keyspace::key(project, version, blueprint, id);
            if Some(version) == own {
                self.batch.put_cf(cf, key, keyspace::reference(revision));
            } else if task::is_absent(doc) {
                // Not in that version (a forced breaking freeze): a tombstone, as for a delete.
                self.batch.put_cf(cf, key, keyspace::value(revision, None));
            } else {
                self.batch
                    .put_cf(cf, key, keyspace::value(revision, Some(doc)));
            }
        }
    }

    /// Removes an item from its versions' keyspaces, when the journal keeps them. The tombstone
    /// keeps the delete's revision, as in a keyspace fed by tasks, so the two hold the same and a
    /// late task or a retried dead letter never brings the item back.
    fn keyspace_delete(
        &mut self,
        project: &Ident,
        blueprint: &Ident,
        id: &uuid::Uuid,
        revision: u64,
        versions: &[u32],
    ) {
        if !self.writer.keyspaces {
            return;
        }
        self.kept += 1;
        let cf = self.cf(keyspace::CF_KEYSPACES);
        for version in versions {
            self.batch.put_cf(
                cf,
                keyspace::key(project, *version, blueprint, id),
                keyspace::value(revision, None),
            );
        }
    }

    /// Whether `projector` is the local keyspaces this journal writes itself.
    fn is_inline(&self, projector: &str) -> bool {
        self.writer.keyspaces && projector == ProjectorKind::Rocksdb.name()
    }

    /// Records a fresh back-fill of `version` in the batch, and runs it once the batch is written.
    fn start_backfill(&mut self, project: &Ident, version: u32) {
        self.start_backfill_for(project, version, None);
    }

    /// Has every projector's dead letters counted again once this batch is written (it removes
    /// some: a drop, a retry). Done after the commit, whatever became of the request that asked.
    fn forget_dead_letter_counts(&mut self) {
        self.after.push(Box::new(|journal: &Arc<Journal>| {
            journal.forget_dead_letter_counts()
        }));
    }

    /// Like [`Stage::start_backfill`], into `projectors` only when given (a rebuild of their stores).
    fn start_backfill_for(
        &mut self,
        project: &Ident,
        version: u32,
        projectors: Option<Vec<String>>,
    ) {
        let born = self
            .writer
            .catalog
            .snapshot()
            .projects
            .get(project)
            .map(|p| p.working.born);
        let state = BackfillState {
            projectors,
            born,
            ..BackfillState::default()
        };
        let meta = self.cf(CF_META);
        self.batch.put_cf(
            meta,
            state.key(project, version),
            serde_json::to_vec(&state).expect("state serializes"),
        );
        let project = project.clone();
        self.after.push(Box::new(move |journal: &Arc<Journal>| {
            journal.spawn_backfill(project, version, state, super::backfill::Start::Fresh);
        }));
    }
}

impl Writer {
    pub fn new(
        db: Arc<DB>,
        catalog: Arc<Catalog>,
        projectors: Vec<(&'static str, Arc<AtomicU64>)>,
        keyspaces: bool,
        last_seq: Arc<AtomicU64>,
        durability: Durability,
    ) -> Writer {
        let deleted = db.cf_handle(CF_DELETED).expect("deleted cf");
        let markers = db
            .iterator_cf(deleted, rocksdb::IteratorMode::Start)
            .next()
            .is_some();
        let (projectors, pending) = projectors.into_iter().unzip();
        Writer {
            db,
            catalog,
            projectors,
            pending,
            keyspaces,
            last_seq,
            durability,
            markers: AtomicBool::new(markers),
            #[cfg(test)]
            disk_reads_fail: Arc::default(),
            #[cfg(test)]
            disk_writes_fail: Arc::default(),
            #[cfg(test)]
            stage_panics: Arc::default(),
            #[cfg(test)]
            unsynced_drops: Arc::default(),
        }
    }

    /// Writes a group's batch.
    fn commit(&self, batch: WriteBatch, options: &WriteOptions) -> Result<(), rocksdb::Error> {
        #[cfg(test)]
        if self.disk_writes_fail.load(Ordering::Relaxed) {
            // RocksDB refuses a synced write without its log: a write error, and nothing written.
            let mut failing = WriteOptions::default();
            failing.set_sync(true);
            failing.disable_wal(true);
            return self.db.write_opt(batch, &failing);
        }
        self.db.write_opt(batch, options)
    }

    /// How the writer reads the journal.
    fn reads(&self) -> rocksdb::ReadOptions {
        #[allow(unused_mut)]
        let mut reads = rocksdb::ReadOptions::default();
        #[cfg(test)]
        if self.disk_reads_fail.load(Ordering::Relaxed) {
            reads.set_read_tier(rocksdb::ReadTier::BlockCache);
        }
        reads
    }

    /// Whether the writer looks up the delete markers of items absent from `items`.
    #[cfg(test)]
    pub fn may_hold_markers(&self) -> bool {
        self.markers.load(Ordering::Relaxed)
    }

    /// Under buffered durability, writes [`keys::SEQ_RESERVED`] = `up_to`, synced (which syncs
    /// every batch before it too), before a batch hands out a seq past the last such mark: the
    /// batches after it may be lost with the machine, and the stores may have taken their tasks
    /// already, so the journal, opened at least at the mark, never numbers a later write below
    /// one they hold (they would ignore it as older). One synced write per [`SEQ_RESERVE`] seqs.
    fn reserve(&self, up_to: u64) -> Result<(), rocksdb::Error> {
        if self.durability == Durability::Sync {
            return Ok(());
        }
        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, keys::SEQ_RESERVED, up_to.to_be_bytes());
        self.commit(batch, &synced)
    }

    pub fn run(self, commands: Receiver<Command>, journal: Weak<Journal>) {
        let mut options = WriteOptions::default();
        options.set_sync(self.durability == Durability::Sync);
        // A drop's batch is synced whatever the durability: its catalog mark is cleared, synced,
        // once it is written, and a journal that lost the batch with the machine would still hold
        // the project the catalog forgot (a start refuses such a pair) and its drop tasks, which
        // nothing would queue again.
        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        // The size of the last batch: the next one starts with room for as much, so a large batch
        // is not built by growing and copying its buffer step by step.
        let mut room = 0;
        // The journal opened past every seq reserved before.
        let mut reserved = self.last_seq.load(Ordering::Acquire);
        // A clean stop reserves no more than was handed out: the next start goes on from there.
        let stop = |writer: &Writer| {
            if let Err(error) = writer.reserve(writer.last_seq.load(Ordering::Acquire)) {
                tracing::warn!(%error, "cannot sync the journal's sequence mark at shutdown");
            }
        };
        // A command that changes the catalog as it is staged, held for a batch of its own.
        let mut next: Option<Command> = None;
        loop {
            let first = match next.take() {
                Some(command) => command,
                None => match commands.recv() {
                    Ok(command) => command,
                    Err(_) => return,
                },
            };
            if matches!(first, Command::Shutdown) {
                stop(&self);
                return;
            }
            let mut stage = Stage {
                batch: WriteBatch::with_capacity_bytes(room),
                seq: self.last_seq.load(Ordering::Acquire),
                answers: Vec::new(),
                after: Vec::new(),
                backfills: Default::default(),
                queued: vec![0; self.projectors.len()],
                staged: HashMap::default(),
                dropped: Default::default(),
                horizons: HashMap::new(),
                touched: HashMap::new(),
                kept: 0,
                millis: chrono::Utc::now().timestamp_millis().max(0) as u64,
                families: FAMILIES
                    .map(|name| self.db.cf_handle(name).expect("column family exists")),
                writer: &self,
            };
            let alone = changes_catalog(&first);
            let mut staged = match alone {
                // A fault there is not caught: the catalog may be ahead of the batch.
                true => {
                    stage_command(&mut stage, first);
                    true
                }
                false => stage_caught(&mut stage, first),
            };
            let mut stopping = false;
            while !alone && staged && stage.answers.len() < 4096 {
                match commands.try_recv() {
                    Ok(Command::Shutdown) => {
                        stopping = true;
                        break;
                    }
                    Ok(command) if changes_catalog(&command) => {
                        next = Some(command);
                        break;
                    }
                    Ok(command) => staged = stage_caught(&mut stage, command),
                    Err(_) => break,
                }
            }
            if stage.answers.is_empty() && !stopping {
                continue;
            }
            let seq = stage.seq;
            let meta = stage.cf(CF_META);
            stage.batch.put_cf(meta, keys::LAST_SEQ, seq.to_be_bytes());
            let Stage {
                batch,
                answers,
                after,
                touched,
                dropped,
                queued,
                kept,
                ..
            } = stage;
            room = batch.size_in_bytes();
            for (pending, queued) in self.pending.iter().zip(&queued) {
                pending.fetch_add(*queued, Ordering::AcqRel);
            }
            let result = match (staged, seq >= reserved) {
                (false, _) => Err(Unwritten::Fault),
                (true, true) => self
                    .reserve(seq.saturating_add(SEQ_RESERVE))
                    .map_err(Unwritten::Storage)
                    .map(|()| reserved = seq.saturating_add(SEQ_RESERVE)),
                (true, false) => Ok(()),
            }
            .and_then(|()| {
                let sync = self.durability == Durability::Sync || !dropped.is_empty();
                #[cfg(test)]
                if !sync && !dropped.is_empty() {
                    self.unsynced_drops.fetch_add(1, Ordering::Relaxed);
                }
                let options = if sync { &synced } else { &options };
                self.commit(batch, options).map_err(Unwritten::Storage)
            });
            if result.is_err() {
                for (pending, queued) in self.pending.iter().zip(&queued) {
                    pending.fetch_sub(*queued, Ordering::AcqRel);
                }
            }
            if result.is_ok() {
                self.last_seq.store(seq, Ordering::Release);
                for project in &dropped {
                    if let Err(error) = self.catalog.drop_done(project, Some(seq)) {
                        // The next start finishes the drop again: harmless.
                        tracing::warn!(%error, %project, "cannot clear the mark of a written drop");
                    }
                }
            } else {
                tracing::error!(error = ?result, "journal batch write failed");
            }
            let journal = journal.upgrade();
            if let Some(journal) = &journal {
                journal.note_write(result.as_ref().err().map(ToString::to_string));
                if result.is_ok() {
                    journal.keyspace_writes.fetch_add(kept, Ordering::Relaxed);
                }
            }
            if let (Ok(()), Some(journal)) = (&result, &journal) {
                for start in after {
                    start(journal);
                }
            }
            // Followers and projectors are woken before the writers hear back: a client that
            // writes again at once does not overtake the wake-up of its last write.
            if let Some(journal) = &journal {
                if result.is_ok() {
                    for (project, revision) in &touched {
                        journal.signal.publish(project, *revision);
                    }
                }
                journal.wake_all();
            }
            for answer in answers {
                answer(result.as_ref().err());
            }
            if stopping {
                stop(&self);
                return;
            }
        }
    }
}

fn stage_command(stage: &mut Stage, command: Command) {
    match command {
        Command::Write {
            epoch,
            project,
            entries,
            reply,
        } => {
            #[cfg(test)]
            if stage.writer.stage_panics.swap(false, Ordering::Relaxed) {
                panic!("a fault staging a write");
            }
            let current = stage.writer.catalog.snapshot();
            if current.projects.get(&project).map(|p| p.epoch) != Some(epoch) {
                let _ = reply.send(Err(JournalError::Stale));
                return;
            }
            let keys: Vec<Vec<u8>> = entries.iter().map(|entry| entry.key(&project)).collect();
            // Whether the `i`th write leaves `version`, so that its keyspace must keep the item's
            // last state there (see `keep_retired_document`).
            let leaves = |i: usize, version: u32| match &entries[i] {
                Entry::Upsert { task, .. } => leaves_version(stage, task, version),
                Entry::Delete { .. } => false,
            };
            let looked_up = match stage.look_up(&keys, leaves) {
                Ok(looked_up) => looked_up,
                Err(error) => {
                    tracing::error!(%error, %project, "cannot read the items' previous changes; the write is refused");
                    let _ = reply.send(Err(JournalError::Storage(error)));
                    return;
                }
            };
            stage.staged.reserve(keys.len());
            let revisions = entries
                .into_iter()
                .zip(keys)
                .zip(looked_up)
                .map(|((entry, key), previous)| stage_entry(stage, &project, entry, key, previous))
                .collect();
            stage.answers.push(answer(reply, revisions));
        }
        Command::Freeze {
            project,
            forced,
            judged,
            reply,
        } => {
            let projectors: Vec<&str> = stage.all_projectors().collect();
            // The keyspaces the journal writes need no migration: a keyspace is a key prefix.
            let inline = [ProjectorKind::Rocksdb.name()];
            let done: &[&str] = if stage.writer.keyspaces { &inline } else { &[] };
            match stage.writer.catalog.freeze_judged(
                &project,
                &projectors,
                done,
                forced,
                judged.as_ref(),
            ) {
                Ok(version) => {
                    let migrate = TaskOp::Migrate {
                        version: version.number,
                    };
                    let seq = stage.task(None, &codec::task_body(&project, &migrate), projectors);
                    let meta = stage.cf(CF_META);
                    stage
                        .batch
                        .put_cf(meta, keys::frozen(&project), version.number.to_be_bytes());
                    // The back-fill starts in the same batch as the migration: a crash or a lost
                    // answer can never leave the version without the items written before it.
                    if version.number > 1 {
                        stage.start_backfill(&project, version.number);
                    }
                    stage.answers.push(answer(reply, (version, seq)));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
        Command::Migrate {
            project,
            version,
            projectors,
            reply,
        } => {
            let (inline, tasks): (Vec<String>, Vec<String>) =
                projectors.into_iter().partition(|p| stage.is_inline(p));
            for name in inline {
                let marked = stage.writer.catalog.set_migration(
                    &project,
                    version,
                    &name,
                    (MigrationState::Done, None),
                );
                if let Err(e) = marked {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
            let body = codec::task_body(&project, &TaskOp::Migrate { version });
            let seq = stage.task(None, &body, tasks.iter().map(String::as_str));
            stage.answers.push(answer(reply, seq));
        }
        Command::KeepKeyspaces { reply } => {
            let meta = stage.cf(CF_META);
            let kept = matches!(
                stage.writer.db.get_pinned_cf(meta, keys::KEYSPACES_KEPT),
                Ok(Some(_))
            );
            if stage.writer.keyspaces && !kept {
                let cf = stage.cf(keyspace::CF_KEYSPACES);
                let (from, to) = keyspace::ALL;
                stage.batch.delete_range_cf(cf, from, to);
                let snapshot = stage.writer.catalog.snapshot();
                let only = vec![ProjectorKind::Rocksdb.name().to_string()];
                for (name, project) in &snapshot.projects {
                    for version in project.live_versions() {
                        stage.start_backfill_for(name, version.number, Some(only.clone()));
                    }
                }
                stage.batch.put_cf(meta, keys::KEYSPACES_KEPT, []);
            }
            stage.answers.push(answer(reply, ()));
        }
        Command::StartBackfill {
            project,
            version,
            reply,
        } => {
            let key = keys::backfill(&project, version);
            let recorded = matches!(
                stage.writer.db.get_pinned_cf(stage.cf(CF_META), &key),
                Ok(Some(_))
            );
            if !recorded && stage.backfills.insert(key) {
                stage.start_backfill(&project, version);
            }
            stage.answers.push(answer(reply, ()));
        }
        Command::Rebuild {
            projectors,
            record: (key, value),
            reply,
        } => {
            let snapshot = stage.writer.catalog.snapshot();
            if !projectors.is_empty() {
                for (name, project) in &snapshot.projects {
                    for version in project.live_versions() {
                        let migrate = TaskOp::Migrate {
                            version: version.number,
                        };
                        let body = codec::task_body(name, &migrate);
                        stage.task(None, &body, projectors.iter().map(String::as_str));
                        stage.start_backfill_for(name, version.number, Some(projectors.clone()));
                    }
                }
            }
            let meta = stage.cf(CF_META);
            stage.batch.put_cf(meta, key, value);
            stage.answers.push(answer(reply, ()));
        }
        Command::DropProject {
            project,
            again,
            dead: letters,
            reply,
        } => {
            let catalog = &stage.writer.catalog;
            let forgotten = if again {
                // Still pending when its turn came (another request may have finished it since,
                // and the name been made again): else there is nothing to finish.
                match catalog.is_dropping(&project) {
                    Ok(true) if !catalog.snapshot().projects.contains_key(&project) => Ok(()),
                    Ok(_) => Err(crate::catalog::CatalogError::NotFound(format!(
                        "project {:?} does not exist",
                        project.as_str()
                    ))),
                    Err(e) => Err(e),
                }
            } else {
                catalog.delete_project(&project)
            };
            if let Err(e) = forgotten {
                let _ = reply.send(Err(e.into()));
                return;
            }
            // Its dead letters (see `Journal::dead_letters_of`), counted again once written.
            let dead = stage.cf(super::CF_DEAD);
            for key in letters {
                stage.batch.delete_cf(dead, key);
            }
            stage.forget_dead_letter_counts();
            let items = stage.cf(CF_ITEMS);
            stage.batch.delete_range_cf(
                items,
                keys::project_prefix(&project),
                keys::project_end(&project),
            );
            let meta = stage.cf(CF_META);
            let (from, to) = keys::backfill_range(&project);
            stage.batch.delete_range_cf(meta, from, to);
            stage.batch.delete_cf(meta, keys::frozen(&project));
            // The feed forgets the project's history: followers from before the drop start over.
            let changes = stage.cf(CF_CHANGES);
            stage.batch.delete_range_cf(
                changes,
                keys::project_prefix(&project),
                keys::project_end(&project),
            );
            let (from, to) = keys::tombstone_range(&project);
            stage.batch.delete_range_cf(changes, from, to);
            let (from, to) = keys::deleted_range(&project);
            stage.batch.delete_range_cf(stage.cf(CF_DELETED), from, to);
            if stage.writer.keyspaces {
                let (from, to) = keyspace::project_range(&project);
                let cf = stage.cf(keyspace::CF_KEYSPACES);
                stage.batch.delete_range_cf(cf, from, to);
            }
            let prefix = keys::project_prefix(&project);
            stage.staged.retain(|key, _| !key.starts_with(&prefix));
            stage.dropped.insert(project.clone());
            let body = codec::task_body(&project, &TaskOp::DropProject);
            let seq = stage.task(None, &body, stage.all_projectors());
            stage.raise_horizon(&project, seq);
            stage.touched.insert(project.clone(), seq);
            stage.answers.push(answer(reply, seq));
        }
        Command::Shutdown => {}
        Command::PurgeTombstones {
            before_millis,
            limit,
            from,
            reply,
        } => {
            let changes = stage.cf(CF_CHANGES);
            let mut purged = Vec::new();
            let mut resume = None;
            let mut tombstones = stage.writer.db.raw_iterator_cf(changes);
            tombstones.seek(from.as_deref().unwrap_or(&[keys::TOMBSTONE]));
            while let (Some(key), Some(value)) = (tombstones.key(), tombstones.value()) {
                if purged.len() >= limit {
                    resume = Some(key.to_vec());
                    break;
                }
                let millis = codec::record_revision(value).unwrap_or(0);
                if millis < before_millis {
                    purged.push(key.to_vec());
                    tombstones.next();
                    continue;
                }
                // A project's tombstones lie in revision order, so in the order they were
                // written: the rest of this project's are younger still. Only the old heads of
                // each project are walked, however many young tombstones wait behind them.
                match keys::split_tombstone(key) {
                    Some((project, _)) => tombstones.seek(keys::tombstone_range(&project).1),
                    None => tombstones.next(),
                }
            }
            drop(tombstones);
            // The horizons the purge moves are read before anything is staged: a purge whose
            // read fails purges nothing.
            for key in &purged {
                if let Some((project, _)) = keys::split_tombstone(key) {
                    if let Err(e) = stage.load_horizon(&project) {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                }
            }
            for key in &purged {
                stage.batch.delete_cf(changes, key);
                let Some((project, revision)) = keys::split_tombstone(key) else {
                    continue;
                };
                // The delete itself, and the deleted item's pointer to it.
                let change = keys::change(&project, revision);
                if let Ok(Some(value)) = stage.writer.db.get_pinned_cf(changes, &change) {
                    if let Ok((_, id, blueprint)) = codec::decode_change(&value) {
                        let item = keys::item(&project, &blueprint, &id);
                        if !stage.staged.contains_key(&item) {
                            stage
                                .batch
                                .delete_cf(stage.cf(CF_DELETED), keys::deleted(&item));
                        }
                    }
                }
                stage.batch.delete_cf(changes, change);
                stage.raise_horizon(&project, revision);
            }
            stage.answers.push(answer(reply, (purged.len(), resume)));
        }
        Command::Requeue { letters, reply } => {
            let mut count = 0;
            stage.forget_dead_letter_counts();
            let dead = stage.cf(super::CF_DEAD);
            for (key, letter) in letters {
                let Some(task) = &letter.task else {
                    continue;
                };
                // A letter gone since it was read stays gone: its project was dropped (retrying it
                // would bring the items back into a project made again), or it was retried already.
                let present = !stage.dropped.contains(&task.project)
                    && matches!(stage.writer.db.get_pinned_cf(dead, &key), Ok(Some(_)));
                // A drop's letter is an earlier project's once the name is made again: retried,
                // it would remove the new project from the store. It stays, for an operator.
                let snapshot = stage.writer.catalog.snapshot();
                let now = snapshot.projects.get(&task.project);
                let made_again = matches!(task.op, TaskOp::DropProject) && now.is_some();
                if !present || made_again {
                    continue;
                }
                // Any other letter of an earlier project of the name (one its drop did not find:
                // recorded while the drop was on its way) would bring its item into the new
                // project under a new seq: it goes, as the drop would have taken it.
                if now.is_some_and(|p| letter.seq <= p.working.born) {
                    stage.batch.delete_cf(dead, key);
                    continue;
                }
                count += 1;
                if superseded(stage, task) {
                    stage.batch.delete_cf(dead, key);
                    continue;
                }
                let revision = task.op.revision();
                if stage.is_inline(&letter.projector) {
                    requeue_into_keyspaces(stage, task);
                } else {
                    let body = codec::task_body(&task.project, &task.op);
                    stage.task(revision, &body, [letter.projector.as_str()]);
                }
                stage.batch.delete_cf(dead, key);
                // The item has no letter of this projector any more (see `Journal::settle`).
                if let Some(index) = keys::letter_of_item(&letter.projector, task) {
                    let meta = stage.cf(CF_META);
                    if let Ok(Some(noted)) = stage.writer.db.get_pinned_cf(meta, &index) {
                        if noted.get(..8) == Some(&letter.seq.to_be_bytes()[..]) {
                            stage.batch.delete_cf(meta, index);
                        }
                    }
                }
            }
            stage.answers.push(answer(reply, count));
        }
        Command::Backfill {
            project,
            version,
            items,
            state,
            reply,
        } => {
            let snapshot = stage.writer.catalog.snapshot();
            // The project it was started for: one made again since under the name has its own.
            let live = snapshot.projects.get(&project).is_some_and(|p| {
                p.version(version).is_some()
                    && !p.is_retired(version)
                    && state.born.is_none_or(|born| born == p.working.born)
            });
            if !live {
                let _ = reply.send(Ok(false));
                return;
            }
            // What this back-fill feeds: every store, or the ones a rebuild names.
            let (into_keyspaces, targets): (bool, Vec<&str>) = match &state.projectors {
                Some(only) => (
                    only.iter().any(|p| stage.is_inline(p)),
                    only.iter()
                        .map(String::as_str)
                        .filter(|p| !stage.is_inline(p))
                        .collect(),
                ),
                None => (true, stage.all_projectors().collect()),
            };
            let current = stage.cf(CF_ITEMS);
            // An item written or deleted since the chunk was read needs no back-fill: a write
            // already carried the new version, and a delete must not be followed by a late upsert.
            // Read before anything is staged: a read that fails fails the chunk (retried whole),
            // rather than skip an item the version would then never get.
            let mut unchanged = Vec::with_capacity(items.len());
            for item in &items {
                match stage.writer.db.get_pinned_cf(current, &item.key) {
                    Ok(value) => unchanged.push(value.is_some_and(|value| {
                        value.get(..8) == Some(&item.revision.to_be_bytes()[..])
                    })),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                }
            }
            for (item, unchanged) in items.into_iter().zip(unchanged) {
                // Written or deleted earlier in this batch: that change carried the new version.
                if !unchanged || stage.staged.contains_key(&item.key) {
                    continue;
                }
                if into_keyspaces {
                    let docs = item.task.docs();
                    stage.keyspace_put(
                        &project,
                        &item.blueprint,
                        &item.id,
                        item.revision,
                        docs,
                        None,
                    );
                }
                stage.task(
                    Some(item.revision),
                    &item.task.bytes,
                    targets.iter().copied(),
                );
            }
            let meta = stage.cf(CF_META);
            let key = state.key(&project, version);
            let state = serde_json::to_vec(&state).expect("state serializes");
            stage.batch.put_cf(meta, key, state);
            stage.answers.push(answer(reply, true));
        }
    }
}

/// Stages one item write (`key`: its item's key), with its previous change when
/// [`Stage::look_up`] read it; its revision is the seq of its task.
fn stage_entry(
    stage: &mut Stage,
    project: &Ident,
    entry: Entry,
    key: Vec<u8>,
    looked_up: Option<Found>,
) -> u64 {
    let items = stage.cf(CF_ITEMS);
    let (looked_up, body) = match looked_up {
        Some(Found { previous, body }) => (Some(previous), body),
        None => (None, None),
    };
    match entry {
        Entry::Upsert {
            blueprint,
            blueprint_uid,
            id,
            version,
            record,
            task,
        } => {
            let revision = stage.task(None, &task.bytes, stage.all_projectors());
            let previous = stage.previous(&key, looked_up);
            let retired = (previous, body);
            keep_retired_document(stage, project, &blueprint, &id, retired, &task);
            stage.keyspace_put(
                project,
                &blueprint,
                &id,
                revision,
                task.docs(),
                Some(version),
            );
            let value = codec::record_value(revision, version, blueprint_uid, &record);
            stage_change(
                stage,
                project,
                &key,
                revision,
                false,
                (&id, &blueprint),
                previous,
            );
            stage.batch.put_cf(items, &key, &value);
            let staged = Some((stage.batch.size_in_bytes() - value.len(), value.len()));
            stage.staged.insert(
                key,
                Previous::Put {
                    revision,
                    version,
                    staged,
                },
            );
            revision
        }
        Entry::Delete {
            blueprint,
            id,
            versions,
            task,
        } => {
            let revision = stage.task(None, &task, stage.all_projectors());
            let previous = stage.previous(&key, looked_up);
            stage.keyspace_delete(project, &blueprint, &id, revision, &versions);
            stage_change(
                stage,
                project,
                &key,
                revision,
                true,
                (&id, &blueprint),
                previous,
            );
            stage.batch.delete_cf(items, &key);
            stage.staged.insert(key, Previous::Delete(revision));
            revision
        }
    }
}

/// Whether a write of `task` leaves `version`, the one its item was last written for, in the
/// keyspaces: the version was retired since, so the write no longer carries it.
fn leaves_version(stage: &Stage, task: &codec::UpsertBody, version: u32) -> bool {
    stage.writer.keyspaces && !task.docs().any(|(v, _)| v == version)
}

/// The keyspace of the version an item was last written for refers to its record, which a new
/// write replaces. A write carries every live version, so it rewrites that reference too, unless
/// the version was retired since: then the reference becomes the document it named, which stays
/// that version's last state of the item. That record is in this batch or came with the look-up
/// (`looked_up`): nothing is read here, where an unreadable journal could no longer refuse the
/// write.
fn keep_retired_document(
    stage: &mut Stage,
    project: &Ident,
    blueprint: &Ident,
    id: &uuid::Uuid,
    (previous, looked_up): (Previous, Option<Vec<u8>>),
    task: &codec::UpsertBody,
) {
    let Previous::Put {
        revision, version, ..
    } = previous
    else {
        return;
    };
    if !leaves_version(stage, task, version) {
        return;
    }
    let Some(body) = stage.previous_body(previous, looked_up) else {
        tracing::error!(
            revision,
            "an item's last record was neither in the batch nor looked up"
        );
        return;
    };
    let cf = stage.cf(keyspace::CF_KEYSPACES);
    stage.batch.put_cf(
        cf,
        keyspace::key(project, version, blueprint, id),
        keyspace::value(revision, Some(&body)),
    );
}

/// Replaces the item's previous change in the feed's index by this one (a delete also gets a
/// tombstone, so it can be purged by age).
fn stage_change(
    stage: &mut Stage,
    project: &Ident,
    item_key: &[u8],
    revision: u64,
    delete: bool,
    (id, blueprint): (&uuid::Uuid, &Ident),
    previous: Previous,
) {
    let changes = stage.cf(CF_CHANGES);
    match previous {
        Previous::None => {}
        Previous::Put {
            revision: previous, ..
        } => stage
            .batch
            .delete_cf(changes, keys::change(project, previous)),
        Previous::Delete(previous) => {
            stage
                .batch
                .delete_cf(changes, keys::change(project, previous));
            stage
                .batch
                .delete_cf(changes, keys::tombstone(project, previous));
            stage
                .batch
                .delete_cf(stage.cf(CF_DELETED), keys::deleted(item_key));
        }
    }
    stage.batch.put_cf(
        changes,
        keys::change(project, revision),
        codec::change_value(delete, stage.millis, id, blueprint),
    );
    if delete {
        stage.writer.markers.store(true, Ordering::Relaxed);
        stage.batch.put_cf(
            changes,
            keys::tombstone(project, revision),
            stage.millis.to_be_bytes(),
        );
        stage.batch.put_cf(
            stage.cf(CF_DELETED),
            keys::deleted(item_key),
            revision.to_be_bytes(),
        );
    }
    match stage.touched.get_mut(project) {
        Some(touched) => *touched = (*touched).max(revision),
        None => {
            stage.touched.insert(project.clone(), revision);
        }
    }
}

/// Whether a write's dead letter is settled by a newer change of its item (written again, or
/// deleted), which reached or reaches the store with a task of its own. Queued again it would
/// bring back what that change replaced wherever the store no longer remembers it: Elasticsearch
/// forgets a delete's version after `index.gc_deletes`, and a deleted row leaves nothing in
/// PostgreSQL to compare with. So it goes, counted as retried, without being sent. An item that
/// cannot be read is taken as not superseded: the letter is sent, as before.
fn superseded(stage: &Stage, task: &super::task::Task) -> bool {
    let Some((blueprint, id)) = task.op.item() else {
        return false;
    };
    let Ok(latest) = stage.latest(&keys::item(&task.project, blueprint, id)) else {
        return false;
    };
    // Deleted (its marker perhaps purged since) is not there.
    let now = match latest {
        Previous::Put { revision, .. } => Some(revision),
        Previous::Delete(_) | Previous::None => None,
    };
    task.op.superseded_by(now)
}

/// Applies a dead letter of the local keyspaces in the batch (one [`superseded`] let through),
/// unless the keyspace holds a newer change.
fn requeue_into_keyspaces(stage: &mut Stage, task: &super::task::Task) {
    match &task.op {
        TaskOp::Migrate { version } => {
            let name = ProjectorKind::Rocksdb.name();
            let catalog = &stage.writer.catalog;
            // The version may be gone since; then there is nothing to mark.
            let done = (MigrationState::Done, Some(task.seq));
            let _ = catalog.set_migration(&task.project, *version, name, done);
            return;
        }
        // The project was dropped, its keyspaces with it; it may exist again by now.
        TaskOp::DropProject => return,
        TaskOp::Upsert { .. } | TaskOp::Delete { .. } => {}
    }
    let cf = stage.cf(keyspace::CF_KEYSPACES);
    for write in task.version_writes() {
        let key = keyspace::key(&task.project, write.version, write.blueprint, &write.id);
        let stored = match stage.writer.db.get_pinned_cf(cf, &key) {
            Ok(value) => value.and_then(|v| codec::record_revision(&v)).unwrap_or(0),
            Err(_) => continue,
        };
        if write.revision <= stored {
            continue;
        }
        let doc = write.doc.map(|d| d.get().as_bytes());
        stage
            .batch
            .put_cf(cf, key, keyspace::value(write.revision, doc));
    }
}
