//! The SDS service over real gRPC on loopback, driven like Envoy's on-demand
//! certificate selector drives it (delta), plus state-of-the-world and fetch.
//! The secrets are checked as certificates: names, issuer, key.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::inproc::{InProcess, config};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct Setup {
    proc: InProcess,
    ca_pem: String,
    _api: FakeApiServer,
    _kubeconfig: support::Kubeconfig,
    _dir: tempfile::TempDir,
}

async fn setup(extra: &[&str]) -> Setup {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let args = support::intercept_args(&ca, &["localhost", "*.example.com", "127.0.0.1"], extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = InProcess::start(config(&kubeconfig.path, &args)).await;
    Setup {
        proc,
        ca_pem: std::fs::read_to_string(&ca).unwrap(),
        _api: api,
        _kubeconfig: kubeconfig,
        _dir: dir,
    }
}

/// A delta stream: a sender for requests and the responses.
async fn delta(
    s: &Setup,
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    let mut client = SecretDiscoveryServiceClient::new(s.proc.channel().await);
    let (tx, rx) = mpsc::channel(8);
    let responses = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

async fn next(responses: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("an answer")
        .unwrap()
        .unwrap()
}

/// The requests sent so far got no answer: a probe subscription sent now is
/// answered next. A stream answers in order, so an answer to anything sent
/// before the probe would arrive first and fail the check.
async fn silent(
    tx: &mpsc::Sender<DeltaDiscoveryRequest>,
    responses: &mut tonic::Streaming<DeltaDiscoveryResponse>,
    probe: &str,
) {
    tx.send(subscribe(&[probe])).await.unwrap();
    let answer = next(responses).await;
    let names: Vec<&str> = answer.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, [probe], "unexpected answer: {answer:?}");
    assert!(answer.removed_resources.is_empty(), "{answer:?}");
}

/// Decodes a secret and checks its leaf: SANs, issuer = the CA, a key.
fn check_secret(any: &Any, ca_pem: &str, want_name: &str, want_san: &str) {
    assert_eq!(any.type_url, Secret::type_url());
    let secret = Secret::decode(any.value.as_slice()).unwrap();
    assert_eq!(secret.name, want_name);
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("not a TLS certificate")
    };
    let pem = match tls.certificate_chain.unwrap().specifier.unwrap() {
        Specifier::InlineBytes(b) => String::from_utf8(b).unwrap(),
        other => panic!("{other:?}"),
    };
    let key = match tls.private_key.unwrap().specifier.unwrap() {
        Specifier::InlineBytes(b) => String::from_utf8(b).unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(
        pem.ends_with(ca_pem),
        "the chain ends with the CA written for clients"
    );
    let (_, leaf) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let leaf = leaf.parse_x509().unwrap();
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
    let ca = ca.parse_x509().unwrap();
    assert_eq!(leaf.issuer(), ca.subject());
    leaf.verify_signature(Some(ca.public_key()))
        .expect("signed by the CA");
    let sans = format!(
        "{:?}",
        leaf.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
    );
    assert!(sans.contains(want_san), "{sans}");
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(lifetime <= 24 * 3600 + 300, "short-lived leaf: {lifetime}s");
}

#[tokio::test]
async fn delta_first_response_ack_nack_and_refusal() {
    let s = setup(&[]).await;
    let (tx, mut responses) = delta(&s).await;
    tx.send(subscribe(&["localhost"])).await.unwrap();
    let first = next(&mut responses).await;
    assert_eq!(first.resources.len(), 1);
    assert!(first.removed_resources.is_empty());
    assert!(!first.nonce.is_empty());
    let resource = &first.resources[0];
    assert_eq!(resource.name, "localhost");
    check_secret(
        resource.resource.as_ref().unwrap(),
        &s.ca_pem,
        "localhost",
        "localhost",
    );

    // ACK: nothing more is sent.
    tx.send(DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    silent(&tx, &mut responses, "probe-1.example.com").await;

    // A refused name is removed at once; a NACK of that answer gets no resend.
    tx.send(subscribe(&["evil.test"])).await.unwrap();
    let refused = next(&mut responses).await;
    assert!(refused.resources.is_empty());
    assert_eq!(refused.removed_resources, ["evil.test"]);
    assert_ne!(refused.nonce, first.nonce);
    tx.send(DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        response_nonce: refused.nonce.clone(),
        error_detail: Some(envoy_types::pb::google::rpc::Status {
            code: 3,
            message: "test NACK".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    silent(&tx, &mut responses, "probe-2.example.com").await;

    // Another stream for the same name gets the same (cached) certificate.
    let (tx2, mut responses2) = delta(&s).await;
    tx2.send(subscribe(&["localhost"])).await.unwrap();
    let again = next(&mut responses2).await;
    assert_eq!(again.resources[0].version, resource.version);
}

#[tokio::test]
async fn sni_less_secret_is_the_ip_certificate() {
    let s = setup(&[]).await;
    let (tx, mut responses) = delta(&s).await;
    tx.send(subscribe(&["_kube-audience-proxy-no-sni"]))
        .await
        .unwrap();
    let answer = next(&mut responses).await;
    let any = answer.resources[0].resource.as_ref().unwrap();
    check_secret(
        any,
        &s.ca_pem,
        "_kube-audience-proxy-no-sni",
        "127, 0, 0, 1",
    );
}

#[tokio::test]
async fn the_number_of_names_is_bounded() {
    let s = setup(&["--max-certificates", "2"]).await;
    let (tx, mut responses) = delta(&s).await;
    tx.send(subscribe(&[
        "a.example.com",
        "b.example.com",
        "c.example.com",
    ]))
    .await
    .unwrap();
    let answer = next(&mut responses).await;
    assert_eq!(answer.resources.len(), 2);
    assert_eq!(answer.removed_resources, ["c.example.com"]);
    // Closing the stream gives the slots back.
    drop(tx);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    let (tx, mut responses) = delta(&s).await;
    tx.send(subscribe(&["c.example.com"])).await.unwrap();
    assert_eq!(next(&mut responses).await.resources.len(), 1);
}

#[tokio::test]
async fn state_of_the_world_and_fetch() {
    let s = setup(&[]).await;
    let mut client = SecretDiscoveryServiceClient::new(s.proc.channel().await);
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let request = |names: &[&str], version: &str, nonce: &str| DiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(request(&["localhost", "evil.test"], "", ""))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 1, "only the name that may be minted");
    check_secret(&first.resources[0], &s.ca_pem, "localhost", "localhost");
    // ACK: silence. The answer to the next request (a new name) comes
    // next, with both names; an answer to the ACK would have come first,
    // with one.
    tx.send(request(
        &["localhost", "evil.test"],
        &first.version_info,
        &first.nonce,
    ))
    .await
    .unwrap();
    tx.send(request(
        &["localhost", "a.example.com"],
        &first.version_info,
        &first.nonce,
    ))
    .await
    .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.resources.len(), 2);
    assert_ne!(second.nonce, first.nonce);

    let fetched = client
        .fetch_secrets(request(&["a.example.com"], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.resources.len(), 1);
    check_secret(
        &fetched.resources[0],
        &s.ca_pem,
        "a.example.com",
        "a.example.com",
    );
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let s = setup(&[]).await;
    let (tx, mut responses) = delta(&s).await;
    tx.send(subscribe(&["localhost"])).await.unwrap();
    next(&mut responses).await;
    // SDS streams live as long as Envoy; shutting down must end them rather
    // than wait for Envoy to go away.
    let Setup { proc, .. } = s;
    let stop = tokio::spawn(proc.stop());
    let end = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("the stream ends before the drain timeout");
    assert!(matches!(end, Ok(None)), "a clean end of stream: {end:?}");
    stop.await.unwrap();
    drop(tx);
}
