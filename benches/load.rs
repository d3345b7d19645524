//! Processor-only load: opens Process streams the way Envoy does (one stream
//! per HTTP request, one `request_headers` message, read the answer, close)
//! over one HTTP/2 connection, at a fixed concurrency, for a bounded time.
//! Prints one JSON line: streams, streams/s, p50/p99 latency.
//!
//! `load --target 127.0.0.1:18080|unix:/path --concurrency 32 --seconds 10
//!  [--audiences N]` (N > 1 spreads requests over N audiences, to fill the
//! cache; `--requests M` stops after M streams instead).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use support::arg;

fn request(audience: &str) -> ProcessingRequest {
    let path = format!("/metrics?kubernetes-audience={audience}");
    support::inproc::request_headers(&[
        (":authority", "127.0.0.1:9100"),
        (":path", path.as_str()),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "load/1.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "0b0f8e4e-7a53-4a86-9d5b-2b9a6a7a3c11"),
    ])
}

#[tokio::main]
async fn main() {
    let target = arg("--target", "127.0.0.1:18080");
    let concurrency: usize = arg("--concurrency", "32").parse().unwrap();
    let seconds: f64 = arg("--seconds", "10").parse().unwrap();
    let audiences: usize = arg("--audiences", "1").parse().unwrap();
    let max_requests: usize = arg("--requests", "0").parse().unwrap();
    let client = ExternalProcessorClient::new(support::inproc::connect(&target).await);
    let messages: Vec<ProcessingRequest> = (0..audiences)
        .map(|i| {
            request(&if audiences == 1 {
                "bench".to_owned()
            } else {
                format!("bench-{i}")
            })
        })
        .collect();
    let messages = std::sync::Arc::new(messages);
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = client.clone();
            let messages = messages.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut latencies: Vec<u32> = Vec::new();
                let mut errors = 0usize;
                loop {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if Instant::now() >= deadline || (max_requests > 0 && n >= max_requests) {
                        return (latencies, errors);
                    }
                    let message = messages[n % messages.len()].clone();
                    let start = Instant::now();
                    let ok = match client.process(tokio_stream::iter([message])).await {
                        Ok(response) => {
                            matches!(response.into_inner().message().await, Ok(Some(_)))
                        }
                        Err(_) => false,
                    };
                    if ok {
                        latencies
                            .push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
                    } else {
                        errors += 1;
                    }
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"target\":\"{target}\",\"concurrency\":{concurrency},\"streams\":{},\"errors\":{errors},\"seconds\":{elapsed:.3},\"rate\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
}
