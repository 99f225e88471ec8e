//! Projects held back after a failed migration (or a refusal of their tasks that may be their own,
//! see `ProjectorError::scoped`), so one project's failure never stalls the others.
//!
//! A projector applies a project's tasks in order, and no write may reach a version before its
//! migration; so when a migration fails, that project's tasks must wait. Other projects' tasks do not
//! depend on it: both transports keep the held project's tasks in order and go on with the rest (the
//! dispatcher leaves them in the journal; a RabbitMQ consumer parks them in a queue of their own). Each held project is tried again after its own capped backoff (or at once, when a
//! client asks for a retry); a success releases it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::blueprint::Ident;
use crate::journal::task::Task;
use crate::projector::backoff;

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
    /// Holds `project` back after a failure: for longer each time it fails again.
    pub fn hold(&mut self, project: &Ident) {
        let hold = self.held.entry(project.clone()).or_insert(Hold {
            until: Instant::now(),
            attempt: 0,
            noticed: false,
        });
        hold.until = Instant::now() + backoff(hold.attempt);
        hold.attempt += 1;
        hold.noticed = false;
    }

    /// Whether a hold ended since this was last asked: its project's backlog lies below where a
    /// scan that passed over it stands, and must be read from the oldest task again before any
    /// later task of that project (other projects may still be held).
    pub fn take_ended(&mut self) -> bool {
        let now = Instant::now();
        let mut ended = false;
        for hold in self.held.values_mut() {
            if hold.until <= now && !hold.noticed {
                hold.noticed = true;
                ended = true;
            }
        }
        ended
    }

    /// Whether `project`'s tasks must wait now.
    pub fn is_held(&self, project: &Ident) -> bool {
        self.held
            .get(project)
            .is_some_and(|hold| hold.until > Instant::now())
    }

    /// Forgets `project` after its tasks went through again.
    fn release(&mut self, project: &Ident) {
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
        let now = Instant::now();
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
        holds.hold(&a);
        assert!(holds.is_held(&a) && !holds.is_held(&b) && holds.any());
        let first = holds.next_try().unwrap();
        tokio::time::advance(first).await;
        assert!(!holds.is_held(&a));
        holds.hold(&a);
        assert!(holds.next_try().unwrap() > first, "the backoff grows");
        holds.expire_all();
        assert!(!holds.is_held(&a));
        holds.release(&a);
        assert!(!holds.any());
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_each_hold_is_noticed_once_while_others_are_held() {
        let (a, b) = (Ident::parse("a").unwrap(), Ident::parse("b").unwrap());
        let mut holds = Holds::default();
        for _ in 0..4 {
            holds.hold(&b);
        }
        holds.hold(&a);
        assert!(!holds.take_ended());
        tokio::time::advance(holds.wait(&a)).await;
        assert!(holds.any(), "b is still held");
        assert!(holds.take_ended(), "a's hold ended");
        assert!(!holds.take_ended(), "noticed once");
        holds.hold(&a);
        tokio::time::advance(holds.wait(&a)).await;
        assert!(holds.take_ended(), "a's next hold ended too");
    }
}
