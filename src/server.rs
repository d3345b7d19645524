//! Listeners and the server lifecycle.
//!
//! [`Listeners::bind`] binds before anything is spawned (tests bind port 0
//! and read the address back). [`serve`] serves ext_proc and grpc.health.v1 on
//! the gRPC listener and the admin endpoints on the admin listener until the
//! shutdown future completes. The server's health (`""`) follows
//! [`Readiness`] from the moment both serve. At shutdown: health goes NOT_SERVING, the processor
//! keeps serving for the drain delay (so Envoy stops sending first), ends the
//! streams that live as long as the server (SDS, health watches), stops
//! accepting, waits for in-flight streams (bounded), and returns.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};

use crate::config::ListenAddress;
use crate::ext_proc::ExtProc;
use crate::metrics::Registry;
use crate::readiness::Readiness;
use crate::sds::Sds;
use crate::tokens::TokenSource;

/// Longest wait for in-flight streams once the drain delay is over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Most concurrent gRPC streams on one HTTP/2 connection (announced in
/// SETTINGS_MAX_CONCURRENT_STREAMS). tonic announces no limit unless told,
/// so a client could hold any number of streams (about 16 KiB each, idle)
/// on one connection. Envoy's own per-connection figure used to be 1024; a
/// stream beyond the limit waits in Envoy's HTTP/2 codec until one ends.
/// ext_proc streams last one request, so only a burst of more than 1024
/// requests all waiting at once (one cold TokenRequest) queues there.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The gRPC listener: loopback TCP or a Unix socket.
#[derive(Debug)]
pub(crate) enum GrpcListener {
    Tcp(TcpListener),
    /// A Unix socket; the file is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

/// Both listeners, bound.
#[derive(Debug)]
pub(crate) struct Listeners {
    /// ext_proc, SDS and gRPC health.
    pub grpc: GrpcListener,
    /// `/healthz`, `/readyz`.
    pub admin: TcpListener,
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The gRPC listener.
    #[error("cannot listen on {address} for gRPC: {reason}")]
    Grpc {
        address: String,
        reason: std::io::Error,
    },
    /// The admin listener.
    #[error("cannot listen on {address} for the admin endpoints: {reason}")]
    Admin {
        address: SocketAddr,
        reason: std::io::Error,
    },
}

/// The server failed while running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Grpc(tonic::transport::Error),
    #[error("admin server failed: {0}")]
    Admin(std::io::Error),
}

impl Listeners {
    /// Binds both listeners.
    pub(crate) async fn bind(
        grpc: &ListenAddress,
        admin: SocketAddr,
    ) -> Result<Listeners, BindError> {
        let grpc = match grpc {
            ListenAddress::Tcp(addr) => {
                GrpcListener::Tcp(TcpListener::bind(addr).await.map_err(|reason| {
                    BindError::Grpc {
                        address: addr.to_string(),
                        reason,
                    }
                })?)
            }
            ListenAddress::Unix(path) => {
                let grpc_error = |reason| BindError::Grpc {
                    address: format!("unix:{}", path.display()),
                    reason,
                };
                remove_stale_socket(path).await.map_err(grpc_error)?;
                let listener = UnixListener::bind(path).map_err(grpc_error)?;
                GrpcListener::Unix(listener, path.clone())
            }
        };
        let admin = TcpListener::bind(admin)
            .await
            .map_err(|reason| BindError::Admin {
                address: admin,
                reason,
            })?;
        Ok(Listeners { grpc, admin })
    }

    /// The gRPC address, as `IP:PORT` or `unix:PATH`.
    pub(crate) fn grpc_address(&self) -> String {
        match &self.grpc {
            GrpcListener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            GrpcListener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    /// The admin address, as `IP:PORT`.
    pub(crate) fn admin_address(&self) -> String {
        self.admin
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }
}

/// A socket file left by a previous run would make `bind` fail, so it is
/// removed, but only when nobody listens on it any more (connecting is
/// refused): a socket another process serves is in use, like a taken port.
/// Anything that is not a socket is left alone (and `bind` reports it).
async fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
            }
            // Accepted, or a full backlog (WouldBlock): someone listens.
            Ok(_) => Err(std::io::ErrorKind::AddrInUse.into()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(std::io::ErrorKind::AddrInUse.into())
            }
            Err(e) => Err(e),
        },
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Serves until `shutdown` completes, then drains (see the module docs).
pub(crate) async fn serve<S: TokenSource>(
    processor: ExtProc<S>,
    sds: Option<Sds>,
    listeners: Listeners,
    readiness: Readiness,
    registry: Arc<Registry>,
    shutdown_delay: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let reporter = HealthReporter::new();
    let health = || HealthService::from_health_reporter(reporter.clone());
    // Not ready until `readiness` says so, once the listeners serve.
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_serving::<ExternalProcessorServer<ExtProc<S>>>()
        .await;

    let grpc_address = listeners.grpc_address();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let admin = tokio::spawn(crate::admin::serve(
        listeners.admin,
        health(),
        readiness.clone(),
        registry,
        stopped(stop_rx.clone()),
    ));

    let sds_handle = sds.clone();
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(tonic_health::pb::health_server::HealthServer::new(health()))
        .add_service(processor.into_service())
        .add_optional_service(sds.map(Sds::into_service));
    let mut socket_path = None;
    let grpc = match listeners.grpc {
        GrpcListener::Tcp(listener) => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(stop_rx)))
        }
        GrpcListener::Unix(listener, path) => {
            socket_path = Some(path);
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(stop_rx)))
        }
    };
    tracing::info!(grpc = %grpc_address, "serving ext_proc and grpc.health.v1");
    let ready = tokio::spawn(readiness.report(reporter.clone()));

    shutdown.await;
    ready.abort();
    // The reporter may be setting a status right now; wait until it has.
    let _ = ready.await;
    tracing::info!(delay = ?shutdown_delay, "shutting down: reporting NOT_SERVING, then draining");
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_not_serving::<ExternalProcessorServer<ExtProc<S>>>()
        .await;
    tokio::time::sleep(shutdown_delay).await;
    if let Some(sds) = sds_handle {
        sds.close_streams();
    }
    // Health watch streams also last as long as the server: forgetting the
    // statuses ends them (their watchers saw NOT_SERVING already).
    let mut statuses = reporter.clone();
    statuses.clear_service_status("").await;
    statuses
        .clear_service_status(<ExternalProcessorServer<ExtProc<S>> as NamedService>::NAME)
        .await;
    let _ = stop_tx.send(true);

    let result = match tokio::time::timeout(DRAIN_TIMEOUT, grpc).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(ServeError::Grpc(e)),
        Ok(Err(join)) => {
            tracing::error!(error = %join, "gRPC server task failed");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "in-flight streams did not finish in time");
            Ok(())
        }
    };
    if let Ok(Ok(Err(e))) = tokio::time::timeout(DRAIN_TIMEOUT, admin).await {
        return Err(ServeError::Admin(e));
    }
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    result
}
