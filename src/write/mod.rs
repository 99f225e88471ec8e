//! The write path, apart from HTTP: item writes and deletes, `_bulk`, and freezes, against any
//! [`Storage`] backend, with one error type.
//!
//! A write is prepared against one catalog snapshot (see `prepare`) and journaled with the epoch of
//! its project there; when storage answers that the project's live versions moved meanwhile
//! ([`StorageError::Stale`]), the node refreshes its catalog and prepares the write again, so no write
//! ever misses a version frozen while it was in flight. A freeze and the start of its back-fill are
//! one storage command; a retried freeze finishes what an interrupted one started.
//!
//! Nothing here knows of requests or status codes: `http/` parses, calls, and maps [`WriteError`].

pub mod evolution;
mod prepare;

use std::collections::HashMap;
use std::future::{ready, Future};
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use uuid::Uuid;

pub use prepare::{prepare_delete, prepare_upsert, read_at};

use crate::blueprint::{cap_errors, FieldError, Ident, Uid};
use crate::bulk::{Action, Operation};
use crate::catalog::edit::Judged;
use crate::catalog::{MigrationState, Project, Snapshot};
use crate::journal::Entry;
use crate::storage::{Storage, StorageError};

/// Why a freeze that would lose values is refused.
pub const INCOMPATIBLE: &str = "the freeze would lose values (or leave items out of a version) of a live version, which the project's compatibility setting does not allow: see the report, declare conversions (\"convert\"), or freeze with ?force=true";

/// How often a write is prepared again while its project's versions keep moving.
const MAX_ATTEMPTS: usize = 8;

#[derive(Debug, Error)]
pub enum WriteError {
    /// The project, blueprint, version or item does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The item is not valid for its version; every problem at once.
    #[error("invalid item")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    Conflict(String),
    /// The version is frozen but a store has not finished its migration yet.
    #[error("{0}")]
    MigrationPending(String),
    /// The freeze would lose values for some live version and the project allows none.
    #[error("{INCOMPATIBLE}")]
    Incompatible(Box<evolution::Report>),
    /// The project's versions kept changing while the write was prepared.
    #[error("the project's versions kept changing while the write was prepared; try again")]
    Contended,
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The prepared documents cannot be held within the in-flight budget (see `crate::budget`).
    #[error("{0}")]
    Memory(crate::budget::Refused),
}

/// What a write's prepared entries are counted against while the journal takes them: told their
/// bytes after each preparation (a retry's replace the last's), before they are handed over.
pub type Hold<'a> = &'a (dyn Fn(usize) -> Result<(), crate::budget::Refused> + Sync);

/// A [`Hold`] that counts nothing: deletes, whose entries are a few bytes each.
pub fn hold_nothing(_: usize) -> Result<(), crate::budget::Refused> {
    Ok(())
}

/// What became of one `_bulk` operation: its revision, or its status and errors.
pub type BulkOutcome = Result<Put, (u16, Vec<FieldError>)>;

/// Journals entries prepared by `prepare`, preparing them again while the project's live versions
/// move, and counting what they hold against `hold` before each hand-over. Answers the revisions
/// of the entries, in order, and what `prepare` returned beside them.
pub async fn journal<T, F>(
    storage: &dyn Storage,
    project: &Ident,
    hold: Hold<'_>,
    mut prepare: impl FnMut(Arc<Snapshot>) -> F,
) -> Result<(Vec<u64>, T), WriteError>
where
    F: Future<Output = Result<(Vec<Entry>, T), WriteError>>,
{
    let mut snapshot = storage.snapshot();
    for attempt in 0..MAX_ATTEMPTS {
        let epoch = snapshot.projects.get(project).map_or(0, |p| p.epoch);
        let (entries, extra) = match prepare(snapshot.clone()).await {
            // This node may not know yet a project or version made through another node. Any
            // other refusal is the item's own: checking it again would find the same, at the
            // cost of a second check (and, in cluster mode, a read of the catalog) per refusal.
            Err(e) if attempt == 0 && may_be_stale(&e) => {
                snapshot = storage.fresh_snapshot(project).await?;
                continue;
            }
            prepared => prepared?,
        };
        if entries.is_empty() {
            return Ok((Vec::new(), extra));
        }
        hold(entries.iter().map(Entry::held_bytes).sum()).map_err(WriteError::Memory)?;
        match storage.write(project, epoch, entries).await {
            Err(StorageError::Stale) => {
                // Another node (or request) moved the versions: read the project again.
                snapshot = storage.fresh_snapshot(project).await?;
                continue;
            }
            Ok(revisions) => return Ok((revisions, extra)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(WriteError::Contended)
}

/// Whether a refusal could come from a snapshot older than the catalog: a project, blueprint or
/// version it does not hold yet (`/project_version` names the version).
fn may_be_stale(error: &WriteError) -> bool {
    match error {
        WriteError::NotFound(_) => true,
        WriteError::Invalid(errors) => errors.iter().any(|e| e.path == "/project_version"),
        _ => false,
    }
}

/// Upserts an item whose body was `length` bytes: answers its revision. Its prepared documents
/// are counted against `hold` until the journal has them.
pub async fn put_item<B>(
    storage: &dyn Storage,
    project: &Ident,
    blueprint: &Ident,
    id: Uuid,
    body: B,
    length: usize,
    hold: Hold<'_>,
) -> Result<Put, WriteError>
where
    B: Deref<Target = crate::document::Document> + Send + Sync + 'static,
{
    let put = |(revisions, absent): (Vec<u64>, Vec<u32>)| {
        count_left_out(&absent);
        Put {
            revision: revisions[0],
            absent: absent.into_boxed_slice(),
            found: None,
        }
    };
    // An item's check can cost time quadratic in its size (polygons): a large one is prepared
    // off the HTTP worker (`crate::aside`), and one of a blueprint with lines or polygons from a
    // few KiB on (three polygons at their bounds in 64 KiB took 50 ms of the worker).
    let inline = length <= crate::aside::LARGE_BYTES
        && (length <= SHAPES_INLINE_BYTES || !has_shapes(storage, project, blueprint));
    if inline {
        let written = journal(storage, project, hold, |snapshot| {
            let entry = prepare_upsert(&snapshot, project, blueprint, id, &*body);
            ready(entry.map(|entry| {
                let absent = entry.absent_versions();
                (vec![entry], absent)
            }))
        })
        .await?;
        return Ok(put(written));
    }
    let body = Arc::new(body);
    let written = journal(storage, project, hold, |snapshot| {
        let (body, project, blueprint) = (body.clone(), project.clone(), blueprint.clone());
        aside(move || {
            let entry = prepare_upsert(&snapshot, &project, &blueprint, id, &**body)?;
            let absent = entry.absent_versions();
            Ok((vec![entry], absent))
        })
    })
    .await?;
    Ok(put(written))
}

/// The longest item of a blueprint with lines or polygons checked on the HTTP worker: a polygon
/// this long takes well under a millisecond to check.
const SHAPES_INLINE_BYTES: usize = 4 * 1024;

/// Whether a live version gives `blueprint` a line or polygon column, whose check costs the square
/// of its size.
fn has_shapes(storage: &dyn Storage, project: &Ident, blueprint: &Ident) -> bool {
    use crate::blueprint::BaseType;
    let snapshot = storage.snapshot();
    let Some(p) = snapshot.projects.get(project) else {
        return false;
    };
    let shaped = p
        .live_versions()
        .filter_map(|v| v.blueprints.get(blueprint))
        .flat_map(|bp| bp.columns.values())
        .any(|c| matches!(c.def.ty.base(), BaseType::LineString | BaseType::Polygon));
    shaped
}

/// Item writes since start that left their item out of a live version, one per version: it allows
/// no null where the item has none (after a forced breaking freeze). `/_metrics` shows it, so an
/// operator sees whether clients still write what a newer version cannot hold.
pub static LEFT_OUT: AtomicU64 = AtomicU64::new(0);

/// Counts the versions a journaled write left its item out of ([`LEFT_OUT`]).
fn count_left_out(absent: &[u32]) {
    if !absent.is_empty() {
        LEFT_OUT.fetch_add(absent.len() as u64, Ordering::Relaxed);
    }
}

/// A journaled upsert.
#[derive(Debug)]
pub struct Put {
    pub revision: u64,
    /// The live versions the item is not in: they allow no null where it has none (after a
    /// forced breaking freeze; docs/evolution.md).
    pub absent: Box<[u32]>,
    /// For a delete: whether the item was there.
    pub found: Option<bool>,
}

/// Runs `prepare` off the HTTP worker (see `crate::aside`).
async fn aside<T: Send + 'static>(
    prepare: impl FnOnce() -> Result<T, WriteError> + Send + 'static,
) -> Result<T, WriteError> {
    crate::aside::run(prepare)
        .await
        .map_err(|e| WriteError::Storage(StorageError::Unavailable(e)))?
}

/// Deletes an item from every version holding its blueprint: answers the delete's revision and
/// whether the item existed (deleting a missing item is not an error).
pub async fn delete_item(
    storage: &dyn Storage,
    project: &Ident,
    blueprint: &Ident,
    id: Uuid,
) -> Result<(u64, bool), WriteError> {
    // The record's header alone: a delete never decodes the item it removes.
    let stored_uid = storage.item_blueprint_uid(project, blueprint, &id).await?;
    let (revisions, ()) = journal(storage, project, &hold_nothing, |snapshot| {
        let entry = prepare_delete(&snapshot, project, blueprint, id, stored_uid);
        ready(entry.map(|entry| (vec![entry], ())))
    })
    .await?;
    Ok((revisions[0], stored_uid.is_some()))
}

/// How much of a `_bulk` body is journaled at once: item lines of at most this many bytes times
/// the documents each item makes (its record and one per live version: 4 MiB of item lines with
/// one live version, 1 MiB with seven), and [`PART_OPERATIONS`] operations. A part's entries, the
/// journal's batch of them and the memtable that takes the batch each hold about the part's
/// documents at once; journaled whole, a 58 MB body held ten times its size (docs/performance.md,
/// "Memory of one large `_bulk`").
pub const PART_BYTES: usize = 8 << 20;
/// The most operations journaled at once (see [`PART_BYTES`]).
pub const PART_OPERATIONS: usize = 10_000;

/// What became of a `_bulk` body's operations: one outcome for each operation journaled or
/// refused alone, in order; when `stopped` says why, the operations after the last outcome were
/// not journaled (the journal or the budget refused a part after earlier parts were journaled).
#[derive(Debug)]
pub struct Bulked {
    pub outcomes: Vec<BulkOutcome>,
    pub stopped: Option<WriteError>,
    /// The operations after `outcomes` that were in the part `stopped` ended, when the storage
    /// may have written it ([`StorageError::Uncertain`]), in order: `None` for one that was sent
    /// (its outcome is unknown, not "not written"), its own refusal for one refused alone as the
    /// part was prepared (never sent).
    pub uncertain: Vec<Option<(u16, Vec<FieldError>)>>,
}

/// The operations of a part refused alone as it was prepared: (index in the part, why).
type Refused = Vec<(usize, (u16, Vec<FieldError>))>;

/// Journals the valid operations of a `_bulk` body, in parts of at most [`part_bytes`] of item
/// lines; answers one outcome per operation. Each item is parsed, checked and encoded alone
/// (`max_item_bytes` bounds it as a PUT body is), on a blocking thread: a body of costly items (a
/// polygon's check takes time quadratic in its size) must not stall the HTTP worker that other
/// requests share. `raw` is the body `ops` were read from; a part's documents are counted against
/// `hold` until the journal has them.
///
/// Each part is prepared against the catalog as it is journaled, as a write of its own would be.
/// While nothing is journaled, a part that cannot be is the request's failure, as a single
/// write's; once something is, the parts before keep their revisions and [`Bulked::stopped`] says
/// why the rest were not written, as Elasticsearch's `_bulk` answers each item it could not take.
pub async fn bulk(
    storage: &dyn Storage,
    project: &Ident,
    raw: &Bytes,
    ops: Vec<Operation<'_>>,
    max_item_bytes: usize,
    hold: Hold<'_>,
) -> Result<Bulked, WriteError> {
    let snapshot = storage.fresh_snapshot(project).await?;
    let p = snapshot.project(project)?;
    let documents = 1 + p.live_versions().count();
    let overheads = copy_overheads(p);
    // The versions a delete reaches depend on the blueprint uid the item was stored with, read
    // from the record's header alone and once per item, however often the body names it: a body
    // of many deletes holds no item bodies, nor decodes any.
    let mut owned = Vec::with_capacity(ops.len());
    let mut uids: HashMap<(Ident, Uuid), Option<u64>> = HashMap::new();
    for op in ops {
        let stored_uid = match (op.action, &op.blueprint, op.id, &op.error) {
            (Action::Delete, Some(blueprint), Some(id), None) => {
                match uids.get(&(blueprint.clone(), id)) {
                    Some(uid) => *uid,
                    None => {
                        // The embedded storage reads on the calling thread: a body of many
                        // deletes lets the HTTP worker's other requests go between its reads.
                        if uids.len() % 256 == 255 {
                            tokio::task::yield_now().await;
                        }
                        let uid = storage.item_blueprint_uid(project, blueprint, &id).await?;
                        uids.insert((blueprint.clone(), id), uid);
                        uid
                    }
                }
            }
            _ => None,
        };
        owned.push(OwnedOp::of(raw, op, stored_uid));
    }
    let body = BulkBody {
        raw: raw.clone(),
        ops: owned.into(),
        max_item_bytes,
        details: Arc::new(Details::for_body(raw.len())),
        written: Arc::default(),
    };
    let mut outcomes = Vec::with_capacity(body.ops.len());
    // Once a part is journaled, the request goes on whatever others hold: a later part that holds
    // more than the request was admitted with (a version frozen meanwhile adds a document to each
    // item) goes on within the share it has, over its count by those documents, rather than
    // stopping half written.
    let later = |bytes| match hold(bytes) {
        Err(crate::budget::Refused::Busy { .. }) => Ok(()),
        other => other,
    };
    let mut journaled = false;
    let overhead = |op: &OwnedOp| {
        let blueprint = op.blueprint.as_ref().filter(|_| op.item.is_some());
        blueprint
            .and_then(|b| overheads.get(b))
            .copied()
            .unwrap_or(0)
    };
    for part in parts(&body.ops, part_bytes(documents), overhead) {
        let hold: Hold<'_> = if journaled { &later } else { hold };
        let size = part.len();
        match bulk_part(storage, project, &body, part, hold).await {
            Ok(done) => {
                journaled |= done.iter().any(Result::is_ok);
                outcomes.extend(done);
            }
            Err((error, _)) if !journaled => return Err(error),
            Err((error, refused)) => {
                let uncertain = match &error {
                    WriteError::Storage(StorageError::Uncertain(_)) => {
                        let mut uncertain = vec![None; size];
                        for (index, why) in refused {
                            uncertain[index] = Some(why);
                        }
                        uncertain
                    }
                    _ => Vec::new(),
                };
                return Ok(Bulked {
                    outcomes,
                    stopped: Some(error),
                    uncertain,
                });
            }
        }
    }
    Ok(Bulked {
        outcomes,
        stopped: None,
        uncertain: Vec::new(),
    })
}

/// The most bytes of item lines journaled at once when each item makes `documents` documents (its
/// record and one per live version; see [`PART_BYTES`]).
pub fn part_bytes(documents: usize) -> usize {
    PART_BYTES / documents.max(1)
}

/// For each blueprint name of the project's live versions, the most bytes the copies of an item
/// written with it take beyond the item's own values
/// ([`crate::blueprint::Blueprint::copy_overhead`], summed over the live versions; the largest
/// where versions give the name to different blueprints).
fn copy_overheads(p: &Project) -> HashMap<Ident, usize> {
    let mut by_uid: HashMap<Uid, usize> = HashMap::new();
    for version in p.live_versions() {
        for blueprint in version.blueprints.values() {
            *by_uid.entry(blueprint.uid).or_default() += blueprint.copy_overhead();
        }
    }
    let mut by_name: HashMap<Ident, usize> = HashMap::new();
    for version in p.live_versions() {
        for (name, blueprint) in &version.blueprints {
            let overhead = by_uid.get(&blueprint.uid).copied().unwrap_or(0);
            let most = by_name.entry(name.clone()).or_default();
            *most = (*most).max(overhead);
        }
    }
    by_name
}

/// The ranges of `ops` journaled together: consecutive, each of at most [`PART_OPERATIONS`]
/// operations and `most` bytes of item lines and the `overhead` of their copies (or one
/// operation, whatever its size): the copies a version makes of small items can be many times
/// their lines (a column it added takes its default in each).
fn parts(ops: &[OwnedOp], most: usize, overhead: impl Fn(&OwnedOp) -> usize) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (n, op) in ops.iter().enumerate() {
        let size = op.item.as_ref().map_or(0, Range::len) + overhead(op);
        if n > start && (n - start == PART_OPERATIONS || bytes + size > most) {
            parts.push(start..n);
            (start, bytes) = (n, 0);
        }
        bytes += size;
    }
    if start < ops.len() {
        parts.push(start..ops.len());
    }
    parts
}

/// A `_bulk` body as its parts are prepared on other threads: its text, its operations, the
/// largest item and the error details its answer may still keep.
#[derive(Clone)]
struct BulkBody {
    raw: Bytes,
    ops: Arc<[OwnedOp]>,
    max_item_bytes: usize,
    details: Arc<Details>,
    /// The items the journaled parts wrote (the blueprint uid they were written with) or deleted
    /// (none): a later operation on one of them finds it as the body left it, as it would if sent
    /// alone after (a delete of an item put earlier in the body is found, and reaches the
    /// versions it was written to; a second delete of one is not found).
    written: Arc<std::sync::Mutex<Written>>,
}

/// Items a `_bulk` body wrote (the blueprint uid each was written with) or deleted (none).
type Written = HashMap<(Ident, Uuid), Option<Uid>>;

/// Journals the operations `part` of the body together: one outcome for each. When the journal
/// refuses the part, answers why with the operations refused alone as it was last prepared.
async fn bulk_part(
    storage: &dyn Storage,
    project: &Ident,
    body: &BulkBody,
    part: Range<usize>,
    hold: Hold<'_>,
) -> Result<Vec<BulkOutcome>, (WriteError, Refused)> {
    let refused: Arc<std::sync::Mutex<Refused>> = Arc::default();
    let prepared = journal(storage, project, hold, |snapshot| {
        let (body, part, project) = (body.clone(), part.clone(), project.clone());
        let refused = refused.clone();
        aside(move || {
            let BulkBody {
                raw,
                ops,
                max_item_bytes,
                details,
                written,
            } = &body;
            let ops = &ops[part];
            let mut entries = Vec::with_capacity(ops.len());
            // Each operation's entry (its index, the versions its item is not in, and for a
            // delete whether the item was there), or why not.
            let mut outcomes = Vec::with_capacity(ops.len());
            // What this part's operations write, over what the parts before wrote: kept apart, as
            // the part may be prepared again (the project's versions moved) or not journaled.
            let before = written.lock().unwrap_or_else(|e| e.into_inner());
            let mut now = Written::new();
            for op in ops {
                let key = op.blueprint.clone().zip(op.id);
                let stored = match &key {
                    Some(key) => match now.get(key).or_else(|| before.get(key)) {
                        Some(left) => *left,
                        None => op.stored_uid,
                    },
                    None => op.stored_uid,
                };
                outcomes.push(
                    match op.prepare(&snapshot, &project, raw, *max_item_bytes, stored) {
                        Ok(entry) => {
                            let absent = entry.absent_versions().into_boxed_slice();
                            let found = match &entry {
                                Entry::Upsert { blueprint_uid, .. } => {
                                    key.map(|key| now.insert(key, Some(*blueprint_uid)));
                                    None
                                }
                                Entry::Delete { .. } => {
                                    key.map(|key| now.insert(key, None));
                                    Some(stored.is_some())
                                }
                            };
                            entries.push(entry);
                            Ok((entries.len() - 1, absent, found))
                        }
                        Err((status, errors)) => Err((status, details.keep(cap_errors(errors)))),
                    },
                );
            }
            let mut last = refused.lock().unwrap_or_else(|e| e.into_inner());
            last.clear();
            for (index, outcome) in outcomes.iter().enumerate() {
                if let Err(why) = outcome {
                    last.push((index, why.clone()));
                }
            }
            drop(last);
            Ok((entries, (outcomes, now)))
        })
    })
    .await;
    let (revisions, outcomes) = prepared.map_err(|error| {
        let refused = std::mem::take(&mut *refused.lock().unwrap_or_else(|e| e.into_inner()));
        (error, refused)
    })?;
    let (outcomes, now) = outcomes;
    body.written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(now);
    Ok(outcomes
        .into_iter()
        .map(|outcome| {
            outcome.map(|(index, absent, found)| {
                count_left_out(&absent);
                Put {
                    revision: revisions[index],
                    absent,
                    // As a DELETE answers it: whether the item was there.
                    found,
                }
            })
        })
        .collect())
}

/// The bytes of error details a `_bulk` answer keeps, over all its operations: about half its
/// body's length, and 64 KiB at least. An operation's errors can be far longer than its lines (a
/// column unknown to a wide blueprint lists the columns it has), so a small body of refused items
/// would otherwise be answered with hundreds of MB, held in memory no budget counts. Past it, a
/// refused operation says so with one short error; the first ones show why.
struct Details {
    left: std::sync::atomic::AtomicUsize,
}

/// The one error of a refused operation whose details the answer left out.
const DETAILS_LEFT_OUT: &str = "refused; its errors are left out: an answer keeps about half its \
                                body's length of error details, and the operations before show \
                                why theirs were refused";

impl Details {
    fn for_body(body_bytes: usize) -> Details {
        Details {
            left: std::sync::atomic::AtomicUsize::new((body_bytes / 2).max(64 * 1024)),
        }
    }

    /// `errors`, or one short error once the answer holds its share of details.
    fn keep(&self, errors: Vec<FieldError>) -> Vec<FieldError> {
        let bytes: usize = errors
            .iter()
            .map(|e| e.path.len() + e.message.len() + 32)
            .sum();
        let kept = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(bytes)
            })
            .is_ok();
        match kept {
            true => errors,
            false => vec![FieldError::new("", DETAILS_LEFT_OUT)],
        }
    }
}

/// A bulk operation as its preparation on another thread holds it: the item line as a range of
/// the body, and the uid of the stored item a delete reaches.
struct OwnedOp {
    action: Action,
    blueprint: Option<Ident>,
    id: Option<Uuid>,
    item: Option<Range<usize>>,
    error: Option<(u16, Vec<FieldError>)>,
    stored_uid: Option<Uid>,
}

impl OwnedOp {
    fn of(raw: &[u8], op: Operation<'_>, stored_uid: Option<Uid>) -> OwnedOp {
        // The item line is a slice of `raw`, which `ops` were read from.
        let item = op.item.map(|line| {
            let start = (line.as_ptr() as usize)
                .checked_sub(raw.as_ptr() as usize)
                .filter(|start| start + line.len() <= raw.len())
                .expect("an item line is a slice of the body it was read from");
            start..start + line.len()
        });
        OwnedOp {
            action: op.action,
            blueprint: op.blueprint,
            id: op.id,
            item,
            error: op.error,
            stored_uid,
        }
    }

    /// Prepares the operation: its item is parsed here and dropped once encoded.
    /// `stored_uid`: the blueprint uid of the item a delete reaches, as the body left it.
    fn prepare(
        &self,
        snapshot: &Snapshot,
        project: &Ident,
        raw: &[u8],
        max_item_bytes: usize,
        stored_uid: Option<Uid>,
    ) -> Result<Entry, (u16, Vec<FieldError>)> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let (Some(blueprint), Some(id)) = (self.blueprint.as_ref(), self.id) else {
            return Err((
                400,
                vec![FieldError::new("", "blueprint and id are required")],
            ));
        };
        let result = match self.action {
            Action::Delete => prepare_delete(snapshot, project, blueprint, id, stored_uid),
            Action::Put | Action::Create => {
                let line = self.item.clone().map_or(&[][..], |range| &raw[range]);
                let item = crate::bulk::parse_item(line, max_item_bytes)?;
                prepare_upsert(snapshot, project, blueprint, id, &item)
            }
        };
        result.map_err(|e| match e {
            WriteError::NotFound(m) => (404, vec![FieldError::new("", m)]),
            WriteError::Invalid(errors) => (422, errors),
            other => (500, vec![FieldError::new("", other.to_string())]),
        })
    }
}

/// Freezes the working copy (or finishes what an interrupted freeze of the newest version left:
/// its back-fill, its migrations), then waits up to `wait` for every store's migration. Answers the
/// version number. `allowed`: a judgment that let the working copy through without `force` just
/// before (`PUT /{project}/_project` judges its change before storing it); while the project is
/// still as it was judged, it is not counted again.
pub async fn freeze(
    storage: &dyn Storage,
    project: &Ident,
    wait: Duration,
    force: bool,
    allowed: Option<&Judged>,
) -> Result<u32, WriteError> {
    let snapshot = storage.fresh_snapshot(project).await?;
    let p = snapshot.project(project)?;
    // The stores whose failed migration is queued again: their failure is the one before.
    let mut retried = Vec::new();
    let (number, revision) = if p.has_unfrozen_changes() {
        crate::catalog::edit::room_for_a_version(p)?;
        let forced = match allowed.filter(|judged| judged.holds(p)) {
            Some(_) => false,
            None => evolution::judge(storage, p, force)
                .await?
                .map_err(WriteError::Incompatible)?,
        };
        // The back-fill of the new version starts in the same storage command, which refuses the
        // freeze if the project changed since it was judged here.
        let judged = Some(Judged::of(p));
        let (version, revision) = storage.freeze_judged(project, forced, judged).await?;
        (version.number, revision)
    } else {
        let latest = p.latest().ok_or_else(|| {
            WriteError::Conflict("the working copy has no blueprints to freeze".into())
        })?;
        let backfill = storage.ensure_backfill(project, latest.number).await?;
        let unfinished = unfinished_migrations(p, latest.number);
        if unfinished.is_empty() {
            if backfill {
                return Ok(latest.number);
            }
            // Also the answer to a client that asks again after a 503 (or a lost answer), once
            // it is done; its back-fill may still run, which needs nothing more from the client.
            let retired = p.is_retired(latest.number);
            let filling = storage
                .backfill_state(project, latest.number)
                .await?
                .filter(|state| !state.finished)
                .map_or(String::new(), |state| match retired {
                    // Retiring a version stops its back-fill where it is.
                    true => format!(
                        "; it was retired, which stopped its back-fill ({} of about {} items)",
                        state.done, state.total
                    ),
                    // Counted once a node takes it up (after a crash, not yet).
                    false if state.total == 0 && state.done == 0 => {
                        "; its back-fill goes on by itself (not counted yet)".to_string()
                    }
                    false => format!(
                        "; its back-fill goes on by itself ({} of about {} items so far)",
                        state.done, state.total
                    ),
                });
            return Err(WriteError::Conflict(format!(
                "nothing changed since version {}, which every store has migrated{filling}",
                latest.number
            )));
        }
        // A back-fill started only now means the freeze's journal batch never ran (a crash
        // between the catalog and the journal): its migrations were never queued either.
        let again: Vec<String> = unfinished
            .iter()
            .filter(|name| {
                backfill
                    || matches!(
                        p.status[&latest.number].migrations.get(*name),
                        Some(MigrationState::Failed { .. })
                    )
            })
            .cloned()
            .collect();
        if again.is_empty() {
            // Still queued behind the stores' backlog: queueing them again would put the new
            // tasks behind more of it, and under a steady load no retry would ever see them
            // done. Wait for the ones queued.
            let behind = wait_migrated(storage, project, latest.number, wait).await;
            return match behind {
                None => Ok(latest.number),
                Some(behind) => Err(migration_pending(storage, project, latest.number, &behind)),
            };
        }
        retried.clone_from(&again);
        let revision = storage.remigrate(project, latest.number, again).await?;
        (latest.number, revision)
    };
    // A migration that failed (a schema or an index dstore did not make, a store refusing the
    // mapping) holds the project until it is put right: no point waiting out `wait` for it.
    let waited = tokio::select! {
        waited = storage.wait_projected(project, revision, wait) => waited,
        failed = failed_migrations(storage, project, number, &retried) => Err(failed),
    };
    if let Err(behind) = waited {
        return Err(migration_pending(storage, project, number, &behind));
    }
    Ok(number)
}

/// Finishes once a store's migration of version `number` failed, with those stores; never for
/// the stores in `retried`, whose state says how the try before ended until the new one does.
async fn failed_migrations(
    storage: &dyn Storage,
    project: &Ident,
    number: u32,
    retried: &[String],
) -> Vec<String> {
    loop {
        let snapshot = storage.snapshot();
        let failed = snapshot
            .projects
            .get(project)
            .map(|p| {
                migrations_where(p, number, |name, state| {
                    matches!(state, MigrationState::Failed { .. })
                        && !retried.iter().any(|r| r == name)
                })
            })
            .unwrap_or_default();
        if !failed.is_empty() {
            return failed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to `wait` until every store migrated `number`; answers the stores still behind then.
async fn wait_migrated(
    storage: &dyn Storage,
    project: &Ident,
    number: u32,
    wait: Duration,
) -> Option<Vec<String>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let behind = storage
            .snapshot()
            .projects
            .get(project)
            .map(|p| unfinished_migrations(p, number))
            .unwrap_or_default();
        if behind.is_empty() || tokio::time::Instant::now() >= deadline {
            return (!behind.is_empty()).then_some(behind);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The 503 of a freeze whose migrations have not finished in time, with each store's state.
fn migration_pending(
    storage: &dyn Storage,
    project: &Ident,
    number: u32,
    behind: &[String],
) -> WriteError {
    let snapshot = storage.snapshot();
    let reasons: Vec<String> = behind
        .iter()
        .map(|name| {
            let migration = snapshot
                .projects
                .get(project)
                .and_then(|p| p.status.get(&number))
                .and_then(|s| s.migrations.get(name).cloned());
            match migration {
                Some(MigrationState::Failed { error }) => format!("{name}: {error}"),
                _ => format!("{name}: still pending"),
            }
        })
        .collect();
    WriteError::MigrationPending(format!(
        "version {number} is frozen, but its migration has not finished ({}); it is retried in the background, and POST /{project}/_version again reports when it is done",
        reasons.join("; ")
    ))
}

/// The report of freezing the working copy now, changing nothing (`?dry_run=true`).
pub async fn freeze_report(
    storage: &dyn Storage,
    project: &Ident,
) -> Result<evolution::Report, WriteError> {
    let snapshot = storage.fresh_snapshot(project).await?;
    let p = snapshot.project(project)?;
    if !p.has_unfrozen_changes() {
        return Err(WriteError::Conflict(match p.latest() {
            Some(v) => format!("nothing changed since version {}", v.number),
            None => "the working copy has no blueprints to freeze".into(),
        }));
    }
    // Refused as the freeze would be, whatever the report says.
    crate::catalog::edit::room_for_a_version(p)?;
    evolution::report(storage, p).await
}

fn unfinished_migrations(p: &Project, number: u32) -> Vec<String> {
    migrations_where(p, number, |_, state| *state != MigrationState::Done)
}

/// The stores whose migration of version `number` passes `keep`.
fn migrations_where(
    p: &Project,
    number: u32,
    keep: impl Fn(&str, &MigrationState) -> bool,
) -> Vec<String> {
    p.status
        .get(&number)
        .map(|s| {
            s.migrations
                .iter()
                .filter(|(name, state)| keep(name, state))
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

impl From<crate::catalog::CatalogError> for WriteError {
    fn from(error: crate::catalog::CatalogError) -> Self {
        WriteError::Storage(error.into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::Value;

    use super::*;
    use crate::budget::Refused;
    use crate::storage::conformance::{frozen, open_embedded};

    /// A `_bulk` body of `article` puts, one for each title.
    fn body(titles: impl Iterator<Item = Value>) -> Bytes {
        let mut text = String::new();
        for title in titles {
            text.push_str(&format!(
                "{{\"put\":{{\"blueprint\":\"article\",\"id\":\"{}\"}}}}\n",
                Uuid::new_v4()
            ));
            text.push_str(&serde_json::json!({"project_version": 1, "title": title}).to_string());
            text.push('\n');
        }
        Bytes::from(text)
    }

    async fn run(
        storage: &dyn Storage,
        project: &Ident,
        raw: Bytes,
        hold: Hold<'_>,
    ) -> Result<Bulked, WriteError> {
        let ops = crate::bulk::parse(&raw).expect("a valid body");
        bulk(storage, project, &raw, ops, 1 << 20, hold).await
    }

    #[test]
    fn parts_hold_fewer_item_bytes_the_more_documents_each_item_makes() {
        let op = |bytes: usize| OwnedOp {
            action: Action::Put,
            blueprint: None,
            id: None,
            item: Some(0..bytes),
            error: None,
            stored_uid: None,
        };
        // 64 items of 1 MiB: 4 MiB of them a part with one live version, 1 MiB with seven.
        let ops: Vec<OwnedOp> = (0..64).map(|_| op(1 << 20)).collect();
        assert_eq!(part_bytes(2), 4 << 20);
        let none = |_: &OwnedOp| 0;
        assert_eq!(parts(&ops, part_bytes(2), none).len(), 16);
        assert_eq!(parts(&ops, part_bytes(8), none).len(), 64);
        // An item larger than a part is a part of its own; deletes count only their number.
        assert_eq!(
            parts(&[op(9 << 20), op(1)], part_bytes(2), none),
            [0..1, 1..2]
        );
        let deletes: Vec<OwnedOp> = (0..PART_OPERATIONS + 1).map(|_| op(0)).collect();
        assert_eq!(
            parts(&deletes, part_bytes(2), none),
            [0..PART_OPERATIONS, PART_OPERATIONS..PART_OPERATIONS + 1]
        );
        // Small items whose copies take about 1 MiB each: four a part.
        let small: Vec<OwnedOp> = (0..64).map(|_| op(10)).collect();
        assert_eq!(parts(&small, part_bytes(2), |_| (1 << 20) - 10).len(), 16);
    }

    fn busy(_: usize) -> Result<(), Refused> {
        Err(Refused::Busy { limit: 1 })
    }

    /// An item refused for its own values is checked once; a refusal a newer catalog could lift
    /// (a version this node may not know yet) is checked again against it.
    #[tokio::test]
    async fn only_a_refusal_a_newer_catalog_could_lift_is_prepared_again() {
        let (storage, _dir) = open_embedded().await;
        let project = frozen(storage.as_ref()).await;
        for (path, tries) in [("/title", 1), ("/project_version", 2)] {
            let calls = AtomicUsize::new(0);
            let refused = journal::<(), _>(storage.as_ref(), &project, &hold_nothing, |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(WriteError::Invalid(vec![FieldError::new(path, "refused")])) }
            })
            .await;
            assert!(matches!(refused, Err(WriteError::Invalid(_))));
            assert_eq!(calls.load(Ordering::SeqCst), tries, "{path}");
        }
    }

    /// Once a part is journaled, a budget others filled meanwhile does not stop the rest half
    /// written; while nothing is, it refuses the request as a whole (here after a first part of
    /// invalid items only, which journals nothing).
    #[tokio::test]
    async fn a_busy_budget_refuses_a_bulk_only_while_nothing_of_it_is_journaled() {
        let (storage, _dir) = open_embedded().await;
        let project = frozen(storage.as_ref()).await;
        let storage = storage.as_ref();
        let titles = |n: usize| (0..n).map(|i| Value::from(format!("t{i}")));
        let refused = run(storage, &project, body(titles(PART_OPERATIONS + 10)), &busy).await;
        assert!(matches!(
            refused,
            Err(WriteError::Memory(Refused::Busy { .. }))
        ));

        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let busy_after_one = |_: usize| match CALLS.fetch_add(1, Ordering::SeqCst) {
            0 => Ok(()),
            _ => Err(Refused::Busy { limit: 1 }),
        };
        let bulked = run(
            storage,
            &project,
            body(titles(PART_OPERATIONS + 10)),
            &busy_after_one,
        )
        .await
        .expect("the first part is journaled");
        assert!(bulked.stopped.is_none(), "{:?}", bulked.stopped);
        assert_eq!(bulked.outcomes.len(), PART_OPERATIONS + 10);
        assert!(bulked.outcomes.iter().all(Result::is_ok));
        assert_eq!(CALLS.load(Ordering::SeqCst), 2, "both parts were counted");

        let invalid = (0..PART_OPERATIONS).map(|_| Value::from(5));
        let refused = run(storage, &project, body(invalid.chain(titles(1))), &busy).await;
        assert!(matches!(
            refused,
            Err(WriteError::Memory(Refused::Busy { .. }))
        ));
    }
}
