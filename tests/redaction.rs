//! No token or credential ever appears in the processor's output: run the
//! real binary at the most verbose level, in both log formats, through
//! successful, refused and failing requests, then search its whole output
//! for every token the API server issued and for the proxy's own credential;
//! the same for `/metrics` scraped after those requests, and for the
//! interception CA's private key.

mod support;

use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::Upstream;

async fn exercise(format: &str) {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    // Interception with a CA key file the processor creates, so the test
    // knows the key it must never find in the output or the metrics.
    let dir = tempfile::tempdir().unwrap();
    let ca_key = dir.path().join("ca.key");
    let args = support::intercept_args(
        &dir.path().join("ca.crt"),
        &["localhost"],
        &[
            "--ca-key-file",
            ca_key.to_str().unwrap(),
            "--ca-cert-file",
            dir.path().join("ca.pem").to_str().unwrap(),
            "--log-level",
            "all",
            "--log-format",
            format,
            "--allowed-audience",
            "ok-*",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &args).await;
    let mut config = envoy::shipped_config();
    envoy::point_at_processor(&mut config, &processor.grpc);
    let envoy = Envoy::start(&config).await;
    let proxy = envoy.proxy_url();
    let get = |query: &'static str, extra: Vec<String>| {
        let url = format!("{}/r?{query}", upstream.url());
        let proxy = proxy.clone();
        async move {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            curl::via_proxy(&proxy, &url, &extra).await
        }
    };

    // Every reply the client gets (its status, headers and body), searched
    // for credentials at the end.
    let mut replies = vec![];
    // Success for two audiences, through the query and the header.
    let reply = get("kubernetes-audience=ok-1", vec![]).await;
    assert_eq!(reply.status, 200);
    replies.push(reply);
    let header = vec!["-H".to_owned(), "x-kubernetes-audience: ok-2".to_owned()];
    let reply = get("", header).await;
    assert_eq!(reply.status, 200);
    replies.push(reply);
    // A client that sends its own bearer token alongside.
    let spoof = vec![
        "-H".to_owned(),
        "authorization: Bearer client-secret-value".to_owned(),
    ];
    let reply = get("kubernetes-audience=ok-1", spoof).await;
    assert_eq!(reply.status, 200);
    replies.push(reply);
    // Refusals and API server failures.
    let reply = get("kubernetes-audience=nope", vec![]).await;
    assert_eq!(reply.status, 403);
    replies.push(reply);
    api.inject(Fault::Status(500), 1);
    let reply = get("kubernetes-audience=ok-3", vec![]).await;
    assert_eq!(reply.status, 503);
    replies.push(reply);
    api.inject(
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        1,
    );
    let failed = get("kubernetes-audience=ok-4", vec![]).await;
    assert_eq!(failed.status, 503);

    let metrics = curl::get(&format!("http://{}/metrics", processor.admin)).await;
    assert_eq!(metrics.0, 200);
    assert!(
        metrics
            .1
            .contains("kube_audience_proxy_requests_total{outcome=\"injected\"} 3"),
        "the scrape saw the requests:\n{}",
        metrics.1
    );
    let (status, logs) = processor.terminate().await;
    let key_pem = std::fs::read_to_string(&ca_key).unwrap();
    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!key_lines.is_empty(), "the CA key was written");
    for line in key_lines {
        assert!(!metrics.1.contains(line), "the CA key leaked into /metrics");
        assert!(!logs.contains(line), "the CA key leaked into the log");
    }
    assert!(status.success());
    let issued = api.issued_tokens();
    assert_eq!(issued.len(), 2, "two audiences minted");
    assert!(
        logs.contains("ok-1") && logs.contains("injecting a token"),
        "debug logs were produced:\n{logs}"
    );
    for token in &issued {
        // Any of the three JWT parts would be a leak (the payload and the
        // signature are each unique to the token).
        for part in token.split('.').skip(1) {
            assert!(
                !logs.contains(part),
                "a token part leaked into the {format} log:\n{logs}"
            );
        }
        for reply in replies.iter().chain([&failed]) {
            let shown = format!("{reply:?}");
            for part in token.split('.').skip(1) {
                assert!(!shown.contains(part), "a token reached the client: {shown}");
            }
        }
    }
    for part in issued.iter().flat_map(|t| t.split('.').skip(1)) {
        assert!(
            !metrics.1.contains(part),
            "a token part leaked into /metrics:\n{}",
            metrics.1
        );
    }
    assert!(
        !logs.contains(api.caller_token()) && !metrics.1.contains(api.caller_token()),
        "the proxy's own credential leaked"
    );
    assert!(!metrics.1.contains("client-secret-value"));
    assert!(
        !logs.contains("client-secret-value"),
        "the client's credential leaked"
    );
}

#[tokio::test]
async fn logfmt_logs_hold_no_credentials() {
    exercise("logfmt").await;
}

#[tokio::test]
async fn json_logs_hold_no_credentials() {
    exercise("json").await;
}
