//! The local demo stack: the TokenRequest stand-in (the test API server),
//! demo upstreams (HTTP and HTTPS) that verify the JWT they get, the real
//! processor binary, and the real Envoy running `envoy/envoy.yaml` as shipped
//! (proxy on 127.0.0.1:8080, processor on 127.0.0.1:18080; only the trusted
//! upstream CA is changed, to the HTTPS upstream's test CA, and Envoy's admin
//! socket moved to a temporary directory). The processor runs with
//! `--allow-local-destinations`, since every demo upstream is on loopback.
//! It sends a few requests through the proxy with curl and prints what the
//! upstream received.
//!
//! Run it with `scripts/demo` (builds, installs Envoy into .venv if needed).
//! `--wait` keeps the stack up afterwards so you can try curl yourself.

#[path = "../tests/support/mod.rs"]
mod support;

use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::Upstream;

#[tokio::main]
async fn main() {
    let wait = std::env::args().any(|a| a == "--wait");
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let tls_upstream = Upstream::start_tls(api.verifier(), &["localhost"]).await;
    let files = tempfile::tempdir().unwrap();
    let proxy_ca = files.path().join("ca.crt");
    let upstream_ca = files.path().join("upstream-ca.crt");
    tls_upstream.write_ca(&upstream_ca);
    let kubeconfig = support::Kubeconfig::of(&api);
    let processor = Processor::start(
        &kubeconfig.path,
        &[
            "--grpc-listen-address",
            "127.0.0.1:18080",
            "--admin-listen-address",
            "127.0.0.1:18081",
            "--allowed-audience",
            "prometheus",
            "--allowed-audience",
            "https://*.example.com",
            "--intercept-host",
            "localhost",
            // Destination rules: any allowed audience may go to the plain
            // upstream on 127.0.0.1; localhost gets only `prometheus`, and
            // only inside intercepted TLS.
            "--audience-rule",
            "127.0.0.1=*",
            "--audience-rule",
            "https://localhost=prometheus",
            "--ca-file-destination",
            proxy_ca.to_str().unwrap(),
            "--log-level",
            "info",
        ],
    )
    .await;
    // The shipped config, except that intercepted upstreams are verified
    // against the demo upstream's own test CA instead of the system store.
    let mut config = envoy::shipped_config();
    envoy::trust_upstream_ca(&mut config, &upstream_ca);
    let envoy = Envoy::start(&config).await;

    println!("kube-audience-proxy demo");
    println!(
        "  TokenRequest stand-in  {} (namespace demo, ServiceAccount app)",
        api.url()
    );
    println!(
        "  upstream               {} (verifies the bearer JWT)",
        upstream.url()
    );
    println!(
        "  processor              {} (allowed audiences: prometheus, https://*.example.com;\n                          rules: 127.0.0.1=*, https://localhost=prometheus)",
        processor.grpc
    );
    println!(
        "  envoy                  {} (envoy/envoy.yaml as shipped; admin on the Unix socket {})",
        envoy.proxy_url(),
        envoy.admin.display()
    );

    println!(
        "  TLS upstream           https://localhost:{} (same, over TLS; its CA is trusted by Envoy)",
        tls_upstream.addr().port()
    );
    println!(
        "  interception CA        {} (written by the processor, which intercepts localhost)",
        proxy_ca.display()
    );

    let up = upstream.url();
    let requests: Vec<(String, Vec<String>)> = vec![
        (
            format!("{up}/metrics?kubernetes-audience=prometheus&x=1"),
            vec![],
        ),
        (
            format!("{up}/api/data"),
            vec![
                "-H".into(),
                "x-kubernetes-audience: https://api.example.com".into(),
            ],
        ),
        (format!("{up}/public"), vec![]),
        (
            format!("{up}/metrics?kubernetes-audience=kubernetes"),
            vec![],
        ),
        (format!("{up}/metrics?kubernetes-audience="), vec![]),
    ];
    for (url, extra) in &requests {
        show(&envoy, url, extra).await;
    }
    println!("\n# HTTPS through CONNECT, TLS intercepted with a leaf minted by the processor:");
    let ca_arg = proxy_ca.to_str().unwrap().to_owned();
    let tls_url = format!(
        "https://localhost:{}/secure?kubernetes-audience=prometheus",
        tls_upstream.addr().port()
    );
    show(&envoy, &tls_url, &["--cacert".into(), ca_arg]).await;

    println!(
        "\n# an audience the destination rules do not bind to this host (localhost over plain HTTP):"
    );
    show(
        &envoy,
        &format!(
            "http://localhost:{}/metrics?kubernetes-audience=prometheus",
            upstream.addr().port()
        ),
        &[],
    )
    .await;

    println!("\n# the API server fails (injected 500) for a new audience:");
    api.inject(Fault::Status(500), 1);
    show(
        &envoy,
        &format!("{up}/x?kubernetes-audience=https://new.example.com"),
        &[],
    )
    .await;

    println!(
        "\nTokenRequests made: {} (one per audience; repeated requests use the cache)",
        api.token_requests()
    );
    if wait {
        println!(
            "\nThe stack stays up; try:\n  curl -x {} '{up}/anything?kubernetes-audience=prometheus'\nCtrl-C to stop.",
            envoy.proxy_url()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    let (status, _) = processor.terminate().await;
    println!("\nprocessor stopped ({status})");
}

async fn show(envoy: &Envoy, url: &str, extra: &[String]) {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut shown = format!("curl -x {}", envoy.proxy_url());
    for e in &extra {
        if e.contains(' ') {
            shown.push_str(&format!(" '{e}'"));
        } else {
            shown.push_str(&format!(" {e}"));
        }
    }
    println!("\n$ {shown} '{url}'");
    let reply = support::curl::via_proxy(&envoy.proxy_url(), url, &extra).await;
    match serde_json::from_str::<serde_json::Value>(&reply.body) {
        Ok(json) => {
            println!("HTTP {} from the upstream, which received:", reply.status);
            println!("{}", serde_json::to_string_pretty(&json).unwrap());
        }
        Err(_) => println!(
            "HTTP {} from Envoy (the upstream was not called): {}",
            reply.status,
            reply.body.trim_end()
        ),
    }
}
