//! The `kube-audience-proxy` binary: parse, set up logging, [`run`], and map
//! the outcome to an exit code (64: fix the configuration; 1: anything else).

// Runtime code never unwraps; tests may.
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;
use kube_audience_proxy::config::{Cli, Config};
use kube_audience_proxy::{RunError, run, shutdown, telemetry};

fn main() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&error);
            ExitCode::from(error.exit_code())
        }
    }
}

fn start() -> Result<(), RunError> {
    let config = Config::try_from(Cli::parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads())
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    runtime.block_on(async {
        telemetry::init(config.telemetry()).map_err(RunError::Telemetry)?;
        // Installed before anything is announced: a SIGTERM from now on
        // drains cleanly instead of killing the process.
        let shutdown = shutdown::signal();
        run(config, shutdown).await
    })
}

/// Into the log once logging is up (so it keeps the configured format),
/// else to stderr, one line per error.
fn report(error: &RunError) {
    if tracing::dispatcher::has_been_set() {
        tracing::error!(%error, "{}", error.summary());
    } else {
        for line in error.to_string().lines() {
            eprintln!("kube-audience-proxy: {line}");
        }
    }
}
