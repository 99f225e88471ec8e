//! The HTTP API (docs/design.md §3, README "API"): the route table, shared state and path parsing.
//!
//! Handlers live one file per resource; `error.rs` is the only place that chooses status codes. Paths
//! follow Elasticsearch conventions (project first, `_`-prefixed verbs), so verb routes are registered
//! before the item routes they would otherwise shadow. Item writes and reads are most requests: their
//! route is also tried first, for paths that cannot be a verb route ([`plain_item_path`]), and such
//! paths skip the route table altogether: `items::plain` reads their segments itself.

pub mod auth;
mod blueprints;
pub mod body;
pub(crate) mod changes;
mod docs;
pub mod error;
mod health;
mod items;
mod keys;
mod metrics;
pub mod observe;
mod projects;
pub mod query;
mod versions;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::Method;
use actix_web::{web, HttpResponse};

use crate::blueprint::value::excerpt_str;
use crate::blueprint::Ident;
use crate::config::Settings;
use crate::projector::Registry;
use crate::queue::rabbitmq::Broker;
use crate::storage::SharedStorage;
use error::ApiError;

/// What every handler can reach.
pub struct AppState {
    /// The catalog and the journal, whichever backend holds them.
    pub storage: SharedStorage,
    pub registry: Registry,
    /// The RabbitMQ links of this process, when tasks travel through a broker.
    pub broker: Option<Arc<Broker>>,
    pub settings: Settings,
    /// Memory held for request bodies by every request together (`server.max_inflight_bytes`).
    pub in_flight: Arc<crate::budget::InFlight>,
    /// The places of `_bulk` requests being parsed, prepared and written
    /// (`server.max_concurrent_bulk`).
    pub bulk_places: Arc<tokio::sync::Semaphore>,
    /// The API keys, when requests need one (none while authentication is off).
    pub keys: Option<Arc<crate::auth::keys::KeyStore>>,
    /// The failed logins of each client address (`auth.failed_logins_per_minute`).
    pub failed_logins: crate::auth::limit::FailedLogins,
    /// The proxies whose `X-Forwarded-For` names the client (`auth.trusted_proxies`).
    pub trusted_proxies: crate::auth::limit::TrustedProxies,
    pub audit: crate::auth::audit::AuditLog,
    /// The change feed's followers now (`changes.max_followers`).
    pub followers: Arc<changes::Followers>,
    /// Turns true when the server stops: change feed streams end, so a graceful stop does not wait
    /// for followers that never hang up.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// The readiness report requests without a key share.
    pub(crate) readiness: Shared<health::Readiness>,
    /// The metrics text requests without a key share (`auth.public` names `metrics`).
    pub(crate) metrics_text: Shared<String>,
}

/// An answer costly to make (it asks every store, or reads every project) that requests anyone
/// may send as fast as they like share: one is made at a time, and each serves for a second, so
/// such requests never put more load on the stores (and their pools) than that.
pub(crate) struct Shared<T>(tokio::sync::Mutex<Option<(std::time::Instant, T)>>);

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared(tokio::sync::Mutex::new(None))
    }
}

impl<T: Clone> Shared<T> {
    /// How long one answer serves.
    const FOR: Duration = Duration::from_secs(1);

    /// The answer made less than a second ago, or one `make` makes now.
    pub(crate) async fn get(&self, make: impl std::future::Future<Output = T>) -> T {
        let mut last = self.0.lock().await;
        if let Some((_, made)) = last.as_ref().filter(|(at, _)| at.elapsed() < Self::FOR) {
            return made.clone();
        }
        let made = make.await;
        *last = Some((std::time::Instant::now(), made.clone()));
        made
    }
}

impl AppState {
    /// Whether the request is anonymous while authentication is on: it reached a route
    /// `auth.public` opens, or readiness's status, and its cost is shared with every other such
    /// request (one report a second), since anyone may send as many as they like. Decided by the
    /// caller authenticated, not by the header: a made-up `Authorization` is no key.
    pub(crate) fn anonymous(&self, request: &actix_web::HttpRequest) -> bool {
        self.keys.is_some()
            && !matches!(
                auth::caller(request),
                crate::auth::Caller::Master | crate::auth::Caller::Key(..)
            )
    }
}

impl AppState {
    pub fn wait_timeout(&self) -> Duration {
        Duration::from_secs(self.settings.projection.wait_timeout_secs)
    }
}

pub type State = web::Data<AppState>;

/// Parses a name from the URL; hostile names are refused before anything else happens.
pub fn ident(what: &str, raw: &str) -> Result<Ident, ApiError> {
    Ident::parse(raw).map_err(|reason| {
        let raw = excerpt_str(raw);
        ApiError::bad_request(what, format!("{what} name {raw:?} {reason}"))
    })
}

/// Parses a version number from the URL or the query (`what`: the parameter that holds it).
pub fn version_number(what: &str, raw: &str) -> Result<u32, ApiError> {
    raw.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
        let raw = excerpt_str(raw);
        ApiError::bad_request(
            what,
            format!("{what} {raw:?} is not a positive whole number"),
        )
    })
}

/// The whole HTTP surface: extractor error handling and the route table.
pub fn configure(config: &mut web::ServiceConfig) {
    // Extractor failures (undecodable paths, malformed query strings) answer in the JSON error shape.
    config
        .app_data(
            web::PathConfig::default().error_handler(|e, _| {
                ApiError::bad_request("", format!("invalid path: {e}")).into()
            }),
        )
        .app_data(web::QueryConfig::default().error_handler(|e, _| {
            ApiError::bad_request("", format!("invalid query string: {e}")).into()
        }));
    routes(config);
}

fn routes(config: &mut web::ServiceConfig) {
    config
        // A prefix scope of "" matches every path without a pattern; its guard lets plain item
        // paths through to a handler that reads the path's segments itself.
        .service(
            web::scope("")
                .guard(actix_web::guard::fn_guard(|ctx| {
                    plain_item_path(ctx.head().uri.path())
                }))
                .default_service(web::to(items::plain)),
        )
        // HEAD too (answered without a body), as load balancers and uptime checks may send.
        .service(resource(
            "/_health",
            [
                (Method::GET, web::to(health::live)),
                (Method::HEAD, web::to(health::live)),
            ],
        ))
        .service(resource(
            "/_metrics",
            [(Method::GET, web::to(metrics::metrics))],
        ))
        .service(resource(
            "/_openapi.json",
            [(Method::GET, web::to(docs::openapi))],
        ))
        .service(resource("/_docs", [(Method::GET, web::to(docs::page))]))
        .service(resource(
            "/_health/ready",
            [
                (Method::GET, web::to(health::ready)),
                (Method::HEAD, web::to(health::ready)),
            ],
        ))
        .service(resource(
            "/_dead_letters",
            [(Method::GET, web::to(health::dead_letters))],
        ))
        .service(resource(
            "/_dead_letters/_retry",
            [(Method::POST, web::to(health::retry_dead_letters))],
        ))
        .service(resource(
            "/_keys",
            [
                (Method::GET, web::to(keys::list)),
                (Method::POST, web::to(keys::create)),
            ],
        ))
        .service(resource(
            "/_keys/{id}",
            [
                (Method::GET, web::to(keys::show)),
                (Method::PATCH, web::to(keys::update)),
                (Method::DELETE, web::to(keys::revoke)),
            ],
        ))
        .service(resource(
            "/_keys/{id}/_rotate",
            [(Method::POST, web::to(keys::rotate))],
        ))
        .service(resource("/_audit", [(Method::GET, web::to(keys::audit))]))
        .service(resource(
            "/_version",
            [(Method::GET, web::to(versions::all))],
        ))
        .service(resource(
            "/_project",
            [
                (Method::GET, web::to(projects::get_all)),
                (Method::PUT, web::to(projects::put_all)),
                (Method::DELETE, web::to(projects::delete_all)),
            ],
        ))
        .service(resource(
            "/{project}/_blueprint",
            [
                (Method::GET, web::to(blueprints::get_all)),
                (Method::PUT, web::to(blueprints::put_all)),
            ],
        ))
        .service(resource(
            "/{project}/_blueprint/{version}",
            [(Method::GET, web::to(blueprints::get_all_at))],
        ))
        .service(resource(
            "/{project}/_version",
            [
                (Method::GET, web::to(versions::get)),
                (Method::POST, web::to(versions::freeze)),
            ],
        ))
        .service(resource(
            "/{project}/_dead_letters",
            [(Method::GET, web::to(health::project_dead_letters))],
        ))
        .service(resource(
            "/{project}/_dead_letters/_retry",
            [(Method::POST, web::to(health::retry_project_dead_letters))],
        ))
        .service(resource(
            "/{project}/_catalog",
            [(Method::GET, web::to(versions::catalog))],
        ))
        .service(resource(
            "/{project}/_diff",
            [(Method::GET, web::to(versions::diff))],
        ))
        .service(resource(
            "/{project}/_settings",
            [
                (Method::GET, web::to(versions::settings)),
                (Method::PUT, web::to(versions::put_settings)),
            ],
        ))
        .service(resource(
            "/{project}/_version/{version}",
            [(Method::GET, web::to(versions::get_one))],
        ))
        .service(resource(
            "/{project}/_version/{version}/_retire",
            [(Method::POST, web::to(versions::retire))],
        ))
        .service(resource(
            "/{project}/_project",
            [
                (Method::GET, web::to(projects::get)),
                (Method::PUT, web::to(projects::put)),
                (Method::DELETE, web::to(projects::delete)),
            ],
        ))
        .service(resource(
            "/{project}/_bulk",
            [(Method::POST, web::to(items::bulk))],
        ))
        .service(resource(
            "/{project}/_changes",
            [(Method::GET, web::to(changes::changes))],
        ))
        .service(resource(
            "/{project}/{blueprint}/_blueprint",
            [
                (Method::GET, web::to(blueprints::get)),
                (Method::PUT, web::to(blueprints::put)),
                (Method::DELETE, web::to(blueprints::delete)),
            ],
        ))
        .service(resource(
            "/{project}/{blueprint}/_blueprint/{version}",
            [(Method::GET, web::to(blueprints::get_at))],
        ))
        .service(resource(
            "/{project}/{blueprint}",
            [(Method::POST, web::to(items::create))],
        ))
        .service(item_resource())
        .default_service(web::to(not_found));
}

/// The item route's pattern, also the metrics' label of plain item paths ([`route_label`]).
const ITEM_ROUTE: &str = "/{project}/{blueprint}/{id}";

/// An item: `/{project}/{blueprint}/{id}`, for paths that are not plain (percent-encoded ones).
fn item_resource() -> actix_web::Resource {
    // Every method reaches the handler, which answers 405 for those an item does not take.
    web::resource(ITEM_ROUTE).route(web::route().to(items::routed))
}

/// The route a request took, as the metrics name it: its pattern, `unmatched` for none.
pub fn route_label(request: &actix_web::HttpRequest) -> std::borrow::Cow<'static, str> {
    if plain_item_path(request.path()) {
        std::borrow::Cow::Borrowed(ITEM_ROUTE)
    } else {
        request.match_pattern().map_or(
            std::borrow::Cow::Borrowed("unmatched"),
            std::borrow::Cow::Owned,
        )
    }
}

/// Whether `path` (as sent) is three segments none of which is a verb (`_`-prefixed) or
/// percent-encoded: then no route registered before the item route could match it, and the item
/// route may be tried first. Any other path takes the route table in its order.
fn plain_item_path(path: &str) -> bool {
    // One pass over the bytes: it runs for every request, twice (the guard and the metrics label).
    let mut segments = 1;
    let mut at_start = true;
    for &byte in path.strip_prefix('/').unwrap_or(path).as_bytes() {
        match byte {
            b'/' if at_start || segments == 3 => return false,
            b'/' => {
                segments += 1;
                at_start = true;
                continue;
            }
            b'%' => return false,
            b'_' if at_start => return false,
            _ => {}
        }
        at_start = false;
    }
    segments == 3 && !at_start
}

/// A resource taking each of `routes`' methods; any other method answers 405 with a JSON body and
/// an `Allow` header naming them.
fn resource<const N: usize>(
    path: &str,
    routes: [(Method, actix_web::Route); N],
) -> actix_web::Resource {
    let allow: Arc<str> = routes
        .iter()
        .map(|(method, _)| method.as_str())
        .collect::<Vec<_>>()
        .join(", ")
        .into();
    let resource = routes
        .into_iter()
        .fold(web::resource(path), |resource, (method, route)| {
            resource.route(route.method(method))
        });
    resource.default_service(web::to(move || {
        let allow = allow.to_string();
        async move { Err::<HttpResponse, _>(ApiError::MethodNotAllowed(allow)) }
    }))
}

async fn not_found(request: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        request.method(),
        request.path()
    )))
}

#[cfg(test)]
mod tests {
    use super::plain_item_path;

    #[test]
    fn only_paths_no_verb_route_matches_take_the_item_route_first() {
        assert!(plain_item_path(
            "/shop/article/5f0c0c9e-1b2a-4c3d-8e4f-000000000001"
        ));
        for verb in [
            "/shop/article/_blueprint",
            "/shop/_version/2",
            "/shop/_blueprint/1",
            "/_keys/abc/_rotate",
            "/shop/article/%5Fblueprint",
            "/shop/article",
            "/shop/article/1/extra",
            "/shop/article/",
            "//article/1",
        ] {
            assert!(!plain_item_path(verb), "{verb}");
        }
    }

    /// The byte loop says what splitting the path into segments says.
    #[test]
    fn plain_paths_are_what_their_segments_say() {
        let reference = |path: &str| {
            let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
            segments.len() == 3
                && segments
                    .iter()
                    .all(|s| !s.is_empty() && !s.starts_with('_') && !s.contains('%'))
        };
        let pieces = ["/", "a", "_", "%", "b_", "é", "", "x%y", "//", "a/"];
        let mut checked = 0;
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    for d in pieces {
                        for e in pieces {
                            let path = format!("{a}{b}{c}{d}{e}");
                            assert_eq!(plain_item_path(&path), reference(&path), "{path:?}");
                            checked += usize::from(reference(&path));
                        }
                    }
                }
            }
        }
        assert!(checked > 200, "{checked}");
    }
}
