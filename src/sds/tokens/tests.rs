//! Token secrets: naming, refusal of other audiences, push on refresh,
//! withdrawal (the empty secret) at the end of the usable time and re-add,
//! on delta and SotW streams, with a paused clock.

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use super::super::certs::test_store;
use super::super::sotw::SotwStream;
use super::super::{DeltaStream, hold};
use super::*;
use crate::audience::{Audience, Source};

const A: &str = "https://kubernetes.default.svc";
const B: &str = "prometheus";

fn audience(raw: &str) -> Audience {
    Audience::parse(raw.as_bytes(), Source::Default).unwrap()
}

fn token(value: &str) -> Token {
    Token::new(value.to_owned()).unwrap()
}

/// The `Bearer ...` value of a secret, and its name.
fn value_of(any: &Any) -> (String, String) {
    let secret = Secret::decode(any.value.as_slice()).unwrap();
    let Some(secret::Type::GenericSecret(generic)) = secret.r#type else {
        panic!("not a generic secret");
    };
    let Some(Specifier::InlineString(value)) = generic.secret.unwrap().specifier else {
        panic!("not an inline string");
    };
    (secret.name, value)
}

fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

#[test]
fn names_carry_the_audience_exactly_and_never_parse_as_a_host() {
    let name = secret_name(A);
    assert_eq!(
        name,
        "kube-audience-proxy-token/https://kubernetes.default.svc"
    );
    assert_eq!(audience_of(&name), Some(A));
    assert_eq!(audience_of("example.com"), None);
    assert_eq!(audience_of("::1"), None);
    // The certificate store refuses a token name: no leaf is ever minted
    // for it, with or without interception.
    let certs = test_store(4);
    assert!(certs.hold(&secret_name("localhost")).is_err());
    assert!(hold(None, "localhost").is_err());
}

#[tokio::test(start_paused = true)]
async fn delta_refuses_pushes_withdraws_and_adds_again() {
    let (a, b) = (secret_name(A), secret_name(B));
    let pinned = Pinned::for_tests(&[audience(A)]);
    let secrets = TokenSecrets::new(pinned.clone(), None);
    let mut watch = secrets.watch();
    let mut stream = DeltaStream::new(None, Some(&secrets));

    // B is not fast-path and example.com is not intercepted: both refused
    // at once; A has no token yet, so nothing is sent for it.
    let first = stream
        .on_request(subscribe(&[&a, &b, "example.com"]))
        .await
        .unwrap()
        .unwrap();
    assert!(first.resources.is_empty());
    assert_eq!(
        first.removed_resources,
        vec!["example.com".to_owned(), b.clone()]
    );
    assert_eq!(secrets.metrics().counts(), (0, 0, 1));

    // The first token: the store's watch fires, and it is sent.
    pinned.store_for_tests(&audience(A), token("one"), Duration::from_secs(100));
    changed(Some(&mut watch)).await;
    let sent = stream.rotate().await.unwrap();
    assert_eq!(sent.resources.len(), 1);
    assert_eq!(sent.resources[0].name, a);
    let (name, value) = value_of(sent.resources[0].resource.as_ref().unwrap());
    assert_eq!((name.as_str(), value.as_str()), (a.as_str(), "Bearer one"));
    let first_version = sent.resources[0].version.clone();
    assert_eq!(
        stream.next_rotation(),
        Some(Instant::now() + Duration::from_secs(100))
    );
    // Nothing changed: no push.
    assert!(stream.rotate().await.is_none());

    // A refresh: pushed with a new version.
    tokio::time::advance(Duration::from_secs(80)).await;
    pinned.store_for_tests(&audience(A), token("two"), Duration::from_secs(100));
    changed(Some(&mut watch)).await;
    let pushed = stream.rotate().await.unwrap();
    let (_, value) = value_of(pushed.resources[0].resource.as_ref().unwrap());
    assert_eq!(value, "Bearer two");
    assert_ne!(pushed.resources[0].version, first_version);

    // No refresh before the usable end: withdrawn at that very moment,
    // sent empty under a new version (a removal Envoy would ignore).
    let end = stream.next_rotation().unwrap();
    assert_eq!(end, Instant::now() + Duration::from_secs(100));
    tokio::time::sleep_until(end).await;
    let withdrawn = stream.rotate().await.unwrap();
    assert!(withdrawn.removed_resources.is_empty());
    assert_eq!(withdrawn.resources.len(), 1);
    let (name, value) = value_of(withdrawn.resources[0].resource.as_ref().unwrap());
    assert_eq!((name.as_str(), value.as_str()), (a.as_str(), ""));
    assert_ne!(withdrawn.resources[0].version, pushed.resources[0].version);
    assert_eq!(stream.next_rotation(), None, "nothing left to time");
    assert!(stream.rotate().await.is_none(), "withdrawn once");

    // Minted again: sent again.
    pinned.store_for_tests(&audience(A), token("three"), Duration::from_secs(100));
    let again = stream.rotate().await.unwrap();
    let (_, value) = value_of(again.resources[0].resource.as_ref().unwrap());
    assert_eq!(value, "Bearer three");
    assert_eq!(secrets.metrics().counts(), (3, 1, 1));

    // Unsubscribed: no more pushes.
    let unsubscribe = DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_unsubscribe: vec![a.clone()],
        ..Default::default()
    };
    assert!(stream.on_request(unsubscribe).await.unwrap().is_none());
    pinned.store_for_tests(&audience(A), token("four"), Duration::from_secs(100));
    assert!(stream.rotate().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn delta_serves_leaves_and_tokens_on_one_stream() {
    let certs = test_store(2);
    let pinned = Pinned::for_tests(&[audience(A)]);
    pinned.store_for_tests(&audience(A), token("one"), Duration::from_secs(100));
    let secrets = TokenSecrets::new(pinned, None);
    let mut stream = DeltaStream::new(Some(&certs), Some(&secrets));
    let a = secret_name(A);
    let answer = stream
        .on_request(subscribe(&["localhost", &a]))
        .await
        .unwrap()
        .unwrap();
    let mut names: Vec<&str> = answer.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, vec![a.as_str(), "localhost"]);
    // The token name took no certificate slot: the second one is free.
    assert!(certs.hold("a.example.com").is_ok());
}

#[tokio::test(start_paused = true)]
async fn sotw_sends_the_set_again_on_refresh_and_at_the_usable_end() {
    let (a, b) = (secret_name(A), secret_name(B));
    let pinned = Pinned::for_tests(&[audience(A)]);
    let secrets = TokenSecrets::new(pinned.clone(), None);
    let mut stream = SotwStream::new(None, Some(&secrets));
    assert!(stream.set_names(vec![a.clone(), b.clone(), "example.com".into()]));
    assert!(stream.response().await.resources.is_empty(), "no token yet");
    assert!(!stream.tokens_changed());

    pinned.store_for_tests(&audience(A), token("one"), Duration::from_secs(100));
    assert!(stream.tokens_changed());
    let response = stream.response().await;
    let sent: Vec<(String, String)> = response.resources.iter().map(value_of).collect();
    assert_eq!(sent, vec![(a.clone(), "Bearer one".to_owned())]);
    assert!(!stream.tokens_changed());

    pinned.store_for_tests(&audience(A), token("two"), Duration::from_secs(100));
    assert!(stream.tokens_changed());
    let sent: Vec<(String, String)> = stream
        .response()
        .await
        .resources
        .iter()
        .map(value_of)
        .collect();
    assert_eq!(sent, vec![(a.clone(), "Bearer two".to_owned())]);

    let end = stream.next_wakeup().unwrap();
    tokio::time::sleep_until(end).await;
    assert!(stream.tokens_changed());
    let sent: Vec<(String, String)> = stream
        .response()
        .await
        .resources
        .iter()
        .map(value_of)
        .collect();
    assert_eq!(
        sent,
        vec![(a.clone(), String::new())],
        "sent empty at the end"
    );
    assert_eq!(stream.next_wakeup(), None);
    assert!(!stream.tokens_changed());

    pinned.store_for_tests(&audience(A), token("three"), Duration::from_secs(100));
    assert!(stream.tokens_changed());
    assert_eq!(stream.response().await.resources.len(), 1);
}

/// An audience the API server answers to (here: the issuer, learned by
/// discovery after startup) is never served, and a token sent before is
/// withdrawn.
#[tokio::test(start_paused = true)]
async fn an_api_server_audience_is_never_served_even_when_configured() {
    // A managed cluster's issuer: no well-known name, learned at runtime.
    const ISSUER: &str = "https://oidc.example/id/cluster";
    let a = secret_name(ISSUER);
    let pinned = Pinned::for_tests(&[audience(ISSUER)]);
    let refused = crate::apiserver::ApiServerAudiences::new(std::iter::empty());
    let secrets = TokenSecrets::new(pinned.clone(), Some(refused.clone()));
    let mut stream = DeltaStream::new(None, Some(&secrets));
    stream.on_request(subscribe(&[&a])).await.unwrap();
    pinned.store_for_tests(&audience(ISSUER), token("one"), Duration::from_secs(100));
    let sent = stream.rotate().await.unwrap();
    assert_eq!(sent.resources.len(), 1);

    // Discovery learns that A is the issuer: the next sync withdraws it.
    refused.learn(ISSUER);
    pinned.store_for_tests(&audience(ISSUER), token("two"), Duration::from_secs(100));
    let withdrawn = stream.rotate().await.unwrap();
    let (_, value) = value_of(withdrawn.resources[0].resource.as_ref().unwrap());
    assert_eq!(value, "", "an API server audience's token was served");
    assert!(secrets.ready(&a, Instant::now()).is_none());
}
