//! SIGTERM while requests are in flight in the processor, through the real
//! Envoy (shipped config): every request gets an answer, the process exits 0
//! within the drain bound.

#[path = "faults/stack.rs"]
mod stack;
mod support;

use std::time::Duration;

use stack::{MARGIN, MESSAGE_TIMEOUT, get, outcome, stack};
use support::apiserver::Fault;
use support::reliability;

/// SIGTERM while requests wait in the processor for TokenRequests: one slow
/// (answered within the drain), one that never comes (the request's own
/// `--token-request-timeout` ends it). Both get an answer; a request during
/// the drain delay is still served; the process exits 0 within the drain
/// bound (`--shutdown-delay` + 10 s for in-flight streams); after that,
/// Envoy answers 500 itself.
#[tokio::test]
async fn sigterm_answers_every_in_flight_request_and_exits_zero() {
    let (s, processor) = stack(
        false,
        &["--shutdown-delay", "1s", "--token-request-timeout", "3s"],
    )
    .await;
    let s = std::sync::Arc::new(s);
    let drain_bound = Duration::from_secs(1 + 10);
    assert_eq!(
        outcome(&s, &get(&s, "cached").await, "cached"),
        "200 with token"
    );
    // The next TokenRequest takes 2 s; the one after never gets an answer.
    s.api.inject(Fault::Delay(Duration::from_secs(2)), 1);
    s.api.inject(Fault::Hang, 1);
    let arrived = s.api.token_requests_arrived();
    let (slow, hung) = (s.clone(), s.clone());
    let slow = tokio::spawn(async move { get(&slow, "slow").await });
    s.api
        .wait_for_token_requests_arrived(arrived + 1, Duration::from_secs(10))
        .await;
    let hung = tokio::spawn(async move { get(&hung, "hung").await });
    s.api
        .wait_for_token_requests_arrived(arrived + 2, Duration::from_secs(10))
        .await;
    let signalled = tokio::time::Instant::now();
    let terminated = tokio::spawn(processor.terminate());
    // Still served during the drain delay (the token is cached).
    let during = get(&s, "cached").await;
    let during = outcome(&s, &during, "cached");
    let slow = slow.await.unwrap();
    let slow = outcome(&s, &slow, "slow");
    let hung = hung.await.unwrap();
    let hung = outcome(&s, &hung, "hung");
    let (status, logs) = terminated.await.unwrap();
    let took = signalled.elapsed();
    assert!(!logs.contains("panicked"), "{logs}");
    println!("SIGTERM to exit: {took:?}");
    let after = get(&s, "cached").await;
    let observed = format!(
        "slow TokenRequest: {slow}; hung TokenRequest: {hung}; during the drain delay: {during}; \
         exit {} {} the drain bound; afterwards Envoy: {}",
        status.code().unwrap_or(-1),
        if took <= drain_bound {
            "within"
        } else {
            "AFTER"
        },
        after.status,
    );
    reliability::check("processor-sigterm-in-flight", &observed);
}

/// SIGTERM while a request waits on a TokenRequest that outlasts Envoy's
/// `message_timeout` (`--token-request-timeout 30s`, above the shipped 5 s):
/// Envoy ends the request at its timeout and drops the stream, and the
/// drain ends with it; nothing waits for the 30 s.
#[tokio::test]
async fn sigterm_with_a_token_request_past_message_timeout() {
    let (s, processor) = stack(
        false,
        &["--shutdown-delay", "0s", "--token-request-timeout", "30s"],
    )
    .await;
    let s = std::sync::Arc::new(s);
    s.api.inject(Fault::Hang, 1);
    let arrived = s.api.token_requests_arrived();
    let hung = s.clone();
    let sent = tokio::time::Instant::now();
    let hung = tokio::spawn(async move { (get(&hung, "hung").await, sent.elapsed()) });
    s.api
        .wait_for_token_requests_arrived(arrived + 1, Duration::from_secs(10))
        .await;
    let signalled = tokio::time::Instant::now();
    let terminated = tokio::spawn(processor.terminate());
    let (reply, answered_after) = hung.await.unwrap();
    let (status, logs) = terminated.await.unwrap();
    let exited_after = signalled.elapsed();
    assert!(!logs.contains("panicked"), "{logs}");
    println!(
        "client {} after {answered_after:?}; exit after {exited_after:?}",
        reply.status
    );
    let at_timeout =
        answered_after >= MESSAGE_TIMEOUT && answered_after <= MESSAGE_TIMEOUT + MARGIN;
    let observed = format!(
        "client: {} from Envoy {} message_timeout; exit {} {} the drain bound",
        outcome(&s, &reply, "hung"),
        if at_timeout { "at" } else { "NOT at" },
        status.code().unwrap_or(-1),
        if exited_after <= Duration::from_secs(10) {
            "within"
        } else {
            "AFTER"
        },
    );
    reliability::check("processor-sigterm-past-message-timeout", &observed);
}

/// SIGTERM while Envoy holds SDS streams (they live as long as Envoy):
/// the processor ends them after the drain delay, so the drain does not
/// wait for its in-flight bound.
#[tokio::test]
async fn sigterm_with_envoy_holding_sds_streams_exits_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let args = support::intercept_args(&ca, &["localhost"], &["--shutdown-delay", "1s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (s, processor) = stack(false, &args).await;
    // A TLS handshake inside a CONNECT makes Envoy open an SDS stream for
    // `localhost`; nothing listens behind it, the stream stays.
    let closed = support::processor::free_loopback_address();
    let port = closed.rsplit(':').next().unwrap();
    support::curl::via_proxy(
        &s.envoy.proxy_url(),
        &format!("https://localhost:{port}/"),
        &["--cacert", ca.to_str().unwrap()],
    )
    .await;
    let metrics = format!("http://{}/metrics", processor.admin);
    let (_, body) = support::curl::get(&metrics).await;
    let open = body
        .lines()
        .find_map(|l| l.strip_prefix("kube_audience_proxy_sds_streams "))
        .unwrap_or("0")
        .trim()
        .to_owned();
    let signalled = tokio::time::Instant::now();
    let (status, logs) = processor.terminate().await;
    let took = signalled.elapsed();
    println!("SDS streams {open}; SIGTERM to exit {took:?}");
    let timed_out = logs.contains("did not finish in time");
    let observed = format!(
        "SDS streams open at SIGTERM: {open}; exit {} {}",
        status.code().unwrap_or(-1),
        if took >= Duration::from_secs(1) && took < Duration::from_secs(1 + 10) && !timed_out {
            "after the drain delay, without waiting for the in-flight bound"
        } else {
            "NOT between the drain delay and the in-flight bound"
        }
    );
    reliability::check("processor-sigterm-sds-streams", &observed);
}
