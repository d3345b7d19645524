//! A request that goes away mid-TokenRequest (the client or Envoy reset the
//! stream, e.g. `curl --max-time`): the TokenRequest runs on, its outcome is
//! recorded, and no second TokenRequest starts for the same miss.

use super::*;

/// The client's own deadline, shorter than the TokenRequest.
const CLIENT_GIVES_UP: Duration = Duration::from_millis(500);

fn slow(outcome: Option<Result<Duration, Error>>) -> Scripted {
    let source = Scripted {
        delay: Duration::from_secs(1),
        ..Default::default()
    };
    if let Some(outcome) = outcome {
        source.push(outcome);
    }
    source
}

#[tokio::test(start_paused = true)]
async fn a_failure_is_recorded_although_its_caller_went_away() {
    let source = slow(Some(Err(Error::Server { status: 503 })));
    let cache = TokenCache::new(source.clone(), limits());
    let start = Instant::now();
    let gone = tokio::time::timeout(CLIENT_GIVES_UP, cache.get(&aud("a"))).await;
    assert!(gone.is_err(), "the caller gave up first");
    // The TokenRequest still gets its answer...
    let times = source.wait_for_calls(1).await;
    assert_eq!(since(start, &times), secs(&[1]));
    // ...and its failure opened the back-off window (1 s after a first
    // 5xx): the next request gets the failure without a TokenRequest.
    let error = cache.get(&aud("a")).await.unwrap_err();
    assert_eq!(*cause(&error), Error::Server { status: 503 });
    assert_eq!(error.retry_in(), Some(Duration::from_secs(1)));
    assert_eq!(source.started(), 1, "no second TokenRequest");
}

#[tokio::test(start_paused = true)]
async fn a_token_is_cached_although_its_caller_went_away() {
    let source = slow(None);
    let cache = TokenCache::new(source.clone(), limits());
    let gone = tokio::time::timeout(CLIENT_GIVES_UP, cache.get(&aud("a"))).await;
    assert!(gone.is_err(), "the caller gave up first");
    source.wait_for_calls(1).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap().expose_secret(), "a-1");
    assert_eq!(source.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_others_keep_waiting_on_the_same_token_request() {
    let source = slow(Some(Err(Error::Server { status: 503 })));
    let cache = TokenCache::new(source.clone(), limits());
    // The first caller starts the TokenRequest and gives up; the second
    // joined it and waits for its end, without a TokenRequest of its own.
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { tokio::time::timeout(CLIENT_GIVES_UP, cache.get(&aud("a"))).await }
    });
    tokio::task::yield_now().await;
    let second = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&aud("a")).await }
    });
    assert!(first.await.unwrap().is_err(), "the first caller gave up");
    let error = second.await.unwrap().unwrap_err();
    assert_eq!(*cause(&error), Error::Server { status: 503 });
    assert_eq!(source.started(), 1, "one TokenRequest for both");
    assert_eq!(cache.flights.len(), 0, "the flight has landed");
}
