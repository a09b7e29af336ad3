//! `/_standin/` endpoints, so the binary can be scripted and inspected from outside.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::{AsyncFailure, Fault, Shared, opsgenie};

pub(crate) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_standin/requests", get(requests).delete(clear_requests))
        .route("/_standin/stats", get(stats))
        .route("/_standin/alerts", get(alerts))
        .route(
            "/_standin/faults",
            axum::routing::post(push_faults).delete(clear_faults),
        )
        .route(
            "/_standin/async-failures",
            axum::routing::post(push_async_failures).delete(clear_async_failures),
        )
        .route("/_standin/heartbeats", get(heartbeats))
        .fallback(opsgenie::answer)
        .with_state(shared)
}

async fn requests(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.books().requests.clone()).into_response()
}

async fn clear_requests(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.books().requests.clear();
    StatusCode::NO_CONTENT
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.stats()).into_response()
}

async fn alerts(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.books().alerts.clone()).into_response()
}

async fn push_faults(
    State(shared): State<Arc<Shared>>,
    Json(faults): Json<Vec<Fault>>,
) -> Response {
    match shared.push_faults(faults) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{error:#}")).into_response(),
    }
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.books().script.clear();
    StatusCode::NO_CONTENT
}

async fn push_async_failures(
    State(shared): State<Arc<Shared>>,
    Json(failures): Json<Vec<AsyncFailure>>,
) -> StatusCode {
    shared.processing().add_rules(failures);
    StatusCode::NO_CONTENT
}

async fn clear_async_failures(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.processing().clear_rules();
    StatusCode::NO_CONTENT
}

async fn heartbeats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.processing().ping_count.clone()).into_response()
}
