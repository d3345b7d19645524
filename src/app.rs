//! The one entry point: [`run`] assembles the processor from a [`Config`]
//! (kube client -> token source -> cache -> ext_proc; CA -> SDS), binds the
//! listeners and serves until the shutdown future completes. The binary, the
//! in-process tests and (through the binary) the demo and the benchmarks all
//! go through it.
//!
//! [`App::bind`] and [`App::serve`] are `run` cut in two, for callers that
//! bind port 0 and need the addresses before serving.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use crate::apiserver::{self, ApiServerAudiences, Discovery};
use crate::ca::{CaError, CertificateAuthority};
use crate::config::{Config, ConfigErrors, Interception};
use crate::ext_proc::ExtProc;
use crate::local::LocalDestinations;
use crate::metrics::{Metrics, Registry};
use crate::readiness::Readiness;
use crate::sds::Sds;
use crate::sds::certs::Certificates;
use crate::sds::tokens::TokenSecrets;
use crate::server::{self, BindError, Listeners, ServeError};
use crate::tokens::TokenSource;
use crate::tokens::cache::TokenCache;
use crate::tokens::cache::prefetch::Prefetch;
use crate::tokens::kube::{self, ClientError, KubeTokenSource};

/// EX_USAGE: the configuration (flags, files it names) is wrong.
const EXIT_CONFIG: u8 = 64;
/// The process could not start or failed while running.
const EXIT_FAILURE: u8 = 1;

/// Why the processor did not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Invalid flags.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// The async runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Logging could not be set up.
    #[error("cannot set up logging: {0}")]
    Telemetry(tracing_subscriber::util::TryInitError),
    /// The kubeconfig or in-cluster configuration is unusable.
    #[error(transparent)]
    Kube(#[from] ClientError),
    /// The interception CA could not be created, loaded or written.
    #[error("cannot set up the interception CA: {0}")]
    Ca(CaError),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The server failed while serving.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl RunError {
    /// What failed, as the log line's message (the error says why).
    pub fn summary(&self) -> &'static str {
        match self {
            RunError::Config(_) => "invalid configuration",
            RunError::Runtime(_) | RunError::Telemetry(_) | RunError::Bind(_) => "cannot start",
            RunError::Kube(_) => "cannot configure the Kubernetes client",
            RunError::Ca(_) => "cannot set up the interception CA",
            RunError::Serve(_) => "server failed",
        }
    }

    /// The process exit code: 64 when the operator must fix the
    /// configuration, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Kube(_) | RunError::Ca(_) => EXIT_CONFIG,
            RunError::Runtime(_)
            | RunError::Telemetry(_)
            | RunError::Bind(_)
            | RunError::Serve(_) => EXIT_FAILURE,
        }
    }
}

/// Runs the processor for `config` until `shutdown` completes, then drains.
/// Logging must be set up by the caller.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    App::bind(config).await?.serve(shutdown).await
}

/// The processor, assembled and bound, not yet serving.
pub struct App {
    processor: ExtProc<KubeTokenSource>,
    sds: Option<Sds>,
    listeners: Listeners,
    config: Config,
    /// What `/metrics` serves.
    registry: Arc<Registry>,
    /// Learning the API server's issuer, if it goes on in the background;
    /// stopped with the app.
    _discovery: Option<Discovery>,
    /// Minting and refreshing `--prefetch-audience`; stopped with the app.
    _prefetch: Prefetch,
    /// Waits for the prefetched audiences' tokens.
    readiness: Readiness,
}

impl App {
    /// Builds every part and binds the listeners; logs the ready line
    /// (`kube-audience-proxy ready grpc=... admin=...`) the tests wait for.
    pub async fn bind(config: Config) -> Result<App, RunError> {
        let (client, apiserver_url) = kube::client(&config.kube).await?;
        let refused = refused_audiences(&config, &apiserver_url);
        let source = KubeTokenSource::new(client.clone(), &config.tokens);
        let certs = match &config.interception {
            Some(interception) => Some(certificates(interception).map_err(RunError::Ca)?),
            None => None,
        };
        let listeners = Listeners::bind(&config.server.grpc, config.server.admin).await?;
        log_destination_rules(&config);
        let discovery = match &refused {
            Some(refused) => Some(
                apiserver::discover(
                    client,
                    refused.clone(),
                    config.tokens.request_timeout,
                    config
                        .audience
                        .default
                        .as_ref()
                        .map(|a| a.as_str().to_owned()),
                )
                .await,
            ),
            None => None,
        };
        tracing::info!(
            grpc = %listeners.grpc_address(),
            admin = %listeners.admin_address(),
            service_account = %config.tokens.service_account,
            namespace = %config.tokens.namespace,
            "kube-audience-proxy ready"
        );
        if config.local_destinations == LocalDestinations::Allow {
            tracing::warn!(
                "--allow-local-destinations: requests to this machine (loopback, link-local, localhost) \
                 are forwarded, so a client can reach Envoy's and the processor's ports through the proxy"
            );
        }
        // Metrics: the families the processor and cache count into, the
        // cache's per-audience gauges, and the certificate metrics.
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::new(&metrics);
        let processor = processor_counting(&config, source, refused.clone(), metrics);
        registry.register_collector(Box::new(processor.token_gauges()));
        if let Some(certs) = &certs {
            certs
                .counters
                .metrics
                .register(&mut registry, certs.ca_not_after());
        }
        // SDS: leaves with interception, token secrets with fast-path
        // audiences (see `sds::tokens`).
        let pinned = processor.token_cache().pinned();
        let tokens = (pinned.len() > 0).then(|| TokenSecrets::new(pinned, refused));
        if let Some(tokens) = &tokens {
            tokens.metrics().register(&mut registry, certs.is_none());
            tracing::info!(names = %tokens.names().join(" "), "token secrets served over SDS");
        }
        let sds = (certs.is_some() || tokens.is_some()).then(|| Sds::serving(certs, tokens));
        // In the background: the listeners are bound already, readiness
        // waits for the tokens.
        let prefetch = processor.token_cache().start_prefetch();
        let readiness = Readiness::new(processor.token_cache().pinned());
        Ok(App {
            processor,
            sds,
            listeners,
            config,
            registry: Arc::new(registry),
            _discovery: discovery,
            _prefetch: prefetch,
            readiness,
        })
    }

    /// The gRPC address, as `IP:PORT` or `unix:PATH`.
    pub fn grpc_address(&self) -> String {
        self.listeners.grpc_address()
    }

    /// The admin address, as `IP:PORT`.
    pub fn admin_address(&self) -> String {
        self.listeners.admin_address()
    }

    /// Serves until `shutdown` completes, then drains (see `server`).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        server::serve(
            self.processor,
            self.sds,
            self.listeners,
            self.readiness,
            self.registry,
            self.config.server.shutdown_delay,
            shutdown,
        )
        .await?;
        Ok(())
    }
}

/// The ext_proc service for `config`, minting from `source`, refusing the
/// well-known API server audiences unless `--allow-apiserver-audience`
/// (nothing is discovered: for benchmarks).
pub fn processor<S: TokenSource>(config: &Config, source: S) -> ExtProc<S> {
    let refused =
        (!config.allow_apiserver_audience).then(|| ApiServerAudiences::new(std::iter::empty()));
    processor_refusing(config, source, refused)
}

/// The API server audiences to refuse (the well-known ones and the URL the
/// client uses; discovery adds the issuer), or `None` with
/// `--allow-apiserver-audience`.
fn refused_audiences(config: &Config, apiserver_url: &http::Uri) -> Option<ApiServerAudiences> {
    if config.allow_apiserver_audience {
        tracing::warn!(
            "--allow-apiserver-audience: tokens for the audiences of the API server itself are minted; whoever receives one can act as the ServiceAccount against the API server"
        );
        return None;
    }
    let url = apiserver_url.to_string();
    Some(ApiServerAudiences::new([url.as_str()]))
}

/// [`processor`], refusing `refused` (`None`: no refusal).
fn processor_refusing<S: TokenSource>(
    config: &Config,
    source: S,
    refused: Option<ApiServerAudiences>,
) -> ExtProc<S> {
    processor_counting(config, source, refused, Arc::default())
}

/// [`processor_refusing`], counting into `metrics`.
fn processor_counting<S: TokenSource>(
    config: &Config,
    source: S,
    refused: Option<ApiServerAudiences>,
    metrics: Arc<Metrics>,
) -> ExtProc<S> {
    let hosts = config
        .interception
        .as_ref()
        .map(|i| i.hosts.clone())
        .unwrap_or_default();
    ExtProc::new(
        config.audience.clone(),
        TokenCache::build(source, config.cache, &config.prefetch, metrics),
        config.tokens.on_token_error,
        hosts,
        config.local_destinations,
        refused,
    )
}

/// One line on where tokens may go: without `--audience-rule`, anywhere.
fn log_destination_rules(config: &Config) {
    let rules = config.audience.destinations.rules();
    if rules.is_empty() {
        tracing::warn!(
            "no --audience-rule: any destination may receive tokens for any allowed audience"
        );
    } else {
        let rules: Vec<String> = rules.iter().map(ToString::to_string).collect();
        tracing::info!(
            rules = %rules.join(" "),
            "destination rules: a token only goes where a rule admits its audience"
        );
    }
}

/// Creates (or loads) the CA, writes its certificate for the client, and
/// builds the store of leaves SDS mints from it.
fn certificates(interception: &Interception) -> Result<Arc<Certificates>, CaError> {
    let authority = CertificateAuthority::init(
        &interception.ca,
        &interception.hosts,
        interception.certificate_validity,
        SystemTime::now(),
    )?;
    tracing::info!(
        path = %interception.ca.destination.display(),
        hosts = interception.hosts.patterns().len(),
        expires = %humantime::format_rfc3339_seconds(authority.not_after()),
        "interception CA certificate written"
    );
    let certs = Certificates::new(
        authority,
        interception.hosts.clone(),
        interception.certificate_validity,
        interception.max_certificates,
    );
    Ok(Arc::new(certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_faults_exit_64_and_runtime_faults_exit_1() {
        let bind = RunError::Bind(BindError::Admin {
            address: "127.0.0.1:1".parse().unwrap(),
            reason: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        });
        assert_eq!(bind.exit_code(), 1);
        let kube = RunError::Kube(ClientError::Kubeconfig {
            path: "/nope".into(),
            reason: ::kube::config::KubeconfigError::FindPath,
        });
        assert_eq!(kube.exit_code(), 64);
    }
}
