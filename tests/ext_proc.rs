//! The ext_proc service over real gRPC on loopback (and a Unix socket),
//! driven the way Envoy drives it, against the TokenRequest-compatible test
//! API server over real TLS.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, HttpBody, HttpHeaders, HttpTrailers, ImmediateResponse,
    ProcessingRequest, ProcessingResponse,
};
use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::inproc::{InProcess, config, get, process_one, process_with, request_headers};

struct Setup {
    api: FakeApiServer,
    proc: InProcess,
    _kubeconfig: support::Kubeconfig,
}

async fn setup(extra: &[&str]) -> Setup {
    setup_with(ApiServerOptions::default(), extra).await
}

async fn setup_with(opts: ApiServerOptions, extra: &[&str]) -> Setup {
    let api = FakeApiServer::start(opts).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let proc = InProcess::start(config(&kubeconfig.path, extra)).await;
    Setup {
        api,
        proc,
        _kubeconfig: kubeconfig,
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn common(response: &ProcessingResponse) -> &CommonResponse {
    match &response.response {
        Some(Response::RequestHeaders(h)) => h.response.as_ref().expect("a CommonResponse"),
        other => panic!("expected a request_headers answer, got {other:?}"),
    }
}

fn mutation(response: &ProcessingResponse) -> &HeaderMutation {
    common(response)
        .header_mutation
        .as_ref()
        .expect("a header mutation")
}

/// The raw value the mutation sets for `key`; `value` must stay empty.
fn set_value(response: &ProcessingResponse, key: &str) -> Option<String> {
    mutation(response).set_headers.iter().find_map(|o| {
        let h = o.header.as_ref().unwrap();
        (h.key == key).then(|| {
            assert!(h.value.is_empty(), "mutations must use raw_value only");
            String::from_utf8(h.raw_value.clone()).unwrap()
        })
    })
}

fn immediate(response: &ProcessingResponse) -> &ImmediateResponse {
    match &response.response {
        Some(Response::ImmediateResponse(i)) => i,
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

fn status_and_body(response: &ProcessingResponse) -> (i32, String) {
    let i = immediate(response);
    (
        i.status.as_ref().unwrap().code,
        String::from_utf8(i.body.clone()).unwrap(),
    )
}

/// Checks the injected bearer token: signed by the API server, `aud` exactly
/// `[audience]`, the right subject, not expired.
fn assert_token_for(api: &FakeApiServer, response: &ProcessingResponse, audience: &str) {
    let header = set_value(response, "authorization").expect("authorization is set");
    let token = header.strip_prefix("Bearer ").expect("Bearer scheme");
    let claims = api
        .verifier()
        .verify(token, Some(audience), now())
        .expect("a valid token");
    assert_eq!(claims.aud, [audience]);
    assert_eq!(claims.sub, "system:serviceaccount:demo:app");
    assert!(claims.exp > now() + 3000, "about an hour of validity");
}

#[tokio::test]
async fn query_parameter_audience_is_injected_and_stripped() {
    let s = setup(&[]).await;
    let mut client = s.proc.client().await;
    let resp = process_one(
        &mut client,
        get("/metrics?kubernetes-audience=prometheus&x=1&x=%2F"),
        None,
    )
    .await
    .unwrap();
    assert_token_for(&s.api, &resp, "prometheus");
    assert_eq!(
        set_value(&resp, ":path").as_deref(),
        Some("/metrics?x=1&x=%2F")
    );
    assert!(mutation(&resp).remove_headers.is_empty());
    assert_eq!(common(&resp).status, 0, "CONTINUE");

    // The TokenRequest the API server saw.
    let body = s.api.last_request().unwrap();
    assert_eq!(body["spec"]["audiences"], serde_json::json!(["prometheus"]));
    assert_eq!(body["spec"]["expirationSeconds"], 3600);
    assert!(body["spec"].get("boundObjectRef").is_none());

    // Cached: a second request makes no new TokenRequest.
    let again = process_one(&mut client, get("/?kubernetes-audience=prometheus"), None)
        .await
        .unwrap();
    assert_eq!(
        set_value(&again, "authorization"),
        set_value(&resp, "authorization")
    );
    assert_eq!(set_value(&again, ":path").as_deref(), Some("/"));
    assert_eq!(s.api.token_requests(), 1);
    s.proc.stop().await;
}

#[tokio::test]
async fn header_audience_wins_and_is_removed() {
    let s = setup(&[]).await;
    let mut client = s.proc.client().await;
    let msg = request_headers(&[
        (":method", "GET"),
        (":authority", "upstream.test"),
        (":path", "/p?kubernetes-audience=from-query"),
        ("x-kubernetes-audience", "from-header"),
        ("authorization", "Bearer client-supplied"),
    ]);
    let resp = process_one(&mut client, msg, Some("from-metadata"))
        .await
        .unwrap();
    assert_token_for(&s.api, &resp, "from-header");
    assert_eq!(mutation(&resp).remove_headers, ["x-kubernetes-audience"]);
    // The losing query parameter is still removed.
    assert_eq!(set_value(&resp, ":path").as_deref(), Some("/p"));
    assert_eq!(s.api.requests_for_audience("from-query"), 0);
}

#[tokio::test]
async fn metadata_then_default_audience() {
    let s = setup(&["--default-audience", "fallback"]).await;
    let mut client = s.proc.client().await;
    let resp = process_one(&mut client, get("/p"), Some("per-route"))
        .await
        .unwrap();
    assert_token_for(&s.api, &resp, "per-route");
    assert_eq!(set_value(&resp, ":path"), None, "path untouched");
    let resp = process_one(&mut client, get("/p"), None).await.unwrap();
    assert_token_for(&s.api, &resp, "fallback");
}

#[tokio::test]
async fn no_audience_means_no_mutation() {
    let s = setup(&[]).await;
    let mut client = s.proc.client().await;
    let resp = process_one(&mut client, get("/plain?x=1"), None)
        .await
        .unwrap();
    let common = common(&resp);
    assert_eq!(common.status, 0);
    assert!(common.header_mutation.is_none());
    assert_eq!(s.api.token_requests(), 0);
}

#[tokio::test]
async fn malformed_audiences_get_400() {
    let s = setup(&[]).await;
    let mut client = s.proc.client().await;
    let long = format!("/?kubernetes-audience={}", "a".repeat(1025));
    for path in [
        "/?kubernetes-audience=",
        long.as_str(),
        "/?kubernetes-audience=a%00b",
        "/?kubernetes-audience=a&kubernetes-audience=b",
    ] {
        let resp = process_one(&mut client, get(path), None).await.unwrap();
        let (code, body) = status_and_body(&resp);
        assert_eq!(code, 400, "{path}: {body}");
        assert!(body.starts_with("kube-audience-proxy: the "), "{body}");
    }
    let bad_header = request_headers(&[(":path", "/"), ("x-kubernetes-audience", "a\u{1}b")]);
    assert_eq!(
        status_and_body(&process_one(&mut client, bad_header, None).await.unwrap()).0,
        400
    );
    assert_eq!(s.api.token_requests(), 0);
}

#[tokio::test]
async fn audiences_outside_the_allowlist_get_403() {
    let s = setup(&[
        "--allowed-audience",
        "https://*.example.com",
        "--allowed-audience",
        "exact",
    ])
    .await;
    let mut client = s.proc.client().await;
    let resp = process_one(&mut client, get("/?kubernetes-audience=other"), None)
        .await
        .unwrap();
    let (code, body) = status_and_body(&resp);
    assert_eq!(code, 403);
    assert_eq!(
        body,
        "kube-audience-proxy: the audience \"other\" is not allowed by this proxy\n"
    );
    let ok = process_one(
        &mut client,
        get("/?kubernetes-audience=https%3A%2F%2Fa.example.com"),
        None,
    )
    .await
    .unwrap();
    assert_token_for(&s.api, &ok, "https://a.example.com");
    assert_eq!(s.api.token_requests(), 1);
}

#[tokio::test]
async fn api_server_refusals_become_503_with_the_reason() {
    // The ServiceAccount exists but RBAC does not allow creating its tokens.
    let opts = ApiServerOptions {
        permitted_service_accounts: vec!["someone-else".into()],
        ..Default::default()
    };
    let s = setup_with(opts, &[]).await;
    let mut client = s.proc.client().await;
    let resp = process_one(&mut client, get("/?kubernetes-audience=a"), None)
        .await
        .unwrap();
    let (code, body) = status_and_body(&resp);
    assert_eq!(code, 503);
    assert!(
        body.contains("no token for audience \"a\"") && body.contains("403 Forbidden"),
        "{body}"
    );

    // Rate limited, server errors, timeouts: all 503, each with its reason
    // (one audience each: a failure holds its audience back for a while).
    let s = setup(&["--token-request-timeout", "500ms"]).await;
    let mut client = s.proc.client().await;
    for (fault, path, reason) in [
        (
            Fault::TooManyRequests {
                retry_after_secs: 3,
            },
            "/?kubernetes-audience=a1",
            "429 Too Many Requests",
        ),
        (Fault::Status(500), "/?kubernetes-audience=a2", "HTTP 500"),
        (
            Fault::Hang,
            "/?kubernetes-audience=a3",
            "did not answer the TokenRequest within 500ms",
        ),
    ] {
        s.api.inject(fault, 1);
        let resp = process_one(&mut client, get(path), None).await.unwrap();
        let (code, body) = status_and_body(&resp);
        assert_eq!(code, 503, "{body}");
        assert!(body.contains(reason), "{body}");
    }
    // And the next request, with the API server healthy again, gets a token.
    let resp = process_one(&mut client, get("/?kubernetes-audience=a"), None)
        .await
        .unwrap();
    assert_token_for(&s.api, &resp, "a");
}

#[tokio::test]
async fn fail_open_forwards_without_a_token() {
    let s = setup(&["--on-token-error", "allow"]).await;
    s.api.inject(Fault::Status(503), usize::MAX);
    let mut client = s.proc.client().await;
    let msg = request_headers(&[
        (":path", "/p?kubernetes-audience=a&y"),
        ("x-kubernetes-audience", "a"),
    ]);
    let resp = process_one(&mut client, msg, None).await.unwrap();
    assert_eq!(set_value(&resp, "authorization"), None);
    // The audience markers are still removed.
    assert_eq!(set_value(&resp, ":path").as_deref(), Some("/p?y"));
    assert_eq!(mutation(&resp).remove_headers, ["x-kubernetes-audience"]);
}

#[tokio::test]
async fn concurrent_first_requests_make_one_token_request() {
    let s = setup(&[]).await;
    s.api.set_latency(Duration::from_millis(300));
    let client = s.proc.client().await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                process_one(&mut client, get("/?kubernetes-audience=cold"), None).await
            })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for task in tasks {
        let resp = task.await.unwrap().unwrap();
        tokens.insert(set_value(&resp, "authorization").unwrap());
    }
    assert_eq!(tokens.len(), 1, "every request got the same token");
    assert_eq!(s.api.token_requests(), 1);
    assert_eq!(s.api.requests_for_audience("cold"), 1);
}

#[tokio::test]
async fn bound_pod_tokens_carry_the_pod() {
    let s = setup(&[
        "--bind-pod",
        "--pod-name",
        "web-0",
        "--pod-uid",
        "0b9a2c1e-uid",
        "--token-expiration",
        "15m",
    ])
    .await;
    let mut client = s.proc.client().await;
    let resp = process_one(&mut client, get("/?kubernetes-audience=a"), None)
        .await
        .unwrap();
    let body = s.api.last_request().unwrap();
    assert_eq!(body["spec"]["expirationSeconds"], 900);
    assert_eq!(body["spec"]["boundObjectRef"]["kind"], "Pod");
    assert_eq!(body["spec"]["boundObjectRef"]["name"], "web-0");
    assert_eq!(body["spec"]["boundObjectRef"]["uid"], "0b9a2c1e-uid");
    let header = set_value(&resp, "authorization").unwrap();
    let claims = s
        .api
        .verifier()
        .verify(header.strip_prefix("Bearer ").unwrap(), Some("a"), now())
        .unwrap();
    assert_eq!(claims.pod_name.as_deref(), Some("web-0"));
    assert!(claims.exp <= now() + 900);
}

#[tokio::test]
async fn other_phases_pass_through_and_bad_messages_end_the_stream() {
    let s = setup(&[]).await;
    let mut client = s.proc.client().await;
    let phases = [
        (
            Phase::ResponseHeaders(HttpHeaders::default()),
            "response_headers",
        ),
        (Phase::RequestBody(HttpBody::default()), "request_body"),
        (Phase::ResponseBody(HttpBody::default()), "response_body"),
        (
            Phase::RequestTrailers(HttpTrailers::default()),
            "request_trailers",
        ),
        (
            Phase::ResponseTrailers(HttpTrailers::default()),
            "response_trailers",
        ),
    ];
    for (phase, name) in phases {
        let msg = ProcessingRequest {
            request: Some(phase),
            ..Default::default()
        };
        let resp = process_one(&mut client, msg, None).await.unwrap();
        let ok = matches!(
            (&resp.response, name),
            (Some(Response::ResponseHeaders(h)), "response_headers") if h.response.is_none()
        ) || matches!((&resp.response, name), (Some(Response::RequestBody(b)), "request_body") if b.response.is_none())
            || matches!((&resp.response, name), (Some(Response::ResponseBody(b)), "response_body") if b.response.is_none())
            || matches!((&resp.response, name), (Some(Response::RequestTrailers(t)), "request_trailers") if t.header_mutation.is_none())
            || matches!((&resp.response, name), (Some(Response::ResponseTrailers(t)), "response_trailers") if t.header_mutation.is_none());
        assert!(ok, "{name}: {resp:?}");
    }
    let err = process_one(&mut client, ProcessingRequest::default(), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A stream carrying several messages gets one answer each, in order.
    let stream = tokio_stream::iter(vec![
        get("/?kubernetes-audience=a"),
        ProcessingRequest {
            request: Some(Phase::ResponseHeaders(HttpHeaders::default())),
            ..Default::default()
        },
    ]);
    let mut answers = client.process(stream).await.unwrap().into_inner();
    assert!(matches!(
        answers.message().await.unwrap().unwrap().response,
        Some(Response::RequestHeaders(_))
    ));
    assert!(matches!(
        answers.message().await.unwrap().unwrap().response,
        Some(Response::ResponseHeaders(_))
    ));
    assert!(answers.message().await.unwrap().is_none());
}

#[tokio::test]
async fn serves_over_a_unix_socket_with_health() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kap.sock");
    // A stale socket file from an earlier run does not stop the start.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let address = format!("unix:{}", socket.display());
    let proc = InProcess::start(config(
        &kubeconfig.path,
        &["--grpc-listen-address", &address],
    ))
    .await;
    let mut client = proc.client().await;
    let resp = process_one(&mut client, get("/?kubernetes-audience=uds"), None)
        .await
        .unwrap();
    assert_token_for(&api, &resp, "uds");

    for service in ["", "envoy.service.ext_proc.v3.ExternalProcessor"] {
        assert_eq!(
            support::inproc::health_status(proc.channel().await, service).await,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    let (code, body) = support::curl::get(&format!("http://{}/readyz", proc.admin)).await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, _) = support::curl::get(&format!("http://{}/healthz", proc.admin)).await;
    assert_eq!(code, 200);
    proc.stop().await;
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn undecodable_messages_end_the_stream_with_a_status() {
    let s = setup(&[]).await;
    // Raw gRPC framing with bytes that are not a ProcessingRequest.
    let mut grpc = tonic::client::Grpc::new(s.proc.channel().await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
    );
    let garbage = tokio_stream::iter(vec![bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f])]);
    let result = grpc
        .streaming::<_, bytes::Bytes, bytes::Bytes, _>(tonic::Request::new(garbage), path, RawCodec)
        .await;
    let status = match result {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            stream
                .message()
                .await
                .expect_err("an error status, not an answer")
        }
    };
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    // The server is fine afterwards.
    let mut client = s.proc.client().await;
    assert!(process_one(&mut client, get("/"), None).await.is_ok());
}

/// A pass-through codec to send arbitrary bytes as gRPC messages.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Self::Item,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn connect(authority: &str, marked: bool) -> ProcessingRequest {
    let mut headers = vec![(":method", "CONNECT"), (":authority", authority)];
    if marked {
        headers.push(("x-kube-audience-proxy-intercept", "1"));
    }
    request_headers(&headers)
}

async fn intercepting(extra: &[&str]) -> (Setup, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let args = support::intercept_args(
        &dir.path().join("ca.crt"),
        &["localhost", "127.0.0.1"],
        extra,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (setup(&args).await, dir)
}

#[tokio::test]
async fn connect_to_intercepted_hosts_is_marked_for_rerouting() {
    let (s, _dir) = intercepting(&[]).await;
    let mut client = s.proc.client().await;
    for authority in ["localhost:443", "LOCALHOST:8443", "127.0.0.1:443"] {
        let resp = process_one(&mut client, connect(authority, false), None)
            .await
            .unwrap();
        let c = common(&resp);
        assert!(c.clear_route_cache, "{authority}");
        assert_eq!(
            set_value(&resp, "x-kube-audience-proxy-intercept").as_deref(),
            Some("1")
        );
        assert_eq!(
            set_value(&resp, "authorization"),
            None,
            "never a token on CONNECT"
        );
    }
    // Not intercepted: a client-sent marker is removed and the route recomputed.
    let resp = process_one(&mut client, connect("example.org:443", true), None)
        .await
        .unwrap();
    assert!(common(&resp).clear_route_cache);
    assert_eq!(
        mutation(&resp).remove_headers,
        ["x-kube-audience-proxy-intercept"]
    );
    assert!(mutation(&resp).set_headers.is_empty());
    // Not intercepted, unmarked: untouched.
    let resp = process_one(&mut client, connect("example.org:443", false), None)
        .await
        .unwrap();
    assert!(!common(&resp).clear_route_cache);
    assert!(common(&resp).header_mutation.is_none());
    assert_eq!(s.api.token_requests(), 0);
}

fn inside_tls(authority: &str, sni: &str) -> ProcessingRequest {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let mut message = request_headers(&[
        (":method", "GET"),
        (":authority", authority),
        (":path", "/x?kubernetes-audience=A"),
    ]);
    let fields = [(
        "connection.requested_server_name".to_owned(),
        Value {
            kind: Some(Kind::StringValue(sni.to_owned())),
        },
    )]
    .into();
    message
        .attributes
        .insert("envoy.filters.http.ext_proc".into(), Struct { fields });
    message
}

#[tokio::test]
async fn requests_inside_intercepted_tls_must_match_the_sni() {
    let (s, _dir) = intercepting(&[]).await;
    let mut client = s.proc.client().await;
    let listener = [("x-kube-audience-proxy-listener", "intercept")];
    for (authority, sni) in [
        ("localhost:8443", "localhost"),
        ("Localhost", "localhost."),
        ("127.0.0.1:1", ""),
    ] {
        let resp = process_with(&mut client, inside_tls(authority, sni), &listener)
            .await
            .unwrap();
        assert_token_for(&s.api, &resp, "A");
    }
    for (authority, sni, reason) in [
        (
            "127.0.0.1:8443",
            "localhost",
            "TLS connection was opened for \"localhost\"",
        ),
        ("other.test", "localhost", "opened for \"localhost\""),
        ("localhost", "", "carried no server name"),
    ] {
        let resp = process_with(&mut client, inside_tls(authority, sni), &listener)
            .await
            .unwrap();
        let (code, body) = status_and_body(&resp);
        assert_eq!(code, 421, "{authority} / {sni}");
        assert!(body.contains(reason), "{body}");
    }
    // The same request outside the intercepting listener is not checked.
    let resp = process_one(&mut client, inside_tls("other.test", "localhost"), None)
        .await
        .unwrap();
    assert_token_for(&s.api, &resp, "A");
}

#[tokio::test]
async fn many_repeated_audience_headers_are_checked_to_the_last() {
    let s = setup(&[]).await;
    let mut client = s.proc.client().await;
    let mut same = vec![(":path", "/")];
    same.extend(std::iter::repeat_n(("x-kubernetes-audience", "A"), 20));
    let resp = process_one(&mut client, request_headers(&same), None)
        .await
        .unwrap();
    assert_token_for(&s.api, &resp, "A");
    let mut differing = same.clone();
    differing.push(("x-kubernetes-audience", "B"));
    differing.extend(std::iter::repeat_n(("x-kubernetes-audience", "A"), 3));
    let resp = process_one(&mut client, request_headers(&differing), None)
        .await
        .unwrap();
    let (code, body) = status_and_body(&resp);
    assert_eq!(code, 400);
    assert!(body.contains("more than one audience"), "{body}");
}
