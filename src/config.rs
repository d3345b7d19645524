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
use crate::tokens::kube::BoundPod;

/// Shortest token lifetime the Kubernetes API server accepts.
pub const MIN_TOKEN_EXPIRATION: Duration = Duration::from_secs(600);

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

    /// Admin HTTP listener: /healthz, /readyz.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_ADMIN_LISTEN_ADDRESS",
        value_name = "IP:PORT",
        default_value = "127.0.0.1:18081"
    )]
    pub admin_listen_address: SocketAddr,

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

/// Where the gRPC server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// Where the Kubernetes client configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSettings {
    /// Explicit kubeconfig; `None` = in-cluster (or kube's inference).
    pub kubeconfig: Option<PathBuf>,
    /// API server URL override.
    pub apiserver: Option<http::Uri>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// ServiceAccount name.
    pub service_account: String,
    /// Its namespace.
    pub namespace: String,
    /// Kubernetes client settings.
    pub kube: KubeSettings,
    /// gRPC listener.
    pub grpc_listen: ListenAddress,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Audience resolution rules.
    pub rules: Rules,
    /// Requested token lifetime.
    pub token_expiration: Duration,
    /// Pod the tokens are bound to.
    pub bound_pod: Option<BoundPod>,
    /// Fail closed or open.
    pub on_token_error: OnTokenError,
    /// Cache bound.
    pub max_audiences: u64,
    /// Idle expiry of cached audiences.
    pub audience_idle_timeout: Duration,
    /// Bound on one TokenRequest.
    pub token_request_timeout: Duration,
    /// Drain delay on shutdown.
    pub shutdown_delay: Duration,
    /// Intercepted hosts.
    pub intercept: InterceptHosts,
    /// The CA, if any host is intercepted.
    pub ca: Option<CaSettings>,
    /// Leaf certificate validity.
    pub certificate_validity: Duration,
    /// Bound on leaf certificates.
    pub max_certificates: usize,
    /// Runtime worker threads.
    pub worker_threads: usize,
    /// Log level.
    pub log_level: LogLevel,
    /// Log format.
    pub log_format: LogFormat,
}

/// A configuration that cannot work. Exit code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No ServiceAccount given.
    #[error("no ServiceAccount: pass --service-account NAME or set SERVICE_ACCOUNT")]
    MissingServiceAccount,
    /// The namespace file could not be read.
    #[error(
        "no namespace: --namespace / POD_NAMESPACE not set and the namespace file {path} could not be read ({source})"
    )]
    NamespaceFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A Kubernetes name is not a valid DNS-1123 name.
    #[error(
        "{what} {value:?} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.')"
    )]
    InvalidName {
        /// Which setting.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Bad gRPC listen address.
    #[error("--grpc-listen-address {0:?}: expected a loopback IP:PORT or unix:/path")]
    GrpcAddress(String),
    /// gRPC listener outside loopback.
    #[error(
        "--grpc-listen-address {0}: the processor hands out credentials, so it only listens on loopback (127.0.0.0/8, ::1) or a Unix socket"
    )]
    NotLoopback(SocketAddr),
    /// Bad API server URL.
    #[error("--apiserver {0:?} is not a valid URL")]
    ApiServer(String),
    /// Token lifetime too short.
    #[error("--token-expiration {} is below the API server's minimum of 10m", humantime::format_duration(*.0))]
    TokenExpiration(Duration),
    /// Bad audience header name.
    #[error("--audience-header {0:?} is not a valid HTTP header name")]
    AudienceHeader(String),
    /// Bad audience parameter name.
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
    #[error("--certificate-validity must be between 10m and --ca-validity")]
    CertificateValidity,
    /// A timeout of zero.
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
}

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Config, ConfigError> {
        let service_account = cli
            .service_account
            .filter(|s| !s.trim().is_empty())
            .ok_or(ConfigError::MissingServiceAccount)?
            .trim()
            .to_owned();
        validate_name("ServiceAccount", &service_account)?;
        let namespace = match cli.namespace.filter(|n| !n.trim().is_empty()) {
            Some(ns) => ns.trim().to_owned(),
            None => std::fs::read_to_string(&cli.namespace_file)
                .map_err(|source| ConfigError::NamespaceFile {
                    path: cli.namespace_file.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        };
        validate_name("namespace", &namespace)?;

        let apiserver = match cli.apiserver {
            Some(url) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|_| ConfigError::ApiServer(url.clone()))?;
                if uri.scheme().is_none() || uri.host().is_none() {
                    return Err(ConfigError::ApiServer(url));
                }
                Some(uri)
            }
            None => None,
        };

        if cli.token_expiration < MIN_TOKEN_EXPIRATION {
            return Err(ConfigError::TokenExpiration(cli.token_expiration));
        }
        for (name, value) in [
            ("--token-request-timeout", cli.token_request_timeout),
            ("--audience-idle-timeout", cli.audience_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }

        let header = cli.audience_header.to_ascii_lowercase();
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err(ConfigError::AudienceHeader(cli.audience_header));
        }
        if cli.audience_parameter.is_empty() {
            return Err(ConfigError::AudienceParameter);
        }
        let allowlist =
            Allowlist::new(&cli.allowed_audience).map_err(ConfigError::AllowedAudience)?;
        let default = match cli.default_audience {
            Some(raw) => {
                let audience = Audience::parse(raw.as_bytes(), audience::Source::Default)
                    .map_err(ConfigError::DefaultAudience)?;
                if !allowlist.allows(&audience) {
                    return Err(ConfigError::DefaultAudience(
                        audience::Rejection::NotAllowed { audience },
                    ));
                }
                Some(audience)
            }
            None => None,
        };

        let intercept = InterceptHosts::new(&cli.intercept_host)?;
        if cli.certificate_validity < Duration::from_secs(600)
            || cli.certificate_validity > cli.ca_validity
        {
            return Err(ConfigError::CertificateValidity);
        }
        let ca = (!intercept.is_empty()).then(|| CaSettings {
            destination: cli.ca_file_destination.clone(),
            persisted: cli.ca_key_file.clone().zip(cli.ca_cert_file.clone()),
            validity: cli.ca_validity,
        });

        let bound_pod = if cli.bind_pod {
            match (cli.pod_name, cli.pod_uid) {
                (Some(name), Some(uid)) if !name.is_empty() && !uid.is_empty() => {
                    Some(BoundPod { name, uid })
                }
                _ => return Err(ConfigError::MissingPod),
            }
        } else {
            None
        };

        Ok(Config {
            service_account,
            namespace,
            kube: KubeSettings {
                kubeconfig: cli.kubeconfig,
                apiserver,
            },
            grpc_listen: parse_grpc_address(&cli.grpc_listen_address)?,
            admin_listen: cli.admin_listen_address,
            rules: Rules {
                header,
                parameter: cli.audience_parameter,
                default,
                allowlist,
            },
            token_expiration: cli.token_expiration,
            bound_pod,
            on_token_error: cli.on_token_error,
            max_audiences: cli.max_audiences,
            audience_idle_timeout: cli.audience_idle_timeout,
            token_request_timeout: cli.token_request_timeout,
            shutdown_delay: cli.shutdown_delay,
            intercept,
            ca,
            certificate_validity: cli.certificate_validity,
            max_certificates: usize::try_from(cli.max_certificates).unwrap_or(usize::MAX),
            worker_threads: usize::from(cli.worker_threads),
            log_level: cli.log_level,
            log_format: cli.log_format,
        })
    }
}

fn parse_grpc_address(raw: &str) -> Result<ListenAddress, ConfigError> {
    if let Some(path) = raw.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(ConfigError::GrpcAddress(raw.to_owned()));
        }
        return Ok(ListenAddress::Unix(PathBuf::from(path)));
    }
    let addr: SocketAddr = raw
        .parse()
        .map_err(|_| ConfigError::GrpcAddress(raw.to_owned()))?;
    if !addr.ip().is_loopback() {
        return Err(ConfigError::NotLoopback(addr));
    }
    Ok(ListenAddress::Tcp(addr))
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

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["kube-audience-proxy"];
        argv.extend_from_slice(args);
        Config::try_from(Cli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--service-account", "app", "--namespace", "demo"]).unwrap();
        assert_eq!(
            c.grpc_listen,
            ListenAddress::Tcp("127.0.0.1:18080".parse().unwrap())
        );
        assert_eq!(c.admin_listen, "127.0.0.1:18081".parse().unwrap());
        assert_eq!(c.rules.header, "x-kubernetes-audience");
        assert_eq!(c.rules.parameter, "kubernetes-audience");
        assert_eq!(c.token_expiration, Duration::from_secs(3600));
        assert_eq!(c.on_token_error, OnTokenError::Deny);
        assert_eq!(c.bound_pod, None);
        assert_eq!(c.max_audiences, 1000);
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
        assert_eq!(c.namespace, "team-a");
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
        assert_eq!(c.namespace, "b");
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
        assert_eq!(c.grpc_listen, ListenAddress::Unix("/tmp/kap.sock".into()));
        assert_eq!(
            c.bound_pod,
            Some(BoundPod {
                name: "p".into(),
                uid: "u-1".into()
            })
        );
        assert_eq!(c.token_expiration, Duration::from_secs(600));
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
            .grpc_listen,
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
}
