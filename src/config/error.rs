//! Configuration errors: one [`ConfigError`] per invalid setting, all of
//! them collected into [`ConfigErrors`] while every section is built.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{MAX_TOKEN_REQUEST_TIMEOUT, MIN_CERTIFICATE_VALIDITY, MIN_TOKEN_EXPIRATION};
use crate::audience;

/// One invalid setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No ServiceAccount given.
    #[error("no ServiceAccount: pass --service-account NAME or set SERVICE_ACCOUNT")]
    MissingServiceAccount,
    /// The namespace file could not be read.
    #[error(
        "no namespace: --namespace / POD_NAMESPACE not set and the namespace file {path} could not be read ({reason})"
    )]
    NamespaceFile {
        path: PathBuf,
        reason: std::io::Error,
    },
    /// A Kubernetes name is not a valid DNS-1123 subdomain.
    #[error(
        "{what} {value:?} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.')"
    )]
    InvalidName { what: &'static str, value: String },
    /// A listen address that does not parse.
    #[error("{flag} {value:?}: expected {expected}")]
    ListenAddress {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    /// gRPC listener outside loopback.
    #[error(
        "--grpc-listen-address {0}: the processor hands out credentials, so it only listens on loopback (127.0.0.0/8, ::1) or a Unix socket"
    )]
    NotLoopback(SocketAddr),
    /// Bad API server URL.
    #[error("--apiserver {0:?} is not a valid URL")]
    ApiServer(String),
    /// Token lifetime too short.
    #[error(
        "--token-expiration {} is below the API server's minimum of {}",
        humantime::format_duration(*.0),
        humantime::format_duration(MIN_TOKEN_EXPIRATION)
    )]
    TokenExpiration(Duration),
    /// Bad audience header name.
    #[error("--audience-header {0:?} is not a valid HTTP header name")]
    AudienceHeader(String),
    /// Empty audience parameter name.
    #[error("--audience-parameter must not be empty")]
    AudienceParameter,
    /// Bad default audience.
    #[error("--default-audience: {0}")]
    DefaultAudience(audience::Rejection),
    /// Bad allowlist pattern.
    #[error("--allowed-audience: {0}")]
    AllowedAudience(crate::allowlist::PatternError),
    /// Bad destination rule (one per rule).
    #[error(transparent)]
    AudienceRule(#[from] crate::destination::RuleError),
    /// --bind-pod without the pod's identity.
    #[error(
        "--bind-pod needs the pod's name and UID: pass --pod-name/--pod-uid or set POD_NAME/POD_UID"
    )]
    MissingPod,
    /// Bad intercept pattern.
    #[error(transparent)]
    InterceptHost(#[from] crate::intercept::PatternError),
    /// Leaf validity out of range.
    #[error(
        "--certificate-validity must be between {} and --ca-validity",
        humantime::format_duration(MIN_CERTIFICATE_VALIDITY)
    )]
    CertificateValidity,
    /// A duration that must not be zero.
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
    /// No TokenRequest could ever be made.
    #[error("--max-concurrent-token-requests must be at least 1")]
    MaxConcurrentTokenRequests,
    /// The default audience is one of the API server's own.
    #[error(
        "--default-audience {0:?} is an audience of the Kubernetes API server itself: every request without an audience would carry a token that acts as the ServiceAccount against the API server; name the target's audience instead (or pass --allow-apiserver-audience if that is really meant)"
    )]
    DefaultAudienceIsApiServer(String),
    /// A rule's literal audience is one of the API server's own.
    #[error(
        "--audience-rule {rule:?}: {audience:?} is an audience of the Kubernetes API server itself, refused for every request; name the target's audience instead (or pass --allow-apiserver-audience if that is really meant)"
    )]
    RuleAudienceIsApiServer { rule: String, audience: String },
    /// The TokenRequest timeout is absurdly long.
    #[error(
        "--token-request-timeout {} is longer than the maximum of {} (keep it below Envoy's ext_proc message_timeout)",
        humantime::format_duration(*.0),
        humantime::format_duration(MAX_TOKEN_REQUEST_TIMEOUT)
    )]
    TokenRequestTimeout(Duration),
    /// Bad prefetch audience (one per flag).
    #[error("--prefetch-audience: {0}")]
    PrefetchAudience(audience::Rejection),
    /// A prefetch audience is one of the API server's own.
    #[error(
        "--prefetch-audience {0:?} is an audience of the Kubernetes API server itself: its token would act as the ServiceAccount against the API server; name the target's audience instead (or pass --allow-apiserver-audience if that is really meant)"
    )]
    PrefetchAudienceIsApiServer(String),
    /// More prefetched audiences than the cache holds.
    #[error(
        "{count} --prefetch-audience values do not fit in --max-audiences {max}: prefetched audiences count against it"
    )]
    TooManyPrefetchAudiences { count: u64, max: u64 },
}

/// Every invalid setting of a command line, reported together so an
/// operator fixes them in one round. Exit code 64 (EX_USAGE).
#[derive(Debug)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    /// The errors, in flag order.
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }
}

impl std::fmt::Display for ConfigErrors {
    /// One error per line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors while every section is built, so none stops the others.
#[derive(Default)]
pub(super) struct Collector(Vec<ConfigError>);

impl Collector {
    /// The value, or `None` with the error recorded.
    pub(super) fn take<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|error| self.0.push(error)).ok()
    }

    /// `Some(())` if `ok`, else `None` with the error recorded.
    pub(super) fn check(&mut self, ok: bool, error: impl FnOnce() -> ConfigError) -> Option<()> {
        self.take(if ok { Ok(()) } else { Err(error()) })
    }

    /// `value` if it was built and nothing was recorded, else every error.
    pub(super) fn finish<T>(self, value: Option<T>) -> Result<T, ConfigErrors> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            // A section returns `None` only after recording why.
            Some(_) | None => Err(ConfigErrors(self.0)),
        }
    }
}
