//! Settings: a TOML file plus environment variables, with dstore's original variable names.
//!
//! Precedence, lowest first: built-in defaults, the TOML file (`--config` or `DSTORE_CONFIG`), then
//! environment variables. Both the original names (`PORT`, `LEVEL_PATH`, `PROJECT_FILE_PATH`,
//! `POSTGRESQL_*`, `ELASTICSEARCH_HOST`, `QUEUE_CONNECTIONSTRING`) and namespaced ones (`DSTORE_*`)
//! are read. Nothing here opens a connection.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::journal::Durability;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
}

/// A setting that must never be shown: `Debug`, `Display` and `Serialize` (what `check-config`
/// prints) give `***`; only [`Secret::expose`] gives the value, to the code that uses it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            "***"
        }
    }
}

impl<T: Into<String>> From<T> for Secret {
    fn from(value: T) -> Secret {
        Secret(value.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.shown())
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

/// A connection URL that may carry credentials: shown (`Debug`, `Display`, `Serialize`) with the
/// password of its user part and any `password` query parameter replaced by `***`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL as it may be shown.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl<T: Into<String>> From<T> for SecretUrl {
    fn from(value: T) -> SecretUrl {
        SecretUrl(value.into())
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// `scheme://user:secret@host/path?password=x&a=b` → `scheme://user:***@host/path?password=***&a=b`.
/// Text that is not a URL is hidden whole, since it cannot be told apart from a secret.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.is_empty() {
            String::new()
        } else {
            "***".into()
        };
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    // The user part ends at the last '@' before the path.
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.to_ascii_lowercase().contains("password") => {
                    format!("{key}=***")
                }
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub projection: ProjectionSettings,
    pub log: LogSettings,
    pub auth: AuthSettings,
    pub changes: ChangesSettings,
    pub postgresql: Option<PostgresSettings>,
    pub elasticsearch: Option<ElasticsearchSettings>,
    pub queue: Option<QueueSettings>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Largest accepted body of a blueprint or item request, in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted `_bulk` body, in bytes.
    pub max_bulk_bytes: usize,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Memory all requests together may hold for their bodies, in bytes; past it a request is
    /// answered 503 instead of growing the process (see `http::body`). Answers waiting to be
    /// sent hold at most three quarters of it (see `budget`).
    pub max_inflight_bytes: usize,
    /// How long a client may take to send a request body, in seconds (then 408).
    pub body_timeout_secs: u64,
    /// `_bulk` requests parsed, prepared and written at once; the others wait for a place with
    /// only their bodies held, so the memory of their items does not grow with the clients'
    /// connections. 0 means twice the HTTP workers.
    pub max_concurrent_bulk: usize,
    /// Values of unique columns every freeze's duplicate count together may remember
    /// (`DSTORE_MAX_COUNTED_UNIQUE_VALUES`; 8 bytes each, in hash sets): past it a count is only a
    /// lower bound, and a column it could not count to the end takes `force`.
    pub max_counted_unique_values: usize,
}

/// Where the catalog and the journal live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// RocksDB in the data directory, one process (the default).
    #[default]
    Rocksdb,
    /// A shared PostgreSQL database: any number of stateless nodes (cluster mode).
    Postgresql,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// `rocksdb` (default) or `postgresql` (`DSTORE_STORAGE_BACKEND`).
    pub backend: Backend,
    /// With `backend = "postgresql"`: the database (`DSTORE_STORAGE_URL`).
    pub url: Option<SecretUrl>,
    /// With `backend = "postgresql"`: the schema of dstore's own tables (`DSTORE_STORAGE_SCHEMA`).
    pub schema: String,
    /// This node's name in leases and logs (`DSTORE_NODE`); defaults to the host name and process id.
    pub node: Option<String>,
    /// Where the journal and the RocksDB keyspaces live (`LEVEL_PATH`).
    pub data_dir: PathBuf,
    /// Where the catalog lives (`PROJECT_FILE_PATH`); defaults to `<data_dir>/catalog`.
    pub catalog_dir: Option<PathBuf>,
    pub durability: Durability,
    /// Item writes and freezes are refused (503) while the journal's filesystem has fewer MiB free
    /// (`DSTORE_MIN_FREE_DISK_MB`), so the disk never fills and dstore can always restart; 0: never.
    pub min_free_disk_mb: u64,
    /// Most projects the deployment holds (`DSTORE_MAX_PROJECTS`); making one more is a 409.
    pub max_projects: usize,
    /// Most bytes, as JSON, of every project's blueprints and versions together
    /// (`DSTORE_MAX_CATALOG_BYTES`); an edit that grows the catalog past it is a 409.
    pub max_catalog_bytes: usize,
    /// With `backend = "postgresql"`: how long a batch of writes may wait for the storage's answer
    /// before its writes answer 503 (`DSTORE_COMMIT_TIMEOUT_SECS`; at least 1).
    pub commit_timeout_secs: u64,
    /// With `backend = "postgresql"`: how long a node waits for any other answer from the storage
    /// (a read, each row of a page, a catalog edit, a projector's step) before it gives the
    /// connection up and answers 503 (`DSTORE_QUERY_TIMEOUT_SECS`; at least 1).
    pub query_timeout_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectionSettings {
    /// Tasks a projector takes at once (fewer when they hold more than 8 MiB): one `_bulk` request
    /// to Elasticsearch, one batch of keyspace writes.
    pub batch_size: usize,
    /// Tasks the PostgreSQL projector takes at once: one transaction. Larger batches than the
    /// others pay off there (fewer statements and commits), at the cost of the memory they hold.
    pub postgresql_batch_size: usize,
    /// Writes are refused with 503 once a projector has this many tasks waiting.
    pub max_pending_tasks: u64,
    /// How long `?wait=true` writes and freezes wait for the projectors, in seconds.
    pub wait_timeout_secs: u64,
    /// Whether the embedded RocksDB keyspace projector runs.
    pub rocksdb: bool,
}

/// Who may call dstore (see `auth`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Keys that only manage API keys, at least 16 bytes each; two may be valid at once while the
    /// key rotates (`DSTORE_MASTER_KEY`, `DSTORE_MASTER_KEY_PREVIOUS`).
    pub master_keys: Vec<Secret>,
    /// A file holding a master key on its first line (`DSTORE_MASTER_KEY_FILE`; the package makes
    /// `/etc/dstore/master.key`).
    pub master_key_file: Option<PathBuf>,
    /// Serve every route without a key, even on an address other machines reach
    /// (`DSTORE_AUTH_DISABLED=true`). Without a master key, dstore otherwise serves only on a
    /// loopback address.
    pub disabled: bool,
    /// Routes open without a key besides `/_health`: any of `ready`, `metrics`, `docs`
    /// (`DSTORE_AUTH_PUBLIC=ready,metrics`).
    pub public: Vec<String>,
    /// The names a request's `Host` may carry (without the port, any case); empty: any
    /// (`DSTORE_ALLOWED_HOSTS=localhost,dstore`). Others get 403: a web page whose own name a DNS
    /// rebinding points at dstore's address sends that name, and with authentication off
    /// nothing else would stop it.
    pub allowed_hosts: Vec<String>,
    /// How long the audit log keeps entries, in days.
    pub audit_retention_days: u32,
    /// How long a rotated key's old secret stays valid, in seconds (a rotation may say otherwise).
    pub rotation_grace_secs: u64,
    /// Tokens that are no key one client address may send a minute (a minute's worth at once);
    /// past them it is answered 429 until its guesses refill, unless its token is a valid API key
    /// this node knows (`DSTORE_FAILED_LOGINS_PER_MINUTE`; 0: no limit).
    pub failed_logins_per_minute: u32,
    /// The proxies (addresses, or networks as `10.0.0.0/24`, every address of which is trusted)
    /// whose `X-Forwarded-For` says who a request came from (`DSTORE_TRUSTED_PROXIES=10.0.0.5,::1`);
    /// empty: none, and a request comes from the address that connected. Failed logins are
    /// counted by that client address.
    pub trusted_proxies: Vec<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            master_keys: Vec::new(),
            master_key_file: None,
            disabled: false,
            public: Vec::new(),
            allowed_hosts: Vec::new(),
            audit_retention_days: 90,
            rotation_grace_secs: 86_400,
            failed_logins_per_minute: 60,
            trusted_proxies: Vec::new(),
        }
    }
}

/// The change feed (`GET /{project}/_changes`, see `feed`).
/// The heartbeat intervals a change-feed stream may have, in seconds (`changes.heartbeat_secs`
/// and a follower's `heartbeat`).
pub const HEARTBEAT_SECS: std::ops::RangeInclusive<u64> = 1..=300;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangesSettings {
    /// How long a delete stays in the feed, in seconds; a follower that was away longer reads the
    /// project again from `since=0`.
    pub tombstone_retention_secs: u64,
    /// How often old deletes are purged, in seconds.
    pub compact_interval_secs: u64,
    /// Followers streaming at once (SSE, NDJSON, long polls) on this node; more are answered 503.
    /// It bounds their memory: an idle follower holds about 17 KiB, but one whose client stopped
    /// reading holds its last page (up to 256 KiB and one change, however large), so the default
    /// keeps a thousand such followers near 1.3 GiB, within the systemd unit's memory limit.
    pub max_followers: usize,
    /// Seconds between heartbeats of an idle stream, one of [`HEARTBEAT_SECS`].
    pub heartbeat_secs: u64,
}

impl Default for ChangesSettings {
    fn default() -> Self {
        ChangesSettings {
            tombstone_retention_secs: 7 * 86_400,
            compact_interval_secs: 600,
            max_followers: 1_000,
            heartbeat_secs: 15,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A `tracing` filter such as `info` or `dstore=debug,info`.
    pub level: String,
    pub json: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
    /// A full connection URL; when set it wins over the fields above.
    pub url: Option<SecretUrl>,
    pub max_connections: u32,
    /// How many transactions the projector splits a batch of at least 1000 rows into, by item id,
    /// run at the same time (one when a table has a unique column); at most `max_connections`.
    /// One by default: with PostgreSQL on the same two cores, two lanes halved the projection's lag
    /// under `_bulk` but took that CPU from accepting writes, and the end-to-end rate stayed the
    /// same (docs/performance.md). Worth raising when PostgreSQL has cores of its own.
    pub parallel_transactions: u32,
    /// How long a projector's statement waits for a lock on a table (PostgreSQL's
    /// `lock_timeout`): an operator's `ALTER TABLE` or a long dump holding one version's table
    /// then holds back only that table's project (docs/internals.md), not every project's
    /// projection for as long as the lock is held. 1 to 3600.
    pub lock_timeout_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElasticsearchSettings {
    pub url: SecretUrl,
    /// Prefix of every index and alias name dstore creates.
    pub index_prefix: String,
    /// A PEM file of the certificate authority that signed the server's certificate, trusted
    /// besides the public ones dstore ships with (`DSTORE_ELASTICSEARCH_CA_CERT`): Elasticsearch 8 makes its own at its
    /// first start (`config/certs/http_ca.crt`). The server's name is still checked.
    pub ca_cert: Option<PathBuf>,
    /// An API key as Elasticsearch answers it in `encoded` (base64 of `id:api_key`), sent as
    /// `Authorization: ApiKey …` (`DSTORE_ELASTICSEARCH_API_KEY`). A user and password go in
    /// the URL instead.
    pub api_key: Option<Secret>,
}

/// RabbitMQ as the way tasks reach projectors (see `queue::rabbitmq`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// `amqp://user:password@host:port/vhost` (`QUEUE_CONNECTIONSTRING`).
    pub url: SecretUrl,
    /// Prefix of every exchange and queue dstore declares; one per dstore deployment on a broker.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Projectors applied by `dstore worker` processes; `dstore serve` only relays their tasks.
    #[serde(default)]
    pub external: Vec<String>,
    /// Tasks a consumer holds unacknowledged at once (the broker's prefetch).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// How long a projector's oldest pending task may stay pending while its queue holds no
    /// message before the relay publishes its pending tasks again, in seconds: the broker lost
    /// them or their reports (a purge, a length or TTL policy, a restore). Doubles while it goes
    /// on, up to an hour.
    #[serde(default = "default_republish_after")]
    pub republish_after_secs: u64,
    /// The largest message the broker takes, in bytes (RabbitMQ's `max_message_size`: 128 MiB
    /// up to 3.13, 16 MiB from 4.0). A task larger than this, or than a limit the broker names
    /// when it refuses one, becomes a dead letter instead of stopping every projector's queue.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_max_message_bytes() -> usize {
    128 << 20
}

fn default_republish_after() -> u64 {
    120
}

fn default_namespace() -> String {
    "dstore".into()
}

fn default_prefetch() -> u16 {
    500
}

impl QueueSettings {
    pub fn new(url: impl Into<SecretUrl>) -> QueueSettings {
        QueueSettings {
            url: url.into(),
            namespace: default_namespace(),
            external: Vec::new(),
            prefetch: default_prefetch(),
            republish_after_secs: default_republish_after(),
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            // Only this machine, until a master key protects dstore (see `auth`).
            host: "127.0.0.1".into(),
            port: 2020,
            max_body_bytes: 1 << 20,
            max_bulk_bytes: 64 << 20,
            workers: 0,
            max_inflight_bytes: 512 << 20,
            body_timeout_secs: 30,
            max_concurrent_bulk: 0,
            max_counted_unique_values: crate::write::evolution::UNIQUE_VALUES_TRACKED,
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            backend: Backend::Rocksdb,
            url: None,
            schema: "dstore".into(),
            node: None,
            data_dir: PathBuf::from("data"),
            catalog_dir: None,
            durability: Durability::Sync,
            min_free_disk_mb: 1024,
            max_projects: crate::catalog::edit::MAX_PROJECTS,
            max_catalog_bytes: crate::catalog::edit::MAX_CATALOG_BYTES,
            commit_timeout_secs: 30,
            query_timeout_secs: 30,
        }
    }
}

impl ProjectionSettings {
    /// How many tasks the projector of this name takes at once.
    pub fn batch_for(&self, projector: &str) -> usize {
        if projector == crate::projector::ProjectorKind::Postgresql.name() {
            self.postgresql_batch_size
        } else {
            self.batch_size
        }
        .max(1)
    }
}

impl Default for ProjectionSettings {
    fn default() -> Self {
        ProjectionSettings {
            batch_size: 1000,
            postgresql_batch_size: 5000,
            max_pending_tasks: 5_000_000,
            wait_timeout_secs: 30,
            rocksdb: true,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            json: false,
        }
    }
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            host: "localhost".into(),
            port: 5432,
            user: "postgres".into(),
            password: Secret::default(),
            database: "dstore".into(),
            url: None,
            max_connections: 8,
            parallel_transactions: 1,
            lock_timeout_secs: 10,
        }
    }
}

impl Default for ElasticsearchSettings {
    fn default() -> Self {
        ElasticsearchSettings {
            url: "http://localhost:9200".into(),
            index_prefix: String::new(),
            ca_cert: None,
            api_key: None,
        }
    }
}

impl StorageSettings {
    pub fn catalog_dir(&self) -> PathBuf {
        self.catalog_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("catalog"))
    }
}

/// The process environment's `name`: `None` when unset, an error naming it when its value is not
/// UTF-8 (its value is not shown: it may be a secret).
pub fn env_var(name: &str) -> Result<Option<String>, ConfigError> {
    env_value(name, std::env::var(name))
}

/// What [`env_var`] answers for `read`, the variable `name` as the process environment holds it.
fn env_value(
    name: &str,
    read: Result<String, std::env::VarError>,
) -> Result<Option<String>, ConfigError> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::Env {
            name: name.into(),
            value: "(not shown)".into(),
            reason: "it is not UTF-8; dstore reads settings as UTF-8".into(),
        }),
    }
}

impl Settings {
    /// Reads the file (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::load_with(file, env_var)
    }

    /// [`Settings::load`], reading each variable through `read`.
    fn load_with(
        file: Option<&Path>,
        read: impl Fn(&str) -> Result<Option<String>, ConfigError>,
    ) -> Result<Settings, ConfigError> {
        let mut settings = match file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let unreadable = std::cell::RefCell::new(None);
        let applied = settings.apply_env(|name| {
            read(name).unwrap_or_else(|error| {
                unreadable.borrow_mut().get_or_insert(error);
                None
            })
        });
        // A variable that cannot be read is never taken as unset: a data directory or a master key
        // set in another encoding would otherwise leave dstore serving an empty journal, or open.
        if let Some(error) = unreadable.into_inner() {
            return Err(error);
        }
        applied?;
        Ok(settings)
    }

    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Applies environment overrides read through `var`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let first = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| var(n).filter(|v| !v.is_empty()).map(|v| (n.to_string(), v)))
        };
        fn parsed<T: std::str::FromStr>((name, value): (String, String)) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env {
                name,
                value,
                reason: e.to_string(),
            })
        }
        /// A comma-separated list, each entry trimmed, empty ones left out.
        fn listed(value: &str) -> Vec<String> {
            value
                .split(',')
                .map(|entry| entry.trim().to_string())
                .filter(|entry| !entry.is_empty())
                .collect()
        }
        if let Some(v) = first(&["DSTORE_HOST"]) {
            self.server.host = v.1;
        }
        if let Some(v) = first(&["DSTORE_PORT", "PORT"]) {
            self.server.port = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_DATA_DIR", "LEVEL_PATH"]) {
            self.storage.data_dir = v.1.into();
        }
        if let Some(v) = first(&["DSTORE_CATALOG_DIR", "PROJECT_FILE_PATH"]) {
            self.storage.catalog_dir = Some(v.1.into());
        }
        if let Some((name, value)) = first(&["DSTORE_STORAGE_BACKEND"]) {
            self.storage.backend = match value.as_str() {
                "rocksdb" => Backend::Rocksdb,
                "postgresql" | "postgres" => Backend::Postgresql,
                _ => {
                    return Err(ConfigError::Env {
                        name,
                        value,
                        reason: "expected rocksdb or postgresql".into(),
                    })
                }
            };
        }
        if let Some(v) = first(&["DSTORE_STORAGE_URL"]) {
            self.storage.url = Some(v.1.into());
        }
        if let Some(v) = first(&["DSTORE_STORAGE_SCHEMA"]) {
            self.storage.schema = v.1;
        }
        if let Some(v) = first(&["DSTORE_NODE"]) {
            self.storage.node = Some(v.1);
        }
        if let Some(v) = first(&["DSTORE_MAX_COUNTED_UNIQUE_VALUES"]) {
            self.server.max_counted_unique_values = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_MIN_FREE_DISK_MB"]) {
            self.storage.min_free_disk_mb = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_MAX_PROJECTS"]) {
            self.storage.max_projects = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_MAX_CATALOG_BYTES"]) {
            self.storage.max_catalog_bytes = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_COMMIT_TIMEOUT_SECS"]) {
            self.storage.commit_timeout_secs = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_QUERY_TIMEOUT_SECS"]) {
            self.storage.query_timeout_secs = parsed(v)?;
        }
        if let Some((name, value)) = first(&["DSTORE_DURABILITY"]) {
            self.storage.durability = match value.as_str() {
                "sync" => Durability::Sync,
                "buffered" => Durability::Buffered,
                _ => {
                    return Err(ConfigError::Env {
                        name,
                        value,
                        reason: "expected sync or buffered".into(),
                    })
                }
            };
        }
        // Empty variables count as unset, but a master key set empty would turn authentication
        // off on a loopback address without a word: refused.
        for name in [
            "DSTORE_MASTER_KEY",
            "DSTORE_MASTER_KEY_PREVIOUS",
            "DSTORE_MASTER_KEY_FILE",
        ] {
            if var(name).is_some_and(|v| v.trim().is_empty()) {
                return Err(ConfigError::Env {
                    name: name.into(),
                    value: String::new(),
                    reason: "is empty: set a key (at least 16 bytes) or leave the variable unset"
                        .into(),
                });
            }
        }
        let keys: Vec<Secret> = ["DSTORE_MASTER_KEY", "DSTORE_MASTER_KEY_PREVIOUS"]
            .iter()
            .filter_map(|name| first(&[name]).map(|v| Secret::from(v.1)))
            .collect();
        if !keys.is_empty() {
            self.auth.master_keys = keys;
        }
        if let Some(v) = first(&["DSTORE_MASTER_KEY_FILE"]) {
            self.auth.master_key_file = Some(v.1.into());
        }
        if let Some(v) = first(&["DSTORE_AUTH_DISABLED"]) {
            self.auth.disabled = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_AUTH_PUBLIC"]) {
            self.auth.public = listed(&v.1);
        }
        if let Some(v) = first(&["DSTORE_FAILED_LOGINS_PER_MINUTE"]) {
            self.auth.failed_logins_per_minute = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_TRUSTED_PROXIES"]) {
            self.auth.trusted_proxies = listed(&v.1);
        }
        if let Some(v) = first(&["DSTORE_ALLOWED_HOSTS"]) {
            self.auth.allowed_hosts = listed(&v.1);
        }
        if let Some(v) = first(&["DSTORE_LOG", "RUST_LOG"]) {
            self.log.level = v.1;
        }
        if let Some(v) = first(&["DSTORE_MAX_PENDING_TASKS"]) {
            self.projection.max_pending_tasks = parsed(v)?;
        }
        if let Some(v) = first(&["DSTORE_WAIT_TIMEOUT_SECS"]) {
            self.projection.wait_timeout_secs = parsed(v)?;
        }
        let pg_vars = [
            "POSTGRESQL_HOST",
            "POSTGRESQL_PORT",
            "POSTGRESQL_USER",
            "POSTGRESQL_PASSWORD",
            "POSTGRESQL_DATABASE",
            "DATABASE_URL",
            "DSTORE_POSTGRESQL_URL",
        ];
        if pg_vars.iter().any(|n| first(&[n]).is_some()) {
            let pg = self
                .postgresql
                .get_or_insert_with(PostgresSettings::default);
            if let Some(v) = first(&["POSTGRESQL_HOST"]) {
                pg.host = v.1;
            }
            if let Some(v) = first(&["POSTGRESQL_PORT"]) {
                pg.port = parsed(v)?;
            }
            if let Some(v) = first(&["POSTGRESQL_USER"]) {
                pg.user = v.1;
            }
            if let Some(v) = first(&["POSTGRESQL_PASSWORD"]) {
                pg.password = v.1.into();
            }
            if let Some(v) = first(&["POSTGRESQL_DATABASE"]) {
                pg.database = v.1;
            }
            if let Some(v) = first(&["DSTORE_POSTGRESQL_URL", "DATABASE_URL"]) {
                pg.url = Some(v.1.into());
            }
        }
        if let Some(v) = first(&["DSTORE_ELASTICSEARCH_URL", "ELASTICSEARCH_HOST"]) {
            let es = self
                .elasticsearch
                .get_or_insert_with(ElasticsearchSettings::default);
            es.url = if v.1.contains("://") {
                v.1.into()
            } else {
                format!("http://{}", v.1).into()
            };
        }
        if let Some(v) = first(&["DSTORE_ELASTICSEARCH_INDEX_PREFIX"]) {
            self.elasticsearch
                .get_or_insert_with(ElasticsearchSettings::default)
                .index_prefix = v.1;
        }
        if let Some(v) = first(&["DSTORE_ELASTICSEARCH_CA_CERT"]) {
            self.elasticsearch
                .get_or_insert_with(ElasticsearchSettings::default)
                .ca_cert = Some(v.1.into());
        }
        if let Some(v) = first(&["DSTORE_ELASTICSEARCH_API_KEY"]) {
            self.elasticsearch
                .get_or_insert_with(ElasticsearchSettings::default)
                .api_key = Some(v.1.into());
        }
        if let Some(v) = first(&["DSTORE_QUEUE_URL", "QUEUE_CONNECTIONSTRING"]) {
            match &mut self.queue {
                Some(queue) => queue.url = v.1.into(),
                None => self.queue = Some(QueueSettings::new(v.1)),
            }
        }
        if let Some(queue) = &mut self.queue {
            if let Some(v) = first(&["DSTORE_QUEUE_NAMESPACE"]) {
                queue.namespace = v.1;
            }
            if let Some(v) = first(&["DSTORE_QUEUE_EXTERNAL"]) {
                queue.external =
                    v.1.split(',')
                        .map(str::trim)
                        .filter(|name| !name.is_empty())
                        .map(String::from)
                        .collect();
            }
            if let Some(v) = first(&["DSTORE_QUEUE_PREFETCH"]) {
                queue.prefetch = parsed(v)?;
            }
            if let Some(v) = first(&["DSTORE_QUEUE_MAX_MESSAGE_BYTES"]) {
                queue.max_message_bytes = parsed(v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut settings = Settings::default();
        settings.apply_env(|name| env.get(name).cloned())?;
        Ok(settings)
    }

    /// A variable dstore reads whose value is not UTF-8 stops it, naming the variable and not
    /// showing the value: taken as unset, a data directory would be the default (an empty
    /// journal) and a master key none (every route open).
    #[test]
    fn a_variable_that_is_not_utf8_is_an_error_naming_it_not_unset() {
        for name in [
            "DSTORE_DATA_DIR",
            "LEVEL_PATH",
            "DSTORE_MASTER_KEY",
            "DSTORE_PORT",
        ] {
            let read = |n: &str| match n == name {
                true => Err(ConfigError::Env {
                    name: n.into(),
                    value: "(not shown)".into(),
                    reason: "it is not UTF-8".into(),
                }),
                false => Ok(None),
            };
            let error = Settings::load_with(None, read).expect_err(name);
            assert!(error.to_string().contains(name), "{error}");
        }
        let set = Settings::load_with(None, |n| Ok((n == "DSTORE_DATA_DIR").then(|| "d".into())));
        assert_eq!(set.unwrap().storage.data_dir, PathBuf::from("d"));
    }

    #[test]
    fn a_process_variable_that_is_not_utf8_reads_as_an_error() {
        // Not through the process's environment: setting a variable while the test binary's other
        // threads read theirs is a data race in the C library.
        use std::os::unix::ffi::OsStringExt;
        let name = "DSTORE_TEST_CONFIG_NOT_UTF8";
        let value = std::ffi::OsString::from_vec(b"caf\xe9".to_vec());
        let error =
            env_value(name, Err(std::env::VarError::NotUnicode(value))).expect_err("not UTF-8");
        assert!(error.to_string().contains(name), "{error}");
        assert!(
            !error.to_string().contains("caf"),
            "the value is not shown: {error}"
        );
        assert_eq!(env_var(name).unwrap(), None);
    }

    #[test]
    fn a_master_key_set_empty_is_refused_naming_the_variable() {
        for name in ["DSTORE_MASTER_KEY", "DSTORE_MASTER_KEY_FILE"] {
            let mut settings = Settings::default();
            let error = settings
                .apply_env(|n| (n == name).then(|| " ".to_string()))
                .unwrap_err()
                .to_string();
            assert!(error.contains(name) && error.contains("empty"), "{error}");
        }
    }

    #[test]
    fn original_variable_names_are_honoured() {
        let s = with_env(&[
            ("PORT", "3030"),
            ("LEVEL_PATH", "/tmp/d"),
            ("PROJECT_FILE_PATH", "/tmp/c"),
            ("POSTGRESQL_HOST", "db"),
            ("POSTGRESQL_PORT", "6543"),
            ("ELASTICSEARCH_HOST", "es:9200"),
            ("QUEUE_CONNECTIONSTRING", "amqp://guest:guest@mq:5672"),
        ])
        .unwrap();
        assert_eq!(s.server.port, 3030);
        assert_eq!(s.storage.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(s.storage.catalog_dir(), PathBuf::from("/tmp/c"));
        let pg = s.postgresql.unwrap();
        assert_eq!((pg.host.as_str(), pg.port), ("db", 6543));
        assert_eq!(s.elasticsearch.unwrap().url.expose(), "http://es:9200");
        assert_eq!(s.queue.unwrap().url.expose(), "amqp://guest:guest@mq:5672");
    }

    #[test]
    fn secrets_never_appear_in_debug_display_or_the_printed_settings() {
        let s = with_env(&[
            ("POSTGRESQL_PASSWORD", "pg-s3cret"),
            (
                "DATABASE_URL",
                "postgres://u:url-s3cret@db/x?sslpassword=q-s3cret",
            ),
            ("ELASTICSEARCH_HOST", "https://elastic:es-s3cret@es:9200"),
            ("DSTORE_ELASTICSEARCH_API_KEY", "a2V5LXMzY3JldA=="),
            ("DSTORE_ELASTICSEARCH_CA_CERT", "/etc/dstore/http_ca.crt"),
            (
                "QUEUE_CONNECTIONSTRING",
                "amqp://guest:mq-s3cret@mq:5672/%2f",
            ),
        ])
        .unwrap();
        let printed = [
            format!("{s:?}"),
            toml::to_string_pretty(&s).unwrap(),
            s.postgresql.as_ref().unwrap().password.to_string(),
            s.queue.as_ref().unwrap().url.to_string(),
        ]
        .join("\n");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("postgres://u:***@db/x?sslpassword=***"),
            "{printed}"
        );
        assert!(
            printed.contains("amqp://guest:***@mq:5672/%2f"),
            "{printed}"
        );
        assert!(printed.contains("https://elastic:***@es:9200"), "{printed}");
        assert!(!printed.contains("a2V5LXMzY3JldA"), "{printed}");
        let es = s.elasticsearch.as_ref().unwrap();
        assert_eq!(
            es.api_key.as_ref().map(Secret::expose),
            Some("a2V5LXMzY3JldA==")
        );
        assert_eq!(
            es.ca_cert.as_deref(),
            Some(Path::new("/etc/dstore/http_ca.crt"))
        );
        assert_eq!(s.postgresql.unwrap().password.expose(), "pg-s3cret");
    }

    #[test]
    fn a_bad_port_names_the_variable() {
        let err = with_env(&[("PORT", "http")]).unwrap_err().to_string();
        assert!(err.contains("PORT") && err.contains("http"), "{err}");
    }

    #[test]
    fn the_shipped_configuration_file_parses() {
        let settings: Settings = toml::from_str(include_str!("../deploy/dstore.toml")).unwrap();
        assert_eq!(settings.server.port, 2020);
        assert_eq!(settings.storage.data_dir, PathBuf::from("/var/lib/dstore"));
        // The shipped file says what the defaults are.
        let defaults = ProjectionSettings::default();
        assert_eq!(settings.projection.batch_size, defaults.batch_size);
        assert_eq!(
            settings.projection.postgresql_batch_size,
            defaults.postgresql_batch_size
        );
        assert_eq!(
            settings.storage.min_free_disk_mb,
            StorageSettings::default().min_free_disk_mb
        );
    }

    #[test]
    fn the_postgresql_projector_takes_its_own_batch_size() {
        let projection = ProjectionSettings {
            batch_size: 10,
            postgresql_batch_size: 0,
            ..ProjectionSettings::default()
        };
        assert_eq!(projection.batch_for("rocksdb"), 10);
        assert_eq!(projection.batch_for("elasticsearch"), 10);
        // Zero would never take a task: one at least.
        assert_eq!(projection.batch_for("postgresql"), 1);
    }

    #[test]
    fn the_file_rejects_unknown_settings() {
        let err = toml::from_str::<Settings>("[server]\nprot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
    }
}
