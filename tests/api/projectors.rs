use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dstore::blueprint::Ident;
use dstore::catalog::{Catalog, Version};
use dstore::journal::task::Task;
use dstore::projector::rocksdb::RocksProjector;
use dstore::projector::{conformance, Health, Outcome, Projector, ProjectorError};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{article, spawn_app_with_projectors};

#[tokio::test]
async fn the_rocksdb_projector_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog")).unwrap();
    let projector = Arc::new(RocksProjector::open(&dir.path().join("keyspaces")).unwrap());
    conformance::run(projector, &catalog, &Ident::parse("conformance").unwrap()).await;
}

/// A projector whose migrations fail until it is told the store is fixed.
struct Broken {
    fixed: Arc<AtomicBool>,
}

#[async_trait]
impl Projector for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }

    async fn migrate(&self, _project: &Ident, _version: &Version) -> Result<(), ProjectorError> {
        if self.fixed.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(ProjectorError::transient("the store refused the schema"))
        }
    }

    async fn apply(
        &self,
        _catalog: &Catalog,
        tasks: &[Task],
    ) -> Result<Vec<Outcome>, ProjectorError> {
        Ok(tasks.iter().map(|_| Ok(())).collect())
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

#[tokio::test]
async fn a_failed_migration_is_reported_and_the_freeze_can_be_retried_to_completion() {
    let fixed = Arc::new(AtomicBool::new(false));
    let app = spawn_app_with_projectors(
        |s| s.projection.wait_timeout_secs = 2,
        vec![Arc::new(Broken {
            fixed: fixed.clone(),
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
}
