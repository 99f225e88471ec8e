//! Applying a run of item tasks through `_bulk`.
//!
//! Each task becomes one action per version it names, versioned externally with the item's revision:
//! Elasticsearch keeps a document only if its revision is higher than the one it holds (a delete
//! included, see `mapping::GC_DELETES`), so a version conflict means a newer state is already there and
//! counts as success, as does deleting a document that is not there. An action Elasticsearch refuses
//! for good (a document its mapping rejects) fails its task only, with Elasticsearch's reason; 429, 5xx
//! and a cluster refusing dstore itself (see `client::is_transient_status`) make the task transient,
//! so the dispatcher retries from it with capped backoff.
//!
//! Documents are sent as the journal holds them: geometries are GeoJSON, which `geo_shape` takes for
//! lines and polygons and `geo_point` takes for points (Elasticsearch 8 documents GeoJSON `Point` among
//! its geo_point formats), so `_source` reads back exactly what dstore wrote.
//!
//! Indexes are never created implicitly: Elasticsearch would give them a dynamic mapping. An index this
//! process has not seen yet is checked, and created from the catalog if its migration was lost.

use std::collections::HashMap;

use super::client::{is_transient_status, BulkAction, BulkItem, EsError};
use super::ElasticsearchProjector;
use crate::blueprint::Ident;
use crate::catalog::Snapshot;
use crate::journal::task::{Doc, Task};
use crate::projector::{ErrorKind, Outcome, ProjectorError};

/// Largest `_bulk` body dstore sends, in bytes of documents (Elasticsearch's default limit is 100 MB).
const MAX_BULK_BYTES: usize = 8 << 20;

/// One action and the task (by position) it belongs to.
struct Planned<'a> {
    task: usize,
    action: BulkAction<'a>,
}

/// Whose an index is: project, version, blueprint.
type Place<'a> = (&'a Ident, u32, &'a Ident);

/// The state of an index the batch writes to.
enum Target {
    Ready,
    /// The version or blueprint no longer exists (dropped meanwhile), or the index of a retired
    /// version is missing: nothing to write.
    Gone,
    Failed(ProjectorError),
}

impl ElasticsearchProjector {
    pub(super) async fn apply_tasks(
        &self,
        snapshot: &Snapshot,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        let (planned, indexes) = self.plan(tasks);
        let mut targets = HashMap::new();
        for (index, place) in indexes {
            let target = self.prepare(snapshot, &index, place).await?;
            targets.insert(index, target);
        }

        let mut outcomes: Vec<Outcome> = tasks.iter().map(|_| Ok(())).collect();
        let mut sendable = Vec::with_capacity(planned.len());
        for p in planned {
            match &targets[index_of(&p.action)] {
                Target::Ready => sendable.push(p),
                Target::Gone => {}
                Target::Failed(error) => merge(&mut outcomes[p.task], error.clone()),
            }
        }
        let mut pending = chunks(&sendable);
        pending.reverse();
        while let Some(chunk) = pending.pop() {
            let actions: Vec<BulkAction> = chunk.iter().map(|p| p.action.clone()).collect();
            match self.client.bulk(&actions).await {
                Ok(items) => {
                    for (p, item) in chunk.iter().zip(items) {
                        if let Err(error) = self.judge(&p.action, item) {
                            merge(&mut outcomes[p.task], error);
                        }
                    }
                }
                // The whole request refused for good (a proxy's size limit, a body it could not
                // read): halves are sent on their own, so only the actions refused alone fail.
                Err(error) if splits(&error) && chunk.len() > 1 => {
                    let (first, second) = chunk.split_at(chunk.len() / 2);
                    pending.extend([second, first]);
                }
                Err(error) => {
                    let error = match error {
                        // Refused whole with another status (a path a proxy in front does not
                        // route, 404; a method or a content type it does not take, 405, 415): it
                        // refuses dstore, not a document, and would refuse every later batch as
                        // well, so they wait for it to be fixed rather than being dead-lettered.
                        EsError::Refused { .. } if !splits(&error) => {
                            ProjectorError::transient(error.to_string())
                        }
                        error => ProjectorError::from(error),
                    };
                    for p in chunk {
                        merge(&mut outcomes[p.task], error.clone());
                    }
                }
            }
        }
        Ok(outcomes)
    }

    /// Every action of the batch, and every index they write to with whose it is.
    fn plan<'a>(&self, tasks: &'a [Task]) -> (Vec<Planned<'a>>, HashMap<String, Place<'a>>) {
        let mut planned = Vec::new();
        let mut indexes = HashMap::new();
        for (position, task) in tasks.iter().enumerate() {
            for write in task.version_writes() {
                let index = self
                    .names
                    .index(&task.project, write.version, write.blueprint);
                indexes.entry(index.clone()).or_insert((
                    &task.project,
                    write.version,
                    write.blueprint,
                ));
                let (id, version) = (write.id.to_string(), write.revision);
                let action = match write.doc {
                    Some(doc) => BulkAction::Index {
                        index,
                        id,
                        version,
                        doc,
                    },
                    None => BulkAction::Delete { index, id, version },
                };
                planned.push(Planned {
                    task: position,
                    action,
                });
            }
        }
        (planned, indexes)
    }

    /// Makes sure an index exists before anything is written to it. A transient failure fails the batch.
    ///
    /// A retired version's index is never made again: only deletes reach it, and an index that is
    /// not there (never built, or removed by an operator once the version was retired) holds
    /// nothing to delete. So it is looked for on every batch that writes to it, and the batch's
    /// actions for it are not sent when it is missing: an externally versioned delete would make
    /// Elasticsearch create it, with a dynamic mapping.
    async fn prepare(
        &self,
        snapshot: &Snapshot,
        index: &str,
        (project, version, blueprint): Place<'_>,
    ) -> Result<Target, ProjectorError> {
        let retired = snapshot
            .projects
            .get(project)
            .is_some_and(|p| p.is_retired(version));
        if self.knows(index) && !retired {
            return Ok(Target::Ready);
        }
        if self.client.index_exists(index).await? {
            self.remember(index);
            return Ok(Target::Ready);
        }
        if retired {
            return Ok(Target::Gone);
        }
        let definition = snapshot
            .projects
            .get(project)
            .and_then(|p| p.version(version))
            .and_then(|v| v.blueprints.get(blueprint).cloned());
        let Some(definition) = definition else {
            return Ok(Target::Gone);
        };
        tracing::warn!(
            index,
            "an index written to was missing; creating it from the catalog"
        );
        match self
            .ensure_index(project, version, blueprint, &definition)
            .await
        {
            Ok(_) => Ok(Target::Ready),
            Err(e) if e.kind == ErrorKind::Transient => Err(e),
            Err(e) => Ok(Target::Failed(e)),
        }
    }

    /// What one bulk result means for its task.
    fn judge(&self, action: &BulkAction, item: BulkItem) -> Outcome {
        let (verb, id) = match action {
            BulkAction::Index { id, .. } => ("write", id),
            BulkAction::Delete { id, .. } => ("delete", id),
        };
        let index = index_of(action);
        match item.status {
            200..=299 | 409 => Ok(()),
            404 if matches!(action, BulkAction::Delete { .. }) && item.error.is_none() => Ok(()),
            status => {
                let (kind, reason) = item
                    .error
                    .unwrap_or_else(|| ("error".into(), format!("status {status}")));
                if kind == "index_not_found_exception" {
                    // Deleted behind dstore's back: check it again on the retry.
                    self.forget(&[index]);
                }
                let message =
                    format!("elasticsearch refused to {verb} {index}/{id} ({status} {kind})");
                // The index closed, or blocked for writes, by an operator or a restore: the
                // project's own index, so its project waits and the others go on; dead-lettered,
                // its writes would be lost for a state that ends.
                if matches!(
                    kind.as_str(),
                    "index_closed_exception" | "cluster_block_exception"
                ) {
                    Err(ProjectorError::scoped(format!("{message}: {reason}")))
                } else if is_transient_status(status) || kind == "index_not_found_exception" {
                    Err(ProjectorError::transient(format!("{message}: {reason}")))
                } else {
                    // Its reason may quote the field's value ("Preview of field's value: …").
                    Err(ProjectorError::permanent(message).with_detail(Some(reason)))
                }
            }
        }
    }
}

fn index_of<'a>(action: &'a BulkAction) -> &'a str {
    match action {
        BulkAction::Index { index, .. } | BulkAction::Delete { index, .. } => index.as_str(),
    }
}

/// A task fails as its worst action: transient over permanent, the first error of a kind kept.
fn merge(outcome: &mut Outcome, error: ProjectorError) {
    match outcome {
        Ok(()) => *outcome = Err(error),
        Err(current)
            if current.kind == ErrorKind::Permanent && error.kind == ErrorKind::Transient =>
        {
            *current = error
        }
        Err(_) => {}
    }
}

/// Whether a refusal of a whole `_bulk` may come from some of its actions only: a 400 (a body
/// that did not parse) or a 413 (a proxy in front of Elasticsearch allowing less than its
/// `http.max_content_length`).
fn splits(error: &EsError) -> bool {
    matches!(
        error,
        EsError::Refused {
            status: 400 | 413,
            ..
        }
    )
}

/// Splits the actions into bulk requests of at most [`MAX_BULK_BYTES`] (but for one action larger
/// alone), cutting inside a task's actions too: an item written into many live versions, each copy
/// large, made one request past what Elasticsearch takes at once (refused whole with a 429, alike
/// at every retry, stopping every project's writes). A task gets the outcome of each request its
/// actions went in.
fn chunks<'p, 'a>(planned: &'p [Planned<'a>]) -> Vec<&'p [Planned<'a>]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, p) in planned.iter().enumerate() {
        let size = match &p.action {
            BulkAction::Index { doc, .. } => approximate_size(doc),
            BulkAction::Delete { .. } => 100,
        };
        if i > start && bytes + size > MAX_BULK_BYTES {
            out.push(&planned[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < planned.len() {
        out.push(&planned[start..]);
    }
    out
}

fn approximate_size(doc: &Doc) -> usize {
    doc.get().len() + 100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_error_outranks_a_permanent_one() {
        let mut outcome: Outcome = Ok(());
        merge(&mut outcome, ProjectorError::permanent("refused"));
        merge(&mut outcome, ProjectorError::transient("busy"));
        merge(&mut outcome, ProjectorError::permanent("refused again"));
        assert_eq!(outcome.unwrap_err().message, "busy");
    }

    #[test]
    fn large_batches_are_split_into_bounded_requests_even_inside_a_task() {
        let doc: Doc =
            serde_json::from_str(&format!("{{\"x\":\"{}\"}}", "y".repeat(3 << 20))).unwrap();
        // Five tasks of two copies, then one item written into seven live versions.
        let planned: Vec<Planned> = (0..6)
            .flat_map(|task| {
                let doc = &doc;
                (0..if task < 5 { 2 } else { 7 }).map(move |_| Planned {
                    task,
                    action: BulkAction::Index {
                        index: "i".into(),
                        id: "a".into(),
                        version: 1,
                        doc,
                    },
                })
            })
            .collect();
        let sent = chunks(&planned);
        let sizes: Vec<usize> = sent.iter().map(|c| c.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 17);
        for chunk in &sent {
            let bytes: usize = chunk
                .iter()
                .map(|p| match &p.action {
                    BulkAction::Index { doc, .. } => approximate_size(doc),
                    BulkAction::Delete { .. } => 100,
                })
                .sum();
            assert!(bytes <= MAX_BULK_BYTES, "{sizes:?}");
        }
        assert!(sizes.len() >= 6, "{sizes:?}");
    }
}
