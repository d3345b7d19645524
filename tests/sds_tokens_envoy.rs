//! The real Envoy injects a fast-path token itself: a minimal static
//! config (written here; the generated composite config is later work)
//! whose `credential_injector` filter takes a Generic credential from the
//! processor's SDS token secret. Real curl -> Envoy -> an upstream that
//! verifies every JWT; the processor binary mints from the
//! TokenRequest-compatible API server. Proves: the token reaches the
//! upstream for exactly its audience with no ext_proc in the path; a
//! refresh is used by later requests (a new `jti`) with no failure in
//! between; with the API server down past the usable end, Envoy fails
//! closed (401) and no expired token ever reaches the upstream; recovery
//! injects again.
//!
//! Tokens live 40 s: usable for 10 s, refreshed after at most 8 s.

mod support;

use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::envoy::Envoy;
use support::jwt::now_unix;
use support::processor::Processor;
use support::upstream::{TokenVerdict, Upstream};

const LIFETIME: Duration = Duration::from_secs(40);
const AUDIENCE: &str = "prom-a";
/// Bound on each phase.
const DEADLINE: Duration = Duration::from_secs(45);
/// The client's pace.
const POLL: Duration = Duration::from_millis(300);

/// Envoy: one listener, `credential_injector` (Generic credential from the
/// SDS secret `kube-audience-proxy-token/AUDIENCE`, overwrite on, no
/// request without a credential), router to `upstream`.
fn envoy_config(processor: &str, upstream: std::net::SocketAddr) -> serde_yaml::Value {
    let grpc: std::net::SocketAddr = processor.parse().expect("a TCP processor address");
    let yaml = format!(
        r#"
node: {{ id: fast-path-test, cluster: fast-path-test }}
admin: {{}}
static_resources:
  listeners:
  - name: fast
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: fast
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.credential_injector
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
              overwrite: true
              allow_request_without_credential: false
              credential:
                name: envoy.http.injected_credentials.generic
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic
                  credential:
                    name: "kube-audience-proxy-token/{AUDIENCE}"
                    sds_config:
                      resource_api_version: V3
                      api_config_source:
                        api_type: DELTA_GRPC
                        transport_api_version: V3
                        grpc_services:
                        - envoy_grpc: {{ cluster_name: kube_audience_proxy }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: "{up_ip}", port_value: {up_port} }} }} }}
  - name: kube_audience_proxy
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: kube_audience_proxy
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: "{ip}", port_value: {port} }} }} }}
"#,
        up_ip = upstream.ip(),
        up_port = upstream.port(),
        ip = grpc.ip(),
        port = grpc.port(),
    );
    serde_yaml::from_str(&yaml).unwrap()
}

/// One request through Envoy: its status and what the upstream saw of it
/// (`None`: the upstream never got it).
async fn request(envoy: &Envoy, upstream: &Upstream, n: usize) -> (u16, Option<TokenVerdict>) {
    let path = format!("/scrape-{n}");
    let url = format!("http://{}{path}", envoy.listener);
    let reply = support::curl::run(&["-H", "authorization: Bearer client-sent", &url]).await;
    let seen = upstream
        .received()
        .into_iter()
        .find(|r| r.path == path)
        .map(|r| r.verdict);
    (reply.status, seen)
}

#[tokio::test]
async fn envoy_injects_the_sds_token_refreshes_and_fails_closed() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    api.set_lifetime(Some(LIFETIME));
    let kubeconfig = support::Kubeconfig::of(&api);
    let processor = Processor::start(&kubeconfig.path, &["--prefetch-audience", AUDIENCE]).await;
    let upstream = Upstream::start(api.verifier()).await;
    let envoy = Envoy::start(&envoy_config(&processor.grpc, upstream.addr())).await;
    let mut n = 0;
    // Every request the upstream saw carried a valid token for exactly the
    // audience, never the client's own header.
    let check = |verdict: &TokenVerdict| match verdict {
        TokenVerdict::Valid(claims) => {
            assert_eq!(claims.aud, vec![AUDIENCE.to_owned()]);
            // Never within the last 30 s of its life (generous margin).
            assert!(claims.exp - now_unix() >= 15, "a token near its expiry");
            claims.jti.clone()
        }
        other => panic!("the upstream got {other:?}"),
    };

    // Phase 1: injected, then a refresh is used by a later request; no
    // request fails in between.
    let mut statuses = Vec::new();
    let mut jtis: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while jtis.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh seen: {statuses:?}\n{}",
            envoy.logs()
        );
        n += 1;
        let (status, seen) = request(&envoy, &upstream, n).await;
        if status == 200 {
            let jti = check(&seen.expect("the upstream got it"));
            if jtis.last() != Some(&jti) {
                jtis.push(jti);
            }
        } else {
            // Only before the first token reached Envoy.
            assert!(
                jtis.is_empty(),
                "status {status} after a token was injected"
            );
        }
        statuses.push(status);
        tokio::time::sleep(POLL).await;
    }

    // Phase 2: the API server fails; the token is withdrawn at its usable
    // end and Envoy answers 401 without calling the upstream.
    api.inject(Fault::Status(503), usize::MAX);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut refused = 0;
    while refused < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Envoy never failed closed\n{}",
            envoy.logs()
        );
        n += 1;
        let (status, seen) = request(&envoy, &upstream, n).await;
        match status {
            200 => {
                assert_eq!(refused, 0, "a token again while the API server fails");
                check(&seen.expect("the upstream got it"));
            }
            401 => {
                assert!(seen.is_none(), "a refused request reached the upstream");
                refused += 1;
            }
            other => panic!("status {other}\n{}", envoy.logs()),
        }
        tokio::time::sleep(POLL).await;
    }

    // Phase 3: recovery injects again.
    api.clear_faults();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no token after recovery"
        );
        n += 1;
        let (status, seen) = request(&envoy, &upstream, n).await;
        if status == 200 {
            check(&seen.expect("the upstream got it"));
            break;
        }
        assert_eq!(status, 401);
        tokio::time::sleep(POLL).await;
    }
    // The whole way: no ext_proc filter, no token in the processor's log.
    let logs = processor.logs();
    for token in api.issued_tokens() {
        assert!(!logs.contains(&token), "a token is in the log");
    }
}
