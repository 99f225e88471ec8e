//! The journal as a broker relay sees it: each projector's outbox (its pending tasks above the
//! relay's cursor), the cursor itself, and consistent views for publishing tasks again.
//!
//! Publishing again is only safe as a whole tail: if the relay re-sent a `DropProject` but not the
//! writes that followed it (because they were applied and acknowledged meanwhile), a consumer would
//! apply the drop after them and wipe them. An [`OutboxView`] reads every projector's pending tasks as
//! they were at one instant, so what it re-sends is always every task still pending then, in order.

use rocksdb::{IteratorMode, SnapshotWithThreadMode, DB};

use super::{keys, Journal, JournalError, RawTask, CF_META, CF_TASKS};

const JOURNAL_ID: &[u8] = b"journal_id";

/// The journal's id, made and stored the first time the journal is opened.
pub(super) fn journal_id(db: &DB) -> Result<String, JournalError> {
    let meta = db.cf_handle(CF_META).expect("meta cf");
    if let Some(id) = db.get_cf(meta, JOURNAL_ID)? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let id = uuid::Uuid::new_v4().to_string();
    // Synced: the catalog records the id (synced) as its journal's, and a journal that lost it
    // with the machine would make another, which no start could pair with the catalog again.
    let mut synced = rocksdb::WriteOptions::default();
    synced.set_sync(true);
    db.put_cf_opt(meta, JOURNAL_ID, id.as_bytes(), &synced)?;
    Ok(id)
}

/// Every projector's pending tasks as they were when the view was taken, up to `until`.
pub struct OutboxView<'a> {
    journal: &'a Journal,
    snapshot: SnapshotWithThreadMode<'a, DB>,
    /// The newest seq the view holds: later tasks were never published before.
    pub until: u64,
}

impl OutboxView<'_> {
    /// Up to `limit` of a projector's tasks in the view with a seq above `after`, oldest first.
    pub fn read(
        &self,
        projector: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RawTask>, JournalError> {
        let options = keys::task_range(projector, after.saturating_add(1), self.until);
        let tasks = self.journal.cf(CF_TASKS);
        collect(
            self.snapshot
                .iterator_cf_opt(tasks, options, IteratorMode::Start),
            limit,
        )
    }
}

impl Journal {
    /// A consistent view of every outbox, for publishing again what a broker may have seen before.
    pub fn outbox_view(&self) -> OutboxView<'_> {
        // Read before the snapshot: every task up to it is committed, so the view holds it.
        let until = self.last_seq();
        OutboxView {
            journal: self,
            snapshot: self.db.snapshot(),
            until,
        }
    }

    /// Up to `limit` raw pending tasks of a projector with a seq above `after`, oldest first. Values
    /// are in the task format of [`super::decode_task`].
    pub fn outbox(
        &self,
        projector: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RawTask>, JournalError> {
        let options = keys::task_range(projector, after.saturating_add(1), u64::MAX - 1);
        collect(
            self.db
                .iterator_cf_opt(self.cf(CF_TASKS), options, IteratorMode::Start),
            limit,
        )
    }

    /// A projector's oldest pending task, found from its lane's floor rather than from the first
    /// seq: what lies below the floor is only the deleted entries of tasks long applied.
    pub fn oldest_pending(&self, projector: &str) -> Result<Option<RawTask>, JournalError> {
        Ok(collect(self.scan_tasks(projector), 1)?.pop())
    }

    /// The last seq a broker confirmed for a projector: tasks up to it have left the outbox.
    pub fn published(&self, projector: &str) -> Result<u64, JournalError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META), keys::published(projector))?
            .and_then(|bytes| bytes.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Records that the broker confirmed every task of a projector up to `seq`. Not synced: a
    /// cursor lost in a crash only makes the relay publish those tasks again, which is harmless.
    pub fn mark_published(&self, projector: &str, seq: u64) -> Result<(), JournalError> {
        self.db.put_cf(
            self.cf(CF_META),
            keys::published(projector),
            seq.to_be_bytes(),
        )?;
        Ok(())
    }
}

/// Up to `limit` tasks, ending early after [`super::BATCH_BYTES`] (one at least): a task holds an
/// item for every live version, so a thousand large ones would be gigabytes read at once.
fn collect(
    entries: impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
    limit: usize,
) -> Result<Vec<RawTask>, JournalError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for entry in entries.take(limit) {
        let (key, value) = entry?;
        bytes += value.len();
        out.push((keys::task_seq(&key), value));
        if bytes >= super::BATCH_BYTES {
            break;
        }
    }
    Ok(out)
}
