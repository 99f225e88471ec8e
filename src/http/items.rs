//! Item routes: upsert, create, read, delete, and `_bulk`: parse the request, call `crate::write`,
//! answer. With
//! `?wait=true` the answer waits until every projector has applied the write (at most `timeout`
//! seconds, default `projection.wait_timeout_secs`); on time-out it answers 202 and the write stays
//! safely queued.

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::error::ApiError;
use super::{body, ident, version_number, State};
use crate::blueprint::{FieldError, Ident};
use crate::bulk::Action;
use crate::write::{self, read_at};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    #[serde(default)]
    wait: bool,
    timeout: Option<u64>,
}

/// The longest `?timeout=` a write may wait for the stores, in seconds.
pub const MAX_WAIT_SECS: u64 = 3600;

fn write_params(request: &HttpRequest) -> Result<WriteParams, ApiError> {
    refuse_preconditions(request)?;
    let params = super::query::read::<WriteParams>(request.query_string())?;
    if let Some(timeout) = params.timeout.filter(|t| *t > MAX_WAIT_SECS) {
        return Err(ApiError::bad_request(
            "timeout",
            format!("timeout={timeout} is more than {MAX_WAIT_SECS} seconds"),
        ));
    }
    Ok(params)
}

/// Refuses a write that carries a precondition (RFC 9110 §13): a server must evaluate one before
/// it performs the method or not perform it, and dstore has no entity tags to evaluate it with.
/// Written anyway, a client guarding its update with `If-Match` would overwrite a newer write
/// without a word.
fn refuse_preconditions(request: &HttpRequest) -> Result<(), ApiError> {
    use actix_web::http::header;
    let headers = request.headers();
    let named = [
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_MODIFIED_SINCE,
    ]
    .into_iter()
    .find(|name| headers.contains_key(name));
    match named {
        Some(name) => Err(ApiError::bad_request(
            name.as_str(),
            format!(
                "dstore does not evaluate the precondition {name}: item writes take no entity \
                 tags, so nothing was written; send the write without it"
            ),
        )),
        None => Ok(()),
    }
}

/// The answers' content type, as a ready header value: `ContentType::json()` writes its media type
/// out again for every answer (about 0.6k instructions per PUT).
const JSON: actix_web::http::header::HeaderValue =
    actix_web::http::header::HeaderValue::from_static("application/json");

fn item_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        // An excerpt: the id is the client's, as long as the URL limit lets it be.
        let raw = crate::blueprint::value::excerpt_str(raw);
        ApiError::bad_request("id", format!("item id {raw:?} is not a uuid"))
    })
}

/// Answers a write: `success`, `id`, `revision` (and `found` for a delete, `not_in_versions` for an
/// upsert some live version cannot hold), then `projected` and what goes with it (answering 202
/// when the projectors did not catch up in time). Written directly, as the `_bulk` answer is: one
/// answer per PUT.
async fn answer(
    state: &State,
    params: &WriteParams,
    written: Written<'_>,
    project: &Ident,
    status: actix_web::http::StatusCode,
) -> HttpResponse {
    let (status, projection) =
        projection(state, params, project, &[written.revision], status).await;
    HttpResponse::build(status)
        .content_type(JSON)
        .body(written.to_json(&projection))
}

/// What every write answers (its `success` is always true: a failed write answers an error).
struct Written<'a> {
    id: &'a Uuid,
    revision: u64,
    found: Option<bool>,
    /// The live versions an upsert's item is not in (`write::Put::absent`), answered as
    /// `not_in_versions` when there are any.
    absent: &'a [u32],
}

impl Written<'_> {
    /// The answer's JSON text, `fields` after the write's own.
    fn to_json(&self, fields: &Map<String, Value>) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(b"{\"success\":true,\"id\":\"");
        let mut uuid = [0u8; 36];
        out.extend_from_slice(self.id.hyphenated().encode_lower(&mut uuid).as_bytes());
        out.extend_from_slice(b"\",\"revision\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.revision).as_bytes());
        match self.found {
            Some(true) => out.extend_from_slice(b",\"found\":true"),
            Some(false) => out.extend_from_slice(b",\"found\":false"),
            None => {}
        }
        if !self.absent.is_empty() {
            out.extend_from_slice(b",\"not_in_versions\":");
            serde_json::to_writer(&mut out, self.absent).expect("numbers serialize");
        }
        push_fields(&mut out, fields);
        out.push(b'}');
        out
    }
}

/// Appends `fields` to a JSON object being written (`,"key":value` each), through serde.
fn push_fields(out: &mut Vec<u8>, fields: &Map<String, Value>) {
    for (key, value) in fields {
        out.push(b',');
        serde_json::to_writer(&mut *out, key).expect("keys serialize");
        out.push(b':');
        serde_json::to_writer(&mut *out, value).expect("values serialize");
    }
}

/// With `wait=true`, waits until every projector settled the writes `revisions`: the status to
/// answer (202 on time-out, naming the projectors behind in `pending`) and the fields saying so.
/// `projected` is true when every store applied every write; a write a store refused for good (a
/// dead letter) makes it false and is listed in `refused` with the store's reason, on time-out too,
/// under the write's own status: the write is durable and in every other store, and
/// `POST /_dead_letters/_retry` applies it once the cause is fixed.
async fn projection(
    state: &State,
    params: &WriteParams,
    project: &Ident,
    revisions: &[u64],
    status: actix_web::http::StatusCode,
) -> (actix_web::http::StatusCode, Map<String, Value>) {
    let mut fields = Map::new();
    if !params.wait {
        return (status, fields);
    }
    let timeout = params
        .timeout
        .map_or_else(|| state.wait_timeout(), Duration::from_secs);
    let last = revisions.iter().copied().max().unwrap_or(0);
    let (status, settled) = match state.storage.wait_projected(project, last, timeout).await {
        Ok(()) => (status, true),
        Err(behind) => {
            fields.insert("pending".into(), json!(behind));
            (actix_web::http::StatusCode::ACCEPTED, false)
        }
    };
    // Stores that settled the writes may have refused some, also when others are still behind.
    let refused = match state.storage.refusals(project, revisions).await {
        Ok(refused) => Some(refused),
        Err(error) => {
            tracing::warn!(%error, "could not read which writes a store refused");
            None
        }
    };
    // Whether a store refused is unknown when the read failed: nothing claims the writes applied.
    let applied = settled && refused.as_ref().is_some_and(Vec::is_empty);
    fields.insert("projected".into(), Value::Bool(applied));
    if let Some(refused) = refused.filter(|r| !r.is_empty()) {
        fields.insert("refused".into(), json!(refused));
    }
    (status, fields)
}

fn success(id: &Uuid, revision: u64) -> Written<'_> {
    Written {
        id,
        revision,
        found: None,
        absent: &[],
    }
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
    // The write makes its item's record and a document per live version.
    let documents = 1 + live_versions(&state, &project);
    let body = body::item(&state, &request, payload, documents).await?;
    let length = body.length();
    // The parsed body is held until the journal has the write, and its documents beside it.
    let holding = body.holding();
    let put = write::put_item(
        state.storage.as_ref(),
        &project,
        &blueprint,
        id,
        body,
        length,
        &|documents| holding.documents(documents),
    )
    .await?;
    // The journal has the write: a wait for the stores holds none of the request memory.
    drop(holding);
    let written = Written {
        absent: &put.absent,
        ..success(&id, put.revision)
    };
    Ok(answer(&state, &params, written, &project, status).await)
}

/// How many live versions `project` has (0 when it does not exist: the write is refused before
/// anything is prepared), for the documents a write into it makes.
fn live_versions(state: &State, project: &Ident) -> usize {
    state
        .storage
        .snapshot()
        .projects
        .get(project)
        .map_or(0, |p| p.live_versions().count())
}

/// An item request's parts, checked in the order the item route checked them: its method (PUT,
/// GET or DELETE, else 405), then the project, the blueprint and the id.
fn item_request(
    request: &HttpRequest,
    [project, blueprint, id]: [&str; 3],
) -> Result<(Ident, Ident, Uuid), ApiError> {
    use actix_web::http::Method;
    if ![Method::GET, Method::PUT, Method::DELETE].contains(request.method()) {
        return Err(ApiError::MethodNotAllowed("GET, PUT, DELETE".into()));
    }
    Ok((
        ident("project", project)?,
        ident("blueprint", blueprint)?,
        item_id(id)?,
    ))
}

/// PUT, GET or DELETE `/{project}/{blueprint}/{id}`, once [`item_request`] has checked it.
async fn item(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
    (project, blueprint, id): (Ident, Ident, Uuid),
) -> Result<HttpResponse, ApiError> {
    use actix_web::http::Method;
    match *request.method() {
        Method::PUT => {
            let ok = actix_web::http::StatusCode::OK;
            upsert(state, request, project, blueprint, id, payload, ok).await
        }
        Method::GET => read(state, request, project, blueprint, id).await,
        _ => remove(state, request, project, blueprint, id).await,
    }
}

/// `/{project}/{blueprint}/{id}` for a plain path (`super::plain_item_path`: three segments, none
/// `_`-prefixed or percent-encoded), reached without the route table: the segments are read from
/// the path as sent, which for such a path is what the router would decode. Matching the item
/// route's pattern and extracting its parts cost about a tenth of a PUT's work in the HTTP workers
/// (docs/performance.md).
pub async fn plain(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let parts = {
        let path = request.path();
        let mut segments = path.strip_prefix('/').unwrap_or(path).split('/');
        let mut next = || segments.next().unwrap_or_default();
        item_request(&request, [next(), next(), next()])?
    };
    item(state, request, payload, parts).await
}

/// `/{project}/{blueprint}/{id}` through the route table: the paths [`plain`] does not take
/// (percent-encoded ones), their parts decoded by the router.
pub async fn routed(
    state: State,
    request: HttpRequest,
    path: web::Path<(String, String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let parts = item_request(&request, [&path.0, &path.1, &path.2])?;
    item(state, request, payload, parts).await
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
async fn remove(
    state: State,
    request: HttpRequest,
    project: Ident,
    blueprint: Ident,
    id: Uuid,
) -> Result<HttpResponse, ApiError> {
    let params = write_params(&request)?;
    let (revision, found) =
        write::delete_item(state.storage.as_ref(), &project, &blueprint, id).await?;
    let written = Written {
        found: Some(found),
        ..success(&id, revision)
    };
    let ok = actix_web::http::StatusCode::OK;
    Ok(answer(&state, &params, written, &project, ok).await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    version: Option<String>,
}

/// GET /{project}/{blueprint}/{id}?version=N
async fn read(
    state: State,
    request: HttpRequest,
    project: Ident,
    blueprint: Ident,
    id: Uuid,
) -> Result<HttpResponse, ApiError> {
    let params = super::query::read::<ReadParams>(request.query_string())?;
    let version = params
        .version
        .as_deref()
        .map(|raw| version_number("version", raw))
        .transpose()?;
    let mut snapshot = state.storage.snapshot();
    if !snapshot.projects.contains_key(&project) {
        // Perhaps made through another node a moment ago.
        snapshot = state.storage.fresh_snapshot(&project).await?;
    }
    snapshot.project(&project)?;
    let stored = state
        .storage
        .item_bytes(&project, &blueprint, &id)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("item {id} does not exist in {project}/{blueprint}"))
        })?;
    // The decoded item and its answer are counted until the answer is sent, as a write's body is
    // (`body::JSON_FACTOR` a stored byte at most, for the decoded tree): concurrent reads of large
    // items wait for memory as their writes did, instead of growing the process. A read never
    // takes more than answers may hold (three quarters of the budget, see `crate::budget`), so
    // an item too large to be read beside others is still read alone.
    let share = std::sync::Arc::new(state.in_flight.answer_share());
    share.grow(
        stored
            .len()
            .saturating_mul(body::JSON_FACTOR)
            .min(share.limit()),
    )?;
    let stored = std::sync::Arc::new(stored);
    let (revision, rendered) = match render(&snapshot, &project, &blueprint, &stored, version).await
    {
        Ok(rendered) => rendered,
        // The item may be of a version this node does not know yet.
        Err(_) => {
            let fresh = state.storage.fresh_snapshot(&project).await?;
            render(&fresh, &project, &blueprint, &stored, version).await?
        }
    };
    drop(stored);
    share.resize(rendered.len().min(share.limit()))?;
    Ok(HttpResponse::Ok()
        .insert_header(("x-dstore-revision", revision.to_string()))
        .content_type("application/json")
        .body(body::Held::new(rendered.into(), share)))
}

/// The revision of a stored item and its JSON as a client of `version` sees it ([`read_at`]);
/// a large item is decoded, transformed and serialized off the HTTP worker (`crate::aside`) in
/// one step, so no decoded item waits there for a place.
async fn render(
    snapshot: &std::sync::Arc<crate::catalog::Snapshot>,
    project: &Ident,
    blueprint: &Ident,
    stored: &std::sync::Arc<Vec<u8>>,
    version: Option<u32>,
) -> Result<(u64, Vec<u8>), ApiError> {
    let run = {
        let (snapshot, project, blueprint, stored) = (
            snapshot.clone(),
            project.clone(),
            blueprint.clone(),
            stored.clone(),
        );
        move || -> Result<(u64, Vec<u8>), ApiError> {
            let record = crate::journal::codec::decode_record(&stored)
                .map_err(crate::storage::StorageError::from)?;
            let doc = read_at(&snapshot, &project, &blueprint, &record, version)?;
            let rendered =
                serde_json::to_vec(&doc).map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok((record.revision, rendered))
        }
    };
    crate::aside::sized(stored.len(), run)
        .await
        .map_err(|e| ApiError::Internal(format!("reading the item: {e}")))?
}

/// POST /{project}/_bulk
///
/// NDJSON: an action line `{"put": {"blueprint": "article", "id": "…"}}`, `{"create": {"blueprint":
/// "article"}}` or `{"delete": {"blueprint": "article", "id": "…"}}`, followed for `put` and `create`
/// by the item on the next line. Each operation succeeds or fails on its own; the valid ones are
/// journaled in parts (`write::bulk`). Items are parsed, checked and encoded one at a time (see
/// `crate::bulk`).
pub async fn bulk(
    state: State,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let project = ident("project", &path)?;
    let params = write_params(&request)?;
    // The raw body is held while its entries are encoded, and its operations' outcomes; its
    // entries will hold each item's record and its document for every live version, a part at a
    // time.
    let documents = 1 + live_versions(&state, &project);
    let counted = bulk_counted(documents);
    let raw = body::read(
        &state,
        &request,
        payload,
        state.settings.server.max_bulk_bytes,
        counted,
    )
    .await
    .map_err(|error| match error {
        ApiError::Oversized(_) => bulk_too_large(&state, documents),
        other => other,
    })?;
    // Taken once the body is here, so a client that sends slowly holds no place, and given back
    // once the journal has the items, so one that waits for the projection holds none either.
    // The semaphore is never closed; the error exists only in its type.
    let place = state.bulk_places.acquire().await.map_err(|_| {
        ApiError::Unavailable("no place for a _bulk request is left; try again shortly".into())
    })?;
    let ops =
        crate::bulk::parse(&raw).map_err(|e| ApiError::BadRequest(e.message.clone(), vec![e]))?;
    let answered: Vec<(Action, Option<Uuid>)> = ops.iter().map(|op| (op.action, op.id)).collect();
    // A part's entries, once made, are counted until the journal has them, and never less than
    // what the request was admitted with: a request under way only gives memory back when it is
    // done, so requests that arrive meanwhile cannot take what its next part needs.
    let holding = raw.holding();
    let admitted = counted.documents_of_length(raw.len());
    let too_large = |error| match error {
        write::WriteError::Memory(crate::budget::Refused::Alone { .. }) => {
            bulk_too_large(&state, documents)
        }
        other => ApiError::from(other),
    };
    let bulked = write::bulk(
        state.storage.as_ref(),
        &project,
        raw.bytes(),
        ops,
        state.settings.server.max_body_bytes,
        &|entries| holding.documents(entries.max(admitted)),
    )
    .await
    .map_err(too_large)?;
    drop(place);
    // The operations after a part the journal refused each carry its status, and a short word
    // that `stopped` says why, once: the reason repeated for each of up to 100,000 operations
    // would take more memory than the body.
    let stopped = bulked.stopped.map(|error| outcome_of(too_large(error)));
    // The operations of a part the storage may have written come first among those without an
    // outcome: theirs is unknown.
    let mut uncertain = bulked.uncertain.into_iter();
    let outcomes = bulked
        .outcomes
        .into_iter()
        .map(Some)
        .chain(std::iter::repeat_with(|| None));
    let items: Vec<BulkResult> = answered
        .into_iter()
        .zip(outcomes)
        .map(|((action, id), outcome)| {
            let (status, written, errors) = match outcome {
                Some(Ok(put)) => {
                    let status = if action == Action::Create { 201 } else { 200 };
                    (status, Some(put), None)
                }
                Some(Err((status, errors))) => (status, None, Some(Errors::Own(errors))),
                None => {
                    let status = stopped.as_ref().map_or(500, |(status, _)| *status);
                    match uncertain.next() {
                        // Refused alone in a part the storage may have written: never sent.
                        Some(Some((status, errors))) => (status, None, Some(Errors::Own(errors))),
                        Some(None) => (status, None, Some(Errors::Unknown)),
                        None => (status, None, Some(Errors::NotWritten)),
                    }
                }
            };
            BulkResult {
                action: action.name(),
                id,
                status,
                written,
                errors,
            }
        })
        .collect();
    let revisions: Vec<u64> = items
        .iter()
        .filter_map(|item| item.written.as_ref().map(|put| put.revision))
        .collect();
    // The journal has the items: a wait for the stores holds neither the body nor its memory.
    drop(holding);
    drop(raw);
    let (status, projection) = projection(
        &state,
        &params,
        &project,
        &revisions,
        actix_web::http::StatusCode::OK,
    )
    .await;
    let answer = BulkAnswer {
        took_ms: started.elapsed().as_millis() as u64,
        errors: items.iter().any(|item| item.errors.is_some()),
        items,
        stopped,
        projection,
    };
    Ok(HttpResponse::build(status)
        .content_type(JSON)
        .body(answer.to_json()))
}

/// A request's error as one `_bulk` operation's outcome: its status and why (a 500's cause is
/// logged, not shown, as a request's is).
fn outcome_of(error: ApiError) -> (u16, Vec<FieldError>) {
    use actix_web::ResponseError;
    let status = error.status_code().as_u16();
    (status, vec![FieldError::new("", error.shown())])
}

/// A `_bulk` that alone would hold more than the whole in-flight budget is told the largest body
/// that fits (see [`bulk_counted`]).
fn bulk_too_large(state: &State, documents: usize) -> ApiError {
    let limit = state.settings.server.max_inflight_bytes;
    let counted = bulk_counted(documents);
    let fits = if counted.of(counted.documents_of) > limit {
        limit / (counted.factor + counted.documents)
    } else {
        (limit - counted.documents * counted.documents_of) / counted.factor
    };
    ApiError::Oversized(format!(
        "a _bulk body into a project with {} live versions holds {} bytes of memory per byte of \
         it while it is handled (its text, operations and answer), and {} more per byte of the \
         part of at most {} bytes journaled at once (each item's record and a document for every \
         live version); all requests may hold {limit} together (server.max_inflight_bytes): send \
         it in parts of at most {fits} bytes, or retire the versions no client writes at",
        documents - 1,
        counted.factor,
        counted.documents,
        counted.documents_of,
    ))
}

/// What a `_bulk` body holds of the in-flight budget while it is read and handled: its text, and its
/// operations and their outcomes until it is answered, about twice its length; and for the part
/// journaled at once (`write::part_bytes` of item lines), each item's record and a document for
/// every live version, twice the documents' count since each is encoded with room to grow (a part
/// of 4 MiB of 600-byte items held 13 MiB with one live version): about 16 MiB whatever the number
/// of live versions. Measured: a 58 MB body of 90,000 items peaked 125 MiB above the idle process
/// (docs/performance.md).
fn bulk_counted(documents: usize) -> body::Counted {
    body::Counted {
        factor: 2,
        documents: 2 * documents,
        documents_of: write::part_bytes(documents),
    }
}

/// The answer to `_bulk` (it can hold many thousands of results).
struct BulkAnswer {
    took_ms: u64,
    errors: bool,
    items: Vec<BulkResult>,
    /// Why the operations after a part the journal refused were not written: its status and errors.
    stopped: Option<(u16, Vec<FieldError>)>,
    projection: Map<String, Value>,
}

/// Why one `_bulk` operation failed.
enum Errors {
    Own(Vec<FieldError>),
    /// The journal refused its part or one before it: the answer's `stopped` says why.
    NotWritten,
    /// Its part may have been written: the storage did not say in time.
    Unknown,
}

/// The errors of an operation that was not written (see [`Errors::NotWritten`]): short, since up
/// to 100,000 operations may carry them.
const NOT_WRITTEN: &[u8] = br#"[{"path":"","message":"not written; see \"stopped\""}]"#;

/// The errors of an operation whose part the storage may have written (see [`Errors::Unknown`]).
const OUTCOME_UNKNOWN: &[u8] = br#"[{"path":"","message":"perhaps written: the storage did not say in time (see \"stopped\"); read the item before sending a create again"}]"#;

/// `{"put": {"id": …, "status": 200, "revision": R}}` (and `not_in_versions`, as a PUT answers
/// it), or with `errors` instead of `revision`.
struct BulkResult {
    action: &'static str,
    id: Option<Uuid>,
    status: u16,
    /// The write, for an operation that was journaled.
    written: Option<write::Put>,
    errors: Option<Errors>,
}

impl BulkAnswer {
    /// The JSON text, written directly: an action name, an id, a status and a revision never need
    /// escaping, and serializing each result through serde was 7 % of the instructions of a `_bulk`
    /// item. Errors and the projection fields still go through serde.
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.items.len() * 96);
        let mut number = itoa::Buffer::new();
        out.extend_from_slice(b"{\"took_ms\":");
        out.extend_from_slice(number.format(self.took_ms).as_bytes());
        out.extend_from_slice(if self.errors {
            b",\"errors\":true,\"items\":["
        } else {
            b",\"errors\":false,\"items\":["
        });
        let mut uuid = [0u8; 36];
        for (n, item) in self.items.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"");
            out.extend_from_slice(item.action.as_bytes());
            out.extend_from_slice(b"\":{\"id\":");
            match item.id {
                Some(id) => {
                    out.push(b'"');
                    out.extend_from_slice(id.hyphenated().encode_lower(&mut uuid).as_bytes());
                    out.push(b'"');
                }
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"status\":");
            out.extend_from_slice(number.format(item.status).as_bytes());
            if let Some(put) = &item.written {
                out.extend_from_slice(b",\"revision\":");
                out.extend_from_slice(number.format(put.revision).as_bytes());
                if !put.absent.is_empty() {
                    out.extend_from_slice(b",\"not_in_versions\":");
                    serde_json::to_writer(&mut out, &put.absent).expect("numbers serialize");
                }
                match put.found {
                    Some(true) => out.extend_from_slice(b",\"found\":true"),
                    Some(false) => out.extend_from_slice(b",\"found\":false"),
                    None => {}
                }
            }
            match &item.errors {
                Some(Errors::Own(errors)) => {
                    out.extend_from_slice(b",\"errors\":");
                    serde_json::to_writer(&mut out, errors).expect("errors serialize");
                }
                Some(Errors::NotWritten) => {
                    out.extend_from_slice(b",\"errors\":");
                    out.extend_from_slice(NOT_WRITTEN);
                }
                Some(Errors::Unknown) => {
                    out.extend_from_slice(b",\"errors\":");
                    out.extend_from_slice(OUTCOME_UNKNOWN);
                }
                None => {}
            }
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
        if let Some((status, errors)) = &self.stopped {
            out.extend_from_slice(b",\"stopped\":{\"status\":");
            out.extend_from_slice(number.format(*status).as_bytes());
            out.extend_from_slice(b",\"errors\":");
            serde_json::to_writer(&mut out, errors).expect("errors serialize");
            out.push(b'}');
        }
        push_fields(&mut out, &self.projection);
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_answer_is_the_json_its_fields_say() {
        let id = Uuid::parse_str("0193c0de-0000-7000-8000-00000000000a").unwrap();
        let mut fields = Map::new();
        fields.insert("projected".into(), Value::Bool(false));
        fields.insert(
            "refused".into(),
            json!([{"store": "postgresql", "reason": "a \"b\""}]),
        );
        for (found, absent, extra) in [
            (None, &[][..], json!({})),
            (Some(true), &[][..], json!({"found": true})),
            (None, &[2, 3][..], json!({"not_in_versions": [2, 3]})),
        ] {
            let written = Written {
                found,
                absent,
                ..success(&id, u64::MAX)
            };
            let mut expected = json!({"success": true, "id": id, "revision": u64::MAX});
            expected
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let plain: Value = serde_json::from_slice(&written.to_json(&Map::new())).unwrap();
            assert_eq!(plain, expected);
            expected.as_object_mut().unwrap().extend(fields.clone());
            let with: Value = serde_json::from_slice(&written.to_json(&fields)).unwrap();
            assert_eq!(with, expected);
        }
    }

    #[test]
    fn the_bulk_answer_is_the_json_its_fields_say() {
        let id = Uuid::parse_str("0193c0de-0000-7000-8000-00000000000a").unwrap();
        let result = |action, id, status, revision: Option<(u64, &[u32])>, errors| BulkResult {
            action,
            id,
            status,
            written: revision.map(|(revision, absent)| write::Put {
                revision,
                absent: absent.into(),
                found: None,
            }),
            errors,
        };
        let refused = vec![FieldError::new("/title", "a \"quoted\" \\ reason\u{0}")];
        let mut projection = Map::new();
        projection.insert("projected".into(), Value::Bool(false));
        projection.insert("pending".into(), json!(["postgresql"]));
        let answer = BulkAnswer {
            took_ms: 12,
            errors: true,
            items: vec![
                result("put", Some(id), 200, Some((u64::MAX, &[])), None),
                result("create", Some(id), 201, Some((7, &[2, 3])), None),
                result(
                    "delete",
                    None,
                    400,
                    None,
                    Some(Errors::Own(refused.clone())),
                ),
                result("create", None, 503, None, Some(Errors::Unknown)),
                result("put", Some(id), 503, None, Some(Errors::NotWritten)),
            ],
            stopped: Some((503, vec![FieldError::new("", "the disk is \"full\"")])),
            projection,
        };
        let text: Value = serde_json::from_slice(&answer.to_json()).unwrap();
        assert_eq!(
            text,
            json!({
                "took_ms": 12,
                "errors": true,
                "items": [
                    {"put": {"id": id, "status": 200, "revision": u64::MAX}},
                    {"create": {"id": id, "status": 201, "revision": 7, "not_in_versions": [2, 3]}},
                    {"delete": {"id": null, "status": 400, "errors": refused}},
                    {"create": {"id": null, "status": 503, "errors": [{"path": "", "message":
                        "perhaps written: the storage did not say in time (see \"stopped\"); read the item before sending a create again"}]}},
                    {"put": {"id": id, "status": 503, "errors": [{"path": "", "message":
                        "not written; see \"stopped\""}]}},
                ],
                "stopped": {"status": 503, "errors": [{"path": "", "message": "the disk is \"full\""}]},
                "projected": false,
                "pending": ["postgresql"],
            })
        );
        let empty = BulkAnswer {
            took_ms: 0,
            errors: false,
            items: Vec::new(),
            stopped: None,
            projection: Map::new(),
        };
        assert_eq!(
            String::from_utf8(empty.to_json()).unwrap(),
            r#"{"took_ms":0,"errors":false,"items":[]}"#
        );
    }
}
