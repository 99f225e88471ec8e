//! The in-process dispatcher: one loop per projector that takes pending tasks from the journal in
//! sequence order, applies them, and acknowledges them.
//!
//! Invariants: a task is removed from the journal only after its projector applied it or refused it
//! for good (then it becomes a dead letter with the reason); a transient failure keeps the task and the
//! ones behind it, retried with capped backoff, so a store that is down only delays its own projection.
//! What goes together in one batch is [`step`]'s rule.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::step;
use crate::journal::task::Task;
use crate::journal::Journal;
use crate::projector::{backoff, Projector, ProjectorError};

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

/// Applies one step and records it: acknowledgements and dead letters in the journal, the
/// migration's state in the catalog.
async fn apply_run(
    journal: &Journal,
    projector: &dyn Projector,
    tasks: &[Task],
) -> Result<(), ProjectorError> {
    let name = projector.name();
    let step = step::apply(projector, &journal.catalog().snapshot(), tasks).await;
    step::record(
        journal,
        name,
        &step.applied,
        step.dead,
        step.migration.as_ref(),
    )
    .map_err(|e| ProjectorError::transient(format!("cannot acknowledge tasks: {e}")))?;
    step.retry.map_or(Ok(()), Err)
}
