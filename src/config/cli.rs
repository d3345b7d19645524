//! The command line: every flag with its environment fallback and its
//! `--help` text. Parsed values are validated into a `Config` by the parent
//! module; clap only refuses what cannot be parsed at all (exit 2).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::ext_proc::OnTokenError;

/// kube-audience-proxy: an Envoy external processor (ext_proc) that gives each
/// HTTP request a bound ServiceAccount token for the audience it asks for.
///
/// Envoy asks this processor about every request; the processor finds the
/// audience (header, query parameter, Envoy route metadata or default), mints
/// a token with the Kubernetes TokenRequest API (cached and refreshed in the
/// background), and tells Envoy to set `authorization: Bearer <token>` and to
/// drop the audience header and parameter.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about,
    args_override_self = true,
    after_long_help = "Envoy's configuration for these flags: `kube-audience-proxy envoy-config [FLAGS]` (see `kube-audience-proxy envoy-config --help`)."
)]
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

    /// Admin HTTP listener (/healthz, /readyz, /metrics): `IP:PORT`. It serves nothing
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

    /// Allowed audience, exact or glob (`*`, `?`, `[..]`; wildcards never
    /// match `/ ? # @ \ %`, so one stays inside a host label or path
    /// segment; `**` is refused); repeatable (or
    /// comma-separated in the environment). None given: any audience.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_ALLOWED_AUDIENCES",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub allowed_audience: Vec<String>,

    /// Destination rule HOST=AUDIENCE: a request to HOST that names no
    /// audience gets AUDIENCE, and once any rule is given a token goes only
    /// to a destination whose rules admit its audience (else 403, before any
    /// TokenRequest; --default-audience and Envoy route audiences too).
    /// Repeatable (comma-separated in the environment); the first matching
    /// rule whose AUDIENCE is not `*` supplies the audience.
    ///
    /// HOST: a name, `*.suffix`, an IP address or a CIDR block, optionally
    /// with `:PORT` (`api.example:8443`, `[::1]:443`, `10.0.0.0/8:443`,
    /// `[fd00::/8]:443`; without one any port); names are compared
    /// case-insensitively without the trailing dot. `https://HOST` covers
    /// only requests inside intercepted TLS (the token never travels in
    /// clear from the proxy); without a scheme plain HTTP is covered too.
    ///
    /// AUDIENCE: a literal; a template with `{host}` (the request's host in
    /// lower case, IPv6 in brackets: `https://{host}`); or `*` (any audience
    /// the request names, still subject to --allowed-audience; supplies
    /// none). Without any rule, any destination may receive tokens.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_AUDIENCE_RULES",
        value_name = "HOST=AUDIENCE",
        value_delimiter = ','
    )]
    pub audience_rule: Vec<String>,

    /// Forward requests whose destination is this machine or its network
    /// link (loopback, link-local and unspecified addresses, `localhost`,
    /// `*.localhost`, cloud metadata endpoints). Off: they are refused with
    /// 403, so nothing reaches Envoy's admin, the processor's ports or other
    /// local services through the proxy. For tests, demos and local
    /// development only.
    #[arg(long, env = "KUBE_AUDIENCE_PROXY_ALLOW_LOCAL_DESTINATIONS")]
    pub allow_local_destinations: bool,

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

    /// Longest wait for one TokenRequest, waiting for a free slot of
    /// --max-concurrent-token-requests included; at most 1m. Keep it below
    /// Envoy's ext_proc `message_timeout` (5s in the shipped configuration),
    /// so the processor answers (503 with the reason) before Envoy gives up.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_TOKEN_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "4s",
        value_parser = humantime::parse_duration
    )]
    pub token_request_timeout: Duration,

    /// Most TokenRequests in flight at once, across all audiences (background
    /// refreshes included), so a burst of new audiences cannot flood the API
    /// server. Requests beyond it wait for a free slot, within
    /// --token-request-timeout. At least 1.
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_MAX_CONCURRENT_TOKEN_REQUESTS",
        value_name = "N",
        default_value_t = 8
    )]
    pub max_concurrent_token_requests: u16,

    /// Also mint tokens for the Kubernetes API server's own audiences
    /// (`https://kubernetes.default.svc[.cluster.local]`, the API server URL,
    /// the issuer it publishes), which are refused with 403 by default.
    /// WARNING: whoever receives such a token can act as this proxy's
    /// ServiceAccount against the API server. Only for a client that must
    /// call the API server through this proxy and is trusted with that.
    #[arg(long, env = "KUBE_AUDIENCE_PROXY_ALLOW_APISERVER_AUDIENCE")]
    pub allow_apiserver_audience: bool,

    /// Audience whose token is minted at startup and refreshed on a timer
    /// (at 80 % of its lifetime) even when no request uses it; it never
    /// ages out. Readiness (/readyz, gRPC health) waits until every one
    /// holds a valid token, and stays ready while they do, API server
    /// outages included. Must pass --allowed-audience, must not be an API
    /// server audience, counts against --max-audiences. Repeatable
    /// (comma-separated in the environment).
    #[arg(
        long,
        env = "KUBE_AUDIENCE_PROXY_PREFETCH_AUDIENCES",
        value_name = "AUDIENCE",
        value_delimiter = ','
    )]
    pub prefetch_audience: Vec<String>,

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
    /// restart creates a new CA. A loaded CA that expired, ends sooner than
    /// --certificate-validity from now, or whose name constraints do not
    /// permit every --intercept-host stops the start (exit code 64).
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
    /// are refused. Every SDS path counts, and names that differ only in
    /// case or a trailing dot count once; beyond each name's first
    /// spelling, at most 4 x N (at least 64) other spellings are held in all.
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
