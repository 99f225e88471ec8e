//! Tasks through RabbitMQ, against the real broker (`DSTORE_TEST_RABBITMQ_URL`, default the local
//! one, which `scripts/test.sh` installs and starts). Each test has its own namespace of queues and
//! removes them at the end; the test that restarts the broker runs alone.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dstore::blueprint::Ident;
use dstore::config::{QueueSettings, Settings};
use dstore::projector::rocksdb::RocksProjector;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use tokio::sync::{RwLock, RwLockReadGuard};
use uuid::Uuid;

use crate::faults::{self, Proxy, Tally, WriteLoad};
use crate::helpers::{article, spawn_app_with, TestApp};
use crate::postgres::TestDatabase;

/// Tests share the broker; the one that restarts it takes this for writing.
pub static BROKER: RwLock<()> = RwLock::const_new(());

pub fn broker_url() -> String {
    std::env::var("DSTORE_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A namespace of queues on the test broker for one test.
pub struct TestBroker {
    pub namespace: String,
    _shared: Option<RwLockReadGuard<'static, ()>>,
}

impl TestBroker {
    pub async fn new() -> TestBroker {
        let shared = BROKER.read().await;
        TestBroker::exclusive(Some(shared)).await
    }

    async fn exclusive(shared: Option<RwLockReadGuard<'static, ()>>) -> TestBroker {
        drop(connect().await);
        TestBroker {
            namespace: format!("dstore_test_{}", &Uuid::new_v4().simple().to_string()[..12]),
            _shared: shared,
        }
    }

    pub fn settings(&self) -> QueueSettings {
        QueueSettings {
            namespace: self.namespace.clone(),
            ..QueueSettings::new(broker_url())
        }
    }

    /// Messages waiting in one of the namespace's queues, e.g. `rocksdb.dead`; `None` when the
    /// queue does not exist.
    pub async fn queued(&self, queue: &str) -> Option<u32> {
        self.declared(queue).await.map(|q| q.message_count())
    }

    /// One of the namespace's queues as the broker has it now, if it exists (asked passively).
    async fn declared(&self, queue: &str) -> Option<lapin::Queue> {
        let connection = connect().await;
        let channel = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let name = format!("{}.{queue}", self.namespace);
        let declared = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await;
        declared.ok()
    }

    /// Waits up to 30 s until one of the namespace's queues has `count` consumers.
    pub async fn expect_consumers(&self, queue: &str, count: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.declared(queue).await.map(|q| q.consumer_count());
            if now == Some(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue {queue} has {now:?} consumers, not {count}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Messages waiting in one of the namespace's queues, which must exist.
    pub async fn messages(&self, queue: &str) -> u32 {
        self.queued(queue)
            .await
            .unwrap_or_else(|| panic!("there is no queue {queue}"))
    }

    /// Waits up to 30 s until one of the namespace's queues holds between `counts` messages: a
    /// stopped worker's last acknowledgement may not have reached the broker, and that task is
    /// delivered again (and applied again, harmlessly).
    pub async fn expect_messages_in(&self, queue: &str, counts: std::ops::RangeInclusive<u32>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let queued = self.queued(queue).await;
            if queued.is_some_and(|n| counts.contains(&n)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue {queue} holds {queued:?} messages, not {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes `body` as a task for `projector` would be, naming `journal` in its header.
    pub async fn publish_as(&self, journal: &str, projector: &str, body: &[u8]) {
        let connection = connect().await;
        let channel = connection.create_channel().await.unwrap();
        let mut headers = FieldTable::default();
        headers.insert(
            "dstore-journal".into(),
            lapin::types::AMQPValue::LongString(journal.into()),
        );
        channel
            .basic_publish(
                format!("{}.tasks", self.namespace).as_str().into(),
                projector.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Empties one of the namespace's queues, as a broker's operator or policy may.
    pub async fn purge(&self, queue: &str) {
        let connection = connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_purge(
                format!("{}.{queue}", self.namespace).as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .unwrap();
    }

    /// Waits up to 30 s until one of the namespace's queues holds `count` messages (the broker moves
    /// messages after dstore answers).
    pub async fn expect_messages(&self, queue: &str, count: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.queued(queue).await;
            if now == Some(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue {queue} holds {now:?} messages, not {count}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes every queue and exchange of the namespace.
    pub async fn clean_up(self) {
        let connection = connect().await;
        let channel = connection.create_channel().await.unwrap();
        for projector in ["rocksdb", "postgresql", "elasticsearch", "broken"] {
            let queues = [
                projector.to_string(),
                format!("{projector}.dead"),
                format!("{projector}.parked"),
            ];
            for queue in queues {
                let name = format!("{}.{queue}", self.namespace);
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        let reports = format!("{}.reports", self.namespace);
        let _ = channel
            .queue_delete(reports.as_str().into(), QueueDeleteOptions::default())
            .await;
        for exchange in ["tasks", "dead"] {
            let name = format!("{}.{exchange}", self.namespace);
            let _ = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

pub async fn connect() -> Connection {
    let url = broker_url();
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no RabbitMQ broker answers at {url} ({e}); run the tests through scripts/test.sh, \
                 which starts one, or point DSTORE_TEST_RABBITMQ_URL at one"
            )
        })
}

async fn spawn_with_broker(broker: &TestBroker) -> TestApp {
    let queue = broker.settings();
    spawn_app_with(|s| s.queue = Some(queue)).await
}

fn ident(name: &str) -> Ident {
    Ident::parse(name).unwrap()
}

#[tokio::test]
async fn through_rabbitmq_writes_migrations_and_deletes_reach_the_store_over_durable_queues() {
    let broker = TestBroker::new().await;
    let app = spawn_with_broker(&broker).await;
    // The freeze answers once the migration was applied by the consumer and reported back.
    assert_eq!(app.put_and_freeze("myblog", "article", &article()).await, 1);
    let id = Uuid::new_v4();
    let item = json!({"project_version": 1, "title": "Hello", "date_created": "2020-01-02"});
    app.put_projected(&format!("/myblog/article/{id}?wait=true"), &item)
        .await;
    let keyspace = app.rocksdb.clone().unwrap();
    let stored = keyspace.get(&ident("myblog"), 1, &ident("article"), &id);
    assert_eq!(stored.unwrap()["title"], "Hello");
    let deleted = app.delete(&format!("/myblog/article/{id}?wait=true")).await;
    assert_eq!(deleted.body["projected"], true, "{}", deleted.body);
    assert!(keyspace
        .get(&ident("myblog"), 1, &ident("article"), &id)
        .is_none());

    let ready = app.get("/_health/ready").await.body;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["queue"]["transport"], "rabbitmq", "{ready}");
    for link in ["relay rocksdb", "reports", "consumer rocksdb"] {
        assert_eq!(ready["queue"]["links"][link]["connected"], true, "{ready}");
    }
    assert_eq!(ready["projectors"]["rocksdb"]["progress"]["pending"], 0);

    // Declaring the task queue as transient is refused: the broker holds it as durable.
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let transient = channel
        .queue_declare(
            format!("{}.rocksdb", broker.namespace).as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(transient.is_err(), "the task queue is durable");
    assert_eq!(broker.messages("rocksdb").await, 0);
    app.stop().await;
    broker.clean_up().await;
}

/// `dstore worker` as a user starts it.
fn start_worker(projector: &str, server: &str, env: &[(&str, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dstore"));
    command
        .args(["worker", "--projector", projector, "--server", server])
        .env_remove("DSTORE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().expect("the worker starts")
}

/// A `dstore worker --projector rocksdb` with its keyspaces in a directory of its own.
fn rocksdb_worker(broker: &TestBroker, app: &TestApp) -> (Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("QUEUE_CONNECTIONSTRING", broker_url()),
        ("DSTORE_QUEUE_NAMESPACE", broker.namespace.clone()),
        ("LEVEL_PATH", dir.path().display().to_string()),
    ];
    (start_worker("rocksdb", &app.address, &env), dir)
}

fn terminate(child: &mut Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the worker did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.wait().unwrap().success());
}

/// The environment of a `dstore worker --projector postgresql` on the test broker and database.
fn postgresql_worker_env(broker: &TestBroker, db: &TestDatabase) -> Vec<(&'static str, String)> {
    let url = db.settings().url.expect("the test database url");
    vec![
        ("QUEUE_CONNECTIONSTRING", broker_url()),
        ("DSTORE_QUEUE_NAMESPACE", broker.namespace.clone()),
        ("DATABASE_URL", url.expose().to_string()),
    ]
}

/// A server whose postgresql projector runs in `dstore worker` processes (`external`, unless
/// `configure` names others), and the environment such a worker starts with. `configure` changes
/// the server's settings last (its queue's through [`queue_of`]).
async fn with_postgresql_worker(
    broker: &TestBroker,
    db: &TestDatabase,
    configure: impl FnOnce(&mut Settings),
) -> (TestApp, Vec<(&'static str, String)>) {
    let queue = QueueSettings {
        external: vec!["postgresql".into()],
        ..broker.settings()
    };
    let pg = db.settings();
    let app = spawn_app_with(|s| {
        s.queue = Some(queue);
        s.postgresql = Some(pg);
        s.projection.wait_timeout_secs = 30;
        configure(s);
    })
    .await;
    (app, postgresql_worker_env(broker, db))
}

/// The queue settings of a server [`with_postgresql_worker`] configures.
fn queue_of(settings: &mut Settings) -> &mut QueueSettings {
    settings.queue.as_mut().expect("a server with a queue")
}

/// Project `p` frozen at version 1 through a PostgreSQL worker, which is stopped again; pending
/// tasks are published again after a second.
async fn frozen_while_the_worker_ran(
    broker: &TestBroker,
    db: &TestDatabase,
) -> (TestApp, Vec<(&'static str, String)>) {
    let (app, env) =
        with_postgresql_worker(broker, db, |s| queue_of(s).republish_after_secs = 1).await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    assert_eq!(app.put_and_freeze("p", "thing", &faults::thing()).await, 1);
    terminate(&mut worker);
    (app, env)
}

async fn count_rows(db: &TestDatabase) -> i64 {
    let mut sql = db.sql().await;
    sqlx::query_scalar("SELECT count(*) FROM p_v1.things")
        .fetch_one(&mut sql)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_worker_process_applies_postgresql_while_serve_only_relays_its_tasks() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (app, env) = with_postgresql_worker(&broker, &db, |s| {
        queue_of(s).external = vec!["postgres".into()];
    })
    .await;
    let mut worker = start_worker("postgres", &app.address, &env);
    assert_eq!(app.put_and_freeze("p", "thing", &faults::thing()).await, 1);
    let first = Uuid::new_v4();
    app.put_projected(
        &format!("/p/thing/{first}?wait=true"),
        &json!({"project_version": 1, "n": 1}),
    )
    .await;
    assert_eq!(count_rows(&db).await, 1);

    // Without a worker, postgresql's tasks wait in its queue; serve does not apply them.
    terminate(&mut worker);
    for n in 0..50 {
        let put = app
            .put(
                &format!("/p/thing/{}", Uuid::new_v4()),
                &json!({"project_version": 1, "n": n}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count_rows(&db).await,
        1,
        "nobody applies postgresql's tasks"
    );
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(
        ready["projectors"]["postgresql"]["status"], "catching_up",
        "{ready}"
    );
    assert_eq!(ready["projectors"]["postgresql"]["progress"]["pending"], 50);
    broker.expect_messages_in("postgresql", 50..=51).await;

    let mut worker = start_worker("postgresql", &app.address, &env);
    faults::wait_until_projected(&app).await;
    assert_eq!(count_rows(&db).await, 52);
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A message naming another journal that is no task (stray, or forged by whoever can publish to
/// the broker) does not decide which deployment a fresh worker works for: the worker learns it
/// from the first task it can read, and goes on storing into its own deployment's schemas.
#[tokio::test]
async fn a_stray_message_does_not_decide_a_fresh_workers_deployment() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (app, env) = with_postgresql_worker(&broker, &db, |_| {}).await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    assert_eq!(app.put_and_freeze("p", "thing", &faults::thing()).await, 1);
    app.put_projected(
        &format!("/p/thing/{}?wait=true", Uuid::new_v4()),
        &json!({"project_version": 1, "n": 1}),
    )
    .await;
    terminate(&mut worker);

    broker
        .publish_as("stray-0000", "postgresql", b"not a task at all")
        .await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    let put = app
        .put(
            &format!("/p/thing/{}?wait=true", Uuid::new_v4()),
            &json!({"project_version": 1, "n": 2}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["projected"], true, "{}", put.body);
    assert_eq!(count_rows(&db).await, 2);
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A worker pointed at another dstore (a staging server, one started again on an empty data
/// directory) learns nothing of the tasks' projects there: it must not take them for projects
/// since dropped and report them applied, which would let the journal drop them.
#[tokio::test]
async fn a_worker_pointed_at_another_server_applies_and_reports_nothing() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (app, env) = frozen_while_the_worker_ran(&broker, &db).await;
    for n in 0..5 {
        let put = app
            .put(
                &format!("/p/thing/{}", Uuid::new_v4()),
                &json!({"project_version": 1, "n": n}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    let elsewhere = crate::helpers::spawn_app().await;
    let mut worker = start_worker("postgresql", &elsewhere.address, &env);
    broker.expect_consumers("postgresql", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(
        ready["projectors"]["postgresql"]["progress"]["pending"], 5,
        "{ready}"
    );
    terminate(&mut worker);

    let mut worker = start_worker("postgresql", &app.address, &env);
    expect_count(&db, "SELECT count(*) FROM p_v1.things", 5).await;
    expect_nothing_pending(&app, "postgresql").await;
    terminate(&mut worker);
    elsewhere.stop().await;
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A worker whose key may read the catalog of some projects only: the others' tasks wait, held,
/// and the projects it may read go on, rather than every project waiting behind one it cannot.
#[tokio::test]
async fn a_project_whose_catalog_the_worker_may_not_read_holds_only_itself() {
    const MASTER: &str = "a-worker-test-master-key-0123456789";
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (mut app, mut env) = with_postgresql_worker(&broker, &db, |s| {
        s.projection.wait_timeout_secs = 2;
        s.auth.master_keys = vec![MASTER.into()];
    })
    .await;
    let mint = |actions: Value, projects: Value| {
        let url = format!("{}/_keys", app.address);
        async move {
            let made: Value = reqwest::Client::new()
                .post(url)
                .bearer_auth(MASTER)
                .body(json!({"name": "t", "actions": actions, "projects": projects}).to_string())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            made["key"].as_str().expect("a key").to_string()
        }
    };
    let admin = mint(json!(["*"]), json!(["*"])).await;
    let blog_only = mint(json!(["operations"]), json!(["blog"])).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {admin}").parse().unwrap(),
    );
    app.client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    env.push(("DSTORE_API_KEY", blog_only));
    let mut worker = start_worker("postgresql", &app.address, &env);
    let thing = faults::thing();
    // Shop's migration comes first in the queue, and the worker may not read shop's catalog.
    assert_eq!(app.put("/shop/thing/_blueprint", &thing).await.status, 200);
    let frozen = app.post("/shop/_version", None).await;
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    assert_eq!(app.put("/blog/thing/_blueprint", &thing).await.status, 200);
    freeze_until_migrated(&app, "blog").await;
    let put = app
        .put(
            &format!("/blog/thing/{}?wait=true", Uuid::new_v4()),
            &json!({"project_version": 1, "n": 1}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["projected"], true, "{}", put.body);
    expect_count(&db, "SELECT count(*) FROM blog_v1.things", 1).await;
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// Tasks lost inside a broker whose queue stays (a purge, a length or TTL policy) would stay
/// pending for ever: the relay finds the projector's oldest task pending while its queue is empty
/// and publishes its pending tasks again.
#[tokio::test]
async fn tasks_purged_from_their_queue_are_published_again() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (app, env) = frozen_while_the_worker_ran(&broker, &db).await;
    for n in 0..30 {
        let put = app
            .put(
                &format!("/p/thing/{}", Uuid::new_v4()),
                &json!({"project_version": 1, "n": n}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    broker.expect_messages_in("postgresql", 30..=31).await;
    broker.purge("postgresql").await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    expect_count(&db, "SELECT count(*) FROM p_v1.things", 30).await;
    expect_nothing_pending(&app, "postgresql").await;
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A task larger than the broker takes (`queue.max_message_bytes`) becomes a dead letter saying
/// why, instead of being refused by the broker again and again while every later task of the
/// projector, of every project, waits behind it: the writes after it reach the store.
#[tokio::test]
async fn a_task_larger_than_the_broker_takes_is_a_dead_letter_and_the_rest_flow() {
    let broker = TestBroker::new().await;
    let mut queue = broker.settings();
    queue.max_message_bytes = 64 * 1024;
    let app = spawn_app_with(|s| s.queue = Some(queue)).await;
    let note = json!({"postgresql": {"table": "notes"}, "elasticsearch": {"type": "note"},
        "columns": {"body": {"type": "text"}}});
    assert_eq!(app.put_and_freeze("p", "note", &note).await, 1);
    let big = app
        .put(
            &format!("/p/note/{}", Uuid::new_v4()),
            &json!({"project_version": 1, "body": "x".repeat(100_000)}),
        )
        .await;
    assert_eq!(big.status, 200, "{}", big.body);
    let small = Uuid::new_v4();
    app.put_projected(
        &format!("/p/note/{small}?wait=true"),
        &json!({"project_version": 1, "body": "small"}),
    )
    .await;
    let keyspace = app.rocksdb.clone().unwrap();
    assert!(keyspace
        .get(&ident("p"), 1, &ident("note"), &small)
        .is_some());
    let letters = app.get("/_dead_letters").await.body;
    let letters = letters["dead_letters"].as_array().expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("queue.max_message_bytes"), "{reason}");
    assert_eq!(letters[0]["seq"], big.body["revision"], "{letters:?}");
    app.stop().await;
    broker.clean_up().await;
}

/// A message naming a pending task that is not that task (forged by whoever can publish to the
/// broker, or damaged) does not make the task a dead letter: the server's own copy of the task
/// reads, so it stays pending, and the real task is applied once it comes (here published again,
/// since it was purged from the queue).
#[tokio::test]
async fn a_forged_message_naming_a_pending_task_does_not_dead_letter_it() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (app, env) = frozen_while_the_worker_ran(&broker, &db).await;
    let put = app
        .put(
            &format!("/p/thing/{}", Uuid::new_v4()),
            &json!({"project_version": 1, "n": 1}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let seq = put.body["revision"].as_u64().unwrap();
    broker.expect_messages_in("postgresql", 1..=2).await;
    broker.purge("postgresql").await;
    let journal = app.journal.as_ref().unwrap().id().to_string();
    let mut forged = seq.to_be_bytes().to_vec();
    forged.extend_from_slice(b"not the task");
    broker.publish_as(&journal, "postgresql", &forged).await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    expect_count(&db, "SELECT count(*) FROM p_v1.things", 1).await;
    let letters = app.get("/_dead_letters").await;
    assert_eq!(letters.body["dead_letters"], json!([]), "{}", letters.body);
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// Waits up to 30 s until `projector` has no task pending.
async fn expect_nothing_pending(app: &TestApp, projector: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = app.get("/_health/ready").await.body;
        if ready["projectors"][projector]["progress"]["pending"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to 30 s until `sql` counts `expected`.
async fn expect_count(db: &TestDatabase, sql: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut conn = db.sql().await;
        let count: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut conn)
            .await
            .ok();
        if count == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} counts {count:?}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Freezes `project`'s working copy and waits until every store migrated it.
async fn freeze_until_migrated(app: &TestApp, project: &str) {
    let mut frozen = app.post(&format!("/{project}/_version"), None).await;
    for _ in 0..30 {
        if frozen.status != 503 {
            break;
        }
        frozen = app.post(&format!("/{project}/_version"), None).await;
    }
    let done = frozen.status == 200
        || (frozen.status == 409 && frozen.body["status"].as_str().unwrap().contains("migrated"));
    assert!(done, "{} {}", frozen.status, frozen.body);
}

#[tokio::test]
async fn a_held_projects_tasks_are_parked_out_of_the_window_and_follow_in_order_once_fixed() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let mut sql = db.sql().await;
    sqlx::raw_sql("CREATE SCHEMA bad_v1; COMMENT ON SCHEMA bad_v1 IS 'the billing team''s'")
        .execute(&mut sql)
        .await
        .unwrap();
    // The relay looks for lost tasks after 1 s: a held project's are not lost.
    let (app, mut env) = with_postgresql_worker(&broker, &db, |s| {
        queue_of(s).republish_after_secs = 1;
        s.projection.wait_timeout_secs = 2;
    })
    .await;
    env.push(("DSTORE_QUEUE_PREFETCH", "4".into()));
    let mut worker = start_worker("postgresql", &app.address, &env);
    let thing = faults::thing();
    assert_eq!(app.put("/bad/thing/_blueprint", &thing).await.status, 200);
    // The migration fails (the schema is someone else's): the project is held.
    let frozen = app.post("/bad/_version", None).await;
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        let put = app
            .put(
                &format!("/bad/thing/{id}"),
                &json!({"project_version": 1, "n": n}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    // Its migration and 20 writes wait in its parking queue, not in the worker's window of four,
    // and the registry names it.
    broker.expect_messages("postgresql.parked.bad", 21).await;
    broker.expect_messages("postgresql.parked", 1).await;
    // They stay pending on purpose: the relay, which checks every 5 s, does not publish them
    // again as if the broker had lost them, to be parked once more.
    // (The count is of messages ready: one the consumer is trying again from the head is out of
    // it for a moment, so it is waited for rather than read once.)
    tokio::time::sleep(Duration::from_secs(12)).await;
    broker
        .expect_messages_in("postgresql.parked.bad", 21..=21)
        .await;
    assert_eq!(app.put("/good/thing/_blueprint", &thing).await.status, 200);
    freeze_until_migrated(&app, "good").await;
    let item = json!({"project_version": 1, "n": 1});
    app.put_projected(&format!("/good/thing/{}?wait=true", Uuid::new_v4()), &item)
        .await;

    // New workers, one active and one standing by: the active one finds the parked project in
    // the registry on its first delivery, tries it again and keeps its tasks parked, in order,
    // and the other project still goes on.
    terminate(&mut worker);
    let mut worker = start_worker("postgresql", &app.address, &env);
    broker.expect_consumers("postgresql", 1).await;
    let mut standby = start_worker("postgresql", &app.address, &env);
    broker.expect_consumers("postgresql", 2).await;
    let put = app
        .put(&format!("/good/thing/{}", Uuid::new_v4()), &item)
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    expect_count(&db, "SELECT count(*) FROM good_v1.things", 2).await;
    broker.expect_messages("postgresql.parked.bad", 21).await;
    broker.expect_messages("postgresql.parked", 1).await;

    // Once the cause is gone, the held tasks follow on the project's next try, the migration first.
    // The standby takes over when the active worker goes, with a third worker standing by (so it
    // is never the queue's only consumer) and no task coming: its probe tells it it is active.
    sqlx::raw_sql("DROP SCHEMA bad_v1")
        .execute(&mut sql)
        .await
        .unwrap();
    let mut third = start_worker("postgresql", &app.address, &env);
    broker.expect_consumers("postgresql", 3).await;
    terminate(&mut worker);
    expect_count(&db, "SELECT count(*) FROM bad_v1.things", 20).await;
    // A write made since lands after them.
    let again = app
        .put(
            &format!("/bad/thing/{}", ids[0]),
            &json!({"project_version": 1, "n": 100}),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    let newest = format!(
        "SELECT n::bigint FROM bad_v1.things WHERE id = '{}'",
        ids[0]
    );
    expect_count(&db, &newest, 100).await;
    // The emptied parking queue is deleted, and its registry entry with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.queued("postgresql.parked.bad").await.is_some() {
        assert!(Instant::now() < deadline, "the parking queue is left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.expect_messages("postgresql.parked", 0).await;
    expect_nothing_pending(&app, "postgresql").await;
    terminate(&mut standby);
    terminate(&mut third);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A server with a PostgreSQL worker (`configure` changes the server's settings) whose project
/// `bad` is held: its schema `bad_v1` is someone else's, so its migration fails and is parked.
async fn with_bad_parked(
    broker: &TestBroker,
    db: &TestDatabase,
    configure: impl FnOnce(&mut Settings),
) -> (TestApp, Vec<(&'static str, String)>, Child) {
    let mut sql = db.sql().await;
    sqlx::raw_sql("CREATE SCHEMA bad_v1; COMMENT ON SCHEMA bad_v1 IS 'the billing team''s'")
        .execute(&mut sql)
        .await
        .unwrap();
    let (app, env) = with_postgresql_worker(broker, db, configure).await;
    let worker = start_worker("postgresql", &app.address, &env);
    let thing = faults::thing();
    assert_eq!(app.put("/bad/thing/_blueprint", &thing).await.status, 200);
    let frozen = app.post("/bad/_version", None).await;
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    broker.expect_messages("postgresql.parked.bad", 1).await;
    (app, env, worker)
}

/// A parking queue deleted from outside drops no later copy silently: the copy is published
/// `mandatory` and comes back unroutable, the session starts over, and the task is delivered
/// again: parked in the queue made again, or (once the new session found the project's parking
/// queue empty and let it go) tried and kept as a dead letter with the store's reason.
#[tokio::test]
async fn a_parking_queue_deleted_from_outside_drops_no_later_task() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (app, _, mut worker) = with_bad_parked(&broker, &db, |_| {}).await;
    let channel = connect().await.create_channel().await.unwrap();
    let parked = format!("{}.postgresql.parked.bad", broker.namespace);
    channel
        .queue_delete(parked.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let id = Uuid::new_v4();
    let put = app
        .put(
            &format!("/bad/thing/{id}"),
            &json!({"project_version": 1, "n": 1}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let letters = app.get("/bad/_dead_letters").await.body.to_string();
        if letters.contains(&id.to_string())
            || broker.queued("postgresql.parked.bad").await.unwrap_or(0) > 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the task's copy was dropped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A consumer's report says which projects it holds back, so that past the backlog limit the
/// server refuses a held project's writes first, as without a broker, instead of letting its
/// backlog take the headroom every other project's writes need.
#[tokio::test]
async fn past_the_backlog_limit_a_project_a_consumer_holds_is_refused_first() {
    let broker = TestBroker::new().await;
    let queue = broker.settings();
    crate::hostile::a_held_project_is_refused_first(|s| s.queue = Some(queue)).await;
    broker.clean_up().await;
}

/// A held project's tasks wait in its parking queue on purpose, pending: the relay looks past
/// them for lost tasks, so another project's task the broker lost meanwhile is published again,
/// and the held project's backlog is not parked a second time.
#[tokio::test]
async fn a_held_project_does_not_keep_another_projects_lost_tasks_pending() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let (app, env, mut worker) =
        with_bad_parked(&broker, &db, |s| queue_of(s).republish_after_secs = 1).await;
    let thing = faults::thing();
    assert_eq!(app.put("/good/thing/_blueprint", &thing).await.status, 200);
    freeze_until_migrated(&app, "good").await;
    terminate(&mut worker);
    let put = app
        .put(
            &format!("/good/thing/{}", Uuid::new_v4()),
            &json!({"project_version": 1, "n": 1}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    broker.expect_messages_in("postgresql", 1..=2).await;
    broker.purge("postgresql").await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    expect_count(&db, "SELECT count(*) FROM good_v1.things", 1).await;
    assert_eq!(broker.messages("postgresql.parked.bad").await, 1);
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

#[tokio::test]
async fn a_rocksdb_worker_keeps_the_keyspaces_in_its_own_directory() {
    let broker = TestBroker::new().await;
    let queue = QueueSettings {
        external: vec!["rocksdb".into()],
        ..broker.settings()
    };
    let app = spawn_app_with(|s| s.queue = Some(queue)).await;
    assert!(
        app.rocksdb.is_none(),
        "serve leaves the keyspaces to the worker"
    );
    let ready = app.get("/_health/ready").await.body;
    assert!(
        ready["projectors"]["rocksdb"]["health"]["detail"]
            .as_str()
            .unwrap()
            .contains("worker"),
        "{ready}"
    );
    let (mut worker, dir) = rocksdb_worker(&broker, &app);
    app.put_and_freeze("p", "thing", &faults::thing()).await;
    let id = Uuid::new_v4();
    app.put_projected(
        &format!("/p/thing/{id}?wait=true"),
        &json!({"project_version": 1, "n": 5}),
    )
    .await;
    terminate(&mut worker);
    let keyspaces = RocksProjector::open(&dir.path().join("keyspaces")).unwrap();
    assert_eq!(
        keyspaces.get(&ident("p"), 1, &ident("thing"), &id).unwrap()["n"],
        5
    );
    app.stop().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn a_queue_the_broker_lost_gets_every_pending_task_again() {
    let broker = TestBroker::new().await;
    let queue = QueueSettings {
        external: vec!["rocksdb".into()],
        ..broker.settings()
    };
    let app = spawn_app_with(|s| {
        s.queue = Some(queue);
        s.projection.wait_timeout_secs = 1;
    })
    .await;
    assert_eq!(
        app.put("/p/thing/_blueprint", &faults::thing())
            .await
            .status,
        200
    );
    let frozen = app.post("/p/_version", None).await;
    assert_eq!(
        frozen.status, 503,
        "no worker migrates yet: {}",
        frozen.body
    );
    let mut ids = Vec::new();
    for n in 0..20 {
        let id = Uuid::new_v4();
        let put = app
            .put(
                &format!("/p/thing/{id}"),
                &json!({"project_version": 1, "n": n}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        ids.push(id);
    }
    broker.expect_messages("rocksdb", 21).await; // the migration and the writes
                                                 // The queue disappears with every task in it, as with a broker that lost its data.
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            format!("{}.rocksdb", broker.namespace).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    // The next task cannot be routed; the relay starts over and finds the queue missing.
    let last = Uuid::new_v4();
    let put = app
        .put(
            &format!("/p/thing/{last}"),
            &json!({"project_version": 1, "n": 99}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    ids.push(last);
    broker.expect_messages("rocksdb", 22).await;

    let (mut worker, dir) = rocksdb_worker(&broker, &app);
    faults::wait_until_projected(&app).await;
    terminate(&mut worker);
    let keyspaces = RocksProjector::open(&dir.path().join("keyspaces")).unwrap();
    let held = ids
        .iter()
        .filter(|id| keyspaces.get(&ident("p"), 1, &ident("thing"), id).is_some())
        .count();
    assert_eq!(held, ids.len(), "every pending task reached the worker");
    app.stop().await;
    broker.clean_up().await;
}

/// The queue goes while consumers are connected, with tasks in it that one of them holds
/// unacknowledged, and nothing more is written: no consumer declares it afresh, and the idle relay
/// finds it missing and publishes every pending task again.
#[tokio::test]
async fn a_queue_deleted_under_its_consumers_gets_every_pending_task_again() {
    let broker = TestBroker::new().await;
    let queue = QueueSettings {
        external: vec!["rocksdb".into()],
        ..broker.settings()
    };
    let app = spawn_app_with(|s| {
        s.queue = Some(queue);
        s.projection.wait_timeout_secs = 1;
    })
    .await;
    let put = app.put("/p/thing/_blueprint", &faults::thing()).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let frozen = app.post("/p/_version", None).await;
    assert_eq!(frozen.status, 503, "no worker yet: {}", frozen.body);
    // The active consumer takes every task and never acknowledges one.
    let name = format!("{}.rocksdb", broker.namespace);
    let connection = connect().await;
    let holder = connection.create_channel().await.unwrap();
    let _held = holder
        .basic_consume(
            name.as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..20 {
        let id = Uuid::new_v4();
        let body = json!({"project_version": 1, "n": n});
        let put = app.put(&format!("/p/thing/{id}"), &body).await;
        assert_eq!(put.status, 200, "{}", put.body);
        ids.push(id);
    }
    // A worker waits as the standby; then the queue goes with every task in it.
    let (mut worker, dir) = rocksdb_worker(&broker, &app);
    broker.expect_consumers("rocksdb", 2).await;
    let deleter = connection.create_channel().await.unwrap();
    deleter
        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // Nothing new is published: the idle relay finds the queue missing, declares it and publishes
    // every pending task again; only then does the worker find its queue and consume.
    broker.expect_consumers("rocksdb", 1).await;
    faults::wait_until_projected(&app).await;
    terminate(&mut worker);
    let keyspaces = RocksProjector::open(&dir.path().join("keyspaces")).unwrap();
    let held = ids
        .iter()
        .filter(|id| keyspaces.get(&ident("p"), 1, &ident("thing"), id).is_some())
        .count();
    assert_eq!(held, ids.len(), "every pending task reached the worker");
    app.stop().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn a_worker_without_a_broker_or_with_an_unknown_projector_says_what_is_missing() {
    let output = Command::new(env!("CARGO_BIN_EXE_dstore"))
        .args(["worker", "--projector", "postgresql"])
        .env_remove("DSTORE_CONFIG")
        .env_remove("QUEUE_CONNECTIONSTRING")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("QUEUE_CONNECTIONSTRING"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_dstore"))
        .args(["worker", "--projector", "mongodb"])
        .env_remove("DSTORE_CONFIG")
        .env("QUEUE_CONNECTIONSTRING", broker_url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("mongodb") && stderr.contains("postgresql"),
        "{stderr}"
    );
}

#[tokio::test]
async fn refused_tasks_are_listed_with_the_reason_kept_in_the_dead_letter_queue_and_retried() {
    let broker = TestBroker::new().await;
    crate::projectors::refused_items_are_dead_lettered_and_retried(Some(&broker)).await;
    broker.clean_up().await;
}

#[tokio::test]
async fn while_the_broker_is_unreachable_writes_are_accepted_and_all_arrive_once_it_is_back() {
    let broker = TestBroker::new().await;
    let upstream = broker_url();
    let authority = upstream
        .trim_start_matches("amqp://")
        .split('/')
        .next()
        .unwrap()
        .rsplit('@')
        .next()
        .unwrap()
        .to_string();
    let proxy = Proxy::start(&authority).await;
    let queue = QueueSettings {
        url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port).into(),
        ..broker.settings()
    };
    let app = spawn_app_with(|s| {
        s.queue = Some(queue);
        s.projection.wait_timeout_secs = 120;
    })
    .await;
    app.put_and_freeze("p", "thing", &faults::thing()).await;

    let load = WriteLoad::start(&app.address, 8);
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = app.get("/_health/ready").await.body;
        if ready["queue"]["links"]["relay rocksdb"]["connected"] == false {
            assert_eq!(ready["status"], "degraded", "{ready}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lost link never showed: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let expected = load.stop().await;
    faults::wait_until_projected(&app).await;
    let tallies = [Tally::of(
        "rocksdb",
        &expected,
        &faults::rocksdb_items(&app, &expected),
    )];
    faults::report("the broker unreachable under load", &expected, &tallies);
    app.stop().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn restarting_rabbitmq_under_load_loses_no_write() {
    let _alone = BROKER.write().await;
    let broker = TestBroker::exclusive(None).await;
    let db = TestDatabase::create().await;
    let (queue, pg) = (broker.settings(), db.settings());
    let app = spawn_app_with(|s| {
        s.queue = Some(queue);
        s.postgresql = Some(pg);
        s.projection.wait_timeout_secs = 120;
    })
    .await;
    app.put_and_freeze("p", "thing", &faults::thing()).await;

    let load = WriteLoad::start(&app.address, 8);
    tokio::time::sleep(Duration::from_millis(700)).await;
    rabbitmqctl("stop_app");
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl("start_app");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let expected = load.stop().await;
    faults::wait_until_projected(&app).await;
    let tallies = [
        Tally::of(
            "rocksdb",
            &expected,
            &faults::rocksdb_items(&app, &expected),
        ),
        Tally::of("postgresql", &expected, &faults::postgres_items(&db).await),
    ];
    faults::report("rabbitmq restarted under load", &expected, &tallies);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A disk alarm on the test broker, raised by a free-disk limit no disk meets, until dropped
/// (the limit it had is set again).
struct DiskAlarm {
    limit: String,
}

impl DiskAlarm {
    async fn raise() -> DiskAlarm {
        let limit = Command::new("rabbitmqctl")
            .args(["eval", "rabbit_disk_monitor:get_disk_free_limit()."])
            .output()
            .expect("rabbitmqctl eval");
        let limit = String::from_utf8_lossy(&limit.stdout).trim().to_string();
        assert!(limit.parse::<u64>().is_ok(), "the broker's limit: {limit}");
        let alarm = DiskAlarm { limit };
        rabbitmqctl_with(&["set_disk_free_limit", "1000000000000000"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while alarm_is_off() {
            assert!(Instant::now() < deadline, "the broker raised no disk alarm");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        alarm
    }
}

impl Drop for DiskAlarm {
    fn drop(&mut self) {
        rabbitmqctl_with(&["set_disk_free_limit", &self.limit]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !alarm_is_off() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn alarm_is_off() -> bool {
    Command::new("rabbitmq-diagnostics")
        .args(["-q", "check_local_alarms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("rabbitmq-diagnostics")
        .success()
}

/// Under a memory or disk alarm the broker stops reading every connection that publishes: a
/// consumer that published its reports on the connection its deliveries came on could then
/// acknowledge nothing, and a backlog that raised the alarm would never drain. It publishes on a
/// connection of its own and keeps its reports while that one is blocked: the queue drains, and
/// the reports reach the server once the alarm is over.
#[tokio::test]
async fn a_disk_alarm_does_not_stop_a_worker_draining_its_queue() {
    let _alone = BROKER.write().await;
    let broker = TestBroker::exclusive(None).await;
    let db = TestDatabase::create().await;
    let (app, mut env) = frozen_while_the_worker_ran(&broker, &db).await;
    for n in 0..40 {
        let put = app
            .put(
                &format!("/p/thing/{}", Uuid::new_v4()),
                &json!({"project_version": 1, "n": n}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    broker.expect_messages_in("postgresql", 40..=41).await;
    let alarm = DiskAlarm::raise().await;
    // A window of four: the queue drains only if the worker acknowledges under the alarm.
    env.push(("DSTORE_QUEUE_PREFETCH", "4".into()));
    let mut worker = start_worker("postgresql", &app.address, &env);
    expect_count(&db, "SELECT count(*) FROM p_v1.things", 40).await;
    broker.expect_messages("postgresql", 0).await;
    drop(alarm);
    expect_nothing_pending(&app, "postgresql").await;
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// Parking publishes: under an alarm a held project's deliveries are set aside, unacknowledged
/// and in order, and parked once the alarm is over, while the other projects' are applied.
#[tokio::test]
async fn under_a_disk_alarm_a_held_project_waits_and_the_others_drain() {
    let _alone = BROKER.write().await;
    let broker = TestBroker::exclusive(None).await;
    let db = TestDatabase::create().await;
    let (app, env, mut worker) = with_bad_parked(&broker, &db, |_| {}).await;
    let thing = faults::thing();
    assert_eq!(app.put("/good/thing/_blueprint", &thing).await.status, 200);
    freeze_until_migrated(&app, "good").await;
    terminate(&mut worker);
    let item = json!({"project_version": 1, "n": 1});
    let put = app
        .put(&format!("/bad/thing/{}", Uuid::new_v4()), &item)
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    for _ in 0..20 {
        let put = app
            .put(&format!("/good/thing/{}", Uuid::new_v4()), &item)
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    broker.expect_messages_in("postgresql", 21..=22).await;
    let alarm = DiskAlarm::raise().await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    expect_count(&db, "SELECT count(*) FROM good_v1.things", 20).await;
    drop(alarm);
    // The first copy may have been taken as the alarm blocked the connection, and parked again
    // after it: twice is harmless.
    broker
        .expect_messages_in("postgresql.parked.bad", 2..=3)
        .await;
    expect_nothing_pending_but(&app, "postgresql", 2).await;
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A held project whose parking queue empties while an alarm keeps its later deliveries set aside
/// is not let go: they are parked once the alarm is over and applied in order. Let go, its next
/// delivery was applied at once and those set aside were parked in a queue the session never
/// read again.
#[tokio::test]
async fn under_a_disk_alarm_a_project_with_deliveries_set_aside_stays_parked() {
    let _alone = BROKER.write().await;
    let broker = TestBroker::exclusive(None).await;
    let db = TestDatabase::create().await;
    let (app, env, mut worker) = with_bad_parked(&broker, &db, |_| {}).await;
    expect_held(&app, "postgresql", 1).await;
    terminate(&mut worker);
    let item = json!({"project_version": 1, "n": 1});
    let first = app
        .put(&format!("/bad/thing/{}", Uuid::new_v4()), &item)
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    broker.expect_messages_in("postgresql", 1..=2).await;
    // The project still fails its migration: its write is set aside, unparked, as it comes.
    let alarm = DiskAlarm::raise().await;
    let mut worker = start_worker("postgresql", &app.address, &env);
    broker.expect_messages_in("postgresql", 0..=0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // What failed the migration goes: the parked migration then succeeds and empties the queue.
    let mut sql = db.sql().await;
    sqlx::raw_sql("DROP SCHEMA bad_v1")
        .execute(&mut sql)
        .await
        .unwrap();
    expect_count(&db, "SELECT count(*) FROM bad_v1.things", 0).await;
    // Time for the session to find the parking queue empty.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = app
        .put(&format!("/bad/thing/{}", Uuid::new_v4()), &item)
        .await;
    assert_eq!(second.status, 200, "{}", second.body);
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(alarm);
    expect_count(&db, "SELECT count(*) FROM bad_v1.things", 2).await;
    expect_nothing_pending(&app, "postgresql").await;
    expect_held(&app, "postgresql", 0).await;
    terminate(&mut worker);
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// Waits up to 30 s until the server counts `held` projects held back by `projector`.
async fn expect_held(app: &TestApp, projector: &str, held: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = app.get("/_health/ready").await.body;
        if ready["projectors"][projector]["held_projects"] == held {
            return;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to 30 s until `projector` has `left` tasks pending.
async fn expect_nothing_pending_but(app: &TestApp, projector: &str, left: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = app.get("/_health/ready").await.body;
        if ready["projectors"][projector]["progress"]["pending"] == left {
            return;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `rabbitmqctl` (the test machine's broker is local; `scripts/test.sh` runs as root).
fn rabbitmqctl(command: &str) {
    rabbitmqctl_with(&[command]);
}

fn rabbitmqctl_with(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!("rabbitmqctl {args:?}: {e}; the broker tests need the broker's rabbitmqctl")
        });
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// A server projecting into `db` through `broker`.
async fn with_broker_and_postgresql(broker: &TestBroker, db: &TestDatabase) -> TestApp {
    let (queue, pg) = (broker.settings(), db.settings());
    spawn_app_with(|s| {
        s.queue = Some(queue);
        s.postgresql = Some(pg);
    })
    .await
}

/// A task message as the relay publishes it: `seq | revision | task JSON`.
fn task_message(seq: u64, revision: u64, task: serde_json::Value) -> Vec<u8> {
    let mut message = seq.to_be_bytes().to_vec();
    message.extend_from_slice(&revision.to_be_bytes());
    message.extend_from_slice(task.to_string().as_bytes());
    message
}

async fn publish(channel: &Channel, broker: &TestBroker, projector: &str, body: &[u8]) {
    channel
        .basic_publish(
            format!("{}.tasks", broker.namespace).as_str().into(),
            projector.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn redelivered_stale_and_unreadable_messages_never_duplicate_or_undo_newer_data() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let app = with_broker_and_postgresql(&broker, &db).await;
    app.put_and_freeze("p", "thing", &faults::thing()).await;
    let (kept, deleted) = (Uuid::new_v4(), Uuid::new_v4());
    let first = app
        .put_projected(
            &format!("/p/thing/{kept}?wait=true"),
            &json!({"project_version": 1, "n": 1}),
        )
        .await;
    let old_revision = first.body["revision"].as_u64().unwrap();
    for n in 2..=3 {
        app.put_projected(
            &format!("/p/thing/{kept}?wait=true"),
            &json!({"project_version": 1, "n": n}),
        )
        .await;
    }
    app.put_projected(
        &format!("/p/thing/{deleted}?wait=true"),
        &json!({"project_version": 1, "n": 7}),
    )
    .await;
    let delete = app.delete(&format!("/p/thing/{deleted}?wait=true")).await;
    assert_eq!(delete.body["projected"], true);

    // Copies of old writes arrive again, as after a redelivery or a relay that lost its cursor,
    // and a message that is no task at all.
    let journal = app.journal.as_ref().unwrap().id().to_string();
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let stale = |id: Uuid, n: i64| {
        json!({"seq": 0, "project": "p", "op": {"upsert": {"blueprint": "thing", "id": id,
            "revision": 0, "docs": [{"version": 1, "doc": {"id": id, "project_version": 1,
            "links": [], "n": n, "title": null}}]}}})
    };
    for projector in ["rocksdb", "postgresql"] {
        let message = task_message(u64::MAX - 1, old_revision, stale(kept, 1));
        broker.publish_as(&journal, projector, &message).await;
        broker.publish_as(&journal, projector, &message).await;
        let message = task_message(u64::MAX - 2, old_revision, stale(deleted, 7));
        broker.publish_as(&journal, projector, &message).await;
        publish(&channel, &broker, projector, b"not a task").await;
    }
    faults::wait_until_projected(&app).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.messages("postgresql.dead").await < 1 || broker.messages("rocksdb.dead").await < 1
    {
        assert!(
            Instant::now() < deadline,
            "the unreadable message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let keyspace = app.rocksdb.clone().unwrap();
    let (p, thing) = (ident("p"), ident("thing"));
    assert_eq!(keyspace.get(&p, 1, &thing, &kept).unwrap()["n"], 3);
    assert!(keyspace.get(&p, 1, &thing, &deleted).is_none());
    let rows = faults::postgres_items(&db).await;
    assert_eq!(rows.get(&kept), Some(&3));
    assert_eq!(rows.get(&deleted), None);
    assert_eq!(
        rows.len(),
        2,
        "one row per item (and the last write): {rows:?}"
    );
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A task only this deployment's relay could have published is applied: one naming no journal
/// (published by hand) or another deployment's (two sharing a broker and `queue.namespace`) goes
/// to the dead-letter queue unapplied, so a forged drop empties no store and another journal's
/// writes never land in this one's, and the tasks behind them go on.
#[tokio::test]
async fn tasks_of_no_journal_or_another_are_dead_lettered_unapplied() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let app = with_broker_and_postgresql(&broker, &db).await;
    app.put_and_freeze("p", "thing", &faults::thing()).await;
    let kept = Uuid::new_v4();
    app.put_projected(
        &format!("/p/thing/{kept}?wait=true"),
        &json!({"project_version": 1, "n": 1}),
    )
    .await;

    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let drop = task_message(
        u64::MAX - 5,
        u64::MAX - 5,
        json!({"seq": 0, "project": "p", "op": "drop_project"}),
    );
    let stranger = Uuid::new_v4();
    let upsert = task_message(
        u64::MAX - 4,
        u64::MAX - 4,
        json!({"seq": 0, "project": "p", "op": {"upsert": {"blueprint": "thing", "id": stranger,
            "revision": u64::MAX - 4, "docs": [{"version": 1, "doc": {"id": stranger,
            "project_version": 1, "links": [], "n": 9, "title": null}}]}}}),
    );
    for projector in ["rocksdb", "postgresql"] {
        publish(&channel, &broker, projector, &drop).await;
        broker
            .publish_as("another-journal", projector, &upsert)
            .await;
        broker.publish_as("another-journal", projector, &drop).await;
    }
    faults::wait_until_projected(&app).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.messages("postgresql.dead").await < 3 || broker.messages("rocksdb.dead").await < 3
    {
        assert!(
            Instant::now() < deadline,
            "the foreign tasks were not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let keyspace = app.rocksdb.clone().unwrap();
    let (p, thing) = (ident("p"), ident("thing"));
    assert_eq!(keyspace.get(&p, 1, &thing, &kept).unwrap()["n"], 1);
    assert!(keyspace.get(&p, 1, &thing, &stranger).is_none());
    let rows = faults::postgres_items(&db).await;
    assert_eq!(rows.get(&kept), Some(&1), "{rows:?}");
    assert_eq!(rows.get(&stranger), None, "{rows:?}");
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// A projector's queue that refuses every publish (a length policy that rejects them) holds back
/// that projector only: the others' tasks are relayed and applied meanwhile, and the refused
/// projector's follow once the policy goes.
#[tokio::test]
async fn a_queue_refusing_publishes_holds_back_its_projector_only() {
    let broker = TestBroker::new().await;
    let db = TestDatabase::create().await;
    let policy = format!("{}_refuse", broker.namespace);
    rabbitmqctl_with(&[
        "set_policy",
        &policy,
        &format!("^{}\\.rocksdb$", broker.namespace),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
    let app = with_broker_and_postgresql(&broker, &db).await;
    let put = app.put("/p/thing/_blueprint", &faults::thing()).await;
    assert_eq!(put.status, 200, "{}", put.body);
    // The keyspaces' migration cannot reach them: frozen, with their migration pending.
    let frozen = app.post("/p/_version", None).await;
    assert!(
        frozen.status == 200
            || frozen.body["status"]
                .as_str()
                .is_some_and(|s| s.contains("rocksdb: still pending")),
        "{}",
        frozen.body
    );
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        let put = app
            .put(
                &format!("/p/thing/{id}"),
                &json!({"project_version": 1, "n": n}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM p_v1.things")
            .fetch_one(&mut db.sql().await)
            .await
            .unwrap_or(0);
        if applied == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL got {applied} of 5 items while the keyspaces' queue refused its publishes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let keyspace = app.rocksdb.clone().unwrap();
    let (p, thing) = (ident("p"), ident("thing"));
    assert!(keyspace.get(&p, 1, &thing, &ids[0]).is_none());

    rabbitmqctl_with(&["clear_policy", &policy]);
    faults::wait_until_projected(&app).await;
    for id in &ids {
        assert!(keyspace.get(&p, 1, &thing, id).is_some());
    }
    app.stop().await;
    broker.clean_up().await;
    db.drop().await;
}

/// Every queue dstore declares is classic, on a vhost whose default is quorum queues too: a
/// projector's queue relies on a returned delivery going back to its place, where RabbitMQ 4's
/// quorum queues put it at the back and dead-letter it after 20 returns. A queue that exists is
/// taken as it is (one an earlier dstore made quorum there), not declared again with arguments it
/// would refuse for ever.
#[tokio::test]
async fn every_queue_is_classic_whatever_the_vhost_defaults_to() {
    let broker = TestBroker::new().await;
    let vhost = broker.namespace.clone();
    rabbitmqctl_with(&["add_vhost", &vhost, "--default-queue-type", "quorum"]);
    rabbitmqctl_with(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let url = broker_url();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    let queue = QueueSettings {
        namespace: broker.namespace.clone(),
        ..QueueSettings::new(format!("{base}/{vhost}"))
    };
    let reports = format!("{}.reports", broker.namespace);
    {
        let url = format!("{base}/{vhost}");
        let earlier = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = earlier.create_channel().await.unwrap();
        channel
            .queue_declare(
                reports.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        earlier.close(200, "done".into()).await.unwrap();
    }
    let app = spawn_app_with(move |s| s.queue = Some(queue)).await;
    app.put_and_freeze("p", "thing", &faults::thing()).await;
    app.put_projected(
        &format!("/p/thing/{}?wait=true", Uuid::new_v4()),
        &json!({"project_version": 1, "n": 1}),
    )
    .await;
    let listed = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "-p", &vhost, "name", "type"])
        .output()
        .expect("rabbitmqctl");
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let queues: Vec<(&str, &str)> = listed
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| name.starts_with(&broker.namespace))
        .collect();
    for queue in ["rocksdb", "rocksdb.dead", "rocksdb.parked", "reports"] {
        let name = format!("{}.{queue}", broker.namespace);
        assert!(
            queues.iter().any(|(n, _)| *n == name),
            "{name} was declared: {listed}"
        );
    }
    for (name, kind) in &queues {
        let expected = if *name == reports {
            "quorum"
        } else {
            "classic"
        };
        assert_eq!(kind.trim(), expected, "{name}: {listed}");
    }
    app.stop().await;
    rabbitmqctl_with(&["delete_vhost", &vhost]);
}

#[tokio::test]
async fn the_keyspaces_follow_the_broker_being_turned_off_and_on_again() {
    let broker = TestBroker::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (p, thing) = (ident("p"), ident("thing"));
    let with_broker = |s: &mut dstore::config::Settings| {
        s.storage.data_dir = path.clone();
        s.queue = Some(broker.settings());
    };
    // With a broker the keyspaces are a database of their own, fed by tasks.
    let app = spawn_app_with(with_broker).await;
    assert!(!app.rocksdb.as_ref().unwrap().is_in_journal());
    app.put_and_freeze("p", "thing", &faults::thing()).await;
    let first = Uuid::new_v4();
    app.put_projected(
        &format!("/p/thing/{first}?wait=true"),
        &json!({"project_version": 1, "n": 1}),
    )
    .await;
    app.stop().await;
    assert!(path.join("keyspaces").is_dir());

    // Without one the journal writes them, and starts with what the projector had.
    let app = spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
    let keyspaces = app.rocksdb.clone().unwrap();
    assert!(keyspaces.is_in_journal());
    assert!(!path.join("keyspaces").exists(), "moved into the journal");
    assert_eq!(keyspaces.get(&p, 1, &thing, &first).unwrap()["n"], 1);
    let second = Uuid::new_v4();
    let put = app
        .put(
            &format!("/p/thing/{second}"),
            &json!({"project_version": 1, "n": 2}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(
        keyspaces.get(&p, 1, &thing, &second).unwrap()["n"],
        2,
        "in the keyspace as soon as it is acknowledged"
    );
    drop(keyspaces);
    app.stop().await;

    // With the broker again, everything moves back out.
    let app = spawn_app_with(with_broker).await;
    let keyspaces = app.rocksdb.clone().unwrap();
    assert!(!keyspaces.is_in_journal());
    for (id, n) in [(first, 1), (second, 2)] {
        assert_eq!(keyspaces.get(&p, 1, &thing, &id).unwrap()["n"], n);
    }
    drop(keyspaces);
    app.stop().await;
    broker.clean_up().await;
}
