//! The Kubernetes API server's own audiences, which this proxy refuses to
//! mint tokens for (unless `--allow-apiserver-audience`): whoever holds a
//! token for one of them can act as the ServiceAccount against the API
//! server.
//!
//! The refused set ([`ApiServerAudiences`]) holds
//! - the well-known in-cluster names of the API server, [`WELL_KNOWN`]
//!   (`https://kubernetes.default.svc` and
//!   `https://kubernetes.default.svc.cluster.local`);
//! - the URL the processor itself uses to reach the API server (from the
//!   kubeconfig, the in-cluster configuration or `--apiserver`);
//! - the `issuer` the API server publishes in
//!   `/.well-known/openid-configuration`, learned at startup: the API
//!   server's audiences default to its issuer. [`discover`] asks once with a
//!   short bound ([`STARTUP_TIMEOUT`]); when that fails it logs one warning
//!   and keeps asking in the background with capped backoff until it
//!   succeeds, refusing the rest of the set meanwhile.
//!
//! Audiences are compared by [`key`]: scheme (`https://`, `http://` or none),
//! host case, a trailing dot on the host, the port `:443` and trailing
//! slashes do not matter; the path does, byte for byte. So
//! `kubernetes.default.svc`, `HTTPS://Kubernetes.Default.SVC/` and
//! `https://kubernetes.default.svc.:443` are all refused. The API server
//! itself compares audiences exactly; refusing near variants costs nothing
//! and closes spelling games.
//!
//! Not covered: extra audiences an API server was given with
//! `--api-audiences` beyond its issuer (k3s adds `k3s`, some clusters
//! `api`), and further issuers after the first. `--allowed-audience` is the
//! remedy there. (Asking the API server for a token without audiences would
//! reveal them, but would mint exactly the credential this module exists to
//! keep out of circulation, so the processor does not.)

use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use tokio::task::JoinHandle;

use crate::tokens::schedule;

/// The API server's in-cluster names, refused whatever discovery finds.
pub(crate) const WELL_KNOWN: [&str; 2] = [
    "https://kubernetes.default.svc",
    "https://kubernetes.default.svc.cluster.local",
];

/// Longest time startup waits for the discovery document (a down or slow API
/// server must not hold the processor back; the background retry takes over).
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The discovery document's path.
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Largest discovery document read (a real one is a few hundred bytes).
const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// Longest issuer accepted (the same bound as an audience).
const MAX_ISSUER_LEN: usize = crate::audience::MAX_AUDIENCE_LEN;

/// The set of refused audiences, shared by the processor (read per request)
/// and the discovery task (which adds the issuer once). Cheap to clone.
#[derive(Clone, Default)]
pub struct ApiServerAudiences {
    keys: Arc<RwLock<Vec<String>>>,
}

impl std::fmt::Debug for ApiServerAudiences {
    /// The comparison keys (names of the API server, nothing secret).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.read().iter()).finish()
    }
}

impl ApiServerAudiences {
    /// [`WELL_KNOWN`] plus `extra` (the API server's URL).
    pub(crate) fn new<'a>(extra: impl IntoIterator<Item = &'a str>) -> ApiServerAudiences {
        let audiences = ApiServerAudiences::default();
        for audience in WELL_KNOWN.into_iter().chain(extra) {
            audiences.learn(audience);
        }
        audiences
    }

    /// Whether `audience` is one of the API server's (see [`key`]).
    pub(crate) fn refuses(&self, audience: &str) -> bool {
        // Per injection: compare borrowed parts, allocate nothing.
        let (host, path) = parts(audience);
        self.read().iter().any(|key| {
            key.len() == host.len() + path.len()
                && key
                    .get(..host.len())
                    .is_some_and(|h| h.eq_ignore_ascii_case(host))
                && key.get(host.len()..) == Some(path)
        })
    }

    /// Adds `audience` to the set; `false` if it was already there.
    pub(crate) fn learn(&self, audience: &str) -> bool {
        let key = key(audience);
        let mut keys = match self.keys.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if keys.contains(&key) {
            return false;
        }
        keys.push(key);
        true
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<String>> {
        match self.keys.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The form two audiences are compared in: without the scheme (`https://`
/// or `http://`, any case), the host part lower-cased, without a trailing
/// dot and without the port `:443`, the rest without trailing slashes.
pub(crate) fn key(audience: &str) -> String {
    let (host, path) = parts(audience);
    let mut key = host.to_ascii_lowercase();
    key.push_str(path);
    key
}

/// The compared parts of `audience`, borrowed: the host (without scheme,
/// `:443` and trailing dots; its case is ignored) and the path (without
/// trailing slashes).
fn parts(audience: &str) -> (&str, &str) {
    let rest = strip_scheme(audience);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.strip_suffix(":443").unwrap_or(authority);
    (host.trim_end_matches('.'), path.trim_end_matches('/'))
}

fn strip_scheme(audience: &str) -> &str {
    for scheme in ["https://", "http://"] {
        if let Some(head) = audience.get(..scheme.len())
            && head.eq_ignore_ascii_case(scheme)
        {
            return &audience[scheme.len()..];
        }
    }
    audience
}

/// Whether `audience` is refused before discovery could say more: one of
/// [`WELL_KNOWN`] or `apiserver_url`. For checking `--default-audience`.
pub(crate) fn is_known_apiserver_audience(audience: &str, apiserver_url: Option<&str>) -> bool {
    ApiServerAudiences::new(apiserver_url).refuses(audience)
}

// === discovery ===

/// Why the issuer could not be learned. Carries statuses and short reasons,
/// never a body.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DiscoveryError {
    /// The API server answered with an error status.
    #[error("the API server answered {DISCOVERY_PATH} with HTTP {0}")]
    Status(u16),
    /// The API server could not be reached.
    #[error("could not reach the API server: {0}")]
    Transport(String),
    /// No answer in time.
    #[error("the API server did not answer {DISCOVERY_PATH} within {0:?}")]
    Timeout(Duration),
    /// The answer has no usable `issuer`.
    #[error("the API server's {DISCOVERY_PATH} is unusable: {0}")]
    BadDocument(&'static str),
}

/// The background retry, if one runs; aborted when dropped (with the
/// processor).
#[derive(Debug, Default)]
pub(crate) struct Discovery {
    retry: Option<JoinHandle<()>>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(task) = self.retry.take() {
            task.abort();
        }
    }
}

/// Learns the API server's issuer into `audiences`: one attempt bounded by
/// [`STARTUP_TIMEOUT`]; on failure one warning and a background task that
/// retries (each attempt bounded by `attempt_timeout`, backoff 1 s doubling
/// to 60 s) until it succeeds. `default_audience` only serves a warning when
/// the issuer turns out to be it.
pub(crate) async fn discover(
    client: kube::Client,
    audiences: ApiServerAudiences,
    attempt_timeout: Duration,
    default_audience: Option<String>,
) -> Discovery {
    let first = attempt(&client, STARTUP_TIMEOUT.min(attempt_timeout)).await;
    let error = match first {
        Ok(issuer) => {
            learned(&audiences, &issuer, default_audience.as_deref(), 1);
            return Discovery::default();
        }
        Err(error) => error,
    };
    tracing::warn!(
        %error,
        refused = ?audiences,
        "could not learn the issuer of the API server; refusing the well-known API server audiences meanwhile, retrying in the background"
    );
    let retry = tokio::spawn(async move {
        let policy = schedule::Policy::default();
        let mut failures = 1u32;
        loop {
            tokio::time::sleep(policy.backoff(failures - 1, None)).await;
            match attempt(&client, attempt_timeout).await {
                Ok(issuer) => {
                    learned(
                        &audiences,
                        &issuer,
                        default_audience.as_deref(),
                        failures + 1,
                    );
                    return;
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(%error, attempts = failures, "the issuer of the API server is still unknown");
                }
            }
        }
    });
    Discovery { retry: Some(retry) }
}

fn learned(audiences: &ApiServerAudiences, issuer: &str, default: Option<&str>, attempts: u32) {
    audiences.learn(issuer);
    tracing::info!(
        issuer,
        attempts,
        "learned the issuer of the API server; tokens for it are refused"
    );
    if default.is_some_and(|default| key(default) == key(issuer)) {
        tracing::error!(
            issuer,
            "--default-audience is the issuer of the API server: requests that rely on it are refused (403)"
        );
    }
}

async fn attempt(client: &kube::Client, timeout: Duration) -> Result<String, DiscoveryError> {
    match tokio::time::timeout(timeout, fetch_issuer(client)).await {
        Ok(result) => result,
        Err(_) => Err(DiscoveryError::Timeout(timeout)),
    }
}

async fn fetch_issuer(client: &kube::Client) -> Result<String, DiscoveryError> {
    let request = http::Request::get(DISCOVERY_PATH)
        .header(http::header::ACCEPT, "application/json")
        .body(kube::client::Body::empty())
        .map_err(|_| DiscoveryError::BadDocument("could not build the request"))?;
    let response = client
        .send(request)
        .await
        .map_err(|e| DiscoveryError::Transport(crate::tokens::kube::transport_reason(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(DiscoveryError::Status(status.as_u16()));
    }
    let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map_err(|_| DiscoveryError::Transport("the answer was cut off or too large".into()))?
        .to_bytes();
    parse_issuer(&body)
}

/// The `issuer` of an OpenID discovery document.
fn parse_issuer(body: &[u8]) -> Result<String, DiscoveryError> {
    let document: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| DiscoveryError::BadDocument("not JSON"))?;
    let issuer = document
        .get("issuer")
        .and_then(serde_json::Value::as_str)
        .ok_or(DiscoveryError::BadDocument("no issuer"))?;
    if issuer.is_empty() || issuer.len() > MAX_ISSUER_LEN || issuer.chars().any(char::is_control) {
        return Err(DiscoveryError::BadDocument(
            "the issuer is empty, too long or malformed",
        ));
    }
    Ok(issuer.to_owned())
}

#[cfg(test)]
mod tests;
