//! Readiness: the processor is ready (gRPC health `""` SERVING, `/readyz`
//! 200) once its listeners serve and every `--prefetch-audience` holds a
//! usable token; without prefetched audiences, as soon as the listeners
//! serve.
//!
//! Once ready it stays ready while those tokens stay usable: an API server
//! that fails does not flip it, since the tokens in hand still work. Only a
//! prefetched token that stops being usable (30 s before its expiry) with
//! no successful refresh turns it not ready, because from then on requests
//! for that audience are answered 503; it turns ready again when a mint
//! succeeds. The ext_proc service's own health status is not tied to this:
//! it answers every request (503 for an audience without a token), so Envoy
//! keeps sending other requests.

use tokio::time::Instant;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::tokens::cache::prefetch::Pinned;

/// What decides readiness beyond the listeners. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Readiness {
    pinned: Pinned,
}

impl Readiness {
    /// Readiness that waits for the tokens of `pinned`.
    pub(crate) fn new(pinned: Pinned) -> Readiness {
        Readiness { pinned }
    }

    /// Why the processor is not ready at `now` (the prefetched audiences
    /// without a usable token), or `None`. Names audiences only, never a
    /// token.
    pub(crate) fn reason(&self, now: Instant) -> Option<String> {
        let missing = self.pinned.missing(now);
        if missing.is_empty() {
            return None;
        }
        let names: Vec<&str> = missing.iter().map(|a| a.as_str()).collect();
        Some(format!(
            "no valid token yet for prefetched audience(s): {}",
            names.join(", ")
        ))
    }

    /// Reports readiness as the health status of the whole server (`""`)
    /// through `reporter`, from now (the listeners serve) until dropped:
    /// on every change of a prefetched token and when one stops being
    /// usable.
    pub(crate) async fn report(self, reporter: HealthReporter) {
        let mut changed = self.pinned.subscribe();
        let mut last = None;
        loop {
            let now = Instant::now();
            let reason = self.reason(now);
            let ready = reason.is_none();
            if last != Some(ready) {
                match &reason {
                    None => tracing::info!("ready: every prefetched audience holds a valid token"),
                    Some(reason) => tracing::warn!(%reason, "not ready"),
                }
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                last = Some(ready);
            }
            let expiry = self.pinned.next_expiry(now);
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        // The cache is gone: nothing will change any more.
                        return;
                    }
                }
                () = sleep_until(expiry) => {}
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
