//! Pages of the change feed shared by the followers that read the same place at about the same
//! time. Live followers of a project under a write load read on from the same revisions, so the
//! page one needs was often just read, presented and encoded for another: it is handed over
//! instead, and a page being read is waited for rather than read again. Fifty followers of a
//! busy project cost about what one costs, so they keep up with the writes.
//!
//! Invariants:
//! - A page is shared only between readers of the same project incarnation (its epoch, which no
//!   other project of the catalog ever had, and which moves when a version is frozen or retired),
//!   version, blueprints, `since`, pass (`feed::pass`), limits and encoding, and for at most [`KEPT`] after its read
//!   began. Errors are never shared: each reader meets them on its own read.
//! - A reader is given a page only when a read of its own could have answered the same: the page
//!   is full (it ended at its limit; read again later it holds the same changes, or newer states
//!   of them further on), or it was read after the latest commit the reader knows of (`seen`), or
//!   the reader goes on reading at once after it (a stream, when the page moved). Otherwise the
//!   reader reads again and shares that read. So a follower never waits for a wake-up while a
//!   change it was woken for is unread, and a client that wrote and then reads the feed finds its
//!   write. A page that refuses its reader's `since` as compacted is read again by that reader
//!   (`http::changes`): a compaction may have come within its second, and a read of its own
//!   answers the same or says so.
//! - A shared read runs as a task of its own: a stream is polled only when its client reads, so a
//!   read that went on only while its first reader is polled would hold up every other reader of
//!   the page for as long as that client stops reading.
//! - Memory: at most [`MAX_PAGES`] pages and [`MAX_BYTES`] of encoded pages are kept, the oldest
//!   going first, and none past twice [`KEPT`] once readers stop coming (a task sweeps the cache
//!   while it keeps anything); a page kept is one `Bytes` that every reader's connection shares. A page over
//!   [`KEEP_BYTES`] goes only to the readers that came while it was read: handing a page of many
//!   MiB out again costs the HTTP workers about what reading it costs the blocking threads, and
//!   readers paging as fast as they can would take the workers from the writers.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
// tokio's clock, which a test can move on.
use tokio::time::Instant;

use crate::feed::{FeedError, Follower, Page};

/// How long a page is shared after its read began.
const KEPT: Duration = Duration::from_secs(1);
/// The most pages kept.
const MAX_PAGES: usize = 1024;
/// The most bytes of encoded pages kept.
const MAX_BYTES: usize = 64 << 20;
/// The largest page kept for readers that come after its read: a stream's pages are far smaller;
/// an answer's may take several MiB.
const KEEP_BYTES: usize = 1 << 20;

/// How a page is sent: its encoding is part of what is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// One JSON answer (a plain read or a long poll).
    Answer,
    Ndjson,
    Sse,
}

/// What a shared page was read for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub follower: Follower,
    /// The project's epoch when the reader came (see the module docs).
    pub epoch: u64,
    pub since: u64,
    /// The pass the reader holds, when it says more than `since` (`feed::useful`): it is in the
    /// page (its `horizon`, its SSE ids).
    pub pass: Option<u64>,
    pub limits: (usize, usize),
    pub format: Format,
}

/// A page encoded as it is sent.
pub type Encoded = Page<Bytes>;

/// A read under way or done, which any reader may wait for: it runs as a task of its own, so it
/// goes on whatever the reader that began it does (a stream is polled only when its client reads:
/// a follower that stops reading must not hold up the others). `None`: it failed, and each reader
/// reads on its own to learn why.
type Reading = Shared<BoxFuture<'static, Option<Arc<Encoded>>>>;

struct Entry {
    reading: Reading,
    /// Tells this entry from a later one of the same key.
    serial: u64,
    /// The latest commit the reader that began the read knew of.
    read_under: u64,
    /// The page's bytes, once read and counted in [`Kept::bytes`].
    bytes: usize,
}

#[derive(Default)]
struct Kept {
    entries: HashMap<Key, Entry>,
    /// Keys in the order their reads began, with the entry's serial (a key read again is listed
    /// again; an older listing removes nothing).
    order: VecDeque<(Key, u64, Instant)>,
    bytes: usize,
    serials: u64,
    /// Whether a task sweeps the cache (see [`Pages::keep_swept`]).
    sweeping: bool,
}

impl Kept {
    /// Forgets the pages past [`KEPT`], and the oldest while there are too many (as a reader
    /// comes, and every [`KEPT`] while anything is kept).
    fn sweep(&mut self, now: Instant) {
        while let Some((_, _, at)) = self.order.front() {
            let over = self.entries.len() > MAX_PAGES || self.bytes > MAX_BYTES;
            if !over && now.duration_since(*at) < KEPT {
                break;
            }
            let (key, serial, _) = self.order.pop_front().expect("a front");
            self.forget(&key, serial);
        }
    }

    /// Keeps `reading` as the read of `key` (`bytes`, 0 until read), by a reader that knew of
    /// commits up to `read_under`.
    fn insert(&mut self, key: Key, reading: Reading, read_under: u64, bytes: usize) {
        self.serials += 1;
        let now = Instant::now();
        self.order.push_back((key.clone(), self.serials, now));
        let entry = Entry {
            reading,
            serial: self.serials,
            read_under,
            bytes,
        };
        self.bytes += bytes;
        if let Some(old) = self.entries.insert(key, entry) {
            self.bytes -= old.bytes;
        }
    }

    /// Forgets the entry of `key` if it is still the one numbered `serial`.
    fn forget(&mut self, key: &Key, serial: u64) {
        if self.entries.get(key).is_some_and(|e| e.serial == serial) {
            let entry = self.entries.remove(key).expect("kept");
            self.bytes -= entry.bytes;
        }
    }
}

/// The pages followers share (see the module docs).
#[derive(Default)]
pub struct Pages {
    kept: Arc<Mutex<Kept>>,
}

impl Pages {
    /// The page at `key` for a reader that knows of commits up to `seen`: shared, or read by
    /// `read` (and then shared). A `stream` waits for a read of the page under way, and takes a
    /// page read before `seen` when it moved, since it reads on at once after it; an answer takes
    /// only a page already read, and reads on its own otherwise (answers may ask for pages of
    /// many MiB: see [`KEEP_BYTES`]).
    pub async fn read<F, R>(
        &self,
        key: Key,
        seen: u64,
        stream: bool,
        read: F,
    ) -> Result<Arc<Encoded>, FeedError>
    where
        F: Fn() -> R,
        R: Future<Output = Result<Encoded, FeedError>> + Send + 'static,
    {
        if !stream {
            if let Some(page) = self.read_before(&key, seen) {
                return Ok(page);
            }
            let page = Arc::new(read().await?);
            if page.body.len() <= KEEP_BYTES {
                let mut kept = lock(&self.kept);
                let ready = futures::future::ready(Some(page.clone())).boxed().shared();
                kept.insert(key, ready, seen, page.body.len());
                self.keep_swept(&mut kept);
            }
            return Ok(page);
        }
        let (reading, read_under) = self.entry(&key, seen, false, &read);
        if let Some(page) = reading.await {
            let moved = page.place.last_revision > key.since;
            if page.full || read_under >= seen || moved {
                return Ok(page);
            }
            // Read before a commit the reader knows of: read again, for it and those after it.
            let (reading, _) = self.entry(&key, seen, true, &read);
            if let Some(page) = reading.await {
                return Ok(page);
            }
        }
        // The shared read failed: this reader's own says why.
        Ok(Arc::new(read().await?))
    }

    /// The page of `key` already read, if a reader that knows of commits up to `seen` may have it.
    fn read_before(&self, key: &Key, seen: u64) -> Option<Arc<Encoded>> {
        let (reading, read_under) = {
            let mut kept = lock(&self.kept);
            kept.sweep(Instant::now());
            let entry = kept.entries.get(key)?;
            (entry.reading.clone(), entry.read_under)
        };
        // Done, or ready at the first poll (a page an answer kept, or a stream's read whose task
        // ended); polled without the lock, which the end of a stream's read takes.
        let page = reading.now_or_never()??;
        (page.full || read_under >= seen).then_some(page)
    }

    /// The read of `key` to wait for: the one kept, unless `renew` and it was read before `seen`;
    /// otherwise a new one, begun by `read`. With the latest commit its reader knew of.
    fn entry<F, R>(&self, key: &Key, seen: u64, renew: bool, read: &F) -> (Reading, u64)
    where
        F: Fn() -> R,
        R: Future<Output = Result<Encoded, FeedError>> + Send + 'static,
    {
        let now = Instant::now();
        let mut kept = lock(&self.kept);
        kept.sweep(now);
        if let Some(entry) = kept.entries.get(key) {
            if !renew || entry.read_under >= seen {
                return (entry.reading.clone(), entry.read_under);
            }
        }
        let serial = kept.serials + 1;
        let (shared, key_kept, read) = (Arc::downgrade(&self.kept), key.clone(), read());
        // The task keeps the cache's count itself as it ends, whether anyone waits for it or not.
        let task = tokio::spawn(async move {
            let page = read.await.ok().map(Arc::new);
            if let Some(kept) = shared.upgrade() {
                let mut kept = lock(&kept);
                let bytes = page.as_ref().map(|p| p.body.len());
                match kept.entries.get_mut(&key_kept) {
                    Some(entry) if entry.serial == serial => match bytes {
                        // A large page goes to those who waited for it, and is not kept for
                        // later readers: serving it again and again would cost about as much as
                        // reading it; a failed read is not kept either.
                        None => kept.forget(&key_kept, serial),
                        Some(bytes) if bytes > KEEP_BYTES => kept.forget(&key_kept, serial),
                        Some(bytes) => {
                            entry.bytes = bytes;
                            kept.bytes += bytes;
                        }
                    },
                    _ => {}
                }
            }
            page
        });
        let reading = async move { task.await.ok().flatten() }.boxed().shared();
        kept.insert(key.clone(), reading.clone(), seen, 0);
        self.keep_swept(&mut kept);
        (reading, seen)
    }

    /// Starts the task that sweeps the cache every [`KEPT`] while it keeps anything, unless one
    /// runs: pages are forgotten whether or not readers come.
    fn keep_swept(&self, kept: &mut Kept) {
        if !kept.sweeping {
            kept.sweeping = true;
            tokio::spawn(sweep_while_kept(Arc::downgrade(&self.kept)));
        }
    }
}

/// Sweeps the cache every [`KEPT`] until it keeps nothing (or is dropped).
async fn sweep_while_kept(kept: Weak<Mutex<Kept>>) {
    loop {
        tokio::time::sleep(KEPT).await;
        let Some(kept) = kept.upgrade() else { return };
        let mut kept = lock(&kept);
        kept.sweep(Instant::now());
        if kept.order.is_empty() {
            kept.sweeping = false;
            return;
        }
    }
}

fn lock(kept: &Mutex<Kept>) -> std::sync::MutexGuard<'_, Kept> {
    kept.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blueprint::Ident;
    use crate::feed::Place;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(since: u64) -> Key {
        Key {
            follower: Follower {
                project: Ident::parse("p").unwrap(),
                version: 1,
                blueprints: None,
            },
            epoch: 1,
            since,
            pass: None,
            limits: (100, 1 << 20),
            format: Format::Ndjson,
        }
    }

    /// A page of one change holding `bytes`, ending at `last`, `full` or not.
    fn page(bytes: usize, last: u64, full: bool) -> Encoded {
        Page {
            body: Bytes::from(vec![b'x'; bytes]),
            shown: 1,
            place: Place {
                last_revision: last,
                horizon: 0,
                pass: 0,
            },
            full,
        }
    }

    /// A reader that counts its reads and answers a page of 10 bytes ending at `last`.
    fn reader(
        reads: &AtomicUsize,
        last: u64,
        full: bool,
    ) -> impl Fn() -> std::future::Ready<Result<Encoded, FeedError>> + '_ {
        move || {
            reads.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(page(10, last, full)))
        }
    }

    #[tokio::test]
    async fn readers_of_one_place_share_a_page_read_after_what_they_know() {
        let pages = Pages::default();
        let reads = AtomicUsize::new(0);
        pages
            .read(key(5), 9, false, reader(&reads, 9, false))
            .await
            .unwrap();
        pages
            .read(key(5), 9, false, reader(&reads, 9, false))
            .await
            .unwrap();
        pages
            .read(key(5), 8, false, reader(&reads, 9, false))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 1, "read once for all three");
        // Another place, another version or another encoding is another page.
        pages
            .read(key(6), 9, false, reader(&reads, 9, false))
            .await
            .unwrap();
        let mut other = key(5);
        other.format = Format::Sse;
        pages
            .read(other, 9, false, reader(&reads, 9, false))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_page_read_before_a_commit_the_reader_knows_of_is_read_again_unless_it_is_full() {
        let pages = Pages::default();
        let reads = AtomicUsize::new(0);
        // An empty page read when 5 was the last commit; the reader knows of 7.
        pages
            .read(key(5), 5, false, reader(&reads, 5, false))
            .await
            .unwrap();
        let page = pages
            .read(key(5), 7, false, reader(&reads, 7, false))
            .await
            .unwrap();
        assert_eq!(
            (reads.load(Ordering::SeqCst), page.place.last_revision),
            (2, 7)
        );
        // The read again is what later readers share.
        pages
            .read(key(5), 7, false, reader(&reads, 7, false))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2);

        // A page that moved will do for a stream, which reads on at once, not for an answer.
        pages
            .read(key(10), 12, false, reader(&reads, 12, false))
            .await
            .unwrap();
        pages
            .read(key(10), 15, true, reader(&reads, 15, false))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 3);
        pages
            .read(key(10), 15, false, reader(&reads, 15, false))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 4);

        // A full page holds the same however late it is read.
        pages
            .read(key(20), 30, false, reader(&reads, 25, true))
            .await
            .unwrap();
        pages
            .read(key(20), 99, false, reader(&reads, 25, true))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_read_goes_on_while_the_reader_that_began_it_is_not_polled() {
        let pages = Pages::default();
        let gate = Arc::new(tokio::sync::Notify::new());
        let held = {
            let gate = gate.clone();
            move || {
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Ok(page(1, 2, false))
                }
            }
        };
        let mut first = Box::pin(pages.read(key(1), 2, true, held));
        assert!(futures::poll!(&mut first).is_pending());
        gate.notify_one();
        // The first reader's client stopped reading: its future is never polled again.
        let reads = AtomicUsize::new(0);
        let second = tokio::time::timeout(
            Duration::from_secs(5),
            pages.read(key(1), 2, true, reader(&reads, 2, false)),
        )
        .await
        .expect("not held up by the first reader");
        assert_eq!(second.unwrap().body.len(), 1, "the first reader's page");
        assert_eq!(reads.load(Ordering::SeqCst), 0, "the read was shared");
    }

    #[tokio::test]
    async fn an_answer_takes_a_streams_read_whose_task_ended_before_any_stream_looked() {
        let pages = Pages::default();
        let reads = AtomicUsize::new(0);
        let read = reader(&reads, 3, false);
        let _ = pages.entry(&key(1), 3, false, &read);
        // The read's task ends; no stream has polled its outcome yet, and it is counted.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lock(&pages.kept).bytes, 10);
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            pages.read(key(1), 3, false, reader(&reads, 3, false)),
        )
        .await
        .expect("answered, not stuck on the cache's lock");
        assert_eq!(answer.unwrap().place.last_revision, 3);
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "the stream's read was taken"
        );
    }

    #[tokio::test]
    async fn large_pages_are_not_kept_for_later_readers() {
        let pages = Pages::default();
        let reads = AtomicUsize::new(0);
        let large = || {
            reads.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(page(KEEP_BYTES + 1, 0, true)))
        };
        pages.read(key(1), 1, false, large).await.unwrap();
        pages.read(key(1), 1, false, large).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        assert_eq!(lock(&pages.kept).bytes, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn pages_are_forgotten_when_no_reader_comes() {
        let pages = Pages::default();
        let reads = AtomicUsize::new(0);
        for (since, stream) in [(1, false), (2, true)] {
            pages
                .read(key(since), 1, stream, reader(&reads, 1, true))
                .await
                .unwrap();
        }
        assert_eq!(lock(&pages.kept).bytes, 20);
        assert!(lock(&pages.kept).sweeping);
        tokio::time::sleep(KEPT * 2 + Duration::from_millis(1)).await;
        let kept = lock(&pages.kept);
        assert!(kept.entries.is_empty() && kept.order.is_empty());
        assert_eq!(kept.bytes, 0);
        assert!(!kept.sweeping, "the sweeping task ends with nothing kept");
    }

    #[tokio::test]
    async fn errors_are_not_shared_and_pages_are_forgotten_after_a_while() {
        let pages = Pages::default();
        let failing = || {
            std::future::ready(Err::<Encoded, _>(FeedError::Gone(
                "version 1 was retired".into(),
            )))
        };
        assert!(pages.read(key(1), 1, true, failing).await.is_err());
        let reads = AtomicUsize::new(0);
        pages
            .read(key(1), 1, true, reader(&reads, 1, false))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 1, "the error was not kept");

        // Past `KEPT`, or past the most pages kept, a page is read again.
        {
            let mut kept = lock(&pages.kept);
            let long_ago = Instant::now() - KEPT;
            kept.order.iter_mut().for_each(|(_, _, at)| *at = long_ago);
        }
        pages
            .read(key(1), 1, false, reader(&reads, 1, false))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        for since in 0..=MAX_PAGES as u64 {
            pages
                .read(key(100 + since), 1, false, reader(&reads, 1, true))
                .await
                .unwrap();
        }
        let kept = lock(&pages.kept);
        assert!(
            kept.entries.len() <= MAX_PAGES + 1,
            "{}",
            kept.entries.len()
        );
        assert_eq!(
            kept.bytes,
            kept.entries.values().map(|e| e.bytes).sum::<usize>()
        );
    }
}
