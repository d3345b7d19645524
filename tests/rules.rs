//! Destination rules (`--audience-rule`) end to end: real curl through the
//! real Envoy running the shipped `envoy/envoy.yaml`, the processor binary,
//! the TokenRequest-compatible API server (which counts TokenRequests) and
//! upstreams that verify the JWT they receive. Every upstream listens on
//! 127.0.0.1; `localhost` resolves to it from `/etc/hosts`, so a second
//! name for the same machine needs no DNS.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::{TokenVerdict, Upstream};

/// The processor (flags after `support::COMMON_ARGS`) and Envoy, in front
/// of upstreams started beforehand.
struct Proxy {
    processor: Processor,
    envoy: Envoy,
    dir: tempfile::TempDir,
    _kubeconfig: support::Kubeconfig,
}

impl Proxy {
    /// Plain HTTP only.
    async fn start(api: &FakeApiServer, args: &[String]) -> Proxy {
        Proxy::start_with(api, args, None).await
    }

    /// `intercept`: the intercepted hosts and the HTTPS upstream whose CA
    /// Envoy trusts.
    async fn start_with(
        api: &FakeApiServer,
        args: &[String],
        intercept: Option<(&[&str], &Upstream)>,
    ) -> Proxy {
        let kubeconfig = support::Kubeconfig::of(api);
        let dir = tempfile::tempdir().unwrap();
        let mut config = envoy::shipped_config();
        let args = match intercept {
            Some((hosts, upstream)) => {
                let upstream_ca = dir.path().join("upstream-ca.crt");
                upstream.write_ca(&upstream_ca);
                envoy::trust_upstream_ca(&mut config, &upstream_ca);
                let extra: Vec<&str> = args.iter().map(String::as_str).collect();
                support::intercept_args(&dir.path().join("ca.crt"), hosts, &extra)
            }
            None => args.to_vec(),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let processor = Processor::start(&kubeconfig.path, &args).await;
        envoy::point_at_processor(&mut config, &processor.grpc);
        let envoy = Envoy::start(&config).await;
        Proxy {
            processor,
            envoy,
            dir,
            _kubeconfig: kubeconfig,
        }
    }

    /// curl through the proxy (trusting the proxy's CA when it intercepts).
    async fn get(&self, url: &str, extra: &[&str]) -> curl::Reply {
        let ca = self.proxy_ca();
        let mut args: Vec<&str> = Vec::new();
        if ca.is_file() {
            args.extend(["--cacert", ca.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        curl::via_proxy(&self.envoy.proxy_url(), url, &args).await
    }

    fn proxy_ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Everything both logged, for failure messages.
    fn logs(&self) -> String {
        format!(
            "processor:\n{}\nenvoy:\n{}",
            self.processor.logs(),
            self.envoy.logs()
        )
    }
}

/// `--audience-rule` flags for `rules`.
fn rule_args(rules: &[String]) -> Vec<String> {
    rules
        .iter()
        .flat_map(|rule| ["--audience-rule".to_owned(), rule.clone()])
        .collect()
}

/// The plain-text refusal of an audience the rules do not bind to `host`.
fn not_bound(audience: &str, host: &str) -> String {
    format!(
        "kube-audience-proxy: the audience {audience:?} may not be sent to {host:?}: no --audience-rule for this destination admits it\n"
    )
}

#[tokio::test]
async fn the_rule_audience_is_injected_for_its_host_and_other_audiences_are_refused() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let port = upstream.addr().port();
    let rules = rule_args(&[format!("127.0.0.1:{port}=node-exporter")]);
    let proxy = Proxy::start(&api, &rules).await;
    let base = upstream.url();

    // A named audience the host's rule does not admit: 403 from Envoy, the
    // upstream never called, no TokenRequest.
    let reply = proxy
        .get(&format!("{base}/x?kubernetes-audience=other&y=1"), &[])
        .await;
    assert_eq!(reply.status, 403, "{reply:?}\n{}", proxy.logs());
    let host = format!("http://127.0.0.1:{port}");
    assert_eq!(reply.body, not_bound("other", &host));
    let reply = proxy
        .get(
            &format!("{base}/x"),
            &["-H", "x-kubernetes-audience: other"],
        )
        .await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.body, not_bound("other", &host));
    assert_eq!(upstream.count(), 0);
    // None for the refused audience (the rule's literal audience is a
    // fast-path one, minted at startup).
    assert_eq!(api.requests_for_audience("other"), 0);

    // No audience named: the rule's audience is injected.
    let reply = proxy.get(&format!("{base}/metrics"), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", proxy.logs());
    let got = upstream.only_received();
    assert_eq!(got.path, "/metrics");
    assert_eq!(got.verdict.audiences(), ["node-exporter"]);
    assert_eq!(
        got.token.as_deref(),
        Some(api.issued_tokens()[0].as_str()),
        "exactly the minted token"
    );

    // The rule's own audience, named by the client, is admitted too.
    upstream.clear();
    let reply = proxy
        .get(&format!("{base}/m?kubernetes-audience=node-exporter"), &[])
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = upstream.only_received();
    assert_eq!(got.path, "/m");
    assert_eq!(got.verdict.audiences(), ["node-exporter"]);
    assert_eq!(api.token_requests(), 1, "the second request used the cache");
}

/// `curl -L` through the proxy to `first`, which redirects to
/// `second_base/collect?kubernetes-audience=AUDIENCE`; the client names
/// AUDIENCE in a header too, which curl re-sends to the second host.
async fn follow_redirect(proxy: &Proxy, first: &Upstream, second_base: &str) -> curl::Reply {
    let target = format!("{second_base}/collect?kubernetes-audience={REDIRECTED_AUDIENCE}");
    let location = utf8_percent_encode(&target, NON_ALPHANUMERIC);
    let url = format!("{}/status/302?location={location}", first.url());
    let header = format!("x-kubernetes-audience: {REDIRECTED_AUDIENCE}");
    proxy.get(&url, &["-L", "-H", &header]).await
}

const REDIRECTED_AUDIENCE: &str = "https://first.example";

#[tokio::test]
async fn a_cross_host_redirect_does_not_deliver_the_token_to_the_second_host() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let first = Upstream::start(api.verifier()).await;
    let second = Upstream::start(api.verifier()).await;
    let (first_port, second_port) = (first.addr().port(), second.addr().port());
    // The second host is another name and another port.
    let second_base = format!("http://localhost:{second_port}");

    // Without rules (the attack): the token for the first host's audience
    // follows the redirect to the second host.
    let open = Proxy::start(&api, &[]).await;
    let reply = follow_redirect(&open, &first, &second_base).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", open.logs());
    assert_eq!(
        first.only_received().verdict.audiences(),
        [REDIRECTED_AUDIENCE]
    );
    assert_eq!(
        second.only_received().verdict.audiences(),
        [REDIRECTED_AUDIENCE],
        "without rules the second host collects the token"
    );
    drop(open);
    first.clear();
    second.clear();
    let minted = api.token_requests();

    // With a rule binding the audience to the first host (`127.0.0.1`, its
    // port): the first hop gets its token, the second is refused before it
    // reaches any host, whether the redirect changes the name and the
    // port, only the name (the very same listener under another name), or
    // only the port. So host and port are each matched.
    let rules = rule_args(&[format!("127.0.0.1:{first_port}={REDIRECTED_AUDIENCE}")]);
    let bound = Proxy::start(&api, &rules).await;
    for (second_base, what) in [
        (second_base, "another name and port"),
        (
            format!("http://localhost:{first_port}"),
            "another name, the same port",
        ),
        (
            format!("http://127.0.0.1:{second_port}"),
            "the same name, another port",
        ),
    ] {
        let reply = follow_redirect(&bound, &first, &second_base).await;
        assert_eq!(reply.status, 403, "{what}: {reply:?}\n{}", bound.logs());
        assert_eq!(
            reply.body,
            not_bound(REDIRECTED_AUDIENCE, &second_base),
            "{what}"
        );
        let received = first.received();
        let [hop] = received.as_slice() else {
            panic!("{what}: the first host got only the first hop: {received:#?}")
        };
        assert!(hop.path.starts_with("/status/302?"), "{what}: {hop:?}");
        assert_eq!(hop.verdict.audiences(), [REDIRECTED_AUDIENCE], "{what}");
        assert_eq!(
            second.count(),
            0,
            "{what}: the second host received nothing"
        );
        first.clear();
    }
    assert_eq!(
        api.token_requests(),
        minted + 1,
        "one TokenRequest, for the first hop (then cached)"
    );
}

#[tokio::test]
async fn host_templates_name_the_destination() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let port = upstream.addr().port();
    let rules = rule_args(&[
        "localhost=https://{host}".to_owned(),
        "127.0.0.0/8=https://{host}/by-ip".to_owned(),
    ]);
    let proxy = Proxy::start(&api, &rules).await;

    let by_name = format!("http://localhost:{port}");
    let reply = proxy.get(&format!("{by_name}/a"), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", proxy.logs());
    assert_eq!(
        upstream.only_received().verdict.audiences(),
        ["https://localhost"]
    );
    upstream.clear();
    let reply = proxy.get(&format!("http://127.0.0.1:{port}/b"), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        upstream.only_received().verdict.audiences(),
        ["https://127.0.0.1/by-ip"]
    );
    upstream.clear();
    // Each host is bound to its own expansion only.
    let reply = proxy
        .get(
            &format!("{by_name}/c"),
            &["-H", "x-kubernetes-audience: https://127.0.0.1/by-ip"],
        )
        .await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.body, not_bound("https://127.0.0.1/by-ip", &by_name));
    assert_eq!(upstream.count(), 0);
    assert_eq!(api.token_requests(), 2);
}

#[tokio::test]
async fn cidr_and_port_decide_which_destination_a_rule_covers() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let covered = Upstream::start(api.verifier()).await;
    let other_port = Upstream::start(api.verifier()).await;
    let rules = rule_args(&[
        format!("127.0.0.0/8:{}=cidr-audience", covered.addr().port()),
        // Neither covers 127.0.0.1.
        "10.0.0.0/8=cidr-audience".to_owned(),
        "::1/128=cidr-audience".to_owned(),
    ]);
    let proxy = Proxy::start(&api, &rules).await;

    let reply = proxy.get(&format!("{}/in", covered.url()), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", proxy.logs());
    assert_eq!(
        covered.only_received().verdict.audiences(),
        ["cidr-audience"]
    );
    // Same address, another port: not covered.
    let reply = proxy
        .get(
            &format!("{}/out?kubernetes-audience=cidr-audience", other_port.url()),
            &[],
        )
        .await;
    assert_eq!(reply.status, 403, "{reply:?}");
    let host = format!("http://127.0.0.1:{}", other_port.addr().port());
    assert_eq!(reply.body, not_bound("cidr-audience", &host));
    assert_eq!(other_port.count(), 0);
    // A request naming no audience to an uncovered destination passes
    // through untouched.
    let reply = proxy.get(&format!("{}/plain", other_port.url()), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(matches!(
        other_port.only_received().verdict,
        TokenVerdict::Missing
    ));
    assert_eq!(api.token_requests(), 1);
}

#[tokio::test]
async fn case_and_trailing_dot_variants_of_a_host_are_the_same_host() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let port = upstream.addr().port();
    // The rule is written with capitals and a trailing dot.
    let rules = rule_args(&[format!("LocalHost.:{port}=case-audience")]);
    let proxy = Proxy::start(&api, &rules).await;
    for (authority, named) in [
        (format!("LOCALHOST:{port}"), None),
        (format!("localhost:{port}"), Some("case-audience")),
        (format!("LocalHost:{port}"), Some("case-audience")),
    ] {
        upstream.clear();
        let header = named.map(|a| format!("x-kubernetes-audience: {a}"));
        let extra: Vec<&str> = header.iter().flat_map(|h| ["-H", h.as_str()]).collect();
        let reply = proxy.get(&format!("http://{authority}/v"), &extra).await;
        assert_eq!(
            reply.status,
            200,
            "{authority}: {reply:?}\n{}",
            proxy.logs()
        );
        let got = upstream.only_received();
        assert_eq!(got.verdict.audiences(), ["case-audience"], "{authority}");
        assert_eq!(
            got.authority.as_deref(),
            Some(authority.as_str()),
            "the upstream saw the authority as the client wrote it"
        );
    }
    // Envoy cannot resolve `localhost.` here without a DNS server (and
    // tests send nothing off the machine): the trailing dot of a request's
    // host is proven at the gRPC level, in
    // `a_request_host_with_a_trailing_dot_matches_over_grpc`.
    assert_eq!(api.token_requests(), 1);
}

#[tokio::test]
async fn a_request_host_with_a_trailing_dot_matches_over_grpc() {
    use support::inproc::{self, InProcess};
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let config = inproc::config(
        &kubeconfig.path,
        &["--audience-rule", "metrics.example:9100=dot-audience"],
    );
    let processor = InProcess::start(config).await;
    let mut client = processor.client().await;
    for authority in ["Metrics.Example.:9100", "metrics.example.:9100"] {
        let message = inproc::request_headers(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", authority),
            (":path", "/metrics"),
        ]);
        let answer = inproc::process_one(&mut client, message, None)
            .await
            .unwrap();
        let bearer = authorization(&answer).unwrap_or_else(|| panic!("{authority}: {answer:?}"));
        let token = bearer.strip_prefix("Bearer ").unwrap();
        let claims = api
            .verifier()
            .verify(token, None, support::jwt::now_unix())
            .unwrap();
        assert_eq!(claims.aud, ["dot-audience"], "{authority}");
    }
    // The same host on another port is another destination.
    let message = inproc::request_headers(&[
        (":method", "GET"),
        (":authority", "metrics.example.:9101"),
        (":path", "/?kubernetes-audience=dot-audience"),
    ]);
    let answer = inproc::process_one(&mut client, message, None)
        .await
        .unwrap();
    assert_eq!(refusal_status(&answer), Some(403), "{answer:?}");
    assert_eq!(api.token_requests(), 1);
    processor.stop().await;
}

/// The status of an immediate response (a refusal), if it is one.
fn refusal_status(
    answer: &envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse,
) -> Option<i32> {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    match &answer.response {
        Some(Response::ImmediateResponse(immediate)) => Some(immediate.status.as_ref()?.code),
        _ => None,
    }
}

/// The `authorization` value a request_headers answer sets, if any.
fn authorization(
    answer: &envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse,
) -> Option<String> {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let Some(Response::RequestHeaders(headers)) = &answer.response else {
        return None;
    };
    let mutation = headers.response.as_ref()?.header_mutation.as_ref()?;
    mutation.set_headers.iter().find_map(|option| {
        let header = option.header.as_ref()?;
        (header.key == "authorization")
            .then(|| String::from_utf8(header.raw_value.clone()).unwrap())
    })
}

#[tokio::test]
async fn an_https_rule_admits_intercepted_requests_and_refuses_plain_http() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let secure = Upstream::start_tls(api.verifier(), &["localhost"]).await;
    let plain = Upstream::start(api.verifier()).await;
    let rules = rule_args(&["https://localhost=tls-audience".to_owned()]);
    let proxy = Proxy::start_with(&api, &rules, Some((&["localhost"], &secure))).await;

    // Inside intercepted TLS: the rule supplies its audience.
    let url = format!("https://localhost:{}/secure", secure.addr().port());
    let reply = proxy.get(&url, &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", proxy.logs());
    let got = secure.only_received();
    assert!(got.tls);
    assert_eq!(got.verdict.audiences(), ["tls-audience"]);

    // The same host over plain HTTP: the audience is refused...
    let plain_base = format!("http://localhost:{}", plain.addr().port());
    let reply = proxy
        .get(
            &format!("{plain_base}/plain?kubernetes-audience=tls-audience"),
            &[],
        )
        .await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.body, not_bound("tls-audience", &plain_base));
    assert_eq!(plain.count(), 0);
    // ...and not supplied either: a request naming none passes untouched.
    let reply = proxy.get(&format!("{plain_base}/untouched"), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(matches!(
        plain.only_received().verdict,
        TokenVerdict::Missing
    ));
    assert_eq!(api.token_requests(), 1);
}

#[tokio::test]
async fn without_rules_one_line_says_any_destination_may_receive_tokens() {
    const WARNING: &str = "no --audience-rule: any destination may receive tokens";
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let open = Processor::start(&kubeconfig.path, &[]).await;
    open.wait_for_log(WARNING, Duration::from_secs(10)).await;
    let ruled = Processor::start(
        &kubeconfig.path,
        &["--audience-rule", "API.example.=https://{host}"],
    )
    .await;
    ruled
        .wait_for_log(
            "rules=\"api.example=https://{host}\"",
            Duration::from_secs(10),
        )
        .await;
    let (_, open_logs) = open.terminate().await;
    let (_, ruled_logs) = ruled.terminate().await;
    assert_eq!(open_logs.matches(WARNING).count(), 1, "{open_logs}");
    assert!(!ruled_logs.contains(WARNING), "{ruled_logs}");
}

#[test]
fn bad_rules_exit_64_with_one_line_each() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_kube-audience-proxy"))
            .env_clear()
            .envs(env.iter().copied())
            .args(["--service-account", "app", "--namespace", "demo"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), stderr)
    };
    let (code, stderr) = run(
        &[
            "--audience-rule",
            "no-audience",
            "--audience-rule",
            "http://plain.example=a",
            "--audience-rule",
            "10.0.0.1/8=a",
            "--audience-rule",
            "ok.example=fine",
        ],
        &[],
    );
    assert_eq!(code, Some(64), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "kube-audience-proxy: --audience-rule \"no-audience\": expected HOST=AUDIENCE (rules are separated by ',' in the environment, so an audience cannot contain one)",
            "kube-audience-proxy: --audience-rule \"http://plain.example=a\": http:// is not a HOST prefix: only https:// is (the rule then covers intercepted TLS only); without a prefix it covers plain HTTP and intercepted TLS",
            "kube-audience-proxy: --audience-rule \"10.0.0.1/8=a\": the CIDR block 10.0.0.1/8 has host bits set; write 10.0.0.0/8",
        ]
    );
    // The environment is read too, comma-separated.
    let (code, stderr) = run(
        &[],
        &[(
            "KUBE_AUDIENCE_PROXY_AUDIENCE_RULES",
            "a.example=x,*.b.example:8443=https://{host},nonsense",
        )],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "kube-audience-proxy: --audience-rule \"nonsense\": expected HOST=AUDIENCE (rules are separated by ',' in the environment, so an audience cannot contain one)"
    );
    // --help documents the flag and its variable.
    let output = Command::new(env!("CARGO_BIN_EXE_kube-audience-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--audience-rule <HOST=AUDIENCE>",
        "[env: KUBE_AUDIENCE_PROXY_AUDIENCE_RULES=]",
        "`https://HOST` covers only requests inside intercepted TLS",
        "{host}",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}
