//! The embedded backend: the catalog and the journal in RocksDB under the data directory, owned by
//! one process. The default; nothing else to run.
//!
//! Everything here delegates to [`Catalog`] and [`Journal`], which keep their own invariants (one
//! synced batch per catalog edit; one writer thread that group-commits the journal). Revisions are
//! the journal's sequence numbers: they strictly increase per project (and across projects), but a
//! project's revisions have gaps where other projects wrote.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{Stats, Storage, StorageError};
use crate::blueprint::{BlueprintInput, Change, Ident};
use crate::catalog::{Catalog, MigrationState, Snapshot, Version};
use crate::journal::backfill::BackfillState;
use crate::journal::{DeadLetter, Entry, ItemRecord, Journal, ProjectorProgress};

pub struct EmbeddedStorage {
    catalog: Arc<Catalog>,
    journal: Arc<Journal>,
}

impl EmbeddedStorage {
    pub fn new(journal: Arc<Journal>) -> EmbeddedStorage {
        EmbeddedStorage {
            catalog: journal.catalog().clone(),
            journal,
        }
    }

    /// The journal (for the dispatchers and the RabbitMQ relay, which only this backend has).
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }
}

#[async_trait]
impl Storage for EmbeddedStorage {
    fn backend(&self) -> &'static str {
        "rocksdb"
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.catalog.snapshot()
    }

    async fn refresh_catalog(&self) -> Result<(), StorageError> {
        // This process is the only writer: its copy is always current.
        Ok(())
    }

    async fn fresh_snapshot(&self, _project: &Ident) -> Result<Arc<Snapshot>, StorageError> {
        Ok(self.catalog.snapshot())
    }

    async fn put_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
        input: BlueprintInput,
    ) -> Result<Vec<Change>, StorageError> {
        Ok(self.catalog.put_blueprint(project, name, input)?)
    }

    async fn put_blueprints(
        &self,
        project: &Ident,
        inputs: Vec<(Ident, BlueprintInput)>,
    ) -> Result<Vec<Change>, StorageError> {
        Ok(self.catalog.put_blueprints(project, inputs)?)
    }

    async fn delete_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
    ) -> Result<Vec<Change>, StorageError> {
        Ok(self.catalog.delete_blueprint(project, name)?)
    }

    async fn retire(&self, project: &Ident, version: u32) -> Result<(), StorageError> {
        Ok(self.catalog.retire(project, version)?)
    }

    async fn set_migration(
        &self,
        project: &Ident,
        version: u32,
        projector: &str,
        state: MigrationState,
    ) -> Result<(), StorageError> {
        Ok(self
            .catalog
            .set_migration(project, version, projector, state)?)
    }

    async fn write(
        &self,
        project: &Ident,
        epoch: u64,
        entries: Vec<Entry>,
    ) -> Result<Vec<u64>, StorageError> {
        Ok(self.journal.write(epoch, project.clone(), entries).await?)
    }

    async fn freeze(&self, project: &Ident) -> Result<(Arc<Version>, u64), StorageError> {
        Ok(self.journal.freeze(project.clone()).await?)
    }

    async fn remigrate(
        &self,
        project: &Ident,
        version: u32,
        projectors: Vec<String>,
    ) -> Result<u64, StorageError> {
        Ok(self
            .journal
            .remigrate(project.clone(), version, projectors)
            .await?)
    }

    async fn ensure_backfill(&self, project: &Ident, version: u32) -> Result<bool, StorageError> {
        Ok(self.journal.ensure_backfill(project, version).await?)
    }

    async fn drop_project(&self, project: &Ident) -> Result<u64, StorageError> {
        Ok(self.journal.drop_project(project.clone()).await?)
    }

    async fn item(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<ItemRecord>, StorageError> {
        Ok(self.journal.item(project, blueprint, id)?)
    }

    async fn backfill_state(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<Option<BackfillState>, StorageError> {
        Ok(self.journal.backfill_state(project, version)?)
    }

    async fn wait_projected(
        &self,
        _project: &Ident,
        revision: u64,
        timeout: Duration,
    ) -> Result<(), Vec<String>> {
        self.journal
            .wait_projected(revision, timeout)
            .await
            .map_err(|behind| behind.into_iter().map(String::from).collect())
    }

    async fn progress(&self, projector: &str) -> ProjectorProgress {
        self.journal.progress(projector)
    }

    fn check_backlog(&self) -> Result<(), StorageError> {
        Ok(self.journal.check_backlog()?)
    }

    async fn dead_letters(
        &self,
        projector: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StorageError> {
        Ok(self.journal.dead_letters(projector, limit)?)
    }

    async fn retry_dead_letters(&self, projector: Option<&str>) -> Result<usize, StorageError> {
        Ok(self.journal.retry_dead_letters(projector).await?)
    }

    fn reachable(&self) -> Result<(), String> {
        Ok(())
    }

    async fn stats(&self) -> Stats {
        let (items, bytes) = self.journal.size();
        Stats {
            last_revision: self.journal.last_seq(),
            items,
            bytes,
        }
    }
}
