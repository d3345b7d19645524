//! The processor's Prometheus metrics (prometheus-client), served in the
//! OpenMetrics text format at `GET /metrics` on the admin listener.
//!
//! [`Metrics`] holds the families the hot paths update (ext_proc decisions,
//! TokenRequests, the token cache); [`Registry`] gathers them with the
//! build information, the per-audience token gauges (read from the cache at
//! scrape time, [`crate::tokens::cache`]) and, with interception, the
//! certificate metrics ([`crate::sds`]). Every name starts with [`PREFIX`].
//!
//! Labels are bounded and never carry a secret: `outcome`, `result` and
//! `reason` take values from fixed enums (`&'static str`, no allocation per
//! request); `audience` only names audiences held by the token cache, so
//! there are never more series than `--max-audiences`. A token or a key
//! never reaches a metric.

mod labels;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

pub(crate) use labels::{Outcome, TokenResult};

/// Every metric name starts with this (and `_`).
pub(crate) const PREFIX: &str = "kube_audience_proxy";

/// The content type of [`Registry::encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of the decision histogram, in seconds: from 50 µs (a cached
/// token) to 5 s (a TokenRequest near `--token-request-timeout`).
const DECISION_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Buckets of the TokenRequest histogram, in seconds: a local API server
/// answers in milliseconds; `--token-request-timeout` bounds the top.
const TOKEN_REQUEST_BUCKETS: [f64; 13] = [
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub result: TokenResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
    rustc: &'static str,
}

/// The families the request and token paths update. Cheap to share
/// (`Arc`); every field is itself a shared handle.
#[derive(Debug)]
pub struct Metrics {
    /// `requests_total{outcome}`: one per `request_headers` decision.
    pub(crate) requests: Family<OutcomeLabels, Counter>,
    /// `ext_proc_streams`: Process streams open now.
    pub(crate) streams: Gauge,
    /// `decision_duration_seconds`: handling of `request_headers`, token
    /// fetch included.
    pub(crate) decision_duration: Histogram,
    /// `token_requests_total{result}`: TokenRequests sent to the API server.
    pub(crate) token_requests: Family<ResultLabels, Counter>,
    /// `token_request_duration_seconds`.
    pub(crate) token_request_duration: Histogram,
    /// `token_cache_hits_total`: a usable token was cached.
    pub(crate) cache_hits: Counter,
    /// `token_cache_misses_total`: no usable token was cached.
    pub(crate) cache_misses: Counter,
    /// `token_cache_coalesced_total`: a miss that joined a mint in flight.
    pub(crate) cache_coalesced: Counter,
    /// `token_cache_evictions_total`: audiences dropped for size or idleness.
    pub(crate) cache_evictions: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let metrics = Metrics {
            requests: Family::default(),
            streams: Gauge::default(),
            decision_duration: Histogram::new(DECISION_BUCKETS),
            token_requests: Family::default(),
            token_request_duration: Histogram::new(TOKEN_REQUEST_BUCKETS),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_coalesced: Counter::default(),
            cache_evictions: Counter::default(),
        };
        // Every label value exists from the start, at 0, so rates and
        // alerts see a series before its first event.
        for outcome in Outcome::ALL {
            let _ = metrics.requests.get_or_create(&OutcomeLabels { outcome });
        }
        for result in TokenResult::ALL {
            let _ = metrics
                .token_requests
                .get_or_create(&ResultLabels { result });
        }
        metrics
    }
}

impl Metrics {
    /// Counts one `request_headers` decision that took `elapsed`.
    pub(crate) fn decided(&self, outcome: Outcome, elapsed: Duration) {
        self.requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.decision_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one TokenRequest that took `elapsed`.
    pub(crate) fn token_request(&self, result: TokenResult, elapsed: Duration) {
        self.token_requests
            .get_or_create(&ResultLabels { result })
            .inc();
        self.token_request_duration.observe(elapsed.as_secs_f64());
    }

    /// A guard counting one open Process stream until dropped.
    pub(crate) fn stream_opened(&self) -> OpenGuard {
        OpenGuard::new(self.streams.clone())
    }
}

/// Counts something open (a stream) in a gauge for as long as it lives.
#[derive(Debug)]
pub(crate) struct OpenGuard(Gauge);

impl OpenGuard {
    pub(crate) fn new(gauge: Gauge) -> OpenGuard {
        gauge.inc();
        OpenGuard(gauge)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What `/metrics` serves: every family, registered once at startup.
#[derive(Debug)]
pub(crate) struct Registry {
    inner: prometheus_client::registry::Registry,
}

impl Registry {
    /// A registry holding `metrics` and `build_info`.
    pub(crate) fn new(metrics: &Arc<Metrics>) -> Registry {
        let mut inner = prometheus_client::registry::Registry::with_prefix(PREFIX);
        inner.register(
            "requests",
            "ext_proc request_headers decisions, by outcome",
            metrics.requests.clone(),
        );
        inner.register(
            "ext_proc_streams",
            "ext_proc Process streams open now",
            metrics.streams.clone(),
        );
        inner.register(
            "decision_duration_seconds",
            "Time to answer a request_headers message, token fetch included",
            metrics.decision_duration.clone(),
        );
        inner.register(
            "token_requests",
            "TokenRequests sent to the Kubernetes API server, by result",
            metrics.token_requests.clone(),
        );
        inner.register(
            "token_request_duration_seconds",
            "Duration of TokenRequests to the Kubernetes API server",
            metrics.token_request_duration.clone(),
        );
        inner.register(
            "token_cache_hits",
            "Token lookups answered from the cache",
            metrics.cache_hits.clone(),
        );
        inner.register(
            "token_cache_misses",
            "Token lookups that found no usable cached token",
            metrics.cache_misses.clone(),
        );
        inner.register(
            "token_cache_coalesced",
            "Cache misses that waited for a TokenRequest already in flight for their audience",
            metrics.cache_coalesced.clone(),
        );
        inner.register(
            "token_cache_evictions",
            "Audiences dropped from the token cache (--max-audiences or --audience-idle-timeout)",
            metrics.cache_evictions.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("KUBE_AUDIENCE_PROXY_COMMIT"),
                rustc: env!("KUBE_AUDIENCE_PROXY_RUSTC"),
            })
            .set(1);
        inner.register(
            "build_info",
            "Build information: version, git commit, compiler (always 1)",
            build_info,
        );
        Registry { inner }
    }

    /// Adds metrics read at scrape time (the token cache's audiences).
    pub(crate) fn register_collector(
        &mut self,
        collector: Box<dyn prometheus_client::collector::Collector>,
    ) {
        self.inner.register_collector(collector);
    }

    /// Adds one family.
    pub(crate) fn register(
        &mut self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.inner.register(name, help, metric);
    }

    /// The exposition, OpenMetrics text ([`CONTENT_TYPE`]).
    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.inner)?;
        Ok(out)
    }
}

/// Seconds since the Unix epoch, for timestamp gauges (0 before it).
pub(crate) fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
