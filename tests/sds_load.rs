//! A measurement, not a check: how long gRPC answers wait while a burst of
//! new SNIs is minted over SDS, with the processor on its default runtime
//! (one worker thread, `--worker-threads 1`).
//!
//! The server here is the SDS service and grpc.health.v1 on one tonic server
//! over loopback, as `server::run` serves them next to ext_proc: a health
//! check stands for any answer the runtime owes Envoy while it mints. The
//! burst is what Envoy's on-demand certificate selector sends when many new
//! names arrive at once: delta requests subscribing batches of distinct
//! names under `*.example.test`.
//!
//! Ignored by default and it asserts nothing about time (the machines this
//! runs on are noisy); it prints one line of numbers:
//!
//! ```text
//! cargo test --release --test sds_load -- --ignored --nocapture
//! ```
//!
//! `SDS_LOAD_NAMES` (default 1500), `SDS_LOAD_BATCH` (names per delta
//! request, default 20) and `SDS_LOAD_STREAMS` (default 2) change the burst.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use kube_audience_proxy::ca::CertificateAuthority;
use kube_audience_proxy::intercept::InterceptHosts;
use kube_audience_proxy::sds::Sds;
use kube_audience_proxy::sds::certs::Certificates;
use prost::Name;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Serves SDS and health on 127.0.0.1 until `stop` fires.
async fn serve(max_names: usize, stop: oneshot::Receiver<()>) -> SocketAddr {
    let hosts = InterceptHosts::new(["*.example.test"]).unwrap();
    let ca =
        CertificateAuthority::generate(&hosts, Duration::from_secs(86_400 * 30), SystemTime::now())
            .unwrap();
    let certs = Certificates::new(ca, hosts, Duration::from_secs(86_400), max_names);
    let sds = Sds::new(Arc::new(certs));
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(sds.into_service())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            }),
    );
    address
}

async fn channel(address: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap()
}

async fn check(health: &mut HealthClient<Channel>) -> Duration {
    let start = Instant::now();
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    start.elapsed()
}

/// One delta stream subscribing `names` in batches, each answered before the
/// next is sent (as Envoy waits for its on-demand answers).
async fn subscribe_all(address: SocketAddr, names: Vec<String>, batch: usize) {
    let mut client = SecretDiscoveryServiceClient::new(channel(address).await);
    let (tx, rx) = mpsc::channel(4);
    let mut responses = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for chunk in names.chunks(batch) {
        tx.send(DeltaDiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names_subscribe: chunk.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(120), responses.message())
            .await
            .expect("an SDS answer")
            .unwrap()
            .unwrap();
        assert_eq!(answer.resources.len(), chunk.len(), "every name minted");
    }
}

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_micros()
}

fn summary(mut latencies: Vec<Duration>) -> String {
    latencies.sort();
    format!(
        "n={} p50_us={} p99_us={} max_us={}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    )
}

#[test]
#[ignore = "a measurement that prints numbers; run with --ignored --nocapture"]
fn health_latency_during_a_mint_burst() {
    let names = env_or("SDS_LOAD_NAMES", 1500);
    let batch = env_or("SDS_LOAD_BATCH", 20).max(1);
    let streams = env_or("SDS_LOAD_STREAMS", 2).max(1);

    // The processor's runtime, as `main` builds it with the default flags.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (stop, stopped) = oneshot::channel();
    let address = server.block_on(serve(names + 1, stopped));

    // The prober runs on its own thread and runtime, so only the server's
    // runtime is shared with the minting. `bursting` says when the burst
    // starts and ends.
    let (bursting_tx, mut bursting) = watch::channel(false);
    let (idle_done_tx, idle_done_rx) = std::sync::mpsc::channel();
    let prober = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let mut health = HealthClient::new(channel(address).await);
            for _ in 0..50 {
                check(&mut health).await; // warm up
            }
            let mut idle = Vec::new();
            for _ in 0..300 {
                idle.push(check(&mut health).await);
            }
            idle_done_tx.send(()).unwrap();
            bursting.wait_for(|on| *on).await.unwrap();
            let mut during = Vec::new();
            while *bursting.borrow() {
                during.push(check(&mut health).await);
            }
            (idle, during)
        })
    });

    idle_done_rx.recv().unwrap();
    let burst = current_thread().block_on(async move {
        let all: Vec<String> = (0..names).map(|i| format!("n{i}.example.test")).collect();
        let per_stream = all.len().div_ceil(streams);
        let start = Instant::now();
        bursting_tx.send_replace(true);
        let tasks: Vec<_> = all
            .chunks(per_stream)
            .map(|names| tokio::spawn(subscribe_all(address, names.to_vec(), batch)))
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = start.elapsed();
        bursting_tx.send_replace(false);
        elapsed
    });
    let (idle, during) = prober.join().unwrap();
    let _ = stop.send(());
    drop(server);

    println!(
        "sds_load names={names} batch={batch} streams={streams} burst_ms={} mints_per_s={:.0} | idle {} | during burst {}",
        burst.as_millis(),
        names as f64 / burst.as_secs_f64(),
        summary(idle),
        summary(during),
    );
}
