//! `GET /{project}/_changes`: the change feed (see `feed`) as one JSON page, a long poll,
//! server-sent events or NDJSON.
//!
//! Invariants:
//! - A stream reads its next page (at most [`STREAM_PAGE`] changes, ending after [`STREAM_BYTES`])
//!   only once the previous one was handed to the connection: actix polls a body stream only when
//!   it can write, so a slow follower holds one small page, never a backlog, however fast the
//!   project is written and however large its items. A page that shows the follower nothing (a
//!   filter hid its changes) is handed over as a heartbeat's frame saying how far it read, so this
//!   holds for a follower whose filter hides a long history too.
//! - An idle follower is a parked future waiting on its project's signal (or its heartbeat): no task,
//!   no buffer; without a signal it reads again only every [`LONG_POLL_REREAD`] (a long poll) or
//!   after each heartbeat (a stream).
//! - Streams resume from the revision a follower saw last (`since`, or SSE's `Last-Event-ID`), and
//!   within one stream revisions only grow, so a change is never sent twice.
//! - A page's read (embedded storage), and its transform and encoding when its items are large
//!   (together, in one hand-off), run on blocking threads (`crate::aside`), not on the HTTP worker:
//!   followers reading pages of many MiB as fast as they can would otherwise stall every request
//!   their workers share.
//! - Followers reading the same place at about the same time share one read of it, encoded once
//!   ([`pages`], which says when a page may be shared); a stream sends a page as one chunk.
//! - Streams end when the server stops, so a graceful stop never waits for followers: those that
//!   read see the stop; a moment later the connections of those still open (their clients stopped
//!   reading, so they are not polled) are shut down ([`Followers::cut_streams`]).
//! - A follower's place (`changes.max_followers`) is given back soon after its client left: a
//!   stream finds out at its next frame or heartbeat (one at least every heartbeat, however many
//!   wake-ups showed it nothing), whose write fails; a long poll, which writes nothing
//!   until it answers (and which actix does not cancel when the client goes), looks at its
//!   connection's socket every second ([`PeerSocket`]). Otherwise clients that open long polls
//!   and hang up at once would hold every place for the longest time-out.
//! - A stream whose client reads nothing (actix no longer polls it: its connection waits to write)
//!   for [`STALLED_HEARTBEATS`] heartbeats, and at least [`STALLED_FLOOR`], has its connection shut
//!   down, looked for at most once a second as followers arrive ([`Followers::sweep`]): a client
//!   that opens streams and never reads would otherwise hold their places, and the page each
//!   holds, for as long as its host acknowledges TCP. The client resumes from its last event id.
//! - A stream or long poll opened with an API key checks the key again as it runs (at most once a
//!   second, and before each page): a key revoked, expired or narrowed meanwhile ends it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::auth::Recheck;
use super::error::ApiError;
use super::{ident, State};
use crate::auth::Action;
use crate::blueprint::Ident;
use crate::feed::{FeedEntry, FeedError, FollowError, Follower, Place, PAGE_BYTES};

mod pages;

use pages::{Encoded, Format, Key};

/// Changes a plain or long-poll answer holds unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 1000;
/// The most a plain or long-poll answer may hold.
const MAX_LIMIT: usize = 10_000;
/// Changes a stream reads at once.
const STREAM_PAGE: usize = 100;
/// The decoded bytes past which a stream's page takes no more changes (it takes one at least):
/// what a follower that does not read holds, its page encoded, beside one change however large.
/// An answer's page may reach `feed::PAGE_BYTES`, but it is sent and gone; a stream's waits on
/// its client.
const STREAM_BYTES: usize = 256 << 10;
/// How long a long poll waits unless `timeout` says otherwise, in seconds.
const DEFAULT_LONGPOLL_SECS: u64 = 60;
/// The longest `timeout`, in seconds.
const MAX_TIMEOUT_SECS: u64 = 3600;
/// The most blueprints one follower may name.
const MAX_BLUEPRINTS: usize = 100;
/// How long a stream waits before reading again after the storage failed.
const RETRY: Duration = Duration::from_secs(1);
/// How often a long poll reads again without a wake-up.
const LONG_POLL_REREAD: Duration = Duration::from_secs(5);
/// Reads in a row a stream lets fail before it ends with a 503 (`event: gone`): the client
/// reconnects from its last event id, rather than hear nothing for as long as a storage is away
/// or a record cannot be read.
const STREAM_FAILURES: u32 = 30;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Feed {
    Normal,
    Longpoll,
    Sse,
    Ndjson,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    since: Option<String>,
    version: Option<String>,
    blueprint: Option<String>,
    limit: Option<String>,
    feed: Option<String>,
    timeout: Option<String>,
    heartbeat: Option<String>,
    horizon: Option<String>,
}

struct Params {
    /// `None`: `since=now`, only changes from here on.
    since: Option<u64>,
    /// The pass of the page that gave `since` (see `feed::pass`), sent as `horizon`.
    horizon: Option<u64>,
    version: Option<u32>,
    blueprints: Option<Vec<Ident>>,
    limit: usize,
    feed: Feed,
    /// Long poll: how long to wait; streams: when to end (none: never).
    timeout: Option<Duration>,
    heartbeat: Duration,
}

fn number<T: std::str::FromStr>(
    field: &str,
    raw: Option<&str>,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    raw.map(|text| {
        text.parse::<T>().map_err(|_| {
            ApiError::bad_request(
                field,
                format!(
                    "{field}={:?} is not {expected}",
                    crate::blueprint::value::excerpt_str(text)
                ),
            )
        })
    })
    .transpose()
}

impl Params {
    fn parse(request: &HttpRequest, state: &State) -> Result<Params, ApiError> {
        let query = super::query::read::<Query>(request.query_string())?;
        let mut since = match query.since.as_deref() {
            Some("now") => None,
            raw => Some(number::<u64>("since", raw, "a revision or now")?.unwrap_or(0)),
        };
        let mut horizon = number::<u64>("horizon", query.horizon.as_deref(), "a revision")?;
        // An SSE client resuming after a dropped connection says where it was (`EventId`).
        if let Some(last) = request.headers().get("last-event-id") {
            let text = last.to_str().unwrap_or("?");
            let (revision, under) = match text.split_once('/') {
                Some((revision, under)) => (revision, Some(under)),
                None => (text, None),
            };
            let what = "a revision, or a revision and a horizon as `id:` gave them";
            since = number::<u64>("Last-Event-ID", Some(revision), what)?;
            if under.is_some() {
                horizon = number::<u64>("Last-Event-ID", under, what)?;
            }
        }
        let version = query
            .version
            .as_deref()
            .map(|raw| super::version_number("version", raw))
            .transpose()?;
        let blueprints = match query.blueprint.as_deref() {
            None => None,
            Some(list) => {
                let names: Vec<&str> = list.split(',').collect();
                if names.len() > MAX_BLUEPRINTS {
                    return Err(ApiError::bad_request(
                        "blueprint",
                        format!("at most {MAX_BLUEPRINTS} blueprints may be named"),
                    ));
                }
                Some(
                    names
                        .into_iter()
                        .map(|name| ident("blueprint", name))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
        };
        let limit =
            number::<usize>("limit", query.limit.as_deref(), "a number")?.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ApiError::bad_request(
                "limit",
                format!("limit={limit} is not between 1 and {MAX_LIMIT}"),
            ));
        }
        let accepts_sse = request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
        let feed = match query.feed.as_deref() {
            None if accepts_sse => Feed::Sse,
            None | Some("normal") => Feed::Normal,
            Some("longpoll") => Feed::Longpoll,
            Some("sse" | "eventsource") => Feed::Sse,
            Some("ndjson" | "continuous") => Feed::Ndjson,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "feed",
                    format!(
                        "feed={:?} is not one of normal, longpoll, sse, ndjson",
                        crate::blueprint::value::excerpt_str(other)
                    ),
                ))
            }
        };
        let timeout = number::<u64>("timeout", query.timeout.as_deref(), "a number of seconds")?;
        if let Some(t) = timeout.filter(|t| *t > MAX_TIMEOUT_SECS) {
            return Err(ApiError::bad_request(
                "timeout",
                format!("timeout={t} is more than {MAX_TIMEOUT_SECS} seconds"),
            ));
        }
        let timeout = match (feed, timeout) {
            (Feed::Longpoll, None) => Some(DEFAULT_LONGPOLL_SECS),
            (_, t) => t,
        }
        .map(Duration::from_secs);
        let heartbeat = number::<u64>(
            "heartbeat",
            query.heartbeat.as_deref(),
            "a number of seconds",
        )?
        .unwrap_or(state.settings.changes.heartbeat_secs);
        let heartbeats = crate::config::HEARTBEAT_SECS;
        if !heartbeats.contains(&heartbeat) {
            return Err(ApiError::bad_request(
                "heartbeat",
                format!(
                    "heartbeat={heartbeat} is not between {} and {} seconds",
                    heartbeats.start(),
                    heartbeats.end()
                ),
            ));
        }
        Ok(Params {
            since,
            version,
            blueprints,
            limit,
            feed,
            timeout,
            heartbeat: Duration::from_secs(heartbeat),
            horizon,
        })
    }
}

impl From<FollowError> for ApiError {
    fn from(error: FollowError) -> Self {
        match error {
            FollowError::NotFound(m) => ApiError::NotFound(m),
            FollowError::Invalid(field, m) => ApiError::Invalid(
                "invalid change feed request".into(),
                vec![crate::blueprint::FieldError::new(field, m)],
            ),
        }
    }
}

impl From<FeedError> for ApiError {
    fn from(error: FeedError) -> Self {
        match error {
            FeedError::Compacted { horizon } => ApiError::Gone(error.to_string(), horizon),
            FeedError::Gone(m) => ApiError::NotFound(m),
            FeedError::Storage(e) => e.into(),
            FeedError::Budget { refused, bytes } => page_refused(refused, bytes),
        }
    }
}

/// The answer to a page the request memory budget cannot hold: 503 while other requests hold
/// it, 413 for a page larger than all of it.
fn page_refused(refused: crate::budget::Refused, bytes: usize) -> ApiError {
    match refused {
        crate::budget::Refused::Busy { .. } | crate::budget::Refused::Answers { .. } => {
            ApiError::from(refused)
        }
        crate::budget::Refused::Alone { limit, .. } => ApiError::Oversized(format!(
            "this page would hold {bytes} bytes until it is sent, more than the {limit} answers \
             may hold together (three quarters of server.max_inflight_bytes): ask for fewer \
             changes (limit)"
        )),
    }
}

/// How often a waiting long poll looks whether its client is still connected.
const PEER_CHECK: Duration = Duration::from_secs(1);

/// The socket of a request's connection, kept in the connection's data by
/// [`PeerSocket::keep`] (the server's `on_connect`), so a long poll can tell that its client left.
#[derive(Clone, Copy, Debug)]
pub struct PeerSocket(std::os::fd::RawFd);

impl PeerSocket {
    /// The server's `on_connect`: keeps the socket of a TCP connection.
    pub fn keep(connection: &dyn std::any::Any, data: &mut actix_web::dev::Extensions) {
        use std::os::fd::AsRawFd;
        if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
            data.insert(PeerSocket(tcp.as_raw_fd()));
        }
    }

    /// Whether the client closed its side of the connection or reset it. Looks without taking
    /// anything: a request the client sent ahead (pipelining) stays to be read.
    fn left(self) -> bool {
        let mut byte = 0u8;
        // SAFETY: the descriptor is the socket of the connection whose request is being served;
        // the connection owns it until the request's handler is done, so it is open here. The
        // call writes at most one byte into `byte`, and MSG_PEEK leaves the data in the socket.
        let read = unsafe {
            libc::recv(
                self.0,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match read {
            0 => true,
            1.. => false,
            _ => !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }

    /// Finishes once the client of `peer` left; never without one.
    async fn gone(peer: Option<PeerSocket>) {
        let Some(peer) = peer else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(PEER_CHECK).await;
            if peer.left() {
                return;
            }
        }
    }
}

/// A stream whose client has read nothing for this many heartbeats loses its connection.
const STALLED_HEARTBEATS: u32 = 3;
/// ... and for at least this long.
const STALLED_FLOOR: Duration = Duration::from_secs(10);

/// The followers a node serves: how many (`changes.max_followers`), and the sockets of its streams.
#[derive(Default)]
pub struct Followers {
    count: AtomicUsize,
    /// The sockets of the streams: a connection serves one stream at a time, and a stream ends
    /// before its connection closes the socket, so a socket names one stream.
    streams: Mutex<HashMap<std::os::fd::RawFd, Arc<Watched>>>,
    /// When [`Followers::sweep`] last looked, in milliseconds since [`epoch`].
    swept: AtomicU64,
    /// The pages followers reading the same place about now share.
    pages: pages::Pages,
    /// The places each API key holds (see [`Slot::take`]).
    by_key: Mutex<HashMap<String, usize>>,
}

/// When a stream last handed a frame to its connection, and how long it may wait to be polled
/// again.
struct Watched {
    /// Milliseconds since [`epoch`]; [`Watched::POLLED`] while the stream is being polled (it
    /// waits for a change, a heartbeat or the storage, not for its client).
    handed: AtomicU64,
    stalled_after: Duration,
    /// The socket's inode: a descriptor number reused for another socket is not this one.
    inode: Option<u64>,
}

/// The instant the followers' clocks count from.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl Watched {
    const POLLED: u64 = u64::MAX;
}

fn millis_now() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// The inode of the socket `fd` names.
fn inode(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `stat` into the buffer when it answers 0, and touches nothing
    // else; a descriptor that is not open answers -1.
    let done = unsafe { libc::fstat(fd, stat.as_mut_ptr()) };
    // SAFETY: initialized by fstat, which answered 0.
    (done == 0).then(|| unsafe { stat.assume_init() }.st_ino)
}

impl Followers {
    /// Ends the connections of the streams still open. A stream whose client stopped reading is
    /// never polled again (its connection waits to write), so it never sees the server stop; a
    /// graceful stop would wait for it until actix's shutdown timeout. Called once the server
    /// stops and the streams that are read had a moment to end by themselves.
    pub fn cut_streams(&self) {
        let streams = self.streams();
        for (socket, watched) in streams.iter() {
            // A number reused for a socket that is not the stream's (another server of the same
            // process) is left alone.
            if watched.inode.is_none() || inode(*socket) != watched.inode {
                continue;
            }
            // SAFETY: a socket is listed while its stream lives, and its inode says it is still
            // the stream's socket, not a number reused by another. `shutdown` touches no memory.
            unsafe { libc::shutdown(*socket, libc::SHUT_RDWR) };
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<std::os::fd::RawFd, Arc<Watched>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shuts down the connections of streams whose clients stopped reading (see the module
    /// docs); at most once a second.
    fn sweep(&self) {
        let now = millis_now();
        let last = self.swept.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .swept
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let streams = self.streams();
        for (socket, watched) in streams.iter() {
            let idle = now.saturating_sub(watched.handed.load(Ordering::Relaxed));
            if u128::from(idle) < watched.stalled_after.as_millis() {
                continue;
            }
            if watched.inode.is_none() || inode(*socket) != watched.inode {
                continue;
            }
            tracing::info!(
                idle_secs = idle / 1000,
                "a change feed stream whose client reads nothing loses its connection"
            );
            // SAFETY: the socket is listed while its stream lives (removed under this lock as
            // the stream's place is given back), and its inode says it is still the stream's
            // socket, not a number reused by another. `shutdown` touches no memory.
            unsafe { libc::shutdown(*socket, libc::SHUT_RDWR) };
        }
    }
}

/// One of `changes.max_followers`, given back when the follower leaves; a stream's lists its
/// socket for [`Followers::cut_streams`].
struct Slot {
    followers: Arc<Followers>,
    stream: Option<(std::os::fd::RawFd, Arc<Watched>)>,
    /// The API key whose place this is, when a key asked.
    key: Option<String>,
}

/// One API key holds at most this share of a node's places (`changes.max_followers` divided by
/// it, at least one): a tenant that opens streams and leaves them cannot take every place from
/// the others. Without keys (one tenant, or auth off) there is no such bound.
const KEY_SHARE: usize = 4;

impl Slot {
    fn take(state: &State, request: &HttpRequest) -> Result<Slot, ApiError> {
        let followers = &state.followers;
        followers.sweep();
        let most = state.settings.changes.max_followers;
        let key = match super::auth::caller(request) {
            crate::auth::Caller::Key(key, _) => Some(key.id.clone()),
            _ => None,
        };
        if let Some(id) = &key {
            let most_per_key = (most / KEY_SHARE).max(1);
            let mut by_key = followers.by_key.lock().unwrap_or_else(|e| e.into_inner());
            let held = by_key.entry(id.clone()).or_default();
            if *held >= most_per_key {
                let held = *held;
                return Err(ApiError::Unavailable(format!(
                    "this key already holds {held} of this node's change feed followers, the most \
                     one key may (a quarter of changes.max_followers); close some, or try again \
                     later"
                )));
            }
            *held += 1;
        }
        let slot = Slot {
            followers: followers.clone(),
            stream: None,
            key,
        };
        let count = followers.count.fetch_add(1, Ordering::AcqRel);
        if count >= most {
            // Given back by the slot's drop.
            drop(slot);
            return Err(ApiError::Unavailable(format!(
                "this node already serves {count} change feed followers (changes.max_followers); \
                 try again later or another node"
            )));
        }
        Ok(slot)
    }

    /// Lists the socket of the stream this place is for, which sends a heartbeat this often.
    fn streaming(mut self, peer: Option<PeerSocket>, heartbeat: Duration) -> Slot {
        if let Some(PeerSocket(socket)) = peer {
            let watched = Arc::new(Watched {
                handed: AtomicU64::new(Watched::POLLED),
                stalled_after: (heartbeat * STALLED_HEARTBEATS).max(STALLED_FLOOR),
                inode: inode(socket),
            });
            self.followers.streams().insert(socket, watched.clone());
            self.stream = Some((socket, watched));
        }
        self
    }

    /// Notes that the stream is being polled (`handed`: false), or that it handed a frame to its
    /// connection, which polls it again once the client took it in.
    fn note(&self, handed: bool) {
        if let Some((_, watched)) = &self.stream {
            let at = if handed {
                millis_now()
            } else {
                Watched::POLLED
            };
            watched.handed.store(at, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((socket, watched)) = &self.stream {
            // A stream can outlive its socket for a moment, and a new stream on a socket of the
            // same number may have listed itself since: only this stream's entry goes.
            let mut streams = self.followers.streams();
            if streams.get(socket).is_some_and(|w| Arc::ptr_eq(w, watched)) {
                streams.remove(socket);
            }
        }
        self.followers.count.fetch_sub(1, Ordering::AcqRel);
        if let Some(id) = &self.key {
            let mut by_key = self
                .followers
                .by_key
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(held) = by_key.get_mut(id) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    by_key.remove(id);
                }
            }
        }
    }
}

/// A page as one JSON answer.
/// A page as one JSON answer. Until it is sent, its bytes count against the memory requests may
/// hold (`server.max_inflight_bytes`): clients that ask for large pages and never read them are
/// answered 503 once they hold that much, instead of growing the process.
fn answer(page: &Encoded, share: Arc<crate::budget::Share>) -> Result<HttpResponse, ApiError> {
    share
        .resize(page.body.len())
        .map_err(|refused| page_refused(refused, page.body.len()))?;
    Ok(HttpResponse::Ok()
        .content_type(header::ContentType::json())
        .body(super::body::Held::new(page.body.clone(), share)))
}

/// What a follower reads its pages as.
struct Reader<'a> {
    state: &'a State,
    follower: &'a Follower,
    limits: (usize, usize),
    format: Format,
    /// The share of the request memory budget the changes this reader reads are counted in,
    /// from the moment they are read until the answer made of them is sent.
    held: Option<Arc<crate::budget::Share>>,
}

impl Reader<'_> {
    /// The page after `since`, for a reader that knows of commits up to `seen` and was handed
    /// `since` under `horizon`: shared with the followers reading the same place about now
    /// (`pages`; a stream reads on at once after a page that moved).
    async fn page(
        &self,
        since: u64,
        horizon: Option<u64>,
        seen: u64,
    ) -> Result<Arc<Encoded>, FeedError> {
        let (format, version, limits) = (self.format, self.follower.version, self.limits);
        let (storage, follower) = (&self.state.storage, self.follower);
        // Only a pass that says more than `since` is part of the page (see `feed::pass`), and
        // none past the last revision the reader knows of, which no page handed out: a made-up
        // one would pass every compaction.
        let passed = crate::feed::useful(since, horizon).filter(|pass| *pass <= seen);
        let read = || {
            let (storage, follower) = (storage.clone(), follower.clone());
            let held = self.held.clone();
            async move {
                let finish =
                    move |entries: &[FeedEntry], place| encode(entries, place, format, version);
                let hold = |bytes: usize| match &held {
                    Some(share) => share
                        .resize(bytes)
                        .map_err(|refused| FeedError::Budget { refused, bytes }),
                    None => Ok(()),
                };
                follower
                    .page(storage.as_ref(), (since, passed), limits, hold, finish)
                    .await
            }
        };
        let epoch = storage
            .snapshot()
            .projects
            .get(&self.follower.project)
            .map(|p| p.epoch);
        let page = match epoch {
            Some(epoch) => {
                let key = Key {
                    follower: self.follower.clone(),
                    epoch,
                    since,
                    pass: passed,
                    limits: self.limits,
                    format,
                };
                let pages = &self.state.followers.pages;
                let page = pages
                    .read(key, seen, format != Format::Answer, read)
                    .await?;
                // A shared page holds the horizon it was read under, up to a second old: one
                // that refuses `since` is read again, as a read of this reader's own would be.
                if crate::feed::check_horizon(since, passed, page.place).is_err() {
                    Arc::new(read().await?)
                } else {
                    page
                }
            }
            // The project went away: the read says how.
            None => Arc::new(read().await?),
        };
        crate::feed::check_horizon(since, passed, page.place)?;
        Ok(page)
    }
}

/// A plain or long-poll answer's body.
#[derive(serde::Serialize)]
struct Answer<'a> {
    results: &'a [FeedEntry],
    last_revision: u64,
    horizon: u64,
    version: u32,
}

/// An SSE event id (revision, pass): the revision, and below the pass the pass too
/// (`revision/pass`), as a read from 0 goes on below the horizon only with the pass it was handed
/// (`feed::pass`): a client that reconnects in the middle of such a read sends it back as
/// `Last-Event-ID` and resumes, where the revision alone would be refused once a compaction
/// moved the horizon past it. Past the pass the id is the revision alone.
/// Written straight into a page's frames, with no string of its own per event.
struct EventId(u64, u64);

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let EventId(revision, pass) = *self;
        match revision != 0 && revision < pass {
            true => write!(f, "{revision}/{pass}"),
            false => write!(f, "{revision}"),
        }
    }
}

/// The entries of a page as they are sent: one JSON answer, or a stream's frames.
fn encode(entries: &[FeedEntry], place: Place, format: Format, version: u32) -> Bytes {
    let mut out = Vec::new();
    match format {
        Format::Answer => {
            let answer = Answer {
                results: entries,
                last_revision: place.last_revision,
                horizon: place.pass,
                version,
            };
            serde_json::to_writer(&mut out, &answer).expect("entries serialize");
        }
        Format::Ndjson => {
            for entry in entries {
                serde_json::to_writer(&mut out, entry).expect("entries serialize");
                out.push(b'\n');
            }
        }
        Format::Sse => {
            use std::io::Write;
            for entry in entries {
                write!(out, "id: {}\ndata: ", EventId(entry.revision, place.pass))
                    .expect("a Vec takes writes");
                serde_json::to_writer(&mut out, entry).expect("entries serialize");
                out.extend_from_slice(b"\n\n");
            }
        }
    }
    Bytes::from(out)
}

/// GET /{project}/_changes?since=&version=&blueprint=&limit=&feed=&timeout=&heartbeat=
pub async fn changes(
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let params = Params::parse(&request, &state)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let follower = Follower::new(
        &snapshot,
        &project,
        params.version,
        params.blueprints.clone(),
    )?;
    let version = follower.version;
    let mut recheck = Recheck::of(&state, &request, Action::ItemsRead, project.as_str());
    // A follower that waits subscribes before it reads the head: a commit between the two would
    // otherwise wake nobody, and a page shared from before it could be taken as current.
    let wake = (params.feed != Feed::Normal).then(|| state.storage.follow(&project));
    let head = state.storage.revision(&project).await?;
    let since = match params.since {
        Some(since) if since > head => return Err(ahead(since, head)),
        Some(since) => since,
        None => head,
    };
    let format = match params.feed {
        Feed::Normal | Feed::Longpoll => Format::Answer,
        Feed::Sse => Format::Sse,
        Feed::Ndjson => Format::Ndjson,
    };
    let reader = Reader {
        state: &state,
        follower: &follower,
        limits: (params.limit, PAGE_BYTES),
        format,
        // A plain or long-poll answer holds its page until sent; requests for it take no
        // follower's place, so what they read is counted from the read on (a stream's pages
        // are small, one at a time per place).
        held: (format == Format::Answer).then(|| Arc::new(state.in_flight.answer_share())),
    };
    match params.feed {
        Feed::Normal => {
            let page = reader.page(since, params.horizon, head).await?;
            answer(&page, reader.held.expect("an answer is held"))
        }
        Feed::Longpoll => {
            let _slot = Slot::take(&state, &request)?;
            let peer = request.conn_data::<PeerSocket>().copied();
            let waiting = Waiting {
                wake: wake.expect("a long poll follows"),
                head,
                deadline: Instant::now() + params.timeout.unwrap_or_default(),
                peer,
            };
            let page = long_poll(&reader, since, params.horizon, waiting, recheck.as_mut()).await?;
            answer(&page, reader.held.clone().expect("an answer is held"))
        }
        Feed::Sse | Feed::Ndjson => {
            let slot = Slot::take(&state, &request)?
                .streaming(request.conn_data::<PeerSocket>().copied(), params.heartbeat);
            // Read once before answering, so a compacted `since` is a 410, not a stream that ends.
            let first = Reader {
                limits: (1, PAGE_BYTES),
                held: None,
                ..reader
            }
            .page(since, params.horizon, head)
            .await?;
            let stream = Stream {
                wake: wake.expect("a stream follows"),
                closing: state.closing.clone(),
                deadline: params.timeout.map(|t| Instant::now() + t),
                heartbeat: params.heartbeat,
                next_heartbeat: Instant::now() + params.heartbeat,
                since,
                horizon: Some(first.place.pass),
                head,
                format,
                // SSE starts with the revision it reads from as the last event id (an id without
                // data is no event): a follower that started from `since=now` and reconnects
                // before any change resumes from there, not from a later `now`.
                out: VecDeque::from([Bytes::from(if params.feed == Feed::Sse {
                    format!("retry: 2000\nid: {}\n\n", EventId(since, first.place.pass))
                } else {
                    String::new()
                })]),
                done: false,
                follower,
                recheck,
                state: state.clone(),
                failures: 0,
                slot,
            };
            let content_type = if params.feed == Feed::Sse {
                "text/event-stream"
            } else {
                "application/x-ndjson"
            };
            Ok(HttpResponse::Ok()
                .content_type(content_type)
                .insert_header((header::CACHE_CONTROL, "no-cache"))
                .insert_header(("x-accel-buffering", "no"))
                .insert_header(("x-dstore-version", version.to_string()))
                // Where the stream reads from (`since=now` resolved) and under which horizon: an
                // NDJSON follower has no event id, and reconnects from here before any change.
                .insert_header(("x-dstore-since", since.to_string()))
                .insert_header(("x-dstore-horizon", first.place.pass.to_string()))
                .streaming(futures::stream::unfold(stream, Stream::next)))
        }
    }
}

/// A `since` past every revision the project committed comes from another history (another
/// deployment, or this one before it was restored from a backup): waiting from it would pass over
/// every change up to it, so the follower starts over as after a compaction.
fn ahead(since: u64, head: u64) -> ApiError {
    ApiError::Gone(
        format!(
            "since {since} is past this project's last revision {head}: the revision comes from \
             another deployment, or from before this one was restored from a backup; read the feed \
             again from since=0, which gives the latest state of every item, and replace what you \
             hold of the project with it"
        ),
        0,
    )
}

/// How a long poll waits.
struct Waiting {
    /// The project's wake-ups, subscribed to before `head` was read.
    wake: watch::Receiver<u64>,
    /// The project's last revision when the poll came.
    head: u64,
    deadline: Instant,
    /// The client's connection, looked at while waiting.
    peer: Option<PeerSocket>,
}

/// The most pages of changes a long poll's follower does not see that it reads on through before
/// it answers (see `long_poll`).
const HIDDEN_PAGES: usize = 16;

/// Waits until there is a change after `since`, or the timeout passes; answers the page.
async fn long_poll(
    reader: &Reader<'_>,
    since: u64,
    horizon: Option<u64>,
    waiting: Waiting,
    mut recheck: Option<&mut Recheck>,
) -> Result<Arc<Encoded>, ApiError> {
    let state = reader.state;
    let mut wake = waiting.wake;
    let mut closing = state.closing.clone();
    let (mut since, mut horizon) = (since, horizon);
    let mut hidden_pages = 0;
    // One look-out for the client for the whole poll: made again at each wake-up, it never
    // looked while wake-ups came more often than it waits before its first look.
    let gone = PeerSocket::gone(waiting.peer);
    tokio::pin!(gone);
    loop {
        if let Some(recheck) = recheck.as_deref_mut() {
            recheck.check().await?;
        }
        let seen = (*wake.borrow_and_update()).max(waiting.head);
        let page = reader.page(since, horizon, seen).await?;
        horizon = Some(page.place.pass);
        if page.shown > 0 || Instant::now() >= waiting.deadline || *closing.borrow() {
            return Ok(page);
        }
        if page.place.last_revision > since {
            // Every change of the page was one the follower does not see (another blueprint's):
            // read on at once, letting other requests run between pages, unless nobody waits,
            // for at most `HIDDEN_PAGES`; then the empty page answers, its `last_revision` moved
            // (the client reads on from there): a small `limit` behind a long history the filter
            // hides would take a blocking thread for a page per change, back to back, up to the
            // poll's timeout.
            hidden_pages += 1;
            if hidden_pages >= HIDDEN_PAGES {
                return Ok(page);
            }
            since = page.place.last_revision;
            tokio::task::yield_now().await;
            if futures::FutureExt::now_or_never(gone.as_mut()).is_some() {
                return Ok(page);
            }
            continue;
        }
        tokio::select! {
            woken = wake.changed() => if woken.is_err() { return Ok(page) },
            // Read again now and then without a wake-up: in cluster mode other nodes' writes
            // wake followers through a poll that may fail for a while.
            _ = tokio::time::sleep(LONG_POLL_REREAD) => {}
            _ = tokio::time::sleep_until(waiting.deadline) => {}
            _ = closing.changed() => {}
            // Nobody reads the answer: end, giving the follower's place back.
            () = gone.as_mut() => return Ok(page),
        }
    }
}

/// A follower's stream: pages are read as the connection takes them.
struct Stream {
    state: State,
    follower: Follower,
    /// The key the stream was opened with, checked again as it runs.
    recheck: Option<Recheck>,
    since: u64,
    /// The pass `since` was handed out with (`feed::pass`).
    horizon: Option<u64>,
    /// The project's last revision when the stream began: every read sees at least that far.
    head: u64,
    format: Format,
    wake: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    heartbeat: Duration,
    /// When the next heartbeat is due: a heartbeat after the last frame handed out, however many
    /// wake-ups showed nothing since.
    next_heartbeat: Instant,
    deadline: Option<Instant>,
    /// Encoded frames of the page being sent.
    out: VecDeque<Bytes>,
    done: bool,
    /// Reads that failed in a row ([`STREAM_FAILURES`]).
    failures: u32,
    slot: Slot,
}

impl Stream {
    /// Ends the stream with why, in the body an error answer has (an `event: gone` in SSE).
    fn end(&mut self, status: u16, why: &str, horizon: Option<u64>) {
        let body = json!({
            "status": why,
            "code": status,
            "errors": [],
            "horizon": horizon,
        });
        self.out
            .push_back(Bytes::from(if self.format == Format::Sse {
                format!("event: gone\ndata: {body}\n\n")
            } else {
                format!("{body}\n")
            }));
        self.done = true;
    }

    /// What a stream sends when it has nothing to show: in SSE, the revision it read up to as
    /// the last event id (a reconnect then skips what a filter hid); in NDJSON an empty line.
    fn progress(&self) -> Bytes {
        if self.format == Format::Sse {
            Bytes::from(format!(
                "id: {}\n: heartbeat\n\n",
                EventId(self.since, self.horizon.unwrap_or(0))
            ))
        } else {
            Bytes::from_static(b"\n")
        }
    }

    async fn next(mut self) -> Option<(Result<Bytes, actix_web::Error>, Stream)> {
        self.slot.note(false);
        loop {
            if let Some(frame) = self.out.pop_front() {
                if frame.is_empty() {
                    continue;
                }
                self.slot.note(true);
                self.next_heartbeat = Instant::now() + self.heartbeat;
                return Some((Ok(frame), self));
            }
            let expired = self.deadline.is_some_and(|at| Instant::now() >= at);
            if self.done || expired || *self.closing.borrow() {
                return None;
            }
            if let Some(recheck) = self.recheck.as_mut() {
                if let Err(error) = recheck.check().await {
                    self.end(error.status_code().as_u16(), &error.to_string(), None);
                    continue;
                }
            }
            let seen = (*self.wake.borrow_and_update()).max(self.head);
            let reader = Reader {
                state: &self.state,
                follower: &self.follower,
                limits: (STREAM_PAGE, STREAM_BYTES),
                format: self.format,
                held: None,
            };
            match reader.page(self.since, self.horizon, seen).await {
                Ok(page) => {
                    self.failures = 0;
                    let moved = page.place.last_revision > self.since;
                    self.since = page.place.last_revision;
                    self.horizon = Some(page.place.pass);
                    if moved && page.shown == 0 {
                        // A page the follower saw none of (another blueprint's changes) still
                        // hands the connection a frame saying how far it read: the next page is
                        // read only once the connection took it, a client that left is noticed
                        // when it is written, and a reconnect skips what was read.
                        let progress = self.progress();
                        self.out.push_back(progress);
                        continue;
                    }
                    self.out.push_back(page.body.clone());
                    if moved {
                        continue;
                    }
                }
                Err(FeedError::Storage(error)) => {
                    self.failures += 1;
                    if self.failures >= STREAM_FAILURES {
                        tracing::warn!(%error, "the change feed cannot be read; a stream ends");
                        let why = format!(
                            "the change feed cannot be read ({error}); reconnect from the last \
                             event id"
                        );
                        self.end(503, &why, None);
                        continue;
                    }
                    tracing::debug!(%error, "the change feed cannot be read; retrying");
                    tokio::time::sleep(RETRY).await;
                    // Still a heartbeat when one is due: a client that left is noticed meanwhile.
                    if Instant::now() >= self.next_heartbeat {
                        let progress = self.progress();
                        self.out.push_back(progress);
                    }
                    continue;
                }
                Err(error) => {
                    // Compacted, or the project or version went away: say so, then end.
                    let (status, horizon) = match &error {
                        FeedError::Compacted { horizon } => (410, Some(*horizon)),
                        _ => (404, None),
                    };
                    self.end(status, &error.to_string(), horizon);
                    continue;
                }
            }
            // Nothing new: wait for a commit, a heartbeat, the end of the stream or the server.
            let deadline = self.deadline;
            tokio::select! {
                woken = self.wake.changed() => self.done = woken.is_err(),
                _ = tokio::time::sleep_until(self.next_heartbeat) => {
                    // Everything up to `since` was sent or filtered out: in SSE the heartbeat
                    // moves the last event id there, so a reconnect skips what the filter hid.
                    let progress = self.progress();
                    self.out.push_back(progress);
                }
                _ = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.done = true,
                _ = self.closing.changed() => self.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Followers, PeerSocket, Slot};

    /// A stream that ends after a new stream on a socket of the same number listed itself leaves
    /// the new stream's entry (which sweeps and stops still need), and gives back its own place.
    #[test]
    fn a_stream_ending_late_leaves_the_entry_of_the_next_stream_on_its_socket() {
        let followers = Arc::new(Followers::default());
        let slot = || {
            followers.count.fetch_add(1, Ordering::AcqRel);
            Slot {
                followers: followers.clone(),
                stream: None,
                key: None,
            }
        };
        let heartbeat = Duration::from_secs(15);
        let old = slot().streaming(Some(PeerSocket(7)), heartbeat);
        let new = slot().streaming(Some(PeerSocket(7)), heartbeat);
        drop(old);
        assert_eq!(followers.count.load(Ordering::Acquire), 1);
        assert!(
            followers.streams().contains_key(&7),
            "the new stream is listed"
        );
        drop(new);
        assert!(followers.streams().is_empty());
        assert_eq!(followers.count.load(Ordering::Acquire), 0);
    }
}
