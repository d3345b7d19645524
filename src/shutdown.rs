//! The process-wide shutdown signal: a future that completes on SIGTERM (what
//! Kubernetes sends) or SIGINT (Ctrl-C).

/// Completes when SIGTERM or SIGINT arrives. If a handler cannot be
/// installed, that signal is logged and ignored; the other still works.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    let int = async {
        match signal(SignalKind::interrupt()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM received"),
        () = int => tracing::info!("SIGINT received"),
    }
}
