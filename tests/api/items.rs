use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{article, spawn_app, TestApp};

const ID: &str = "0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01";

async fn blog() -> TestApp {
    let app = spawn_app().await;
    app.put_and_freeze("myblog", "article", &article()).await;
    app
}

fn seed_item() -> Value {
    json!({
        "id": ID,
        "project_version": 1,
        "title": "Hello",
        "date_created": "2020-01-02 03:04:05",
        "location": {"type": "Point", "coordinates": [8.54, 47.37]}
    })
}

#[tokio::test]
async fn the_seed_item_flow_writes_reads_and_deletes() {
    let app = blog().await;
    let put = app
        .send(
            Method::PUT,
            &format!("/myblog/article/{ID}"),
            Some(seed_item().to_string()),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["success"], true);
    let revision = put.body["revision"].as_u64().expect("a revision");

    let read = app.get(&format!("/myblog/article/{ID}")).await;
    assert_eq!(read.status, 200);
    let mut expected = seed_item();
    expected["links"] = json!([]);
    assert_eq!(read.body, expected);

    let second = app
        .put(&format!("/myblog/article/{ID}"), &seed_item())
        .await;
    assert!(second.body["revision"].as_u64().unwrap() > revision);

    let deleted = app.delete(&format!("/myblog/article/{ID}")).await;
    assert_eq!(
        (deleted.status, &deleted.body["found"]),
        (200, &json!(true))
    );
    assert_eq!(app.get(&format!("/myblog/article/{ID}")).await.status, 404);
    let again = app.delete(&format!("/myblog/article/{ID}")).await;
    assert_eq!((again.status, &again.body["found"]), (200, &json!(false)));
    app.stop().await;
}

#[tokio::test]
async fn a_large_item_reads_back_exactly_in_every_version() {
    let app = spawn_app().await;
    let mut blueprint = article();
    blueprint["columns"]["counts"] = json!({"type": "integer[]"});
    app.put_and_freeze("big", "article", &blueprint).await;
    // Past the size above which an item is decoded and answered on a blocking thread.
    let counts: Vec<i64> = (0..60_000).map(|n| n * 7 - 3).collect();
    let item = json!({"project_version": 1, "title": "é".repeat(20_000),
                      "date_created": "2020-01-02 03:04:05", "counts": counts});
    assert!(item.to_string().len() > 300_000);
    let put = app.put(&format!("/big/article/{ID}"), &item).await;
    assert_eq!(put.status, 200, "{}", put.body);
    blueprint["columns"]["summary"] = json!({"type": "text", "nullable": true});
    app.put_and_freeze("big", "article", &blueprint).await;
    for version in [1, 2] {
        let read = app
            .get(&format!("/big/article/{ID}?version={version}"))
            .await;
        assert_eq!(read.status, 200, "{}", read.body);
        assert_eq!(read.body["project_version"], version);
        assert_eq!(read.body["counts"], json!(counts), "version {version}");
        assert_eq!(read.body["title"], item["title"]);
        assert_eq!(
            read.body.get("summary").is_some(),
            version == 2,
            "{version}"
        );
    }
    assert_eq!(
        app.get(&format!("/big/article/{}", Uuid::new_v4()))
            .await
            .status,
        404
    );
    app.stop().await;
}

#[tokio::test]
async fn an_invalid_item_lists_every_bad_field_and_stores_nothing() {
    let app = spawn_app().await;
    let blueprint = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": {
        "n": {"type": "integer", "validation": {"min": 0, "max": 10}},
        "f": {"type": "float"},
        "u": {"type": "uuid"},
        "d": {"type": "date"},
        "t": {"type": "datetime", "validation": {"required": true}},
        "g": {"type": "polygon"},
        "s": {"type": "string", "validation": {"max_length": 3, "pattern": "^[a-z]+$", "enum": ["abc", "xyz"]}},
        "tags": {"type": "string[]"},
        "nn": {"type": "boolean", "nullable": false}
    }});
    app.put_and_freeze("p", "thing", &blueprint).await;
    let item = json!({
        "id": "7f0c5a62-8a3b-4c43-9d0e-3e2f1b0a9c11",
        "project_version": 1,
        "links": ["nope"],
        "n": 4.5, "f": "1.5", "u": "xyz", "d": "2021-02-30", "g": {"type": "Point", "coordinates": [0, 0]},
        "s": "ABCD", "tags": ["ok", 3], "nn": null, "unknown": 1
    });
    let answer = app.put(&format!("/p/thing/{ID}"), &item).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    let mut paths = answer.paths();
    paths.sort();
    assert_eq!(
        paths,
        [
            "", "/d", "/f", "/g", "/id", "/links", "/n", "/nn", "/s", "/t", "/tags", "/u",
            "/unknown"
        ],
        "{}",
        answer.messages()
    );
    assert_eq!(app.get(&format!("/p/thing/{ID}")).await.status, 404);

    let out_of_range = app
        .put(
            &format!("/p/thing/{ID}"),
            &json!({"project_version": 1, "t": "2020-01-01", "nn": true, "n": 11}),
        )
        .await;
    assert!(
        out_of_range.messages().contains("maximum"),
        "{}",
        out_of_range.body
    );
    let too_big = app
        .put(
            &format!("/p/thing/{ID}"),
            &json!({"project_version": 1, "t": "2020-01-01", "nn": true, "n": 3_000_000_000u64}),
        )
        .await;
    assert!(too_big.messages().contains("range"), "{}", too_big.body);
    app.stop().await;
}

#[tokio::test]
async fn project_version_must_name_a_frozen_version_holding_the_blueprint() {
    let app = blog().await;
    let mut item = seed_item();
    item.as_object_mut().unwrap().remove("project_version");
    assert_eq!(
        app.put(&format!("/myblog/article/{ID}"), &item)
            .await
            .paths(),
        ["/project_version"]
    );
    item["project_version"] = json!(2);
    let answer = app.put(&format!("/myblog/article/{ID}"), &item).await;
    assert_eq!(answer.status, 422);
    assert!(answer.messages().contains("does not exist"));
    assert_eq!(
        app.put(&format!("/myblog/comment/{ID}"), &seed_item())
            .await
            .status,
        404
    );
    assert_eq!(
        app.put(&format!("/nope/article/{ID}"), &seed_item())
            .await
            .status,
        404
    );
    assert_eq!(
        app.put("/myblog/article/not-a-uuid", &seed_item())
            .await
            .status,
        400
    );
    let malformed = app
        .send(
            Method::PUT,
            &format!("/myblog/article/{ID}"),
            Some("{".into()),
        )
        .await;
    assert_eq!(malformed.status, 400);
    app.stop().await;
}

#[tokio::test]
async fn post_generates_an_id_and_wait_returns_once_the_keyspace_has_the_item() {
    let app = blog().await;
    let mut item = seed_item();
    item.as_object_mut().unwrap().remove("id");
    let created = app.post("/myblog/article?wait=true", Some(&item)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["projected"], true);
    let id: Uuid = created.body["id"].as_str().unwrap().parse().unwrap();
    let stored = app.rocksdb.as_ref().unwrap().get(
        &"myblog".parse_ident(),
        1,
        &"article".parse_ident(),
        &id,
    );
    assert_eq!(stored.unwrap()["title"], "Hello");

    item["id"] = json!(ID);
    let refused = app.post("/myblog/article", Some(&item)).await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.paths(), ["/id"], "{}", refused.body);
    assert!(
        refused.messages().contains("must be left out"),
        "a POST has no id in its URL: {}",
        refused.body
    );
    app.stop().await;
}

#[tokio::test]
async fn bulk_answers_per_line_and_journals_the_valid_ones() {
    let app = blog().await;
    let other = "5d3e4f5a-6b7c-4d8e-9f00-112233445566";
    let body = [
        json!({"put": {"blueprint": "article", "id": ID}}),
        seed_item(),
        json!({"put": {"blueprint": "article", "id": other}}),
        json!({"project_version": 1, "title": 5}),
        json!({"create": {"blueprint": "article"}}),
        json!({"project_version": 1, "date_created": "2021-05-06"}),
        json!({"delete": {"blueprint": "article", "id": other}}),
        json!({"put": {"blueprint": "nope", "id": other}}),
        json!({"project_version": 1}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let answer = app
        .send(Method::POST, "/myblog/_bulk?wait=true", Some(body))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["errors"], true);
    let statuses: Vec<u64> = answer.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i.as_object().unwrap().values().next().unwrap()["status"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(statuses, [200, 422, 201, 200, 404]);
    assert_eq!(app.get(&format!("/myblog/article/{ID}")).await.status, 200);
    assert_eq!(
        app.rocksdb
            .as_ref()
            .unwrap()
            .count(&"myblog".parse_ident(), 1, &"article".parse_ident()),
        2
    );
    // A delete says whether the item was there, as DELETE answers it; other actions do not.
    let items = answer.body["items"].as_array().unwrap();
    assert_eq!(items[3]["delete"]["found"], false, "{}", answer.body);
    assert!(items[0]["put"].get("found").is_none(), "{}", answer.body);
    let delete = json!({"delete": {"blueprint": "article", "id": ID}}).to_string();
    let deleted = app.send(Method::POST, "/myblog/_bulk", Some(delete)).await;
    assert_eq!(
        deleted.body["items"][0]["delete"]["found"], true,
        "{}",
        deleted.body
    );

    let broken = app
        .send(Method::POST, "/myblog/_bulk", Some("{\"put\": \n".into()))
        .await;
    assert_eq!(broken.status, 400);
    assert_eq!(broken.body["errors"][0]["path"], "/line/1");
    app.stop().await;
}

/// A `_bulk` finds each item as the operations before it in the body left it, as requests sent
/// one after another would: a delete of an item put earlier in the body (in its part or in one
/// before) is found and deletes it, a second delete of it is not found, and a put refused leaves
/// nothing to delete.
#[tokio::test]
async fn bulk_deletes_find_items_as_the_body_left_them() {
    let app = blog().await;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let line = |action: &str, id: Uuid| json!({action: {"blueprint": "article", "id": id}});
    let item =
        || json!({"project_version": 1, "title": "t", "date_created": "2020-01-02 03:04:05"});
    let mut lines = vec![
        line("put", a),
        item(),
        line("delete", a),
        line("delete", a),
        line("put", b),
        json!({"project_version": 1, "title": 5, "date_created": "2020-01-02 03:04:05"}),
        line("delete", b),
        line("put", c),
        item(),
    ];
    // Past one part of operations: the last delete is in the second part.
    for _ in 0..10_000 {
        lines.push(line("put", Uuid::new_v4()));
        lines.push(item());
    }
    lines.push(line("delete", c));
    let body = lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let answer = app.send(Method::POST, "/myblog/_bulk", Some(body)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let items = answer.body["items"].as_array().unwrap();
    let found: Vec<&Value> = [1, 2, 4]
        .into_iter()
        .chain([items.len() - 1])
        .map(|i| &items[i]["delete"]["found"])
        .collect();
    assert_eq!(found, [true, false, false, true], "{:?}", &items[..5]);
    for id in [a, b, c] {
        assert_eq!(app.get(&format!("/myblog/article/{id}")).await.status, 404);
    }
    app.stop().await;
}

#[tokio::test]
async fn freezing_a_new_version_backfills_existing_items_and_retired_versions_take_no_writes() {
    let app = blog().await;
    for i in 0..1200u32 {
        let id = Uuid::from_u128(u128::from(i) + 1);
        let mut item = seed_item();
        item["id"] = json!(id);
        item["title"] = json!(format!("t{i}"));
        let put = app.put(&format!("/myblog/article/{id}"), &item).await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    let mut v2 = article();
    v2["columns"]["title"]["column_id"] = json!("headline");
    v2["columns"]["views"] = json!({"type": "integer", "default": 0});
    assert_eq!(app.put_and_freeze("myblog", "article", &v2).await, 2);

    let mut finished = Value::Null;
    for _ in 0..300 {
        finished = app.get("/myblog/_version").await.body["versions"][1]["backfill"].clone();
        if finished["finished"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        finished,
        json!({"total": 1200, "done": 1200, "finished": true})
    );
    // Wait for the projector through a write that queues behind the back-fill.
    let mut last = seed_item();
    last["project_version"] = json!(2);
    last.as_object_mut().unwrap().remove("title");
    assert_eq!(
        app.put(&format!("/myblog/article/{ID}?wait=true"), &last)
            .await
            .body["projected"],
        true
    );

    let keyspaces = app.rocksdb.as_ref().unwrap();
    let (project, blueprint) = ("myblog".parse_ident(), "article".parse_ident());
    assert_eq!(keyspaces.count(&project, 2, &blueprint), 1201);
    let moved = keyspaces
        .get(&project, 2, &blueprint, &Uuid::from_u128(6))
        .unwrap();
    assert_eq!(
        (&moved["headline"], &moved["views"], moved.get("title")),
        (&json!("t5"), &json!(0), None)
    );

    assert_eq!(
        app.post("/myblog/_version/1/_retire", None).await.status,
        200
    );
    let refused = app
        .put(&format!("/myblog/article/{ID}"), &seed_item())
        .await;
    assert_eq!(refused.status, 422);
    assert!(refused.messages().contains("retired"));
    app.stop().await;
}

#[tokio::test]
async fn deleting_a_project_removes_its_items_from_the_journal_and_the_keyspaces() {
    let app = blog().await;
    assert_eq!(
        app.put(&format!("/myblog/article/{ID}?wait=true"), &seed_item())
            .await
            .body["projected"],
        true
    );
    assert_eq!(app.delete("/myblog/_project").await.status, 200);
    assert_eq!(app.get(&format!("/myblog/article/{ID}")).await.status, 404);
    app.put_and_freeze("myblog", "article", &article()).await;
    assert_eq!(app.get(&format!("/myblog/article/{ID}")).await.status, 404);
    let (project, blueprint) = ("myblog".parse_ident(), "article".parse_ident());
    for _ in 0..300 {
        if app.rocksdb.as_ref().unwrap().count(&project, 1, &blueprint) == 0 {
            app.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the keyspace still holds the deleted project's items");
}

trait ParseIdent {
    fn parse_ident(&self) -> dstore::blueprint::Ident;
}

impl ParseIdent for &str {
    fn parse_ident(&self) -> dstore::blueprint::Ident {
        dstore::blueprint::Ident::parse(self).unwrap()
    }
}

/// `myblog`'s version 2 back-fill as `GET /myblog/_version` shows it, once finished (or after
/// 20 s).
async fn backfill_of_version_2(app: &crate::helpers::TestApp) -> Value {
    let mut backfill = Value::Null;
    for _ in 0..200 {
        backfill = app.get("/myblog/_version").await.body["versions"][1]["backfill"].clone();
        if backfill["finished"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    backfill
}

#[tokio::test]
async fn a_backfill_interrupted_by_a_restart_resumes_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let total = 6000;
    {
        let app = crate::helpers::spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
        app.put_and_freeze("myblog", "article", &article()).await;
        let mut body = String::new();
        for i in 0..total {
            let mut item = seed_item();
            item["id"] = json!(Uuid::from_u128(i + 1));
            body.push_str(&json!({"put": {"blueprint": "article", "id": item["id"]}}).to_string());
            body.push('\n');
            body.push_str(&item.to_string());
            body.push('\n');
        }
        let bulk = app.send(Method::POST, "/myblog/_bulk", Some(body)).await;
        assert_eq!(bulk.body["errors"], false);
        let mut v2 = article();
        v2["columns"]["views"] = json!({"type": "integer"});
        app.put_and_freeze("myblog", "article", &v2).await;
        app.stop().await;
    }
    let app = crate::helpers::spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
    assert_eq!(
        backfill_of_version_2(&app).await,
        json!({"total": total, "done": total, "finished": true})
    );
    let mut last = seed_item();
    last["id"] = json!(Uuid::from_u128(1));
    last["project_version"] = json!(2);
    assert_eq!(
        app.put(
            &format!("/myblog/article/{}?wait=true", Uuid::from_u128(1)),
            &last
        )
        .await
        .body["projected"],
        true
    );
    let count =
        app.rocksdb
            .as_ref()
            .unwrap()
            .count(&"myblog".parse_ident(), 2, &"article".parse_ident());
    assert_eq!(count, total as usize);
}

/// A back-fill state that no longer decodes (damaged, or written by a newer dstore) stops nothing:
/// dstore starts, and the back-fill starts over and finishes.
#[tokio::test]
async fn a_backfill_state_that_does_not_decode_starts_over_instead_of_stopping_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let total = 50;
    {
        let app = crate::helpers::spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
        app.put_and_freeze("myblog", "article", &article()).await;
        for i in 0..total {
            let mut item = seed_item();
            item.as_object_mut().unwrap().remove("id");
            let put = app
                .put(
                    &format!("/myblog/article/{}", Uuid::from_u128(i + 1)),
                    &item,
                )
                .await;
            assert!(put.status == 200 || put.status == 201, "{}", put.body);
        }
        let mut v2 = article();
        v2["columns"]["views"] = json!({"type": "integer"});
        app.put_and_freeze("myblog", "article", &v2).await;
        app.stop().await;
    }
    {
        let journal = path.join("journal");
        let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), &journal).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &journal, families).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(
            meta,
            b"backfill/myblog/0000000002",
            b"{\"total\": \"damaged",
        )
        .unwrap();
    }
    let app = crate::helpers::spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
    assert_eq!(
        backfill_of_version_2(&app).await,
        json!({"total": total, "done": total, "finished": true})
    );
    let count =
        app.rocksdb
            .as_ref()
            .unwrap()
            .count(&"myblog".parse_ident(), 2, &"article".parse_ident());
    assert_eq!(count, total as usize);
    app.stop().await;
}

#[tokio::test]
async fn keyspaces_the_journal_did_not_keep_are_rebuilt_from_its_items() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (project, blueprint) = (
        dstore::blueprint::Ident::parse("myblog").unwrap(),
        dstore::blueprint::Ident::parse("article").unwrap(),
    );
    // A time with the keyspaces turned off: items are written, and one of them deleted.
    let app = crate::helpers::spawn_app_with(|s| {
        s.storage.data_dir = path.clone();
        s.projection.rocksdb = false;
    })
    .await;
    assert!(app.rocksdb.is_none());
    app.put_and_freeze("myblog", "article", &article()).await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        let put = app
            .put(
                &format!("/myblog/article/{id}"),
                &json!({"project_version": 1, "title": "kept", "date_created": "2026-01-01T00:00:00Z"}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    assert_eq!(
        app.delete(&format!("/myblog/article/{}", ids[2]))
            .await
            .status,
        200
    );
    app.stop().await;

    // Turned on again: the journal keeps them, rebuilt from what it holds.
    let app = crate::helpers::spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
    let keyspaces = app.rocksdb.clone().unwrap();
    let mut rebuilt = 0;
    for _ in 0..1200 {
        rebuilt = keyspaces.count(&project, 1, &blueprint);
        if rebuilt == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(rebuilt, 2, "the two live items, not the deleted one");
    assert_eq!(
        keyspaces.get(&project, 1, &blueprint, &ids[0]).unwrap()["title"],
        "kept"
    );
    assert!(keyspaces.get(&project, 1, &blueprint, &ids[2]).is_none());
    drop(keyspaces);
    app.stop().await;
}

/// Plain item paths skip the route table (`items::plain`); percent-encoded ones take the item
/// route. Both must answer alike: the same item, the same refusals, 405 for other methods, and one
/// metrics series named by the route's pattern.
#[tokio::test]
async fn plain_and_percent_encoded_item_paths_answer_alike() {
    let app = blog().await;
    let encoded = format!("/my%62log/%61rticle/{ID}");
    let put = app.put(&encoded, &seed_item()).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let plain = app.get(&format!("/myblog/article/{ID}")).await;
    let through_router = app.get(&encoded).await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert_eq!(plain.body, through_router.body);
    assert_eq!(plain.body["title"], "Hello");
    let put = app
        .client
        .put(format!("{}/myblog/article/{ID}", app.address))
        .json(&seed_item())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(put.headers()["content-type"], "application/json");
    let written: Value = put.json().await.unwrap();
    assert_eq!(written["id"], ID, "{written}");

    for path in [format!("/myblog/article/{ID}"), encoded.clone()] {
        for method in [Method::POST, Method::PATCH, Method::HEAD] {
            let answer = app.send(method.clone(), &path, None).await;
            assert_eq!(answer.status, 405, "{method} {path}");
        }
    }
    for (path, field) in [
        ("/myblog/article/not-a-uuid".to_string(), "id"),
        ("/my%62log/article/not-a-uuid".to_string(), "id"),
        (format!("/myblog/art.icle/{ID}"), "blueprint"),
        (format!("/myblog/art%2Eicle/{ID}"), "blueprint"),
        (format!("/my:blog/article/{ID}"), "project"),
    ] {
        let answer = app.put(&path, &seed_item()).await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        assert_eq!(
            answer.body["errors"][0]["path"], field,
            "{path}: {}",
            answer.body
        );
    }
    let missing = app
        .get("/nosuch/article/0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e02")
        .await;
    assert_eq!(missing.status, 404, "{}", missing.body);

    let deleted = app.delete(&encoded).await;
    assert_eq!(deleted.body["found"], true, "{}", deleted.body);
    let deleted = app.delete(&format!("/myblog/article/{ID}")).await;
    assert_eq!(deleted.body["found"], false, "{}", deleted.body);

    let metrics = app.metrics().await;
    for line in [
        "dstore_http_requests_total{method=\"PUT\",route=\"/{project}/{blueprint}/{id}\",status=\"200\"} 2",
        "dstore_http_requests_total{method=\"GET\",route=\"/{project}/{blueprint}/{id}\",status=\"200\"} 2",
        "dstore_http_requests_total{method=\"DELETE\",route=\"/{project}/{blueprint}/{id}\",status=\"200\"} 2",
        "dstore_http_requests_total{method=\"POST\",route=\"/{project}/{blueprint}/{id}\",status=\"405\"} 2",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    app.stop().await;
}
