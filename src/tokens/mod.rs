//! Bound ServiceAccount tokens: where they come from ([`TokenSource`]), how
//! they are cached and refreshed ([`cache::TokenCache`]), and how failures
//! are described ([`Error`]).

mod backoff;
pub(crate) mod cache;
mod flight;
pub(crate) mod kube;
mod limit;
pub(crate) mod schedule;

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::audience::Audience;
use crate::secret::Token;

/// A freshly minted token and the expiry the API server reported for it
/// (`status.expirationTimestamp`).
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token: Token,
    /// As the API server states it; the cache stops handing the token out
    /// shortly before, whatever the JWT says (it is never decoded).
    pub expires_at: SystemTime,
}

/// Something that mints a token for an audience: the Kubernetes TokenRequest
/// API in production ([`kube::KubeTokenSource`]), a fake in tests.
pub trait TokenSource: Send + Sync + 'static {
    /// Mints a new token whose `aud` claim is exactly `audience`.
    fn mint(&self, audience: &Audience) -> impl Future<Output = Result<IssuedToken, Error>> + Send;
}

/// Why no token could be had. Messages name the HTTP status and its meaning,
/// never a request or response body, so they are safe to log and to send to
/// the client in a 503.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// 401: the proxy's own credentials were refused.
    #[error("the API server rejected the proxy's own credentials (401 Unauthorized)")]
    Unauthorized,
    /// 403: RBAC does not allow `create` on `serviceaccounts/token`.
    #[error(
        "the API server refused the TokenRequest (403 Forbidden): the proxy may not create tokens for this ServiceAccount"
    )]
    Forbidden,
    /// 404: the ServiceAccount (or namespace) does not exist.
    #[error("the ServiceAccount does not exist (404 Not Found)")]
    NotFound,
    /// 400/422: the API server found the TokenRequest invalid.
    #[error("the API server rejected the TokenRequest as invalid (HTTP {status})")]
    Invalid { status: u16 },
    /// 429: the API server asks to slow down.
    #[error("the API server is rate limiting TokenRequests (429 Too Many Requests)")]
    RateLimited {
        /// The `Retry-After` the server sent, if any.
        retry_after: Option<Duration>,
    },
    /// 5xx: the API server failed.
    #[error("the API server failed (HTTP {status})")]
    Server { status: u16 },
    /// Any other status.
    #[error("the API server answered the TokenRequest with unexpected HTTP {status}")]
    Unexpected { status: u16 },
    /// The API server could not be reached.
    #[error("could not reach the API server: {0}")]
    Transport(String),
    /// The API server did not answer in time.
    #[error("the API server did not answer the TokenRequest within {0:?}")]
    Timeout(Duration),
    /// The answer was a success but unusable.
    #[error("the API server's TokenRequest answer is unusable: {0}")]
    BadResponse(&'static str),
    /// `--max-concurrent-token-requests` TokenRequests were in flight, and
    /// waiting for a free slot took the whole `--token-request-timeout`, or
    /// so much of it that the TokenRequest ran out of what was left: the
    /// proxy's own limit cut it short, not the API server (so no back-off
    /// follows).
    #[error(
        "{limit} TokenRequests were already in flight (--max-concurrent-token-requests), and waiting for a free slot left too little of the {timeout:?} --token-request-timeout to get a token"
    )]
    Busy { limit: usize, timeout: Duration },
    /// The task minting the token ended without an outcome (the processor
    /// is shutting down).
    #[error("the TokenRequest was abandoned without an answer (the processor is shutting down)")]
    Abandoned,
    /// An earlier TokenRequest for this audience failed with `cause`, and
    /// the proxy does not ask again before `retry_in` has passed.
    #[error("{cause}; the proxy asks again in {} s", whole_seconds(*retry_in))]
    BackingOff {
        cause: Box<Error>,
        /// What is left of the back-off window.
        retry_in: Duration,
    },
}

impl Error {
    /// How long the server asked us to wait before retrying, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after } => *retry_after,
            Error::Unauthorized
            | Error::Forbidden
            | Error::NotFound
            | Error::Invalid { .. }
            | Error::Server { .. }
            | Error::Unexpected { .. }
            | Error::Transport(_)
            | Error::Timeout(_)
            | Error::BadResponse(_)
            | Error::Busy { .. }
            | Error::Abandoned
            | Error::BackingOff { .. } => None,
        }
    }

    /// When the client may try again, for the `retry-after` of the 503:
    /// what is left of the audience's back-off window.
    pub fn retry_in(&self) -> Option<Duration> {
        match self {
            Error::BackingOff { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }

    /// A short, stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Unauthorized => "unauthorized",
            Error::Forbidden => "forbidden",
            Error::NotFound => "not_found",
            Error::Invalid { .. } => "invalid",
            Error::RateLimited { .. } => "rate_limited",
            Error::Server { .. } => "server_error",
            Error::Unexpected { .. } => "unexpected_status",
            Error::Transport(_) => "transport",
            Error::Timeout(_) => "timeout",
            Error::BadResponse(_) => "bad_response",
            Error::Busy { .. } => "busy",
            Error::Abandoned => "abandoned",
            Error::BackingOff { .. } => "backing_off",
        }
    }
}

/// `duration` in whole seconds, rounded up (a `Retry-After` must not invite
/// the client back before the window ends), at least 1.
pub(crate) fn whole_seconds(duration: Duration) -> u64 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    secs.max(1)
}
