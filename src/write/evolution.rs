//! What a freeze would do to the items of every live version: the compatibility report.
//!
//! For the working copy against every live version, each column that differs gets a verdict per
//! direction (`blueprint::compat`): old clients reading new writes, new clients reading old writes.
//! Then every stored item is moved both ways through the real transform, and the report counts
//! the items that would lose a value (arrive as null) or that a store would refuse (a null where the
//! column allows none). Nothing is changed.
//!
//! "New clients reading old writes" counts the stored items written at that version. "Old clients
//! reading new writes" counts the stored items as new clients would write them again, read by
//! clients of that version: an estimate of what the version's clients will miss.
//!
//! A column the new version makes unique (or that is unique and changes how values arrive in it),
//! compared with the newest live version, is counted too, and so are the unique columns of a
//! blueprint that lets in items that version's table never held (`unique_at_stake`). Every stored
//! item is taken as the new version would receive it, in the order the back-fill reads them, and
//! one whose value in a unique column an item taken before holds is one PostgreSQL's unique index
//! would refuse (`items_refused_as_duplicates`, part of `items_refused`). The same items are taken
//! into the newest live version's unique indexes as its table holds them: an item those refuse
//! already is not this freeze's doing, and is not counted. Duplicates make the verdict `breaking`,
//! so such a freeze needs `?force=true` like any other that leaves items out; with none it goes
//! through. Values are remembered as 64-bit keys (`blueprint::unique`), at most
//! [`UNIQUE_VALUES_TRACKED`] at once over every count running, so their memory is bounded whatever
//! the item count; past it the count is a lower bound and says so.
//!
//! A wide blueprint whose rows can outgrow a PostgreSQL row (`row_past_limit`) is counted the same
//! way when it changes: an item whose row in the new version would not fit is refused
//! (`items_refused_for_row_size`), which makes its version's verdict `breaking`.
//!
//! Items written at a retired version are no live version's, yet the freeze's back-fill moves them
//! from their own version into the new one like every other: `retired_versions` counts, per
//! retired version, those that would arrive losing a value or be refused, so a freeze whose verdict
//! (which only live clients decide) allows it still shows what it does to every stored item.
//!
//! Counts run on the HTTP workers, yielding to their other requests every few milliseconds. At
//! most one per core runs at once over every project ([`count_places`]), and one per project
//! ([`project_turn`]); further ones wait their turn in the order they came. Reports asked for by
//! one project again and again wait behind each other, taking one place at most, so the other
//! projects' counts run beside them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::WriteError;
use crate::blueprint::compat::{changed_columns, outcome, Assessment, ColumnPair, Verdict};
use crate::blueprint::transform::{forbidden_null, transform};
use crate::blueprint::unique::unique_key;
use crate::blueprint::{Blueprint, Blueprints, Change, Column, ColumnType, Ident, Uid};
use crate::catalog::{Compatibility, Project};
use crate::projector::postgres::{row_bytes, row_bytes_at_least, MAX_ROW_BYTES};
use crate::storage::{Storage, StorageError};

/// Items read at once while counting.
const PAGE: usize = 1000;
/// Columns counted between two yields to the HTTP worker's other requests (about 10 ms).
const YIELD_COLUMNS: usize = 16_384;
/// Values of unique columns remembered at once while counting duplicates, over every count the
/// process runs, by default (`server.max_counted_unique_values`; 8 bytes each in a hash set: about
/// 55 MiB at most, while one grows); past it, a value is compared with those remembered but not
/// remembered itself, and the count is only a lower bound: a column counted so is judged
/// `breaking` (the freeze takes `force`), since duplicates may remain that it could not see.
pub const UNIQUE_VALUES_TRACKED: usize = 2_000_000;

/// The room every running count shares (see [`UNIQUE_VALUES_TRACKED`]).
static ROOM: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(UNIQUE_VALUES_TRACKED);

/// Values remembered now by every running count (see [`UNIQUE_VALUES_TRACKED`]).
static TRACKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The places counts take while they run: one per core (see the module's documentation).
/// Tokio's semaphore is fair, so a count that waits is served before any that came after it.
fn count_places() -> &'static tokio::sync::Semaphore {
    static PLACES: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PLACES.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores)
    })
}

/// The turn of `project`'s counts: one runs at a time per project (see the module's
/// documentation). Kept while some count holds or awaits it.
fn project_turn(project: &Ident) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
    type Turns = Mutex<HashMap<Ident, Weak<tokio::sync::Mutex<()>>>>;
    static TURNS: OnceLock<Turns> = OnceLock::new();
    let mut turns = TURNS
        .get_or_init(Turns::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    turns.retain(|_, turn| turn.strong_count() > 0);
    if let Some(turn) = turns.get(project).and_then(Weak::upgrade) {
        return turn;
    }
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    turns.insert(project.clone(), Arc::downgrade(&turn));
    turn
}

/// Sets how many values every running duplicate count may remember together
/// (`server.max_counted_unique_values`).
pub fn set_unique_room(values: usize) {
    ROOM.store(values, Ordering::Relaxed);
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub project: Ident,
    pub compatibility: Compatibility,
    /// The number the version would get.
    pub version: u32,
    /// The worst verdict over every live version and direction (`breaking` too when items of a
    /// retired version would be refused as duplicates or for their row's size).
    pub verdict: Verdict,
    /// Whether `POST /{project}/_version` would freeze it without `?force=true`.
    pub allowed: bool,
    /// Stored items the counts are made of.
    pub items: u64,
    pub live_versions: Vec<VersionReport>,
    /// Retired versions that still hold stored items, in order.
    pub retired_versions: Vec<RetiredReport>,
    /// Unique columns whose duplicate count ran out of room for values and that no live
    /// version's column report shows (a blueprint only retired versions hold, or a column that
    /// did not change): each makes the verdict `breaking`, as a column report's would.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub incomplete_counts: Vec<IncompleteCount>,
}

/// A unique column whose duplicate count could not compare every value with every other.
#[derive(Debug, Serialize)]
pub struct IncompleteCount {
    pub blueprint: Ident,
    pub column: Ident,
    pub reason: String,
}

/// The items stored at one retired version, as the new version would receive them.
#[derive(Debug, Serialize)]
pub struct RetiredReport {
    pub version: u32,
    /// Items stored at this version.
    pub items: u64,
    /// What changes from this version to the working copy (the first [`MAX_LISTED`]).
    pub changes: Vec<Change>,
    /// Changes past [`MAX_LISTED`], counted.
    #[serde(skip_serializing_if = "is_zero")]
    pub changes_omitted: usize,
    pub new_clients_reading_old_writes: Counts,
}

/// Why a unique column whose count ran out of room takes `force`, and what to do.
const UNCOMPARED: &str = "values it could not keep were never compared with one another, so stored items may still hold a value another holds, which PostgreSQL's unique index would refuse in the new version: freeze with force=true once they are known to be unique, or when fewer freezes are counted at once";

/// Most changes, and most column reports, one version's part of a report lists: a project may
/// change some hundred thousand columns against each of its live versions, and a report of every
/// one would take gigabytes. The verdicts and counts still cover every column.
pub const MAX_LISTED: usize = 1000;

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The first [`MAX_LISTED`] of `changes`, and how many more there were.
fn listed(mut changes: Vec<Change>) -> (Vec<Change>, usize) {
    let omitted = changes.len().saturating_sub(MAX_LISTED);
    changes.truncate(MAX_LISTED);
    (changes, omitted)
}

#[derive(Debug, Serialize)]
pub struct VersionReport {
    pub version: u32,
    /// What changes from this version to the working copy (the first [`MAX_LISTED`]).
    pub changes: Vec<Change>,
    /// Changes past [`MAX_LISTED`], counted.
    #[serde(skip_serializing_if = "is_zero")]
    pub changes_omitted: usize,
    pub verdict: Verdict,
    /// Items (of every blueprint) that would lose at least one value, each way.
    pub old_clients_reading_new_writes: Counts,
    pub new_clients_reading_old_writes: Counts,
    /// The changed columns, each judged each way: past [`MAX_LISTED`] changed columns, only those
    /// that are not lossless both ways, and at most [`MAX_LISTED`] of them.
    pub columns: Vec<ColumnReport>,
    /// Changed columns not listed in `columns`, counted.
    #[serde(skip_serializing_if = "is_zero")]
    pub columns_omitted: usize,
    /// When this version is not lossless and a later one was frozen with force while it was live:
    /// why the loss that freeze accepted is judged again (its clients still write what the newer
    /// versions lose), and what ends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Items counted once each way: refused, or else losing a value (the two never overlap).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    /// Items in the version with at least one value arriving as null.
    pub items_losing_a_value: u64,
    /// Items not in the version (a null its column allows none), or not in its PostgreSQL table.
    pub items_refused: u64,
    /// Of `items_refused`, those whose value in a unique column another stored item holds, which
    /// the newest live version's index did not refuse already.
    pub items_refused_as_duplicates: u64,
    /// Of `items_refused`, those whose PostgreSQL row in the new version would be larger than a
    /// row may be (a wide blueprint whose columns grew, or took defaults).
    pub items_refused_for_row_size: u64,
}

#[derive(Debug, Serialize)]
pub struct ColumnReport {
    pub blueprint: Ident,
    /// The column's name in the working copy (or in the old version when it is removed).
    pub column: Ident,
    pub change: String,
    pub old_clients_reading_new_writes: Direction,
    pub new_clients_reading_old_writes: Direction,
}

#[derive(Debug, Serialize)]
pub struct Direction {
    #[serde(flatten)]
    pub assessment: Assessment,
    #[serde(flatten)]
    pub counts: Counts,
}

/// Whether the working copy may be frozen: `Ok(forced)`, whether it takes `force` (the version is
/// then marked forced), or the report that refuses it without `force`. The verdicts decide first,
/// without counting; unique columns at stake (`uniqueness_at_stake`), or a wide blueprint changed,
/// are then counted on the stored items, as only they tell whether the new version refuses any.
/// With `force` nothing is counted (a count of millions of items could outlast the request): the
/// freeze goes through, marked forced when the verdicts refuse it or a count could have.
pub async fn judge(
    storage: &dyn Storage,
    p: &Project,
    force: bool,
) -> Result<Result<bool, Box<Report>>, WriteError> {
    let allowed = p.working.compatibility.allows(worst_verdict(p));
    let at_stake = uniqueness_at_stake(p) || row_size_at_stake(p) || index_size_at_stake(p);
    match (allowed, force) {
        (_, true) => return Ok(Ok(!allowed || at_stake)),
        (true, false) if !at_stake => return Ok(Ok(false)),
        _ => {}
    }
    let report = report(storage, p).await?;
    Ok(match report.allowed {
        true => Ok(false),
        false => Err(Box::new(report)),
    })
}

/// Whether a column of the working copy becomes unique since the newest live version (or is
/// unique and changes how values arrive in it), or a blueprint with a unique column lets in items
/// that version's table never held (`unique_at_stake`): then only the stored items tell whether
/// the freeze refuses some. A column already unique as it is there refuses nothing more than that
/// version's index does (a retired version's index no longer sees writes, so it does not count).
pub fn uniqueness_at_stake(p: &Project) -> bool {
    !unique_at_stake(p).is_empty()
}

/// The working copy's blueprints whose unique indexes the stored items are counted against:
/// - one with a column made unique since the newest live version, or unique and changing how
///   values arrive in it (`ColumnPair::uniqueness_at_stake`);
/// - one with a unique column that may let in items the newest live version's table never held,
///   whose values never met its indexes: a column that refused nulls there (no default) goes,
///   takes nulls or a default, or changes its type, conversion or rules; a column unique there
///   goes or is unique no more (the items its index refused come in); a blueprint whose rows could
///   outgrow a PostgreSQL row there changes; or the blueprint is not in that version at all while
///   another version holds it (a newer one, retired: uids are never reused);
/// - one with two unique columns or more whose new version leaves items out (a null where a
///   column allows none): their values no longer hold another item back.
fn unique_at_stake(p: &Project) -> HashSet<Uid> {
    let newest = newest_live(p);
    let changed = changed_columns(newest, &p.working.blueprints);
    let lets_in = |pair: &ColumnPair| {
        let Some((_, old)) = pair.old else {
            return false;
        };
        let (old, new) = (&old.def, pair.new.map(|(_, c)| &c.def));
        let refused_nulls = !old.nullable && old.default.is_none();
        match new {
            None => refused_nulls || old.unique,
            Some(new) => {
                (refused_nulls
                    && (new.nullable
                        || new.default.is_some()
                        || new.ty != old.ty
                        || new.convert != old.convert
                        || new.validation != old.validation
                        || new.index != old.index))
                    || (old.unique && !new.unique)
            }
        }
    };
    p.working
        .blueprints
        .iter()
        .filter(|(_, bp)| bp.columns.values().any(|c| c.def.unique))
        .filter(|(name, bp)| {
            let mut mine = changed
                .iter()
                .filter(|pair| pair.blueprint == *name)
                .peekable();
            // With two unique columns, an item the new version leaves out (a null where it allows
            // none) frees its values for an item the newest version's index refused, whose other
            // values then take another item's place.
            let uniques = bp.columns.values().filter(|c| c.def.unique).count();
            let leaves_out = |pair: &ColumnPair| {
                uniques >= 2
                    && pair
                        .new
                        .is_some_and(|(_, c)| !c.def.nullable && c.def.default.is_none())
                    && pair.to_new().verdict == Verdict::Breaking
            };
            match blueprint_with(newest, bp.uid) {
                None => !p.holders(bp.uid).is_empty(),
                Some(old) => {
                    (might_outgrow_row(old) && mine.peek().is_some())
                        || mine.any(|pair| {
                            pair.uniqueness_at_stake() || lets_in(pair) || leaves_out(pair)
                        })
                }
            }
        })
        .map(|(_, bp)| bp.uid)
        .collect()
}

/// Whether a blueprint of the working copy whose rows can outgrow a PostgreSQL row
/// (`row_past_limit`) changes since the newest live version: then only the stored items tell
/// whether the new version's table refuses some.
/// Whether a column of the working copy holds its values in index entries the newest live
/// version's did not bound (`compat::outgrows_index`: a JSON value or array made unique): only the
/// stored values tell whether some are too large, and their items refused.
pub fn index_size_at_stake(p: &Project) -> bool {
    changed_columns(newest_live(p), &p.working.blueprints)
        .iter()
        .any(|pair| match (pair.old, pair.new) {
            (Some((_, old)), Some((_, new))) => {
                crate::blueprint::compat::outgrows_index(&old.def, &new.def).is_some()
            }
            _ => false,
        })
}

pub fn row_size_at_stake(p: &Project) -> bool {
    !wide_and_changed(p).is_empty()
}

/// The working copy's blueprints whose rows can outgrow a PostgreSQL row and that changed since
/// the newest live version (one unchanged refuses no more than that version's table does).
fn wide_and_changed(p: &Project) -> HashSet<Uid> {
    let changed = changed_columns(newest_live(p), &p.working.blueprints);
    p.working
        .blueprints
        .iter()
        .filter(|(name, bp)| {
            might_outgrow_row(bp) && changed.iter().any(|pair| pair.blueprint == *name)
        })
        .map(|(_, bp)| bp.uid)
        .collect()
}

/// Whether a blueprint's rows can outgrow a PostgreSQL row (`row_past_limit`).
fn might_outgrow_row(bp: &Blueprint) -> bool {
    row_bytes(bp) > MAX_ROW_BYTES
}

/// The blueprints of `set` whose rows can outgrow a PostgreSQL row.
fn might_outgrow(set: &Blueprints) -> HashSet<Uid> {
    set.values()
        .filter(|bp| might_outgrow_row(bp))
        .map(|bp| bp.uid)
        .collect()
}

/// The blueprints of the newest live version (of the newest version when none is live).
fn newest_live(p: &Project) -> &Blueprints {
    static NONE: std::sync::OnceLock<Blueprints> = std::sync::OnceLock::new();
    p.live_versions()
        .last()
        .or_else(|| p.latest())
        .map_or_else(|| NONE.get_or_init(Blueprints::default), |v| &v.blueprints)
}

/// Verdicts only, without counting items: what `compatibility = "lossless"` checks first.
pub fn worst_verdict(p: &Project) -> Verdict {
    p.live_versions()
        .flat_map(|v| changed_columns(&v.blueprints, &p.working.blueprints))
        .flat_map(|pair| [pair.to_new().verdict, pair.to_old().verdict])
        .max()
        .unwrap_or(Verdict::Lossless)
}

/// The working copy's report against every live version, counted on the stored items.
pub async fn report(storage: &dyn Storage, p: &Project) -> Result<Report, WriteError> {
    let turn = project_turn(&p.name);
    let _turn = turn.lock().await;
    // The semaphore is never closed; the error exists only in its type.
    let _place = count_places()
        .acquire()
        .await
        .map_err(|e| StorageError::Unavailable(e.to_string()))?;
    let new = &p.working.blueprints;
    let live: Vec<_> = p.live_versions().cloned().collect();
    let pairs: Vec<(u32, Vec<ColumnPair>)> = live
        .iter()
        .map(|v| (v.number, changed_columns(&v.blueprints, new)))
        .collect();
    let retired: Vec<(u32, Vec<ColumnPair>)> = p
        .versions
        .iter()
        .filter(|v| p.is_retired(v.number))
        .map(|v| (v.number, changed_columns(&v.blueprints, new)))
        .collect();
    let mut tally = Tally::default();
    tally.wide = wide_and_changed(p);
    tally.might_not_fit = might_outgrow(new);
    tally.newest_might_not_fit = might_outgrow(newest_live(p));
    tally.stake(p, &pairs, &retired);
    let mut after = None;
    // The columns each item is counted for: an item of a wide blueprint costs as much as hundreds
    // of a narrow one's.
    let width = 1 + pairs
        .iter()
        .chain(&retired)
        .map(|(_, columns)| columns.len())
        .sum::<usize>();
    let mut counted = 0;
    loop {
        let (items, next) = storage.scan_items(&p.name, after, PAGE).await?;
        for (_, record) in &items {
            tally.count(p, new, &pairs, &retired, record);
            // Counting runs on an HTTP worker: let its other requests run every so many columns
            // (a page of items of 900 columns took 0.8 s, which the worker's requests waited).
            counted += width;
            if counted >= YIELD_COLUMNS {
                counted = 0;
                tokio::task::yield_now().await;
            }
        }
        drop(items);
        tokio::task::yield_now().await;
        match next {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    let mut versions = Vec::new();
    // The unique columns a live version's column report already judges for a count out of room.
    let mut judged = HashSet::new();
    for (version, columns) in &pairs {
        let source = p.version(*version).expect("a live version exists");
        let mut reports = Vec::new();
        let mut columns_omitted = 0;
        let mut verdict = Verdict::Lossless;
        for (index, pair) in columns.iter().enumerate() {
            let counted = tally
                .columns
                .get(&(*version, index))
                .cloned()
                .unwrap_or_default();
            let (to_old, mut to_new) = (pair.to_old(), pair.to_new());
            let duplicates = counted.1.items_refused_as_duplicates;
            let capped = tally.capped(*version, index);
            if capped {
                judged.extend(tally.stake_of.get(&(*version, index)).copied());
            }
            let room = ROOM.load(Ordering::Relaxed);
            let bound = match capped {
                true => format!(" (at least: the count ran out of room for values, {room} at once over every count (server.max_counted_unique_values), and compared the rest with those it kept)"),
                false => String::new(),
            };
            if duplicates > 0 {
                to_new = Assessment {
                    verdict: Verdict::Breaking,
                    reason: format!(
                        "{}; {duplicates} stored items hold a value another stored item holds in this column, which is unique in the new version{bound}: PostgreSQL's unique index refuses them there (dead letters)",
                        to_new.reason
                    ),
                };
            } else if capped {
                // Not every value was compared with every other: duplicates may remain.
                to_new = Assessment {
                    verdict: Verdict::Breaking,
                    reason: format!(
                        "{}; no duplicate found{bound}, but {UNCOMPARED}",
                        to_new.reason
                    ),
                };
            }
            verdict = verdict.max(to_old.verdict).max(to_new.verdict);
            let lossless =
                to_old.verdict == Verdict::Lossless && to_new.verdict == Verdict::Lossless;
            if reports.len() >= MAX_LISTED || (lossless && columns.len() > MAX_LISTED) {
                columns_omitted += 1;
                continue;
            }
            reports.push(ColumnReport {
                blueprint: pair.blueprint.clone(),
                column: pair
                    .new
                    .or(pair.old)
                    .map(|(name, _)| name.clone())
                    .expect("a pair has a side"),
                change: pair.describe(),
                old_clients_reading_new_writes: Direction {
                    assessment: to_old,
                    counts: counted.0,
                },
                new_clients_reading_old_writes: Direction {
                    assessment: to_new,
                    counts: counted.1,
                },
            });
        }
        let totals = tally.versions.get(version).cloned().unwrap_or_default();
        // Duplicates in a column this version's own pairs do not show (it holds the column as the
        // working copy does, but its newer versions did not) still leave its items out, as rows
        // too large do.
        if totals.1.items_refused_as_duplicates + totals.1.items_refused_for_row_size > 0 {
            verdict = Verdict::Breaking;
        }
        // What was counted on the stored items is never contradicted by the verdict: a column
        // whose definitions looked lossless still lost or refused these.
        for counts in [&totals.0, &totals.1] {
            if counts.items_refused > 0 {
                verdict = Verdict::Breaking;
            } else if counts.items_losing_a_value > 0 {
                verdict = verdict.max(Verdict::Lossy);
            }
        }
        let forced_since = p
            .versions
            .iter()
            .find(|v| v.number > *version && v.forced)
            .map(|v| v.number);
        let note = forced_since
            .filter(|_| verdict != Verdict::Lossless)
            .map(|forced| {
                format!(
                    "version {forced} was frozen with force while version {version} was live; its clients still write values the newer versions lose or refuse, so every freeze is judged against it again until it is retired (POST /{}/_version/{version}/_retire) or the freeze is forced",
                    p.name
                )
            });
        let (changes, changes_omitted) = listed(crate::blueprint::diff(&source.blueprints, new));
        versions.push(VersionReport {
            version: *version,
            changes,
            changes_omitted,
            verdict,
            old_clients_reading_new_writes: totals.0,
            new_clients_reading_old_writes: totals.1,
            columns: reports,
            columns_omitted,
            note,
        });
    }
    let retired_versions: Vec<RetiredReport> = retired
        .iter()
        .filter_map(|(version, _)| {
            let (items, counts) = tally.retired.remove(version)?;
            let source = p.version(*version).expect("a retired version exists");
            let (changes, changes_omitted) =
                listed(crate::blueprint::diff(&source.blueprints, new));
            Some(RetiredReport {
                version: *version,
                items,
                changes,
                changes_omitted,
                new_clients_reading_old_writes: counts,
            })
        })
        .collect();
    // Items of a retired version are no live client's, but one refused as a duplicate or for its
    // row's size is left out of the new version like a live one.
    let refused_retired = retired_versions.iter().any(|r| {
        let counts = &r.new_clients_reading_old_writes;
        counts.items_refused_as_duplicates + counts.items_refused_for_row_size > 0
    });
    let room = ROOM.load(Ordering::Relaxed);
    let incomplete_counts: Vec<IncompleteCount> = tally
        .uniques
        .iter()
        .enumerate()
        .filter(|(at, unique)| unique.capped && !judged.contains(at))
        .filter_map(|(_, unique)| {
            let (name, _) = p
                .working
                .blueprints
                .iter()
                .find(|(_, bp)| bp.uid == unique.uid)?;
            Some(IncompleteCount {
                blueprint: name.clone(),
                column: unique.column.clone(),
                reason: format!(
                    "the duplicate count ran out of room for values ({room} at once over every count, server.max_counted_unique_values), and {UNCOMPARED}"
                ),
            })
        })
        .collect();
    let verdict = versions
        .iter()
        .map(|v| v.verdict)
        .chain(refused_retired.then_some(Verdict::Breaking))
        .chain((!incomplete_counts.is_empty()).then_some(Verdict::Breaking))
        .max()
        .unwrap_or(Verdict::Lossless);
    Ok(Report {
        project: p.name.clone(),
        compatibility: p.working.compatibility,
        version: p.latest().map_or(1, |v| v.number + 1),
        verdict,
        allowed: p.working.compatibility.allows(verdict),
        items: tally.items,
        live_versions: versions,
        retired_versions,
        incomplete_counts,
    })
}

/// Counts, per (version, column) and per version: (old clients reading new writes, new clients
/// reading old writes).
#[derive(Default)]
struct Tally {
    items: u64,
    columns: HashMap<(u32, usize), (Counts, Counts)>,
    versions: HashMap<u32, (Counts, Counts)>,
    /// Per retired version: items stored at it, and how the new version would receive them.
    retired: HashMap<u32, (u64, Counts)>,
    /// The unique columns of the working copy's blueprints counted (`unique_at_stake`), as the
    /// back-fill would fill their indexes.
    uniques: Vec<Unique>,
    /// The unique columns of the same blueprints in the newest live version, as the items its
    /// table holds filled them: what its indexes refuse already is not this freeze's doing.
    newest_uniques: Vec<Unique>,
    /// The blueprints counted (`unique_at_stake`).
    counted: HashSet<Uid>,
    /// The unique column counted of each (version, column index) of the pairs that show it.
    stake_of: HashMap<(u32, usize), usize>,
    /// Values this count remembers (part of [`TRACKED`]).
    tracked: usize,
    /// The working copy's blueprints whose rows can outgrow a PostgreSQL row and that changed
    /// since the newest live version (`wide_and_changed`).
    wide: HashSet<Uid>,
    /// The working copy's blueprints whose rows can outgrow a PostgreSQL row, changed or not.
    might_not_fit: HashSet<Uid>,
    /// The blueprints (by the working copy's uid) whose rows in the newest live version can
    /// outgrow a PostgreSQL row.
    newest_might_not_fit: HashSet<Uid>,
    /// One item's crossings of one version's columns, kept between items for its room.
    crossings: Vec<Crossing>,
}

/// A column (its index in a version's pairs) crossed by one item: (lost, refused) for old clients
/// reading it as new clients write it, and for new clients reading it as stored at that version
/// (only when it is).
type Crossing = (usize, (bool, bool), Option<(bool, bool)>);

impl Drop for Tally {
    fn drop(&mut self) {
        TRACKED.fetch_sub(self.tracked, Ordering::Relaxed);
    }
}

/// A unique column and the keys of the values the items its index took so far hold in it.
struct Unique {
    /// The working copy's blueprint.
    uid: Uid,
    column: Ident,
    ty: ColumnType,
    seen: HashSet<u64>,
    /// Whether a value was not remembered for want of room.
    capped: bool,
}

/// The unique columns of `uniques` (of blueprint `uid`) in which `item` holds a value an item
/// taken before holds. With none, the item is taken: its values are remembered (while there is
/// room: `TRACKED`; past it the column is `capped`). An item refused takes no value.
fn meet(
    uniques: &mut [Unique],
    tracked: &mut usize,
    uid: Uid,
    item: &serde_json::Map<String, serde_json::Value>,
) -> Vec<usize> {
    let mut keys = Vec::new();
    let mut duplicated = Vec::new();
    for (at, unique) in uniques.iter().enumerate().filter(|(_, u)| u.uid == uid) {
        let value = item
            .get(unique.column.as_str())
            .unwrap_or(&serde_json::Value::Null);
        match unique_key(unique.ty, value) {
            Some(key) if unique.seen.contains(&key) => duplicated.push(at),
            Some(key) => keys.push((at, key)),
            None => {}
        }
    }
    if !duplicated.is_empty() {
        return duplicated;
    }
    for (at, key) in keys {
        if TRACKED.fetch_add(1, Ordering::Relaxed) < ROOM.load(Ordering::Relaxed) {
            uniques[at].seen.insert(key);
            *tracked += 1;
        } else {
            TRACKED.fetch_sub(1, Ordering::Relaxed);
            uniques[at].capped = true;
        }
    }
    duplicated
}

fn blueprint_with(set: &Blueprints, uid: Uid) -> Option<&Blueprint> {
    set.values().find(|bp| bp.uid == uid)
}

impl Tally {
    /// Finds the unique columns to count: every unique column of the blueprints counted, in the
    /// working copy and in the newest live version, and the pairs of every version (live or
    /// retired) that show one of the working copy's.
    fn stake(
        &mut self,
        p: &Project,
        live: &[(u32, Vec<ColumnPair>)],
        retired: &[(u32, Vec<ColumnPair>)],
    ) {
        self.counted = unique_at_stake(p);
        let unique_columns = |set: &Blueprints, uid: Uid| -> Vec<Unique> {
            blueprint_with(set, uid).map_or_else(Vec::new, |bp| {
                bp.columns
                    .iter()
                    .filter(|(_, c)| c.def.unique)
                    .map(|(column, c)| Unique {
                        uid,
                        column: column.clone(),
                        ty: c.def.ty,
                        seen: HashSet::new(),
                        capped: false,
                    })
                    .collect()
            })
        };
        for &uid in &self.counted {
            self.uniques
                .extend(unique_columns(&p.working.blueprints, uid));
            self.newest_uniques
                .extend(unique_columns(newest_live(p), uid));
        }
        for (version, columns) in live.iter().chain(retired) {
            for (index, pair) in columns.iter().enumerate() {
                let Some((name, _)) = pair.new else {
                    continue;
                };
                let Some(uid) = p.working.blueprints.get(pair.blueprint).map(|bp| bp.uid) else {
                    continue;
                };
                let unique = self
                    .uniques
                    .iter()
                    .position(|u| u.uid == uid && &u.column == name);
                if let Some(at) = unique {
                    self.stake_of.insert((*version, index), at);
                }
            }
        }
    }

    /// The working copy's unique columns in which an item holds a value an item taken before
    /// holds, as the back-fill meets it (`as_new`: none when the new version's table does not
    /// hold it): none when the newest live version's indexes refuse it already (`as_newest`,
    /// met in the same order: none when that version's table does not hold it), as that is not
    /// this freeze's doing.
    fn duplicated(
        &mut self,
        uid: Uid,
        as_new: Option<&serde_json::Map<String, serde_json::Value>>,
        as_newest: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Vec<usize> {
        // Once the newest version's indexes ran out of room, they could miss a refusal of
        // theirs: every later item counts as refused there, so the count stays a lower bound.
        // (An item not in its table is refused by none of its indexes, capped or not.)
        let newest_capped = |tally: &Self| {
            tally
                .newest_uniques
                .iter()
                .any(|u| u.uid == uid && u.capped)
        };
        let capped = newest_capped(self);
        let refused_before = as_newest.is_some_and(|item| {
            capped || !meet(&mut self.newest_uniques, &mut self.tracked, uid, item).is_empty()
        });
        if newest_capped(self) {
            for unique in self.uniques.iter_mut().filter(|u| u.uid == uid) {
                unique.capped = true;
            }
        }
        let Some(item) = as_new else {
            return Vec::new();
        };
        let duplicated = meet(&mut self.uniques, &mut self.tracked, uid, item);
        match refused_before {
            true => Vec::new(),
            false => duplicated,
        }
    }

    /// Whether the unique column of the pair `index` of `version` ran out of room for values.
    fn capped(&self, version: u32, index: usize) -> bool {
        self.stake_of
            .get(&(version, index))
            .is_some_and(|&at| self.uniques[at].capped)
    }

    fn count(
        &mut self,
        p: &Project,
        new: &Blueprints,
        pairs: &[(u32, Vec<ColumnPair>)],
        retired: &[(u32, Vec<ColumnPair>)],
        record: &crate::journal::ItemRecord,
    ) {
        self.items += 1;
        let uid = record.blueprint_uid;
        let retired_columns = retired
            .iter()
            .find(|(version, _)| *version == record.version)
            .map(|(_, columns)| columns);
        if retired_columns.is_some() {
            self.retired.entry(record.version).or_default().0 += 1;
        }
        let (Some(own), Some(new_bp)) = (
            p.version(record.version)
                .and_then(|v| blueprint_with(&v.blueprints, uid)),
            blueprint_with(new, uid),
        ) else {
            return;
        };
        // The item as new clients would see it (and would write it again).
        let as_new = transform(&record.body, own, new_bp, 0);
        let new_name = new_name(new, uid);
        // An item with a null the new version allows none is in none of its stores; one whose
        // row PostgreSQL cannot hold is not in its table.
        let enters = forbidden_null(new_bp, &as_new).is_none();
        let row_too_big = |bp: &Blueprint, item: &serde_json::Map<String, serde_json::Value>| {
            let values = bp
                .columns
                .keys()
                .map(|name| item.get(name.as_str()).unwrap_or(&serde_json::Value::Null));
            row_bytes_at_least(bp, values) > MAX_ROW_BYTES
        };
        let fits = enters && !(self.might_not_fit.contains(&uid) && row_too_big(new_bp, &as_new));
        // The item as the newest live version holds it, when something below asks.
        let counted =
            self.counted.contains(&uid) && self.newest_uniques.iter().any(|u| u.uid == uid);
        let newest = blueprint_with(newest_live(p), uid);
        let as_newest = newest
            .filter(|_| counted || (!fits && enters && self.wide.contains(&uid)))
            .map(|newest| transform(&record.body, own, newest, 0));
        let newest_fits = |item: &serde_json::Map<String, serde_json::Value>| {
            newest.is_some_and(|newest| {
                !(self.newest_might_not_fit.contains(&uid) && row_too_big(newest, item))
            })
        };
        // Not this freeze's doing when the newest live version's table refuses the row already.
        let too_big = !fits
            && enters
            && self.wide.contains(&uid)
            && as_newest.as_ref().is_none_or(newest_fits);
        // The unique columns in which an item counted before holds this one's value, as the
        // back-fill meets the items. One not in a version's table takes no place in its indexes.
        let duplicated = match self.counted.contains(&uid) {
            false => Vec::new(),
            true => {
                let in_newest = as_newest.as_ref().filter(|item| {
                    newest.is_some_and(|n| forbidden_null(n, item).is_none()) && newest_fits(item)
                });
                self.duplicated(uid, fits.then_some(&as_new), in_newest)
            }
        };
        // Whether column `index` of the item's own version's pairs refuses it as a duplicate.
        let duplicate_at = |tally: &Tally, index: usize| {
            tally
                .stake_of
                .get(&(record.version, index))
                .is_some_and(|at| duplicated.contains(at))
        };
        if let Some(columns) = retired_columns {
            // New clients reading the item stored at a retired version: the back-fill moves it.
            let (mut lost, mut refused) = (false, false);
            for pair in columns.iter().filter(|c| c.blueprint.as_str() == new_name) {
                let (lose, refuse) = crossing(&record.body, pair.old, pair.new);
                lost |= lose;
                refused |= refuse;
            }
            let duplicate = !duplicated.is_empty();
            let counts = &mut self.retired.entry(record.version).or_default().1;
            let refused = refused || duplicate || too_big;
            counts.items_losing_a_value += u64::from(lost && !refused);
            counts.items_refused += u64::from(refused);
            counts.items_refused_as_duplicates += u64::from(duplicate);
            counts.items_refused_for_row_size += u64::from(too_big);
        }
        for (version, columns) in pairs {
            if p.version(*version)
                .and_then(|v| blueprint_with(&v.blueprints, uid))
                .is_none()
            {
                continue;
            }
            let mine = record.version == *version;
            // Each column's crossing, each way (the second for the items stored at this version
            // only), before any is counted: a column counts an item losing its value only when
            // no column refuses the item.
            let mut crossings = std::mem::take(&mut self.crossings);
            crossings.clear();
            crossings.extend(
                columns
                    .iter()
                    .enumerate()
                    .filter(|(_, pair)| pair.blueprint.as_str() == new_name)
                    .map(|(index, pair)| {
                        (
                            index,
                            // Old clients reading the item as new clients write it.
                            crossing(&as_new, pair.new, pair.old),
                            // New clients reading the item stored at this version.
                            mine.then(|| crossing(&record.body, pair.old, pair.new)),
                        )
                    }),
            );
            // Counted in the totals even where no pair of this version shows the column.
            let backward_duplicate = mine && !duplicated.is_empty();
            let backward_too_big = mine && too_big;
            let forward_lost = crossings.iter().any(|(_, (lose, _), _)| *lose);
            let forward_refused = crossings.iter().any(|(_, (_, refuse), _)| *refuse);
            let backward_lost = crossings.iter().any(|(_, _, b)| b.is_some_and(|b| b.0));
            let backward_refused = backward_duplicate
                || backward_too_big
                || crossings.iter().any(|(_, _, b)| b.is_some_and(|b| b.1));
            for &(index, (lose, refuse), backward) in &crossings {
                let duplicate = mine && duplicate_at(self, index);
                let entry = self.columns.entry((*version, index)).or_default();
                entry.0.items_losing_a_value += u64::from(lose && !forward_refused);
                entry.0.items_refused += u64::from(refuse);
                if let Some((lose, refuse)) = backward {
                    entry.1.items_losing_a_value += u64::from(lose && !backward_refused);
                    entry.1.items_refused += u64::from(refuse || duplicate);
                    entry.1.items_refused_as_duplicates += u64::from(duplicate);
                }
            }
            self.crossings = crossings;
            let totals = self.versions.entry(*version).or_default();
            // An item counts once each way: refused when it is not in the version (or not in
            // its PostgreSQL table), else losing a value when one arrives as null.
            totals.0.items_losing_a_value += u64::from(forward_lost && !forward_refused);
            totals.0.items_refused += u64::from(forward_refused);
            totals.1.items_losing_a_value += u64::from(backward_lost && !backward_refused);
            totals.1.items_refused += u64::from(backward_refused);
            totals.1.items_refused_as_duplicates += u64::from(backward_duplicate);
            totals.1.items_refused_for_row_size += u64::from(backward_too_big);
        }
    }
}

/// An item's column moving from `from` (as stored in `body`) to `to`: whether its value is lost
/// and whether the item is refused. A column `to` adds arrives null.
fn crossing(
    body: &serde_json::Map<String, serde_json::Value>,
    from: Option<(&Ident, &Column)>,
    to: Option<(&Ident, &Column)>,
) -> (bool, bool) {
    match (from, to) {
        (Some((name, from)), Some((_, to))) => outcome(
            body.get(name.as_str()).unwrap_or(&serde_json::Value::Null),
            &from.def,
            &to.def,
        ),
        (None, Some((_, to))) => (false, !to.def.nullable && to.def.default.is_none()),
        _ => (false, false),
    }
}

/// The working copy's name of the blueprint with `uid`.
fn new_name(new: &Blueprints, uid: Uid) -> &str {
    new.iter()
        .find(|(_, bp)| bp.uid == uid)
        .map_or("", |(name, _)| name.as_str())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::{count_places, project_turn, report};
    use crate::blueprint::Ident;
    use crate::storage::conformance::{frozen, open_embedded, put_article, write};
    use crate::storage::Storage;

    /// Project `p` frozen with one item, its working copy adding a column: a freeze to count.
    async fn changed(storage: &dyn Storage) -> Ident {
        let project = frozen(storage).await;
        write(storage, &project, Uuid::new_v4(), "one").await;
        put_article(storage, &project, Some("pages")).await;
        project
    }

    /// While every place is taken, a count waits its turn; it runs once a place is free.
    #[tokio::test]
    async fn a_count_waits_while_every_place_is_taken() {
        let (storage, _dir) = open_embedded().await;
        let project = changed(storage.as_ref()).await;
        let snapshot = storage.snapshot();
        let p = snapshot.project(&project).unwrap();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let every = count_places().acquire_many(cores as u32).await.unwrap();
        let mut counting = std::pin::pin!(report(storage.as_ref(), p));
        let early = tokio::time::timeout(Duration::from_millis(300), &mut counting).await;
        assert!(early.is_err(), "a count ran without a place");
        drop(every);
        let counted = counting.await.unwrap();
        assert_eq!(counted.items, 1);
        assert_eq!(counted.live_versions[0].columns.len(), 1, "{counted:?}");
    }

    /// A project's count waits while another of the same project runs; another project's does
    /// not.
    #[tokio::test]
    async fn a_projects_counts_run_one_at_a_time() {
        let (storage, _dir) = open_embedded().await;
        let project = changed(storage.as_ref()).await;
        let snapshot = storage.snapshot();
        let p = snapshot.project(&project).unwrap();
        let turn = project_turn(&project);
        let running = turn.lock().await;
        let mut counting = std::pin::pin!(report(storage.as_ref(), p));
        let early = tokio::time::timeout(Duration::from_millis(300), &mut counting).await;
        assert!(early.is_err(), "two counts of one project ran at once");
        let other = crate::blueprint::Ident::parse("other").unwrap();
        put_article(storage.as_ref(), &other, None).await;
        storage.freeze(&other, false).await.unwrap();
        put_article(storage.as_ref(), &other, Some("pages")).await;
        let snapshot = storage.snapshot();
        let counted = tokio::time::timeout(
            Duration::from_secs(30),
            report(storage.as_ref(), snapshot.project(&other).unwrap()),
        )
        .await
        .expect("another project's count runs")
        .unwrap();
        assert_eq!(counted.project, other);
        drop(running);
        assert_eq!(counting.await.unwrap().items, 1);
    }
}
