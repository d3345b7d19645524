//! Logging: tracing to stderr as logfmt or JSON.
//!
//! `--log-level` sets this crate's level. Other crates (kube, hyper, h2,
//! rustls, tonic) are capped at `info` whatever the level: their debug and
//! trace output describes HTTP exchanges with the API server, which carry the
//! proxy's own credentials and the minted tokens.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogLevel, TelemetrySettings};

/// The level filter for this crate's own events.
pub fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::All => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::None => LevelFilter::OFF,
    }
}

/// The per-target filter described in the module docs.
pub fn filter(level: LogLevel) -> Targets {
    let own = level_filter(level);
    Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), own)
        // kube's request trace logs every failed API call at `error`, with
        // less than the processor's own line about the same failure says.
        .with_target("kube_client::client::builder", LevelFilter::OFF)
        .with_default(own.min(LevelFilter::INFO))
}

/// Installs the global subscriber. Fails if one is installed already.
pub fn init(settings: TelemetrySettings) -> Result<(), tracing_subscriber::util::TryInitError> {
    let registry = tracing_subscriber::registry().with(filter(settings.level));
    match settings.format {
        LogFormat::Logfmt => registry
            .with(
                tracing_logfmt::builder()
                    .layer()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_crates_never_log_below_info() {
        let shown = filter(LogLevel::All).to_string();
        assert!(shown.contains("kube_audience_proxy=trace"), "{shown}");
        assert!(shown.contains("info"), "{shown}");
        let none = filter(LogLevel::None).to_string();
        assert!(none.contains("kube_audience_proxy=off"), "{none}");
        assert!(
            shown.contains("kube_client::client::builder=off"),
            "{shown}"
        );
    }
}
