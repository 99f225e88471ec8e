//! The only place where errors become HTTP status codes.
//!
//! Every error body is `{"status": "<what went wrong>", "errors": [{"path": …, "message": …}]}`. A 4xx
//! says exactly which field is wrong and why; a 5xx logs the whole cause and tells the client little.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::blueprint::{cap_errors, FieldError};
use crate::catalog::CatalogError;
use crate::storage::StorageError;
use crate::write::WriteError;

#[derive(Debug)]
pub enum ApiError {
    /// 400: the request cannot be read.
    BadRequest(String, Vec<FieldError>),
    /// 401: no valid key.
    Unauthorized(String),
    /// 403: a valid key without the action or the project.
    Forbidden(String),
    /// 404
    NotFound(String),
    /// 405, with the methods the path takes (the `Allow` header), e.g. `GET, PUT`.
    MethodNotAllowed(String),
    /// 409
    Conflict(String),
    /// 409 with a report of why (a freeze that would lose values).
    ConflictWith(String, serde_json::Value),
    /// 410: the change feed no longer holds what was asked for; `horizon` says from where it does.
    Gone(String, u64),
    /// 408: the body did not arrive within this many seconds.
    RequestTimeout(u64),
    /// 413: the body is longer than this limit.
    TooLarge(usize),
    /// 413: handling the request would hold more memory than every request together may.
    Oversized(String),
    /// 415: the body is sent in a coding dstore does not read (`Content-Encoding`).
    UnsupportedEncoding(String),
    /// 422: well-formed, but not a valid blueprint or item.
    Invalid(String, Vec<FieldError>),
    /// 429: the client's address sent too many tokens that are no key; it may try again after
    /// this many seconds (the `Retry-After` header).
    TooManyRequests(String, u64),
    /// 503: a store the request needs cannot take it now; nothing was changed.
    Unavailable(String),
    /// 503: the storage may have made the change (its answer never came): the body says
    /// `"outcome": "unknown"`, so a client can tell it from a 503 that changed nothing.
    Uncertain(String),
    /// 500: our fault; the cause is logged, not shown.
    Internal(String),
}

impl ApiError {
    pub fn bad_request(path: &str, message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError::BadRequest(message.clone(), vec![FieldError::new(path, message)])
    }

    pub fn invalid(path: &str, message: impl Into<String>) -> ApiError {
        ApiError::Invalid("invalid item".into(), vec![FieldError::new(path, message)])
    }

    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(cause.to_string())
    }

    /// The same error, its message rewritten by `say` (a 500's, which the client does not see,
    /// as it was).
    pub fn reworded(self, say: impl FnOnce(&str) -> String) -> ApiError {
        match self {
            ApiError::BadRequest(m, e) => ApiError::BadRequest(say(&m), e),
            ApiError::Unauthorized(m) => ApiError::Unauthorized(say(&m)),
            ApiError::Forbidden(m) => ApiError::Forbidden(say(&m)),
            ApiError::NotFound(m) => ApiError::NotFound(say(&m)),
            ApiError::Conflict(m) => ApiError::Conflict(say(&m)),
            ApiError::ConflictWith(m, report) => ApiError::ConflictWith(say(&m), report),
            ApiError::Gone(m, horizon) => ApiError::Gone(say(&m), horizon),
            ApiError::Oversized(m) => ApiError::Oversized(say(&m)),
            ApiError::Invalid(m, e) => ApiError::Invalid(say(&m), e),
            ApiError::Unavailable(m) => ApiError::Unavailable(say(&m)),
            ApiError::Uncertain(m) => ApiError::Uncertain(say(&m)),
            other => other,
        }
    }

    /// What the client is told of the error: a 500 hides its cause, which is logged here.
    pub fn shown(&self) -> String {
        match self {
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                "internal error; the cause is in the server log".to_string()
            }
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::BadRequest(m, _)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::ConflictWith(m, _)
            | ApiError::Gone(m, _)
            | ApiError::Invalid(m, _)
            | ApiError::TooManyRequests(m, _)
            | ApiError::Unavailable(m)
            | ApiError::Uncertain(m)
            | ApiError::Oversized(m)
            | ApiError::UnsupportedEncoding(m)
            | ApiError::Internal(m) => f.write_str(m),
            ApiError::MethodNotAllowed(allow) => {
                write!(f, "method not allowed; this path takes {allow}")
            }
            ApiError::TooLarge(limit) => {
                write!(f, "request body is larger than the limit of {limit} bytes")
            }
            ApiError::RequestTimeout(seconds) => write!(
                f,
                "the request body did not arrive within {seconds} seconds (server.body_timeout_secs)"
            ),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) | ApiError::ConflictWith(..) => StatusCode::CONFLICT,
            ApiError::Gone(..) => StatusCode::GONE,
            ApiError::TooLarge(_) | ApiError::Oversized(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid(..) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Uncertain(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let (status, errors) = match self {
            ApiError::Internal(_) => (self.shown(), Vec::new()),
            ApiError::BadRequest(_, errors) | ApiError::Invalid(_, errors) => {
                (self.to_string(), cap_errors(errors.clone()))
            }
            ApiError::TooLarge(_) | ApiError::Oversized(_) | ApiError::RequestTimeout(_) => (
                self.to_string(),
                vec![FieldError::new("", self.to_string())],
            ),
            ApiError::UnsupportedEncoding(_) => (
                self.to_string(),
                vec![FieldError::new("Content-Encoding", self.to_string())],
            ),
            _ => (self.to_string(), Vec::new()),
        };
        if let ApiError::Gone(status, horizon) = self {
            return HttpResponse::Gone().json(json!({
                "status": status,
                "errors": [{"path": "since", "message": status}],
                "horizon": horizon,
            }));
        }
        if let ApiError::ConflictWith(status, report) = self {
            return HttpResponse::Conflict()
                .json(json!({"status": status, "errors": [], "report": report}));
        }
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::Unavailable(reason) | ApiError::Uncertain(reason) = self {
            response
                .extensions_mut()
                .insert(super::observe::Refusal(reason.clone()));
            // What a 503 asks of a client: try again, shortly.
            response.insert_header((actix_web::http::header::RETRY_AFTER, "1"));
        }
        if let ApiError::Uncertain(_) = self {
            return response
                .json(json!({"status": status, "errors": errors, "outcome": "unknown"}));
        }
        match self {
            ApiError::Unauthorized(_) => {
                response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::MethodNotAllowed(allow) => {
                response.insert_header((actix_web::http::header::ALLOW, allow.as_str()));
            }
            ApiError::TooManyRequests(_, after) => {
                response.insert_header((actix_web::http::header::RETRY_AFTER, after.to_string()));
            }
            _ => {}
        }
        response.json(json!({"status": status, "errors": errors}))
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::NotFound(m) => ApiError::NotFound(m),
            StorageError::Conflict(m) => ApiError::Conflict(m),
            StorageError::Invalid(errors) => ApiError::Invalid("invalid blueprint".into(), errors),
            e @ (StorageError::Stale
            | StorageError::Backlog { .. }
            | StorageError::Unavailable(_)) => ApiError::Unavailable(e.to_string()),
            StorageError::Uncertain(m) => ApiError::Uncertain(m),
            StorageError::Corrupt(cause) => ApiError::internal(cause),
            StorageError::Cursor(m) => ApiError::bad_request("after", m),
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(error: CatalogError) -> Self {
        StorageError::from(error).into()
    }
}

impl From<crate::budget::Refused> for ApiError {
    fn from(refused: crate::budget::Refused) -> Self {
        match refused {
            crate::budget::Refused::Busy { .. } | crate::budget::Refused::Answers { .. } => {
                ApiError::Unavailable(refused.to_string())
            }
            crate::budget::Refused::Alone { .. } => ApiError::Oversized(refused.to_string()),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::NotFound(m) => ApiError::NotFound(m),
            WriteError::Invalid(errors) => ApiError::Invalid("invalid item".into(), errors),
            WriteError::Conflict(m) => ApiError::Conflict(m),
            e @ (WriteError::MigrationPending(_) | WriteError::Contended) => {
                ApiError::Unavailable(e.to_string())
            }
            WriteError::Storage(e) => e.into(),
            WriteError::Memory(refused) => refused.into(),
            WriteError::Incompatible(report) => ApiError::ConflictWith(
                crate::write::INCOMPATIBLE.into(),
                serde_json::to_value(&*report).expect("reports serialize"),
            ),
        }
    }
}

impl From<crate::auth::keys::KeyError> for ApiError {
    fn from(error: crate::auth::keys::KeyError) -> Self {
        use crate::auth::keys::KeyError;
        match error {
            KeyError::Invalid(errors) => ApiError::Invalid("invalid key".into(), errors),
            e @ KeyError::NotFound(_) => ApiError::NotFound(e.to_string()),
            KeyError::Forbidden(message) => ApiError::Forbidden(message),
            KeyError::Storage(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 503 asks to try again shortly; only one whose change the storage may have made says
    /// its outcome is unknown, so a client can tell the two apart without reading the message.
    #[actix_web::test]
    async fn a_503_says_when_its_outcome_is_unknown_and_when_to_try_again() {
        for (error, outcome) in [
            (
                ApiError::from(StorageError::Uncertain("no answer".into())),
                Some("unknown"),
            ),
            (
                ApiError::from(StorageError::Unavailable("away".into())),
                None,
            ),
        ] {
            let response = error.error_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                response.headers().get(actix_web::http::header::RETRY_AFTER),
                Some(&actix_web::http::header::HeaderValue::from_static("1"))
            );
            let body = actix_web::body::to_bytes(response.into_body())
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["outcome"].as_str(), outcome, "{body}");
        }
    }
}
