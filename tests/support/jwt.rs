//! RS256 JWT minting and verification, done by hand with the `rsa` crate, the
//! way kube-apiserver signs bound ServiceAccount tokens.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::EncodePublicKey as _;
use rsa::signature::{SignatureEncoding as _, Signer as _, Verifier as _};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// Clock skew tolerated for `nbf` (and `iat`), in seconds.
pub const ALLOWED_SKEW_SECS: i64 = 5;

/// Holds an RSA key and signs tokens for one issuer.
pub struct JwtIssuer {
    issuer: String,
    kid: String,
    signing_key: SigningKey<Sha256>,
    public_key: RsaPublicKey,
}

impl JwtIssuer {
    /// Generates a fresh 2048-bit RSA key for `issuer`.
    pub fn generate(issuer: &str) -> JwtIssuer {
        let mut rng = rand::thread_rng();
        let private_key = RsaPrivateKey::new(&mut rng, 2048).expect("generate RSA key");
        let public_key = RsaPublicKey::from(&private_key);
        // Like kube-apiserver: kid = base64url(sha256(DER-encoded PKIX public key)).
        let der = public_key
            .to_public_key_der()
            .expect("encode RSA public key");
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_bytes()));
        JwtIssuer {
            issuer: issuer.to_owned(),
            kid,
            signing_key: SigningKey::<Sha256>::new(private_key),
            public_key,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims` as-is (the caller is responsible for `iss`, `exp`, ...).
    /// The header is `{"alg":"RS256","kid":"..."}`, exactly like the real apiserver.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "kid": self.kid});
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header json"));
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims json"));
        let signing_input = format!("{header}.{payload}");
        let signature = self.signing_key.sign(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(signature.to_bytes());
        format!("{signing_input}.{signature}")
    }

    pub fn verifier(&self) -> JwtVerifier {
        JwtVerifier {
            inner: Arc::new(VerifierInner {
                issuer: self.issuer.clone(),
                kid: self.kid.clone(),
                key: VerifyingKey::<Sha256>::new(self.public_key.clone()),
            }),
        }
    }
}

/// The claims of a Kubernetes bound ServiceAccount token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    pub namespace: String,
    pub service_account_name: String,
    pub service_account_uid: String,
    /// Only present when the token is bound to a Pod.
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

struct VerifierInner {
    issuer: String,
    kid: String,
    key: VerifyingKey<Sha256>,
}

/// Verifies tokens signed by one [`JwtIssuer`]. Cheap to clone.
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<VerifierInner>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.inner.issuer)
            .field("kid", &self.inner.kid)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// Checks structure, `alg` (RS256 only), `kid` (when present), signature,
    /// `iss`, `exp > now`, `nbf <= now` (with [`ALLOWED_SKEW_SECS`] of skew), the
    /// `kubernetes.io` claim and its consistency with `sub`, and, when
    /// `expected_audience` is given, that `aud` contains it.
    ///
    /// Error strings never contain the token.
    pub fn verify(
        &self,
        token: &str,
        expected_audience: Option<&str>,
        now_unix: i64,
    ) -> Result<Claims, String> {
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3 {
            return Err(format!(
                "malformed JWT: expected 3 dot-separated segments, got {}",
                parts.len()
            ));
        }
        let header = decode_json_segment(parts[0], "header")?;
        match header.get("alg").and_then(Value::as_str) {
            Some("RS256") => {}
            Some(other) => return Err(format!("unsupported alg {other:?} (want RS256)")),
            None => return Err("JWT header has no alg".into()),
        }
        if let Some(kid) = header.get("kid")
            && kid.as_str() != Some(self.inner.kid.as_str())
        {
            return Err(format!("unknown kid {kid}"));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(parts[2])
            .map_err(|e| format!("malformed JWT signature encoding: {e}"))?;
        let signature = Signature::try_from(signature.as_slice())
            .map_err(|e| format!("malformed JWT signature: {e}"))?;
        let signing_input = &token[..parts[0].len() + 1 + parts[1].len()];
        self.inner
            .key
            .verify(signing_input.as_bytes(), &signature)
            .map_err(|_| "invalid JWT signature".to_string())?;

        let payload = decode_json_segment(parts[1], "payload")?;
        let iss = str_claim(&payload, "iss")?;
        if iss != self.inner.issuer {
            return Err(format!(
                "wrong issuer {iss:?} (want {:?})",
                self.inner.issuer
            ));
        }
        let sub = str_claim(&payload, "sub")?;
        let aud = match payload.get("aud") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| "aud contains a non-string".to_string())
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::String(s)) => vec![s.clone()],
            Some(_) => return Err("aud is neither a string nor an array".into()),
            None => return Err("missing claim aud".into()),
        };
        let exp = int_claim(&payload, "exp")?;
        let iat = int_claim(&payload, "iat")?;
        let nbf = int_claim(&payload, "nbf")?;
        let jti = str_claim(&payload, "jti")?;
        if exp <= now_unix {
            return Err(format!("token expired {}s ago", now_unix - exp));
        }
        if nbf > now_unix + ALLOWED_SKEW_SECS {
            return Err(format!("token not valid yet (nbf in {}s)", nbf - now_unix));
        }
        if iat > now_unix + ALLOWED_SKEW_SECS {
            return Err(format!(
                "token issued in the future (iat in {}s)",
                iat - now_unix
            ));
        }

        let kube = payload
            .get("kubernetes.io")
            .and_then(Value::as_object)
            .ok_or("missing claim kubernetes.io")?;
        let namespace = kube
            .get("namespace")
            .and_then(Value::as_str)
            .ok_or("missing kubernetes.io.namespace")?
            .to_owned();
        let sa = kube
            .get("serviceaccount")
            .and_then(Value::as_object)
            .ok_or("missing kubernetes.io.serviceaccount")?;
        let service_account_name = sa
            .get("name")
            .and_then(Value::as_str)
            .ok_or("missing kubernetes.io.serviceaccount.name")?
            .to_owned();
        let service_account_uid = sa
            .get("uid")
            .and_then(Value::as_str)
            .ok_or("missing kubernetes.io.serviceaccount.uid")?
            .to_owned();
        let (pod_name, pod_uid) = match kube.get("pod") {
            None => (None, None),
            Some(pod) => {
                let name = pod
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or("missing kubernetes.io.pod.name")?;
                let uid = pod
                    .get("uid")
                    .and_then(Value::as_str)
                    .ok_or("missing kubernetes.io.pod.uid")?;
                (Some(name.to_owned()), Some(uid.to_owned()))
            }
        };
        let expected_sub = format!("system:serviceaccount:{namespace}:{service_account_name}");
        if sub != expected_sub {
            return Err(format!(
                "sub {sub:?} does not match kubernetes.io claim ({expected_sub:?})"
            ));
        }

        if let Some(want) = expected_audience
            && !aud.iter().any(|a| a == want)
        {
            return Err(format!("audience {want:?} not in aud {aud:?}"));
        }

        Ok(Claims {
            iss,
            sub,
            aud,
            exp,
            iat,
            nbf,
            jti,
            namespace,
            service_account_name,
            service_account_uid,
            pod_name,
            pod_uid,
        })
    }

    /// [`verify`](Self::verify) against the current wall clock.
    pub fn verify_now(
        &self,
        token: &str,
        expected_audience: Option<&str>,
    ) -> Result<Claims, String> {
        self.verify(token, expected_audience, now_unix())
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Decodes the payload of a JWT without verifying anything (for debugging and
/// assertions on tokens from elsewhere).
pub fn decode_payload_unverified(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    decode_json_segment(payload, "payload").ok()
}

fn decode_json_segment(segment: &str, what: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| format!("malformed JWT {what} encoding: {e}"))?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("malformed JWT {what} JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!("JWT {what} is not a JSON object"));
    }
    Ok(value)
}

fn str_claim(payload: &Value, name: &str) -> Result<String, String> {
    match payload.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("claim {name} is not a string")),
        None => Err(format!("missing claim {name}")),
    }
}

fn int_claim(payload: &Value, name: &str) -> Result<i64, String> {
    match payload.get(name) {
        Some(v) => v
            .as_i64()
            .ok_or_else(|| format!("claim {name} is not an integer")),
        None => Err(format!("missing claim {name}")),
    }
}
