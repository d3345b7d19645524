//! The binary's command line and lifecycle: --help, clear errors with exit
//! code 64 for bad configuration, health during the drain, and a graceful
//! SIGTERM that lets in-flight requests finish and exits 0.

mod support;

use std::process::Command;
use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::processor::Processor;

fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kube-audience-proxy"))
        .env_clear()
        .envs(envs.iter().copied())
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn help_documents_the_contract_flags() {
    let (code, text) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for flag in [
        "--service-account",
        "--namespace",
        "--namespace-file",
        "--kubeconfig",
        "--apiserver",
        "--grpc-listen-address",
        "--admin-listen-address",
        "--audience-parameter",
        "--audience-header",
        "--default-audience",
        "--allowed-audience",
        "--token-expiration",
        "--bind-pod",
        "--on-token-error",
        "--max-audiences",
        "--log-level",
        "--log-format",
        "[env: SERVICE_ACCOUNT=]",
        "[env: POD_NAMESPACE=]",
        "[default: 127.0.0.1:18080]",
        "[default: kubernetes-audience]",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn bad_configuration_exits_64_with_a_clear_message() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (
            &["--namespace", "d"],
            &[],
            "no ServiceAccount: pass --service-account NAME or set SERVICE_ACCOUNT",
        ),
        (
            &["--namespace-file", "/nonexistent/ns"],
            &[("SERVICE_ACCOUNT", "app")],
            "/nonexistent/ns could not be read",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--token-expiration",
                "5m",
            ],
            &[],
            "below the API server's minimum of 10m",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--kubeconfig",
                "/nonexistent/kubeconfig",
            ],
            &[],
            "cannot load kubeconfig /nonexistent/kubeconfig",
        ),
    ];
    for (args, envs, want) in cases {
        let (code, text) = run(args, envs);
        assert_eq!(code, 64, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
    }
    // Malformed values are refused by clap itself (exit 2) with the reason.
    let (code, text) = run(&["--log-level", "loud"], &[]);
    assert_eq!(code, 2);
    assert!(text.contains("invalid value 'loud'"), "{text}");
}

#[test]
fn environment_fallbacks_work() {
    // SERVICE_ACCOUNT and POD_NAMESPACE satisfy the required settings; the
    // failure then is the missing kubeconfig, which proves both were read.
    let (code, text) = run(
        &["--kubeconfig", "/nonexistent/kc"],
        &[("SERVICE_ACCOUNT", "app"), ("POD_NAMESPACE", "demo")],
    );
    assert_eq!(code, 64);
    assert!(text.contains("cannot load kubeconfig"), "{text}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let processor = Processor::start(&kubeconfig.path, &["--shutdown-delay", "1s"]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", processor.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A request whose TokenRequest takes 1.5 s is in flight when SIGTERM comes.
    api.set_latency(Duration::from_millis(1500));
    let mut client =
        envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(
            channel.clone(),
        );
    let in_flight = tokio::spawn(async move {
        support::inproc::process_one(
            &mut client,
            support::inproc::get("/?kubernetes-audience=slow"),
            None,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = processor.admin;
    let terminated = tokio::spawn(processor.terminate());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // During the drain delay: health says NOT_SERVING, /readyz 503.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let (code, _) = support::curl::get(&format!("http://{admin}/readyz")).await;
    assert_eq!(code, 503);
    // The in-flight request still gets its token.
    let answer = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert!(format!("{answer:?}").contains("authorization"));
    let (status, logs) = terminated.await.unwrap();
    assert!(status.success(), "exit status {status}\n{logs}");
    assert!(
        logs.contains("SIGTERM received") && logs.contains("stopped"),
        "{logs}"
    );
}
