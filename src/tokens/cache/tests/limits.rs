//! Back-off windows after failed mints and the in-flight limit, through
//! the cache.

use super::*;

fn rate_limited(secs: u64) -> Error {
    Error::RateLimited {
        retry_after: Some(Duration::from_secs(secs)),
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_audience_is_not_asked_for_again_before_retry_after() {
    let source = Scripted::default();
    source.push(Err(rate_limited(5)));
    let cache = TokenCache::new(source.clone(), limits());
    let start = Instant::now();
    let first = cache.get(&aud("a")).await.unwrap_err();
    assert_eq!(first.retry_in(), Some(Duration::from_secs(5)));
    assert_eq!(*cause(&first), rate_limited(5));
    // 20 more requests over the next 4.75 s: no TokenRequest, each told
    // what is left of the window.
    for i in 0..20u64 {
        tokio::time::advance(Duration::from_millis(if i == 0 { 0 } else { 250 })).await;
        let error = cache.get(&aud("a")).await.unwrap_err();
        let left = Duration::from_secs(5) - Instant::now().duration_since(start);
        assert_eq!(error.retry_in(), Some(left));
        assert_eq!(*cause(&error), rate_limited(5));
    }
    assert_eq!(source.calls(), 1);
    // Another audience is not held back.
    assert_eq!(cache.get(&aud("b")).await.unwrap().expose_secret(), "b-2");
    // After the window, the next request asks again and gets a token.
    tokio::time::advance(start + Duration::from_secs(5) - Instant::now()).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap().expose_secret(), "a-3");
    let times = source.wait_for_calls(3).await;
    let millis = [0, 4_750, 5_000].map(Duration::from_millis);
    assert_eq!(since(start, &times), millis);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_capped_at_a_minute() {
    let source = Scripted::default();
    source.push(Err(rate_limited(86_400)));
    let cache = TokenCache::new(source.clone(), limits());
    let error = cache.get(&aud("a")).await.unwrap_err();
    assert_eq!(error.retry_in(), Some(Duration::from_secs(60)));
    tokio::time::advance(Duration::from_millis(59_999)).await;
    assert_eq!(
        cache.get(&aud("a")).await.unwrap_err().retry_in(),
        Some(Duration::from_millis(1))
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(cache.get(&aud("a")).await.is_ok());
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_exponentially_until_a_success() {
    let source = Scripted::default();
    source.push(Err(Error::Server { status: 503 }));
    source.push(Err(Error::Timeout(Duration::from_secs(4))));
    source.push(Err(Error::Transport("connection refused".into())));
    let cache = TokenCache::new(source.clone(), limits());
    let start = Instant::now();
    // A client that retries every 100 ms for 10 s.
    let mut windows = Vec::new();
    let mut token = None;
    while Instant::now() < start + Duration::from_secs(10) {
        match cache.get(&aud("a")).await {
            Ok(t) => {
                token = Some(t);
                break;
            }
            Err(error) if source.calls() > windows.len() => {
                windows.push(error.retry_in().unwrap().as_secs());
            }
            Err(_) => {}
        }
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert_eq!(token.unwrap().expose_secret(), "a-4");
    assert_eq!(windows, [1, 2, 4]);
    let times = source.wait_for_calls(4).await;
    assert_eq!(since(start, &times), secs(&[0, 1, 3, 7]));
}

#[tokio::test(start_paused = true)]
async fn refusals_back_off_briefly_and_do_not_grow() {
    let source = Scripted::default();
    source.push(Err(Error::Forbidden));
    source.push(Err(Error::Forbidden));
    let cache = TokenCache::new(source.clone(), limits());
    let start = Instant::now();
    for _ in 0..2 {
        let error = cache.get(&aud("a")).await.unwrap_err();
        assert_eq!(error.retry_in(), Some(Duration::from_secs(5)));
        assert_eq!(*cause(&error), Error::Forbidden);
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert!(cache.get(&aud("a")).await.is_err());
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    // Fixed RBAC is picked up within 5 s.
    assert!(cache.get(&aud("a")).await.is_ok());
    let times = source.wait_for_calls(3).await;
    assert_eq!(since(start, &times), secs(&[0, 5, 10]));
}

#[tokio::test(start_paused = true)]
async fn at_most_the_limit_of_token_requests_run_at_once() {
    let source = Scripted {
        delay: Duration::from_secs(1),
        ..Default::default()
    };
    let cache = TokenCache::new(
        source.clone(),
        Limits {
            max_in_flight: 2,
            ..limits()
        },
    );
    let start = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&aud(&format!("a{i}"))).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().is_ok(), "waiting, not refused");
    }
    assert_eq!(source.max_in_flight.load(Ordering::SeqCst), 2);
    // Three rounds of two.
    let times = source.wait_for_calls(6).await;
    assert_eq!(since(start, &times), secs(&[1, 1, 2, 2, 3, 3]));
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_slot_counts_against_the_request_timeout() {
    let source = Scripted {
        delay: Duration::from_secs(3),
        ..Default::default()
    };
    let cache = TokenCache::new(
        source.clone(),
        Limits {
            max_in_flight: 1,
            ..limits()
        },
    );
    let start = Instant::now();
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&aud("a")).await }
    });
    tokio::task::yield_now().await;
    // Waits 3 s for the slot; the TokenRequest gets the 1 s that is left
    // of the 4 s and does not make it. The proxy's own limit cut it short,
    // not the API server: the proxy is busy, no back-off window opens.
    let second = cache.get(&aud("b")).await.unwrap_err();
    assert_eq!(
        *second,
        Error::Busy {
            limit: 1,
            timeout: Duration::from_secs(4)
        },
        "{second}"
    );
    assert_eq!(Instant::now().duration_since(start), Duration::from_secs(4));
    assert!(first.await.unwrap().is_ok());
    // The next request for b asks the (healthy) API server again at once.
    assert_eq!(source.started(), 2);
    assert_eq!(cache.get(&aud("b")).await.unwrap().expose_secret(), "b-2");
    assert_eq!(source.started(), 3);
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_slot_never_opens_a_back_off_window() {
    // The slot holder takes all but 1 ms of the timeout: whatever is left
    // for the next TokenRequest, a timeout of it is the proxy's limit.
    let source = Scripted {
        delay: Duration::from_millis(3_999),
        ..Default::default()
    };
    let cache = TokenCache::new(
        source.clone(),
        Limits {
            max_in_flight: 1,
            ..limits()
        },
    );
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&aud("a")).await }
    });
    tokio::task::yield_now().await;
    let error = cache.get(&aud("b")).await.unwrap_err();
    assert_eq!(error.kind(), "busy", "{error}");
    assert_eq!(error.retry_in(), None, "no window: {error}");
    assert!(first.await.unwrap().is_ok());
    assert!(cache.get(&aud("b")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_token_request_that_had_the_whole_timeout_backs_off() {
    // No wait for a slot: a TokenRequest that outlasts the 4 s is the API
    // server's, and opens the window (1 s for a first timeout).
    let source = Scripted {
        delay: Duration::from_secs(5),
        ..Default::default()
    };
    let cache = TokenCache::new(source.clone(), limits());
    let error = cache.get(&aud("a")).await.unwrap_err();
    assert_eq!(*cause(&error), Error::Timeout(Duration::from_secs(4)));
    assert_eq!(error.retry_in(), Some(Duration::from_secs(1)));
    assert!(cache.get(&aud("a")).await.is_err());
    assert_eq!(source.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn background_refreshes_take_a_slot_too() {
    let source = Scripted {
        delay: Duration::from_secs(1),
        ..Default::default()
    };
    let cache = TokenCache::new(
        source.clone(),
        Limits {
            max_in_flight: 1,
            ..limits()
        },
    );
    let start = Instant::now();
    cache.get(&aud("a")).await.unwrap();
    // Past a's refresh point: the request starts a refresh (1 s), and it
    // and a mint for b share the one slot, one after the other.
    tokio::time::advance(Duration::from_secs(2900)).await;
    cache.get(&aud("a")).await.unwrap();
    assert!(refreshing(&cache, "a").await);
    cache.get(&aud("b")).await.unwrap();
    assert_eq!(source.max_in_flight.load(Ordering::SeqCst), 1);
    let times = source.wait_for_calls(3).await;
    assert_eq!(since(start, &times), secs(&[1, 2902, 2903]));
}
