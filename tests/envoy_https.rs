//! HTTPS through the real Envoy with the shipped config: CONNECT, TLS
//! interception with leaf certificates minted on demand over SDS from the
//! processor's CA, token injection inside TLS, untouched tunnels for other
//! hosts, the SNI/authority check and the upstream's certificate check.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::{TokenVerdict, Upstream};

struct Stack {
    api: FakeApiServer,
    upstream: Upstream,
    processor: Processor,
    envoy: Envoy,
    dir: tempfile::TempDir,
    _kubeconfig: support::Kubeconfig,
}

impl Stack {
    /// A TLS upstream with certificate names `upstream_names`, and the
    /// processor intercepting `intercept`.
    async fn start(upstream_names: &[&str], intercept: &[&str]) -> Stack {
        let api = FakeApiServer::start(ApiServerOptions::default()).await;
        let upstream = Upstream::start_tls(api.verifier(), upstream_names).await;
        let kubeconfig = support::Kubeconfig::of(&api);
        let dir = tempfile::tempdir().unwrap();
        let args = support::intercept_args(&dir.path().join("ca.crt"), intercept, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let processor = Processor::start(&kubeconfig.path, &args).await;
        let upstream_ca = dir.path().join("upstream-ca.crt");
        upstream.write_ca(&upstream_ca);
        let mut config = envoy::shipped_config();
        envoy::point_at_processor(&mut config, &processor.grpc);
        envoy::trust_upstream_ca(&mut config, &upstream_ca);
        let envoy = Envoy::start(&config).await;
        Stack {
            api,
            upstream,
            processor,
            envoy,
            dir,
            _kubeconfig: kubeconfig,
        }
    }

    fn proxy_ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn upstream_ca(&self) -> PathBuf {
        self.dir.path().join("upstream-ca.crt")
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.upstream.addr().port())
    }

    /// curl through the proxy, trusting the proxy's CA.
    async fn get(&self, host: &str, path: &str, extra: &[&str]) -> curl::Reply {
        let ca = self.proxy_ca();
        let mut args = vec!["--cacert", ca.to_str().unwrap()];
        args.extend_from_slice(extra);
        curl::via_proxy(&self.envoy.proxy_url(), &self.url(host, path), &args).await
    }
}

#[tokio::test]
async fn intercepted_https_gets_the_token_over_http1_and_http2() {
    let s = Stack::start(&["localhost", "127.0.0.1"], &["localhost", "127.0.0.1"]).await;
    for (flag, name) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        s.upstream.clear();
        let reply = s
            .get("localhost", "/metrics?kubernetes-audience=A&x=1", &[flag])
            .await;
        assert_eq!(
            reply.status,
            200,
            "{name}: {reply:?}\n{}\n{}",
            s.envoy.logs(),
            s.processor.logs()
        );
        let got = s.upstream.only_received();
        assert_eq!(got.path, "/metrics?x=1", "{name}");
        assert_eq!(got.verdict.audiences(), ["A"], "{name}");
        assert!(got.tls);
        assert_eq!(
            got.sni.as_deref(),
            Some("localhost"),
            "Envoy sends the request's host as SNI"
        );
        let issued = s.api.issued_tokens();
        assert_eq!(
            got.token.as_deref(),
            Some(issued[0].as_str()),
            "{name}: raw_value carried the token"
        );
    }
    assert_eq!(s.api.token_requests(), 1);
}

#[tokio::test]
async fn http10_connect_is_accepted() {
    let s = Stack::start(&["localhost"], &["localhost"]).await;
    let ca = s.proxy_ca();
    let reply = curl::run(&[
        "--proxy1.0",
        &s.envoy.listener.to_string(),
        "--cacert",
        ca.to_str().unwrap(),
        &s.url("localhost", "/old?kubernetes-audience=A"),
    ])
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(s.upstream.only_received().verdict.audiences(), ["A"]);
}

#[tokio::test]
async fn a_large_body_arrives_byte_identical() {
    let s = Stack::start(&["localhost"], &["localhost"]).await;
    let body: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = s.dir.path().join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    for flag in ["--http1.1", "--http2"] {
        s.upstream.clear();
        let reply = s
            .get(
                "localhost",
                "/upload?kubernetes-audience=A",
                &[flag, "--data-binary", &data],
            )
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let got = s.upstream.only_received();
        assert_eq!(got.method, "POST");
        assert_eq!(got.body_len, body.len());
        use sha2::Digest;
        assert_eq!(
            got.body_sha256,
            format!("{:x}", sha2::Sha256::digest(&body))
        );
        assert_eq!(got.verdict.audiences(), ["A"]);
    }
}

#[tokio::test]
async fn sni_less_clients_get_the_ip_certificate() {
    let s = Stack::start(&["127.0.0.1"], &["127.0.0.1"]).await;
    let reply = s.get("127.0.0.1", "/ip?kubernetes-audience=B", &[]).await;
    assert_eq!(
        reply.status,
        200,
        "{reply:?}\n{}\n{}",
        s.processor.logs(),
        s.envoy.logs()
    );
    let got = s.upstream.only_received();
    assert_eq!(got.verdict.audiences(), ["B"]);
    assert_eq!(got.path, "/ip");
}

#[tokio::test]
async fn other_hosts_are_tunnelled_untouched() {
    // Only 127.0.0.1 is intercepted; localhost is not.
    let s = Stack::start(&["localhost"], &["127.0.0.1"]).await;
    // The client sees the upstream's own certificate: the proxy's CA does
    // not verify it...
    let reply = s.get("localhost", "/t?kubernetes-audience=A", &[]).await;
    assert_eq!(reply.status, 0, "{reply:?}");
    assert!(
        reply.stderr.contains("(60)"),
        "certificate verification fails: {}",
        reply.stderr
    );
    // ...the upstream's CA does, and the issuer is the upstream's.
    let upstream_ca = s.upstream_ca();
    let url = s.url("localhost", "/t?kubernetes-audience=A");
    let reply = curl::via_proxy(
        &s.envoy.proxy_url(),
        &url,
        &["--cacert", upstream_ca.to_str().unwrap(), "-v", "--http1.1"],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let issuer = s.upstream.ca_issuer_cn().unwrap();
    assert!(
        reply.stderr.contains(&issuer),
        "curl saw issuer {issuer}: {}",
        reply.stderr
    );
    // Bytes untouched: no token, the audience parameter still there.
    let got = s.upstream.received().pop().unwrap();
    assert!(matches!(got.verdict, TokenVerdict::Missing));
    assert_eq!(got.path, "/t?kubernetes-audience=A");
    assert_eq!(s.api.token_requests(), 0);
}

#[tokio::test]
async fn an_upstream_with_a_wrong_certificate_is_refused() {
    // The upstream's certificate names another host.
    let s = Stack::start(&["wrong.example"], &["localhost"]).await;
    let reply = s.get("localhost", "/w?kubernetes-audience=A", &[]).await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(
        s.upstream.count(),
        0,
        "no request (and no token) reached it"
    );
}

#[tokio::test]
async fn a_request_for_another_host_than_the_sni_is_misdirected() {
    let s = Stack::start(&["localhost", "127.0.0.1"], &["localhost", "127.0.0.1"]).await;
    let host = format!("Host: 127.0.0.1:{}", s.upstream.addr().port());
    let reply = s
        .get(
            "localhost",
            "/m?kubernetes-audience=A",
            &["--http1.1", "-H", &host],
        )
        .await;
    assert_eq!(reply.status, 421, "{reply:?}");
    assert!(
        reply
            .body
            .contains("TLS connection was opened for \"localhost\""),
        "{}",
        reply.body
    );
    assert_eq!(s.upstream.count(), 0);
    assert_eq!(s.api.token_requests(), 0);
}

#[tokio::test]
async fn names_outside_the_intercept_list_are_never_signed() {
    // CONNECT to an intercepted host, then a TLS handshake naming another.
    let s = Stack::start(&["localhost"], &["127.0.0.1"]).await;
    let port = s.upstream.addr().port();
    let ca = s.proxy_ca();
    let connect_to = format!("localhost:{port}:127.0.0.1:{port}");
    let reply = curl::via_proxy(
        &s.envoy.proxy_url(),
        &s.url("localhost", "/"),
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "--connect-to",
            &connect_to,
        ],
    )
    .await;
    assert_eq!(reply.status, 0, "the handshake fails: {reply:?}");
    assert_eq!(s.upstream.count(), 0);
    s.processor
        .wait_for_log("refused a certificate", Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn requests_to_the_proxy_itself_are_not_looped() {
    let s = Stack::start(&["localhost"], &["localhost"]).await;
    let url = format!("{}/loop", s.envoy.proxy_url());
    let reply = curl::via_proxy(&s.envoy.proxy_url(), &url, &[]).await;
    assert_eq!(reply.status, 508, "{reply:?}");
}

#[tokio::test]
async fn the_ca_key_stays_in_memory() {
    let s = Stack::start(&["localhost"], &["localhost"]).await;
    assert_eq!(
        s.get("localhost", "/?kubernetes-audience=A", &[])
            .await
            .status,
        200
    );
    let ca = std::fs::read_to_string(s.proxy_ca()).unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----") && !ca.contains("PRIVATE KEY"));
    // No file the processor could have written holds a key.
    for entry in std::fs::read_dir(s.dir.path()).unwrap() {
        let text = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("PRIVATE KEY"));
    }
    let (_, logs) = s.processor.terminate().await;
    assert!(!logs.contains("PRIVATE KEY"), "{logs}");
}
