//! Version routes: freeze the working copy, show versions with their migration and back-fill state,
//! retire a version.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::{ident, version_number, State};
use crate::auth::Action;
use crate::catalog::Project;
use crate::write;

/// POST /{project}/_version
pub async fn freeze(state: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let number = write::freeze(state.storage.as_ref(), &project, state.wait_timeout()).await?;
    Ok(HttpResponse::Ok().json(json!({"project_version": number})))
}

/// GET /{project}/_version
pub async fn get(state: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    Ok(HttpResponse::Ok().json(describe(&state, snapshot.project(&project)?).await?))
}

/// GET /_version
pub async fn all(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    state.storage.refresh_catalog().await?;
    let snapshot = state.storage.snapshot();
    let caller = super::auth::caller(&request);
    let mut out = Map::new();
    for (name, p) in snapshot
        .projects
        .iter()
        .filter(|(name, _)| caller.allows(Action::BlueprintsRead, Some(name.as_str())))
    {
        out.insert(name.to_string(), describe(&state, p).await?);
    }
    Ok(HttpResponse::Ok().json(out))
}

/// POST /{project}/_version/{version}/_retire
pub async fn retire(
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path.0)?;
    let number = version_number(&path.1)?;
    state.storage.retire(&project, number).await?;
    Ok(HttpResponse::Ok().json(json!({"project_version": number, "retired": true})))
}

/// GET /{project}/_catalog: the frozen versions exactly as stored, internal uids included, and the
/// retired ones. `dstore worker` processes read the catalog through it. A project that does not exist
/// answers 200 with `"exists": false`, so a worker can tell it from a wrong address (a 404 of
/// something else) and never skips tasks on the word of a server that is not dstore.
pub async fn catalog(state: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let Some(p) = snapshot.projects.get(&project) else {
        return Ok(HttpResponse::Ok()
            .json(json!({"project": project, "exists": false, "versions": [], "retired": []})));
    };
    let retired: Vec<u32> = p
        .versions
        .iter()
        .map(|v| v.number)
        .filter(|n| p.is_retired(*n))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "project": p.name,
        "exists": true,
        "versions": p.versions,
        "retired": retired,
    })))
}

async fn describe(state: &State, p: &Project) -> Result<Value, ApiError> {
    let mut per_blueprint: Map<String, Value> = Map::new();
    let mut versions = Vec::new();
    for version in &p.versions {
        for name in version.blueprints.keys() {
            let list = per_blueprint
                .entry(name.to_string())
                .or_insert_with(|| json!([]));
            list.as_array_mut()
                .expect("array")
                .push(json!(version.number));
        }
        let status = p.status.get(&version.number).cloned().unwrap_or_default();
        let backfill = state
            .storage
            .backfill_state(&p.name, version.number)
            .await?
            .map(|b| json!({"total": b.total, "done": b.done, "finished": b.finished}));
        versions.push(json!({
            "project_version": version.number,
            "frozen_at": version.frozen_at,
            "retired": status.retired,
            "blueprints": version.blueprints.keys().collect::<Vec<_>>(),
            "changes": version.changes,
            "migrations": status.migrations,
            "backfill": backfill,
        }));
    }
    Ok(json!({
        "project": p.name,
        "project_version": p.latest().map(|v| v.number),
        "blueprints": per_blueprint,
        "versions": versions,
        "unfrozen_changes": p.working.edits,
    }))
}
