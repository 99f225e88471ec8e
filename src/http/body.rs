//! Reading request bodies: bounded in size, in time and in total, parsed as JSON whatever the
//! Content-Type says.
//!
//! Every body counts against one budget of memory held for request bodies by all requests together
//! (`server.max_inflight_bytes`): a request that would pass it is answered 503 at once instead of
//! growing the process. A body counts [`JSON_FACTOR`] times its length while its parsed JSON lives (a
//! parsed document takes up to that much more than its text), and its share is given back when the
//! handler is done with it. A body that does not arrive within `server.body_timeout_secs` is answered
//! 408.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest};
use futures::StreamExt;
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::blueprint::FieldError;
use crate::document::Document;

/// The bytes of request bodies being read or held, across all requests.
#[derive(Debug)]
pub struct InFlight {
    used: AtomicUsize,
    limit: usize,
}

impl InFlight {
    pub fn new(limit: usize) -> Arc<InFlight> {
        Arc::new(InFlight {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` more bytes of the budget, or none if that would pass the limit.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
struct Share {
    budget: Arc<InFlight>,
    bytes: usize,
}

impl Share {
    fn grow(&mut self, n: usize) -> Result<(), ApiError> {
        if !self.budget.take(n) {
            return Err(ApiError::Unavailable(format!(
                "the server is already reading {} bytes of request bodies (server.max_inflight_bytes); try again shortly",
                self.budget.limit
            )));
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// How many bytes of the budget one byte of a JSON body takes while its parsed form lives: an array
/// of one-digit numbers takes 16 bytes per element parsed, for 2 bytes of text.
pub const JSON_FACTOR: usize = 16;

/// A request body, holding its share of the in-flight budget until it is dropped.
#[derive(Debug)]
pub struct Body {
    bytes: web::Bytes,
    _share: Share,
}

/// A parsed JSON body, holding its share of the in-flight budget until it is dropped.
#[derive(Debug)]
pub struct JsonBody<T = Value> {
    value: T,
    /// The length of the body it was parsed from, in bytes.
    length: usize,
    _share: Share,
}

impl<T> JsonBody<T> {
    /// The length of the body it was parsed from, in bytes.
    pub fn length(&self) -> usize {
        self.length
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
}

impl std::ops::Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Most of an announced body's length allocated before its bytes arrive; a larger body grows its
/// buffer as it comes.
const PREALLOCATED: usize = 1 << 20;

/// Reads the whole body, refusing it with 413 as soon as it passes `limit` bytes, with 503 when the
/// server holds too much body memory already, and with 408 when it does not arrive in time. Each
/// byte takes `factor` bytes of the budget.
pub async fn read(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    factor: usize,
) -> Result<Body, ApiError> {
    let timeout = Duration::from_secs(state.settings.server.body_timeout_secs);
    tokio::time::timeout(timeout, read_within(state, request, payload, limit, factor))
        .await
        .map_err(|_| ApiError::RequestTimeout(timeout.as_secs()))?
}

async fn read_within(
    state: &AppState,
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    factor: usize,
) -> Result<Body, ApiError> {
    let declared = request
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    // The budget is taken as bytes arrive, not for what a client announces: a connection that
    // announces a large body and stalls holds only what it sent.
    let mut share = Share {
        budget: state.in_flight.clone(),
        bytes: 0,
    };
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0).min(PREALLOCATED));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request("", format!("cannot read the request body: {e}")))?;
        let length = body.len() + chunk.len();
        if length > limit {
            return Err(ApiError::TooLarge(limit));
        }
        let needed = length.saturating_mul(factor);
        if needed > share.bytes {
            share.grow(needed - share.bytes)?;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Body {
        bytes: body.freeze(),
        _share: share,
    })
}

/// Reads and parses a JSON body of at most `server.max_body_bytes`.
pub async fn json(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<JsonBody, ApiError> {
    read_parsed(state, request, payload, crate::json::parse).await
}

/// Reads and parses an item body of at most `server.max_body_bytes` (a flat object without
/// serde's map: `document`), under the same rules as [`json`].
pub async fn item(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<JsonBody<Document>, ApiError> {
    read_parsed(state, request, payload, Document::parse).await
}

async fn read_parsed<T>(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
    parse: fn(&[u8]) -> Result<T, FieldError>,
) -> Result<JsonBody<T>, ApiError> {
    let limit = state.settings.server.max_body_bytes;
    let Body { bytes, _share } = read(state, request, payload, limit, JSON_FACTOR).await?;
    let value = parse(&bytes).map_err(|e| ApiError::BadRequest(e.message.clone(), vec![e]))?;
    Ok(JsonBody {
        value,
        length: bytes.len(),
        _share,
    })
}
