//! The unit of work a projector receives, and what it answers for each one.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::blueprint::check::Canonical;
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

impl TaskOp {
    /// The item an upsert or a delete writes: its blueprint and id.
    pub fn item(&self) -> Option<(&Ident, &Uuid)> {
        match self {
            TaskOp::Upsert { blueprint, id, .. } | TaskOp::Delete { blueprint, id, .. } => {
                Some((blueprint, id))
            }
            TaskOp::Migrate { .. } | TaskOp::DropProject => None,
        }
    }

    /// The revision of the item write a task carries; `None` for a task of no item.
    pub fn revision(&self) -> Option<u64> {
        match self {
            TaskOp::Upsert { revision, .. } | TaskOp::Delete { revision, .. } => Some(*revision),
            TaskOp::Migrate { .. } | TaskOp::DropProject => None,
        }
    }

    /// Whether this item write, refused by a store, is settled by its item's state now (`now`:
    /// the item's revision, `None` when it is not there): written again since, the newer write
    /// reached the store with a task of its own; deleted since, an upsert would bring it back. A
    /// delete of an item not there is sent again, harmless (a store keeps the newer of two).
    pub fn superseded_by(&self, now: Option<u64>) -> bool {
        let (revision, upsert) = match self {
            TaskOp::Upsert { revision, .. } => (*revision, true),
            TaskOp::Delete { revision, .. } => (*revision, false),
            TaskOp::Migrate { .. } | TaskOp::DropProject => return false,
        };
        match now {
            Some(now) => now > revision,
            None => upsert,
        }
    }
}

/// An item as one version sees it. The document stays the JSON text the write path serialized: the
/// keyspace projector and Elasticsearch store it as it is, and only what must look inside a document
/// (PostgreSQL's columns) reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionDoc {
    pub version: u32,
    pub doc: Doc,
}

impl VersionDoc {
    /// `doc` is a JSON object: a map (an item transformed into another version).
    pub fn new(version: u32, doc: &impl Serialize) -> VersionDoc {
        VersionDoc {
            version,
            doc: Doc(serde_json::to_string(doc).expect("JSON objects serialize")),
        }
    }

    /// The item is not in `version`: a version that allows no null where the item has none (a
    /// forced breaking freeze) holds no copy of it, so each store removes what it held there, as
    /// for a delete ([`Task::version_writes`] gives no document). Written as the document `null`,
    /// which any reader of tasks decodes.
    pub fn absent(version: u32) -> VersionDoc {
        VersionDoc {
            version,
            doc: Doc(ABSENT.into()),
        }
    }

    /// A checked item's document, as the write path serializes it (`Canonical::to_json`).
    pub fn canonical(version: u32, item: &Canonical) -> VersionDoc {
        VersionDoc {
            version,
            doc: Doc(item.to_json()),
        }
    }
}

/// A document's JSON text: one JSON value, always. It is built by serializing (the write path), by
/// serde, which checks the text is one JSON value (a task that came through a broker or another
/// store), or from the local journal's own task bytes, which the write path serialized and RocksDB
/// checksums, without checking them again (`codec::decode_own_task`). Two documents are equal when
/// their text is. A `String` rather than a `Box<str>`: the write path's text keeps the buffer it was
/// written into (boxing it reallocated every document to its exact length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doc(String);

/// The text of a document saying the item is not in its version ([`VersionDoc::absent`]).
pub const ABSENT: &str = "null";

/// Whether a document's text says the item is not in its version ([`VersionDoc::absent`]).
pub fn is_absent(doc: &[u8]) -> bool {
    doc == ABSENT.as_bytes()
}

impl Doc {
    pub fn get(&self) -> &str {
        &self.0
    }

    /// Whether the item is not in this version ([`VersionDoc::absent`]).
    pub fn is_absent(&self) -> bool {
        is_absent(self.0.as_bytes())
    }

    /// Text the caller knows to be one JSON value, because dstore wrote it.
    pub(super) fn known_json(text: &str) -> Doc {
        Doc(text.into())
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Doc, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(|raw| Doc(Box::<str>::from(raw).into()))
    }
}

/// Written as the JSON value it holds. Only tasks that carry documents over serde (tests, dead
/// letters) come here: the journal and Elasticsearch copy the text instead. Text that is not JSON
/// after all (a damaged journal: its documents are framed, not checked, when read) is written as a
/// JSON string of that text, so the dead letter that records it is still written (failing here
/// would keep its projector retrying the batch for ever); a store refuses it again if it is retried.
impl Serialize for Doc {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<&RawValue>(&self.0) {
            Ok(raw) => raw.serialize(serializer),
            Err(_) => serializer.serialize_str(&self.0),
        }
    }
}

/// One item write into one version, as a store applies it: a document, or a delete.
#[derive(Clone, Copy, Debug)]
pub struct VersionWrite<'a> {
    pub blueprint: &'a Ident,
    pub id: Uuid,
    pub revision: u64,
    pub version: u32,
    /// `None` for a delete, and where the item is not in the version ([`VersionDoc::absent`]).
    pub doc: Option<&'a Doc>,
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
                .map(move |d| write(d.version, Some(&d.doc).filter(|d| !d.is_absent())))
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
