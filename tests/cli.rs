//! The binary's command line and lifecycle: --help, clear errors with exit
//! code 64 for bad configuration, health during the drain, and a graceful
//! SIGTERM that lets in-flight requests finish and exits 0.

mod support;

use std::process::Command;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::processor::Processor;
use tonic_health::pb::health_check_response::ServingStatus;

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

/// The value a request_headers answer sets `key` to (as `raw_value`,
/// overwriting any value the client sent).
fn set_header(answer: &ProcessingResponse, key: &str) -> Option<String> {
    let Some(Response::RequestHeaders(headers)) = &answer.response else {
        panic!("expected a request_headers answer, got {answer:?}");
    };
    let mutation = headers
        .response
        .as_ref()
        .and_then(|common| common.header_mutation.as_ref())
        .expect("a header mutation");
    let option = mutation
        .set_headers
        .iter()
        .find(|option| option.header.as_ref().is_some_and(|h| h.key == key))?;
    assert_eq!(
        option.append_action,
        HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    );
    let header = option.header.as_ref()?;
    assert!(header.value.is_empty(), "{key} is sent as raw_value");
    Some(String::from_utf8(header.raw_value.clone()).unwrap())
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
        "--allow-local-destinations",
        "[env: KUBE_AUDIENCE_PROXY_ALLOW_LOCAL_DESTINATIONS=]",
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
    // Every invalid flag is reported at once, one line each, and the admin
    // address is refused like the gRPC one (64, not clap's 2).
    let (code, text) = run(
        &[
            "--namespace",
            "d",
            "--grpc-listen-address",
            "nope",
            "--admin-listen-address",
            "nope",
            "--token-expiration",
            "5m",
        ],
        &[],
    );
    assert_eq!(code, 64, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "kube-audience-proxy: no ServiceAccount: pass --service-account NAME or set SERVICE_ACCOUNT",
            "kube-audience-proxy: --token-expiration 5m is below the API server's minimum of 10m",
            "kube-audience-proxy: --grpc-listen-address \"nope\": expected a loopback IP:PORT or unix:/path",
            "kube-audience-proxy: --admin-listen-address \"nope\": expected IP:PORT",
        ],
        "{text}"
    );
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
    let arrived = api.token_requests_arrived();
    let in_flight = tokio::spawn(async move {
        support::inproc::process_one(
            &mut client,
            support::inproc::get("/?kubernetes-audience=slow"),
            None,
        )
        .await
    });
    api.wait_for_token_requests_arrived(arrived + 1, Duration::from_secs(10))
        .await;
    // Watch health before the signal, so the change to NOT_SERVING is seen
    // as it happens, well within the 1 s drain delay.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let admin = processor.admin;
    let terminated = tokio::spawn(processor.terminate());
    // During the drain delay: health says NOT_SERVING, /readyz 503.
    let not_serving = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(answer) = health.message().await.unwrap() {
            if answer.status() == ServingStatus::NotServing {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(not_serving, Ok(true), "health reports NOT_SERVING");
    // Done watching (the server ends watch streams itself after the delay,
    // see sigterm_ends_health_watch_streams_after_the_delay).
    drop(health);
    let (code, _) = support::curl::get(&format!("http://{admin}/readyz")).await;
    assert_eq!(code, 503);
    // The in-flight request still gets its token.
    let answer = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(set_header(&answer, ":path").as_deref(), Some("/"));
    let authorization = set_header(&answer, "authorization").expect("authorization is set");
    let token = authorization
        .strip_prefix("Bearer ")
        .expect("the Bearer scheme");
    let claims = api
        .verifier()
        .verify_now(token, Some("slow"))
        .expect("a valid token from the API server");
    assert_eq!(claims.aud, ["slow"]);
    assert_eq!(claims.sub, "system:serviceaccount:demo:app");
    assert!(api.issued_tokens().iter().any(|issued| issued == token));
    let (status, logs) = terminated.await.unwrap();
    assert!(status.success(), "exit status {status}\n{logs}");
    assert!(
        logs.contains("SIGTERM received") && logs.contains("stopped"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_persisted_ca_survives_a_restart_and_its_key_is_never_logged() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (key, cert, dest) = (path("ca.key"), path("ca.pem"), path("ca.crt"));
    let args = [
        "--intercept-host",
        "localhost",
        "--ca-key-file",
        key.as_str(),
        "--ca-cert-file",
        cert.as_str(),
        "--ca-file-destination",
        dest.as_str(),
        "--log-level",
        "all",
    ];
    let first = Processor::start(&kubeconfig.path, &args).await;
    let (status, logs_first) = first.terminate().await;
    assert!(status.success());
    let ca_first = std::fs::read_to_string(&dest).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), ca_first);

    let second = Processor::start(&kubeconfig.path, &args).await;
    let (status, logs_second) = second.terminate().await;
    assert!(status.success());
    assert_eq!(
        std::fs::read_to_string(&dest).unwrap(),
        ca_first,
        "same CA after a restart"
    );
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for logs in [&logs_first, &logs_second] {
        assert!(!logs.contains("PRIVATE KEY"));
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!logs.contains(line), "a key line leaked into the log");
        }
    }
    assert!(!key_body.is_empty());

    // An unwritable destination stops the start with a clear message.
    let (code, text) = run(
        &[
            "--service-account",
            "app",
            "--namespace",
            "demo",
            "--kubeconfig",
            kubeconfig.path.to_str().unwrap(),
            "--intercept-host",
            "localhost",
            "--ca-file-destination",
            "/nonexistent-dir/ca.crt",
        ],
        &[],
    );
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("cannot write /nonexistent-dir/ca.crt"),
        "{text}"
    );
}

/// A gRPC client watching health (as gRPC's client-side health checking
/// does) holds a stream open for as long as the server lives: at SIGTERM it
/// sees NOT_SERVING, then its stream ends once the drain delay is over, so
/// the drain does not wait for its in-flight bound.
#[tokio::test]
async fn sigterm_ends_health_watch_streams_after_the_delay() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let processor = Processor::start(&kubeconfig.path, &["--shutdown-delay", "1s"]).await;
    let channel = support::inproc::connect(&processor.grpc).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Ready first (readiness reports SERVING once the listeners serve).
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(answer) = health.message().await.unwrap() {
            if answer.status() == ServingStatus::Serving {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true));
    let signalled = tokio::time::Instant::now();
    let terminated = tokio::spawn(processor.terminate());
    let mut seen = vec![];
    let watched = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match health.message().await {
                Ok(Some(answer)) => seen.push(answer.status().as_str_name().to_owned()),
                Ok(None) => {
                    seen.push("end of stream".to_owned());
                    break;
                }
                Err(status) => {
                    seen.push(format!("error {:?}", status.code()));
                    break;
                }
            }
        }
    })
    .await;
    assert!(watched.is_ok(), "{seen:?}");
    let (status, logs) = terminated.await.unwrap();
    let took = signalled.elapsed();
    println!("watch saw {seen:?}; SIGTERM to exit {took:?}");
    let prompt = took < Duration::from_secs(1 + 10) && !logs.contains("did not finish in time");
    let observed = format!(
        "watch: {}; exit {} {}",
        seen.join(", then "),
        status.code().unwrap_or(-1),
        if prompt {
            "after the drain delay, without waiting for the in-flight bound"
        } else {
            "only at the in-flight bound"
        }
    );
    support::reliability::check("processor-sigterm-health-watch", &observed);
}
