//! The admin HTTP listener: `/healthz` (the process is up) and `/readyz`
//! (it asks the same gRPC health service Envoy can ask, so both agree).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;

/// The router, served by [`serve`].
pub(crate) fn router(health: HealthService) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(health))
}

async fn readyz(State(health): State<Arc<HealthService>>) -> (StatusCode, &'static str) {
    let request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    match health.check(request).await {
        Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => {
            (StatusCode::OK, "ready\n")
        }
        Ok(_) | Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    health: HealthService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}
