//! The token cache: one entry per audience, single-flight minting, background
//! refresh, serve-while-valid on refresh failure, bounded size, idle expiry.
//!
//! A request for an audience
//! - with a usable token gets it at once; if the token is past its refresh
//!   point, a background refresh starts (once per entry), and the request
//!   still does not wait;
//! - with no entry (or one whose token is no longer usable) mints one. moka's
//!   `try_get_with` makes concurrent misses share a single TokenRequest, and
//!   share its error too, so a failing API server sees one call, not one per
//!   waiting request.
//!
//! Time is tokio time, so tests drive refresh and expiry with a paused clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::schedule::Policy;
use super::{Error, IssuedToken, TokenSource};
use crate::audience::Audience;
use crate::secret::Token;

/// Bounds on what the cache holds (`--max-audiences`, `--audience-idle-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most audiences held at once (`--max-audiences`); the least recently
    /// used beyond that are dropped.
    pub max_audiences: u64,
    /// An audience unused for this long is dropped (`--audience-idle-timeout`).
    pub idle_timeout: Duration,
}

/// Tokens per audience. Cheap to clone (shared state).
pub struct TokenCache<S> {
    source: Arc<S>,
    entries: moka::future::Cache<Audience, Arc<Entry>>,
    policy: Policy,
}

impl<S> Clone for TokenCache<S> {
    fn clone(&self) -> Self {
        TokenCache {
            source: self.source.clone(),
            entries: self.entries.clone(),
            policy: self.policy,
        }
    }
}

struct Entry {
    current: RwLock<Current>,
    refreshing: AtomicBool,
}

#[derive(Clone)]
struct Current {
    token: Token,
    refresh_at: Instant,
    usable_until: Instant,
}

impl Current {
    fn new(issued: IssuedToken, policy: &Policy) -> Result<Current, Error> {
        let now = Instant::now();
        let lifetime = issued
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let usable_for = policy.usable_for(lifetime);
        if usable_for.is_zero() {
            return Err(Error::BadResponse("the token expires too soon to be used"));
        }
        Ok(Current {
            token: issued.token,
            refresh_at: now + policy.refresh_after(lifetime, fastrand::f64()),
            usable_until: now + usable_for,
        })
    }
}

impl Entry {
    fn current(&self) -> Current {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, next: Current) {
        match self.current.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}

impl<S: TokenSource> TokenCache<S> {
    /// A cache over `source` with the refresh [`Policy`] of the kubelet's
    /// token manager.
    pub fn new(source: S, limits: Limits) -> TokenCache<S> {
        let policy = Policy::default();
        let entries = moka::future::Cache::builder()
            .max_capacity(limits.max_audiences)
            .time_to_idle(limits.idle_timeout)
            .build();
        TokenCache {
            source: Arc::new(source),
            entries,
            policy,
        }
    }

    /// A usable token for `audience`, minting one if needed.
    pub async fn get(&self, audience: &Audience) -> Result<Token, Arc<Error>> {
        if let Some(entry) = self.entries.get(audience).await {
            let current = entry.current();
            let now = Instant::now();
            if now < current.usable_until {
                if now >= current.refresh_at {
                    self.start_refresh(audience, &entry);
                }
                return Ok(current.token);
            }
            // Refreshes failed until the token became unusable: drop this
            // entry (unless another request already replaced it) and mint.
            crate::moka_ext::remove_if_same(&self.entries, audience, &entry).await;
        }
        let entry = self
            .entries
            .try_get_with_by_ref(audience, self.mint_entry(audience))
            .await?;
        Ok(entry.current().token)
    }

    /// Number of audiences currently cached (approximate, as moka counts).
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Whether no audience is cached.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn mint_entry(&self, audience: &Audience) -> Result<Arc<Entry>, Error> {
        let issued = self.source.mint(audience).await?;
        let current = Current::new(issued, &self.policy)?;
        tracing::debug!(%audience, "minted a token");
        Ok(Arc::new(Entry {
            current: RwLock::new(current),
            refreshing: AtomicBool::new(false),
        }))
    }

    fn start_refresh(&self, audience: &Audience, entry: &Arc<Entry>) {
        if entry.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let source = self.source.clone();
        let policy = self.policy;
        let audience = audience.clone();
        let entry = Arc::downgrade(entry);
        tokio::spawn(refresh(source, policy, audience, entry));
    }
}

/// Refreshes one entry in the background until it succeeds, the entry is
/// evicted, or the next retry would come after the current token's end (the
/// next request then mints in the foreground).
async fn refresh<S: TokenSource>(
    source: Arc<S>,
    policy: Policy,
    audience: Audience,
    entry: Weak<Entry>,
) {
    let mut attempt = 0u32;
    loop {
        let outcome = source
            .mint(&audience)
            .await
            .and_then(|issued| Current::new(issued, &policy));
        let Some(held) = entry.upgrade() else {
            return;
        };
        let error = match outcome {
            Ok(next) => {
                held.replace(next);
                held.refreshing.store(false, Ordering::Release);
                tracing::debug!(%audience, "refreshed a token");
                return;
            }
            Err(error) => error,
        };
        let delay = policy.backoff(attempt, error.retry_after());
        attempt = attempt.saturating_add(1);
        let usable_until = held.current().usable_until;
        drop(held);
        if Instant::now() + delay >= usable_until {
            tracing::warn!(%audience, %error, "token refresh failed; no retry fits before the token expires");
            return;
        }
        tracing::warn!(%audience, %error, retry_in = ?delay, "token refresh failed; serving the current token meanwhile");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

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
    }

    impl Default for Scripted {
        fn default() -> Self {
            Scripted {
                answered: Arc::new(tokio::sync::watch::Sender::new(Vec::new())),
                script: Arc::default(),
                delay: Duration::ZERO,
            }
        }
    }

    impl Scripted {
        fn push(&self, outcome: Result<Duration, Error>) {
            self.script.lock().unwrap().push_back(outcome);
        }

        fn calls(&self) -> usize {
            self.answered.borrow().len()
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
            assert_eq!(
                *task.await.unwrap().unwrap_err(),
                Error::Server { status: 500 }
            );
        }
        assert_eq!(source.calls(), 1);
        // Errors are not cached: the next request tries again.
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
        // Past that the proxy fails closed (with the API server's error)...
        tokio::time::advance(Duration::from_secs(2)).await;
        let err = cache.get(&aud("a")).await.unwrap_err();
        assert_eq!(err.kind(), "rate_limited");
        assert_eq!(source.calls(), 9);
        // ...and recovers as soon as the API server does.
        source.script.lock().unwrap().clear();
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
        assert_eq!(err.kind(), "bad_response");
    }

    #[tokio::test]
    async fn idle_audiences_age_out() {
        let source = Scripted::default();
        let cache = TokenCache::new(
            source.clone(),
            Limits {
                max_audiences: 10,
                idle_timeout: Duration::from_millis(50),
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
            },
        );
        for i in 0..100 {
            cache.get(&aud(&format!("a{i}"))).await.unwrap();
        }
        cache.entries.run_pending_tasks().await;
        assert!(cache.len() <= 10, "{} audiences held", cache.len());
    }
}
