//! `token_expiry_timestamp_seconds{audience}` and
//! `token_last_refresh_timestamp_seconds{audience}`, read from the cache at
//! scrape time: one series per audience the cache holds now, so an audience
//! that leaves the cache (evicted, idle, replaced by a failed mint) leaves
//! the metrics with it, and there are never more series than
//! `--max-audiences`. Only the audience (already in the logs) and two times
//! are read; the token never is.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Entry;
use super::prefetch::Pinned;
use crate::audience::Audience;
use crate::metrics::unix_seconds;

/// One cached audience at scrape time: its expiry and mint time.
struct Row {
    audience: Arc<Audience>,
    expires: f64,
    minted: f64,
}

/// The collector; holds a handle on the cache's entries and on the
/// prefetched audiences' tokens, which live outside them.
pub(crate) struct TokenGauges {
    entries: moka::future::Cache<Audience, Arc<Entry>>,
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
        let mut rows: Vec<Row> = self
            .entries
            .iter()
            .map(|(audience, entry)| {
                let current = entry.current();
                Row {
                    audience,
                    expires: unix_seconds(current.expires_at),
                    minted: unix_seconds(current.minted_at),
                }
            })
            .chain(
                self.pinned
                    .held()
                    .into_iter()
                    .map(|(audience, current)| Row {
                        audience: Arc::new(audience),
                        expires: unix_seconds(current.expires_at),
                        minted: unix_seconds(current.minted_at),
                    }),
            )
            .collect();
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
