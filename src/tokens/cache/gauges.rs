//! `token_expiry_timestamp_seconds{audience}` and
//! `token_last_refresh_timestamp_seconds{audience}`, read from the cache at
//! scrape time: one series per audience the cache holds now, so an audience
//! that leaves the cache (evicted, idle, replaced by a failed mint) leaves
//! the metrics with it, and there are never more series than
//! `--max-audiences`. Prefetched audiences (held apart from the moka cache,
//! see [`super::prefetch`]) are included once they hold a token. Only the
//! audience (already in the logs) and two times are read; the token never
//! is.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use super::prefetch::Pinned;
use super::{Current, Entry};
use crate::audience::Audience;
use crate::metrics::unix_seconds;

/// One cached audience at scrape time: its expiry and mint time.
struct Row {
    audience: Arc<Audience>,
    expires: f64,
    minted: f64,
}

/// The collector; holds a handle on the cache's entries.
pub(crate) struct TokenGauges {
    entries: moka::future::Cache<Audience, Arc<Entry>>,
    /// The prefetched audiences' tokens.
    pinned: Pinned,
}

impl std::fmt::Debug for TokenGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenGauges").finish_non_exhaustive()
    }
}

impl TokenGauges {
    pub(super) fn new(
        entries: moka::future::Cache<Audience, Arc<Entry>>,
        pinned: Pinned,
    ) -> TokenGauges {
        TokenGauges { entries, pinned }
    }
}

impl Collector for TokenGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // One snapshot for both families, sorted for a stable exposition.
        let row = |audience: Arc<Audience>, current: &Current| Row {
            audience,
            expires: unix_seconds(current.expires_at),
            minted: unix_seconds(current.minted_at),
        };
        let pinned = self.pinned.held();
        let mut rows: Vec<Row> = self
            .entries
            .iter()
            // A prefetched audience is never in `entries`; skip it anyway,
            // so no label set can appear twice.
            .filter(|(audience, _)| !pinned.iter().any(|(p, _)| p == audience.as_ref()))
            .map(|(audience, entry)| row(audience, &entry.current()))
            .collect();
        rows.extend(
            pinned
                .iter()
                .map(|(audience, current)| row(Arc::new(audience.clone()), current)),
        );
        rows.sort_by(|a, b| a.audience.as_str().cmp(b.audience.as_str()));
        family(
            &mut encoder,
            "token_expiry_timestamp_seconds",
            "When the cached token of each audience expires (Unix seconds)",
            &rows,
            |row| row.expires,
        )?;
        family(
            &mut encoder,
            "token_last_refresh_timestamp_seconds",
            "When the cached token of each audience was minted (Unix seconds)",
            &rows,
            |row| row.minted,
        )?;
        Ok(())
    }
}

/// One gauge family, a series per row.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[Row],
    value: fn(&Row) -> f64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for row in rows {
        let labels = [("audience", row.audience.as_str())];
        ConstGauge::new(value(row)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
