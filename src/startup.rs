//! The one place that wires dstore together: stores, journal, dispatchers and the HTTP server.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::audit::AuditLog;
use crate::auth::keys::KeyStore;
use crate::catalog::{Catalog, CatalogError};
use crate::config::{Backend, QueueSettings, Secret, Settings};
use crate::http::changes::Followers;
use crate::http::{self, AppState};
use crate::journal::{Journal, JournalError, JournalSettings};
use crate::projector::elasticsearch::{ElasticsearchProjector, EsError};
use crate::projector::postgres::{PgError, PostgresProjector};
use crate::projector::rocksdb::RocksProjector;
use crate::projector::{Projector, ProjectorKind, Registry};
use crate::queue::dispatcher;
use crate::queue::rabbitmq::{self, Broker};
use crate::queue::view::CatalogView;
use crate::storage::embedded::EmbeddedStorage;
use crate::storage::postgres::{PgStorage, PgStorageSettings};
use crate::storage::SharedStorage;
use crate::supervise::supervised;

#[derive(Debug, Error)]
pub enum StartupError {
    #[error("cannot create the data directory {path} (storage.data_dir / LEVEL_PATH): {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open the catalog at {path} (storage.catalog_dir / PROJECT_FILE_PATH): {source}"
    )]
    Catalog { path: PathBuf, source: CatalogError },
    #[error("cannot open the journal at {path} (storage.data_dir / LEVEL_PATH): {source}")]
    Journal { path: PathBuf, source: JournalError },
    #[error(
        "cannot open the RocksDB keyspaces at {path} (storage.data_dir / LEVEL_PATH): {source}"
    )]
    Keyspaces {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("cannot set up the postgresql projector: {0}")]
    Postgres(#[source] PgError),
    #[error("invalid elasticsearch settings (elasticsearch.url / ELASTICSEARCH_HOST, elasticsearch.index_prefix): {0}")]
    Elasticsearch(EsError),
    #[error("invalid queue settings: {0}")]
    Queue(String),
    #[error("invalid setting {0}")]
    Setting(String),
    #[error("{0}")]
    Unconfigured(String),
    #[error("{0}")]
    Auth(String),
    /// A worker's consumer ended while it should have run.
    #[error("{0}")]
    Stopped(String),
    #[error("cannot open the storage (storage.url / DSTORE_STORAGE_URL): {0}")]
    Storage(#[source] crate::storage::StorageError),
    #[error("cannot listen on {address} (server.host, server.port / PORT): {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
}

/// Stops a running [`Application`]: ends the change feed's streams, then stops the HTTP server.
#[derive(Clone)]
pub struct StopHandle {
    server: actix_web::dev::ServerHandle,
    closing: Arc<watch::Sender<bool>>,
    followers: Arc<Followers>,
}

/// How long a stop lets the change feed's streams end by themselves before cutting the
/// connections of those whose clients do not read.
const STREAMS_GRACE: Duration = Duration::from_secs(1);

impl StopHandle {
    pub async fn stop(&self, graceful: bool) {
        let _ = self.closing.send(true);
        let followers = self.followers.clone();
        let cut = tokio::spawn(async move {
            tokio::time::sleep(STREAMS_GRACE).await;
            followers.cut_streams();
        });
        self.server.stop(graceful).await;
        cut.abort();
    }
}

pub struct Application {
    port: u16,
    server: Server,
    closing: Arc<watch::Sender<bool>>,
    followers: Arc<Followers>,
    shutdown: watch::Sender<bool>,
    /// The dispatchers, or the broker relay, reports and consumers.
    background: Vec<JoinHandle<()>>,
    rocksdb: Option<Arc<RocksProjector>>,
    /// The embedded backend's journal (none in cluster mode).
    journal: Option<Arc<Journal>>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        Application::build_with(settings, Vec::new()).await
    }

    /// Builds the service with `extra` projectors beside the configured ones (tests and embedders).
    pub async fn build_with(
        settings: Settings,
        extra: Vec<Arc<dyn Projector>>,
    ) -> Result<Application, StartupError> {
        check_settings(&settings)?;
        let external = match &settings.queue {
            Some(_) if settings.storage.backend == Backend::Postgresql => {
                return Err(StartupError::Queue(
                    "cluster mode (storage.backend = \"postgresql\") reads its tasks from PostgreSQL: \
                     remove the queue settings (QUEUE_CONNECTIONSTRING)"
                        .into(),
                ))
            }
            Some(queue) => external_projectors(queue, &settings)?,
            None => Vec::new(),
        };
        // The journal writes the local keyspaces itself unless a broker carries their tasks.
        let keyspaces_in_journal = settings.storage.backend == Backend::Rocksdb
            && settings.queue.is_none()
            && enabled(ProjectorKind::Rocksdb, &settings);
        let (mut registry, mut rocksdb) =
            open_registry(&settings, &external, keyspaces_in_journal, extra)?;
        let (shutdown, stop) = watch::channel(false);
        let broker = settings.queue.clone().map(|q| Arc::new(Broker::new(q)));
        let (storage, journal, background): (SharedStorage, _, _) = match settings.storage.backend {
            Backend::Rocksdb => {
                let journal = open_journal(&settings, &registry, keyspaces_in_journal).await?;
                registry.work_for(journal.id());
                match journal.keyspaces() {
                    Some(keyspaces) => {
                        let keyspaces = Arc::new(keyspaces);
                        registry.add(keyspaces.clone());
                        rocksdb = Some(keyspaces);
                    }
                    // What the journal kept moves out to a broker-fed projector, or goes.
                    None => {
                        let own = rocksdb.as_deref();
                        journal
                            .release_keyspaces(own)
                            .map_err(|source| StartupError::Journal {
                                path: settings.storage.data_dir.join("journal"),
                                source,
                            })?;
                    }
                }
                let background = embedded_projection(
                    &journal,
                    &registry,
                    broker.as_ref(),
                    &external,
                    &settings,
                    &stop,
                );
                let storage = EmbeddedStorage::open(journal.clone());
                (storage, Some(journal), background)
            }
            Backend::Postgresql => {
                let pg = open_cluster_storage(&settings, registry.names()).await?;
                registry.work_for(pg.journal_id());
                let background = registry
                    .iter()
                    .map(|projector| {
                        let (pg, projector) = (pg.clone(), projector.clone());
                        let batch = settings.projection.batch_for(projector.name());
                        supervised(
                            format!("projection {}", projector.name()),
                            stop.clone(),
                            move |stop| {
                                crate::storage::postgres::projection::run(
                                    pg.clone(),
                                    projector.clone(),
                                    batch,
                                    stop,
                                )
                            },
                        )
                    })
                    .collect();
                (pg, None, background)
            }
        };

        let address = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&address).map_err(|source| StartupError::Listen {
            address: address.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                address: address.clone(),
                source,
            })?
            .port();
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let master_keys = master_keys(&settings)?;
        if master_keys.is_none() {
            say_open(&settings);
        }
        let keys = match master_keys {
            Some(master_keys) => Some(
                KeyStore::open(storage.clone(), master_keys)
                    .await
                    .map_err(StartupError::Storage)?,
            ),
            None => None,
        };
        let audit = AuditLog::start(
            storage.clone(),
            Duration::from_secs(u64::from(settings.auth.audit_retention_days) * 86_400),
        );
        tokio::spawn(crate::feed::compact(
            Arc::downgrade(&storage),
            Duration::from_secs(settings.changes.tombstone_retention_secs),
            Duration::from_secs(settings.changes.compact_interval_secs.max(1)),
        ));
        crate::write::evolution::set_unique_room(settings.server.max_counted_unique_values);
        let (closing, closing_receiver) = watch::channel(false);
        let followers = Arc::new(Followers::default());
        let state = web::Data::new(AppState {
            storage,
            registry,
            broker,
            in_flight: crate::budget::InFlight::new(settings.server.max_inflight_bytes),
            bulk_places: Arc::new(tokio::sync::Semaphore::new(
                match settings.server.max_concurrent_bulk {
                    0 => workers.saturating_mul(2),
                    n => n,
                }
                .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            keys,
            failed_logins: crate::auth::limit::FailedLogins::new(
                settings.auth.failed_logins_per_minute,
            ),
            trusted_proxies: trusted_proxies(&settings)?,
            audit,
            followers: followers.clone(),
            closing: closing_receiver,
            readiness: Default::default(),
            metrics_text: Default::default(),
            settings,
        });
        let requests = web::Data::new(http::observe::RequestMetrics::default());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(requests.clone())
                .wrap(actix_web::middleware::from_fn(http::auth::authenticate))
                .wrap(actix_web::middleware::from_fn(http::observe::observe))
                .configure(http::configure)
        })
        .on_connect(http::changes::PeerSocket::keep)
        .workers(workers)
        .backlog(4096)
        // `stop_on_signals` stops it, ending the change feed's streams first.
        .disable_signals()
        .listen(listener)
        .map_err(|source| StartupError::Listen { address, source })?
        .run();
        tracing::info!(port, "dstore is serving");
        Ok(Application {
            port,
            server,
            closing: Arc::new(closing),
            followers,
            shutdown,
            background,
            rocksdb,
            journal,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The embedded keyspace projector, when enabled (tests read it directly).
    pub fn rocksdb(&self) -> Option<Arc<RocksProjector>> {
        self.rocksdb.clone()
    }

    /// Stops the server gracefully from elsewhere (tests, signal handlers of embedders).
    pub fn handle(&self) -> StopHandle {
        StopHandle {
            server: self.server.handle(),
            closing: self.closing.clone(),
            followers: self.followers.clone(),
        }
    }

    /// Stops gracefully on SIGINT or SIGTERM (what `dstore serve` does).
    pub fn stop_on_signals(&self) {
        let handle = self.handle();
        tokio::spawn(async move {
            stop_signal().await;
            tracing::info!("stopping");
            handle.stop(true).await;
        });
    }

    /// The embedded backend's journal (tests read it directly); none in cluster mode.
    pub fn journal(&self) -> Option<Arc<Journal>> {
        self.journal.clone()
    }

    /// Serves until SIGINT/SIGTERM (handled by the server), then stops the projection loops.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        let _ = self.shutdown.send(true);
        for task in self.background {
            let _ = task.await;
        }
        if let Some(journal) = &self.journal {
            journal.close().await;
        }
        // The databases close when their last handle goes; the HTTP workers drop theirs on their own
        // threads. Wait for that, so "stopped" means another process may open the data directory.
        let journal = self.journal.as_ref().map(Arc::downgrade);
        let catalog = self.journal.as_ref().map(|j| Arc::downgrade(j.catalog()));
        let keyspaces = self.rocksdb.as_ref().map(Arc::downgrade);
        drop(self.journal);
        drop(self.rocksdb);
        let released = || {
            journal.as_ref().is_none_or(|j| j.strong_count() == 0)
                && catalog.as_ref().is_none_or(|c| c.strong_count() == 0)
                && keyspaces.as_ref().is_none_or(|k| k.strong_count() == 0)
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !released() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::info!("dstore stopped");
        result
    }
}

/// Every enabled projector: the configured stores (the keyspaces too, unless a worker keeps them
/// or the journal writes them) and `extra`.
fn open_registry(
    settings: &Settings,
    external: &[ProjectorKind],
    keyspaces_in_journal: bool,
    extra: Vec<Arc<dyn Projector>>,
) -> Result<(Registry, Option<Arc<RocksProjector>>), StartupError> {
    let mut projectors: Vec<Arc<dyn Projector>> = Vec::new();
    let mut elsewhere = Vec::new();
    let mut rocksdb = None;
    for kind in ProjectorKind::ALL
        .into_iter()
        .filter(|k| enabled(*k, settings))
    {
        match kind {
            // The keyspaces of `dstore worker --projector rocksdb` live in the worker's directory.
            ProjectorKind::Rocksdb if external.contains(&kind) => elsewhere.push(kind.name()),
            // Added once the journal is open (see `Application::build_with`).
            ProjectorKind::Rocksdb if keyspaces_in_journal => {}
            ProjectorKind::Rocksdb => {
                let projector = open_keyspaces(settings)?;
                rocksdb = Some(projector.clone());
                projectors.push(projector);
            }
            ProjectorKind::Postgresql | ProjectorKind::Elasticsearch => {
                projectors.push(open_projector(kind, settings)?)
            }
        }
    }
    projectors.extend(extra);
    let mut registry = Registry::new(projectors);
    for name in elsewhere {
        registry.add_elsewhere(name);
    }
    Ok((registry, rocksdb))
}

/// The embedded backend: the catalog and the journal in the data directory, made whole again
/// after a crash and brought to today's store layout.
async fn open_journal(
    settings: &Settings,
    registry: &Registry,
    keyspaces: bool,
) -> Result<Arc<Journal>, StartupError> {
    let data_dir = settings.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| StartupError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let catalog_dir = settings.storage.catalog_dir();
    let catalog = Arc::new(
        Catalog::open(&catalog_dir)
            .map_err(|source| StartupError::Catalog {
                path: catalog_dir,
                source,
            })?
            .with_max_projects(settings.storage.max_projects)
            .with_max_bytes(settings.storage.max_catalog_bytes),
    );
    let journal_dir = data_dir.join("journal");
    let failed = |source| StartupError::Journal {
        path: journal_dir.clone(),
        source,
    };
    let journal_settings = JournalSettings {
        durability: settings.storage.durability,
        max_pending: settings.projection.max_pending_tasks,
        keyspaces,
        min_free_bytes: settings.storage.min_free_disk_mb.saturating_mul(1 << 20),
    };
    let journal =
        Journal::open(&journal_dir, catalog, registry.names(), journal_settings).map_err(failed)?;
    // Keyspaces an earlier dstore kept in a database of their own move into the journal.
    journal
        .import_keyspaces(&data_dir.join("keyspaces"))
        .map_err(failed)?;
    journal.keep_keyspaces().await.map_err(failed)?;
    journal.resume_backfills().map_err(failed)?;
    journal.catch_up_added().await.map_err(failed)?;
    journal.finish_drops().await.map_err(failed)?;
    journal.reconcile().await.map_err(failed)?;
    journal.upgrade_layout().await.map_err(failed)?;
    Ok(journal)
}

/// The embedded backend's projection: a dispatcher per projector, or the RabbitMQ relay, report
/// collector and consumers.
fn embedded_projection(
    journal: &Arc<Journal>,
    registry: &Registry,
    broker: Option<&Arc<Broker>>,
    external: &[ProjectorKind],
    settings: &Settings,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let batch = settings.projection.batch_size;
    let Some(broker) = broker else {
        // Projectors without tasks (the keyspaces the journal writes) need no dispatcher.
        let lanes: Vec<&str> = journal.projectors().collect();
        return registry
            .iter()
            .filter(|p| lanes.contains(&p.name()))
            .map(|p| {
                let (journal, p) = (journal.clone(), p.clone());
                let batch = settings.projection.batch_for(p.name());
                supervised(
                    format!("dispatcher {}", p.name()),
                    stop.clone(),
                    move |stop| dispatcher::run(journal.clone(), p.clone(), batch, stop),
                )
            })
            .collect();
    };
    // A relay per projector, each on a connection of its own: trouble with one projector's
    // queue (a policy refusing its publishes, its node down) holds back that projector only.
    let mut tasks: Vec<_> = registry
        .names()
        .into_iter()
        .map(|name| {
            let (journal, broker) = (journal.clone(), broker.clone());
            supervised(format!("relay {name}"), stop.clone(), move |stop| {
                rabbitmq::relay::run(journal.clone(), broker.clone(), name, batch, stop)
            })
        })
        .collect();
    tasks.extend([supervised("reports".into(), stop.clone(), {
        let (journal, broker) = (journal.clone(), broker.clone());
        move |stop| rabbitmq::reports::collect(journal.clone(), broker.clone(), stop)
    })]);
    let view = Arc::new(CatalogView::Local(journal.catalog().clone()));
    let external: Vec<&str> = external.iter().map(|k| k.name()).collect();
    for projector in registry.iter().filter(|p| !external.contains(&p.name())) {
        let (broker, projector, view) = (broker.clone(), projector.clone(), view.clone());
        let deployment = journal.id().to_string();
        let batch = settings.projection.batch_for(projector.name());
        tasks.push(supervised(
            format!("consumer {}", projector.name()),
            stop.clone(),
            move |stop| {
                rabbitmq::consumer::run(
                    broker.clone(),
                    projector.clone(),
                    view.clone(),
                    batch,
                    Some(deployment.clone()),
                    stop,
                )
            },
        ));
    }
    tasks
}

/// Cluster mode: the catalog and the journal in PostgreSQL, shared with the other nodes.
async fn open_cluster_storage(
    settings: &Settings,
    projectors: Vec<&'static str>,
) -> Result<Arc<PgStorage>, StartupError> {
    let url = settings.storage.url.clone().ok_or_else(|| {
        StartupError::Unconfigured(
            "storage.backend = \"postgresql\" needs storage.url (DSTORE_STORAGE_URL)".into(),
        )
    })?;
    if settings.storage.commit_timeout_secs == 0 {
        return Err(StartupError::Unconfigured(
            "storage.commit_timeout_secs (DSTORE_COMMIT_TIMEOUT_SECS) must be at least 1".into(),
        ));
    }
    if settings.storage.query_timeout_secs == 0 {
        return Err(StartupError::Unconfigured(
            "storage.query_timeout_secs (DSTORE_QUERY_TIMEOUT_SECS) must be at least 1".into(),
        ));
    }
    wait_for_storage(&url).await;
    PgStorage::open(PgStorageSettings {
        url,
        schema: settings.storage.schema.clone(),
        node: node_name(settings),
        projectors,
        projection: settings.projection.clone(),
        max_projects: settings.storage.max_projects,
        max_catalog_bytes: settings.storage.max_catalog_bytes,
        commit_timeout: Duration::from_secs(settings.storage.commit_timeout_secs),
        query_timeout: Duration::from_secs(settings.storage.query_timeout_secs),
    })
    .await
    .map_err(StartupError::Storage)
}

/// Waits until the storage's PostgreSQL takes connections: a node started while it is out of reach
/// (a failover, a host up before its database, a name not resolving yet) or starting up, shutting
/// down or out of connections waits for it, saying so, rather than exiting and staying down until
/// something starts it again. Any other refusal (a password, a database that does not exist) is
/// for [`PgStorage::open`] to report.
async fn wait_for_storage(url: &crate::config::SecretUrl) {
    use sqlx::Connection;
    let Ok(options) = url.expose().parse::<sqlx::postgres::PgConnectOptions>() else {
        return;
    };
    let mut wait = Duration::from_secs(1);
    loop {
        let tried = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::PgConnection::connect_with(&options),
        )
        .await;
        let reason = match tried {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                return;
            }
            Ok(Err(sqlx::Error::Io(error))) => error.to_string(),
            // Starting up, shutting down, or out of connections: a moment's state.
            Ok(Err(sqlx::Error::Database(error)))
                if matches!(
                    error.code().as_deref(),
                    Some("57P03" | "57P01" | "57P02" | "53300")
                ) =>
            {
                error.to_string()
            }
            Ok(Err(_)) => return,
            Err(_) => "no answer within 5 s".to_string(),
        };
        tracing::warn!(
            %reason,
            retry_in_secs = wait.as_secs(),
            "the storage (storage.url) cannot be reached; waiting for the storage before serving"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// This node's name in leases: `storage.node`, else the host name and the process id.
fn node_name(settings: &Settings) -> String {
    settings.storage.node.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "dstore".into());
        format!("{host}-{}", std::process::id())
    })
}

/// The fewest different characters a master key holds (see [`master_keys`]).
const MIN_DISTINCT_KEY_CHARACTERS: usize = 6;

/// Whether `key` has fewer than [`MIN_DISTINCT_KEY_CHARACTERS`] different bytes, or is one
/// shorter text repeated (its last repetition may be cut short).
fn guessable(key: &[u8]) -> bool {
    let mut seen = [false; 256];
    key.iter().for_each(|b| seen[usize::from(*b)] = true);
    let distinct = seen.iter().filter(|s| **s).count();
    let repeated = (1..=key.len() / 2).any(|period| key[period..] == key[..key.len() - period]);
    distinct < MIN_DISTINCT_KEY_CHARACTERS || repeated
}

/// The master keys, or `None` when requests need no key: authentication turned off explicitly, or
/// no master key and a loopback address ([`say_open`] says so at start). Refuses a key shorter than 16 bytes or
/// with a character other than visible ASCII, and serving without a key on an address other
/// machines reach.
fn master_keys(settings: &Settings) -> Result<Option<Vec<Secret>>, StartupError> {
    let auth = &settings.auth;
    let mut keys = auth.master_keys.clone();
    if let Some(path) = &auth.master_key_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            StartupError::Auth(format!(
                "cannot read the master key file {} (auth.master_key_file / DSTORE_MASTER_KEY_FILE): {e}",
                path.display()
            ))
        })?;
        let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Err(StartupError::Auth(format!(
                "the master key file {} (auth.master_key_file / DSTORE_MASTER_KEY_FILE) holds no \
                 key: authentication would be off; put the key on its first line",
                path.display()
            )));
        };
        keys.push(Secret::from(line));
    }
    // A request carries its key in the `Authorization` header, as `Bearer <key>`: a key with a
    // character such a header cannot hold (or that its reading trims or splits) could never be sent.
    if let Some(odd) = keys
        .iter()
        .position(|k| !k.expose().bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(StartupError::Auth(format!(
            "master key {} holds a space, a control character or a non-ASCII one: a request could \
             never send it (keys are visible ASCII: letters, digits, punctuation)",
            odd + 1
        )));
    }
    if let Some(short) = keys.iter().position(|k| k.expose().len() < 16) {
        return Err(StartupError::Auth(format!(
            "master key {} is shorter than 16 bytes; use a long random one (e.g. `openssl rand -hex 32`)",
            short + 1
        )));
    }
    // Long but made of a few characters or of one repeated (`aaaaaaaaaaaaaaaa`,
    // `passwordpassword`), a key is a guess away. A random key is neither: 16 random hex digits
    // have fewer than 6 different ones about once in 30,000 draws.
    if let Some(plain) = keys.iter().position(|k| guessable(k.expose().as_bytes())) {
        return Err(StartupError::Auth(format!(
            "master key {} repeats itself or has fewer than {MIN_DISTINCT_KEY_CHARACTERS} \
             distinct characters, so it is easily guessed; use a long random one (e.g. `openssl \
             rand -hex 32`)",
            plain + 1
        )));
    }
    if auth.disabled && !keys.is_empty() {
        // Which one was meant cannot be told: an operator who added a master key to a
        // configuration that turned authentication off believes the routes are closed.
        return Err(StartupError::Auth(
            "auth.disabled is set and so is a master key: with authentication off the master key \
             would close nothing; remove one of the two"
                .into(),
        ));
    }
    if auth.disabled {
        return Ok(None);
    }
    if !keys.is_empty() {
        return Ok(Some(keys));
    }
    let host = settings.server.host.as_str();
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(StartupError::Auth(format!(
            "dstore would serve every route without authentication on {host}: set a master key \
             (DSTORE_MASTER_KEY, or auth.master_key_file), serve on 127.0.0.1, or set \
             auth.disabled = true to accept that"
        )));
    }
    Ok(None)
}

/// Says at start why every route is open ([`master_keys`] found none needed).
fn say_open(settings: &Settings) {
    if settings.auth.disabled {
        tracing::warn!(
            "authentication is off (auth.disabled): every route is open to whoever reaches dstore"
        );
        if settings.auth.allowed_hosts.is_empty() {
            tracing::warn!(
                "auth.allowed_hosts is empty: a web page whose name a DNS rebinding points at this \
                 address can read and change everything from its visitor's browser; list the \
                 names clients use in DSTORE_ALLOWED_HOSTS"
            );
        }
    } else {
        tracing::warn!(
            host = settings.server.host.as_str(),
            "no master key: serving on a loopback address only, every route open"
        );
    }
}

/// Whether a projector is configured in `settings`. The embedded keyspaces live on one machine's
/// disk, so cluster mode, where any node applies any project's tasks, does not run them.
fn enabled(kind: ProjectorKind, settings: &Settings) -> bool {
    match kind {
        ProjectorKind::Rocksdb => {
            settings.projection.rocksdb && settings.storage.backend == Backend::Rocksdb
        }
        ProjectorKind::Postgresql => settings.postgresql.is_some(),
        ProjectorKind::Elasticsearch => settings.elasticsearch.is_some(),
    }
}

/// Every check of the settings `serve` makes before it opens anything (`dstore check-config` runs
/// them too): the settings below, the master keys, cluster mode's URL and the queue's settings.
pub fn check_settings(settings: &Settings) -> Result<(), StartupError> {
    validate_durations(settings)?;
    if let Err(reason) = crate::telemetry::check_level(&settings.log.level) {
        return Err(StartupError::Setting(format!(
            "log.level (DSTORE_LOG) = {:?} is not a level or filter such as \"info\" or \
             \"dstore=debug,info\": {reason}",
            settings.log.level
        )));
    }
    if settings.storage.backend == Backend::Postgresql {
        crate::storage::postgres::check_schema(&settings.storage.schema)
            .map_err(|e| StartupError::Setting(e.to_string()))?;
    }
    master_keys(settings)?;
    check_names(settings)?;
    if settings.storage.backend == Backend::Postgresql && settings.storage.url.is_none() {
        return Err(StartupError::Unconfigured(
            "storage.backend = \"postgresql\" needs storage.url (DSTORE_STORAGE_URL)".into(),
        ));
    }
    if let Some(queue) = &settings.queue {
        validate_queue(queue)?;
    }
    Ok(())
}

/// `auth.public` names routes, `auth.allowed_hosts` host names and `auth.trusted_proxies`
/// addresses: a name that is not (a typo, a host with its port) would open, allow or trust
/// nothing, without a word, so it stops the start.
fn check_names(settings: &Settings) -> Result<(), StartupError> {
    const PUBLIC: [&str; 3] = ["ready", "metrics", "docs"];
    if let Some(name) = settings
        .auth
        .public
        .iter()
        .find(|name| !PUBLIC.contains(&name.as_str()))
    {
        return Err(StartupError::Setting(format!(
            "auth.public (DSTORE_AUTH_PUBLIC) names {name:?}, which is none of the routes it may \
             open: ready, metrics, docs"
        )));
    }
    // An IPv6 address has at least two colons; a name with one carries a port, which a request's
    // `Host` is compared without.
    if let Some(host) =
        settings.auth.allowed_hosts.iter().find(|host| {
            host.is_empty() || host.matches(':').count() == 1 || host.contains(['/', '['])
        })
    {
        return Err(StartupError::Setting(format!(
            "auth.allowed_hosts (DSTORE_ALLOWED_HOSTS) lists {host:?}, which is not a host name \
             or address as a request's Host carries it without its port (dstore, 10.0.0.5, ::1)"
        )));
    }
    trusted_proxies(settings)?;
    Ok(())
}

/// `auth.trusted_proxies`, each an address or a network.
fn trusted_proxies(
    settings: &Settings,
) -> Result<crate::auth::limit::TrustedProxies, StartupError> {
    crate::auth::limit::TrustedProxies::parse(&settings.auth.trusted_proxies).map_err(|entry| {
        StartupError::Setting(format!(
            "auth.trusted_proxies (DSTORE_TRUSTED_PROXIES) lists {entry:?}, which is neither an \
             address nor a network (10.0.0.5, 10.0.0.0/8, fd00::/8)"
        ))
    })
}

/// Retention and heartbeat settings are subtracted from the clock or offered to every follower:
/// out of range, a clean-up would purge everything or stop, so dstore refuses to start instead.
/// The HTTP server takes at most 512 workers; a rotation's grace at most 30 days.
fn validate_durations(settings: &Settings) -> Result<(), StartupError> {
    if settings.server.workers > 512 {
        return Err(StartupError::Setting(format!(
            "server.workers = {}: at most 512 (0 means one per core)",
            settings.server.workers
        )));
    }
    if settings.auth.rotation_grace_secs > 30 * 86_400 {
        return Err(StartupError::Setting(format!(
            "auth.rotation_grace_secs = {}: at most 2592000 (30 days)",
            settings.auth.rotation_grace_secs
        )));
    }
    const CENTURY_SECS: u64 = 100 * 365 * 86_400;
    let changes = &settings.changes;
    if changes.tombstone_retention_secs > CENTURY_SECS {
        return Err(StartupError::Setting(format!(
            "changes.tombstone_retention_secs = {}: at most {CENTURY_SECS} (a hundred years)",
            changes.tombstone_retention_secs
        )));
    }
    let heartbeats = crate::config::HEARTBEAT_SECS;
    if !heartbeats.contains(&changes.heartbeat_secs) {
        return Err(StartupError::Setting(format!(
            "changes.heartbeat_secs = {}: between {} and {}",
            changes.heartbeat_secs,
            heartbeats.start(),
            heartbeats.end()
        )));
    }
    const DAY_SECS: u64 = 86_400;
    for (name, value) in [
        (
            "projection.wait_timeout_secs",
            settings.projection.wait_timeout_secs,
        ),
        (
            "storage.commit_timeout_secs",
            settings.storage.commit_timeout_secs,
        ),
        (
            "storage.query_timeout_secs",
            settings.storage.query_timeout_secs,
        ),
    ] {
        if value > DAY_SECS {
            return Err(StartupError::Setting(format!(
                "{name} = {value}: at most {DAY_SECS} (a day)"
            )));
        }
    }
    if let Some(postgresql) = &settings.postgresql {
        if !(1..=3600).contains(&postgresql.lock_timeout_secs) {
            return Err(StartupError::Setting(format!(
                "postgresql.lock_timeout_secs = {}: between 1 and 3600",
                postgresql.lock_timeout_secs
            )));
        }
    }
    if settings.auth.audit_retention_days > 36_500 {
        return Err(StartupError::Setting(format!(
            "auth.audit_retention_days = {}: at most 36500 (a hundred years)",
            settings.auth.audit_retention_days
        )));
    }
    Ok(())
}

/// Checks what the queue settings say that the broker will be asked to use.
fn validate_queue(queue: &QueueSettings) -> Result<(), StartupError> {
    let valid_namespace = !queue.namespace.is_empty()
        && queue.namespace.len() <= 100
        && queue
            .namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid_namespace {
        return Err(StartupError::Queue(format!(
            "queue.namespace {:?} must be 1 to 100 letters, digits, '.', '_' or '-'",
            queue.namespace
        )));
    }
    if queue.prefetch == 0 {
        return Err(StartupError::Queue(
            "queue.prefetch must be at least 1 (0 would let a consumer hold every task)".into(),
        ));
    }
    Ok(())
}

/// The projectors `dstore worker` processes apply instead of this one; each must be enabled.
fn external_projectors(
    queue: &QueueSettings,
    settings: &Settings,
) -> Result<Vec<ProjectorKind>, StartupError> {
    validate_queue(queue)?;
    queue
        .external
        .iter()
        .map(|raw| match ProjectorKind::parse(raw) {
            Some(kind) if enabled(kind, settings) => Ok(kind),
            Some(kind) => Err(StartupError::Queue(format!(
                "queue.external names {kind}, which is not enabled here"
            ))),
            None => Err(StartupError::Queue(format!(
                "queue.external names {raw:?}; projectors are {}",
                ProjectorKind::names()
            ))),
        })
        .collect()
}

/// Opens the embedded keyspaces under the data directory.
pub fn open_keyspaces(settings: &Settings) -> Result<Arc<RocksProjector>, StartupError> {
    let data_dir = &settings.storage.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| StartupError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let path = data_dir.join("keyspaces");
    RocksProjector::open(&path)
        .and_then(|keyspaces| keyspaces.rewrite_old_tables().map(|()| Arc::new(keyspaces)))
        .map_err(|source| StartupError::Keyspaces { path, source })
}

/// Opens one projector from its settings (`dstore worker` runs exactly one).
pub fn open_projector(
    kind: ProjectorKind,
    settings: &Settings,
) -> Result<Arc<dyn Projector>, StartupError> {
    match kind {
        ProjectorKind::Rocksdb => Ok(open_keyspaces(settings)?),
        ProjectorKind::Postgresql => {
            let pg = settings.postgresql.as_ref().ok_or_else(|| {
                StartupError::Unconfigured(
                    "the postgresql projector has no settings (POSTGRESQL_HOST … or [postgresql])"
                        .into(),
                )
            })?;
            let projector = Arc::new(PostgresProjector::new(pg).map_err(StartupError::Postgres)?);
            // The store may be down or not yet created: dstore serves anyway and says so.
            tokio::spawn({
                let projector = projector.clone();
                async move { projector.announce().await }
            });
            Ok(projector)
        }
        ProjectorKind::Elasticsearch => {
            let es = settings.elasticsearch.as_ref().ok_or_else(|| {
                StartupError::Unconfigured(
                    "the elasticsearch projector has no settings (ELASTICSEARCH_HOST or [elasticsearch])"
                        .into(),
                )
            })?;
            // Sends nothing yet: an unreachable server only delays its tasks and shows in health.
            Ok(Arc::new(
                ElasticsearchProjector::new(es).map_err(StartupError::Elasticsearch)?,
            ))
        }
    }
}

/// Runs one projector as a `dstore worker`: consumes its queue until SIGINT or SIGTERM, reading the
/// catalog from the server at `server`.
pub async fn run_worker(
    settings: Settings,
    kind: ProjectorKind,
    server: &str,
) -> Result<(), StartupError> {
    if settings.storage.backend == Backend::Postgresql {
        return run_cluster_worker(settings, kind).await;
    }
    let queue = settings.queue.clone().ok_or_else(|| {
        StartupError::Unconfigured(
            "a worker takes its tasks from RabbitMQ: set QUEUE_CONNECTIONSTRING (or [queue] url)"
                .into(),
        )
    })?;
    validate_queue(&queue)?;
    let projector = open_projector(kind, &settings)?;
    let name = kind.name();
    if !queue
        .external
        .iter()
        .any(|n| ProjectorKind::parse(n) == Some(kind))
    {
        tracing::warn!(
            projector = name,
            "run dstore serve with queue.external (DSTORE_QUEUE_EXTERNAL) naming this projector; \
             otherwise serve consumes its queue too, and only one of them is active at a time"
        );
    }
    let broker = Arc::new(Broker::new(queue));
    let api_key = crate::config::env_var("DSTORE_API_KEY")
        .map_err(|e| StartupError::Unconfigured(e.to_string()))?
        .map(Secret::from);
    let view = Arc::new(CatalogView::remote(server, api_key));
    let (shutdown, stop) = watch::channel(false);
    tracing::info!(projector = name, queue = %broker.queue(name), server, "dstore worker is consuming");
    let mut consumer = tokio::spawn(rabbitmq::consumer::run(
        broker,
        projector,
        view,
        settings.projection.batch_for(name),
        None,
        stop,
    ));
    // The consumer runs until told to stop; one that ends by itself (a panic) would leave a
    // process that takes no task, which a supervisor would never start again: exit with an error.
    tokio::select! {
        _ = stop_signal() => {}
        ended = &mut consumer => {
            let why = match ended {
                Err(e) if e.is_panic() => "it panicked (see above)".to_string(),
                _ => "it ended by itself".to_string(),
            };
            return Err(StartupError::Stopped(format!(
                "the {name} worker's consumer stopped: {why}; exiting so that a supervisor starts \
                 it again"
            )));
        }
    }
    let _ = shutdown.send(true);
    let _ = consumer.await;
    tracing::info!(projector = name, "dstore worker stopped");
    Ok(())
}

/// Runs one projector in cluster mode: it claims cursors from the shared PostgreSQL storage like
/// any node does, until SIGINT or SIGTERM.
async fn run_cluster_worker(settings: Settings, kind: ProjectorKind) -> Result<(), StartupError> {
    let projector = open_projector(kind, &settings)?;
    let storage = open_cluster_storage(&settings, vec![kind.name()]).await?;
    projector.work_for(storage.journal_id());
    let (shutdown, stop) = watch::channel(false);
    tracing::info!(
        projector = kind.name(),
        node = storage.node(),
        "dstore worker is projecting"
    );
    let batch = settings.projection.batch_for(kind.name());
    let mut running = supervised(format!("projection {}", kind.name()), stop, move |stop| {
        crate::storage::postgres::projection::run(storage.clone(), projector.clone(), batch, stop)
    });
    // The projection runs until told to stop (started again after a panic); one that ends by
    // itself would leave a process that projects nothing, which a supervisor would never start
    // again: exit with an error.
    tokio::select! {
        _ = stop_signal() => {}
        _ = &mut running => {
            return Err(StartupError::Stopped(format!(
                "the {} worker's projection ended by itself; exiting so that a supervisor starts \
                 it again",
                kind.name()
            )));
        }
    }
    let _ = shutdown.send(true);
    let _ = running.await;
    tracing::info!(projector = kind.name(), "dstore worker stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(term) => { term.recv().await; }
                None => std::future::pending().await,
            }
        } => {}
    }
}

/// What `dstore check-config` reports for one store: its name and whether it answers.
pub struct StoreCheck {
    pub store: &'static str,
    pub setting: &'static str,
    pub result: Result<String, String>,
}

/// Checks every configured store without starting the service: the data directories are writable,
/// PostgreSQL and Elasticsearch answer, the RabbitMQ broker accepts connections.
pub async fn check_stores(settings: &Settings) -> Vec<StoreCheck> {
    let mut checks = Vec::new();
    let data_dir = &settings.storage.data_dir;
    let writable = std::fs::create_dir_all(data_dir)
        .and_then(|()| tempfile_in(data_dir))
        .map(|()| format!("{} is writable", data_dir.display()))
        .map_err(|e| format!("{}: {e}", data_dir.display()));
    checks.push(StoreCheck {
        store: "journal",
        setting: "storage.data_dir / LEVEL_PATH",
        result: writable,
    });
    if let Some(pg) = &settings.postgresql {
        let result = match PostgresProjector::new(pg) {
            Ok(projector) => health_result(projector.health().await),
            Err(e) => Err(e.to_string()),
        };
        checks.push(StoreCheck {
            store: "postgresql",
            setting: "postgresql.* / POSTGRESQL_*",
            result,
        });
    }
    if let Some(es) = &settings.elasticsearch {
        let result = match ElasticsearchProjector::new(es) {
            Ok(projector) => health_result(projector.health().await),
            Err(e) => Err(e.to_string()),
        };
        checks.push(StoreCheck {
            store: "elasticsearch",
            setting: "elasticsearch.url / ELASTICSEARCH_HOST",
            result,
        });
    }
    if let Some(queue) = &settings.queue {
        checks.push(StoreCheck {
            store: "rabbitmq",
            setting: "queue.url / QUEUE_CONNECTIONSTRING",
            result: broker_answers(queue).await,
        });
    }
    checks
}

fn health_result(health: crate::projector::Health) -> Result<String, String> {
    if health.reachable {
        Ok(health.detail)
    } else {
        Err(health.detail)
    }
}

fn tempfile_in(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".dstore-check-{}", std::process::id()));
    std::fs::write(&probe, b"probe")?;
    std::fs::remove_file(probe)
}

/// Whether the broker accepts dstore's login (the password is not repeated).
async fn broker_answers(queue: &QueueSettings) -> Result<String, String> {
    let broker = Broker::new(queue.clone());
    let shown = queue.url.redacted();
    match broker.connect("check-config").await {
        Ok(connection) => {
            let _ = connection.close(200, "checked".into()).await;
            Ok(format!("{shown} accepts the login"))
        }
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A misspelt log level or a storage schema PostgreSQL would read as another name stops
    /// dstore before anything starts (the schema before it waits for the storage), naming it.
    #[test]
    fn a_bad_log_level_or_storage_schema_is_refused_naming_the_setting() {
        let mut settings = Settings::default();
        assert!(check_settings(&settings).is_ok());
        settings.log.level = "dstore=verbose".into();
        let error = check_settings(&settings).expect_err("a bad level");
        assert!(error.to_string().contains("log.level"), "{error}");
        settings.log.level = "dstore=debug,info".into();
        assert!(check_settings(&settings).is_ok());
        settings.storage.backend = Backend::Postgresql;
        settings.storage.url = Some("postgres://h/db".to_string().into());
        settings.storage.schema = "Dstore".into();
        let error = check_settings(&settings).expect_err("a bad schema");
        assert!(error.to_string().contains("storage.schema"), "{error}");
    }

    /// A route `auth.public` cannot open, a host in `auth.allowed_hosts` with its port, or a
    /// trusted proxy that is no address, would open, allow or trust nothing without a word: it
    /// stops the start, naming the setting.
    #[test]
    fn a_public_route_or_allowed_host_that_matches_nothing_is_refused() {
        let mut settings = Settings::default();
        settings.auth.public = vec!["ready".into(), "metrics".into(), "docs".into()];
        settings.auth.allowed_hosts = vec!["dstore".into(), "10.0.0.5".into(), "::1".into()];
        assert!(check_settings(&settings).is_ok());
        settings.auth.public.push("readiness".into());
        let error = check_settings(&settings).expect_err("a typo");
        assert!(error.to_string().contains("auth.public"), "{error}");
        settings.auth.public.pop();
        for host in ["dstore:2020", "[::1]", ""] {
            settings.auth.allowed_hosts = vec![host.into()];
            let error = check_settings(&settings).expect_err(host);
            assert!(error.to_string().contains("auth.allowed_hosts"), "{error}");
        }
        settings.auth.allowed_hosts.clear();
        settings.auth.trusted_proxies = vec!["10.0.0.0/8".into(), "::1".into()];
        assert!(check_settings(&settings).is_ok());
        for proxy in ["haproxy", "10.0.0.0/40", "10.0.0.5:80"] {
            settings.auth.trusted_proxies = vec![proxy.into()];
            let error = check_settings(&settings).expect_err(proxy);
            assert!(
                error.to_string().contains("auth.trusted_proxies"),
                "{error}"
            );
        }
    }

    /// A wait or time limit past a day is a typo, not a plan: it stops dstore naming the setting,
    /// rather than overflowing a deadline when a request first waits that long.
    #[test]
    fn waits_and_time_limits_past_a_day_are_refused_naming_the_setting() {
        type Set = fn(&mut Settings, u64);
        let cases: [(&str, Set); 3] = [
            ("projection.wait_timeout_secs", |s, v| {
                s.projection.wait_timeout_secs = v
            }),
            ("storage.commit_timeout_secs", |s, v| {
                s.storage.commit_timeout_secs = v
            }),
            ("storage.query_timeout_secs", |s, v| {
                s.storage.query_timeout_secs = v
            }),
        ];
        for (name, set) in cases {
            let mut settings = Settings::default();
            set(&mut settings, 86_400);
            assert!(validate_durations(&settings).is_ok(), "{name}");
            for value in [86_401, u64::MAX] {
                set(&mut settings, value);
                let error = validate_durations(&settings).expect_err(name);
                assert!(error.to_string().contains(name), "{error}");
            }
        }
    }
}
