//! Safe schema evolution: the freeze report counted on real items, the compatibility setting, forced
//! freezes, declared conversions, version usage and the diff between two versions.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app, spawn_app_with, TestApp};
use crate::postgres::TestDatabase;

fn product(price: Value) -> Value {
    blueprint(
        "products",
        "product",
        json!({"name": {"type": "string"}, "price": price}),
    )
}

/// A shop frozen at version 1 (price a float) with items priced 1.5, 2.0, 7.25 and none; returns
/// their ids in that order.
async fn shop(app: &TestApp) -> Vec<Uuid> {
    app.put_and_freeze("shop", "product", &product(json!({"type": "float"})))
        .await;
    let mut ids = Vec::new();
    for price in [json!(1.5), json!(2.0), json!(7.25), Value::Null] {
        let id = Uuid::new_v4();
        let put = app
            .put(
                &format!("/shop/product/{id}"),
                &json!({"id": id, "project_version": 1, "name": "thing", "price": price}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        ids.push(id);
    }
    ids
}

fn price_column(report: &Value) -> Value {
    column(&report["live_versions"][0], "price")
}

/// Writes `items` (their columns) at version 1 under `path` (`/project/blueprint`), with ids in
/// the order the count and the back-fill read them, so which of two equal values comes first is
/// known; answers the ids.
async fn put_in_order(
    app: &TestApp,
    path: &str,
    items: impl IntoIterator<Item = Value>,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (n, mut item) in items.into_iter().enumerate() {
        let id = Uuid::from_u128(0x0123_4567_89ab_4def_8000_0000_0000_0000 + n as u128);
        item["id"] = json!(id);
        item["project_version"] = json!(1);
        let put = app.put(&format!("{path}/{id}"), &item).await;
        assert_eq!(put.status, 200, "{}", put.body);
        ids.push(id);
    }
    ids
}

/// A blueprint of `columns`, in PostgreSQL table `table` and Elasticsearch type `ty`.
fn blueprint(table: &str, ty: &str, columns: Value) -> Value {
    json!({"postgresql": {"table": table}, "elasticsearch": {"type": ty}, "columns": columns})
}

/// Live version `number`'s part of a freeze report.
fn live_version(report: &Value, number: u32) -> Value {
    report["live_versions"]
        .as_array()
        .and_then(|live| live.iter().find(|v| v["version"] == number).cloned())
        .unwrap_or_else(|| panic!("no live version {number} in {report}"))
}

/// Column `name` of a live version's part of a freeze report.
fn column(version: &Value, name: &str) -> Value {
    version["columns"]
        .as_array()
        .and_then(|columns| columns.iter().find(|c| c["column"] == name).cloned())
        .unwrap_or_else(|| panic!("no column {name} in {version}"))
}

#[tokio::test]
async fn a_dry_run_counts_the_items_that_would_lose_a_value_and_changes_nothing() {
    let app = spawn_app().await;
    shop(&app).await;
    let edit = app
        .put(
            "/shop/product/_blueprint",
            &product(json!({"type": "integer"})),
        )
        .await;
    assert_eq!(edit.status, 200, "{}", edit.body);

    let dry = app.post("/shop/_version?dry_run=true", None).await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    let report = &dry.body;
    assert_eq!(report["version"], 2, "{report}");
    assert_eq!(report["verdict"], "lossy", "{report}");
    assert_eq!(report["allowed"], false, "{report}");
    assert_eq!(report["items"], 4, "{report}");
    let price = price_column(report);
    // 1.5 and 7.25 have no integer; 2.0 and the missing price arrive.
    assert_eq!(
        price["new_clients_reading_old_writes"]["verdict"], "lossy",
        "{report}"
    );
    assert_eq!(
        price["new_clients_reading_old_writes"]["items_losing_a_value"], 2,
        "{report}"
    );
    assert!(price["new_clients_reading_old_writes"]["reason"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    // Every integer is a float: old clients lose nothing of what new clients write.
    assert_eq!(
        price["old_clients_reading_new_writes"]["verdict"], "lossless",
        "{report}"
    );
    assert_eq!(
        price["old_clients_reading_new_writes"]["items_losing_a_value"], 0,
        "{report}"
    );
    assert_eq!(
        report["live_versions"][0]["new_clients_reading_old_writes"]["items_losing_a_value"], 2,
        "{report}"
    );
    assert_eq!(
        report["live_versions"][0]["changes"][0]["kind"], "column.update",
        "{report}"
    );
    assert!(report["stores"]["rocksdb"].is_object(), "{report}");
    // A dry run is never forced: the combination is refused naming force.
    let both = app
        .post("/shop/_version?dry_run=true&force=true", None)
        .await;
    assert_eq!(both.status, 400, "{}", both.body);
    assert_eq!(both.paths(), vec!["force"]);
    assert!(
        !both.body["status"].as_str().unwrap().contains("  "),
        "{}",
        both.body
    );

    // Nothing changed: still one version, the edit still unfrozen.
    let versions = app.get("/shop/_version").await.body;
    assert_eq!(versions["project_version"], 1, "{versions}");
    assert_eq!(
        versions["unfrozen_changes"].as_array().map(Vec::len),
        Some(1)
    );

    // The freeze itself is refused with the same report.
    let refused = app.post("/shop/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(
        price_column(&refused.body["report"])["new_clients_reading_old_writes"]
            ["items_losing_a_value"],
        2
    );
    assert_eq!(app.get("/shop/_version").await.body["project_version"], 1);
    app.stop().await;
}

#[tokio::test]
async fn a_forced_freeze_goes_through_and_is_marked_forced() {
    let app = spawn_app().await;
    let ids = shop(&app).await;
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "integer"})),
    )
    .await;
    let forced = app.post("/shop/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    assert_eq!(forced.body["project_version"], 2);
    let versions = app.get("/shop/_version").await.body;
    assert_eq!(versions["versions"][0]["forced"], false, "{versions}");
    assert_eq!(versions["versions"][1]["forced"], true, "{versions}");
    assert_eq!(app.get("/shop/_version/2").await.body["forced"], true);
    // The loss is what the report said: 1.5 is null at version 2, 2.0 is 2.
    let lost = app
        .get(&format!("/shop/product/{}?version=2", ids[0]))
        .await;
    assert_eq!(lost.body["price"], Value::Null, "{}", lost.body);
    let kept = app
        .get(&format!("/shop/product/{}?version=2", ids[1]))
        .await;
    assert_eq!(kept.body["price"], 2, "{}", kept.body);

    // The next freeze, lossless against version 2, is judged against version 1 again, whose
    // clients still write the prices version 2 loses: the report says why, and what ends it.
    let mut v3 = product(json!({"type": "integer"}));
    v3["columns"]["colour"] = json!({"type": "string"});
    app.put("/shop/product/_blueprint", &v3).await;
    let refused = app.post("/shop/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let report = &refused.body["report"];
    let live = report["live_versions"].as_array().expect("live versions");
    let note = live[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("version 2 was frozen with force")
            && note.contains("/shop/_version/1/_retire"),
        "{report}"
    );
    assert_eq!(live[1]["verdict"], "lossless", "{report}");
    assert!(live[1].get("note").is_none(), "{report}");
    // Once version 1 is retired, the freeze goes through.
    let retired = app.post("/shop/_version/1/_retire", None).await;
    assert_eq!(retired.status, 200, "{}", retired.body);
    let frozen = app.post("/shop/_version", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    app.stop().await;
}

/// A report lists at most 1000 changes and 1000 columns of a version, the lossy ones first, and
/// counts the rest: its verdict still covers every column.
#[tokio::test]
async fn a_report_of_thousands_of_changed_columns_lists_a_bounded_part() {
    let app = spawn_app().await;
    let wide = |table: &str, ty: &str, comment: &str| {
        let columns: serde_json::Map<String, Value> = (0..501)
            .map(|n| {
                let column = json!({"type": "string", "comment": comment});
                (format!("c{n}"), column)
            })
            .collect();
        blueprint(table, ty, Value::Object(columns))
    };
    app.put_and_freeze("wide", "a", &wide("as", "a", "one"))
        .await;
    app.put_and_freeze("wide", "b", &wide("bs", "b", "one"))
        .await;
    // Every column's comment changes (lossless); one column of b becomes an integer (lossy).
    let put = app.put("/wide/a/_blueprint", &wide("as", "a", "two")).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let mut b = wide("bs", "b", "two");
    b["columns"]["c500"]["type"] = json!("integer");
    let put = app.put("/wide/b/_blueprint", &b).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let dry = app.post("/wide/_version?dry_run=true", None).await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    let live = live_version(&dry.body, 2);
    assert_ne!(live["verdict"], "lossless", "{live}");
    let columns = live["columns"].as_array().unwrap();
    assert_eq!(columns.len(), 1, "only the lossy column is listed");
    assert_eq!(columns[0]["column"], "c500");
    assert_eq!(live["columns_omitted"], 1001);
    assert_eq!(live["changes"].as_array().unwrap().len(), 1000);
    assert!(
        live["changes_omitted"].as_u64().unwrap() > 0,
        "{}",
        live["changes_omitted"]
    );
    app.stop().await;
}

/// A change put through `_project` that the freeze refuses leaves the working copy as it was:
/// nothing half-applied for a later forced freeze to take unseen.
#[tokio::test]
async fn a_project_put_the_freeze_refuses_changes_nothing() {
    let app = spawn_app().await;
    shop(&app).await;
    let before = app.get("/shop/_project").await.body;
    let lossy = json!({"product": product(json!({"type": "integer"}))});
    let one = app.put("/shop/_project", &lossy).await;
    assert_eq!(one.status, 409, "{}", one.body);
    assert_eq!(one.body["report"]["verdict"], "lossy", "{}", one.body);
    let all = app.put("/_project", &json!({"shop": lossy})).await;
    assert_eq!(all.status, 409, "{}", all.body);
    assert_eq!(app.get("/shop/_project").await.body, before);
    let versions = app.get("/shop/_version").await.body;
    assert_eq!(versions["unfrozen_changes"], json!([]), "{versions}");
    // A forced freeze now has nothing to take.
    let forced = app.post("/shop/_version?force=true", None).await;
    assert_ne!(forced.status, 200, "{}", forced.body);
    assert_eq!(app.get("/shop/_version").await.body["project_version"], 1);
    app.stop().await;
}

#[tokio::test]
async fn a_declared_conversion_keeps_the_values_it_can_and_the_report_counts_only_the_rest() {
    let app = spawn_app().await;
    let ids = shop(&app).await;
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "integer", "convert": "round"})),
    )
    .await;
    // Rounding still has no integer for a float beyond ±2^63, so the verdict stays lossy, but
    // none of the stored prices is lost any more (without the conversion, two were).
    let dry = app.post("/shop/_version?dry_run=true", None).await;
    assert_eq!(dry.body["verdict"], "lossy", "{}", dry.body);
    let price = price_column(&dry.body);
    assert_eq!(
        price["new_clients_reading_old_writes"]["items_losing_a_value"], 0,
        "{}",
        dry.body
    );
    assert!(
        price["new_clients_reading_old_writes"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("beyond the integer range")),
        "{}",
        dry.body
    );
    let frozen = app.post("/shop/_version?force=true", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    for (id, price) in ids.iter().zip([json!(2), json!(2), json!(7), Value::Null]) {
        let read = app.get(&format!("/shop/product/{id}?version=2")).await;
        assert_eq!(read.body["price"], price, "{}", read.body);
    }
    // Written at version 2, read by version 1 clients: the integer is a float.
    let id = Uuid::new_v4();
    let put = app
        .put(
            &format!("/shop/product/{id}"),
            &json!({"id": id, "project_version": 2, "name": "new", "price": 3}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let old = app.get(&format!("/shop/product/{id}?version=1")).await;
    assert_eq!(old.body["price"].as_f64(), Some(3.0), "{}", old.body);

    // An unknown conversion names the field.
    let bad = app
        .put(
            "/shop/product/_blueprint",
            &product(json!({"type": "integer", "convert": "guess"})),
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert!(
        bad.paths().iter().any(|p| p.contains("convert")),
        "{}",
        bad.body
    );
    app.stop().await;
}

#[tokio::test]
async fn a_conversion_that_always_has_a_value_is_lossless_and_freezes_without_force() {
    let app = spawn_app().await;
    let event = |at: Value| {
        json!({"postgresql": {"table": "events"}, "elasticsearch": {"type": "event"},
            "columns": {"at": at}})
    };
    app.put_and_freeze("cal", "event", &event(json!({"type": "datetime"})))
        .await;
    let id = Uuid::new_v4();
    let put = app
        .put(
            &format!("/cal/event/{id}"),
            &json!({"id": id, "project_version": 1, "at": "2024-05-01 18:30:00"}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    // Without a conversion, a datetime with a time of day has no date.
    app.put("/cal/event/_blueprint", &event(json!({"type": "date"})))
        .await;
    let plain = app.post("/cal/_version?dry_run=true", None).await;
    assert_eq!(plain.body["verdict"], "lossy", "{}", plain.body);
    assert_eq!(
        plain.body["live_versions"][0]["new_clients_reading_old_writes"]["items_losing_a_value"], 1,
        "{}",
        plain.body
    );
    app.put(
        "/cal/event/_blueprint",
        &event(json!({"type": "date", "convert": "truncate"})),
    )
    .await;
    let truncated = app.post("/cal/_version?dry_run=true", None).await;
    assert_eq!(truncated.body["verdict"], "lossless", "{}", truncated.body);
    assert_eq!(truncated.body["allowed"], true, "{}", truncated.body);
    let frozen = app.post("/cal/_version", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    let read = app.get(&format!("/cal/event/{id}?version=2")).await;
    assert_eq!(read.body["at"], "2024-05-01", "{}", read.body);
    app.stop().await;
}

#[tokio::test]
async fn the_compatibility_setting_lets_lossy_freezes_through_but_not_breaking_ones() {
    let app = spawn_app().await;
    shop(&app).await;
    assert_eq!(
        app.get("/shop/_settings").await.body,
        json!({"compatibility": "lossless"})
    );
    let set = app
        .put(
            "/shop/_settings",
            &json!({"compatibility": "lossy_allowed"}),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(
        app.get("/shop/_settings").await.body["compatibility"],
        "lossy_allowed"
    );
    // Lossy: goes through, not forced.
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "integer"})),
    )
    .await;
    let lossy = app.post("/shop/_version", None).await;
    assert_eq!(lossy.status, 200, "{}", lossy.body);
    assert_eq!(app.get("/shop/_version/2").await.body["forced"], false);

    // Breaking: a price that version 1 items may lack becomes required without a default.
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "integer", "nullable": false})),
    )
    .await;
    let dry = app.post("/shop/_version?dry_run=true", None).await;
    assert_eq!(dry.body["verdict"], "breaking", "{}", dry.body);
    let breaking = live_version(&dry.body, 1);
    // The item without a price and the two whose price has no integer are refused.
    assert_eq!(
        breaking["new_clients_reading_old_writes"]["items_refused"], 3,
        "{}",
        dry.body
    );
    let refused = app.post("/shop/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let forced = app.post("/shop/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    assert_eq!(app.get("/shop/_version/3").await.body["forced"], true);

    // Bad settings name the field; nothing changes.
    for (bad, path) in [
        (json!({"compatibility": "anything"}), "/compatibility"),
        (json!({}), "/compatibility"),
        (json!({"compatibility": "lossless", "other": 1}), "/other"),
        (json!([]), ""),
    ] {
        let answer = app.put("/shop/_settings", &bad).await;
        assert_eq!(answer.status, 422, "{bad}: {}", answer.body);
        assert_eq!(answer.paths(), vec![path.to_string()], "{}", answer.body);
    }
    assert_eq!(
        app.get("/shop/_settings").await.body["compatibility"],
        "lossy_allowed"
    );
    assert_eq!(app.get("/nothing/_settings").await.status, 404);
    assert_eq!(
        app.put("/nothing/_settings", &json!({"compatibility": "lossless"}))
            .await
            .status,
        404
    );
    app.stop().await;
}

/// An item counts once each way, in the totals and in every column alike: one another column
/// refuses (a required column added without a default) is refused, not losing its price.
/// A JSON column made unique holds each value in one index entry of at most 2000 bytes, which
/// the values stored before were never held to: the freeze counts them on the stored items, is
/// refused while one is larger (its item would not be in the new version's table), and goes
/// through when none is.
#[tokio::test]
async fn a_json_column_made_unique_is_refused_only_while_a_stored_value_outgrows_its_index() {
    let app = spawn_app().await;
    let note = |unique: bool| {
        json!({"postgresql": {"table": "notes"}, "elasticsearch": {"type": "note"},
            "columns": {"doc": {"type": "json", "unique": unique}}})
    };
    app.put_and_freeze("p", "note", &note(false)).await;
    let (small, big) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, doc) in [
        (small, json!({"k": 1})),
        (big, json!({"k": "x".repeat(3000)})),
    ] {
        let put = app
            .put(
                &format!("/p/note/{id}"),
                &json!({"project_version": 1, "doc": doc}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    let answer = app.put("/p/note/_blueprint", &note(true)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let refused = app.post("/p/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let version = live_version(&refused.body["report"], 1);
    assert_eq!(version["verdict"], "breaking", "{}", refused.body);
    assert_eq!(
        version["new_clients_reading_old_writes"]["items_refused"], 1,
        "{}",
        refused.body
    );
    let gone = app.delete(&format!("/p/note/{big}")).await;
    assert_eq!(gone.status, 200, "{}", gone.body);
    let frozen = app.post("/p/_version", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    app.stop().await;
}

#[tokio::test]
async fn an_item_refused_by_one_column_is_not_counted_losing_a_value_in_another() {
    let app = spawn_app().await;
    shop(&app).await;
    let mut edited = product(json!({"type": "integer"}));
    edited["columns"]["sku"] = json!({"type": "string", "nullable": false});
    app.put("/shop/product/_blueprint", &edited).await;
    let dry = app.post("/shop/_version?dry_run=true", None).await.body;
    assert_eq!(
        dry["live_versions"][0]["new_clients_reading_old_writes"],
        json!({"items_losing_a_value": 0, "items_refused": 4, "items_refused_as_duplicates": 0,
                "items_refused_for_row_size": 0}),
        "{dry}"
    );
    let price = &price_column(&dry)["new_clients_reading_old_writes"];
    assert_eq!(price["verdict"], "lossy", "{dry}");
    assert_eq!(
        (&price["items_losing_a_value"], &price["items_refused"]),
        (&json!(0), &json!(0)),
        "{dry}"
    );
    app.stop().await;
}

/// Items written at a retired version have no clients left, so they take no part in the verdict,
/// but the freeze's back-fill moves them into the new version: the report counts them apart.
#[tokio::test]
async fn items_stored_at_a_retired_version_are_counted_as_the_new_version_would_receive_them() {
    let app = spawn_app().await;
    shop(&app).await;
    let mut with_stock = product(json!({"type": "float"}));
    with_stock["columns"]["stock"] = json!({"type": "integer"});
    app.put("/shop/product/_blueprint", &with_stock).await;
    assert_eq!(app.post("/shop/_version", None).await.status, 200);
    let id = Uuid::new_v4();
    let put = app
        .put(
            &format!("/shop/product/{id}"),
            &json!({"id": id, "project_version": 2, "name": "new", "price": 3.0}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(app.post("/shop/_version/1/_retire", None).await.status, 200);

    // The price becomes a required integer.
    with_stock["columns"]["price"] = json!({"type": "integer", "nullable": false});
    app.put("/shop/product/_blueprint", &with_stock).await;
    let dry = app.post("/shop/_version?dry_run=true", None).await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    let report = &dry.body;
    assert_eq!(report["items"], 5, "{report}");
    let live = report["live_versions"].as_array().expect("live versions");
    assert_eq!(live.len(), 1, "{report}");
    assert_eq!(
        live[0]["new_clients_reading_old_writes"],
        json!({"items_losing_a_value": 0, "items_refused": 0, "items_refused_as_duplicates": 0,
                "items_refused_for_row_size": 0}),
        "{report}"
    );
    // Version 1's four items: 1.5 and 7.25 lose their price, so with the missing one they are
    // refused, and counted as refused only (an item counts once each way).
    assert_eq!(
        report["retired_versions"],
        json!([{"version": 1, "items": 4, "changes": report["retired_versions"][0]["changes"],
            "new_clients_reading_old_writes":
                {"items_losing_a_value": 0, "items_refused": 3, "items_refused_as_duplicates": 0,
                "items_refused_for_row_size": 0}}]),
        "{report}"
    );
    assert!(
        report["retired_versions"][0]["changes"]
            .as_array()
            .is_some_and(|c| c.len() == 3), // price's type and nullability, and stock
        "{report}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_version_shows_its_last_write_and_how_many_writes_used_it() {
    let app = spawn_app().await;
    shop(&app).await;
    app.put(
        "/shop/product/_blueprint",
        &json!({"postgresql": {"table": "products"}, "elasticsearch": {"type": "product"},
            "columns": {"name": {"type": "string"}, "price": {"type": "float"},
                "note": {"type": "text"}}}),
    )
    .await;
    assert_eq!(app.post("/shop/_version", None).await.status, 200);
    let one = app.get("/shop/_version/1").await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.body["project_version"], 1);
    assert_eq!(one.body["usage"]["writes_last_hour"], 4, "{}", one.body);
    assert_eq!(one.body["usage"]["writes_last_7d"], 4, "{}", one.body);
    assert!(
        one.body["usage"]["last_write_at"].is_string(),
        "{}",
        one.body
    );
    let two = app.get("/shop/_version/2").await.body;
    assert_eq!(two["usage"]["writes_last_hour"], 0, "{two}");
    assert_eq!(two["usage"]["last_write_at"], Value::Null, "{two}");
    assert_eq!(app.get("/shop/_version/3").await.status, 404);
    assert_eq!(app.get("/shop/_version/three").await.status, 400);
    app.stop().await;
}

#[tokio::test]
async fn the_diff_of_two_versions_gives_each_changed_column_a_verdict_each_way() {
    let app = spawn_app().await;
    shop(&app).await;
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "integer"})),
    )
    .await;
    app.post("/shop/_version?force=true", None).await;
    let diff = app.get("/shop/_diff?from=1&to=2").await;
    assert_eq!(diff.status, 200, "{}", diff.body);
    assert_eq!(diff.body["changes"][0]["option"], "type", "{}", diff.body);
    let price = &diff.body["columns"][0];
    assert_eq!(price["column"], "price");
    assert_eq!(
        price["clients_of_from_reading_writes_of_to"]["verdict"],
        "lossless"
    );
    assert_eq!(
        price["clients_of_to_reading_writes_of_from"]["verdict"],
        "lossy"
    );
    assert_eq!(app.get("/shop/_diff?from=1&to=9").await.status, 404);
    assert_eq!(app.get("/shop/_diff?from=1").await.status, 400);
    assert_eq!(app.get("/shop/_diff?from=x&to=2").await.status, 400);
    app.stop().await;
}

#[tokio::test]
async fn a_dry_run_shows_the_ddl_and_mappings_each_store_would_run() {
    let db = TestDatabase::create().await;
    let settings = db.settings();
    let app = spawn_app_with(|s| s.postgresql = Some(settings)).await;
    shop(&app).await;
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "float", "nullable": true})),
    )
    .await;
    app.put(
        "/shop/review/_blueprint",
        &json!({"postgresql": {"table": "reviews"}, "elasticsearch": {"type": "review"},
            "columns": {"stars": {"type": "integer"}}}),
    )
    .await;
    let dry = app.post("/shop/_version?dry_run=true", None).await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(dry.body["verdict"], "lossless", "{}", dry.body);
    let statements = dry.body["stores"]["postgresql"]["statements"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", dry.body));
    let sql = statements
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(";\n");
    assert!(sql.contains("CREATE SCHEMA"), "{sql}");
    assert!(sql.contains("\"reviews\""), "{sql}");
    assert!(sql.contains("\"stars\""), "{sql}");
    // The preview created nothing.
    let mut conn = db.sql().await;
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'reviews'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("count");
    assert_eq!(schemas, 0);
    drop(conn);
    app.stop().await;
    db.drop().await;
}

/// A column made `nullable: false` with a default is lossless: the report counts on nulls taking
/// the default, and so does every store. An item stored with no price reads 9.5 at version 2 and
/// reaches PostgreSQL's version-2 table with it (the back-fill), as does a version-1 write with a
/// null price; no store refuses anything.
#[tokio::test]
async fn a_null_moved_into_a_column_that_allows_none_takes_its_default_in_every_store() {
    let db = TestDatabase::create().await;
    let settings = db.settings();
    let app = spawn_app_with(|s| s.postgresql = Some(settings)).await;
    let ids = shop(&app).await;
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "float", "nullable": false, "default": 9.5})),
    )
    .await;
    let report = app.post("/shop/_version?dry_run=true", None).await;
    assert_eq!(report.body["verdict"], "lossless", "{}", report.body);
    let frozen = app.post("/shop/_version", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    let read = app
        .get(&format!("/shop/product/{}?version=2", ids[3]))
        .await;
    assert_eq!(read.body["price"], 9.5, "{}", read.body);
    // A version-1 write with no price, projected into both versions' tables.
    let id = Uuid::new_v4();
    app.put_projected(
        &format!("/shop/product/{id}?wait=true"),
        &json!({"id": id, "project_version": 1, "name": "new", "price": null}),
    )
    .await;
    let mut sql = db.sql().await;
    let mut prices: Vec<(Uuid, f32)> = Vec::new();
    for _ in 0..300 {
        prices = sqlx::query_as("SELECT id, price FROM shop_v2.products")
            .fetch_all(&mut sql)
            .await
            .unwrap();
        if prices.len() == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for missing in [ids[3], id] {
        assert!(prices.contains(&(missing, 9.5)), "{missing} in {prices:?}");
    }
    assert_eq!(prices.len(), 5, "{prices:?}");
    let letters = app.get("/_dead_letters").await.body;
    assert_eq!(letters["dead_letters"], json!([]), "{letters}");
    app.stop().await;
}

/// After a forced breaking freeze, an item with no value for a column the new version requires is
/// not in that version, in every store alike: PostgreSQL, Elasticsearch and the RocksDB keyspace
/// hold no copy (one an earlier write left is removed), a read there is a 404 naming the column,
/// the version's change feed shows it deleted and nothing becomes a dead letter. The item stays in
/// the version it was written at, and a value brings it back.
#[tokio::test]
async fn an_item_a_forced_breaking_freeze_cannot_hold_is_in_no_store_of_the_new_version() {
    left_out_of_the_new_version_in_every_store(false).await;
}

/// The same with the catalog and the journal in PostgreSQL (cluster mode), whose journal carries
/// the tasks that leave the item out.
#[tokio::test]
async fn in_cluster_mode_an_item_a_forced_breaking_freeze_cannot_hold_is_in_no_store_of_it() {
    left_out_of_the_new_version_in_every_store(true).await;
}

async fn left_out_of_the_new_version_in_every_store(cluster: bool) {
    use crate::elasticsearch::{unique_prefix, Es};
    let db = TestDatabase::create().await;
    let pg = db.settings();
    let storage_url = pg.url.clone();
    let es = Es::new().await;
    let prefix = unique_prefix();
    let es_settings = dstore::config::ElasticsearchSettings {
        url: es.url.clone().into(),
        index_prefix: prefix.clone(),
        ..Default::default()
    };
    let app = spawn_app_with(move |s| {
        s.postgresql = Some(pg);
        s.elasticsearch = Some(es_settings);
        if cluster {
            s.storage.backend = dstore::config::Backend::Postgresql;
            s.storage.url = storage_url;
        }
    })
    .await;
    let ids = shop(&app).await;
    app.put(
        "/shop/product/_blueprint",
        &product(json!({"type": "float", "nullable": false})),
    )
    .await;
    let dry = app.post("/shop/_version?dry_run=true", None).await;
    assert_eq!(dry.body["verdict"], "breaking", "{}", dry.body);
    let counts = &price_column(&dry.body)["new_clients_reading_old_writes"];
    assert_eq!(counts["items_refused"], 1, "{}", dry.body);
    let frozen = app.post("/shop/_version?force=true", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let versions = app.get("/shop/_version").await.body;
        if versions["versions"][1]["backfill"]["finished"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{versions}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let left_out = || async {
        let metrics = app.metrics().await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("dstore_items_left_out_of_a_version_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no left-out count in {metrics}"))
    };
    let before = left_out().await;
    // The first item, back-filled into version 2, is written again without a price; a new one
    // with a price. Every store settles both without refusing anything.
    let new = Uuid::new_v4();
    for (id, price) in [(ids[0], Value::Null), (new, json!(4.0))] {
        let put = app
            .put_projected(
                &format!("/shop/product/{id}?wait=true"),
                &json!({"id": id, "project_version": 1, "name": "again", "price": price}),
            )
            .await;
        assert_eq!(put.body["projected"], true, "{}", put.body);
        let absent = if price.is_null() {
            json!([2])
        } else {
            Value::Null
        };
        assert_eq!(put.body["not_in_versions"], absent, "{}", put.body);
    }
    // A `_bulk` answers it for each operation too.
    let (priceless, priced) = (Uuid::new_v4(), Uuid::new_v4());
    let body = [
        json!({"put": {"blueprint": "product", "id": priceless}}),
        json!({"project_version": 1, "name": "bulk", "price": null}),
        json!({"put": {"blueprint": "product", "id": priced}}),
        json!({"project_version": 1, "name": "bulk", "price": 1.0}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let bulk = app
        .send(reqwest::Method::POST, "/shop/_bulk?wait=true", Some(body))
        .await;
    assert_eq!(bulk.body["projected"], true, "{}", bulk.body);
    let items = &bulk.body["items"];
    assert_eq!(
        items[0]["put"]["not_in_versions"],
        json!([2]),
        "{}",
        bulk.body
    );
    assert!(
        items[1]["put"].get("not_in_versions").is_none(),
        "{}",
        bulk.body
    );
    // Counted for operators (other tests of this process may add theirs).
    assert!(left_out().await >= before + 2);
    let held = [ids[1], ids[2], new, priced];
    let absent = [ids[0], ids[3], priceless];
    let mut sql = db.sql().await;
    let mut in_v2: Vec<(Uuid,)> = sqlx::query_as("SELECT id FROM shop_v2.products")
        .fetch_all(&mut sql)
        .await
        .unwrap();
    let mut expected: Vec<(Uuid,)> = held.iter().map(|id| (*id,)).collect();
    expected.sort();
    in_v2.sort();
    assert_eq!(in_v2, expected);
    let in_v1: Vec<(Uuid,)> = sqlx::query_as("SELECT id FROM shop_v1.products")
        .fetch_all(&mut sql)
        .await
        .unwrap();
    assert_eq!(in_v1.len(), 7, "{in_v1:?}");
    let index = format!("{prefix}shop-v2-product");
    let all: Vec<String> = held.iter().chain(&absent).map(Uuid::to_string).collect();
    let docs = es.mget(&index, &all).await;
    let found: Vec<bool> = (0..all.len())
        .map(|i| docs["docs"][i]["found"] == true)
        .collect();
    assert_eq!(
        found,
        [true, true, true, true, false, false, false],
        "{docs}"
    );
    // Cluster mode keeps no local keyspaces (docs/cluster.md).
    let keyspaces = app.rocksdb.clone();
    assert_eq!(keyspaces.is_some(), !cluster);
    let (shop_name, product_name) = (
        dstore::blueprint::Ident::parse("shop").unwrap(),
        dstore::blueprint::Ident::parse("product").unwrap(),
    );
    for (id, kept) in held
        .iter()
        .map(|id| (id, true))
        .chain(absent.iter().map(|id| (id, false)))
    {
        if let Some(keyspaces) = &keyspaces {
            let doc = keyspaces.get(&shop_name, 2, &product_name, id);
            assert_eq!(doc.is_some(), kept, "{id} in keyspace 2: {doc:?}");
            assert!(keyspaces.get(&shop_name, 1, &product_name, id).is_some());
        }
        let read = app.get(&format!("/shop/product/{id}?version=2")).await;
        if kept {
            assert_eq!(read.status, 200, "{}", read.body);
        } else {
            assert_eq!(read.status, 404, "{}", read.body);
            let why = read.body["status"].as_str().unwrap_or_default();
            assert!(
                why.contains("not in version 2")
                    && why.contains("\"price\"")
                    && why.contains("?version=1"),
                "{why}"
            );
            let old = app.get(&format!("/shop/product/{id}?version=1")).await;
            assert_eq!(old.status, 200, "{}", old.body);
        }
    }
    let feed = app.get("/shop/_changes?version=2").await.body;
    for change in feed["results"].as_array().expect("results") {
        let id: Uuid = change["id"].as_str().unwrap().parse().unwrap();
        let op = if absent.contains(&id) {
            "delete"
        } else {
            "put"
        };
        assert_eq!(change["op"], op, "{feed}");
    }
    let letters = app.get("/_dead_letters").await.body;
    assert_eq!(letters["dead_letters"], json!([]), "{letters}");

    // Given a price again, the item is back in version 2.
    app.put_projected(
        &format!("/shop/product/{}?wait=true", ids[0]),
        &json!({"id": ids[0], "project_version": 1, "name": "priced", "price": 5.0}),
    )
    .await;
    let read = app
        .get(&format!("/shop/product/{}?version=2", ids[0]))
        .await;
    assert_eq!(read.body["price"], 5.0, "{}", read.body);
    let (back,): (f32,) = sqlx::query_as("SELECT price FROM shop_v2.products WHERE id = $1")
        .bind(ids[0])
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(back, 5.0);
    if let Some(keyspaces) = &keyspaces {
        assert!(keyspaces
            .get(&shop_name, 2, &product_name, &ids[0])
            .is_some());
    }
    app.stop().await;
    es.clean_up(&prefix).await;
}

/// A column made unique is counted on the stored items: one whose value another item holds is one
/// PostgreSQL's unique index refuses, so the freeze is breaking and takes `?force=true`, and a
/// forced one leaves exactly the counted items out of the new version's table. Nulls never
/// collide; floats collide as PostgreSQL's `REAL` holds them; a column already unique at the
/// newest version is not counted again; with no duplicates the freeze goes through; a new unique
/// column with a default gives every item the same value.
#[tokio::test]
async fn a_column_made_unique_over_duplicates_is_counted_and_takes_force() {
    let db = TestDatabase::create().await;
    let settings = db.settings();
    let app = spawn_app_with(|s| s.postgresql = Some(settings)).await;
    let coupon = |code: Value, rate: Value| {
        blueprint("coupons", "coupon", json!({"code": code, "rate": rate}))
    };
    // Codes of 100 characters at most: a unique text column holds 2000 bytes, so making one
    // unique loses nothing.
    let short = json!({"max_length": 100});
    let (string, float) = (
        json!({"type": "string", "validation": short}),
        json!({"type": "float"}),
    );
    let unique = |ty: &str| match ty {
        "string" => json!({"type": ty, "unique": true, "validation": short}),
        _ => json!({"type": ty, "unique": true}),
    };
    app.put_and_freeze("deals", "coupon", &coupon(string.clone(), float.clone()))
        .await;
    // 0.30000001192092896 is 0.3 as a 32-bit float.
    let rows = [
        (json!("A1"), json!(0.1)),
        (json!("A1"), json!(0.2)),
        (json!("B2"), json!(0.30000001192092896)),
        (Value::Null, json!(0.3)),
        (Value::Null, json!(0.4)),
    ];
    let ids = put_in_order(
        &app,
        "/deals/coupon",
        rows.map(|(code, rate)| json!({"code": code, "rate": rate})),
    )
    .await;
    // `code` made unique: the second A1 is refused, the two nulls are not.
    app.put(
        "/deals/coupon/_blueprint",
        &coupon(unique("string"), float.clone()),
    )
    .await;
    let dry = app.post("/deals/_version?dry_run=true", None).await.body;
    assert_eq!(dry["verdict"], "breaking", "{dry}");
    assert_eq!(dry["allowed"], false, "{dry}");
    let code = &column(&dry["live_versions"][0], "code")["new_clients_reading_old_writes"];
    assert_eq!(code["verdict"], "breaking", "{dry}");
    assert_eq!(code["items_refused"], 1, "{dry}");
    assert_eq!(code["items_refused_as_duplicates"], 1, "{dry}");
    assert!(
        code["reason"]
            .as_str()
            .is_some_and(|r| r.contains("1 stored items hold a value")),
        "{dry}"
    );
    let totals = &dry["live_versions"][0]["new_clients_reading_old_writes"];
    assert_eq!(totals["items_refused_as_duplicates"], 1, "{dry}");
    let refused = app.post("/deals/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(app.get("/deals/_version").await.body["project_version"], 1);
    let forced = app.post("/deals/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    let versions = app.get("/deals/_version").await.body;
    assert_eq!(versions["versions"][1]["forced"], true, "{versions}");
    // The back-fill brings four of the five items into PostgreSQL's version-2 table.
    let mut sql = db.sql().await;
    let mut rows = 0;
    for _ in 0..300 {
        let versions = app.get("/deals/_version").await.body;
        rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM deals_v2.coupons")
            .fetch_one(&mut sql)
            .await
            .unwrap_or_default();
        if rows == 4 && versions["versions"][1]["backfill"]["finished"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(rows, 4);

    // `rate` made unique too: `code`, unique as it is at version 2, is not counted again; 0.3
    // and its 32-bit twin are one value.
    app.put(
        "/deals/coupon/_blueprint",
        &coupon(unique("string"), unique("float")),
    )
    .await;
    let dry = app.post("/deals/_version?dry_run=true", None).await.body;
    assert_eq!(dry["verdict"], "breaking", "{dry}");
    let rate = &column(&dry["live_versions"][0], "rate")["new_clients_reading_old_writes"];
    assert_eq!(rate["items_refused_as_duplicates"], 1, "{dry}");
    let code = &column(&dry["live_versions"][0], "code")["new_clients_reading_old_writes"];
    assert_eq!(code["items_refused_as_duplicates"], 0, "{dry}");
    assert_eq!(code["verdict"], "lossless", "{dry}");

    // Without the twin, nothing collides: the freeze goes through unforced.
    let deleted = app.delete(&format!("/deals/coupon/{}", ids[2])).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let frozen = app.post("/deals/_version", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    assert_eq!(frozen.body["project_version"], 3, "{}", frozen.body);
    assert_eq!(
        app.get("/deals/_version").await.body["versions"][2]["forced"],
        false
    );

    // A new unique column with a default: of the four items, the second A1 is refused by `code`
    // already and takes no place; the other three would all hold the default.
    let mut batch = coupon(unique("string"), unique("float"));
    batch["columns"]["batch"] = json!({"type": "string", "unique": true, "default": "x"});
    app.put("/deals/coupon/_blueprint", &batch).await;
    let refused = app.post("/deals/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let report = &refused.body["report"];
    let batch = column(&live_version(report, 1), "batch");
    assert_eq!(
        batch["new_clients_reading_old_writes"]["items_refused_as_duplicates"], 2,
        "{report}"
    );
    app.stop().await;
}

/// Uniqueness is judged against the newest live version: a column unique at version 1, not at
/// version 2 and unique again in the working copy is counted (version 2's index took both A1s),
/// and the duplicates stored at version 1, whose own column never changed, make it breaking.
/// Once version 2 is retired, version 1's index already refuses what the new one would: the
/// freeze goes through.
#[tokio::test]
async fn a_column_unique_again_is_judged_against_the_newest_live_version() {
    let app = spawn_app().await;
    let coupon = |unique: bool| {
        blueprint(
            "coupons",
            "coupon",
            json!({"code": {"type": "string", "unique": unique, "validation": {"max_length": 100}}}),
        )
    };
    app.put_and_freeze("deals", "coupon", &coupon(true)).await;
    for _ in 0..2 {
        let id = Uuid::new_v4();
        let put = app
            .put(
                &format!("/deals/coupon/{id}"),
                &json!({"id": id, "project_version": 1, "code": "A1"}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    app.put("/deals/coupon/_blueprint", &coupon(false)).await;
    // Unique no more while version 1, unique, is live: its index would refuse what new clients
    // write with a value another item holds.
    let refused = app.post("/deals/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let column = &live_version(&refused.body["report"], 1)["columns"][0];
    let reason = &column["old_clients_reading_new_writes"]["reason"];
    assert!(
        reason
            .as_str()
            .unwrap()
            .contains("unique in the old version"),
        "{column}"
    );
    let forced = app.post("/deals/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    app.put("/deals/coupon/_blueprint", &coupon(true)).await;
    let refused = app.post("/deals/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let report = &refused.body["report"];
    let first = &report["live_versions"][0];
    assert_eq!(first["version"], 1, "{report}");
    assert_eq!(first["verdict"], "breaking", "{report}");
    assert_eq!(
        first["new_clients_reading_old_writes"]["items_refused_as_duplicates"], 1,
        "{report}"
    );
    let retired = app.post("/deals/_version/2/_retire", None).await;
    assert_eq!(retired.status, 200, "{}", retired.body);
    let frozen = app.post("/deals/_version", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    app.stop().await;
}

/// An item the newest live version left out (a null its column allowed none) and the working copy
/// lets in never met that version's unique index: it is counted against a unique column even where
/// that column does not change. Two items both in that version's table are not counted: its index
/// refuses one of them already.
#[tokio::test]
async fn an_item_let_in_again_is_counted_against_an_unchanged_unique_column() {
    let app = spawn_app().await;
    let person = |unique: bool, age: Value| {
        blueprint(
            "people",
            "person",
            json!({
                "code": {"type": "string", "unique": unique, "validation": {"max_length": 100}},
                "age": age
            }),
        )
    };
    app.put_and_freeze("crm", "person", &person(false, json!({"type": "integer"})))
        .await;
    // In the order the count reads them: an A1 left out of version 2's table (no age), then two
    // in it, of which version 2's index refuses the second already; of the two C3s, likewise.
    let rows = [
        ("A1", Value::Null),
        ("A1", json!(1)),
        ("A1", json!(2)),
        ("C3", json!(2)),
        ("C3", json!(3)),
    ];
    put_in_order(
        &app,
        "/crm/person",
        rows.map(|(code, age)| json!({"code": code, "age": age})),
    )
    .await;
    // Version 2: `code` unique and `age` required (forced: it leaves an item out, and a C3).
    app.put(
        "/crm/person/_blueprint",
        &person(true, json!({"type": "integer", "nullable": false})),
    )
    .await;
    let forced = app.post("/crm/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    // The working copy gives `age` a default: the A1 without one comes in, beside the other A1.
    app.put(
        "/crm/person/_blueprint",
        &person(
            true,
            json!({"type": "integer", "nullable": false, "default": 0}),
        ),
    )
    .await;
    let refused = app.post("/crm/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let report = &refused.body["report"];
    assert_eq!(report["verdict"], "breaking", "{report}");
    let first = live_version(report, 1);
    assert_eq!(first["verdict"], "breaking", "{report}");
    // The A1 let in takes the value first: the A1 in version 2's table is refused, newly; the
    // third was refused already.
    assert_eq!(
        first["new_clients_reading_old_writes"]["items_refused_as_duplicates"], 1,
        "{report}"
    );
    // Version 1's own pair shows `code` made unique: the duplicate is its column's.
    let code = column(&first, "code");
    assert_eq!(
        code["new_clients_reading_old_writes"]["items_refused_as_duplicates"], 1,
        "{report}"
    );
    assert_eq!(
        code["new_clients_reading_old_writes"]["verdict"], "breaking",
        "{report}"
    );
    let forced = app.post("/crm/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    app.stop().await;
}

/// A required text that is indexed no more lets in the items whose long text the index could not
/// hold (they were left out, with a null): their unique values are counted too.
#[tokio::test]
async fn items_an_index_left_out_are_counted_against_the_unique_columns_once_let_in() {
    let app = spawn_app().await;
    let person = |indexed: bool, unique: bool| {
        blueprint(
            "people",
            "person",
            json!({
                "bio": {"type": "text", "nullable": false, "index": indexed},
                "email": {"type": "string", "unique": unique, "validation": {"max_length": 100}}
            }),
        )
    };
    app.put_and_freeze("crm", "person", &person(false, false))
        .await;
    // The long bio, read first, is left out of version 2's table; the short one is in.
    let bios = ["x".repeat(2500), "short".into()];
    put_in_order(
        &app,
        "/crm/person",
        bios.map(|bio| json!({"bio": bio, "email": "e"})),
    )
    .await;
    app.put("/crm/person/_blueprint", &person(true, true)).await;
    let forced = app.post("/crm/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    app.put("/crm/person/_blueprint", &person(false, true))
        .await;
    let dry = app.post("/crm/_version?dry_run=true", None).await.body;
    let first = live_version(&dry, 1);
    assert_eq!(
        first["new_clients_reading_old_writes"]["items_refused_as_duplicates"], 1,
        "{dry}"
    );
    app.stop().await;
}

/// An item the new version leaves out (a column made required) frees its unique values: an item
/// the newest version's index refused for one of them comes in, and its other value takes the
/// place of an item that was in, which is counted.
#[tokio::test]
async fn an_item_left_out_frees_values_that_refuse_another_item_newly() {
    let app = spawn_app().await;
    let pair = |required: bool| {
        blueprint(
            "pairs",
            "pair",
            json!({
                "a": {"type": "integer", "unique": true},
                "b": {"type": "integer", "unique": true},
                "c": {"type": "integer", "nullable": !required}
            }),
        )
    };
    app.put_and_freeze("duo", "pair", &pair(false)).await;
    // Version 1's indexes take the first and the third; the second is refused (its `a`).
    let rows = [
        (json!(1), json!(1), Value::Null),
        (json!(1), json!(2), json!(5)),
        (Value::Null, json!(2), json!(6)),
    ];
    put_in_order(
        &app,
        "/duo/pair",
        rows.map(|(a, b, c)| json!({"a": a, "b": b, "c": c})),
    )
    .await;
    // `c` required: the first is left out, the second comes in and refuses the third (its `b`).
    app.put("/duo/pair/_blueprint", &pair(true)).await;
    let dry = app.post("/duo/_version?dry_run=true", None).await.body;
    let totals = &live_version(&dry, 1)["new_clients_reading_old_writes"];
    assert_eq!(totals["items_refused_as_duplicates"], 1, "{dry}");
    assert_eq!(totals["items_refused"], 2, "{dry}");
    app.stop().await;
}

/// A unique column that stops being unique lets in the items its index refused: their values in
/// another unique column, unchanged, never met its index, so an item they take a value from is
/// refused newly, and counted.
#[tokio::test]
async fn items_a_unique_column_let_in_are_counted_against_the_other_unique_columns() {
    let app = spawn_app().await;
    let member = |badge_unique: bool| {
        blueprint(
            "members",
            "member",
            json!({
                "badge": {"type": "integer", "unique": badge_unique},
                "email": {"type": "string", "unique": true, "validation": {"max_length": 100}}
            }),
        )
    };
    app.put_and_freeze("club", "member", &member(true)).await;
    // Version 1's indexes refuse the second item (its badge); the third is in.
    let rows = [(1, "a"), (1, "b"), (2, "b")];
    put_in_order(
        &app,
        "/club/member",
        rows.map(|(badge, email)| json!({"badge": badge, "email": email})),
    )
    .await;
    // Badges unique no more: the second item comes in with "b", and the third is refused.
    app.put("/club/member/_blueprint", &member(false)).await;
    let refused = app.post("/club/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let report = &refused.body["report"];
    assert_eq!(
        report["live_versions"][0]["new_clients_reading_old_writes"]["items_refused_as_duplicates"],
        1,
        "{report}"
    );
    app.stop().await;
}

/// A blueprint the newest live version does not have (the version that had it is retired) is
/// counted on the items an older version holds: its unique column never had an index.
#[tokio::test]
async fn a_blueprint_the_newest_live_version_lacks_is_counted_on_the_items_it_holds() {
    let app = spawn_app().await;
    let coupon = |unique: bool| {
        blueprint(
            "coupons",
            "coupon",
            json!({"code": {"type": "string", "unique": unique, "validation": {"max_length": 100}}}),
        )
    };
    app.put_and_freeze("deals", "article", &crate::helpers::article())
        .await;
    assert_eq!(
        app.put_and_freeze("deals", "coupon", &coupon(false)).await,
        2
    );
    for _ in 0..2 {
        let id = Uuid::new_v4();
        let put = app
            .put(
                &format!("/deals/coupon/{id}"),
                &json!({"id": id, "project_version": 2, "code": "A1"}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    let retired = app.post("/deals/_version/2/_retire", None).await;
    assert_eq!(retired.status, 200, "{}", retired.body);
    app.put("/deals/coupon/_blueprint", &coupon(true)).await;
    let refused = app.post("/deals/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let report = &refused.body["report"];
    assert_eq!(
        report["retired_versions"][0]["new_clients_reading_old_writes"]
            ["items_refused_as_duplicates"],
        1,
        "{report}"
    );
    app.stop().await;
}

/// An indexed or unique text holds at most 2000 bytes: a column becoming one loses longer texts,
/// which the verdict says and the report counts for the version that stored them (a read at the
/// new version shows the null).
#[tokio::test]
async fn a_text_column_becoming_indexed_loses_the_texts_an_index_cannot_hold() {
    let app = spawn_app().await;
    let note = |column: Value| blueprint("notes", "note", json!({"body": column}));
    app.put_and_freeze("pad", "note", &note(json!({"type": "text"})))
        .await;
    let mut ids = Vec::new();
    for body in ["x".repeat(2500), "short".into()] {
        let id = Uuid::new_v4();
        let put = app
            .put(
                &format!("/pad/note/{id}"),
                &json!({"id": id, "project_version": 1, "body": body}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        ids.push(id);
    }
    app.put(
        "/pad/note/_blueprint",
        &note(json!({"type": "text", "index": true})),
    )
    .await;
    let dry = app.post("/pad/_version?dry_run=true", None).await.body;
    assert_eq!(dry["verdict"], "lossy", "{dry}");
    let body = dry["live_versions"][0]["columns"][0]["new_clients_reading_old_writes"].clone();
    assert_eq!(body["verdict"], "lossy", "{dry}");
    assert_eq!(body["items_losing_a_value"], 1, "{dry}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("texts over 2000 bytes")),
        "{dry}"
    );
    // A column whose texts are 500 characters at most loses nothing.
    app.put(
        "/pad/note/_blueprint",
        &note(json!({"type": "text", "validation": {"max_length": 500}})),
    )
    .await;
    let forced = app.post("/pad/_version?force=true", None).await;
    assert_eq!(forced.status, 200, "{}", forced.body);
    app.put(
        "/pad/note/_blueprint",
        &note(json!({"type": "text", "index": true, "validation": {"max_length": 500}})),
    )
    .await;
    let dry = app.post("/pad/_version?dry_run=true", None).await.body;
    let newest = live_version(&dry, 2);
    assert_eq!(newest["verdict"], "lossless", "{dry}");
    app.stop().await;
}

/// A wide blueprint whose values grow (700 integers become texts) can make a row PostgreSQL
/// refuses ("row is too big"): the report counts the items whose row would not fit, and the freeze
/// is breaking; an item whose row still fits is not counted. An item whose row fits no version
/// takes no place in a unique index.
#[tokio::test]
async fn items_whose_row_would_outgrow_postgresql_are_counted_as_refused() {
    let app = spawn_app().await;
    let wide = |ty: &str| {
        let mut columns: serde_json::Map<String, Value> = (0..700)
            .map(|i| (format!("c{i}"), json!({"type": ty})))
            .collect();
        // Both items hold one code: unique from version 2 on, where one of them does not fit.
        let unique = ty == "string";
        columns.insert(
            "code".into(),
            json!({"type": "string", "unique": unique, "validation": {"max_length": 100}}),
        );
        json!({
            "postgresql": {"table": "wide"},
            "elasticsearch": {"type": "wide"},
            "columns": columns
        })
    };
    app.put_and_freeze("sheet", "row", &wide("integer")).await;
    // The item whose row will not fit is read first.
    let rows = [i32::MIN, 1].map(|value| {
        let mut item: serde_json::Map<String, Value> =
            (0..700).map(|i| (format!("c{i}"), json!(value))).collect();
        item.insert("code".into(), json!("A1"));
        Value::Object(item)
    });
    put_in_order(&app, "/sheet/row", rows).await;
    app.put("/sheet/row/_blueprint", &wide("string")).await;
    let refused = app.post("/sheet/_version", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let report = &refused.body["report"];
    assert_eq!(report["verdict"], "breaking", "{report}");
    let totals = &report["live_versions"][0]["new_clients_reading_old_writes"];
    assert_eq!(totals["items_refused_for_row_size"], 1, "{report}");
    assert_eq!(totals["items_refused"], 1, "{report}");
    assert_eq!(totals["items_refused_as_duplicates"], 0, "{report}");
    // Forced, then the blueprint changes again: the row version 2 refuses already is not the new
    // freeze's doing, nor does it take its code from the other item; a dry run and the freeze
    // agree.
    assert_eq!(
        app.post("/sheet/_version?force=true", None).await.status,
        200
    );
    // (Version 1's clients would lose the texts version 2 writes: retired, it no longer judges.)
    app.post("/sheet/_version/1/_retire", None).await;
    let mut more = wide("string");
    more["columns"]["note"] = json!({"type": "string"});
    app.put("/sheet/row/_blueprint", &more).await;
    let dry = app.post("/sheet/_version?dry_run=true", None).await.body;
    assert_eq!(dry["allowed"], true, "{dry}");
    let frozen = app.post("/sheet/_version", None).await;
    assert_eq!(frozen.status, 200, "{}", frozen.body);
    app.stop().await;
}

/// A duplicate count that ran out of room for values (`server.max_counted_unique_values`, shared
/// by every count the node runs) could not compare every value with every other: the column is
/// judged breaking and the freeze takes force, rather than going through on a count that could
/// not see the duplicates past its room.
#[tokio::test]
async fn a_duplicate_count_out_of_room_takes_force_rather_than_letting_duplicates_through() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::process::free_port();
    let server = crate::process::Server::start_with(
        dir.path(),
        port,
        &[
            ("DSTORE_MAX_COUNTED_UNIQUE_VALUES", "3".into()),
            (
                "DATABASE_URL",
                db.settings().url.unwrap().expose().to_string(),
            ),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let request = client.request(method, server.url(path));
        async move {
            let request = match body {
                Some(body) => request.body(body.to_string()),
                None => request,
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let code = |unique: bool| {
        blueprint(
            "coupons",
            "coupon",
            json!({"code": {"type": "string", "unique": unique, "validation": {"max_length": 100}}}),
        )
    };
    let put = reqwest::Method::PUT;
    let (status, body) = call(put.clone(), "/deals/coupon/_blueprint", Some(code(false))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(reqwest::Method::POST, "/deals/_version", None).await;
    assert_eq!(status, 200, "{body}");
    // Items are counted in the order of their ids: three values are remembered, and the two
    // "D"s come after them and are never compared with each other.
    for (n, value) in ["A", "B", "C", "D", "D"].into_iter().enumerate() {
        let path = format!("/deals/coupon/00000000-0000-4000-8000-00000000000{n}");
        let item = json!({"project_version": 1, "code": value});
        let (status, body) = call(put.clone(), &path, Some(item)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = call(put.clone(), "/deals/coupon/_blueprint", Some(code(true))).await;
    assert_eq!(status, 200, "{body}");
    let (status, refused) = call(reqwest::Method::POST, "/deals/_version", None).await;
    assert_eq!(status, 409, "{refused}");
    let report = &refused["report"];
    assert_eq!(report["verdict"], "breaking", "{report}");
    let column = &live_version(report, 1)["columns"][0];
    let reason = column["new_clients_reading_old_writes"]["reason"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains("server.max_counted_unique_values") && reason.contains("force=true"),
        "{reason}"
    );
    let (status, body) = call(reqwest::Method::POST, "/deals/_version?force=true", None).await;
    assert_eq!(status, 200, "{body}");

    // The same duplicates in a blueprint only a retired version holds: no live version's column
    // report shows the column, and the count out of room still makes the freeze take force.
    let article = blueprint(
        "articles",
        "article",
        json!({"title": {"type": "string", "validation": {"max_length": 100}}}),
    );
    let (status, body) = call(put.clone(), "/promo/article/_blueprint", Some(article)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(reqwest::Method::POST, "/promo/_version", None).await.0,
        200
    );
    let (status, body) = call(put.clone(), "/promo/coupon/_blueprint", Some(code(false))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(reqwest::Method::POST, "/promo/_version", None).await.0,
        200
    );
    for (n, value) in ["A", "B", "C", "D", "D"].into_iter().enumerate() {
        let path = format!("/promo/coupon/00000000-0000-4000-8000-00000000000{n}");
        let item = json!({"project_version": 2, "code": value});
        let (status, body) = call(put.clone(), &path, Some(item)).await;
        assert_eq!(status, 200, "{body}");
    }
    let retire = call(reqwest::Method::POST, "/promo/_version/2/_retire", None).await;
    assert_eq!(retire.0, 200, "{}", retire.1);
    let (status, body) = call(put.clone(), "/promo/coupon/_blueprint", Some(code(true))).await;
    assert_eq!(status, 200, "{body}");
    let (status, refused) = call(reqwest::Method::POST, "/promo/_version", None).await;
    assert_eq!(status, 409, "{refused}");
    let report = &refused["report"];
    assert_eq!(report["verdict"], "breaking", "{report}");
    let incomplete = &report["incomplete_counts"];
    assert_eq!(incomplete[0]["blueprint"], "coupon", "{report}");
    assert_eq!(incomplete[0]["column"], "code", "{report}");
    let reason = incomplete[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("server.max_counted_unique_values") && reason.contains("force=true"),
        "{reason}"
    );
    let (status, body) = call(reqwest::Method::POST, "/promo/_version?force=true", None).await;
    assert_eq!(status, 200, "{body}");
    drop(server);
    db.drop().await;
}
