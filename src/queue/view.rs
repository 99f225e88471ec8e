//! Where a consumer finds the catalog: in this process, or, in a `dstore worker`, a copy of the
//! server's, fetched over HTTP (`GET /{project}/_catalog`) when a task names a version it lacks.
//!
//! Frozen versions never change, so the copy is only ever extended, with two exceptions: a dropped
//! project is forgotten (its name, and its version numbers, can come back with other blueprints),
//! and so is everything when the consumer reconnects, since another worker may have applied a drop
//! meanwhile. The copy must never answer "no such version" for a version the server has: a fetch
//! that fails is a transient error, and only the server's `"exists": false` means the project is gone,
//! and only from the server whose journal the tasks come from: a worker pointed at another dstore
//! (staging, a server started again on an empty data directory) would take every task of a project
//! that server lacks for one of a dropped project and report it applied, and the journal would let
//! it go. Such a server's answers are transient errors, which the worker logs until it is pointed
//! at the right one.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::blueprint::Ident;
use crate::catalog::{Catalog, Project, Snapshot, Version, VersionStatus};
use crate::config::Secret;
use crate::journal::task::{Task, TaskOp};
use crate::projector::ProjectorError;

pub enum CatalogView {
    /// The catalog of this process (`dstore serve`).
    Local(Arc<Catalog>),
    /// A copy of a server's catalog (`dstore worker`).
    Remote(RemoteCatalog),
}

pub struct RemoteCatalog {
    server: String,
    client: reqwest::Client,
    /// Sent as `Authorization: Bearer` (an `operations` key: `DSTORE_API_KEY`).
    api_key: Option<Secret>,
    copy: Mutex<Arc<Snapshot>>,
    /// The server's journal id (`deployment`), from the last catalog it answered: tasks of
    /// another journal have their projects read again, which refuses them, even when the copy
    /// holds what they need.
    deployment: Mutex<Option<String>>,
}

/// The body of `GET /{project}/_catalog`.
#[derive(Deserialize)]
struct ProjectCatalog {
    exists: bool,
    versions: Vec<Arc<Version>>,
    retired: Vec<u32>,
    /// Each version's status, migrations included; absent from servers before it.
    #[serde(default)]
    status: std::collections::BTreeMap<u32, VersionStatus>,
    /// See `WorkingCopy::born`; absent from servers before it.
    #[serde(default)]
    born: u64,
    /// The server's journal id (`deployment`); absent from servers before it.
    #[serde(default)]
    deployment: Option<String>,
}

impl CatalogView {
    /// The catalog of the server at `server`, read with `api_key` when the server needs one.
    pub fn remote(server: &str, api_key: Option<Secret>) -> CatalogView {
        CatalogView::Remote(RemoteCatalog {
            server: server.trim_end_matches('/').to_string(),
            api_key,
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            copy: Mutex::default(),
            deployment: Mutex::default(),
        })
    }

    /// A snapshot holding every version `tasks` (from the journal `journal`) name, unless the
    /// server no longer has its project.
    pub async fn snapshot_for(
        &self,
        tasks: &[Task],
        journal: &str,
    ) -> Result<Arc<Snapshot>, ProjectorError> {
        match self {
            CatalogView::Local(catalog) => Ok(catalog.snapshot()),
            CatalogView::Remote(remote) => remote.snapshot_for(tasks, journal).await,
        }
    }

    /// Forgets everything the copy holds.
    pub fn clear(&self) {
        if let CatalogView::Remote(remote) = self {
            remote.update(|s| s.projects.clear());
        }
    }
}

impl RemoteCatalog {
    fn current(&self) -> Arc<Snapshot> {
        self.copy.lock().expect("catalog copy lock").clone()
    }

    fn update(&self, edit: impl FnOnce(&mut Snapshot)) {
        let mut copy = self.copy.lock().expect("catalog copy lock");
        let mut next = Snapshot::clone(&copy);
        edit(&mut next);
        *copy = Arc::new(next);
    }

    async fn snapshot_for(
        &self,
        tasks: &[Task],
        journal: &str,
    ) -> Result<Arc<Snapshot>, ProjectorError> {
        // Tasks of another journal than the server's last answer named: their projects are read
        // again, which refuses them unless the server is now that journal's (made again).
        let known = self.deployment.lock().expect("deployment lock").clone();
        let stale = known.is_some_and(|d| d != journal);
        let current = self.current();
        // A project is read again when a task names a version this copy lacks, and for every
        // migration: a migration that failed is tried again from here, and the version may have
        // been retired (or the project dropped) since, which ends the wait; migrations are rare.
        // So for every drop: a project made again under the name, whose migration went through
        // here, tells a drop delivered again (after its report was lost) from one to apply.
        let missing: BTreeSet<&Ident> = tasks
            .iter()
            .filter(|task| {
                stale
                    || matches!(task.op, TaskOp::Migrate { .. } | TaskOp::DropProject)
                    || named_versions(task).any(|number| {
                        current
                            .projects
                            .get(&task.project)
                            .is_none_or(|p| p.version(number).is_none())
                    })
            })
            .map(|task| &task.project)
            .collect();
        for project in missing {
            let fetched = self.fetch(project, journal).await?;
            self.update(|s| match fetched {
                Some(p) => {
                    s.projects.insert(project.clone(), Arc::new(p));
                }
                None => {
                    s.projects.remove(project);
                }
            });
        }
        Ok(self.current())
    }

    /// The refusal of tasks of `journal` by a server whose journal is `deployment`: they wait.
    fn foreign(&self, deployment: &str, journal: &str) -> ProjectorError {
        ProjectorError::transient(format!(
            "the dstore server at {} (--server / DSTORE_SERVER) is the dstore of journal \
             {deployment:?}, and these tasks come from journal {journal:?}: point the worker at the \
             server that sent them",
            self.server
        ))
    }

    /// The server's frozen versions of a project; `None` when the server, the one whose journal
    /// is `journal`, does not know it.
    async fn fetch(
        &self,
        project: &Ident,
        journal: &str,
    ) -> Result<Option<Project>, ProjectorError> {
        let url = format!("{}/{project}/_catalog", self.server);
        let failed = |e: &dyn std::fmt::Display| {
            ProjectorError::transient(format!(
                "cannot read the catalog of {project} from the dstore server at {} (--server / DSTORE_SERVER): {e}",
                self.server
            ))
        };
        let mut request = self.client.get(&url);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose());
        }
        let response = request.send().await.map_err(|e| failed(&e))?;
        let status = response.status();
        if status != 200 {
            let error = failed(&format!("it answered {status}"));
            // Refused for this project (a key limited to other projects, say): only its tasks
            // wait, held as after a failed migration, and the other projects' go on.
            let own = status.is_client_error() && status != 408 && status != 429;
            return Err(match own {
                true => ProjectorError::scoped(error.message),
                false => error,
            });
        }
        let body: ProjectCatalog = response
            .json()
            .await
            .map_err(|e| ProjectorError::scoped(failed(&e).message))?;
        if let Some(deployment) = &body.deployment {
            *self.deployment.lock().expect("deployment lock") = Some(deployment.clone());
            if deployment != journal {
                return Err(self.foreign(deployment, journal));
            }
        }
        if !body.exists {
            return Ok(None);
        }
        let mut p = Project::new(project.clone());
        p.working.born = body.born;
        p.status = body.status;
        for number in body.retired {
            p.status.entry(number).or_default().retired = true;
        }
        p.versions = body.versions;
        let dense = p
            .versions
            .iter()
            .enumerate()
            .all(|(i, v)| usize::try_from(v.number).ok() == Some(i + 1));
        if !dense {
            return Err(failed(&"its versions are not numbered 1, 2, 3 …"));
        }
        Ok(Some(p))
    }
}

/// The versions a task needs to know: those it writes into, or the one it migrates.
fn named_versions(task: &Task) -> impl Iterator<Item = u32> + '_ {
    let migrated = match task.op {
        TaskOp::Migrate { version } => Some(version),
        _ => None,
    };
    task.version_writes().map(|w| w.version).chain(migrated)
}
