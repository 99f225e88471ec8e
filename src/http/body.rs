//! Reading request bodies: bounded in size, in time and in total, parsed as JSON whatever the
//! Content-Type says.
//!
//! Every body counts against the in-flight budget (`crate::budget`, `server.max_inflight_bytes`)
//! as its bytes arrive, at what the request may hold at most: [`JSON_FACTOR`] times its length
//! for its parsed form (what a number array takes), and for a write the documents it makes, about
//! its length each. Once parsed, the share is set to what the parsed form does hold
//! (`Document::heap_bytes`: a long string about its length) and the documents' estimate, and once
//! the documents are made, to them ([`Holding`], `write::Hold`). Admission is decided by the
//! first, largest count: a request under way only gives memory back, so requests that keep
//! arriving cannot starve those already read. A request the budget cannot take is answered 503
//! (413 if it alone needs more than all may hold), and its share is given back when the handler is
//! done. A body that does not arrive within `server.body_timeout_secs` is answered 408.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::blueprint::FieldError;
use crate::budget::{Refused, Share};
use crate::document::Document;

/// How many bytes of the budget one byte of a JSON body takes while it arrives, before its parse
/// says what it holds: what an array of one-digit numbers takes parsed (72 bytes a number, for 2
/// bytes of text; `model/tests/memory.rs`), the most any JSON text takes but for the slack of a
/// growing array.
pub const JSON_FACTOR: usize = 36;

/// A request's share of the in-flight budget: what its body holds, and beside it what is held for
/// the documents a write makes of the body (an estimate as the body arrives, then as made).
#[derive(Clone, Debug)]
pub struct Holding {
    share: Arc<Share>,
    body: usize,
}

impl Holding {
    /// Holds the body and `documents` bytes beside it, in place of what was held for them.
    pub fn documents(&self, documents: usize) -> Result<(), Refused> {
        self.share.resize(self.body.saturating_add(documents))
    }
}

/// A request body, holding its share of the in-flight budget until it is dropped.
#[derive(Debug)]
pub struct Body {
    bytes: web::Bytes,
    holding: Holding,
}

/// A parsed JSON body, holding its share of the in-flight budget until it is dropped.
#[derive(Debug)]
pub struct JsonBody<T = Value> {
    value: T,
    /// The length of the body it was parsed from, in bytes.
    length: usize,
    holding: Holding,
}

impl<T> JsonBody<T> {
    /// The length of the body it was parsed from, in bytes.
    pub fn length(&self) -> usize {
        self.length
    }

    /// The request's share of the budget, for the documents a write makes of the body.
    pub fn holding(&self) -> Holding {
        self.holding.clone()
    }
}

impl<T> std::ops::Deref for JsonBody<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl Body {
    /// The body's bytes, shared (a clone costs a reference count).
    pub fn bytes(&self) -> &web::Bytes {
        &self.bytes
    }

    /// The request's share of the budget, for the documents a write makes of the body.
    pub fn holding(&self) -> Holding {
        self.holding.clone()
    }
}

impl std::ops::Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// What a body of some length holds of the in-flight budget while it is handled: `factor` bytes a
/// byte for itself (its text, and what is made of it while the request lasts), and `documents`
/// bytes a byte for the documents a write makes of it, held at once for at most `documents_of`
/// bytes of it (a `_bulk` body is journaled in parts).
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub factor: usize,
    pub documents: usize,
    pub documents_of: usize,
}

impl Counted {
    /// What a body of `length` bytes holds.
    pub fn of(self, length: usize) -> usize {
        length
            .saturating_mul(self.factor)
            .saturating_add(self.documents_of_length(length))
    }

    /// What the documents made of a body of `length` bytes hold.
    pub fn documents_of_length(self, length: usize) -> usize {
        length.min(self.documents_of).saturating_mul(self.documents)
    }
}

/// Most of an announced body's length allocated before its bytes arrive; a larger body grows its
/// buffer as it comes.
const PREALLOCATED: usize = 1 << 20;

/// Reads the whole body, refusing it with 413 as soon as it passes `limit` bytes, with 503 when the
/// server holds too much body memory already, and with 408 when it does not arrive in time. Each
/// byte takes what `counted` says.
pub async fn read(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    counted: Counted,
) -> Result<Body, ApiError> {
    let timeout = Duration::from_secs(state.settings.server.body_timeout_secs);
    let (bytes, share) = tokio::time::timeout(
        timeout,
        read_within(state, request, payload, limit, counted),
    )
    .await
    .map_err(|_| ApiError::RequestTimeout(timeout.as_secs()))??;
    let body = bytes.len().saturating_mul(counted.factor);
    Ok(Body {
        bytes,
        holding: Holding {
            share: Arc::new(share),
            body,
        },
    })
}

async fn read_within(
    state: &AppState,
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    counted: Counted,
) -> Result<(web::Bytes, Share), ApiError> {
    let declared = request
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    // A compressed body would be read as malformed JSON, and one in a coding named but not used
    // read as if the name meant nothing: either is refused for what it is.
    if let Some(coding) = request
        .headers()
        .get(actix_web::http::header::CONTENT_ENCODING)
    {
        let coding = String::from_utf8_lossy(coding.as_bytes());
        if !coding.trim().eq_ignore_ascii_case("identity") {
            let shown: String = coding.chars().take(64).collect();
            return Err(ApiError::UnsupportedEncoding(format!(
                "the body's Content-Encoding {shown:?} is not read: send it uncompressed, without \
                 the header (or as identity)"
            )));
        }
    }
    // The budget is taken as bytes arrive, not for what a client announces: a connection that
    // announces a large body and stalls holds only what it sent.
    let share = state.in_flight.share();
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0).min(PREALLOCATED));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            let why = match e {
                actix_web::error::PayloadError::Incomplete(_) => {
                    "the request body ended before it was complete (its chunked framing is \
                     invalid, or the client stopped sending)"
                        .to_string()
                }
                other => format!("cannot read the request body: {other}"),
            };
            ApiError::bad_request("", why)
        })?;
        let length = body.len() + chunk.len();
        if length > limit {
            return Err(ApiError::TooLarge(limit));
        }
        let needed = counted.of(length);
        if needed > share.bytes() {
            share.grow(needed - share.bytes())?;
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), share))
}

/// Reads and parses a JSON body of at most `server.max_body_bytes`.
pub async fn json(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<JsonBody, ApiError> {
    read_parsed(
        state,
        request,
        payload,
        (crate::json::parse, crate::json::heap_bytes),
        0,
    )
    .await
}

/// Reads and parses an item body of at most `server.max_body_bytes` (a flat object without
/// serde's map: `document`), under the same rules as [`json`]; the share also counts the
/// `documents` the write will make of it (about its length each) until they are made.
pub async fn item(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
    documents: usize,
) -> Result<JsonBody<Document>, ApiError> {
    read_parsed(
        state,
        request,
        payload,
        (Document::parse, Document::heap_bytes),
        documents,
    )
    .await
}

/// How a body is parsed, and how much what it parsed holds.
type Parser<T> = (fn(&[u8]) -> Result<T, FieldError>, fn(&T) -> usize);

async fn read_parsed<T>(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
    (parse, heap_bytes): Parser<T>,
    documents: usize,
) -> Result<JsonBody<T>, ApiError> {
    let limit = state.settings.server.max_body_bytes;
    let counted = Counted {
        factor: JSON_FACTOR,
        documents,
        documents_of: usize::MAX,
    };
    let read = read(state, request, payload, limit, counted).await?;
    let value = parse(&read.bytes).map_err(|e| ApiError::BadRequest(e.message.clone(), vec![e]))?;
    // The text is dropped with this function: the parsed form is what the handler holds, and the
    // documents' estimate until they are made. Only a number array's slack makes this grow.
    let holding = Holding {
        body: heap_bytes(&value),
        ..read.holding
    };
    holding.documents(read.bytes.len().saturating_mul(documents))?;
    Ok(JsonBody {
        value,
        length: read.bytes.len(),
        holding,
    })
}

/// An answer's bytes and the share of `server.max_inflight_bytes` they hold until sent, handed to
/// the connection a slice at a time (the slices share the answer's memory), so the connection's
/// write buffer never holds a second copy of a large answer.
pub struct Held {
    rest: web::Bytes,
    _share: Arc<crate::budget::Share>,
}

impl Held {
    pub fn new(rest: web::Bytes, share: Arc<crate::budget::Share>) -> Held {
        Held {
            rest,
            _share: share,
        }
    }
}

impl actix_web::body::MessageBody for Held {
    type Error = std::convert::Infallible;

    fn size(&self) -> actix_web::body::BodySize {
        actix_web::body::BodySize::Sized(self.rest.len() as u64)
    }

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<web::Bytes, Self::Error>>> {
        const SLICE: usize = 64 * 1024;
        if self.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let take = self.rest.len().min(SLICE);
        std::task::Poll::Ready(Some(Ok(self.rest.split_to(take))))
    }
}

/// `value` as a JSON answer whose bytes count against `server.max_inflight_bytes` (an answer's
/// share of it, see `crate::budget`) until they are sent (the catalog's answers, which grow with every project and version): clients that ask
/// for large answers and never read them are answered 503 once they hold that much, instead of
/// growing the process. `what` names the answer in a refusal.
pub fn held_json<T: serde::Serialize + ?Sized>(
    state: &AppState,
    what: &str,
    value: &T,
) -> Result<HttpResponse, ApiError> {
    held_json_in(answer_share(state, what, 0)?, what, value)
}

/// An answer's share of the budget holding `estimate` bytes before the answer is made: an
/// answer made from the whole catalog takes several times its JSON while it is made, so a
/// request for one too large is refused (413 alone, 503 beside others) before any of it is made,
/// and requests for large ones at once wait their turn instead of each making its own.
pub fn answer_share(state: &AppState, what: &str, estimate: usize) -> Result<Arc<Share>, ApiError> {
    let share: Arc<Share> = Arc::new(state.in_flight.answer_share());
    share
        .grow(estimate)
        .map_err(|refused| answer_refused(what, estimate, refused))?;
    Ok(share)
}

/// `value` as a JSON answer held in `share` ([`answer_share`]), resized to the answer's bytes.
pub fn held_json_in<T: serde::Serialize + ?Sized>(
    share: Arc<Share>,
    what: &str,
    value: &T,
) -> Result<HttpResponse, ApiError> {
    let body = serde_json::to_vec(value)
        .map_err(|e| ApiError::Internal(format!("cannot encode {what}: {e}")))?;
    share
        .resize(body.len())
        .map_err(|refused| answer_refused(what, body.len(), refused))?;
    Ok(HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(Held::new(body.into(), share)))
}

fn answer_refused(what: &str, bytes: usize, refused: Refused) -> ApiError {
    match refused {
        Refused::Busy { .. } | Refused::Answers { .. } => ApiError::from(refused),
        Refused::Alone { limit, .. } => ApiError::Oversized(format!(
            "{what} would hold {bytes} bytes until it is sent, more than the {limit} answers may \
             hold together (three quarters of server.max_inflight_bytes)"
        )),
    }
}
