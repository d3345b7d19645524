//! Secret-carrying newtypes.
//!
//! A bound ServiceAccount token is a credential: whoever holds it can call the
//! audience it was minted for. These types make sure it cannot reach a log
//! line, an error message or a metric by accident: every secret sits in a
//! [`Redacted`], whose `Debug` and `Display` print a placeholder, there is no
//! `Serialize`, and the value is only reachable through an explicit,
//! greppable `expose_secret` / [`Token::bearer_header_value`].

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

const REDACTED: &str = "[REDACTED]";

/// A bearer token. Cheap to clone: the header value `Bearer <token>` is built
/// once when the token arrives and shared by every request that uses it.
/// `Debug` prints `Token([REDACTED])`; there is no `Display`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token(Redacted<Bytes>);

const BEARER_PREFIX: &str = "Bearer ";

impl Token {
    /// Wraps a token string. Returns `None` for an empty token or one that
    /// could not be carried in an HTTP header (control characters, spaces,
    /// non-ASCII), so a malformed API server answer never becomes a header.
    pub fn new(token: String) -> Option<Token> {
        let valid = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return None;
        }
        let mut bearer = String::with_capacity(BEARER_PREFIX.len() + token.len());
        bearer.push_str(BEARER_PREFIX);
        bearer.push_str(&token);
        Some(Token(Redacted::new(Bytes::from(bearer))))
    }

    /// The raw token. Only for writing it where it belongs.
    pub fn expose_secret(&self) -> &str {
        // The prefix is ASCII and the token was checked to be ASCII, so the
        // slice is on a char boundary and valid UTF-8.
        std::str::from_utf8(&self.bearer_header_value()[BEARER_PREFIX.len()..]).unwrap_or_default()
    }

    /// `Bearer <token>`, shared (no copy of the token per call). Only for
    /// writing it into the `authorization` header.
    pub fn bearer_header_value(&self) -> &Bytes {
        self.0.expose_secret()
    }
}

/// A value that must never be printed: `Debug` and `Display` write
/// `[REDACTED]` whatever `T` is. The one redacting wrapper of the crate:
/// every credential-holding field is a `Redacted<_>`, so a derived `Debug`
/// on the struct around it is safe.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Redacted<T>(T);

impl<T> Redacted<T> {
    /// Wraps a secret value.
    pub(crate) fn new(value: T) -> Redacted<T> {
        Redacted(value)
    }

    /// The value. Only for writing it where it belongs.
    pub(crate) fn expose_secret(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A PEM private key (a leaf's). `Debug` and `Display` print a placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyPem(Redacted<Arc<str>>);

impl KeyPem {
    /// Wraps a PEM key.
    pub(crate) fn new(pem: String) -> KeyPem {
        KeyPem(Redacted::new(Arc::from(pem)))
    }

    /// The PEM text. Only for handing it to Envoy.
    pub(crate) fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Display for KeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let token = Token::new("eyJhbGciOiJSUzI1NiJ9.secret-part.sig".into()).unwrap();
        assert_eq!(format!("{token:?}"), "Token([REDACTED])");
        assert_eq!(
            format!("{:#?}", Some(&token)),
            "Some(\n    Token(\n        [REDACTED],\n    ),\n)"
        );
        for shown in [format!("{token:?}"), format!("{:#?}", Some(&token))] {
            assert!(!shown.contains("secret-part"), "{shown}");
        }
        assert_eq!(
            token.expose_secret(),
            "eyJhbGciOiJSUzI1NiJ9.secret-part.sig"
        );
        assert_eq!(
            token.bearer_header_value().as_ref(),
            b"Bearer eyJhbGciOiJSUzI1NiJ9.secret-part.sig"
        );
    }

    #[test]
    fn redacted_hides_any_value() {
        let key = KeyPem::new("-----BEGIN PRIVATE KEY-----\nsecret\n".into());
        assert_eq!(format!("{key:?}"), "KeyPem([REDACTED])");
        assert_eq!(format!("{key}"), "[REDACTED]");
        let bytes = Redacted::new(Bytes::from_static(b"secret"));
        assert_eq!(format!("{bytes:?} {bytes}"), "[REDACTED] [REDACTED]");
    }

    #[test]
    fn rejects_tokens_that_cannot_be_header_values() {
        for bad in ["", "a b", "a\nb", "tök", "a\tb"] {
            assert!(Token::new(bad.into()).is_none(), "{bad:?}");
        }
    }
}
