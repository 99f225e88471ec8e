//! The shared test suite every projector must pass, whatever its store.
//!
//! It drives a projector directly with tasks — no HTTP, no journal — and reads back through
//! [`Projector::read`]. Each store's tests call [`run`] with a fresh project name so runs are isolated.
//! It checks the contract of `projector/mod.rs`: idempotent migrations and applies, the revision guard
//! (an older revision never overwrites a newer one, a delete is never undone by a late write), batches,
//! and dropping a project.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::Projector;
use crate::blueprint::{parse_blueprint, Ident};
use crate::catalog::{Catalog, Version};
use crate::journal::task::{Task, TaskOp, VersionDoc};

/// A blueprint with one column of every scalar type and a few arrays.
pub fn sample_blueprint() -> Value {
    json!({
        "postgresql": {"table": "samples"},
        "elasticsearch": {"type": "sample"},
        "columns": {
            "title": {"type": "string", "validation": {"max_length": 40}},
            "body": {"type": "text"},
            "owner": {"type": "uuid"},
            "place": {"type": "point"},
            "route": {"type": "linestring"},
            "area": {"type": "polygon"},
            "day": {"type": "date"},
            "at": {"type": "datetime"},
            "ratio": {"type": "float"},
            "count": {"type": "integer"},
            "done": {"type": "boolean"},
            "extra": {"type": "json"},
            "tags": {"type": "string[]"},
            "stops": {"type": "point[]"},
            "counts": {"type": "integer[]"}
        }
    })
}

/// A document of the sample blueprint, canonical as the journal hands it to projectors.
pub fn sample_doc(id: Uuid, title: &str) -> Map<String, Value> {
    let doc = json!({
        "id": id, "project_version": 1, "links": [Uuid::from_u128(7)],
        "title": title, "body": "some text", "owner": Uuid::from_u128(9),
        "place": {"type": "Point", "coordinates": [8.5, 47.25]},
        "route": {"type": "LineString", "coordinates": [[8.5, 47.25], [8.75, 47.5]]},
        "area": {"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]},
        "day": "2021-03-04", "at": "2021-03-04 05:06:07", "ratio": 0.5, "count": 42, "done": true,
        "extra": {"nested": [1, 2]}, "tags": ["a", "b"],
        "stops": [{"type": "Point", "coordinates": [1.0, 2.0]}], "counts": [1, 2, 3]
    });
    match doc {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

/// Creates `project` with the sample blueprint frozen as version 1 in `catalog`; returns that version.
pub fn freeze_sample(catalog: &Catalog, project: &Ident) -> Arc<Version> {
    let blueprint = Ident::parse("sample").expect("ident");
    let input = parse_blueprint(&sample_blueprint(), "").expect("the sample blueprint parses");
    catalog
        .put_blueprint(project, &blueprint, input)
        .expect("blueprint stored");
    catalog
        .freeze(project, &[], &[], false)
        .expect("version frozen")
}

fn upsert(project: &Ident, seq: u64, id: Uuid, revision: u64, title: &str) -> Task {
    Task {
        seq,
        project: project.clone(),
        op: TaskOp::Upsert {
            blueprint: Ident::parse("sample").expect("ident"),
            id,
            revision,
            docs: vec![VersionDoc::new(1, &sample_doc(id, title))],
        },
    }
}

fn delete(project: &Ident, seq: u64, id: Uuid, revision: u64) -> Task {
    Task {
        seq,
        project: project.clone(),
        op: TaskOp::Delete {
            blueprint: Ident::parse("sample").expect("ident"),
            id,
            revision,
            versions: vec![1],
        },
    }
}

/// Runs the whole suite; panics with a description of the first broken promise.
pub async fn run(projector: Arc<dyn Projector>, catalog: &Catalog, project: &Ident) {
    let version = freeze_sample(catalog, project);
    let blueprint = Ident::parse("sample").expect("ident");
    let name = projector.name();
    let apply = |tasks: Vec<Task>| {
        let projector = projector.clone();
        async move {
            let outcomes = projector
                .apply(&catalog.snapshot(), &tasks)
                .await
                .unwrap_or_else(|e| panic!("{name}: apply failed: {e}"));
            assert_eq!(outcomes.len(), tasks.len(), "{name}: one outcome per task");
            for (task, outcome) in tasks.iter().zip(outcomes) {
                outcome.unwrap_or_else(|e| panic!("{name}: {} refused: {e}", task.describe()));
            }
        }
    };
    let read = |id: Uuid| {
        let projector = projector.clone();
        let (project, blueprint) = (project.clone(), blueprint.clone());
        async move {
            projector
                .read(&project, 1, &blueprint, &id)
                .await
                .unwrap_or_else(|e| panic!("{name}: read failed: {e}"))
        }
    };
    let title = |doc: Option<Value>| doc.map(|d| d["title"].clone());

    projector
        .migrate(project, &version, &[])
        .await
        .unwrap_or_else(|e| panic!("{name}: migrate failed: {e}"));
    projector
        .migrate(project, &version, &[])
        .await
        .unwrap_or_else(|e| panic!("{name}: a second migrate failed: {e}"));

    let a = Uuid::new_v4();
    apply(vec![upsert(project, 10, a, 10, "ten")]).await;
    let stored = read(a)
        .await
        .unwrap_or_else(|| panic!("{name}: the upserted item is missing"));
    for key in [
        "id", "title", "body", "owner", "day", "count", "done", "tags", "counts", "links",
    ] {
        assert_eq!(
            stored[key],
            sample_doc(a, "ten")[key],
            "{name}: {key} differs: {stored}"
        );
    }
    assert_eq!(
        stored["place"]["coordinates"],
        json!([8.5, 47.25]),
        "{name}: point: {stored}"
    );

    apply(vec![upsert(project, 11, a, 8, "older")]).await;
    assert_eq!(
        title(read(a).await),
        Some(json!("ten")),
        "{name}: an older revision overwrote a newer one"
    );
    apply(vec![upsert(project, 10, a, 10, "ten")]).await;
    assert_eq!(
        title(read(a).await),
        Some(json!("ten")),
        "{name}: a redelivered task changed the item"
    );

    apply(vec![delete(project, 12, a, 12)]).await;
    assert_eq!(
        read(a).await,
        None,
        "{name}: the deleted item is still there"
    );
    apply(vec![upsert(project, 13, a, 11, "late")]).await;
    assert_eq!(
        read(a).await,
        None,
        "{name}: a late write brought a deleted item back"
    );
    apply(vec![upsert(project, 14, a, 15, "again")]).await;
    assert_eq!(
        title(read(a).await),
        Some(json!("again")),
        "{name}: a newer write after a delete was lost"
    );

    // A batch mixing many items, repeated ids and deletes, applied in order.
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let mut batch: Vec<Task> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| upsert(project, 100 + i as u64, *id, 100 + i as u64, "first"))
        .collect();
    batch.push(upsert(project, 200, ids[0], 200, "second"));
    batch.push(delete(project, 201, ids[1], 201));
    batch.push(upsert(project, 202, ids[2], 99, "stale"));
    apply(batch).await;
    assert_eq!(
        title(read(ids[0]).await),
        Some(json!("second")),
        "{name}: the later task of a batch must win"
    );
    assert_eq!(
        read(ids[1]).await,
        None,
        "{name}: a delete inside a batch was lost"
    );
    assert_eq!(
        title(read(ids[2]).await),
        Some(json!("first")),
        "{name}: a stale task inside a batch won"
    );
    assert_eq!(
        title(read(ids[49]).await),
        Some(json!("first")),
        "{name}: the last item of a batch is missing"
    );

    projector
        .drop_project(project)
        .await
        .unwrap_or_else(|e| panic!("{name}: drop failed: {e}"));
    assert_eq!(
        read(ids[0]).await,
        None,
        "{name}: an item survived the drop of its project"
    );
    projector
        .drop_project(project)
        .await
        .unwrap_or_else(|e| panic!("{name}: a second drop failed: {e}"));
}
