//! Per-request work of the processor on the cache-hit path, without the
//! network: header scan, decision (audience resolution, `:path` rewrite),
//! token lookup and building (and prost-encoding) the answer.
//!
//! `cargo bench --bench hot_path`; results are summarised in BENCHMARKS.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, SystemTime};

use clap::Parser;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use kube_audience_proxy::bench::{Audience, Error, IssuedToken, StreamContext, Token, TokenSource};
use kube_audience_proxy::config::{Cli, Config};
use prost::Message;

/// A source that always returns the same realistic-size token.
struct Static(Token);

impl TokenSource for Static {
    async fn mint(&self, _: &Audience) -> Result<IssuedToken, Error> {
        Ok(IssuedToken {
            token: self.0.clone(),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        })
    }
}

/// Headers like Prometheus sends them through a forward proxy.
fn request(path: &str, extra: &[(&str, &str)]) -> ProcessingRequest {
    let mut headers = vec![
        (":authority", "node-exporter.monitoring.svc:9100"),
        (":path", path),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "Prometheus/3.1.0"),
        (
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        ),
        ("accept-encoding", "gzip"),
        ("x-prometheus-scrape-timeout-seconds", "10"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "0b0f8e4e-7a53-4a86-9d5b-2b9a6a7a3c11"),
    ];
    headers.extend_from_slice(extra);
    support::inproc::request_headers(&headers)
}

fn hot_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A bound token is about 1 KiB.
    let token = Token::new(format!(
        "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9.{}.{}",
        "a".repeat(700),
        "s".repeat(342)
    ))
    .unwrap();
    // The shipped defaults, with an allowlist to check against.
    let cli = Cli::try_parse_from([
        "kube-audience-proxy",
        "--service-account",
        "app",
        "--namespace",
        "demo",
        "--allowed-audience",
        "node-exporter",
        "--allowed-audience",
        "https://*.example.com",
    ])
    .unwrap();
    let config = Config::try_from(cli).unwrap();
    let processor = kube_audience_proxy::bench::processor(&config, Static(token));
    let context = StreamContext::default();
    let by_query = request(
        "/metrics?kubernetes-audience=node-exporter&collect%5B%5D=cpu",
        &[],
    );
    let by_header = request("/metrics", &[("x-kubernetes-audience", "node-exporter")]);
    let none = request("/metrics", &[]);
    // Warm the cache.
    runtime
        .block_on(processor.handle(by_query.clone(), &context))
        .unwrap();

    let mut group = c.benchmark_group("cache hit");
    group.bench_function("query audience: resolve, rewrite path, answer", |b| {
        b.to_async(&runtime).iter_batched(
            || by_query.clone(),
            |m| async { processor.handle(m, &context).await.unwrap() },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("query audience: answer and encode it", |b| {
        b.to_async(&runtime).iter_batched(
            || by_query.clone(),
            |m| async {
                let mut buf = Vec::with_capacity(2048);
                processor
                    .handle(m, &context)
                    .await
                    .unwrap()
                    .encode(&mut buf)
                    .unwrap();
                buf
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("header audience: answer", |b| {
        b.to_async(&runtime).iter_batched(
            || by_header.clone(),
            |m| async { processor.handle(m, &context).await.unwrap() },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("no audience: pass through", |b| {
        b.to_async(&runtime).iter_batched(
            || none.clone(),
            |m| async { processor.handle(m, &context).await.unwrap() },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("decode the request (reference)", |b| {
        let bytes = by_query.encode_to_vec();
        b.iter(|| ProcessingRequest::decode(bytes.as_slice()).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = hot_path
}
criterion_main!(benches);
