//! The cache against a scripted token source, on a paused clock.

mod cancelled;
mod limits;
mod metrics;
mod prefetch;

use super::*;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

/// How long a test waits for an expected event: tokio time, so with a
/// paused clock a missing event fails at once rather than hanging.
const DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// A scripted source: each call pops the next outcome (default: a token
/// valid for an hour) and records, on tokio's clock, when it answered.
#[derive(Clone)]
struct Scripted {
    answered: Arc<tokio::sync::watch::Sender<Vec<Instant>>>,
    script: Arc<Mutex<VecDeque<Result<Duration, Error>>>>,
    delay: Duration,
    /// Calls started, answered or not (a dropped call never answers).
    started: Arc<AtomicUsize>,
    /// Calls running now, and the most that ever ran at once.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Default for Scripted {
    fn default() -> Self {
        Scripted {
            answered: Arc::new(tokio::sync::watch::Sender::new(Vec::new())),
            script: Arc::default(),
            delay: Duration::ZERO,
            started: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
        }
    }
}

/// Counts a call as running until dropped (a timed-out call is dropped).
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Scripted {
    fn push(&self, outcome: Result<Duration, Error>) {
        self.script.lock().unwrap().push_back(outcome);
    }

    fn calls(&self) -> usize {
        self.answered.borrow().len()
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Waits (up to [`DEADLINE`]) until `n` calls have been answered and
    /// returns when each was. A background refresh acts on an answer in
    /// the poll in which it gets it (storing the token, or starting its
    /// backoff sleep), and the test runtime has one thread, so once this
    /// returns the cache reflects the `n`th answer.
    async fn wait_for_calls(&self, n: usize) -> Vec<Instant> {
        let mut answered = self.answered.subscribe();
        let waited =
            tokio::time::timeout(DEADLINE, answered.wait_for(|times| times.len() >= n)).await;
        match waited {
            Ok(Ok(times)) => times.clone(),
            _ => panic!("{n} calls expected, {} answered", self.calls()),
        }
    }
}

impl TokenSource for Scripted {
    async fn mint(&self, audience: &Audience) -> Result<IssuedToken, Error> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _running = Running(self.in_flight.clone());
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let next = self.script.lock().unwrap().pop_front();
        let mut n = 0;
        self.answered.send_modify(|times| {
            times.push(Instant::now());
            n = times.len();
        });
        let lifetime = next.unwrap_or(Ok(Duration::from_secs(3600)))?;
        Ok(IssuedToken {
            token: Token::new(format!("{audience}-{n}")).unwrap(),
            expires_at: SystemTime::now() + lifetime,
        })
    }
}

fn limits() -> Limits {
    Limits {
        max_audiences: 100,
        idle_timeout: Duration::from_secs(3600),
        max_in_flight: 8,
        request_timeout: Duration::from_secs(4),
    }
}

fn aud(s: &str) -> Audience {
    Audience::parse(s.as_bytes(), crate::audience::Source::Default).unwrap()
}

/// Whether a background refresh of `audience` has started (and not
/// succeeded yet).
async fn refreshing<S: TokenSource>(cache: &TokenCache<S>, audience: &str) -> bool {
    let entry = cache.entries.get(&aud(audience)).await.expect("cached");
    entry.refreshing.load(Ordering::Acquire)
}

/// `times` as offsets from `start`.
fn since(start: Instant, times: &[Instant]) -> Vec<Duration> {
    times.iter().map(|t| t.duration_since(start)).collect()
}

fn secs(s: &[u64]) -> Vec<Duration> {
    s.iter().copied().map(Duration::from_secs).collect()
}

#[tokio::test(start_paused = true)]
async fn caches_per_audience() {
    let source = Scripted::default();
    let cache = TokenCache::new(source.clone(), limits());
    let a1 = cache.get(&aud("a")).await.unwrap();
    let a2 = cache.get(&aud("a")).await.unwrap();
    let b = cache.get(&aud("b")).await.unwrap();
    assert_eq!(a1.expose_secret(), "a-1");
    assert_eq!(a1, a2);
    assert_eq!(b.expose_secret(), "b-2");
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_request() {
    let source = Scripted {
        delay: Duration::from_millis(50),
        ..Default::default()
    };
    let cache = TokenCache::new(source.clone(), limits());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&aud("a")).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().expose_secret(), "a-1");
    }
    assert_eq!(source.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_share_one_failure() {
    let source = Scripted {
        delay: Duration::from_millis(50),
        ..Default::default()
    };
    source.push(Err(Error::Server { status: 500 }));
    let cache = TokenCache::new(source.clone(), limits());
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&aud("a")).await })
        })
        .collect();
    for task in tasks {
        let error = task.await.unwrap().unwrap_err();
        let Error::BackingOff { cause, .. } = &*error else {
            panic!("{error:?}")
        };
        assert_eq!(**cause, Error::Server { status: 500 });
    }
    assert_eq!(source.calls(), 1);
    // The failure opened a back-off window (1 s for a first 5xx); after
    // it, the next request tries again.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap().expose_secret(), "a-2");
}

#[tokio::test(start_paused = true)]
async fn refreshes_in_the_background_after_eighty_percent() {
    let source = Scripted::default();
    let cache = TokenCache::new(source.clone(), limits());
    let start = Instant::now();
    let first = cache.get(&aud("a")).await.unwrap();
    // Before the refresh point (80 % minus at most 5 % jitter): no refresh.
    tokio::time::advance(Duration::from_secs(2690)).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap(), first);
    assert!(!refreshing(&cache, "a").await);
    assert_eq!(source.calls(), 1);
    // After it: the request is answered with the current token at once
    // and a single refresh runs behind it, at once.
    tokio::time::advance(Duration::from_secs(200)).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap(), first);
    assert!(refreshing(&cache, "a").await);
    assert_eq!(cache.get(&aud("a")).await.unwrap(), first);
    let times = source.wait_for_calls(2).await;
    assert_eq!(since(start, &times), secs(&[0, 2890]));
    assert!(!refreshing(&cache, "a").await, "the refresh succeeded");
    assert_eq!(cache.get(&aud("a")).await.unwrap().expose_secret(), "a-2");
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_serves_current_token_then_fails_closed() {
    let source = Scripted::default();
    let cache = TokenCache::new(source.clone(), limits());
    let start = Instant::now();
    let first = cache.get(&aud("a")).await.unwrap();
    for _ in 0..100 {
        source.push(Err(Error::RateLimited {
            retry_after: Some(Duration::from_secs(100)),
        }));
    }
    tokio::time::advance(Duration::from_secs(2900)).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap(), first);
    // Retry-After (100 s) is honoured: one retry every 100 s while the
    // token is usable (until 3570 s); the next (3600 s) would not fit.
    let times = source.wait_for_calls(8).await;
    assert_eq!(
        since(start, &times),
        secs(&[0, 2900, 3000, 3100, 3200, 3300, 3400, 3500])
    );
    // Still serving the old token up to 30 s before expiry (3570 s).
    tokio::time::advance(start + Duration::from_secs(3569) - Instant::now()).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap(), first);
    assert_eq!(source.calls(), 8, "no retry after the last that fits");
    // Past that the proxy fails closed (with the API server's error),
    // backing off as the API server asked (capped at 60 s)...
    tokio::time::advance(Duration::from_secs(2)).await;
    let err = cache.get(&aud("a")).await.unwrap_err();
    assert_eq!(err.retry_in(), Some(Duration::from_secs(60)));
    let Error::BackingOff { cause, .. } = &*err else {
        panic!("{err:?}")
    };
    assert_eq!(cause.kind(), "rate_limited");
    assert_eq!(source.calls(), 9);
    // ...and recovers once the window is over and the API server is back.
    source.script.lock().unwrap().clear();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(cache.get(&aud("a")).await.is_err(), "still in the window");
    assert_eq!(source.calls(), 9);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(cache.get(&aud("a")).await.unwrap().expose_secret(), "a-10");
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_between_failed_refreshes() {
    let source = Scripted::default();
    let cache = TokenCache::new(source.clone(), limits());
    let start = Instant::now();
    cache.get(&aud("a")).await.unwrap();
    for _ in 0..5 {
        source.push(Err(Error::Server { status: 503 }));
    }
    tokio::time::advance(Duration::from_secs(2900)).await;
    cache.get(&aud("a")).await.unwrap();
    // Attempts at t=0, +1 s, +3 s, +7 s (1 s, 2 s, then 4 s backoff).
    let times = source.wait_for_calls(5).await;
    assert_eq!(since(start, &times), secs(&[0, 2900, 2901, 2903, 2907]));
}

#[tokio::test(start_paused = true)]
async fn tokens_too_short_lived_are_refused() {
    let source = Scripted::default();
    source.push(Ok(Duration::from_secs(20)));
    let cache = TokenCache::new(source.clone(), limits());
    let err = cache.get(&aud("a")).await.unwrap_err();
    assert_eq!(cause(&err).kind(), "bad_response");
}

#[tokio::test]
async fn idle_audiences_age_out() {
    let source = Scripted::default();
    let cache = TokenCache::new(
        source.clone(),
        Limits {
            max_audiences: 10,
            idle_timeout: Duration::from_millis(50),
            ..limits()
        },
    );
    cache.get(&aud("a")).await.unwrap();
    // moka keeps its own clock (tokio's paused clock cannot drive it), so
    // this polls the cache's entry count, in real time, under a deadline.
    // Neither run_pending_tasks nor entry_count counts as an access.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        cache.entries.run_pending_tasks().await;
        if cache.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle audience is still cached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cache.get(&aud("a")).await.unwrap().expose_secret(), "a-2");
}

#[tokio::test]
async fn bounded_number_of_audiences() {
    let source = Scripted::default();
    let cache = TokenCache::new(
        source,
        Limits {
            max_audiences: 10,
            idle_timeout: Duration::from_secs(3600),
            ..limits()
        },
    );
    for i in 0..100 {
        cache.get(&aud(&format!("a{i}"))).await.unwrap();
    }
    cache.entries.run_pending_tasks().await;
    assert!(cache.len() <= 10, "{} audiences held", cache.len());
}

/// The failure behind a back-off error.
fn cause(error: &Error) -> &Error {
    match error {
        Error::BackingOff { cause, .. } => cause,
        other => panic!("not backing off: {other:?}"),
    }
}
