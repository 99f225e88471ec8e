//! API keys: made, changed, rotated and revoked through the storage (so every node of a cluster
//! sees them), and checked against a cache each node keeps.
//!
//! The cache is read again every couple of seconds and whenever the storage holds a key the cache
//! does not (its id is unknown here, or its secret does not match but the stored one's does), so a
//! key revoked through another node takes effect within that time, and one made or rotated there
//! at once (and at once on the node that made the change). A read is installed with the changes
//! this node made while it ran made again on it, so a node busy changing keys still installs what
//! others changed. A token the cache does not accept costs one read of that one key; a read of all
//! of them follows only when the storage accepts it, shared and at most [`MISS_INTERVAL`] apart, so
//! made-up tokens cost what any request costs, however many keys there are. `last_used_at` is
//! written at most once a minute per key and node: a key's use never costs a write per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Utc};
use serde::Deserialize;

use super::{
    is_master_key, random_hex, split_key, Action, ApiKey, Caller, PreviousSecret, ProjectPattern,
    SecretKind,
};
use crate::blueprint::FieldError;
use crate::config::Secret;
use crate::storage::{KeyReplaced, SharedStorage, StorageError};

/// How often a node reads the keys again.
const REFRESH: Duration = Duration::from_secs(2);
/// The least time between two reads of the keys for unknown key ids.
const MISS_INTERVAL: Duration = Duration::from_millis(250);
/// How often a key's last use is written.
const USE_RESOLUTION: Duration = Duration::from_secs(60);
/// Most project patterns one key names: every request of the key is checked against them, and
/// every node keeps every key in memory and reads them all every [`REFRESH`] (10,000 keys of 1000
/// patterns were a gigabyte on each node). A key made with more before keeps them.
pub const MAX_PROJECT_PATTERNS: usize = 100;
/// How long a node goes on accepting API keys without a successful read of the stored ones: past
/// it, a key revoked through another node could be accepted here for ever, so API keys answer 503
/// until a read succeeds (the master keys, which are not stored, still work).
const KEYS_STALE: Duration = Duration::from_secs(30);
/// Most changes a node keeps of its copy of the keys (they are kept [`EDITS_KEPT`]): past it the
/// oldest go, and a read of the stored keys started before them is made again.
const MAX_EDITS_KEPT: usize = 10_000;
/// How many times a key change is made again from the stored key when other changes keep coming
/// first.
const CHANGE_TRIES: usize = 8;
/// Most keys a store holds (revoked ones are gone).
pub const MAX_KEYS: usize = 10_000;

/// Why a request is not authenticated (401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this request needs an API key: send Authorization: Bearer <key>")]
    Missing,
    #[error("the API key is not valid (unknown, revoked or mistyped)")]
    Unknown,
    #[error("the API key expired at {0}")]
    Expired(DateTime<Utc>),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Keys that could not be read for a request: the storage's words (a database user, a host, a
/// file's path) are logged, not answered to a caller who has proved nothing yet.
fn unreadable(error: StorageError) -> AuthError {
    tracing::warn!(%error, "cannot read the API keys for a request");
    AuthError::Storage(StorageError::Unavailable(
        "the API keys cannot be read now (the storage fails: see the server's log); try again \
         shortly"
            .into(),
    ))
}

/// No key has the id `id`: named in the answer when it has the form of an id, never otherwise
/// (a key pasted whole in its place would show its secret).
fn not_found(id: &str) -> KeyError {
    KeyError::NotFound(match super::is_key_id(id) {
        true => format!("{id:?}"),
        false => "with this id (an id is 16 hex digits, the part of a key after `dstore_`)".into(),
    })
}

/// Why a key change is refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key")]
    Invalid(Vec<FieldError>),
    #[error("key {0} does not exist")]
    NotFound(String),
    /// The caller may not grant, or change a key holding, an action it does not hold itself.
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What a client may say when making or changing a key.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyInput {
    pub name: Option<String>,
    pub description: Option<String>,
    pub actions: Option<Vec<String>>,
    pub projects: Option<Vec<String>>,
    /// RFC 3339, or null for never.
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
}

/// Tells a field that is absent (`None`) from one that is null (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// How long a node keeps the changes it made to its copy of the keys: longer than a read of the keys
/// takes.
const EDITS_KEPT: Duration = Duration::from_secs(60);

/// A change a node made to its copy of the keys.
enum Edit {
    /// A key made (`was` none) or changed from `was`.
    Put {
        key: Box<ApiKey>,
        was: Option<Box<ApiKey>>,
    },
    Remove(String),
}

impl Edit {
    fn apply(&self, keys: &mut HashMap<String, ApiKey>) {
        match self {
            // A change of a key this node's copy no longer holds was overtaken by its revocation
            // (a delete that waited for the change's row lock, then noted first): not brought back.
            Edit::Put { key, was: Some(_) } if !keys.contains_key(&key.id) => {}
            Edit::Put { key, .. } => {
                keys.insert(key.id.clone(), (**key).clone());
            }
            Edit::Remove(id) => {
                keys.remove(id);
            }
        }
    }

    /// Makes the change again on a read of the stored keys that may have missed it: a revocation
    /// always (an id is never used again), a key made or changed only while the read holds what
    /// it was made from, so what another node changed since (a narrowing, a revocation) stays.
    fn replay(&self, keys: &mut HashMap<String, ApiKey>) {
        if let Edit::Put { key, was } = self {
            let read = keys.get(&key.id);
            let missed = match (was, read) {
                (None, None) => true,
                (Some(was), Some(read)) => read.same_apart_from_use(was),
                _ => false,
            };
            if !missed {
                return;
            }
        }
        self.apply(keys);
    }
}

/// Where a read of the stored keys started: the next edit's number, and the read's own.
#[derive(Clone, Copy)]
struct ReadStart {
    before: u64,
    read: u64,
}

/// The changes a node made to its copy of the keys in the last [`EDITS_KEPT`], numbered.
#[derive(Default)]
struct Edits {
    /// The number the next change gets.
    next: u64,
    /// Every change numbered from `forgotten` on, with when it was made.
    log: std::collections::VecDeque<(u64, Instant, Edit)>,
    /// Changes numbered below this one are no longer kept.
    forgotten: u64,
    /// Reads of the stored keys started, and the number of the last one installed: an older read
    /// finishing after a newer one is not installed over it.
    reads: u64,
    installed: u64,
}

impl Edits {
    fn forget_older(&mut self, than: Instant) {
        while self.log.front().is_some_and(|(_, at, _)| *at < than) {
            if let Some((seq, _, _)) = self.log.pop_front() {
                self.forgotten = seq + 1;
            }
        }
    }
}

pub struct KeyStore {
    storage: SharedStorage,
    /// The master keys' digests, made once.
    master_digests: Vec<String>,
    keys: RwLock<HashMap<String, ApiKey>>,
    /// Changes this node made to `keys` (made, changed, revoked) lately: a read of the stored keys
    /// that one happened during is installed with it made again, or it would bring back what was
    /// revoked meanwhile.
    edits: Mutex<Edits>,
    /// Uses of keys not written yet, by key id.
    used: Mutex<HashMap<String, DateTime<Utc>>>,
    /// When the last read for an unknown key id started; held while one runs, so the requests
    /// that wait share the next read.
    last_miss: tokio::sync::Mutex<Option<Instant>>,
    /// How many reads of the keys were made for unknown key ids (a metric).
    miss_reads: std::sync::atomic::AtomicU64,
    /// When the last read of the stored keys that was installed started ([`KEYS_STALE`]).
    read_at: Mutex<Instant>,
}

impl KeyStore {
    /// Loads the keys and keeps them fresh in the background.
    pub async fn open(
        storage: SharedStorage,
        master_keys: Vec<Secret>,
    ) -> Result<Arc<KeyStore>, StorageError> {
        let store = Arc::new(KeyStore {
            storage,
            master_digests: master_keys
                .iter()
                .map(|k| super::digest(k.expose()))
                .collect(),
            keys: RwLock::new(HashMap::new()),
            edits: Mutex::new(Edits::default()),
            used: Mutex::new(HashMap::new()),
            last_miss: tokio::sync::Mutex::new(None),
            miss_reads: std::sync::atomic::AtomicU64::new(0),
            read_at: Mutex::new(Instant::now()),
        });
        store.reload().await?;
        tokio::spawn(refresh(Arc::downgrade(&store)));
        tokio::spawn(record_uses(Arc::downgrade(&store)));
        Ok(store)
    }

    /// Reads the stored keys into this node's copy (again, a few times at most, in the rare case
    /// that the read took longer than this node keeps its edits).
    async fn reload(&self) -> Result<(), StorageError> {
        for _ in 0..3 {
            let started = Instant::now();
            let start = self.begin_read();
            let keys = self.storage.keys().await?;
            if self.install(keys, start) {
                let mut read_at = self.read_at.lock().expect("read_at lock");
                *read_at = (*read_at).max(started);
                break;
            }
        }
        Ok(())
    }

    /// Numbers a read of the stored keys about to start.
    fn begin_read(&self) -> ReadStart {
        let mut edits = self.edits.lock().expect("edits lock");
        edits.reads += 1;
        ReadStart {
            before: edits.next,
            read: edits.reads,
        }
    }

    /// Replaces this node's copy with `keys`, read from `start`, with the changes this node made
    /// since made again on it where the read missed them ([`Edit::replay`]): however busy this
    /// node is changing keys, what other nodes changed (a revocation) is installed. A read older
    /// than one installed already is not. `false` when this node no longer keeps every edit since.
    fn install(&self, keys: Vec<ApiKey>, start: ReadStart) -> bool {
        let ReadStart { before, read } = start;
        let mut copy = self.keys.write().expect("keys lock");
        let mut edits = self.edits.lock().expect("edits lock");
        if let Some(than) = Instant::now().checked_sub(EDITS_KEPT) {
            edits.forget_older(than);
        }
        if read < edits.installed {
            return true;
        }
        if before < edits.forgotten {
            return false;
        }
        edits.installed = read;
        let mut fresh: HashMap<String, ApiKey> =
            keys.into_iter().map(|k| (k.id.clone(), k)).collect();
        for (_, _, edit) in edits.log.iter().filter(|(seq, _, _)| *seq >= before) {
            edit.replay(&mut fresh);
        }
        *copy = fresh;
        true
    }

    /// Changes this node's copy of the keys, noting the change in `edits`.
    fn edit(&self, edit: Edit) {
        let mut copy = self.keys.write().expect("keys lock");
        let mut edits = self.edits.lock().expect("edits lock");
        edit.apply(&mut copy);
        let seq = edits.next;
        edits.next += 1;
        edits.log.push_back((seq, Instant::now(), edit));
        if edits.log.len() > MAX_EDITS_KEPT {
            if let Some((seq, _, _)) = edits.log.pop_front() {
                edits.forgotten = seq + 1;
            }
        }
    }

    /// Refuses API keys while the stored ones have not been read for [`KEYS_STALE`] at `now`: a
    /// revocation made through another node would not be seen here.
    fn check_fresh(&self, now: Instant) -> Result<(), AuthError> {
        let read_at = *self.read_at.lock().expect("read_at lock");
        let age = now.saturating_duration_since(read_at);
        if age <= KEYS_STALE {
            return Ok(());
        }
        Err(AuthError::Storage(StorageError::Unavailable(format!(
            "the API keys could not be read for {} s: API keys are refused until they are, since \
             one revoked through another node would still be accepted here (the storage fails: \
             see the log)",
            age.as_secs()
        ))))
    }

    /// Reads the keys again for an id that was unknown at `arrived`, unless a read that started
    /// since then has run; at most one such read per [`MISS_INTERVAL`], shared by every request
    /// waiting for it.
    async fn reload_for_miss(&self, arrived: Instant) -> Result<(), StorageError> {
        let mut last = self.last_miss.lock().await;
        if let Some(started) = *last {
            if started >= arrived {
                return Ok(());
            }
            tokio::time::sleep_until((started + MISS_INTERVAL).into()).await;
        }
        *last = Some(Instant::now());
        self.miss_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.reload().await
    }

    /// Whether the storage holds key `id` (accepting `secret`, when one is given) as this node's
    /// copy does not yet: only then is reading every key worth it. A token made up by someone
    /// without a key costs one read of one key, however many keys there are.
    async fn stored_unread(
        &self,
        id: &str,
        secret: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let Some(stored) = self.storage.key(id).await? else {
            return Ok(false);
        };
        Ok(secret.is_none_or(|secret| stored.accepts(secret, now).is_some()))
    }

    /// How many reads of the keys unknown key ids have caused.
    pub fn miss_reads(&self) -> u64 {
        self.miss_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Who a bearer token belongs to.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        if is_master_key(token, &self.master_digests) {
            return Ok(Caller::Master);
        }
        let (id, secret) = split_key(token).ok_or(AuthError::Unknown)?;
        self.check_fresh(Instant::now())?;
        let now = Utc::now();
        let accepted = || self.accepted(id, secret, now);
        let mut accepted_now = accepted();
        if accepted_now.is_none()
            && self
                .stored_unread(id, Some(secret), now)
                .await
                .map_err(unreadable)?
        {
            // A key made or rotated through another node a moment ago.
            self.reload_for_miss(Instant::now())
                .await
                .map_err(unreadable)?;
            accepted_now = accepted();
        }
        let (kind, key) = accepted_now.ok_or(AuthError::Unknown)?;
        if let Some(at) = key.expires_at.filter(|_| key.expired(now)) {
            return Err(AuthError::Expired(at));
        }
        self.note_use(&key, now);
        Ok(Caller::Key(Box::new(key), kind))
    }

    /// Who `token` belongs to when this node's copy of the keys accepts it as a valid API key; read
    /// from nothing else (no master key compared, no storage read): what a client whose failed
    /// logins are limited may still use (`auth::limit`).
    pub fn authenticate_cached(&self, token: &str) -> Option<Caller> {
        let (id, secret) = split_key(token)?;
        self.check_fresh(Instant::now()).ok()?;
        let now = Utc::now();
        let (kind, key) = self.accepted(id, secret, now)?;
        if key.expired(now) {
            return None;
        }
        self.note_use(&key, now);
        Some(Caller::Key(Box::new(key), kind))
    }

    /// The key `id` and which of its secrets `secret` is, when this node's copy accepts it; the
    /// key is copied only once its secret is accepted.
    fn accepted(&self, id: &str, secret: &str, now: DateTime<Utc>) -> Option<(SecretKind, ApiKey)> {
        let keys = self.keys.read().expect("keys lock");
        let key = keys.get(id)?;
        Some((key.accepts(secret, now)?, key.clone()))
    }

    /// Notes a key's use, to be written when the last written use is a minute old.
    fn note_use(&self, key: &ApiKey, now: DateTime<Utc>) {
        let resolution = chrono::Duration::from_std(USE_RESOLUTION).unwrap_or_default();
        if key.last_used_at.is_none_or(|last| now - last >= resolution) {
            self.used
                .lock()
                .expect("used lock")
                .entry(key.id.clone())
                .or_insert(now);
        }
    }

    /// Writes the uses noted since the last flush.
    async fn flush_uses(&self) {
        let pending: Vec<(String, DateTime<Utc>)> =
            self.used.lock().expect("used lock").drain().collect();
        for (id, at) in pending {
            // Only the time: a change made meanwhile through another node stays.
            if self.storage.touch_key(&id, at).await.is_ok() {
                if let Some(key) = self.keys.write().expect("keys lock").get_mut(&id) {
                    key.last_used_at = Some(at);
                }
            }
        }
    }

    #[cfg(test)]
    pub fn list(&self) -> Vec<ApiKey> {
        self.list_page(None, usize::MAX)
            .map(|(keys, _)| keys)
            .unwrap_or_default()
    }

    /// At most `limit` keys, oldest first, after the key `after` (the last of the page before);
    /// with the id of the last one when more follow. Only the page is copied, however many keys
    /// there are. `None` when `after` names no key (revoked since it was handed out).
    pub fn list_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Option<(Vec<ApiKey>, Option<String>)> {
        let keys = self.keys.read().expect("keys lock");
        let mut sorted: Vec<&ApiKey> = keys.values().collect();
        sorted.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        let start = match after {
            None => 0,
            Some(id) => sorted.iter().position(|k| k.id == id)? + 1,
        };
        let page: Vec<ApiKey> = sorted
            .iter()
            .skip(start)
            .take(limit)
            .map(|k| (*k).clone())
            .collect();
        let next = (start + page.len() < sorted.len())
            .then(|| page.last().map(|k| k.id.clone()))
            .flatten();
        Some((page, next))
    }

    pub async fn get(&self, id: &str) -> Result<ApiKey, KeyError> {
        let not_found = || not_found(id);
        if let Some(key) = self.keys.read().expect("keys lock").get(id) {
            return Ok(key.clone());
        }
        // Perhaps made through another node a moment ago; a read shared as for unknown tokens.
        if !super::is_key_id(id) || !self.stored_unread(id, None, Utc::now()).await? {
            return Err(not_found());
        }
        self.reload_for_miss(Instant::now()).await?;
        self.keys
            .read()
            .expect("keys lock")
            .get(id)
            .cloned()
            .ok_or_else(not_found)
    }

    /// Refuses a change by a key (`by`) to a key holding an action `by` does not hold, or living
    /// longer than `by`: a key that manages keys cannot make, widen, rotate, prolong or revoke one
    /// worth more than itself.
    fn may_touch(by: &Caller, key: &ApiKey, verb: &str) -> Result<(), KeyError> {
        let by = match by {
            Caller::Key(by, SecretKind::Current) => by,
            Caller::Key(by, SecretKind::Previous) => {
                return Err(KeyError::Forbidden(format!(
                    "key {} was sent with the secret its last rotation replaced: it may not {verb} keys",
                    by.id
                )))
            }
            Caller::Refused => {
                return Err(KeyError::Forbidden(format!(
                    "a request whose key was refused may not {verb} keys"
                )))
            }
            Caller::Open | Caller::Master => return Ok(()),
        };
        if let Some(until) = by.expires_at {
            if key.expires_at.is_none_or(|expires| expires > until) {
                return Err(KeyError::Forbidden(format!(
                    "key {} expires at {}: it may not {verb} a key that outlives it",
                    by.id,
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )));
            }
        }
        match key.actions.iter().find(|a| !by.allows(**a, None)) {
            None => Ok(()),
            Some(action) => Err(KeyError::Forbidden(format!(
                "key {} may not {verb} a key with action {}, which it does not hold",
                by.id,
                action.name()
            ))),
        }
    }

    /// The caller as stored now, to judge what it may do to keys: this node's copy of a key may be
    /// a couple of seconds old, from before another node narrowed it, and what a key makes in
    /// that time lasts. A key revoked, expired, no longer allowed to manage keys or no longer
    /// reaching every project meanwhile is refused, and so is a secret a rotation replaced
    /// meanwhile (a leaked one is rotated away precisely so that it manages nothing).
    async fn as_stored(&self, by: &Caller) -> Result<Caller, KeyError> {
        let Caller::Key(key, kind) = by else {
            return Ok(by.clone());
        };
        let gone = || {
            KeyError::Forbidden(format!(
                "key {} was revoked, expired or lost keys.manage a moment ago",
                key.id
            ))
        };
        let stored = self.storage.key(&key.id).await?.ok_or_else(gone)?;
        let now = Utc::now();
        if stored.expires_at.is_some_and(|at| at <= now)
            || !stored.allows(Action::KeysManage, None)
            || !stored.reaches_all()
        {
            return Err(gone());
        }
        if *kind == SecretKind::Current && stored.hash != key.hash {
            return Err(KeyError::Forbidden(format!(
                "key {} was rotated a moment ago: its previous secret manages no keys",
                key.id
            )));
        }
        Ok(Caller::Key(Box::new(stored), *kind))
    }

    /// Makes a key; answers it with its secret, the only time the secret is ever shown.
    pub async fn create(&self, by: &Caller, input: KeyInput) -> Result<(ApiKey, String), KeyError> {
        let by = &self.as_stored(by).await?;
        let mut errors = Vec::new();
        let name = input.name.clone().unwrap_or_default();
        if name.is_empty() {
            errors.push(FieldError::new("/name", "is required"));
        }
        if input.actions.is_none() {
            errors.push(FieldError::new(
                "/actions",
                "is required: the actions the key may take",
            ));
        }
        if input.projects.is_none() {
            errors.push(FieldError::new(
                "/projects",
                "is required: project names, prefix* patterns or *",
            ));
        }
        let id = random_hex(8);
        let secret = random_hex(32);
        let mut key = ApiKey {
            id: id.clone(),
            name,
            description: String::new(),
            actions: Vec::new(),
            projects: Vec::new(),
            expires_at: None,
            created_at: Utc::now(),
            last_used_at: None,
            hash: super::digest(&secret),
            previous: None,
        };
        apply(&mut key, input, &mut errors);
        // A key made expired could never be used (a later expiry only shortens a key's life,
        // `update`): a date typed wrong, which its maker would learn only from 401s.
        if key.expires_at.is_some_and(|at| at <= key.created_at) {
            errors.push(FieldError::new(
                "/expires_at",
                "is not in the future: the key would never work; use null for a key that never \
                 expires",
            ));
        }
        if !errors.is_empty() {
            return Err(KeyError::Invalid(errors));
        }
        Self::may_touch(by, &key, "make")?;
        // The storage counts the keys under its lock: creations racing through any node never
        // pass the most together.
        if !self.storage.put_key(&key, MAX_KEYS).await? {
            return Err(KeyError::Invalid(vec![FieldError::new(
                "",
                format!(
                    "there are {MAX_KEYS} keys already, the most dstore keeps; revoke unused ones first"
                ),
            )]));
        }
        self.edit(Edit::Put {
            key: Box::new(key.clone()),
            was: None,
        });
        Ok((key, format!("dstore_{id}_{secret}")))
    }

    /// A key as stored now, to change it: this node's copy may be a couple of seconds old, and a
    /// change made from it would undo a revocation or a rotation made through another node.
    async fn fresh(&self, id: &str) -> Result<ApiKey, KeyError> {
        let stored = if super::is_key_id(id) {
            self.storage.key(id).await?
        } else {
            None
        };
        stored.ok_or_else(|| self.forget(id))
    }

    /// Forgets a key found revoked; answers the error saying so. Only a key this node's copy
    /// holds is noted as a change: any id may be asked for, and the changes are kept a while.
    fn forget(&self, id: &str) -> KeyError {
        if self.keys.read().expect("keys lock").contains_key(id) {
            self.edit(Edit::Remove(id.to_owned()));
        }
        not_found(id)
    }

    /// Changes a key as stored now by `change`, and keeps it in this node's copy; made again
    /// from the key as stored when another change came first (from this node or another), so no
    /// change undoes another (a narrowing, a rotation), and never when it was revoked meanwhile.
    async fn change<T>(
        &self,
        id: &str,
        change: impl Fn(&mut ApiKey) -> Result<T, KeyError>,
    ) -> Result<(ApiKey, T), KeyError> {
        for _ in 0..CHANGE_TRIES {
            let was = self.fresh(id).await?;
            let mut key = was.clone();
            let made = change(&mut key)?;
            match self.storage.replace_key(&key, &was).await? {
                KeyReplaced::Done => {
                    self.edit(Edit::Put {
                        key: Box::new(key.clone()),
                        was: Some(Box::new(was)),
                    });
                    return Ok((key, made));
                }
                KeyReplaced::Revoked => return Err(self.forget(id)),
                KeyReplaced::Changed => continue,
            }
        }
        Err(KeyError::Storage(StorageError::Unavailable(format!(
            "key {id} was changed by {CHANGE_TRIES} other requests while this change was made; try again"
        ))))
    }

    /// Changes a key's name, description, actions, projects or expiry.
    pub async fn update(&self, by: &Caller, id: &str, input: KeyInput) -> Result<ApiKey, KeyError> {
        let by = &self.as_stored(by).await?;
        let (key, ()) = self
            .change(id, |key| {
                Self::may_touch(by, key, "change")?;
                let mut errors = Vec::new();
                if input.name.as_deref() == Some("") {
                    errors.push(FieldError::new("/name", "must not be empty"));
                }
                apply(key, input.clone(), &mut errors);
                if !errors.is_empty() {
                    return Err(KeyError::Invalid(errors));
                }
                Self::may_touch(by, key, "grant")
            })
            .await?;
        Ok(key)
    }

    /// A new secret for the key; the old one stays valid for `grace`. Answers the new key.
    pub async fn rotate(
        &self,
        by: &Caller,
        id: &str,
        grace: Duration,
    ) -> Result<(ApiKey, String), KeyError> {
        let by = &self.as_stored(by).await?;
        let secret = random_hex(32);
        let (key, ()) = self
            .change(id, |key| {
                Self::may_touch(by, key, "rotate")?;
                key.previous = Some(PreviousSecret {
                    hash: std::mem::replace(&mut key.hash, super::digest(&secret)),
                    valid_until: Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default(),
                });
                Ok(())
            })
            .await?;
        Ok((key.clone(), format!("dstore_{}_{secret}", key.id)))
    }

    /// Revokes a key at once. Whether `by` may is judged on the key as stored now: this node's
    /// copy may be a couple of seconds old, from before another node gave the key an action `by`
    /// does not hold.
    pub async fn delete(&self, by: &Caller, id: &str) -> Result<ApiKey, KeyError> {
        let by = &self.as_stored(by).await?;
        let key = self.fresh(id).await?;
        Self::may_touch(by, &key, "revoke")?;
        self.storage.delete_key(id).await?;
        self.edit(Edit::Remove(id.to_owned()));
        Ok(key)
    }
}

/// Applies what a client said to a key, collecting every problem.
fn apply(key: &mut ApiKey, input: KeyInput, errors: &mut Vec<FieldError>) {
    let excerpt = crate::blueprint::value::excerpt_str;
    // A free text of at most `max` characters, without a control character (a line break or a
    // tab in a description aside) or one that reorders the text around it: a key's name is shown
    // in `dstore keys list` and the audit log, where an escape sequence would rewrite the
    // terminal of whoever reads them, and a bidirectional override would disguise the name.
    let mut text = |field: &str, value: String, max: usize, lines: bool, into: &mut String| {
        let odd = |c: char| {
            (c.is_control() && !(lines && matches!(c, '\n' | '\r' | '\t')))
                || matches!(
                    c,
                    '\u{061c}'
                        | '\u{180e}'
                        | '\u{200b}'..='\u{200f}'
                        | '\u{2028}'..='\u{202e}'
                        | '\u{2060}'..='\u{206f}'
                        | '\u{feff}'
                )
        };
        if value.chars().count() > max || value.chars().any(odd) {
            errors.push(FieldError::new(
                field,
                format!(
                    "must be at most {max} characters, without control characters{}, invisible \
                     ones or direction marks",
                    if lines {
                        " (but line breaks and tabs)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        *into = value;
    };
    if let Some(name) = input.name {
        text("/name", name, 200, false, &mut key.name);
    }
    if let Some(description) = input.description {
        text(
            "/description",
            description,
            1000,
            true,
            &mut key.description,
        );
    }
    if let Some(actions) = input.actions {
        if actions.is_empty() {
            errors.push(FieldError::new("/actions", "must name at least one action"));
        }
        key.actions.clear();
        if actions.len() > Action::ALL.len() {
            errors.push(FieldError::new(
                "/actions",
                format!(
                    "names {} actions; there are {}",
                    actions.len(),
                    Action::ALL.len()
                ),
            ));
        }
        for (i, raw) in actions.iter().enumerate().take(Action::ALL.len()) {
            match Action::parse(raw) {
                Some(action) if key.actions.contains(&action) => {}
                Some(action) => key.actions.push(action),
                None => errors.push(FieldError::new(
                    format!("/actions/{i}"),
                    format!(
                        "unknown action {:?}; actions are {}",
                        excerpt(raw),
                        Action::ALL.map(Action::name).join(", ")
                    ),
                )),
            }
        }
    }
    if let Some(projects) = input.projects {
        if projects.is_empty() {
            errors.push(FieldError::new(
                "/projects",
                "must name at least one project or *",
            ));
        }
        key.projects.clear();
        if projects.len() > MAX_PROJECT_PATTERNS {
            errors.push(FieldError::new(
                "/projects",
                format!(
                    "names {} patterns; at most {MAX_PROJECT_PATTERNS} (a prefix* pattern covers many projects)",
                    projects.len()
                ),
            ));
        }
        for (i, raw) in projects.iter().enumerate().take(MAX_PROJECT_PATTERNS) {
            match ProjectPattern::parse(raw) {
                Ok(pattern) => key.projects.push(pattern),
                Err(reason) => errors.push(FieldError::new(format!("/projects/{i}"), reason)),
            }
        }
    }
    if let Some(expires) = input.expires_at {
        key.expires_at = match expires.as_deref().map(chrono::DateTime::parse_from_rfc3339) {
            None => None,
            // RFC 3339 has four-digit years: a time before the year 1 or past 9999 in UTC (year 0
            // with a positive offset, 9999 with a negative one) could not be written as one.
            Some(Ok(at)) if (1..=9999).contains(&at.with_timezone(&Utc).year()) => {
                Some(at.with_timezone(&Utc))
            }
            Some(Ok(_)) => {
                errors.push(FieldError::new(
                    "/expires_at",
                    "is outside the years 1 to 9999 in UTC; use null for a key that never expires",
                ));
                None
            }
            Some(Err(_)) => {
                errors.push(FieldError::new(
                    "/expires_at",
                    format!(
                        "{:?} is not an RFC 3339 time",
                        excerpt(expires.as_deref().unwrap_or_default())
                    ),
                ));
                None
            }
        };
    }
}

/// Reads the keys every [`REFRESH`]; the uses of keys are written by [`record_uses`] beside it,
/// since a write per key used (thousands, once a minute) would hold back the next read, and with it
/// a revocation made through another node.
async fn refresh(store: Weak<KeyStore>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        if let Err(error) = store.reload().await {
            tracing::warn!(%error, "cannot read the API keys; the last ones read stay in use");
        }
    }
}

/// Writes the uses of keys noted since the last time, every [`REFRESH`].
async fn record_uses(store: Weak<KeyStore>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        store.flush_uses().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read of the stored keys made before a revocation, installed after it, would bring the
    /// revoked key back until the next read: it is not installed.
    #[tokio::test]
    async fn a_read_made_before_a_revocation_does_not_bring_the_key_back() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let input = KeyInput {
            name: Some("k".into()),
            actions: Some(vec!["items.read".into()]),
            projects: Some(vec!["*".into()]),
            ..KeyInput::default()
        };
        let (key, token) = store.create(&Caller::Master, input).await.unwrap();
        assert!(store.authenticate(Some(&token)).await.is_ok());
        let start = store.begin_read();
        let stale = storage.keys().await.unwrap();
        store.delete(&Caller::Master, &key.id).await.unwrap();
        assert!(store.install(stale, start));
        assert!(store.authenticate(Some(&token)).await.is_err());
        store.reload().await.unwrap();
        assert!(store.list().is_empty());
    }

    /// A key for every project with `actions`.
    fn everywhere(actions: &[&str]) -> KeyInput {
        KeyInput {
            name: Some("k".into()),
            actions: Some(actions.iter().map(|a| a.to_string()).collect()),
            projects: Some(vec!["*".into()]),
            ..KeyInput::default()
        }
    }

    /// Narrows key `id` to project `alpha` through `store`.
    async fn narrow_to_alpha(store: &KeyStore, id: &str) {
        let narrow = KeyInput {
            projects: Some(vec!["alpha".into()]),
            ..KeyInput::default()
        };
        store.update(&Caller::Master, id, narrow).await.unwrap();
    }

    fn manager() -> KeyInput {
        everywhere(&["keys.manage", "items.read"])
    }

    /// What another node did to a managing key a moment ago holds on this one, whose copy is
    /// older: a secret rotated away (it leaked) manages nothing, nor does a key narrowed to some
    /// projects.
    #[tokio::test]
    async fn a_key_rotated_or_narrowed_elsewhere_manages_no_keys_here() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let elsewhere = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        for narrowed in [false, true] {
            let (key, token) = store.create(&Caller::Master, manager()).await.unwrap();
            let caller = store.authenticate(Some(&token)).await.unwrap();
            assert!(store.create(&caller, reader()).await.is_ok());
            if narrowed {
                narrow_to_alpha(&elsewhere, &key.id).await;
            } else {
                elsewhere
                    .rotate(&Caller::Master, &key.id, Duration::from_secs(3600))
                    .await
                    .unwrap();
            }
            // This node's copy still holds the key as it was.
            let caller = store.authenticate(Some(&token)).await.unwrap();
            let refused = store.create(&caller, reader()).await.err();
            assert!(
                matches!(refused, Some(KeyError::Forbidden(_))),
                "narrowed: {narrowed}: {refused:?}"
            );
        }
    }

    /// A node that cannot read the stored keys for long refuses API keys (503), rather than
    /// accept one revoked through another node for as long as that lasts; the master keys work.
    #[tokio::test]
    async fn api_keys_are_refused_while_the_stored_ones_cannot_be_read() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let master = "m".repeat(16);
        let store = KeyStore::open(storage.clone(), vec![master.clone().into()])
            .await
            .unwrap();
        let (_, token) = store.create(&Caller::Master, reader()).await.unwrap();
        assert!(store.authenticate(Some(&token)).await.is_ok());
        assert!(store.check_fresh(Instant::now()).is_ok());
        let later = Instant::now() + KEYS_STALE + Duration::from_secs(5);
        let refused = store.check_fresh(later).expect_err("stale keys");
        assert!(
            matches!(&refused, AuthError::Storage(StorageError::Unavailable(m)) if m.contains("could not be read")),
            "{refused}"
        );
        *store.read_at.lock().unwrap() = Instant::now() - KEYS_STALE - Duration::from_secs(5);
        assert!(matches!(
            store.authenticate(Some(&token)).await,
            Err(AuthError::Storage(_))
        ));
        assert!(matches!(
            store.authenticate(Some(&master)).await,
            Ok(Caller::Master)
        ));
        store.reload().await.unwrap();
        assert!(store.authenticate(Some(&token)).await.is_ok());
    }

    /// A change noted after the revocation that overtook it does not bring the key back to this
    /// node's copy.
    #[tokio::test]
    async fn a_change_noted_after_a_revocation_does_not_bring_the_key_back() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let (key, _) = store.create(&Caller::Master, reader()).await.unwrap();
        let mut changed = key.clone();
        changed.description = "changed".into();
        store.edit(Edit::Remove(key.id.clone()));
        store.edit(Edit::Put {
            key: Box::new(changed),
            was: Some(Box::new(key)),
        });
        assert!(store.list().is_empty());
    }

    /// Asking for keys that do not exist, however many and however long their ids, keeps nothing
    /// in this node's list of changes; the list is bounded however many real changes it has.
    #[tokio::test]
    async fn unknown_ids_leave_nothing_behind_and_the_changes_kept_are_bounded() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        for id in ["0123456789abcdef".to_string(), "x".repeat(64 << 10)] {
            assert!(store.delete(&Caller::Master, &id).await.is_err());
        }
        assert!(store.edits.lock().unwrap().log.is_empty());
        for n in 0..MAX_EDITS_KEPT + 10 {
            store.edit(Edit::Remove(format!("{n:016x}")));
        }
        let edits = store.edits.lock().unwrap();
        assert_eq!(edits.log.len(), MAX_EDITS_KEPT);
        assert_eq!(edits.forgotten, 10);
    }

    fn reader() -> KeyInput {
        everywhere(&["items.read"])
    }

    /// Keys are listed a page at a time, oldest first, each page after the last key of the one
    /// before; a page after a key revoked since is refused.
    #[tokio::test]
    async fn keys_are_listed_a_page_at_a_time() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage, Vec::new()).await.unwrap();
        let mut made = Vec::new();
        for _ in 0..5 {
            made.push(store.create(&Caller::Master, reader()).await.unwrap().0.id);
        }
        let (mut listed, mut after) = (Vec::new(), None);
        loop {
            let (page, next) = store.list_page(after.as_deref(), 2).unwrap();
            assert!(page.len() <= 2);
            listed.extend(page.into_iter().map(|k| k.id));
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut oldest_first = made.clone();
        let all = store.list();
        oldest_first.sort_by_key(|id| all.iter().position(|k| &k.id == id));
        assert_eq!(listed, oldest_first);
        let (_, next) = store.list_page(None, 5).unwrap();
        assert_eq!(next, None, "no next page after the last key");
        store.delete(&Caller::Master, &made[0]).await.unwrap();
        assert!(store.list_page(Some(&made[0]), 2).is_none());
    }

    /// A caller whose key was refused may change no key, whatever reaches the store.
    #[tokio::test]
    async fn a_refused_caller_touches_no_key() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage, Vec::new()).await.unwrap();
        let refused = store.create(&Caller::Refused, reader()).await;
        assert!(
            matches!(refused, Err(KeyError::Forbidden(_))),
            "{refused:?}"
        );
        assert!(store.list().is_empty());
    }

    /// A made-up token, or a real id with a made-up secret, costs a read of one key, never a read
    /// of all of them; a key made or rotated through another node is still accepted at once.
    #[tokio::test]
    async fn made_up_tokens_read_one_key_and_new_ones_from_elsewhere_are_read_at_once() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let elsewhere = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let (known, _) = store.create(&Caller::Master, reader()).await.unwrap();
        let wrong_secret = format!("dstore_{}_{}", known.id, "0".repeat(64));
        for token in [
            format!("dstore_0123456789abcdef_{}", "1".repeat(64)),
            wrong_secret,
        ] {
            for _ in 0..3 {
                assert!(matches!(
                    store.authenticate(Some(&token)).await,
                    Err(AuthError::Unknown)
                ));
            }
        }
        assert!(matches!(
            store.get("0123456789abcdef").await,
            Err(KeyError::NotFound(_))
        ));
        assert_eq!(store.miss_reads(), 0, "no read of every key");

        let (made, token) = elsewhere.create(&Caller::Master, reader()).await.unwrap();
        assert!(store.authenticate(Some(&token)).await.is_ok());
        assert_eq!(store.miss_reads(), 1);
        let (_, rotated) = elsewhere
            .rotate(&Caller::Master, &made.id, Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(store.authenticate(Some(&rotated)).await.is_ok());
        assert_eq!(store.miss_reads(), 2);
        let (other, _) = elsewhere.create(&Caller::Master, reader()).await.unwrap();
        assert_eq!(store.get(&other.id).await.unwrap().id, other.id);
    }

    /// However busy a node is changing keys, a read of the stored keys is installed, with this
    /// node's changes made during it made again: a key revoked through another node stops working
    /// (before, every read a change overlapped was thrown away, and a node changing keys without a
    /// pause kept a revoked key for as long as that went on).
    #[tokio::test]
    async fn a_revocation_elsewhere_is_installed_while_this_node_changes_keys() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let (revoked, revoked_token) = store.create(&Caller::Master, reader()).await.unwrap();
        let (changed, _) = store.create(&Caller::Master, reader()).await.unwrap();
        let start = store.begin_read();
        // Another node revokes a key; the read sees that, and nothing of what this node does
        // while it runs: it makes a key, and revokes one.
        assert!(storage.delete_key(&revoked.id).await.unwrap());
        let read = storage.keys().await.unwrap();
        let (made, made_token) = store.create(&Caller::Master, reader()).await.unwrap();
        store.delete(&Caller::Master, &changed.id).await.unwrap();
        assert!(store.install(read, start));
        let ids: Vec<String> = store.list().into_iter().map(|k| k.id).collect();
        assert_eq!(ids, [made.id.as_str()]);
        assert!(store.authenticate(Some(&revoked_token)).await.is_err());
        assert!(store.authenticate(Some(&made_token)).await.is_ok());
    }

    /// A change this node made during a read is made again on it only where the read missed it: a
    /// narrowing another node made after it stays; and a read older than one installed is not
    /// installed over it (it would bring back a key revoked in between).
    #[tokio::test]
    async fn a_replayed_change_never_undoes_a_later_one_nor_an_older_read_a_newer_one() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let elsewhere = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let (key, _) = store.create(&Caller::Master, reader()).await.unwrap();
        let start = store.begin_read();
        let describe = KeyInput {
            description: Some("here".into()),
            ..KeyInput::default()
        };
        store
            .update(&Caller::Master, &key.id, describe)
            .await
            .unwrap();
        narrow_to_alpha(&elsewhere, &key.id).await;
        let read = storage.keys().await.unwrap();
        assert!(store.install(read, start));
        let installed = store.list();
        assert_eq!(installed[0].projects.len(), 1, "the narrowing was undone");
        assert_eq!(installed[0].description, "here");

        let (revoked, token) = store.create(&Caller::Master, reader()).await.unwrap();
        let older = store.begin_read();
        let stale = storage.keys().await.unwrap();
        elsewhere
            .delete(&Caller::Master, &revoked.id)
            .await
            .unwrap();
        store.reload().await.unwrap();
        assert!(store.authenticate(Some(&token)).await.is_err());
        assert!(store.install(stale, older));
        assert!(
            store.authenticate(Some(&token)).await.is_err(),
            "an older read brought the revoked key back"
        );
    }

    /// A secret rotated through another node works at once on this one: a known id with another
    /// secret reads the keys again, as an unknown id does.
    #[tokio::test]
    async fn a_secret_rotated_elsewhere_is_accepted_at_once() {
        let (storage, _dir) = crate::storage::conformance::open_embedded().await;
        let store = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let (key, _) = store.create(&Caller::Master, reader()).await.unwrap();
        let elsewhere = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
        let (_, token) = elsewhere
            .rotate(&Caller::Master, &key.id, Duration::ZERO)
            .await
            .unwrap();
        assert!(store.authenticate(Some(&token)).await.is_ok());
    }
}
