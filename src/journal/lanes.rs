//! Each projector's lane through the journal: its pending tasks in seq order, their
//! acknowledgement (applied tasks removed, refused ones moved to the dead letters, in one batch),
//! its progress, the waits on it, and the dead letters queued again.
//!
//! A lane's floor only rises: no task of the projector below it is pending, so scans start there
//! and never wade through the deletion markers of acknowledged tasks. `applied` is the seq through
//! which the projector has settled every task; `acks` moves on every acknowledgement, so a waiter
//! can see its own task settled while an older one of a held project keeps `applied` back.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use std::time::Duration;

use rocksdb::{IteratorMode, WriteBatch};
use serde::Deserialize;

use super::task::Task;
use super::writer::Command;
use super::{
    codec, decode, keys, DeadLetter, Journal, JournalError, KeyValue, Lane, LetterFilter, Pending,
    ProjectorProgress, BATCH_BYTES, CF_DEAD, CF_META, CF_TASKS,
};
use crate::blueprint::Ident;

/// How many tasks of `projector` are pending, read key by key (at start, before the writer runs).
pub(super) fn count_tasks(db: &rocksdb::DB, projector: &str) -> Result<u64, JournalError> {
    let family = db.cf_handle(CF_TASKS).expect("tasks cf");
    let mut tasks = db.raw_iterator_cf_opt(family, keys::task_range(projector, 0, u64::MAX - 1));
    tasks.seek_to_first();
    let mut count = 0;
    while tasks.valid() {
        count += 1;
        tasks.next();
    }
    tasks.status()?;
    Ok(count)
}

/// Dead letters read and queued again at once by a retry.
pub(crate) const RETRY_PAGE: usize = 1000;

/// Where a page of dead letters ends, in bytes of letters, however many it may hold (one at
/// least): a letter holds its item for every live version, and a thousand large ones would not fit
/// in memory.
pub(crate) const LETTER_PAGE_BYTES: usize = BATCH_BYTES;

/// Most dead letters one page of a project's letters looks at: a page may then hold fewer than
/// its limit and still have a next one, but it never reads every other project's letters.
const LOOKED_AT_PER_PAGE: usize = 10_000;

/// Dead letters with their keys, and the key to read the next page after when there may be more.
type DeadPage = (Vec<(Vec<u8>, DeadLetter)>, Option<Vec<u8>>);

/// Of a dead letter, only its task's project (the rest, a whole item, is skipped unread).
#[derive(Deserialize)]
struct Whose {
    task: Option<WhoseTask>,
}

#[derive(Deserialize)]
struct WhoseTask {
    project: String,
}

/// The project of a dead letter's task (none when the task could not be decoded).
pub(super) fn dead_letter_project(letter: &[u8]) -> Option<String> {
    let whose: Whose = serde_json::from_slice(letter).ok()?;
    whose.task.map(|task| task.project)
}

impl Journal {
    /// Iterates a projector's pending tasks from its floor, oldest first.
    pub(super) fn scan_tasks(
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
    ///
    /// The tasks taken make at most [`BATCH_BYTES`]; the tasks passed over (held, or unreadable)
    /// are counted apart, up to as much again, so a held project's backlog neither shrinks a batch
    /// of the others' tasks to nothing nor makes one scan long: a scan that stops there says so
    /// (`cut_short`), and the next goes on after it.
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
        // Bytes of the tasks taken, and of those passed over.
        let (mut bytes, mut passed) = (0, 0);
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
                Ok(task) if held(&task.project) => {
                    pending.skipped += 1;
                    passed += value.len();
                }
                Ok(task) => {
                    pending.tasks.push(task);
                    bytes += value.len();
                }
                Err(error) => {
                    passed += value.len();
                    tracing::error!(projector, seq, %error, "a task that cannot be decoded becomes a dead letter");
                    poison.push(DeadLetter::from_raw(
                        projector,
                        seq,
                        &value,
                        "the stored task is unreadable".into(),
                    ));
                }
            }
            if pending.tasks.len() >= limit || bytes >= BATCH_BYTES {
                break;
            }
            if passed >= BATCH_BYTES {
                pending.cut_short = true;
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
        let mut seqs: Vec<Vec<u8>> = applied
            .iter()
            .chain(dead.iter().map(|letter| &letter.seq))
            .map(|seq| keys::task(projector, *seq))
            .collect();
        // A seq named twice is one task.
        seqs.sort_unstable();
        seqs.dedup();
        // A report delivered twice names tasks already removed: count only those still pending.
        let _settling = self.settling(projector);
        let mut settled = 0;
        for found in self
            .db
            .batched_multi_get_cf(self.cf(CF_TASKS), &seqs, false)
        {
            settled += u64::from(found?.is_some());
        }
        for key in &seqs {
            batch.delete_cf(self.cf(CF_TASKS), key);
        }
        self.settle(projector, batch, settled, applied.len(), dead, None)
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
        let _settling = self.settling(projector);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_TASKS),
            keys::task(projector, *run.start()),
            keys::task(projector, run.end().saturating_add(1)),
        );
        let settled = (applied + dead.len()) as u64;
        self.settle(projector, batch, settled, applied, dead, Some(run))
    }

    /// Keeps other acknowledgements of the projector out until the guard is dropped.
    fn settling(&self, projector: &str) -> Option<MutexGuard<'_, ()>> {
        let lane = self.lanes.get(projector)?;
        Some(lane.settling.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// How many of `dead` the projector has no letter for yet: a report delivered twice records
    /// its letters again. Most acknowledgements record none, and read nothing here.
    fn fresh_letters(&self, projector: &str, dead: &[DeadLetter]) -> Result<u64, JournalError> {
        if dead.is_empty() {
            return Ok(0);
        }
        let mut keys: Vec<Vec<u8>> = dead.iter().map(|l| keys::task(projector, l.seq)).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut fresh = 0;
        for found in self.db.batched_multi_get_cf(self.cf(CF_DEAD), &keys, false) {
            fresh += u64::from(found?.is_none());
        }
        Ok(fresh)
    }

    /// Removes, in `batch`, the projector's earlier dead letters of the items `dead` holds letters
    /// of, and notes the new ones as their items' letters; answers how many it removed, and the
    /// seqs of `dead` that an item's newer letter replaces already (not to be written). A letter
    /// is one item's write refused, and only the newest revision can matter: a retry of an older
    /// one is passed over as superseded. Kept one per write, a client rewriting one item the store
    /// refuses (a `unique` value another item holds) grew the letters without bound, up to a
    /// full disk that refuses every project's writes. Letters of one revision are all kept: a
    /// back-fill or a rebuild writes an item again at its revision, one task per version, each
    /// carrying its own versions' documents, and a retry must send each.
    fn replace_letters(
        &self,
        projector: &str,
        dead: &[DeadLetter],
        batch: &mut WriteBatch,
    ) -> Result<(u64, HashSet<u64>), JournalError> {
        let (mut replaced, mut older) = (0, HashSet::new());
        // Per item: the newest revision among its letters, and their seqs.
        let mut newest: HashMap<Vec<u8>, (u64, Vec<u64>)> = HashMap::new();
        for letter in dead {
            let Some((index, revision)) = letter.task.as_ref().and_then(|task| {
                Some((keys::letter_of_item(projector, task)?, task.op.revision()?))
            }) else {
                continue;
            };
            match newest.entry(index) {
                Entry::Vacant(entry) => {
                    entry.insert((revision, vec![letter.seq]));
                }
                // Two letters of one item in one report: an older revision's is not written.
                Entry::Occupied(mut entry) => {
                    let (kept, seqs) = entry.get_mut();
                    match revision.cmp(kept) {
                        std::cmp::Ordering::Greater => {
                            older.extend(seqs.drain(..));
                            *kept = revision;
                            seqs.push(letter.seq);
                        }
                        std::cmp::Ordering::Equal => seqs.push(letter.seq),
                        std::cmp::Ordering::Less => {
                            older.insert(letter.seq);
                        }
                    }
                }
            }
        }
        for (index, (revision, seqs)) in newest {
            // The letters the index names: the newest first, then the others of its revision.
            let mut kept: Vec<u64> = seqs;
            if let Some(bytes) = self.db.get_cf(self.cf(CF_META), &index)? {
                let seq_at = |at: usize| {
                    bytes
                        .get(at..at + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                };
                let earlier = seq_at(0).unwrap_or_default();
                let mut named = vec![earlier];
                named.extend((16..bytes.len()).step_by(8).filter_map(seq_at));
                let earlier_revision = match seq_at(8) {
                    Some(revision) => Some(revision),
                    // Noted before letters named their revision: the letter's own task says it.
                    None => self
                        .db
                        .get_pinned_cf(self.cf(CF_DEAD), keys::task(projector, earlier))?
                        .and_then(|letter| serde_json::from_slice::<DeadLetter>(&letter).ok())
                        .and_then(|letter| letter.task?.op.revision()),
                };
                match earlier_revision.map(|earlier| earlier.cmp(&revision)) {
                    // A report delivered late: the item's letters are newer already.
                    Some(std::cmp::Ordering::Greater) => {
                        older.extend(kept);
                        continue;
                    }
                    Some(std::cmp::Ordering::Equal) => kept.extend(named),
                    _ => {
                        for seq in named.into_iter().filter(|seq| !kept.contains(seq)) {
                            let key = keys::task(projector, seq);
                            if self.db.get_pinned_cf(self.cf(CF_DEAD), &key)?.is_some() {
                                batch.delete_cf(self.cf(CF_DEAD), key);
                                replaced += 1;
                            }
                        }
                    }
                }
            }
            kept.sort_unstable_by(|a, b| b.cmp(a));
            kept.dedup();
            // The newest seq first (a retry of it removes the index), the revision, the others.
            let mut value = Vec::with_capacity(8 * (kept.len() + 1));
            value.extend_from_slice(&kept[0].to_be_bytes());
            value.extend_from_slice(&revision.to_be_bytes());
            for seq in &kept[1..] {
                value.extend_from_slice(&seq.to_be_bytes());
            }
            batch.put_cf(self.cf(CF_META), index, value);
        }
        Ok((replaced, older))
    }

    /// Writes an acknowledgement (`batch` removes the tasks, `settled` of them still pending) with
    /// the dead letters, then moves the projector's progress.
    fn settle(
        &self,
        projector: &str,
        mut batch: WriteBatch,
        settled: u64,
        applied: usize,
        dead: Vec<DeadLetter>,
        run: Option<RangeInclusive<u64>>,
    ) -> Result<(), JournalError> {
        let failed = dead.len() as u64;
        let (replaced, older) = self.replace_letters(projector, &dead, &mut batch)?;
        let dead: Vec<DeadLetter> = dead
            .into_iter()
            .filter(|letter| !older.contains(&letter.seq))
            .collect();
        let fresh = self.fresh_letters(projector, &dead)?;
        for letter in &dead {
            batch.put_cf(
                self.cf(CF_DEAD),
                keys::task(projector, letter.seq),
                serde_json::to_vec(letter)?,
            );
        }
        self.db.write(batch)?;
        if let Some(lane) = self.lanes.get(projector) {
            // A newer letter may replace several of an older revision.
            if fresh != replaced {
                let mut counted = lane
                    .dead_letters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                counted.generation += 1;
                if let Some(count) = counted.count.as_mut() {
                    *count = (*count + fresh).saturating_sub(replaced);
                }
            }
            let _ = lane
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(settled))
                });
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
            progress.failed += failed;
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
        lane.progress.lock().expect("progress lock").applied_through = Some(through);
        Ok(())
    }

    /// Records the projects `projector`'s dispatcher holds back now (see `Lane::held`).
    pub fn note_held(&self, projector: &str, held: Vec<Ident>) {
        if let Some(lane) = self.lanes.get(projector) {
            *lane.held.lock().unwrap_or_else(|p| p.into_inner()) = held;
        }
    }

    /// The projects `projector`'s dispatcher holds back now.
    pub fn held_by(&self, projector: &str) -> Vec<Ident> {
        self.lanes.get(projector).map_or_else(Vec::new, |lane| {
            lane.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
        })
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
                applied_through: Some(self.last_seq()),
                applied: self.keyspace_writes.load(Ordering::Relaxed),
                ..ProjectorProgress::default()
            },
        };
        progress.pending = match self.lanes.get(projector) {
            Some(lane) => lane.pending.load(Ordering::Acquire),
            None => 0,
        };
        progress.dead_letters = self.dead_letter_count(projector);
        progress
    }

    /// How many dead letters `projector` has: counted once, then kept up to date as
    /// acknowledgements record more (see `Lane::dead_letters`). A count that letters were recorded
    /// or removed during is answered but not kept: the next look counts again.
    fn dead_letter_count(&self, projector: &str) -> u64 {
        let lane = self.lanes.get(projector);
        let generation = match lane {
            Some(lane) => {
                let counted = lane
                    .dead_letters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(count) = counted.count {
                    return count;
                }
                Some(counted.generation)
            }
            None => None,
        };
        let prefix = keys::projector_prefix(projector);
        let counted = self
            .db
            .iterator_cf(
                self.cf(CF_DEAD),
                IteratorMode::From(&prefix, rocksdb::Direction::Forward),
            )
            .map_while(Result::ok)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .count() as u64;
        #[cfg(test)]
        self.dead_letter_counts.fetch_add(1, Ordering::Relaxed);
        if let (Some(lane), Some(generation)) = (lane, generation) {
            let mut kept = lane
                .dead_letters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if kept.generation == generation {
                kept.count = Some(counted);
            }
        }
        counted
    }

    /// Has every projector's dead letters counted again at the next look: a drop or a retry
    /// removed some (the journal's writer calls it once their command is written).
    pub(super) fn forget_dead_letter_counts(&self) {
        for lane in self.lanes.values() {
            let mut counted = lane
                .dead_letters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            counted.count = None;
            counted.generation += 1;
        }
    }

    /// Wakes the dispatchers after a commit.
    pub(super) fn wake_all(&self) {
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

    /// At most `limit` dead letters `filter` takes whose keys follow `after`, and, when there
    /// may be more, the key to read the next page after.
    pub fn dead_letters(
        &self,
        filter: LetterFilter<'_>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<Vec<u8>>), JournalError> {
        let (entries, next) = self.dead_entries(filter, after, limit)?;
        Ok((
            entries.into_iter().map(|(_, letter)| letter).collect(),
            next,
        ))
    }

    fn dead_entries(
        &self,
        filter: LetterFilter<'_>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<DeadPage, JournalError> {
        let prefix = filter
            .projector
            .map(keys::projector_prefix)
            .unwrap_or_default();
        let start = after.filter(|a| *a > prefix.as_slice()).unwrap_or(&prefix);
        let (mut out, mut looked_at, mut last, mut bytes) = (Vec::new(), 0, None, 0);
        for entry in self.db.iterator_cf(
            self.cf(CF_DEAD),
            IteratorMode::From(start, rocksdb::Direction::Forward),
        ) {
            let (key, value) = entry?;
            if after.is_some_and(|a| *key == *a) {
                continue;
            }
            if !key.starts_with(&prefix) {
                break;
            }
            if out.len() >= limit || looked_at >= LOOKED_AT_PER_PAGE || bytes >= LETTER_PAGE_BYTES {
                return Ok((out, last)); // there is at least one more
            }
            looked_at += 1;
            last = Some(key.to_vec());
            if let Some(project) = filter.project {
                if dead_letter_project(&value).is_none_or(|whose| whose != project) {
                    continue;
                }
            }
            // A letter that does not decode (damaged, or written by a newer dstore) is listed as
            // one whose task cannot be: it belongs to no project and no retry takes it, and it
            // never stops the listing or the retries of the others.
            let mut letter: DeadLetter = decode(&value).unwrap_or_else(|error| DeadLetter {
                projector: key
                    .split(|b| *b == 0)
                    .next()
                    .map(|name| String::from_utf8_lossy(name).into_owned())
                    .unwrap_or_default(),
                seq: 0,
                task: None,
                reason: format!("this dead letter is not readable: {error}"),
                at: String::new(),
            });
            letter.seq = keys::task_seq(&key);
            bytes += value.len();
            out.push((key.to_vec(), letter));
        }
        Ok((out, None))
    }

    /// Queues dead letters again (after the cause was fixed), behind every pending task; the
    /// revision guard keeps them from undoing anything newer. Answers how many were queued.
    ///
    /// Read and queued [`RETRY_PAGE`] letters at a time, so a flood of them never sits in memory at
    /// once; only those there when the call began (a task queued again that fails again has a
    /// later seq), so a store that keeps refusing cannot keep the call going.
    pub async fn retry_dead_letters(
        &self,
        filter: LetterFilter<'_>,
    ) -> Result<usize, JournalError> {
        let until = self.last_seq();
        let (mut after, mut count) = (None::<Vec<u8>>, 0);
        let mut names = std::collections::BTreeSet::new();
        loop {
            let (mut letters, next) = self.dead_entries(filter, after.as_deref(), RETRY_PAGE)?;
            // A task that cannot be decoded stays a dead letter: no retry could apply it.
            letters.retain(|(key, letter)| letter.task.is_some() && keys::task_seq(key) <= until);
            names.extend(letters.iter().map(|(_, l)| l.projector.clone()));
            if !letters.is_empty() {
                count += self
                    .send(|reply| Command::Requeue { letters, reply })
                    .await?;
            }
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        for name in names {
            if let Some(lane) = self.lanes.get(name.as_str()) {
                lane.retry.notify_one();
            }
        }
        Ok(count)
    }
}
