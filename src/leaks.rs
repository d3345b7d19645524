//! No credential in any `Debug` output or panic message: every type that
//! holds a token or a private key, printed every way a log line, an error
//! chain or a panic would print it, shows none of it.
//!
//! The end-to-end side (logs at every level, error bodies, metrics, files)
//! is in `tests/redaction.rs` and `tests/leaks.rs`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use prost::Message as _;

use crate::ca::{CaSettings, CertificateAuthority};
use crate::intercept::InterceptHosts;
use crate::sds::certs;
use crate::secret::{KeyPem, Redacted, Token};
use crate::tokens::{Error, IssuedToken};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;

/// A token whose every part is recognisable.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.cGF5bG9hZC1zZWNyZXQ.c2lnbmF0dXJlLXNlY3JldA";

/// The parts of `secret` that must not show: every line of a PEM body, or
/// every dot-separated part of a JWT.
fn pieces(secret: &str) -> Vec<&str> {
    if secret.contains("-----BEGIN") {
        secret
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .collect()
    } else {
        secret.split('.').collect()
    }
}

fn assert_hidden(shown: &str, secret: &str, what: &str) {
    let pieces = pieces(secret);
    assert!(!pieces.is_empty(), "{what}: nothing to look for");
    for piece in pieces {
        assert!(!shown.contains(piece), "{what} shows `{piece}`: {shown}");
    }
}

/// Every way a value is printed by a log field, an error chain or `dbg!`.
fn renderings<T: std::fmt::Debug>(value: &T) -> [String; 3] {
    [
        format!("{value:?}"),
        format!("{value:#?}"),
        format!("{:?}", Some(Box::new(value))),
    ]
}

/// The message of the panic `f` raises (what the panic hook prints).
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("the closure panics");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

fn issued() -> IssuedToken {
    IssuedToken {
        token: Token::new(TOKEN.into()).unwrap(),
        expires_at: SystemTime::now() + Duration::from_secs(600),
    }
}

#[test]
fn token_holders_never_show_the_token() {
    let token = Token::new(TOKEN.into()).unwrap();
    assert_eq!(
        token.expose_secret(),
        TOKEN,
        "the test token is the one checked"
    );
    for shown in renderings(&token) {
        assert_hidden(&shown, TOKEN, "Token");
    }
    for shown in renderings(&issued()) {
        assert_hidden(&shown, TOKEN, "IssuedToken");
    }
    let result: Result<IssuedToken, Error> = Ok(issued());
    for shown in renderings(&result) {
        assert_hidden(&shown, TOKEN, "Result<IssuedToken, Error>");
    }
    let bearer = Redacted::new(format!("Bearer {TOKEN}"));
    for shown in renderings(&bearer).into_iter().chain([bearer.to_string()]) {
        assert_hidden(&shown, TOKEN, "Redacted");
    }
}

// The point is to unwrap a value known to be the wrong variant.
#[allow(clippy::unnecessary_literal_unwrap)]
#[test]
fn panics_never_carry_a_token() {
    let messages = [
        panic_message(|| {
            let failed: Result<(), IssuedToken> = Err(issued());
            failed.unwrap();
        }),
        panic_message(|| {
            let minted: Result<IssuedToken, Error> = Ok(issued());
            minted.unwrap_err();
        }),
        panic_message(|| {
            let other = Token::new(format!("{TOKEN}x")).unwrap();
            assert_eq!(Token::new(TOKEN.into()).unwrap(), other);
        }),
        panic_message(|| {
            let token = Token::new(TOKEN.into()).unwrap();
            panic!("unexpected {token:?} in {:?}", issued());
        }),
    ];
    for message in messages {
        assert!(
            message.contains("REDACTED"),
            "the panic printed the value: {message}"
        );
        assert_hidden(&message, TOKEN, "a panic message");
    }
}

#[allow(clippy::unnecessary_literal_unwrap)]
#[tokio::test]
async fn keys_never_show_in_the_ca_or_the_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, cert_file) = (dir.path().join("ca.key"), dir.path().join("ca.pem"));
    let settings = CaSettings {
        destination: dir.path().join("ca.crt"),
        persisted: Some((key_file.clone(), cert_file)),
        validity: Duration::from_secs(86_400),
    };
    let hosts = InterceptHosts::new(["localhost"]).unwrap();
    let ca = CertificateAuthority::init(
        &settings,
        &hosts,
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    let ca_key = std::fs::read_to_string(&key_file).unwrap();
    assert!(ca_key.contains("PRIVATE KEY"));
    for shown in renderings(&ca).into_iter().chain(renderings(&settings)) {
        assert_hidden(&shown, &ca_key, "CertificateAuthority");
    }
    let failed: Result<(), CertificateAuthority> = Err(ca);
    assert_hidden(
        &panic_message(|| failed.unwrap()),
        &ca_key,
        "a panic message",
    );

    let leaf =
        CertificateAuthority::generate(&hosts, Duration::from_secs(86_400), SystemTime::now())
            .unwrap()
            .mint_leaf(
                &["localhost"],
                &[],
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .unwrap();
    let leaf_key = leaf.key.expose_secret().to_owned();
    for shown in renderings(&leaf.key)
        .into_iter()
        .chain([leaf.key.to_string()])
    {
        assert_hidden(&shown, &leaf_key, "KeyPem");
    }
    assert_hidden(
        &format!("{:?}", KeyPem::new(leaf_key.clone())),
        &leaf_key,
        "KeyPem",
    );

    // The leaf as the SDS store holds it: its key is what Envoy receives.
    let store = certs::test_store(4);
    let slot = store.hold("localhost").unwrap();
    let minted = store.get(&slot).await.unwrap();
    let secret = Secret::decode(minted.any("localhost").value.as_slice()).unwrap();
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("a TLS certificate secret");
    };
    let served_key = match tls.private_key.and_then(|k| k.specifier) {
        Some(Specifier::InlineString(key)) => key,
        Some(Specifier::InlineBytes(key)) => String::from_utf8(key).unwrap(),
        other => panic!("an inline private key, not {other:?}"),
    };
    assert!(served_key.contains("PRIVATE KEY"));
    for shown in renderings(&minted) {
        assert_hidden(&shown, &served_key, "the SDS store's leaf");
    }
}
