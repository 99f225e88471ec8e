//! The RocksDB projector: a keyspace per project version holding each item as that version sees it.
//!
//! Keys are `project \0 version(u32 BE) \0 blueprint \0 id(16 bytes)`; values are the revision (u64 BE),
//! a live/deleted byte and the JSON document. A delete leaves a tombstone holding its revision, so a
//! write with an older revision — a late back-fill, a redelivered task — never brings the item back.
//! The keyspaces live in their own database, apart from the journal, so they can be served by a
//! separate worker process.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use super::{Health, Outcome, Projector, ProjectorError, ProjectorKind};
use crate::blueprint::Ident;
use crate::catalog::{Snapshot, Version};
use crate::journal::task::Task;

pub struct RocksProjector {
    db: Arc<DB>,
}

fn key(project: &Ident, version: u32, blueprint: &Ident, id: &Uuid) -> Vec<u8> {
    let mut key = Vec::with_capacity(project.as_str().len() + blueprint.as_str().len() + 23);
    key.extend_from_slice(project.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key.push(0);
    key.extend_from_slice(blueprint.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

fn project_range(project: &Ident) -> (Vec<u8>, Vec<u8>) {
    let mut from = project.as_str().as_bytes().to_vec();
    let mut to = from.clone();
    from.push(0);
    to.push(1);
    (from, to)
}

/// The stored value: the task's document text as it is, never decoded here.
fn encode(revision: u64, doc: Option<&RawValue>) -> Vec<u8> {
    let text = doc.map_or("", RawValue::get);
    let mut value = Vec::with_capacity(9 + text.len());
    value.extend_from_slice(&revision.to_be_bytes());
    value.push(u8::from(doc.is_some()));
    value.extend_from_slice(text.as_bytes());
    value
}

fn stored_revision(value: &[u8]) -> u64 {
    value
        .get(..8)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

impl RocksProjector {
    pub fn open(path: &Path) -> Result<RocksProjector, rocksdb::Error> {
        // Memory: memtables and table blocks count in the process's one budget (`crate::rocks`).
        let mut options = crate::rocks::db_options();
        // The revision guard reads every key before writing it, and new items are absent: bloom
        // filters (in the memtable and in every table file) answer "absent" without a search.
        crate::rocks::family(&mut options, |tables| tables.set_bloom_filter(10.0, false));
        options.create_if_missing(true);
        options.set_memtable_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.1);
        Ok(RocksProjector {
            db: Arc::new(DB::open(&options, path)?),
        })
    }

    /// An item as stored for one version; `None` when absent or deleted.
    pub fn get(
        &self,
        project: &Ident,
        version: u32,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Option<Value> {
        let value = self.db.get(key(project, version, blueprint, id)).ok()??;
        match value.get(8) {
            Some(1) => serde_json::from_slice(&value[9..]).ok(),
            _ => None,
        }
    }

    /// How many live items a version holds for a blueprint.
    pub fn count(&self, project: &Ident, version: u32, blueprint: &Ident) -> usize {
        let mut prefix = key(project, version, blueprint, &Uuid::nil());
        prefix.truncate(prefix.len() - 16);
        self.db
            .prefix_iterator(&prefix)
            .map_while(Result::ok)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, v)| v.get(8) == Some(&1))
            .count()
    }

    /// Writes durably before the journal lets go of the tasks; the fsync runs off the async threads.
    async fn write(&self, batch: WriteBatch) -> Result<(), ProjectorError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut options = WriteOptions::default();
            options.set_sync(true);
            db.write_opt(batch, &options)
        })
        .await
        .map_err(|e| ProjectorError::transient(format!("rocksdb keyspace write stopped: {e}")))?
        .map_err(|e| ProjectorError::transient(format!("rocksdb keyspace write failed: {e}")))
    }
}

#[async_trait]
impl Projector for RocksProjector {
    fn name(&self) -> &'static str {
        ProjectorKind::Rocksdb.name()
    }

    async fn migrate(&self, _project: &Ident, _version: &Version) -> Result<(), ProjectorError> {
        // A keyspace is a key prefix: it exists as soon as something is written into it.
        Ok(())
    }

    async fn apply(
        &self,
        _snapshot: &Snapshot,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        let batch = self.stage(tasks)?;
        self.write(batch).await?;
        Ok(tasks.iter().map(|_| Ok(())).collect())
    }

    async fn drop_project(&self, project: &Ident) -> Result<(), ProjectorError> {
        let (from, to) = project_range(project);
        let mut batch = WriteBatch::default();
        batch.delete_range(from, to);
        self.write(batch).await
    }

    async fn read(
        &self,
        project: &Ident,
        version: u32,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Value>, ProjectorError> {
        Ok(self.get(project, version, blueprint, id))
    }

    fn preview(&self, project: &Ident, version: &Version) -> Value {
        serde_json::json!({
            "keyspace": format!("{project} version {}", version.number),
            "blueprints": version.blueprints.keys().collect::<Vec<_>>(),
        })
    }

    async fn health(&self) -> Health {
        Health {
            reachable: true,
            detail: "embedded".into(),
        }
    }
}

/// One keyspace write: a document, or a tombstone when `doc` is `None`.
type Write<'a> = (Vec<u8>, u64, Option<&'a RawValue>);

impl RocksProjector {
    /// The batch that applies `tasks`: only writes newer than what the keyspace holds.
    fn stage(&self, tasks: &[Task]) -> Result<WriteBatch, ProjectorError> {
        // Every (key, revision, document) the batch wants written, in task order.
        let writes: Vec<Write> = tasks
            .iter()
            .flat_map(|task| {
                task.version_writes().map(|w| {
                    (
                        key(&task.project, w.version, w.blueprint, &w.id),
                        w.revision,
                        w.doc,
                    )
                })
            })
            .collect();
        let stored = self.db.multi_get(writes.iter().map(|(k, _, _)| k));
        let mut newest: HashMap<&[u8], u64> = HashMap::with_capacity(writes.len());
        for ((key, _, _), value) in writes.iter().zip(stored) {
            let value = value
                .map_err(|e| ProjectorError::transient(format!("rocksdb read failed: {e}")))?;
            newest.insert(key, value.as_deref().map_or(0, stored_revision));
        }
        let mut batch = WriteBatch::default();
        for (key, revision, doc) in &writes {
            let current = newest.get_mut(key.as_slice()).expect("every key was read");
            if *revision > *current {
                *current = *revision;
                batch.put(key, encode(*revision, *doc));
            }
        }
        Ok(batch)
    }
}
