//! Prefetched audiences (`--prefetch-audience`) and the readiness that
//! follows them, on a paused clock: minted at start without any request,
//! retried with back-off until the API server answers, refreshed at 80 %
//! with no traffic, kept (and ready) through failed refreshes, and missing
//! (not ready) only once the token is no longer usable.

use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_server::Health;
use tonic_health::server::{HealthReporter, HealthService};

use super::*;
use crate::readiness::Readiness;

const HOUR: Duration = Duration::from_secs(3600);

fn prefetching(source: &Scripted, audiences: &[&str]) -> TokenCache<Scripted> {
    let audiences: Vec<Audience> = audiences.iter().map(|a| aud(a)).collect();
    TokenCache::with_prefetch(source.clone(), limits(), &audiences)
}

fn missing(cache: &TokenCache<Scripted>) -> Vec<String> {
    let pinned = cache.pinned();
    pinned
        .missing(Instant::now())
        .iter()
        .map(|a| a.as_str().to_owned())
        .collect()
}

/// The server's (`""`) health as a stream of changes, as a client watching
/// grpc.health.v1 sees it.
async fn watch_health(
    reporter: &HealthReporter,
) -> impl tokio_stream::Stream<Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>
{
    let service = HealthService::from_health_reporter(reporter.clone());
    let request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    service.watch(request).await.unwrap().into_inner()
}

/// The first status the watch reports that differs from `from` (a status
/// set again unchanged is skipped; tokio time: a missing change fails at
/// [`DEADLINE`], at once on the paused clock).
async fn next_change(
    stream: &mut (
             impl tokio_stream::Stream<
        Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>,
    > + Unpin
         ),
    from: Option<Wire>,
) -> Wire {
    loop {
        let item = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("a health change")
            .expect("the watch goes on")
            .unwrap();
        let status = Wire::try_from(item.status).unwrap();
        if Some(status) != from {
            return status;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn minted_at_start_and_refreshed_at_eighty_percent_without_requests() {
    let source = Scripted::default();
    let cache = prefetching(&source, &["a", "b"]);
    let start = Instant::now();
    assert_eq!(missing(&cache), ["a", "b"]);
    let _prefetch = cache.start_prefetch();
    let times = source.wait_for_calls(2).await;
    assert_eq!(since(start, &times), secs(&[0, 0]));
    assert!(missing(&cache).is_empty());
    // Requests read the prefetched tokens: no TokenRequest.
    let a = cache.get(&aud("a")).await.unwrap();
    assert!(a.expose_secret().starts_with("a-"));
    assert_eq!(source.calls(), 2);
    // No request at all from here: each token is refreshed between 75 %
    // and 80 % of its hour (the jitter), by the timer alone.
    let times = source.wait_for_calls(4).await;
    for refreshed in &since(start, &times)[2..] {
        assert!(
            (Duration::from_secs(2700)..=Duration::from_secs(2880)).contains(refreshed),
            "{refreshed:?}"
        );
    }
    assert_ne!(cache.get(&aud("a")).await.unwrap(), a);
    assert!(missing(&cache).is_empty());
    // And again for the next token, still without traffic.
    source.wait_for_calls(6).await;
    assert_eq!(source.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn prefetched_audiences_never_age_out() {
    let source = Scripted::default();
    let cache = TokenCache::with_prefetch(
        source.clone(),
        Limits {
            idle_timeout: Duration::from_secs(60),
            ..limits()
        },
        &[aud("a")],
    );
    let _prefetch = cache.start_prefetch();
    let first = {
        source.wait_for_calls(1).await;
        cache.get(&aud("a")).await.unwrap()
    };
    // Far past the idle timeout, before the refresh point: the same token,
    // no new TokenRequest.
    tokio::time::sleep(Duration::from_secs(1800)).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap(), first);
    assert_eq!(source.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn retried_with_the_back_off_windows_until_the_api_server_answers() {
    let source = Scripted::default();
    for _ in 0..3 {
        source.push(Err(Error::Server { status: 503 }));
    }
    let cache = prefetching(&source, &["a"]);
    let start = Instant::now();
    let _prefetch = cache.start_prefetch();
    // Windows of 1 s, 2 s, 4 s after the failures, then a token.
    let times = source.wait_for_calls(4).await;
    assert_eq!(since(start, &times), secs(&[0, 1, 3, 7]));
    assert!(missing(&cache).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_request_during_the_first_mint_shares_its_token_request() {
    let source = Scripted {
        delay: Duration::from_millis(50),
        ..Default::default()
    };
    let cache = prefetching(&source, &["a"]);
    let _prefetch = cache.start_prefetch();
    tokio::task::yield_now().await;
    assert_eq!(source.started(), 1, "the prefetch is in flight");
    let token = cache.get(&aud("a")).await.unwrap();
    assert_eq!(token.expose_secret(), "a-1");
    assert_eq!(source.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn readiness_waits_for_every_token_and_survives_failed_refreshes() {
    let source = Scripted::default();
    // The API server is down at startup: 3 failures, then a token.
    for _ in 0..3 {
        source.push(Err(Error::Transport("connection refused".into())));
    }
    let cache = prefetching(&source, &["a"]);
    let readiness = Readiness::new(cache.pinned());
    let reporter = HealthReporter::new();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let mut health = watch_health(&reporter).await;
    assert_eq!(next_change(&mut health, None).await, Wire::NotServing);
    let start = Instant::now();
    let _prefetch = cache.start_prefetch();
    let _report = tokio::spawn(readiness.clone().report(reporter.clone()));
    assert_eq!(
        readiness.reason(Instant::now()).as_deref(),
        Some("no valid token yet for prefetched audience(s): a")
    );
    // Ready exactly when the token arrives (7 s: windows of 1, 2, 4 s).
    assert_eq!(
        next_change(&mut health, Some(Wire::NotServing)).await,
        Wire::Serving
    );
    assert_eq!(Instant::now().duration_since(start), Duration::from_secs(7));
    assert_eq!(source.calls(), 4);
    assert_eq!(readiness.reason(Instant::now()), None);

    // From the refresh on, the API server fails 10 times (backing off 1 s
    // doubling to 60 s: 303 s), then recovers: readiness does not flip
    // while the token stays usable.
    for _ in 0..10 {
        source.push(Err(Error::Server { status: 503 }));
    }
    let times = source.wait_for_calls(4 + 11).await;
    let refreshed = *times.last().unwrap();
    let token_end = times[3] + Duration::from_secs(3570);
    assert!(
        refreshed < token_end,
        "the refresh succeeded while the old token was usable"
    );
    assert_eq!(source.calls(), 15);
    let still = tokio::time::timeout(
        Duration::from_secs(1),
        next_change(&mut health, Some(Wire::Serving)),
    )
    .await;
    assert!(still.is_err(), "no health change: {still:?}");
    assert_eq!(readiness.reason(Instant::now()), None);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_lost_when_a_token_expires_unrefreshed_and_comes_back() {
    let source = Scripted::default();
    source.push(Ok(HOUR));
    // Every refresh fails, far past the token's end.
    for _ in 0..200 {
        source.push(Err(Error::Server { status: 500 }));
    }
    let cache = prefetching(&source, &["a", "b"]);
    let readiness = Readiness::new(cache.pinned());
    let reporter = HealthReporter::new();
    let mut health = watch_health(&reporter).await;
    // HealthReporter starts SERVING; the report task sets the truth.
    assert_eq!(next_change(&mut health, None).await, Wire::Serving);
    let _report = tokio::spawn(readiness.clone().report(reporter.clone()));
    assert_eq!(
        next_change(&mut health, Some(Wire::Serving)).await,
        Wire::NotServing
    );
    let start = Instant::now();
    let _prefetch = cache.start_prefetch();
    // One audience got the token, the other a failure: still not ready,
    // and the reason names the one without.
    source.wait_for_calls(2).await;
    let without = missing(&cache);
    assert_eq!(without.len(), 1, "{without:?}");
    let with = if without[0] == "a" { "b" } else { "a" };
    assert_eq!(
        readiness.reason(Instant::now()),
        Some(format!(
            "no valid token yet for prefetched audience(s): {}",
            without[0]
        ))
    );
    // Its mints keep failing; the other's refreshes too, until that token
    // is no longer usable (30 s before its hour ends): still not ready,
    // now for both.
    tokio::time::sleep_until(start + Duration::from_secs(3571)).await;
    assert_eq!(missing(&cache), ["a", "b"]);
    let error = cache.get(&aud(with)).await.unwrap_err();
    assert!(matches!(&*error, Error::BackingOff { .. }), "{error:?}");
    // The API server recovers: both tokens arrive and the processor turns
    // ready (the first change since it was not ready).
    source.script.lock().unwrap().clear();
    assert_eq!(
        next_change(&mut health, Some(Wire::NotServing)).await,
        Wire::Serving
    );
    assert!(missing(&cache).is_empty());
}

#[tokio::test(start_paused = true)]
async fn ready_turns_not_ready_when_the_only_token_expires() {
    let source = Scripted::default();
    source.push(Ok(HOUR));
    for _ in 0..200 {
        source.push(Err(Error::Server { status: 500 }));
    }
    let cache = prefetching(&source, &["a"]);
    let readiness = Readiness::new(cache.pinned());
    let reporter = HealthReporter::new();
    let mut health = watch_health(&reporter).await;
    assert_eq!(next_change(&mut health, None).await, Wire::Serving);
    let _prefetch = cache.start_prefetch();
    let minted = source.wait_for_calls(1).await[0];
    let _report = tokio::spawn(readiness.report(reporter.clone()));
    // Ready from the start (the token is there), then not ready once the
    // token is no longer usable: 30 s before its hour ends, not before.
    assert_eq!(
        next_change(&mut health, Some(Wire::Serving)).await,
        Wire::NotServing
    );
    let at = Instant::now().duration_since(minted);
    assert!(
        (Duration::from_secs(3569)..=Duration::from_secs(3570)).contains(&at),
        "{at:?}"
    );
}
