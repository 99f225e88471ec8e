//! The unit of work a projector receives, and what it answers for each one.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::blueprint::Ident;

/// One pending task, as stored in the journal and delivered to a projector.
///
/// `seq` orders tasks: a projector sees them in increasing `seq`. `revision` orders the states of one
/// item: a store keeps, per item and version, the highest revision it has seen (a delete included), so
/// replays, retries and late back-fill tasks never move an item backwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub seq: u64,
    pub project: Ident,
    pub op: TaskOp,
}

// Externally tagged: an internally tagged enum would be buffered whole before it is decoded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOp {
    /// Create the structures of a frozen version (idempotent).
    Migrate { version: u32 },
    /// Write an item into each listed version, as that version sees it.
    Upsert {
        blueprint: Ident,
        id: Uuid,
        revision: u64,
        docs: Vec<VersionDoc>,
    },
    /// Delete an item from each listed version.
    Delete {
        blueprint: Ident,
        id: Uuid,
        revision: u64,
        versions: Vec<u32>,
    },
    /// Remove everything a project has in the store.
    DropProject,
}

/// An item as one version sees it. The document stays the JSON text the write path serialized: the
/// keyspace projector and Elasticsearch store it as it is, and only what must look inside a document
/// (PostgreSQL's columns) reads it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionDoc {
    pub version: u32,
    pub doc: Box<RawValue>,
}

impl VersionDoc {
    /// `doc` is a JSON object: a map, or a checked item (`check::Canonical`).
    pub fn new(version: u32, doc: &impl Serialize) -> VersionDoc {
        VersionDoc {
            version,
            doc: serde_json::value::to_raw_value(doc).expect("JSON objects serialize"),
        }
    }
}

/// Documents are equal when their JSON text is.
impl PartialEq for VersionDoc {
    fn eq(&self, other: &VersionDoc) -> bool {
        self.version == other.version && self.doc.get() == other.doc.get()
    }
}

/// One item write into one version, as a store applies it: a document, or a delete.
#[derive(Clone, Copy, Debug)]
pub struct VersionWrite<'a> {
    pub blueprint: &'a Ident,
    pub id: Uuid,
    pub revision: u64,
    pub version: u32,
    /// `None` for a delete.
    pub doc: Option<&'a RawValue>,
}

impl Task {
    /// The writes an item task makes, one per version; none for `Migrate` and `DropProject`.
    pub fn version_writes(&self) -> impl Iterator<Item = VersionWrite<'_>> {
        let (item, docs, deletes): (_, &[VersionDoc], &[u32]) = match &self.op {
            TaskOp::Upsert {
                blueprint,
                id,
                revision,
                docs,
            } => (Some((blueprint, *id, *revision)), docs, &[]),
            TaskOp::Delete {
                blueprint,
                id,
                revision,
                versions,
            } => (Some((blueprint, *id, *revision)), &[], versions),
            TaskOp::Migrate { .. } | TaskOp::DropProject => (None, &[], &[]),
        };
        item.into_iter().flat_map(move |(blueprint, id, revision)| {
            let write = move |version, doc| VersionWrite {
                blueprint,
                id,
                revision,
                version,
                doc,
            };
            docs.iter()
                .map(move |d| write(d.version, Some(&*d.doc)))
                .chain(deletes.iter().map(move |v| write(*v, None)))
        })
    }

    /// A short description for logs and dead letters.
    pub fn describe(&self) -> String {
        match &self.op {
            TaskOp::Migrate { version } => format!("migrate {}/v{version}", self.project),
            TaskOp::Upsert {
                blueprint,
                id,
                revision,
                ..
            } => {
                format!(
                    "upsert {}/{blueprint}/{id} at revision {revision}",
                    self.project
                )
            }
            TaskOp::Delete {
                blueprint,
                id,
                revision,
                ..
            } => {
                format!(
                    "delete {}/{blueprint}/{id} at revision {revision}",
                    self.project
                )
            }
            TaskOp::DropProject => format!("drop project {}", self.project),
        }
    }
}
