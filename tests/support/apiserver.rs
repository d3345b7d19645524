//! A Kubernetes TokenRequest-compatible HTTPS server that behaves like
//! kube-apiserver for `POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`:
//! same status codes, `metav1.Status` error bodies, RS256 JWTs with the claims
//! of a real bound ServiceAccount token, minimum expiration, RBAC-style
//! refusals, plus fault injection for tests.
//!
//! Test fixture only; never part of the shipped binary.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use rand::Rng as _;
use rand::distributions::Alphanumeric;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::jwt::{JwtIssuer, JwtVerifier, now_unix};
use super::tls::{TestCa, spawn_accept_loop};

/// `iss` of every token by default, like a default kubeadm cluster (see
/// [`ApiServerOptions::issuer`]).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Where the server publishes its OpenID discovery document (with `issuer`).
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Audience used when a TokenRequest does not name any (`--api-audiences`).
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc";
/// `expirationSeconds` used when the request does not specify one.
pub const DEFAULT_EXPIRATION_SECS: i64 = 3600;
/// Minimum accepted `expirationSeconds` (validation error below it).
pub const MIN_EXPIRATION_SECS: i64 = 600;
/// Like `--service-account-max-token-expiration=48h`: longer requests are capped.
pub const MAX_EXPIRATION_SECS: i64 = 48 * 3600;
/// The name of the ServiceAccount the caller token belongs to (used in 403 messages).
pub const CALLER_SERVICE_ACCOUNT: &str = "kube-audience-proxy";
/// Largest request body accepted (kube-apiserver's limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiServerOptions {
    /// The only namespace the caller may mint tokens in.
    pub namespace: String,
    /// ServiceAccounts that exist in `namespace`.
    pub existing_service_accounts: Vec<String>,
    /// ServiceAccounts the caller may `create serviceaccounts/token` for.
    pub permitted_service_accounts: Vec<String>,
    /// The bearer token the caller must present.
    pub caller_token: String,
    /// The service account issuer: `iss` of every token and `issuer` of the
    /// discovery document (`--service-account-issuer`).
    pub issuer: String,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions {
            namespace: "demo".into(),
            existing_service_accounts: vec!["app".into()],
            permitted_service_accounts: vec!["app".into()],
            caller_token: random_string(32),
            issuer: ISSUER.into(),
        }
    }
}

/// A failure to inject into the next token requests (after authentication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with a `metav1.Status` of this code; the reason is chosen like
    /// the real server (500 InternalError, 503 ServiceUnavailable, 504 Timeout,
    /// 429 TooManyRequests with `Retry-After: 1`, ...).
    Status(u16),
    /// 429 with a `Retry-After` header and `details.retryAfterSeconds`.
    TooManyRequests { retry_after_secs: u64 },
    /// Sleep, then answer normally.
    Delay(Duration),
    /// Never answer (the connection is closed when the server is dropped).
    Hang,
    /// Wait until [`FakeApiServer::release_held`], then answer normally
    /// (at once once released). [`FakeApiServer::wait_for_held`] sees how
    /// many are waiting, so a test can hold requests in flight together.
    Hold,
    /// 429 with neither `Retry-After` nor `details.retryAfterSeconds`.
    TooManyRequestsWithoutRetryAfter,
    /// `201 Created` whose body is not JSON (an HTML error page of a proxy
    /// in front of the API server).
    NotJson,
    /// A token whose answer lacks `status.expirationTimestamp`.
    NoExpiration,
    /// A token that expires this many seconds after it is issued (negative:
    /// already expired), whatever `expirationSeconds` asked: `exp` and
    /// `status.expirationTimestamp` agree, as with an API server whose
    /// clock is off by the difference.
    ExpiresIn(i64),
    /// The connection is dropped after the request was read, without an
    /// answer (the client sees the connection closed mid-exchange).
    Reset,
}

/// How [`FakeApiServer::listen_again`] serves TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listening {
    /// With its own certificate, as before.
    Normal,
    /// With a certificate from another CA, which no client of this server
    /// trusts: every TLS handshake fails.
    WrongCa,
    /// Closing every connection once the client's hello arrived, before
    /// any answer: every TLS handshake is cut short.
    CloseInHandshake,
}

struct State {
    opts: ApiServerOptions,
    jwt: JwtIssuer,
    token_requests: AtomicUsize,
    /// Requests to the token path, counted on arrival.
    arrived: watch::Sender<usize>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    audiences: Mutex<HashMap<String, usize>>,
    last_request: Mutex<Option<Value>>,
    issued: Mutex<Vec<String>>,
    statuses: Mutex<Vec<u16>>,
    faults: Mutex<VecDeque<(Fault, usize)>>,
    /// Faults for the token requests of one audience (the first requested),
    /// taken before [`State::faults`]; see [`FakeApiServer::inject_for`].
    audience_faults: Mutex<HashMap<String, VecDeque<(Fault, usize)>>>,
    latency: Mutex<Duration>,
    /// When set, tokens live this long whatever `expirationSeconds` asked
    /// (a short-lived or clock-skewed API server); see [`FakeApiServer::set_lifetime`].
    lifetime: Mutex<Option<Duration>>,
    /// Authenticated requests for the discovery document, counted on arrival.
    discovery_requests: watch::Sender<usize>,
    discovery_faults: Mutex<VecDeque<(Fault, usize)>>,
    /// Requests held by [`Fault::Hold`] so far, and whether they are released.
    held: watch::Sender<usize>,
    released: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
}

/// Locks a mutex, ignoring poisoning (a panicking test must not cascade).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct FakeApiServer {
    state: Arc<State>,
    addr: SocketAddr,
    ca_pem: String,
    verifier: JwtVerifier,
    task: JoinHandle<()>,
    /// The serving configuration, for [`FakeApiServer::listen_again`].
    tls_config: Arc<rustls::ServerConfig>,
    /// Accept loops started by [`FakeApiServer::listen_again`].
    relistened: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.state.shutdown.send(true);
        self.task.abort();
        lock(&self.relistened).iter().for_each(JoinHandle::abort);
    }
}

impl FakeApiServer {
    pub async fn start(opts: ApiServerOptions) -> FakeApiServer {
        // Key generation is CPU-bound; keep it off the async workers.
        let issuer = opts.issuer.clone();
        let (jwt, (ca_pem, tls_config)) =
            tokio::task::spawn_blocking(move || (JwtIssuer::generate(&issuer), generate_tls()))
                .await
                .expect("generate keys");
        let verifier = jwt.verifier();
        let (shutdown, _) = watch::channel(false);
        let state = Arc::new(State {
            opts,
            jwt,
            token_requests: AtomicUsize::new(0),
            arrived: watch::Sender::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            audiences: Mutex::new(HashMap::new()),
            last_request: Mutex::new(None),
            issued: Mutex::new(Vec::new()),
            statuses: Mutex::new(Vec::new()),
            faults: Mutex::new(VecDeque::new()),
            audience_faults: Mutex::new(HashMap::new()),
            latency: Mutex::new(Duration::ZERO),
            lifetime: Mutex::new(None),
            discovery_requests: watch::Sender::new(0),
            discovery_faults: Mutex::new(VecDeque::new()),
            held: watch::Sender::new(0),
            released: watch::Sender::new(false),
            shutdown,
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake apiserver");
        let addr = listener.local_addr().expect("local addr");
        let handler_state = state.clone();
        let tls_config = Arc::new(tls_config);
        let task = spawn_accept_loop(
            listener,
            Some(TlsAcceptor::from(tls_config.clone())),
            move |req| handle(handler_state.clone(), req),
        );
        FakeApiServer {
            state,
            addr,
            ca_pem,
            verifier,
            task,
            tls_config,
            relistened: Mutex::new(Vec::new()),
        }
    }

    /// Closes the listener and every open connection (the API server is
    /// down: connections are refused) until [`listen_again`](Self::listen_again).
    pub fn stop_listening(&self) {
        self.task.abort();
        lock(&self.relistened)
            .drain(..)
            .for_each(|task| task.abort());
    }

    /// Listens on the same address again (after
    /// [`stop_listening`](Self::stop_listening)), serving TLS as `how` says;
    /// counters, faults and keys are those of before.
    pub async fn listen_again(&self, how: Listening) {
        self.stop_listening();
        let config = match how {
            Listening::CloseInHandshake => None,
            Listening::Normal => Some(self.tls_config.clone()),
            Listening::WrongCa => Some(Arc::new(
                tokio::task::spawn_blocking(generate_tls)
                    .await
                    .expect("generate keys")
                    .1,
            )),
        };
        // Polled with a deadline: the aborted loop drops its listener as
        // its task ends, a moment after the abort.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind {} again: {e}", self.addr),
            }
        };
        let state = self.state.clone();
        let task = match config {
            Some(config) => {
                spawn_accept_loop(listener, Some(TlsAcceptor::from(config)), move |req| {
                    handle(state.clone(), req)
                })
            }
            None => tokio::spawn(close_in_handshake(listener)),
        };
        lock(&self.relistened).push(task);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The PEM of the CA that signed the serving certificate.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub fn caller_token(&self) -> &str {
        &self.state.opts.caller_token
    }

    pub fn options(&self) -> &ApiServerOptions {
        &self.state.opts
    }

    pub fn issuer(&self) -> &str {
        &self.state.opts.issuer
    }

    /// Authenticated requests for the discovery document so far (counted
    /// on arrival, whatever their outcome).
    pub fn discovery_requests(&self) -> usize {
        *self.state.discovery_requests.borrow()
    }

    /// Waits until `n` discovery requests have arrived; panics after
    /// `deadline`.
    pub async fn wait_for_discovery_requests(&self, n: usize, deadline: Duration) {
        let mut arrived = self.state.discovery_requests.subscribe();
        let in_time = matches!(
            tokio::time::timeout(deadline, arrived.wait_for(|count| *count >= n)).await,
            Ok(Ok(_))
        );
        assert!(
            in_time,
            "{n} discovery requests expected within {deadline:?}, {} arrived",
            self.discovery_requests()
        );
    }

    /// The next `times` discovery requests get `fault` (`usize::MAX` = until
    /// [`clear_faults`](Self::clear_faults)); token requests are unaffected.
    pub fn inject_discovery(&self, fault: Fault, times: usize) {
        if times > 0 {
            lock(&self.state.discovery_faults).push_back((fault, times));
        }
    }

    /// Verifies tokens minted by this server.
    pub fn verifier(&self) -> JwtVerifier {
        self.verifier.clone()
    }

    /// Authenticated POSTs to the token path, whatever their outcome.
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Requests to the token path received so far, counted on arrival:
    /// before the added latency, authentication or any fault.
    pub fn token_requests_arrived(&self) -> usize {
        *self.state.arrived.borrow()
    }

    /// Waits until `n` requests to the token path have arrived (see
    /// [`token_requests_arrived`](Self::token_requests_arrived)); panics
    /// after `deadline`.
    pub async fn wait_for_token_requests_arrived(&self, n: usize, deadline: Duration) {
        let mut arrived = self.state.arrived.subscribe();
        let in_time = matches!(
            tokio::time::timeout(deadline, arrived.wait_for(|count| *count >= n)).await,
            Ok(Ok(_))
        );
        assert!(
            in_time,
            "{n} token requests expected within {deadline:?}, {} arrived",
            self.token_requests_arrived()
        );
    }

    /// Authenticated token requests that asked for `aud` (a request without
    /// audiences counts for [`DEFAULT_AUDIENCE`]).
    pub fn requests_for_audience(&self, aud: &str) -> usize {
        lock(&self.state.audiences).get(aud).copied().unwrap_or(0)
    }

    /// The last authenticated TokenRequest body that parsed as JSON.
    pub fn last_request(&self) -> Option<Value> {
        lock(&self.state.last_request).clone()
    }

    /// Every JWT issued so far, in order.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }

    /// HTTP status of every authenticated token request answered so far, in
    /// order of completion (hung requests are not listed).
    pub fn token_response_statuses(&self) -> Vec<u16> {
        lock(&self.state.statuses).clone()
    }

    /// Highest number of token requests that were being processed at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// The next `times` authenticated token requests get `fault`
    /// (`usize::MAX` = until [`clear_faults`](Self::clear_faults)). Several
    /// injections queue up in order.
    pub fn inject(&self, fault: Fault, times: usize) {
        if times > 0 {
            lock(&self.state.faults).push_back((fault, times));
        }
    }

    /// Waits until `n` requests are (or were) held by [`Fault::Hold`];
    /// panics after `deadline`.
    pub async fn wait_for_held(&self, n: usize, deadline: Duration) {
        let mut held = self.state.held.subscribe();
        let in_time = matches!(
            tokio::time::timeout(deadline, held.wait_for(|count| *count >= n)).await,
            Ok(Ok(_))
        );
        assert!(
            in_time,
            "{n} held requests expected within {deadline:?}, {} held",
            *self.state.held.borrow()
        );
    }

    /// Lets every request held by [`Fault::Hold`] go on, and every later
    /// one pass at once.
    pub fn release_held(&self) {
        self.state.released.send_replace(true);
    }

    /// The next `times` authenticated token requests whose first audience
    /// is `audience` get `fault` (`usize::MAX` = until
    /// [`clear_faults`](Self::clear_faults)), before any fault of
    /// [`inject`](Self::inject): several audiences fail differently at once.
    pub fn inject_for(&self, audience: &str, fault: Fault, times: usize) {
        if times > 0 {
            lock(&self.state.audience_faults)
                .entry(audience.to_owned())
                .or_default()
                .push_back((fault, times));
        }
    }

    pub fn clear_faults(&self) {
        lock(&self.state.audience_faults).clear();
        lock(&self.state.faults).clear();
        lock(&self.state.discovery_faults).clear();
    }

    /// Latency added to every token request (before anything else).
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.state.latency) = d;
    }

    /// Makes every token minted from now on expire `lifetime` after it is
    /// issued (`exp` and `status.expirationTimestamp`), whatever
    /// `expirationSeconds` asked and what the answer's spec echoes: how the
    /// tests get tokens that must be refreshed within seconds, and an API
    /// server whose clock runs ahead. `None` restores honest lifetimes.
    pub fn set_lifetime(&self, lifetime: Option<Duration>) {
        *lock(&self.state.lifetime) = lifetime;
    }

    /// Writes a kubeconfig pointing at this server with the caller token.
    pub fn write_kubeconfig(&self, path: &Path) {
        let ca = STANDARD.encode(self.ca_pem.as_bytes());
        let q = |s: &str| serde_json::to_string(s).expect("quote");
        let yaml = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake-apiserver
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: kube-audience-proxy
  user:
    token: {token}
contexts:
- name: fake
  context:
    cluster: fake-apiserver
    user: kube-audience-proxy
    namespace: {ns}
current-context: fake
preferences: {{}}
",
            server = q(&self.url()),
            token = q(&self.state.opts.caller_token),
            ns = q(&self.state.opts.namespace),
        );
        std::fs::write(path, yaml).expect("write kubeconfig");
    }
}

fn generate_tls() -> (String, rustls::ServerConfig) {
    let ca = TestCa::generate("fake-kube-apiserver-ca");
    let config = ca.server_config(&["127.0.0.1", "localhost"], "kube-apiserver");
    (ca.cert_pem(), config)
}

// ---------------------------------------------------------------------------
// Request handling

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let token_target = parse_token_path(&path);

    if token_target.is_some() {
        state.arrived.send_modify(|count| *count += 1);
        let latency = *lock(&state.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    // Always read the whole body before answering (answering early makes
    // HTTP/2 clients such as curl see a reset stream).
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.is::<http_body_util::LengthLimitError>() {
                return status_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    "Request entity too large: limit is 3145728",
                    None,
                );
            }
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("error reading request body: {e}"),
                None,
            );
        }
    };

    // Like kube-apiserver, authentication comes before routing.
    if !authenticated(&state, &parts) {
        return status_response(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        );
    }

    if path == DISCOVERY_PATH {
        return discovery(&state, &parts.method).await;
    }
    let Some((ns, name)) = token_target else {
        return not_found_path();
    };
    if parts.method != Method::POST {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        );
    }

    state.token_requests.fetch_add(1, Ordering::SeqCst);
    let now_in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state
        .max_in_flight
        .fetch_max(now_in_flight, Ordering::SeqCst);
    let _guard = InFlightGuard(state.clone());

    let resp = token_request(&state, &parts, body, &ns, &name).await;
    lock(&state.statuses).push(resp.status().as_u16());
    resp
}

struct InFlightGuard(Arc<State>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn authenticated(state: &State, req: &http::request::Parts) -> bool {
    let mut values = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && token.trim() == state.opts.caller_token
}

fn parse_token_path(path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.split('/').collect();
    match segs.as_slice() {
        [
            "",
            "api",
            "v1",
            "namespaces",
            ns,
            "serviceaccounts",
            name,
            "token",
        ] if !ns.is_empty() && !name.is_empty() => Some(((*ns).to_owned(), (*name).to_owned())),
        _ => None,
    }
}

async fn token_request(
    state: &Arc<State>,
    req: &http::request::Parts,
    body: Bytes,
    ns: &str,
    name: &str,
) -> Response<Full<Bytes>> {
    let content_type_ok = match req.headers.get(CONTENT_TYPE) {
        None => true,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().eq_ignore_ascii_case("application/json"))
            .unwrap_or(false),
    };

    // Observability first: record what was asked, whatever happens next.
    let parsed: Result<Value, serde_json::Error> = serde_json::from_slice(&body);
    if let Ok(value) = &parsed {
        *lock(&state.last_request) = Some(value.clone());
        let requested: Vec<String> = value
            .pointer("/spec/audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut auds = lock(&state.audiences);
        if requested.is_empty() {
            *auds.entry(DEFAULT_AUDIENCE.to_owned()).or_default() += 1;
        } else {
            for a in requested {
                *auds.entry(a).or_default() += 1;
            }
        }
    }

    let first_audience = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.pointer("/spec/audiences/0"))
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_AUDIENCE)
        .to_owned();
    // How the minted token's expiry is changed: `None` leaves it, `Some(None)`
    // omits it, `Some(Some(secs))` sets it `secs` after issue.
    let mut expiry: Option<Option<i64>> = None;
    if let Some(fault) = take_audience_fault(state, &first_audience).or_else(|| take_fault(state)) {
        match fault {
            Fault::Status(code) => return fault_status(code),
            Fault::TooManyRequests { retry_after_secs } => {
                return too_many_requests(retry_after_secs);
            }
            Fault::TooManyRequestsWithoutRetryAfter => return too_many_requests_bare(),
            Fault::NotJson => return not_json(),
            Fault::Reset => reset_connection(),
            Fault::NoExpiration => expiry = Some(None),
            Fault::ExpiresIn(secs) => expiry = Some(Some(secs)),
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Hold => hold(state).await,
            Fault::Hang => {
                let mut rx = state.shutdown.subscribe();
                let _ = rx.wait_for(|stopped| *stopped).await;
                return status_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "server is shutting down",
                    None,
                );
            }
        }
    }

    // Authorization (RBAC): create serviceaccounts/token.
    if ns != state.opts.namespace
        || !state
            .opts
            .permitted_service_accounts
            .iter()
            .any(|s| s == name)
    {
        let message = format!(
            "serviceaccounts \"{name}\" is forbidden: User \"system:serviceaccount:{}:{CALLER_SERVICE_ACCOUNT}\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"{ns}\"",
            state.opts.namespace
        );
        return status_response(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &message,
            Some(json!({"name": name, "kind": "serviceaccounts"})),
        );
    }

    if !content_type_ok {
        return status_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf",
            None,
        );
    }

    // Decoding.
    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            return bad_request(&format!("couldn't get version/kind; json parse error: {e}"));
        }
    };
    let spec = match decode_token_request(&value) {
        Ok(s) => s,
        Err(msg) => return bad_request(&msg),
    };
    if let Some(meta_ns) = &spec.meta_namespace
        && meta_ns != ns
    {
        return bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        );
    }
    if let Some(meta_name) = &spec.meta_name
        && meta_name != name
    {
        return bad_request(&format!(
            "name in URL {name:?} does not match name in TokenRequest {meta_name:?}"
        ));
    }

    // ServiceAccount lookup.
    if !state
        .opts
        .existing_service_accounts
        .iter()
        .any(|s| s == name)
    {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("serviceaccounts \"{name}\" not found"),
            Some(json!({"name": name, "kind": "serviceaccounts"})),
        );
    }

    // Defaulting and validation.
    let audiences = if spec.audiences.is_empty() {
        vec![DEFAULT_AUDIENCE.to_owned()]
    } else {
        spec.audiences.clone()
    };
    let requested_exp = spec.expiration_seconds.unwrap_or(DEFAULT_EXPIRATION_SECS);
    if requested_exp < MIN_EXPIRATION_SECS {
        return invalid(
            "spec.expirationSeconds",
            &format!(
                "Invalid value: {requested_exp}: may not specify a duration less than 10 minutes"
            ),
        );
    }
    if requested_exp > 1 << 32 {
        return invalid(
            "spec.expirationSeconds",
            &format!(
                "Invalid value: {requested_exp}: may not specify a duration larger than 2^32 seconds"
            ),
        );
    }
    let expiration = requested_exp.min(MAX_EXPIRATION_SECS);

    let mut bound_claim: Option<(&'static str, Value)> = None;
    if let Some(bound) = &spec.bound {
        let kind = bound.kind.as_deref().unwrap_or("");
        let api_version = bound.api_version.as_deref().unwrap_or("");
        let claim_key = match (kind, api_version) {
            ("Pod", "" | "v1") => "pod",
            ("Secret", "" | "v1") => "secret",
            _ => {
                return bad_request(&format!(
                    "cannot bind token for serviceaccount \"{name}\" to object of kind \"{kind}\" (apiVersion \"{api_version}\")"
                ));
            }
        };
        let obj_name = bound.name.as_deref().unwrap_or("");
        let obj_uid = bound.uid.as_deref().unwrap_or("");
        if obj_name.is_empty() {
            return invalid("spec.boundObjectRef.name", "Required value");
        }
        if obj_uid.is_empty() {
            return invalid("spec.boundObjectRef.uid", "Required value");
        }
        bound_claim = Some((claim_key, json!({"name": obj_name, "uid": obj_uid})));
    }

    // Mint.
    let now = now_unix();
    let exp = match (expiry, *lock(&state.lifetime)) {
        (Some(Some(secs)), _) => now + secs,
        (_, Some(lifetime)) => now + i64::try_from(lifetime.as_secs()).unwrap(),
        (_, None) => now + expiration,
    };
    let mut kube = Map::new();
    kube.insert("namespace".into(), json!(ns));
    kube.insert(
        "serviceaccount".into(),
        json!({"name": name, "uid": service_account_uid(ns, name)}),
    );
    if let Some((key, claim)) = &bound_claim {
        kube.insert((*key).into(), claim.clone());
    }
    let claims = json!({
        "aud": audiences,
        "exp": exp,
        "iat": now,
        "iss": state.opts.issuer,
        "jti": random_uuid(),
        "kubernetes.io": Value::Object(kube),
        "nbf": now,
        "sub": format!("system:serviceaccount:{ns}:{name}"),
    });
    let token = state.jwt.sign(&claims);
    lock(&state.issued).push(token.clone());

    let mut out_spec = json!({
        "audiences": audiences,
        "expirationSeconds": expiration,
    });
    if let Some(bound) = &spec.bound_raw {
        out_spec["boundObjectRef"] = bound.clone();
    }
    let body = json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "creationTimestamp": rfc3339(now),
        },
        "spec": out_spec,
        "status": if expiry == Some(None) {
            json!({"token": token})
        } else {
            json!({"token": token, "expirationTimestamp": rfc3339(exp)})
        },
    });
    json_response(StatusCode::CREATED, &body)
}

/// The OpenID discovery document, as kube-apiserver serves it to
/// authenticated callers (the default RBAC lets every ServiceAccount read
/// it), after any injected discovery fault.
async fn discovery(state: &State, method: &Method) -> Response<Full<Bytes>> {
    state.discovery_requests.send_modify(|count| *count += 1);
    if method != Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        );
    }
    if let Some(fault) = next_fault(&state.discovery_faults) {
        match fault {
            Fault::Status(code) => return fault_status(code),
            Fault::TooManyRequests { retry_after_secs } => {
                return too_many_requests(retry_after_secs);
            }
            Fault::TooManyRequestsWithoutRetryAfter => return too_many_requests_bare(),
            Fault::NotJson => return not_json(),
            Fault::Reset => reset_connection(),
            Fault::NoExpiration | Fault::ExpiresIn(_) => {}
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Hold => hold(state).await,
            Fault::Hang => {
                let mut rx = state.shutdown.subscribe();
                let _ = rx.wait_for(|stopped| *stopped).await;
                return fault_status(503);
            }
        }
    }
    let issuer = &state.opts.issuer;
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }),
    )
}

/// [`Fault::Hold`]: counted as held, then waits for the release.
async fn hold(state: &State) {
    let mut released = state.released.subscribe();
    state.held.send_modify(|count| *count += 1);
    let _ = released.wait_for(|released| *released).await;
}

fn take_fault(state: &State) -> Option<Fault> {
    next_fault(&state.faults)
}

fn take_audience_fault(state: &State, audience: &str) -> Option<Fault> {
    let mut faults = lock(&state.audience_faults);
    let (fault, remaining) = faults.get_mut(audience)?.front_mut()?;
    let fault = fault.clone();
    if *remaining != usize::MAX {
        *remaining -= 1;
        if *remaining == 0 {
            faults.get_mut(audience)?.pop_front();
        }
    }
    Some(fault)
}

/// Accepts connections and closes each once the client's first bytes (its
/// TLS hello) arrived, or after 5 s.
async fn close_in_handshake(listener: TcpListener) {
    use tokio::io::AsyncReadExt as _;
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Not synchronisation: a failed accept is retried after a pause.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut hello = [0u8; 512];
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut hello)).await;
        });
    }
}

/// Ends the connection task without an answer: the connection is dropped
/// with the request read and unanswered. `resume_unwind` skips the panic
/// hook (nothing printed); the accept loop's task set absorbs the unwind.
fn reset_connection() -> ! {
    std::panic::resume_unwind(Box::new("injected connection reset"))
}

/// 429 as a server sends it that gives no hint when to come back.
fn too_many_requests_bare() -> Response<Full<Bytes>> {
    status_response(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        "Too many requests, please try again later.",
        None,
    )
}

/// A success whose body is an HTML page, not a TokenRequest.
fn not_json() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(
        b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    )));
    *resp.status_mut() = StatusCode::CREATED;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

fn next_fault(queue: &Mutex<VecDeque<(Fault, usize)>>) -> Option<Fault> {
    let mut faults = lock(queue);
    let (fault, remaining) = faults.front_mut()?;
    let fault = fault.clone();
    if *remaining != usize::MAX {
        *remaining -= 1;
        if *remaining == 0 {
            faults.pop_front();
        }
    }
    Some(fault)
}

struct BoundRef {
    kind: Option<String>,
    api_version: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

struct DecodedSpec {
    meta_name: Option<String>,
    meta_namespace: Option<String>,
    audiences: Vec<String>,
    expiration_seconds: Option<i64>,
    bound: Option<BoundRef>,
    bound_raw: Option<Value>,
}

/// Decodes a TokenRequest the way the Go JSON decoder would (null = absent,
/// wrong types are errors, unknown fields are ignored).
fn decode_token_request(v: &Value) -> Result<DecodedSpec, String> {
    const PREFIX: &str = "TokenRequest in version \"v1\" cannot be handled as a TokenRequest: json: cannot unmarshal";
    let obj = v.as_object().ok_or_else(|| {
        format!(
            "{PREFIX} {} into Go value of type v1.TokenRequest",
            json_type(v)
        )
    })?;
    let opt_str = |v: Option<&Value>, field: &str| -> Result<Option<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "{PREFIX} {} into Go struct field {field} of type string",
                json_type(other)
            )),
        }
    };
    let api_version = opt_str(obj.get("apiVersion"), "TokenRequest.apiVersion")?;
    let kind = opt_str(obj.get("kind"), "TokenRequest.kind")?;
    if let Some(av) = &api_version
        && av != "authentication.k8s.io/v1"
    {
        return Err(format!(
            "the API version in the data ({av}) does not match the expected API version (authentication.k8s.io/v1)"
        ));
    }
    if let Some(k) = &kind
        && k != "TokenRequest"
    {
        return Err(format!(
            "the kind in the data ({k}) does not match the expected kind (TokenRequest)"
        ));
    }
    let (meta_name, meta_namespace) = match obj.get("metadata") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(m)) => (
            opt_str(m.get("name"), "TokenRequest.metadata.name")?.filter(|s| !s.is_empty()),
            opt_str(m.get("namespace"), "TokenRequest.metadata.namespace")?
                .filter(|s| !s.is_empty()),
        ),
        Some(other) => {
            return Err(format!(
                "{PREFIX} {} into Go struct field TokenRequest.metadata of type v1.ObjectMeta",
                json_type(other)
            ));
        }
    };
    let spec = match obj.get("spec") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(format!(
                "{PREFIX} {} into Go struct field TokenRequest.spec of type v1.TokenRequestSpec",
                json_type(other)
            ));
        }
    };
    let audiences = match spec.get("audiences") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "{PREFIX} {} into Go struct field TokenRequestSpec.spec.audiences of type string",
                    json_type(other)
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(format!(
                "{PREFIX} {} into Go struct field TokenRequestSpec.spec.audiences of type []string",
                json_type(other)
            ));
        }
    };
    let expiration_seconds = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_i64().ok_or_else(|| {
            format!(
                "{PREFIX} number {n} into Go struct field TokenRequestSpec.spec.expirationSeconds of type int64"
            )
        })?),
        Some(other) => {
            return Err(format!(
                "{PREFIX} {} into Go struct field TokenRequestSpec.spec.expirationSeconds of type int64",
                json_type(other)
            ));
        }
    };
    let (bound, bound_raw) = match spec.get("boundObjectRef") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(m)) => {
            let f = |key: &str| {
                opt_str(
                    m.get(key),
                    &format!("TokenRequestSpec.spec.boundObjectRef.{key}"),
                )
            };
            let bound = BoundRef {
                kind: f("kind")?,
                api_version: f("apiVersion")?,
                name: f("name")?,
                uid: f("uid")?,
            };
            (Some(bound), Some(Value::Object(m.clone())))
        }
        Some(other) => {
            return Err(format!(
                "{PREFIX} {} into Go struct field TokenRequestSpec.spec.boundObjectRef of type v1.BoundObjectReference",
                json_type(other)
            ));
        }
    };
    Ok(DecodedSpec {
        meta_name,
        meta_namespace,
        audiences,
        expiration_seconds,
        bound,
        bound_raw,
    })
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

// ---------------------------------------------------------------------------
// Responses

fn json_response(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = code;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    if let Ok(v) = HeaderValue::from_str(&random_uuid()) {
        headers.insert("audit-id", v);
    }
    resp
}

/// A `metav1.Status` failure response.
fn status_response(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Full<Bytes>> {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    });
    if !reason.is_empty() {
        body["reason"] = json!(reason);
    }
    if let Some(details) = details {
        body["details"] = details;
    }
    body["code"] = json!(code.as_u16());
    json_response(code, &body)
}

fn not_found_path() -> Response<Full<Bytes>> {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

fn bad_request(message: &str) -> Response<Full<Bytes>> {
    status_response(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

/// 422 like `errors.NewInvalid(TokenRequest, "", errs)` (the real server
/// passes an empty name, hence `""` in the message).
fn invalid(field: &str, detail: &str) -> Response<Full<Bytes>> {
    let reason = if detail.starts_with("Required value") {
        "FieldValueRequired"
    } else {
        "FieldValueInvalid"
    };
    status_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("TokenRequest.authentication.k8s.io \"\" is invalid: {field}: {detail}"),
        Some(json!({
            "group": "authentication.k8s.io",
            "kind": "TokenRequest",
            "causes": [{"reason": reason, "message": detail, "field": field}],
        })),
    )
}

fn too_many_requests(retry_after_secs: u64) -> Response<Full<Bytes>> {
    let mut resp = status_response(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        "Too many requests, please try again later.",
        Some(json!({"retryAfterSeconds": retry_after_secs})),
    );
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs),
    );
    resp
}

fn fault_status(code: u16) -> Response<Full<Bytes>> {
    let Ok(status) = StatusCode::from_u16(code) else {
        return status_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &format!("Internal error occurred: invalid injected status {code}"),
            None,
        );
    };
    let (reason, message) = match code {
        400 => (
            "BadRequest",
            "the server rejected our request for an unknown reason",
        ),
        401 => ("Unauthorized", "Unauthorized"),
        403 => ("Forbidden", "forbidden: injected fault"),
        404 => (
            "NotFound",
            "the server could not find the requested resource",
        ),
        405 => (
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
        409 => ("Conflict", "the server reported a conflict"),
        410 => ("Expired", "the resource has expired"),
        413 => ("RequestEntityTooLarge", "the request entity is too large"),
        415 => (
            "UnsupportedMediaType",
            "the server does not support the media type",
        ),
        422 => (
            "Invalid",
            "the server rejected our request due to an error in our request",
        ),
        429 => return too_many_requests(1),
        500 => ("InternalError", "Internal error occurred: injected fault"),
        503 => (
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ),
        504 => (
            "Timeout",
            "the server was unable to return a response in the time allotted, but may still be processing the request",
        ),
        _ => (
            "",
            "an error on the server (\"injected fault\") has prevented the request from succeeding",
        ),
    };
    status_response(status, reason, message, None)
}

// ---------------------------------------------------------------------------
// Small helpers

pub(super) fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn format_uuid(b: [u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn uuid_v4_bits(mut b: [u8; 16]) -> [u8; 16] {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// A random v4 UUID.
pub fn random_uuid() -> String {
    format_uuid(uuid_v4_bits(rand::random()))
}

/// A UUID-shaped id derived from `seed` (stable across runs).
pub fn stable_uid(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    format_uuid(uuid_v4_bits(b))
}

/// The uid the server puts in the `kubernetes.io.serviceaccount.uid` claim.
pub fn service_account_uid(namespace: &str, name: &str) -> String {
    stable_uid(&format!("serviceaccount/{namespace}/{name}"))
}

/// Formats Unix seconds as RFC 3339 UTC, e.g. `2026-11-27T10:00:00Z`.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}
