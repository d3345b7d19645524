//! Interception certificates under hostile or worn inputs: case variants of
//! one name share one `--max-certificates` slot on every SDS path (real
//! gRPC on loopback, and the real Envoy driven by a real TLS client), the
//! spellings Envoy holds a secret for are bounded too, and a
//! persisted CA that is expired, nearly expired or constrained to other
//! hosts stops the real binary with one clear line and exit code 64.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::envoy::{self, Envoy};
use support::inproc::{InProcess, config};
use support::processor::Processor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const DEADLINE: Duration = Duration::from_secs(10);

/// The distinct spellings served at once with `--max-certificates 1`: each
/// held name's first, and 64 more (README, "Interception": 4 per
/// `--max-certificates`, at least 64).
const SPELLINGS_WITH_ONE_SLOT: usize = 1 + 64;

/// The `i`th case variant of `base`: the letters picked by the bits of
/// `i * 41` (an odd factor: a bijection modulo 2^letters, so the variants
/// are distinct and spread over the name) in upper case, and a trailing dot
/// when `dot`.
fn variant(base: &str, i: usize, dot: bool) -> String {
    let bits = i * 41;
    let mut letter = 0;
    let mut name: String = base
        .chars()
        .map(|c| {
            if !c.is_ascii_alphabetic() {
                return c;
            }
            letter += 1;
            if bits >> (letter - 1) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    if dot {
        name.push('.');
    }
    name
}

fn secret_name(any: &Any) -> String {
    assert_eq!(any.type_url, Secret::type_url());
    Secret::decode(any.value.as_slice()).unwrap().name
}

fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

async fn next<T>(responses: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("an answer")
        .unwrap()
        .expect("the stream is open")
}

/// One delta stream with `name` subscribed, as Envoy's on-demand selector
/// opens one per name: the request sender (keeps the stream open) and the
/// answer.
async fn delta_subscribe(
    client: &mut SecretDiscoveryServiceClient<tonic::transport::Channel>,
    name: &str,
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
    DeltaDiscoveryResponse,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(subscribe(&[name])).await.unwrap();
    let mut responses = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let answer = next(&mut responses).await;
    (tx, responses, answer)
}

#[tokio::test]
async fn fifty_case_variants_use_one_slot_over_delta_sotw_and_fetch() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let args = support::intercept_args(
        &dir.path().join("ca.crt"),
        &["*.example.com"],
        &["--max-certificates", "1"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = InProcess::start(config(&kubeconfig.path, &args)).await;
    let mut client = SecretDiscoveryServiceClient::new(proc.channel().await);
    let variants: Vec<String> = (0..50)
        .map(|i| variant("a.example.com", i, i % 3 == 0))
        .collect();
    let distinct: std::collections::HashSet<&String> = variants.iter().collect();
    assert_eq!(distinct.len(), 50);
    assert!(variants.iter().all(|v| {
        v.trim_end_matches('.')
            .eq_ignore_ascii_case("a.example.com")
    }));
    assert!(variants.contains(&"a.example.com.".to_owned()));
    assert!(variants.iter().any(|v| v.ends_with("COM")));

    // Delta, one stream per name as Envoy opens them, all kept open: each
    // is served, under its own name, with the one leaf.
    let mut open = Vec::new();
    let mut version = None;
    for name in &variants {
        let (tx, responses, answer) = delta_subscribe(&mut client, name).await;
        assert!(answer.removed_resources.is_empty(), "{name}: {answer:?}");
        let [resource] = answer.resources.as_slice() else {
            panic!("{name}: {answer:?}")
        };
        assert_eq!(resource.name, *name);
        assert_eq!(secret_name(resource.resource.as_ref().unwrap()), *name);
        assert_eq!(
            version.get_or_insert_with(|| resource.version.clone()),
            &resource.version,
            "{name}: one leaf for every variant"
        );
        open.push((tx, responses));
    }
    // The one slot is taken: another name is refused at once.
    let (_other_tx, _other, refused) = delta_subscribe(&mut client, "b.example.com").await;
    assert!(refused.resources.is_empty());
    assert_eq!(refused.removed_resources, ["b.example.com"]);

    // State of the world: every variant in one request, each answered
    // under its own name; the other name is left out.
    let (sotw_tx, sotw_rx) = mpsc::channel(4);
    let mut wanted = variants.clone();
    wanted.push("b.example.com".into());
    sotw_tx
        .send(DiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names: wanted.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut sotw = client
        .stream_secrets(ReceiverStream::new(sotw_rx))
        .await
        .unwrap()
        .into_inner();
    let answer = next(&mut sotw).await;
    let mut served: Vec<String> = answer.resources.iter().map(secret_name).collect();
    served.sort();
    let mut expected = variants.clone();
    expected.sort();
    assert_eq!(served, expected);

    // Fetch: the same.
    let fetched = client
        .fetch_secrets(DiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names: wanted,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut served: Vec<String> = fetched.resources.iter().map(secret_name).collect();
    served.sort();
    assert_eq!(served, expected);

    // When every holder is gone, the slot is free for another name.
    drop(sotw_tx);
    assert!(
        tokio::time::timeout(DEADLINE, sotw.message())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    for (tx, mut responses) in open {
        drop(tx);
        let end = tokio::time::timeout(DEADLINE, responses.message()).await;
        assert!(matches!(end, Ok(Ok(None))), "{end:?}");
    }
    let (_tx, _responses, answer) = delta_subscribe(&mut client, "b.example.com").await;
    assert_eq!(answer.resources.len(), 1, "{answer:?}");
    proc.stop().await;
}

#[tokio::test]
async fn spellings_beyond_the_bound_are_refused_like_a_full_cache() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let args = support::intercept_args(
        &dir.path().join("ca.crt"),
        &["*.example.com"],
        &["--max-certificates", "1"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = InProcess::start(config(&kubeconfig.path, &args)).await;
    let mut client = SecretDiscoveryServiceClient::new(proc.channel().await);
    let spellings: Vec<String> = (0..=SPELLINGS_WITH_ONE_SLOT)
        .map(|i| variant("metrics.example.com", i, false))
        .collect();
    let (served, over) = spellings.split_at(SPELLINGS_WITH_ONE_SLOT);
    let over = over[0].as_str();

    // Up to the bound: one stream per spelling, as Envoy opens them, each
    // served and kept open (Envoy keeps a secret per spelling).
    let mut open = Vec::new();
    for name in served {
        let (tx, responses, answer) = delta_subscribe(&mut client, name).await;
        assert_eq!(answer.resources.len(), 1, "{name}: {answer:?}");
        open.push((tx, responses));
    }
    // One spelling more is refused at once, as a new name is.
    let (_tx, _responses, refused) = delta_subscribe(&mut client, over).await;
    assert!(refused.resources.is_empty(), "{refused:?}");
    assert_eq!(refused.removed_resources, [over]);
    // A spelling held already is still served, to another stream too.
    let (_tx, _responses, again) = delta_subscribe(&mut client, &served[3]).await;
    assert_eq!(again.resources.len(), 1, "{again:?}");
    let fetched = client
        .fetch_secrets(DiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names: vec![served[5].clone(), over.to_owned()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = fetched.resources.iter().map(secret_name).collect();
    assert_eq!(names, [served[5].clone()]);

    // A spelling whose stream ends makes room for another.
    let (tx, mut responses) = open.pop().unwrap();
    drop(tx);
    let end = tokio::time::timeout(DEADLINE, responses.message()).await;
    assert!(matches!(end, Ok(Ok(None))), "{end:?}");
    let (_tx, _responses, answer) = delta_subscribe(&mut client, over).await;
    assert_eq!(answer.resources.len(), 1, "{answer:?}");
    proc.stop().await;
}

/// `openssl s_client` through Envoy's proxy listener: CONNECT to
/// `connect`, a TLS handshake with SNI `sni`, verifying the certificate
/// against `ca` for `host`. Whether the handshake and the verification
/// succeeded, and openssl's output.
async fn handshake(proxy: &str, connect: &str, sni: &str, ca: &Path, host: &str) -> (bool, String) {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("openssl")
            .args(["s_client", "-brief", "-verify_return_error"])
            .args(["-proxy", proxy, "-connect", connect, "-servername", sni])
            .arg("-CAfile")
            .arg(ca)
            .args(["-verify_hostname", host])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("openssl s_client ends")
    .expect("openssl is installed");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let ok = output.status.success() && text.contains("Verification: OK");
    (ok, text)
}

#[tokio::test]
async fn envoy_gets_case_variants_under_their_names_from_one_slot() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let args = support::intercept_args(
        &ca,
        &["localhost", "*.localhost"],
        &["--max-certificates", "1"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &args).await;
    let mut config = envoy::shipped_config();
    envoy::point_at_processor(&mut config, &processor.grpc);
    let envoy = Envoy::start(&config).await;
    let proxy = envoy.listener.to_string();

    // Envoy's SNI mapper subscribes to each SNI as sent, one stream per
    // name, and keeps them: 50 subscriptions (and more, up to the bound on
    // spellings), one slot, one leaf.
    for i in 0..SPELLINGS_WITH_ONE_SLOT {
        let sni = variant("localhost", i, false);
        let (ok, text) = handshake(&proxy, "localhost:443", &sni, &ca, "localhost").await;
        assert!(ok, "{sni}: {text}\n{}\n{}", processor.logs(), envoy.logs());
    }
    // One spelling more: Envoy would keep a secret for it too, so it is
    // refused, and its handshake fails.
    let sni = variant("localhost", SPELLINGS_WITH_ONE_SLOT, false);
    let (ok, text) = handshake(&proxy, "localhost:443", &sni, &ca, "localhost").await;
    assert!(!ok, "{sni}: {text}");
    processor
        .wait_for_log(
            &format!("name={sni} refusal=\"too many spellings of held names"),
            DEADLINE,
        )
        .await;
    // The slot is still held: another intercepted name is refused.
    let (ok, text) = handshake(&proxy, "localhost:443", "a.localhost", &ca, "a.localhost").await;
    assert!(!ok, "{text}");
    processor
        .wait_for_log(
            "name=a.localhost refusal=\"too many certificates held",
            DEADLINE,
        )
        .await;
    let logs = processor.logs();
    assert_eq!(
        logs.matches("minted a leaf certificate").count(),
        1,
        "one leaf for every variant:\n{logs}"
    );
    assert!(!logs.contains("Envoy rejected a secret"), "{logs}");
}

// === a persisted CA at startup ===

/// Writes a CA valid from `not_before` to `not_after`, name-constrained to
/// `permitted` DNS names (none: unconstrained); returns the key and
/// certificate files.
fn persisted_ca(
    dir: &Path,
    not_before: SystemTime,
    not_after: SystemTime,
    permitted: &[&str],
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    if !permitted.is_empty() {
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: permitted
                .iter()
                .map(|n| rcgen::GeneralSubtree::DnsName((*n).to_owned()))
                .collect(),
            excluded_subtrees: Vec::new(),
        });
    }
    let cert = params.self_signed(&key).unwrap();
    let (key_file, cert_file) = (dir.join("ca.key"), dir.join("ca.pem"));
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    (key_file, cert_file)
}

/// The processor's flags for intercepting localhost with the persisted CA.
fn ca_args(dir: &Path, key: &Path, cert: &Path) -> Vec<String> {
    let mut args = support::intercept_args(&dir.join("ca.crt"), &["localhost"], &[]);
    for (flag, path) in [("--ca-key-file", key), ("--ca-cert-file", cert)] {
        args.extend([flag.to_owned(), path.to_str().unwrap().to_owned()]);
    }
    args
}

/// Runs the binary to its end (bounded); exit code and output.
async fn run_to_end(kubeconfig: &Path, args: &[String]) -> (i32, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kube-audience-proxy"))
            .env_clear()
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(support::COMMON_ARGS)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the processor stops at once")
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn a_worn_or_foreign_persisted_ca_stops_the_start() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let cases: [(&str, SystemTime, SystemTime, &[&str], &str); 3] = [
        ("expired", now - 30 * day, now - day, &[], "it expired at "),
        (
            // Valid for an hour more: less than the default 24h leaves.
            "nearly expired",
            now - 30 * day,
            now + Duration::from_secs(3600),
            &[],
            "sooner than --certificate-validity (1day) from now",
        ),
        (
            "constrained to other hosts",
            now - day,
            now + 30 * day,
            &["other.test"],
            "its name constraints do not permit --intercept-host localhost;",
        ),
    ];
    for (case, not_before, not_after, permitted, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = persisted_ca(dir.path(), not_before, not_after, permitted);
        let (code, text) = run_to_end(&kubeconfig.path, &ca_args(dir.path(), &key, &cert)).await;
        assert_eq!(code, 64, "{case}: {text}");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("cannot set up the interception CA"))
            .collect();
        let [line] = lines.as_slice() else {
            panic!("{case}: one error line: {text}")
        };
        assert!(line.contains("level=error"), "{case}: {line}");
        assert!(
            line.contains(&format!("the CA in {} cannot be used: ", cert.display())),
            "{case}: {line}"
        );
        assert!(line.contains(reason), "{case}: {line}");
        assert!(!text.contains("panicked"), "{case}: {text}");
        assert!(!text.contains("PRIVATE KEY"), "{case}: {text}");
        assert!(
            !dir.path().join("ca.crt").exists(),
            "{case}: nothing is handed to clients"
        );
    }

    // A CA valid for 30 days more, unconstrained: the processor starts,
    // and hands that very CA to the clients.
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = persisted_ca(dir.path(), now - day, now + 30 * day, &[]);
    let args = ca_args(dir.path(), &key, &cert);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &args).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.crt")).unwrap(),
        std::fs::read_to_string(&cert).unwrap()
    );
    let (status, _) = processor.terminate().await;
    assert!(status.success());
}
