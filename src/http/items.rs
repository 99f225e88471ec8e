//! Item routes: upsert, create, read, delete, and `_bulk`.
//!
//! Writes are prepared against one catalog snapshot (see `crate::items`) and journaled; when the set of
//! live versions changed in between, the journal refuses the write and it is prepared again. With
//! `?wait=true` the answer waits until every projector has applied the write (at most `timeout`
//! seconds, default `projection.wait_timeout_secs`); on time-out it answers 202 and the write stays
//! safely queued.

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::error::ApiError;
use super::{body, ident, version_number, State};
use crate::blueprint::{FieldError, Ident};
use crate::catalog::Snapshot;
use crate::items::{prepare_delete, prepare_upsert, read_at, ItemError};
use crate::journal::{Entry, JournalError};

impl From<ItemError> for ApiError {
    fn from(error: ItemError) -> Self {
        match error {
            ItemError::NotFound(m) => ApiError::NotFound(m),
            ItemError::Invalid(errors) => ApiError::Invalid("invalid item".into(), errors),
            ItemError::Journal(e) => e.into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    #[serde(default)]
    wait: bool,
    timeout: Option<u64>,
}

fn write_params(request: &HttpRequest) -> Result<WriteParams, ApiError> {
    web::Query::<WriteParams>::from_query(request.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| {
            ApiError::bad_request(
                "",
                format!(
                    "invalid query string: {e}; expected wait=true|false and timeout=<seconds>"
                ),
            )
        })
}

fn item_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request("id", format!("item id {raw:?} is not a uuid")))
}

/// Journals entries prepared by `prepare`, preparing them again while the live versions move.
async fn journal<T>(
    state: &State,
    project: &Ident,
    mut prepare: impl FnMut(&Snapshot) -> Result<(Vec<Entry>, T), ApiError>,
) -> Result<(Vec<u64>, T), ApiError> {
    for _ in 0..8 {
        let snapshot = state.catalog.snapshot();
        let (entries, extra) = prepare(&snapshot)?;
        if entries.is_empty() {
            return Ok((Vec::new(), extra));
        }
        match state
            .journal
            .write(snapshot.epoch, project.clone(), entries)
            .await
        {
            Err(JournalError::Stale) => continue,
            Ok(revisions) => return Ok((revisions, extra)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Unavailable(
        "the project's versions kept changing while the write was prepared; try again".into(),
    ))
}

/// Adds `projected` (and answers 202 when the projectors did not catch up in time).
async fn answer(
    state: &State,
    params: &WriteParams,
    mut body: Map<String, Value>,
    last: u64,
    status: actix_web::http::StatusCode,
) -> HttpResponse {
    let (status, projection) = projection(state, params, last, status).await;
    body.extend(projection);
    HttpResponse::build(status).json(body)
}

/// With `wait=true`, waits until every projector applied `last`: the status to answer (202 on
/// time-out) and the fields saying so, `projected` and `pending`.
async fn projection(
    state: &State,
    params: &WriteParams,
    last: u64,
    status: actix_web::http::StatusCode,
) -> (actix_web::http::StatusCode, Map<String, Value>) {
    let mut fields = Map::new();
    if !params.wait {
        return (status, fields);
    }
    let timeout = params
        .timeout
        .map_or_else(|| state.wait_timeout(), Duration::from_secs);
    match state.journal.wait_projected(last, timeout).await {
        Ok(()) => {
            fields.insert("projected".into(), Value::Bool(true));
            (status, fields)
        }
        Err(behind) => {
            fields.insert("projected".into(), Value::Bool(false));
            fields.insert("pending".into(), json!(behind));
            (actix_web::http::StatusCode::ACCEPTED, fields)
        }
    }
}

fn success(id: &Uuid, revision: u64) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("success".into(), Value::Bool(true));
    body.insert("id".into(), Value::String(id.to_string()));
    body.insert("revision".into(), Value::from(revision));
    body
}

async fn upsert(
    state: State,
    request: HttpRequest,
    project: Ident,
    blueprint: Ident,
    id: Uuid,
    payload: web::Payload,
    status: actix_web::http::StatusCode,
) -> Result<HttpResponse, ApiError> {
    let params = write_params(&request)?;
    let body = body::json(&request, payload, state.settings.server.max_body_bytes).await?;
    let (revisions, ()) = journal(&state, &project, |snapshot| {
        Ok((
            vec![prepare_upsert(snapshot, &project, &blueprint, id, &body)?],
            (),
        ))
    })
    .await?;
    Ok(answer(
        &state,
        &params,
        success(&id, revisions[0]),
        revisions[0],
        status,
    )
    .await)
}

/// PUT /{project}/{blueprint}/{id}
pub async fn put(
    state: State,
    request: HttpRequest,
    path: web::Path<(String, String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (project, blueprint) = (ident("project", &path.0)?, ident("blueprint", &path.1)?);
    let id = item_id(&path.2)?;
    upsert(
        state,
        request,
        project,
        blueprint,
        id,
        payload,
        actix_web::http::StatusCode::OK,
    )
    .await
}

/// POST /{project}/{blueprint}: creates an item with a generated id.
pub async fn create(
    state: State,
    request: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (project, blueprint) = (ident("project", &path.0)?, ident("blueprint", &path.1)?);
    upsert(
        state,
        request,
        project,
        blueprint,
        Uuid::now_v7(),
        payload,
        actix_web::http::StatusCode::CREATED,
    )
    .await
}

/// DELETE /{project}/{blueprint}/{id}: deleting a missing item is not an error.
pub async fn delete(
    state: State,
    request: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project, blueprint) = (ident("project", &path.0)?, ident("blueprint", &path.1)?);
    let id = item_id(&path.2)?;
    let params = write_params(&request)?;
    let (revisions, found) = journal(&state, &project, |snapshot| {
        let existing = state.journal.item(&project, &blueprint, &id)?;
        let entry = prepare_delete(snapshot, &project, &blueprint, id, existing.as_ref())?;
        Ok((vec![entry], existing.is_some()))
    })
    .await?;
    let mut body = success(&id, revisions[0]);
    body.insert("found".into(), Value::Bool(found));
    Ok(answer(
        &state,
        &params,
        body,
        revisions[0],
        actix_web::http::StatusCode::OK,
    )
    .await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    version: Option<String>,
}

/// GET /{project}/{blueprint}/{id}?version=N
pub async fn get(
    state: State,
    request: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (project, blueprint) = (ident("project", &path.0)?, ident("blueprint", &path.1)?);
    let id = item_id(&path.2)?;
    let params = web::Query::<ReadParams>::from_query(request.query_string()).map_err(|e| {
        ApiError::bad_request(
            "",
            format!("invalid query string: {e}; expected version=<number>"),
        )
    })?;
    let version = params.version.as_deref().map(version_number).transpose()?;
    let snapshot = state.catalog.snapshot();
    snapshot.project(&project)?;
    let record = state
        .journal
        .item(&project, &blueprint, &id)?
        .ok_or_else(|| {
            ApiError::NotFound(format!("item {id} does not exist in {project}/{blueprint}"))
        })?;
    let doc = read_at(&snapshot, &project, &blueprint, &record, version)?;
    Ok(HttpResponse::Ok()
        .insert_header(("x-dstore-revision", record.revision.to_string()))
        .json(doc))
}

/// One line pair of a `_bulk` body.
struct BulkOp {
    action: &'static str,
    blueprint: Option<Ident>,
    id: Option<Uuid>,
    body: Option<Value>,
    /// A problem found while reading the request: status and errors.
    error: Option<(u16, Vec<FieldError>)>,
}

/// POST /{project}/_bulk
///
/// NDJSON: an action line `{"put": {"blueprint": "article", "id": "…"}}`, `{"create": {"blueprint":
/// "article"}}` or `{"delete": {"blueprint": "article", "id": "…"}}`, followed for `put` and `create`
/// by the item on the next line. Each operation succeeds or fails on its own; the valid ones are
/// journaled together.
pub async fn bulk(
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let project = ident("project", &path)?;
    let params = write_params(&request)?;
    let raw = body::read(&request, payload, state.settings.server.max_bulk_bytes).await?;
    state.catalog.snapshot().project(&project)?;
    let ops = parse_bulk(&raw)?;
    let (revisions, outcomes) = journal(&state, &project, |snapshot| {
        let mut entries = Vec::with_capacity(ops.len());
        let mut outcomes: Vec<Result<usize, (u16, Vec<FieldError>)>> =
            Vec::with_capacity(ops.len());
        for op in &ops {
            outcomes.push(match prepare_op(&state, snapshot, &project, op) {
                Ok(entry) => {
                    entries.push(entry);
                    Ok(entries.len() - 1)
                }
                Err(e) => Err(e),
            });
        }
        Ok((entries, outcomes))
    })
    .await?;
    let items: Vec<BulkResult> = ops
        .iter()
        .zip(outcomes)
        .map(|(op, outcome)| match outcome {
            Ok(index) => BulkResult {
                action: op.action,
                id: op.id,
                status: if op.action == "create" { 201 } else { 200 },
                revision: Some(revisions[index]),
                errors: None,
            },
            Err((status, errors)) => BulkResult {
                action: op.action,
                id: op.id,
                status,
                revision: None,
                errors: Some(errors),
            },
        })
        .collect();
    let last = revisions.iter().copied().max().unwrap_or(0);
    let (status, projection) =
        projection(&state, &params, last, actix_web::http::StatusCode::OK).await;
    Ok(HttpResponse::build(status).json(BulkAnswer {
        took_ms: started.elapsed().as_millis() as u64,
        errors: items.iter().any(|item| item.errors.is_some()),
        items,
        projection,
    }))
}

/// The answer to `_bulk`, serialized straight from these structs (it can hold many thousands of
/// results).
#[derive(Serialize)]
struct BulkAnswer {
    took_ms: u64,
    errors: bool,
    items: Vec<BulkResult>,
    #[serde(flatten)]
    projection: Map<String, Value>,
}

/// `{"put": {"id": …, "status": 200, "revision": R}}`, or with `errors` instead of `revision`.
struct BulkResult {
    action: &'static str,
    id: Option<Uuid>,
    status: u16,
    revision: Option<u64>,
    errors: Option<Vec<FieldError>>,
}

impl Serialize for BulkResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Outcome<'a> {
            id: Option<Uuid>,
            status: u16,
            #[serde(skip_serializing_if = "Option::is_none")]
            revision: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            errors: Option<&'a [FieldError]>,
        }
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(
            self.action,
            &Outcome {
                id: self.id,
                status: self.status,
                revision: self.revision,
                errors: self.errors.as_deref(),
            },
        )?;
        map.end()
    }
}

fn prepare_op(
    state: &State,
    snapshot: &Snapshot,
    project: &Ident,
    op: &BulkOp,
) -> Result<Entry, (u16, Vec<FieldError>)> {
    if let Some(error) = &op.error {
        return Err(error.clone());
    }
    let (blueprint, id) = (
        op.blueprint.as_ref().expect("checked"),
        op.id.expect("checked"),
    );
    let result = match op.action {
        "delete" => state
            .journal
            .item(project, blueprint, &id)
            .map_err(ItemError::from)
            .and_then(|existing| {
                prepare_delete(snapshot, project, blueprint, id, existing.as_ref())
            }),
        _ => prepare_upsert(
            snapshot,
            project,
            blueprint,
            id,
            op.body.as_ref().expect("checked"),
        ),
    };
    result.map_err(|e| match e {
        ItemError::NotFound(m) => (404, vec![FieldError::new("", m)]),
        ItemError::Invalid(errors) => (422, errors),
        ItemError::Journal(e) => {
            let error = ApiError::from(e);
            let status = actix_web::ResponseError::status_code(&error).as_u16();
            let message = if status >= 500 && status != 503 {
                tracing::error!(cause = %error, "bulk operation failed");
                "internal error; the cause is in the server log".to_string()
            } else {
                error.to_string()
            };
            (status, vec![FieldError::new("", message)])
        }
    })
}

fn parse_bulk(raw: &[u8]) -> Result<Vec<BulkOp>, ApiError> {
    let mut lines = raw
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace));
    let mut ops = Vec::new();
    while let Some((number, line)) = lines.next() {
        let bad = |message: String| ApiError::bad_request(&format!("/line/{number}"), message);
        let action: Value =
            serde_json::from_slice(line).map_err(|e| bad(format!("malformed action line: {e}")))?;
        let (name, meta) = match action
            .as_object()
            .map(|o| o.iter().collect::<Vec<_>>())
            .as_deref()
        {
            Some([(name, meta)]) => (name.as_str(), *meta),
            _ => {
                return Err(bad(
                    "an action line is an object with one key: put, create or delete".into(),
                ))
            }
        };
        let action = match name {
            "put" | "index" => "put",
            "create" => "create",
            "delete" => "delete",
            other => {
                return Err(bad(format!(
                    "unknown action {other:?}; expected put, create or delete"
                )))
            }
        };
        let mut op = BulkOp {
            action,
            blueprint: None,
            id: None,
            body: None,
            error: None,
        };
        if action != "delete" {
            let Some((_, doc)) = lines.next() else {
                return Err(bad(format!(
                    "the {action} action has no item line after it"
                )));
            };
            match serde_json::from_slice(doc) {
                Ok(doc) => op.body = Some(doc),
                Err(e) => {
                    op.error = Some((
                        400,
                        vec![FieldError::new("", format!("malformed JSON: {e}"))],
                    ))
                }
            }
        }
        let mut problems = Vec::new();
        match meta
            .get("blueprint")
            .and_then(Value::as_str)
            .map(Ident::parse)
        {
            Some(Ok(bp)) => op.blueprint = Some(bp),
            Some(Err(reason)) => problems.push(FieldError::new("/blueprint", reason)),
            None => problems.push(FieldError::new("/blueprint", "is required")),
        }
        match (action, meta.get("id")) {
            ("create", None) => op.id = Some(Uuid::now_v7()),
            ("create", Some(_)) => problems.push(FieldError::new(
                "/id",
                "create generates the id; use put to choose one",
            )),
            (_, Some(Value::String(raw))) => match Uuid::parse_str(raw) {
                Ok(id) => op.id = Some(id),
                Err(_) => problems.push(FieldError::new("/id", format!("{raw:?} is not a uuid"))),
            },
            (_, _) => problems.push(FieldError::new("/id", "is required: a uuid")),
        }
        if let Some(unknown) = meta.as_object().and_then(|m| {
            m.keys()
                .find(|k| !["blueprint", "id"].contains(&k.as_str()))
        }) {
            problems.push(FieldError::new(
                format!("/{unknown}"),
                "unknown key; expected blueprint and id",
            ));
        }
        if !problems.is_empty() && op.error.is_none() {
            op.error = Some((400, problems));
        }
        ops.push(op);
    }
    Ok(ops)
}
