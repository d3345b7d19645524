//! Token secrets over SDS, against the real processor binary and the
//! TokenRequest-compatible API server: the fast-path audiences (a
//! `--prefetch-audience` and a literal `--audience-rule` audience) are
//! served as generic secrets `Bearer <JWT>` whose JWT verifies for exactly
//! that audience; a refresh is pushed (a new `jti`); an API server that
//! fails past the usable end makes the secret be withdrawn (sent empty:
//! Envoy ignores removals of a secret it uses) before the token expires,
//! and recovery brings it back. Other names are refused. No interception
//! is configured: SDS runs for the tokens alone.
//!
//! Tokens live 40 s (`FakeApiServer::set_lifetime`): usable for 10 s (the
//! last 30 s are never used), refreshed after at most 8 s.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::jwt::{Claims, JwtVerifier, now_unix};
use support::processor::Processor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const LIFETIME: Duration = Duration::from_secs(40);
/// Bound on waiting for one event (a push, a removal, a re-add).
const DEADLINE: Duration = Duration::from_secs(40);
const PREFETCHED: &str = "prom-a";
const RULED: &str = "https://rule-b.example";
const PREFIX: &str = "kube-audience-proxy-token/";

fn name(audience: &str) -> String {
    format!("{PREFIX}{audience}")
}

struct Setup {
    api: FakeApiServer,
    processor: Processor,
    _kubeconfig: support::Kubeconfig,
}

async fn setup() -> Setup {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    api.set_lifetime(Some(LIFETIME));
    let kubeconfig = support::Kubeconfig::of(&api);
    let rule = format!("metrics.example={RULED}");
    let processor = Processor::start(
        &kubeconfig.path,
        &[
            "--prefetch-audience",
            PREFETCHED,
            "--audience-rule",
            &rule,
            "--token-request-timeout",
            "2s",
        ],
    )
    .await;
    Setup {
        api,
        processor,
        _kubeconfig: kubeconfig,
    }
}

impl Setup {
    async fn client(&self) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", self.processor.grpc))
                .unwrap()
                .connect()
                .await
                .unwrap();
        SecretDiscoveryServiceClient::new(channel)
    }

    /// Checks that no token the API server issued is in the processor's log.
    fn assert_no_token_logged(&self) {
        let logs = self.processor.logs();
        for token in self.api.issued_tokens() {
            assert!(!logs.contains(&token), "a token is in the log");
        }
    }
}

/// A secret's name and `Bearer` value.
fn secret_of(any: &Any) -> (String, String) {
    assert_eq!(any.type_url, Secret::type_url());
    let secret = Secret::decode(any.value.as_slice()).unwrap();
    let Some(secret::Type::GenericSecret(generic)) = secret.r#type else {
        panic!("{} is not a generic secret", secret.name);
    };
    let Some(Specifier::InlineString(value)) = generic.secret.unwrap().specifier else {
        panic!("{}: not an inline string", secret.name);
    };
    (secret.name, value)
}

/// The verified claims of a `Bearer <JWT>` value for exactly `audience`.
fn verify(verifier: &JwtVerifier, value: &str, audience: &str) -> Claims {
    let token = value.strip_prefix("Bearer ").expect("a Bearer value");
    let claims = verifier.verify_now(token, Some(audience)).unwrap();
    assert_eq!(
        claims.aud,
        vec![audience.to_owned()],
        "exactly that audience"
    );
    claims
}

async fn next_delta(
    responses: &mut tonic::Streaming<DeltaDiscoveryResponse>,
) -> DeltaDiscoveryResponse {
    tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("an SDS response in time")
        .unwrap()
        .expect("the stream stays open")
}

/// A delta ACK of `response`.
fn ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

#[tokio::test]
async fn delta_serves_pushes_withdraws_before_expiry_and_adds_again() {
    let s = setup().await;
    let verifier = s.api.verifier();
    let mut client = s.client().await;
    let (tx, rx) = mpsc::channel(8);
    let refused = name("not-fast-path");
    tx.send(DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_subscribe: vec![
            name(PREFETCHED),
            name(RULED),
            refused.clone(),
            "metrics.example".into(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    // Both fast-path tokens arrive (in one response or several); the other
    // names are refused at once (no interception: the SNI-like name too).
    let mut jti = std::collections::HashMap::new();
    // The expiry of the last token sent per audience.
    let mut last_exp = std::collections::HashMap::new();
    let mut removed = Vec::new();
    while jti.len() < 2 {
        let response = next_delta(&mut responses).await;
        tx.send(ack(&response)).await.unwrap();
        removed.extend(response.removed_resources.clone());
        for resource in &response.resources {
            let (secret_name, value) = secret_of(resource.resource.as_ref().unwrap());
            assert_eq!(secret_name, resource.name);
            let audience = secret_name.strip_prefix(PREFIX).unwrap();
            let claims = verify(&verifier, &value, audience);
            last_exp.insert(audience.to_owned(), claims.exp);
            jti.insert(audience.to_owned(), claims.jti);
        }
    }
    removed.sort();
    assert_eq!(removed, vec![refused.clone(), "metrics.example".to_owned()]);

    // A refresh is pushed on the open stream: a new jti, a valid token.
    let first = jti[PREFETCHED].clone();
    let pushed = loop {
        let response = next_delta(&mut responses).await;
        tx.send(ack(&response)).await.unwrap();
        assert!(
            response.removed_resources.is_empty(),
            "nothing removed while healthy"
        );
        let mut found = None;
        for resource in &response.resources {
            let (n, value) = secret_of(resource.resource.as_ref().unwrap());
            let audience = n.strip_prefix(PREFIX).unwrap().to_owned();
            let claims = verify(&verifier, &value, &audience);
            last_exp.insert(audience.clone(), claims.exp);
            if audience == PREFETCHED {
                found = Some(claims);
            }
        }
        if let Some(claims) = found {
            break claims;
        }
    };
    assert_ne!(pushed.jti, first, "a new token after the refresh");

    // The API server fails from now on: every token secret is withdrawn
    // (sent empty) at its usable end, while the last token sent still has
    // 30 s to live (checked with a generous margin), never after it expired.
    s.api.inject(Fault::Status(503), usize::MAX);
    let mut gone = std::collections::HashSet::new();
    while gone.len() < 2 {
        let response = next_delta(&mut responses).await;
        tx.send(ack(&response)).await.unwrap();
        assert!(
            response.removed_resources.is_empty(),
            "Envoy ignores removals"
        );
        for resource in &response.resources {
            let (n, value) = secret_of(resource.resource.as_ref().unwrap());
            let audience = n.strip_prefix(PREFIX).unwrap().to_owned();
            if value.is_empty() {
                let left = last_exp[&audience] - now_unix();
                assert!(
                    left >= 15,
                    "{audience} withdrawn {left} s before its token expired"
                );
                gone.insert(audience);
            } else {
                assert!(
                    !gone.contains(&audience),
                    "a token while the API server fails"
                );
                let claims = verify(&verifier, &value, &audience);
                last_exp.insert(audience, claims.exp);
            }
        }
    }

    // Recovery: minted again and sent again.
    s.api.clear_faults();
    let mut back = std::collections::HashSet::new();
    while back.len() < 2 {
        let response = next_delta(&mut responses).await;
        tx.send(ack(&response)).await.unwrap();
        for resource in &response.resources {
            let (n, value) = secret_of(resource.resource.as_ref().unwrap());
            let audience = n.strip_prefix(PREFIX).unwrap().to_owned();
            verify(&verifier, &value, &audience);
            back.insert(audience);
        }
    }
    s.assert_no_token_logged();
    let (status, metrics) =
        support::curl::get(&format!("http://{}/metrics", s.processor.admin)).await;
    assert_eq!(status, 200);
    // Sent: both first tokens, at least one refresh pushed, both again
    // after recovery (the family alone would be there at 0).
    let sent: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kube_audience_proxy_sds_token_secrets_sent_total "))
        .expect("the sent counter")
        .trim()
        .parse()
        .unwrap();
    assert!(sent >= 5, "{sent} token secrets counted as sent");
    for family in [
        "sds_token_secrets_withdrawn_total 2",
        "sds_token_secrets_refused_total 1",
        "sds_streams 1",
    ] {
        assert!(metrics.contains(family), "{family} in\n{metrics}");
    }
}

async fn next_sotw(responses: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("an SDS response in time")
        .unwrap()
        .expect("the stream stays open")
}

#[tokio::test]
async fn sotw_serves_the_set_and_pushes_a_refresh() {
    let s = setup().await;
    let verifier = s.api.verifier();
    let mut client = s.client().await;
    let (tx, rx) = mpsc::channel(8);
    let names = vec![name(PREFETCHED), name("not-fast-path")];
    tx.send(DiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names: names.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let response = next_sotw(&mut responses).await;
        tx.send(DiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names: names.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let secrets: Vec<(String, String)> = response.resources.iter().map(secret_of).collect();
        // Only the fast-path name; once its token is there it stays in the set.
        assert!(
            secrets.iter().all(|(n, _)| *n == name(PREFETCHED)),
            "{:?}",
            secrets.iter().map(|s| &s.0).collect::<Vec<_>>()
        );
        if let Some((_, value)) = secrets.first() {
            let jti = verify(&verifier, value, PREFETCHED).jti;
            if seen.last() != Some(&jti) {
                seen.push(jti);
            }
        } else {
            assert!(seen.is_empty(), "the token left the set while healthy");
        }
    }
    assert_ne!(seen[0], seen[1], "a new token after the refresh");
    s.assert_no_token_logged();
}
