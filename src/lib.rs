//! kube-audience-proxy: an Envoy external processor (ext_proc) that injects
//! audience-scoped Kubernetes ServiceAccount tokens into HTTP requests.
//!
//! Envoy does all the networking; this crate answers Envoy's questions:
//!
//! - [`audience`] finds the audience a request asks for (pure);
//! - [`tokens`] mints bound tokens with TokenRequest and caches them;
//! - [`ext_proc`] is the gRPC service Envoy calls per request;
//! - [`server`], [`admin`], [`shutdown`], [`telemetry`] run it;
//! - [`config`] is the command line;
//! - [`secret`] keeps credentials out of logs and errors.

// Runtime code never unwraps; tests may.
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod audience;
pub mod ca;
pub mod config;
pub mod ext_proc;
pub mod intercept;
mod moka_ext;
pub mod sds;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tokens;

use config::{Config, KubeSettings};
use tokens::kube::KubeTokenSource;

/// The Kubernetes client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum KubeConfigError {
    /// The kubeconfig file.
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// In-cluster or inferred configuration.
    #[error(
        "cannot find a Kubernetes configuration (not in a cluster and no --kubeconfig/KUBECONFIG): {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    /// Building the client.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds the kube client for `settings`.
pub async fn kube_client(settings: &KubeSettings) -> Result<kube::Client, KubeConfigError> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let error = |source| KubeConfigError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(error)?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(error)?
        }
        None => kube::Config::infer().await?,
    };
    if let Some(url) = &settings.apiserver {
        config.cluster_url = url.clone();
    }
    // The token cache owns retries (backoff, Retry-After, serve-while-valid);
    // kube's own retry loop would hide failures and multiply TokenRequests.
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

/// The production token source for `config`.
pub fn token_source(client: kube::Client, config: &Config) -> KubeTokenSource {
    KubeTokenSource::new(
        client,
        &config.namespace,
        &config.service_account,
        config.token_expiration,
        config.bound_pod.clone(),
        config.token_request_timeout,
    )
}

/// The processor for `config` over `source`.
pub fn processor<S: tokens::TokenSource>(config: &Config, source: S) -> ext_proc::ExtProc<S> {
    let cache = tokens::cache::TokenCache::new(
        source,
        tokens::cache::Limits {
            max_audiences: config.max_audiences,
            idle_timeout: config.audience_idle_timeout,
        },
    );
    ext_proc::ExtProc::new(
        config.rules.clone(),
        cache,
        config.on_token_error,
        config.intercept.clone(),
    )
}

/// The SDS service for `config`: `None` when no host is intercepted.
/// Creates (or loads) the CA and writes its certificate.
pub fn sds(config: &Config) -> Result<Option<sds::Sds>, ca::CaError> {
    let Some(settings) = &config.ca else {
        return Ok(None);
    };
    let authority =
        ca::CertificateAuthority::init(settings, &config.intercept, std::time::SystemTime::now())?;
    let certs = sds::certs::Certificates::new(
        authority,
        config.intercept.clone(),
        config.certificate_validity,
        config.max_certificates,
    );
    Ok(Some(sds::Sds::new(std::sync::Arc::new(certs))))
}
