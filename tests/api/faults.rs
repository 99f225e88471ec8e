//! Fault tests: a write load runs while a store (or the broker) goes away and comes back; every
//! acknowledged write must end up in every store, as its newest acknowledged state.
//!
//! A store "goes away" behind a [`Proxy`] that dstore talks to: cutting it drops every open
//! connection and closes new ones at once, as a stopped server would, without stopping a server
//! other tests share. Each test prints how many writes were acknowledged and how many items each
//! store holds as expected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstore::blueprint::Ident;
use dstore::config::{ElasticsearchSettings, Settings};
use dstore::projector::rocksdb::RocksProjector;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::elasticsearch::{unique_prefix, Es};
use crate::helpers::{spawn_app_with, TestApp};
use crate::postgres::TestDatabase;
use crate::rabbitmq::TestBroker;

/// A TCP proxy to `upstream` that can be cut and restored, or stalled: a stalled proxy keeps every
/// connection open and forwards nothing either way, as a network partition does. Connections can
/// also be stranded: those open stall for good while new ones are forwarded, as after a partition
/// that healed once the server had ended their sessions, which their client never hears of.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Whether every connection is stalled, and below which number connections are stranded.
    stalled: tokio::sync::watch::Sender<(bool, u64)>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let port = listener.local_addr().expect("an address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let (stalled, _) = tokio::sync::watch::channel((false, 0));
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = upstream.to_string();
        let accepting = tokio::spawn({
            let (cut, connections, stalled, accepted) = (
                cut.clone(),
                connections.clone(),
                stalled.clone(),
                accepted.clone(),
            );
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once, like a port nobody serves
                    }
                    let number = accepted.fetch_add(1, Ordering::SeqCst);
                    let stuck = move |(all, below): &(bool, u64)| *all || number < *below;
                    let upstream = upstream.clone();
                    let mut stall = stalled.subscribe();
                    let forward = tokio::spawn(async move {
                        if stuck(&stall.borrow_and_update()) {
                            // Held open, never answered: the host cannot be reached.
                            return std::future::pending::<()>().await;
                        }
                        if let Ok(mut server) = TcpStream::connect(&upstream).await {
                            let stalled = tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                                _ = stall.wait_for(stuck) => true,
                            };
                            if stalled {
                                // Both ends stay open and nothing crosses any more.
                                std::future::pending::<()>().await
                            }
                        }
                    });
                    connections.lock().unwrap().push(forward);
                }
            }
        });
        Proxy {
            port,
            cut,
            stalled,
            accepted,
            connections,
            accepting,
        }
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Stops forwarding on every connection, open or new, keeping them open, until
    /// [`Proxy::restore`].
    pub fn stall(&self) {
        self.stalled.send_modify(|(all, _)| *all = true);
    }

    /// Stops forwarding on the connections open now, for good, keeping them open; later ones are
    /// forwarded.
    pub fn strand(&self) {
        let below = self.accepted.load(Ordering::SeqCst);
        self.stalled.send_modify(|(_, stranded)| *stranded = below);
    }

    /// Forwards again. Connections stalled meanwhile are closed, as a partition that heals finds
    /// them: the server ended its sessions while they were cut off.
    pub fn restore(&self) {
        let mut was = false;
        self.stalled
            .send_modify(|(all, _)| was = std::mem::replace(all, false));
        if was {
            for connection in self.connections.lock().unwrap().drain(..) {
                connection.abort();
            }
        }
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

/// The blueprint the load writes: `p/thing`, table `things`.
pub fn thing() -> Value {
    json!({"postgresql": {"table": "things"}, "elasticsearch": {"type": "thing"},
        "columns": {"n": {"type": "integer"}, "title": {"type": "string"}}})
}

/// Writers creating, updating and deleting their own items until stopped. Each item belongs to one
/// writer, so the last acknowledged answer for it is its newest state.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<Outcome>>,
}

#[derive(Default)]
pub struct Outcome {
    /// Per item: the `n` of its newest acknowledged write, or `None` once its delete was acknowledged.
    pub items: HashMap<Uuid, Option<i64>>,
    pub acknowledged: usize,
    /// Answers other than 200, and requests that got no answer; their items are left out of `items`.
    pub errors: Vec<String>,
}

impl WriteLoad {
    pub fn start(address: &str, writers: usize) -> WriteLoad {
        WriteLoad::start_many(&[address.to_string()], writers, Duration::from_millis(10))
    }

    /// Writers spreading their requests over `addresses` in turn, pausing `pace` between requests.
    pub fn start_many(addresses: &[String], writers: usize, pace: Duration) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let writers = (0..writers)
            .map(|w| tokio::spawn(write(addresses.to_vec(), w as i64, pace, stop.clone())))
            .collect();
        WriteLoad { stop, writers }
    }

    pub async fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Outcome::default();
        for writer in self.writers {
            let outcome = writer.await.expect("a writer ends");
            total.items.extend(outcome.items);
            total.acknowledged += outcome.acknowledged;
            total.errors.extend(outcome.errors);
        }
        total
    }
}

async fn write(
    addresses: Vec<String>,
    writer: i64,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut outcome = Outcome::default();
    let mut live: Vec<Uuid> = Vec::new();
    for op in 0i64.. {
        if stop.load(Ordering::SeqCst) || op >= 1500 {
            break;
        }
        let address = &addresses[(op + writer) as usize % addresses.len()];
        // Mostly new items; every fourth op updates one, every tenth deletes one.
        let (id, n, request) = match (op % 10, live.len()) {
            (9, len) if len > 0 => {
                let id = live.swap_remove((op as usize * 7) % len);
                (id, None, client.delete(format!("{address}/p/thing/{id}")))
            }
            (1 | 5, len) if len > 0 => {
                let id = live[(op as usize * 13) % len];
                let n = writer * 1_000_000 + op;
                let body = json!({"project_version": 1, "n": n, "title": "updated"});
                let request = client
                    .put(format!("{address}/p/thing/{id}"))
                    .body(body.to_string());
                (id, Some(n), request)
            }
            _ => {
                let id = Uuid::new_v4();
                live.push(id);
                let n = writer * 1_000_000 + op;
                let body = json!({"project_version": 1, "n": n, "title": "new"});
                let request = client
                    .put(format!("{address}/p/thing/{id}"))
                    .body(body.to_string());
                (id, Some(n), request)
            }
        };
        // Paced, so the load spans the whole outage and what follows it.
        tokio::time::sleep(pace).await;
        match request.send().await {
            Ok(response) if response.status() == 200 => {
                outcome.acknowledged += 1;
                outcome.items.insert(id, n);
            }
            answer => {
                let what = match answer {
                    Ok(response) => format!(
                        "{} {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    ),
                    Err(e) => e.to_string(),
                };
                outcome.errors.push(what);
                // Whether it was journaled is unknown: the item takes no part in the checks.
                outcome.items.remove(&id);
                live.retain(|l| *l != id);
            }
        }
    }
    // Items whose state is uncertain were removed above; everything else is as last acknowledged.
    outcome
}

/// Writes once more with `wait=true`: when it answers, every store applied everything before it.
pub async fn wait_until_projected(app: &TestApp) {
    let answer = app
        .put(
            &format!("/p/thing/{}?wait=true&timeout=120", Uuid::new_v4()),
            &json!({"project_version": 1, "n": -1}),
        )
        .await;
    if (answer.status, &answer.body["projected"]) != (200, &json!(true)) {
        let ready = app.get("/_health/ready").await.body;
        panic!(
            "the stores never caught up: {}\nreadiness: {ready:#}",
            answer.body
        );
    }
}

/// How many items a store holds exactly as expected, and the first few it does not.
pub struct Tally {
    pub store: &'static str,
    pub matching: usize,
    pub wrong: Vec<String>,
}

impl Tally {
    pub fn of(store: &'static str, expected: &Outcome, held: &HashMap<Uuid, i64>) -> Tally {
        let mut tally = Tally {
            store,
            matching: 0,
            wrong: Vec::new(),
        };
        for (id, want) in &expected.items {
            let have = held.get(id).copied();
            if have == *want {
                tally.matching += 1;
            } else if tally.wrong.len() < 5 {
                tally
                    .wrong
                    .push(format!("{id}: expected {want:?}, {store} has {have:?}"));
            }
        }
        tally
    }
}

/// The expected items of `p/thing` at version 1 that the app's embedded keyspace holds, by id.
pub fn rocksdb_items(app: &TestApp, expected: &Outcome) -> HashMap<Uuid, i64> {
    keyspace_items(
        app.rocksdb.as_ref().expect("the rocksdb projector runs"),
        expected,
    )
}

/// The expected items of `p/thing` at version 1 that a keyspace holds, by id.
pub fn keyspace_items(keyspace: &RocksProjector, expected: &Outcome) -> HashMap<Uuid, i64> {
    let (project, blueprint) = (Ident::parse("p").unwrap(), Ident::parse("thing").unwrap());
    expected
        .items
        .keys()
        .filter_map(|id| {
            let doc = keyspace.get(&project, 1, &blueprint, id)?;
            Some((*id, doc["n"].as_i64()?))
        })
        .collect()
}

pub async fn postgres_items(db: &TestDatabase) -> HashMap<Uuid, i64> {
    let mut sql = db.sql().await;
    let rows: Vec<(Uuid, Option<i32>)> = sqlx::query_as("SELECT id, n FROM p_v1.things")
        .fetch_all(&mut sql)
        .await
        .expect("the table is readable");
    rows.into_iter()
        .filter_map(|(id, n)| Some((id, i64::from(n?))))
        .collect()
}

pub async fn elasticsearch_items(es: &Es, prefix: &str) -> HashMap<Uuid, i64> {
    let index = format!("{prefix}p-v1-thing");
    es.refresh(&index).await;
    let found = es
        .search(&index, json!({"size": 10000, "query": {"match_all": {}}}))
        .await;
    found["hits"]["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .filter_map(|hit| {
            let id = hit["_id"].as_str()?.parse().ok()?;
            Some((id, hit["_source"]["n"].as_i64()?))
        })
        .collect()
}

/// Prints the figures and fails unless every store holds every item as expected.
pub fn report(what: &str, expected: &Outcome, tallies: &[Tally]) {
    let deleted = expected.items.values().filter(|n| n.is_none()).count();
    let stores: Vec<String> = tallies
        .iter()
        .map(|t| format!("{} {}/{}", t.store, t.matching, expected.items.len()))
        .collect();
    println!(
        "{what}: {} writes acknowledged ({} items, {deleted} of them deleted), {} failed; as expected in {}",
        expected.acknowledged,
        expected.items.len(),
        expected.errors.len(),
        stores.join(", ")
    );
    assert!(
        expected.errors.is_empty(),
        "writes were refused while a store was away: {:?}",
        &expected.errors[..expected.errors.len().min(5)]
    );
    assert!(expected.acknowledged > 100, "the load ran");
    for tally in tallies {
        assert!(
            tally.wrong.is_empty(),
            "{}: {} of {} items differ, e.g. {:?}",
            tally.store,
            expected.items.len() - tally.matching,
            expected.items.len(),
            tally.wrong
        );
    }
}

/// Polls `/_health/ready` until `projector` is reported failing.
pub async fn wait_until_failing(app: &TestApp, projector: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = app.get("/_health/ready").await.body;
        if ready["projectors"][projector]["status"] == "failing" {
            assert_eq!(ready["status"], "degraded", "{ready}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{projector} was never reported failing: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the write load while `proxy` is cut for two seconds (long enough for `projector` to be
/// reported failing); answers what was acknowledged, once every store caught up.
async fn load_through_an_outage(app: &TestApp, proxy: &Proxy, projector: &str) -> Outcome {
    let load = WriteLoad::start(&app.address, 8);
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.cut();
    wait_until_failing(app, projector).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let expected = load.stop().await;
    wait_until_projected(app).await;
    expected
}

/// How the scenarios run: projection in process, or through RabbitMQ.
#[derive(Clone, Copy, Debug)]
enum Transport {
    InProcess,
    RabbitMq,
}

/// Starts the service with `configure`d stores and the transport; the broker, if any, is returned
/// so the test can remove its queues at the end.
async fn spawn(
    transport: Transport,
    configure: impl FnOnce(&mut Settings),
) -> (TestApp, Option<TestBroker>) {
    let broker = match transport {
        Transport::InProcess => None,
        Transport::RabbitMq => Some(TestBroker::new().await),
    };
    let queue = broker.as_ref().map(TestBroker::settings);
    let app = spawn_app_with(|s| {
        s.projection.wait_timeout_secs = 120;
        s.queue = queue;
        configure(s);
    })
    .await;
    app.put_and_freeze("p", "thing", &thing()).await;
    (app, broker)
}

async fn postgresql_goes_away_under_load(transport: Transport) {
    let db = TestDatabase::create().await;
    let upstream = crate::postgres::server_url();
    let options: sqlx::postgres::PgConnectOptions = upstream.parse().expect("a postgres url");
    let proxy = Proxy::start(&format!("{}:{}", options.get_host(), options.get_port())).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, db.name);
    let mut pg = db.settings();
    pg.url = Some(url.into());
    let (app, broker) = spawn(transport, |s| s.postgresql = Some(pg)).await;

    let expected = load_through_an_outage(&app, &proxy, "postgresql").await;

    let tallies = [
        Tally::of("rocksdb", &expected, &rocksdb_items(&app, &expected)),
        Tally::of("postgresql", &expected, &postgres_items(&db).await),
    ];
    report(
        &format!("postgresql away under load ({transport:?})"),
        &expected,
        &tallies,
    );
    app.stop().await;
    if let Some(broker) = broker {
        broker.clean_up().await;
    }
    db.drop().await;
}

async fn elasticsearch_goes_away_under_load(transport: Transport) {
    let es = Es::new().await;
    let prefix = unique_prefix();
    let upstream = es.url.trim_start_matches("http://").to_string();
    let proxy = Proxy::start(&upstream).await;
    let settings = ElasticsearchSettings {
        url: format!("http://127.0.0.1:{}", proxy.port).into(),
        index_prefix: prefix.clone(),
        ..ElasticsearchSettings::default()
    };
    let (app, broker) = spawn(transport, |s| s.elasticsearch = Some(settings)).await;

    let expected = load_through_an_outage(&app, &proxy, "elasticsearch").await;

    let tallies = [
        Tally::of("rocksdb", &expected, &rocksdb_items(&app, &expected)),
        Tally::of(
            "elasticsearch",
            &expected,
            &elasticsearch_items(&es, &prefix).await,
        ),
    ];
    report(
        &format!("elasticsearch away under load ({transport:?})"),
        &expected,
        &tallies,
    );
    app.stop().await;
    if let Some(broker) = broker {
        broker.clean_up().await;
    }
    es.clean_up(&prefix).await;
}

#[tokio::test]
async fn while_postgresql_is_away_writes_are_accepted_and_every_one_arrives_after_it_returns() {
    postgresql_goes_away_under_load(Transport::InProcess).await;
}

#[tokio::test]
async fn through_rabbitmq_postgresql_going_away_under_load_loses_nothing() {
    postgresql_goes_away_under_load(Transport::RabbitMq).await;
}

#[tokio::test]
async fn while_elasticsearch_is_away_writes_are_accepted_and_every_one_arrives_after_it_returns() {
    elasticsearch_goes_away_under_load(Transport::InProcess).await;
}

#[tokio::test]
async fn through_rabbitmq_elasticsearch_going_away_under_load_loses_nothing() {
    elasticsearch_goes_away_under_load(Transport::RabbitMq).await;
}
