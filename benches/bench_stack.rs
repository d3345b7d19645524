//! The end-to-end benchmark stack, driven by `benches/e2e.py`: the
//! TokenRequest stand-in (the test API server), a minimal upstream that
//! answers `200 ok` (so that the upstream costs every variant the same), a
//! kubeconfig, and the five Envoy configurations compared in BENCHMARKS.md,
//! all derived from the shipped `envoy/envoy.yaml`:
//!
//! - `forward.yaml`: Envoy forwarding only (the ext_proc filter removed);
//! - `native.yaml`: Envoy adding a static `authorization` header itself;
//! - `processor_tcp.yaml` / `processor_uds.yaml`: the shipped config, the
//!   processor over loopback TCP / a Unix socket;
//! - `floor.yaml`: the shipped config pointed at `floor_server`.
//!
//! Usage: `bench_stack DIR PROXY_PORT PROCESSOR_PORT UDS_PATH FLOOR_PORT`.
//! Every configuration puts Envoy's admin interface on the Unix socket
//! `DIR/envoy-admin.sock`. Prints one JSON line, then runs until stdin closes.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use serde_yaml::Value;
use support::apiserver::{ApiServerOptions, FakeApiServer};

const STATIC_TOKEN_LEN: usize = 1050;

fn with_proxy_port(config: &mut Value, proxy: u16) {
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
        proxy.into();
}

fn outer_hcm(config: &mut Value) -> &mut Value {
    &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
}

fn write(dir: &Path, name: &str, config: &Value) {
    std::fs::write(dir.join(name), serde_yaml::to_string(config).unwrap()).unwrap();
}

async fn upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(&args[1]).to_owned();
    let port = |i: usize| args[i].parse::<u16>().unwrap();
    let (proxy, processor, uds, floor) = (port(2), port(3), args[4].clone(), port(5));
    let fast_processor = port(6);
    std::fs::create_dir_all(&dir).unwrap();

    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    api.write_kubeconfig(&dir.join("kubeconfig"));
    let upstream = upstream().await;

    let shipped = support::envoy::shipped_config();
    let mut tcp = shipped.clone();
    support::envoy::admin_socket(&mut tcp, &dir.join("envoy-admin.sock"));
    support::envoy::point_at_processor(&mut tcp, &format!("127.0.0.1:{processor}"));
    // point_at_processor sets the proxy port to 0; put it back.
    with_proxy_port(&mut tcp, proxy);
    write(&dir, "processor_tcp.yaml", &tcp);

    let mut unix = tcp.clone();
    support::envoy::point_at_processor(&mut unix, &format!("unix:{uds}"));
    with_proxy_port(&mut unix, proxy);
    write(&dir, "processor_uds.yaml", &unix);

    let mut floor_config = tcp.clone();
    support::envoy::point_at_processor(&mut floor_config, &format!("127.0.0.1:{floor}"));
    with_proxy_port(&mut floor_config, proxy);
    write(&dir, "floor.yaml", &floor_config);

    // Experiments (not in the main table; see benches/NOTES.md).
    let mut google = tcp.clone();
    let ext_proc = &mut outer_hcm(&mut google)["http_filters"][0]["typed_config"];
    ext_proc["grpc_service"] = serde_yaml::from_str(&format!(
        "{{google_grpc: {{target_uri: \"127.0.0.1:{processor}\", stat_prefix: kap}}}}"
    ))
    .unwrap();
    write(&dir, "processor_google_grpc.yaml", &google);

    let mut pooled = tcp.clone();
    let clusters = pooled["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    let cluster = clusters
        .iter_mut()
        .find(|c| c["name"] == "kube_audience_proxy")
        .unwrap();
    cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        ["explicit_http_config"]["http2_protocol_options"] =
        serde_yaml::from_str("{max_concurrent_streams: 8}").unwrap();
    write(&dir, "processor_pooled.yaml", &pooled);

    let mut forward = tcp.clone();
    let filters = outer_hcm(&mut forward)["http_filters"]
        .as_sequence_mut()
        .unwrap();
    filters.retain(|f| f["name"] != "envoy.filters.http.ext_proc");
    write(&dir, "forward.yaml", &forward);

    let mut native = forward.clone();
    let token = format!("Bearer {}", "t".repeat(STATIC_TOKEN_LEN));
    let routes = outer_hcm(&mut native)["route_config"]["virtual_hosts"][0]["routes"]
        .as_sequence_mut()
        .unwrap();
    let catch_all = routes.last_mut().unwrap();
    catch_all["request_headers_to_add"] = serde_yaml::from_str(&format!(
        "[{{header: {{key: authorization, value: \"{token}\"}}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}}]"
    ))
    .unwrap();
    write(&dir, "native.yaml", &native);

    // The fast path: what `kube-audience-proxy envoy-config` generates for a
    // processor whose destination rule gives the upstream the audience
    // `bench` (Envoy injects the SDS token itself).
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("kube-audience-proxy");
    let output = std::process::Command::new(&binary)
        .arg("envoy-config")
        .arg("--allow-local-destinations")
        .arg(format!("--audience-rule={upstream}=bench"))
        .arg(format!("--grpc-listen-address=127.0.0.1:{fast_processor}"))
        .arg(format!("--proxy-listen-address=127.0.0.1:{proxy}"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut fast: Value = serde_yaml::from_slice(&output.stdout).unwrap();
    support::envoy::admin_socket(&mut fast, &dir.join("envoy-admin.sock"));
    write(&dir, "fast.yaml", &fast);

    // The test API server's caller credential, for timing TokenRequests
    // directly (a fixture credential, kept out of the output anyway).
    std::fs::write(dir.join("caller-token"), api.caller_token()).unwrap();
    std::fs::write(dir.join("apiserver-ca.crt"), api.ca_pem()).unwrap();
    println!(
        "{{\"upstream\":\"{upstream}\",\"apiserver\":\"{}\"}}",
        api.url()
    );
    // Run until the driver closes stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await;
}
