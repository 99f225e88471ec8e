//! The operator's view: the OpenAPI document, the docs page, metrics and request ids.

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{article, spawn_app, spawn_app_with};

/// Every route of the service, as `(method, path)`.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/_health"),
    ("get", "/_health/ready"),
    ("get", "/_metrics"),
    ("get", "/_openapi.json"),
    ("get", "/_docs"),
    ("get", "/_dead_letters"),
    ("post", "/_dead_letters/_retry"),
    ("get", "/_keys"),
    ("post", "/_keys"),
    ("get", "/_keys/{id}"),
    ("patch", "/_keys/{id}"),
    ("delete", "/_keys/{id}"),
    ("post", "/_keys/{id}/_rotate"),
    ("get", "/_audit"),
    ("get", "/_version"),
    ("get", "/_project"),
    ("put", "/_project"),
    ("delete", "/_project"),
    ("get", "/{project}/_blueprint"),
    ("put", "/{project}/_blueprint"),
    ("get", "/{project}/_blueprint/{version}"),
    ("get", "/{project}/_version"),
    ("post", "/{project}/_version"),
    ("get", "/{project}/_version/{version}"),
    ("post", "/{project}/_version/{version}/_retire"),
    ("get", "/{project}/_diff"),
    ("get", "/{project}/_settings"),
    ("put", "/{project}/_settings"),
    ("get", "/{project}/_catalog"),
    ("get", "/{project}/_dead_letters"),
    ("post", "/{project}/_dead_letters/_retry"),
    ("get", "/{project}/_project"),
    ("put", "/{project}/_project"),
    ("delete", "/{project}/_project"),
    ("post", "/{project}/_bulk"),
    ("get", "/{project}/_changes"),
    ("get", "/{project}/{blueprint}/_blueprint"),
    ("put", "/{project}/{blueprint}/_blueprint"),
    ("delete", "/{project}/{blueprint}/_blueprint"),
    ("get", "/{project}/{blueprint}/_blueprint/{version}"),
    ("post", "/{project}/{blueprint}"),
    ("put", "/{project}/{blueprint}/{id}"),
    ("get", "/{project}/{blueprint}/{id}"),
    ("delete", "/{project}/{blueprint}/{id}"),
];

#[tokio::test]
async fn the_openapi_document_covers_every_route_and_the_error_body() {
    let app = spawn_app().await;
    let doc = app.get("/_openapi.json").await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.0.3");
    let paths = doc.body["paths"].as_object().unwrap();
    for (method, path) in ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "the document lists a route the service does not have"
    );
    let error = &doc.body["components"]["schemas"]["Error"];
    assert_eq!(error["required"], serde_json::json!(["status", "errors"]));
    // A route that does not exist answers in the documented error shape.
    let missing = app.get("/a/b/c/d/e").await;
    assert_eq!(missing.status, 404);
    assert!(missing.body["status"].is_string() && missing.body["errors"].is_array());
    // A change feed page has the members the document names, every one it requires: a client
    // made from the document keeps the `horizon` a read from 0 sends back.
    app.put_and_freeze("p", "article", &crate::helpers::article())
        .await;
    let page = app.get("/p/_changes?since=0").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let schema = &doc.body["components"]["schemas"]["ChangesPage"];
    let members: Vec<&String> = page.body.as_object().unwrap().keys().collect();
    let mut documented: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    documented.sort();
    required.sort();
    let mut sorted = members.clone();
    sorted.sort();
    assert_eq!(sorted, documented);
    assert_eq!(
        sorted.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        required
    );
    app.stop().await;
}

#[tokio::test]
async fn the_docs_page_renders_the_document_without_loading_anything_from_elsewhere() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/_docs", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = response.text().await.unwrap();
    assert!(page.contains("_openapi.json"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page must work offline"
    );
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_report_projectors_and_request_ids_are_echoed() {
    let app = spawn_app().await;
    app.put_and_freeze("myblog", "article", &article()).await;
    let response = app
        .client
        .get(format!("{}/myblog/article/_blueprint", app.address))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-42");
    let generated = app
        .client
        .get(format!("{}/_health", app.address))
        .send()
        .await
        .unwrap();
    assert!(!generated.headers()["x-request-id"].is_empty());

    let text = app.metrics().await;
    for line in [
        "dstore_http_requests_total{method=\"PUT\",route=\"/{project}/{blueprint}/_blueprint\",status=\"200\"} 1",
        "dstore_http_requests_total{method=\"POST\",route=\"/{project}/_version\",status=\"200\"} 1",
        "dstore_projector_pending_tasks{projector=\"rocksdb\"}",
        "dstore_projector_dead_letters{projector=\"rocksdb\"} 0",
        "dstore_journal_last_seq",
        "dstore_journal_size_bytes",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // The journal's writes are in memtables counted against the process's one budget.
    let memtables: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("dstore_rocksdb_memory_bytes{kind=\"memtables\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no memtable gauge in\n{text}"));
    assert!(
        memtables > 0 && memtables <= dstore::rocks::MEMTABLES as u64 * 2,
        "{memtables}"
    );
    // Index and filter blocks, outside the budget: reported so their growth can be watched.
    assert!(
        text.lines().any(|l| l
            .strip_prefix("dstore_rocksdb_memory_bytes{kind=\"table_readers\"} ")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "no table reader gauge in\n{text}"
    );
    assert!(text.contains("dstore_http_request_duration_seconds_bucket{method=\"PUT\""));

    // The local keyspaces take each write in the journal's own batch: counted as applied there.
    let id = uuid::Uuid::new_v4();
    let item =
        serde_json::json!({"project_version": 1, "title": "t", "date_created": "2026-01-01"});
    for _ in 0..2 {
        assert_eq!(
            app.put(&format!("/myblog/article/{id}"), &item)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        app.delete(&format!("/myblog/article/{id}")).await.status,
        200
    );
    let ready = app.get("/_health/ready").await.body;
    assert_eq!(
        ready["projectors"]["rocksdb"]["progress"]["applied"], 3,
        "{ready}"
    );
    assert!(app
        .metrics()
        .await
        .contains("dstore_projector_applied_total{projector=\"rocksdb\"} 3"));
    app.stop().await;
}

/// While the journal's disk has less free than `storage.min_free_disk_mb` (here: more than any
/// disk holds), item writes, blueprint edits and freezes answer 503 naming the setting and
/// readiness says so, while reads and deletes go on; once there is room (a lower setting at the
/// next start), they are accepted again and nothing was lost.
#[tokio::test]
async fn a_nearly_full_disk_refuses_item_writes_blueprint_edits_and_freezes_but_not_reads_or_deletes(
) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let app = spawn_app_with({
        let data = data.clone();
        move |s| s.storage.data_dir = data
    })
    .await;
    app.put_and_freeze("p", "article", &article()).await;
    let item =
        json!({"project_version": 1, "title": "kept", "date_created": "2020-01-02T00:00:00Z"});
    let (kept, gone) = (Uuid::new_v4(), Uuid::new_v4());
    for id in [kept, gone] {
        assert_eq!(
            app.put(&format!("/p/article/{id}"), &item).await.status,
            200
        );
    }
    // An edit to freeze later.
    let mut edited = article();
    edited["columns"]["summary"] = json!({"type": "string"});
    assert_eq!(app.put("/p/article/_blueprint", &edited).await.status, 200);
    app.stop().await;

    let full = spawn_app_with({
        let data = data.clone();
        move |s| {
            s.storage.data_dir = data;
            s.storage.min_free_disk_mb = u64::MAX >> 20;
        }
    })
    .await;
    let refused = full
        .put(&format!("/p/article/{}", Uuid::new_v4()), &item)
        .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    let message = refused.body["status"].as_str().unwrap();
    assert!(message.contains("storage.min_free_disk_mb"), "{message}");
    let bulk = format!(
        "{}\n{item}\n",
        json!({"put": {"blueprint": "article", "id": Uuid::new_v4()}})
    );
    let bulk = full
        .send(reqwest::Method::POST, "/p/_bulk", Some(bulk))
        .await;
    assert_eq!(bulk.status, 503, "{}", bulk.body);
    assert_eq!(full.get(&format!("/p/article/{kept}")).await.status, 200);
    assert_eq!(full.delete(&format!("/p/article/{gone}")).await.status, 200);
    // Blueprint edits fill the disk as surely as items: a blueprint may take a MiB.
    edited["columns"]["notes"] = json!({"type": "string"});
    let refused = full.put("/p/article/_blueprint", &edited).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    let message = refused.body["status"].as_str().unwrap();
    assert!(
        message.contains("blueprint edits") && message.contains("storage.min_free_disk_mb"),
        "{message}"
    );
    let refused = full
        .put("/q/_project", &json!({"article": article()}))
        .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(full.post("/p/_version", None).await.status, 503);
    let ready = full.get("/_health/ready").await;
    assert_eq!(ready.body["writes"]["accepted"], false, "{}", ready.body);
    let reason = ready.body["writes"]["reason"].as_str().unwrap();
    assert!(reason.contains("storage.min_free_disk_mb"), "{reason}");
    assert_eq!(full.get("/_health/ready?strict=true").await.status, 503);
    full.stop().await;

    let roomy = spawn_app_with(move |s| s.storage.data_dir = data).await;
    let id = Uuid::new_v4();
    assert_eq!(
        roomy.put(&format!("/p/article/{id}"), &item).await.status,
        200
    );
    assert_eq!(roomy.post("/p/_version", None).await.status, 200);
    assert_eq!(roomy.get(&format!("/p/article/{kept}")).await.status, 200);
    assert_eq!(roomy.get(&format!("/p/article/{gone}")).await.status, 404);
    roomy.stop().await;
}

/// Load balancers and uptime checks may send HEAD: the health routes answer it as GET, without a
/// body.
#[tokio::test]
async fn health_answers_head_as_get_without_a_body() {
    let app = spawn_app().await;
    for path in ["/_health", "/_health/ready"] {
        let answer = app
            .client
            .head(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        assert!(answer.bytes().await.unwrap().is_empty(), "{path}");
    }
    app.stop().await;
}
