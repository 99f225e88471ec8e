//! Reading the journal: an item's latest accepted state, a project's items in key order, and its
//! change feed (the latest change of each item by revision).
//!
//! Reads go straight to RocksDB, beside the writer thread: the writer commits each group in one
//! batch, so a read sees a write whole or not at all, and a page of changes is read from one
//! snapshot so every change in it matches the item record it names.

use rocksdb::IteratorMode;
use tokio::sync::watch;
use uuid::Uuid;

use super::{codec, keys, ItemRecord, Journal, JournalError, CF_CHANGES, CF_ITEMS, CF_META};
use crate::blueprint::Ident;

impl Journal {
    /// The latest accepted state of an item, if it exists.
    pub async fn item(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<ItemRecord>, JournalError> {
        match self.item_bytes(project, blueprint, id)? {
            Some(bytes) => Ok(Some(codec::decode_record_aside(bytes).await?)),
            None => Ok(None),
        }
    }

    /// An item's record as stored (`codec::record_value`), not decoded.
    pub fn item_bytes(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Vec<u8>>, JournalError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_ITEMS), keys::item(project, blueprint, id))?)
    }

    /// The blueprint uid an item was stored with, if it exists, without decoding the item.
    pub fn item_blueprint_uid(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<u64>, JournalError> {
        self.db
            .get_pinned_cf(self.cf(CF_ITEMS), keys::item(project, blueprint, id))?
            .map(|bytes| codec::record_blueprint_uid(&bytes))
            .transpose()
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
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(keys::project_end(project));
        let start = after
            .clone()
            .unwrap_or_else(|| keys::project_prefix(project));
        let mut items = Vec::new();
        let mut last = None;
        let mut bytes = 0;
        for entry in self.db.iterator_cf_opt(
            self.cf(CF_ITEMS),
            options,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (key, value) = entry?;
            if after.as_deref() == Some(&key[..]) {
                continue;
            }
            if items.len() >= limit || bytes >= crate::storage::SCAN_BYTES {
                return Ok((items, last));
            }
            bytes += value.len();
            let name = keys::split_item(&key).map_or(&[][..], |(_, blueprint, _)| blueprint);
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
        max_bytes: usize,
    ) -> Result<crate::feed::ChangesPage, JournalError> {
        // What the writer has published: a batch is readable a moment before `last_seq` says so,
        // and a page that gave a revision past it would have the follower's next request refused
        // as coming from another history (`http::changes`, `ahead`).
        let published = self.last_seq();
        let snapshot = self.db.snapshot();
        let horizon = snapshot
            .get_cf(self.cf(CF_META), keys::horizon(project))?
            .and_then(|v| codec::record_revision(&v))
            .unwrap_or(0);
        // A `since` among the revisions a crash lost: the follower holds changes that never
        // were, which only a read from 0 replaces. The page answers a horizon past them, so
        // it is refused as compacted. The mark itself was never handed out (the first
        // revision handed out is past it): it is where `since=now` stands after the start.
        let horizon = match self
            .lost
            .iter()
            .find(|(from, to)| since > *from && since < *to)
        {
            Some((_, to)) => horizon.max(*to),
            None => horizon,
        };
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(keys::project_end(project));
        let start = keys::change(project, since.saturating_add(1));
        let mut changes = Vec::new();
        let mut bytes = 0;
        for entry in snapshot.iterator_cf_opt(
            self.cf(CF_CHANGES),
            options,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            if changes.len() >= limit || bytes >= max_bytes {
                break;
            }
            let (key, value) = entry?;
            let revision = keys::task_seq(&key);
            if revision > published {
                break;
            }
            let (delete, id, blueprint) = codec::decode_change(&value)?;
            let record = if delete {
                None
            } else {
                let item = snapshot
                    .get_cf(self.cf(CF_ITEMS), keys::item(project, &blueprint, &id))?
                    .map(|v| codec::decode_record(&v))
                    .transpose()?;
                // The index and the items are written in one batch and read from one snapshot;
                // an entry whose item moved on is passed over, and counts nothing (a page of
                // such entries alone would be full and never move).
                match item {
                    Some(record) if record.revision == revision => {
                        bytes += crate::feed::decoded_size(&record.body);
                        Some(record)
                    }
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
        Ok(crate::feed::ChangesPage {
            changes,
            horizon,
            head: published,
            bytes,
            cut: false,
        })
    }

    /// A receiver woken whenever `project` commits item changes.
    pub fn follow(&self, project: &Ident) -> watch::Receiver<u64> {
        self.signal.subscribe(project)
    }

    /// Wakes the followers of `project` (see `feed::signal`).
    pub fn nudge(&self, project: &Ident) {
        self.signal.nudge(project);
    }
}
