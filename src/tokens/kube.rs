//! The production [`TokenSource`]: the Kubernetes TokenRequest API
//! (`POST /api/v1/namespaces/NS/serviceaccounts/SA/token`), called through
//! the kube crate's client, which brings authentication and TLS.
//!
//! The raw `Client::send` is used rather than a typed helper so that the
//! status code and `Retry-After` header stay visible: they decide how the
//! cache retries. Errors carry the status, never the body.

use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Limited};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};

use super::{Error, IssuedToken, TokenSource};
use crate::audience::Audience;
use crate::config::{KubeSettings, TokenSettings};
use crate::secret::Token;

/// Largest TokenRequest answer read (a real one is a few KiB).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The Pod a token is bound to (`boundObjectRef`), so it dies with the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    /// The pod's name (`POD_NAME`).
    pub name: String,
    /// The pod's UID (`POD_UID`).
    pub uid: String,
}

/// Mints tokens with TokenRequest for one ServiceAccount.
#[derive(Clone)]
pub(crate) struct KubeTokenSource {
    client: kube::Client,
    path: String,
    expiration: Duration,
    bound_pod: Option<BoundPod>,
    timeout: Duration,
}

impl KubeTokenSource {
    /// A source minting per `settings` through `client`.
    pub(crate) fn new(client: kube::Client, settings: &TokenSettings) -> KubeTokenSource {
        let TokenSettings {
            namespace,
            service_account,
            ..
        } = settings;
        KubeTokenSource {
            client,
            path: format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"),
            expiration: settings.expiration,
            bound_pod: settings.bound_pod.clone(),
            timeout: settings.request_timeout,
        }
    }

    fn request_body(&self, audience: &Audience) -> Result<Vec<u8>, Error> {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.as_str().to_owned()]),
                expiration_seconds: Some(
                    i64::try_from(self.expiration.as_secs()).unwrap_or(i64::MAX),
                ),
                bound_object_ref: self.bound_pod.as_ref().map(|pod| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name.clone()),
                    uid: Some(pod.uid.clone()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        serde_json::to_vec(&request)
            .map_err(|_| Error::BadResponse("could not encode the TokenRequest"))
    }

    async fn call(&self, audience: &Audience) -> Result<IssuedToken, Error> {
        let body = self.request_body(audience)?;
        let request = http::Request::post(self.path.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(kube::client::Body::from(body))
            .map_err(|_| Error::BadResponse("could not build the TokenRequest"))?;
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| Error::Transport(transport_reason(&e)))?;
        let status = response.status();
        let retry_after = header_retry_after(response.headers());
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|_| {
                Error::Transport("the API server's answer was cut off or too large".into())
            })?
            .to_bytes();
        if !status.is_success() {
            return Err(status_error(
                status.as_u16(),
                retry_after.or_else(|| body_retry_after(&bytes)),
            ));
        }
        let issued = parse_issued(&bytes)?;
        Ok(IssuedToken {
            expires_at: trusted_expiry(issued.expires_at, SystemTime::now(), self.expiration),
            ..issued
        })
    }
}

/// The expiry the cache plans with: the one the API server `stated`, but
/// never later than the lifetime the proxy asked for (`expirationSeconds`)
/// from `now`. An API server may grant more (its clock runs ahead of ours,
/// or it extends lifetimes, `--service-account-extend-token-expiration`);
/// the proxy cannot tell the two apart, so it refreshes on the schedule of
/// what it asked for: one TokenRequest earlier at worst, never a token held
/// on the word of a clock it cannot check. A token stated to expire sooner
/// keeps its stated expiry (and is refreshed sooner).
fn trusted_expiry(stated: SystemTime, now: SystemTime, asked: Duration) -> SystemTime {
    match now.checked_add(asked) {
        Some(limit) => stated.min(limit),
        None => stated,
    }
}

/// The Kubernetes client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file cannot be read or used.
    #[error("cannot load kubeconfig {path}: {reason}")]
    Kubeconfig {
        path: std::path::PathBuf,
        reason: kube::config::KubeconfigError,
    },
    /// Neither in a cluster nor given a kubeconfig.
    #[error(
        "cannot find a Kubernetes configuration (not in a cluster and no --kubeconfig/KUBECONFIG): {0}"
    )]
    Infer(kube::config::InferConfigError),
    /// The configuration is there but the client cannot be built from it.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(kube::Error),
}

/// The kube client for `settings`, with kube's own retries off: the token
/// cache owns retries (backoff, Retry-After, serve-while-valid), and kube's
/// retry loop would hide failures and multiply TokenRequests. Also returns
/// the API server URL the client talks to (its own audiences include it).
pub(crate) async fn client(
    settings: &KubeSettings,
) -> Result<(kube::Client, http::Uri), ClientError> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let error = |reason| ClientError::Kubeconfig {
                path: path.clone(),
                reason,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(error)?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(error)?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    if let Some(url) = &settings.apiserver {
        config.cluster_url = url.clone();
    }
    config.default_retry = false;
    let url = config.cluster_url.clone();
    let client = kube::Client::try_from(config).map_err(ClientError::Client)?;
    Ok((client, url))
}

impl TokenSource for KubeTokenSource {
    async fn mint(&self, audience: &Audience) -> Result<IssuedToken, Error> {
        match tokio::time::timeout(self.timeout, self.call(audience)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(self.timeout)),
        }
    }
}

/// Maps a non-success status to an [`Error`].
fn status_error(status: u16, retry_after: Option<Duration>) -> Error {
    match status {
        401 => Error::Unauthorized,
        403 => Error::Forbidden,
        404 => Error::NotFound,
        400 | 422 => Error::Invalid { status },
        429 => Error::RateLimited { retry_after },
        500..=599 => Error::Server { status },
        _ => Error::Unexpected { status },
    }
}

fn header_retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// `details.retryAfterSeconds` of a `metav1.Status` body.
fn body_retry_after(body: &[u8]) -> Option<Duration> {
    let status: serde_json::Value = serde_json::from_slice(body).ok()?;
    let secs = status.get("details")?.get("retryAfterSeconds")?.as_u64()?;
    Some(Duration::from_secs(secs))
}

fn parse_issued(body: &[u8]) -> Result<IssuedToken, Error> {
    let answer: TokenRequest =
        serde_json::from_slice(body).map_err(|_| Error::BadResponse("not a TokenRequest"))?;
    let status = answer.status.ok_or(Error::BadResponse("no status"))?;
    let token = status
        .token
        .and_then(Token::new)
        .ok_or(Error::BadResponse("empty or malformed token"))?;
    let expiry = status
        .expiration_timestamp
        .ok_or(Error::BadResponse("no expirationTimestamp"))?;
    let expires_at = SystemTime::from(expiry.0);
    Ok(IssuedToken { token, expires_at })
}

/// A short reason for a transport failure. kube's errors describe the
/// connection (refused, TLS, DNS); they hold no request data.
pub(crate) fn transport_reason(error: &kube::Error) -> String {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        reason.push_str(": ");
        reason.push_str(&inner.to_string());
        source = inner.source();
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_errors() {
        assert_eq!(status_error(401, None), Error::Unauthorized);
        assert_eq!(status_error(403, None), Error::Forbidden);
        assert_eq!(status_error(404, None), Error::NotFound);
        assert_eq!(status_error(422, None), Error::Invalid { status: 422 });
        assert_eq!(
            status_error(429, Some(Duration::from_secs(3))),
            Error::RateLimited {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(status_error(503, None), Error::Server { status: 503 });
        assert_eq!(status_error(302, None), Error::Unexpected { status: 302 });
    }

    #[test]
    fn a_token_is_not_trusted_beyond_the_lifetime_asked_for() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let asked = Duration::from_secs(600);
        let far = now + Duration::from_secs(600 + 3600);
        assert_eq!(trusted_expiry(far, now, asked), now + asked);
        let near = now + Duration::from_secs(20);
        assert_eq!(trusted_expiry(near, now, asked), near);
        let past = now - Duration::from_secs(60);
        assert_eq!(trusted_expiry(past, now, asked), past);
    }

    #[test]
    fn retry_after_from_status_details() {
        let body = br#"{"kind":"Status","code":429,"details":{"retryAfterSeconds":4}}"#;
        assert_eq!(body_retry_after(body), Some(Duration::from_secs(4)));
        assert_eq!(body_retry_after(b"not json"), None);
    }

    #[test]
    fn parses_a_token_request_answer() {
        let body = br#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["a"]},
            "status":{"token":"x.y.z","expirationTimestamp":"2030-01-01T00:00:00Z"}}"#;
        let issued = parse_issued(body).unwrap();
        assert_eq!(issued.token.expose_secret(), "x.y.z");
        assert_eq!(
            issued
                .expires_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_893_456_000
        );
        let empty = br#"{"spec":{"audiences":["a"]},"status":{"token":"","expirationTimestamp":"2030-01-01T00:00:00Z"}}"#;
        assert_eq!(
            parse_issued(empty).unwrap_err(),
            Error::BadResponse("empty or malformed token")
        );
        assert_eq!(parse_issued(b"{}").unwrap_err().kind(), "bad_response");
    }
}
