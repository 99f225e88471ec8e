//! The memory all requests together may hold for what they carry (`server.max_inflight_bytes`):
//! their bodies as they arrive, a body's parsed form, and a write's prepared documents until the
//! journal has them.
//!
//! Each request holds one [`Share`], taken as it needs more and given back whole when it is
//! dropped, so what the budget counts is what requests hold across their waits (a body's next
//! bytes, a place on a blocking thread, the journal's commit). A request the budget cannot take is
//! refused at once rather than growing the process: [`Refused::Busy`] while others hold too much
//! (503), [`Refused::Alone`] when it alone would need more than the whole budget (413: it could
//! never be taken). What a thread builds and drops within one step without waiting (a parse's
//! growing arrays, an item's checked and transformed copies) is not counted: its total is bounded
//! by the threads doing such steps (the HTTP workers, and one blocking thread per core).
//!
//! Answers waiting to be sent (an item read, a change feed page) hold their bytes until the client
//! takes them, which a client that never reads can put off for as long as its connection stays
//! open. Together they hold at most three quarters of the budget ([`InFlight::answer_share`]):
//! clients that ask for answers and leave them unread are refused (503) before writes are, and
//! writes always have a quarter of the budget.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The bytes held by all requests' shares, and the most they may hold.
#[derive(Debug)]
pub struct InFlight {
    used: AtomicUsize,
    limit: usize,
    /// The part of `used` that answer shares hold.
    answers: AtomicUsize,
    /// Shares refused since the start: for others holding the budget, and for answers holding
    /// their part of it.
    refused: [AtomicU64; 2],
}

/// Why a share could not grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Other requests hold too much now; the request may be sent again shortly.
    Busy { limit: usize },
    /// Answers waiting to be sent hold all they may ([`InFlight::answers_limit`]); the request
    /// may be sent again shortly.
    Answers { limit: usize },
    /// The request alone would hold `needed` bytes, more than the whole budget.
    Alone { needed: usize, limit: usize },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Busy { limit } => write!(
                f,
                "the server already holds the {limit} bytes of request memory it may \
                 (server.max_inflight_bytes); try again shortly"
            ),
            Refused::Answers { limit } => write!(
                f,
                "answers not yet taken by their clients already hold the {limit} bytes of request \
                 memory they may (three quarters of server.max_inflight_bytes); try again shortly"
            ),
            Refused::Alone { needed, limit } => write!(
                f,
                "the request would hold {needed} bytes of memory while it is handled, more than \
                 the {limit} that all requests may hold together (server.max_inflight_bytes): \
                 send a smaller body"
            ),
        }
    }
}

impl InFlight {
    pub fn new(limit: usize) -> Arc<InFlight> {
        Arc::new(InFlight {
            used: AtomicUsize::new(0),
            limit,
            answers: AtomicUsize::new(0),
            refused: Default::default(),
        })
    }

    /// The most all shares may hold together.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The most answers waiting to be sent may hold together: three quarters of the limit.
    pub fn answers_limit(&self) -> usize {
        self.limit - self.limit / 4
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes answers waiting to be sent hold now.
    pub fn answers(&self) -> usize {
        self.answers.load(Ordering::Relaxed)
    }

    /// Shares refused since the start (503): (others held the budget, answers held their part).
    pub fn refused(&self) -> (u64, u64) {
        let [busy, answers] = &self.refused;
        (
            busy.load(Ordering::Relaxed),
            answers.load(Ordering::Relaxed),
        )
    }

    /// Takes `n` more bytes of `counter`, or none if that would pass `limit`.
    fn take(counter: &AtomicUsize, n: usize, limit: usize) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= limit)
            })
            .is_ok()
    }

    /// An empty share of this budget.
    pub fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            bytes: AtomicUsize::new(0),
            answer: false,
        }
    }

    /// An empty share for an answer waiting to be sent, within [`InFlight::answers_limit`].
    pub fn answer_share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            bytes: AtomicUsize::new(0),
            answer: true,
        }
    }

    /// Gives back `n` bytes a share held.
    fn give_back(&self, n: usize, answer: bool) {
        if answer {
            self.answers.fetch_sub(n, Ordering::AcqRel);
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One request's share of the budget, given back when dropped. It grows through `&self`, so a
/// write can count its prepared documents while its body is borrowed elsewhere.
#[derive(Debug)]
pub struct Share {
    budget: Arc<InFlight>,
    bytes: AtomicUsize,
    /// An answer's share, held within [`InFlight::answers_limit`].
    answer: bool,
}

impl Share {
    /// Bytes this share holds.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Holds `n` bytes more.
    pub fn grow(&self, n: usize) -> Result<(), Refused> {
        let budget = &self.budget;
        let needed = self.bytes().saturating_add(n);
        let limit = self.limit();
        if needed > limit {
            return Err(Refused::Alone { needed, limit });
        }
        if self.answer && !InFlight::take(&budget.answers, n, limit) {
            budget.refused[1].fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Answers { limit });
        }
        if !InFlight::take(&budget.used, n, budget.limit) {
            if self.answer {
                budget.answers.fetch_sub(n, Ordering::AcqRel);
            }
            budget.refused[0].fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Busy {
                limit: budget.limit,
            });
        }
        self.bytes.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// The most this share may hold.
    pub fn limit(&self) -> usize {
        match self.answer {
            true => self.budget.answers_limit(),
            false => self.budget.limit,
        }
    }

    /// Holds exactly `total` bytes: grows, or gives back what is no longer needed.
    pub fn resize(&self, total: usize) -> Result<(), Refused> {
        let held = self.bytes();
        if total > held {
            return self.grow(total - held);
        }
        self.bytes.fetch_sub(held - total, Ordering::AcqRel);
        self.budget.give_back(held - total, self.answer);
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.give_back(*self.bytes.get_mut(), self.answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_grow_within_the_budget_and_give_back_what_they_held() {
        let budget = InFlight::new(100);
        let first = budget.share();
        first.grow(60).unwrap();
        let second = budget.share();
        assert_eq!(second.grow(50), Err(Refused::Busy { limit: 100 }));
        assert_eq!(
            second.grow(101),
            Err(Refused::Alone {
                needed: 101,
                limit: 100
            })
        );
        second.grow(40).unwrap();
        assert_eq!(budget.used(), 100);
        first.resize(10).unwrap();
        assert_eq!(budget.used(), 50);
        second.resize(80).unwrap();
        drop(first);
        assert_eq!(budget.used(), 80);
        drop(second);
        assert_eq!(budget.used(), 0);
    }

    /// Answers waiting to be sent hold at most three quarters of the budget: writes always
    /// have the rest.
    #[test]
    fn answers_leave_writes_a_quarter_of_the_budget() {
        let budget = InFlight::new(100);
        let answers = [budget.answer_share(), budget.answer_share()];
        answers[0].grow(50).unwrap();
        assert_eq!(answers[1].grow(30), Err(Refused::Answers { limit: 75 }));
        assert_eq!(
            answers[1].grow(76),
            Err(Refused::Alone {
                needed: 76,
                limit: 75
            })
        );
        answers[1].grow(25).unwrap();
        let write = budget.share();
        write.grow(25).unwrap();
        assert_eq!(budget.used(), 100);
        // A write holding the rest leaves answers what they hold, no more.
        answers[0].resize(40).unwrap();
        write.grow(5).unwrap();
        assert_eq!(answers[0].grow(6), Err(Refused::Busy { limit: 100 }));
        assert_eq!(budget.answers(), 65);
        assert_eq!(budget.refused(), (1, 1));
        drop(answers);
        assert_eq!(budget.used(), 30);
        assert_eq!(budget.answers(), 0);
    }
}
