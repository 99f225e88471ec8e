use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dstore::blueprint::Ident;
use dstore::catalog::{Catalog, Snapshot, Version};
use dstore::journal::task::Task;
use dstore::projector::rocksdb::RocksProjector;
use dstore::projector::{conformance, Health, Outcome, Projector, ProjectorError};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{article, spawn_app_with_projectors, TestApp};
use crate::rabbitmq::TestBroker;

#[tokio::test]
async fn the_rocksdb_projector_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    let projector = Arc::new(RocksProjector::open(&dir.path().join("keyspaces")).unwrap());
    conformance::run(projector, &catalog, &Ident::parse("conformance").unwrap()).await;
}

/// A projector whose store misbehaves until it is told it is fixed: migrations fail, items are
/// refused for good (`refuse`) or the store is unreachable (`down`). It records the seqs of every
/// batch it applies.
#[derive(Clone, Default)]
pub(crate) struct Broken {
    pub(crate) fixed: Arc<AtomicBool>,
    pub(crate) refuse: Arc<AtomicBool>,
    pub(crate) down: Arc<AtomicBool>,
    batches: Arc<std::sync::Mutex<Vec<Vec<u64>>>>,
}

#[async_trait]
impl Projector for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }

    async fn migrate(
        &self,
        _project: &Ident,
        _version: &Version,
        _: &[u32],
    ) -> Result<(), ProjectorError> {
        if self.fixed.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(ProjectorError::transient("the store refused the schema"))
        }
    }

    async fn apply(
        &self,
        _snapshot: &Snapshot,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(ProjectorError::transient("connection refused"));
        }
        self.batches
            .lock()
            .unwrap()
            .push(tasks.iter().map(|t| t.seq).collect());
        let refuse = self.refuse.load(Ordering::SeqCst);
        Ok(tasks
            .iter()
            .map(|_| {
                if refuse {
                    Err(ProjectorError::permanent(
                        "value too long for type character varying(3)",
                    ))
                } else {
                    Ok(())
                }
            })
            .collect())
    }

    async fn drop_project(&self, _project: &Ident) -> Result<(), ProjectorError> {
        Ok(())
    }

    async fn read(
        &self,
        _: &Ident,
        _: u32,
        _: &Ident,
        _: &Uuid,
    ) -> Result<Option<Value>, ProjectorError> {
        Ok(None)
    }

    async fn health(&self) -> Health {
        Health {
            reachable: true,
            detail: "test double".into(),
        }
    }
}

/// A freeze asked again while its migration waits behind a store's backlog waits for the one
/// queued, and queues no other behind that backlog: under a steady load a new one would never be
/// reached within a request's wait, and every retry would add one.
#[tokio::test]
async fn a_freeze_asked_again_waits_for_its_queued_migration_and_queues_no_other() {
    let store = Broken::default();
    store.fixed.store(true, Ordering::SeqCst);
    let app = spawn_app_with_projectors(
        |s| s.projection.wait_timeout_secs = 1,
        vec![Arc::new(store.clone())],
    )
    .await;
    app.put_and_freeze("myblog", "article", &article()).await;
    // The store goes away with items pending: the next migration is queued behind them.
    store.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let item = serde_json::json!({"project_version": 1, "title": "waiting",
            "date_created": "2021-01-02 03:04:05"});
        let put = app
            .put(&format!("/myblog/article/{}", Uuid::new_v4()), &item)
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    let mut v2 = article();
    v2["columns"]["extra"] = serde_json::json!({"type": "string"});
    assert_eq!(app.put("/myblog/article/_blueprint", &v2).await.status, 200);
    let frozen = app.post("/myblog/_version", None).await;
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    let pending = |ready: &Value| ready["projectors"]["broken"]["progress"]["pending"].clone();
    let before = pending(&app.get("/_health/ready").await.body);
    for _ in 0..3 {
        let again = app.post("/myblog/_version", None).await;
        assert_eq!(again.status, 503, "{}", again.body);
        assert!(
            again.body["status"]
                .as_str()
                .is_some_and(|s| s.contains("broken: still pending")),
            "{}",
            again.body
        );
    }
    assert_eq!(
        pending(&app.get("/_health/ready").await.body),
        before,
        "asking again queued more tasks"
    );
    // The store back, asking again answers once the queued migration is done.
    store.down.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let again = app.post("/myblog/_version", None).await;
        if again.status == 200 || again.status == 409 {
            break;
        }
        assert_eq!(again.status, 503, "{}", again.body);
        assert!(std::time::Instant::now() < deadline, "{}", again.body);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_failed_migration_is_reported_and_the_freeze_can_be_retried_to_completion() {
    let fixed = Arc::new(AtomicBool::new(false));
    let app = spawn_app_with_projectors(
        |s| s.projection.wait_timeout_secs = 10,
        vec![Arc::new(Broken {
            fixed: fixed.clone(),
            ..Broken::default()
        })],
    )
    .await;
    assert_eq!(
        app.put("/myblog/article/_blueprint", &article())
            .await
            .status,
        200
    );
    let failed = app.post("/myblog/_version", None).await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    let status = failed.body["status"].as_str().unwrap();
    assert!(
        status.contains("broken: the store refused the schema"),
        "{status}"
    );
    let versions = app.get("/myblog/_version").await.body;
    assert_eq!(
        versions["versions"][0]["migrations"]["broken"]["state"], "failed",
        "{versions}"
    );
    assert_eq!(
        versions["versions"][0]["migrations"]["rocksdb"]["state"], "done",
        "{versions}"
    );

    fixed.store(true, Ordering::SeqCst);
    let retried = app.post("/myblog/_version", None).await;
    assert_eq!(
        (retried.status, &retried.body["project_version"]),
        (200, &serde_json::json!(1)),
        "{}",
        retried.body
    );
    assert_eq!(app.post("/myblog/_version", None).await.status, 409);
    app.stop().await;
}

#[tokio::test]
async fn refused_items_become_dead_letters_that_can_be_retried_once_the_cause_is_fixed() {
    refused_items_are_dead_lettered_and_retried(None).await;
}

/// The dead-letter scenario, in process or through `broker`, whose dead-letter queue must then
/// hold the refused task too.
pub(crate) async fn refused_items_are_dead_lettered_and_retried(broker: Option<&TestBroker>) {
    let queue = broker.map(TestBroker::settings);
    let broken = Broken {
        fixed: Arc::new(AtomicBool::new(true)),
        ..Broken::default()
    };
    broken.refuse.store(true, Ordering::SeqCst);
    let app = spawn_app_with_projectors(
        |s| {
            s.projection.wait_timeout_secs = 5;
            s.queue = queue;
        },
        vec![Arc::new(broken.clone())],
    )
    .await;
    app.put_and_freeze("myblog", "article", &article()).await;
    let id = Uuid::new_v4();
    let item =
        serde_json::json!({"project_version": 1, "title": "Hello", "date_created": "2020-01-02"});
    let put = app
        .put(&format!("/myblog/article/{id}?wait=true"), &item)
        .await;
    // The write is durable and in every other store; the waiting writer hears which store refused
    // it, and why.
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["projected"], false, "{}", put.body);
    assert_eq!(
        put.body["refused"][0]["projector"], "broken",
        "{}",
        put.body
    );
    assert_eq!(put.body["refused"][0]["revision"], put.body["revision"]);
    assert!(put.body["refused"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("character varying(3)"));

    let letters = app.get("/_dead_letters").await.body["dead_letters"].clone();
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    assert_eq!(letters[0]["projector"], "broken");
    assert_eq!(
        letters[0]["task"]["op"]["upsert"]["id"],
        serde_json::json!(id)
    );
    assert!(letters[0]["reason"]
        .as_str()
        .unwrap()
        .contains("character varying(3)"));
    // The other store was not held up.
    let stored = app.rocksdb.as_ref().unwrap().get(
        &Ident::parse("myblog").unwrap(),
        1,
        &Ident::parse("article").unwrap(),
        &id,
    );
    assert!(stored.is_some());
    if let Some(broker) = broker {
        broker.expect_messages("broken.dead", 1).await;
        assert_eq!(broker.messages("rocksdb.dead").await, 0);
    }

    assert_eq!(
        app.post("/_dead_letters/_retry?projector=nope", None)
            .await
            .status,
        404
    );
    broken.refuse.store(false, Ordering::SeqCst);
    let retried = app.post("/_dead_letters/_retry", None).await;
    assert_eq!(retried.body["retried"], 1, "{}", retried.body);
    let later = app
        .put(
            &format!("/myblog/article/{}?wait=true", Uuid::new_v4()),
            &item,
        )
        .await;
    assert_eq!(later.body["projected"], true);
    assert_eq!(
        app.get("/_dead_letters").await.body["dead_letters"],
        serde_json::json!([])
    );
    app.stop().await;
}

/// An app whose `Broken` projector is down once `myblog` is frozen, with a back-pressure `limit`.
async fn behind_a_down_projector(limit: u64) -> (TestApp, Broken) {
    let broken = Broken {
        fixed: Arc::new(AtomicBool::new(true)),
        ..Broken::default()
    };
    let app = spawn_app_with_projectors(
        |s| s.projection.max_pending_tasks = limit,
        vec![Arc::new(broken.clone())],
    )
    .await;
    app.put_and_freeze("myblog", "article", &article()).await;
    broken.down.store(true, Ordering::SeqCst);
    (app, broken)
}

#[tokio::test]
async fn a_projector_far_behind_makes_the_journal_refuse_writes_with_503_instead_of_growing() {
    let (app, broken) = behind_a_down_projector(5).await;
    let item = serde_json::json!({"project_version": 1, "date_created": "2020-01-02"});
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(
            app.put(&format!("/myblog/article/{}", Uuid::new_v4()), &item)
                .await
                .status,
        );
    }
    assert_eq!(&statuses[..5], [200; 5], "{statuses:?}");
    // The keyspaces are written with each write; the broken projector fails once it has tried.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.get("/_health/ready").await.body["projectors"]["broken"]["status"] != "failing" {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken projector never reported its failure"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(ready["projectors"]["rocksdb"]["status"], "ready", "{ready}");
    let refused = app
        .put(&format!("/myblog/article/{}", Uuid::new_v4()), &item)
        .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body["status"].as_str().unwrap().contains("broken"),
        "{}",
        refused.body
    );
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(
        ready["projectors"]["broken"]["status"], "failing",
        "{ready}"
    );
    assert_eq!(
        ready["projectors"]["broken"]["progress"]["last_error"],
        "connection refused"
    );

    broken.down.store(false, Ordering::SeqCst);
    let mut accepted = 0;
    for _ in 0..100 {
        if app
            .put(&format!("/myblog/article/{}", Uuid::new_v4()), &item)
            .await
            .status
            == 200
        {
            accepted += 1;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        accepted, 1,
        "writes are accepted again once the projector caught up"
    );
    app.stop().await;
}

/// Past the limit, with no project held, writes go on to a tenth more (`/_health/ready` says they
/// are accepted), then every write is refused and readiness says so.
#[tokio::test]
async fn past_the_limit_with_no_project_held_writes_go_on_to_a_tenth_more_then_stop() {
    let (app, _broken) = behind_a_down_projector(20).await;
    let item = serde_json::json!({"project_version": 1, "date_created": "2020-01-02"});
    let put = || async {
        let path = format!("/myblog/article/{}", Uuid::new_v4());
        app.put(&path, &item).await
    };
    for _ in 0..21 {
        assert_eq!(put().await.status, 200);
    }
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(
        ready["writes"],
        serde_json::json!({"accepted": true}),
        "{ready}"
    );
    // 22 waiting is a tenth more than 20: the write that finds 22 is the last one taken.
    assert_eq!(put().await.status, 200);
    assert_eq!(put().await.status, 200);
    let refused = put().await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(ready["writes"]["accepted"], false, "{ready}");
    assert_eq!(ready["writes"]["held_projects_only"], false, "{ready}");
    app.stop().await;
}

#[tokio::test]
async fn a_backlog_is_applied_once_in_order_in_batches_bounded_by_count_and_bytes() {
    let recorder = Broken {
        fixed: Arc::new(AtomicBool::new(true)),
        ..Broken::default()
    };
    let app = spawn_app_with_projectors(
        |s| s.projection.batch_size = 500,
        vec![Arc::new(recorder.clone())],
    )
    .await;
    let note = serde_json::json!({"postgresql": {"table": "notes"},
        "elasticsearch": {"type": "note"}, "columns": {"title": {"type": "string"}}});
    app.put_and_freeze("p", "note", &note).await;
    recorder.down.store(true, Ordering::SeqCst);
    // A backlog of small items, then items of 700 KB each, then small ones again.
    let mut written = Vec::new();
    let large = "x".repeat(700_000);
    for i in 0..2400 {
        let title = if (1200..1230).contains(&i) {
            large.as_str()
        } else {
            "small"
        };
        let answer = app
            .put(
                &format!("/p/note/{}", Uuid::new_v4()),
                &serde_json::json!({"project_version": 1, "title": title}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        written.push(answer.body["revision"].as_u64().unwrap());
    }
    recorder.down.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ready = app.get("/_health/ready").await.body;
        if ready["projectors"]["broken"]["status"] == "ready" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let batches = recorder.batches.lock().unwrap().clone();
    let applied: Vec<u64> = batches.iter().flatten().copied().collect();
    let items: Vec<u64> = applied
        .iter()
        .copied()
        .filter(|seq| written.contains(seq))
        .collect();
    assert_eq!(items, written, "every write once, in order");
    assert!(
        applied.windows(2).all(|w| w[0] < w[1]),
        "no task twice or out of order"
    );
    assert!(
        batches.iter().all(|b| b.len() <= 500),
        "{:?}",
        batches.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // 8 MiB of 700 KB items is 12 of them: a batch ends once it holds that much.
    let large_batches: Vec<usize> = batches
        .iter()
        .map(|b| {
            b.iter()
                .filter(|seq| written[1200..1230].contains(seq))
                .count()
        })
        .filter(|n| *n > 0)
        .collect();
    assert!(
        large_batches.iter().all(|n| *n <= 12) && large_batches.len() >= 3,
        "{large_batches:?}"
    );
    app.stop().await;
}

/// A write that waits for its stores (`wait=true`) gives back the request memory it held once the
/// journal has it: clients waiting on a store that is down cannot make every other write on the
/// node answer 503 (`server.max_inflight_bytes`).
#[tokio::test]
async fn a_write_waiting_for_its_stores_holds_no_request_memory() {
    let broken = Broken {
        fixed: Arc::new(AtomicBool::new(true)),
        ..Broken::default()
    };
    let app = spawn_app_with_projectors(
        |s| s.server.max_inflight_bytes = 64 * 1024,
        vec![Arc::new(broken.clone())],
    )
    .await;
    let note = serde_json::json!({"postgresql": {"table": "notes"},
        "elasticsearch": {"type": "note"}, "columns": {"body": {"type": "text"}}});
    app.put_and_freeze("p", "note", &note).await;
    broken.down.store(true, Ordering::SeqCst);
    // A body of 1600 bytes takes most of the budget while it arrives (61.9 of 64 KiB), a
    // few KiB once parsed.
    let item = serde_json::json!({"project_version": 1, "body": "x".repeat(1600)});
    let waiting = {
        let request = app
            .client
            .put(format!(
                "{}/p/note/{}?wait=true&timeout=5",
                app.address,
                Uuid::new_v4()
            ))
            .json(&item);
        tokio::spawn(request.send())
    };
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    if waiting.is_finished() {
        let answer = waiting.await.unwrap().unwrap();
        panic!("{} {}", answer.status(), answer.text().await.unwrap());
    }
    for _ in 0..3 {
        let meanwhile = app.put(&format!("/p/note/{}", Uuid::new_v4()), &item).await;
        assert_eq!(meanwhile.status, 200, "{}", meanwhile.body);
    }
    let waited = waiting.await.unwrap().unwrap();
    assert_eq!(waited.status(), 202);
    app.stop().await;
}
