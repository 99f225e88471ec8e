use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{article, article_normal, spawn_app, spawn_app_with};

#[tokio::test]
async fn the_seed_flow_freezes_version_1_and_refuses_an_empty_freeze_with_409() {
    let app = spawn_app().await;
    // No Content-Type header, as `curl -d` sends it.
    let put = app
        .send(
            Method::PUT,
            "/myblog/article/_blueprint",
            Some(article().to_string()),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["success"], true);
    assert_eq!(put.body["changes"][0]["kind"], "blueprint.create");

    let frozen = app.post("/myblog/_version", None).await;
    assert_eq!(
        (frozen.status, &frozen.body),
        (200, &json!({"project_version": 1}))
    );

    let again = app.post("/myblog/_version", None).await;
    assert_eq!(again.status, 409);
    assert_eq!(
        again.body["status"],
        "nothing changed since version 1, which every store has migrated"
    );

    let read = app.get("/myblog/article/_blueprint/1").await;
    assert_eq!((read.status, &read.body), (200, &article_normal()));
    app.stop().await;
}

#[tokio::test]
async fn a_bad_blueprint_reports_every_problem_with_its_path_in_one_422() {
    let app = spawn_app().await;
    let body = json!({
        "postgresql": {},
        "columns": {
            "title": {"type": "strnig"},
            "Bad-Name": {"type": "string"},
            "count": {"type": "integer", "validation": {"min": 5, "max": 1}},
            "flag": {"type": "boolean", "nullable": false, "default": null},
            "label": {"type": "string", "validation": {"min": 1}},
            "extra": {"type": "text", "colour": "red"}
        },
        "surprise": true
    });
    let answer = app.put("/myblog/article/_blueprint", &body).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    let paths = answer.paths();
    for expected in [
        "/postgresql/table",
        "/elasticsearch",
        "/columns/title/type",
        "/columns/Bad-Name",
        "/columns/count/validation/min",
        "/columns/flag/default",
        "/columns/label/validation/min",
        "/columns/extra/colour",
        "/surprise",
    ] {
        assert!(
            paths.contains(&expected.to_string()),
            "missing {expected} in {paths:?}"
        );
    }
    assert!(
        answer.messages().contains("unknown type \"strnig\""),
        "{}",
        answer.messages()
    );
    // Nothing was stored.
    assert_eq!(app.get("/myblog/article/_blueprint").await.status, 404);
    app.stop().await;
}

#[tokio::test]
async fn renames_swaps_and_edits_are_recorded_as_changes_and_resending_records_nothing() {
    let app = spawn_app().await;
    let v1 = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": {
        "a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "integer"}}});
    app.put_and_freeze("p", "thing", &v1).await;

    let edit = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": {
        "a": {"type": "string", "column_id": "b"},
        "b": {"type": "integer", "column_id": "a"},
        "c": {"type": "float", "column_id": "d", "nullable": false, "default": 0}}});
    let first = app.put("/p/thing/_blueprint", &edit).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let kinds: Vec<String> = first.body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["kind"].as_str().unwrap(),
                c["option"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "column.rename ",
            "column.rename ",
            "column.rename ",
            "column.update type",
            "column.update nullable",
            "column.update default"
        ],
        "{}",
        first.body
    );
    let current = app.get("/p/thing/_blueprint").await.body;
    assert_eq!(current["columns"]["b"]["type"], "string");
    assert_eq!(current["columns"]["a"]["type"], "integer");
    assert_eq!(current["columns"]["d"]["type"], "float");

    // Re-sending what GET returns is a no-op.
    let resend = app.put("/p/thing/_blueprint", &current).await;
    assert_eq!(resend.body["changes"], json!([]), "{}", resend.body);

    // The rename onto an existing column is refused.
    let clash = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": {
        "a": {"type": "integer", "column_id": "b"}, "b": {"type": "string"}}});
    let refused = app.put("/p/thing/_blueprint", &clash).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused.messages().contains("already"),
        "{}",
        refused.messages()
    );

    // The frozen version did not move.
    let frozen = app.get("/p/thing/_blueprint/1").await;
    assert_eq!(frozen.body["columns"]["a"]["type"], "string");
    // Old clients cannot read a float with a fraction as their integer, so the
    // default policy refuses the freeze with a report until it is forced.
    let refused = app.post("/p/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(
        refused.body["report"]["verdict"], "lossy",
        "{}",
        refused.body
    );
    let forced = app.post("/p/_version?force=true", None).await;
    assert_eq!(forced.body["project_version"], 2, "{}", forced.body);
    let versions = app.get("/p/_version").await;
    assert_eq!(
        versions.body["versions"][1]["forced"], true,
        "{}",
        versions.body
    );
    assert_eq!(
        versions.body["versions"][1]["changes"]
            .as_array()
            .unwrap()
            .len(),
        6,
        "{}",
        versions.body
    );
    app.stop().await;
}

#[tokio::test]
async fn reading_unknown_things_answers_404_and_malformed_input_400() {
    let app = spawn_app().await;
    assert_eq!(app.get("/nothing/_blueprint").await.status, 404);
    assert_eq!(app.get("/nothing/_version").await.status, 404);
    assert_eq!(app.post("/nothing/_version", None).await.status, 404);
    app.put_and_freeze("myblog", "article", &article()).await;
    assert_eq!(app.get("/myblog/comment/_blueprint").await.status, 404);
    assert_eq!(app.get("/myblog/article/_blueprint/7").await.status, 404);
    assert_eq!(app.get("/myblog/_blueprint/7").await.status, 404);
    assert_eq!(app.get("/myblog/_blueprint/seven").await.status, 400);

    let malformed = app
        .send(
            Method::PUT,
            "/myblog/article/_blueprint",
            Some("{\"postgresql\": ".into()),
        )
        .await;
    assert_eq!(malformed.status, 400);
    assert!(
        malformed.body["status"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{}",
        malformed.body
    );
    assert!(malformed.body["errors"].is_array());

    let wrong_method = app
        .send(Method::PATCH, "/myblog/article/_blueprint", None)
        .await;
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.body["status"].is_string());
    app.stop().await;
}

#[tokio::test]
async fn hostile_names_are_refused_with_400_before_touching_any_store() {
    let app = spawn_app().await;
    for path in [
        "/My%20Blog/article/_blueprint",
        "/..%2F..%2Fetc/article/_blueprint",
        "/myblog/..%2Farticle/_blueprint",
        "/my'blog/article/_blueprint",
        "/myblog/ar%22ticle/_blueprint",
        "/caf%C3%A9/article/_blueprint",
        "/_x/article/_blueprint",
    ] {
        let answer = app.put(path, &article()).await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        assert!(answer.body["errors"][0]["message"].is_string(), "{path}");
    }
    assert_eq!(app.get("/_project").await.body, json!({}));
    app.stop().await;
}

/// PostgreSQL keeps schema names starting with `pg_`, and a project's schemas are named after it:
/// such a project could never be migrated, so it is refused at once, and `PUT /_project` changes
/// no project when one of them is such.
#[tokio::test]
async fn a_project_postgresql_could_never_hold_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    for path in [
        "/pg_catalog/article/_blueprint",
        "/pg_x/_blueprint",
        "/pg/article/_blueprint",
    ] {
        let body = if path.ends_with("/article/_blueprint") {
            article()
        } else {
            json!({"article": article()})
        };
        let answer = app.put(path, &body).await;
        assert_eq!(answer.status, 422, "{path}: {}", answer.body);
        assert!(
            answer.messages().contains("start with pg_"),
            "{}",
            answer.body
        );
    }
    let body = json!({"aaa": {"article": article()}, "pg_zz": {"article": article()},
        "zzz": {"article": article()}});
    let answer = app.put("/_project", &body).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.paths(), vec!["/pg_zz"]);
    assert_eq!(app.get("/_project").await.body, json!({}));
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413() {
    let app = spawn_app_with(|s| s.server.max_body_bytes = 1024).await;
    let mut big = article();
    big["columns"]["title"]["comment"] = json!("x".repeat(2000));
    let answer = app.put("/myblog/article/_blueprint", &big).await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert!(answer.body["status"].as_str().unwrap().contains("1024"));
    app.stop().await;
}

#[tokio::test]
async fn two_blueprints_cannot_share_a_table_and_project_routes_put_all_and_freeze() {
    let app = spawn_app().await;
    let mut comment = article();
    comment["elasticsearch"]["type"] = json!("comment");
    let body = json!({"myblog": {"article": article(), "comment": comment}});
    let clash = app.put("/_project", &body).await;
    assert_eq!(clash.status, 422, "{}", clash.body);
    assert!(
        clash
            .paths()
            .iter()
            .any(|p| p.ends_with("/postgresql/table")),
        "{}",
        clash.body
    );

    let mut comment = article();
    comment["postgresql"]["table"] = json!("comments");
    comment["elasticsearch"]["type"] = json!("comment");
    let body = json!({"myblog": {"article": article(), "comment": comment}});
    let put = app.put("/_project", &body).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["myblog"]["project_version"], 1);
    let again = app.put("/myblog/_project", &body["myblog"]).await;
    assert_eq!(
        (
            again.body["project_version"].as_u64(),
            again.body["changed"].as_bool()
        ),
        (Some(1), Some(false))
    );

    let all = app.get("/_version").await;
    assert_eq!(all.body["myblog"]["blueprints"]["comment"], json!([1]));
    let project = app.get("/myblog/_project").await;
    assert_eq!(project.body["blueprints"]["article"], article_normal());

    assert_eq!(app.delete("/myblog/_project").await.status, 200);
    assert_eq!(app.get("/myblog/_project").await.status, 404);
    app.stop().await;
}

/// Tables and indexes share one namespace in a version's PostgreSQL schema: a blueprint whose table
/// or index would take the name of another blueprint's index is refused, naming both.
#[tokio::test]
async fn a_blueprint_cannot_take_a_name_another_blueprints_index_has_in_postgresql() {
    let app = spawn_app().await;
    let blueprint = |table: &str, es_type: &str, column: &str| {
        json!({"postgresql": {"table": table}, "elasticsearch": {"type": es_type},
               "columns": {column: {"type": "string", "index": true, "unique": true}}})
    };
    let first = app
        .put("/p/a/_blueprint", &blueprint("a", "a", "b_c"))
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    for (table, column, clash) in [
        ("a_b", "c", "a_b_c_idx"),
        ("a_pkey", "x", "a_pkey"),
        ("a_b_c_key", "x", "a_b_c_key"),
        ("a_b_c_idx", "x", "a_b_c_idx"),
    ] {
        let second = app
            .put("/p/x/_blueprint", &blueprint(table, "x", column))
            .await;
        assert_eq!(second.status, 422, "{table}.{column}: {}", second.body);
        let paths = second.paths();
        assert!(
            !paths.is_empty() && paths.iter().all(|p| p == "/postgresql/table"),
            "{}",
            second.body
        );
        assert!(
            second.body.to_string().contains(clash),
            "{table}.{column}: {}",
            second.body
        );
    }
    let fine = app
        .put("/p/x/_blueprint", &blueprint("a_b", "x", "d"))
        .await;
    assert_eq!(fine.status, 200, "{}", fine.body);
    // A blueprint whose name sorts before the one it clashes with is told the other's name.
    let early = app
        .put("/p/b/_blueprint", &blueprint("a_b", "b", "e"))
        .await;
    assert_eq!(early.status, 422, "{}", early.body);
    assert!(
        early.messages().contains("blueprint \"x\""),
        "{}",
        early.body
    );
    assert_eq!(app.post("/p/_version", None).await.status, 200);
    app.stop().await;
}

/// `PUT /_project` changes no project unless every one passes: a project refused for a table two
/// of its blueprints share leaves the others, new or existing, as they were.
#[tokio::test]
async fn put_all_changes_nothing_when_any_project_is_refused() {
    let app = spawn_app().await;
    let existing = app
        .put("/zeta/_project", &json!({"article": article()}))
        .await;
    assert_eq!(existing.status, 200, "{}", existing.body);
    let mut twin = article();
    twin["elasticsearch"]["type"] = json!("twin");
    let mut grown = article();
    grown["columns"]["summary"] = json!({"type": "text", "nullable": true});
    let body = json!({
        "alpha": {"article": article()},
        "beta": {"article": article(), "twin": twin},
        "zeta": {"article": grown},
    });
    let refused = app.put("/_project", &body).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(
        refused.paths(),
        vec!["/beta/twin/postgresql/table".to_string()],
        "{}",
        refused.body
    );
    assert_eq!(app.get("/alpha/_project").await.status, 404);
    assert_eq!(app.get("/beta/_project").await.status, 404);
    let zeta = app.get("/zeta/_version").await;
    assert_eq!(
        zeta.body["versions"].as_array().map(Vec::len),
        Some(1),
        "{}",
        zeta.body
    );
    let unchanged = app.get("/zeta/_project").await;
    assert_eq!(
        unchanged.body["blueprints"]["article"],
        article_normal(),
        "{}",
        unchanged.body
    );
    app.stop().await;
}

#[tokio::test]
async fn the_catalog_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    {
        let app = spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
        app.put_and_freeze("myblog", "article", &article()).await;
        let mut edited = article();
        edited["columns"]["summary"] = json!({"type": "text"});
        app.put("/myblog/article/_blueprint", &edited).await;
        app.stop().await;
    }
    let app = spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
    assert_eq!(
        app.get("/myblog/article/_blueprint/1").await.body,
        article_normal()
    );
    assert_eq!(
        app.get("/myblog/article/_blueprint").await.body["columns"]["summary"]["type"],
        "text"
    );
    assert_eq!(
        app.post("/myblog/_version", None).await.body["project_version"],
        2
    );
}

#[tokio::test]
async fn a_blueprint_with_too_many_columns_is_refused_with_422() {
    let app = spawn_app().await;
    let mut body = article();
    for i in 0..900 {
        body["columns"][format!("c{i}")] = json!({"type": "integer"});
    }
    let answer = app.put("/myblog/article/_blueprint", &body).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.paths(), ["/columns"]);
    app.stop().await;
}

/// Defaults that alone overflow a PostgreSQL row would have every item moved into the version
/// refused by PostgreSQL after the freeze: the blueprint is refused before, naming its columns;
/// as many columns without defaults are accepted (each item's own row is checked as it is written).
#[tokio::test]
async fn defaults_that_alone_overflow_a_postgresql_row_are_refused_with_422() {
    let app = spawn_app().await;
    app.put_and_freeze("myblog", "article", &article()).await;
    let mut body = article();
    for i in 0..520 {
        body["columns"][format!("u{i}")] =
            json!({"type": "uuid", "default": "0b7a4b3e-94c4-4bf8-9a2d-3b5a7e8e2f11"});
    }
    let answer = app.put("/myblog/article/_blueprint", &body).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.paths(), ["/columns"]);
    assert!(answer.body.to_string().contains("8160"), "{}", answer.body);
    for i in 0..520 {
        body["columns"][format!("u{i}")] = json!({"type": "uuid"});
    }
    let answer = app.put("/myblog/article/_blueprint", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    app.stop().await;
}

/// A unique array's default is held to the index's bound, as a client's own value is: every item
/// that leaves the column out would take it, and PostgreSQL would refuse each of them for good.
#[tokio::test]
async fn a_default_too_large_for_its_unique_index_is_refused_naming_it() {
    let app = spawn_app().await;
    let mut body = article();
    let (a, b) = ("a".repeat(1990), "b".repeat(1990));
    body["columns"]["codes"] = json!({"type": "string[]", "unique": true, "default": [a, b]});
    let answer = app.put("/myblog/article/_blueprint", &body).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.paths(), ["/columns/codes/default"]);
    body["columns"]["codes"] = json!({"type": "string[]", "unique": true, "default": ["a", "b"]});
    let answer = app.put("/myblog/article/_blueprint", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    app.stop().await;
}

#[tokio::test]
async fn malformed_query_strings_and_paths_get_json_errors() {
    let app = spawn_app().await;
    for path in ["/_dead_letters?limit=lots", "/myblog/%FF%FE/_blueprint"] {
        let answer = app.get(path).await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        assert!(answer.body["status"].is_string(), "{path}");
    }
    app.stop().await;
}

/// Every node keeps every version of every project in memory: a project's blueprints take at most
/// 4 MiB as JSON. An edit past it is refused naming the limit; one that does not grow them goes on.
#[tokio::test]
async fn a_project_whose_blueprints_would_pass_4_mib_is_refused() {
    let app = spawn_app().await;
    let comment = "c".repeat(1000);
    let columns: serde_json::Map<String, serde_json::Value> = (0..800)
        .map(|i| {
            (
                format!("c{i}"),
                json!({"type": "string", "comment": comment}),
            )
        })
        .collect();
    let body = |table: &str| {
        json!({"postgresql": {"table": table}, "elasticsearch": {"type": table},
            "columns": columns})
    };
    let mut refused = None;
    for n in 0..8 {
        let put = app
            .put(&format!("/big/b{n}/_blueprint"), &body(&format!("t{n}")))
            .await;
        if put.status != 200 {
            refused = Some((n, put));
            break;
        }
    }
    let (n, put) = refused.expect("refused before 8 blueprints of 800 KB");
    assert!(n >= 4, "refused at blueprint {n}");
    assert_eq!(put.status, 422, "{}", put.body);
    assert!(
        put.messages().contains("at most 4194304 bytes"),
        "{}",
        put.body
    );
    // Not grown: the same blueprint again goes on.
    assert_eq!(app.put("/big/b0/_blueprint", &body("t0")).await.status, 200);
    app.stop().await;
}

/// A blueprint removed and made again under its name is the same blueprint to the versions still
/// live, with new columns: a write through the new version reaches the old one too (before, the
/// two shared the item's key under two uids, and the old version's stores kept a copy no write or
/// delete reached).
#[tokio::test]
async fn a_blueprint_made_again_under_its_name_keeps_its_items_in_every_live_version() {
    let app = spawn_app().await;
    let note = |column: &str| {
        json!({"postgresql": {"table": "notes"}, "elasticsearch": {"type": "note"},
            "columns": {column: {"type": "string"}}})
    };
    app.put_and_freeze("p", "note", &note("title")).await;
    assert_eq!(app.delete("/p/note/_blueprint").await.status, 200);
    assert_eq!(
        app.put("/p/note/_blueprint", &note("heading")).await.status,
        200
    );
    let frozen = app.post("/p/_version?force=true", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    let id = uuid::Uuid::new_v4();
    let put = app
        .put(
            &format!("/p/note/{id}"),
            &json!({"project_version": 2, "heading": "new"}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    // Version 1 sees the item, without the columns it does not have.
    let old = app.get(&format!("/p/note/{id}?version=1")).await;
    assert_eq!(old.status, 200, "{}", old.body);
    assert_eq!(old.body["title"], Value::Null, "{}", old.body);
    assert_eq!(app.delete(&format!("/p/note/{id}")).await.status, 200);
    assert_eq!(
        app.get(&format!("/p/note/{id}?version=1")).await.status,
        404
    );
    app.stop().await;
}
