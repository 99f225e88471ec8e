//! The records the catalog keeps per project: the working copy, frozen versions and their status.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blueprint::{Blueprint, Blueprints, Change, Ident, Uid};

/// The editable state of a project. Stored under `project/{name}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkingCopy {
    pub blueprints: Blueprints,
    /// Every change recorded by edits since the last freeze, in order.
    pub edits: Vec<Change>,
    /// The last uid handed out in this project.
    pub last_uid: Uid,
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
