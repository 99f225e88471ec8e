//! Projects held back after a failed migration (or a refusal of their tasks that may be their own,
//! see `ProjectorError::scoped`), so one project's failure never stalls the others.
//!
//! A projector applies a project's tasks in order, and no write may reach a version before its
//! migration; so when a migration fails, that project's tasks must wait. Other projects' tasks do not
//! depend on it: both transports keep the held project's tasks in order and go on with the rest (the
//! dispatcher leaves them in the journal; a RabbitMQ consumer parks them in a queue of their own).
//! Each held project is tried again after its own capped backoff (without a broker, at once when
//! a client asks for a retry); a success releases it.
//!
//! A try that fails can be slow: a table locked by someone else is a `lock_timeout` (10 s by
//! default), and the other projects wait for it, since a projector applies one batch at a time.
//! So a project whose own tasks were refused so is held for at least [`COST_FACTOR`] times as long
//! as that refusal (or its failed migration) took (`Step::held_cost`, up to [`MAX_HOLD`]): tries of
//! up to 75 s take at most about a fifth of the projector's time; longer ones (a statement cut at
//! its 10-minute timeout) are tried every five minutes, so a project whose cause went away does not
//! wait for long. And a project whose hold ended is tried alone, its own tasks only
//! ([`Holds::was_held`]), so a try that fails again costs one wait, not one for the batch and one
//! more for the project alone. A client's retry still ends a dispatcher's holds at its next batch,
//! however busy it is; a RabbitMQ consumer's end by themselves, after at most [`MAX_HOLD`].

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::blueprint::Ident;
use crate::journal::task::Task;
use crate::projector::backoff;

/// A project is held at least this many times as long as its failed try took.
pub const COST_FACTOR: u32 = 4;

/// The longest a project is held for what its tries cost (its backoff alone stays under 10 s).
pub const MAX_HOLD: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct Holds {
    held: HashMap<Ident, Hold>,
}

#[derive(Debug)]
struct Hold {
    until: Instant,
    attempt: u32,
    /// Whether the end of this hold was noticed ([`Holds::take_ended`]).
    noticed: bool,
}

impl Holds {
    /// Holds `project` back after a failure: for longer each time it fails again, and at least
    /// [`COST_FACTOR`] times `cost`, how long the failed try took (see the module's documentation).
    pub fn hold(&mut self, project: &Ident, cost: Duration) {
        let hold = self.held.entry(project.clone()).or_insert(Hold {
            until: Instant::now(),
            attempt: 0,
            noticed: false,
        });
        let for_cost = cost.saturating_mul(COST_FACTOR).min(MAX_HOLD);
        hold.until = Instant::now() + backoff(hold.attempt).max(for_cost);
        hold.attempt += 1;
        hold.noticed = false;
    }

    /// Whether a hold ended by `now` since this was last asked: its project's backlog lies below
    /// where a scan that passed over it stands, and must be read from the oldest task again before
    /// any later task of that project (other projects may still be held).
    pub fn take_ended(&mut self, now: Instant) -> bool {
        let mut ended = false;
        for hold in self.held.values_mut() {
            if hold.until <= now && !hold.noticed {
                hold.noticed = true;
                ended = true;
            }
        }
        ended
    }

    /// Whether `project` was held and not released since: once its hold ended, its tasks are tried
    /// alone, so a try that fails again holds back no other project's.
    pub fn was_held(&self, project: &Ident) -> bool {
        self.held.contains_key(project)
    }

    /// Whether `project`'s tasks must wait now.
    pub fn is_held(&self, project: &Ident) -> bool {
        self.is_held_at(project, Instant::now())
    }

    /// Whether `project`'s tasks must wait at `now`: one scan asks at one instant, so a hold that
    /// ends while it reads never lets a project's later tasks in after its earlier ones were
    /// passed over.
    pub fn is_held_at(&self, project: &Ident, now: Instant) -> bool {
        self.held.get(project).is_some_and(|hold| hold.until > now)
    }

    /// Whether no project is held, or was held and not released since.
    pub fn none_known(&self) -> bool {
        self.held.is_empty()
    }

    /// Forgets `project` after its tasks went through again (or its parked tasks were all
    /// applied).
    pub fn release(&mut self, project: &Ident) {
        self.held.remove(project);
    }

    /// Lets every held project be tried at once (a client asked to retry), keeping their backoff.
    pub fn expire_all(&mut self) {
        let now = Instant::now();
        for hold in self.held.values_mut() {
            hold.until = now;
        }
    }

    /// How long `project`'s tasks must still wait (zero when it is not held).
    pub fn wait(&self, project: &Ident) -> Duration {
        self.held.get(project).map_or(Duration::ZERO, |hold| {
            hold.until.saturating_duration_since(Instant::now())
        })
    }

    /// The projects held now, or held before and not released since: those whose tasks a scan may
    /// have passed over.
    pub fn known(&self) -> Vec<Ident> {
        self.held.keys().cloned().collect()
    }

    /// Releases the projects of tasks that went through (`settled`), but `held`, the project a
    /// step holds back now: a project held goes on by itself once its tasks are applied again.
    pub fn went_through<'a>(
        &mut self,
        settled: impl IntoIterator<Item = &'a Task>,
        held: Option<&Ident>,
    ) {
        if self.held.is_empty() {
            return;
        }
        for task in settled {
            if held != Some(&task.project) {
                self.release(&task.project);
            }
        }
    }

    /// Whether some project is held now.
    pub fn any(&self) -> bool {
        self.any_at(Instant::now())
    }

    /// Whether some project is held at `now`.
    pub fn any_at(&self, now: Instant) -> bool {
        self.held.values().any(|hold| hold.until > now)
    }

    /// How long until the next held project may be tried again, if any is held.
    pub fn next_try(&self) -> Option<Duration> {
        let now = Instant::now();
        self.held
            .values()
            .filter(|hold| hold.until > now)
            .map(|hold| hold.until - now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_held_project_waits_its_backoff_and_others_do_not() {
        let (a, b) = (Ident::parse("a").unwrap(), Ident::parse("b").unwrap());
        let mut holds = Holds::default();
        holds.hold(&a, Duration::ZERO);
        assert!(holds.is_held(&a) && !holds.is_held(&b) && holds.any());
        let first = holds.next_try().unwrap();
        tokio::time::advance(first).await;
        assert!(!holds.is_held(&a));
        holds.hold(&a, Duration::ZERO);
        assert!(holds.next_try().unwrap() > first, "the backoff grows");
        holds.expire_all();
        assert!(!holds.is_held(&a));
        holds.release(&a);
        assert!(!holds.any());
    }

    /// A try that took long holds its project for several times as long, so its tries take a
    /// bounded share of the projector's time, up to [`MAX_HOLD`]; a client's retry ends it.
    #[tokio::test(start_paused = true)]
    async fn a_costly_failed_try_holds_its_project_several_times_as_long() {
        let a = Ident::parse("a").unwrap();
        let mut holds = Holds::default();
        holds.hold(&a, Duration::from_secs(10));
        assert_eq!(holds.wait(&a), Duration::from_secs(10) * COST_FACTOR);
        assert!(holds.was_held(&a));
        holds.hold(&a, Duration::from_secs(100_000));
        assert_eq!(holds.wait(&a), MAX_HOLD);
        holds.expire_all();
        assert!(!holds.is_held(&a), "a client's retry ends it");
        holds.hold(&a, Duration::ZERO);
        assert!(
            holds.wait(&a) <= Duration::from_secs(10),
            "the backoff alone"
        );
        holds.release(&a);
        assert!(!holds.was_held(&a));
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_each_hold_is_noticed_once_while_others_are_held() {
        let (a, b) = (Ident::parse("a").unwrap(), Ident::parse("b").unwrap());
        let mut holds = Holds::default();
        for _ in 0..4 {
            holds.hold(&b, Duration::ZERO);
        }
        holds.hold(&a, Duration::ZERO);
        assert!(!holds.take_ended(Instant::now()));
        tokio::time::advance(holds.wait(&a)).await;
        assert!(holds.any(), "b is still held");
        assert!(holds.take_ended(Instant::now()), "a's hold ended");
        assert!(!holds.take_ended(Instant::now()), "noticed once");
        holds.hold(&a, Duration::ZERO);
        tokio::time::advance(holds.wait(&a)).await;
        assert!(holds.take_ended(Instant::now()), "a's next hold ended too");
    }
}
