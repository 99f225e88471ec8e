//! The storage contract as tests: one test per behaviour, expanded for every backend (the embedded
//! RocksDB one and PostgreSQL), so both keep the same promises. The PostgreSQL tests use a schema of
//! their own in the database of `DSTORE_TEST_POSTGRES_URL` (`scripts/test.sh` provides the server);
//! a missing server fails them, never skips them.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use super::embedded::EmbeddedStorage;
use super::postgres::{PgStorage, PgStorageSettings};
use super::{Storage, StorageError};
use crate::blueprint::{parse_blueprint, Ident};
use crate::catalog::edit::Judged;
use crate::catalog::{Catalog, Compatibility, MigrationState};
use crate::config::ProjectionSettings;
use crate::journal::{Durability, Entry, Journal, JournalSettings};
use crate::write::{prepare_delete, prepare_upsert};

/// A storage under test and what must outlive it.
struct Fixture {
    storage: Arc<dyn Storage>,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl Fixture {
    async fn close(self) {
        drop(self.storage);
        if let Some(schema) = self.schema {
            drop_schema(&schema).await;
        }
    }
}

/// A connection of its own to the test database, with none of a node's time limits.
pub(crate) async fn plain_connection() -> sqlx::PgConnection {
    connect(&test_database().await).await
}

/// A connection of its own that has begun a transaction and run `statement` in it (a lock taken
/// as another node or an operator would hold it), until the caller ends it or drops it.
pub(crate) async fn holding(statement: &str) -> sqlx::PgConnection {
    let mut holder = plain_connection().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("BEGIN; {statement}")))
        .execute(&mut holder)
        .await
        .expect("the lock is taken");
    holder
}

/// Removes a schema [`open_postgresql`] made.
pub(crate) async fn drop_schema(schema: &str) {
    let mut conn = connect(&test_database().await).await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await;
}

/// A PostgreSQL storage in a schema of its own in the test database, as node `node` running
/// `projectors`; answers it and the schema's name.
pub(crate) async fn open_postgresql(
    node: &str,
    projectors: Vec<&'static str>,
) -> (Arc<PgStorage>, String) {
    let schema = format!("t_{}", Uuid::new_v4().simple());
    (open_postgresql_in(&schema, node, projectors).await, schema)
}

/// A PostgreSQL storage in `schema` of the test database (another node of a deployment when the
/// schema is one a storage made), as node `node` running `projectors`.
pub(crate) async fn open_postgresql_in(
    schema: &str,
    node: &str,
    projectors: Vec<&'static str>,
) -> Arc<PgStorage> {
    opening_postgresql_in(schema, node, projectors)
        .await
        .expect("the postgresql storage opens")
}

/// [`open_postgresql_in`] with no projectors, answering the error of a storage that does not open.
pub(crate) async fn try_open_postgresql_in(
    schema: &str,
    node: &str,
) -> Result<Arc<PgStorage>, StorageError> {
    opening_postgresql_in(schema, node, vec![]).await
}

async fn opening_postgresql_in(
    schema: &str,
    node: &str,
    projectors: Vec<&'static str>,
) -> Result<Arc<PgStorage>, StorageError> {
    PgStorage::open(PgStorageSettings {
        url: test_database().await.into(),
        schema: schema.into(),
        node: node.into(),
        projectors,
        projection: ProjectionSettings::default(),
        max_projects: MAX_PROJECTS,
        max_catalog_bytes: MAX_CATALOG_BYTES,
        commit_timeout: std::time::Duration::from_secs(30),
        query_timeout: std::time::Duration::from_secs(30),
    })
    .await
}

/// Most projects the storages under test hold: few, so that the limit is reached in a test.
const MAX_PROJECTS: usize = 20;

/// Most bytes of catalog the storages under test hold: little, so that the limit is reached in a
/// test (every other test's catalog stays far below it).
const MAX_CATALOG_BYTES: usize = 4 << 20;

async fn embedded() -> Fixture {
    let (storage, dir) = embedded_storage();
    Fixture {
        storage,
        _dir: Some(dir),
        schema: None,
    }
}

/// An embedded storage in a temporary directory, which must outlive it.
pub(crate) fn embedded_storage() -> (Arc<EmbeddedStorage>, tempfile::TempDir) {
    embedded_storage_keeping(0)
}

/// [`embedded_storage`] keeping `min_free_bytes` free on the journal's disk (more than any disk
/// holds: a nearly full disk).
pub(crate) fn embedded_storage_keeping(
    min_free_bytes: u64,
) -> (Arc<EmbeddedStorage>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let catalog = Arc::new(
        Catalog::open(&dir.path().join("catalog"))
            .expect("the catalog opens")
            .with_max_projects(MAX_PROJECTS)
            .with_max_bytes(MAX_CATALOG_BYTES),
    );
    let journal = Journal::open(
        &dir.path().join("journal"),
        catalog,
        vec!["rocksdb"],
        JournalSettings {
            durability: Durability::Buffered,
            max_pending: u64::MAX,
            keyspaces: false,
            min_free_bytes,
        },
    )
    .expect("the journal opens");
    (EmbeddedStorage::open(journal), dir)
}

/// An API key named `id`, allowed nothing.
pub(crate) fn test_key(id: &str) -> crate::auth::ApiKey {
    crate::auth::ApiKey {
        id: id.into(),
        name: "k".into(),
        description: String::new(),
        actions: Vec::new(),
        projects: Vec::new(),
        expires_at: None,
        created_at: chrono::Utc::now(),
        last_used_at: None,
        hash: "0".repeat(64),
        previous: None,
    }
}

/// An embedded storage in a temporary directory, which must outlive it.
pub(crate) async fn open_embedded() -> (Arc<dyn Storage>, tempfile::TempDir) {
    let fixture = embedded().await;
    let dir = fixture._dir.expect("an embedded storage has a directory");
    (fixture.storage, dir)
}

fn server_url() -> String {
    std::env::var("DSTORE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
        .trim_end_matches('/')
        .to_owned()
}

async fn connect(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach the test postgresql server at {url}: {e}; run scripts/test.sh, which \
             starts one, or point DSTORE_TEST_POSTGRES_URL at one"
        )
    })
}

/// The database the storage tests share (each in its own schema), made when missing.
async fn test_database() -> String {
    let name = "dstore_storage_tests";
    let mut admin = connect(&format!("{}/postgres", server_url())).await;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("the server answers");
    if !exists {
        // Another test may create it at the same moment: that is as good.
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await;
    }
    format!("{}/{name}", server_url())
}

async fn postgresql() -> Fixture {
    let (storage, schema) = open_postgresql("conformance", vec!["rocksdb"]).await;
    Fixture {
        storage,
        _dir: None,
        schema: Some(schema),
    }
}

fn ident(name: &str) -> Ident {
    Ident::parse(name).expect("an identifier")
}

pub(crate) async fn put_article(storage: &dyn Storage, project: &Ident, extra: Option<&str>) {
    let mut body = json!({
        "postgresql": {"table": "articles"}, "elasticsearch": {"type": "article"},
        "columns": {"title": {"type": "string"}}
    });
    if let Some(column) = extra {
        body["columns"][column] = json!({"type": "integer"});
    }
    let input = parse_blueprint(&body, "").expect("a valid blueprint");
    storage
        .put_blueprint(project, &ident("article"), input)
        .await
        .expect("the blueprint is stored");
}

/// The article blueprint with `columns` more columns, each with a default of 4000 bytes.
pub(crate) fn wide_article(columns: usize) -> crate::blueprint::BlueprintInput {
    let mut body = json!({
        "postgresql": {"table": "articles"}, "elasticsearch": {"type": "article"},
        "columns": {"title": {"type": "string"}}
    });
    for c in 0..columns {
        body["columns"][format!("c{c}")] = json!({"type": "string", "default": "d".repeat(4000)});
    }
    parse_blueprint(&body, "").expect("a valid blueprint")
}

/// Puts blueprint `article` with a `title` and `columns` text columns more, each with a default of
/// 4,000 characters: the version frozen from it makes every copy of an item written before it
/// about `columns` times 4 KB.
pub(crate) async fn put_wide_article(storage: &dyn Storage, project: &Ident, columns: usize) {
    let input = wide_article(columns);
    storage
        .put_blueprint(project, &ident("article"), input)
        .await
        .expect("the blueprint is stored");
}

/// A project `p` with blueprint `article` (a `title`) frozen at version 1.
pub(crate) async fn frozen(storage: &dyn Storage) -> Ident {
    let project = ident("p");
    put_article(storage, &project, None).await;
    storage.freeze(&project, false).await.expect("version 1");
    project
}

pub(crate) fn upsert(
    storage: &dyn Storage,
    project: &Ident,
    id: Uuid,
    title: &str,
) -> (u64, Entry) {
    let snapshot = storage.snapshot();
    let body = json!({"project_version": 1, "title": title});
    let entry =
        prepare_upsert(&snapshot, project, &ident("article"), id, &body).expect("a valid item");
    (snapshot.projects[project].epoch, entry)
}

/// Writes an `article` of version 1; answers its revision.
pub(crate) async fn write(storage: &dyn Storage, project: &Ident, id: Uuid, title: &str) -> u64 {
    let (epoch, entry) = upsert(storage, project, id, title);
    storage
        .write(project, epoch, vec![entry])
        .await
        .expect("the write is acknowledged")[0]
}

// ---- the behaviours ----

async fn a_blueprint_put_creates_the_project_and_is_seen_at_once(storage: Arc<dyn Storage>) {
    let project = ident("p");
    put_article(storage.as_ref(), &project, None).await;
    let snapshot = storage.snapshot();
    let p = snapshot.project(&project).expect("the project exists");
    assert!(p.working.blueprints.contains_key("article"));
    assert!(p.versions.is_empty());
}

async fn versions_are_numbered_from_one_and_a_freeze_without_changes_conflicts(
    storage: Arc<dyn Storage>,
) {
    let project = frozen(storage.as_ref()).await;
    assert!(matches!(
        storage.freeze(&project, false).await,
        Err(StorageError::Conflict(_))
    ));
    put_article(storage.as_ref(), &project, Some("views")).await;
    let (version, _) = storage.freeze(&project, false).await.expect("version 2");
    assert_eq!(version.number, 2);
    assert_eq!(storage.snapshot().projects[&project].versions.len(), 2);
}

async fn revisions_strictly_increase_in_the_order_writes_are_acknowledged(
    storage: Arc<dyn Storage>,
) {
    let project = frozen(storage.as_ref()).await;
    let mut last = 0;
    for i in 0..20 {
        let revision = write(storage.as_ref(), &project, Uuid::new_v4(), &format!("{i}")).await;
        assert!(revision > last, "{revision} after {last}");
        if storage.backend() == "postgresql" && last > 0 {
            assert_eq!(revision, last + 1, "revisions of a project are gap-free");
        }
        last = revision;
    }
}

async fn concurrent_writes_are_all_acknowledged_with_distinct_revisions(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let writers: Vec<_> = (0..32)
        .map(|i| {
            let (storage, project) = (storage.clone(), project.clone());
            tokio::spawn(async move {
                let (epoch, entry) =
                    upsert(storage.as_ref(), &project, Uuid::new_v4(), &format!("{i}"));
                let (_, second) = upsert(storage.as_ref(), &project, Uuid::new_v4(), "b");
                storage
                    .write(&project, epoch, vec![entry, second])
                    .await
                    .expect("acknowledged")
            })
        })
        .collect();
    let mut revisions = Vec::new();
    for writer in writers {
        let mine = writer.await.expect("the writer ends");
        assert!(
            mine[0] < mine[1],
            "a write's entries keep their order: {mine:?}"
        );
        revisions.extend(mine);
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 64);
    if storage.backend() == "postgresql" {
        assert_eq!(revisions[63] - revisions[0], 63, "gap-free: {revisions:?}");
    }
}

async fn a_write_prepared_before_the_versions_moved_is_refused_as_stale(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let (epoch, entry) = upsert(storage.as_ref(), &project, Uuid::new_v4(), "old");
    put_article(storage.as_ref(), &project, Some("views")).await;
    storage.freeze(&project, false).await.expect("version 2");
    assert!(matches!(
        storage.write(&project, epoch, vec![entry]).await,
        Err(StorageError::Stale)
    ));
    // Prepared again, it goes through and carries the new version.
    let (epoch, entry) = upsert(storage.as_ref(), &project, Uuid::new_v4(), "new");
    assert_ne!(epoch, 0);
    storage
        .write(&project, epoch, vec![entry])
        .await
        .expect("acknowledged");
}

async fn retiring_a_version_moves_the_epoch(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let before = storage.snapshot().projects[&project].epoch;
    storage.retire(&project, 1).await.expect("retired");
    let snapshot = storage.snapshot();
    assert!(snapshot.projects[&project].is_retired(1));
    assert_ne!(snapshot.projects[&project].epoch, before);
}

async fn an_item_reads_back_its_latest_state_and_a_delete_removes_it(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let id = Uuid::new_v4();
    write(storage.as_ref(), &project, id, "first").await;
    let revision = write(storage.as_ref(), &project, id, "second").await;
    let record = storage
        .item(&project, &ident("article"), &id)
        .await
        .expect("readable")
        .expect("present");
    assert_eq!(
        (record.revision, &record.body["title"]),
        (revision, &json!("second"))
    );
    // The uid a delete needs reads from the record's header alone.
    let uid = storage
        .item_blueprint_uid(&project, &ident("article"), &id)
        .await
        .expect("readable");
    assert_eq!(uid, Some(record.blueprint_uid));
    assert_ne!(record.blueprint_uid, 0);
    let snapshot = storage.snapshot();
    let delete = prepare_delete(
        &snapshot,
        &project,
        &ident("article"),
        id,
        Some(record.blueprint_uid),
    )
    .expect("a delete");
    storage
        .write(&project, snapshot.projects[&project].epoch, vec![delete])
        .await
        .expect("acknowledged");
    assert!(storage
        .item(&project, &ident("article"), &id)
        .await
        .expect("readable")
        .is_none());
    assert_eq!(
        storage
            .item_blueprint_uid(&project, &ident("article"), &id)
            .await
            .expect("readable"),
        None
    );
}

async fn a_freeze_records_its_back_fill_and_ensuring_one_adds_no_second(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    assert!(storage.backfill_state(&project, 1).await.unwrap().is_none());
    put_article(storage.as_ref(), &project, Some("views")).await;
    storage.freeze(&project, false).await.expect("version 2");
    assert!(storage.backfill_state(&project, 2).await.unwrap().is_some());
    assert!(!storage.ensure_backfill(&project, 2).await.unwrap());
}

async fn migration_states_are_recorded_per_projector(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let pending = &storage.snapshot().projects[&project].status[&1].migrations["rocksdb"];
    assert_eq!(pending, &MigrationState::Pending);
    storage
        .set_migration(&project, 1, "rocksdb", MigrationState::Done, None)
        .await
        .expect("recorded");
    let snapshot = storage.snapshot();
    assert_eq!(
        snapshot.projects[&project].status[&1].migrations["rocksdb"],
        MigrationState::Done
    );
    // A migration of the project dropped since, ending after it was made again (its version 1
    // pending), is not recorded on the new one; the new one's own is.
    let earlier = storage.snapshot().projects[&project].working.born + 1;
    storage.drop_project(&project).await.expect("dropped");
    let again = frozen(storage.as_ref()).await;
    let born = storage.snapshot().projects[&again].working.born;
    assert!(earlier <= born);
    for (task, expected) in [
        (earlier, MigrationState::Pending),
        (born + 1, MigrationState::Done),
    ] {
        storage
            .set_migration(&again, 1, "rocksdb", MigrationState::Done, Some(task))
            .await
            .expect("answered");
        let snapshot = storage.snapshot();
        assert_eq!(
            snapshot.projects[&again].status[&1].migrations["rocksdb"], expected,
            "task {task}, born {born}"
        );
    }
}

async fn a_dropped_project_is_forgotten_and_can_be_made_again(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let id = Uuid::new_v4();
    let before = write(storage.as_ref(), &project, id, "old").await;
    let dropped = storage.drop_project(&project).await.expect("dropped");
    assert!(dropped > before);
    assert!(!storage.snapshot().projects.contains_key(&project));
    assert!(storage
        .item(&project, &ident("article"), &id)
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        storage.drop_project(&project).await,
        Err(StorageError::NotFound(_))
    ));
    let again = frozen(storage.as_ref()).await;
    let after = write(storage.as_ref(), &again, Uuid::new_v4(), "new").await;
    assert!(
        after > dropped,
        "revisions keep growing across a drop: {after} after {dropped}"
    );
    assert_eq!(storage.snapshot().projects[&again].versions.len(), 1);
    // Projectors pass over the earlier project's tasks: all at or below its birth, the new
    // project's above it.
    let born = storage.snapshot().projects[&again].working.born;
    assert!(
        born >= dropped && born < after,
        "born {born}, dropped {dropped}, after {after}"
    );
}

async fn a_new_project_past_the_most_is_refused_and_existing_ones_go_on(storage: Arc<dyn Storage>) {
    for n in 0..MAX_PROJECTS {
        put_article(storage.as_ref(), &ident(&format!("p{n}")), None).await;
    }
    let body = json!({"postgresql": {"table": "articles"}, "elasticsearch": {"type": "article"},
        "columns": {"title": {"type": "string"}}});
    let article = || parse_blueprint(&body, "").unwrap();
    let refused = storage
        .put_blueprint(&ident("one_more"), &ident("article"), article())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, StorageError::Conflict(m) if m.contains("storage.max_projects")),
        "{refused:?}"
    );
    assert!(!storage.snapshot().projects.contains_key(&ident("one_more")));
    // A project that exists is still edited, and a drop makes room.
    put_article(storage.as_ref(), &ident("p0"), Some("words")).await;
    storage.drop_project(&ident("p1")).await.unwrap();
    put_article(storage.as_ref(), &ident("one_more"), None).await;
    // The dropped project does not come back past the limit either.
    let refused = storage
        .put_blueprint(&ident("p1"), &ident("article"), article())
        .await
        .unwrap_err();
    assert!(matches!(refused, StorageError::Conflict(_)), "{refused:?}");
}

/// The whole catalog is bounded in bytes (`storage.max_catalog_bytes`), not only each project: an
/// edit or a freeze that would grow it past the most is refused with nothing written, while edits
/// that do not grow it go on and a drop makes room.
async fn an_edit_growing_the_catalog_past_its_most_is_refused_and_others_go_on(
    storage: Arc<dyn Storage>,
) {
    // About 1.6 MB each as JSON: the blueprint, and the change that made it.
    put_wide_article(storage.as_ref(), &ident("a"), 200).await;
    put_wide_article(storage.as_ref(), &ident("b"), 200).await;
    let refused = storage
        .put_blueprint(&ident("c"), &ident("article"), wide_article(200))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, StorageError::Conflict(m) if m.contains("storage.max_catalog_bytes")),
        "{refused:?}"
    );
    assert!(!storage.snapshot().projects.contains_key(&ident("c")));
    // A freeze adds a version as large as the blueprints: refused too, nothing frozen.
    let refused = storage.freeze(&ident("b"), false).await.unwrap_err();
    assert!(
        matches!(&refused, StorageError::Conflict(m) if m.contains("storage.max_catalog_bytes")),
        "{refused:?}"
    );
    assert!(storage.snapshot().projects[&ident("b")].versions.is_empty());
    // An edit that does not grow its project goes on; a drop makes room.
    put_wide_article(storage.as_ref(), &ident("b"), 10).await;
    storage.drop_project(&ident("a")).await.unwrap();
    storage
        .put_blueprint(&ident("c"), &ident("article"), wide_article(200))
        .await
        .expect("room after the drop");
    storage
        .freeze(&ident("b"), false)
        .await
        .expect("a small freeze");
}

/// Key creations racing each other never pass the most keys together: exactly that many are made.
async fn racing_key_creations_never_pass_the_most(storage: Arc<dyn Storage>) {
    let key = |i: usize| crate::auth::ApiKey {
        hash: format!("{i:064}"),
        ..test_key(&format!("k{i:04}"))
    };
    let racing: Vec<_> = (0..24)
        .map(|i| {
            let storage = storage.clone();
            let key = key(i);
            tokio::spawn(async move { storage.put_key(&key, 5).await })
        })
        .collect();
    let mut made = 0;
    for creation in racing {
        made += usize::from(creation.await.unwrap().expect("written or refused"));
    }
    assert_eq!(made, 5);
    assert_eq!(storage.keys().await.unwrap().len(), 5);
    assert!(!storage.put_key(&key(99), 5).await.unwrap());
    assert!(storage.put_key(&key(99), 6).await.unwrap());
}

/// Two nodes' key caches: a change made through a node whose copy is stale never brings back a key
/// revoked through the other, nor undoes its rotation; a key's use never brings it back either.
async fn a_key_change_from_a_stale_copy_never_undoes_a_revocation_or_a_rotation(
    storage: Arc<dyn Storage>,
) {
    use crate::auth::keys::{KeyError, KeyInput, KeyStore};
    use crate::auth::Caller;
    let input = |v: serde_json::Value| serde_json::from_value::<KeyInput>(v).unwrap();
    let key = || input(json!({"name": "k", "actions": ["items.read"], "projects": ["*"]}));
    let first = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
    let (revoked, _) = first.create(&Caller::Master, key()).await.unwrap();
    let (rotated, _) = first.create(&Caller::Master, key()).await.unwrap();
    let second = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
    first.delete(&Caller::Master, &revoked.id).await.unwrap();
    let (rotated, _) = first
        .rotate(&Caller::Master, &rotated.id, Duration::ZERO)
        .await
        .unwrap();

    let touched = json!({"description": "changed through the other node"});
    let refused = second
        .update(&Caller::Master, &revoked.id, input(touched.clone()))
        .await;
    assert!(matches!(refused, Err(KeyError::NotFound(_))), "{refused:?}");
    storage
        .touch_key(&revoked.id, chrono::Utc::now())
        .await
        .unwrap();
    assert!(storage.key(&revoked.id).await.unwrap().is_none());
    assert!(!storage
        .keys()
        .await
        .unwrap()
        .iter()
        .any(|k| k.id == revoked.id));

    second
        .update(&Caller::Master, &rotated.id, input(touched))
        .await
        .unwrap();
    let stored = storage.key(&rotated.id).await.unwrap().unwrap();
    assert_eq!(stored.hash, rotated.hash, "the rotation was undone");
    assert_eq!(stored.description, "changed through the other node");
}

/// Changes of one key made at once through two nodes never undo each other: a narrowing and a
/// rotation stay whatever other change comes with them (each was made from the key as read, and
/// the later write took the other's place).
async fn key_changes_made_at_once_through_two_nodes_all_hold(storage: Arc<dyn Storage>) {
    use crate::auth::keys::{KeyInput, KeyStore};
    use crate::auth::Caller;
    let input = |v: serde_json::Value| serde_json::from_value::<KeyInput>(v).unwrap();
    let first = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
    let second = KeyStore::open(storage.clone(), Vec::new()).await.unwrap();
    for round in 0..20 {
        let (key, _) = first
            .create(
                &Caller::Master,
                input(
                    json!({"name": "k", "actions": ["items.read"], "projects": ["alpha", "beta"]}),
                ),
            )
            .await
            .unwrap();
        let description = json!({"description": format!("round {round}")});
        let (narrowed, described) = tokio::join!(
            first.update(
                &Caller::Master,
                &key.id,
                input(json!({"projects": ["alpha"]}))
            ),
            second.update(&Caller::Master, &key.id, input(description.clone())),
        );
        narrowed.unwrap();
        described.unwrap();
        let (rotated, described) = tokio::join!(
            first.rotate(&Caller::Master, &key.id, Duration::ZERO),
            second.update(&Caller::Master, &key.id, input(description)),
        );
        let (rotated, _) = rotated.unwrap();
        described.unwrap();
        let stored = storage.key(&key.id).await.unwrap().unwrap();
        assert_eq!(
            stored.projects.len(),
            1,
            "round {round}: the narrowing was undone"
        );
        assert_eq!(
            stored.hash, rotated.hash,
            "round {round}: the rotation was undone"
        );
        assert_eq!(stored.description, format!("round {round}"));
    }
}

async fn audit_entries_with_a_nul_are_stored_with_the_rest_of_their_batch(
    storage: Arc<dyn Storage>,
) {
    use crate::auth::audit::AuditEntry;
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    let entry = |path: &str, project: Option<&str>| AuditEntry {
        at: chrono::Utc::now(),
        key_id: "-".into(),
        key_name: "-".into(),
        action: "-".into(),
        project: project.map(Into::into),
        method: "PUT".into(),
        path: path.into(),
        status: 400,
        created: None,
    };
    let batch = [
        entry("/before", None),
        entry("/a\0b/x/_blueprint", Some("a\0b")),
        entry("/after", None),
    ];
    tokio::time::timeout(Duration::from_secs(10), storage.append_audit(&batch))
        .await
        .expect("the batch is written at once")
        .expect("the batch is written");
    let paths: Vec<String> = storage
        .audit(since, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert_eq!(paths[0], "/before");
    assert!(
        paths[1].starts_with("/a") && paths[1].ends_with("b/x/_blueprint"),
        "{paths:?}"
    );
    assert_eq!(paths[2], "/after");
}

async fn edits_to_an_unknown_project_are_not_found(storage: Arc<dyn Storage>) {
    let project = ident("nobody");
    assert!(matches!(
        storage.freeze(&project, false).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        storage.retire(&project, 1).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        storage.delete_blueprint(&project, &ident("article")).await,
        Err(StorageError::NotFound(_))
    ));
}

async fn an_invalid_edit_changes_nothing(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let before = storage.snapshot();
    // Two blueprints on one table.
    let body = json!({"postgresql": {"table": "articles"}, "elasticsearch": {"type": "other"},
                      "columns": {}});
    let input = parse_blueprint(&body, "").expect("parses");
    assert!(matches!(
        storage
            .put_blueprint(&project, &ident("other"), input)
            .await,
        Err(StorageError::Invalid(_))
    ));
    let after = storage.snapshot();
    assert_eq!(
        before.projects[&project].working.blueprints,
        after.projects[&project].working.blueprints
    );
}

async fn scanning_pages_through_every_item_of_the_project_once(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    // A project whose name starts with the other's must not leak into its scan.
    let neighbour = ident("pp");
    put_article(storage.as_ref(), &neighbour, None).await;
    storage.freeze(&neighbour, false).await.expect("version 1");
    write(storage.as_ref(), &neighbour, Uuid::new_v4(), "elsewhere").await;
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..25 {
        let id = Uuid::new_v4();
        write(storage.as_ref(), &project, id, &format!("{i}")).await;
        ids.insert(id);
    }
    let gone = *ids.iter().next().expect("an id");
    let record = storage
        .item(&project, &ident("article"), &gone)
        .await
        .expect("readable");
    let snapshot = storage.snapshot();
    let entry = prepare_delete(
        &snapshot,
        &project,
        &ident("article"),
        gone,
        record.as_ref().map(|r| r.blueprint_uid),
    )
    .expect("a delete");
    storage
        .write(&project, snapshot.projects[&project].epoch, vec![entry])
        .await
        .expect("the delete is acknowledged");
    ids.remove(&gone);
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = storage
            .scan_items(&project, after, 7)
            .await
            .expect("a page");
        assert!(page.len() <= 7);
        seen.extend(page.into_iter().map(|(blueprint, record)| {
            assert_eq!(blueprint.as_str(), "article");
            let id = record.body["id"]
                .as_str()
                .expect("a stored item has its id");
            Uuid::parse_str(id).expect("a uuid")
        }));
        match next {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    let unique: std::collections::BTreeSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "an item was scanned twice");
    assert_eq!(unique, ids);

    // Large items: a page ends once SCAN_BYTES were read, and the scan still sees every item.
    let large = "x".repeat(super::SCAN_BYTES / 2);
    for _ in 0..4 {
        write(storage.as_ref(), &project, Uuid::new_v4(), &large).await;
    }
    let (mut pages, mut count, mut after) = (0, 0, None);
    loop {
        let (page, next) = storage
            .scan_items(&project, after, 1000)
            .await
            .expect("a page");
        // Each large item is over half of SCAN_BYTES, so a page stops after its second one.
        let large_ones = page
            .iter()
            .filter(|(_, r)| serde_json::to_vec(&r.body).unwrap().len() > super::SCAN_BYTES / 2)
            .count();
        assert!(large_ones <= 2, "a page of {large_ones} large items");
        (pages, count) = (pages + 1, count + page.len());
        match next {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(count, ids.len() + 4);
    assert!(pages >= 2, "{pages} pages");
}

/// A freeze judged on one working copy is refused when another request edited it meanwhile, and
/// freezes nothing: an edit racing a freeze is never frozen without its compatibility checked.
async fn a_freeze_judged_on_an_older_working_copy_is_refused(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    put_article(storage.as_ref(), &project, Some("views")).await;
    let judged = Judged::of(&storage.snapshot().projects[&project]);
    let stale = judged.clone();
    put_article(storage.as_ref(), &project, Some("likes")).await;
    let refused = storage.freeze_judged(&project, false, Some(judged)).await;
    assert!(
        matches!(refused, Err(StorageError::Conflict(_))),
        "{refused:?}"
    );
    let snapshot = storage.fresh_snapshot(&project).await.expect("a snapshot");
    assert_eq!(snapshot.projects[&project].versions.len(), 1);
    let judged = Judged::of(&snapshot.projects[&project]);
    let (version, _) = storage
        .freeze_judged(&project, false, Some(judged))
        .await
        .expect("version 2");
    assert_eq!(version.number, 2);
    // Judged against version 1: after version 2, the same working copy again is not judged.
    put_article(storage.as_ref(), &project, Some("views")).await;
    let refused = storage.freeze_judged(&project, false, Some(stale)).await;
    assert!(
        matches!(refused, Err(StorageError::Conflict(_))),
        "{refused:?}"
    );
    // Nor after the compatibility setting changed.
    let snapshot = storage.fresh_snapshot(&project).await.expect("a snapshot");
    let judged = Judged::of(&snapshot.projects[&project]);
    storage
        .set_compatibility(&project, Compatibility::LossyAllowed)
        .await
        .expect("the setting");
    let refused = storage.freeze_judged(&project, false, Some(judged)).await;
    assert!(
        matches!(refused, Err(StorageError::Conflict(_))),
        "{refused:?}"
    );
    // Nor after a version was retired: the newest live version the count took moved.
    let snapshot = storage.fresh_snapshot(&project).await.expect("a snapshot");
    let judged = Judged::of(&snapshot.projects[&project]);
    storage
        .retire(&project, 2)
        .await
        .expect("version 2 retired");
    let refused = storage.freeze_judged(&project, false, Some(judged)).await;
    assert!(
        matches!(refused, Err(StorageError::Conflict(_))),
        "{refused:?}"
    );
}

async fn the_compatibility_setting_forced_freezes_and_version_usage_are_kept(
    storage: Arc<dyn Storage>,
) {
    use crate::catalog::Compatibility;
    let project = frozen(storage.as_ref()).await;
    storage
        .set_compatibility(&project, Compatibility::LossyAllowed)
        .await
        .expect("the setting is stored");
    let snapshot = storage.fresh_snapshot(&project).await.expect("a snapshot");
    assert_eq!(
        snapshot.projects[&project].working.compatibility,
        Compatibility::LossyAllowed
    );
    assert!(matches!(
        storage
            .set_compatibility(&ident("nothing"), Compatibility::Lossless)
            .await,
        Err(StorageError::NotFound(_))
    ));
    put_article(storage.as_ref(), &project, Some("views")).await;
    let (version, _) = storage.freeze(&project, true).await.expect("version 2");
    assert!(version.forced);
    let snapshot = storage.fresh_snapshot(&project).await.expect("a snapshot");
    assert!(!snapshot.projects[&project].versions[0].forced);
    assert!(snapshot.projects[&project].versions[1].forced);

    for i in 0..3 {
        write(storage.as_ref(), &project, Uuid::new_v4(), &format!("{i}")).await;
    }
    let one = storage
        .version_usage(&project, 1)
        .await
        .expect("the usage of version 1");
    assert_eq!(one.writes_last_hour, 3);
    assert!(one.last_write_at.is_some());
    let two = storage
        .version_usage(&project, 2)
        .await
        .expect("the usage of version 2");
    assert_eq!(two.writes_last_hour, 0);
    assert!(two.last_write_at.is_none());

    // A project made again under the same name starts with no use.
    tokio::time::sleep(super::usage::FLUSH + Duration::from_secs(1)).await;
    storage.drop_project(&project).await.expect("dropped");
    let again = frozen(storage.as_ref()).await;
    let fresh = storage
        .version_usage(&again, 1)
        .await
        .expect("the usage of the new version 1");
    assert_eq!(fresh.writes_last_7d, 0);
    assert!(fresh.last_write_at.is_none());
}

pub(crate) async fn delete(storage: &dyn Storage, project: &Ident, id: Uuid) -> u64 {
    let record = storage
        .item(project, &ident("article"), &id)
        .await
        .expect("readable");
    let snapshot = storage.snapshot();
    let entry = prepare_delete(
        &snapshot,
        project,
        &ident("article"),
        id,
        record.as_ref().map(|r| r.blueprint_uid),
    )
    .expect("a delete");
    storage
        .write(project, snapshot.projects[project].epoch, vec![entry])
        .await
        .expect("the delete is acknowledged")[0]
}

/// (revision, id, whether it is a delete) of every change after `since`.
async fn feed(storage: &dyn Storage, project: &Ident, since: u64) -> Vec<(u64, Uuid, bool)> {
    let page = storage
        .changes(project, since, 1000, crate::feed::PAGE_BYTES)
        .await
        .expect("the feed reads");
    page.changes
        .iter()
        .map(|c| (c.revision, c.id, c.record.is_none()))
        .collect()
}

async fn the_feed_keeps_the_latest_change_of_each_item_in_revision_order(
    storage: Arc<dyn Storage>,
) {
    let project = frozen(storage.as_ref()).await;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut wake = storage.follow(&project);
    wake.borrow_and_update();
    write(storage.as_ref(), &project, a, "a").await;
    tokio::time::timeout(Duration::from_secs(5), wake.changed())
        .await
        .expect("a follower is woken by a commit")
        .expect("the signal lives");
    write(storage.as_ref(), &project, b, "b").await;
    let a2 = write(storage.as_ref(), &project, a, "a2").await;
    let b_gone = delete(storage.as_ref(), &project, b).await;
    let c1 = write(storage.as_ref(), &project, c, "c").await;
    assert_eq!(
        feed(storage.as_ref(), &project, 0).await,
        vec![(a2, a, false), (b_gone, b, true), (c1, c, false)]
    );
    assert_eq!(
        feed(storage.as_ref(), &project, a2).await,
        vec![(b_gone, b, true), (c1, c, false)]
    );
    let page = storage
        .changes(&project, 0, 1, crate::feed::PAGE_BYTES)
        .await
        .expect("a page");
    assert_eq!(page.changes.len(), 1);
    let record = page.changes[0].record.as_ref().expect("a put has its item");
    assert_eq!(record.revision, a2);
    assert_eq!(record.body["title"], "a2");
    // Written again, a deleted item's put replaces its delete; deleted again, a new delete.
    let b2 = write(storage.as_ref(), &project, b, "b2").await;
    assert_eq!(
        feed(storage.as_ref(), &project, 0).await,
        vec![(a2, a, false), (c1, c, false), (b2, b, false)]
    );
    let b_gone_again = delete(storage.as_ref(), &project, b).await;
    assert_eq!(
        feed(storage.as_ref(), &project, c1).await,
        vec![(b_gone_again, b, true)]
    );
    // Another project's items never show.
    let other = ident("pp");
    put_article(storage.as_ref(), &other, None).await;
    storage.freeze(&other, false).await.expect("version 1");
    write(storage.as_ref(), &other, Uuid::new_v4(), "elsewhere").await;
    assert_eq!(feed(storage.as_ref(), &project, 0).await.len(), 3);
    assert_eq!(
        storage
            .changes(&project, 0, 10, crate::feed::PAGE_BYTES)
            .await
            .unwrap()
            .horizon,
        0
    );
}

/// A page of large items ends once it holds `PAGE_BYTES`, whatever the limit, and the next page
/// goes on from its last revision: every change is read once.
async fn a_page_of_changes_is_bounded_in_bytes(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let large = "x".repeat(1 << 20);
    let mut written = Vec::new();
    for _ in 0..12 {
        let id = Uuid::new_v4();
        write(storage.as_ref(), &project, id, &large).await;
        written.push(id);
    }
    let first = storage
        .changes(&project, 0, 10_000, crate::feed::PAGE_BYTES)
        .await
        .expect("a page");
    let count = first.changes.len();
    assert!(
        (1..12).contains(&count) && count <= crate::feed::PAGE_BYTES / (1 << 20) + 1,
        "{count} changes of 1 MiB in one page"
    );
    // A smaller bound (a stream's) ends sooner, after one change at least.
    for (max_bytes, most) in [(3 << 20, 3), (1, 1)] {
        let small = storage
            .changes(&project, 0, 10_000, max_bytes)
            .await
            .expect("a page");
        assert_eq!(small.changes.len(), most, "at most {max_bytes} bytes");
    }
    let mut seen: Vec<Uuid> = first.changes.iter().map(|c| c.id).collect();
    let mut since = first.changes.last().expect("one change").revision;
    loop {
        let page = storage
            .changes(&project, since, 10_000, crate::feed::PAGE_BYTES)
            .await
            .expect("a page");
        let Some(last) = page.changes.last() else {
            break;
        };
        since = last.revision;
        seen.extend(page.changes.iter().map(|c| c.id));
    }
    assert_eq!(seen, written);
}

async fn purged_deletes_and_drops_move_the_horizon(storage: Arc<dyn Storage>) {
    let project = frozen(storage.as_ref()).await;
    let (kept, gone) = (Uuid::new_v4(), Uuid::new_v4());
    let kept_at = write(storage.as_ref(), &project, kept, "kept").await;
    write(storage.as_ref(), &project, gone, "gone").await;
    let deleted = delete(storage.as_ref(), &project, gone).await;
    // Nothing is older than an hour ago.
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    assert_eq!(storage.purge_tombstones(an_hour_ago).await.unwrap(), 0);
    assert_eq!(feed(storage.as_ref(), &project, 0).await.len(), 2);
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    assert_eq!(storage.purge_tombstones(later).await.unwrap(), 1);
    let page = storage
        .changes(&project, 0, 10, crate::feed::PAGE_BYTES)
        .await
        .unwrap();
    assert_eq!(page.horizon, deleted);
    assert_eq!(
        page.changes.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![kept]
    );
    assert_eq!(page.changes[0].revision, kept_at);
    // A drop forgets the history: the horizon is the drop.
    let dropped = storage.drop_project(&project).await.expect("dropped");
    let page = storage
        .changes(&project, 0, 10, crate::feed::PAGE_BYTES)
        .await
        .unwrap();
    assert!(page.changes.is_empty());
    assert_eq!(page.horizon, dropped);
}

/// Writes `count` articles in one write and deletes them in another; answers the last delete's
/// revision.
async fn written_and_deleted(storage: &dyn Storage, project: &Ident, count: usize) -> u64 {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
    let (epoch, entries): (Vec<u64>, Vec<Entry>) = ids
        .iter()
        .map(|id| upsert(storage, project, *id, "to delete"))
        .unzip();
    storage
        .write(project, epoch[0], entries)
        .await
        .expect("the writes are acknowledged");
    let uid = storage.snapshot().projects[project]
        .version(1)
        .expect("version 1")
        .blueprints[&ident("article")]
        .uid;
    let snapshot = storage.snapshot();
    let deletes = ids
        .iter()
        .map(|id| prepare_delete(&snapshot, project, &ident("article"), *id, Some(uid)))
        .collect::<Result<Vec<_>, _>>()
        .expect("deletes");
    let revisions = storage
        .write(project, snapshot.projects[project].epoch, deletes)
        .await
        .expect("the deletes are acknowledged");
    *revisions.last().expect("a delete")
}

/// Every project's old tombstones go, past the young ones of another project and past more than
/// one command's worth; the young ones stay.
async fn old_tombstones_go_past_young_ones_and_in_many_commands(storage: Arc<dyn Storage>) {
    let first = frozen(storage.as_ref()).await;
    let second = ident("q");
    put_article(storage.as_ref(), &second, None).await;
    storage.freeze(&second, false).await.expect("version 1");
    let many = crate::journal::PURGE_BATCH + 5;
    let first_old = written_and_deleted(storage.as_ref(), &first, many).await;
    let second_old = written_and_deleted(storage.as_ref(), &second, 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Young tombstones follow the old ones of each project, whichever project sorts first.
    written_and_deleted(storage.as_ref(), &first, 3).await;
    written_and_deleted(storage.as_ref(), &second, 2).await;

    assert_eq!(
        storage.purge_tombstones(cut).await.unwrap(),
        many as u64 + 1
    );
    for (project, old, young) in [(&first, first_old, 3), (&second, second_old, 2)] {
        let page = storage
            .changes(project, 0, 10, crate::feed::PAGE_BYTES)
            .await
            .unwrap();
        assert_eq!(page.horizon, old, "{project}");
        assert_eq!(page.changes.len(), young, "{project}");
        assert!(page.changes.iter().all(|c| c.record.is_none()));
    }
    assert_eq!(storage.purge_tombstones(cut).await.unwrap(), 0);
}

/// Expands every behaviour into a named test for one backend.
macro_rules! conformance {
    ($backend:ident: $($behaviour:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $behaviour() {
                    let fixture = super::$backend().await;
                    tokio::time::timeout(
                        super::Duration::from_secs(60),
                        super::$behaviour(fixture.storage.clone()),
                    )
                    .await
                    .expect("the behaviour finishes in time");
                    fixture.close().await;
                }
            )*
        }
    };
}

macro_rules! every_behaviour {
    ($backend:ident) => {
        conformance!($backend:
            a_blueprint_put_creates_the_project_and_is_seen_at_once,
            a_key_change_from_a_stale_copy_never_undoes_a_revocation_or_a_rotation,
            key_changes_made_at_once_through_two_nodes_all_hold,
            racing_key_creations_never_pass_the_most,
            versions_are_numbered_from_one_and_a_freeze_without_changes_conflicts,
            revisions_strictly_increase_in_the_order_writes_are_acknowledged,
            concurrent_writes_are_all_acknowledged_with_distinct_revisions,
            a_write_prepared_before_the_versions_moved_is_refused_as_stale,
            retiring_a_version_moves_the_epoch,
            an_item_reads_back_its_latest_state_and_a_delete_removes_it,
            a_freeze_records_its_back_fill_and_ensuring_one_adds_no_second,
            migration_states_are_recorded_per_projector,
            a_dropped_project_is_forgotten_and_can_be_made_again,
            edits_to_an_unknown_project_are_not_found,
            audit_entries_with_a_nul_are_stored_with_the_rest_of_their_batch,
            a_new_project_past_the_most_is_refused_and_existing_ones_go_on,
            an_edit_growing_the_catalog_past_its_most_is_refused_and_others_go_on,
            an_invalid_edit_changes_nothing,
            scanning_pages_through_every_item_of_the_project_once,
            the_compatibility_setting_forced_freezes_and_version_usage_are_kept,
            a_freeze_judged_on_an_older_working_copy_is_refused,
            the_feed_keeps_the_latest_change_of_each_item_in_revision_order,
            a_page_of_changes_is_bounded_in_bytes,
            purged_deletes_and_drops_move_the_horizon,
            old_tombstones_go_past_young_ones_and_in_many_commands,
        );
    };
}

every_behaviour!(embedded);
every_behaviour!(postgresql);
