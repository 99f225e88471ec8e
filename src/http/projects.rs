//! Project routes: read all blueprints, put them all and freeze, delete a project from every store.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::blueprints::parse_blueprint_set;
use super::error::ApiError;
use super::query::NoQuery;
use super::{body, ident, State};
use crate::auth::Action;
use crate::blueprint::model::blueprints_to_public;
use crate::blueprint::{FieldError, Ident};
use crate::catalog::edit::Judged;
use crate::catalog::Project;
use crate::write::{self, WriteError};

fn describe(p: &Project) -> Value {
    json!({
        "project": p.name,
        "project_version": p.latest().map(|v| v.number),
        "blueprints": blueprints_to_public(&p.working.blueprints),
    })
}

/// GET /{project}/_project
pub async fn get(
    _: NoQuery,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    Ok(HttpResponse::Ok().json(describe(snapshot.project(&project)?)))
}

/// Puts every blueprint of a project and freezes when something changed.
async fn put_and_freeze(
    state: &State,
    project: &Ident,
    body: &Value,
    base: &str,
    allowed: Option<&Judged>,
) -> Result<Value, ApiError> {
    let inputs = {
        let snapshot = state.storage.snapshot();
        parse_blueprint_set(
            body,
            base,
            super::blueprints::working(&snapshot, project),
            &mut 0,
        )?
    };
    state.storage.put_blueprints(project, inputs).await?;
    let snapshot = state.storage.snapshot();
    let p = snapshot.project(project)?;
    let changed = p.has_unfrozen_changes();
    let number = match write::freeze(
        state.storage.as_ref(),
        project,
        state.wait_timeout(),
        false,
        allowed,
    )
    .await
    {
        Ok(number) => number,
        Err(WriteError::Conflict(_)) => p.latest().map_or(0, |v| v.number),
        Err(e) => return Err(e.into()),
    };
    Ok(json!({"project_version": number, "changed": changed}))
}

/// PUT /{project}/_project
pub async fn put(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    let body = body::json(&state, &request, payload).await?;
    // A change the freeze would refuse is answered before the working copy takes it: a 409 that
    // left the blueprints in place would have the next forced freeze take them unseen. (The
    // blueprints' own errors are answered as the put finds them.)
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    let inputs = parse_blueprint_set(
        &body,
        "",
        super::blueprints::working(&snapshot, &project),
        &mut 0,
    )?;
    let allowed = try_project(
        &state,
        &snapshot,
        &project,
        inputs,
        "",
        &mut Vec::new(),
        &mut 0,
    )
    .await?;
    let answer = put_and_freeze(&state, &project, &body, "", allowed.as_ref()).await?;
    Ok(HttpResponse::Ok().json(answer))
}

/// Tries `inputs` on a copy of the project as `snapshot` holds it, changing nothing: the
/// blueprints' own checks and the names they take (their problems go to `errors`, under `at`),
/// then whether the change may be frozen (an incompatible one is the answer at once, with its
/// report). `PUT /_project` changes no project unless every project passes. Answers the change
/// as it was judged when the freeze lets it through, so the freeze need not count it again while
/// the project stays as judged.
async fn try_project(
    state: &State,
    snapshot: &crate::catalog::Snapshot,
    project: &Ident,
    inputs: Vec<(Ident, crate::blueprint::BlueprintInput)>,
    at: &str,
    errors: &mut Vec<FieldError>,
    grown: &mut usize,
) -> Result<Option<Judged>, ApiError> {
    let mut trial = match snapshot.projects.get(project) {
        Some(p) => (**p).clone(),
        None => Project::new(project.clone()),
    };
    match crate::catalog::edit::put_blueprints(&mut trial, inputs, &mut Vec::new()) {
        Ok(_) => {}
        Err(crate::catalog::CatalogError::Invalid(refused)) => {
            errors.extend(refused.into_iter().map(|mut e| {
                e.path = format!("{at}{}", e.path);
                e
            }));
            return Ok(None);
        }
        Err(e) => return Err(WriteError::from(e).into()),
    }
    if !trial.has_unfrozen_changes() {
        return Ok(None);
    }
    crate::catalog::edit::room_for_a_version(&trial).map_err(WriteError::from)?;
    // The catalog's room (`storage.max_catalog_bytes`) for the change and its freeze, beside
    // what the request's projects before this one grow it by: refused now, no project is
    // changed, where the freeze refused after the blueprints were put would leave them half done.
    {
        use crate::catalog::edit;
        let before = snapshot
            .projects
            .get(project)
            .map_or(0, |p| edit::project_bytes(p));
        let after = edit::frozen_bytes(&trial);
        let others = (state.storage.catalog_bytes() + *grown).saturating_sub(before);
        let most = state.settings.storage.max_catalog_bytes;
        edit::room_in_catalog(project, others, (before, after), most).map_err(WriteError::from)?;
        *grown += after.saturating_sub(before);
    }
    match write::evolution::judge(state.storage.as_ref(), &trial, false).await? {
        Ok(_) => Ok(Some(Judged::of(&trial))),
        Err(report) => Err(WriteError::Incompatible(report).into()),
    }
}

/// DELETE /{project}/_project
pub async fn delete(
    _: NoQuery,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ident("project", &path)?;
    state.storage.drop_project(&project).await?;
    Ok(HttpResponse::Ok().json(json!({"success": true})))
}

/// GET /_project
pub async fn get_all(
    _: NoQuery,
    state: State,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    state.storage.refresh_catalog().await?;
    let snapshot = state.storage.snapshot();
    let caller = super::auth::caller(&request);
    let readable = || {
        snapshot
            .projects
            .iter()
            .filter(|(n, _)| caller.allows(Action::BlueprintsRead, Some(n.as_str())))
    };
    // Held from before the answer is made (see `body::answer_share`): about what the
    // blueprints take as JSON, counted without being written anywhere.
    let estimate = readable()
        .map(|(_, p)| crate::catalog::edit::json_bytes(&p.working.blueprints))
        .sum();
    let what = "the projects' blueprints";
    let share = body::answer_share(&state, what, estimate)?;
    let out: Map<String, Value> = readable()
        .map(|(n, p)| (n.to_string(), describe(p)))
        .collect();
    body::held_json_in(share, what, &out)
}

/// PUT /_project: `{"myblog": {"article": {…}}, …}`; every project is checked before any is changed.
pub async fn put_all(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = body::json(&state, &request, payload).await?;
    let Value::Object(projects) = &*body else {
        return Err(ApiError::Invalid(
            "invalid projects".into(),
            vec![FieldError::new("", "must be an object of projects by name")],
        ));
    };
    let caller = super::auth::caller(&request);
    if let Some(denied) = projects
        .keys()
        .find(|name| !caller.allows(Action::BlueprintsWrite, Some(name.as_str())))
    {
        return Err(ApiError::Forbidden(format!(
            "key {} may not blueprints.write on project {:?}",
            caller.describe().0,
            crate::blueprint::value::excerpt_str(denied)
        )));
    }
    let mut errors = Vec::new();
    let mut named = Vec::new();
    state.storage.refresh_catalog().await?;
    let snapshot = state.storage.snapshot();
    // The projects it makes must all fit: one refused after those before it were made and frozen
    // would leave the request half done.
    let made = projects
        .keys()
        .filter(|name| Ident::parse(name).is_ok_and(|p| !snapshot.projects.contains_key(&p)))
        .count();
    let most = state.settings.storage.max_projects;
    if made > most.saturating_sub(snapshot.projects.len()) {
        return Err(ApiError::Conflict(format!(
            "the request makes {made} new projects; this deployment holds {} of the {most} it \
             holds at most (storage.max_projects): no project was changed",
            snapshot.projects.len()
        )));
    }
    // The new patterns of every project of the request count against one budget, and what they
    // grow the catalog by against its room.
    let (mut patterns, mut grown) = (0, 0);
    for (name, blueprints) in projects {
        let at = format!(
            "/{}",
            crate::blueprint::parse::pointer_segment(&crate::blueprint::value::excerpt_str(name))
        );
        match Ident::parse(name) {
            Err(reason) => errors.push(FieldError::new(
                &at,
                format!(
                    "project name {:?} {reason}",
                    crate::blueprint::value::excerpt_str(name)
                ),
            )),
            Ok(project) => match parse_blueprint_set(
                blueprints,
                &at,
                super::blueprints::working(&snapshot, &project),
                &mut patterns,
            ) {
                Ok(inputs) => {
                    try_project(
                        &state,
                        &snapshot,
                        &project,
                        inputs,
                        &at,
                        &mut errors,
                        &mut grown,
                    )
                    .await?;
                    named.push((project, blueprints, at));
                }
                Err(ApiError::Invalid(_, mut e)) => errors.append(&mut e),
                Err(e) => return Err(e),
            },
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid(
            "invalid projects".into(),
            crate::blueprint::cap_errors(errors),
        ));
    }
    // Each project is changed and frozen in turn: one that fails then (a store's migration, the
    // storage away) leaves those before it done, and its answer says which, and that sending the
    // request again finishes it (a project already as asked changes nothing).
    let mut out = Map::new();
    // Each freeze counts its project again: one judged before the freezes of those before it
    // (each waiting for its stores) would miss the items written meanwhile.
    let names: Vec<String> = named.iter().map(|(p, ..)| p.to_string()).collect();
    for (index, (project, blueprints, at)) in named.into_iter().enumerate() {
        match put_and_freeze(&state, &project, blueprints, &at, None).await {
            Ok(answer) => {
                out.insert(project.to_string(), answer);
            }
            Err(error) if names.len() > 1 => {
                let (done, after) = (listed(&names[..index]), listed(&names[index + 1..]));
                return Err(error.reworded(|message| {
                    format!(
                        "project {project}: {message}; projects changed before it: {done}; not \
                         changed: {after}; send the request again to finish (a project already \
                         as asked is not changed again)"
                    )
                }));
            }
            Err(error) => return Err(error),
        }
    }
    Ok(HttpResponse::Ok().json(out))
}

/// Project names for a message: the first 20, and how many more.
fn listed(names: &[String]) -> String {
    const SHOWN: usize = 20;
    if names.is_empty() {
        return "none".into();
    }
    let mut list = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        list.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    list
}

/// DELETE /_project
pub async fn delete_all(_: NoQuery, state: State) -> Result<HttpResponse, ApiError> {
    state.storage.refresh_catalog().await?;
    let names: Vec<Ident> = state.storage.snapshot().projects.keys().cloned().collect();
    for project in &names {
        state.storage.drop_project(project).await?;
    }
    Ok(HttpResponse::Ok().json(json!({"success": true, "deleted": names})))
}
