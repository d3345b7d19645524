//! Command line and environment: the clap [`Cli`], validated once into a
//! [`Config`]. Every flag has an environment fallback; `--help` documents
//! each, README.md lists them all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::audience::{self, Allowlist, Audience, Rules};
use crate::ca::CaSettings;
use crate::ext_proc::OnTokenError;
use crate::intercept::InterceptHosts;
use crate::tokens::cache::Limits;
use crate::tokens::kube::BoundPod;

/// Shortest token lifetime the Kubernetes API server accepts
/// (`expirationSeconds` below it is refused with 422).
pub const MIN_TOKEN_EXPIRATION: Duration = Duration::from_secs(600);

/// Shortest leaf certificate lifetime: a successor is pushed after two
/// thirds of it, and Envoy needs time to fetch it before the old one ends.
pub const MIN_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(600);

/// kube-audience-proxy: an Envoy external processor (ext_proc) that gives each
/// HTTP request a bound ServiceAccount token for the audience it asks for.
///
/// Envoy asks this processor about every request; the processor finds the
/// audience (header, query parameter, Envoy route metadata or default), mints
/// a token with the Kubernetes TokenRequest API (cached and refreshed in the
/// background), and tells Envoy to set `authorization: Bearer <token>` and to
/// drop the audience header and parameter.
#[derive(Debug, Parser)]
#[command(version, about, long_about, args_override_self = true)]
pub struct Cli {
    /// ServiceAccount whose tokens are minted (required).
    #[arg(long, env = "SERVICE_ACCOUNT", value_name = "NAME")]
    pub service_account: Option<String>,

    /// Namespace of the ServiceAccount; overrides --namespace-file.
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,

    /// File holding the namespace (read when --namespace is not given).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_NAMESPACE_FILE",
        value_name = "PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    )]
    pub namespace_file: PathBuf,

    /// kubeconfig to use; without it the in-cluster configuration is used.
    #[arg(long, env = "KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// API server URL, overriding the one from kubeconfig or the cluster.
    #[arg(long, env = "KUBE_AUDIENCE_PROXY_APISERVER", value_name = "URL")]
    pub apiserver: Option<String>,

    /// Where Envoy reaches the processor (ext_proc and gRPC health): a
    /// loopback `IP:PORT` or `unix:/path/to.sock`.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_GRPC_LISTEN_ADDRESS",
        value_name = "ADDR",
        default_value = "127.0.0.1:18080"
    )]
    pub grpc_listen_address: String,

    /// Admin HTTP listener (/healthz, /readyz): `IP:PORT`. It serves nothing
    /// secret, so it may sit on the pod IP for kubelet probes.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_ADMIN_LISTEN_ADDRESS",
        value_name = "IP:PORT",
        default_value = "127.0.0.1:18081"
    )]
    pub admin_listen_address: String,

    /// Query parameter that names the audience (removed before upstream).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_AUDIENCE_PARAMETER",
        value_name = "NAME",
        default_value = "kubernetes-audience"
    )]
    pub audience_parameter: String,

    /// Request header that names the audience (removed before upstream).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_AUDIENCE_HEADER",
        value_name = "NAME",
        default_value = "x-kubernetes-audience"
    )]
    pub audience_header: String,

    /// Audience for requests that name none (default: none, such requests
    /// pass through untouched).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_DEFAULT_AUDIENCE",
        value_name = "AUDIENCE"
    )]
    pub default_audience: Option<String>,

    /// Allowed audience, exact or glob (`*`, `?`, `[..]`); repeatable (or
    /// comma-separated in the environment). None given: any audience.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_ALLOWED_AUDIENCES",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub allowed_audience: Vec<String>,

    /// Requested token lifetime (`expirationSeconds`), e.g. `1h`, `30m`;
    /// at least 10m, as the API server requires.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_TOKEN_EXPIRATION",
        value_name = "DURATION",
        default_value = "1h",
        value_parser = humantime::parse_duration
    )]
    pub token_expiration: Duration,

    /// Bind tokens to this pod (boundObjectRef from --pod-name/--pod-uid),
    /// so they become invalid when the pod is deleted.
    #[arg(long, env = "KUBE_AUDIENCE_PROXY_BIND_POD")]
    pub bind_pod: bool,

    /// Name of this pod, for --bind-pod (downward API).
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,

    /// UID of this pod, for --bind-pod (downward API).
    #[arg(long, env = "POD_UID", value_name = "UID")]
    pub pod_uid: Option<String>,

    /// When no token can be had: `deny` answers 503 (fail closed), `allow`
    /// forwards the request without a token (fail open).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_ON_TOKEN_ERROR",
        value_enum,
        default_value = "deny"
    )]
    pub on_token_error: OnTokenError,

    /// Most audiences whose tokens are cached at once.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_MAX_AUDIENCES",
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_audiences: u64,

    /// A cached audience unused for this long is dropped.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_AUDIENCE_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "30m",
        value_parser = humantime::parse_duration
    )]
    pub audience_idle_timeout: Duration,

    /// Longest wait for one TokenRequest; keep it below Envoy's ext_proc
    /// `message_timeout` (5s in the shipped configuration).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_TOKEN_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "4s",
        value_parser = humantime::parse_duration
    )]
    pub token_request_timeout: Duration,

    /// On SIGTERM/SIGINT, keep serving this long (reporting NOT_SERVING) so
    /// Envoy stops sending first, then drain in-flight streams and exit.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_SHUTDOWN_DELAY",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub shutdown_delay: Duration,

    /// Intercept TLS to this host (exact name, `*.suffix` or IP address);
    /// repeatable (comma-separated in the environment). CONNECT tunnels to
    /// other hosts pass through untouched. Without any, no CA is created.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_INTERCEPT_HOSTS",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub intercept_host: Vec<String>,

    /// Where the interception CA certificate is written (atomically, mode
    /// 0644) for the client to trust. Only with --intercept-host.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_CA_FILE_DESTINATION",
        value_name = "PATH",
        default_value = "ca.crt"
    )]
    pub ca_file_destination: PathBuf,

    /// Load the CA private key from this file (with --ca-cert-file); if
    /// neither file exists, a new CA is written there (key mode 0600), so
    /// restarts keep the CA. Without it the key lives in memory only and a
    /// restart creates a new CA.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_CA_KEY_FILE",
        value_name = "PATH",
        requires = "ca_cert_file"
    )]
    pub ca_key_file: Option<PathBuf>,

    /// The CA certificate that goes with --ca-key-file.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_CA_CERT_FILE",
        value_name = "PATH",
        requires = "ca_key_file"
    )]
    pub ca_cert_file: Option<PathBuf>,

    /// Validity of a newly created CA.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_CA_VALIDITY",
        value_name = "DURATION",
        default_value = "365days",
        value_parser = humantime::parse_duration
    )]
    pub ca_validity: Duration,

    /// Validity of each leaf certificate; a successor is pushed to Envoy
    /// after two thirds of it.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_CERTIFICATE_VALIDITY",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = humantime::parse_duration
    )]
    pub certificate_validity: Duration,

    /// Most leaf certificates (host names) held at once; names beyond it
    /// are refused.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_MAX_CERTIFICATES",
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_certificates: u64,

    /// Worker threads of the async runtime. One processor serves one Envoy
    /// over one HTTP/2 connection; a single thread avoids cross-thread
    /// wake-ups and bounds the sidecar's CPU (see BENCHMARKS.md).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_WORKER_THREADS",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub worker_threads: u16,

    /// Log level: all, debug, info, warn, error or none.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_LOG_LEVEL",
        value_enum,
        default_value = "info"
    )]
    pub log_level: LogLevel,

    /// Log format: logfmt or json (to stderr).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "logfmt"
    )]
    pub log_format: LogFormat,
}

/// `--log-level` values (those of the original tool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Everything, including trace.
    All,
    /// Debug and above.
    Debug,
    /// Info and above.
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
    /// Nothing.
    None,
}

/// `--log-format` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `key=value` lines.
    Logfmt,
    /// One JSON object per line.
    Json,
}

// === the validated configuration, one section per consumer ===

/// The validated configuration: one section per consumer, each taken whole.
#[derive(Clone, Debug)]
pub struct Config {
    /// How to reach the API server (`kube_client`).
    pub kube: KubeSettings,
    /// Which tokens to mint and what to do without one (token source, processor).
    pub tokens: TokenSettings,
    /// Bounds of the token cache.
    pub cache: Limits,
    /// How a request names its audience (processor).
    pub audience: Rules,
    /// TLS interception; `None` when no host is intercepted (then no CA exists).
    pub interception: Option<Interception>,
    /// Listeners, drain and runtime (server).
    pub server: ServerSettings,
    /// Logging (main).
    pub telemetry: TelemetrySettings,
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

// === errors ===

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
    AllowedAudience(glob::PatternError),
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
struct Collector(Vec<ConfigError>);

impl Collector {
    /// The value, or `None` with the error recorded.
    fn take<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|error| self.0.push(error)).ok()
    }

    fn check(&mut self, ok: bool, error: impl FnOnce() -> ConfigError) -> Option<()> {
        self.take(if ok { Ok(()) } else { Err(error()) })
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
        let telemetry = TelemetrySettings {
            level: cli.log_level,
            format: cli.log_format,
        };
        match (kube, tokens, cache, audience, interception, server) {
            (
                Some(kube),
                Some(tokens),
                Some(cache),
                Some(audience),
                Some(interception),
                Some(server),
            ) if errors.0.is_empty() => Ok(Config {
                kube,
                tokens,
                cache,
                audience,
                interception,
                server,
                telemetry,
            }),
            _ => Err(ConfigErrors(errors.0)),
        }
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
    let request_timeout = non_zero(errors, "--token-request-timeout", cli.token_request_timeout);
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
    Some(Limits {
        max_audiences: cli.max_audiences,
        idle_timeout: non_zero(errors, "--audience-idle-timeout", cli.audience_idle_timeout)?,
    })
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
    header_ok?;
    parameter_ok?;
    Some(Rules {
        header,
        parameter: cli.audience_parameter.clone(),
        default: default?,
        allowlist: allowlist?,
    })
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
    raw.trim().parse().map_err(|_| ConfigError::ListenAddress {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigErrors> {
        let mut argv = vec!["kube-audience-proxy"];
        argv.extend_from_slice(args);
        Config::try_from(Cli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--service-account", "app", "--namespace", "demo"]).unwrap();
        assert_eq!(
            c.server.grpc,
            ListenAddress::Tcp("127.0.0.1:18080".parse().unwrap())
        );
        assert_eq!(c.server.admin, "127.0.0.1:18081".parse().unwrap());
        assert_eq!(c.audience.header, "x-kubernetes-audience");
        assert_eq!(c.audience.parameter, "kubernetes-audience");
        assert_eq!(c.tokens.expiration, Duration::from_secs(3600));
        assert_eq!(c.tokens.on_token_error, OnTokenError::Deny);
        assert_eq!(c.tokens.bound_pod, None);
        assert_eq!(c.cache.max_audiences, 1000);
    }

    #[test]
    fn namespace_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("namespace");
        std::fs::write(&file, "  team-a\n").unwrap();
        let c = parse(&[
            "--service-account",
            "app",
            "--namespace-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(c.tokens.namespace, "team-a");
        // --namespace wins over the file.
        let c = parse(&[
            "--service-account",
            "app",
            "--namespace-file",
            file.to_str().unwrap(),
            "--namespace",
            "b",
        ])
        .unwrap();
        assert_eq!(c.tokens.namespace, "b");
        let missing = dir.path().join("nope");
        let err = parse(&[
            "--service-account",
            "app",
            "--namespace-file",
            missing.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("could not be read"), "{err}");
    }

    #[test]
    fn clear_errors_for_bad_input() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--namespace", "demo"],
                "--service-account NAME or set SERVICE_ACCOUNT",
            ),
            (
                &["--service-account", "App!", "--namespace", "demo"],
                "not a valid Kubernetes name",
            ),
            (
                &[
                    "--service-account",
                    "a",
                    "--namespace",
                    "d",
                    "--token-expiration",
                    "9m",
                ],
                "below the API server's minimum of 10m",
            ),
            (
                &[
                    "--service-account",
                    "a",
                    "--namespace",
                    "d",
                    "--grpc-listen-address",
                    "0.0.0.0:1",
                ],
                "only listens on loopback",
            ),
            (
                &[
                    "--service-account",
                    "a",
                    "--namespace",
                    "d",
                    "--grpc-listen-address",
                    "nope",
                ],
                "expected a loopback IP:PORT",
            ),
            (
                &["--service-account", "a", "--namespace", "d", "--bind-pod"],
                "--bind-pod needs",
            ),
            (
                &[
                    "--service-account",
                    "a",
                    "--namespace",
                    "d",
                    "--allowed-audience",
                    "x",
                    "--default-audience",
                    "y",
                ],
                "not allowed",
            ),
            (
                &[
                    "--service-account",
                    "a",
                    "--namespace",
                    "d",
                    "--audience-header",
                    "bad header",
                ],
                "not a valid HTTP header name",
            ),
            (
                &[
                    "--service-account",
                    "a",
                    "--namespace",
                    "d",
                    "--apiserver",
                    "::",
                ],
                "not a valid URL",
            ),
        ];
        for (args, want) in cases {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn unix_sockets_and_pod_binding() {
        let c = parse(&[
            "--service-account",
            "a",
            "--namespace",
            "d",
            "--grpc-listen-address",
            "unix:/tmp/kap.sock",
            "--bind-pod",
            "--pod-name",
            "p",
            "--pod-uid",
            "u-1",
            "--token-expiration",
            "10m",
        ])
        .unwrap();
        assert_eq!(c.server.grpc, ListenAddress::Unix("/tmp/kap.sock".into()));
        assert_eq!(
            c.tokens.bound_pod,
            Some(BoundPod {
                name: "p".into(),
                uid: "u-1".into()
            })
        );
        assert_eq!(c.tokens.expiration, Duration::from_secs(600));
        assert!(matches!(
            parse(&[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--grpc-listen-address",
                "[::1]:9"
            ])
            .unwrap()
            .server
            .grpc,
            ListenAddress::Tcp(_)
        ));
    }

    #[test]
    fn clap_rejects_unknown_values() {
        for args in [
            vec!["x", "--log-level", "loud"],
            vec!["x", "--on-token-error", "maybe"],
            vec!["x", "--max-audiences", "0"],
            vec!["x", "--token-expiration", "soon"],
        ] {
            assert!(Cli::try_parse_from(args).is_err());
        }
    }
    #[test]
    fn every_invalid_flag_is_reported_at_once() {
        let errors = parse(&[
            "--namespace",
            "Bad_NS",
            "--token-expiration",
            "1m",
            "--token-request-timeout",
            "0s",
            "--audience-idle-timeout",
            "0s",
            "--audience-header",
            "bad header",
            "--audience-parameter",
            "",
            "--allowed-audience",
            "[",
            "--intercept-host",
            "not a host",
            "--certificate-validity",
            "1m",
            "--grpc-listen-address",
            "0.0.0.0:1",
            "--admin-listen-address",
            "localhost",
            "--apiserver",
            "::",
            "--bind-pod",
        ])
        .unwrap_err();
        let kinds: Vec<&str> = errors
            .iter()
            .map(|e| match e {
                ConfigError::MissingServiceAccount => "service-account",
                ConfigError::NamespaceFile { .. } => "namespace-file",
                ConfigError::InvalidName { .. } => "name",
                ConfigError::ListenAddress { flag, .. } => flag,
                ConfigError::NotLoopback(_) => "not-loopback",
                ConfigError::ApiServer(_) => "apiserver",
                ConfigError::TokenExpiration(_) => "token-expiration",
                ConfigError::AudienceHeader(_) => "audience-header",
                ConfigError::AudienceParameter => "audience-parameter",
                ConfigError::DefaultAudience(_) => "default-audience",
                ConfigError::AllowedAudience(_) => "allowed-audience",
                ConfigError::MissingPod => "bind-pod",
                ConfigError::InterceptHost(_) => "intercept-host",
                ConfigError::CertificateValidity => "certificate-validity",
                ConfigError::ZeroDuration(flag) => flag,
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "apiserver",
                "service-account",
                "name",
                "token-expiration",
                "--token-request-timeout",
                "bind-pod",
                "--audience-idle-timeout",
                "audience-header",
                "audience-parameter",
                "allowed-audience",
                "intercept-host",
                "certificate-validity",
                "not-loopback",
                "--admin-listen-address",
            ]
        );
        // One line per error, so the binary prints each on its own line.
        assert_eq!(errors.to_string().lines().count(), kinds.len());
    }

    #[test]
    fn address_flags_parse_alike() {
        let base = ["--service-account", "a", "--namespace", "d"];
        for flag in ["--grpc-listen-address", "--admin-listen-address"] {
            let mut args = base.to_vec();
            args.extend([flag, "nope"]);
            let errors = parse(&args).unwrap_err();
            assert!(
                matches!(
                    errors.iter().collect::<Vec<_>>()[..],
                    [ConfigError::ListenAddress { flag: f, .. }] if *f == flag
                ),
                "{flag}: {errors}"
            );
        }
        let mut args = base.to_vec();
        args.extend(["--admin-listen-address", "[::1]:0"]);
        assert_eq!(
            parse(&args).unwrap().server.admin,
            "[::1]:0".parse().unwrap()
        );
    }

    #[test]
    fn limits_in_help_and_messages_come_from_the_constants() {
        let limit = humantime::format_duration(MIN_TOKEN_EXPIRATION).to_string();
        let help = <Cli as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(help.contains(&format!("at least {limit}")), "{help}");
        let errors = parse(&[
            "--service-account",
            "a",
            "--namespace",
            "d",
            "--certificate-validity",
            "5m",
        ])
        .unwrap_err();
        let expected = humantime::format_duration(MIN_CERTIFICATE_VALIDITY).to_string();
        assert!(errors.to_string().contains(&expected), "{errors}");
    }
}
