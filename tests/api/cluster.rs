//! Cluster mode with real processes: several `dstore serve` nodes on one PostgreSQL storage, with
//! PostgreSQL and Elasticsearch projectors, a write load spread over the nodes, nodes killed with
//! SIGKILL under load, a freeze in the middle, and PostgreSQL cut away. Afterwards every acknowledged
//! write must be readable from every node and present in every store, as its newest acknowledged
//! state, and each project's revisions must run 1, 2, 3 … without a gap.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::elasticsearch::{unique_prefix, Es};
use crate::faults::{thing, Outcome, Proxy, Tally, WriteLoad};
use crate::postgres::TestDatabase;
use crate::process::{free_port, Server};

/// A cluster's shared settings: its storage database, the projector's database, Elasticsearch.
struct Cluster {
    storage: TestDatabase,
    store: TestDatabase,
    es: Es,
    prefix: String,
    dir: tempfile::TempDir,
    /// Where nodes reach the storage (a proxy, for outages), when not directly.
    storage_url: String,
}

impl Cluster {
    async fn new() -> Cluster {
        let storage = TestDatabase::create().await;
        let storage_url = storage.settings().url.unwrap().expose().to_string();
        Cluster {
            storage,
            store: TestDatabase::create().await,
            es: Es::new().await,
            prefix: unique_prefix(),
            dir: tempfile::tempdir().unwrap(),
            storage_url,
        }
    }

    async fn node(&self, index: usize, port: u16) -> Server {
        let data = self.dir.path().join(format!("node{index}"));
        Server::start_with(
            &data,
            port,
            &[
                ("DSTORE_STORAGE_BACKEND", "postgresql".into()),
                ("DSTORE_STORAGE_URL", self.storage_url.clone()),
                ("DSTORE_NODE", format!("node{index}")),
                (
                    "DATABASE_URL",
                    self.store.settings().url.unwrap().expose().to_string(),
                ),
                ("ELASTICSEARCH_HOST", self.es.url.clone()),
                ("DSTORE_ELASTICSEARCH_INDEX_PREFIX", self.prefix.clone()),
                ("DSTORE_WAIT_TIMEOUT_SECS", "60".into()),
            ],
        )
        .await
    }

    /// `count` nodes named `{name}{i}` on the shared storage, without stores, each with `extra`
    /// variables.
    async fn bare_nodes(&self, name: &str, count: usize, extra: &[(&str, String)]) -> Vec<Server> {
        let mut nodes = Vec::new();
        for i in 0..count {
            let mut env = vec![
                ("DSTORE_STORAGE_BACKEND", "postgresql".into()),
                ("DSTORE_STORAGE_URL", self.storage_url.clone()),
                ("DSTORE_NODE", format!("{name}{i}")),
            ];
            env.extend(extra.iter().cloned());
            let data = self.dir.path().join(format!("{name}{i}"));
            nodes.push(Server::start_with(&data, free_port(), &env).await);
        }
        nodes
    }

    /// A proxy in front of the storage, which nodes started from now on reach it through.
    async fn behind_proxy(&mut self) -> Proxy {
        let direct: sqlx::postgres::PgConnectOptions = self.storage_url.parse().unwrap();
        let proxy = Proxy::start(&format!("{}:{}", direct.get_host(), direct.get_port())).await;
        self.storage_url = format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            proxy.port, self.storage.name
        );
        proxy
    }

    async fn clean_up(self) {
        self.es.clean_up(&self.prefix).await;
        self.storage.drop().await;
        self.store.drop().await;
    }
}

/// The status and JSON body of the node's answer, which comes within a minute and a half: well before
/// the kernel gives up a connection to a storage that stopped answering.
async fn send(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    // Past the nodes' longest wait for projection (`DSTORE_WAIT_TIMEOUT_SECS`, 60 s), so a
    // request that waits it out is answered rather than given up.
    let mut request = reqwest::Client::new()
        .request(method, url)
        .timeout(Duration::from_secs(90));
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request
        .send()
        .await
        .expect("the node answers within a minute and a half");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Puts the blueprint `thing` into `project` through `node` and freezes it as version 1.
async fn put_thing_and_freeze(node: &Server, project: &str) {
    for (method, path, body) in [
        (reqwest::Method::PUT, "thing/_blueprint", Some(thing())),
        (reqwest::Method::POST, "_version", None),
    ] {
        let (status, body) = send(method, node.url(&format!("/{project}/{path}")), body).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// What a store holds of `p/thing` at `version`, by id: `n`.
async fn postgres_items(db: &TestDatabase, version: u32) -> HashMap<Uuid, i64> {
    let mut sql = db.sql().await;
    let rows: Vec<(Uuid, Option<i32>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, n FROM p_v{version}.things"
    )))
    .fetch_all(&mut sql)
    .await
    .expect("the table is readable");
    rows.into_iter()
        .filter_map(|(id, n)| Some((id, i64::from(n?))))
        .collect()
}

/// What Elasticsearch holds of the expected items of `p/thing` at `version`, by id (read by id, a
/// thousand at a time: more than a search window holds).
async fn elasticsearch_items(
    es: &Es,
    prefix: &str,
    version: u32,
    expected: &Outcome,
) -> HashMap<Uuid, i64> {
    let index = format!("{prefix}p-v{version}-thing");
    let ids: Vec<String> = expected.items.keys().map(Uuid::to_string).collect();
    let mut held = HashMap::new();
    for chunk in ids.chunks(1000) {
        let found = es.mget(&index, chunk).await;
        for doc in found["docs"].as_array().into_iter().flatten() {
            if doc["found"] == true {
                if let (Some(id), Some(n)) = (
                    doc["_id"].as_str().and_then(|id| id.parse().ok()),
                    doc["_source"]["n"].as_i64(),
                ) {
                    held.insert(id, n);
                }
            }
        }
    }
    held
}

/// What a node answers for the expected items (at most `limit` of them), by id.
async fn node_items(
    node: &Server,
    expected: &Outcome,
    limit: usize,
) -> (Outcome, HashMap<Uuid, i64>) {
    use futures::StreamExt;
    let sample = Outcome {
        items: expected
            .items
            .iter()
            .take(limit)
            .map(|(id, n)| (*id, *n))
            .collect(),
        ..Outcome::default()
    };
    let client = reqwest::Client::new();
    let read: Vec<Option<(Uuid, i64)>> = futures::stream::iter(sample.items.keys().copied())
        .map(|id| {
            let request = client.get(node.url(&format!("/p/thing/{id}")));
            async move {
                let response = request.send().await.ok()?;
                if response.status() != 200 {
                    return None;
                }
                let body: Value = response.json().await.ok()?;
                Some((id, body["n"].as_i64()?))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    (sample, read.into_iter().flatten().collect())
}

/// The revisions of project `p` in the shared journal, in order.
async fn journal_revisions(storage: &TestDatabase) -> Vec<i64> {
    let mut sql = storage.sql().await;
    sqlx::query_scalar("SELECT revision FROM dstore.journal WHERE project = 'p' ORDER BY revision")
        .fetch_all(&mut sql)
        .await
        .expect("the journal is readable")
}

/// Writes once more through `node` with `wait=true`, retrying until every store has everything.
async fn wait_until_projected(node: &Server) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = send(
            reqwest::Method::PUT,
            node.url(&format!("/p/thing/{}?wait=true&timeout=30", Uuid::new_v4())),
            Some(json!({"project_version": 1, "n": -1})),
        )
        .await;
        if status == 200 && body["projected"] == true {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stores never caught up: {status} {body}"
        );
    }
}

fn check(tally: Tally, expected: &Outcome) {
    assert!(
        tally.wrong.is_empty() && tally.matching == expected.items.len(),
        "{}: {} of {} as expected; {:?}",
        tally.store,
        tally.matching,
        expected.items.len(),
        tally.wrong
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_one_catalog_and_journal_and_lose_nothing_to_kill_9_under_load() {
    let cluster = Cluster::new().await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Vec<Option<Server>> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        nodes.push(Some(cluster.node(i, *port).await));
    }
    let url = |i: usize, path: &str| format!("http://127.0.0.1:{}{path}", ports[i]);

    // A blueprint on one node, its freeze on a second, reads on the third.
    let (status, body) = send(
        reqwest::Method::PUT,
        url(0, "/p/thing/_blueprint"),
        Some(thing()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(reqwest::Method::POST, url(1, "/p/_version"), None).await;
    assert_eq!(
        (status, &body["project_version"]),
        (200, &json!(1)),
        "{body}"
    );
    let (status, body) = send(reqwest::Method::GET, url(2, "/p/_version"), None).await;
    assert_eq!(
        (status, &body["project_version"]),
        (200, &json!(1)),
        "{body}"
    );
    let id = Uuid::new_v4();
    let (status, body) = send(
        reqwest::Method::PUT,
        url(2, &format!("/p/thing/{id}")),
        Some(json!({"project_version": 1, "n": 7})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for i in 0..3 {
        let (status, body) = send(
            reqwest::Method::GET,
            url(i, &format!("/p/thing/{id}")),
            None,
        )
        .await;
        assert_eq!((status, &body["n"]), (200, &json!(7)), "node {i}: {body}");
    }

    // 64 writers round-robin over the nodes; a node killed every few seconds; a freeze half-way.
    let addresses: Vec<String> = (0..3).map(|i| url(i, "")).collect();
    let load = WriteLoad::start_many(&addresses, 64, Duration::from_millis(40));
    let started = Instant::now();
    let mut kills = 0;
    let mut frozen = false;
    let mut victim = 0usize;
    // About 18 s, and on until three nodes were killed and the freeze was asked: a freeze that
    // waits long for its migration (behind the backlog, or a killed node's lease) must not leave
    // the schedule short of kills.
    while started.elapsed() < Duration::from_secs(18) || kills < 3 || !frozen {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{kills} kills, frozen: {frozen}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        victim = (victim + 1 + (started.elapsed().as_millis() as usize % 2)) % 3;
        if let Some(node) = nodes[victim].take() {
            node.kill();
            kills += 1;
        }
        if !frozen && started.elapsed() > Duration::from_secs(7) {
            let alive = (victim + 1) % 3;
            let mut v2 = thing();
            v2["columns"]["extra"] = json!({"type": "text"});
            let (status, body) = send(
                reqwest::Method::PUT,
                url(alive, "/p/thing/_blueprint"),
                Some(v2),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let (status, body) = send(reqwest::Method::POST, url(alive, "/p/_version"), None).await;
            // Under load the migration may wait behind the backlog: frozen either way.
            let waiting =
                status == 503 && body["status"].as_str().unwrap_or("").contains("is frozen");
            assert!(
                status == 200 || waiting,
                "the freeze in the middle of the load: {status} {body}"
            );
            frozen = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        nodes[victim] = Some(cluster.node(victim, ports[victim]).await);
    }
    let expected = load.stop().await;
    assert!(frozen && kills >= 3, "{kills} kills");
    let node = nodes[0].as_ref().unwrap();
    wait_until_projected(node).await;
    let (_, versions) = send(reqwest::Method::GET, node.url("/p/_version"), None).await;
    for (store, state) in versions["versions"][1]["migrations"].as_object().unwrap() {
        assert_eq!(state["state"], "done", "{store}: {versions}");
    }

    // Revisions of the project: 1, 2, 3 … in the shared journal, each acknowledged at most once.
    // The rows every projector applied may have been trimmed from its head (a node's watch does
    // every minute), never a row after the slowest cursor.
    let revisions = journal_revisions(&cluster.storage).await;
    let gaps: Vec<_> = revisions
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .take(5)
        .collect();
    let mut sql = cluster.storage.sql().await;
    let (slowest, head): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT min(revision) FROM dstore.cursors WHERE project = 'p'), \
                (SELECT revision FROM dstore.projects WHERE name = 'p')",
    )
    .fetch_one(&mut sql)
    .await
    .expect("the cursors are readable");
    let kept_from = revisions.first().copied().unwrap_or(head + 1);
    assert!(
        (kept_from == 1 || kept_from <= slowest + 1) && gaps.is_empty(),
        "gaps in the revisions: {gaps:?}, kept from {kept_from}, slowest cursor {slowest}"
    );
    assert!(
        revisions.last().is_none_or(|last| *last == head),
        "{revisions:?} {head}"
    );

    // Every acknowledged write is readable from every node, as its newest acknowledged state.
    for (i, node) in nodes.iter().enumerate() {
        let limit = if i == 0 { usize::MAX } else { 500 };
        let (sample, read) = node_items(node.as_ref().unwrap(), &expected, limit).await;
        check(Tally::of("a node's reads", &sample, &read), &sample);
    }
    // And present in every store, in both versions (the one frozen under load back-filled).
    for version in [1, 2] {
        check(
            Tally::of(
                "postgresql",
                &expected,
                &postgres_items(&cluster.store, version).await,
            ),
            &expected,
        );
        check(
            Tally::of(
                "elasticsearch",
                &expected,
                &elasticsearch_items(&cluster.es, &cluster.prefix, version, &expected).await,
            ),
            &expected,
        );
    }
    println!(
        "cluster of 3 under kill -9: {} writes acknowledged, {} requests failed (killed nodes), {kills} kills, \
         {} revisions without a gap; every store and every node hold every acknowledged write",
        expected.acknowledged,
        expected.errors.len(),
        revisions.len()
    );
    for node in nodes.into_iter().flatten() {
        node.stop().await;
    }
    cluster.clean_up().await;
}

/// A node started while its storage is out of reach waits for it, saying so, and serves once it is
/// back (it exited, and stayed down until something started it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_the_storage_is_away_waits_for_it_and_then_serves() {
    let mut cluster = Cluster::new().await;
    let proxy = cluster.behind_proxy().await;
    proxy.cut();
    let (port, data) = (free_port(), cluster.dir.path().join("late"));
    let env = vec![
        ("DSTORE_STORAGE_BACKEND", "postgresql".to_string()),
        ("DSTORE_STORAGE_URL", cluster.storage_url.clone()),
        ("DSTORE_NODE", "late".to_string()),
    ];
    let starting = tokio::spawn({
        let data = data.clone();
        async move { Server::start_with(&data, port, &env).await }
    });
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let log =
            std::fs::read_to_string(data.join(format!("dstore-{port}.log"))).unwrap_or_default();
        if log.contains("waiting for the storage") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{log}");
    }
    proxy.restore();
    let node = starting.await.unwrap();
    let started = Instant::now();
    loop {
        let (status, body) = send(reqwest::Method::GET, node.url("/_health/ready"), None).await;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not ready: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop().await;
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_storage_is_away_writes_answer_503_and_resume_by_themselves_losing_nothing() {
    let mut cluster = Cluster::new().await;
    let proxy = cluster.behind_proxy().await;
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let a = cluster.node(0, ports[0]).await;
    let b = cluster.node(1, ports[1]).await;
    let (status, _) = send(
        reqwest::Method::PUT,
        a.url("/p/thing/_blueprint"),
        Some(thing()),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = send(reqwest::Method::POST, b.url("/p/_version"), None).await;
    assert_eq!(status, 200);

    let load = WriteLoad::start_many(&[a.url(""), b.url("")], 8, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A load balancer reading readiness takes the nodes out meanwhile (within seconds: a loaded
    // machine may take longer than the 3 s cut to notice).
    let ready_when = |want: u16| {
        let url = a.url("/_health/ready");
        async move {
            let started = Instant::now();
            loop {
                let (status, ready) = send(reqwest::Method::GET, url.clone(), None).await;
                if status == want || started.elapsed() > Duration::from_secs(20) {
                    return (status, ready);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let (status, ready) = ready_when(503).await;
    assert_eq!(
        (status, &ready["storage"]["reachable"]),
        (503, &json!(false)),
        "{ready}"
    );
    // Writes go to the storage: while it is away none are accepted, and readiness says why.
    assert_eq!(ready["writes"]["accepted"], json!(false), "{ready}");
    assert!(
        ready["writes"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("storage")),
        "{ready}"
    );
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, ready) = ready_when(200).await;
    assert_eq!(status, 200, "{ready}");
    // Each project's cursor moves on its own: no one seq says what every store applied.
    let progress = &ready["projectors"]["postgresql"]["progress"];
    assert!(
        progress["pending"].is_u64() && progress.get("applied_through").is_none(),
        "{ready}"
    );
    let expected = load.stop().await;
    let refused = expected
        .errors
        .iter()
        .filter(|e| e.starts_with("503"))
        .count();
    assert!(
        refused > 0,
        "writes during the outage answer 503: {:?}",
        &expected.errors[..expected.errors.len().min(3)]
    );
    assert!(
        expected.errors.iter().all(|e| e.starts_with("503")),
        "only 503s: {:?}",
        expected.errors.iter().find(|e| !e.starts_with("503"))
    );
    wait_until_projected(&a).await;
    check(
        Tally::of(
            "postgresql",
            &expected,
            &postgres_items(&cluster.store, 1).await,
        ),
        &expected,
    );
    let revisions = journal_revisions(&cluster.storage).await;
    assert!(revisions.windows(2).all(|w| w[1] == w[0] + 1));
    println!(
        "storage cut for 3 s under load: {} writes acknowledged, {refused} answered 503 during the outage, \
         none lost",
        expected.acknowledged
    );
    a.stop().await;
    b.stop().await;
    drop(proxy);
    cluster.clean_up().await;
}

/// A manager may revoke only keys holding no action it lacks: judged on the key as stored, not on
/// a node's copy from before another node widened it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_widened_through_one_node_is_judged_widened_by_another() {
    const MASTER: &str = "a-cluster-master-key-0123456789";
    let cluster = Cluster::new().await;
    let nodes = cluster
        .bare_nodes("widened", 2, &[("DSTORE_MASTER_KEY", MASTER.into())])
        .await;
    let client = reqwest::Client::new();
    let make = |body: &'static str| {
        let request = client
            .post(nodes[0].url("/_keys"))
            .bearer_auth(MASTER)
            .body(body);
        async move {
            let made: Value = request.send().await.unwrap().json().await.unwrap();
            made
        }
    };
    let manager =
        make(r#"{"name": "m", "actions": ["keys.manage", "items.read"], "projects": ["*"]}"#).await;
    let target = make(r#"{"name": "t", "actions": ["items.read"], "projects": ["*"]}"#).await;
    let (manager, id) = (
        manager["key"].as_str().unwrap(),
        target["id"].as_str().unwrap(),
    );
    // The second node reads both keys.
    let seen = client
        .get(nodes[1].url(&format!("/_keys/{id}")))
        .bearer_auth(manager)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    let widened = client
        .patch(nodes[0].url(&format!("/_keys/{id}")))
        .bearer_auth(MASTER)
        .body(r#"{"actions": ["items.read", "projects.delete"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(widened.status(), 200);
    let revoked = client
        .delete(nodes[1].url(&format!("/_keys/{id}")))
        .bearer_auth(manager)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 403, "{}", revoked.text().await.unwrap());

    // A manager narrowed through one node makes no key with what it lost through the other.
    let narrowed = make(
        r#"{"name": "n", "actions": ["keys.manage", "items.read", "items.write"], "projects": ["*"]}"#,
    )
    .await;
    let (narrowed, narrowed_id) = (
        narrowed["key"].as_str().unwrap(),
        narrowed["id"].as_str().unwrap(),
    );
    let seen = client
        .get(nodes[1].url(&format!("/_keys/{narrowed_id}")))
        .bearer_auth(narrowed)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    let narrowing = client
        .patch(nodes[0].url(&format!("/_keys/{narrowed_id}")))
        .bearer_auth(MASTER)
        .body(r#"{"actions": ["keys.manage", "items.read"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(narrowing.status(), 200);
    let minted = client
        .post(nodes[1].url("/_keys"))
        .bearer_auth(narrowed)
        .body(r#"{"name": "x", "actions": ["items.write"], "projects": ["*"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(minted.status(), 403, "{}", minted.text().await.unwrap());
    for node in nodes {
        node.stop().await;
    }
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_the_audit_log_are_shared_by_every_node() {
    const MASTER: &str = "a-cluster-master-key-0123456789";
    let cluster = Cluster::new().await;
    let nodes = cluster
        .bare_nodes("keyed", 2, &[("DSTORE_MASTER_KEY", MASTER.into())])
        .await;
    let client = reqwest::Client::new();
    let made: Value = client
        .post(nodes[0].url("/_keys"))
        .bearer_auth(MASTER)
        .body(r#"{"name": "shared", "actions": ["*"], "projects": ["*"]}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key, id) = (made["key"].as_str().unwrap(), made["id"].as_str().unwrap());
    let put = client
        .put(nodes[1].url("/p/thing/_blueprint"))
        .bearer_auth(key)
        .body(thing().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        put.status(),
        200,
        "a key made on one node works on the other at once"
    );
    let revoked = client
        .delete(nodes[0].url(&format!("/_keys/{id}")))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client
            .get(nodes[1].url("/p/_version"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status();
        if status == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked key still works on the other node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The audit log, read through the second node, holds what went through the first.
    let reader: Value = client
        .post(nodes[1].url("/_keys"))
        .bearer_auth(MASTER)
        .body(r#"{"name": "auditor", "actions": ["operations"], "projects": ["*"]}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut paths = Vec::new();
    for _ in 0..50 {
        let audit: Value = client
            .get(nodes[1].url("/_audit"))
            .bearer_auth(reader["key"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        paths = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["method"].as_str().unwrap(),
                    e["path"].as_str().unwrap()
                )
            })
            .collect();
        if paths.contains(&format!("DELETE /_keys/{id}")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(paths.contains(&format!("DELETE /_keys/{id}")), "{paths:?}");
    assert!(
        paths.contains(&"PUT /p/thing/_blueprint".to_string()),
        "{paths:?}"
    );
    for node in nodes {
        node.stop().await;
    }
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_on_one_node_sees_the_writes_of_every_node_in_revision_order() {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;

    let cluster = Cluster::new().await;
    let nodes = cluster.bare_nodes("feed", 2, &[]).await;
    let (status, _) = send(
        reqwest::Method::PUT,
        nodes[0].url("/p/thing/_blueprint"),
        Some(thing()),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = send(reqwest::Method::POST, nodes[0].url("/p/_version"), None).await;
    assert_eq!(status, 200);
    let follow = |url: String, last: Option<u64>| async move {
        let mut request = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream");
        if let Some(last) = last {
            request = request.header("last-event-id", last.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        Box::pin(response.bytes_stream().eventsource())
    };
    let mut events = follow(nodes[1].url("/p/_changes"), None).await;
    let mut written = Vec::new();
    for i in 0..20 {
        let node = &nodes[i % 2];
        let (status, body) = send(
            reqwest::Method::POST,
            node.url("/p/thing"),
            Some(json!({"project_version": 1, "title": format!("n{i}")})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        written.push(body["revision"].as_u64().unwrap());
    }
    let mut seen = Vec::new();
    while seen.len() < written.len() {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the follower hears of every node's writes")
            .unwrap()
            .unwrap();
        // A read that began at 0 (the project had no change yet) carries its pass below it.
        let revision = event.id.split('/').next().unwrap();
        seen.push(revision.parse::<u64>().unwrap());
    }
    assert_eq!(seen, written, "every write once, in revision order");
    // Resumed on the other node from the last id seen.
    drop(events);
    let (_, body) = send(
        reqwest::Method::POST,
        nodes[0].url("/p/thing"),
        Some(json!({"project_version": 1, "title": "later"})),
    )
    .await;
    let later = body["revision"].as_u64().unwrap();
    let mut events = follow(nodes[0].url("/p/_changes"), seen.last().copied()).await;
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.id, later.to_string());
    drop(events);
    drop(nodes);
    cluster.clean_up().await;
}

/// A storage that stops answering without closing its connections (a partition, a host gone)
/// costs a node's writes `storage.commit_timeout_secs`, not the quarter of an hour the kernel
/// retransmits for: they answer 503 saying their outcome is unknown, and once the storage answers
/// again the node writes again without being restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_storage_that_stops_answering_answer_503_in_time_and_resume_after() {
    let mut cluster = Cluster::new().await;
    let proxy = cluster.behind_proxy().await;
    let nodes = cluster
        .bare_nodes("stall", 1, &[("DSTORE_COMMIT_TIMEOUT_SECS", "2".into())])
        .await;
    let node = &nodes[0];
    let (status, _) = send(
        reqwest::Method::PUT,
        node.url("/p/thing/_blueprint"),
        Some(thing()),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = send(reqwest::Method::POST, node.url("/p/_version"), None).await;
    assert_eq!(status, 200);
    let put = |id: Uuid| {
        let body = json!({"project_version": 1, "title": "t", "n": 1});
        send(
            reqwest::Method::PUT,
            node.url(&format!("/p/thing/{id}")),
            Some(body),
        )
    };
    let before = Uuid::new_v4();
    let (status, body) = put(before).await;
    assert_eq!(status, 200, "{body}");

    proxy.stall();
    let stalled: Vec<(u16, Value)> =
        futures::future::join_all((0..4).map(|_| put(Uuid::new_v4()))).await;
    for (status, body) in &stalled {
        assert_eq!(*status, 503, "{body}");
        assert!(
            body.to_string().contains("commit_timeout_secs"),
            "the answer names the limit: {body}"
        );
    }

    proxy.restore();
    let after = Uuid::new_v4();
    let started = Instant::now();
    loop {
        let (status, body) = put(after).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "writes resume once the storage answers: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in [before, after] {
        let (status, body) = send(
            reqwest::Method::GET,
            node.url(&format!("/p/thing/{id}")),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    drop(nodes);
    drop(proxy);
    cluster.clean_up().await;
}

/// A storage that stops answering on the connections a node holds (a partition, a frozen server, a
/// hung proxy that still acknowledges) costs a read `storage.query_timeout_secs`, not as long as the
/// kernel keeps the connection (here, for ever): reads in flight when it happens answer 503 naming
/// the limit, their connections are given up, and the node reads on new ones without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_a_storage_that_stops_answering_answer_in_time_and_resume_on_new_connections() {
    use sqlx::Connection;

    let mut cluster = Cluster::new().await;
    let direct_url = cluster.storage_url.clone();
    let proxy = cluster.behind_proxy().await;
    let nodes = cluster
        .bare_nodes("strand", 1, &[("DSTORE_QUERY_TIMEOUT_SECS", "2".into())])
        .await;
    let node = &nodes[0];
    put_thing_and_freeze(node, "p").await;
    let id = Uuid::new_v4();
    let (status, body) = send(
        reqwest::Method::PUT,
        node.url(&format!("/p/thing/{id}")),
        Some(json!({"project_version": 1, "title": "t", "n": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let read = |path: String| send(reqwest::Method::GET, node.url(&path), None);
    let paths = [
        format!("/p/thing/{id}"),
        "/p/_changes?version=1".to_string(),
    ];

    // The reads wait on a lock the test holds, so they are in flight when their connections are
    // cut off; the storage answers them once the lock goes, into connections that forward nothing.
    let mut holder = sqlx::PgConnection::connect(&direct_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE dstore.items IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let started = Instant::now();
    let reads = tokio::spawn(futures::future::join_all(
        (0..6).map(|i| read(paths[i % 2].clone())),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.strand();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let cut = reads.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "reads answer within the limit, not as long as the connections are kept: {:?}",
        started.elapsed()
    );
    for (status, body) in &cut {
        assert_eq!(*status, 503, "{body}");
        assert!(
            body.to_string().contains("query_timeout_secs"),
            "the answer names the limit: {body}"
        );
    }

    let started = Instant::now();
    let mut answered = 0;
    while answered < 20 {
        let (status, body) = read(paths[answered % 2].clone()).await;
        if status == 200 {
            answered += 1;
            continue;
        }
        answered = 0;
        assert_eq!(status, 503, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "reads go on over new connections: {body}"
        );
    }
    drop(nodes);
    drop(proxy);
    cluster.clean_up().await;
}

/// A write after the batcher's kept connection sat idle past its check, on a connection the
/// network stopped forwarding on (a proxy or firewall that dropped it without a word), goes on a
/// new connection: the check gives up within seconds. Before, it waited for an answer until the
/// write's time limit, and the write was answered as perhaps written though nothing was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_writers_idle_connection_went_dead_goes_on_a_new_one() {
    let mut cluster = Cluster::new().await;
    let proxy = cluster.behind_proxy().await;
    let nodes = cluster
        .bare_nodes(
            "idle",
            1,
            &[
                ("DSTORE_COMMIT_TIMEOUT_SECS", "10".into()),
                ("DSTORE_QUERY_TIMEOUT_SECS", "2".into()),
            ],
        )
        .await;
    let node = &nodes[0];
    put_thing_and_freeze(node, "p").await;
    let put = |n: u64| {
        send(
            reqwest::Method::PUT,
            node.url(&format!("/p/thing/{}", Uuid::new_v4())),
            Some(json!({"project_version": 1, "title": "t", "n": n})),
        )
    };
    let (status, body) = put(1).await;
    assert_eq!(status, 200, "{body}");
    proxy.strand();
    // Past the batcher's idle check (30 s).
    tokio::time::sleep(Duration::from_secs(31)).await;
    let started = Instant::now();
    let (status, body) = put(2).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    drop(nodes);
    drop(proxy);
    cluster.clean_up().await;
}

/// A node whose connection listening for catalog changes was cut off without a word (the network
/// healed after PostgreSQL had ended the session, and the node sends nothing on it) would never
/// hear of another node's change again: it finds the storage's catalog ahead of its own while
/// quiet, and listens again. Seen here by a stream of a version retired through another node,
/// which ends. A read of the stream's that the cut catches mid-query gives up after
/// `storage.query_timeout_secs` and is made again on another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_listening_connection_was_cut_off_silently_still_hears_of_changes() {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;

    let mut cluster = Cluster::new().await;
    let direct_url = cluster.storage_url.clone();
    let proxy = cluster.behind_proxy().await;
    let a = cluster
        .bare_nodes(
            "cutoff",
            1,
            &[
                ("DSTORE_COMMIT_TIMEOUT_SECS", "2".into()),
                ("DSTORE_QUERY_TIMEOUT_SECS", "2".into()),
            ],
        )
        .await;
    cluster.storage_url = direct_url;
    let b = cluster.bare_nodes("direct", 1, &[]).await;
    let (a, b) = (&a[0], &b[0]);
    let mut blueprint = thing();
    for _ in 0..2 {
        let (status, body) = send(
            reqwest::Method::PUT,
            a.url("/p/thing/_blueprint"),
            Some(blueprint.clone()),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = send(reqwest::Method::POST, a.url("/p/_version"), None).await;
        assert_eq!(status, 200, "{body}");
        blueprint["columns"]["extra"] = json!({"type": "string"});
    }
    let response = reqwest::Client::new()
        .get(a.url("/p/_changes?version=1&heartbeat=1"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = Box::pin(response.bytes_stream().eventsource());

    proxy.strand();
    let (status, body) = send(reqwest::Method::POST, b.url("/p/_version/1/_retire"), None).await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .expect("the stream goes on or ends")
            .expect("an event before the stream ends")
            .unwrap();
        if event.event == "gone" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "node a never heard that version 1 was retired"
        );
    }
    drop(events);
    drop(proxy);
    cluster.clean_up().await;
}

/// A node whose connection breaks while its COMMIT is on the way cannot know whether the storage
/// committed: its answer says the outcome is unknown, never "not written", for an item write, for
/// the part of a `_bulk` in that commit, and for a catalog edit. Here the storage commits each
/// time (it finishes the commit after its client went away), which "not written" would deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_answered_as_unknown_not_as_unwritten() {
    use sqlx::Connection;

    let mut cluster = Cluster::new().await;
    let direct_url = cluster.storage_url.clone();
    let proxy = cluster.behind_proxy().await;
    let nodes = cluster.bare_nodes("commit", 1, &[]).await;
    let node = &nodes[0];
    put_thing_and_freeze(node, "p").await;
    // A commit that journals a revision past `slow_after.revision`, or that changes a project's
    // row once `slow_after.projects`, waits two seconds in a deferred trigger: long enough to cut
    // its connection while it is in the commit.
    let mut sql = sqlx::PgConnection::connect(&direct_url).await.unwrap();
    for statement in [
        "CREATE TABLE dstore.slow_after (revision BIGINT, projects BOOLEAN)",
        "INSERT INTO dstore.slow_after SELECT revision, FALSE FROM dstore.projects WHERE name = 'p'",
        "CREATE FUNCTION dstore.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF (TG_TABLE_NAME = 'journal' AND NEW.revision > (SELECT revision FROM dstore.slow_after)) \
         OR (TG_TABLE_NAME = 'projects' AND (SELECT projects FROM dstore.slow_after)) THEN \
         PERFORM pg_sleep(2); END IF; RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON dstore.journal DEFERRABLE INITIALLY \
         DEFERRED FOR EACH ROW EXECUTE FUNCTION dstore.slow_commit()",
        "CREATE CONSTRAINT TRIGGER slow AFTER UPDATE ON dstore.projects DEFERRABLE INITIALLY \
         DEFERRED FOR EACH ROW EXECUTE FUNCTION dstore.slow_commit()",
    ] {
        sqlx::query(statement).execute(&mut sql).await.unwrap();
    }
    // Sends a request and cuts the node's connections to the storage once a commit waits.
    let cut_in_commit = |method: reqwest::Method, path: String, body: String| {
        let answer = tokio::spawn({
            let url = node.url(&path);
            async move {
                let response = reqwest::Client::new()
                    .request(method, url)
                    .timeout(Duration::from_secs(90))
                    .body(body)
                    .send()
                    .await
                    .expect("the node answers");
                let status = response.status().as_u16();
                (
                    status,
                    response.json::<Value>().await.unwrap_or(Value::Null),
                )
            }
        });
        let proxy = &proxy;
        let direct_url = direct_url.clone();
        async move {
            let mut watch = sqlx::PgConnection::connect(&direct_url).await.unwrap();
            let started = Instant::now();
            loop {
                let committing: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event = 'PgSleep'",
                )
                .fetch_one(&mut watch)
                .await
                .unwrap();
                if committing > 0 {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "{path} commits"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            proxy.cut();
            let answer = answer.await.unwrap();
            proxy.restore();
            // The storage finishes the commit its client left.
            while sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event = 'PgSleep'",
            )
            .fetch_one(&mut watch)
            .await
            .unwrap()
                > 0
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The pool's connections cut meanwhile are checked before they are handed out again
            // once idle for a second.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            answer
        }
    };
    let unknown = |(status, body): &(u16, Value)| {
        *status == 503 && body["outcome"] == "unknown" && body.to_string().contains("is unknown")
    };

    let id = Uuid::new_v4();
    let put = cut_in_commit(
        reqwest::Method::PUT,
        format!("/p/thing/{id}"),
        json!({"project_version": 1, "title": "t", "n": 1}).to_string(),
    )
    .await;
    assert!(unknown(&put), "{put:?}");

    // A `_bulk` of one part more than a part holds: the first is committed, the second's commit
    // is cut.
    let top: i64 = sqlx::query_scalar("SELECT revision FROM dstore.projects WHERE name = 'p'")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    let part = 10_000;
    sqlx::query("UPDATE dstore.slow_after SET revision = $1")
        .bind(top + part)
        .execute(&mut sql)
        .await
        .unwrap();
    let ids: Vec<Uuid> = (0..=part).map(|_| Uuid::new_v4()).collect();
    let mut lines = String::new();
    for (n, id) in ids.iter().enumerate() {
        if n == part as usize {
            // Refused alone as its part is prepared: never sent, whatever became of the part.
            lines.push_str(&format!(
                "{{\"put\": {{\"blueprint\": \"thing\", \"id\": \"{}\"}}}}\n\
                 {{\"project_version\": 1, \"n\": \"two\"}}\n",
                Uuid::new_v4()
            ));
        }
        lines.push_str(&format!(
            "{{\"put\": {{\"blueprint\": \"thing\", \"id\": \"{id}\"}}}}\n\
             {{\"project_version\": 1, \"n\": 2}}\n"
        ));
    }
    let (status, bulk) = cut_in_commit(reqwest::Method::POST, "/p/_bulk".into(), lines).await;
    assert_eq!(status, 200, "{bulk}");
    let items = bulk["items"].as_array().expect("one outcome per operation");
    assert_eq!(items.len(), ids.len() + 1);
    assert_eq!(items[0]["put"]["status"], json!(200), "{}", items[0]);
    let refused = &items[part as usize]["put"];
    assert_eq!(refused["status"], json!(422), "{refused}");
    let last = &items[part as usize + 1]["put"];
    assert!(
        last["errors"].to_string().contains("perhaps written"),
        "the operation in the cut commit may have been written: {last}"
    );
    assert!(
        bulk["stopped"].to_string().contains("is unknown"),
        "{}",
        bulk["stopped"]
    );

    sqlx::query("UPDATE dstore.slow_after SET revision = 9223372036854775807, projects = TRUE")
        .execute(&mut sql)
        .await
        .unwrap();
    let mut edited = thing();
    edited["columns"]["extra"] = json!({"type": "string"});
    let edit = cut_in_commit(
        reqwest::Method::PUT,
        "/p/thing/_blueprint".into(),
        edited.to_string(),
    )
    .await;
    assert!(unknown(&edit), "{edit:?}");

    sqlx::query("DROP FUNCTION dstore.slow_commit() CASCADE")
        .execute(&mut sql)
        .await
        .unwrap();
    // All three were committed.
    let started = Instant::now();
    loop {
        let (item, _) = send(
            reqwest::Method::GET,
            node.url(&format!("/p/thing/{id}")),
            None,
        )
        .await;
        let (in_bulk, _) = send(
            reqwest::Method::GET,
            node.url(&format!("/p/thing/{}", ids[part as usize])),
            None,
        )
        .await;
        let (_, blueprint) =
            send(reqwest::Method::GET, node.url("/p/thing/_blueprint"), None).await;
        if item == 200 && in_bulk == 200 && blueprint.to_string().contains("extra") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{item} {in_bulk} {blueprint}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(nodes);
    drop(proxy);
    cluster.clean_up().await;
}

/// A project whose row another transaction holds (its drop deleting every item, an operator's
/// lock) holds its own writes only: they answer 503 after the writer's lock wait, saying
/// nothing was written, while the writes to other projects in the same batches go through; once
/// the row is free, the project's writes go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_whose_row_is_held_elsewhere_holds_only_its_own_writes() {
    use sqlx::Connection;

    let cluster = Cluster::new().await;
    let nodes = cluster.bare_nodes("held", 1, &[]).await;
    let node = &nodes[0];
    for project in ["p", "q"] {
        put_thing_and_freeze(node, project).await;
    }
    let put = |project: &'static str| {
        let url = node.url(&format!("/{project}/thing/{}", Uuid::new_v4()));
        send(
            reqwest::Method::PUT,
            url,
            Some(json!({"project_version": 1, "title": "t", "n": 1})),
        )
    };
    let mut holder = sqlx::PgConnection::connect(&cluster.storage_url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM dstore.projects WHERE name = 'p' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let (held, others) = tokio::join!(
        put("p"),
        futures::future::join_all((0..20).map(|_| put("q")))
    );
    assert_eq!(held.0, 503, "{}", held.1);
    assert!(
        held.1.to_string().contains("held by another transaction"),
        "{}",
        held.1
    );
    for (status, body) in &others {
        assert_eq!(*status, 200, "{body}");
    }
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let (status, body) = put("p").await;
    assert_eq!(status, 200, "{body}");
    drop(nodes);
    cluster.clean_up().await;
}
