//! The process-wide shutdown signal: a future that completes on SIGTERM (what
//! Kubernetes sends) or SIGINT (Ctrl-C).

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal as listen};

/// Installs the SIGTERM and SIGINT handlers now (so a signal that arrives
/// before the future is first polled is not lost to the default action) and
/// returns a future that completes when either arrives. Must be called
/// inside the runtime. A handler that cannot be installed is logged; the
/// other signal still works.
pub fn signal() -> impl Future<Output = ()> {
    let term = install(SignalKind::terminate(), "SIGTERM");
    let int = install(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            () = wait(term) => tracing::info!("SIGTERM received"),
            () = wait(int) => tracing::info!("SIGINT received"),
        }
    }
}

fn install(kind: SignalKind, name: &str) -> Option<Signal> {
    listen(kind)
        .inspect_err(|error| tracing::error!(%error, "cannot listen for {name}"))
        .ok()
}

async fn wait(signal: Option<Signal>) {
    match signal {
        Some(mut signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}
