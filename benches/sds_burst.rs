//! Leaf minting burst against a running processor: how long gRPC answers wait
//! while a burst of new SNIs is minted over SDS.
//!
//! Only a client. Point it at a processor started with interception of
//! `*.example.test` (and `--max-certificates` above `--names`), on its default
//! one-worker runtime; `benches/e2e.py` (part `sds`) starts one per run:
//!
//! ```text
//! kube-audience-proxy ... --intercept-host '*.example.test' --max-certificates 2000 \
//!     --ca-file-destination /tmp/ca.crt --grpc-listen-address 127.0.0.1:18130
//! sds_burst --target 127.0.0.1:18130 [--names 1500] [--batch 20] [--streams 2]
//!     [--idle 1000] [--warmup 200] [--deadline-seconds 60] [--prefix n]
//! ```
//!
//! On threads and runtimes of its own, it runs:
//! - the burst: `--streams` delta SDS streams (`DeltaSecrets`), each
//!   subscribing its share of `--names` distinct names
//!   (`{prefix}{i}.example.test`) `--batch` at a time, the next batch sent
//!   (carrying the last nonce, as Envoy's ACK) once every name of the previous
//!   one is answered, as Envoy's on-demand certificate selector waits;
//! - two probes, each back to back with one call in flight on its own
//!   connection: grpc.health.v1 `Check`, and ext_proc `Process` streams with
//!   one pass-through `request_headers` (no audience), as Envoy opens one per
//!   HTTP request.
//!
//! The probes first run `--warmup` unrecorded calls, then record while idle
//! until each has `--idle` answers, then record during the burst. A call that
//! straddles the start or end of the burst is dropped. It prints one JSON
//! object: the burst (duration, names answered and refused, whether it
//! completed before the deadline) and, per probe kind and phase, answers,
//! errors and p50/p99/max latency in µs. It asserts nothing about time.
//!
//! Everything is bounded: the target must be a loopback address, each call
//! times out after 10 s, and the idle wait and the burst end at
//! `--deadline-seconds`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Answer;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Name;
use serde_json::json;
use support::arg;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(target: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .unwrap()
}

/// Where the run is; the probes record into the phase a call started and
/// ended in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    Burst,
    Done,
}

#[derive(Clone, Copy)]
enum Kind {
    Health,
    ExtProc,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Health => "health",
            Kind::ExtProc => "ext_proc",
        }
    }
}

/// A pass-through `request_headers` message (no audience), with values in
/// `raw_value` as Envoy sends them.
fn pass_through() -> ProcessingRequest {
    support::inproc::request_headers(&[
        (":method", "GET"),
        (":authority", "upstream.test"),
        (":path", "/"),
    ])
}

enum Client {
    Health(HealthClient<Channel>),
    ExtProc(ExternalProcessorClient<Channel>, Box<ProcessingRequest>),
}

impl Client {
    /// One call; true when it was answered as expected (SERVING, or a
    /// `request_headers` answer).
    async fn call(&mut self) -> bool {
        match self {
            Client::Health(health) => {
                let check = health.check(HealthCheckRequest {
                    service: String::new(),
                });
                matches!(
                    tokio::time::timeout(CALL_TIMEOUT, check).await,
                    Ok(Ok(response)) if response.get_ref().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                )
            }
            Client::ExtProc(client, message) => {
                let stream = client.process(tokio_stream::iter([(**message).clone()]));
                let answer = async {
                    let mut responses = stream.await.ok()?.into_inner();
                    responses.message().await.ok()?
                };
                matches!(
                    tokio::time::timeout(CALL_TIMEOUT, answer).await,
                    Ok(Some(response)) if matches!(response.response, Some(Answer::RequestHeaders(_)))
                )
            }
        }
    }
}

#[derive(Default)]
struct Samples {
    idle: Vec<u64>,
    idle_errors: usize,
    burst: Vec<u64>,
    burst_errors: usize,
}

/// Calls back to back until the run is done; says once on `idle_ready` that
/// it has `idle` idle results.
fn probe(
    kind: Kind,
    target: SocketAddr,
    warmup: usize,
    idle: usize,
    mut stage: watch::Receiver<Stage>,
    idle_ready: std_mpsc::Sender<()>,
) -> Samples {
    current_thread().block_on(async move {
        let channel = connect(target).await;
        let mut client = match kind {
            Kind::Health => Client::Health(HealthClient::new(channel)),
            Kind::ExtProc => Client::ExtProc(
                ExternalProcessorClient::new(channel),
                Box::new(pass_through()),
            ),
        };
        for _ in 0..warmup {
            client.call().await;
        }
        let mut samples = Samples::default();
        let mut idle_ready = Some(idle_ready);
        loop {
            let before = *stage.borrow_and_update();
            if before == Stage::Done {
                return samples;
            }
            let start = Instant::now();
            let ok = client.call().await;
            let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            if stage.has_changed().unwrap_or(true) {
                continue; // straddled a change of stage
            }
            let (latencies, errors) = match before {
                Stage::Idle => (&mut samples.idle, &mut samples.idle_errors),
                Stage::Burst => (&mut samples.burst, &mut samples.burst_errors),
                Stage::Done => return samples,
            };
            if ok {
                latencies.push(micros);
            } else {
                *errors += 1;
            }
            if before == Stage::Idle
                && samples.idle.len() + samples.idle_errors >= idle
                && let Some(ready) = idle_ready.take()
            {
                let _ = ready.send(());
            }
        }
    })
}

#[derive(Default)]
struct Subscribed {
    answered: usize,
    refused: usize,
    error: Option<String>,
}

/// One delta stream subscribing `names` `batch` at a time, each batch fully
/// answered before the next is sent, until `deadline`.
async fn subscribe(
    channel: Channel,
    names: Vec<String>,
    batch: usize,
    deadline: tokio::time::Instant,
) -> Subscribed {
    let mut result = Subscribed::default();
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let mut responses = match client.delta_secrets(ReceiverStream::new(rx)).await {
        Ok(responses) => responses.into_inner(),
        Err(status) => {
            result.error = Some(format!("DeltaSecrets: {status}"));
            return result;
        }
    };
    let mut nonce = String::new();
    for chunk in names.chunks(batch) {
        let request = DeltaDiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names_subscribe: chunk.to_vec(),
            response_nonce: std::mem::take(&mut nonce),
            ..Default::default()
        };
        if tx.send(request).await.is_err() {
            result.error = Some("the request stream closed".to_owned());
            return result;
        }
        let mut pending: HashSet<&str> = chunk.iter().map(String::as_str).collect();
        while !pending.is_empty() {
            let response = match tokio::time::timeout_at(deadline, responses.message()).await {
                Ok(Ok(Some(response))) => response,
                Ok(Ok(None)) => {
                    result.error = Some("the server ended the stream".to_owned());
                    return result;
                }
                Ok(Err(status)) => {
                    result.error = Some(format!("DeltaSecrets: {status}"));
                    return result;
                }
                Err(_) => {
                    result.error = Some("deadline reached".to_owned());
                    return result;
                }
            };
            for resource in &response.resources {
                result.answered += usize::from(pending.remove(resource.name.as_str()));
            }
            for name in &response.removed_resources {
                result.refused += usize::from(pending.remove(name.as_str()));
            }
            nonce = response.nonce;
        }
    }
    result
}

fn summary(mut latencies: Vec<u64>, errors: usize) -> serde_json::Value {
    latencies.sort_unstable();
    let pct = |p: f64| {
        let index = ((latencies.len().saturating_sub(1)) as f64 * p).round() as usize;
        latencies.get(index).copied().unwrap_or(0)
    };
    json!({
        "answers": latencies.len(),
        "errors": errors,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "max_us": latencies.last().copied().unwrap_or(0),
    })
}

fn main() {
    let target: SocketAddr = arg("--target", "127.0.0.1:18130").parse().unwrap();
    assert!(
        target.ip().is_loopback(),
        "--target must be a loopback address"
    );
    let names: usize = arg("--names", "1500").parse().unwrap();
    let batch: usize = arg("--batch", "20").parse::<usize>().unwrap().max(1);
    let streams: usize = arg("--streams", "2").parse::<usize>().unwrap().max(1);
    let idle: usize = arg("--idle", "1000").parse().unwrap();
    let warmup: usize = arg("--warmup", "200").parse().unwrap();
    let deadline = Duration::from_secs_f64(arg("--deadline-seconds", "60").parse().unwrap());
    let prefix = arg("--prefix", "n");
    let started = Instant::now();

    let (stage_tx, stage_rx) = watch::channel(Stage::Idle);
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let kinds = [Kind::Health, Kind::ExtProc];
    let probes: Vec<_> = kinds
        .iter()
        .map(|&kind| {
            let stage = stage_rx.clone();
            let ready = ready_tx.clone();
            std::thread::spawn(move || probe(kind, target, warmup, idle, stage, ready))
        })
        .collect();
    drop(ready_tx);

    let runtime = current_thread();
    // The burst's connections are up before it starts, so it times minting.
    let channels: Vec<Channel> = runtime.block_on(async {
        futures_util::future::join_all((0..streams).map(|_| connect(target))).await
    });
    let mut idle_complete = true;
    for _ in &kinds {
        let left = deadline.saturating_sub(started.elapsed());
        idle_complete &= ready_rx.recv_timeout(left).is_ok();
    }

    let all: Vec<String> = (0..names)
        .map(|i| format!("{prefix}{i}.example.test"))
        .collect();
    let per_stream = all.len().div_ceil(streams).max(1);
    let burst_deadline = tokio::time::Instant::now() + deadline;
    stage_tx.send_replace(Stage::Burst);
    let burst_start = Instant::now();
    let results = runtime.block_on(async {
        let tasks: Vec<_> = all
            .chunks(per_stream)
            .zip(channels)
            .map(|(names, channel)| {
                tokio::spawn(subscribe(channel, names.to_vec(), batch, burst_deadline))
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    });
    let burst = burst_start.elapsed();
    stage_tx.send_replace(Stage::Done);

    let mut report = serde_json::Map::new();
    for (kind, probe) in kinds.iter().zip(probes) {
        let samples = probe.join().unwrap();
        report.insert(
            kind.label().to_owned(),
            json!({
                "idle": summary(samples.idle, samples.idle_errors),
                "burst": summary(samples.burst, samples.burst_errors),
            }),
        );
    }
    let answered: usize = results.iter().map(|r| r.answered).sum();
    let refused: usize = results.iter().map(|r| r.refused).sum();
    let errors: Vec<&str> = results.iter().filter_map(|r| r.error.as_deref()).collect();
    println!(
        "{}",
        json!({
            "target": target.to_string(),
            "names": names,
            "batch": batch,
            "streams": streams,
            "idle_complete": idle_complete,
            "burst_ms": burst.as_secs_f64() * 1000.0,
            "mints_per_s": answered as f64 / burst.as_secs_f64(),
            "answered": answered,
            "refused": refused,
            "complete": answered + refused == names && errors.is_empty(),
            "errors": errors,
            "probes": report,
        })
    );
}
