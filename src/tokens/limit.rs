//! The bound on TokenRequests in flight at once, across all audiences
//! (`--max-concurrent-token-requests`): every mint, in the foreground or a
//! background refresh, first takes a permit. A request that finds none free
//! waits rather than being refused; the wait and the TokenRequest together
//! stay within `--token-request-timeout`, so Envoy's `message_timeout` is
//! never the one that fires. Only a TokenRequest that had the whole timeout
//! can time out as the API server's failure ([`Limited::mint`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Error, IssuedToken, TokenSource};
use crate::audience::Audience;
use crate::metrics::{Metrics, TokenResult};

/// A token source behind the in-flight limit. Cheap to clone (shared
/// permits).
pub(crate) struct Limited<S> {
    source: Arc<S>,
    permits: Arc<Semaphore>,
    limit: usize,
    timeout: Duration,
    /// Counts and times each TokenRequest.
    metrics: Arc<Metrics>,
}

impl<S> Clone for Limited<S> {
    fn clone(&self) -> Self {
        Limited {
            source: self.source.clone(),
            permits: self.permits.clone(),
            limit: self.limit,
            timeout: self.timeout,
            metrics: self.metrics.clone(),
        }
    }
}

impl<S: TokenSource> Limited<S> {
    /// `source` with at most `limit` (at least 1) TokenRequests in flight,
    /// each given at most `timeout`, waiting included.
    pub(crate) fn new(
        source: S,
        limit: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Limited<S> {
        // Config validation keeps the limit between 1 and u16::MAX, far
        // below Semaphore::MAX_PERMITS; clamp anyway rather than panic.
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Limited {
            source: Arc::new(source),
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            timeout,
            metrics,
        }
    }

    /// One TokenRequest, once a permit is free. Waiting and the request
    /// together take at most the timeout: the TokenRequest gets what the
    /// wait left.
    ///
    /// A timeout is the API server's ([`Error::Timeout`], which opens a
    /// back-off window) only when the TokenRequest had the whole timeout.
    /// One that first waited for a permit and then ran out of the rest is
    /// [`Error::Busy`], as is a wait that never got a permit: the proxy's
    /// own limit cut it short, and blaming the API server would hold
    /// requests back while it is healthy. The API server still sees at
    /// most `limit` TokenRequests at once, so that costs it nothing.
    pub(crate) async fn mint(&self, audience: &Audience) -> Result<IssuedToken, Error> {
        let busy = || Error::Busy {
            limit: self.limit,
            timeout: self.timeout,
        };
        // `waited`: no permit was free at once, so the TokenRequest gets
        // less than the whole timeout.
        let (_permit, budget, waited) = match self.permits.try_acquire() {
            Ok(permit) => (permit, self.timeout, false),
            Err(_) => {
                let start = Instant::now();
                // The semaphore is never closed: `Err` means the timeout.
                let Ok(Ok(permit)) =
                    tokio::time::timeout(self.timeout, self.permits.acquire()).await
                else {
                    return Err(busy());
                };
                let left = self.timeout.saturating_sub(start.elapsed());
                (permit, left, true)
            }
        };
        let started = Instant::now();
        let result = match tokio::time::timeout(budget, self.source.mint(audience)).await {
            Ok(result) => result,
            Err(_) if waited => Err(busy()),
            Err(_) => Err(Error::Timeout(budget)),
        };
        // Busy is the proxy's own limit: not counted as a TokenRequest.
        let counted = match &result {
            Ok(_) => Some(TokenResult::Success),
            Err(error) => TokenResult::of_error(error),
        };
        if let Some(counted) = counted {
            self.metrics.token_request(counted, started.elapsed());
        }
        result
    }
}
