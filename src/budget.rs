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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The bytes held by all requests' shares, and the most they may hold.
#[derive(Debug)]
pub struct InFlight {
    used: AtomicUsize,
    limit: usize,
}

/// Why a share could not grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Other requests hold too much now; the request may be sent again shortly.
    Busy { limit: usize },
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
        })
    }

    /// The most all shares may hold together.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` more bytes, or none if that would pass the limit.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// An empty share of this budget.
    pub fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            bytes: AtomicUsize::new(0),
        }
    }
}

/// One request's share of the budget, given back when dropped. It grows through `&self`, so a
/// write can count its prepared documents while its body is borrowed elsewhere.
#[derive(Debug)]
pub struct Share {
    budget: Arc<InFlight>,
    bytes: AtomicUsize,
}

impl Share {
    /// Bytes this share holds.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Holds `n` bytes more.
    pub fn grow(&self, n: usize) -> Result<(), Refused> {
        let needed = self.bytes().saturating_add(n);
        if needed > self.budget.limit {
            return Err(Refused::Alone {
                needed,
                limit: self.budget.limit,
            });
        }
        if !self.budget.take(n) {
            return Err(Refused::Busy {
                limit: self.budget.limit,
            });
        }
        self.bytes.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// Holds exactly `total` bytes: grows, or gives back what is no longer needed.
    pub fn resize(&self, total: usize) -> Result<(), Refused> {
        let held = self.bytes();
        if total > held {
            return self.grow(total - held);
        }
        self.bytes.fetch_sub(held - total, Ordering::AcqRel);
        self.budget.used.fetch_sub(held - total, Ordering::AcqRel);
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(*self.bytes.get_mut(), Ordering::AcqRel);
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
}
