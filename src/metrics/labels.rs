//! The bounded label values: every value is a `&'static str` from a fixed
//! enum, so a label can never carry request data or a secret.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::tokens::Error;

/// What a `request_headers` decision did (`requests_total{outcome}`).
/// [`crate::ext_proc::outcome`] maps every decision to exactly one.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Forwarded with a token.
    Injected,
    /// No audience: forwarded untouched.
    Passthrough,
    /// 400: the audience is empty, too long, malformed or ambiguous.
    InvalidAudience,
    /// 403: the audience is outside `--allowed-audience`.
    NotAllowed,
    /// 403: no destination rule admits the audience for this host.
    NotBound,
    /// 403: the audience is one of the API server's own.
    ApiserverAudience,
    /// 403/400: the destination is on this machine or its link.
    LocalDestination,
    /// 503: no token could be had (`--on-token-error deny`).
    TokenUnavailable,
    /// No token could be had; forwarded without one (`--on-token-error allow`).
    FailOpen,
    /// 421: the request's host differs from the TLS server name.
    SniMismatch,
    /// A CONNECT to an intercepted host, routed to the TLS listener.
    ConnectIntercepted,
    /// A CONNECT to any other host, tunnelled untouched.
    ConnectTunnelled,
}

impl Outcome {
    /// Every outcome, in documentation order.
    pub(crate) const ALL: [Outcome; 12] = [
        Outcome::Injected,
        Outcome::Passthrough,
        Outcome::InvalidAudience,
        Outcome::NotAllowed,
        Outcome::NotBound,
        Outcome::ApiserverAudience,
        Outcome::LocalDestination,
        Outcome::TokenUnavailable,
        Outcome::FailOpen,
        Outcome::SniMismatch,
        Outcome::ConnectIntercepted,
        Outcome::ConnectTunnelled,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Passthrough => "passthrough",
            Outcome::InvalidAudience => "invalid_audience",
            Outcome::NotAllowed => "not_allowed",
            Outcome::NotBound => "not_bound",
            Outcome::ApiserverAudience => "apiserver_audience",
            Outcome::LocalDestination => "local_destination",
            Outcome::TokenUnavailable => "token_unavailable",
            Outcome::FailOpen => "fail_open",
            Outcome::SniMismatch => "sni_mismatch",
            Outcome::ConnectIntercepted => "connect_intercepted",
            Outcome::ConnectTunnelled => "connect_tunnelled",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// How a TokenRequest ended (`token_requests_total{result}`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum TokenResult {
    Success,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 400/422.
    Invalid,
    /// 429.
    Throttled,
    /// 5xx.
    ServerError,
    /// No answer within `--token-request-timeout`.
    Timeout,
    /// The API server could not be reached.
    ConnectError,
    /// Any other status, or a success whose body is unusable.
    Other,
}

impl TokenResult {
    /// Every result, in documentation order.
    pub(crate) const ALL: [TokenResult; 10] = [
        TokenResult::Success,
        TokenResult::Unauthorized,
        TokenResult::Forbidden,
        TokenResult::NotFound,
        TokenResult::Invalid,
        TokenResult::Throttled,
        TokenResult::ServerError,
        TokenResult::Timeout,
        TokenResult::ConnectError,
        TokenResult::Other,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TokenResult::Success => "success",
            TokenResult::Unauthorized => "unauthorized",
            TokenResult::Forbidden => "forbidden",
            TokenResult::NotFound => "not_found",
            TokenResult::Invalid => "invalid",
            TokenResult::Throttled => "throttled",
            TokenResult::ServerError => "server_error",
            TokenResult::Timeout => "timeout",
            TokenResult::ConnectError => "connect_error",
            TokenResult::Other => "other",
        }
    }

    /// The result of a TokenRequest that failed with `error`; `None` for
    /// failures that are no TokenRequest's: the proxy's own limit
    /// ([`Error::Busy`]), a back-off refusal, an abandoned mint.
    pub(crate) fn of_error(error: &Error) -> Option<TokenResult> {
        match error {
            Error::Unauthorized => Some(TokenResult::Unauthorized),
            Error::Forbidden => Some(TokenResult::Forbidden),
            Error::NotFound => Some(TokenResult::NotFound),
            Error::Invalid { .. } => Some(TokenResult::Invalid),
            Error::RateLimited { .. } => Some(TokenResult::Throttled),
            Error::Server { .. } => Some(TokenResult::ServerError),
            Error::Timeout(_) => Some(TokenResult::Timeout),
            Error::Transport(_) => Some(TokenResult::ConnectError),
            Error::Unexpected { .. } | Error::BadResponse(_) => Some(TokenResult::Other),
            Error::Busy { .. } | Error::Abandoned | Error::BackingOff { .. } => None,
        }
    }
}

impl EncodeLabelValue for TokenResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}
