//! The audit log: every request that changes something and every key change, with who did it.
//!
//! Entries are appended in the background in batches (one storage write per batch, never one per
//! request; a batch that is not full waits 5 ms for more, so an entry reaches the log a few
//! milliseconds after its request answered) and kept for `auth.audit_retention_days`; older ones
//! are removed once an hour. The queue is bounded: when the storage cannot keep up, requests wait
//! for room rather than entries being dropped, for up to [`ROOM_WAIT`]. A queue still full past
//! that means the storage fails (a full disk): requests then answer without waiting, and the
//! entries they would have added are counted, in one entry written once the log takes entries
//! again, since a log that cannot be written must not stop every request that changes something.
//!
//! A refused request (no valid key, a key without the action or the project, a cross-site write)
//! costs its sender nothing, so refusals, and requests to routes that only read (a `POST` to
//! `_changes` answered 404 or 405), are recorded one by one only up to [`UNVOUCHED_PER_SECOND`] a
//! second; past it, one entry per second counts the rest. Requests that carried a valid key have
//! a window of their own: a flood without a key never hides what a key was refused. A client
//! without a key, or with one that may only read, can then add at most a few kilobytes a second
//! to the log, however fast it sends. With the embedded backend the log is not written while the journal's disk is nearly
//! full (`journal::disk`): its entries wait in the queue, then are counted, so the room the
//! journal keeps to restart is not used up by the log of refused writes.
//!
//! The embedded storage keeps each entry in a compact binary form ([`AuditEntry::encode`]): a tag
//! byte that a JSON object never starts with, the time and status as integers, then each text
//! length-prefixed. Serializing entries as JSON was a tenth of the CPU of a PUT (counted with
//! callgrind; docs/performance.md); entries written as JSON before still read ([`AuditEntry::decode`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::storage::SharedStorage;

/// Entries written at once, at most.
const BATCH: usize = 500;
/// How long the writer lets entries gather before a batch that is not full.
const LINGER: Duration = Duration::from_millis(5);

/// How long a request waits for room in a full queue before its entry is counted instead.
const ROOM_WAIT: Duration = Duration::from_secs(2);

/// Refusals of requests without a valid key recorded one by one in a second, at most; the rest of
/// that second's are counted in one entry (see the module's documentation).
pub const UNVOUCHED_PER_SECOND: u32 = 10;

/// Most bytes of a request's path, or of the project it names, an entry keeps; longer ones are cut
/// and end in `…`. Refused requests are recorded too, so a client without a key must not be able
/// to fill the disk, or `/_audit`'s pages, with long paths.
pub const MAX_PATH_BYTES: usize = 512;

/// Most bytes of the path, or the project, of an entry recorded within [`UNVOUCHED_PER_SECOND`]:
/// those a client without a key chooses are kept shorter (about 300 bytes an entry, a few
/// kilobytes a second at most).
const UNVOUCHED_PATH_BYTES: usize = 128;

/// A request's path as an entry keeps it: a segment holding a secret (an API key pasted whole,
/// `DELETE /_keys/dstore_<id>_<secret>`, however it is spelled: percent-escaped, in capitals,
/// without its prefix) keeps everything but the secret, since the log is read by others than the
/// key's holder; then [`clip`]ped. A secret is 64 hex digits: a segment read with its escapes
/// decoded loses every run of at least [`SECRET_RUN`] of them.
///
/// Under `/_keys/`, a segment where a key id belongs that is not one is kept as `…`, with the rest
/// of the path: a master key (of any characters an operator chose, `/` among them) pasted there
/// would be kept whole otherwise.
pub fn path_of(path: &str) -> String {
    let not_an_id = not_a_key_id_at(path);
    if !may_hold_a_secret(path) && not_an_id.is_none() {
        return clip(path);
    }
    let mut kept = String::with_capacity(path.len());
    for (n, segment) in path.split('/').enumerate() {
        if n > 0 {
            kept.push('/');
        }
        match hex_runs_cut(&percent_decoded(segment)) {
            Some(cut) => kept.push_str(&cut),
            // The rest of the path too: a key may hold `/`.
            None if Some(n) == not_an_id => {
                kept.push('…');
                break;
            }
            None => kept.push_str(segment),
        }
    }
    clip(&kept)
}

/// Where in `path` (the index of its segment split at `/`) a key id belongs and something else
/// is, under `/_keys/` however it is escaped.
fn not_a_key_id_at(path: &str) -> Option<usize> {
    let mut segments = path.split('/');
    let (Some(""), Some(keys), Some(id)) = (segments.next(), segments.next(), segments.next())
    else {
        return None;
    };
    let named = percent_decoded(id);
    (percent_decoded(keys) == "_keys" && !named.is_empty() && !super::is_key_id(&named))
        .then_some(2)
}

/// Whether a path as sent may hold a secret. Decoding only shortens: a run of hex digits that
/// long, decoded, was at least as long a run of hex digits and `%` as sent. Most paths have none,
/// and are kept without a look further.
fn may_hold_a_secret(path: &str) -> bool {
    let mut run = 0;
    path.bytes().any(|b| {
        run = if b.is_ascii_hexdigit() || b == b'%' {
            run + 1
        } else {
            0
        };
        run >= SECRET_RUN
    })
}

/// A request's path as the process log shows it: as sent, or, when it may hold a secret, as
/// the audit log keeps it ([`path_of`]); formatted only when a log line is written.
pub struct Logged<'a>(pub &'a str);

impl std::fmt::Display for Logged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if may_hold_a_secret(self.0) || not_a_key_id_at(self.0).is_some() {
            f.write_str(&path_of(self.0))
        } else {
            f.write_str(self.0)
        }
    }
}

/// Hex digits in a row from which a path's segment is taken to hold a secret: a key's secret has
/// 64, an item's id (a UUID) at most 32 in a row.
const SECRET_RUN: usize = 40;

/// `text` with its `%XX` escapes decoded (others kept as they are), as lossy UTF-8.
fn percent_decoded(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('%') {
        return text.into();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

/// `text` with every run of at least [`SECRET_RUN`] hex digits replaced by `…`; `None` when it
/// has none.
fn hex_runs_cut(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut run = 0;
    let mut cut = false;
    for (at, c) in text.char_indices() {
        if c.is_ascii_hexdigit() {
            run += 1;
            continue;
        }
        cut |= push_run(&mut out, &text[at - run..at]);
        run = 0;
        out.push(c);
    }
    cut |= push_run(&mut out, &text[text.len() - run..]);
    cut.then_some(out)
}

/// Pushes a run of hex digits, or `…` in its place when it is long enough to be a secret; answers
/// which.
fn push_run(out: &mut String, run: &str) -> bool {
    let secret = run.len() >= SECRET_RUN;
    out.push_str(if secret { "…" } else { run });
    secret
}

/// At most [`MAX_PATH_BYTES`] of `text`, cut at a character boundary, with the characters a
/// reader's terminal or viewer would act on instead of showing ([`hidden`]) written as `\u{…}`:
/// a path is read with its escapes decoded, so a client without a key could otherwise put an
/// escape sequence or a right-to-left override into the log.
pub fn clip(text: &str) -> String {
    let cut = cut(text, MAX_PATH_BYTES);
    let mut kept = String::with_capacity(cut.len() + 3);
    for c in cut.chars() {
        if hidden(c) {
            kept.extend(c.escape_unicode());
        } else {
            kept.push(c);
        }
    }
    if cut.len() < text.len() {
        kept.push('…');
    }
    kept
}

/// The start of `text` of at most `max` bytes, ending at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut at = max.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    &text[..at]
}

/// `text` cut to at most `max` bytes at a character boundary, ending in `…` when it was cut.
pub fn shortened(text: String, max: usize) -> String {
    match cut(&text, max) {
        whole if whole.len() == text.len() => text,
        start => format!("{start}…"),
    }
}

/// Control characters (C0, DEL, C1) and the invisible ones that reorder or hide text (bidi
/// controls, zero-width characters, the byte order mark).
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}' | '\u{061c}')
}

/// A text of an entry that is most often one of a few fixed ones (`-`, `open`, `items.write`,
/// `PUT`): those are borrowed, not allocated, for every request that changes something.
pub type Text = std::borrow::Cow<'static, str>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// The API key's id, `master`, or `-` when authentication is off.
    pub key_id: Text,
    pub key_name: Text,
    /// The action the route needs (`items.write` …).
    pub action: Text,
    pub project: Option<String>,
    pub method: Text,
    pub path: String,
    pub status: u16,
    /// The id of what the request made where its path cannot name it: a new API key's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// The first byte of an entry in the binary form; a JSON entry starts with `{`.
const BINARY: u8 = 1;

impl AuditEntry {
    /// The entry in the compact form [`AuditEntry::decode`] reads: `BINARY`, the time in
    /// microseconds since the epoch (i64, big-endian), the status (u16), whether a project
    /// follows (one byte), then `key_id`, `key_name`, `action`, the project when there is one,
    /// `method`, `path` and `created` when there is one, each as a u32 length (big-endian) and
    /// its UTF-8 bytes. An entry without `created` ends after `path`, as entries written before
    /// there was one do.
    pub fn encode(&self) -> Vec<u8> {
        let texts = [
            Some(&*self.key_id),
            Some(&*self.key_name),
            Some(&*self.action),
            self.project.as_deref(),
            Some(&*self.method),
            Some(self.path.as_str()),
            self.created.as_deref(),
        ];
        let size = 12 + texts.iter().flatten().map(|t| 4 + t.len()).sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.push(BINARY);
        out.extend_from_slice(&self.at.timestamp_micros().to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.push(u8::from(self.project.is_some()));
        for text in texts.into_iter().flatten() {
            // A text is at most a request's URL or a key's name, far below 4 GiB.
            let length = u32::try_from(text.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&text.as_bytes()[..length as usize]);
        }
        out
    }

    /// An entry [`AuditEntry::encode`] wrote, or one written as JSON; `None` when it is neither.
    pub fn decode(bytes: &[u8]) -> Option<AuditEntry> {
        let Some((&BINARY, rest)) = bytes.split_first() else {
            return serde_json::from_slice(bytes).ok();
        };
        let (micros, rest) = rest.split_first_chunk::<8>()?;
        let (status, rest) = rest.split_first_chunk::<2>()?;
        let (&has_project, mut rest) = rest.split_first()?;
        let mut text = || -> Option<String> {
            let (length, tail) = rest.split_first_chunk::<4>()?;
            let length = u32::from_be_bytes(*length) as usize;
            let value = std::str::from_utf8(tail.get(..length)?).ok()?.to_string();
            rest = &tail[length..];
            Some(value)
        };
        let (key_id, key_name, action) = (text()?.into(), text()?.into(), text()?.into());
        let project = if has_project == 1 {
            Some(text()?)
        } else {
            None
        };
        let (method, path) = (text()?.into(), text()?);
        let created = text();
        Some(AuditEntry {
            at: DateTime::from_timestamp_micros(i64::from_be_bytes(*micros))?,
            key_id,
            key_name,
            action,
            project,
            method,
            path,
            status: u16::from_be_bytes(*status),
            created,
        })
    }
}

/// Where handlers send audit entries.
#[derive(Clone)]
pub struct AuditLog {
    sender: mpsc::Sender<AuditEntry>,
    /// The windows of requests without a valid key (`0`) and with one (`1`).
    unvouched: Arc<[Mutex<Unvouched>; 2]>,
    lost: Arc<Mutex<Lost>>,
}

impl AuditLog {
    /// Starts the writer of `storage`'s audit log, keeping `retention`.
    pub fn start(storage: SharedStorage, retention: Duration) -> AuditLog {
        let (sender, receiver) = mpsc::channel(10_000);
        tokio::spawn(write(storage.clone(), receiver));
        tokio::spawn(prune(Arc::downgrade(&storage), retention));
        AuditLog::feeding(sender)
    }

    /// The log that queues into `sender`, with its task that counts what is not recorded.
    fn feeding(sender: mpsc::Sender<AuditEntry>) -> AuditLog {
        let unvouched = Arc::new([Mutex::default(), Mutex::default()]);
        let lost = Arc::new(Mutex::new(Lost::default()));
        tokio::spawn(count_unrecorded(
            sender.downgrade(),
            unvouched.clone(),
            lost.clone(),
        ));
        AuditLog {
            sender,
            unvouched,
            lost,
        }
    }

    /// Queues an entry: waits for room up to [`ROOM_WAIT`], then, and while the queue stays
    /// full, counts it instead (see the module's documentation).
    pub async fn record(&self, entry: AuditEntry) {
        let entry = match self.sender.try_send(entry) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(entry)) => entry,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        };
        let stalled = self.lost.lock().unwrap_or_else(|e| e.into_inner()).count > 0;
        let entry = if stalled {
            entry
        } else {
            match self.sender.send_timeout(entry, ROOM_WAIT).await {
                Ok(()) => return,
                Err(mpsc::error::SendTimeoutError::Timeout(entry)) => entry,
                Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
            }
        };
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count(entry);
    }

    /// Queues an entry without waiting (from where nothing can wait: a dropped request's
    /// entry, `http::auth`); counted instead when the queue is full.
    pub fn record_now(&self, entry: AuditEntry) {
        if let Err(mpsc::error::TrySendError::Full(entry)) = self.sender.try_send(entry) {
            self.lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .count(entry);
        }
    }

    /// Records a request refused before any key was accepted, within [`UNVOUCHED_PER_SECOND`];
    /// past it, the refusal is only counted.
    pub async fn record_unvouched(&self, mut entry: AuditEntry) {
        entry.path = shortened(entry.path, UNVOUCHED_PATH_BYTES);
        entry.project = entry.project.map(|p| shortened(p, UNVOUCHED_PATH_BYTES));
        let (count, record) = {
            // A known key's id, or `-`: without a valid key.
            let keyed = usize::from(&*entry.key_id != "-");
            let mut window = self.unvouched[keyed]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let count = window.close_before(entry.at.timestamp());
            let record = window.admits(&entry);
            (count, record)
        };
        if let Some(count) = count {
            self.record(count).await;
        }
        if record {
            self.record(entry).await;
        }
    }
}

/// This second's refusals of requests without a valid key.
#[derive(Default)]
struct Unvouched {
    /// The second (Unix time) counted.
    second: i64,
    recorded: u32,
    /// Refused past the limit, with the last of them.
    unrecorded: u64,
    last: Option<AuditEntry>,
}

impl Unvouched {
    /// Whether `entry` is recorded on its own; if not, it is counted.
    fn admits(&mut self, entry: &AuditEntry) -> bool {
        if self.recorded < UNVOUCHED_PER_SECOND {
            self.recorded += 1;
            return true;
        }
        self.unrecorded += 1;
        self.last = Some(entry.clone());
        false
    }

    /// Starts counting `second` if the window counts an earlier one, with the entry that counts
    /// what that one left unrecorded, if anything.
    fn close_before(&mut self, second: i64) -> Option<AuditEntry> {
        if second <= self.second {
            return None;
        }
        let closed = std::mem::replace(
            self,
            Unvouched {
                second,
                ..Unvouched::default()
            },
        );
        let last = closed.last?;
        // Counted requests may come from many clients and keys: the entry is no one's.
        Some(AuditEntry {
            at: last.at,
            key_id: "-".into(),
            key_name: "refused or without a key".into(),
            action: "-".into(),
            project: None,
            method: "-".into(),
            path: format!(
                "{} more requests without a valid key, refused, or to routes that only read, in this second (the last: {} {} by {}); they are counted, not recorded one by one",
                closed.unrecorded, last.method, last.path, last.key_id
            ),
            status: last.status,
            created: None,
        })
    }
}

/// Entries counted instead of queued while the queue stayed full (see the module's documentation).
#[derive(Default)]
struct Lost {
    count: u64,
    first: Option<DateTime<Utc>>,
    last: Option<AuditEntry>,
}

impl Lost {
    fn count(&mut self, entry: AuditEntry) {
        self.count += 1;
        self.first.get_or_insert(entry.at);
        self.last = Some(entry);
    }

    /// The entry that says what was lost, if anything was.
    fn entry(&self) -> Option<AuditEntry> {
        let last = self.last.as_ref()?;
        let first = self.first.unwrap_or(last.at);
        Some(AuditEntry {
            at: last.at,
            key_id: "-".into(),
            key_name: "audit log".into(),
            action: "-".into(),
            project: None,
            method: "-".into(),
            path: format!(
                "{} entries of requests answered from {} to {} are not in the log: it could not be \
                 written (its storage failing, a full disk?) and its queue was full (the last: {} {} by {})",
                self.count,
                first.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                last.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                last.method,
                last.path,
                last.key_id,
            ),
            status: last.status,
            created: None,
        })
    }
}

/// Once a second: writes the count of the last second's unrecorded refusals, even when no other
/// refusal comes to close it, and the count of lost entries once the queue takes entries again.
async fn count_unrecorded(
    sender: mpsc::WeakSender<AuditEntry>,
    windows: Arc<[Mutex<Unvouched>; 2]>,
    lost: Arc<Mutex<Lost>>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(sender) = sender.upgrade() else {
            return;
        };
        let now = Utc::now().timestamp();
        for window in windows.iter() {
            let count = window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .close_before(now);
            if let Some(count) = count {
                let _ = sender.send(count).await;
            }
        }
        let mut lost = lost.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = lost.entry() {
            if sender.try_send(entry).is_ok() {
                tracing::warn!(
                    entries = lost.count,
                    "audit entries were lost while the audit log could not be written"
                );
                *lost = Lost::default();
            }
        }
    }
}

/// Writes the queued entries in batches, the last ones too when the service stops. While a batch
/// cannot be written (a nearly full disk) it holds the storage only when it tries again, so it does
/// not keep a stopped service's storage open.
async fn write(mut storage: SharedStorage, mut receiver: mpsc::Receiver<AuditEntry>) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        if receiver.len() < BATCH {
            // Under load entries come one per request: a moment's wait makes one storage write of
            // many instead of one of a few.
            tokio::time::sleep(LINGER).await;
        }
        while batch.len() < BATCH {
            match receiver.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
        // The storage may be away for a moment: keep the entries and try again.
        let mut attempt = 0;
        while let Err(error) = storage.append_audit(&batch).await {
            tracing::warn!(%error, entries = batch.len(), "cannot write the audit log; retrying");
            let waiting = Arc::downgrade(&storage);
            drop(storage);
            tokio::time::sleep(crate::projector::backoff(attempt)).await;
            storage = match waiting.upgrade() {
                Some(storage) => storage,
                None => return,
            };
            attempt += 1;
        }
    }
}

async fn prune(storage: std::sync::Weak<dyn crate::storage::Storage>, retention: Duration) {
    loop {
        let Some(storage) = storage.upgrade() else {
            return;
        };
        let before = Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
        match storage.prune_audit(before).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "old audit entries removed"),
            Err(error) => tracing::warn!(%error, "cannot prune the audit log"),
        }
        drop(storage);
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(project: Option<&str>) -> AuditEntry {
        AuditEntry {
            at: DateTime::from_timestamp_micros(1_764_739_200_123_456).unwrap(),
            key_id: "k_1".into(),
            key_name: "deploy \"bot\" ünïcode\u{0}".into(),
            action: "items.write".into(),
            project: project.map(Into::into),
            method: "PUT".into(),
            path: "/bench/article/0193c0de-0000-7000-8000-000000000001".into(),
            status: 200,
            created: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_log_that_cannot_be_written_counts_entries_instead_of_holding_requests() {
        let (sender, mut queue) = mpsc::channel(2);
        let log = AuditLog::feeding(sender);
        log.record(entry(Some("a"))).await;
        log.record(entry(Some("b"))).await;
        // The queue is full and nothing takes from it (the storage fails): a request waits for
        // room a while, then its entry is counted; the next ones do not wait at all.
        let held = |project| tokio::time::timeout(ROOM_WAIT * 2, log.record(entry(Some(project))));
        let start = tokio::time::Instant::now();
        held("c").await.expect("the request is not held");
        assert_eq!(start.elapsed(), ROOM_WAIT);
        let start = tokio::time::Instant::now();
        held("d").await.expect("the request is not held");
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Once the log takes entries again, one says how many are missing.
        assert_eq!(queue.recv().await.unwrap().project.as_deref(), Some("a"));
        assert_eq!(queue.recv().await.unwrap().project.as_deref(), Some("b"));
        let counted = queue.recv().await.unwrap();
        assert!(
            counted
                .path
                .starts_with("2 entries of requests answered from"),
            "{}",
            counted.path
        );
        log.record(entry(Some("e"))).await;
        assert_eq!(queue.recv().await.unwrap().project.as_deref(), Some("e"));
    }

    #[test]
    fn entries_read_back_as_written_with_and_without_a_project() {
        for project in [Some("bench"), Some(""), None] {
            let mut entry = entry(project);
            assert_eq!(AuditEntry::decode(&entry.encode()), Some(entry.clone()));
            entry.created = Some("k_new".into());
            assert_eq!(AuditEntry::decode(&entry.encode()), Some(entry));
        }
    }

    #[test]
    fn a_long_path_is_cut_at_a_character_boundary() {
        assert_eq!(clip("/p/_project"), "/p/_project");
        let long = format!("/{}", "é".repeat(MAX_PATH_BYTES));
        let cut = clip(&long);
        assert!(
            cut.len() <= MAX_PATH_BYTES + '…'.len_utf8(),
            "{}",
            cut.len()
        );
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
    }

    /// A key pasted whole into a path, however it is spelled, keeps everything but its secret;
    /// other paths stay as sent.
    #[test]
    fn a_whole_key_in_a_path_keeps_its_id_alone() {
        let secret = "ab".repeat(32);
        for (path, kept) in [
            (
                format!("/_keys/dstore_0123456789abcdef_{secret}/_rotate"),
                "/_keys/dstore_0123456789abcdef_…/_rotate",
            ),
            (
                format!("/_keys/dstore%5F0123456789abcdef%5F{secret}"),
                "/_keys/dstore_0123456789abcdef_…",
            ),
            (
                format!(
                    "/_keys/DSTORE_0123456789ABCDEF_{}%00",
                    secret.to_uppercase()
                ),
                "/_keys/DSTORE_0123456789ABCDEF_…\\u{0}",
            ),
            (
                format!("/_keys/0123456789abcdef_{secret}%20"),
                "/_keys/0123456789abcdef_… ",
            ),
            (
                format!("/p/a/{}%61{}", &secret[..30], &secret[30..]),
                "/p/a/…",
            ),
            // A master key an operator chose, where a key id belongs.
            ("/_keys/Password1234567!x".to_string(), "/_keys/…"),
            (
                "/%5Fkeys/Pass/word%211234567x/_rotate".to_string(),
                "/%5Fkeys/…",
            ),
        ] {
            let said = path_of(&path);
            assert_eq!(said, kept, "{path}");
            assert!(!said.to_lowercase().contains(&secret[..40]), "{said}");
        }
        for plain in [
            "/_keys/0123456789abcdef",
            "/p/dstore_thing/x",
            "/dstore_1_2",
            "/p/article/0b8f6a3e-5f5e-4a51-9d39-6a2c8e0f1b2c",
            "/p/article/0b8f6a3e5f5e4a519d396a2c8e0f1b2c",
            "/p/a%2Fb",
        ] {
            assert_eq!(path_of(plain), plain);
        }
    }

    /// Characters a terminal acts on, or that reorder text, are kept escaped: a client without a
    /// key chooses the project and path of its refusals' entries.
    #[test]
    fn control_and_bidi_characters_are_kept_escaped() {
        assert_eq!(
            clip("\u{1b}]0;pwned\u{7}\u{202e}golb\u{9b}"),
            "\\u{1b}]0;pwned\\u{7}\\u{202e}golb\\u{9b}"
        );
        assert_eq!(clip("blog/é/日本"), "blog/é/日本");
    }

    /// The process log shows a path as sent, but a key pasted whole into it loses its secret there
    /// too.
    #[test]
    fn the_process_log_shows_a_path_without_a_pasted_secret() {
        let secret = "ab".repeat(32);
        let path = format!("/_keys/dstore_0123456789abcdef_{secret}");
        assert_eq!(
            Logged(&path).to_string(),
            "/_keys/dstore_0123456789abcdef_…"
        );
        let plain = "/p/article/0b8f6a3e5f5e4a519d396a2c8e0f1b2c?x=%41";
        assert_eq!(Logged(plain).to_string(), plain);
    }

    /// Past the limit in a second, refusals are counted in one entry, written once the second is
    /// over; the next second records one by one again.
    #[test]
    fn refusals_without_a_key_past_the_limit_are_counted_not_recorded() {
        let mut window = Unvouched::default();
        let refused = |second: i64| AuditEntry {
            at: DateTime::from_timestamp(second, 0).unwrap(),
            key_id: "-".into(),
            key_name: "no valid key".into(),
            status: 401,
            ..entry(None)
        };
        assert!(window.close_before(100).is_none());
        let admitted = (0..25).filter(|_| window.admits(&refused(100))).count();
        assert_eq!(admitted, UNVOUCHED_PER_SECOND as usize);
        assert!(window.close_before(100).is_none(), "the same second");
        let count = window.close_before(101).expect("a count of the rest");
        assert!(count
            .path
            .starts_with("15 more requests without a valid key"));
        assert!(count.path.contains("PUT /bench/article/"), "{}", count.path);
        assert_eq!((count.status, count.at.timestamp()), (401, 100));
        assert!(window.admits(&refused(101)), "a new second records again");
        assert!(window.close_before(102).is_none(), "nothing unrecorded");
    }

    /// Requests that carried a valid key have a window of their own: a flood without a key does
    /// not leave a key's refusal only counted (it drowned in the same ten a second).
    #[tokio::test]
    async fn a_flood_without_a_key_does_not_hide_a_keys_refusal() {
        let (sender, mut queue) = mpsc::channel(100);
        let log = AuditLog::feeding(sender);
        let at = Utc::now();
        for _ in 0..UNVOUCHED_PER_SECOND + 5 {
            let anonymous = AuditEntry {
                at,
                key_id: "-".into(),
                status: 401,
                ..entry(None)
            };
            log.record_unvouched(anonymous).await;
        }
        let keyed = AuditEntry {
            at,
            status: 403,
            ..entry(Some("bench"))
        };
        log.record_unvouched(keyed).await;
        let mut recorded = Vec::new();
        while let Ok(entry) = queue.try_recv() {
            // (A count of an earlier second, should the clock have turned meanwhile.)
            if !entry.path.contains("more requests") {
                recorded.push(entry);
            }
        }
        assert_eq!(recorded.len(), UNVOUCHED_PER_SECOND as usize + 1);
        assert!(recorded
            .iter()
            .any(|e| e.key_id == "k_1" && e.status == 403));
    }

    /// What a client without a key chooses (the path, the project it names) is kept shorter.
    #[tokio::test]
    async fn refusals_keep_a_shorter_path_and_project() {
        let (sender, mut queue) = mpsc::channel(2);
        let log = AuditLog::feeding(sender);
        let long = "é".repeat(300);
        let refused = AuditEntry {
            path: format!("/{long}"),
            project: Some(long.clone()),
            ..entry(None)
        };
        log.record_unvouched(refused).await;
        let kept = queue.recv().await.unwrap();
        for text in [kept.path, kept.project.unwrap()] {
            assert!(text.len() <= UNVOUCHED_PATH_BYTES + 3, "{text}");
            assert!(text.ends_with('…'), "{text}");
        }
    }

    #[test]
    fn entries_written_as_json_before_still_read() {
        let entry = entry(Some("bench"));
        let json = serde_json::to_vec(&entry).unwrap();
        assert_eq!(AuditEntry::decode(&json), Some(entry));
    }

    #[test]
    fn a_cut_or_damaged_entry_is_refused_not_misread() {
        let bytes = entry(Some("bench")).encode();
        for end in 0..bytes.len() {
            assert_eq!(AuditEntry::decode(&bytes[..end]), None, "cut at {end}");
        }
        let mut longer = bytes.clone();
        longer[14] = 0xff; // the first text's length, far beyond the entry
        assert_eq!(AuditEntry::decode(&longer), None);
    }
}
