//! Liveness, readiness per projector, and the dead letters.

use actix_web::{web, HttpMessage, HttpResponse};
use serde_json::{json, Map};

use super::error::ApiError;
use super::query::Query;
use super::State;
use crate::blueprint::Ident;
use crate::journal::LetterFilter;
use crate::projector::Health;
use crate::storage::{self, Refused, StorageError};

/// GET /_health: the process answers.
pub async fn live(_: super::query::NoQuery) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyParams {
    #[serde(default)]
    strict: bool,
}

/// The longest a projector's store may take to say how it is: a load balancer checks readiness
/// every few seconds (deploy/haproxy.cfg gives it 3), and a slow store must not take every node
/// out of it, since it only delays projection.
const HEALTH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How the store of projector `name` answers, within [`HEALTH_WAIT`]; the stores are asked
/// together.
async fn health(state: &State, name: &str) -> Health {
    let Some(projector) = state.registry.get(name) else {
        return Health {
            reachable: true,
            detail: "opened by dstore worker processes only; see its progress".into(),
        };
    };
    tokio::time::timeout(HEALTH_WAIT, projector.health())
        .await
        .unwrap_or_else(|_| Health {
            reachable: false,
            detail: format!(
                "{name} did not answer within {} s (busy, or a network that drops packets)",
                HEALTH_WAIT.as_secs()
            ),
        })
}

/// GET /_health/ready: whether this node can serve (503 when it cannot reach its storage), and per
/// projector whether its store answers and how far behind it is. With `?strict=true` the answer is
/// also 503 while a projector fails or writes are refused for back-pressure. Asked without a key
/// while authentication is on (and `auth.public` does not name `ready`), the answer is the same
/// status with `{"status": …}` alone.
pub async fn ready(
    state: State,
    params: Query<ReadyParams>,
    request: actix_web::HttpRequest,
) -> HttpResponse {
    let status_only = request
        .extensions()
        .get::<super::auth::StatusOnly>()
        .is_some();
    let Readiness {
        mut body,
        serving,
        all_ready,
    } = if status_only || state.anonymous(&request) {
        // Anyone may ask this (its status, or all of it where `auth.public` names `ready`).
        state.readiness.get(report(&state)).await
    } else {
        report(&state).await
    };
    if status_only {
        body = json!({"status": body["status"]});
    }
    if !serving || (params.strict && !all_ready) {
        return HttpResponse::ServiceUnavailable().json(body);
    }
    HttpResponse::Ok().json(body)
}

/// A readiness report: its body, whether this node serves, and whether all is ready.
#[derive(Clone)]
pub(crate) struct Readiness {
    body: serde_json::Value,
    serving: bool,
    all_ready: bool,
}

async fn report(state: &State) -> Readiness {
    let mut projectors = Map::new();
    let mut all_ready = true;
    let names = state.registry.names();
    let healths = futures::future::join_all(names.iter().map(|name| health(state, name))).await;
    for (name, health) in names.into_iter().zip(healths) {
        let progress = state.storage.progress(name).await;
        let status = if !health.reachable || progress.last_error.is_some() {
            all_ready = false;
            "failing"
        } else if progress.pending > 0 {
            "catching_up"
        } else {
            "ready"
        };
        let held = state.storage.held_by(name).len();
        projectors.insert(
            name.into(),
            json!({"status": status, "health": health, "progress": progress,
                   "held_projects": held}),
        );
    }
    let links = state.broker.as_ref().map(|b| b.links()).unwrap_or_default();
    // The journal keeps every task while the broker is away; a lost link only delays projection.
    all_ready &= links.values().all(|link| link.connected);
    let (backend, deployment) = (state.storage.backend(), state.storage.deployment());
    let reachable = state.storage.reachable();
    let storage = match &reachable {
        Ok(()) => json!({"backend": backend, "deployment": deployment, "reachable": true}),
        Err(reason) => json!({"backend": backend, "deployment": deployment, "reachable": false,
                              "reason": reason}),
    };
    // A journal whose writes fail, or a storage out of reach, refuses every write, whatever the
    // back-pressure says.
    let failure = match reachable {
        Ok(()) => state.storage.write_failure(),
        Err(reason) => Some(format!("the storage cannot be reached: {reason}")),
    };
    let writes = match (failure, state.storage.check_backlog()) {
        (Some(reason), _) => {
            all_ready = false;
            json!({"accepted": false, "reason": reason, "held_projects_only": false})
        }
        (None, Ok(())) => json!({"accepted": true}),
        (None, Err(refusal)) => {
            let refused = match &refusal {
                StorageError::Backlog {
                    projector,
                    pending,
                    limit,
                } => storage::refused(
                    &state.storage.snapshot(),
                    projector,
                    (*pending, *limit),
                    &state.storage.held_by(projector),
                ),
                _ => Refused::Everyone,
            };
            if refused == Refused::Nobody {
                json!({"accepted": true})
            } else {
                all_ready = false;
                json!({"accepted": false, "reason": refusal.to_string(),
                    "held_projects_only": refused == Refused::HeldProjects})
            }
        }
    };
    let serving = storage["reachable"] == true;
    let mut body = json!({
        "status": if !serving { "unavailable" } else if all_ready { "ready" } else { "degraded" },
        "storage": storage,
        "writes": writes,
        "projectors": projectors,
    });
    if let Some(broker) = &state.broker {
        body["queue"] = json!({
            "transport": "rabbitmq",
            "namespace": broker.settings.namespace,
            "external": broker.settings.external,
            "links": links,
        });
    }
    Readiness {
        body,
        serving,
        all_ready,
    }
}

/// Most dead letters one answer lists (each holds a whole item).
const MAX_DEAD_LETTERS: usize = 1000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterParams {
    limit: Option<usize>,
    projector: Option<String>,
    after: Option<String>,
}

/// GET /_dead_letters?projector=&limit=&after=: the tasks a store refused for good, with the
/// reason, oldest first; `next`, when there may be more, is the `after` of the next page.
pub async fn dead_letters(
    state: State,
    params: Query<DeadLetterParams>,
) -> Result<HttpResponse, ApiError> {
    list_dead_letters(&state, None, &params).await
}

/// GET /{project}/_dead_letters?projector=&limit=&after=: the project's dead letters only, for a
/// key that reaches that project (the listing of every project's letters needs one that reaches
/// them all). A page may hold fewer than `limit` letters and still have a `next`.
pub async fn project_dead_letters(
    state: State,
    path: web::Path<String>,
    params: Query<DeadLetterParams>,
) -> Result<HttpResponse, ApiError> {
    let project = known_project(&state, &path).await?;
    list_dead_letters(&state, Some(&project), &params).await
}

async fn list_dead_letters(
    state: &State,
    project: Option<&Ident>,
    params: &DeadLetterParams,
) -> Result<HttpResponse, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=MAX_DEAD_LETTERS).contains(&limit) {
        return Err(ApiError::bad_request(
            "limit",
            format!("limit={limit} is not between 1 and {MAX_DEAD_LETTERS}"),
        ));
    }
    let filter = letter_filter(state, project, params.projector.as_deref())?;
    let (letters, next) = state
        .storage
        .dead_letters(filter, params.after.as_deref(), limit)
        .await?;
    // Counted against the in-flight budget until sent, as a page of the change feed is.
    super::body::held_json(
        state,
        "the page of dead letters",
        &DeadLetters {
            dead_letters: &letters,
            next,
        },
    )
}

/// The answer of `GET /_dead_letters`, written as it is: a task's documents are JSON text, copied
/// into the answer, never read again into values (which serde refuses past 128 levels, so a
/// document nested that deep, as journals written before dstore bounded every value could hold,
/// would fail the whole listing).
#[derive(serde::Serialize)]
struct DeadLetters<'a> {
    dead_letters: &'a [crate::journal::DeadLetter],
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// The letters of `project` and `projector` (every one's when not given); a 404 unless the
/// projector is enabled.
fn letter_filter<'a>(
    state: &State,
    project: Option<&'a Ident>,
    projector: Option<&'a str>,
) -> Result<LetterFilter<'a>, ApiError> {
    if let Some(name) = projector {
        known_projector(state, name)?;
    }
    Ok(LetterFilter {
        projector,
        project: project.map(Ident::as_str),
    })
}

/// A 404 unless `name` is an enabled projector.
fn known_projector(state: &State, name: &str) -> Result<(), ApiError> {
    if state.registry.names().contains(&name) {
        return Ok(());
    }
    Err(ApiError::NotFound(format!(
        "projector {:?} is not enabled; enabled: {}",
        crate::blueprint::value::excerpt_str(name),
        state.registry.names().join(", ")
    )))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryParams {
    projector: Option<String>,
}

/// POST /_dead_letters/_retry?projector=: queues the dead letters again once their cause is fixed.
pub async fn retry_dead_letters(
    state: State,
    params: Query<RetryParams>,
) -> Result<HttpResponse, ApiError> {
    retry(&state, None, &params).await
}

/// POST /{project}/_dead_letters/_retry?projector=: queues the project's dead letters again.
pub async fn retry_project_dead_letters(
    state: State,
    path: web::Path<String>,
    params: Query<RetryParams>,
) -> Result<HttpResponse, ApiError> {
    let project = known_project(&state, &path).await?;
    retry(&state, Some(&project), &params).await
}

async fn retry(
    state: &State,
    project: Option<&Ident>,
    params: &RetryParams,
) -> Result<HttpResponse, ApiError> {
    let filter = letter_filter(state, project, params.projector.as_deref())?;
    let retried = state.storage.retry_dead_letters(filter).await?;
    Ok(HttpResponse::Ok().json(json!({"retried": retried})))
}

/// The project named in the path; a 404 unless it exists. Deleting a project deletes its letters,
/// but a store that refuses the deletion leaves one for it, listed by `GET /_dead_letters` (and
/// here once the name is made again, where a retry leaves it: it would delete the new project).
async fn known_project(state: &State, raw: &str) -> Result<Ident, ApiError> {
    let project = super::ident("project", raw)?;
    let snapshot = state.storage.fresh_snapshot(&project).await?;
    if !snapshot.projects.contains_key(&project) {
        return Err(ApiError::NotFound(format!(
            "project {:?} does not exist",
            project.as_str()
        )));
    }
    Ok(project)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::task::{Task, TaskOp, VersionDoc};
    use crate::journal::DeadLetter;

    #[test]
    fn a_dead_letter_of_a_document_past_serdes_depth_is_listed_as_it_is() {
        let deep = (0..200).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]));
        let task = Task {
            seq: 1,
            project: crate::blueprint::Ident::parse("p").unwrap(),
            op: TaskOp::Upsert {
                blueprint: crate::blueprint::Ident::parse("b").unwrap(),
                id: uuid::Uuid::nil(),
                revision: 1,
                docs: vec![VersionDoc::new(1, &serde_json::json!({ "c": deep }))],
            },
        };
        let letters = [DeadLetter {
            projector: "postgresql".into(),
            seq: 1,
            task: Some(task),
            reason: "refused".into(),
            at: "2026-12-06T00:00:00Z".into(),
        }];
        let text = serde_json::to_string(&DeadLetters {
            dead_letters: &letters,
            next: None,
        })
        .expect("written as it is");
        let brackets = "[".repeat(200) + "1" + &"]".repeat(200);
        assert!(
            text.contains(&format!("\"doc\":{{\"c\":{brackets}}}")),
            "{text}"
        );
    }
}
