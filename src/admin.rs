//! The admin HTTP listener: `/healthz` (the process is up), `/readyz`
//! (it asks the same gRPC health service Envoy can ask, so both agree; when
//! not ready, the body names the prefetched audiences still without a token)
//! and `/metrics` (Prometheus, OpenMetrics text; see [`crate::metrics`]).
//!
//! It may be bound to the pod IP so that the kubelet can probe it, so anyone
//! who can reach the pod can connect. It serves nothing secret; what it must
//! not do is let such clients hold memory or sockets without bound. Hence
//! HTTP/1 only, a header read timeout, small buffers and a connection cap.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;

use crate::metrics::{self, Registry};
use crate::readiness::Readiness;

/// How long a client may take to send a request's headers, counted from the
/// moment the server waits for them: on a new connection and between
/// requests on a kept-alive one. A probe or `curl` sends its few hundred
/// bytes at once; a connection that has not finished its headers by then is
/// closed, idle kept-alive ones included.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most admin connections open at once. Connections accepted beyond it
/// are closed at once (not queued: a probe should fail fast rather than wait
/// behind a flood). Real use is a handful (kubelet probes every few
/// seconds); the cap is far above that so that a few hundred connections
/// that stall their headers (each closed after [`HEADER_READ_TIMEOUT`]) do
/// not lock the probes out, and low enough to bound memory (each connection
/// holds at most [`MAX_BUF_SIZE`] of read buffer plus a task).
pub(crate) const MAX_CONNECTIONS: usize = 512;

/// The read buffer limit per connection. Requests here are bodiless GETs and
/// answers a few bytes; 8 KiB is hyper's minimum and ample for the headers.
const MAX_BUF_SIZE: usize = 8 * 1024;

/// How long to pause after an accept error that is not about one connection
/// (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The router, served by [`serve`].
pub(crate) fn router(
    health: HealthService,
    readiness: Readiness,
    registry: Arc<Registry>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .layer(Extension(readiness))
        .with_state(Arc::new(health))
        .route("/metrics", get(move || metrics(registry.clone())))
}

/// `GET /metrics`: the OpenMetrics text exposition.
async fn metrics(registry: Arc<Registry>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match registry.encode() {
        Ok(body) => ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Err(_) => {
            tracing::warn!("cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            )
                .into_response()
        }
    }
}

async fn readyz(
    State(health): State<Arc<HealthService>>,
    Extension(readiness): Extension<Readiness>,
) -> (StatusCode, String) {
    let request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    match health.check(request).await {
        Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => {
            (StatusCode::OK, "ready\n".to_owned())
        }
        Ok(_) | Err(_) => {
            let body = match readiness.reason(tokio::time::Instant::now()) {
                Some(reason) => format!("not ready: {reason}\n"),
                None => "not ready\n".to_owned(),
            };
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

/// Whether an accept error concerns only the connection being accepted (the
/// next accept may well succeed at once).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// Serves the admin endpoints on `listener` until `shutdown` completes, then
/// stops accepting and waits for the open connections: requests in flight
/// finish, idle connections close (a stalled one within
/// [`HEADER_READ_TIMEOUT`]).
pub(crate) async fn serve(
    listener: TcpListener,
    health: HealthService,
    readiness: Readiness,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = TowerToHyperService::new(router(health, readiness, registry));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "admin listener: connection cap reached, closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
