//! Small additions to moka shared by the token and certificate caches.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;

use moka::future::Cache;
use moka::ops::compute::Op;

/// Removes `key` if it still maps to `stale`. Another task may already have
/// replaced the stale value with a fresh one; comparing by identity keeps
/// that fresh value, so a following `try_get_with` mints at most once.
pub(crate) async fn remove_if_same<K, Q, V>(cache: &Cache<K, Arc<V>>, key: &Q, stale: &Arc<V>)
where
    K: Hash + Eq + Borrow<Q> + Send + Sync + 'static,
    Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    V: Send + Sync + 'static,
{
    cache
        .entry_by_ref(key)
        .and_compute_with(|held| {
            let same = held.is_some_and(|h| Arc::ptr_eq(h.value(), stale));
            std::future::ready(if same { Op::Remove } else { Op::Nop })
        })
        .await;
}
