//! The `kube-audience-proxy` binary: parse, initialise, run.

// Runtime code never unwraps; tests may.
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;
use kube_audience_proxy::config::{Cli, Config};
use kube_audience_proxy::{kube_client, processor, sds, server, shutdown, telemetry, token_source};

/// EX_USAGE: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
/// The server could not start or failed.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let config = match Config::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("kube-audience-proxy: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kube-audience-proxy: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    if let Err(error) = telemetry::init(config.log_level, config.log_format) {
        eprintln!("kube-audience-proxy: cannot set up logging: {error}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let client = match kube_client(&config.kube).await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot configure the Kubernetes client");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let sds = match sds(&config) {
        Ok(sds) => sds,
        Err(error) => {
            tracing::error!(%error, "cannot set up the interception CA");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(ca) = &config.ca {
        tracing::info!(
            path = %ca.destination.display(),
            hosts = config.intercept.patterns().len(),
            "interception CA certificate written"
        );
    }
    // Before anything is announced: a SIGTERM from now on drains cleanly.
    let shutdown = shutdown::signal();
    let listeners = match server::Listeners::bind(&config.grpc_listen, config.admin_listen).await {
        Ok(listeners) => listeners,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    tracing::info!(
        grpc = %listeners.grpc_address(),
        admin = %listeners.admin_address(),
        service_account = %config.service_account,
        namespace = %config.namespace,
        "kube-audience-proxy ready"
    );
    let source = token_source(client, &config);
    match server::run(
        processor(&config, source),
        sds,
        listeners,
        config.shutdown_delay,
        shutdown,
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
