//! The in-process dispatcher: one loop per projector that takes pending tasks from the journal in
//! sequence order, applies them, and acknowledges them.
//!
//! Invariants: a task is removed from the journal only after its projector applied it or refused it
//! for good (then it becomes a dead letter with the reason); a transient failure keeps the task and the
//! ones behind it, retried with capped backoff, so a store that is down only delays its own projection.
//! A failed migration holds back only its own project ([`Holds`]): that project's tasks stay in order
//! behind it while the other projects' tasks go on. What goes together in one batch is [`step`]'s rule.
//! A batch read whole (no held project's task left out) is acknowledged as a run, with one range
//! deletion: every pending task between its first and last seq was in it, since tasks only ever get
//! higher seqs than the ones already written.
//! While a full batch is applied, the next one is read and decoded, so the store does not wait for
//! the journal between batches; it is used only if the whole batch settled and no project was held,
//! or ended a hold it has not gone through since. Each scan decides which projects are held at one
//! instant, and a client's retry ends every hold at the next batch.
//! A held project's backlog is passed over in scans of bounded length, one after the other without
//! waiting, and passed over once per failed retry at most: when a hold ends (even while others go on)
//! the scan goes back to the oldest task, so none of that project's later tasks goes before its
//! backlog, and if the project is held again before anything settles, back to where it stood.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::hold::Holds;
use super::step::{self, Step};
use crate::blueprint::Ident;
use crate::journal::task::Task;
use crate::journal::{Journal, Pending};
use crate::projector::{backoff, Projector};

/// How long a projector lets tasks gather after a batch that was not full, before it reads again:
/// under many small writes a store then gets one batch (for PostgreSQL, one transaction and one
/// commit) per few milliseconds instead of one per group commit.
const LINGER: Duration = Duration::from_millis(5);

/// Runs until `shutdown` turns true.
pub async fn run(
    journal: Arc<Journal>,
    projector: Arc<dyn Projector>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = projector.name();
    let mut attempt = 0;
    let mut holds = Holds::default();
    // Every task below it is settled or belongs to a held project; 0 scans from the oldest.
    let mut scan_from = 0;
    // Where the scan stood when it went back to the oldest task because a hold ended, with the
    // projects it may have passed over: once each of them is held again, with nothing settled since,
    // every task below it is again settled or held.
    let mut resume: Option<(u64, Vec<Ident>)> = None;
    // The batch after the one applied last, read while it was applied.
    let mut prefetched: Option<Pending> = None;
    // Whether the last read found less than a full batch.
    let mut short = false;
    while !*shutdown.borrow() {
        if short && prefetched.is_none() {
            tokio::select! {
                _ = tokio::time::sleep(LINGER) => {}
                _ = shutdown.changed() => {}
            }
        }
        // A client asked to retry: every hold ends now, even while other projects' tasks keep
        // the dispatcher from waiting for it.
        if journal.retry_asked(name) {
            holds.expire_all();
        }
        // Back to the oldest task when nothing is held, or when a hold ended while others go on:
        // the project's backlog lies below the scan, and its later tasks must not go first. Held
        // is decided at one instant, for the rewind and the scan alike.
        let now = tokio::time::Instant::now();
        if holds.take_ended(now) || !holds.any_at(now) {
            rewind(&mut scan_from, &mut resume, &holds);
        }
        // Only when the whole previous batch settled and no project is held or was held since it
        // was read: then every task before the prefetched ones is settled, and new tasks only get
        // higher seqs. (A hold that ended meanwhile leaves its project's backlog below them.)
        let read = match prefetched.take().filter(|_| holds.none_known()) {
            Some(pending) => Ok(pending),
            None => journal.pending_from(name, scan_from, batch_size, |p| holds.is_held_at(p, now)),
        };
        let pending = match read {
            Ok(pending) => pending,
            Err(error) => {
                tracing::error!(projector = name, %error, "cannot read pending tasks");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        // Read whole (no held project's task left out): what the step settles is a run.
        let whole = pending.skipped == 0;
        let tasks = pending.tasks;
        short = tasks.len() < batch_size && !pending.cut_short;
        if tasks.is_empty() && pending.cut_short {
            // Only held tasks so far, and more to look at: go on past them at once.
            scan_from = pending.last_seen + 1;
            tokio::task::yield_now().await;
            continue;
        }
        if tasks.is_empty() {
            let _ = journal.refresh_progress(name);
            if pending.first_seen.is_some() {
                scan_from = pending.last_seen + 1;
            }
            // Wake for new tasks, or when the next held project may be tried again.
            let wait = holds.next_try().map_or(Duration::from_millis(500), |d| {
                d.min(Duration::from_millis(500))
            });
            tokio::select! {
                _ = journal.wait_for_tasks(name, wait) => {}
                asked = journal.wait_for_retry(name, wait) => {
                    if asked {
                        holds.expire_all();
                    }
                }
                _ = shutdown.changed() => {}
            }
            if holds.take_ended(tokio::time::Instant::now())
                || holds.next_try().is_none_or(|d| d.is_zero())
            {
                rewind(&mut scan_from, &mut resume, &holds);
            }
            continue;
        }
        // A project whose hold ended is tried alone (`Holds::was_held`): its leading run of tasks,
        // still a run of the pending tasks, so `whole` holds for it.
        let mut tasks = tasks;
        if holds.was_held(&tasks[0].project) {
            let own = tasks
                .iter()
                .take_while(|t| t.project == tasks[0].project)
                .count();
            if own < tasks.len() {
                tasks.truncate(own);
                short = false;
            }
        }
        // While the store applies this batch, the next one is read and decoded (only when no
        // project is held or was held since: a held project's tasks must be left out, and holds
        // may change).
        let next_from = tasks.last().map_or(0, |t| t.seq + 1);
        let snapshot = journal.catalog().snapshot();
        let (step, next) = if !holds.none_known() || tasks.len() < batch_size {
            let step = step::apply(projector.as_ref(), &snapshot, &tasks).await;
            (step, None)
        } else {
            let reader = journal.clone();
            let read = tokio::task::spawn_blocking(move || {
                reader.pending_from(name, next_from, batch_size, |_| false)
            });
            let (step, read) =
                tokio::join!(step::apply(projector.as_ref(), &snapshot, &tasks), read);
            (step, read.ok().and_then(Result::ok))
        };
        let settled = step.settled();
        let (held, held_cost) = (step.held.clone(), step.held_cost);
        holds.went_through(&tasks[..settled], held.as_ref());
        journal.note_held(name, holds.known());
        let run = (whole && settled > 0).then(|| tasks[0].seq..=tasks[settled - 1].seq);
        let error = match record(&journal, name, step, run) {
            Err(error) => Some(error),
            Ok(Some(error)) if held.is_none() => Some(error),
            Ok(Some(error)) => {
                // Only this project waits: its tasks stay in order behind the one refused.
                let project = held.expect("a held project");
                tracing::warn!(projector = name, %project, %error, "the project's tasks were refused; they wait, the others go on");
                journal.note_error(
                    name,
                    Some(format!("project {project} is held back: {error}")),
                );
                holds.hold(&project, held_cost);
                journal.note_held(name, holds.known());
                // Held again before anything settled: the scan need not pass over the backlogs
                // below where it stood once more.
                if let Some((at, known)) = resume.take() {
                    if known.iter().all(|p| holds.is_held(p)) {
                        scan_from = scan_from.max(at);
                    }
                }
                continue;
            }
            Ok(None) => None,
        };
        match error {
            None => {
                attempt = 0;
                if settled > 0 {
                    resume = None;
                }
                if !holds.any() {
                    journal.note_error(name, None);
                }
                scan_from = next_scan(&tasks, settled);
                prefetched = next.filter(|_| settled == tasks.len());
            }
            Some(error) => {
                tracing::warn!(projector = name, %error, attempt, "projection failed; retrying");
                journal.note_error(name, Some(error));
                tokio::select! {
                    asked = journal.wait_for_retry(name, backoff(attempt)) => {
                        if asked {
                            holds.expire_all();
                        }
                    }
                    _ = shutdown.changed() => {}
                }
                attempt += 1;
            }
        }
    }
}

/// Sends the scan back to the oldest task (a hold ended), remembering where it stood.
fn rewind(scan_from: &mut u64, resume: &mut Option<(u64, Vec<Ident>)>, holds: &Holds) {
    if *scan_from > 0 {
        *resume = Some((*scan_from, holds.known()));
    }
    *scan_from = 0;
}

/// Where the next scan starts: at the first unsettled task, or after the last one.
fn next_scan(tasks: &[Task], settled: usize) -> u64 {
    match tasks.get(settled) {
        Some(task) => task.seq,
        None => tasks.last().map_or(0, |t| t.seq + 1),
    }
}

/// Records a step (acknowledgements and dead letters in the journal, the migration's state in the
/// catalog); answers why the rest must be retried, if it must. `run`: the settled tasks' seqs, when
/// the batch was read whole.
fn record(
    journal: &Journal,
    name: &str,
    step: Step,
    run: Option<RangeInclusive<u64>>,
) -> Result<Option<String>, String> {
    step::record(
        journal,
        name,
        &step.applied,
        step.dead,
        step.migration.as_ref(),
        run,
    )
    .map_err(|e| format!("cannot acknowledge tasks: {e}"))?;
    Ok(step.retry.map(|e| e.message))
}
