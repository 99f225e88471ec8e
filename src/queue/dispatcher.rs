//! The in-process dispatcher: one loop per projector that takes pending tasks from the journal in
//! sequence order, applies them, and acknowledges them.
//!
//! Invariants: a task is removed from the journal only after its projector applied it or refused it
//! for good (then it becomes a dead letter with the reason); a transient failure keeps the task and the
//! ones behind it, retried with capped backoff, so a store that is down only delays its own projection.
//! `Migrate` and `DropProject` tasks are applied alone, in their place in the order, so no write reaches
//! a version before its migration and none of a deleted project survives its drop.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::catalog::MigrationState;
use crate::journal::task::{Task, TaskOp};
use crate::journal::{DeadLetter, Journal};
use crate::projector::{backoff, ErrorKind, Projector, ProjectorError};

/// Runs until `shutdown` turns true.
pub async fn run(
    journal: Arc<Journal>,
    projector: Arc<dyn Projector>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = projector.name();
    let mut attempt = 0;
    while !*shutdown.borrow() {
        let tasks = match journal.pending(name, batch_size) {
            Ok(tasks) => tasks,
            Err(error) => {
                tracing::error!(projector = name, %error, "cannot read pending tasks");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        if tasks.is_empty() {
            let _ = journal.refresh_progress(name);
            tokio::select! {
                _ = journal.wait_for_tasks(name, Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        match apply_run(&journal, projector.as_ref(), &tasks).await {
            Ok(()) => {
                attempt = 0;
                journal.note_error(name, None);
            }
            Err(error) => {
                tracing::warn!(projector = name, %error, attempt, "projection failed; retrying");
                journal.note_error(name, Some(error.message));
                tokio::select! {
                    _ = journal.wait_for_retry(name, backoff(attempt)) => {}
                    _ = shutdown.changed() => {}
                }
                attempt += 1;
            }
        }
    }
}

/// Applies the longest leading run of tasks that can go together and acknowledges it.
async fn apply_run(
    journal: &Journal,
    projector: &dyn Projector,
    tasks: &[Task],
) -> Result<(), ProjectorError> {
    let name = projector.name();
    let first = &tasks[0];
    let (applied, dead) = match &first.op {
        TaskOp::Migrate { version } => migrate(journal, projector, first, *version).await?,
        TaskOp::DropProject => match projector.drop_project(&first.project).await {
            Ok(()) => (vec![first.seq], Vec::new()),
            Err(e) if e.kind == ErrorKind::Transient => return Err(e),
            Err(e) => (Vec::new(), vec![dead_letter(name, first, &e)]),
        },
        TaskOp::Upsert { .. } | TaskOp::Delete { .. } => {
            let run = tasks
                .iter()
                .take_while(|t| matches!(t.op, TaskOp::Upsert { .. } | TaskOp::Delete { .. }))
                .count();
            let run = &tasks[..run];
            let outcomes = match projector.apply(journal.catalog(), run).await {
                Ok(outcomes) => outcomes,
                Err(e) if e.kind == ErrorKind::Transient => return Err(e),
                Err(e) => run.iter().map(|_| Err(e.clone())).collect(),
            };
            let mut applied = Vec::new();
            let mut dead = Vec::new();
            let mut retry = None;
            for (task, outcome) in run.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => applied.push(task.seq),
                    Err(e) if e.kind == ErrorKind::Permanent => {
                        dead.push(dead_letter(name, task, &e))
                    }
                    Err(e) => {
                        retry = Some(e);
                        break;
                    }
                }
            }
            ack(journal, name, &applied, dead)?;
            return retry.map_or(Ok(()), Err);
        }
    };
    ack(journal, name, &applied, dead)
}

fn ack(
    journal: &Journal,
    name: &str,
    applied: &[u64],
    dead: Vec<DeadLetter>,
) -> Result<(), ProjectorError> {
    for letter in &dead {
        tracing::error!(projector = name, task = %letter.task.describe(), reason = %letter.reason, "dead letter");
    }
    journal
        .ack(name, applied, dead)
        .map_err(|e| ProjectorError::transient(format!("cannot acknowledge tasks: {e}")))
}

fn dead_letter(projector: &str, task: &Task, error: &ProjectorError) -> DeadLetter {
    DeadLetter {
        projector: projector.to_string(),
        task: task.clone(),
        reason: error.message.clone(),
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

/// Runs a migration and records its state in the catalog. A version that no longer exists or was
/// retired needs no migration; a failure is retried until it succeeds, since writes into the version
/// wait behind it.
async fn migrate(
    journal: &Journal,
    projector: &dyn Projector,
    task: &Task,
    number: u32,
) -> Result<(Vec<u64>, Vec<DeadLetter>), ProjectorError> {
    let name = projector.name();
    let catalog = journal.catalog();
    let snapshot = catalog.snapshot();
    let version = snapshot
        .projects
        .get(&task.project)
        .filter(|p| !p.is_retired(number))
        .and_then(|p| p.version(number))
        .cloned();
    let Some(version) = version else {
        return Ok((vec![task.seq], Vec::new()));
    };
    let result = projector.migrate(&task.project, &version).await;
    let state = match &result {
        Ok(()) => MigrationState::Done,
        Err(e) => MigrationState::Failed {
            error: e.message.clone(),
        },
    };
    if let Err(e) = catalog.set_migration(&task.project, number, name, state) {
        tracing::warn!(projector = name, error = %e, "cannot record migration state");
    }
    result.map(|()| (vec![task.seq], Vec::new()))
}
