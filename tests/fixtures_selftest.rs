//! Tests of the test fixtures themselves (fake apiserver, upstream, JWTs),
//! driven by the real curl binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::apiserver::{ApiServerOptions, DEFAULT_AUDIENCE, FakeApiServer, Fault, ISSUER};
use support::jwt::{JwtIssuer, now_unix};
use support::upstream::{TokenVerdict, Upstream};

struct CurlResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// curl's exit code (0 unless the transfer failed).
    exit_code: i32,
    /// curl's stderr (errors, `-v` output).
    stderr: String,
}

impl CurlResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Runs curl (off the async workers) with `-sS -i` and parses the last response.
async fn curl(args: Vec<String>) -> CurlResponse {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10"])
            .args(&args)
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let exit_code = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stdout.is_empty() {
            return CurlResponse {
                status: 0,
                headers: Vec::new(),
                body: stderr.clone(),
                exit_code,
                stderr,
            };
        }
        let (mut head, mut body) = stdout.split_once("\r\n\r\n").unwrap_or((&stdout, ""));
        // Skip interim responses (`100 Continue` for large HTTP/1.1 uploads).
        while head.starts_with("HTTP/")
            && head
                .split_whitespace()
                .nth(1)
                .is_some_and(|s| s.starts_with('1'))
        {
            (head, body) = body.split_once("\r\n\r\n").unwrap_or((body, ""));
        }
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        CurlResponse {
            status,
            headers,
            body: body.to_owned(),
            exit_code,
            stderr,
        }
    })
    .await
    .expect("curl task")
}

struct Client {
    base: String,
    ca: tempfile::NamedTempFile,
    token: String,
}

impl Client {
    fn new(server: &FakeApiServer) -> Client {
        let mut ca = tempfile::NamedTempFile::new().expect("temp CA file");
        ca.write_all(server.ca_pem().as_bytes()).expect("write CA");
        Client {
            base: server.url(),
            ca,
            token: server.caller_token().to_owned(),
        }
    }

    fn token_path(ns: &str, name: &str) -> String {
        format!("/api/v1/namespaces/{ns}/serviceaccounts/{name}/token")
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        extra: &[&str],
    ) -> CurlResponse {
        let mut args: Vec<String> = vec![
            "--cacert".into(),
            self.ca.path().display().to_string(),
            "-X".into(),
            method.into(),
        ];
        if let Some(token) = token {
            args.push("-H".into());
            args.push(format!("Authorization: Bearer {token}"));
        }
        if let Some(body) = body {
            args.push("-H".into());
            args.push("Content-Type: application/json".into());
            args.push("--data-binary".into());
            args.push(body.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("{}{path}", self.base));
        curl(args).await
    }

    async fn token_request(&self, ns: &str, name: &str, body: &Value) -> CurlResponse {
        self.request(
            "POST",
            &Self::token_path(ns, name),
            Some(&self.token),
            Some(&body.to_string()),
            &[],
        )
        .await
    }
}

fn token_request_body(audiences: &[&str], expiration: i64) -> Value {
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audiences,
            "expirationSeconds": expiration,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "app-7d9f", "uid": "0b7c3c6e-1111-4222-8333-444455556666"},
        },
    })
}

fn assert_status(resp: &CurlResponse, code: u16, reason: &str) {
    assert_eq!(resp.status, code, "body: {}", resp.body);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let body = resp.json();
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["status"], "Failure");
    assert_eq!(body["reason"], reason);
    assert_eq!(body["code"], code);
}

#[tokio::test]
async fn apiserver_mints_bound_tokens() {
    let server = FakeApiServer::start(ApiServerOptions::default()).await;
    let client = Client::new(&server);
    let verifier = server.verifier();

    // HTTP/2 over TLS with a Pod-bound request.
    let resp = client
        .request(
            "POST",
            &Client::token_path("demo", "app"),
            Some(server.caller_token()),
            Some(&token_request_body(&["vault"], 1200).to_string()),
            &["--http2"],
        )
        .await;
    assert_eq!(resp.status, 201, "body: {}", resp.body);
    let body = resp.json();
    assert_eq!(body["kind"], "TokenRequest");
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(body["spec"]["audiences"], json!(["vault"]));
    assert_eq!(body["spec"]["expirationSeconds"], 1200);
    let token = body["status"]["token"].as_str().expect("token").to_owned();
    let expiration = body["status"]["expirationTimestamp"].as_str().expect("ts");
    assert_eq!(
        expiration.len(),
        "2026-11-27T10:00:00Z".len(),
        "{expiration}"
    );
    assert!(expiration.ends_with('Z'));

    let claims = verifier
        .verify(&token, Some("vault"), now_unix())
        .expect("token verifies");
    assert_eq!(claims.iss, ISSUER);
    assert_eq!(claims.sub, "system:serviceaccount:demo:app");
    assert_eq!(claims.aud, vec!["vault".to_string()]);
    assert_eq!(claims.exp - claims.iat, 1200);
    assert_eq!(claims.nbf, claims.iat);
    assert_eq!(claims.namespace, "demo");
    assert_eq!(claims.service_account_name, "app");
    assert_eq!(
        claims.service_account_uid,
        support::apiserver::service_account_uid("demo", "app")
    );
    assert_eq!(claims.pod_name.as_deref(), Some("app-7d9f"));
    assert_eq!(
        claims.pod_uid.as_deref(),
        Some("0b7c3c6e-1111-4222-8333-444455556666")
    );
    assert!(verifier.verify(&token, Some("other"), now_unix()).is_err());
    assert!(
        verifier.verify(&token, None, claims.exp).is_err(),
        "expired"
    );

    // HTTP/1.1, no audiences, no binding, no expiration: defaults.
    let resp = client
        .request(
            "POST",
            &Client::token_path("demo", "app"),
            Some(server.caller_token()),
            Some(r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{}}"#),
            &["--http1.1"],
        )
        .await;
    assert_eq!(resp.status, 201, "body: {}", resp.body);
    let token2 = resp.json()["status"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let claims2 = verifier
        .verify_now(&token2, Some(DEFAULT_AUDIENCE))
        .unwrap();
    assert_eq!(claims2.exp - claims2.iat, 3600);
    assert_eq!(claims2.pod_name, None);
    assert_ne!(claims.jti, claims2.jti);

    // Expiration is capped at 48h.
    let resp = client
        .token_request("demo", "app", &token_request_body(&["vault"], 864_000))
        .await;
    assert_eq!(resp.status, 201, "body: {}", resp.body);
    assert_eq!(resp.json()["spec"]["expirationSeconds"], 48 * 3600);

    assert_eq!(server.token_requests(), 3);
    assert_eq!(server.requests_for_audience("vault"), 2);
    assert_eq!(server.requests_for_audience(DEFAULT_AUDIENCE), 1);
    let issued = server.issued_tokens();
    assert_eq!(issued.len(), 3);
    assert_eq!(issued[0], token);
    assert_eq!(
        server.last_request().unwrap()["spec"]["expirationSeconds"],
        864_000
    );
    assert_eq!(server.token_response_statuses(), vec![201, 201, 201]);
}

#[tokio::test]
async fn apiserver_refuses_like_the_real_one() {
    let server = FakeApiServer::start(ApiServerOptions {
        permitted_service_accounts: vec!["app".into(), "ghost".into()],
        ..ApiServerOptions::default()
    })
    .await;
    let client = Client::new(&server);
    let path = Client::token_path("demo", "app");
    let body = token_request_body(&["vault"], 3600).to_string();

    // 401: no credentials, wrong credentials.
    let resp = client.request("POST", &path, None, Some(&body), &[]).await;
    assert_status(&resp, 401, "Unauthorized");
    let resp = client
        .request("POST", &path, Some("nope"), Some(&body), &[])
        .await;
    assert_status(&resp, 401, "Unauthorized");
    assert_eq!(
        server.token_requests(),
        0,
        "unauthenticated requests are not counted"
    );

    // 403: SA not permitted, and another namespace.
    let resp = client
        .token_request("demo", "admin", &token_request_body(&["vault"], 3600))
        .await;
    assert_status(&resp, 403, "Forbidden");
    let status = resp.json();
    assert_eq!(
        status["message"],
        "serviceaccounts \"admin\" is forbidden: User \"system:serviceaccount:demo:kube-audience-proxy\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"demo\""
    );
    assert_eq!(
        status["details"],
        json!({"name": "admin", "kind": "serviceaccounts"})
    );
    let resp = client
        .token_request("other", "app", &token_request_body(&["vault"], 3600))
        .await;
    assert_status(&resp, 403, "Forbidden");

    // 404: permitted but missing.
    let resp = client
        .token_request("demo", "ghost", &token_request_body(&["vault"], 3600))
        .await;
    assert_status(&resp, 404, "NotFound");
    assert_eq!(
        resp.json()["message"],
        "serviceaccounts \"ghost\" not found"
    );

    // 422: too short an expiration; Pod binding without uid.
    let resp = client
        .token_request("demo", "app", &token_request_body(&["vault"], 599))
        .await;
    assert_status(&resp, 422, "Invalid");
    assert_eq!(
        resp.json()["message"],
        "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 minutes"
    );
    let resp = client
        .token_request(
            "demo",
            "app",
            &json!({"spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}}),
        )
        .await;
    assert_status(&resp, 422, "Invalid");

    // 400: malformed JSON and wrong types.
    let resp = client
        .request(
            "POST",
            &path,
            Some(client.token.as_str()),
            Some("{not json"),
            &[],
        )
        .await;
    assert_status(&resp, 400, "BadRequest");
    let resp = client
        .token_request(
            "demo",
            "app",
            &json!({"spec": {"expirationSeconds": "3600"}}),
        )
        .await;
    assert_status(&resp, 400, "BadRequest");

    // 405 and 404 for other methods and paths.
    let resp = client
        .request("GET", &path, Some(client.token.as_str()), None, &[])
        .await;
    assert_status(&resp, 405, "MethodNotAllowed");
    let resp = client
        .request(
            "GET",
            "/api/v1/namespaces/demo/pods",
            Some(client.token.as_str()),
            None,
            &[],
        )
        .await;
    assert_status(&resp, 404, "NotFound");

    // Only authenticated POSTs to the token path are counted.
    assert_eq!(server.token_requests(), 7);
    assert!(server.issued_tokens().is_empty());
    assert_eq!(
        server.token_response_statuses(),
        vec![403, 403, 404, 422, 422, 400, 400]
    );
}

#[tokio::test]
async fn apiserver_fault_injection() {
    let server = FakeApiServer::start(ApiServerOptions::default()).await;
    let client = Client::new(&server);
    let body = token_request_body(&["vault"], 3600);

    server.inject(
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    let resp = client.token_request("demo", "app", &body).await;
    assert_status(&resp, 429, "TooManyRequests");
    assert_eq!(resp.header("retry-after"), Some("7"));
    assert_eq!(resp.json()["details"]["retryAfterSeconds"], 7);
    let resp = client.token_request("demo", "app", &body).await;
    assert_eq!(resp.status, 201, "fault consumed");

    server.inject(Fault::Status(503), 2);
    server.inject(Fault::Status(504), 1);
    for (code, reason) in [
        (503, "ServiceUnavailable"),
        (503, "ServiceUnavailable"),
        (504, "Timeout"),
    ] {
        let resp = client.token_request("demo", "app", &body).await;
        assert_status(&resp, code, reason);
    }
    assert_eq!(client.token_request("demo", "app", &body).await.status, 201);

    server.inject(Fault::Status(500), usize::MAX);
    for _ in 0..2 {
        assert_status(
            &client.token_request("demo", "app", &body).await,
            500,
            "InternalError",
        );
    }
    server.clear_faults();
    assert_eq!(client.token_request("demo", "app", &body).await.status, 201);

    server.inject(Fault::Delay(Duration::from_millis(300)), 1);
    let started = Instant::now();
    assert_eq!(client.token_request("demo", "app", &body).await.status, 201);
    assert!(started.elapsed() >= Duration::from_millis(300));

    server.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(client.token_request("demo", "app", &body).await.status, 201);
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.set_latency(Duration::ZERO);

    server.inject(Fault::Hang, 1);
    let resp = client
        .request(
            "POST",
            &Client::token_path("demo", "app"),
            Some(server.caller_token()),
            Some(&body.to_string()),
            &["--max-time", "0.5"],
        )
        .await;
    assert_eq!(resp.exit_code, 28, "curl timed out: {}", resp.body);
    assert_eq!(client.token_request("demo", "app", &body).await.status, 201);

    assert_eq!(server.token_requests(), 13);
    assert_eq!(server.issued_tokens().len(), 6);
    assert_eq!(server.max_in_flight(), 1);
}

#[tokio::test]
async fn apiserver_writes_a_kubeconfig() {
    let server = FakeApiServer::start(ApiServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(config["kind"].as_str(), Some("Config"));
    assert_eq!(config["current-context"].as_str(), Some("fake"));
    let cluster = &config["clusters"][0]["cluster"];
    assert_eq!(cluster["server"].as_str(), Some(server.url().as_str()));
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cluster["certificate-authority-data"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(ca).unwrap(), server.ca_pem());
    assert_eq!(
        config["users"][0]["user"]["token"].as_str(),
        Some(server.caller_token())
    );
    assert_eq!(
        config["contexts"][0]["context"]["namespace"].as_str(),
        Some("demo")
    );
}

#[tokio::test]
async fn upstream_verifies_tokens() {
    let issuer = JwtIssuer::generate(ISSUER);
    let upstream = Upstream::start(issuer.verifier()).await;
    let now = now_unix();
    let claims = |exp: i64| {
        json!({
            "aud": ["vault"],
            "exp": exp,
            "iat": now,
            "iss": ISSUER,
            "jti": "4f1c2d3e-0000-4000-8000-000000000001",
            "kubernetes.io": {
                "namespace": "demo",
                "serviceaccount": {"name": "app", "uid": "9a3e0c5c-0000-4000-8000-000000000002"},
                "pod": {"name": "app-1", "uid": "9a3e0c5c-0000-4000-8000-000000000003"},
            },
            "nbf": now,
            "sub": "system:serviceaccount:demo:app",
        })
    };
    let good = issuer.sign(&claims(now + 600));
    let expired = issuer.sign(&claims(now - 1));
    let foreign = JwtIssuer::generate(ISSUER).sign(&claims(now + 600));

    let get = |extra: Vec<String>| {
        let mut args = extra;
        args.push(format!("{}/v1/secret?x=1&y=%2F", upstream.url()));
        curl(args)
    };

    // Valid token over h2c, with a body.
    let resp = get(vec![
        "--http2-prior-knowledge".into(),
        "-H".into(),
        format!("Authorization: Bearer {good}"),
        "--data-binary".into(),
        "hello".into(),
    ])
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(!resp.body.contains(&good), "the token must never be echoed");
    let body = resp.json();
    assert_eq!(body["verdict"]["token"], "valid");
    assert_eq!(body["verdict"]["aud"], json!(["vault"]));
    assert_eq!(body["verdict"]["pod"]["name"], "app-1");
    assert_eq!(body["path"], "/v1/secret?x=1&y=%2F");
    let received = upstream.last().unwrap();
    assert_eq!(received.method, "POST");
    assert_eq!(received.version, http::Version::HTTP_2);
    assert_eq!(received.token.as_deref(), Some(good.as_str()));
    assert_eq!(received.header("authorization"), Some("[REDACTED]"));
    assert_eq!(received.body_len, 5);
    assert_eq!(
        received.body_sha256,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert_eq!(
        received.authority.as_deref(),
        Some(&upstream.addr().to_string()[..])
    );
    let TokenVerdict::Valid(c) = &received.verdict else {
        panic!("expected a valid token, got {:?}", received.verdict);
    };
    assert_eq!(c.sub, "system:serviceaccount:demo:app");

    // Missing, garbage, expired, foreign key.
    let resp = get(vec![]).await;
    assert_eq!(resp.json()["verdict"]["token"], "missing");
    assert_eq!(upstream.last().unwrap().verdict, TokenVerdict::Missing);
    for bad in ["garbage", expired.as_str(), foreign.as_str()] {
        let resp = get(vec!["-H".into(), format!("Authorization: Bearer {bad}")]).await;
        assert_eq!(resp.json()["verdict"]["token"], "invalid", "{}", resp.body);
        assert!(matches!(
            upstream.last().unwrap().verdict,
            TokenVerdict::Invalid(_)
        ));
    }

    // /status/NNN.
    let resp = curl(vec![format!("{}/status/503", upstream.url())]).await;
    assert_eq!(resp.status, 503);

    // Plain HTTP: no TLS, no CA.
    let received = upstream.last().unwrap();
    assert!(!received.tls);
    assert_eq!(received.sni, None);
    assert!(upstream.url().starts_with("http://127.0.0.1:"));
    assert_eq!(upstream.ca_pem(), None);
    assert_eq!(upstream.ca_issuer_cn(), None);

    assert_eq!(upstream.count(), 6);
    upstream.clear();
    assert_eq!(upstream.count(), 0);
}

/// The fake apiserver works with the real Kubernetes client library (via a
/// kubeconfig written by the fixture), for successes and `Status` errors.
#[tokio::test]
async fn apiserver_speaks_to_kube_client() {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{Api, PostParams};

    let server = FakeApiServer::start(ApiServerOptions {
        permitted_service_accounts: vec!["app".into(), "ghost".into()],
        ..ApiServerOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(config.default_namespace, "demo");
    // kube retries 429/503/504 itself by default (honouring Retry-After);
    // turn that off to see the raw answers.
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client, "demo");
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": ["vault"], "expirationSeconds": 900},
    }))
    .unwrap();

    let issued = sas
        .create_token_request("app", &PostParams::default(), &request)
        .await
        .unwrap();
    let issued = serde_json::to_value(&issued).unwrap();
    let token = issued["status"]["token"].as_str().unwrap();
    let claims = server.verifier().verify_now(token, Some("vault")).unwrap();
    assert_eq!(claims.exp - claims.iat, 900);

    for (name, code, reason) in [("admin", 403, "Forbidden"), ("ghost", 404, "NotFound")] {
        match sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
        {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, code);
                assert_eq!(status.reason, reason);
            }
            other => panic!("expected a {code} Status, got {other:?}"),
        }
    }

    server.inject(
        Fault::TooManyRequests {
            retry_after_secs: 3,
        },
        1,
    );
    match sas
        .create_token_request("app", &PostParams::default(), &request)
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 429);
            assert_eq!(status.details.map(|d| d.retry_after_seconds), Some(3));
        }
        other => panic!("expected a 429 Status, got {other:?}"),
    }
    assert_eq!(server.token_requests(), 4);
}

/// A JWT for `aud` signed by `issuer`, with the claims of a bound token.
fn upstream_token(issuer: &JwtIssuer, aud: &str) -> String {
    let now = now_unix();
    issuer.sign(&json!({
        "aud": [aud],
        "exp": now + 600,
        "iat": now,
        "iss": ISSUER,
        "jti": "4f1c2d3e-0000-4000-8000-000000000009",
        "kubernetes.io": {
            "namespace": "demo",
            "serviceaccount": {"name": "app", "uid": "9a3e0c5c-0000-4000-8000-000000000002"},
        },
        "nbf": now,
        "sub": "system:serviceaccount:demo:app",
    }))
}

/// The HTTPS upstream serves HTTP/1.1 and HTTP/2 (ALPN) with a certificate
/// for its names from its own CA, and records TLS and SNI.
#[tokio::test]
async fn upstream_serves_https() {
    let issuer = JwtIssuer::generate(ISSUER);
    let upstream = Upstream::start_tls(issuer.verifier(), &["localhost", "127.0.0.1"]).await;
    let port = upstream.addr().port();
    assert_eq!(upstream.url(), format!("https://127.0.0.1:{port}"));
    let ca_pem = upstream.ca_pem().unwrap();
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );
    let cn = upstream.ca_issuer_cn().unwrap();
    assert!(
        cn.starts_with("kube-audience-proxy test upstream CA "),
        "{cn}"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("upstream-ca.pem");
    upstream.write_ca(&ca);
    assert_eq!(std::fs::read_to_string(&ca).unwrap(), ca_pem);
    let ca = ca.display().to_string();
    let token = upstream_token(&issuer, "vault");

    for (host, sni) in [("localhost", Some("localhost")), ("127.0.0.1", None)] {
        for (flag, name, version) in [
            ("--http1.1", "HTTP/1.1", http::Version::HTTP_11),
            ("--http2", "HTTP/2.0", http::Version::HTTP_2),
        ] {
            let url = format!("https://{host}:{port}/v1/secret?x=1");
            let resp = curl(vec![
                "-v".into(),
                "--cacert".into(),
                ca.clone(),
                flag.into(),
                "-H".into(),
                format!("Authorization: Bearer {token}"),
                url.clone(),
            ])
            .await;
            assert_eq!(
                (resp.exit_code, resp.status),
                (0, 200),
                "{url} {flag}: {}",
                resp.stderr
            );
            // curl (OpenSSL) prints the server certificate's issuer with -v.
            assert!(
                resp.stderr.contains(&format!("CN={cn}")),
                "issuer {cn:?} not in: {}",
                resp.stderr
            );
            let body = resp.json();
            assert_eq!(body["verdict"]["token"], "valid", "{}", resp.body);
            assert_eq!(body["version"], name);
            assert_eq!(body["path"], "/v1/secret?x=1");
            let received = upstream.last().unwrap();
            assert!(received.tls, "{url} {flag}");
            assert_eq!(received.sni.as_deref(), sni, "{url} {flag}");
            assert_eq!(received.version, version);
            assert_eq!(received.method, "GET");
            assert_eq!(
                received.authority.as_deref(),
                Some(format!("{host}:{port}").as_str())
            );
            assert_eq!(received.token.as_deref(), Some(token.as_str()));
            assert!(received.verdict.is_valid());
        }
    }
    assert_eq!(upstream.count(), 4);

    // A name outside the SANs, and the CA of another upstream, fail
    // verification (curl exit code 60) without reaching the handler.
    let other = Upstream::start_tls(issuer.verifier(), &["localhost"]).await;
    assert_ne!(other.ca_issuer_cn(), upstream.ca_issuer_cn());
    let other_ca = dir.path().join("other-ca.pem");
    other.write_ca(&other_ca);
    for args in [
        vec![
            "--cacert".to_owned(),
            ca.clone(),
            "--resolve".into(),
            format!("not-in-the-sans.test:{port}:127.0.0.1"),
            format!("https://not-in-the-sans.test:{port}/"),
        ],
        vec![
            "--cacert".to_owned(),
            other_ca.display().to_string(),
            format!("https://localhost:{port}/"),
        ],
        // `other` has no IP SAN.
        vec![
            "--cacert".to_owned(),
            other_ca.display().to_string(),
            other.url(),
        ],
    ] {
        let resp = curl(args.clone()).await;
        assert_eq!(resp.exit_code, 60, "{args:?}: {}", resp.stderr);
    }
    assert_eq!(upstream.count(), 4);
    assert_eq!(other.count(), 0);
    // Without a CA, curl does not trust it either.
    let resp = curl(vec![format!("https://localhost:{port}/")]).await;
    assert_eq!(resp.exit_code, 60, "{}", resp.stderr);
    assert_eq!(upstream.count(), 4);
}

/// A 10 MiB body arrives intact over HTTPS, with HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn upstream_https_receives_large_bodies() {
    use rand::RngCore as _;
    use sha2::{Digest as _, Sha256};

    let issuer = JwtIssuer::generate(ISSUER);
    let upstream = Upstream::start_tls(issuer.verifier(), &["localhost"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    upstream.write_ca(&ca);
    let mut body = vec![0u8; 10 * 1024 * 1024];
    rand::thread_rng().fill_bytes(&mut body);
    let sha256: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = dir.path().join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let token = upstream_token(&issuer, "vault");

    for (flag, version) in [
        ("--http1.1", http::Version::HTTP_11),
        ("--http2", http::Version::HTTP_2),
    ] {
        let resp = curl(vec![
            "--cacert".into(),
            ca.display().to_string(),
            flag.into(),
            "-H".into(),
            format!("Authorization: Bearer {token}"),
            "-H".into(),
            "Content-Type: application/octet-stream".into(),
            "--data-binary".into(),
            format!("@{}", file.display()),
            format!("https://localhost:{}/upload", upstream.addr().port()),
        ])
        .await;
        assert_eq!(
            (resp.exit_code, resp.status),
            (0, 200),
            "{flag}: {}",
            resp.stderr
        );
        let json = resp.json();
        assert_eq!(json["body_len"], body.len());
        assert_eq!(json["body_sha256"], sha256);
        let received = upstream.last().unwrap();
        assert_eq!(received.method, "POST");
        assert_eq!(received.version, version);
        assert!(received.tls);
        assert_eq!(received.sni.as_deref(), Some("localhost"));
        assert_eq!(received.body_len, body.len());
        assert_eq!(received.body_sha256, sha256);
        assert!(received.verdict.is_valid());
    }
    assert_eq!(upstream.count(), 2);
}

#[tokio::test]
async fn apiserver_publishes_its_issuer() {
    let server = FakeApiServer::start(ApiServerOptions {
        issuer: "https://oidc.selftest.example/id/1".into(),
        ..ApiServerOptions::default()
    })
    .await;
    let client = Client::new(&server);
    let path = support::apiserver::DISCOVERY_PATH;
    // Authenticated like every other path.
    let resp = client.request("GET", path, None, None, &[]).await;
    assert_status(&resp, 401, "Unauthorized");
    assert_eq!(
        server.discovery_requests(),
        0,
        "counted after authentication"
    );
    let resp = client
        .request("GET", path, Some(server.caller_token()), None, &[])
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json()["issuer"], "https://oidc.selftest.example/id/1");
    assert_eq!(
        resp.json()["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    // Its tokens carry that issuer.
    let minted = client
        .token_request("demo", "app", &token_request_body(&["a"], 3600))
        .await;
    let token = minted.json()["status"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let claims = server.verifier().verify_now(&token, Some("a")).unwrap();
    assert_eq!(claims.iss, "https://oidc.selftest.example/id/1");
    // Discovery faults are separate from token faults.
    server.inject_discovery(Fault::Status(503), 1);
    let resp = client
        .request("GET", path, Some(server.caller_token()), None, &[])
        .await;
    assert_status(&resp, 503, "ServiceUnavailable");
    let resp = client
        .request("GET", path, Some(server.caller_token()), None, &[])
        .await;
    assert_eq!(resp.status, 200, "fault consumed");
    server
        .wait_for_discovery_requests(3, Duration::from_secs(5))
        .await;
    assert_eq!(server.discovery_requests(), 3);
    assert_eq!(server.token_requests(), 1);
    // The default issuer is kubeadm's.
    let default = FakeApiServer::start(ApiServerOptions::default()).await;
    assert_eq!(default.issuer(), ISSUER);
}
