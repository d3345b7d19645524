//! Command line and environment: the clap [`Cli`], validated once into a
//! [`Config`]. Every flag has an environment fallback; `--help` documents
//! each, README.md lists them all.

mod cli;
mod error;
mod prefetch;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use cli::{Cli, LogFormat, LogLevel};
use error::Collector;
pub use error::{ConfigError, ConfigErrors};

use crate::allowlist::Allowlist;
use crate::audience::{self, Audience, Rules};
use crate::ca::CaSettings;
use crate::destination::DestinationRules;
use crate::ext_proc::OnTokenError;
use crate::intercept::InterceptHosts;
use crate::local::LocalDestinations;
use crate::tokens::cache::Limits;
use crate::tokens::kube::BoundPod;

/// Shortest token lifetime the Kubernetes API server accepts
/// (`expirationSeconds` below it is refused with 422).
pub const MIN_TOKEN_EXPIRATION: Duration = Duration::from_secs(600);

/// Longest `--token-request-timeout`: a request waits this long for a token
/// at most; Envoy's ext_proc `message_timeout` (5s in the shipped
/// configuration) should end it sooner anyway.
pub const MAX_TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Shortest leaf certificate lifetime: a successor is pushed after two
/// thirds of it, and Envoy needs time to fetch it before the old one ends.
pub const MIN_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(600);

// === the validated configuration, one section per consumer ===

/// The validated configuration: one section per consumer, each taken whole.
#[derive(Clone, Debug)]
pub struct Config {
    /// How to reach the API server (`tokens::kube::client`).
    pub(crate) kube: KubeSettings,
    /// Which tokens to mint and what to do without one (token source, processor).
    pub(crate) tokens: TokenSettings,
    /// Bounds of the token cache.
    pub(crate) cache: Limits,
    /// How a request names its audience (processor).
    pub(crate) audience: Rules,
    /// TLS interception; `None` when no host is intercepted (then no CA exists).
    pub(crate) interception: Option<Interception>,
    /// Whether requests to this machine's own addresses are refused (processor).
    pub(crate) local_destinations: LocalDestinations,
    /// Listeners, drain and runtime (server).
    pub(crate) server: ServerSettings,
    /// Logging (main).
    pub(crate) telemetry: TelemetrySettings,
    /// `--allow-apiserver-audience`: the API server's own audiences get
    /// tokens too (app: no refusal, no discovery).
    pub(crate) allow_apiserver_audience: bool,
    /// `--prefetch-audience`: minted at startup, refreshed on a timer,
    /// awaited by readiness (app).
    pub(crate) prefetch: Vec<Audience>,
}

impl Config {
    /// Worker threads for the async runtime `main` builds before [`crate::run`].
    pub fn worker_threads(&self) -> usize {
        self.server.worker_threads
    }

    /// Logging settings, for [`crate::telemetry::init`].
    pub fn telemetry(&self) -> TelemetrySettings {
        self.telemetry
    }
}

/// Where the Kubernetes client configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSettings {
    /// `None`: in-cluster configuration (or kube's inference).
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the URL from the kubeconfig or the cluster.
    pub apiserver: Option<http::Uri>,
}

/// The TokenRequests to make, and the failure policy when they fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSettings {
    /// ServiceAccount whose tokens are minted.
    pub service_account: String,
    /// Its namespace (the pod's).
    pub namespace: String,
    /// Requested lifetime (`expirationSeconds`), at least [`MIN_TOKEN_EXPIRATION`].
    pub expiration: Duration,
    /// Set: tokens are bound to this pod and die with it.
    pub bound_pod: Option<BoundPod>,
    /// Bound on one TokenRequest; below Envoy's ext_proc `message_timeout`.
    pub request_timeout: Duration,
    /// Fail closed (503) or open (forward without a token).
    pub on_token_error: OnTokenError,
}

/// TLS interception: the hosts, the CA and the leaves minted from it.
#[derive(Clone, Debug)]
pub struct Interception {
    /// Never empty.
    pub hosts: InterceptHosts,
    /// The CA, created (or loaded) at startup.
    pub ca: CaSettings,
    /// Lifetime of each leaf, at least [`MIN_CERTIFICATE_VALIDITY`].
    pub certificate_validity: Duration,
    /// Bound on leaves (names) held at once.
    pub max_certificates: usize,
}

/// Listeners and the server's lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSettings {
    /// ext_proc, SDS and gRPC health: loopback TCP or a Unix socket.
    pub grpc: ListenAddress,
    /// `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    /// How long to keep serving (NOT_SERVING) after SIGTERM before draining.
    pub shutdown_delay: Duration,
    /// Worker threads of the async runtime.
    pub worker_threads: usize,
}

/// Logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// This crate's level (others are capped, see `telemetry`).
    pub level: LogLevel,
    /// logfmt or JSON.
    pub format: LogFormat,
}

/// Where the gRPC server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// What `kube-audience-proxy envoy-config` needs: the settings the Envoy
/// configuration depends on, validated exactly as the processor validates
/// them (so a configuration the processor would refuse is not generated).
/// The ServiceAccount, namespace and API server connection are not read.
#[derive(Clone, Debug)]
pub struct EnvoySettings {
    /// Where Envoy reaches the processor.
    pub(crate) grpc: ListenAddress,
    /// The audience header and parameter, the allowlist and the rules.
    pub(crate) audience: Rules,
    /// The fast-path audiences: `--prefetch-audience` and the rules'
    /// literal audiences, in that order.
    pub(crate) fast_path: Vec<Audience>,
    /// `--allow-local-destinations`.
    pub(crate) allow_local: bool,
    /// `--token-request-timeout`: Envoy's `message_timeout` is one second more.
    pub(crate) request_timeout: Duration,
}

impl TryFrom<&Cli> for EnvoySettings {
    type Error = ConfigErrors;

    fn try_from(cli: &Cli) -> Result<EnvoySettings, ConfigErrors> {
        let mut errors = Collector::default();
        let grpc = errors.take(parse_grpc_address(&cli.grpc_listen_address));
        let audience = audience_rules(cli, &mut errors);
        let apiserver_ok = apiserver_audience(cli, &mut errors).and(rule_apiserver_audiences(
            cli,
            audience.as_ref(),
            &mut errors,
        ));
        let fast_path = prefetch::prefetch_audiences(cli, audience.as_ref(), &mut errors);
        let request_timeout = token_request_timeout(cli, &mut errors);
        let settings = (|| {
            apiserver_ok?;
            Some(EnvoySettings {
                grpc: grpc?,
                audience: audience?,
                fast_path: fast_path?,
                allow_local: cli.allow_local_destinations,
                request_timeout: request_timeout?,
            })
        })();
        errors.finish(settings)
    }
}

// === building the sections ===

impl TryFrom<Cli> for Config {
    type Error = ConfigErrors;

    fn try_from(cli: Cli) -> Result<Config, ConfigErrors> {
        let mut errors = Collector::default();
        let kube = kube_settings(&cli, &mut errors);
        let tokens = token_settings(&cli, &mut errors);
        let cache = cache_limits(&cli, &mut errors);
        let audience = audience_rules(&cli, &mut errors);
        let interception = interception(&cli, &mut errors);
        let server = server_settings(&cli, &mut errors);
        let apiserver_ok = apiserver_audience(&cli, &mut errors).and(rule_apiserver_audiences(
            &cli,
            audience.as_ref(),
            &mut errors,
        ));
        let telemetry = TelemetrySettings {
            level: cli.log_level,
            format: cli.log_format,
        };
        let prefetch = prefetch::prefetch_audiences(&cli, audience.as_ref(), &mut errors);
        let config = (|| {
            Some(Config {
                kube: kube?,
                tokens: tokens?,
                cache: cache?,
                audience: audience?,
                interception: interception?,
                local_destinations: LocalDestinations::from_flag(cli.allow_local_destinations),
                server: server?,
                telemetry,
                allow_apiserver_audience: apiserver_ok.map(|()| cli.allow_apiserver_audience)?,
                prefetch: prefetch?,
            })
        })();
        errors.finish(config)
    }
}

fn kube_settings(cli: &Cli, errors: &mut Collector) -> Option<KubeSettings> {
    let apiserver = match &cli.apiserver {
        Some(url) => Some(errors.take(parse_url(url))?),
        None => None,
    };
    Some(KubeSettings {
        kubeconfig: cli.kubeconfig.clone(),
        apiserver,
    })
}

fn parse_url(url: &str) -> Result<http::Uri, ConfigError> {
    let invalid = || ConfigError::ApiServer(url.to_owned());
    let uri: http::Uri = url.parse().map_err(|_| invalid())?;
    if uri.scheme().is_none() || uri.host().is_none() {
        return Err(invalid());
    }
    Ok(uri)
}

fn token_settings(cli: &Cli, errors: &mut Collector) -> Option<TokenSettings> {
    let service_account = errors.take(service_account(cli));
    let namespace = errors.take(namespace(cli));
    let expiration = errors.check(cli.token_expiration >= MIN_TOKEN_EXPIRATION, || {
        ConfigError::TokenExpiration(cli.token_expiration)
    });
    let request_timeout = token_request_timeout(cli, errors);
    let bound_pod = errors.take(bound_pod(cli));
    Some(TokenSettings {
        service_account: service_account?,
        namespace: namespace?,
        expiration: expiration.map(|()| cli.token_expiration)?,
        bound_pod: bound_pod?,
        request_timeout: request_timeout?,
        on_token_error: cli.on_token_error,
    })
}

/// `--token-request-timeout`: not zero, at most [`MAX_TOKEN_REQUEST_TIMEOUT`].
fn token_request_timeout(cli: &Cli, errors: &mut Collector) -> Option<Duration> {
    let timeout = non_zero(errors, "--token-request-timeout", cli.token_request_timeout)?;
    errors.check(timeout <= MAX_TOKEN_REQUEST_TIMEOUT, || {
        ConfigError::TokenRequestTimeout(timeout)
    })?;
    Some(timeout)
}

fn service_account(cli: &Cli) -> Result<String, ConfigError> {
    let name = cli
        .service_account
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(ConfigError::MissingServiceAccount)?;
    validate_name("ServiceAccount", name)?;
    Ok(name.to_owned())
}

fn namespace(cli: &Cli) -> Result<String, ConfigError> {
    let namespace = match cli.namespace.as_deref().map(str::trim) {
        Some(ns) if !ns.is_empty() => ns.to_owned(),
        _ => std::fs::read_to_string(&cli.namespace_file)
            .map_err(|reason| ConfigError::NamespaceFile {
                path: cli.namespace_file.clone(),
                reason,
            })?
            .trim()
            .to_owned(),
    };
    validate_name("namespace", &namespace)?;
    Ok(namespace)
}

fn bound_pod(cli: &Cli) -> Result<Option<BoundPod>, ConfigError> {
    if !cli.bind_pod {
        return Ok(None);
    }
    match (&cli.pod_name, &cli.pod_uid) {
        (Some(name), Some(uid)) if !name.is_empty() && !uid.is_empty() => Ok(Some(BoundPod {
            name: name.clone(),
            uid: uid.clone(),
        })),
        _ => Err(ConfigError::MissingPod),
    }
}

fn non_zero(errors: &mut Collector, flag: &'static str, value: Duration) -> Option<Duration> {
    errors
        .check(!value.is_zero(), || ConfigError::ZeroDuration(flag))
        .map(|()| value)
}

fn cache_limits(cli: &Cli, errors: &mut Collector) -> Option<Limits> {
    let idle_timeout = non_zero(errors, "--audience-idle-timeout", cli.audience_idle_timeout);
    let max_in_flight = errors.check(cli.max_concurrent_token_requests >= 1, || {
        ConfigError::MaxConcurrentTokenRequests
    });
    Some(Limits {
        max_audiences: cli.max_audiences,
        idle_timeout: idle_timeout?,
        max_in_flight: max_in_flight.map(|()| usize::from(cli.max_concurrent_token_requests))?,
        // Validated (non-zero, bounded) with the token settings.
        request_timeout: cli.token_request_timeout,
    })
}

/// A `--default-audience` that is one of the API server's own audiences
/// would make every request without an audience carry a token for the API
/// server: refused unless `--allow-apiserver-audience`. Only the well-known
/// names and `--apiserver` are known here; the issuer learned at startup is
/// checked then (a warning, and such requests are refused).
fn apiserver_audience(cli: &Cli, errors: &mut Collector) -> Option<()> {
    let refused = !cli.allow_apiserver_audience
        && cli.default_audience.as_deref().is_some_and(|audience| {
            crate::apiserver::is_known_apiserver_audience(audience, cli.apiserver.as_deref())
        });
    errors.check(!refused, || {
        ConfigError::DefaultAudienceIsApiServer(cli.default_audience.clone().unwrap_or_default())
    })
}

/// An `--audience-rule` whose literal AUDIENCE is one of the API server's
/// own (as [`apiserver_audience`] knows them) would be refused for every
/// request to its HOST: refused here, one line per rule, unless
/// `--allow-apiserver-audience`. Invalid rules (`rules` is `None`) are
/// reported on their own. Templates are checked per request.
fn rule_apiserver_audiences(
    cli: &Cli,
    rules: Option<&Rules>,
    errors: &mut Collector,
) -> Option<()> {
    let mut ok = Some(());
    if cli.allow_apiserver_audience {
        return ok;
    }
    for rule in rules.map_or(&[][..], |rules| rules.destinations.rules()) {
        if let Some(audience) = rule.literal_audience()
            && crate::apiserver::is_known_apiserver_audience(
                audience.as_str(),
                cli.apiserver.as_deref(),
            )
        {
            ok = errors.take(Err(ConfigError::RuleAudienceIsApiServer {
                rule: rule.to_string(),
                audience: audience.to_string(),
            }));
        }
    }
    ok
}

fn audience_rules(cli: &Cli, errors: &mut Collector) -> Option<Rules> {
    let header = cli.audience_header.to_ascii_lowercase();
    let header_ok = errors.check(
        http::HeaderName::from_bytes(header.as_bytes()).is_ok(),
        || ConfigError::AudienceHeader(cli.audience_header.clone()),
    );
    let parameter_ok = errors.check(!cli.audience_parameter.is_empty(), || {
        ConfigError::AudienceParameter
    });
    let allowlist =
        errors.take(Allowlist::new(&cli.allowed_audience).map_err(ConfigError::AllowedAudience));
    let default = match (&cli.default_audience, &allowlist) {
        (Some(raw), Some(allowlist)) => errors.take(default_audience(raw, allowlist)),
        // The allowlist is broken: the default cannot be checked against it.
        (Some(_), None) => None,
        (None, _) => Some(None),
    };
    let destinations = destination_rules(cli, allowlist.as_ref(), errors);
    header_ok?;
    parameter_ok?;
    Some(Rules {
        header,
        parameter: cli.audience_parameter.clone(),
        default: default?,
        allowlist: allowlist?,
        destinations: destinations?,
    })
}

/// `--audience-rule`, every bad rule reported on its own line.
fn destination_rules(
    cli: &Cli,
    allowlist: Option<&Allowlist>,
    errors: &mut Collector,
) -> Option<DestinationRules> {
    match DestinationRules::new(&cli.audience_rule, allowlist) {
        Ok(rules) => Some(rules),
        Err(bad) => {
            for error in bad {
                errors.take::<()>(Err(error.into()));
            }
            None
        }
    }
}

fn default_audience(raw: &str, allowlist: &Allowlist) -> Result<Option<Audience>, ConfigError> {
    let audience = Audience::parse(raw.as_bytes(), audience::Source::Default)
        .map_err(ConfigError::DefaultAudience)?;
    if !allowlist.allows(&audience) {
        return Err(ConfigError::DefaultAudience(
            audience::Rejection::NotAllowed { audience },
        ));
    }
    Ok(Some(audience))
}

fn interception(cli: &Cli, errors: &mut Collector) -> Option<Option<Interception>> {
    let hosts = errors.take(InterceptHosts::new(&cli.intercept_host).map_err(ConfigError::from));
    let validity_ok = errors.check(
        cli.certificate_validity >= MIN_CERTIFICATE_VALIDITY
            && cli.certificate_validity <= cli.ca_validity,
        || ConfigError::CertificateValidity,
    );
    let hosts = hosts?;
    validity_ok?;
    if hosts.is_empty() {
        return Some(None);
    }
    Some(Some(Interception {
        hosts,
        ca: CaSettings {
            destination: cli.ca_file_destination.clone(),
            persisted: cli.ca_key_file.clone().zip(cli.ca_cert_file.clone()),
            validity: cli.ca_validity,
        },
        certificate_validity: cli.certificate_validity,
        max_certificates: usize::try_from(cli.max_certificates).unwrap_or(usize::MAX),
    }))
}

fn server_settings(cli: &Cli, errors: &mut Collector) -> Option<ServerSettings> {
    let grpc = errors.take(parse_grpc_address(&cli.grpc_listen_address));
    let admin = errors.take(parse_socket_address(
        "--admin-listen-address",
        &cli.admin_listen_address,
    ));
    Some(ServerSettings {
        grpc: grpc?,
        admin: admin?,
        shutdown_delay: cli.shutdown_delay,
        worker_threads: usize::from(cli.worker_threads),
    })
}

const GRPC_ADDRESS_FORM: &str = "a loopback IP:PORT or unix:/path";

fn parse_grpc_address(raw: &str) -> Result<ListenAddress, ConfigError> {
    const FLAG: &str = "--grpc-listen-address";
    if let Some(path) = raw.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(ConfigError::ListenAddress {
                flag: FLAG,
                value: raw.to_owned(),
                expected: GRPC_ADDRESS_FORM,
            });
        }
        return Ok(ListenAddress::Unix(PathBuf::from(path)));
    }
    let addr = parse_socket_address(FLAG, raw).map_err(|_| ConfigError::ListenAddress {
        flag: FLAG,
        value: raw.to_owned(),
        expected: GRPC_ADDRESS_FORM,
    })?;
    if !addr.ip().is_loopback() {
        return Err(ConfigError::NotLoopback(addr));
    }
    Ok(ListenAddress::Tcp(addr))
}

/// `IP:PORT` (IPv6 in brackets), the one parser of every TCP address flag.
fn parse_socket_address(flag: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.parse().map_err(|_| ConfigError::ListenAddress {
        flag,
        value: raw.to_owned(),
        expected: "IP:PORT",
    })
}

/// RFC 1123 subdomain, as Kubernetes requires for these names.
fn validate_name(what: &'static str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}
