//! `/metrics` end to end: the real processor binary, the real Envoy with the
//! shipped config, real curl, the fake API server and test upstreams (plain
//! HTTP and TLS). A scripted sequence of requests, each with a known
//! decision, then one scrape of the admin listener whose counters must hold
//! exactly the values the sequence implies.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::Upstream;

const P: &str = "kube_audience_proxy_";

/// One scrape: samples by `name{labels}` (as exposed), and the raw text.
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    async fn of(processor: &Processor) -> Scrape {
        let url = format!("http://{}/metrics", processor.admin);
        let reply = curl::run(&["-D", "-", &url]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let (head, text) = reply.body.split_once("\r\n\r\n").expect("headers");
        assert!(
            head.to_ascii_lowercase().contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        let mut samples = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "{series} twice"
            );
        }
        Scrape {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of `series` (without the prefix); panics if absent.
    fn get(&self, series: &str) -> f64 {
        let key = format!("{P}{series}");
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("{key} missing:\n{}", self.text))
    }

    /// The series of the family `name` (without the prefix), by labels.
    fn family(&self, name: &str) -> BTreeMap<String, f64> {
        let start = format!("{P}{name}{{");
        self.samples
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&start)?.trim_end_matches('}'), *v)))
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }
}

/// The `exp` claim of a JWT (the fake API server states the same time as
/// the TokenRequest's `expirationTimestamp`).
fn exp_of(token: &str) -> f64 {
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&json).unwrap();
    claims["exp"].as_f64().unwrap()
}

/// When the PEM certificate in `path` ends, in Unix seconds.
fn not_after(path: &Path) -> f64 {
    let pem = std::fs::read(path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.validity().not_after.timestamp() as f64
}

#[tokio::test]
async fn a_scripted_sequence_gives_exact_counters() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let plain = Upstream::start(api.verifier()).await;
    let tls = Upstream::start_tls(api.verifier(), &["localhost", "127.0.0.1"]).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let args = support::intercept_args(&ca, &["localhost"], &["--allowed-audience", "ok-*"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &args).await;
    let upstream_ca = dir.path().join("upstream-ca.crt");
    tls.write_ca(&upstream_ca);
    let mut config = envoy::shipped_config();
    envoy::point_at_processor(&mut config, &processor.grpc);
    envoy::trust_upstream_ca(&mut config, &upstream_ca);
    let envoy = Envoy::start(&config).await;
    let proxy = envoy.proxy_url();
    let get = |query: &str| {
        let url = format!("{}/r?{query}", plain.url());
        let proxy = proxy.clone();
        async move { curl::via_proxy(&proxy, &url, &[]).await }
    };
    let https = |host: &str, query: &str, extra: Vec<String>| {
        let url = format!("https://{host}:{}/r?{query}", tls.addr().port());
        let proxy = proxy.clone();
        async move {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            curl::via_proxy(&proxy, &url, &extra).await
        }
    };
    let cacert = |path: &Path| vec!["--cacert".to_owned(), path.to_str().unwrap().to_owned()];

    // Before any request: every outcome at 0, nothing cached.
    let before = Scrape::of(&processor).await;
    assert!(before.family("requests_total").values().all(|v| *v == 0.0));
    assert!(before.family("token_expiry_timestamp_seconds").is_empty());

    // 1. Three requests for one audience: one miss, then two hits.
    for _ in 0..3 {
        assert_eq!(get("kubernetes-audience=ok-hit").await.status, 200);
    }
    // 2. A miss for another audience.
    assert_eq!(get("kubernetes-audience=ok-miss").await.status, 200);
    // 3. An audience outside --allowed-audience.
    assert_eq!(get("kubernetes-audience=nope").await.status, 403);
    // 4. No audience: passed through.
    assert_eq!(get("").await.status, 200);
    // 5. The API server fails (503): no token, the client gets 503.
    api.inject(Fault::Status(503), 1);
    assert_eq!(get("kubernetes-audience=ok-fail").await.status, 503);
    // 6. An intercepted CONNECT, then a token inside TLS.
    let reply = https("localhost", "kubernetes-audience=ok-tls", cacert(&ca)).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", envoy.logs());
    // 7. Inside intercepted TLS, a request for another host: 421.
    let mut misdirected = cacert(&ca);
    misdirected.extend(["-H".to_owned(), "host: elsewhere.example".to_owned()]);
    assert_eq!(https("localhost", "", misdirected).await.status, 421);
    // 8. A CONNECT to a host that is not intercepted: tunnelled untouched.
    let reply = https("127.0.0.1", "", cacert(&upstream_ca)).await;
    assert_eq!(reply.status, 200, "{reply:?}");

    // Streams close once Envoy has its answers; wait for the gauge.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let scrape = Scrape::of(&processor).await;
        if scrape.get("ext_proc_streams") == 0.0 {
            break scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ext_proc streams stay open:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let expected_outcomes = [
        ("injected", 5.0),
        ("passthrough", 1.0),
        ("invalid_audience", 0.0),
        ("not_allowed", 1.0),
        ("not_bound", 0.0),
        ("apiserver_audience", 0.0),
        ("local_destination", 0.0),
        ("token_unavailable", 1.0),
        ("fail_open", 0.0),
        ("sni_mismatch", 1.0),
        ("connect_intercepted", 2.0),
        ("connect_tunnelled", 1.0),
    ];
    let outcomes: BTreeMap<String, f64> = expected_outcomes
        .iter()
        .map(|(o, v)| (format!("outcome=\"{o}\""), *v))
        .collect();
    assert_eq!(scrape.family("requests_total"), outcomes, "{}", scrape.text);
    assert_eq!(scrape.get("decision_duration_seconds_count"), 12.0);
    assert_eq!(
        scrape.get("decision_duration_seconds_bucket{le=\"+Inf\"}"),
        12.0
    );

    let results: BTreeMap<String, f64> = [
        ("success", 3.0),
        ("unauthorized", 0.0),
        ("forbidden", 0.0),
        ("not_found", 0.0),
        ("invalid", 0.0),
        ("throttled", 0.0),
        ("server_error", 1.0),
        ("timeout", 0.0),
        ("connect_error", 0.0),
        ("other", 0.0),
    ]
    .iter()
    .map(|(r, v)| (format!("result=\"{r}\""), *v))
    .collect();
    assert_eq!(scrape.family("token_requests_total"), results);
    assert_eq!(api.token_requests(), 4, "the API server saw the same");
    assert_eq!(scrape.get("token_request_duration_seconds_count"), 4.0);

    assert_eq!(scrape.get("token_cache_hits_total"), 2.0);
    assert_eq!(scrape.get("token_cache_misses_total"), 4.0);
    assert_eq!(scrape.get("token_cache_coalesced_total"), 0.0);
    assert_eq!(scrape.get("token_cache_evictions_total"), 0.0);

    // Expiry and refresh time for the cached audiences only (not ok-fail,
    // not the refused one): the expiry is the one the API server stated.
    let issued = api.issued_tokens();
    assert_eq!(issued.len(), 3);
    let expiry = scrape.family("token_expiry_timestamp_seconds");
    let expected: BTreeMap<String, f64> = ["ok-hit", "ok-miss", "ok-tls"]
        .iter()
        .zip(&issued)
        .map(|(aud, token)| (format!("audience=\"{aud}\""), exp_of(token)))
        .collect();
    assert_eq!(expiry, expected);
    let refreshed = scrape.family("token_last_refresh_timestamp_seconds");
    assert_eq!(
        refreshed.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (audience, minted) in &refreshed {
        assert!(
            *minted <= now && *minted > now - 600.0 && *minted < expiry[audience],
            "{audience}: minted at {minted}"
        );
    }

    // Interception: one leaf (localhost), nothing refused, one SDS stream,
    // and the CA's end as written to the CA file.
    assert_eq!(scrape.get("certificates_minted_total"), 1.0);
    assert!(
        scrape
            .family("certificates_refused_total")
            .values()
            .all(|v| *v == 0.0)
    );
    assert_eq!(scrape.get("sds_streams"), 1.0);
    assert_eq!(scrape.get("ca_expiry_timestamp_seconds"), not_after(&ca));

    let build = scrape.family("build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    let (labels, value) = build.iter().next().unwrap();
    assert_eq!(*value, 1.0);
    assert!(
        labels.starts_with(&format!(
            "version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{labels}"
    );

    for token in &issued {
        for part in token.split('.').skip(1) {
            assert!(!scrape.text.contains(part), "a token leaked into /metrics");
        }
    }
}

#[tokio::test]
async fn without_interception_no_certificate_metrics_are_exposed() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let processor = Processor::start(&kubeconfig.path, &[]).await;
    let scrape = Scrape::of(&processor).await;
    for absent in [
        "ca_expiry_timestamp_seconds",
        "certificates_minted",
        "certificates_refused",
        "sds_streams",
    ] {
        assert!(
            !scrape.text.contains(&format!("{P}{absent}")),
            "{absent} exposed without interception:\n{}",
            scrape.text
        );
    }
    assert_eq!(scrape.get("ext_proc_streams"), 0.0);
}
