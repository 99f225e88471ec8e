//! One-time rewrites of a journal made by an older dstore, run at start before the writer thread:
//! the change feed's index built from the stored items, and the deleted items' markers moved to
//! their own family. Each is flagged in `meta` when done, so it runs once, and one interrupted
//! midway runs again whole at the next start.

use rocksdb::{IteratorMode, WriteBatch, DB};
use uuid::Uuid;

use super::{codec, keys, JournalError, CF_CHANGES, CF_DELETED, CF_ITEMS, CF_META};
use crate::blueprint::Ident;

/// Builds the change feed's index of a journal made before it had one: one put per stored item, at
/// the item's revision. Runs once, before the writer starts.
pub(super) fn index_changes(db: &DB) -> Result<(), JournalError> {
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
        let Some((project, blueprint, id)) = keys::split_item(&key) else {
            continue;
        };
        let (Ok(project), Ok(blueprint), Ok(id), Some(revision)) = (
            Ident::parse(&String::from_utf8_lossy(project)),
            Ident::parse(&String::from_utf8_lossy(blueprint)),
            Uuid::from_slice(id),
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
pub(super) fn move_deleted(db: &DB) -> Result<(), JournalError> {
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
