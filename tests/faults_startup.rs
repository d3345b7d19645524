//! Startup faults against the real binary: each one ends the start with one
//! clear line on stderr and a non-zero exit, before the processor announces
//! itself (never a crash later, never a panic); an API server that is down
//! is the exception (it is a runtime condition, see
//! `a_dead_api_server_starts_not_ready_with_the_reason`).

#[path = "faults/kubeconfig.rs"]
mod kubeconfig;
mod support;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use kubeconfig::dead_kubeconfig;
use support::processor::Processor;
use support::reliability;

/// Runs the binary with `COMMON_ARGS`, `--kubeconfig kubeconfig` and
/// `extra` (bounded in time); returns its exit code and stderr.
fn run(kubeconfig: &Path, extra: &[&str]) -> (i32, String) {
    let mut child = std::process::Command::new(support::processor::binary())
        .env_clear()
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(support::COMMON_ARGS)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "still running after 20 s, it should have exited at startup:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // Polls the exit status under the deadline.
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.stdout.is_empty(), "stdout: {:?}", output.stdout);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The error lines of `stderr`: a logfmt `level=error` line, or a line of
/// the plain `kube-audience-proxy: ...` form used before logging is up.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("level=error") || l.starts_with("kube-audience-proxy: "))
        .collect()
}

/// `exit N, K error line, M other`, after asserting the one error line names
/// `cause`, nothing panicked and the processor never announced itself.
fn outcome(code: i32, stderr: &str, cause: &str) -> String {
    let errors = error_lines(stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("kube-audience-proxy ready"), "{stderr}");
    assert!(
        errors.iter().any(|l| l.contains(cause)),
        "no error line names {cause:?}:\n{stderr}"
    );
    let others = stderr.lines().count() - errors.len();
    format!("exit {code}, {} error line, {others} other", errors.len())
}

#[test]
fn an_unwritable_ca_destination_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_kubeconfig(dir.path());
    // A missing directory, and a destination that is a directory (root may
    // write into a read-only directory, so that is no test when run as root).
    let missing = dir.path().join("missing/ca.crt");
    let (code, stderr) = run(
        &kubeconfig,
        &[
            "--intercept-host",
            "localhost",
            "--ca-file-destination",
            missing.to_str().unwrap(),
        ],
    );
    let observed = outcome(
        code,
        &stderr,
        &format!("cannot write {}", missing.display()),
    );
    let (code, stderr) = run(
        &kubeconfig,
        &[
            "--intercept-host",
            "localhost",
            "--ca-file-destination",
            dir.path().to_str().unwrap(),
        ],
    );
    let is_dir = outcome(
        code,
        &stderr,
        &format!("cannot write {}", dir.path().display()),
    );
    assert_eq!(is_dir, observed);
    reliability::check("startup-ca-destination-unwritable", &observed);
}

#[test]
fn a_missing_namespace_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_kubeconfig(dir.path());
    let missing = dir.path().join("namespace");
    // Without --namespace: COMMON_ARGS' is overridden by an empty one.
    let (code, stderr) = run(
        &kubeconfig,
        &[
            "--namespace",
            "",
            "--namespace-file",
            missing.to_str().unwrap(),
        ],
    );
    let observed = outcome(
        code,
        &stderr,
        &format!("{} could not be read", missing.display()),
    );
    reliability::check("startup-namespace-file-missing", &observed);
}

#[test]
fn a_garbage_kubeconfig_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "{{{ this: is [not a kubeconfig\n\0\u{1}").unwrap();
    let (code, stderr) = run(&kubeconfig, &[]);
    let observed = outcome(
        code,
        &stderr,
        &format!("cannot load kubeconfig {}", kubeconfig.display()),
    );
    reliability::check("startup-kubeconfig-garbage", &observed);
}

#[test]
fn a_corrupt_ca_key_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_kubeconfig(dir.path());
    let key = dir.path().join("ca.key");
    let cert = dir.path().join("ca.pem");
    // A valid CA certificate, a key file that is not a key.
    let ca = support::tls::TestCa::generate("corrupt-key test CA");
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = run(
        &kubeconfig,
        &[
            "--intercept-host",
            "localhost",
            "--ca-file-destination",
            dir.path().join("ca.crt").to_str().unwrap(),
            "--ca-key-file",
            key.to_str().unwrap(),
            "--ca-cert-file",
            cert.to_str().unwrap(),
        ],
    );
    let observed = outcome(code, &stderr, &key.display().to_string());
    reliability::check("startup-ca-key-corrupt", &observed);
}

#[test]
fn a_taken_port_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_kubeconfig(dir.path());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run(&kubeconfig, &["--grpc-listen-address", &address]);
    let grpc = outcome(
        code,
        &stderr,
        &format!("cannot listen on {address} for gRPC"),
    );
    reliability::check("startup-grpc-port-taken", &grpc);
    let (code, stderr) = run(&kubeconfig, &["--admin-listen-address", &address]);
    let admin = outcome(
        code,
        &stderr,
        &format!("cannot listen on {address} for the admin endpoints"),
    );
    reliability::check("startup-admin-port-taken", &admin);
}

/// A Unix socket another processor listens on is taken like a port: the
/// second start exits, and the first keeps its socket (a socket file nobody
/// listens on, left by a killed process, is replaced: see
/// `tests/faults_process.rs`).
#[tokio::test]
async fn a_unix_socket_in_use_stops_the_start_and_stays_with_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_kubeconfig(dir.path());
    let address = format!("unix:{}", dir.path().join("kap.sock").display());
    let owner = Processor::start(&kubeconfig, &["--grpc-listen-address", &address]).await;
    let (code, stderr) = run(&kubeconfig, &["--grpc-listen-address", &address]);
    let second = outcome(
        code,
        &stderr,
        &format!("cannot listen on {address} for gRPC"),
    );
    let channel = support::inproc::connect(&address).await;
    let still = support::inproc::health_status(channel, "").await;
    let (exit, _) = owner.terminate().await;
    let observed = format!(
        "{second}; the owner still answers: {}, exit {}",
        still.as_str_name(),
        exit.code().unwrap_or(-1)
    );
    reliability::check("startup-unix-socket-in-use", &observed);
}

#[tokio::test]
async fn a_dead_api_server_starts_not_ready_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_kubeconfig(dir.path());
    let processor = Processor::start(
        &kubeconfig,
        &[
            "--prefetch-audience",
            "https://a.example",
            "--log-level",
            "info",
        ],
    )
    .await;
    processor
        .wait_for_log(
            "could not learn the issuer of the API server",
            Duration::from_secs(20),
        )
        .await;
    // A request that needs a token gets the processor's 503 at once.
    let channel = support::inproc::connect(&processor.grpc).await;
    let mut client = ExternalProcessorClient::new(channel);
    let answer = support::inproc::process_one(
        &mut client,
        support::inproc::get("/?kubernetes-audience=https://a.example"),
        None,
    )
    .await
    .unwrap();
    let token_request = match answer.response {
        Some(Response::ImmediateResponse(immediate)) => immediate.status.unwrap().code,
        other => panic!("{other:?}"),
    };
    let (status, body) = support::curl::get(&format!("http://{}/readyz", processor.admin)).await;
    assert!(body.contains("https://a.example"), "{body}");
    let (healthz, _) = support::curl::get(&format!("http://{}/healthz", processor.admin)).await;
    let (exit, logs) = processor.terminate().await;
    assert!(!logs.contains("panicked"), "{logs}");
    let observed = format!(
        "running, /healthz {healthz}, /readyz {status}, a request for a token {token_request}, \
         {} error line, exit {}",
        error_lines(&logs).len(),
        exit.code().unwrap_or(-1)
    );
    reliability::check("startup-apiserver-dead", &observed);
}
