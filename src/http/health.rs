//! Liveness, readiness per projector, and the dead letters.

use actix_web::{web, HttpResponse};
use serde_json::{json, Map};

use super::error::ApiError;
use super::State;

/// GET /_health: the process answers.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// GET /_health/ready: per projector, whether its store answers and how far behind it is.
pub async fn ready(state: State) -> HttpResponse {
    let mut projectors = Map::new();
    let mut all_ready = true;
    for projector in state.registry.iter() {
        let health = projector.health().await;
        let progress = state.journal.progress(projector.name());
        let status = if !health.reachable || progress.last_error.is_some() {
            all_ready = false;
            "failing"
        } else if progress.pending > 0 {
            "catching_up"
        } else {
            "ready"
        };
        projectors.insert(
            projector.name().into(),
            json!({"status": status, "health": health, "progress": progress}),
        );
    }
    let body =
        json!({"status": if all_ready { "ready" } else { "degraded" }, "projectors": projectors});
    HttpResponse::Ok().json(body)
}

#[derive(serde::Deserialize)]
pub struct DeadLetterParams {
    limit: Option<usize>,
}

/// GET /_dead_letters
pub async fn dead_letters(
    state: State,
    params: web::Query<DeadLetterParams>,
) -> Result<HttpResponse, ApiError> {
    let letters = state.journal.dead_letters(params.limit.unwrap_or(100))?;
    Ok(HttpResponse::Ok().json(json!({"dead_letters": letters})))
}
