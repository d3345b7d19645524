//! Readiness with `--prefetch-audience` (issue 9 item 2), against the test
//! API server over loopback, real gRPC health and `/readyz` through curl:
//! - the API server fails at startup: the processor stays not ready (and
//!   says which audience lacks a token) while its TokenRequests keep
//!   failing, and turns ready once the API server answers;
//! - once ready, an API server outage does not flip it while the tokens it
//!   holds are valid, and requests for the prefetched audience get the
//!   prefetched token without a TokenRequest.
//!
//! The refresh on a timer with no traffic needs 80 % of a token lifetime of
//! at least 10 minutes (the API server's minimum): it is proven on a paused
//! clock in `src/tokens/cache/tests/prefetch.rs`.

mod support;

use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::inproc::{InProcess, config, get, process_one};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const AUDIENCE: &str = "https://prefetched.example";
const DEADLINE: Duration = Duration::from_secs(30);

/// The server's (`""`) health as a stream of statuses (gRPC Watch).
async fn watch(proc: &InProcess) -> tonic::Streaming<HealthCheckResponse> {
    HealthClient::new(proc.channel().await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits (bounded) until the watch reports `want`.
async fn wait_for(stream: &mut tonic::Streaming<HealthCheckResponse>, want: ServingStatus) {
    let reached = tokio::time::timeout(DEADLINE, async {
        while let Some(item) = stream.next().await {
            if item.unwrap().status == want as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(reached, Ok(true), "health never reported {want:?}");
}

async fn readyz(proc: &InProcess) -> (u16, String) {
    support::curl::get(&format!("http://{}/readyz", proc.admin)).await
}

async fn health(proc: &InProcess, service: &str) -> ServingStatus {
    support::inproc::health_status(proc.channel().await, service).await
}

/// The `authorization` value the processor set, if any.
fn bearer(
    response: &envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse,
) -> Option<String> {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let Some(Response::RequestHeaders(headers)) = &response.response else {
        return None;
    };
    let mutation = headers.response.as_ref()?.header_mutation.as_ref()?;
    mutation
        .set_headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "authorization")
        .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())
}

#[tokio::test]
async fn unready_while_the_api_server_fails_at_startup_then_ready_and_stays_ready() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    // The API server fails every TokenRequest from the start.
    api.inject(Fault::Status(503), usize::MAX);
    let proc = InProcess::start(config(&kubeconfig.path, &["--prefetch-audience", AUDIENCE])).await;
    let mut statuses = watch(&proc).await;

    // The prefetch keeps trying (back-off windows of 1 s, then 2 s) with no
    // client traffic at all; meanwhile the processor is not ready and says
    // which audience it waits for.
    api.wait_for_token_requests_arrived(2, DEADLINE).await;
    assert!(api.requests_for_audience(AUDIENCE) >= 1);
    assert_eq!(health(&proc, "").await, ServingStatus::NotServing);
    assert_eq!(
        readyz(&proc).await,
        (
            503,
            format!("not ready: no valid token yet for prefetched audience(s): {AUDIENCE}\n")
        )
    );
    // The ext_proc service itself serves: a request that names no audience
    // passes through, one for the prefetched audience gets the 503.
    assert_eq!(
        health(&proc, "envoy.service.ext_proc.v3.ExternalProcessor").await,
        ServingStatus::Serving
    );
    let mut client = proc.client().await;
    let passthrough = process_one(&mut client, get("/"), None).await.unwrap();
    assert_eq!(bearer(&passthrough), None);
    // Still not ready after a third failed attempt.
    api.wait_for_token_requests_arrived(3, DEADLINE).await;
    assert_eq!(readyz(&proc).await.0, 503);
    assert_eq!(health(&proc, "").await, ServingStatus::NotServing);

    // The API server recovers: the next attempt mints, and the processor
    // turns ready (an event, not a poll).
    api.clear_faults();
    wait_for(&mut statuses, ServingStatus::Serving).await;
    assert_eq!(readyz(&proc).await, (200, "ready\n".to_owned()));
    let minted = api.issued_tokens();
    assert_eq!(minted.len(), 1, "one token, minted by the prefetch");
    let claims = api
        .verifier()
        .verify_now(&minted[0], Some(AUDIENCE))
        .unwrap();
    assert_eq!(claims.aud, [AUDIENCE]);

    // Outage once ready: every TokenRequest fails again.
    api.inject(Fault::Status(503), usize::MAX);
    let before = api.token_requests_arrived();
    // Requests for the prefetched audience get its token, no TokenRequest.
    let query = format!("/?kubernetes-audience={AUDIENCE}");
    let injected = process_one(&mut client, get(&query), None).await.unwrap();
    assert_eq!(bearer(&injected), Some(format!("Bearer {}", minted[0])));
    assert_eq!(api.token_requests_arrived(), before);
    // Requests for other audiences reach the failing API server (two
    // audiences: two TokenRequests, both failing with 503)...
    for other in ["https://other-1.example", "https://other-2.example"] {
        let response = process_one(
            &mut client,
            get(&format!("/?kubernetes-audience={other}")),
            None,
        )
        .await
        .unwrap();
        assert_eq!(bearer(&response), None, "{other}");
    }
    api.wait_for_token_requests_arrived(before + 2, DEADLINE)
        .await;
    assert!(api.token_response_statuses().ends_with(&[503, 503]));
    // ...and readiness does not flip: the prefetched token is still valid.
    assert_eq!(readyz(&proc).await, (200, "ready\n".to_owned()));
    assert_eq!(health(&proc, "").await, ServingStatus::Serving);
    // No health change was ever reported after SERVING.
    let changed = tokio::time::timeout(Duration::from_millis(1), statuses.next()).await;
    assert!(changed.is_err(), "health changed: {changed:?}");

    proc.stop().await;
}

#[tokio::test]
async fn without_prefetch_ready_once_listening_and_no_token_is_minted() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    api.inject(Fault::Status(503), usize::MAX);
    let proc = InProcess::start(config(&kubeconfig.path, &[])).await;
    let mut statuses = watch(&proc).await;
    wait_for(&mut statuses, ServingStatus::Serving).await;
    assert_eq!(readyz(&proc).await, (200, "ready\n".to_owned()));
    assert_eq!(api.token_requests_arrived(), 0);
    proc.stop().await;
}

#[tokio::test]
async fn a_refused_prefetch_keeps_the_binary_unready_and_it_stops_cleanly() {
    // The ServiceAccount may not mint tokens (403): a fault retrying
    // cannot fix, retried in the short refusal window.
    let api = FakeApiServer::start(ApiServerOptions {
        permitted_service_accounts: vec![],
        ..ApiServerOptions::default()
    })
    .await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let proc = support::processor::Processor::start(
        &kubeconfig.path,
        &[
            "--prefetch-audience",
            AUDIENCE,
            "--prefetch-audience",
            "https://second.example",
        ],
    )
    .await;
    api.wait_for_token_requests_arrived(2, DEADLINE).await;
    let (code, body) = support::curl::get(&format!("http://{}/readyz", proc.admin)).await;
    assert_eq!(code, 503);
    assert_eq!(
        body,
        format!(
            "not ready: no valid token yet for prefetched audience(s): {AUDIENCE}, https://second.example\n"
        )
    );
    proc.wait_for_log("cannot mint the token of a prefetched audience", DEADLINE)
        .await;
    let (status, log) = proc.terminate().await;
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("403 Forbidden"), "{log}");
}
