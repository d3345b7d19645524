//! Envoy restarted (stopped, and a new Envoy started on the same config)
//! while the processor keeps running: the SDS and ext_proc streams are
//! re-established, the intercepted TLS certificates come from the same CA,
//! and the cached token is used again, all without a processor restart.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::reliability;
use support::upstream::Upstream;

const DEADLINE: Duration = Duration::from_secs(20);

/// The leaf certificate (PEM) Envoy presents for `localhost` through a
/// CONNECT to `connect` on the proxy `proxy`, and whether openssl verified
/// it against `ca` for `localhost`.
async fn leaf(proxy: &str, connect: &str, ca: &Path) -> (bool, String) {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("openssl")
            .args(["s_client", "-verify_return_error", "-showcerts"])
            .args([
                "-proxy",
                proxy,
                "-connect",
                connect,
                "-servername",
                "localhost",
            ])
            .arg("-CAfile")
            .arg(ca)
            .args(["-verify_hostname", "localhost"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("openssl s_client ends")
    .expect("openssl is installed");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let verified = output.status.success() && text.contains("Verify return code: 0 (ok)");
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap_or_else(|| {
        panic!(
            "no certificate: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let end = text[start..].find("-----END CERTIFICATE-----").unwrap() + start + 25;
    (verified, text[start..end].to_owned())
}

/// `same CA` when `leaf` names the CA of `ca_pem` as its issuer and carries
/// its signature, else what differs.
fn issued_by(leaf: &str, ca_pem: &str) -> &'static str {
    let (_, leaf) = x509_parser::pem::parse_x509_pem(leaf.as_bytes()).unwrap();
    let leaf = leaf.parse_x509().unwrap();
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
    let ca = ca.parse_x509().unwrap();
    if leaf.issuer() != ca.subject() {
        "another issuer"
    } else if leaf.verify_signature(Some(ca.public_key())).is_err() {
        "the CA's name but not its signature"
    } else {
        "the same CA"
    }
}

/// A gauge of the processor's `/metrics`.
async fn gauge(processor: &Processor, name: &str) -> u64 {
    let (status, body) = curl::get(&format!("http://{}/metrics", processor.admin)).await;
    assert_eq!(status, 200);
    let prefix = format!("kube_audience_proxy_{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}in /metrics:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits until `check(gauge)` holds (polled, bounded); returns the value.
async fn wait_for_gauge(processor: &Processor, name: &str, check: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let value = gauge(processor, name).await;
        if check(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stuck at {value}\n{}",
            processor.logs()
        );
        // Polls /metrics under the deadline.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request inside intercepted TLS and one plain request through `envoy`:
/// their statuses, and whether the upstreams verified a token for `A`.
async fn requests(envoy: &Envoy, tls: &Upstream, plain: &Upstream, ca: &Path) -> String {
    let mut seen = vec![];
    for (upstream, scheme) in [(tls, "https"), (plain, "http")] {
        upstream.clear();
        let url = format!(
            "{scheme}://localhost:{}/?kubernetes-audience=A",
            upstream.addr().port()
        );
        let reply = curl::via_proxy(
            &envoy.proxy_url(),
            &url,
            &["--cacert", ca.to_str().unwrap()],
        )
        .await;
        let token = match upstream.last() {
            Some(got) if got.verdict.audiences() == ["A"] => "with token",
            _ => "without token",
        };
        seen.push(format!("{scheme} {} {token}", reply.status));
    }
    seen.join(", ")
}

#[tokio::test]
async fn an_envoy_restart_reopens_the_streams_and_gets_leaves_from_the_same_ca() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let tls = Upstream::start_tls(api.verifier(), &["localhost"]).await;
    let plain = Upstream::start_on(api.verifier(), "127.0.0.1:0").await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let args = support::intercept_args(&ca, &["localhost"], &["--log-level", "info"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &args).await;
    let pid = processor.pid();
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let upstream_ca = dir.path().join("upstream-ca.crt");
    tls.write_ca(&upstream_ca);
    let mut config = envoy::shipped_config();
    envoy::point_at_processor(&mut config, &processor.grpc);
    envoy::trust_upstream_ca(&mut config, &upstream_ca);
    let connect = format!("localhost:{}", tls.addr().port());

    let first = Envoy::start(&config).await;
    let before = requests(&first, &tls, &plain, &ca).await;
    let (verified, leaf_before) = leaf(&first.listener.to_string(), &connect, &ca).await;
    assert!(verified, "{leaf_before}");
    let sds_before = wait_for_gauge(&processor, "sds_streams", |n| n > 0).await;

    // Envoy goes away (killed): the processor sees its streams end.
    drop(first);
    let sds_gone = wait_for_gauge(&processor, "sds_streams", |n| n == 0).await;
    let ext_proc_gone = wait_for_gauge(&processor, "ext_proc_streams", |n| n == 0).await;

    let second = Envoy::start(&config).await;
    let after = requests(&second, &tls, &plain, &ca).await;
    let (verified_after, leaf_after) = leaf(&second.listener.to_string(), &connect, &ca).await;
    let sds_after = wait_for_gauge(&processor, "sds_streams", |n| n > 0).await;
    let answered = second
        .stat("http.forward_proxy.ext_proc.stream_msgs_received")
        .await
        .unwrap_or(0);
    assert_eq!(
        std::fs::read_to_string(&ca).unwrap(),
        ca_pem,
        "the CA file is untouched"
    );
    assert_eq!(processor.pid(), pid);
    println!(
        "SDS streams before {sds_before}, after {sds_after}; new Envoy's ext_proc answers {answered}; \
         leaf changed: {}",
        leaf_before != leaf_after
    );
    let observed = format!(
        "before: {before}, leaf from {}; Envoy gone: {sds_gone} SDS and {ext_proc_gone} ext_proc streams; \
         new Envoy: {after}, leaf from {} ({}), SDS {}, ext_proc {}; {} TokenRequest",
        issued_by(&leaf_before, &ca_pem),
        issued_by(&leaf_after, &ca_pem),
        if verified_after {
            "verified"
        } else {
            "NOT verified"
        },
        if sds_after > 0 {
            "re-opened"
        } else {
            "missing"
        },
        if answered > 0 { "answering" } else { "silent" },
        api.token_requests(),
    );
    let (status, logs) = processor.terminate().await;
    assert!(status.success(), "{logs}");
    reliability::check("envoy-restart", &observed);
}
