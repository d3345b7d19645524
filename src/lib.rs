//! kube-audience-proxy: an Envoy external processor (ext_proc) that injects
//! audience-scoped Kubernetes ServiceAccount tokens into HTTP requests, and
//! serves Envoy the leaf certificates for TLS interception over SDS.
//!
//! Envoy does all the networking; this crate answers Envoy's questions. The
//! modules follow the data flow:
//!
//! - [`config`]: the command line, validated into one section per consumer;
//! - `app`: [`run`] assembles the parts below and serves them;
//! - `audience` finds the audience a request asks for (pure);
//! - `destination`: the `--audience-rule` destination rules (pure);
//! - `tokens` mints bound tokens with TokenRequest and caches them;
//! - `apiserver` knows the API server's own audiences, which are refused;
//! - `ext_proc` is the gRPC service Envoy calls per request;
//! - `local` refuses destinations on the proxy's own machine (pure);
//! - `intercept`, `ca` and `sds`: which hosts are intercepted, the CA that
//!   only this process holds, and the leaves Envoy fetches for them;
//! - `server`, `admin`, [`shutdown`], [`telemetry`] run it;
//! - `secret` keeps credentials out of logs, errors and Debug output.

// Runtime code never unwraps; tests may.
#![warn(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod admin;
mod allowlist;
mod apiserver;
mod app;
mod audience;
mod ca;
pub mod config;
mod destination;
pub mod envoy_config;
mod ext_proc;
mod intercept;
#[cfg(test)]
mod leaks;
mod local;
mod metrics;
mod moka_ext;
mod readiness;
mod sds;
mod secret;
mod server;
pub mod shutdown;
pub mod telemetry;
mod tokens;

pub use app::{App, RunError, run};
pub use server::MAX_STREAMS_PER_CONNECTION;

/// The request path without the network, for `benches/hot_path.rs`: a
/// processor over any token source, built from a [`config::Config`] as
/// [`run`] builds it. Not a stable API.
#[doc(hidden)]
pub mod bench {
    pub use crate::app::processor;
    pub use crate::audience::Audience;
    pub use crate::ext_proc::{ExtProc, StreamContext};
    pub use crate::secret::Token;
    pub use crate::tokens::{Error, IssuedToken, TokenSource};
}
