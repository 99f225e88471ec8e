//! The records the catalog keeps per project: the working copy, frozen versions and their status.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blueprint::{Blueprint, Blueprints, Change, Ident, Uid};

/// What a freeze may do to the items of live versions (see `write::evolution`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compatibility {
    /// A freeze that would lose values for some live version answers 409 unless forced.
    #[default]
    Lossless,
    /// Freezes that lose values go through; the report still says what is lost. A breaking freeze
    /// (items a store would refuse) still needs `?force=true`.
    LossyAllowed,
}

impl Compatibility {
    /// Whether a freeze with this worst verdict goes through without `?force=true`.
    pub fn allows(self, verdict: crate::blueprint::compat::Verdict) -> bool {
        use crate::blueprint::compat::Verdict;
        match self {
            Compatibility::Lossless => verdict == Verdict::Lossless,
            Compatibility::LossyAllowed => verdict <= Verdict::Lossy,
        }
    }
}

/// The editable state of a project. Stored under `project/{name}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkingCopy {
    /// The project's compatibility setting.
    #[serde(default)]
    pub compatibility: Compatibility,
    pub blueprints: Blueprints,
    /// Every change recorded by edits since the last freeze, in order.
    pub edits: Vec<Change>,
    /// The last uid handed out in this project.
    pub last_uid: Uid,
    /// Every task of this project at or below this revision belongs to an earlier project of the
    /// same name, since dropped: projectors pass over it (0: never dropped before). Its items'
    /// versions are not this project's, and applying them with this catalog would write an old
    /// shape into the new tables, or fail for ever.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub born: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A frozen version: never rewritten once stored under `version/{name}/{number}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    pub number: u32,
    pub blueprints: Blueprints,
    /// The net changes from the previous version (or from nothing, for version 1).
    pub changes: Vec<Change>,
    /// The edits, as recorded, that led to this version.
    pub edits: Vec<Change>,
    pub frozen_at: String,
    /// Frozen with `?force=true` although the compatibility report found values it loses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// What it takes as JSON, once measured (`Version::json_bytes`): a version never changes.
    #[serde(skip)]
    pub size: std::sync::OnceLock<usize>,
}

impl Version {
    /// What the version takes as JSON, the measure of `storage.max_catalog_bytes`.
    pub fn json_bytes(&self) -> usize {
        *self.size.get_or_init(|| super::edit::json_bytes(self))
    }
}

/// What happened to a version after it was frozen. Stored under `status/{name}/{number}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VersionStatus {
    /// A retired version is no longer projected into and no longer accepts writes.
    pub retired: bool,
    /// Per projector: `None` while its migrator has not succeeded, with the last error if any.
    pub migrations: BTreeMap<String, MigrationState>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MigrationState {
    Pending,
    Done,
    Failed { error: String },
}

/// One project as readers see it.
#[derive(Clone, Debug)]
pub struct Project {
    pub name: Ident,
    /// Moves whenever the project's set of live versions changes, to a number no project of this
    /// catalog had before: a write transformed against an older epoch is prepared again.
    pub epoch: u64,
    pub working: WorkingCopy,
    pub versions: Vec<Arc<Version>>,
    pub status: BTreeMap<u32, VersionStatus>,
}

impl Project {
    pub fn new(name: Ident) -> Project {
        Project {
            name,
            epoch: 0,
            working: WorkingCopy::default(),
            versions: Vec::new(),
            status: BTreeMap::new(),
        }
    }

    pub fn latest(&self) -> Option<&Arc<Version>> {
        self.versions.last()
    }

    pub fn version(&self, number: u32) -> Option<&Arc<Version>> {
        let index = usize::try_from(number).ok()?.checked_sub(1)?;
        self.versions.get(index)
    }

    pub fn is_retired(&self, number: u32) -> bool {
        self.status.get(&number).is_some_and(|s| s.retired)
    }

    /// The numbers of the retired versions, in order.
    pub fn retired_numbers(&self) -> Vec<u32> {
        self.versions
            .iter()
            .map(|v| v.number)
            .filter(|n| self.is_retired(*n))
            .collect()
    }

    /// For each blueprint of version `number` whose newest version holding it (by name) is retired,
    /// the newest live version that holds it: where what points at a blueprint's newest version
    /// (Elasticsearch's aliases) goes once `number` is retired.
    pub fn newest_live_holders_of(&self, number: u32) -> std::collections::BTreeSet<u32> {
        let blueprints = self
            .version(number)
            .into_iter()
            .flat_map(|v| v.blueprints.keys());
        blueprints
            .filter_map(|name| {
                let mut holders = self
                    .versions
                    .iter()
                    .rev()
                    .filter(|v| v.blueprints.contains_key(name));
                let newest = holders.next()?.number;
                if !self.is_retired(newest) {
                    return None;
                }
                std::iter::once(newest)
                    .chain(holders.map(|v| v.number))
                    .find(|n| !self.is_retired(*n))
            })
            .collect()
    }

    /// Versions that writes are projected into: frozen and not retired.
    pub fn live_versions(&self) -> impl Iterator<Item = &Arc<Version>> {
        self.versions.iter().filter(|v| !self.is_retired(v.number))
    }

    /// The live versions that hold a blueprint with this uid, with its definition there.
    pub fn live_holders(&self, blueprint_uid: Uid) -> Vec<(u32, &Blueprint)> {
        self.live_versions()
            .filter_map(|v| {
                v.blueprints
                    .values()
                    .find(|bp| bp.uid == blueprint_uid)
                    .map(|bp| (v.number, bp))
            })
            .collect()
    }

    /// Every version that holds a blueprint with this uid, retired ones included (deletes reach
    /// them all).
    pub fn holders(&self, blueprint_uid: Uid) -> Vec<u32> {
        self.versions
            .iter()
            .filter(|v| v.blueprints.values().any(|bp| bp.uid == blueprint_uid))
            .map(|v| v.number)
            .collect()
    }

    /// Whether the working copy differs from the newest version.
    pub fn has_unfrozen_changes(&self) -> bool {
        match self.latest() {
            Some(v) => v.blueprints != self.working.blueprints,
            None => !self.working.blueprints.is_empty(),
        }
    }
}
