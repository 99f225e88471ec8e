//! Projects, working copies, frozen versions and the change log, persisted in RocksDB.
//!
//! Readers take a cheap [`Snapshot`] (an `Arc`), never a lock held across I/O. Writers are serialized
//! by one mutex; each write persists every key it touches in one synced `WriteBatch` before the new
//! snapshot is published, so a crash leaves the old state or the new one, never a torn one. Frozen
//! versions are written once and never rewritten. The `epoch` grows whenever the set of live versions
//! changes, which lets the journal refuse a write transformed against an outdated set.

pub mod edit;
mod model;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rocksdb::{WriteBatch, WriteOptions, DB};
use thiserror::Error;

pub use edit::Write;
pub use model::{Compatibility, MigrationState, Project, Version, VersionStatus, WorkingCopy};

use crate::blueprint::{BlueprintInput, Change, FieldError, Ident};

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("invalid blueprint")]
    Invalid(Vec<FieldError>),
    #[error("catalog storage failed: {0}{hint}", hint = crate::rocks::hint(.0))]
    Storage(#[from] rocksdb::Error),
    #[error("catalog record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// A record read at start that this build cannot decode: dstore does not start rather than
    /// serve without a project's versions (its items could not be read or projected).
    #[error(
        "catalog record {key:?} is unreadable ({error}): a newer dstore wrote it, or the disk \
         damaged it; run the newer dstore, or restore the catalog directory from a backup"
    )]
    Unreadable {
        key: String,
        error: serde_json::Error,
    },
}

/// A record kept beside the catalog proper: its key and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// An immutable view of every project.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub epoch: u64,
    pub projects: BTreeMap<Ident, Arc<Project>>,
}

impl Snapshot {
    pub fn project(&self, name: &Ident) -> Result<&Arc<Project>, CatalogError> {
        self.projects
            .get(name)
            .ok_or_else(|| CatalogError::NotFound(format!("project {name:?} does not exist")))
    }
}

/// Its locks guard no state an edit can tear: an edit works on a copy and is installed whole once
/// written, so an edit that panicked left the catalog as it was, and the locks are taken again
/// past it (the journal writer thread, which freezes and drops, would otherwise end with them).
pub struct Catalog {
    db: DB,
    snapshot: RwLock<Arc<Snapshot>>,
    writer: Mutex<()>,
    /// Most projects it holds (`storage.max_projects`): a new one past it is refused.
    max_projects: usize,
    /// Most bytes its projects take as JSON (`storage.max_catalog_bytes`, see
    /// [`edit::room_in_catalog`]), and what they take now (changed under `writer`).
    max_bytes: usize,
    bytes: std::sync::atomic::AtomicUsize,
}

fn project_key(name: &Ident) -> String {
    format!("project/{name}")
}

fn version_key(name: &Ident, number: u32) -> String {
    format!("version/{name}/{number:010}")
}

fn status_key(name: &Ident, number: u32) -> String {
    format!("status/{name}/{number:010}")
}

/// The mark of a drop the catalog has made and the journal may not have yet (see
/// [`Catalog::delete_project`]).
fn drop_key(name: &Ident) -> String {
    format!("dropping/{name}")
}

/// The revision of the last drop of a project of this name the journal wrote: a project made again
/// is born after it (see [`WorkingCopy::born`]).
fn dropped_key(name: &Ident) -> String {
    format!("dropped/{name}")
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        // Memory: the catalog also holds the audit log, one entry per write request, so its
        // memtable counts in the process's one budget and its blocks in the shared cache
        // (`crate::rocks`), like the journal's.
        let mut options = crate::rocks::db_options();
        crate::rocks::family(&mut options, |_| {});
        options.create_if_missing(true);
        let db = DB::open(&options, path)?;
        let snapshot = load(&db)?;
        let bytes: usize = snapshot
            .projects
            .values()
            .map(|p| edit::project_bytes(p))
            .sum();
        Ok(Catalog {
            db,
            snapshot: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(()),
            max_projects: edit::MAX_PROJECTS,
            max_bytes: edit::MAX_CATALOG_BYTES,
            bytes: bytes.into(),
        })
    }

    /// The catalog holding at most `max` projects (`storage.max_projects`).
    pub fn with_max_projects(mut self, max: usize) -> Catalog {
        self.max_projects = max;
        self
    }

    /// The catalog holding at most `max` bytes as JSON (`storage.max_catalog_bytes`).
    pub fn with_max_bytes(mut self, max: usize) -> Catalog {
        self.max_bytes = max;
        self
    }

    /// What its projects take as JSON ([`edit::project_bytes`]).
    pub fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `edit` on a copy of one project and persists what it returns, atomically.
    fn update<T>(
        &self,
        name: &Ident,
        create: bool,
        edit: impl FnOnce(&mut Project, &mut Vec<Write>) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot();
        let mut writes = Vec::new();
        let mut project = match current.projects.get(name) {
            Some(project) => Project::clone(project),
            // A drop of this name is being written (or was interrupted and the next start
            // finishes it): made now, the new project's records could be removed with the old
            // one's, or a crash before the drop's batch could leave the old items to it.
            None if create && self.db.get(drop_key(name))?.is_some() => {
                return Err(CatalogError::Conflict(format!(
                    "project {name:?} is being dropped; make it again once the drop is written (a moment)"
                )))
            }
            None if create && current.projects.len() >= self.max_projects => {
                return Err(CatalogError::Conflict(edit::too_many_projects(
                    name,
                    self.max_projects,
                )))
            }
            None if create => {
                writes.push(Write::WorkingCopy);
                let mut project = Project::new(name.clone());
                project.working.born = self
                    .db
                    .get(dropped_key(name))?
                    .and_then(|at| <[u8; 8]>::try_from(at.as_slice()).ok())
                    .map_or(0, u64::from_be_bytes);
                project
            }
            None => {
                return Err(CatalogError::NotFound(format!(
                    "project {name:?} does not exist"
                )))
            }
        };
        let before = current
            .projects
            .get(name)
            .map_or(0, |p| edit::project_bytes(p));
        let result = edit(&mut project, &mut writes)?;
        let after = match writes.is_empty() {
            true => before,
            false => edit::project_bytes(&project),
        };
        let others = self.bytes().saturating_sub(before);
        edit::room_in_catalog(name, others, (before, after), self.max_bytes)?;
        let mut batch = WriteBatch::default();
        let epoch_moves = writes.iter().any(|w| w.moves_epoch());
        for write in &writes {
            match write {
                Write::WorkingCopy => {
                    batch.put(project_key(name), serde_json::to_vec(&project.working)?)
                }
                Write::Version(n) => {
                    let version = project.version(*n).expect("written version exists");
                    batch.put(version_key(name, *n), serde_json::to_vec(version.as_ref())?);
                }
                Write::Status(n) => {
                    batch.put(
                        status_key(name, *n),
                        serde_json::to_vec(&project.status[n])?,
                    );
                }
            }
        }
        self.commit(batch)?;
        let mut next = Snapshot::clone(&current);
        // A project made (again) takes an epoch no project had: every project read at start has
        // epoch 0, so one dropped and made again under its name would otherwise have the
        // epoch of the one before, and a write prepared against that one be staged into it.
        let made = !current.projects.contains_key(name);
        if epoch_moves || made {
            next.epoch += 1;
            project.epoch = next.epoch;
        }
        next.projects.insert(name.clone(), Arc::new(project));
        self.bytes
            .store(others + after, std::sync::atomic::Ordering::Release);
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        Ok(result)
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), CatalogError> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    /// Creates or edits one blueprint of the working copy; returns the changes it recorded.
    pub fn put_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
        input: BlueprintInput,
    ) -> Result<Vec<Change>, CatalogError> {
        self.update(project, true, |p, writes| {
            edit::put_blueprint(p, name, input, writes)
        })
    }

    /// Replaces every blueprint of the working copy; those not in `inputs` are removed.
    pub fn put_blueprints(
        &self,
        project: &Ident,
        inputs: Vec<(Ident, BlueprintInput)>,
    ) -> Result<Vec<Change>, CatalogError> {
        self.update(project, true, |p, writes| {
            edit::put_blueprints(p, inputs, writes)
        })
    }

    pub fn delete_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
    ) -> Result<Vec<Change>, CatalogError> {
        self.update(project, false, |p, writes| {
            edit::delete_blueprint(p, name, writes)
        })
    }

    /// Freezes the working copy as the next version. `projectors` start with a pending migration,
    /// `done` with a finished one (stores that need none).
    pub fn freeze(
        &self,
        project: &Ident,
        projectors: &[&str],
        done: &[&str],
        forced: bool,
    ) -> Result<Arc<Version>, CatalogError> {
        self.freeze_judged(project, projectors, done, forced, None)
    }

    /// Like [`Catalog::freeze`], refused when the working copy is not `judged` (see `edit::freeze`).
    pub fn freeze_judged(
        &self,
        project: &Ident,
        projectors: &[&str],
        done: &[&str],
        forced: bool,
        judged: Option<&edit::Judged>,
    ) -> Result<Arc<Version>, CatalogError> {
        self.update(project, false, |p, writes| {
            edit::freeze(p, projectors, done, forced, judged, writes)
        })
    }

    pub fn set_compatibility(
        &self,
        project: &Ident,
        compatibility: Compatibility,
    ) -> Result<(), CatalogError> {
        self.update(project, false, |p, writes| {
            edit::set_compatibility(p, compatibility, writes)
        })
    }

    /// Records how a projector's migration went (see [`edit::set_migration`]).
    pub fn set_migration(
        &self,
        project: &Ident,
        number: u32,
        projector: &str,
        (state, task): (MigrationState, Option<u64>),
    ) -> Result<(), CatalogError> {
        self.update(project, false, |p, writes| {
            edit::set_migration(p, number, projector, (state, task), writes)
        })
    }

    /// Stops projecting into a version; reads of it keep working.
    pub fn retire(&self, project: &Ident, number: u32) -> Result<(), CatalogError> {
        self.update(project, false, |p, writes| edit::retire(p, number, writes))
    }

    /// Writes records kept beside the catalog proper (API keys under `key/`, the audit log under
    /// `audit/`); `sync` waits for the disk.
    pub fn put_records(
        &self,
        records: &[(Vec<u8>, Vec<u8>)],
        sync: bool,
    ) -> Result<(), CatalogError> {
        let mut batch = WriteBatch::default();
        for (key, value) in records {
            batch.put(key, value);
        }
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    pub fn record(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CatalogError> {
        Ok(self.db.get(key)?)
    }

    /// Records with keys in `from .. to`, in key order, at most `limit`.
    pub fn records(
        &self,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<Record>, CatalogError> {
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(to.to_vec());
        let mut out = Vec::new();
        for entry in self.db.iterator_opt(
            rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
            options,
        ) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// How many records have keys in `from .. to`, read one at a time: the memory does not grow
    /// with their number.
    pub fn count_records(&self, from: &[u8], to: &[u8]) -> Result<u64, CatalogError> {
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(to.to_vec());
        let mut iterator = self.db.raw_iterator_opt(options);
        iterator.seek(from);
        let mut count = 0;
        while iterator.valid() {
            count += 1;
            iterator.next();
        }
        iterator.status()?;
        Ok(count)
    }

    /// Removes the records with keys in `from .. to` (synced).
    pub fn delete_records(&self, from: &[u8], to: &[u8]) -> Result<(), CatalogError> {
        let mut batch = WriteBatch::default();
        batch.delete_range(from, to);
        self.commit(batch)
    }

    /// Forgets a project and all its versions, and marks the drop as pending in the same write:
    /// the journal's batch that removes the project's items and queues its removal from every
    /// store comes after, so a crash in between leaves the mark, and the next start finishes the
    /// drop ([`Catalog::pending_drops`]). The journal clears the mark once its batch is written.
    pub fn delete_project(&self, name: &Ident) -> Result<(), CatalogError> {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot();
        let gone = edit::project_bytes(current.project(name)?);
        let mut batch = WriteBatch::default();
        batch.put(drop_key(name), b"");
        batch.delete(project_key(name));
        for prefix in ["version", "status"] {
            let from = format!("{prefix}/{name}/");
            let to = format!("{prefix}/{name}0");
            batch.delete_range(from.as_bytes(), to.as_bytes());
        }
        self.commit(batch)?;
        let mut next = Snapshot::clone(&current);
        next.epoch += 1;
        next.projects.remove(name);
        self.bytes
            .fetch_sub(gone, std::sync::atomic::Ordering::AcqRel);
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        Ok(())
    }
}

impl Catalog {
    /// The projects whose drop the catalog made and the journal has not confirmed (see
    /// [`Catalog::delete_project`]).
    pub fn pending_drops(&self) -> Result<Vec<Ident>, CatalogError> {
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(b"dropping0".to_vec());
        let mut out = Vec::new();
        for entry in self.db.iterator_opt(
            rocksdb::IteratorMode::From(b"dropping/", rocksdb::Direction::Forward),
            options,
        ) {
            let (key, _) = entry?;
            if let Ok(name) = Ident::parse(&String::from_utf8_lossy(&key["dropping/".len()..])) {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Whether a drop of `name` is marked pending: made in the catalog, its journal batch not
    /// written yet.
    pub fn is_dropping(&self, name: &Ident) -> Result<bool, CatalogError> {
        Ok(self.db.get(drop_key(name))?.is_some())
    }

    /// Clears the mark of a drop the journal has written.
    /// `at`: the revision the journal wrote the drop at, when it did.
    pub fn drop_done(&self, name: &Ident, at: Option<u64>) -> Result<(), CatalogError> {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        batch.delete(drop_key(name));
        if let Some(at) = at {
            batch.put(dropped_key(name), at.to_be_bytes());
        }
        self.commit(batch)
    }
}

fn load(db: &DB) -> Result<Snapshot, CatalogError> {
    let mut projects: BTreeMap<Ident, Project> = BTreeMap::new();
    // Only the catalog's own ranges: the records beside it (the audit log, one entry per write
    // request, and the keys) are not read at start, however many there are.
    let ranges = ["project", "status", "version"].map(|kind| {
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(format!("{kind}0").into_bytes());
        db.iterator_opt(
            rocksdb::IteratorMode::From(format!("{kind}/").as_bytes(), rocksdb::Direction::Forward),
            options,
        )
    });
    for entry in ranges.into_iter().flatten() {
        let (key, value) = entry?;
        let key = String::from_utf8_lossy(&key);
        let mut parts = key.split('/');
        let (Some(kind), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !["project", "version", "status"].contains(&kind) {
            continue; // records beside the catalog (keys, audit)
        }
        let Ok(name) = Ident::parse(name) else {
            continue;
        };
        let project = projects
            .entry(name.clone())
            .or_insert_with(|| Project::new(name));
        let unreadable = |error| CatalogError::Unreadable {
            key: key.to_string(),
            error,
        };
        match kind {
            "project" => project.working = serde_json::from_slice(&value).map_err(unreadable)?,
            "version" => project.versions.push(Arc::new(
                serde_json::from_slice(&value).map_err(unreadable)?,
            )),
            "status" => {
                let status: VersionStatus = serde_json::from_slice(&value).map_err(unreadable)?;
                let number = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                project.status.insert(number, status);
            }
            _ => {}
        }
    }
    Ok(Snapshot {
        epoch: 1,
        projects: projects
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::{Catalog, CatalogError};

    /// A record this build cannot decode (written by a newer dstore, or damaged) stops the start
    /// naming the record and what to do, rather than an anonymous JSON error.
    #[test]
    fn an_unreadable_record_is_named_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        catalog
            .put_records(
                &[(
                    b"version/shop/0000000002".to_vec(),
                    b"{\"number\":".to_vec(),
                )],
                true,
            )
            .unwrap();
        drop(catalog);
        let error = Catalog::open(dir.path())
            .err()
            .expect("an unreadable version");
        assert!(matches!(error, CatalogError::Unreadable { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("version/shop/0000000002") && message.contains("newer dstore"),
            "{message}"
        );
    }

    /// An edit that panics leaves the catalog as it was and the next edits go on.
    #[test]
    fn an_edit_that_panicked_stops_no_later_edit() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        let shop = crate::blueprint::Ident::parse("shop").unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            catalog.update(&shop, true, |_, _| -> Result<(), CatalogError> {
                panic!("an edit's bug")
            })
        }));
        assert!(panicked.is_err());
        assert!(catalog.snapshot().projects.is_empty());
        catalog
            .update(&shop, true, |_, _| Ok::<_, CatalogError>(()))
            .unwrap();
        assert!(catalog.snapshot().projects.contains_key(&shop));
    }

    #[test]
    fn the_catalog_memtable_is_one_of_the_process_budget() {
        // The audit log fills the catalog at one entry per write request: with RocksDB's default
        // options its memtable grew to 64 MiB outside the process's budget (`crate::rocks`).
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        catalog
            .put_records(&[(b"audit/x".to_vec(), vec![0; 1024])], false)
            .unwrap();
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains("OPTIONS-"))
            .max()
            .expect("RocksDB writes its options file");
        let text = std::fs::read_to_string(options).unwrap();
        let size = format!("write_buffer_size={}", crate::rocks::MEMTABLE);
        assert!(
            text.lines().any(|line| line.trim() == size),
            "{size} is not in the catalog's options"
        );
    }
}
