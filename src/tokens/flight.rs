//! Single flight that outlives its callers: the mint for an audience runs in
//! a task of its own, and every request that misses the cache meanwhile
//! waits for that task's outcome instead of starting another TokenRequest.
//!
//! The task, not a request, owns the mint. A request goes away when its
//! client or Envoy resets the ext_proc stream (`curl --max-time`, Envoy's
//! `message_timeout`); were the mint part of that request's future, it
//! would be dropped with it, its outcome never recorded (no token cached,
//! no back-off window opened) and the next request would start a new
//! TokenRequest — against an API server that hangs, one per request. In a
//! task, the mint runs to its end (bounded by `--token-request-timeout`)
//! and records its outcome whoever still waits for it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use super::Error;
use crate::audience::Audience;

/// The outcome of one mint, as every waiter gets it.
type Outcome<T> = Result<T, Arc<Error>>;

/// A mint in flight, awaited by any number of requests.
type Flight<T> = Shared<BoxFuture<'static, Outcome<T>>>;

/// The mints in flight, at most one per audience. Cheap to clone.
pub(crate) struct Flights<T> {
    running: Arc<Mutex<HashMap<Audience, Flight<T>>>>,
    /// Callers that joined a flight already in the air.
    joined: Counter,
}

impl<T> Clone for Flights<T> {
    fn clone(&self) -> Self {
        Flights {
            running: self.running.clone(),
            joined: self.joined.clone(),
        }
    }
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights::counting(Counter::default())
    }
}

impl<T> Flights<T> {
    /// No flights, counting every join into `joined`.
    pub(crate) fn counting(joined: Counter) -> Flights<T> {
        Flights {
            running: Arc::default(),
            joined,
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// The outcome of the mint in flight for `audience`; if there is none,
    /// `start()` becomes it, spawned on the runtime. `start`'s future must
    /// record its own outcome (cache, back-off): it runs to its end even
    /// when every caller has gone, and the flight ends with it.
    pub(crate) async fn join<F>(&self, audience: &Audience, start: impl FnOnce() -> F) -> Outcome<T>
    where
        F: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let role = {
            let mut running = lock(&self.running);
            if let Some(flight) = running.get(audience) {
                Role::Join(flight.clone())
            } else {
                let (land, landed) = oneshot::channel();
                let flight: Flight<T> = async move {
                    // The sender goes without a word only if the task was
                    // dropped unfinished (runtime shutdown) or panicked.
                    landed.await.unwrap_or(Err(Arc::new(Error::Abandoned)))
                }
                .boxed()
                .shared();
                running.insert(audience.clone(), flight.clone());
                Role::Start(flight, land)
            }
        };
        let flight = match role {
            Role::Join(flight) => {
                self.joined.inc();
                flight
            }
            Role::Start(flight, land) => {
                // Spawned outside the lock: a task dropped at once (runtime
                // shutdown) runs its landing, which takes the lock.
                let landing = Landing {
                    running: self.running.clone(),
                    audience: audience.clone(),
                };
                let work = start();
                tokio::spawn(async move {
                    let _landing = landing;
                    // Nobody may be waiting any more; `work` has recorded
                    // the outcome anyway.
                    let _ = land.send(work.await.map_err(Arc::new));
                });
                flight
            }
        };
        flight.await
    }

    /// Audiences with a mint in flight.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.running).len()
    }
}

/// Whether a caller joins a flight or starts it (and then owns the sender
/// its task lands with).
enum Role<T> {
    Join(Flight<T>),
    Start(Flight<T>, oneshot::Sender<Outcome<T>>),
}

/// Ends a flight when its task ends, however it ends (done, panicked,
/// dropped), so the next miss starts a new one.
struct Landing<T> {
    running: Arc<Mutex<HashMap<Audience, Flight<T>>>>,
    audience: Audience,
}

impl<T> Drop for Landing<T> {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.audience);
    }
}

/// The map is never left half-updated, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
