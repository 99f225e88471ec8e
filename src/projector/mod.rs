//! The projector contract and the registry of enabled projectors.
//!
//! A projector turns journal tasks into the shape of one store. Delivery is at-least-once and in `seq`
//! order, so every method must be idempotent: applying a task twice, or an older revision after a newer
//! one, leaves the store as if the newest revision alone had been applied. A projector never sees a
//! client request; it is given only tasks and a catalog snapshot to look blueprints up (in a worker
//! process, a copy of the server's catalog). The dispatcher calls
//! `migrate` and `drop_project` for the `Migrate` and `DropProject` tasks, in their place in the queue,
//! and `apply` for runs of item tasks.

pub mod conformance;
pub mod elasticsearch;
pub mod postgres;
pub mod rocksdb;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;
use uuid::Uuid;

use crate::blueprint::Ident;
use crate::catalog::{Snapshot, Version};
use crate::journal::task::Task;

/// The stores dstore projects into. Configuration, workers and the broker name projectors by
/// this enum; `match`es over it have no catch-all arm, so a new store does not compile until every
/// place handles it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjectorKind {
    Rocksdb,
    Postgresql,
    Elasticsearch,
}

impl ProjectorKind {
    pub const ALL: [ProjectorKind; 3] = [
        ProjectorKind::Rocksdb,
        ProjectorKind::Postgresql,
        ProjectorKind::Elasticsearch,
    ];

    /// The name tasks, queues and reports use.
    pub fn name(self) -> &'static str {
        match self {
            ProjectorKind::Rocksdb => "rocksdb",
            ProjectorKind::Postgresql => "postgresql",
            ProjectorKind::Elasticsearch => "elasticsearch",
        }
    }

    /// A projector by name (`postgres` is accepted for `postgresql`).
    pub fn parse(name: &str) -> Option<ProjectorKind> {
        match name {
            "postgres" => Some(ProjectorKind::Postgresql),
            _ => ProjectorKind::ALL.into_iter().find(|k| k.name() == name),
        }
    }

    /// Every name, for messages.
    pub fn names() -> String {
        ProjectorKind::ALL.map(ProjectorKind::name).join(", ")
    }
}

impl std::fmt::Display for ProjectorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The store is unreachable, overloaded or asked us to retry: keep the task and retry later.
    Transient,
    /// The store refuses this task for good: move it to the dead letters with the reason.
    Permanent,
}

/// The most bytes of a refusal's reason a dead letter keeps: a store's message and its detail
/// (PostgreSQL quotes up to 64 bytes of each column of a failing row) are far shorter, save for
/// tables of hundreds of columns.
pub const MAX_REASON_BYTES: usize = 8 << 10;

#[derive(Clone, Debug, Error)]
#[error("{message}")]
pub struct ProjectorError {
    pub kind: ErrorKind,
    pub message: String,
    /// Transient, and the store answered: the cause may be the project's own (a permission taken
    /// from one table, a lock held on it, a trigger refusing), so only the project of the refused
    /// tasks waits, as after a failed migration, and the others go on.
    pub scoped: bool,
    /// What the store said that may quote the item's values (PostgreSQL's DETAIL, such as
    /// `Key (email)=(…) already exists`; Elasticsearch's reason): the dead letter keeps it, behind
    /// the API's keys, and logs do not, which carry `message` only.
    pub detail: Option<String>,
    /// Scoped, and the store could tell whose write it refused (the project of the table a
    /// statement failed on): that project waits at once, instead of the batch's projects being
    /// tried one by one to find it.
    pub project: Option<Ident>,
}

impl ProjectorError {
    pub fn transient(message: impl Into<String>) -> ProjectorError {
        ProjectorError {
            kind: ErrorKind::Transient,
            message: message.into(),
            scoped: false,
            detail: None,
            project: None,
        }
    }

    /// The error, scoped to `project` when it is ([`ProjectorError::project`]).
    pub fn of_project(self, project: &Ident) -> ProjectorError {
        ProjectorError {
            project: self.scoped.then(|| project.clone()),
            ..self
        }
    }

    /// The error with the store's words that may quote values ([`ProjectorError::detail`]).
    pub fn with_detail(self, detail: Option<String>) -> ProjectorError {
        ProjectorError { detail, ..self }
    }

    /// The whole reason, as a dead letter records it: the message, then the detail.
    /// At most [`MAX_REASON_BYTES`]: a dead letter keeps it, and a worker's report carries it
    /// for each task refused.
    pub fn reason(&self) -> String {
        let reason = match &self.detail {
            Some(detail) => format!("{}: {detail}", self.message),
            None => self.message.clone(),
        };
        crate::auth::audit::shortened(reason, MAX_REASON_BYTES)
    }

    /// A transient error whose cause may be one project's own (see [`ProjectorError::scoped`]).
    pub fn scoped(message: impl Into<String>) -> ProjectorError {
        ProjectorError {
            scoped: true,
            ..ProjectorError::transient(message)
        }
    }

    pub fn permanent(message: impl Into<String>) -> ProjectorError {
        ProjectorError {
            kind: ErrorKind::Permanent,
            ..ProjectorError::transient(message)
        }
    }
}

/// What became of one task of a batch.
pub type Outcome = Result<(), ProjectorError>;

#[derive(Clone, Debug, Serialize)]
pub struct Health {
    pub reachable: bool,
    pub detail: String,
}

#[async_trait]
pub trait Projector: Send + Sync {
    /// A stable name: `rocksdb`, `postgresql`, `elasticsearch`. Tasks are queued under it.
    fn name(&self) -> &'static str;

    /// Creates what a frozen version needs in the store; running it again finishes or confirms it.
    /// `retired` lists the project's retired versions: what a store points at the newest version
    /// (Elasticsearch's aliases) leaves a retired one for the newest live one.
    async fn migrate(
        &self,
        project: &Ident,
        version: &Version,
        retired: &[u32],
    ) -> Result<(), ProjectorError>;

    /// Applies `Upsert` and `Delete` tasks in order. `Err` means the batch should be retried as a
    /// whole; `Ok` holds one outcome per task, in order, and a permanent error in it dead-letters
    /// only that task.
    /// `snapshot` holds every version the tasks name, unless the project was dropped since: a version
    /// missing from it needs no write.
    async fn apply(
        &self,
        snapshot: &Snapshot,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError>;

    /// Removes everything the store holds for a project; a project it never saw is not an error.
    async fn drop_project(&self, project: &Ident) -> Result<(), ProjectorError>;

    /// What the store holds for an item in one version: its document as the store returns it
    /// (geometries as GeoJSON), or `None` when absent or deleted. Used by checks and tests.
    async fn read(
        &self,
        project: &Ident,
        version: u32,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Value>, ProjectorError>;

    /// Whether the store answers.
    async fn health(&self) -> Health;

    /// Tells the projector which deployment it works for (see [`Deployment`]); a store shared by
    /// several deployments keeps what each made apart. Set once: a later call naming another
    /// deployment changes nothing and returns `false`.
    fn work_for(&self, _deployment: &str) -> bool {
        true
    }

    /// What migrating `version` would create in the store (DDL, mappings), for a freeze's dry run.
    /// Sends nothing.
    fn preview(&self, _project: &Ident, _version: &Version) -> Value {
        Value::Null
    }

    /// The projector's own counters for `/_metrics`: (name, help, value since start).
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
}

/// The enabled projectors: those this process can reach, and the names of those only `dstore worker`
/// processes elsewhere open (the embedded keyspaces of a worker, say). Tasks are queued for all but
/// the keyspaces the journal writes itself (`projector/rocksdb`).
#[derive(Clone, Default)]
pub struct Registry {
    projectors: Vec<Arc<dyn Projector>>,
    elsewhere: Vec<&'static str>,
}

/// The deployment a projector works for: the id of the journal whose tasks it applies (made with
/// the data directory, or with the cluster's storage database), so a restored backup is the same
/// deployment and a fresh data directory a new one. PostgreSQL and Elasticsearch mark what they
/// create with it, and refuse to write into or drop what another deployment made: two deployments
/// pointed at one database would otherwise write into each other's tables, and dropping a project
/// in one would drop the other's. Unknown until set (a worker learns it from its first task);
/// while unknown, and for what an older dstore made unmarked, nothing is refused.
#[derive(Debug, Default)]
pub struct Deployment(OnceLock<String>);

impl Deployment {
    /// Sets the deployment unless it is set already; `false` when it was set to another one. An
    /// empty id (a task from an older dstore) sets nothing.
    /// An id that is not a journal's (more than 64 bytes, or other than letters, digits and `-`)
    /// sets nothing and is refused.
    pub fn set(&self, id: &str) -> bool {
        if id.is_empty() {
            return true;
        }
        let valid = id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        valid && self.0.get_or_init(|| id.to_owned()) == id
    }

    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Whether something marked as made by `owner` (`None`: unmarked) may be used or dropped.
    pub fn admits(&self, owner: Option<&str>) -> bool {
        match (owner, self.get()) {
            (Some(owner), Some(ours)) => owner == ours,
            _ => true,
        }
    }
}

impl Registry {
    pub fn new(projectors: Vec<Arc<dyn Projector>>) -> Registry {
        Registry {
            projectors,
            elsewhere: Vec::new(),
        }
    }

    /// Adds a projector this process reaches.
    pub fn add(&mut self, projector: Arc<dyn Projector>) {
        self.projectors.push(projector);
    }

    /// Adds a projector that only worker processes open.
    pub fn add_elsewhere(&mut self, name: &'static str) {
        self.elsewhere.push(name);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.projectors
            .iter()
            .map(|p| p.name())
            .chain(self.elsewhere.iter().copied())
            .collect()
    }

    /// The projectors this process can reach.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Projector>> {
        self.projectors.iter()
    }

    /// Tells every projector this process reaches which deployment it works for.
    pub fn work_for(&self, deployment: &str) {
        for projector in &self.projectors {
            projector.work_for(deployment);
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Projector>> {
        self.projectors.iter().find(|p| p.name() == name)
    }
}

/// Capped exponential backoff for transient failures.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(7))).min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_keeps_at_most_its_limit_cut_at_a_character_boundary() {
        let error = ProjectorError::permanent("duplicate key value").with_detail(Some(format!(
            "Failing row contains ({})",
            "é".repeat(20_000)
        )));
        let reason = error.reason();
        assert!(
            reason.len() <= MAX_REASON_BYTES + '…'.len_utf8(),
            "{}",
            reason.len()
        );
        assert!(reason.starts_with("duplicate key value: Failing row contains (éé"));
        assert!(reason.ends_with('…'));
        let short = ProjectorError::permanent("refused").with_detail(Some("why".into()));
        assert_eq!(short.reason(), "refused: why");
    }
}
