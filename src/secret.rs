//! Secret-carrying newtypes.
//!
//! A bound ServiceAccount token is a credential: whoever holds it can call the
//! audience it was minted for. These types make sure it cannot reach a log
//! line, an error message or a metric by accident: `Debug` and `Display` print
//! a placeholder, there is no `Serialize`, and the value is only reachable
//! through an explicit, greppable [`Token::expose_secret`] /
//! [`Token::bearer_header_value`].

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

const REDACTED: &str = "[REDACTED]";

/// A bearer token. Cheap to clone: the header value `Bearer <token>` is built
/// once when the token arrives and shared by every request that uses it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Bearer <token>`, the exact bytes written into the header mutation.
    bearer: Bytes,
    /// A wire encoding derived from `bearer` once, shared by every request
    /// that uses this token (see `ext_proc::wire`).
    encoded: OnceLock<Bytes>,
}

impl PartialEq for Inner {
    fn eq(&self, other: &Self) -> bool {
        self.bearer == other.bearer
    }
}

impl Eq for Inner {}

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
        Some(Token {
            inner: Arc::new(Inner {
                bearer: Bytes::from(bearer),
                encoded: OnceLock::new(),
            }),
        })
    }

    /// The raw token. Only for writing it where it belongs.
    pub fn expose_secret(&self) -> &str {
        // The prefix is ASCII and the token was checked to be ASCII, so the
        // slice is on a char boundary and valid UTF-8.
        std::str::from_utf8(&self.inner.bearer[BEARER_PREFIX.len()..]).unwrap_or_default()
    }

    /// `Bearer <token>`, shared (no copy of the token per call).
    pub fn bearer_header_value(&self) -> &Bytes {
        &self.inner.bearer
    }

    /// An encoding of the bearer header value built by `encode` on first
    /// use and then shared for the token's lifetime. Only `ext_proc::wire`
    /// uses it; it is as secret as the token.
    pub fn encoded_with(&self, encode: impl FnOnce(&Bytes) -> Bytes) -> &Bytes {
        self.inner
            .encoded
            .get_or_init(|| encode(&self.inner.bearer))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(")?;
        f.write_str(REDACTED)?;
        f.write_str(")")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A value that must never be printed: `Debug` and `Display` write
/// `[REDACTED]` whatever `T` is. The one redacting wrapper of the crate:
/// every credential-holding field is a `Redacted<_>`, so a derived `Debug`
/// on the struct around it is safe.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Redacted<T>(T);

impl<T> Redacted<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Redacted<T> {
        Redacted(value)
    }

    /// The value. Only for writing it where it belongs.
    pub fn expose_secret(&self) -> &T {
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
pub struct KeyPem(Redacted<Arc<str>>);

impl KeyPem {
    /// Wraps a PEM key.
    pub fn new(pem: String) -> KeyPem {
        KeyPem(Redacted::new(Arc::from(pem)))
    }

    /// The PEM text. Only for handing it to Envoy.
    pub fn expose_secret(&self) -> &str {
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
    fn debug_and_display_never_show_the_token() {
        let token = Token::new("eyJhbGciOiJSUzI1NiJ9.secret-part.sig".into()).unwrap();
        assert_eq!(format!("{token:?}"), "Token([REDACTED])");
        assert_eq!(format!("{token}"), "[REDACTED]");
        assert_eq!(
            format!("{:#?}", Some(&token)),
            "Some(\n    Token([REDACTED]),\n)"
        );
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
    fn rejects_tokens_that_cannot_be_header_values() {
        for bad in ["", "a b", "a\nb", "tök", "a\tb"] {
            assert!(Token::new(bad.into()).is_none(), "{bad:?}");
        }
    }
}
