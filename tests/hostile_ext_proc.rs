//! Hostile and malformed ext_proc input against the real processor binary
//! over real gRPC on loopback (RELIABILITY.md, "Hostile input"). Every case
//! is repeated so that a per-message leak would show in the resident size;
//! after each, a normal request on a fresh connection must still get its
//! token and gRPC health must still be SERVING.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::hostile::{RssBound, bearer, still_up, wait_metric};
use support::inproc::connect;
use support::processor::Processor;
use support::reliability::check;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Growth of the resident size allowed over a whole test, far above what
/// the cases need when nothing leaks, far below what a leak of their input
/// (tens of MiB per case) would add.
const RSS_MARGIN_MIB: u64 = 64;

struct Setup {
    api: FakeApiServer,
    proc: Processor,
    _kubeconfig: support::Kubeconfig,
}

async fn setup() -> Setup {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let proc = Processor::start(&kubeconfig.path, &[]).await;
    Setup {
        api,
        proc,
        _kubeconfig: kubeconfig,
    }
}

fn header(key: &str, value: &[u8]) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value: String::new(),
        raw_value: value.to_vec(),
    }
}

/// A `request_headers` message with exactly `headers` (raw bytes).
fn headers(headers: Vec<HeaderValue>) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Phase::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A GET for the raw `path` with `extra` headers.
fn get_raw(path: &[u8], extra: Vec<HeaderValue>) -> ProcessingRequest {
    let mut all = vec![
        header(":method", b"GET"),
        header(":scheme", b"http"),
        header(":authority", b"upstream.test"),
        header(":path", path),
    ];
    all.extend(extra);
    headers(all)
}

/// Sends `messages` on one new stream, closes it and reads every answer.
async fn exchange(
    channel: &Channel,
    messages: Vec<ProcessingRequest>,
) -> Result<Vec<ProcessingResponse>, tonic::Status> {
    let mut client = ExternalProcessorClient::new(channel.clone())
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let mut answers = client
        .process(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(answer) = answers.message().await? {
        all.push(answer);
    }
    Ok(all)
}

/// What the client saw, in words: `token aud=A` (a JWT the API server
/// signed for exactly A), `passed` (no token, no immediate response),
/// `refused N` (Envoy is told to answer N), `status CODE` (stream ended).
fn outcome(api: &FakeApiServer, result: &Result<Vec<ProcessingResponse>, tonic::Status>) -> String {
    let answers = match result {
        Err(status) => return format!("status {:?}", status.code()),
        Ok(answers) => answers,
    };
    let words: Vec<String> = answers
        .iter()
        .map(|answer| match &answer.response {
            Some(Response::ImmediateResponse(i)) => {
                format!("refused {}", i.status.as_ref().map_or(0, |s| s.code))
            }
            Some(Response::RequestHeaders(_)) => match bearer(answer) {
                Some(token) => {
                    let claims = api.verifier().verify_now(&token, None);
                    match claims {
                        Ok(claims) => format!("token aud={}", claims.aud.join(",")),
                        Err(e) => format!("invalid token {e:?}"),
                    }
                }
                None => "passed".to_owned(),
            },
            Some(_) => "other phase".to_owned(),
            None => "empty answer".to_owned(),
        })
        .collect();
    if words.is_empty() {
        "no answer".to_owned()
    } else {
        words.join(" + ")
    }
}

/// The `:path` the answer rewrites to, if any.
fn new_path(result: &Result<Vec<ProcessingResponse>, tonic::Status>) -> Option<Vec<u8>> {
    let answer = result.as_ref().ok()?.first()?;
    let Some(Response::RequestHeaders(h)) = &answer.response else {
        return None;
    };
    h.response
        .as_ref()?
        .header_mutation
        .as_ref()?
        .set_headers
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == ":path")
        .map(|h| h.raw_value.clone())
}

/// Runs `case` (one stream) `times` times and returns what the last run saw;
/// every run must see the same.
async fn repeat(
    s: &Setup,
    times: usize,
    case: impl Fn() -> Vec<ProcessingRequest>,
) -> Result<Vec<ProcessingResponse>, tonic::Status> {
    let channel = connect(&s.proc.grpc).await;
    let first = exchange(&channel, case()).await;
    let want = outcome(&s.api, &first);
    for _ in 1..times {
        let again = exchange(&channel, case()).await;
        assert_eq!(outcome(&s.api, &again), want, "a repeat answered otherwise");
    }
    first
}

/// Checks row `id`: the outcomes of its cases, then whether the processor
/// still serves and its memory stayed within the bound.
async fn verdict(s: &Setup, rss: &RssBound, id: &str, outcomes: &[String]) {
    let observed = format!(
        "{}; {}; {}",
        outcomes.join(", "),
        still_up(&s.proc, &s.api).await,
        rss.verdict(id)
    );
    check(id, &observed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_answered_and_the_server_stays_up() {
    let s = setup().await;
    // Warm up (first token, first connection) before the baseline.
    assert_eq!(still_up(&s.proc, &s.api).await, "up");
    let rss = RssBound::new(s.proc.pid(), RSS_MARGIN_MIB);
    const N: usize = 20;
    let aud = |v: &[u8]| header("x-kubernetes-audience", v);

    // No phase at all, and request_headers without a header map.
    let no_phase = repeat(&s, N, || vec![ProcessingRequest::default()]).await;
    let no_map = repeat(&s, N, || {
        vec![ProcessingRequest {
            request: Some(Phase::RequestHeaders(HttpHeaders::default())),
            ..Default::default()
        }]
    })
    .await;
    verdict(
        &s,
        &rss,
        "ext-no-headers",
        &[outcome(&s.api, &no_phase), outcome(&s.api, &no_map)],
    )
    .await;

    // No :path: the audience header still works, nothing to pass otherwise.
    let no_path_header = repeat(&s, N, || {
        vec![headers(vec![
            header(":method", b"GET"),
            header(":authority", b"upstream.test"),
            aud(b"probe"),
        ])]
    })
    .await;
    let no_path = repeat(&s, N, || {
        vec![headers(vec![
            header(":method", b"GET"),
            header(":authority", b"upstream.test"),
        ])]
    })
    .await;
    verdict(
        &s,
        &rss,
        "ext-no-path",
        &[outcome(&s.api, &no_path_header), outcome(&s.api, &no_path)],
    )
    .await;

    // Non-UTF-8: as the audience (refused), elsewhere in :path (kept).
    let bad_audience = repeat(&s, N, || vec![get_raw(b"/", vec![aud(b"\xff\xfe")])]).await;
    let raw_path: &[u8] = b"/\xff?x=\xc3\x28&kubernetes-audience=probe&y=\xfe";
    let bad_path = repeat(&s, N, || vec![get_raw(raw_path, vec![])]).await;
    let kept = new_path(&bad_path).as_deref() == Some(&b"/\xff?x=\xc3\x28&y=\xfe"[..]);
    verdict(
        &s,
        &rss,
        "ext-non-utf8",
        &[
            outcome(&s.api, &bad_audience),
            outcome(&s.api, &bad_path),
            format!("path {}", if kept { "kept" } else { "changed" }),
        ],
    )
    .await;

    // NUL bytes: in the audience (raw and escaped), and in another value.
    let nul_audience = repeat(&s, N, || vec![get_raw(b"/", vec![aud(b"pro\0be")])]).await;
    let nul_escaped = repeat(&s, N, || {
        vec![get_raw(b"/?kubernetes-audience=pro%00be", vec![])]
    })
    .await;
    let nul_elsewhere = repeat(&s, N, || {
        vec![get_raw(
            b"/\0?kubernetes-audience=probe",
            vec![header("x-other", b"a\0b")],
        )]
    })
    .await;
    verdict(
        &s,
        &rss,
        "ext-nul",
        &[
            outcome(&s.api, &nul_audience),
            outcome(&s.api, &nul_escaped),
            outcome(&s.api, &nul_elsewhere),
        ],
    )
    .await;

    // A 1 MiB header value: another header (token), the audience (refused).
    let mib = vec![b'a'; 1 << 20];
    let big_other = repeat(&s, N, || {
        vec![get_raw(
            b"/?kubernetes-audience=probe",
            vec![header("x-big", &mib)],
        )]
    })
    .await;
    let big_audience = repeat(&s, N, || vec![get_raw(b"/", vec![aud(&mib)])]).await;
    verdict(
        &s,
        &rss,
        "ext-1mib-header",
        &[outcome(&s.api, &big_other), outcome(&s.api, &big_audience)],
    )
    .await;

    // 10,000 query parameters with the audience in the middle: the other
    // 10,000 survive byte for byte and in order.
    let others: Vec<String> = (0..10_000)
        .map(|i| format!("p{i}=%{:02X}{i}", i % 256))
        .collect();
    let (before, after) = others.split_at(5_000);
    let long_path = format!(
        "/q?{}&kubernetes-audience=probe&{}",
        before.join("&"),
        after.join("&")
    );
    let many = repeat(&s, N, || vec![get_raw(long_path.as_bytes(), vec![])]).await;
    let survived = new_path(&many) == Some(format!("/q?{}", others.join("&")).into_bytes());
    verdict(
        &s,
        &rss,
        "ext-10k-params",
        &[
            outcome(&s.api, &many),
            format!("others {}", if survived { "kept" } else { "changed" }),
        ],
    )
    .await;

    // The audience repeated: the same value (one audience), two values.
    let same = repeat(&s, N, || {
        vec![get_raw(
            b"/?kubernetes-audience=probe&kubernetes-audience=%70robe",
            vec![aud(b"probe"), aud(b"probe")],
        )]
    })
    .await;
    let differ = repeat(&s, N, || {
        vec![get_raw(
            b"/?kubernetes-audience=probe&kubernetes-audience=other",
            vec![],
        )]
    })
    .await;
    verdict(
        &s,
        &rss,
        "ext-aud-repeated",
        &[outcome(&s.api, &same), outcome(&s.api, &differ)],
    )
    .await;

    // Percent-encoded value and name: decoded once.
    let encoded = repeat(&s, N, || {
        vec![get_raw(b"/?kubernetes%2Daudience=%70%72obe", vec![])]
    })
    .await;
    // Double-encoded: decoded once only, so `%2570robe` names `%70robe`.
    let double = repeat(&s, N, || {
        vec![get_raw(b"/?kubernetes-audience=%2570robe", vec![])]
    })
    .await;
    verdict(&s, &rss, "ext-aud-encoded", &[outcome(&s.api, &encoded)]).await;
    verdict(&s, &rss, "ext-aud-double", &[outcome(&s.api, &double)]).await;

    // Empty: `=` with nothing, a bare name, an empty header.
    let empty_value = repeat(&s, N, || vec![get_raw(b"/?kubernetes-audience=", vec![])]).await;
    let bare = repeat(&s, N, || vec![get_raw(b"/?kubernetes-audience&x", vec![])]).await;
    let empty_header = repeat(&s, N, || vec![get_raw(b"/", vec![aud(b"")])]).await;
    verdict(
        &s,
        &rss,
        "ext-aud-empty",
        &[
            outcome(&s.api, &empty_value),
            outcome(&s.api, &bare),
            outcome(&s.api, &empty_header),
        ],
    )
    .await;

    // request_headers twice on one stream.
    let twice = repeat(&s, N, || {
        vec![
            get_raw(b"/?kubernetes-audience=probe", vec![]),
            get_raw(b"/?kubernetes-audience=second", vec![]),
        ]
    })
    .await;
    verdict(&s, &rss, "ext-headers-twice", &[outcome(&s.api, &twice)]).await;
}

/// Streams opened and never written, spread over a few HTTP/2 connections.
const IDLE_STREAMS: usize = 10_000;
const IDLE_CONNECTIONS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_streams_are_capped_per_connection() {
    let s = setup().await;
    assert_eq!(still_up(&s.proc, &s.api).await, "up");
    let rss = RssBound::new(s.proc.pid(), RSS_MARGIN_MIB);
    let cap = kube_audience_proxy::MAX_STREAMS_PER_CONNECTION as usize;
    let expected = IDLE_STREAMS.min(cap * IDLE_CONNECTIONS);

    let mut channels = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        channels.push(connect(&s.proc.grpc).await);
    }
    // Each task opens one stream and holds its (never used) sender.
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for i in 0..IDLE_STREAMS {
        let mut client = ExternalProcessorClient::new(channels[i % IDLE_CONNECTIONS].clone());
        let opened_tx = opened_tx.clone();
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<ProcessingRequest>(1);
            let answers = client.process(ReceiverStream::new(rx)).await;
            let _ = opened_tx.send(());
            // Hold the stream open, never writing, until aborted.
            std::future::pending::<()>().await;
            drop((tx, answers));
        }));
    }
    drop(opened_tx);
    // The processor counts the streams it serves; wait until it serves as
    // many as the cap lets through.
    let open = wait_metric(&s.proc, "ext_proc_streams", Duration::from_secs(60), |v| {
        v >= expected as f64
    })
    .await
    .unwrap_or_default() as usize;
    let mut answered = 0;
    while opened_rx.try_recv().is_ok() {
        answered += 1;
    }
    eprintln!("{open} streams open at the processor, {answered} calls answered");
    let capped = if open == IDLE_STREAMS {
        "all 10000 open"
    } else if open <= cap * IDLE_CONNECTIONS {
        "capped per connection"
    } else {
        "over the cap"
    };
    // While they are held open: a normal request still gets its token.
    let up = still_up(&s.proc, &s.api).await;
    let memory = rss.verdict("ext-idle-streams");
    for task in &tasks {
        task.abort();
    }
    drop(channels);
    let left = wait_metric(&s.proc, "ext_proc_streams", Duration::from_secs(30), |v| {
        v == 0.0
    })
    .await;
    let closed = if left == Some(0.0) {
        "all closed"
    } else {
        "streams left open"
    };
    check(
        "ext-idle-streams",
        &format!("{capped}; {up}; {memory}; {closed}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_faster_than_it_reads_is_held_back() {
    let s = setup().await;
    assert_eq!(still_up(&s.proc, &s.api).await, "up");
    let rss = RssBound::new(s.proc.pid(), RSS_MARGIN_MIB);
    // 20,000 messages of about 4 KiB each (80 MiB) on one stream whose
    // answers are never read.
    const OFFERED: usize = 20_000;
    let filler = vec![b'f'; 4096];
    let channel = connect(&s.proc.grpc).await;
    let mut client = ExternalProcessorClient::new(channel);
    let (tx, rx) = mpsc::channel::<ProcessingRequest>(16);
    let answers = client.process(ReceiverStream::new(rx)).await.unwrap();
    let mut sent = 0;
    for _ in 0..OFFERED {
        let message = get_raw(
            b"/?kubernetes-audience=probe",
            vec![header("x-filler", &filler)],
        );
        // Flow control stops the sender once the windows are full; a
        // sender blocked for 2 s is held back.
        match tokio::time::timeout(Duration::from_secs(2), tx.send(message)).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    eprintln!("{sent} of {OFFERED} messages taken before the sender was held back");
    let held = if sent < OFFERED {
        "held back"
    } else {
        "never held back"
    };
    let up = still_up(&s.proc, &s.api).await;
    let memory = rss.verdict("ext-fast-sender");
    drop((tx, answers));
    check("ext-fast-sender", &format!("{held}; {up}; {memory}"));
}
