//! End to end through the real Envoy with the shipped `envoy/envoy.yaml`:
//! real curl -> Envoy (forward proxy, ext_proc) -> the real processor binary
//! -> the TokenRequest-compatible API server over TLS; the upstream verifies
//! the JWT it receives.

mod support;

use serde_yaml::Value;
use support::apiserver::Fault;
use support::curl;
use support::envoy;
use support::stack::Stack;
use support::upstream::TokenVerdict;

#[tokio::test]
async fn query_parameter_audience_reaches_the_upstream_as_a_bound_token() {
    let s = Stack::start(&[]).await;
    let reply = s.get("/path?kubernetes-audience=A&x=1", &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", s.envoy.logs());
    let got = s.upstream.only_received();
    assert_eq!(got.path, "/path?x=1");
    assert_eq!(got.verdict.audiences(), ["A"]);
    let claims = got.verdict.claims().unwrap();
    assert_eq!(claims.sub, "system:serviceaccount:demo:app");
    // The header Envoy forwarded is non-empty and exactly the minted token:
    // the processor wrote it into raw_value, which Envoy reads.
    let issued = s.api.issued_tokens();
    assert_eq!(issued.len(), 1);
    assert_eq!(got.token.as_deref(), Some(issued[0].as_str()));
    // Exact bytes of every other parameter survive, percent-encoding included.
    s.upstream.clear();
    let reply = s
        .get("/p?a=%2F%2f&kubernetes-audience=A&b=x+y&a=&c", &[])
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(s.upstream.only_received().path, "/p?a=%2F%2f&b=x+y&a=&c");
    assert_eq!(
        s.api.token_requests(),
        1,
        "the second request used the cached token"
    );
}

#[tokio::test]
async fn header_audience_is_used_and_removed_and_client_authorization_overwritten() {
    let s = Stack::start(&[]).await;
    let reply = s
        .get(
            "/h",
            &[
                "-H",
                "x-kubernetes-audience: B",
                "-H",
                "authorization: Bearer spoofed-by-client",
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = s.upstream.only_received();
    assert_eq!(got.verdict.audiences(), ["B"]);
    assert_eq!(got.header("x-kubernetes-audience"), None);
    assert_eq!(
        got.header_values("authorization").len(),
        1,
        "one authorization header, ours"
    );
    assert_ne!(got.token.as_deref(), Some("spoofed-by-client"));
}

#[tokio::test]
async fn per_route_metadata_names_the_audience() {
    let s = Stack::start_with(&[], |config| {
        let route: Value = serde_yaml::from_str(
            r#"
match: { prefix: "/kubelet/" }
route: { cluster: dynamic_forward_proxy }
typed_per_filter_config:
  envoy.filters.http.ext_proc:
    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
    overrides:
      grpc_initial_metadata:
      - key: x-kubernetes-audience
        value: https://kubelet.example
"#,
        )
        .unwrap();
        envoy::routes_mut(config).insert(0, route);
    })
    .await;
    let reply = s.get("/kubelet/metrics?x=1", &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", s.envoy.logs());
    let got = s.upstream.only_received();
    assert_eq!(got.verdict.audiences(), ["https://kubelet.example"]);
    assert_eq!(got.path, "/kubelet/metrics?x=1");
    // Other routes are unaffected.
    s.upstream.clear();
    assert_eq!(s.get("/other", &[]).await.status, 200);
    assert!(matches!(
        s.upstream.only_received().verdict,
        TokenVerdict::Missing
    ));
}

#[tokio::test]
async fn no_audience_passes_through_untouched() {
    let s = Stack::start(&[]).await;
    let reply = s
        .get("/plain?x=1", &["-H", "authorization: Basic dXNlcjpwYXNz"])
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = s.upstream.only_received();
    assert_eq!(got.path, "/plain?x=1");
    assert_eq!(got.header_values("authorization").len(), 1);
    assert!(
        matches!(got.verdict, TokenVerdict::Invalid(_)),
        "the client's own Basic credentials pass"
    );
    s.upstream.clear();
    assert_eq!(s.get("/plain", &[]).await.status, 200);
    assert!(matches!(
        s.upstream.only_received().verdict,
        TokenVerdict::Missing
    ));
    assert_eq!(s.api.token_requests(), 0);
}

#[tokio::test]
async fn refused_audiences_never_reach_the_upstream() {
    let s = Stack::start(&["--allowed-audience", "allowed-*"]).await;
    let reply = s.get("/x?kubernetes-audience=forbidden", &[]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.body,
        "kube-audience-proxy: the audience \"forbidden\" is not allowed by this proxy\n"
    );
    let reply = s.get("/x?kubernetes-audience=", &[]).await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("is empty"), "{}", reply.body);
    assert_eq!(s.upstream.count(), 0);
    assert_eq!(s.api.token_requests(), 0);
    assert_eq!(
        s.get("/x?kubernetes-audience=allowed-1", &[]).await.status,
        200
    );
    assert_eq!(
        s.upstream.only_received().verdict.audiences(),
        ["allowed-1"]
    );
}

#[tokio::test]
async fn api_server_failure_is_a_503_at_the_client() {
    let s = Stack::start(&[]).await;
    s.api.inject(Fault::Status(500), usize::MAX);
    let reply = s.get("/x?kubernetes-audience=A", &[]).await;
    assert_eq!(reply.status, 503);
    assert!(
        reply
            .body
            .contains("no token for audience \"A\": the API server failed (HTTP 500)"),
        "{}",
        reply.body
    );
    assert_eq!(s.upstream.count(), 0);
    // Recovery without a restart, once the audience's back-off window (1 s
    // after a first 5xx) is over: a client retrying meanwhile gets 503.
    s.api.clear_faults();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let reply = s.get("/x?kubernetes-audience=A", &[]).await;
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        // The client's retry pace; the window is what is waited on.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(s.upstream.only_received().verdict.audiences(), ["A"]);
    assert_eq!(s.api.requests_for_audience("A"), 2);
}

#[tokio::test]
async fn http2_and_http10_clients() {
    let s = Stack::start(&[]).await;
    // HTTP/1.0 through the proxy (Envoy's accept_http_10).
    let reply = s.get("/old?kubernetes-audience=A", &["--http1.0"]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(s.upstream.only_received().verdict.audiences(), ["A"]);
    s.upstream.clear();
    // A cleartext HTTP/2 client talking to Envoy directly (no absolute URL):
    // the same ext_proc path serves it.
    let url = format!("http://{}/h2?kubernetes-audience=H2", s.envoy.listener);
    let authority = format!("host: {}", s.upstream.addr());
    let reply = curl::run(&["--http2-prior-knowledge", "-H", &authority, &url]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = s.upstream.only_received();
    assert_eq!(got.path, "/h2");
    assert_eq!(got.verdict.audiences(), ["H2"]);
}

#[tokio::test]
async fn processor_down_means_refusal_not_a_tokenless_request() {
    let s = Stack::start(&[]).await;
    let Stack {
        processor,
        envoy,
        upstream,
        ..
    } = s;
    let (status, _) = processor.terminate().await;
    assert!(status.success(), "SIGTERM exits 0: {status}");
    let url = format!("{}/x?kubernetes-audience=A", upstream.url());
    let reply = curl::via_proxy(&envoy.proxy_url(), &url, &[]).await;
    assert_eq!(reply.status, 500, "failure_mode_allow: false");
    assert_eq!(upstream.count(), 0);
}
