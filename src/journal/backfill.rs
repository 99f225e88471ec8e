//! Back-filling a newly frozen version with the items written before it existed.
//!
//! A back-fill walks the project's items in key order, transforms each into the new version and queues
//! it with the revision it already has, so a write that happens during the back-fill (a higher revision)
//! always wins in every store. Each chunk and the cursor after it are committed in one batch, so a
//! restart resumes exactly where it stopped. Progress is readable at any time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};

use super::writer::{BackfillItem, Command};
use super::{decode, keys, ItemRecord, Journal, JournalError, CF_ITEMS, CF_META};
use crate::blueprint::transform::into_version;
use crate::blueprint::Ident;
use crate::catalog::{MigrationState, Project, Version};

/// Most items one chunk of a back-fill reads.
const CHUNK: usize = 512;

/// Most bytes of stored records one chunk reads, however few items that is: large items make
/// short chunks, so a chunk holds megabytes, not 512 items of a megabyte each.
const CHUNK_BYTES: usize = 8 << 20;

/// Back-fills that read and write at once; the others wait for a place.
pub(super) const AT_ONCE: usize = 2;

/// The back-fills running or waiting for a place: where each one's state is kept, with the
/// `born` of the project it is for, and the generation of the walk that runs it.
pub(super) type Running = Arc<Mutex<HashMap<(Vec<u8>, Option<u64>), u64>>>;

/// The generation of the next walk started.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How a back-fill is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// From the state a previous run left: nothing to do while a walk of it runs already.
    Resumed,
    /// Started (over) by a journaled command: a walk of the same state that runs stops at its
    /// next chunk, and this one goes on from the state the command wrote.
    Fresh,
}

/// A back-fill's place in [`Running`], given up when its task ends, however it ends.
struct Runs {
    running: Running,
    id: (Vec<u8>, Option<u64>),
    generation: u64,
}

impl Runs {
    /// Whether no walk started later took this one's place.
    fn current(&self) -> bool {
        self.running.lock().expect("back-fills lock").get(&self.id) == Some(&self.generation)
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        let mut running = self.running.lock().expect("back-fills lock");
        if running.get(&self.id) == Some(&self.generation) {
            running.remove(&self.id);
        }
    }
}

/// The next items of a back-fill, and where the walk stands after them.
pub(super) struct Chunk {
    pub(super) items: Vec<BackfillItem>,
    pub(super) looked_at: u64,
    pub(super) cursor: Option<Vec<u8>>,
    /// The walk passed the project's last item.
    pub(super) ended: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackfillState {
    /// Items of the project when the back-fill started.
    pub total: u64,
    /// Items looked at so far (projected, or skipped because the version lacks their blueprint).
    pub done: u64,
    /// The last item key looked at.
    pub cursor: Option<Vec<u8>>,
    pub finished: bool,
    /// The projectors it feeds, when not every one: a rebuild of their stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projectors: Option<Vec<String>>,
    /// The `born` of the project it was started for (`WorkingCopy::born`): a back-fill of a
    /// project since dropped never writes into the one made again under the name, whose own
    /// back-fill of the same version keeps the same key. `None` in a state recorded before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub born: Option<u64>,
}

impl BackfillState {
    /// Where the state is kept.
    pub fn key(&self, project: &Ident, version: u32) -> Vec<u8> {
        match &self.projectors {
            Some(only) => keys::rebuild(project, version, only),
            None => keys::backfill(project, version),
        }
    }
}

impl Journal {
    pub fn backfill_state(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<Option<BackfillState>, JournalError> {
        match self
            .db
            .get_cf(self.cf(CF_META), keys::backfill(project, version))?
        {
            // One that does not decode starts over at the next start ([`Journal::resume_backfills`]).
            Some(bytes) => Ok(Some(decode(&bytes).unwrap_or_default())),
            None => Ok(None),
        }
    }

    /// Starts the back-fill of `version` unless one was recorded (running, paused or finished):
    /// a freeze records its back-fill in its own batch, and this completes one a crash or an older
    /// data directory left unrecorded. Answers whether it started one.
    pub async fn ensure_backfill(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<bool, JournalError> {
        if version < 2 || self.backfill_state(project, version)?.is_some() {
            return Ok(false);
        }
        let project = project.clone();
        self.send(|reply| Command::StartBackfill {
            project,
            version,
            reply,
        })
        .await?;
        Ok(true)
    }

    /// How many items a project has in the journal.
    fn count_items(&self, project: &Ident) -> u64 {
        let (from, to) = (keys::project_prefix(project), keys::project_end(project));
        self.db
            .iterator_cf(
                self.cf(CF_ITEMS),
                IteratorMode::From(&from, Direction::Forward),
            )
            .map_while(Result::ok)
            .take_while(|(key, _)| key.as_ref() < to.as_slice())
            .count() as u64
    }

    /// Completes what a crash between a freeze's catalog write and its journal batch could leave
    /// behind: every live version gets its back-fill, and migrations that have not succeeded are
    /// queued again (migrations are idempotent, so one queued twice is harmless).
    pub async fn reconcile(&self) -> Result<(), JournalError> {
        let snapshot = self.catalog.snapshot();
        for (name, project) in &snapshot.projects {
            for version in project.live_versions() {
                self.ensure_backfill(name, version.number).await?;
                let unfinished: Vec<String> = project
                    .status
                    .get(&version.number)
                    .map(|s| {
                        s.migrations
                            .iter()
                            .filter(|(p, m)| {
                                // The keyspaces the journal writes are marked done by the writer.
                                let kept = self.writes_itself(p);
                                **m != MigrationState::Done
                                    && (self.lanes.contains_key(p.as_str()) || kept)
                            })
                            .map(|(p, _)| p.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                if !unfinished.is_empty() {
                    self.remigrate(name.clone(), version.number, unfinished)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Catches up the stores added since the last start: every live version is migrated and
    /// back-filled into the projectors this journal did not feed then (the local keyspaces the
    /// journal writes itself excepted: `keep_keyspaces` rebuilds those), so a store enabled on a
    /// deployment that has items gets all of them. Which projectors were fed is recorded at each
    /// start; a journal that has no record yet counts those it starts with as fed.
    pub async fn catch_up_added(&self) -> Result<(), JournalError> {
        let mut now: Vec<String> = self.projectors().map(String::from).collect();
        now.sort();
        let fed: Option<Vec<String>> =
            match self.db.get_cf(self.cf(CF_META), keys::PROJECTORS_FED)? {
                Some(bytes) => Some(decode(&bytes)?),
                None => None,
            };
        if fed.as_ref() == Some(&now) {
            return Ok(());
        }
        let added: Vec<String> = match &fed {
            Some(fed) => now
                .iter()
                .filter(|p| !fed.contains(p) && !self.writes_itself(p))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if !added.is_empty() && self.last_seq() > 0 {
            tracing::info!(
                projectors = ?added,
                "stores added since the last start get every live version's items"
            );
        }
        let record = (
            keys::PROJECTORS_FED,
            serde_json::to_vec(&now).expect("names serialize"),
        );
        self.send(|reply| Command::Rebuild {
            projectors: added,
            record,
            reply,
        })
        .await
    }

    /// Resumes every back-fill a previous run left unfinished.
    pub fn resume_backfills(self: &Arc<Self>) -> Result<(), JournalError> {
        let prefix = b"backfill/";
        for entry in self.db.iterator_cf(
            self.cf(CF_META),
            IteratorMode::From(prefix, Direction::Forward),
        ) {
            let (key, value) = entry?;
            if !key.starts_with(prefix) {
                break;
            }
            let key = String::from_utf8_lossy(&key).into_owned();
            let mut parts = key.split('/').skip(1);
            let project = parts.next().and_then(|p| Ident::parse(p).ok());
            let version = parts.next().and_then(|v| v.parse().ok());
            // A state that does not decode (damaged, or written by a newer dstore) is where a
            // back-fill had got to, which can always be found again: it starts over, for the
            // projectors its key names, rather than stop dstore from starting.
            let state: BackfillState = decode(&value).unwrap_or_else(|error| {
                tracing::error!(key, %error, "a back-fill's state does not decode; it starts over");
                BackfillState {
                    projectors: parts
                        .next()
                        .map(|only| only.split(',').map(String::from).collect()),
                    ..BackfillState::default()
                }
            });
            if let (Some(project), Some(version), false) = (project, version, state.finished) {
                self.spawn_backfill(project, version, state, Start::Resumed);
            }
        }
        Ok(())
    }

    /// Runs a back-fill in the background. Counting the items to look at is left to it, so a
    /// freeze never waits for a full scan.
    pub(super) fn spawn_backfill(
        self: &Arc<Self>,
        project: Ident,
        version: u32,
        state: BackfillState,
        start: Start,
    ) {
        // Started after `close` took the background tasks, it would hold the journal past it; the
        // back-fill's state is journaled, so it resumes at the next start.
        if self.is_closing() {
            return;
        }
        let id = (state.key(&project, version), state.born);
        let generation = {
            let mut running = self.backfills_running.lock().expect("back-fills lock");
            if start == Start::Resumed && running.contains_key(&id) {
                tracing::debug!(%project, version, "the back-fill runs already");
                return;
            }
            let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
            running.insert(id.clone(), generation);
            generation
        };
        let runs = Runs {
            running: self.backfills_running.clone(),
            id,
            generation,
        };
        #[cfg(test)]
        self.backfills_spawned.fetch_add(1, Ordering::Relaxed);
        let journal = self.clone();
        let task = self.runtime.spawn(async move {
            // Waiting for a place holds nothing but this task; the state is journaled, so a close
            // meanwhile leaves it to the next start.
            let Ok(_place) = journal.backfill_slots.clone().acquire_owned().await else {
                return;
            };
            if journal.is_closing() {
                return;
            }
            let mut state = state;
            if state.cursor.is_none() && state.done == 0 {
                let (counter, name) = (journal.clone(), project.clone());
                state.total = tokio::task::spawn_blocking(move || counter.count_items(&name))
                    .await
                    .unwrap_or(0);
            }
            if let Err(error) = journal.run_backfill(&project, version, state, &runs).await {
                tracing::error!(%project, version, %error, "back-fill stopped; it resumes at the next start");
            }
        });
        let mut background = self.background.lock().expect("background lock");
        background.retain(|t| !t.is_finished());
        background.push(task);
    }

    async fn run_backfill(
        &self,
        project: &Ident,
        version: u32,
        mut state: BackfillState,
        runs: &Runs,
    ) -> Result<(), JournalError> {
        tracing::info!(%project, version, total = state.total, "back-fill started");
        let mut failures = 0;
        while !state.finished {
            if !runs.current() {
                tracing::info!(%project, version, "back-fill started over; this walk stops");
                return Ok(());
            }
            if self.is_closing() {
                tracing::info!(%project, version, done = state.done, "back-fill paused until the next start");
                return Ok(());
            }
            #[cfg(test)]
            if self
                .backfills_held
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
            // Each chunk adds as much as it reads: it waits while the disk is nearly full, as
            // item writes are refused then (see `disk`).
            if self.check_disk().is_err() {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            let Chunk {
                items,
                looked_at,
                cursor,
                ended,
            } = self.backfill_chunk(project, version, state.cursor.as_deref())?;
            // The state after this chunk, kept only once the chunk is journaled.
            let mut next = state.clone();
            next.done += looked_at;
            // Items written during the back-fill are read by it too: the total grows with them.
            next.total = next.total.max(next.done);
            next.finished = ended;
            if cursor.is_some() {
                next.cursor = cursor;
            }
            let written = self
                .send(|reply| Command::Backfill {
                    project: project.clone(),
                    version,
                    items,
                    state: next.clone(),
                    reply,
                })
                .await;
            match written {
                Ok(true) => {
                    state = next;
                    failures = 0;
                }
                Ok(false) => {
                    tracing::info!(
                        version,
                        "back-fill stopped: the version was retired or removed"
                    );
                    return Ok(());
                }
                // The journal cannot write now (a full disk, an I/O error): the chunk is read
                // and written again once it can, as item writes are.
                Err(JournalError::Storage(error)) => {
                    if failures == 0 {
                        tracing::warn!(%project, version, %error, "back-fill waits: the journal cannot write; it goes on once it can");
                    }
                    tokio::time::sleep(crate::projector::backoff(failures)).await;
                    failures = failures.saturating_add(1);
                }
                Err(error) => return Err(error),
            }
        }
        tracing::info!(%project, version, done = state.done, "back-fill finished");
        Ok(())
    }

    /// Reads and transforms the next chunk after `cursor`.
    pub(super) fn backfill_chunk(
        &self,
        project: &Ident,
        version: u32,
        cursor: Option<&[u8]>,
    ) -> Result<Chunk, JournalError> {
        let snapshot = self.catalog.snapshot();
        let Some(target) = snapshot
            .projects
            .get(project)
            .and_then(|p| p.version(version))
            .cloned()
        else {
            return Ok(Chunk {
                items: Vec::new(),
                looked_at: 0,
                cursor: None,
                ended: true,
            });
        };
        let p = snapshot.project(project)?;
        let start = keys::project_prefix(project);
        let end = keys::project_end(project);
        let iter = self.db.iterator_cf(
            self.cf(CF_ITEMS),
            IteratorMode::From(cursor.unwrap_or(&start), Direction::Forward),
        );
        let mut items = Vec::new();
        let (mut looked_at, mut bytes) = (0, 0);
        let mut last = None;
        let mut ended = true;
        for entry in iter {
            let (key, value) = entry?;
            if key.as_ref() >= end.as_slice() {
                break;
            }
            if looked_at >= CHUNK as u64 || bytes >= CHUNK_BYTES {
                ended = false;
                break;
            }
            if Some(key.as_ref()) == cursor {
                continue;
            }
            looked_at += 1;
            bytes += value.len();
            last = Some(key.to_vec());
            // A record this version cannot read is left out, said once; stopping at it would stop
            // the back-fill there at every start, and the version would never get the items after.
            let record: ItemRecord = match super::codec::decode_record(&value) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(%project, version, %error, "back-fill leaves out an item record it cannot read");
                    continue;
                }
            };
            let id = key[key.len() - 16..]
                .try_into()
                .map(uuid::Uuid::from_bytes)
                .unwrap_or_default();
            if let Some((blueprint, task)) = item_task(p, &target, id, &record) {
                // The version's copy can be many times the record (a column it added takes its
                // default in every item): the chunk counts both.
                bytes += task.bytes.len();
                items.push(BackfillItem {
                    key: key.to_vec(),
                    revision: record.revision,
                    blueprint,
                    id,
                    task,
                });
            }
        }
        Ok(Chunk {
            items,
            looked_at,
            cursor: last,
            ended,
        })
    }
}

/// The `Upsert` task body that back-fills one item into `target`, with the blueprint's name there,
/// if `target` holds its blueprint (and the item's own version is still known).
pub fn item_task(
    p: &Project,
    target: &Version,
    id: uuid::Uuid,
    record: &ItemRecord,
) -> Option<(Ident, super::codec::UpsertBody)> {
    let (name, to) = target
        .blueprints
        .iter()
        .find(|(_, bp)| bp.uid == record.blueprint_uid)?;
    let from = p.version(record.version).and_then(|v| {
        v.blueprints
            .values()
            .find(|bp| bp.uid == record.blueprint_uid)
    })?;
    // An item the version cannot hold is not in it: stores drop a copy they may hold from an
    // earlier pass.
    let doc = match into_version(&record.body, from, to, target.number) {
        Ok(seen) => super::codec::doc_bytes(&seen),
        Err(_) => super::task::ABSENT.as_bytes().to_vec(),
    };
    let body = super::codec::upsert_body(&p.name, name, &id, &[(target.number, &doc)]);
    Some((name.clone(), body))
}
