//! The API's own description: the OpenAPI 3 document and a documentation page that renders it.
//! Both are compiled into the binary; the page loads nothing from outside the server.

use actix_web::HttpResponse;

const OPENAPI: &str = include_str!("openapi.json");
const PAGE: &str = include_str!("docs.html");

/// GET /_openapi.json
pub async fn openapi(_: super::query::NoQuery) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

/// GET /_docs
pub async fn page(_: super::query::NoQuery) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(PAGE)
}
