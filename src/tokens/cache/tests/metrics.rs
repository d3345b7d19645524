//! What the cache counts: hits, misses, coalesced waits, evictions and
//! TokenRequests by result, with a scripted source on a paused clock.

use super::*;

fn counting(source: Scripted, limits: Limits) -> (TokenCache<Scripted>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (
        TokenCache::with_metrics(source, limits, metrics.clone()),
        metrics,
    )
}

fn results(metrics: &Metrics, result: crate::metrics::TokenResult) -> u64 {
    metrics
        .token_requests
        .get_or_create(&crate::metrics::ResultLabels { result })
        .get()
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_count_one_request_and_the_joins() {
    let source = Scripted {
        delay: Duration::from_secs(1),
        ..Scripted::default()
    };
    let (cache, metrics) = counting(source.clone(), limits());
    let a = aud("a");
    let (x, y, z) = tokio::join!(cache.get(&a), cache.get(&a), cache.get(&a));
    assert!(x.is_ok() && y.is_ok() && z.is_ok());
    cache.get(&a).await.unwrap();
    assert_eq!(source.calls(), 1);
    assert_eq!(metrics.cache_misses.get(), 3);
    assert_eq!(metrics.cache_coalesced.get(), 2);
    assert_eq!(metrics.cache_hits.get(), 1);
    assert_eq!(results(&metrics, crate::metrics::TokenResult::Success), 1);
}

#[tokio::test(start_paused = true)]
async fn failures_are_counted_once_and_back_off_refusals_not_at_all() {
    let source = Scripted::default();
    source.push(Err(Error::Server { status: 503 }));
    let (cache, metrics) = counting(source.clone(), limits());
    assert!(cache.get(&aud("a")).await.is_err());
    // Within the back-off window: refused without a TokenRequest.
    let refused = cache.get(&aud("a")).await.unwrap_err();
    assert!(matches!(*refused, Error::BackingOff { .. }));
    assert_eq!(source.calls(), 1);
    assert_eq!(
        results(&metrics, crate::metrics::TokenResult::ServerError),
        1
    );
    assert_eq!(metrics.cache_misses.get(), 2);
}

#[tokio::test]
async fn audiences_dropped_for_size_count_as_evictions() {
    let source = Scripted::default();
    let (cache, metrics) = counting(
        source,
        Limits {
            max_audiences: 1,
            ..limits()
        },
    );
    cache.get(&aud("a")).await.unwrap();
    cache.get(&aud("b")).await.unwrap();
    cache.entries.run_pending_tasks().await;
    assert_eq!(cache.entries.entry_count(), 1);
    assert_eq!(metrics.cache_evictions.get(), 1);
    // The per-audience gauges follow the cache: one audience, one series
    // in each family, and never the token.
    let mut registry = crate::metrics::Registry::new(&metrics);
    registry.register_collector(Box::new(cache.gauges()));
    let text = registry.encode().unwrap();
    for family in [
        "kube_audience_proxy_token_expiry_timestamp_seconds{audience=",
        "kube_audience_proxy_token_last_refresh_timestamp_seconds{audience=",
    ] {
        assert_eq!(text.matches(family).count(), 1, "{text}");
    }
    assert!(!text.contains("a-1") && !text.contains("b-2"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn prefetched_audiences_have_gauges_too() {
    let source = Scripted::default();
    let cache = TokenCache::with_prefetch(source, limits(), &[aud("p")]);
    let pinned = cache.pinned();
    let mut changed = pinned.subscribe();
    let _prefetch = cache.start_prefetch();
    while !pinned.missing(Instant::now()).is_empty() {
        changed.changed().await.unwrap();
    }
    cache.get(&aud("a")).await.unwrap();
    let mut registry = crate::metrics::Registry::new(cache.metrics());
    registry.register_collector(Box::new(cache.gauges()));
    let text = registry.encode().unwrap();
    for family in [
        "kube_audience_proxy_token_expiry_timestamp_seconds",
        "kube_audience_proxy_token_last_refresh_timestamp_seconds",
    ] {
        for audience in ["a", "p"] {
            let series = format!("{family}{{audience=\"{audience}\"}}");
            assert_eq!(text.matches(&series).count(), 1, "{series}:\n{text}");
        }
    }
}
