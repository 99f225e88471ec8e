//! Blueprint routes: edit and read the working copy, read frozen versions.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::error::ApiError;
use super::query::NoQuery;
use super::{body, ident, version_number, State};
use crate::blueprint::parse::pointer_segment;
use crate::blueprint::value::excerpt_str;
use crate::blueprint::{model::blueprints_to_public, parse_blueprint, Blueprints, Ident};
use crate::catalog::Project;
use crate::projector::elasticsearch;

fn parse_names(path: &(String, String)) -> Result<(Ident, Ident), ApiError> {
    Ok((ident("project", &path.0)?, ident("blueprint", &path.1)?))
}

fn frozen<'a>(project: &'a Project, raw: &str) -> Result<&'a Blueprints, ApiError> {
    let number = version_number("version", raw)?;
    project
        .version(number)
        .map(|v| &v.blueprints)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "version {number} of project {:?} does not exist (latest is {})",
                project.name.as_str(),
                project.latest().map_or(0, |v| v.number)
            ))
        })
}

fn blueprint_in(
    blueprints: &Blueprints,
    project: &Ident,
    name: &Ident,
    place: &str,
) -> Result<Value, ApiError> {
    blueprints
        .get(name)
        .map(|bp| bp.to_public())
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "blueprint {name:?} does not exist in {place} of {:?}",
                project.as_str()
            ))
        })
}

/// PUT /{project}/{blueprint}/_blueprint
pub async fn put(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (project, name) = parse_names(&path)?;
    let body = body::json(&state, &request, payload).await?;
    let input = parse_blueprint(&body, "")
        .map_err(|errors| ApiError::Invalid("invalid blueprint".into(), errors))?;
    let snapshot = state.storage.snapshot();
    let current = working(&snapshot, &project).and_then(|b| b.get(&name));
    let errors = elasticsearch::check_overrides(&input, "", current);
    if !errors.is_empty() {
        return Err(ApiError::Invalid("invalid blueprint".into(), errors));
    }
    let changes = state.storage.put_blueprint(&project, &name, input).await?;
    Ok(HttpResponse::Ok().json(json!({"success": true, "changes": changes})))
}

/// GET /{project}/{blueprint}/_blueprint
pub async fn get(
    _: NoQuery,
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project, name) = parse_names(&path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let p = snapshot.project(&project)?;
    Ok(HttpResponse::Ok().json(blueprint_in(
        &p.working.blueprints,
        &project,
        &name,
        "the working copy",
    )?))
}

/// DELETE /{project}/{blueprint}/_blueprint
pub async fn delete(
    _: NoQuery,
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project, name) = parse_names(&path)?;
    let changes = state.storage.delete_blueprint(&project, &name).await?;
    Ok(HttpResponse::Ok().json(json!({"success": true, "changes": changes})))
}

/// GET /{project}/{blueprint}/_blueprint/{version}
pub async fn get_at(
    _: NoQuery,
    state: State,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project, name) = (ident("project", &path.0)?, ident("blueprint", &path.1)?);
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let p = snapshot.project(&project)?;
    let blueprints = frozen(p, &path.2)?;
    Ok(HttpResponse::Ok().json(blueprint_in(
        blueprints,
        &project,
        &name,
        &format!("version {}", path.2),
    )?))
}

/// PUT /{project}/_blueprint: replaces the whole working copy.
pub async fn put_all(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let body = body::json(&state, &request, payload).await?;
    let snapshot = state.storage.snapshot();
    let inputs = parse_blueprint_set(&body, "", working(&snapshot, &project), &mut 0)?;
    let changes = state.storage.put_blueprints(&project, inputs).await?;
    Ok(HttpResponse::Ok().json(json!({"success": true, "changes": changes})))
}

/// The working copy's blueprints of `project`, if it exists.
pub fn working<'a>(
    snapshot: &'a crate::catalog::Snapshot,
    project: &Ident,
) -> Option<&'a crate::blueprint::Blueprints> {
    snapshot
        .projects
        .get(project)
        .map(|p| &p.working.blueprints)
}

/// Parses `{"article": {…}, "comment": {…}}`; every error path starts with `base/<blueprint>`.
/// `current`: the project's blueprints now, whose unchanged overrides are not checked again
/// (`elasticsearch::check_overrides`).
///
/// `patterns`: the memory of the new patterns the request compiled so far (see
/// [`crate::blueprint::parse::parse_blueprint_within`]), shared by every set one request parses. A
/// set of more blueprints than a project may hold is refused before any is parsed.
pub fn parse_blueprint_set(
    body: &Value,
    base: &str,
    current: Option<&crate::blueprint::Blueprints>,
    patterns: &mut usize,
) -> Result<Vec<(Ident, crate::blueprint::BlueprintInput)>, ApiError> {
    let Value::Object(set) = body else {
        return Err(ApiError::Invalid(
            "invalid blueprints".into(),
            vec![crate::blueprint::FieldError::new(
                base,
                "must be an object of blueprints by name",
            )],
        ));
    };
    let most = crate::catalog::edit::MAX_BLUEPRINTS;
    if set.len() > most && set.len() > current.map_or(0, |c| c.len()) {
        return Err(ApiError::Invalid(
            "invalid blueprints".into(),
            vec![crate::blueprint::FieldError::new(
                base,
                format!(
                    "a project holds at most {most} blueprints; this request names {}",
                    set.len()
                ),
            )],
        ));
    }
    let mut errors = Vec::new();
    let mut inputs = Vec::new();
    for (name, definition) in set {
        let at = format!("{base}/{}", pointer_segment(&excerpt_str(name)));
        match Ident::parse(name) {
            Err(reason) => errors.push(crate::blueprint::FieldError::new(
                &at,
                format!("blueprint name {:?} {reason}", excerpt_str(name)),
            )),
            Ok(name) => {
                match crate::blueprint::parse::parse_blueprint_within(definition, &at, patterns) {
                    Ok(input) => {
                        let now = current.and_then(|b| b.get(&name));
                        errors.append(&mut elasticsearch::check_overrides(&input, &at, now));
                        inputs.push((name, input));
                    }
                    Err(mut e) => errors.append(&mut e),
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(inputs)
    } else {
        Err(ApiError::Invalid("invalid blueprints".into(), errors))
    }
}

/// GET /{project}/_blueprint
pub async fn get_all(
    _: NoQuery,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let p = snapshot.project(&project)?;
    Ok(HttpResponse::Ok().json(blueprints_to_public(&p.working.blueprints)))
}

/// GET /{project}/_blueprint/{version}
pub async fn get_all_at(
    _: NoQuery,
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path.0)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let p = snapshot.project(&project)?;
    Ok(HttpResponse::Ok().json(blueprints_to_public(frozen(p, &path.1)?)))
}
