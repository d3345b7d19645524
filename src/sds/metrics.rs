//! The interception metrics: `certificates_minted_total`,
//! `certificates_refused_total{reason}`, `sds_streams` and
//! `ca_expiry_timestamp_seconds` (registered only with interception).

use std::fmt::Write as _;
use std::time::SystemTime;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::certs::Refusal;
use crate::metrics::{Registry, unix_seconds};

/// Why a certificate was refused: [`Refusal`] without its detail.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Reason {
    NotIntercepted,
    NoSniNoIps,
    InvalidName,
    TooMany,
    TooManyVariants,
    SigningFailed,
}

impl Reason {
    const ALL: [Reason; 6] = [
        Reason::NotIntercepted,
        Reason::NoSniNoIps,
        Reason::InvalidName,
        Reason::TooMany,
        Reason::TooManyVariants,
        Reason::SigningFailed,
    ];

    fn of(refusal: &Refusal) -> Reason {
        match refusal {
            Refusal::NotIntercepted => Reason::NotIntercepted,
            Refusal::NoSniNoIps => Reason::NoSniNoIps,
            Refusal::InvalidName => Reason::InvalidName,
            Refusal::TooMany => Reason::TooMany,
            Refusal::TooManyVariants => Reason::TooManyVariants,
            Refusal::Mint(_) => Reason::SigningFailed,
        }
    }

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::NotIntercepted => "not_intercepted",
            Reason::NoSniNoIps => "no_sni_no_ips",
            Reason::InvalidName => "invalid_name",
            Reason::TooMany => "too_many",
            Reason::TooManyVariants => "too_many_variants",
            Reason::SigningFailed => "signing_failed",
        }
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: Reason,
}

/// The certificate store's and the SDS service's metrics.
#[derive(Debug)]
pub(crate) struct CertMetrics {
    minted: Counter,
    refused: Family<ReasonLabels, Counter>,
    /// SDS streams open now.
    pub(crate) streams: Gauge,
}

impl Default for CertMetrics {
    fn default() -> CertMetrics {
        let metrics = CertMetrics {
            minted: Counter::default(),
            refused: Family::default(),
            streams: Gauge::default(),
        };
        for reason in Reason::ALL {
            let _ = metrics.refused.get_or_create(&ReasonLabels { reason });
        }
        metrics
    }
}

impl CertMetrics {
    pub(crate) fn minted(&self) {
        self.minted.inc();
    }

    pub(crate) fn refused(&self, refusal: &Refusal) {
        let reason = Reason::of(refusal);
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Adds these metrics and the CA's end of validity to `registry`.
    pub(crate) fn register(&self, registry: &mut Registry, ca_not_after: SystemTime) {
        registry.register(
            "certificates_minted",
            "Leaf certificates signed for intercepted hosts",
            self.minted.clone(),
        );
        registry.register(
            "certificates_refused",
            "Certificate names refused, by reason",
            self.refused.clone(),
        );
        registry.register("sds_streams", "SDS streams open now", self.streams.clone());
        let ca_expiry = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        ca_expiry.set(unix_seconds(ca_not_after));
        registry.register(
            "ca_expiry_timestamp_seconds",
            "When the interception CA certificate expires (Unix seconds)",
            ca_expiry,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_own_reason() {
        let refusals = [
            Refusal::NotIntercepted,
            Refusal::NoSniNoIps,
            Refusal::InvalidName,
            Refusal::TooMany,
            Refusal::TooManyVariants,
            Refusal::Mint("detail".into()),
        ];
        let mut reasons: Vec<&str> = refusals.iter().map(|r| Reason::of(r).as_str()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), Reason::ALL.len());
    }
}
