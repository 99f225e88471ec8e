//! Index lifecycle: create a version's indexes, point each blueprint's alias at the newest live
//! version, delete a project's indexes.
//!
//! Invariants: every step is idempotent, so a retried migration finishes a half-done one; an existing
//! index is accepted only when its mapping includes the one dstore wants; an alias only ever moves
//! forward (to a higher version), or back from a retired version to the newest live one (retiring
//! the newest version migrates the newest live one again), in one atomic `_aliases` call; nothing is deleted or moved unless its
//! `_meta` names the project; nothing another deployment made (its `_meta` names that deployment) is
//! written into or deleted.

use serde_json::{json, Value};

use super::client::EsError;
use super::{mapping, ElasticsearchProjector};
use crate::blueprint::{Blueprint, Ident};
use crate::catalog::Version;
use crate::projector::ProjectorError;

/// Indexes per delete request, to keep URLs short.
const DELETE_CHUNK: usize = 50;

/// `(project, version, blueprint)` from an index's `_meta`, if dstore created it.
fn owner(mappings: &Value) -> Option<(&str, u64, &str)> {
    let meta = &mappings["_meta"]["dstore"];
    Some((
        meta["project"].as_str()?,
        meta["version"].as_u64()?,
        meta["blueprint"].as_str()?,
    ))
}

/// The deployment that made an index, from its `_meta`; `None` for an older dstore's.
fn deployment(mappings: &Value) -> Option<&str> {
    mappings["_meta"]["dstore"]["deployment"].as_str()
}

impl ElasticsearchProjector {
    /// The create-index request of a blueprint in a version, its `_meta` naming this deployment
    /// once known.
    pub(super) fn index_body(
        &self,
        project: &Ident,
        version: u32,
        name: &Ident,
        blueprint: &Blueprint,
    ) -> Value {
        self.marked(mapping::index_body(project, version, name, blueprint))
    }

    /// A create-index request with its `_meta` naming this deployment, once known.
    fn marked(&self, mut body: Value) -> Value {
        if let Some(id) = self.deployment.get() {
            body["mappings"]["_meta"]["dstore"]["deployment"] = json!(id);
        }
        body
    }

    /// Whether this deployment may write into or delete an index whose mapping is `mappings`.
    fn admits(&self, mappings: &Value) -> bool {
        self.deployment.admits(deployment(mappings))
    }

    pub(super) async fn migrate_version(
        &self,
        project: &Ident,
        version: &Version,
        retired: &[u32],
    ) -> Result<(), ProjectorError> {
        for (name, blueprint) in &version.blueprints {
            self.ensure_index(project, version.number, name, blueprint)
                .await?;
        }
        for name in version.blueprints.keys() {
            self.point_alias(project, version.number, name, retired)
                .await?;
        }
        self.delete_legacy_indexes(project, version).await
    }

    /// Deletes the indexes an older dstore made for this version under the names of its layout
    /// (`{prefix}{project}_v{version}_{blueprint}`), once the version has its indexes under today's
    /// names; their aliases go with them. Only indexes whose `_meta` names this very version.
    async fn delete_legacy_indexes(
        &self,
        project: &Ident,
        version: &Version,
    ) -> Result<(), ProjectorError> {
        let legacy: Vec<String> = version
            .blueprints
            .keys()
            .map(|name| self.names.legacy_index(project, version.number, name))
            .collect();
        let names: Vec<&str> = legacy.iter().map(String::as_str).collect();
        let found = self.client.mappings(&names).await?;
        let ours: Vec<&str> = found
            .iter()
            .filter(|(index, m)| {
                legacy.contains(index)
                    && self.admits(m)
                    && owner(m).is_some_and(|(p, v, _)| {
                        p == project.as_str() && v == u64::from(version.number)
                    })
            })
            .map(|(index, _)| index.as_str())
            .collect();
        if !ours.is_empty() {
            tracing::info!(%project, version = version.number, indexes = ?ours, "deleting indexes of the old naming layout");
            self.client.delete_indexes(&ours).await?;
        }
        Ok(())
    }

    /// Creates the index of a blueprint in a version, or confirms the existing one; returns its name.
    pub(super) async fn ensure_index(
        &self,
        project: &Ident,
        version: u32,
        name: &Ident,
        blueprint: &Blueprint,
    ) -> Result<String, ProjectorError> {
        let index = self.names.index(project, version, name);
        // An older dstore's index names no deployment: the rest of its mapping must match.
        let wanted = mapping::index_body(project, version, name, blueprint);
        let body = self.marked(wanted.clone());
        if self.client.create_index(&index, &body).await? {
            tracing::info!(index = %index, "index created");
        } else {
            let found = self.client.mappings(&[index.as_str()]).await?;
            let existing = found.get(&index).cloned().unwrap_or(Value::Null);
            if !self.admits(&existing) {
                return Err(ProjectorError::permanent(format!(
                    "index {index} belongs to another dstore deployment (deployment {}; this one \
                     is {}): two deployments cannot share index names. Give this one its own \
                     prefix (elasticsearch.index_prefix / DSTORE_ELASTICSEARCH_INDEX_PREFIX), or \
                     delete that deployment's indexes if it is gone, then freeze again",
                    deployment(&existing).unwrap_or_default(),
                    self.deployment.get().unwrap_or_default(),
                )));
            }
            if let Some(difference) = mapping::first_difference(&existing, &wanted["mappings"]) {
                return Err(ProjectorError::permanent(format!(
                    "index {index} already exists and differs from version {version} of {project}/{name}: {difference}"
                )));
            }
        }
        self.remember(&index);
        Ok(index)
    }

    /// Moves the blueprint's alias to this version's index, unless a newer live version already
    /// holds it (one `retired` lists takes no more writes but deletes: the alias leaves it).
    async fn point_alias(
        &self,
        project: &Ident,
        version: u32,
        name: &Ident,
        retired: &[u32],
    ) -> Result<(), ProjectorError> {
        let alias = self.names.alias(project, name);
        let target = self.names.index(project, version, name);
        let holders = self.client.alias_holders(&alias).await?;
        if holders == [target.as_str()] {
            return Ok(());
        }
        if !holders.is_empty() {
            let names: Vec<&str> = holders.iter().map(String::as_str).collect();
            let mappings = self.client.mappings(&names).await?;
            let newer = mappings.values().filter_map(owner).any(|(p, v, b)| {
                p == project.as_str()
                    && b == name.as_str()
                    && v > u64::from(version)
                    && !retired.iter().any(|r| u64::from(*r) == v)
            });
            if newer {
                return Ok(());
            }
        }
        let mut actions: Vec<Value> = holders
            .iter()
            .filter(|h| **h != target)
            .map(|h| json!({"remove": {"index": h, "alias": alias}}))
            .collect();
        actions.push(json!({"add": {"index": target, "alias": alias}}));
        self.client.update_aliases(actions).await?;
        tracing::info!(alias = %alias, index = %target, "alias moved to the newest version");
        Ok(())
    }

    /// Deletes every index whose `_meta` names the project; their aliases go with them.
    pub(super) async fn delete_project_indexes(
        &self,
        project: &Ident,
    ) -> Result<(), ProjectorError> {
        let pattern = self.names.project_indexes(project);
        let mappings = self.client.mappings(&[pattern.as_str()]).await?;
        let ours: Vec<&str> = mappings
            .iter()
            .filter(|(_, m)| {
                self.admits(m) && owner(m).is_some_and(|(p, _, _)| p == project.as_str())
            })
            .map(|(index, _)| index.as_str())
            .collect();
        tracing::info!(%project, indexes = ours.len(), "deleting the indexes of a dropped project");
        for chunk in ours.chunks(DELETE_CHUNK) {
            // Indexes of its own refused deletion are refused for what the cluster is doing (a
            // snapshot in progress, a block), never for good: dead-lettered, the drop would leave
            // them to a project made again under the name. Its project waits, and only it.
            self.client
                .delete_indexes(chunk)
                .await
                .map_err(|error| match error {
                    EsError::Refused { .. } => ProjectorError::scoped(error.to_string()),
                    other => ProjectorError::from(other),
                })?;
        }
        self.forget(&ours);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_an_index_is_read_from_its_meta() {
        let m =
            json!({"_meta": {"dstore": {"project": "blog", "version": 2, "blueprint": "article"}}});
        assert_eq!(owner(&m), Some(("blog", 2, "article")));
        assert_eq!(owner(&json!({"properties": {}})), None);
    }
}
