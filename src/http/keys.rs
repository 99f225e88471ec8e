//! API keys (`/_keys`, the `keys.manage` action or a master key) and the audit log (`/_audit`,
//! the `operations` action). A key's secret is answered once, when it is made or rotated; every
//! other answer shows the key without it.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::query::{NoQuery, Query};
use super::{body, State};
use crate::auth::keys::{KeyInput, KeyStore};

/// Most audit entries one answer holds.
const MAX_AUDIT: usize = 10_000;

fn store(state: &State) -> Result<&KeyStore, ApiError> {
    state.keys.as_deref().ok_or_else(|| {
        ApiError::Conflict(
            "authentication is off (no master key): there are no API keys to manage".into(),
        )
    })
}

/// What the body says, or a 422 naming the member at fault without repeating a long input. Only
/// a refusal reads the members one by one, to find which.
fn input(body: &serde_json::Value) -> Result<KeyInput, ApiError> {
    let error = match serde_json::from_value::<KeyInput>(body.clone()) {
        Ok(input) => return Ok(input),
        Err(error) => error,
    };
    let excerpt = crate::blueprint::value::excerpt_str;
    let refused = |path: String, message: String| {
        ApiError::Invalid(
            "invalid key".into(),
            vec![crate::blueprint::FieldError::new(path, message)],
        )
    };
    let culprit = body
        .as_object()
        .into_iter()
        .flatten()
        .find_map(|(name, value)| {
            let one =
                serde_json::Value::Object([(name.clone(), value.clone())].into_iter().collect());
            serde_json::from_value::<KeyInput>(one)
                .err()
                .map(|error| (name, error.to_string()))
        });
    Err(match culprit {
        Some((name, error)) => {
            // serde's own refusal of an unknown member repeats it whole.
            let message = match super::query::unknown(&error) {
                Some(takes) => format!("unknown member; {takes}"),
                None => excerpt(&error),
            };
            refused(format!("/{}", excerpt(name)), message)
        }
        // Not an object: serde would name the type it reads a key into.
        None if !body.is_object() => refused(
            "".into(),
            "must be an object of a key's fields (name, description, actions, projects, \
             expires_at)"
                .into(),
        ),
        None => refused("".into(), excerpt(&error.to_string())),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Most keys answered (default and most: [`KEYS_PAGE`]).
    limit: Option<usize>,
    /// The id of the last key of the page before (its `next`).
    after: Option<String>,
}

/// Most keys one `GET /_keys` answers: each may take about 12 KB, and a deployment may hold
/// 10,000.
const KEYS_PAGE: usize = 1000;

/// GET /_keys?limit=&after=: the keys, oldest first, a page at a time; `next` is the `after` of
/// the next page, when there is one.
pub async fn list(state: State, params: Query<ListParams>) -> Result<HttpResponse, ApiError> {
    let limit = params.limit.unwrap_or(KEYS_PAGE);
    if limit == 0 || limit > KEYS_PAGE {
        return Err(ApiError::bad_request(
            "limit",
            format!("limit={limit} is not between 1 and {KEYS_PAGE}"),
        ));
    }
    let Some((keys, next)) = store(&state)?.list_page(params.after.as_deref(), limit) else {
        return Err(ApiError::bad_request(
            "after",
            format!(
                "after={:?} names no key (revoked since?): list again from the first page",
                crate::blueprint::value::excerpt_str(params.after.as_deref().unwrap_or_default())
            ),
        ));
    };
    let keys: Vec<_> = keys.iter().map(|k| k.to_public()).collect();
    let mut answer = json!({ "keys": keys });
    if let Some(next) = next {
        answer["next"] = json!(next);
    }
    Ok(HttpResponse::Ok().json(answer))
}

/// POST /_keys: answers the key with its secret, shown this once.
pub async fn create(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = body::json(&state, &request, payload).await?;
    let by = super::auth::caller(&request);
    let (key, secret) = store(&state)?.create(&by, input(&body)?).await?;
    let mut answer = key.to_public();
    answer["key"] = json!(secret);
    let mut response = HttpResponse::Created().insert_header(NO_STORE).json(answer);
    response
        .extensions_mut()
        .insert(super::auth::Created(key.id.clone()));
    Ok(response)
}

/// GET /_keys/{id}
pub async fn show(
    _: NoQuery,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(store(&state)?.get(&path).await?.to_public()))
}

/// PATCH /_keys/{id}
pub async fn update(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = body::json(&state, &request, payload).await?;
    let by = super::auth::caller(&request);
    let key = store(&state)?.update(&by, &path, input(&body)?).await?;
    Ok(HttpResponse::Ok().json(key.to_public()))
}

/// DELETE /_keys/{id}: revokes the key at once.
pub async fn revoke(
    _: NoQuery,
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key = store(&state)?
        .delete(&super::auth::caller(&request), &path)
        .await?;
    Ok(HttpResponse::Ok().json(json!({"revoked": true, "id": key.id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateParams {
    /// Seconds the old secret stays valid (default `auth.rotation_grace_secs`).
    grace: Option<u64>,
}

/// POST /_keys/{id}/_rotate: a new secret, shown once; the old one stays valid for the grace.
pub async fn rotate(
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
    params: Query<RotateParams>,
) -> Result<HttpResponse, ApiError> {
    let grace = params
        .grace
        .unwrap_or(state.settings.auth.rotation_grace_secs);
    if grace > 30 * 86_400 {
        return Err(ApiError::bad_request(
            "grace",
            format!("grace={grace} is more than 30 days"),
        ));
    }
    let (key, secret) = store(&state)?
        .rotate(
            &super::auth::caller(&request),
            &path,
            Duration::from_secs(grace),
        )
        .await?;
    let mut answer = key.to_public();
    answer["key"] = json!(secret);
    Ok(HttpResponse::Ok().insert_header(NO_STORE).json(answer))
}

/// On an answer that carries a new secret: no cache on the way (a proxy, a browser's) keeps it.
const NO_STORE: (actix_web::http::header::HeaderName, &str) =
    (actix_web::http::header::CACHE_CONTROL, "no-store");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// RFC 3339; default: a day ago.
    since: Option<String>,
    limit: Option<usize>,
}

/// GET /_audit?since=&limit=: who changed what, oldest first.
pub async fn audit(state: State, params: Query<AuditParams>) -> Result<HttpResponse, ApiError> {
    let since = match &params.since {
        None => Utc::now() - chrono::Duration::days(1),
        Some(raw) => DateTime::parse_from_rfc3339(raw)
            .map_err(|_| {
                ApiError::bad_request(
                    "since",
                    format!(
                        "since={:?} is not an RFC 3339 time",
                        crate::blueprint::value::excerpt_str(raw)
                    ),
                )
            })?
            .with_timezone(&Utc),
    };
    let limit = params.limit.unwrap_or(1000);
    if !(1..=MAX_AUDIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "limit",
            format!("limit={limit} is not between 1 and {MAX_AUDIT}"),
        ));
    }
    let entries = state.storage.audit(since, limit).await?;
    Ok(HttpResponse::Ok().json(json!({ "entries": entries })))
}
