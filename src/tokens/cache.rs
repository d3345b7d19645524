//! The token cache: one entry per audience, single-flight minting, background
//! refresh, serve-while-valid on refresh failure, back-off after a failed
//! mint, a bound on TokenRequests in flight, bounded size, idle expiry.
//!
//! A request for an audience
//! - with a usable token gets it at once; if the token is past its refresh
//!   point, a background refresh starts (once per entry), and the request
//!   still does not wait;
//! - with no entry (or one whose token is no longer usable) mints one, in a
//!   task of its own ([`Flights`]): concurrent misses share that single
//!   TokenRequest, and share its error too, so a failing API server sees one
//!   call, not one per waiting request. The task records the outcome (the
//!   entry, or the failure's back-off window) even when every request that
//!   waited for it has gone (a client or Envoy that gave up), so a request
//!   that goes away cannot make the next one skip the back-off;
//! - whose last mint failed gets that failure at once, without a
//!   TokenRequest, until the back-off window of the failure has passed
//!   ([`Policy::failure_window`]: `Retry-After` on 429, exponential on 5xx
//!   and timeouts, a short fixed window on refusals). The error then says
//!   how long is left ([`Error::BackingOff`]), for the 503's `retry-after`.
//!
//! Every TokenRequest, foreground or background refresh, first takes one of
//! [`Limits::max_in_flight`] permits, so a burst of new audiences cannot
//! flood the API server. A request that finds none free waits, within the
//! same `--token-request-timeout` that bounds the TokenRequest itself; if
//! that wait leaves the TokenRequest too little time, the failure is the
//! proxy's own ([`Error::Busy`]) and opens no back-off window.
//!
//! Time is tokio time, so tests drive refresh and expiry with a paused clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::backoff::Failures;
use super::flight::Flights;
use super::limit::Limited;
use super::schedule::Policy;
use super::{Error, IssuedToken, TokenSource};
use crate::audience::Audience;
use crate::metrics::Metrics;
use crate::secret::Token;

pub(crate) mod prefetch;
use prefetch::Pinned;

/// Bounds on what the cache holds and asks for (`--max-audiences`,
/// `--audience-idle-timeout`, `--max-concurrent-token-requests`,
/// `--token-request-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most audiences held at once (`--max-audiences`); the least recently
    /// used beyond that are dropped.
    pub max_audiences: u64,
    /// An audience unused for this long is dropped (`--audience-idle-timeout`).
    pub idle_timeout: Duration,
    /// Most TokenRequests in flight at once, across all audiences
    /// (`--max-concurrent-token-requests`, at least 1).
    pub max_in_flight: usize,
    /// Bound on waiting for a free slot plus the TokenRequest itself
    /// (`--token-request-timeout`).
    pub request_timeout: Duration,
}

/// Tokens per audience. Cheap to clone (shared state).
pub struct TokenCache<S> {
    source: Limited<S>,
    entries: moka::future::Cache<Audience, Arc<Entry>>,
    /// Mints in flight, one per audience.
    flights: Flights<Arc<Entry>>,
    /// Back-off windows of audiences whose last mint failed.
    failures: Failures,
    policy: Policy,
    /// The prefetched audiences' tokens (outside `entries`).
    pinned: Pinned,
    /// Hits, misses, coalesced waits, evictions, TokenRequests.
    metrics: Arc<Metrics>,
}

impl<S> Clone for TokenCache<S> {
    fn clone(&self) -> Self {
        TokenCache {
            source: self.source.clone(),
            entries: self.entries.clone(),
            flights: self.flights.clone(),
            failures: self.failures.clone(),
            policy: self.policy,
            pinned: self.pinned.clone(),
            metrics: self.metrics.clone(),
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
    /// The expiry the API server stated (the expiry gauge).
    expires_at: SystemTime,
    /// When this token was minted (the last-refresh gauge).
    minted_at: SystemTime,
    /// Unique per minted token in this process: the SDS version of a token
    /// secret (see `sds::tokens`), never derived from the token itself.
    serial: u64,
}

/// The source of [`Current::serial`].
static SERIALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Current {
    fn new(issued: IssuedToken, policy: &Policy) -> Result<Current, Error> {
        let now = Instant::now();
        let minted_at = SystemTime::now();
        let lifetime = issued
            .expires_at
            .duration_since(minted_at)
            .unwrap_or(Duration::ZERO);
        let usable_for = policy.usable_for(lifetime);
        if usable_for.is_zero() {
            return Err(Error::BadResponse("the token expires too soon to be used"));
        }
        Ok(Current {
            token: issued.token,
            refresh_at: now + policy.refresh_after(lifetime, fastrand::f64()),
            usable_until: now + usable_for,
            expires_at: issued.expires_at,
            minted_at,
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
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
        TokenCache::build(source, limits, &[], Arc::default())
    }

    /// [`TokenCache::new`], with `prefetch` held apart (see [`prefetch`]):
    /// they take their places of `limits.max_audiences`, and their tokens
    /// are minted and refreshed once [`TokenCache::start_prefetch`] runs.
    pub fn with_prefetch(source: S, limits: Limits, prefetch: &[Audience]) -> TokenCache<S> {
        TokenCache::build(source, limits, prefetch, Arc::default())
    }

    /// As [`new`](Self::new), counting into `metrics`.
    pub fn with_metrics(source: S, limits: Limits, metrics: Arc<Metrics>) -> TokenCache<S> {
        TokenCache::build(source, limits, &[], metrics)
    }

    /// The cache with `prefetch` held apart, counting into `metrics`.
    pub fn build(
        source: S,
        limits: Limits,
        prefetch: &[Audience],
        metrics: Arc<Metrics>,
    ) -> TokenCache<S> {
        let policy = Policy::default();
        let pinned = Pinned::new(prefetch);
        let others = limits
            .max_audiences
            .saturating_sub(u64::try_from(pinned.len()).unwrap_or(u64::MAX));
        let evictions = metrics.cache_evictions.clone();
        let entries = moka::future::Cache::builder()
            .max_capacity(others)
            .time_to_idle(limits.idle_timeout)
            .eviction_listener(move |_, _, cause| {
                // Size and idleness; not replacements or explicit removals.
                if cause.was_evicted() {
                    evictions.inc();
                }
            })
            .build();
        TokenCache {
            source: Limited::new(
                source,
                limits.max_in_flight,
                limits.request_timeout,
                metrics.clone(),
            ),
            entries,
            flights: Flights::counting(metrics.cache_coalesced.clone()),
            failures: Failures::new(limits.max_audiences, policy),
            policy,
            pinned,
            metrics,
        }
    }

    /// The metrics this cache counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The per-audience expiry and last-refresh gauges, read from this
    /// cache at scrape time.
    pub(crate) fn gauges(&self) -> gauges::TokenGauges {
        gauges::TokenGauges::new(self.entries.clone(), self.pinned.clone())
    }

    /// A usable token for `audience`, minting one if needed.
    pub async fn get(&self, audience: &Audience) -> Result<Token, Arc<Error>> {
        // A prefetched audience: its task refreshes it, requests only read.
        if let Some(current) = self.pinned.usable(audience, Instant::now()) {
            return Ok(current.token);
        }
        if let Some(entry) = self.entries.get(audience).await {
            let current = entry.current();
            let now = Instant::now();
            if now < current.usable_until {
                if now >= current.refresh_at {
                    self.start_refresh(audience, &entry);
                }
                self.metrics.cache_hits.inc();
                return Ok(current.token);
            }
            // Refreshes failed until the token became unusable: drop this
            // entry (unless another request already replaced it) and mint.
            crate::moka_ext::remove_if_same(&self.entries, audience, &entry).await;
        }
        self.metrics.cache_misses.inc();
        if let Some(error) = self.failures.check(audience).await {
            return Err(Arc::new(error));
        }
        let cache = self.clone();
        let owned = audience.clone();
        let entry = self
            .flights
            .join(audience, || async move { cache.mint_entry(&owned).await })
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

    /// Mints a token for `audience` and records the outcome: the entry in
    /// the cache, or the failure's back-off window. Runs in the flight's
    /// own task, so it finishes whether or not anyone still waits.
    async fn mint_entry(&self, audience: &Audience) -> Result<Arc<Entry>, Error> {
        // A request that looked before the previous flight landed may start
        // this one after it: answer it with what that flight recorded.
        if let Some(entry) = self.entries.get(audience).await
            && Instant::now() < entry.current().usable_until
        {
            return Ok(entry);
        }
        if let Some(current) = self.pinned.usable(audience, Instant::now()) {
            return Ok(Entry::detached(current));
        }
        if let Some(error) = self.failures.check(audience).await {
            return Err(error);
        }
        let outcome = self
            .source
            .mint(audience)
            .await
            .and_then(|issued| Current::new(issued, &self.policy));
        match outcome {
            Ok(current) => {
                self.failures.clear(audience).await;
                tracing::debug!(%audience, "minted a token");
                if self.pinned.store(audience, &current) {
                    return Ok(Entry::detached(current));
                }
                let entry = Arc::new(Entry {
                    current: RwLock::new(current),
                    refreshing: AtomicBool::new(false),
                });
                self.entries.insert(audience.clone(), entry.clone()).await;
                Ok(entry)
            }
            Err(error) => Err(self.failures.record(audience, error).await),
        }
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
    source: Limited<S>,
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

pub(crate) mod gauges;
#[cfg(test)]
mod tests;
