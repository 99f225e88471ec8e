//! The authentication middleware: every request is checked against its route's requirement
//! (`auth::requirement`) before any handler runs, cross-site writes are refused, and every request
//! that changes something is written to the audit log.
//!
//! Missing, unknown, expired or revoked key: 401. A valid key without the action or the project:
//! 403. Both in the usual JSON error body. The caller is put in the request's extensions, so
//! handlers that list projects show only those the caller may read.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest};
use chrono::Utc;

use super::error::ApiError;
use super::State;
use crate::auth::audit::{self, AuditEntry};
use crate::auth::keys::AuthError;
use crate::auth::{requirement, Action, Caller, Requirement, SecretKind};

/// The caller of a request (every handler's request went through [`authenticate`], which keeps
/// every caller but an open one). With authentication on, a request that kept none is refused
/// rather than open: should a route and its requirement ever disagree, it may do nothing.
pub fn caller(request: &HttpRequest) -> Caller {
    if let Some(caller) = request.extensions().get::<Caller>() {
        return caller.clone();
    }
    match request.app_data::<State>() {
        Some(state) if state.keys.is_some() => Caller::Refused,
        _ => Caller::Open,
    }
}

/// The most of a method's name the audit log keeps: a client may send one of any length.
const MAX_METHOD_BYTES: usize = 32;

/// A method's name for the audit log: the metrics' label for the standard ones, borrowed; any
/// other method under its own name, cut after [`MAX_METHOD_BYTES`].
fn method_text(method: &Method) -> crate::auth::audit::Text {
    match super::observe::method_label(method) {
        "other" => {
            let name = method.as_str();
            // A method is a token of visible ASCII: any byte is a character's end.
            match name.get(..MAX_METHOD_BYTES) {
                Some(start) if name.len() > MAX_METHOD_BYTES => format!("{start}…").into(),
                _ => name.to_owned().into(),
            }
        }
        standard => standard.into(),
    }
}

/// Whether a request names this machine (`Host`: `localhost`, a name under `.localhost`, a
/// loopback address; a request without `Host` names nothing else). Without a master key dstore
/// serves only on a loopback address, where a browser's page reaches it only through a name of
/// its own that a DNS rebinding points at 127.0.0.1, and which its requests then carry: neither
/// the cross-site check (the page and dstore share that name) nor a key would stop it.
fn names_this_machine(request: &ServiceRequest) -> bool {
    let Some(name) = host_name(request) else {
        return true;
    };
    // A header's text is visible ASCII: any byte ends a character. Nothing is allocated.
    let under_localhost = name.len() > ".localhost".len()
        && name[name.len() - ".localhost".len()..].eq_ignore_ascii_case(".localhost");
    name.eq_ignore_ascii_case("localhost")
        || under_localhost
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The name a request's `Host` carries, without the port (an IPv6 address without its brackets):
/// the authority of a target in absolute form (`GET http://name/…`), which HTTP says overrides the
/// header, or else the header; `None` without either, `Some("")` when it is not text.
fn host_name(request: &ServiceRequest) -> Option<&str> {
    let host = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => match request.headers().get(header::HOST)?.to_str() {
            Ok(host) => host,
            Err(_) => return Some(""),
        },
    };
    // An authority may carry user information (`user@host`): the name follows it.
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    Some(match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    })
}

/// Whether `auth.allowed_hosts`, when it lists names, holds the one the request's `Host` carries
/// (a request without `Host` names nothing else).
fn names_an_allowed_host(request: &ServiceRequest, allowed: &[String]) -> bool {
    allowed.is_empty()
        || host_name(request)
            .is_none_or(|name| allowed.iter().any(|a| a.eq_ignore_ascii_case(name)))
}

fn changes_something(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Fetch metadata: where a browser's request comes from (`same-origin`, `same-site`, `cross-site`,
/// `none`). A constant, so looking it up does not parse and lower-case the name each time.
const SEC_FETCH_SITE: header::HeaderName = header::HeaderName::from_static("sec-fetch-site");

/// A write a browser sends for another site's page: it says where it comes from, and that is not
/// here. Clients that are not browsers send neither header.
fn cross_site(request: &ServiceRequest) -> bool {
    let headers = request.headers();
    if headers
        .get(SEC_FETCH_SITE)
        .is_some_and(|site| site.as_bytes() == b"cross-site" || site.as_bytes() == b"same-site")
    {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    origin == "null" || origin_host != host
}

fn bearer(request: &ServiceRequest) -> Option<String> {
    bearer_of(request.headers())
}

/// The bearer token of the request's one `Authorization` header: none when it has several, which a
/// proxy in front could read otherwise than dstore (the last where dstore would take the first).
fn bearer_of(headers: &header::HeaderMap) -> Option<String> {
    let mut values = headers.get_all(header::AUTHORIZATION);
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// What a request is checked against, and by whom it was sent.
struct Checked {
    caller: Caller,
    action: Option<Action>,
    project: Option<String>,
}

/// The id of what a handler made where the request's path cannot name it (a new API key), put
/// in the response's extensions for the audit log.
pub struct Created(pub String);

/// The status an audit entry records when its request was dropped before the handler answered
/// (nginx's "client closed request"): the change may have been made.
pub const CLIENT_LEFT: u16 = 499;

/// The audit entry of a request its handler is running. actix drops a request's future when its
/// client resets the connection (and a stop drops those still running), and by then the change
/// may be made: a write is journaled before it waits for the stores (`?wait=true`), `_bulk` is
/// journaled in parts, `DELETE /_project` drops one project at a time. Dropped with its entry
/// still in it, the entry is recorded with [`CLIENT_LEFT`].
struct Unanswered {
    audit: crate::auth::audit::AuditLog,
    entry: Option<AuditEntry>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut entry) = self.entry.take() {
            entry.at = Utc::now();
            self.audit.record_now(entry);
        }
    }
}

/// The middleware.
pub async fn authenticate(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let Some(state) = request.app_data::<State>().cloned() else {
        return next.call(request).await.map(|r| r.map_into_left_body());
    };
    let method = request.method().clone();
    let (checked, refused) = match check(&state, &request).await {
        Ok(checked) => (checked, None),
        Err((checked, refused)) => (checked, Some(refused)),
    };
    // With authentication on, a caller without a key (an open route) vouches for nothing, nor
    // does a key on a route that only reads: a key that may only read must not be able to fill
    // the disk with the log of requests the router answers 404 or 405. A refusal changes
    // nothing, whoever sent it: a key allowed only to read must not be able to fill the disk
    // with the log of its refused writes.
    let vouched = refused.is_none()
        && (state.keys.is_none()
            || (matches!(checked.caller, Caller::Master | Caller::Key(..))
                && checked.action.is_some_and(Action::may_change)));
    // Every request that changes something, refused ones too, with who sent it; made before the
    // handler runs (see `Unanswered`), its status set once it answers.
    let mut entry = changes_something(&method).then(|| {
        let (key_id, key_name) = checked.caller.describe();
        AuditEntry {
            at: Utc::now(),
            key_id,
            key_name,
            action: checked.action.map_or("-", Action::name).into(),
            project: checked.project.as_deref().map(audit::clip),
            method: method_text(&method),
            path: audit::path_of(request.path()),
            status: CLIENT_LEFT,
            created: None,
        }
    });
    let response = match refused {
        Some(refused) => request.error_response(refused).map_into_right_body(),
        None => {
            // `caller` answers `Open` for a request that carries none: only a key or the master
            // key is worth a place in the request's extensions (a map allocated on first insert).
            if !matches!(checked.caller, Caller::Open) {
                request.extensions_mut().insert(checked.caller.clone());
            }
            // Only an entry recorded in any case needs the guard (a clone of the log's handle).
            let mut unanswered = (vouched && entry.is_some()).then(|| Unanswered {
                audit: state.audit.clone(),
                entry: entry.take(),
            });
            let called = next.call(request).await;
            if let Some(unanswered) = unanswered.as_mut() {
                entry = unanswered.entry.take();
            }
            called?.map_into_left_body()
        }
    };
    if let Some(mut entry) = entry {
        // Stamped as it is recorded: a reader that follows the log from a few seconds before
        // the last entry it saw finds a long request's entry (see the README).
        entry.at = Utc::now();
        entry.status = response.status().as_u16();
        entry.created = response
            .response()
            .extensions()
            .get::<Created>()
            .map(|created| created.0.clone());
        if vouched {
            state.audit.record(entry).await;
        } else {
            state.audit.record_unvouched(entry).await;
        }
    }
    Ok(response)
}

/// Who `token` belongs to, with the failed logins of the request's address limited (see
/// `auth::limit`): a valid API key this node knows is never limited; any other token takes one
/// of the address's guesses before it is checked, given back unless it is no key, and an address
/// with none left is answered 429. A missing token guesses nothing.
async fn caller_of(
    state: &State,
    keys: &crate::auth::keys::KeyStore,
    request: &ServiceRequest,
    token: Option<&str>,
) -> Result<Caller, ApiError> {
    use crate::auth::limit::Peer;
    let refused = |error| match error {
        AuthError::Storage(e) => ApiError::from(e),
        e => ApiError::Unauthorized(e.to_string()),
    };
    let Some(token) = token else {
        return keys.authenticate(None).await.map_err(refused);
    };
    if let Some(caller) = keys.authenticate_cached(token) {
        return Ok(caller);
    }
    let peer = request.peer_addr().map(|address| {
        let forwarded_for = request
            .headers()
            .get_all("x-forwarded-for")
            // A value that is not text reads as no address: the walk stops there.
            .map(|value| value.to_str().unwrap_or("?"))
            .collect::<Vec<_>>();
        Peer::of(
            state
                .trusted_proxies
                .client(address.ip(), forwarded_for.into_iter()),
        )
    });
    let now = std::time::Instant::now();
    if let Some(wait) = peer.and_then(|peer| state.failed_logins.take(peer, now)) {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Err(ApiError::TooManyRequests(
            format!(
                "too many requests from this address sent a token that is no key (more than \
                 auth.failed_logins_per_minute = {}): try again in {seconds} s",
                state.settings.auth.failed_logins_per_minute
            ),
            seconds,
        ));
    }
    let caller = keys.authenticate(Some(token)).await;
    if let (false, Some(peer)) = (matches!(caller, Err(AuthError::Unknown)), peer) {
        state.failed_logins.give_back(peer, now);
    }
    caller.map_err(refused)
}

/// Who sent the request and whether they may: the refusal (401 or 403) otherwise.
async fn check(state: &State, request: &ServiceRequest) -> Result<Checked, (Checked, ApiError)> {
    let method = request.method();
    // The path as the router matches it, percent-escapes decoded: deciding on the path as sent
    // would let `/p/%5Fproject` pass as an item path and reach the project's routes.
    let needed = requirement(method, request.match_info().as_str());
    let readiness = matches!(needed, Requirement::Public("ready", _));
    let everything = matches!(
        needed,
        Requirement::Everything(_) | Requirement::Public(_, Action::Operations)
    );
    let mut public = false;
    let (action, project) = match needed {
        Requirement::Open => (None, None),
        Requirement::Public(name, action) => {
            if state.settings.auth.public.iter().any(|p| p == name) {
                public = true;
                (None, None)
            } else {
                (Some(action), None)
            }
        }
        Requirement::Action(action, project) => (Some(action), project),
        Requirement::Everything(action) => (Some(action), None),
    };
    let mut checked = Checked {
        caller: Caller::Open,
        action,
        project,
    };
    if !names_an_allowed_host(request, &state.settings.auth.allowed_hosts) {
        let refused = ApiError::Forbidden(
            "this request names a host that auth.allowed_hosts (DSTORE_ALLOWED_HOSTS) does not \
             list"
                .into(),
        );
        return Err((checked, refused));
    }
    // Open because no master key was set (not `auth.disabled`): only for this machine's names.
    if state.keys.is_none() && !state.settings.auth.disabled && !names_this_machine(request) {
        let refused = ApiError::Forbidden(
            "without a master key dstore answers only requests that name this machine (Host: \
             localhost or a loopback address); set a master key (DSTORE_MASTER_KEY) to serve other \
             names"
                .into(),
        );
        return Err((checked, refused));
    }
    if changes_something(method) && cross_site(request) {
        let refused = ApiError::Forbidden(
            "a cross-site request from a browser cannot change anything here".into(),
        );
        return Err((checked, refused));
    }
    // A route `auth.public` opens takes a valid key for what it is (its caller gets its own
    // report, not the one anonymous requests share); a token that is no key is ignored, as
    // though none were sent: the route is open to anyone.
    if let (true, Some(keys), Some(token)) = (public, &state.keys, bearer(request)) {
        if let Ok(caller) = caller_of(state, keys, request, Some(&token)).await {
            checked.caller = caller;
        }
    }
    let (Some(keys), Some(action)) = (&state.keys, action) else {
        return Ok(checked);
    };
    // Readiness asked without a key gets its status alone (what a load balancer needs), never
    // what it says of projects and stores.
    if readiness && bearer(request).is_none() {
        request.extensions_mut().insert(StatusOnly);
        return Ok(checked);
    }
    checked.caller = match caller_of(state, keys, request, bearer(request).as_deref()).await {
        Ok(caller) => caller,
        Err(refused) => {
            if matches!(refused, ApiError::TooManyRequests(..)) {
                state.failed_logins.note_refused();
            }
            checked.caller = Caller::Refused;
            return Err((checked, refused));
        }
    };
    let allowed = if everything {
        checked.caller.allows(action, None) && checked.caller.reaches_all()
    } else {
        checked.caller.allows(action, checked.project.as_deref())
    };
    if !allowed {
        let (id, _) = checked.caller.describe();
        let place = checked
            .project
            .as_deref()
            .map_or(String::new(), |p| format!(" on project {p:?}"));
        let every = if everything { " on every project" } else { "" };
        // A key that may manage keys, sent with its replaced secret (see `Caller::Key`).
        let replaced = match &checked.caller {
            Caller::Key(key, SecretKind::Previous) if key.allows(action, None) => {
                " with the secret its last rotation replaced: send its current secret"
            }
            _ => "",
        };
        let refused = ApiError::Forbidden(format!(
            "key {id} may not {}{place}{every}{replaced}",
            action.name()
        ));
        return Err((checked, refused));
    }
    Ok(checked)
}

/// Marks a readiness request let in without a key: it is answered its status alone.
#[derive(Clone, Copy)]
pub struct StatusOnly;

/// How often a long-lived request checks its key again.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The key a long-lived request (a change feed's stream or long poll) was let in with, checked
/// again while it runs: a key revoked, expired, rotated past its grace or narrowed after the
/// request began ends it, within about a second here and within the key cache's refresh on
/// another node of a cluster.
pub struct Recheck {
    keys: std::sync::Arc<crate::auth::keys::KeyStore>,
    token: String,
    action: Action,
    project: String,
    checked: std::time::Instant,
}

impl Recheck {
    /// For a request let in with an API key; `None` when there is no key to check (authentication
    /// off, or an open route).
    pub fn of(state: &State, request: &HttpRequest, action: Action, project: &str) -> Option<Self> {
        if !matches!(caller(request), Caller::Key(..)) {
            return None;
        }
        Some(Recheck {
            keys: state.keys.clone()?,
            token: bearer_of(request.headers())?,
            action,
            project: project.to_string(),
            checked: std::time::Instant::now(),
        })
    }

    /// Whether the key still lets the request go on (checked at most once a [`RECHECK`]); why
    /// not otherwise, as the 401 or 403 it would get now.
    pub async fn check(&mut self) -> Result<(), ApiError> {
        if self.checked.elapsed() < RECHECK {
            return Ok(());
        }
        self.checked = std::time::Instant::now();
        let caller = match self.keys.authenticate(Some(&self.token)).await {
            Ok(caller) => caller,
            Err(AuthError::Storage(e)) => return Err(ApiError::from(e)),
            Err(e) => return Err(ApiError::Unauthorized(e.to_string())),
        };
        if caller.allows(self.action, Some(&self.project)) {
            return Ok(());
        }
        let (id, _) = caller.describe();
        Err(ApiError::Forbidden(format!(
            "key {id} may not {} on project {:?} any more",
            self.action.name(),
            self.project
        )))
    }
}
