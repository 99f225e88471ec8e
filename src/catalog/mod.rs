//! Projects, working copies, frozen versions and the change log, persisted in RocksDB.
//!
//! Readers take a cheap [`Snapshot`] (an `Arc`), never a lock held across I/O. Writers are serialized
//! by one mutex; each write persists every key it touches in one synced `WriteBatch` before the new
//! snapshot is published, so a crash leaves the old state or the new one, never a torn one. Frozen
//! versions are written once and never rewritten. The `epoch` grows whenever the set of live versions
//! changes, which lets the journal refuse a write transformed against an outdated set.

mod model;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::{WriteBatch, WriteOptions, DB};
use thiserror::Error;

pub use model::{MigrationState, Project, Version, VersionStatus, WorkingCopy};

use crate::blueprint::{apply_edit, diff, BlueprintInput, Blueprints, Change, FieldError, Ident};

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("invalid blueprint")]
    Invalid(Vec<FieldError>),
    #[error("catalog storage failed")]
    Storage(#[from] rocksdb::Error),
    #[error("catalog record is corrupt")]
    Corrupt(#[from] serde_json::Error),
}

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

pub struct Catalog {
    db: DB,
    snapshot: RwLock<Arc<Snapshot>>,
    writer: Mutex<()>,
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

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = DB::open(&options, path)?;
        let snapshot = load(&db)?;
        Ok(Catalog {
            db,
            snapshot: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(()),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("catalog lock poisoned").clone()
    }

    /// Runs `edit` on a copy of one project and persists what it returns, atomically.
    fn update<T>(
        &self,
        name: &Ident,
        create: bool,
        edit: impl FnOnce(&mut Project, &mut Vec<Write>) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let _guard = self.writer.lock().expect("catalog writer poisoned");
        let current = self.snapshot();
        let mut writes = Vec::new();
        let mut project = match current.projects.get(name) {
            Some(project) => Project::clone(project),
            None if create => {
                writes.push(Write::WorkingCopy);
                Project::new(name.clone())
            }
            None => {
                return Err(CatalogError::NotFound(format!(
                    "project {name:?} does not exist"
                )))
            }
        };
        let result = edit(&mut project, &mut writes)?;
        let mut batch = WriteBatch::default();
        let mut epoch_moves = false;
        for write in &writes {
            match write {
                Write::WorkingCopy => {
                    batch.put(project_key(name), serde_json::to_vec(&project.working)?)
                }
                Write::Version(n) => {
                    let version = project.version(*n).expect("written version exists");
                    batch.put(version_key(name, *n), serde_json::to_vec(version.as_ref())?);
                    epoch_moves = true;
                }
                Write::Status(n) => {
                    batch.put(
                        status_key(name, *n),
                        serde_json::to_vec(&project.status[n])?,
                    );
                    epoch_moves = true;
                }
            }
        }
        self.commit(batch)?;
        let mut next = Snapshot::clone(&current);
        next.epoch += u64::from(epoch_moves);
        next.projects.insert(name.clone(), Arc::new(project));
        *self.snapshot.write().expect("catalog lock poisoned") = Arc::new(next);
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
            let mut next = p.working.blueprints.clone();
            let edited = apply_edit(next.get(name), input, &mut p.working.last_uid, "")
                .map_err(CatalogError::Invalid)?;
            next.insert(name.clone(), edited);
            check_unique_names(&next, Some(name))?;
            Ok(record_edit(p, next, writes))
        })
    }

    /// Replaces every blueprint of the working copy; those not in `inputs` are removed.
    pub fn put_blueprints(
        &self,
        project: &Ident,
        inputs: Vec<(Ident, BlueprintInput)>,
    ) -> Result<Vec<Change>, CatalogError> {
        self.update(project, true, |p, writes| {
            let mut next = Blueprints::new();
            let mut errors = Vec::new();
            for (name, input) in inputs {
                let base = format!("/{name}");
                match apply_edit(
                    p.working.blueprints.get(&name),
                    input,
                    &mut p.working.last_uid,
                    &base,
                ) {
                    Ok(bp) => {
                        next.insert(name, bp);
                    }
                    Err(mut e) => errors.append(&mut e),
                }
            }
            if !errors.is_empty() {
                return Err(CatalogError::Invalid(errors));
            }
            check_unique_names(&next, None)?;
            Ok(record_edit(p, next, writes))
        })
    }

    pub fn delete_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
    ) -> Result<Vec<Change>, CatalogError> {
        self.update(project, false, |p, writes| {
            let mut next = p.working.blueprints.clone();
            if next.remove(name).is_none() {
                return Err(CatalogError::NotFound(format!(
                    "blueprint {name:?} does not exist in the working copy of {:?}",
                    p.name.as_str()
                )));
            }
            Ok(record_edit(p, next, writes))
        })
    }

    /// Freezes the working copy as the next version. `projectors` start with a pending migration.
    pub fn freeze(
        &self,
        project: &Ident,
        projectors: &[&str],
    ) -> Result<Arc<Version>, CatalogError> {
        self.update(project, false, |p, writes| {
            if !p.has_unfrozen_changes() {
                return Err(CatalogError::Conflict(match p.latest() {
                    Some(v) => format!("nothing changed since version {}", v.number),
                    None => "the working copy has no blueprints to freeze".into(),
                }));
            }
            let empty = Blueprints::new();
            let previous = p.latest().map_or(&empty, |v| &v.blueprints);
            let number = p.versions.len() as u32 + 1;
            let version = Version {
                number,
                changes: diff(previous, &p.working.blueprints),
                blueprints: p.working.blueprints.clone(),
                edits: std::mem::take(&mut p.working.edits),
                frozen_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            };
            let status = VersionStatus {
                retired: false,
                migrations: projectors
                    .iter()
                    .map(|name| (name.to_string(), MigrationState::Pending))
                    .collect(),
            };
            p.versions.push(Arc::new(version));
            p.status.insert(number, status);
            writes.extend([
                Write::Version(number),
                Write::Status(number),
                Write::WorkingCopy,
            ]);
            Ok(p.versions[number as usize - 1].clone())
        })
    }

    pub fn set_migration(
        &self,
        project: &Ident,
        number: u32,
        projector: &str,
        state: MigrationState,
    ) -> Result<(), CatalogError> {
        self.update(project, false, |p, writes| {
            let status = p.status.get_mut(&number).ok_or_else(|| {
                CatalogError::NotFound(format!("version {number} does not exist"))
            })?;
            status.migrations.insert(projector.to_string(), state);
            writes.push(Write::Status(number));
            Ok(())
        })
    }

    /// Stops projecting into a version; reads of it keep working.
    pub fn retire(&self, project: &Ident, number: u32) -> Result<(), CatalogError> {
        self.update(project, false, |p, writes| {
            let status = p.status.get_mut(&number).ok_or_else(|| {
                CatalogError::NotFound(format!("version {number} does not exist"))
            })?;
            if status.retired {
                return Ok(());
            }
            status.retired = true;
            writes.push(Write::Status(number));
            Ok(())
        })
    }

    /// Forgets a project and all its versions.
    pub fn delete_project(&self, name: &Ident) -> Result<(), CatalogError> {
        let _guard = self.writer.lock().expect("catalog writer poisoned");
        let current = self.snapshot();
        let mut batch = WriteBatch::default();
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
        *self.snapshot.write().expect("catalog lock poisoned") = Arc::new(next);
        Ok(())
    }
}

/// What an edit wants persisted.
enum Write {
    WorkingCopy,
    Version(u32),
    Status(u32),
}

fn record_edit(p: &mut Project, next: Blueprints, writes: &mut Vec<Write>) -> Vec<Change> {
    let changes = diff(&p.working.blueprints, &next);
    if !changes.is_empty() {
        p.working.blueprints = next;
        p.working.edits.extend(changes.iter().cloned());
        writes.push(Write::WorkingCopy);
    }
    changes
}

/// Two blueprints of a project may not share a PostgreSQL table or an Elasticsearch type.
fn check_unique_names(blueprints: &Blueprints, edited: Option<&Ident>) -> Result<(), CatalogError> {
    let mut errors = Vec::new();
    let mut tables: BTreeMap<&Ident, &Ident> = BTreeMap::new();
    let mut types: BTreeMap<&Ident, &Ident> = BTreeMap::new();
    for (name, bp) in blueprints {
        let base = if edited.is_some() {
            String::new()
        } else {
            format!("/{name}")
        };
        if let Some(other) = tables.insert(&bp.table, name) {
            errors.push(FieldError::new(
                format!("{base}/postgresql/table"),
                format!(
                    "table {:?} is already used by blueprint {:?}",
                    bp.table.as_str(),
                    other.as_str()
                ),
            ));
        }
        if let Some(other) = types.insert(&bp.es_type, name) {
            errors.push(FieldError::new(
                format!("{base}/elasticsearch/type"),
                format!(
                    "type {:?} is already used by blueprint {:?}",
                    bp.es_type.as_str(),
                    other.as_str()
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::Invalid(errors))
    }
}

fn load(db: &DB) -> Result<Snapshot, CatalogError> {
    let mut projects: BTreeMap<Ident, Project> = BTreeMap::new();
    for entry in db.iterator(rocksdb::IteratorMode::Start) {
        let (key, value) = entry?;
        let key = String::from_utf8_lossy(&key);
        let mut parts = key.split('/');
        let (Some(kind), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(name) = Ident::parse(name) else {
            continue;
        };
        let project = projects
            .entry(name.clone())
            .or_insert_with(|| Project::new(name));
        match kind {
            "project" => project.working = serde_json::from_slice(&value)?,
            "version" => project
                .versions
                .push(Arc::new(serde_json::from_slice(&value)?)),
            "status" => {
                let status: VersionStatus = serde_json::from_slice(&value)?;
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
