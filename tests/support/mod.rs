//! Test fixtures shared by the integration tests and the demo example.
//!
//! Nothing in here is part of the shipped binary.
// Compiled into several test binaries, each using a different subset; fixture
// setup may unwrap (a broken fixture should fail the test loudly).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod curl;
pub mod envoy;
pub mod hostile;
pub mod inproc;
pub mod jwt;
pub mod processor;
pub mod reliability;
pub mod stack;
pub mod tls;
pub mod upstream;

/// The value after `name` on this process's command line, or `default`
/// (the benchmark and demo binaries' flag parsing).
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

/// A kubeconfig for the test API server, in a temporary directory that lives
/// as long as this value.
pub struct Kubeconfig {
    /// The file.
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Kubeconfig {
    /// Writes the kubeconfig of `api`.
    pub fn of(api: &apiserver::FakeApiServer) -> Kubeconfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        api.write_kubeconfig(&path);
        Kubeconfig { path, _dir: dir }
    }
}

/// Processor flags every test shares: the test API server's ServiceAccount
/// `app` in `demo`, ephemeral loopback ports, no drain delay, and
/// [`ALLOW_LOCAL`] (every test upstream is on loopback).
pub const COMMON_ARGS: &[&str] = &[
    "--service-account",
    "app",
    "--namespace",
    "demo",
    "--grpc-listen-address",
    "127.0.0.1:0",
    "--admin-listen-address",
    "127.0.0.1:0",
    "--shutdown-delay",
    "0s",
    ALLOW_LOCAL,
];

/// The opt-in the tests share: without it the processor refuses every
/// loopback destination, and every test upstream is one.
pub const ALLOW_LOCAL: &str = "--allow-local-destinations";

/// [`COMMON_ARGS`] without [`ALLOW_LOCAL`]: the shipped default, local
/// destinations refused.
pub fn common_args_refusing_local() -> Vec<&'static str> {
    COMMON_ARGS
        .iter()
        .copied()
        .filter(|arg| *arg != ALLOW_LOCAL)
        .collect()
}

/// Processor flags to intercept `hosts`, writing the CA certificate to
/// `ca_file`; `extra` flags follow.
pub fn intercept_args(ca_file: &std::path::Path, hosts: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--ca-file-destination".to_owned(),
        ca_file.to_str().unwrap().to_owned(),
    ];
    for host in hosts {
        args.extend(["--intercept-host".to_owned(), (*host).to_owned()]);
    }
    args.extend(extra.iter().map(|e| (*e).to_owned()));
    args
}
