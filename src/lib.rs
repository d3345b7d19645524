//! kube-audience-proxy: an Envoy external processor (ext_proc) that injects
//! audience-scoped Kubernetes ServiceAccount tokens into HTTP requests, and
//! serves Envoy the leaf certificates for TLS interception over SDS.
//!
//! Envoy does all the networking; this crate answers Envoy's questions. The
//! modules follow the data flow:
//!
//! - [`config`]: the command line, validated into one section per consumer;
//! - [`app`]: [`run`] assembles the parts below and serves them;
//! - `audience` finds the audience a request asks for (pure);
//! - `tokens` mints bound tokens with TokenRequest and caches them;
//! - `ext_proc` is the gRPC service Envoy calls per request;
//! - `intercept`, `ca` and `sds`: which hosts are intercepted, the CA that
//!   only this process holds, and the leaves Envoy fetches for them;
//! - `server`, `admin`, [`shutdown`], [`telemetry`] run it;
//! - `secret` keeps credentials out of logs, errors and Debug output.

// Runtime code never unwraps; tests may.
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod app;
pub mod audience;
pub mod ca;
pub mod config;
pub mod ext_proc;
pub mod intercept;
mod moka_ext;
pub mod sds;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tokens;

pub use app::{App, RunError, run};
