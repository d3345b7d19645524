//! The bound on TokenRequests in flight at once, across all audiences
//! (`--max-concurrent-token-requests`): every mint, in the foreground or a
//! background refresh, first takes a permit. A request that finds none free
//! waits rather than being refused; the wait and the TokenRequest together
//! stay within `--token-request-timeout`, so Envoy's `message_timeout` is
//! never the one that fires.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Error, IssuedToken, TokenSource};
use crate::audience::Audience;

/// A token source behind the in-flight limit. Cheap to clone (shared
/// permits).
pub(crate) struct Limited<S> {
    source: Arc<S>,
    permits: Arc<Semaphore>,
    limit: usize,
    timeout: Duration,
}

impl<S> Clone for Limited<S> {
    fn clone(&self) -> Self {
        Limited {
            source: self.source.clone(),
            permits: self.permits.clone(),
            limit: self.limit,
            timeout: self.timeout,
        }
    }
}

impl<S: TokenSource> Limited<S> {
    /// `source` with at most `limit` (at least 1) TokenRequests in flight,
    /// each given at most `timeout`, waiting included.
    pub(crate) fn new(source: S, limit: usize, timeout: Duration) -> Limited<S> {
        // Config validation keeps the limit between 1 and u16::MAX, far
        // below Semaphore::MAX_PERMITS; clamp anyway rather than panic.
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Limited {
            source: Arc::new(source),
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            timeout,
        }
    }

    /// One TokenRequest, once a permit is free. Waiting and the request
    /// together take at most the timeout: the TokenRequest gets what the
    /// wait left, and a timeout says how much that was.
    pub(crate) async fn mint(&self, audience: &Audience) -> Result<IssuedToken, Error> {
        let (_permit, budget) = match self.permits.try_acquire() {
            Ok(permit) => (permit, self.timeout),
            Err(_) => {
                let deadline = Instant::now() + self.timeout;
                // The semaphore is never closed: `Err` means the deadline.
                let Ok(Ok(permit)) =
                    tokio::time::timeout_at(deadline, self.permits.acquire()).await
                else {
                    return Err(Error::Busy {
                        limit: self.limit,
                        timeout: self.timeout,
                    });
                };
                (permit, deadline.saturating_duration_since(Instant::now()))
            }
        };
        match tokio::time::timeout(budget, self.source.mint(audience)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(budget)),
        }
    }
}
