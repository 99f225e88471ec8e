//! Watching the projectors' cursors: for writes that wait until every store has them, for health, and
//! for back-pressure.
//!
//! One task per node polls the cursors of the projects someone waits on (every few milliseconds, and
//! only while someone waits) and every projector's backlog (every second; the dead letters kept
//! every ten), whichever node applies the tasks. Waiters share its results instead of querying on their own, so a thousand waiting requests
//! cost one query per poll.
//!
//! The same task gives projectors new to a project their cursors, and trims the journal of what
//! every projector applied (see [`prune_journal`]).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::Row;
use tokio::sync::watch;

use super::PgStorage;
use crate::blueprint::Ident;
use crate::journal::ProjectorProgress;

/// How often cursors are read while someone waits.
const WAIT_POLL: Duration = Duration::from_millis(10);
/// How often backlogs are read.
const BACKLOG_POLL: Duration = Duration::from_secs(1);
/// How often the dead letters kept are counted with them: every node counts up to a million per
/// projector, which each second would be millions of index entries read a second for a figure
/// health and metrics show.
const LETTERS_POLL: Duration = Duration::from_secs(10);
/// How often the journal is trimmed.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Journal rows removed per statement, so a trim never holds a long transaction.
const PRUNE_CHUNK: i64 = 10_000;

#[derive(Default)]
struct State {
    /// Projects someone waits on, with how many waiters.
    waiting: HashMap<Ident, usize>,
    /// (projector, project) → the revision the projector applied through.
    cursors: HashMap<(String, Ident), u64>,
    /// Per projector: tasks waiting, the newest error and the dead letters kept.
    backlog: HashMap<String, (u64, Option<String>, u64)>,
    /// Why the last poll could not read the storage, if it could not.
    storage_error: Option<String>,
    /// How many times dead letters were counted (for tests).
    #[cfg(test)]
    letter_counts: u64,
}

pub struct CursorWatch {
    state: Mutex<State>,
    polled: watch::Sender<u64>,
}

impl Default for CursorWatch {
    fn default() -> Self {
        CursorWatch {
            state: Mutex::new(State::default()),
            polled: watch::channel(0).0,
        }
    }
}

impl CursorWatch {
    /// Records what this node's own projector just applied, without waiting for the next poll.
    pub fn note(&self, projector: &str, project: &Ident, revision: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let cursor = state
            .cursors
            .entry((projector.to_string(), project.clone()))
            .or_default();
        *cursor = (*cursor).max(revision);
        drop(state);
        self.polled.send_modify(|n| *n += 1);
    }

    fn reached(&self, projectors: &[String], project: &Ident, revision: u64) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        projectors
            .iter()
            .filter(|p| {
                state
                    .cursors
                    .get(&(p.to_string(), project.clone()))
                    .is_none_or(|at| *at < revision)
            })
            .cloned()
            .collect()
    }

    /// Every projector a write waits for: this node's, and those only other processes run (a
    /// `dstore worker` beside nodes that do not run its projector), known from their cursors
    /// at the last poll.
    pub fn projectors(&self, storage: &PgStorage) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<String> = storage
            .settings
            .projectors
            .iter()
            .map(|p| p.to_string())
            .chain(state.backlog.keys().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Waits until every projector applied `revision` of `project`, or names those still behind.
    pub async fn wait(
        &self,
        storage: &PgStorage,
        project: &Ident,
        revision: u64,
        timeout: Duration,
    ) -> Result<(), Vec<String>> {
        let projectors = &self.projectors(storage);
        *self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .entry(project.clone())
            .or_default() += 1;
        let mut polled = self.polled.subscribe();
        let behind = tokio::time::timeout(
            timeout,
            polled.wait_for(|_| self.reached(projectors, project, revision).is_empty()),
        )
        .await;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = state.waiting.get_mut(project) {
            *count -= 1;
            if *count == 0 {
                state.waiting.remove(project);
            }
        }
        drop(state);
        match behind {
            Ok(Ok(_)) => Ok(()),
            _ => {
                let mut behind = self.reached(projectors, project, revision);
                behind.sort();
                Err(behind)
            }
        }
    }

    /// How far a projector got, as of the last poll.
    pub fn progress(&self, projector: &str) -> ProjectorProgress {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (pending, last_error, dead_letters) =
            state.backlog.get(projector).cloned().unwrap_or_default();
        ProjectorProgress {
            pending,
            last_error,
            dead_letters,
            ..ProjectorProgress::default()
        }
    }

    /// Why the storage could not be read at the last poll.
    pub fn storage_error(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .storage_error
            .clone()
    }

    /// The projector furthest behind, with its backlog.
    pub fn most_behind(&self) -> Option<(String, u64)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .backlog
            .iter()
            .max_by_key(|(_, (pending, _, _))| *pending)
            .map(|(name, (pending, _, _))| (name.clone(), *pending))
    }
}

/// Polls while the storage lives.
pub async fn run(storage: Weak<PgStorage>) {
    let mut last_backlog = tokio::time::Instant::now() - BACKLOG_POLL;
    let mut last_letters = tokio::time::Instant::now() - LETTERS_POLL;
    let mut last_prune = tokio::time::Instant::now();
    loop {
        let Some(node) = storage.upgrade() else {
            return;
        };
        let waiting: Vec<String> = node
            .watch
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .keys()
            .map(|p| p.to_string())
            .collect();
        if !waiting.is_empty() {
            poll_cursors(&node, &waiting).await;
        }
        if last_backlog.elapsed() >= BACKLOG_POLL {
            let letters = last_letters.elapsed() >= LETTERS_POLL;
            if poll_backlog(&node, letters).await && letters {
                last_letters = tokio::time::Instant::now();
            }
            last_backlog = tokio::time::Instant::now();
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            // A project made on a node that runs fewer projectors, or whose cursors a failure
            // left unmade, gets this node's.
            if let Err(error) = node.ensure_cursors(None).await {
                tracing::warn!(%error, "cannot create projector cursors; trying again later");
            }
            if let Err(error) = prune_journal(&node).await {
                tracing::warn!(%error, "cannot trim the journal; trying again later");
            }
            last_prune = tokio::time::Instant::now();
        }
        node.watch.polled.send_modify(|n| *n += 1);
        let idle = waiting.is_empty();
        drop(node);
        tokio::time::sleep(if idle {
            Duration::from_millis(50)
        } else {
            WAIT_POLL
        })
        .await;
    }
}

async fn poll_cursors(node: &PgStorage, projects: &[String]) {
    let rows =
        sqlx::query("SELECT projector, project, revision FROM cursors WHERE project = ANY($1)")
            .bind(projects)
            .fetch_all(node.pool())
            .await;
    let Ok(rows) = rows else {
        return;
    };
    let mut state = node
        .watch
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for row in rows {
        let (projector, project): (String, String) = (row.get("projector"), row.get("project"));
        if let Ok(project) = Ident::parse(&project) {
            let cursor = state.cursors.entry((projector, project)).or_default();
            *cursor = (*cursor).max(row.get::<i64, _>("revision") as u64);
        }
    }
}

/// Removes the journal rows every projector has applied: a project's rows up to its slowest
/// cursor, a dropped project's drop included. No projector reads them again: a projector given a
/// cursor later starts at the project's revision and is back-filled from the items
/// ([`PgStorage::ensure_cursors`]). A held project's rows stay with its cursor. Answers how many
/// rows went.
pub(super) async fn prune_journal(node: &PgStorage) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let removed = sqlx::query(
            "DELETE FROM journal WHERE ctid IN ( \
                 SELECT j.ctid FROM journal j \
                 JOIN (SELECT project, min(revision) AS applied FROM cursors GROUP BY project) c \
                   ON c.project = j.project \
                 WHERE j.revision <= c.applied LIMIT $1)",
        )
        .bind(PRUNE_CHUNK)
        .execute(node.pool())
        .await?
        .rows_affected();
        total += removed;
        if removed < PRUNE_CHUNK as u64 {
            return Ok(total);
        }
    }
}

/// Reads every projector's backlog, and with `letters` the dead letters it keeps (otherwise the
/// last count stands); answers whether the storage answered.
async fn poll_backlog(node: &PgStorage, letters: bool) -> bool {
    let rows = sqlx::query(
        "SELECT c.projector, \
                coalesce(sum(greatest(p.revision - c.revision, 0)), 0)::bigint AS pending, \
                max(CASE WHEN c.last_error IS NULL THEN NULL \
                         ELSE 'project ' || c.project || ': ' || c.last_error END) AS last_error, \
                CASE WHEN $1 THEN (SELECT count(*) FROM (SELECT 1 FROM dead_letters d \
                     WHERE d.projector = c.projector LIMIT 1000000) kept) END AS dead_letters \
         FROM cursors c JOIN projects p ON p.name = c.project GROUP BY c.projector",
    )
    .bind(letters)
    .fetch_all(node.pool())
    .await;
    let mut state = node
        .watch
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match rows {
        Ok(rows) => {
            state.storage_error = None;
            #[cfg(test)]
            if letters {
                state.letter_counts += 1;
            }
            let backlog = rows
                .into_iter()
                .map(|row| {
                    let projector = row.get::<String, _>("projector");
                    let kept = match row.get::<Option<i64>, _>("dead_letters") {
                        Some(kept) => kept as u64,
                        None => state.backlog.get(&projector).map_or(0, |b| b.2),
                    };
                    (
                        projector,
                        (
                            row.get::<i64, _>("pending") as u64,
                            row.get::<Option<String>, _>("last_error"),
                            kept,
                        ),
                    )
                })
                .collect();
            state.backlog = backlog;
            true
        }
        Err(error) => {
            let message = format!("postgresql storage unreachable: {error}");
            state.storage_error = Some(message.clone());
            for projector in &node.settings.projectors {
                let entry = state.backlog.entry(projector.to_string()).or_default();
                entry.1 = Some(message.clone());
            }
            false
        }
    }
}

#[cfg(test)]
impl CursorWatch {
    /// How many times this node counted the dead letters kept.
    pub fn letter_counts(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .letter_counts
    }
}
