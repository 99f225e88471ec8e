//! The only place that talks to Elasticsearch: a thin wrapper over the `elasticsearch` crate that
//! turns every answer into data or a typed [`EsError`].
//!
//! Invariants: no method panics on anything the server sends; a failure to connect, a timeout, 429,
//! 5xx, and 401/403/408 are transient (retrying can help: the server is busy, down, or refuses dstore
//! itself — bad credentials, a read-only block — rather than one document), any other non-2xx answer
//! is permanent; `_bulk` results
//! are read item by item, one [`BulkItem`] per action, in request order. Nothing here knows about
//! blueprints or tasks.

use std::borrow::Cow;
use std::time::Duration;

use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::Url;
use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesExistsParts, IndicesGetAliasParts,
    IndicesGetMappingParts,
};
use elasticsearch::{BulkParts, Elasticsearch, GetParts};
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::config::ElasticsearchSettings;
use crate::journal::task::Doc;
use crate::projector::ProjectorError;

/// How long one request may take before it counts as a transient failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Health checks answer quickly or report the store as not answering.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub enum EsError {
    #[error("invalid elasticsearch url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error(
        "cannot use {path} as the certificate authority of elasticsearch \
         (elasticsearch.ca_cert / DSTORE_ELASTICSEARCH_CA_CERT): {reason}"
    )]
    Certificate { path: String, reason: String },
    #[error(
        "elasticsearch.api_key (DSTORE_ELASTICSEARCH_API_KEY) is not an encoded API key: give \
         the `encoded` value Elasticsearch answered when the key was made (base64 of id:api_key)"
    )]
    ApiKey,
    #[error("invalid elasticsearch index prefix {prefix:?}: {reason}")]
    Prefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("elasticsearch is unreachable: {0}")]
    Unreachable(String),
    /// No answer within the request's time limit: a busy server as often as a lost one.
    #[error("elasticsearch did not answer in time (busy, or a network that drops packets): {0}")]
    TimedOut(String),
    #[error("elasticsearch answered {status} ({kind}): {reason}")]
    Refused {
        status: u16,
        kind: String,
        reason: String,
    },
    #[error("elasticsearch sent an answer dstore cannot read: {0}")]
    Unreadable(String),
}

impl EsError {
    /// Whether retrying the same request later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            EsError::Unreachable(_) | EsError::TimedOut(_) | EsError::Unreadable(_) => true,
            EsError::Refused { status, .. } => is_transient_status(*status),
            EsError::Url { .. }
            | EsError::Certificate { .. }
            | EsError::ApiKey
            | EsError::Prefix { .. } => false,
        }
    }

    /// The error type Elasticsearch named, such as `resource_already_exists_exception`.
    pub fn kind(&self) -> Option<&str> {
        match self {
            EsError::Refused { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

impl From<EsError> for ProjectorError {
    fn from(error: EsError) -> Self {
        if error.is_transient() {
            ProjectorError::transient(error.to_string())
        } else {
            ProjectorError::permanent(error.to_string())
        }
    }
}

/// Whether an answer with this status may succeed later unchanged. 401 and 403 refuse dstore, not a
/// document (bad credentials, an index blocked read-only when the disk fills up): dead-lettering every
/// write until an operator fixes the cluster would lose them, so they wait instead.
pub fn is_transient_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 408 | 429) || status >= 500
}

/// The `type: reason (caused by …)` of an Elasticsearch error object, or the error itself when it is
/// not an object.
pub fn reason(error: &Value) -> (String, String) {
    match error {
        Value::Object(e) => {
            let kind = e
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_string();
            let mut reason = e
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string();
            if let Some(cause) = e
                .get("caused_by")
                .and_then(|c| c.get("reason"))
                .and_then(Value::as_str)
            {
                reason = format!("{reason} (caused by: {cause})");
            }
            (kind, reason)
        }
        Value::Null => ("error".into(), "no reason given".into()),
        other => (
            "error".into(),
            other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_string),
        ),
    }
}

/// What became of one action of a `_bulk` request.
#[derive(Clone, Debug, PartialEq)]
pub struct BulkItem {
    pub status: u16,
    /// `(type, reason)` when the action failed.
    pub error: Option<(String, String)>,
}

/// An index operation or a delete for `_bulk`, versioned externally.
#[derive(Clone, Debug)]
pub enum BulkAction<'a> {
    Index {
        index: String,
        id: String,
        version: u64,
        doc: &'a Doc,
    },
    Delete {
        index: String,
        id: String,
        version: u64,
    },
}

#[derive(Clone)]
pub struct EsClient {
    es: Elasticsearch,
    url: String,
}

impl EsClient {
    /// Builds the client: the URL (a user and password in it are sent as basic authentication),
    /// the certificate authority and the API key of `settings`. Nothing is sent until the first
    /// request.
    pub fn new(settings: &ElasticsearchSettings) -> Result<EsClient, EsError> {
        let url = settings.url.expose();
        let invalid = |reason: String| EsError::Url {
            url: crate::config::redact_url(url),
            reason,
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let mut transport = TransportBuilder::new(SingleNodeConnectionPool::new(parsed.clone()))
            .timeout(REQUEST_TIMEOUT);
        if let Some(path) = &settings.ca_cert {
            let unusable = |reason: String| EsError::Certificate {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
            let authority = Certificate::from_pem(&pem).map_err(|e| unusable(e.to_string()))?;
            transport = transport.cert_validation(CertificateValidation::Full(authority));
        }
        if let Some(key) = &settings.api_key {
            let key = key.expose().trim();
            let encoded = key.len() >= 4
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
            if !encoded {
                return Err(EsError::ApiKey);
            }
            transport = transport.auth(Credentials::EncodedApiKey(key.to_owned()));
        }
        let transport = transport.build().map_err(|e| {
            // The certificate is parsed here: a damaged one fails the build, as does a bad URL.
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                reason = format!("{reason}: {cause}");
                source = cause.source();
            }
            match &settings.ca_cert {
                Some(path) => EsError::Certificate {
                    path: path.display().to_string(),
                    reason,
                },
                None => invalid(reason),
            }
        })?;
        Ok(EsClient {
            es: Elasticsearch::new(transport),
            url: without_credentials(&parsed),
        })
    }

    /// The server's URL without credentials, for health reports and logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET /`: the server's name and version.
    pub async fn info(&self) -> Result<Value, EsError> {
        let response = self.es.info().request_timeout(HEALTH_TIMEOUT).send().await;
        ok_json(read(response).await?)
    }

    /// Creates an index; `Ok(false)` when it already exists.
    pub async fn create_index(&self, index: &str, body: &Value) -> Result<bool, EsError> {
        let response = self
            .es
            .indices()
            .create(IndicesCreateParts::Index(index))
            .body(body)
            .send()
            .await;
        match ok_json(read(response).await?) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == Some("resource_already_exists_exception") => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn index_exists(&self, index: &str) -> Result<bool, EsError> {
        let response = self
            .es
            .indices()
            .exists(IndicesExistsParts::Index(&[index]))
            .send()
            .await;
        let (status, body) = read(response).await?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(refused(status, &body)),
        }
    }

    /// The mappings of the indexes matching `patterns` (names or wildcards), by index name; none
    /// matching is an empty map.
    pub async fn mappings(&self, patterns: &[&str]) -> Result<Map<String, Value>, EsError> {
        let response = self
            .es
            .indices()
            .get_mapping(IndicesGetMappingParts::Index(patterns))
            .ignore_unavailable(true)
            .allow_no_indices(true)
            .send()
            .await;
        let (status, body) = read(response).await?;
        if status == 404 {
            return Ok(Map::new());
        }
        let body = ok_json((status, body))?;
        let Value::Object(indexes) = body else {
            return Err(EsError::Unreadable(format!(
                "mappings are not an object: {body}"
            )));
        };
        Ok(indexes
            .into_iter()
            .map(|(index, v)| (index, v.get("mappings").cloned().unwrap_or(Value::Null)))
            .collect())
    }

    /// The indexes an alias points to; none when the alias does not exist.
    pub async fn alias_holders(&self, alias: &str) -> Result<Vec<String>, EsError> {
        let response = self
            .es
            .indices()
            .get_alias(IndicesGetAliasParts::Name(&[alias]))
            .send()
            .await;
        let (status, body) = read(response).await?;
        if status == 404 {
            return Ok(Vec::new());
        }
        match ok_json((status, body))? {
            Value::Object(indexes) => Ok(indexes.keys().cloned().collect()),
            other => Err(EsError::Unreadable(format!(
                "aliases are not an object: {other}"
            ))),
        }
    }

    /// Applies alias actions atomically (one `_aliases` call).
    pub async fn update_aliases(&self, actions: Vec<Value>) -> Result<(), EsError> {
        let response = self
            .es
            .indices()
            .update_aliases()
            .body(json!({"actions": actions}))
            .send()
            .await;
        ok_json(read(response).await?).map(drop)
    }

    /// Deletes indexes by exact name (no wildcards: Elasticsearch refuses them by default); missing
    /// ones are ignored.
    pub async fn delete_indexes(&self, indexes: &[&str]) -> Result<(), EsError> {
        if indexes.is_empty() {
            return Ok(());
        }
        let response = self
            .es
            .indices()
            .delete(IndicesDeleteParts::Index(indexes))
            .ignore_unavailable(true)
            .send()
            .await;
        let (status, body) = read(response).await?;
        if status == 404 {
            return Ok(());
        }
        ok_json((status, body)).map(drop)
    }

    /// The `_source` of a document; `None` when the document or its index does not exist.
    pub async fn source(&self, index: &str, id: &str) -> Result<Option<Value>, EsError> {
        let response = self.es.get(GetParts::IndexId(index, id)).send().await;
        let (status, body) = read(response).await?;
        if status == 404 {
            return Ok(None);
        }
        let body = ok_json((status, body))?;
        match body.get("found") {
            Some(Value::Bool(true)) => Ok(body.get("_source").cloned()),
            _ => Ok(None),
        }
    }

    /// Sends one `_bulk` request; `Ok` holds one [`BulkItem`] per action, in order.
    pub async fn bulk(&self, actions: &[BulkAction<'_>]) -> Result<Vec<BulkItem>, EsError> {
        // Each action's line is serialized; a document is sent as the journal holds its text.
        let parts: Vec<_> = actions
            .iter()
            .map(|action| {
                let (op, index, id, version, doc) = match action {
                    BulkAction::Index {
                        index,
                        id,
                        version,
                        doc,
                    } => ("index", index, id, version, Some(one_line(doc))),
                    BulkAction::Delete { index, id, version } => {
                        ("delete", index, id, version, None)
                    }
                };
                let head = json!({op: {"_index": index, "_id": id, "version": version, "version_type": "external"}});
                (serde_json::to_vec(&head).expect("JSON values serialize"), doc)
            })
            .collect();
        let lines: Vec<&[u8]> = parts
            .iter()
            .flat_map(|(head, doc)| std::iter::once(&head[..]).chain(doc.as_deref()))
            .collect();
        let response = self.es.bulk(BulkParts::None).body(lines).send().await;
        let body = ok_json(read(response).await?)?;
        let items = body
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| EsError::Unreadable("a bulk answer without items".into()))?;
        if items.len() != actions.len() {
            return Err(EsError::Unreadable(format!(
                "{} bulk results for {} actions",
                items.len(),
                actions.len()
            )));
        }
        items.iter().map(bulk_item).collect()
    }
}

/// A document as one `_bulk` line. One from a broker may hold line feeds between its tokens (JSON
/// whitespace; one inside a string is always escaped), which would end its line early: they are
/// sent as spaces.
fn one_line(doc: &Doc) -> Cow<'_, [u8]> {
    let text = doc.get();
    if text.contains('\n') {
        Cow::Owned(text.replace('\n', " ").into_bytes())
    } else {
        Cow::Borrowed(text.as_bytes())
    }
}

fn without_credentials(url: &Url) -> String {
    let mut shown = url.clone();
    // Both fail only for URLs that cannot carry credentials anyway.
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.to_string()
}

/// One entry of `items`: `{"index": {"status": 201, …}}` or `{"delete": {…, "error": {…}}}`.
fn bulk_item(item: &Value) -> Result<BulkItem, EsError> {
    let result = item
        .as_object()
        .and_then(|o| o.values().next())
        .ok_or_else(|| {
            EsError::Unreadable(format!("a bulk result that is not an action: {item}"))
        })?;
    let status = result
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .ok_or_else(|| EsError::Unreadable(format!("a bulk result without a status: {item}")))?;
    let error = result.get("error").map(reason);
    Ok(BulkItem { status, error })
}

/// Reads an answer's status and JSON body (`Null` when it has none).
async fn read(response: Result<Response, elasticsearch::Error>) -> Result<(u16, Value), EsError> {
    let response = response.map_err(|e| match e.is_timeout() {
        true => EsError::TimedOut(e.to_string()),
        false => EsError::Unreachable(e.to_string()),
    })?;
    let status = response.status_code().as_u16();
    let bytes = response.bytes().await.map_err(|e| match e.is_timeout() {
        true => EsError::TimedOut(format!("reading the answer: {e}")),
        false => EsError::Unreachable(format!("reading the answer failed: {e}")),
    })?;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(body) => body,
            // A proxy's HTML error page, say: keep the start of it for the message.
            Err(_) if !(200..300).contains(&status) => {
                Value::String(String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into())
            }
            Err(e) => return Err(EsError::Unreadable(format!("invalid JSON: {e}"))),
        }
    };
    Ok((status, body))
}

fn ok_json((status, body): (u16, Value)) -> Result<Value, EsError> {
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(refused(status, &body))
    }
}

fn refused(status: u16, body: &Value) -> EsError {
    let (kind, reason) = match body.get("error") {
        Some(error) => reason(error),
        // A HEAD answer, or a proxy's: say what the status means.
        None if body.is_null() => {
            let text = elasticsearch::http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no body");
            ("http_error".to_string(), text.to_lowercase())
        }
        None => ("http_error".to_string(), body.to_string()),
    };
    EsError::Refused {
        status,
        kind,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_with_line_feeds_between_its_tokens_is_sent_as_one_line() {
        let text = "{\"a\":\n 1,\r\n\"b\": \"x\\ny\"}";
        let doc: Doc = serde_json::from_str(text).unwrap();
        let line = one_line(&doc);
        assert!(!line.contains(&b'\n'));
        let sent: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(sent, serde_json::from_str::<Value>(text).unwrap());
        let plain: Doc = serde_json::from_str("{\"a\":1}").unwrap();
        assert!(matches!(one_line(&plain), Cow::Borrowed(_)));
    }

    #[test]
    fn busy_down_or_blocked_servers_are_transient_and_refused_documents_permanent() {
        let refused = |status| EsError::Refused {
            status,
            kind: "x".into(),
            reason: "y".into(),
        };
        assert!(refused(429).is_transient() && refused(503).is_transient());
        assert!(
            refused(403).is_transient(),
            "a read-only block lifts once disk space is freed"
        );
        assert!(
            !refused(400).is_transient()
                && !refused(404).is_transient()
                && !refused(409).is_transient()
        );
        assert!(EsError::Unreachable("refused".into()).is_transient());
    }

    #[test]
    fn credentials_in_the_url_are_not_shown() {
        let client = EsClient::new(&ElasticsearchSettings {
            url: "http://dstore:secret@es.internal:9200".into(),
            ..ElasticsearchSettings::default()
        })
        .unwrap();
        assert_eq!(client.url(), "http://es.internal:9200/");
    }

    #[test]
    fn a_bulk_result_is_read_with_its_reason() {
        let item = json!({"index": {"status": 400, "error": {"type": "document_parsing_exception", "reason": "failed to parse field [i]", "caused_by": {"reason": "For input string: \"abc\""}}}});
        let read = bulk_item(&item).unwrap();
        assert_eq!(read.status, 400);
        let (kind, reason) = read.error.unwrap();
        assert_eq!(kind, "document_parsing_exception");
        assert!(
            reason.contains("failed to parse field [i]") && reason.contains("abc"),
            "{reason}"
        );
        assert!(bulk_item(&json!({"index": {}})).is_err());
        assert!(bulk_item(&json!(7)).is_err());
    }
}
