//! The change feed: every write of a project in revision order, as a client of one version sees it.
//!
//! Each backend keeps, per project, the latest change of every item ordered by revision (a put with
//! the item's latest state, or a delete) — not every past write. Reading from `since` therefore gives
//! every item changed after `since` exactly once, at its latest revision, so a follower that resumes
//! from the last revision it saw misses nothing and, within one read, sees nothing twice.
//!
//! Deletes are kept as tombstones for `changes.tombstone_retention_secs`, then purged ([`compact`]);
//! the highest purged revision is the project's *horizon* (a dropped project's horizon is its drop).
//! A follower whose `since` is below the horizon may have missed a delete, so it is refused
//! ([`FeedError::Compacted`]) and told to read again from `since=0`, which gives the latest state of
//! every item. A read from `since=0` goes on below the horizon with the pass it is handed
//! ([`pass`]): every delete compacted at or below it was made before the read began.
//!
//! [`signal`] wakes followers when their project commits; HTTP formats live in `http::changes`.

pub mod signal;

use std::sync::Weak;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::blueprint::transform::into_version;
use crate::blueprint::Ident;
use crate::catalog::{Project, Snapshot, Version};
use crate::journal::ItemRecord;
use crate::storage::{Storage, StorageError};

/// The latest change of one item, as a backend keeps it.
#[derive(Clone, Debug)]
pub struct Change {
    pub revision: u64,
    pub blueprint: Ident,
    pub id: Uuid,
    /// The item's state at `revision`; `None` for a delete.
    pub record: Option<ItemRecord>,
}

/// The item bytes (decoded: [`decoded_size`]) past which a page of changes takes no more: a page holds at least
/// one change, and at most `limit` or as many as reach this, so a page of large items stays a few
/// MiB whatever `limit` a follower asks for; the next page goes on from its last revision.
pub const PAGE_BYTES: usize = 8 << 20;

/// The memory an item body takes once decoded, which is what a page counts against
/// [`PAGE_BYTES`]: decoded, a body can take many times its stored bytes (an array of 340,000
/// one-digit numbers: 680 KB stored, about 25 MB decoded), and a page is decoded, transformed
/// and answered whole.
pub fn decoded_size(body: &serde_json::Map<String, serde_json::Value>) -> usize {
    crate::json::object_heap_bytes(body)
}

/// Changes after some revision, with the project's horizon (see the module docs).
#[derive(Debug, Default)]
pub struct ChangesPage {
    pub changes: Vec<Change>,
    pub horizon: u64,
    /// The project's last revision committed when the page was read: every change up to it was
    /// committed before the read (see [`pass`]).
    pub head: u64,
    /// What the changes' items take decoded ([`decoded_size`]), which is what presenting and
    /// encoding them costs.
    pub bytes: usize,
    /// The page ended before the last change committed for a reason `bytes` does not show (the
    /// storage left out changes past the page's bytes as it stores them): it is full.
    pub cut: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Delete,
}

/// One change as a follower receives it.
#[derive(Debug, Serialize)]
pub struct FeedEntry {
    pub revision: u64,
    pub blueprint: Ident,
    pub id: Uuid,
    pub op: Op,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<Map<String, Value>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The changes up to `horizon` were compacted (or the project was dropped since `since`).
    #[error(
        "changes up to revision {horizon} are no longer kept (deletes are kept for a limited time, \
         and dropping a project forgets its history): read the feed again from since=0, which gives \
         the latest state of every item, and replace what you hold of the project with it"
    )]
    Compacted { horizon: u64 },
    /// The project or the followed version went away while following.
    #[error("{0}")]
    Gone(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The page read would pass the memory requests may hold (`server.max_inflight_bytes`).
    #[error("{refused}")]
    Budget {
        refused: crate::budget::Refused,
        bytes: usize,
    },
}

/// What a follower reads: one project, as clients of one version see it, perhaps only some
/// blueprints.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Follower {
    pub project: Ident,
    pub version: u32,
    /// Only these blueprints (their names at `version`); every blueprint when `None`.
    pub blueprints: Option<Vec<Ident>>,
}

/// Where a page of the feed ends, and the horizon it was read under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Place {
    /// The revision to read after next: the last change looked at (shown or filtered out), or the
    /// `since` the page was read from when there was none.
    pub last_revision: u64,
    /// The project's horizon when the page was read.
    pub horizon: u64,
    /// What the reader is handed to pass back as `horizon` with `last_revision` (see [`pass`]).
    pub pass: u64,
}

/// A page of the feed, made into `T` (its encoding), and where the next one starts.
#[derive(Debug, Default)]
pub struct Page<T> {
    pub body: T,
    /// How many changes the follower sees in it.
    pub shown: usize,
    pub place: Place,
    /// Whether the page ended at its limit (`limit` changes, or `max_bytes`), not at the last
    /// change committed when it was read: a full page holds the same whenever it is read, until
    /// its items change again.
    pub full: bool,
}

/// Why a follower cannot be made: the field at fault and the message.
#[derive(Debug)]
pub enum FollowError {
    NotFound(String),
    Invalid(&'static str, String),
}

impl Follower {
    /// A follower of `version` (the newest live one when `None`), refusing unknown and retired versions and
    /// blueprints that version does not have.
    pub fn new(
        snapshot: &Snapshot,
        project: &Ident,
        version: Option<u32>,
        blueprints: Option<Vec<Ident>>,
    ) -> Result<Follower, FollowError> {
        let p = snapshot.projects.get(project).ok_or_else(|| {
            FollowError::NotFound(format!("project {:?} does not exist", project.as_str()))
        })?;
        let number = match version {
            Some(n) => n,
            // The newest live version: a retired newest one is no default to follow.
            None => p.live_versions().last().map(|v| v.number).ok_or_else(|| {
                FollowError::NotFound(format!(
                    "project {:?} has no live version",
                    project.as_str()
                ))
            })?,
        };
        let Some(frozen) = p.version(number) else {
            return Err(FollowError::NotFound(format!(
                "version {number} of project {:?} does not exist",
                project.as_str()
            )));
        };
        if p.is_retired(number) {
            return Err(FollowError::Invalid(
                "version",
                format!("version {number} is retired; follow a live version"),
            ));
        }
        if let Some(names) = &blueprints {
            if let Some(missing) = names.iter().find(|n| !frozen.blueprints.contains_key(*n)) {
                return Err(FollowError::Invalid(
                    "blueprint",
                    format!("version {number} has no blueprint {:?}", missing.as_str()),
                ));
            }
        }
        Ok(Follower {
            project: project.clone(),
            version: number,
            blueprints,
        })
    }

    /// The changes after `since` (at most `limit` looked at), as the follower sees them, made
    /// into what is sent by `finish` (an encoding). Presenting and finishing a page of large
    /// items takes as long as reading it, so both run off the HTTP worker then, in one hand-off
    /// (`crate::aside`).
    ///
    /// The page may start below the horizon: whether the reader may have it is
    /// [`check_horizon`]'s to say, for the horizon each reader of the page was given.
    ///
    /// `held` is told the bytes of the changes read before they wait to be presented, and may
    /// refuse to hold them (the request memory budget): a page waiting its turn is counted.
    pub async fn page<T: Send + 'static>(
        &self,
        storage: &dyn Storage,
        (since, passed): (u64, Option<u64>),
        (limit, max_bytes): (usize, usize),
        held: impl FnOnce(usize) -> Result<(), FeedError>,
        finish: impl FnOnce(&[FeedEntry], Place) -> T + Send + 'static,
    ) -> Result<Page<T>, FeedError> {
        let page = storage
            .changes(&self.project, since, limit, max_bytes)
            .await?;
        let mut snapshot = storage.snapshot();
        let presented = self.presented_bytes(&snapshot, &page, max_bytes);
        held(presented)?;
        let place = Place {
            last_revision: page.changes.last().map_or(since, |c| c.revision),
            horizon: page.horizon,
            pass: pass(since, passed, page.horizon, page.head),
        };
        let full = page.changes.len() >= limit || page.bytes >= max_bytes || page.cut;
        // A change made at a version this node does not know yet: read the catalog again, once.
        let unknown = |s: &Snapshot| {
            page.changes.iter().any(|c| {
                c.record.as_ref().is_some_and(|r| {
                    s.projects
                        .get(&self.project)
                        .is_none_or(|p| p.version(r.version).is_none())
                })
            })
        };
        if unknown(&snapshot) {
            snapshot = storage.fresh_snapshot(&self.project).await?;
        }
        let follower = self.clone();
        let changes = page.changes;
        crate::aside::sized(presented, move || {
            let (entries, cut) = follower.present_all(&snapshot, changes, max_bytes)?;
            let place = Place {
                last_revision: cut.unwrap_or(place.last_revision),
                ..place
            };
            Ok(Page {
                body: finish(&entries, place),
                shown: entries.len(),
                place,
                full: full || cut.is_some(),
            })
        })
        .await
        .map_err(StorageError::Unavailable)?
    }

    /// About the most a page's items take as the follower's version shows them: as stored, and
    /// for each change written at another version the most a copy adds to an item of that
    /// version (`Blueprint::copy_overhead`), within what [`Follower::present_all`] keeps of a
    /// page (`max_bytes` and one item). What the page is counted at against the request memory
    /// budget, and whether presenting it leaves the HTTP worker.
    fn presented_bytes(&self, snapshot: &Snapshot, page: &ChangesPage, max_bytes: usize) -> usize {
        let copied = page
            .changes
            .iter()
            .filter(|c| c.record.as_ref().is_some_and(|r| r.version != self.version))
            .count();
        if copied == 0 {
            return page.bytes;
        }
        let overhead = snapshot
            .projects
            .get(&self.project)
            .and_then(|p| p.version(self.version))
            .and_then(|v| v.blueprints.values().map(|bp| bp.copy_overhead()).max())
            .unwrap_or(0);
        let most = max_bytes.max(page.bytes).saturating_add(overhead);
        page.bytes
            .saturating_add(copied.saturating_mul(overhead))
            .min(most)
    }

    /// The changes of a page as the follower sees them, or why it can follow no more; with the
    /// revision the page was cut after, when the items presented reached `max_bytes` (decoded)
    /// before its last change. The storage bounds a page by its items as stored, at the versions
    /// they were written at; another version can make each many times larger (a column it added
    /// takes its default in every item), so what is presented is bounded again.
    fn present_all(
        &self,
        snapshot: &Snapshot,
        changes: Vec<Change>,
        max_bytes: usize,
    ) -> Result<(Vec<FeedEntry>, Option<u64>), FeedError> {
        let p = snapshot.projects.get(&self.project).ok_or_else(|| {
            FeedError::Gone(format!("project {:?} was dropped", self.project.as_str()))
        })?;
        let target = p
            .version(self.version)
            .ok_or_else(|| FeedError::Gone(format!("version {} no longer exists", self.version)))?;
        if p.is_retired(self.version) {
            return Err(FeedError::Gone(format!(
                "version {} was retired; follow a live version",
                self.version
            )));
        }
        let (mut entries, mut bytes) = (Vec::new(), 0);
        let mut changes = changes.into_iter().peekable();
        while let Some(change) = changes.next() {
            let revision = change.revision;
            if let Some(entry) = self.present(p, target, change) {
                bytes += entry.item.as_ref().map_or(0, decoded_size);
                entries.push(entry);
            }
            if bytes >= max_bytes && changes.peek().is_some() {
                return Ok((entries, Some(revision)));
            }
        }
        Ok((entries, None))
    }

    /// One change as clients of the followed version see it; `None` when they do not see it (a
    /// blueprint that version lacks, or one the follower filtered out).
    fn present(&self, p: &Project, target: &Version, change: Change) -> Option<FeedEntry> {
        let wanted = |name: &Ident| self.blueprints.as_ref().is_none_or(|b| b.contains(name));
        let Some(record) = change.record else {
            if !target.blueprints.contains_key(&change.blueprint) || !wanted(&change.blueprint) {
                return None;
            }
            return Some(FeedEntry {
                revision: change.revision,
                blueprint: change.blueprint,
                id: change.id,
                op: Op::Delete,
                item: None,
            });
        };
        let uid = record.blueprint_uid;
        let (name, to) = target.blueprints.iter().find(|(_, bp)| bp.uid == uid)?;
        if !wanted(name) {
            return None;
        }
        let item = if record.version == target.number {
            Some(record.body)
        } else {
            let from = p
                .version(record.version)?
                .blueprints
                .values()
                .find(|bp| bp.uid == uid)?;
            // An item the version cannot hold (after a forced breaking freeze) is not in it: its
            // followers see it deleted, as its stores do.
            into_version(&record.body, from, to, target.number).ok()
        };
        Some(FeedEntry {
            revision: change.revision,
            blueprint: name.clone(),
            id: change.id,
            op: if item.is_some() { Op::Put } else { Op::Delete },
            item,
        })
    }
}

/// What a reader of the page after `since` is handed to pass back as `horizon`, given the one it
/// passed (`passed`) and the page's `horizon` and `head`.
///
/// A compacted delete a reader never reached could have removed an item it holds, unless the
/// item was deleted before the reader began: a reader from 0 never read an item whose delete was
/// committed before its first page, since that page and every later one read the delete instead.
/// Only deletes are compacted, and the horizon is the highest compacted one, so a reader that
/// began when the project's last revision was `b` may go on while the horizon is at most `b`,
/// however often compaction moved it meanwhile. Its pass is that `b`: the head of its first
/// page (and at least the horizon then), handed on from page to page while it is above the
/// reader's place; past it the pass says no more than `since` does, and the horizon is handed out.
/// (A pass held only while the horizon stayed put ended every read from 0 of a project that took
/// longer than the compaction interval while deletes kept coming.)
pub fn pass(since: u64, passed: Option<u64>, horizon: u64, head: u64) -> u64 {
    match (since, useful(since, passed)) {
        (0, _) => horizon.max(head),
        (_, Some(pass)) => pass.max(horizon),
        (_, None) => horizon,
    }
}

/// The pass a reader at `since` holds that says more than `since` does: none past it (see
/// [`pass`]), and none from 0, where the page gives it.
pub fn useful(since: u64, passed: Option<u64>) -> Option<u64> {
    passed.filter(|pass| since != 0 && *pass > since)
}

/// Refuses a page read from a `since` below the horizon it was read under (`place`): the reader
/// may have missed a compacted delete. Unless it starts from 0, or the pass it was handed
/// (`passed`, see [`pass`]) is at least the horizon: every delete compacted was then committed
/// before the reader began.
pub fn check_horizon(since: u64, passed: Option<u64>, place: Place) -> Result<(), FeedError> {
    if since != 0 && since < place.horizon && passed.is_none_or(|pass| place.horizon > pass) {
        return Err(FeedError::Compacted {
            horizon: place.horizon,
        });
    }
    Ok(())
}

/// Purges tombstones older than `retention`, every `interval`, for as long as the storage lives.
pub async fn compact(storage: Weak<dyn Storage>, retention: Duration, interval: Duration) {
    loop {
        let Some(node) = storage.upgrade() else {
            return;
        };
        let before = Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
        match node.purge_tombstones(before).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "old deletes removed from the change feed"),
            Err(error) => tracing::warn!(%error, "cannot compact the change feed"),
        }
        drop(node);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use uuid::Uuid;

    use super::*;
    use crate::storage::conformance;

    /// A page the request memory budget cannot hold is refused as soon as it is read: it is never
    /// presented nor encoded while it waits its turn.
    #[tokio::test]
    async fn a_page_the_budget_refuses_is_never_presented() {
        let (storage, _dir) = conformance::open_embedded().await;
        let project = conformance::frozen(storage.as_ref()).await;
        for n in 0..3 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{n}")).await;
        }
        let follower = Follower::new(&storage.snapshot(), &project, None, None).unwrap();
        let refuse = |bytes: usize| {
            Err(FeedError::Budget {
                refused: crate::budget::Refused::Busy { limit: 1 },
                bytes,
            })
        };
        let presented = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = presented.clone();
        let finish = move |_: &[FeedEntry], _| seen.store(true, Ordering::SeqCst);
        let refused = follower
            .page(storage.as_ref(), (0, None), (100, 1 << 20), refuse, finish)
            .await;
        assert!(matches!(refused, Err(FeedError::Budget { bytes, .. }) if bytes > 0));
        assert!(!presented.load(Ordering::SeqCst));
        let (shown, held) = shown_and_held(storage.as_ref(), &follower).await;
        assert_eq!(shown, 3);
        assert!(held > 0);
    }

    /// How many changes the first page shows `follower`, and the bytes it was counted at.
    async fn shown_and_held(storage: &dyn Storage, follower: &Follower) -> (usize, usize) {
        let mut held = 0;
        let page = follower
            .page(
                storage,
                (0, None),
                (100, 1 << 20),
                |bytes| {
                    held = bytes;
                    Ok(())
                },
                |entries: &[FeedEntry], _| entries.len(),
            )
            .await
            .unwrap();
        (page.body, held)
    }

    /// A page of items written before a version that adds columns with long defaults is counted
    /// at about what they take as that version shows them, not as stored, within a page's bytes
    /// and one item: the budget holds it, and presenting it leaves the HTTP worker.
    #[tokio::test]
    async fn a_page_is_counted_as_the_followed_version_shows_its_items() {
        let (storage, _dir) = conformance::open_embedded().await;
        let project = conformance::frozen(storage.as_ref()).await;
        for n in 0..3 {
            conformance::write(storage.as_ref(), &project, Uuid::new_v4(), &format!("t{n}")).await;
        }
        conformance::put_wide_article(storage.as_ref(), &project, 10).await;
        storage.freeze(&project, false).await.unwrap();
        let read = |version: u32| {
            let follower = Follower::new(&storage.snapshot(), &project, Some(version), None);
            let storage = storage.clone();
            async move { shown_and_held(storage.as_ref(), &follower.unwrap()).await }
        };
        let (shown, stored) = read(1).await;
        assert_eq!(shown, 3);
        let (shown, copied) = read(2).await;
        assert_eq!(shown, 3);
        assert!(copied >= stored + 3 * 40_000, "{copied} against {stored}");
    }
}
