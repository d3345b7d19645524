//! `kube-audience-proxy envoy-config`: the Envoy configuration for a
//! processor started with the same flags, so the fast path's matchers can
//! never drift from the processor's destination rules and audiences.
//!
//! It takes every processor flag (and the same environment variables) and
//! reads those the Envoy configuration depends on: `--grpc-listen-address`,
//! `--audience-rule`, `--prefetch-audience`, `--allowed-audience`,
//! `--audience-header`, `--audience-parameter`, `--allow-local-destinations`,
//! `--allow-apiserver-audience`, `--apiserver` and `--token-request-timeout`.
//! They are validated as the processor validates them. The output starts
//! with the command line that produced it; the files shipped in `envoy/`
//! and `deploy/` are such outputs (`scripts/sync-deploy` rewrites them,
//! `tests/generated_config.rs` keeps them byte-identical).
//!
//! Formats: `bootstrap` (a complete Envoy bootstrap, as `envoy/envoy.yaml`),
//! `istio` (the EnvoyFilter of `deploy/istio`) and `configmap` (the
//! bootstrap inside a ConfigMap, for those who do not use kustomize's
//! `configMapGenerator`).

mod fast_path;
mod yaml;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::audience::Audience;
use crate::config::{Cli, ConfigErrors, EnvoySettings, ListenAddress};
use fast_path::{Entry, Listener};
use yaml::{Lines, quote};

/// The bootstrap template: `envoy/envoy.yaml` with holes.
const BOOTSTRAP: &str = include_str!("bootstrap.yaml");
/// The Istio EnvoyFilter template.
const ISTIO: &str = include_str!("istio.yaml");

/// The name Envoy's HTTP filter gets, with or without the fast path: a
/// route's `typed_per_filter_config` for ext_proc (`ExtProcPerRoute`) is
/// found under it either way.
const FILTER_NAME: &str = "envoy.filters.http.ext_proc";

/// `kube-audience-proxy envoy-config`.
#[derive(Debug, Parser)]
#[command(
    name = "kube-audience-proxy envoy-config",
    about = "Print the Envoy configuration for a processor started with the same flags",
    long_about = "Print the Envoy configuration for a processor started with the same flags \
(or the same environment): the bootstrap (envoy/envoy.yaml), the Istio EnvoyFilter or the \
bootstrap in a ConfigMap. Destinations whose audience is known in advance (an --audience-rule \
with a literal audience, an audience header naming a --prefetch-audience) get the fast path: \
Envoy injects the token itself from the processor's SDS token secret, with no gRPC call per \
request. Everything else goes to the processor over ext_proc. The processor flags are \
validated as the processor does; those that do not shape Envoy's configuration are accepted \
and ignored.",
    args_override_self = true
)]
pub struct EnvoyConfigCli {
    /// What to print.
    #[arg(long, value_enum, default_value = "bootstrap")]
    pub format: Format,

    /// Where Envoy's proxy listener binds (bootstrap and configmap): the
    /// client's HTTP(S)_PROXY. Loopback unless the client is another pod.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:8080")]
    pub proxy_listen_address: SocketAddr,

    /// Also serve Envoy's statistics in Prometheus format on this address
    /// (bootstrap and configmap), at `/stats/prometheus` only: a listener
    /// that forwards that one path to the admin socket, so Prometheus sees
    /// which path served each request (credential_injector vs ext_proc)
    /// while the admin interface itself stays unreachable. Default: none.
    #[arg(long, value_name = "IP:PORT")]
    pub envoy_stats_listen_address: Option<SocketAddr>,

    /// The processor's flags.
    #[command(flatten)]
    pub processor: Cli,
}

/// The output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A complete Envoy bootstrap (YAML).
    Bootstrap,
    /// An Istio EnvoyFilter (networking.istio.io/v1alpha3) for the sidecar.
    Istio,
    /// The bootstrap as the ConfigMap `kube-audience-proxy-envoy` (key `envoy.yaml`).
    Configmap,
}

/// The configuration `args` asks for (`args` without the program name and
/// the subcommand: they are quoted in the output's first line).
pub fn generate(cli: &EnvoyConfigCli, args: &[OsString]) -> Result<String, ConfigErrors> {
    let settings = EnvoySettings::try_from(&cli.processor)?;
    let header = header(args);
    let bootstrap = || {
        bootstrap(
            &settings,
            cli.proxy_listen_address,
            cli.envoy_stats_listen_address,
        )
    };
    Ok(match cli.format {
        Format::Bootstrap => header + &bootstrap(),
        Format::Istio => header + &istio(&settings),
        Format::Configmap => header + &configmap(&bootstrap()),
    })
}

/// The first lines: the command, one flag per line, each as a shell would
/// take it back (`tests/generated_config.rs` runs them again).
fn header(args: &[OsString]) -> String {
    let mut out = String::from(
        "# Generated by `kube-audience-proxy envoy-config` with the flags below; do not\n\
         # edit: scripts/sync-deploy regenerates the shipped files.\n",
    );
    for arg in args {
        let _ = writeln!(out, "#   {}", shell_word(&arg.to_string_lossy()));
    }
    out
}

/// `word` quoted for a POSIX shell when it needs to be.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=:/.,@%+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn bootstrap(settings: &EnvoySettings, proxy: SocketAddr, stats: Option<SocketAddr>) -> String {
    let plain = fast_path::entries(settings, Listener::Plain);
    let intercept = fast_path::entries(settings, Listener::Intercept);
    let mut forward_filter = Lines::default();
    forward_filter.line(
        10,
        "# First: refused requests never reach the DNS cache or the upstream.",
    );
    write_filter(&mut forward_filter, 10, settings, &plain, Listener::Plain);
    let mut intercept_filter = Lines::default();
    write_filter(
        &mut intercept_filter,
        10,
        settings,
        &intercept,
        Listener::Intercept,
    );
    let mut summary = summary(&plain, "plain HTTP");
    summary.push_str(&self::summary(&intercept, "inside intercepted TLS"));
    let text = BOOTSTRAP
        .replace("{{FAST_PATH_SUMMARY}}\n", &summary)
        .replace("{{FORWARD_PROXY_FILTER}}\n", &forward_filter.into_string())
        .replace(
            "{{STATS_LISTENER}}\n",
            &stats.map(stats_listener).unwrap_or_default(),
        )
        .replace(
            "{{STATS_CLUSTER}}",
            if stats.is_some() { STATS_CLUSTER } else { "" },
        )
        .replace("{{INTERCEPT_FILTER}}\n", &intercept_filter.into_string())
        .replace("{{PROXY_SOCKET}}", &socket_address(proxy))
        .replace("{{PROXY}}", &proxy.to_string());
    fill_shared(&text, settings)
}

fn istio(settings: &EnvoySettings) -> String {
    let plain = fast_path::entries(settings, Listener::Plain);
    let mut filter = Lines::default();
    write_filter(&mut filter, 6, settings, &plain, Listener::Plain);
    // The patch value is the filter entry itself, not a list item.
    let filter = filter
        .into_string()
        .replacen("      - name:", "        name:", 1);
    let text = ISTIO
        .replace("{{FAST_PATH_SUMMARY}}", &summary(&plain, "outbound HTTP"))
        .replace("{{FILTER}}\n", &filter);
    fill_shared(&text, settings)
}

/// The holes both templates have: the processor's address and the audience
/// header.
fn fill_shared(template: &str, settings: &EnvoySettings) -> String {
    template
        .replace("{{PROCESSOR}}", &processor_text(&settings.grpc))
        .replace("{{PROCESSOR_ADDRESS}}", &processor_address(&settings.grpc))
        .replace("{{AUDIENCE_HEADER}}", &quote(&settings.audience.header))
}

fn configmap(bootstrap: &str) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube-audience-proxy-envoy\ndata:\n  envoy.yaml: |\n",
    );
    for line in bootstrap.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

/// Comment lines naming what takes the fast path on a listener.
fn summary(entries: &[Entry], listener: &str) -> String {
    if entries.is_empty() {
        return format!("# Fast path, {listener}: none (every request goes to ext_proc).\n");
    }
    let mut audiences: Vec<&Audience> = entries.iter().map(|entry| &entry.audience).collect();
    audiences.dedup();
    let mut out = format!(
        "# Fast path, {listener}: {} matcher(s) for the audience(s)",
        entries.len()
    );
    for audience in audiences {
        let _ = write!(out, " {audience}");
    }
    out.push_str(".\n");
    out
}

/// The listener that serves `/stats/prometheus` and nothing else.
fn stats_listener(address: SocketAddr) -> String {
    format!(
        r#"
  # Envoy's statistics for Prometheus (--envoy-stats-listen-address): only
  # GET /stats/prometheus, forwarded to the admin socket; anything else 404.
  # No statistic holds a credential (secret names name audiences and hosts).
  - name: envoy_stats
    address:
      socket_address: {socket}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: envoy_stats
          route_config:
            name: envoy_stats
            virtual_hosts:
            - name: envoy_stats
              domains: ["*"]
              routes:
              - match:
                  path: /stats/prometheus
                  headers:
                  - name: ":method"
                    string_match: {{ exact: GET }}
                route: {{ cluster: envoy_admin, timeout: 10s }}
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 404 }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        socket = socket_address(address)
    )
}

/// The cluster behind the statistics listener: the admin socket.
const STATS_CLUSTER: &str = concat!(
    "\n",
    "  # Envoy's own admin interface, for the statistics listener only.\n",
    "  - name: envoy_admin\n",
    "    type: STATIC\n",
    "    connect_timeout: 1s\n",
    "    load_assignment:\n",
    "      cluster_name: envoy_admin\n",
    "      endpoints:\n",
    "      - lb_endpoints:\n",
    "        - endpoint:\n",
    "            address:\n",
    "              pipe: { path: /tmp/kube-audience-proxy-envoy-admin.sock }\n",
);

/// `{ address: IP, port_value: PORT }`.
fn socket_address(address: SocketAddr) -> String {
    format!(
        "{{ address: {}, port_value: {} }}",
        quote_ip(address),
        address.port()
    )
}

fn quote_ip(address: SocketAddr) -> String {
    match address {
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => quote(&v6.ip().to_string()),
    }
}

fn processor_text(grpc: &ListenAddress) -> String {
    match grpc {
        ListenAddress::Tcp(address) => address.to_string(),
        ListenAddress::Unix(path) => format!("unix:{}", path.display()),
    }
}

/// The processor endpoint's `address:` value, one line.
fn processor_address(grpc: &ListenAddress) -> String {
    match grpc {
        ListenAddress::Tcp(address) => format!("socket_address: {}", socket_address(*address)),
        ListenAddress::Unix(path) => {
            format!("pipe: {{ path: {} }}", quote(&path.display().to_string()))
        }
    }
}

/// Envoy's `message_timeout`: one second above `--token-request-timeout`,
/// so the processor answers (503 with the reason) before Envoy gives up.
fn message_timeout(request_timeout: Duration) -> String {
    let total = request_timeout + Duration::from_secs(1);
    if total.subsec_millis() == 0 {
        format!("{}s", total.as_secs())
    } else {
        format!("{}.{:03}s", total.as_secs(), total.subsec_millis())
    }
}

/// Request headers only: the processor never sees a body.
const PROCESSING_MODE: &str = "processing_mode:
  request_header_mode: SEND
  response_header_mode: SKIP
  request_body_mode: NONE
  response_body_mode: NONE
  request_trailer_mode: SKIP
  response_trailer_mode: SKIP
";

/// The ext_proc filter's `typed_config` body (at column 0).
fn ext_proc_config(settings: &EnvoySettings, listener: Listener) -> String {
    let timeout = message_timeout(settings.request_timeout);
    let request_timeout = humantime::format_duration(settings.request_timeout);
    match listener {
        Listener::Plain => format!(
            r#""@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
grpc_service:
  envoy_grpc:
    cluster_name: kube_audience_proxy
# The processor answers within its --token-request-timeout ({request_timeout})
# even when it must mint a token first.
message_timeout: {timeout}
# Processor down: refuse (500) rather than forward without a token.
failure_mode_allow: false
{PROCESSING_MODE}"#
        ),
        Listener::Intercept => format!(
            r#""@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
grpc_service:
  envoy_grpc:
    cluster_name: kube_audience_proxy
  # Tells the processor the request arrived inside intercepted
  # TLS: its host must match the SNI (else 421).
  initial_metadata:
  - key: x-kube-audience-proxy-listener
    value: intercept
request_attributes: ["connection.requested_server_name"]
message_timeout: {timeout}
failure_mode_allow: false
{PROCESSING_MODE}"#
        ),
    }
}

/// The HTTP filter entry (a list item at `indent`): ext_proc alone, or
/// the composite filter that runs credential_injector for the fast-path
/// `entries` and ext_proc for everything else.
fn write_filter(
    out: &mut Lines,
    indent: usize,
    settings: &EnvoySettings,
    entries: &[Entry],
    listener: Listener,
) {
    let ext_proc = ext_proc_config(settings, listener);
    out.line(indent, &format!("- name: {FILTER_NAME}"));
    out.line(indent + 2, "typed_config:");
    if entries.is_empty() {
        out.block(indent + 4, &ext_proc);
        return;
    }
    out.block(
        indent + 4,
        r#""@type": type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher
extension_config:
  name: envoy.filters.http.composite
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite
xds_matcher:
"#,
    );
    let inject = |out: &mut Lines, at: usize, audience: &Audience| {
        let action = quote(&format!("token {audience}"));
        let config = credential_injector_config(audience);
        execute(
            out,
            at,
            &action,
            "envoy.filters.http.credential_injector",
            &config,
        );
    };
    let fallback = |out: &mut Lines, at: usize| {
        execute(out, at, "ext-proc", FILTER_NAME, &ext_proc);
    };
    fast_path::write_matcher(out, indent + 6, entries, &inject, &fallback);
}

/// `credential_injector`'s `typed_config` body (at column 0): the Generic
/// credential from `audience`'s SDS token secret, overwriting any
/// `authorization` the client sent, never a request without it (401).
fn credential_injector_config(audience: &Audience) -> String {
    let secret = quote(&crate::sds::tokens::secret_name(audience.as_str()));
    format!(
        r#""@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
overwrite: true
allow_request_without_credential: false
credential:
  name: envoy.http.injected_credentials.generic
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic
    credential:
      name: {secret}
      sds_config:
        resource_api_version: V3
        api_config_source:
          api_type: DELTA_GRPC
          transport_api_version: V3
          grpc_services:
          - envoy_grpc:
              cluster_name: kube_audience_proxy
"#
    )
}

/// A matcher's `action:` at `at`: the composite filter runs `filter`
/// (named so) with `config` as its `typed_config` body.
fn execute(out: &mut Lines, at: usize, action: &str, filter: &str, config: &str) {
    out.line(at, "action:");
    out.line(at + 2, &format!("name: {action}"));
    out.line(at + 2, "typed_config:");
    out.line(
        at + 4,
        "\"@type\": type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
    );
    out.line(at + 4, "typed_config:");
    out.line(at + 6, &format!("name: {filter}"));
    out.line(at + 6, "typed_config:");
    out.block(at + 8, config);
}

#[cfg(test)]
mod tests;
