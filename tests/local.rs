//! Local destinations, end to end (issue 8 item 3): real curl -> the real
//! Envoy with the shipped `envoy/envoy.yaml` -> the processor binary with the
//! shared test flags but WITHOUT `--allow-local-destinations`. Requests to
//! 127.0.0.1, `localhost` and `[::1]`, and CONNECTs to the processor's own
//! port and to Envoy's former admin port, are refused with 403 and a reason
//! naming the destination; nothing is forwarded and no token is minted. With
//! the opt-in the same requests go through.
//!
//! Every address here is loopback. Link-local and metadata addresses are
//! covered by the classifier's unit tests only (`src/local/tests.rs`).

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::Upstream;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Envoy's admin port before it moved to a Unix socket.
const OLD_ENVOY_ADMIN: &str = "127.0.0.1:9901";

/// Connections Envoy opened to plain-HTTP upstreams and CONNECT targets.
const FORWARDED_CONNECTIONS: &str = "cluster.dynamic_forward_proxy.upstream_cx_total";

struct Stack {
    api: FakeApiServer,
    /// On 127.0.0.1.
    upstream: Upstream,
    /// On ::1 (the test fails loudly where there is no IPv6 loopback).
    upstream_v6: Upstream,
    processor: Processor,
    envoy: Envoy,
    _kubeconfig: support::Kubeconfig,
}

impl Stack {
    /// The shared test flags; `allow_local` adds `--allow-local-destinations`.
    async fn start(allow_local: bool) -> Stack {
        let api = FakeApiServer::start(ApiServerOptions::default()).await;
        let upstream = Upstream::start(api.verifier()).await;
        let upstream_v6 = Upstream::start_on(api.verifier(), "[::1]:0").await;
        let kubeconfig = support::Kubeconfig::of(&api);
        let common = if allow_local {
            support::COMMON_ARGS.to_vec()
        } else {
            support::common_args_refusing_local()
        };
        assert_eq!(common.contains(&support::ALLOW_LOCAL), allow_local);
        let processor = Processor::start_with(&kubeconfig.path, &common, &[]).await;
        let mut config = envoy::shipped_config();
        envoy::point_at_processor(&mut config, &processor.grpc);
        let envoy = Envoy::start(&config).await;
        Stack {
            api,
            upstream,
            upstream_v6,
            processor,
            envoy,
            _kubeconfig: kubeconfig,
        }
    }

    /// The plain-HTTP URLs of the upstreams, by every local name, each
    /// naming an audience in its query.
    fn local_urls(&self) -> Vec<(String, &Upstream)> {
        let port = self.upstream.addr().port();
        let port_v6 = self.upstream_v6.addr().port();
        let query = "/metrics?kubernetes-audience=https://local.example";
        vec![
            (format!("http://127.0.0.1:{port}{query}"), &self.upstream),
            (format!("http://localhost:{port}{query}"), &self.upstream),
            (format!("http://[::1]:{port_v6}{query}"), &self.upstream_v6),
        ]
    }

    async fn get(&self, url: &str) -> curl::Reply {
        curl::via_proxy(&self.envoy.proxy_url(), url, &[]).await
    }

    /// `curl -p` (CONNECT, then the request inside the tunnel) to `target`;
    /// `status` is the CONNECT's status (`%{http_connect}`, which replaces
    /// the shared `%{http_code}`: the last `-w` wins).
    async fn connect_with_curl(&self, target: &str) -> curl::Reply {
        let url = format!("http://{target}/");
        curl::via_proxy(
            &self.envoy.proxy_url(),
            &url,
            &["-p", "-w", "\n%{http_connect}"],
        )
        .await
    }

    async fn forwarded_connections(&self) -> u64 {
        self.envoy
            .stat(FORWARDED_CONNECTIONS)
            .await
            .unwrap_or_else(|| panic!("Envoy has no {FORWARDED_CONNECTIONS}"))
    }
}

/// Sends `CONNECT target` to the proxy over a raw TCP connection and reads
/// the answer: status and body (curl does not show a refused CONNECT's body).
async fn connect_raw(proxy: SocketAddr, target: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).await.unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .expect("the proxy answers a CONNECT within 15 s")
}

/// The reason the processor gives for a loopback destination.
fn loopback_reason(authority: &str) -> String {
    format!("kube-audience-proxy: the destination \"{authority}\" is a loopback address")
}

#[tokio::test]
async fn plain_http_to_this_machine_is_refused_before_anything_else() {
    let s = Stack::start(false).await;
    let minted = s.api.token_requests();
    for (url, upstream) in s.local_urls() {
        let reply = s.get(&url).await;
        assert_eq!(reply.status, 403, "{url}: {reply:?}");
        let authority = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
            .map(|(authority, _)| authority)
            .unwrap();
        let kind = if authority.starts_with("localhost") {
            "a name of this machine"
        } else {
            "a loopback address"
        };
        let expected = format!("kube-audience-proxy: the destination \"{authority}\" is {kind}: ");
        assert!(reply.body.starts_with(&expected), "{url}: {}", reply.body);
        assert!(
            reply.body.contains("--allow-local-destinations"),
            "{}",
            reply.body
        );
        assert_eq!(upstream.count(), 0, "{url}: the upstream was called");
    }
    assert_eq!(s.api.token_requests(), minted, "no TokenRequest");
    assert_eq!(
        s.forwarded_connections().await,
        0,
        "Envoy connected nowhere"
    );
    s.processor
        .wait_for_log(
            "refused a request to a local destination",
            Duration::from_secs(5),
        )
        .await;
}

#[tokio::test]
async fn connect_to_the_processor_and_to_envoy_admin_is_refused() {
    let s = Stack::start(false).await;
    let grpc = s.processor.grpc.clone();
    let processor_admin = s.processor.admin.to_string();
    for target in [grpc.as_str(), processor_admin.as_str(), OLD_ENVOY_ADMIN] {
        let reply = s.connect_with_curl(target).await;
        assert_eq!(reply.status, 403, "CONNECT {target}: {reply:?}");
        let (status, body) = connect_raw(s.envoy.listener, target).await;
        assert_eq!(status, 403, "CONNECT {target}: {body}");
        assert!(
            body.starts_with(&loopback_reason(target)),
            "CONNECT {target}: {body}"
        );
        // A plain GET to the same port is refused too.
        let reply = s.get(&format!("http://{target}/stats")).await;
        assert_eq!(reply.status, 403, "GET {target}: {reply:?}");
        assert!(
            reply.body.starts_with(&loopback_reason(target)),
            "{reply:?}"
        );
    }
    // Nothing was tunnelled or forwarded anywhere.
    assert_eq!(s.forwarded_connections().await, 0);
    // Envoy's admin has no TCP address; it answers on its Unix socket only.
    assert_eq!(
        s.envoy.admin_get("/ready").await,
        (200, "LIVE\n".to_owned())
    );
    // The socket is Envoy's user's alone (mode 0600 in the config).
    let mode = std::fs::metadata(&s.envoy.admin)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

#[tokio::test]
async fn with_the_opt_in_the_same_requests_go_through() {
    let s = Stack::start(true).await;
    for (url, upstream) in s.local_urls() {
        let reply = s.get(&url).await;
        assert_eq!(reply.status, 200, "{url}: {reply:?}\n{}", s.envoy.logs());
        let got = upstream.last().expect("the upstream was called");
        assert_eq!(got.verdict.audiences(), ["https://local.example"], "{url}");
    }
    assert_eq!(s.upstream.count(), 2);
    assert_eq!(s.upstream_v6.count(), 1);
    // The CONNECT to the processor's port is tunnelled (what follows inside
    // the tunnel is not gRPC, so curl itself fails after the 200).
    let reply = s.connect_with_curl(&s.processor.grpc).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    s.processor
        .wait_for_log(
            "--allow-local-destinations: requests to this machine",
            Duration::from_secs(5),
        )
        .await;
}

/// The environment fallback turns the opt-in on, and the processor says so
/// in a warning at startup.
#[tokio::test]
async fn the_environment_variable_opts_in_with_a_warning() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let mut child = tokio::process::Command::new(support::processor::binary())
        .env_clear()
        .env("KUBE_AUDIENCE_PROXY_ALLOW_LOCAL_DESTINATIONS", "true")
        .arg("--kubeconfig")
        .arg(&kubeconfig.path)
        .args(support::common_args_refusing_local())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let warning = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("--allow-local-destinations: requests to this machine") {
                return line;
            }
        }
        panic!("the processor exited without the warning");
    })
    .await
    .expect("the warning within 20 s");
    assert!(warning.contains("level=warn"), "{warning}");
    child.kill().await.unwrap();
}
