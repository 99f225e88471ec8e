//! Version routes: freeze the working copy, show versions with their migration and back-fill state,
//! retire a version.

use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::{ident, version_number, State};
use crate::blueprint::Ident;
use crate::catalog::{MigrationState, Project};

/// Freezes the working copy (or finishes the migrations of the newest version) and waits for every
/// projector's migrator. Returns the version number.
pub async fn freeze_project(state: &State, project: &Ident) -> Result<u32, ApiError> {
    let snapshot = state.catalog.snapshot();
    let p = snapshot.project(project)?;
    let (number, seq) = if p.has_unfrozen_changes() {
        // The back-fill of the new version is recorded in the same journal batch.
        let (version, seq) = state.journal.freeze(project.clone()).await?;
        (version.number, seq)
    } else {
        // A retried freeze finishes what the first one started.
        let latest = p.latest().ok_or_else(|| {
            ApiError::Conflict("the working copy has no blueprints to freeze".into())
        })?;
        let backfill = state
            .journal
            .ensure_backfill(project, latest.number)
            .await?;
        let unfinished = unfinished_migrations(p, latest.number);
        if unfinished.is_empty() {
            if backfill {
                return Ok(latest.number);
            }
            return Err(ApiError::Conflict(format!(
                "nothing changed since version {}",
                latest.number
            )));
        }
        let seq = state
            .journal
            .remigrate(project.clone(), latest.number, unfinished)
            .await?;
        (latest.number, seq)
    };
    if let Err(behind) = state
        .journal
        .wait_projected(seq, state.wait_timeout())
        .await
    {
        let snapshot = state.catalog.snapshot();
        let reasons: Vec<String> = behind
            .iter()
            .map(|name| {
                let migration = snapshot
                    .projects
                    .get(project)
                    .and_then(|p| p.status.get(&number))
                    .and_then(|s| s.migrations.get(*name).cloned());
                match migration {
                    Some(MigrationState::Failed { error }) => format!("{name}: {error}"),
                    _ => format!("{name}: still pending"),
                }
            })
            .collect();
        return Err(ApiError::Unavailable(format!(
            "version {number} is frozen, but its migration has not finished ({}); it is retried in the background, and POST /{project}/_version again reports when it is done",
            reasons.join("; ")
        )));
    }
    Ok(number)
}

fn unfinished_migrations(p: &Project, number: u32) -> Vec<String> {
    p.status
        .get(&number)
        .map(|s| {
            s.migrations
                .iter()
                .filter(|(_, m)| **m != MigrationState::Done)
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// POST /{project}/_version
pub async fn freeze(state: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let number = freeze_project(&state, &project).await?;
    Ok(HttpResponse::Ok().json(json!({"project_version": number})))
}

/// GET /{project}/_version
pub async fn get(state: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.catalog.snapshot();
    Ok(HttpResponse::Ok().json(describe(&state, snapshot.project(&project)?)?))
}

/// GET /_version
pub async fn all(state: State) -> Result<HttpResponse, ApiError> {
    let snapshot = state.catalog.snapshot();
    let mut out = Map::new();
    for (name, p) in &snapshot.projects {
        out.insert(name.to_string(), describe(&state, p)?);
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
    state.catalog.retire(&project, number)?;
    Ok(HttpResponse::Ok().json(json!({"project_version": number, "retired": true})))
}

/// GET /{project}/_catalog: the frozen versions exactly as stored, internal uids included, and the
/// retired ones. `dstore worker` processes read the catalog through it. A project that does not exist
/// answers 200 with `"exists": false`, so a worker can tell it from a wrong address (a 404 of
/// something else) and never skips tasks on the word of a server that is not dstore.
pub async fn catalog(state: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.catalog.snapshot();
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

fn describe(state: &State, p: &Project) -> Result<Value, ApiError> {
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
            .journal
            .backfill_state(&p.name, version.number)?
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
