//! The RocksDB projector: a keyspace per project version holding each item as that version sees it.
//!
//! Keys are `project \0 version(u32 BE) \0 blueprint \0 id(16 bytes)`; values are the revision (u64 BE),
//! a kind byte ([`TOMBSTONE`], [`DOCUMENT`], [`RECORD`]) and, for a document, its JSON text.
//!
//! The keyspaces live in one of two places:
//! - **In the journal** (the embedded default, no broker): the column family [`CF_KEYSPACES`] of the
//!   journal's own database, written by the journal's writer thread in the batch that accepts the
//!   write (`journal/writer.rs`). Batches are written in revision order, so a write needs no read
//!   and there is no task, acknowledgement or second fsync; back-fills and retried dead letters are
//!   checked against the item's latest change there. This projector then only reads. The document
//!   of the version an item was written for is the item's record in the journal, byte for byte:
//!   the writer stores it once, and the keyspace holds a [`RECORD`] reference to it. The record
//!   changes only with a newer write of the item, which rewrites or removes the reference in the
//!   same batch (a write whose versions no longer include the referenced one, which was retired
//!   since, first turns the reference into the document); reads and moves out of the journal
//!   resolve it.
//! - **In a database of their own** (`keyspaces/`): when a broker carries the tasks, or a
//!   `dstore worker` keeps them. Tasks arrive as for any store, possibly late or twice, so a write
//!   older than what is stored — a late back-fill, a redelivered task — is left out.
//!
//! In both, a delete leaves a tombstone holding its revision, so the item never comes back from
//! something older, and the keyspaces move between the two places unchanged, references resolved
//! (`journal/import.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde_json::Value;
use uuid::Uuid;

use super::{Health, Outcome, Projector, ProjectorError, ProjectorKind};
use crate::blueprint::Ident;
use crate::catalog::{Snapshot, Version};
use crate::journal::task::{Doc, Task};

type DbSnapshot<'a> = rocksdb::SnapshotWithThreadMode<'a, DB>;

/// The journal's column family that holds the keyspaces written in the journal's own batch.
pub const CF_KEYSPACES: &str = "keyspaces";

/// Kinds of stored value (the byte after the revision): a delete's tombstone, a document.
pub const TOMBSTONE: u8 = 0;
pub const DOCUMENT: u8 = 1;
/// In the journal only: the document is the text of the item's record in the journal
/// (`journal::CF_ITEMS`) at this revision.
pub const RECORD: u8 = 2;

/// The column family of a database of its own.
const CF_OWN: &str = "default";

pub struct RocksProjector {
    db: Arc<DB>,
    /// The column family holding the keyspaces: [`CF_KEYSPACES`] in the journal, else the default.
    family: &'static str,
}

/// An item's key in its version's keyspace.
pub fn key(project: &Ident, version: u32, blueprint: &Ident, id: &Uuid) -> Vec<u8> {
    let mut key = Vec::with_capacity(project.as_str().len() + blueprint.as_str().len() + 23);
    key.extend_from_slice(project.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key.push(0);
    key.extend_from_slice(blueprint.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

/// The range of every key of every keyspace: keys start with a project name, never 0 or 0xff.
pub const ALL: (&[u8], &[u8]) = (&[0], &[0xff]);

/// The keys of every keyspace of a project.
pub fn project_range(project: &Ident) -> (Vec<u8>, Vec<u8>) {
    let mut from = project.as_str().as_bytes().to_vec();
    let mut to = from.clone();
    from.push(0);
    to.push(1);
    (from, to)
}

/// The stored value: the task's document text as it is, never decoded here; `None` is a tombstone.
pub fn value(revision: u64, doc: Option<&[u8]>) -> Vec<u8> {
    let text = doc.unwrap_or_default();
    let mut value = Vec::with_capacity(9 + text.len());
    value.extend_from_slice(&revision.to_be_bytes());
    value.push(if doc.is_some() { DOCUMENT } else { TOMBSTONE });
    value.extend_from_slice(text);
    value
}

/// The stored value whose document is the item's record in the journal at `revision`.
pub fn reference(revision: u64) -> [u8; 9] {
    let mut value = [RECORD; 9];
    value[..8].copy_from_slice(&revision.to_be_bytes());
    value
}

/// The journal's item key of a keyspace [`key`]: its project, blueprint and id.
fn item_key(key: &[u8]) -> Option<Vec<u8>> {
    let project = key.iter().position(|b| *b == 0)?;
    let id = key.len().checked_sub(16)?;
    // `project \0 version(4) \0 blueprint \0 id(16)`
    let blueprint = key.get(project + 6..id.checked_sub(1)?)?;
    Some(crate::journal::keys::item_of(
        &key[..project],
        blueprint,
        &key[id..],
    ))
}

fn encode(revision: u64, doc: Option<&Doc>) -> Vec<u8> {
    value(revision, doc.map(|d| d.get().as_bytes()))
}

fn stored_revision(value: &[u8]) -> u64 {
    value
        .get(..8)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

impl RocksProjector {
    pub fn open(path: &Path) -> Result<RocksProjector, rocksdb::Error> {
        // Memory: memtables and table blocks count in the process's one budget (`crate::rocks`).
        let mut options = crate::rocks::db_options();
        // The revision guard reads every key before writing it, and new items are absent: bloom
        // filters (in the memtable and in every table file) answer "absent" without a search.
        crate::rocks::family(&mut options, |tables| tables.set_bloom_filter(10.0, false));
        options.create_if_missing(true);
        options.set_memtable_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.1);
        crate::rocks::keyed_by_item(&mut options);
        let family = rocksdb::ColumnFamilyDescriptor::new(CF_OWN, options.clone());
        Ok(RocksProjector {
            db: Arc::new(DB::open_cf_descriptors(&options, path, [family])?),
            family: CF_OWN,
        })
    }

    /// Rewrites, in the background, the table files of a database of their own made before
    /// indexes and filters were partitioned (`crate::rocks::partition_old_tables`). Only for the
    /// database a process serves from: the rewrite holds it open while it runs.
    pub fn rewrite_old_tables(&self) -> Result<(), rocksdb::Error> {
        if self.is_in_journal() {
            return Ok(());
        }
        crate::rocks::partition_old_tables(&self.db, &[CF_OWN], rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
    }

    /// The keyspaces the journal `db` keeps in its own batches (see the module's doc).
    pub fn in_journal(db: Arc<DB>) -> RocksProjector {
        RocksProjector {
            db,
            family: CF_KEYSPACES,
        }
    }

    /// Opens, for reading, the keyspaces kept in the journal at `path` when no process has it open
    /// (tests, tools).
    pub fn open_journal(path: &Path) -> Result<RocksProjector, rocksdb::Error> {
        let options = rocksdb::Options::default();
        let families = DB::list_cf(&options, path)?;
        let db = DB::open_cf(&options, path, families)?;
        Ok(RocksProjector::in_journal(Arc::new(db)))
    }

    fn cf(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(self.family)
            .expect("the keyspaces' column family exists")
    }

    /// Whether the keyspaces are written by the journal's writer thread, not by tasks.
    pub fn is_in_journal(&self) -> bool {
        self.family == CF_KEYSPACES
    }

    /// An item as stored for one version; `None` when absent or deleted.
    pub fn get(
        &self,
        project: &Ident,
        version: u32,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Option<Value> {
        let key = key(project, version, blueprint, id);
        // One snapshot: a reference and the record it names are read as of the same batch.
        let snapshot = self.db.snapshot();
        let value = snapshot.get_pinned_cf(self.cf(), &key).ok()??;
        let doc = match value.get(8) {
            Some(&DOCUMENT) => Cow::Borrowed(&value[9..]),
            Some(&RECORD) => {
                Cow::Owned(self.record(Some(&snapshot), &key, stored_revision(&value))?)
            }
            _ => return None,
        };
        serde_json::from_slice(&doc).ok()
    }

    /// The text of the journal's record of the item under `key` at `revision` (as of `snapshot`).
    fn record(&self, snapshot: Option<&DbSnapshot>, key: &[u8], revision: u64) -> Option<Vec<u8>> {
        let items = self.db.cf_handle(crate::journal::CF_ITEMS)?;
        let key = item_key(key)?;
        let value = match snapshot {
            Some(snapshot) => snapshot.get_pinned_cf(items, key),
            None => self.db.get_pinned_cf(items, key),
        };
        let value = value.ok().flatten();
        match value
            .as_deref()
            .and_then(crate::journal::codec::record_body)
        {
            Some((at, body)) if at == revision => Some(body.to_vec()),
            _ => {
                // The writer keeps the reference and the record together; this is a bug.
                tracing::error!(revision, "a keyspace document's journal record is missing");
                None
            }
        }
    }

    /// How many live items a version holds for a blueprint.
    pub fn count(&self, project: &Ident, version: u32, blueprint: &Ident) -> usize {
        let mut prefix = key(project, version, blueprint, &Uuid::nil());
        prefix.truncate(prefix.len() - 16);
        self.db
            .prefix_iterator_cf(self.cf(), &prefix)
            .map_while(Result::ok)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, v)| matches!(v.get(8), Some(&DOCUMENT | &RECORD)))
            .count()
    }

    /// Writes durably before the journal lets go of the tasks; the fsync runs off the async threads.
    async fn write(&self, batch: WriteBatch) -> Result<(), ProjectorError> {
        if self.is_in_journal() {
            return Err(ProjectorError::transient(
                "the keyspaces in the journal are written by the journal's writer thread",
            ));
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut options = WriteOptions::default();
            options.set_sync(true);
            db.write_opt(batch, &options)
        })
        .await
        .map_err(|e| ProjectorError::transient(format!("rocksdb keyspace write stopped: {e}")))?
        .map_err(|e| ProjectorError::transient(format!("rocksdb keyspace write failed: {e}")))
    }
}

#[async_trait]
impl Projector for RocksProjector {
    fn name(&self) -> &'static str {
        ProjectorKind::Rocksdb.name()
    }

    async fn migrate(&self, _: &Ident, _: &Version, _: &[u32]) -> Result<(), ProjectorError> {
        // A keyspace is a key prefix: it exists as soon as something is written into it.
        Ok(())
    }

    async fn apply(
        &self,
        _snapshot: &Snapshot,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        let batch = self
            .stage(tasks)
            .map_err(|e| ProjectorError::transient(format!("rocksdb read failed: {e}")))?;
        self.write(batch).await?;
        Ok(tasks.iter().map(|_| Ok(())).collect())
    }

    async fn drop_project(&self, project: &Ident) -> Result<(), ProjectorError> {
        let mut batch = WriteBatch::default();
        self.drop_range(project, &mut batch);
        self.write(batch).await
    }

    async fn read(
        &self,
        project: &Ident,
        version: u32,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Value>, ProjectorError> {
        Ok(self.get(project, version, blueprint, id))
    }

    fn preview(&self, project: &Ident, version: &Version) -> Value {
        serde_json::json!({
            "keyspace": format!("{project} version {}", version.number),
            "blueprints": version.blueprints.keys().collect::<Vec<_>>(),
        })
    }

    async fn health(&self) -> Health {
        Health {
            reachable: true,
            detail: "embedded".into(),
        }
    }
}

/// A stored key and its value.
pub(crate) type Stored = (Box<[u8]>, Box<[u8]>);

/// One keyspace write: a document, or a tombstone when `doc` is `None`.
type Write<'a> = (Vec<u8>, u64, Option<&'a Doc>);

impl RocksProjector {
    /// Every stored (key, value), in key order, each document in the value itself (a reference to
    /// the journal's record resolved). A read that fails is given, never taken for the end: what
    /// moves the entries deletes their source after.
    pub(crate) fn entries(&self) -> impl Iterator<Item = Result<Stored, rocksdb::Error>> + '_ {
        // Entries are moved at start, before the journal takes writes: the records stay put.
        self.db
            .iterator_cf(self.cf(), rocksdb::IteratorMode::Start)
            .filter_map(|entry| {
                let (key, stored) = match entry {
                    Ok(entry) => entry,
                    Err(error) => return Some(Err(error)),
                };
                if stored.get(8) != Some(&RECORD) {
                    return Some(Ok((key, stored)));
                }
                let doc = self.record(None, &key, stored_revision(&stored))?;
                let value = value(stored_revision(&stored), Some(&doc)).into_boxed_slice();
                Some(Ok((key, value)))
            })
    }

    /// Adds to `batch` the stored values of another keyspace database that are newer than what
    /// this one holds for the same keys.
    pub(crate) fn merge(
        &self,
        entries: &[Stored],
        batch: &mut WriteBatch,
    ) -> Result<(), rocksdb::Error> {
        let cf = self.cf();
        let stored = self.db.multi_get_cf(entries.iter().map(|(k, _)| (cf, k)));
        for ((key, value), current) in entries.iter().zip(stored) {
            if stored_revision(value) > current?.as_deref().map_or(0, stored_revision) {
                batch.put_cf(cf, key, value);
            }
        }
        Ok(())
    }

    /// Writes `batch` at once, synced unless the keyspaces are the journal's (whose own later
    /// writes cannot outlive it).
    pub(crate) fn write_now(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut options = WriteOptions::default();
        options.set_sync(!self.is_in_journal());
        self.db.write_opt(batch, &options)
    }

    /// Adds to `batch` the removal of every keyspace.
    pub(crate) fn clear(&self, batch: &mut WriteBatch) {
        let (from, to) = ALL;
        batch.delete_range_cf(self.cf(), from, to);
    }

    /// Adds to `batch` the removal of every keyspace of `project`.
    pub(crate) fn drop_range(&self, project: &Ident, batch: &mut WriteBatch) {
        let (from, to) = project_range(project);
        batch.delete_range_cf(self.cf(), from, to);
    }

    /// The batch that applies `tasks`: only writes newer than what the keyspace holds.
    pub(crate) fn stage(&self, tasks: &[Task]) -> Result<WriteBatch, rocksdb::Error> {
        // Every (key, revision, document) the batch wants written, in task order.
        let writes: Vec<Write> = tasks
            .iter()
            .flat_map(|task| {
                task.version_writes().map(|w| {
                    (
                        key(&task.project, w.version, w.blueprint, &w.id),
                        w.revision,
                        w.doc,
                    )
                })
            })
            .collect();
        let cf = self.cf();
        let stored = self.db.multi_get_cf(writes.iter().map(|(k, _, _)| (cf, k)));
        let mut newest: HashMap<&[u8], u64> = HashMap::with_capacity(writes.len());
        for ((key, _, _), value) in writes.iter().zip(stored) {
            newest.insert(key, value?.as_deref().map_or(0, stored_revision));
        }
        let mut batch = WriteBatch::default();
        for (key, revision, doc) in &writes {
            let current = newest.get_mut(key.as_slice()).expect("every key was read");
            if *revision > *current {
                *current = *revision;
                batch.put_cf(cf, key, encode(*revision, *doc));
            }
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keyspace database damaged on disk gives its read error to what moves its entries (and
    /// removes their source after), never a silent end that would move a part of them.
    #[test]
    fn a_damaged_table_gives_its_read_error_rather_than_ending_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyspaces");
        let (project, blueprint) = (Ident::parse("p").unwrap(), Ident::parse("b").unwrap());
        {
            let own = RocksProjector::open(&path).unwrap();
            let doc = format!("{{\"title\":\"{}\"}}", "x".repeat(200));
            for _ in 0..2000 {
                let key = key(&project, 1, &blueprint, &Uuid::new_v4());
                let stored = value(1, Some(doc.as_bytes()));
                own.db.put_cf(own.cf(), key, stored).unwrap();
            }
            // Not read before it is damaged: the process's block cache would answer from memory.
            own.db.flush_cf(own.cf()).unwrap();
        }
        let tables: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|file| file.extension() == Some("sst".as_ref()))
            .collect();
        assert!(!tables.is_empty());
        for table in &tables {
            let mut bytes = std::fs::read(table).unwrap();
            let at = bytes.len() / 3;
            for byte in &mut bytes[at..at + 64] {
                *byte ^= 0xff;
            }
            std::fs::write(table, bytes).unwrap();
        }
        let own = RocksProjector::open(&path).unwrap();
        let read: Vec<_> = own.entries().collect();
        assert!(
            read.iter().any(Result::is_err),
            "{} entries read, none failed",
            read.len()
        );
    }
}
