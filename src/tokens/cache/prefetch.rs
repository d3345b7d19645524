//! Prefetched audiences (`--prefetch-audience`): their tokens are minted at
//! startup and kept fresh on a timer, whether or not requests come, and the
//! processor is ready only while each of them holds a usable token.
//!
//! A prefetched audience lives in a [`Pinned`] slot of its own, outside the
//! moka cache: no idle timeout and no size eviction apply to it (the places
//! it takes are subtracted from `--max-audiences` when the cache is built).
//! One task per audience ([`TokenCache::start_prefetch`]):
//! - without a usable token, mints through the cache's single flight (so a
//!   request that misses meanwhile shares that TokenRequest) and, when that
//!   fails, waits out the audience's back-off window (or the policy's
//!   exponential backoff for a failure that opens none) and tries again,
//!   until it succeeds;
//! - with one, sleeps until its refresh point (80 % of the lifetime, minus
//!   jitter) and refreshes; a failed refresh keeps the current token and is
//!   retried with backoff (honouring `Retry-After`). If no refresh succeeds
//!   before the token stops being usable, the audience is missing again:
//!   the processor turns not ready until a mint succeeds.
//!
//! Every TokenRequest takes a permit of `--max-concurrent-token-requests`,
//! as all others do.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Current, Entry, TokenCache};
use crate::audience::Audience;
use crate::secret::Token;
use crate::tokens::TokenSource;

/// One prefetched audience's token, once minted.
type Slot = Arc<RwLock<Option<Current>>>;

/// The prefetched audiences' tokens, shared by the cache (read per request),
/// the prefetch tasks (which write them) and readiness (which watches
/// them). Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Pinned {
    /// In the order given on the command line.
    slots: Arc<Vec<(Audience, Slot)>>,
    index: Arc<HashMap<Audience, usize>>,
    /// Bumped whenever a slot is written.
    changed: Arc<watch::Sender<()>>,
}

impl Pinned {
    /// Empty slots for `audiences` (duplicates once).
    pub(super) fn new(audiences: &[Audience]) -> Pinned {
        let mut slots = Vec::new();
        let mut index = HashMap::new();
        for audience in audiences {
            if !index.contains_key(audience) {
                index.insert(audience.clone(), slots.len());
                slots.push((audience.clone(), Arc::new(RwLock::new(None))));
            }
        }
        Pinned {
            slots: Arc::new(slots),
            index: Arc::new(index),
            changed: Arc::new(watch::Sender::new(())),
        }
    }

    /// How many audiences are prefetched.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    fn slot(&self, audience: &Audience) -> Option<&Slot> {
        let i = *self.index.get(audience)?;
        self.slots.get(i).map(|(_, slot)| slot)
    }

    /// The token of a prefetched `audience`, if it has one (usable or not).
    fn current(&self, audience: &Audience) -> Option<Current> {
        let slot = self.slot(audience)?;
        match slot.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The usable token of a prefetched `audience` at `now`.
    pub(super) fn usable(&self, audience: &Audience, now: Instant) -> Option<Current> {
        self.current(audience).filter(|c| now < c.usable_until)
    }

    /// Stores `current` for `audience`; `false` if it is not prefetched.
    pub(super) fn store(&self, audience: &Audience, current: &Current) -> bool {
        let Some(slot) = self.slot(audience) else {
            return false;
        };
        match slot.write() {
            Ok(mut guard) => *guard = Some(current.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(current.clone()),
        }
        self.changed.send_replace(());
        true
    }

    /// The prefetched audiences without a usable token at `now`, in the
    /// order given.
    pub(crate) fn missing(&self, now: Instant) -> Vec<&Audience> {
        self.slots
            .iter()
            .filter(|(audience, _)| self.usable(audience, now).is_none())
            .map(|(audience, _)| audience)
            .collect()
    }

    /// The next moment after `now` at which a token stops being usable.
    pub(crate) fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|(audience, _)| self.usable(audience, now))
            .map(|c| c.usable_until)
            .min()
    }

    /// Every prefetched audience that holds a token (usable or not), for
    /// the per-audience gauges.
    pub(super) fn held(&self) -> Vec<(Audience, Current)> {
        self.slots
            .iter()
            .filter_map(|(audience, _)| Some((audience.clone(), self.current(audience)?)))
            .collect()
    }

    /// The prefetched audiences, in the order given.
    pub(crate) fn audiences(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|(a, _)| a.as_str())
    }

    /// Whether `audience` is prefetched (a fast-path audience).
    pub(crate) fn contains(&self, audience: &str) -> bool {
        self.slots.iter().any(|(a, _)| a.as_str() == audience)
    }

    /// The usable token of the prefetched `audience` at `now`, with its
    /// serial (unique per mint) and the end of its usable time.
    pub(crate) fn token(&self, audience: &str, now: Instant) -> Option<(Token, u64, Instant)> {
        let (audience, _) = self.slots.iter().find(|(a, _)| a.as_str() == audience)?;
        self.usable(audience, now)
            .map(|c| (c.token, c.serial, c.usable_until))
    }

    /// Pinned slots for `audiences` with no task (for other modules' tests).
    #[cfg(test)]
    pub(crate) fn for_tests(audiences: &[Audience]) -> Pinned {
        Pinned::new(audiences)
    }

    /// Stores `token` for `audience`, usable for `usable_for` from now
    /// (for other modules' tests).
    #[cfg(test)]
    pub(crate) fn store_for_tests(
        &self,
        audience: &Audience,
        token: Token,
        usable_for: std::time::Duration,
    ) {
        let now = Instant::now();
        let current = Current {
            token,
            refresh_at: now + usable_for / 2,
            usable_until: now + usable_for,
            expires_at: std::time::SystemTime::now() + usable_for,
            minted_at: std::time::SystemTime::now(),
            serial: super::SERIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        self.store(audience, &current);
    }

    /// A receiver that sees every write to a slot.
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}

/// The prefetch tasks; aborted when dropped (with the app).
#[derive(Debug, Default)]
pub(crate) struct Prefetch {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl<S: TokenSource> TokenCache<S> {
    /// What readiness watches: the prefetched audiences' tokens.
    pub(crate) fn pinned(&self) -> Pinned {
        self.pinned.clone()
    }

    /// Starts one task per prefetched audience that mints its token and
    /// keeps it fresh (see the module docs). Must run on the runtime.
    pub(crate) fn start_prefetch(&self) -> Prefetch {
        let tasks = self
            .pinned
            .slots
            .iter()
            .map(|(audience, _)| tokio::spawn(self.clone().keep_fresh(audience.clone())))
            .collect();
        Prefetch { tasks }
    }

    /// Mints and refreshes `audience` forever.
    async fn keep_fresh(self, audience: Audience) {
        let mut attempt = 0u32;
        loop {
            let now = Instant::now();
            let held = self.pinned.usable(&audience, now);
            if let Some(current) = &held
                && now < current.refresh_at
            {
                attempt = 0;
                tokio::time::sleep_until(current.refresh_at).await;
                continue;
            }
            let delay = match held {
                // Due for a refresh: the current token stays in place
                // until a new one replaces it.
                Some(current) => {
                    let outcome = self
                        .source
                        .mint(&audience)
                        .await
                        .and_then(|issued| Current::new(issued, &self.policy));
                    match outcome {
                        Ok(next) => {
                            self.pinned.store(&audience, &next);
                            tracing::debug!(%audience, "refreshed a prefetched token");
                            continue;
                        }
                        Err(error) => {
                            let delay = self.policy.backoff(attempt, error.retry_after());
                            tracing::warn!(
                                %audience, %error, retry_in = ?delay,
                                usable_for = ?current.usable_until.saturating_duration_since(Instant::now()),
                                "prefetched token refresh failed; serving the current token meanwhile"
                            );
                            delay
                        }
                    }
                }
                // No usable token: mint through the single flight, which
                // records the outcome (slot or back-off window).
                None => {
                    let cache = self.clone();
                    let owned = audience.clone();
                    let outcome = self
                        .flights
                        .join(&audience, || async move { cache.mint_entry(&owned).await })
                        .await;
                    match outcome {
                        Ok(_) => {
                            tracing::info!(%audience, "minted the token of a prefetched audience");
                            continue;
                        }
                        Err(error) => {
                            let delay = error.retry_in().unwrap_or_else(|| {
                                self.policy.backoff(attempt, error.retry_after())
                            });
                            tracing::warn!(%audience, %error, retry_in = ?delay, "cannot mint the token of a prefetched audience; not ready until it succeeds");
                            delay
                        }
                    }
                }
            };
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }
}

impl Entry {
    /// An entry outside the moka cache (a prefetched audience's token, as
    /// the single flight hands it to its waiters).
    pub(super) fn detached(current: Current) -> Arc<Entry> {
        Arc::new(Entry {
            current: RwLock::new(current),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        })
    }
}
