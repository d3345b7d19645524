//! Back-off per audience after a failed mint: while the window of the last
//! failure lasts ([`Policy::failure_window`]), requests for that audience get
//! the failure at once, without a TokenRequest. A success clears it; each
//! failure in a row grows the next window (up to the policy's cap).
//!
//! Windows are measured on tokio's clock (tests pause it). The failures are
//! held in a bounded moka cache that forgets one [`FAILURE_MEMORY`] after it
//! was recorded, on moka's own clock; that only resets the growth.

use std::time::Duration;

use tokio::time::Instant;

use super::Error;
use super::schedule::Policy;
use crate::audience::Audience;

/// How long a failure is remembered (to grow the next window) after it
/// happened. Longer than any window ([`Policy::max_failure_window`]).
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// The last failed mint of each audience that has no token. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Failures {
    last: moka::future::Cache<Audience, Failure>,
    policy: Policy,
}

/// A failed mint: requests get `cause` until `until`.
#[derive(Clone)]
struct Failure {
    cause: Error,
    until: Instant,
    /// 0 for the first failure in a row.
    attempt: u32,
}

impl Failures {
    /// Remembers at most `capacity` audiences' failures.
    pub(crate) fn new(capacity: u64, policy: Policy) -> Failures {
        Failures {
            last: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(FAILURE_MEMORY)
                .build(),
            policy,
        }
    }

    /// The error to answer `audience` with while its window lasts: the
    /// failure, and what is left of the window.
    pub(crate) async fn check(&self, audience: &Audience) -> Option<Error> {
        let failure = self.last.get(audience).await?;
        let retry_in = failure.until.checked_duration_since(Instant::now())?;
        (!retry_in.is_zero()).then(|| Error::BackingOff {
            cause: Box::new(failure.cause),
            retry_in,
        })
    }

    /// Records that minting for `audience` failed with `error`: opens its
    /// window if the error calls for one, and returns the error every
    /// request waiting on that mint gets.
    pub(crate) async fn record(&self, audience: &Audience, error: Error) -> Error {
        let attempt = match self.last.get(audience).await {
            Some(previous) => previous.attempt.saturating_add(1),
            None => 0,
        };
        let Some(window) = self.policy.failure_window(attempt, &error) else {
            return error;
        };
        tracing::debug!(%audience, %error, window = ?window, "no TokenRequest for this audience until the back-off window ends");
        let failure = Failure {
            cause: error.clone(),
            until: Instant::now() + window,
            attempt,
        };
        self.last.insert(audience.clone(), failure).await;
        Error::BackingOff {
            cause: Box::new(error),
            retry_in: window,
        }
    }

    /// Minting for `audience` succeeded: no window, and the next failure
    /// starts from the shortest one.
    pub(crate) async fn clear(&self, audience: &Audience) {
        self.last.invalidate(audience).await;
    }
}
