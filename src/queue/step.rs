//! One step of projection, shared by every transport: apply the longest leading run of tasks that can
//! go together, and say what became of each.
//!
//! `Migrate` and `DropProject` tasks go alone, in their place in the order, so no write reaches a
//! version before its migration and none of a deleted project survives its drop; item tasks go
//! together. A run refused as a whole is tried one task at a time, so one project's refusal never
//! dead-letters another's tasks; a run refused for a cause that may be one project's own
//! (`ProjectorError::scoped`) holds the project the store named (`ProjectorError::project`) at
//! once; when it named none, the run is tried with its first project's tasks alone, and if they
//! fail so, that project is held (`Step::held`) while the others go on. A drop refused for such a
//! cause holds its project too. Tasks of an earlier project of the
//! same name, dropped and made again while they waited, are passed over, its drop excepted — unless
//! the new project's migration went through already, which makes the drop one delivered again. The
//! step touches nothing but the projector: the caller acknowledges what it applied, keeps the dead
//! letters, records the migration and retries the rest, each in its own way (the in-process
//! dispatcher in the journal, a RabbitMQ consumer by acks and a progress report).

use std::ops::RangeInclusive;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use serde::{Deserialize, Serialize};

use crate::blueprint::Ident;
use crate::catalog::{CatalogError, MigrationState, Snapshot};
use crate::journal::task::{Task, TaskOp};
use crate::journal::{DeadLetter, Journal, JournalError};
use crate::projector::{ErrorKind, Projector, ProjectorError};

/// What one step did with the front of a list of tasks. The tasks it settled are the first
/// `settled()` of the list, each either applied or dead; the rest wait for the next step.
#[derive(Debug, Default)]
pub struct Step {
    /// Seqs of tasks applied (or needing nothing, such as a migration of a version since dropped).
    pub applied: Vec<u64>,
    /// Tasks the store refused for good.
    pub dead: Vec<DeadLetter>,
    /// The migration this step ran, to record in the catalog.
    pub migration: Option<MigrationRecord>,
    /// Why the unsettled tasks must be retried later, when the step stopped short.
    pub retry: Option<ProjectorError>,
    /// The project to hold back, with `retry`: its migration failed, or the store refused its
    /// tasks for a cause that may be its own (see `ProjectorError::scoped`); only it waits, and the
    /// others go on.
    pub held: Option<Ident>,
    /// How long the store took to refuse the held project's own tasks, alone, for a cause that
    /// may be their own (a lock waited for), or to fail its migration: the hold lasts several
    /// times as long (`queue::hold`). Zero for any other failure.
    pub held_cost: std::time::Duration,
}

/// The outcome of one projector's migration of one version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub project: Ident,
    pub version: u32,
    pub state: MigrationState,
    /// The seq of the `Migrate` task: a migration of an earlier project of the name, dropped
    /// since, is not recorded on the one made again (none from a worker that did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
}

impl Step {
    /// How many tasks from the front of the list this step settled.
    pub fn settled(&self) -> usize {
        self.applied.len() + self.dead.len()
    }
}

/// Records what a step of `projector` did: the migration's state in the catalog, the applied tasks
/// and the dead letters in the journal. Idempotent, so a step reported twice is recorded once.
/// `run`, when the caller knows it: the seqs from the first settled task to the last, with every
/// pending task between them in the step (see [`Journal::ack_run`]).
pub fn record(
    journal: &Journal,
    projector: &str,
    applied: &[u64],
    dead: Vec<DeadLetter>,
    migration: Option<&MigrationRecord>,
    run: Option<RangeInclusive<u64>>,
) -> Result<(), JournalError> {
    if let Some(m) = migration {
        match journal.catalog().set_migration(
            &m.project,
            m.version,
            projector,
            (m.state.clone(), m.task),
        ) {
            Ok(()) => {}
            // The project or its version went meanwhile: nothing to record.
            Err(CatalogError::NotFound(why)) => {
                tracing::debug!(projector, %why, "a migration's state of a version gone");
            }
            // Nothing of the step is recorded, so it is recorded again (its report delivered
            // again, its tasks still pending): a migration done but not recorded would leave
            // the version's status saying it waits, and a drop of the project delivered again
            // later could not be told from one to apply.
            Err(e) => return Err(e.into()),
        }
    }
    match run {
        Some(run) => journal.ack_run(projector, run, applied.len(), dead),
        None => journal.ack(projector, applied, dead),
    }
}

/// Applies the leading run of `tasks` (which must not be empty). `snapshot` must hold every version
/// the tasks name, unless its project is gone.
///
/// A projector that panics on a batch is tried again on its first task alone; a task it panics on
/// alone becomes a dead letter, so one poisonous task can never stop projection.
pub async fn apply(projector: &dyn Projector, snapshot: &Snapshot, tasks: &[Task]) -> Step {
    match AssertUnwindSafe(apply_front(projector, snapshot, tasks))
        .catch_unwind()
        .await
    {
        Ok(step) => step,
        Err(panic) => {
            let message = crate::supervise::panic_message(panic.as_ref());
            tracing::error!(projector = projector.name(), tasks = tasks.len(), %message, "projector panicked");
            if tasks.len() > 1 {
                return Box::pin(apply(projector, snapshot, &tasks[..1])).await;
            }
            dead(
                projector,
                &tasks[0],
                &ProjectorError::permanent(format!(
                    "the {} projector failed on this task: {message}",
                    projector.name()
                )),
            )
        }
    }
}

async fn apply_front(projector: &dyn Projector, snapshot: &Snapshot, tasks: &[Task]) -> Step {
    let first = &tasks[0];
    if is_earlier(snapshot, first) {
        let run = tasks.iter().take_while(|t| is_earlier(snapshot, t)).count();
        return Step {
            applied: tasks[..run].iter().map(|t| t.seq).collect(),
            ..Step::default()
        };
    }
    match &first.op {
        TaskOp::Migrate { version } => migrate(projector, snapshot, first, *version).await,
        TaskOp::DropProject if delivered_again(snapshot, first, projector.name()) => applied(first),
        TaskOp::DropProject => {
            let began = tokio::time::Instant::now();
            match projector.drop_project(&first.project).await {
                Ok(()) => applied(first),
                // Perhaps the project's own cause (a lock on one of its tables): only it waits, and
                // a project made again under the name, whose tasks come later, waits behind it.
                Err(e) if e.kind == ErrorKind::Transient && e.scoped => Step {
                    held: Some(first.project.clone()),
                    held_cost: began.elapsed(),
                    ..retry(e)
                },
                Err(e) if e.kind == ErrorKind::Transient => retry(e),
                Err(e) => dead(projector, first, &e),
            }
        }
        TaskOp::Upsert { .. } | TaskOp::Delete { .. } => {
            let run = tasks
                .iter()
                .take_while(|t| {
                    matches!(t.op, TaskOp::Upsert { .. } | TaskOp::Delete { .. })
                        && !is_earlier(snapshot, t)
                })
                .count();
            apply_items(projector, snapshot, &tasks[..run]).await
        }
    }
}

async fn apply_items(projector: &dyn Projector, snapshot: &Snapshot, run: &[Task]) -> Step {
    let began = tokio::time::Instant::now();
    let outcomes = match projector.apply(snapshot, run).await {
        Ok(outcomes) if outcomes.len() != run.len() => {
            return retry(ProjectorError::transient(format!(
                "the {} projector answered {} outcomes for {} tasks",
                projector.name(),
                outcomes.len(),
                run.len()
            )))
        }
        Ok(outcomes) => outcomes,
        // Perhaps one project's cause: the first project's tasks are tried alone, and if they fail
        // so alone, that project is held while the others go on.
        // The store named the project whose write it refused: it alone waits, at once.
        Err(e)
            if e.project
                .as_ref()
                .is_some_and(|p| run.iter().any(|t| &t.project == p)) =>
        {
            return Step {
                held: e.project.clone(),
                retry: Some(e),
                held_cost: began.elapsed(),
                ..Step::default()
            };
        }
        Err(e) if e.scoped => {
            let first = &run[0].project;
            let own = run.iter().take_while(|t| &t.project == first).count();
            if own < run.len() {
                return Box::pin(apply_items(projector, snapshot, &run[..own])).await;
            }
            return Step {
                retry: Some(e),
                held: Some(first.clone()),
                held_cost: began.elapsed(),
                ..Step::default()
            };
        }
        Err(e) if e.kind == ErrorKind::Transient => return retry(e),
        // Refused as a whole, the run may hold other projects' writes that have nothing to do with
        // the error: its first task is tried alone, as after a panic, so each task is refused for
        // its own reason only.
        Err(_) if run.len() > 1 => {
            return Box::pin(apply_items(projector, snapshot, &run[..1])).await
        }
        Err(e) => vec![Err(e)],
    };
    let mut step = Step::default();
    for (task, outcome) in run.iter().zip(outcomes) {
        match outcome {
            Ok(()) => step.applied.push(task.seq),
            Err(e) if e.kind == ErrorKind::Permanent => {
                step.dead.push(dead_letter(projector.name(), task, &e))
            }
            Err(e) => {
                if e.scoped {
                    step.held = Some(task.project.clone());
                }
                step.retry = Some(e);
                break;
            }
        }
    }
    step
}

/// Whether `task` belongs to an earlier project of its name, dropped since (see
/// `WorkingCopy::born`): it needs nothing, since the drop that follows it removes all it wrote. The
/// drop itself is still applied, in its place before the new project's tasks.
fn is_earlier(snapshot: &Snapshot, task: &Task) -> bool {
    !matches!(task.op, TaskOp::DropProject)
        && snapshot
            .projects
            .get(&task.project)
            .is_some_and(|p| task.seq <= p.working.born)
}

/// Whether `task`, a drop, removes an earlier project of its name that was made again, and the
/// new project's migration already went through in this projector: tasks are applied in order,
/// so the drop went before that migration, and this is the drop delivered again (a broker
/// re-sends a task whose report was lost). Applied once more, it would remove the new project.
fn delivered_again(snapshot: &Snapshot, task: &Task, projector: &str) -> bool {
    snapshot.projects.get(&task.project).is_some_and(|p| {
        task.seq <= p.working.born
            && p.status
                .values()
                .any(|s| s.migrations.get(projector) == Some(&MigrationState::Done))
    })
}

/// Runs a migration. A version that no longer exists or was retired needs none; a failure is retried
/// until it succeeds, since writes into the version wait behind it.
async fn migrate(projector: &dyn Projector, snapshot: &Snapshot, task: &Task, number: u32) -> Step {
    let project = snapshot
        .projects
        .get(&task.project)
        .filter(|p| !p.is_retired(number));
    let Some((project, version)) = project.and_then(|p| Some((p, p.version(number)?))) else {
        return applied(task);
    };
    let retired = project.retired_numbers();
    let began = tokio::time::Instant::now();
    let result = projector.migrate(&task.project, version, &retired).await;
    let state = match &result {
        Ok(()) => MigrationState::Done,
        Err(e) => MigrationState::Failed {
            error: e.message.clone(),
        },
    };
    let mut step = match result {
        Ok(()) => applied(task),
        Err(e) => Step {
            held: Some(task.project.clone()),
            held_cost: began.elapsed(),
            ..retry(e)
        },
    };
    step.migration = Some(MigrationRecord {
        project: task.project.clone(),
        version: number,
        state,
        task: Some(task.seq),
    });
    step
}

fn applied(task: &Task) -> Step {
    Step {
        applied: vec![task.seq],
        ..Step::default()
    }
}

fn retry(error: ProjectorError) -> Step {
    Step {
        retry: Some(error),
        ..Step::default()
    }
}

fn dead(projector: &dyn Projector, task: &Task, error: &ProjectorError) -> Step {
    Step {
        dead: vec![dead_letter(projector.name(), task, error)],
        ..Step::default()
    }
}

fn dead_letter(projector: &str, task: &Task, error: &ProjectorError) -> DeadLetter {
    // The log names the task and the cause; the store's words that may quote the item's values
    // are in the dead letter only.
    tracing::error!(projector, task = %task.describe(), reason = %error.message, "dead letter");
    DeadLetter {
        projector: projector.to_string(),
        seq: task.seq,
        task: Some(task.clone()),
        reason: error.reason(),
        at: crate::journal::now(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    use super::*;
    use crate::journal::task::TaskOp;

    /// Keeps the text of every field of every event.
    struct Fields(Arc<Mutex<String>>);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let mut text = self.0.lock().unwrap();
            text.push_str(&format!("{}={value:?} ", field.name()));
        }
    }

    struct Capture(Arc<Mutex<String>>);

    impl<S: tracing::Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            event.record(&mut Fields(self.0.clone()));
        }
    }

    /// Counts the drops it applies and the runs it is given. What a store refuses for a cause
    /// that may be one project's own: a drop of project `locked`, and every run holding a task
    /// of project `c` (naming it, as PostgreSQL's projector does for a lock on one of its tables).
    #[derive(Default)]
    struct Drops(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    );

    #[async_trait::async_trait]
    impl Projector for Drops {
        fn name(&self) -> &'static str {
            "drops"
        }
        async fn migrate(
            &self,
            _: &Ident,
            _: &crate::catalog::Version,
            _: &[u32],
        ) -> Result<(), ProjectorError> {
            Ok(())
        }
        async fn apply(
            &self,
            _: &Snapshot,
            tasks: &[Task],
        ) -> Result<Vec<crate::projector::Outcome>, ProjectorError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match tasks.iter().find(|t| t.project.as_str() == "c") {
                Some(task) => Err(ProjectorError::scoped("lock timeout on c_v1.article")
                    .of_project(&task.project)),
                None => Ok(tasks.iter().map(|_| Ok(())).collect()),
            }
        }
        async fn drop_project(&self, project: &Ident) -> Result<(), ProjectorError> {
            if project.as_str() == "locked" {
                return Err(ProjectorError::scoped("lock timeout on locked_v1.article"));
            }
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        async fn read(
            &self,
            _: &Ident,
            _: u32,
            _: &Ident,
            _: &uuid::Uuid,
        ) -> Result<Option<serde_json::Value>, ProjectorError> {
            Ok(None)
        }
        async fn health(&self) -> crate::projector::Health {
            crate::projector::Health {
                reachable: true,
                detail: "test double".into(),
            }
        }
    }

    /// The drop of an earlier project of the name (at seq 7), with the project made again after
    /// it: applied while the new project's migration waits behind it; delivered again once that
    /// migration went through, it changes nothing (it would remove the new project).
    #[tokio::test]
    async fn a_drop_delivered_again_after_the_project_was_made_again_removes_nothing() {
        let name = Ident::parse("shop").unwrap();
        let snapshot = |state: MigrationState| {
            let mut p = crate::catalog::Project::new(name.clone());
            p.working.born = 7;
            p.status.insert(
                1,
                crate::catalog::VersionStatus {
                    retired: false,
                    migrations: [("drops".to_string(), state)].into(),
                },
            );
            Snapshot {
                epoch: 1,
                projects: [(name.clone(), Arc::new(p))].into(),
            }
        };
        let drop = Task {
            seq: 7,
            project: name.clone(),
            op: TaskOp::DropProject,
        };
        let drops = Drops::default();
        let count = || drops.0.load(std::sync::atomic::Ordering::SeqCst);
        let step = apply(
            &drops,
            &snapshot(MigrationState::Pending),
            std::slice::from_ref(&drop),
        )
        .await;
        assert_eq!((step.applied, count()), (vec![7], 1), "the first delivery");
        let step = apply(
            &drops,
            &snapshot(MigrationState::Done),
            std::slice::from_ref(&drop),
        )
        .await;
        assert_eq!((step.applied, count()), (vec![7], 1), "delivered again");
        // A drop of the project as it is now is applied whatever its migrations did.
        let now = Task { seq: 9, ..drop };
        let step = apply(&drops, &snapshot(MigrationState::Done), &[now]).await;
        assert_eq!(
            (step.applied, count()),
            (vec![9], 2),
            "a drop of the new project"
        );
    }

    /// A migration's record names the task it ran for, so that the catalog passes over one of
    /// an earlier project of the name (see `catalog::edit::set_migration`).
    #[tokio::test]
    async fn a_migrations_record_names_its_task() {
        let name = Ident::parse("shop").unwrap();
        let mut p = crate::catalog::Project::new(name.clone());
        p.versions.push(Arc::new(crate::catalog::Version {
            number: 1,
            blueprints: Default::default(),
            changes: Vec::new(),
            edits: Vec::new(),
            frozen_at: String::new(),
            forced: false,
            size: Default::default(),
        }));
        p.status.insert(1, crate::catalog::VersionStatus::default());
        let snapshot = Snapshot {
            epoch: 1,
            projects: [(name.clone(), Arc::new(p))].into(),
        };
        let task = Task {
            seq: 11,
            project: name,
            op: TaskOp::Migrate { version: 1 },
        };
        let step = apply(&Drops::default(), &snapshot, &[task]).await;
        assert_eq!(step.applied, vec![11]);
        let record = step.migration.expect("a record");
        assert_eq!((record.version, record.task), (1, Some(11)));
        assert_eq!(record.state, MigrationState::Done);
    }

    /// A `dstore worker` reads a drop's project from the server before applying it: a drop
    /// delivered again (its report lost) after the project was made again and migrated here
    /// removes nothing, as in the server's own process.
    #[tokio::test]
    async fn a_worker_tells_a_drop_delivered_again_by_the_servers_catalog() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let body = serde_json::json!({
                    "project": "shop", "exists": true, "born": 7, "deployment": "j",
                    "versions": [{"number": 1, "blueprints": {}, "changes": [], "edits": [],
                        "frozen_at": "2026-12-07T00:00:00Z"}],
                    "retired": [],
                    "status": {"1": {"retired": false,
                        "migrations": {"drops": {"state": "done"}}}},
                })
                .to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        let view = crate::queue::view::CatalogView::remote(&server, None);
        let drop = Task {
            seq: 7,
            project: Ident::parse("shop").unwrap(),
            op: TaskOp::DropProject,
        };
        let snapshot = view
            .snapshot_for(std::slice::from_ref(&drop), "j")
            .await
            .unwrap();
        let drops = Drops::default();
        let step = apply(&drops, &snapshot, std::slice::from_ref(&drop)).await;
        assert_eq!(step.applied, vec![7]);
        assert_eq!(drops.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// A drop that fails for a cause that may be its project's own (a lock on one of its tables)
    /// holds that project only: the others' tasks go on, and it is tried again.
    #[tokio::test]
    async fn a_drop_failing_for_its_own_project_holds_only_that_project() {
        let drop = Task {
            seq: 3,
            project: Ident::parse("locked").unwrap(),
            op: TaskOp::DropProject,
        };
        let step = apply(&Drops::default(), &Snapshot::default(), &[drop]).await;
        assert!(step.applied.is_empty());
        assert!(step.retry.is_some());
        assert_eq!(step.held.as_ref().map(Ident::as_str), Some("locked"));
    }

    /// A run refused for a cause the store names the project of holds that project at once,
    /// however many projects' tasks come before it.
    #[tokio::test]
    async fn a_refusal_naming_its_project_holds_it_at_once() {
        let tasks: Vec<Task> = ["a", "b", "d", "e", "c", "f"]
            .iter()
            .enumerate()
            .map(|(n, project)| Task {
                seq: n as u64 + 1,
                project: Ident::parse(project).unwrap(),
                op: TaskOp::Delete {
                    blueprint: Ident::parse("article").unwrap(),
                    id: uuid::Uuid::new_v4(),
                    revision: n as u64 + 1,
                    versions: vec![1],
                },
            })
            .collect();
        let projector = Drops::default();
        let step = apply(&projector, &Snapshot::default(), &tasks).await;
        assert_eq!(step.held.as_ref().map(Ident::as_str), Some("c"));
        assert!(step.applied.is_empty() && step.retry.is_some());
        assert_eq!(projector.1.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A store's words that may quote the item's values (PostgreSQL's DETAIL) are in the dead
    /// letter, which the API guards, and not in the log line that announces it.
    #[test]
    fn a_dead_letter_keeps_the_stores_detail_and_its_log_line_does_not() {
        let task = Task {
            seq: 7,
            project: crate::blueprint::Ident::parse("shop").unwrap(),
            op: TaskOp::Migrate { version: 1 },
        };
        let error = ProjectorError::permanent("postgresql refused shop_v1.coupons row 1: duplicate key value violates unique constraint [sqlstate 23505]")
            .with_detail(Some("Key (email)=(someone@example.com) already exists.".into()));
        let logged = Arc::new(Mutex::new(String::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(logged.clone()));
        let letter = tracing::subscriber::with_default(subscriber, || {
            dead_letter("postgresql", &task, &error)
        });
        assert!(letter.reason.contains("duplicate key"), "{}", letter.reason);
        assert!(
            letter.reason.contains("someone@example.com"),
            "{}",
            letter.reason
        );
        let logged = logged.lock().unwrap();
        assert!(logged.contains("duplicate key"), "{logged}");
        assert!(!logged.contains("someone@example.com"), "{logged}");
    }
}
