//! Version routes: freeze the working copy, show versions with their migration and back-fill state,
//! retire a version.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::query::{NoQuery, Query};
use super::{ident, version_number, State};
use serde::Deserialize;

use crate::auth::Action;
use crate::blueprint::compat::changed_columns;
use crate::blueprint::Ident;
use crate::catalog::edit::json_bytes;
use crate::catalog::{Compatibility, Project, Version};
use crate::write;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeParams {
    /// Change nothing; answer the compatibility report and what each store would run.
    #[serde(default)]
    dry_run: bool,
    /// Freeze even though the report finds values lost (the version is marked forced).
    #[serde(default)]
    force: bool,
}

/// POST /{project}/_version?dry_run=&force=
pub async fn freeze(
    state: State,
    path: web::Path<String>,
    params: Query<FreezeParams>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    if params.dry_run && params.force {
        // The report is the same whether the freeze would be forced or not: `allowed` says
        // whether it takes force.
        return Err(ApiError::bad_request(
            "force",
            "force freezes; a dry run changes nothing, and its report's allowed says whether the \
             freeze takes force",
        ));
    }
    if params.dry_run {
        let report = write::freeze_report(state.storage.as_ref(), &project).await?;
        let mut body = serde_json::to_value(&report).expect("reports serialize");
        body["stores"] = store_previews(&state, &project, &report)?;
        return Ok(HttpResponse::Ok().json(body));
    }
    let number = write::freeze(
        state.storage.as_ref(),
        &project,
        state.wait_timeout(),
        params.force,
        None,
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({"project_version": number})))
}

/// What every enabled store would create for the version the report is about.
fn store_previews(
    state: &State,
    project: &Ident,
    report: &write::evolution::Report,
) -> Result<Value, ApiError> {
    let snapshot = state.storage.snapshot();
    let p = snapshot.project(project)?;
    let version = Version {
        number: report.version,
        blueprints: p.working.blueprints.clone(),
        changes: Vec::new(),
        edits: Vec::new(),
        frozen_at: String::new(),
        forced: false,
        size: Default::default(),
    };
    Ok(Value::Object(
        state
            .registry
            .iter()
            .map(|projector| {
                (
                    projector.name().to_string(),
                    projector.preview(project, &version),
                )
            })
            .collect(),
    ))
}

/// GET /{project}/_version/{version}: one version with its changes, state and use.
pub async fn get_one(
    _: NoQuery,
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path.0)?;
    let number = version_number("version", &path.1)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let p = snapshot.project(&project)?;
    if p.version(number).is_none() {
        return Err(ApiError::NotFound(format!(
            "version {number} of project {:?} does not exist",
            project.as_str()
        )));
    }
    let all = describe(&state, p).await?;
    let mut one = all["versions"][number as usize - 1].clone();
    one["usage"] = serde_json::to_value(state.storage.version_usage(&project, number).await?)
        .expect("usage serializes");
    Ok(HttpResponse::Ok().json(one))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffParams {
    from: String,
    to: String,
}

/// GET /{project}/_diff?from=&to=: the changes between two frozen versions with their verdicts.
pub async fn diff(
    state: State,
    path: web::Path<String>,
    params: Query<DiffParams>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let (from, to) = (
        version_number("from", &params.from)?,
        version_number("to", &params.to)?,
    );
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let p = snapshot.project(&project)?;
    let version = |n: u32| {
        p.version(n).ok_or_else(|| {
            ApiError::NotFound(format!(
                "version {n} of project {:?} does not exist",
                project.as_str()
            ))
        })
    };
    let (a, b) = (version(from)?, version(to)?);
    let columns: Vec<Value> = changed_columns(&a.blueprints, &b.blueprints)
        .iter()
        .map(|pair| {
            json!({
                "blueprint": pair.blueprint,
                "column": pair.new.or(pair.old).map(|(name, _)| name),
                "change": pair.describe(),
                "clients_of_from_reading_writes_of_to": pair.to_old(),
                "clients_of_to_reading_writes_of_from": pair.to_new(),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "project": project,
        "from": from,
        "to": to,
        "changes": crate::blueprint::diff(&a.blueprints, &b.blueprints),
        "columns": columns,
    })))
}

/// GET /{project}/_settings
pub async fn settings(
    _: NoQuery,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let p = snapshot.project(&project)?;
    Ok(HttpResponse::Ok().json(json!({"compatibility": p.working.compatibility})))
}

/// PUT /{project}/_settings: `{"compatibility": "lossless" | "lossy_allowed"}`.
pub async fn put_settings(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let body = super::body::json(&state, &request, payload).await?;
    let compatibility = parse_settings(&body)?;
    state
        .storage
        .set_compatibility(&project, compatibility)
        .await?;
    Ok(HttpResponse::Ok().json(json!({"compatibility": compatibility})))
}

/// The settings body: exactly `{"compatibility": ...}`; each error names its field.
fn parse_settings(body: &Value) -> Result<Compatibility, ApiError> {
    use crate::blueprint::FieldError;
    let invalid = |errors| ApiError::Invalid("invalid settings".into(), errors);
    let Some(fields) = body.as_object() else {
        return Err(invalid(vec![FieldError::new(
            "",
            "expected an object: {\"compatibility\": \"lossless\" or \"lossy_allowed\"}",
        )]));
    };
    let mut errors: Vec<FieldError> = fields
        .keys()
        .filter(|key| key.as_str() != "compatibility")
        .take(crate::blueprint::MAX_ERRORS)
        .map(|key| {
            // A key is shown cut to an excerpt: a hostile one can be megabytes long.
            let key = crate::blueprint::value::excerpt_str(key);
            FieldError::new(
                format!("/{}", crate::blueprint::parse::pointer_segment(&key)),
                "unknown setting; the settings are: compatibility",
            )
        })
        .collect();
    let compatibility = match fields.get("compatibility") {
        None => {
            errors.push(FieldError::new("/compatibility", "is required"));
            None
        }
        Some(value) => match serde_json::from_value::<Compatibility>(value.clone()) {
            Ok(c) => Some(c),
            Err(_) => {
                errors.push(FieldError::new(
                    "/compatibility",
                    "expected \"lossless\" or \"lossy_allowed\"",
                ));
                None
            }
        },
    };
    match compatibility {
        Some(c) if errors.is_empty() => Ok(c),
        _ => Err(invalid(errors)),
    }
}

/// GET /{project}/_version
pub async fn get(
    _: NoQuery,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    Ok(HttpResponse::Ok().json(describe(&state, snapshot.project(&project)?).await?))
}

/// GET /_version
pub async fn all(_: NoQuery, state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    state.storage.refresh_catalog().await?;
    let snapshot = state.storage.snapshot();
    let caller = super::auth::caller(&request);
    let readable = || {
        snapshot
            .projects
            .iter()
            .filter(|(name, _)| caller.allows(Action::BlueprintsRead, Some(name.as_str())))
    };
    // Held from before the answer is made (see `body::answer_share`): about what the changes it
    // lists take as JSON, counted without being written anywhere.
    let estimate = readable()
        .map(|(_, p)| {
            let changes = p.versions.iter().map(|v| json_bytes(&v.changes));
            changes.sum::<usize>() + json_bytes(&p.working.edits)
        })
        .sum();
    let what = "the projects' versions";
    let share = super::body::answer_share(&state, what, estimate)?;
    let mut out = Map::new();
    for (name, p) in readable() {
        out.insert(name.to_string(), describe(&state, p).await?);
    }
    super::body::held_json_in(share, what, &out)
}

/// POST /{project}/_version/{version}/_retire
pub async fn retire(
    _: NoQuery,
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path.0)?;
    let number = version_number("version", &path.1)?;
    state.storage.retire(&project, number).await?;
    // Elasticsearch's alias of a blueprint points at the newest version holding it: when that is
    // the one retired (it takes deletes only), the alias goes back to the newest live version
    // holding the blueprint, which its migration, queued again, does.
    let elasticsearch = crate::projector::ProjectorKind::Elasticsearch.name();
    if state.registry.names().contains(&elasticsearch) {
        let snapshot = state.storage.snapshot();
        let again = snapshot
            .projects
            .get(&project)
            .map(|p| p.newest_live_holders_of(number))
            .unwrap_or_default();
        for live in again {
            state
                .storage
                .remigrate(&project, live, vec![elasticsearch.to_string()])
                .await?;
        }
    }
    Ok(HttpResponse::Ok().json(json!({"project_version": number, "retired": true})))
}

/// GET /{project}/_catalog: the frozen versions exactly as stored, internal uids included, the
/// retired ones, and each version's status (retired, and each store's migration: a worker tells a
/// drop delivered again by it). `dstore worker` processes read the catalog through it. A project that does not exist
/// answers 200 with `"exists": false`, so a worker can tell it from a wrong address (a 404 of
/// something else) and never skips tasks on the word of a server that is not dstore.
pub async fn catalog(
    _: NoQuery,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let Some(p) = snapshot.projects.get(&project) else {
        return Ok(
            HttpResponse::Ok().json(json!({"project": project, "exists": false,
            "versions": [], "retired": [], "deployment": state.storage.deployment()})),
        );
    };
    // Encoded from the catalog itself, never built as a JSON tree first: a project's versions
    // take up to 64 MiB as JSON.
    #[derive(serde::Serialize)]
    struct Catalog<'a> {
        project: &'a Ident,
        exists: bool,
        versions: &'a [std::sync::Arc<Version>],
        retired: Vec<u32>,
        status: &'a std::collections::BTreeMap<u32, crate::catalog::VersionStatus>,
        born: u64,
        deployment: String,
    }
    let answer = Catalog {
        project: &p.name,
        exists: true,
        versions: &p.versions,
        retired: p.retired_numbers(),
        status: &p.status,
        born: p.working.born,
        deployment: state.storage.deployment().to_string(),
    };
    super::body::held_json(&state, "the project's catalog", &answer)
}

/// A version's back-fill as `GET /{project}/_version` shows it: a retired version's stopped where
/// it was and never finishes, which `stopped` says (`dstore versions --watch` waits for no such).
fn backfill_view(backfill: &crate::journal::backfill::BackfillState, retired: bool) -> Value {
    let mut view =
        json!({"total": backfill.total, "done": backfill.done, "finished": backfill.finished});
    if retired && !backfill.finished {
        view["stopped"] = Value::Bool(true);
    }
    view
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
            .map(|b| backfill_view(&b, status.retired));
        versions.push(json!({
            "project_version": version.number,
            "frozen_at": version.frozen_at,
            "forced": version.forced,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::backfill::BackfillState;

    #[test]
    fn a_retired_versions_unfinished_back_fill_shows_as_stopped() {
        let running = BackfillState {
            total: 10,
            done: 4,
            ..BackfillState::default()
        };
        let finished = BackfillState {
            done: 10,
            finished: true,
            ..running.clone()
        };
        assert_eq!(
            backfill_view(&running, false),
            json!({"total": 10, "done": 4, "finished": false})
        );
        assert_eq!(backfill_view(&running, true)["stopped"], true);
        assert_eq!(backfill_view(&finished, true).get("stopped"), None);
    }
}
