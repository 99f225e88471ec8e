//! dstore's two-version scenario: 12 scalar types at v1, renamed and joined by 12 arrays at v2.

use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::helpers::spawn_app;

const TYPES: [&str; 12] = [
    "uuid",
    "string",
    "text",
    "point",
    "linestring",
    "polygon",
    "date",
    "datetime",
    "float",
    "integer",
    "boolean",
    "json",
];

pub fn sample(ty: &str) -> Value {
    match ty {
        "uuid" => json!("6f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"),
        "string" => json!("a string"),
        "text" => json!("a longer text"),
        "point" => json!({"type": "Point", "coordinates": [8.5, 47.25]}),
        "linestring" => json!({"type": "LineString", "coordinates": [[8.5, 47.25], [8.75, 47.5]]}),
        "polygon" => {
            json!({"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]})
        }
        "date" => json!("2021-03-04"),
        "datetime" => json!("2021-03-04 05:06:07"),
        "float" => json!(11.11111),
        "integer" => json!(42),
        "boolean" => json!(true),
        "json" => json!({"nested": [1, 2, {"deep": null}]}),
        other => panic!("no sample for {other}"),
    }
}

pub fn blueprint_v1() -> Value {
    let columns: Map<String, Value> = TYPES
        .iter()
        .map(|t| (format!("c_{t}"), json!({"type": t})))
        .collect();
    json!({"postgresql": {"table": "kitchensinks"}, "elasticsearch": {"type": "kitchensink"}, "columns": columns})
}

pub fn blueprint_v2() -> Value {
    let mut columns: Map<String, Value> = TYPES
        .iter()
        .map(|t| {
            (
                format!("c_{t}"),
                json!({"type": t, "column_id": format!("s_{t}")}),
            )
        })
        .collect();
    for t in TYPES {
        columns.insert(format!("a_{t}"), json!({"type": format!("{t}[]")}));
    }
    json!({"postgresql": {"table": "kitchensinks"}, "elasticsearch": {"type": "kitchensink"}, "columns": columns})
}

pub fn item_v1(id: Uuid) -> Value {
    let mut item: Map<String, Value> = TYPES
        .iter()
        .map(|t| (format!("c_{t}"), sample(t)))
        .collect();
    item.insert("id".into(), json!(id));
    item.insert("project_version".into(), json!(1));
    Value::Object(item)
}

pub fn item_v2(id: Uuid, link: Uuid) -> Value {
    let mut item: Map<String, Value> = TYPES
        .iter()
        .map(|t| (format!("s_{t}"), sample(t)))
        .collect();
    for t in TYPES {
        item.insert(format!("a_{t}"), json!([sample(t), sample(t)]));
    }
    item.insert("id".into(), json!(id));
    item.insert("project_version".into(), json!(2));
    item.insert("links".into(), json!([link]));
    Value::Object(item)
}

#[tokio::test]
async fn kitchensink_items_read_back_across_two_versions_and_deletes_reach_both() {
    let app = spawn_app().await;
    assert_eq!(
        app.put_and_freeze("dstore", "kitchensink", &blueprint_v1())
            .await,
        1
    );
    let first = Uuid::new_v4();
    let put = app
        .put(&format!("/dstore/kitchensink/{first}"), &item_v1(first))
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(
        app.put_and_freeze("dstore", "kitchensink", &blueprint_v2())
            .await,
        2
    );

    let at_v2 = app
        .get(&format!("/dstore/kitchensink/{first}?version=2"))
        .await
        .body;
    assert_eq!(at_v2["project_version"], 2);
    for t in TYPES {
        assert_eq!(at_v2[format!("s_{t}")], sample(t), "s_{t}");
        assert_eq!(at_v2[format!("a_{t}")], Value::Null, "a_{t}");
        assert!(at_v2.get(format!("c_{t}")).is_none());
    }

    let second = Uuid::new_v4();
    app.put_projected(
        &format!("/dstore/kitchensink/{second}?wait=true"),
        &item_v2(second, first),
    )
    .await;
    let at_v1 = app
        .get(&format!("/dstore/kitchensink/{second}?version=1"))
        .await
        .body;
    assert_eq!(at_v1["links"], json!([first]));
    assert_eq!(at_v1["project_version"], 1);
    for t in TYPES {
        assert_eq!(at_v1[format!("c_{t}")], sample(t), "c_{t}");
        assert!(at_v1.get(format!("a_{t}")).is_none() && at_v1.get(format!("s_{t}")).is_none());
    }
    let keyspaces = app.rocksdb.as_ref().unwrap();
    let (project, blueprint) = (
        dstore::blueprint::Ident::parse("dstore").unwrap(),
        dstore::blueprint::Ident::parse("kitchensink").unwrap(),
    );
    assert_eq!(
        keyspaces.get(&project, 1, &blueprint, &second).unwrap(),
        at_v1
    );

    let deleted = app
        .delete(&format!("/dstore/kitchensink/{second}?wait=true"))
        .await;
    assert_eq!(deleted.body["projected"], true, "{}", deleted.body);
    for version in [1, 2] {
        assert_eq!(
            app.get(&format!("/dstore/kitchensink/{second}?version={version}"))
                .await
                .status,
            404
        );
        assert!(keyspaces
            .get(&project, version, &blueprint, &second)
            .is_none());
    }
    app.stop().await;
}
