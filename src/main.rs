//! The `kube-audience-proxy` binary: disable core dumps, parse, set up
//! logging, [`run`], and map the outcome to an exit code (64: fix the
//! configuration; 1: anything else).

// Runtime code never unwraps; tests may.
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use std::ffi::OsString;
use std::io::Write as _;

use clap::Parser;
use kube_audience_proxy::config::{Cli, Config};
use kube_audience_proxy::envoy_config::{self, EnvoyConfigCli};
use kube_audience_proxy::{RunError, run, shutdown, telemetry};

/// The subcommand that prints Envoy's configuration instead of running.
const ENVOY_CONFIG: &str = "envoy-config";

fn main() -> ExitCode {
    if let Err(error) = disable_core_dumps() {
        eprintln!("kube-audience-proxy: cannot disable core dumps: {error}");
        return ExitCode::FAILURE;
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == ENVOY_CONFIG) {
        return print_envoy_config(&args[2..]);
    }
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

/// `kube-audience-proxy envoy-config ARGS`: the configuration on stdout;
/// bad flags as the processor reports them (one line each, exit 64).
fn print_envoy_config(args: &[OsString]) -> ExitCode {
    let program = OsString::from("kube-audience-proxy envoy-config");
    let cli = match EnvoyConfigCli::try_parse_from(std::iter::once(program).chain(args.to_vec())) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match envoy_config::generate(&cli, args) {
        Ok(text) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kube-audience-proxy: cannot write the configuration: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(errors) => {
            for line in errors.to_string().lines() {
                eprintln!("kube-audience-proxy: {line}");
            }
            ExitCode::from(64)
        }
    }
}

/// A crash must not write the tokens and the CA key held in memory to disk:
/// no core file (RLIMIT_CORE 0, soft and hard, so no child can raise it
/// again) and not dumpable (no core whatever the limit or `core_pattern`
/// pipe, and no ptrace or /proc/PID/mem access by other processes of the
/// same user). Before any thread or secret exists. Lowering a limit and
/// clearing the flag cannot fail on Linux short of a seccomp filter; if
/// they do, the process refuses to run rather than run unprotected.
fn disable_core_dumps() -> std::io::Result<()> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, none)?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
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
