//! The Elasticsearch projector: one index per project, version and blueprint with a strict mapping,
//! an alias per blueprint on the newest version, and item writes through `_bulk` with the item's
//! revision as external version.
//!
//! Files: `client` (the only user of the `elasticsearch` crate), `names` (index and alias names),
//! `schema` (the parameters Elasticsearch accepts, and the check of column overrides), `mapping`
//! (generated mappings), `indexes` (migrate, aliases, drop), `apply` (bulk writes).
//!
//! Invariants: constructing the projector sends nothing, so an unreachable server never stops dstore
//! from starting (tasks wait, health says why); an older revision never replaces a newer one and a
//! delete is not undone by a late write (external versions and `index.gc_deletes`); every method is
//! idempotent.

mod apply;
pub mod client;
mod indexes;
pub mod mapping;
pub mod names;
pub mod schema;

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

pub use client::EsError;
pub use mapping::{check_override, check_overrides};

use self::client::EsClient;
use self::names::Names;
use super::{Deployment, Health, Outcome, Projector, ProjectorError, ProjectorKind};
use crate::blueprint::Ident;
use crate::catalog::{Snapshot, Version};
use crate::config::ElasticsearchSettings;
use crate::journal::task::Task;

pub struct ElasticsearchProjector {
    client: EsClient,
    names: Names,
    /// Indexes known to exist, so writes need not check them again.
    known: Mutex<HashSet<String>>,
    /// Whose indexes this projector makes and uses (`indexes`).
    deployment: Deployment,
}

impl ElasticsearchProjector {
    /// Checks the settings; connects only when the first task or health check needs it.
    pub fn new(settings: &ElasticsearchSettings) -> Result<ElasticsearchProjector, EsError> {
        Ok(ElasticsearchProjector {
            client: EsClient::new(settings)?,
            names: Names::new(&settings.index_prefix)?,
            known: Mutex::new(HashSet::new()),
            deployment: Deployment::default(),
        })
    }

    /// Index and alias names as this projector builds them (tests and tools).
    pub fn names(&self) -> &Names {
        &self.names
    }

    fn knows(&self, index: &str) -> bool {
        self.known.lock().is_ok_and(|known| known.contains(index))
    }

    fn remember(&self, index: &str) {
        if let Ok(mut known) = self.known.lock() {
            known.insert(index.to_string());
        }
    }

    fn forget(&self, indexes: &[&str]) {
        if let Ok(mut known) = self.known.lock() {
            for index in indexes {
                known.remove(*index);
            }
        }
    }
}

#[async_trait]
impl Projector for ElasticsearchProjector {
    fn name(&self) -> &'static str {
        ProjectorKind::Elasticsearch.name()
    }

    async fn migrate(
        &self,
        project: &Ident,
        version: &Version,
        retired: &[u32],
    ) -> Result<(), ProjectorError> {
        self.migrate_version(project, version, retired).await
    }

    fn work_for(&self, deployment: &str) -> bool {
        self.deployment.set(deployment)
    }

    async fn apply(
        &self,
        snapshot: &Snapshot,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        self.apply_tasks(snapshot, tasks).await
    }

    async fn drop_project(&self, project: &Ident) -> Result<(), ProjectorError> {
        self.delete_project_indexes(project).await
    }

    async fn read(
        &self,
        project: &Ident,
        version: u32,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Value>, ProjectorError> {
        let index = self.names.index(project, version, blueprint);
        Ok(self.client.source(&index, &id.to_string()).await?)
    }

    fn preview(&self, project: &Ident, version: &Version) -> Value {
        let indexes: serde_json::Map<String, Value> = version
            .blueprints
            .iter()
            .map(|(name, blueprint)| {
                (
                    self.names.index(project, version.number, name),
                    self.index_body(project, version.number, name, blueprint),
                )
            })
            .collect();
        let aliases: Vec<String> = version
            .blueprints
            .keys()
            .map(|name| self.names.alias(project, name))
            .collect();
        serde_json::json!({"indexes": indexes, "aliases_moved": aliases})
    }

    async fn health(&self) -> Health {
        match self.client.info().await {
            Ok(info) => {
                let distribution = info["version"]["distribution"]
                    .as_str()
                    .unwrap_or("elasticsearch");
                let number = info["version"]["number"]
                    .as_str()
                    .unwrap_or("unknown version");
                Health {
                    reachable: true,
                    detail: format!("{distribution} {number} at {}", self.client.url()),
                }
            }
            Err(error) => Health {
                reachable: false,
                detail: format!("{} ({error})", self.client.url()),
            },
        }
    }
}
