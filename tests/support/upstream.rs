//! A plain-HTTP (HTTP/1.1 and h2c prior-knowledge) or HTTPS (ALPN `h2` and
//! `http/1.1`, certificate from its own test CA) upstream that verifies the
//! bearer JWT of every request, records what it received and answers with a
//! JSON description of it (never the token itself).
//!
//! A request whose path starts with `/status/NNN` is answered with status NNN
//! (same JSON body), for tests of error pass-through; `/status/3xx?location=URL`
//! also carries `location: URL` (percent-decoded), for redirect tests.
//!
//! Test fixture only; never part of the shipped binary.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::apiserver::random_string;
use super::jwt::{Claims, JwtVerifier, now_unix};
use super::tls::{ConnInfo, TestCa, spawn_accept_loop};

/// Largest request body the upstream reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // a test fixture; matching on `Valid(claims)` stays simple
pub enum TokenVerdict {
    /// No `Authorization` header.
    Missing,
    /// A bearer JWT that verified (signature, `iss`, `exp`, `nbf`); `aud` is
    /// not checked here, compare `claims.aud` in the test.
    Valid(Claims),
    /// Anything else (bad token, non-bearer scheme, several headers, ...).
    Invalid(String),
}

impl TokenVerdict {
    pub fn claims(&self) -> Option<&Claims> {
        match self {
            TokenVerdict::Valid(c) => Some(c),
            _ => None,
        }
    }

    pub fn is_valid(&self) -> bool {
        matches!(self, TokenVerdict::Valid(_))
    }

    /// The `aud` claim of a valid token; panics (failing the test) otherwise.
    pub fn audiences(&self) -> Vec<String> {
        match self {
            TokenVerdict::Valid(claims) => claims.aud.clone(),
            other => panic!("expected a valid token, got {other:?}"),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            TokenVerdict::Missing => json!({"token": "missing"}),
            TokenVerdict::Invalid(reason) => json!({"token": "invalid", "reason": reason}),
            TokenVerdict::Valid(c) => {
                let pod = match (&c.pod_name, &c.pod_uid) {
                    (Some(name), Some(uid)) => json!({"name": name, "uid": uid}),
                    _ => Value::Null,
                };
                json!({
                    "token": "valid",
                    "aud": c.aud,
                    "sub": c.sub,
                    "iss": c.iss,
                    "exp_in_secs": c.exp - now_unix(),
                    "namespace": c.namespace,
                    "service_account": c.service_account_name,
                    "pod": pod,
                })
            }
        }
    }
}

/// One request as seen by the upstream.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query exactly as received.
    pub path: String,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    pub authority: Option<String>,
    pub version: http::Version,
    /// All headers in order; the `authorization` value is replaced by `[REDACTED]`.
    pub headers: Vec<(String, String)>,
    /// The raw bearer token, for assertions only (never print it).
    pub token: Option<String>,
    pub verdict: TokenVerdict,
    pub body_len: usize,
    /// Lowercase hex SHA-256 of the body.
    pub body_sha256: String,
    pub tls: bool,
    /// The SNI the client sent (None for plain HTTP, or when the client sent
    /// none, as for an IP address).
    pub sni: Option<String>,
}

impl Received {
    /// Values of header `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }
}

struct UpstreamState {
    verifier: JwtVerifier,
    received: Mutex<Vec<Received>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The test CA of an HTTPS upstream.
struct UpstreamCa {
    pem: String,
    common_name: String,
}

pub struct Upstream {
    state: Arc<UpstreamState>,
    addr: SocketAddr,
    /// `Some` for HTTPS.
    ca: Option<UpstreamCa>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Plain HTTP/1.1 and h2c (prior knowledge) on `127.0.0.1:0`.
    pub async fn start(verifier: JwtVerifier) -> Upstream {
        Upstream::serve(verifier, None).await
    }

    /// Plain HTTP/1.1 and h2c on `bind` (a loopback `IP:0`, e.g. `[::1]:0`).
    /// Binding fails loudly where that loopback address does not exist.
    pub async fn start_on(verifier: JwtVerifier, bind: &str) -> Upstream {
        Upstream::serve_on(verifier, None, bind).await
    }

    /// HTTPS (ALPN `h2`, `http/1.1`) on `127.0.0.1:0`, with a serving
    /// certificate for `names` (IP addresses become IP SANs, the rest DNS
    /// SANs) issued by a fresh test CA (see [`ca_pem`](Self::ca_pem)).
    pub async fn start_tls(verifier: JwtVerifier, names: &[&str]) -> Upstream {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        // Key generation is CPU-bound; keep it off the async workers.
        let (ca, config) = tokio::task::spawn_blocking(move || {
            let ca = TestCa::generate(&format!(
                "kube-audience-proxy test upstream CA {}",
                random_string(8)
            ));
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let config = ca.server_config(&names, "kube-audience-proxy test upstream");
            let ca = UpstreamCa {
                pem: ca.cert_pem(),
                common_name: ca.common_name().to_owned(),
            };
            (ca, config)
        })
        .await
        .expect("generate upstream certificates");
        Upstream::serve(verifier, Some((ca, TlsAcceptor::from(Arc::new(config))))).await
    }

    async fn serve(verifier: JwtVerifier, tls: Option<(UpstreamCa, TlsAcceptor)>) -> Upstream {
        Upstream::serve_on(verifier, tls, "127.0.0.1:0").await
    }

    async fn serve_on(
        verifier: JwtVerifier,
        tls: Option<(UpstreamCa, TlsAcceptor)>,
        bind: &str,
    ) -> Upstream {
        let state = Arc::new(UpstreamState {
            verifier,
            received: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("bind upstream on {bind}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let (ca, acceptor) = tls.unzip();
        let handler_state = state.clone();
        let task = spawn_accept_loop(listener, acceptor, move |req| {
            handle(handler_state.clone(), req)
        });
        Upstream {
            state,
            addr,
            ca,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://127.0.0.1:PORT` for
    /// [`start_tls`](Self::start_tls).
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The PEM of the test CA that issued the serving certificate (None for
    /// plain HTTP).
    pub fn ca_pem(&self) -> Option<String> {
        self.ca.as_ref().map(|ca| ca.pem.clone())
    }

    /// The common name of the test CA (unique per upstream; None for plain
    /// HTTP), to tell which issuer a client saw.
    pub fn ca_issuer_cn(&self) -> Option<String> {
        self.ca.as_ref().map(|ca| ca.common_name.clone())
    }

    /// Writes [`ca_pem`](Self::ca_pem) to `path`; panics for a plain upstream.
    pub fn write_ca(&self, path: &Path) {
        let pem = self.ca_pem().expect("a plain-HTTP upstream has no CA");
        std::fs::write(path, pem).expect("write upstream CA");
    }

    pub fn received(&self) -> Vec<Received> {
        lock(&self.state.received).clone()
    }

    pub fn last(&self) -> Option<Received> {
        lock(&self.state.received).last().cloned()
    }

    /// The single request received so far; panics (failing the test) if
    /// there were none or several.
    pub fn only_received(&self) -> Received {
        let mut received = self.received();
        assert_eq!(
            received.len(),
            1,
            "the upstream got exactly one request: {received:#?}"
        );
        received.remove(0)
    }

    pub fn count(&self) -> usize {
        lock(&self.state.received).len()
    }

    pub fn clear(&self) {
        lock(&self.state.received).clear();
    }
}

async fn handle(state: Arc<UpstreamState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let conn = parts
        .extensions
        .get::<ConnInfo>()
        .cloned()
        .unwrap_or_default();
    let method = parts.method.to_string();
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.path().to_owned());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        });
    let version = parts.version;
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = if name == AUTHORIZATION {
                "[REDACTED]".to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.as_str().to_owned(), value)
        })
        .collect();

    let (token, verdict) = check_authorization(&state.verifier, &parts.headers);

    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let code = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return json_response(code, &json!({"error": format!("reading body: {e}")}));
        }
    };
    let body_sha256: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let status = path
        .strip_prefix("/status/")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);

    let description = json!({
        "method": method,
        "path": path,
        "authority": authority,
        "version": version_name(version),
        "verdict": verdict.to_json(),
        "headers": headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        "body_len": body.len(),
        "body_sha256": body_sha256,
    });

    let redirect_to = status.is_redirection().then(|| location(&path)).flatten();
    lock(&state.received).push(Received {
        method,
        path,
        authority,
        version,
        headers,
        token,
        verdict,
        body_len: body.len(),
        body_sha256,
        tls: conn.tls,
        sni: conn.sni,
    });

    let mut response = json_response(status, &description);
    if let Some(location) = redirect_to {
        response
            .headers_mut()
            .insert(http::header::LOCATION, location);
    }
    response
}

/// The percent-decoded `location` query parameter of `path`, as a header value.
fn location(path: &str) -> Option<HeaderValue> {
    let (_, query) = path.split_once('?')?;
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("location="))?;
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    HeaderValue::from_str(&decoded).ok()
}

fn check_authorization(
    verifier: &JwtVerifier,
    headers: &http::HeaderMap,
) -> (Option<String>, TokenVerdict) {
    let values: Vec<&HeaderValue> = headers.get_all(AUTHORIZATION).iter().collect();
    match values.as_slice() {
        [] => (None, TokenVerdict::Missing),
        [value] => {
            let Ok(value) = value.to_str() else {
                return (
                    None,
                    TokenVerdict::Invalid("authorization header is not valid ASCII".into()),
                );
            };
            let Some((scheme, token)) = value.split_once(' ') else {
                return (
                    None,
                    TokenVerdict::Invalid("authorization header has no scheme".into()),
                );
            };
            if !scheme.eq_ignore_ascii_case("bearer") {
                return (
                    None,
                    TokenVerdict::Invalid(format!("authorization scheme {scheme:?} is not Bearer")),
                );
            }
            let token = token.trim().to_owned();
            let verdict = match verifier.verify(&token, None, now_unix()) {
                Ok(claims) => TokenVerdict::Valid(claims),
                Err(reason) => TokenVerdict::Invalid(reason),
            };
            (Some(token), verdict)
        }
        many => (
            None,
            TokenVerdict::Invalid(format!("{} authorization headers", many.len())),
        ),
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// How the echo body names an HTTP version.
fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}
