//! Hostile SDS clients against the real processor binary over real gRPC on
//! loopback (RELIABILITY.md, "Hostile input"): names that may not be
//! minted, absurd names, 10,000 names at once, streams that never ACK or
//! NACK everything, state-of-the-world streams asking for everything.
//! After each: the processor still injects tokens, still serves a
//! certificate for an intercepted name, health SERVING, memory bounded.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Name;
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::hostile::{RssBound, still_up};
use support::inproc::connect;
use support::processor::Processor;
use support::reliability;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// `--max-certificates` of the processor under test.
const MAX_CERTIFICATES: usize = 64;

/// Growth of the resident size allowed over the whole test.
const RSS_MARGIN_MIB: u64 = 64;

struct Setup {
    api: FakeApiServer,
    proc: Processor,
    _kubeconfig: support::Kubeconfig,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let max = MAX_CERTIFICATES.to_string();
    let args = support::intercept_args(
        &dir.path().join("ca.crt"),
        &["localhost", "*.example.com", "127.0.0.1"],
        &["--max-certificates", &max],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = Processor::start(&kubeconfig.path, &args).await;
    Setup {
        api,
        proc,
        _kubeconfig: kubeconfig,
        _dir: dir,
    }
}

/// One delta stream.
struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(s: &Setup) -> Delta {
        let mut client = SecretDiscoveryServiceClient::new(connect(&s.proc.grpc).await)
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(8);
        let responses = client
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Delta { tx, responses }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    async fn subscribe(&self, names: &[String]) {
        self.send(DeltaDiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names_subscribe: names.to_vec(),
            ..Default::default()
        })
        .await;
    }

    /// The next answer, if one comes within 30 s.
    async fn next(&mut self) -> Option<DeltaDiscoveryResponse> {
        tokio::time::timeout(Duration::from_secs(30), self.responses.message())
            .await
            .ok()?
            .ok()?
    }
}

/// Served / refused / ignored counts of `names` in one answer.
fn tally(names: &[String], answer: Option<&DeltaDiscoveryResponse>) -> (usize, usize, usize) {
    let Some(answer) = answer else {
        return (0, 0, names.len());
    };
    let served = names
        .iter()
        .filter(|n| answer.resources.iter().any(|r| &r.name == *n))
        .count();
    let refused = names
        .iter()
        .filter(|n| answer.removed_resources.contains(n))
        .count();
    (served, refused, names.len() - served - refused)
}

fn words((served, refused, ignored): (usize, usize, usize)) -> String {
    let mut parts = vec![format!("{served} served"), format!("{refused} refused")];
    if ignored > 0 {
        parts.push(format!("{ignored} ignored"));
    }
    parts.join(", ")
}

/// `up` when tokens are still injected (see `still_up`) and a fresh delta
/// stream still gets the certificate of an intercepted name.
async fn serving(s: &Setup, probe: &str) -> &'static str {
    if still_up(&s.proc, &s.api).await != "up" {
        return "down";
    }
    let mut delta = Delta::open(s).await;
    let names = [probe.to_owned()];
    delta.subscribe(&names).await;
    match tally(&names, delta.next().await.as_ref()) {
        (1, 0, 0) => "up",
        other => {
            eprintln!("SDS probe {probe}: {other:?}");
            "down"
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sds_clients_are_refused_and_the_server_stays_up() {
    let s = setup().await;
    assert_eq!(serving(&s, "warmup.example.com").await, "up");
    let rss = RssBound::new(s.proc.pid(), RSS_MARGIN_MIB);

    // Names outside the interception list: refused at once.
    let outside: Vec<String> = ["outside.test", "example.com", "a.example.org", "10.0.0.1"]
        .map(str::to_owned)
        .to_vec();
    let mut delta = Delta::open(&s).await;
    delta.subscribe(&outside).await;
    let outcome = words(tally(&outside, delta.next().await.as_ref()));
    drop(delta);
    reliability::check(
        "sds-outside-list",
        &format!(
            "{outcome}; {}; {}",
            serving(&s, "probe1.example.com").await,
            rss.verdict("sds-outside-list")
        ),
    );

    // Wildcards and absurd names: never minted.
    let absurd: Vec<String> = vec![
        "*".to_owned(),
        "*.example.com".to_owned(),
        "a".repeat(1024),
        format!("{}.example.com", "a".repeat(1012)),
        "bücher.example.com".to_owned(),
        "é.example.com".to_owned(),
        "fe80::1%eth0".to_owned(),
        "[fe80::1%25eth0]".to_owned(),
        "127.0.0.1%lo".to_owned(),
        String::new(),
        "nul\0.example.com".to_owned(),
        "..example.com".to_owned(),
    ];
    let mut delta = Delta::open(&s).await;
    delta.subscribe(&absurd).await;
    let outcome = words(tally(&absurd, delta.next().await.as_ref()));
    drop(delta);
    reliability::check(
        "sds-absurd-names",
        &format!(
            "{outcome}; {}; {}",
            serving(&s, "probe2.example.com").await,
            rss.verdict("sds-absurd-names")
        ),
    );

    // 10,000 distinct intercepted names on one stream, then 10,000 outside
    // the list: at most --max-certificates are held; closing the stream
    // gives the slots back.
    let many: Vec<String> = (0..10_000).map(|i| format!("h{i}.example.com")).collect();
    let mut delta = Delta::open(&s).await;
    delta.subscribe(&many).await;
    let first = words(tally(&many, delta.next().await.as_ref()));
    let strangers: Vec<String> = (0..10_000).map(|i| format!("h{i}.outside.test")).collect();
    delta.subscribe(&strangers).await;
    let second = words(tally(&strangers, delta.next().await.as_ref()));
    drop(delta);
    // The closed stream's slots come back: a new name is served again.
    let freed = poll_served(&s, "after.example.com").await;
    reliability::check(
        "sds-10k-names",
        &format!(
            "{first}, then {second}; {freed}; {}; {}",
            serving(&s, "probe3.example.com").await,
            rss.verdict("sds-10k-names")
        ),
    );

    // A delta stream that never ACKs: every new name is still answered,
    // nothing else is sent.
    let mut delta = Delta::open(&s).await;
    let mut answered = 0;
    for i in 0..50 {
        let names = [format!("noack{i}.example.com")];
        delta.subscribe(&names).await;
        if tally(&names, delta.next().await.as_ref()) == (1, 0, 0) {
            answered += 1;
        }
    }
    let quiet = probe_is_next(&mut delta, "noack-probe.example.com").await;
    drop(delta);
    reliability::check(
        "sds-delta-no-ack",
        &format!(
            "{answered} of 50 answered, {quiet}; {}; {}",
            serving(&s, "probe4.example.com").await,
            rss.verdict("sds-delta-no-ack")
        ),
    );

    // A delta stream that NACKs every answer: no resend.
    let mut delta = Delta::open(&s).await;
    let mut nacked = 0;
    for i in 0..50 {
        let names = [format!("nack{i}.example.com")];
        delta.subscribe(&names).await;
        let Some(answer) = delta.next().await else {
            break;
        };
        delta
            .send(DeltaDiscoveryRequest {
                type_url: Secret::type_url(),
                response_nonce: answer.nonce.clone(),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: "rejected by a hostile client".into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await;
        nacked += 1;
    }
    let quiet = probe_is_next(&mut delta, "nack-probe.example.com").await;
    drop(delta);
    reliability::check(
        "sds-delta-nack-all",
        &format!(
            "{nacked} NACKed, {quiet}; {}; {}",
            serving(&s, "probe5.example.com").await,
            rss.verdict("sds-delta-nack-all")
        ),
    );

    // State of the world subscribing to everything: no names (the legacy
    // wildcard) and `*`.
    let mut client = SecretDiscoveryServiceClient::new(connect(&s.proc.grpc).await);
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut outcomes = Vec::new();
    let mut nonce = String::new();
    for names in [vec![], vec!["*".to_owned()]] {
        tx.send(DiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names: names,
            response_nonce: nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let answer: Option<DiscoveryResponse> =
            tokio::time::timeout(Duration::from_secs(30), responses.message())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
        outcomes.push(match &answer {
            Some(answer) => format!("{} secrets", answer.resources.len()),
            None => "no answer".to_owned(),
        });
        nonce = answer.map(|a| a.nonce).unwrap_or_default();
    }
    drop((tx, responses));
    reliability::check(
        "sds-sotw-everything",
        &format!(
            "{}; {}; {}",
            outcomes.join(", "),
            serving(&s, "probe6.example.com").await,
            rss.verdict("sds-sotw-everything")
        ),
    );
}

/// `nothing else sent` when a probe subscription sent now is answered next
/// (a stream answers in order: anything pending would come first).
async fn probe_is_next(delta: &mut Delta, probe: &str) -> &'static str {
    let names = [probe.to_owned()];
    delta.subscribe(&names).await;
    match delta.next().await {
        Some(answer) if tally(&names, Some(&answer)) == (1, 0, 0) => {
            if answer.resources.len() == 1 && answer.removed_resources.is_empty() {
                "nothing else sent"
            } else {
                "other resources sent"
            }
        }
        other => {
            eprintln!("probe answer: {other:?}");
            "probe not answered next"
        }
    }
}

/// `slots freed` once a new stream gets `name` served (the slots of a
/// closed stream come back when the server notices the close), polled
/// with a deadline.
async fn poll_served(s: &Setup, name: &str) -> &'static str {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let names = [name.to_owned()];
    loop {
        let mut delta = Delta::open(s).await;
        delta.subscribe(&names).await;
        if tally(&names, delta.next().await.as_ref()) == (1, 0, 0) {
            return "slots freed";
        }
        if tokio::time::Instant::now() >= until {
            return "slots still held";
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
