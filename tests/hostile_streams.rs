//! Hostile ext_proc streams against the real processor binary over real
//! gRPC on loopback (RELIABILITY.md, "Hostile input"): 10,000 streams opened
//! and never written, and one stream whose client sends faster than it
//! reads. While they last, a normal request on a fresh connection must
//! still get its token, and the resident size must stay bounded.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use support::hostile::{RSS_MARGIN_MIB, RssBound, get_raw, header, setup, still_up, wait_metric};
use support::inproc::connect;
use support::reliability;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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
    reliability::check(
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
    reliability::check("ext-fast-sender", &format!("{held}; {up}; {memory}"));
}
