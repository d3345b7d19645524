//! Hostile and malformed ext_proc input against the real processor binary
//! over real gRPC on loopback (RELIABILITY.md, "Hostile input"). Every case
//! is repeated so that a per-message leak would show in the resident size;
//! after each, a normal request on a fresh connection must still get its
//! token and gRPC health must still be SERVING.

mod support;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use support::apiserver::FakeApiServer;
use support::hostile::{
    RSS_MARGIN_MIB, RssBound, Setup, bearer, get_raw, header, headers, setup, still_up,
};
use support::inproc::connect;
use support::reliability;
use tonic::transport::Channel;

/// Sends `messages` on one new stream, closes it and reads every answer.
async fn exchange(
    channel: &Channel,
    messages: Vec<ProcessingRequest>,
) -> Result<Vec<ProcessingResponse>, tonic::Status> {
    let mut client = ExternalProcessorClient::new(channel.clone())
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let mut answers = client
        .process(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(answer) = answers.message().await? {
        all.push(answer);
    }
    Ok(all)
}

/// What the client saw, in words: `token aud=A` (a JWT the API server
/// signed for exactly A), `passed` (no token, no immediate response),
/// `refused N` (Envoy is told to answer N), `status CODE` (stream ended).
fn outcome(api: &FakeApiServer, result: &Result<Vec<ProcessingResponse>, tonic::Status>) -> String {
    let answers = match result {
        Err(status) => return format!("status {:?}", status.code()),
        Ok(answers) => answers,
    };
    let words: Vec<String> = answers
        .iter()
        .map(|answer| match &answer.response {
            Some(Response::ImmediateResponse(i)) => {
                format!("refused {}", i.status.as_ref().map_or(0, |s| s.code))
            }
            Some(Response::RequestHeaders(_)) => match bearer(answer) {
                Some(token) => {
                    let claims = api.verifier().verify_now(&token, None);
                    match claims {
                        Ok(claims) => format!("token aud={}", claims.aud.join(",")),
                        Err(e) => format!("invalid token {e:?}"),
                    }
                }
                None => "passed".to_owned(),
            },
            Some(_) => "other phase".to_owned(),
            None => "empty answer".to_owned(),
        })
        .collect();
    if words.is_empty() {
        "no answer".to_owned()
    } else {
        words.join(" + ")
    }
}

/// The `:path` the answer rewrites to, if any.
fn new_path(result: &Result<Vec<ProcessingResponse>, tonic::Status>) -> Option<Vec<u8>> {
    let answer = result.as_ref().ok()?.first()?;
    let Some(Response::RequestHeaders(h)) = &answer.response else {
        return None;
    };
    h.response
        .as_ref()?
        .header_mutation
        .as_ref()?
        .set_headers
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == ":path")
        .map(|h| h.raw_value.clone())
}

/// Runs `case` (one stream) `times` times and returns what the last run saw;
/// every run must see the same.
async fn repeat(
    s: &Setup,
    times: usize,
    case: impl Fn() -> Vec<ProcessingRequest>,
) -> Result<Vec<ProcessingResponse>, tonic::Status> {
    let channel = connect(&s.proc.grpc).await;
    let first = exchange(&channel, case()).await;
    let want = outcome(&s.api, &first);
    for _ in 1..times {
        let again = exchange(&channel, case()).await;
        assert_eq!(outcome(&s.api, &again), want, "a repeat answered otherwise");
    }
    first
}

/// The Observed cell of row `id`: the outcomes of its cases, then whether
/// the processor still serves and its memory stayed within the bound.
async fn verdict(s: &Setup, rss: &RssBound, id: &str, outcomes: &[String]) -> String {
    format!(
        "{}; {}; {}",
        outcomes.join(", "),
        still_up(&s.proc, &s.api).await,
        rss.verdict(id)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_answered_and_the_server_stays_up() {
    let s = setup().await;
    // Warm up (first token, first connection) before the baseline.
    assert_eq!(still_up(&s.proc, &s.api).await, "up");
    let rss = RssBound::new(s.proc.pid(), RSS_MARGIN_MIB);
    const N: usize = 20;
    let aud = |v: &[u8]| header("x-kubernetes-audience", v);

    // No phase at all, and request_headers without a header map.
    let no_phase = repeat(&s, N, || vec![ProcessingRequest::default()]).await;
    let no_map = repeat(&s, N, || {
        vec![ProcessingRequest {
            request: Some(Phase::RequestHeaders(HttpHeaders::default())),
            ..Default::default()
        }]
    })
    .await;
    reliability::check(
        "ext-no-headers",
        &verdict(
            &s,
            &rss,
            "ext-no-headers",
            &[outcome(&s.api, &no_phase), outcome(&s.api, &no_map)],
        )
        .await,
    );

    // No :path: the audience header still works, nothing to pass otherwise.
    let no_path_header = repeat(&s, N, || {
        vec![headers(vec![
            header(":method", b"GET"),
            header(":authority", b"upstream.test"),
            aud(b"probe"),
        ])]
    })
    .await;
    let no_path = repeat(&s, N, || {
        vec![headers(vec![
            header(":method", b"GET"),
            header(":authority", b"upstream.test"),
        ])]
    })
    .await;
    reliability::check(
        "ext-no-path",
        &verdict(
            &s,
            &rss,
            "ext-no-path",
            &[outcome(&s.api, &no_path_header), outcome(&s.api, &no_path)],
        )
        .await,
    );

    // Non-UTF-8: as the audience (refused), elsewhere in :path (kept).
    let bad_audience = repeat(&s, N, || vec![get_raw(b"/", vec![aud(b"\xff\xfe")])]).await;
    let raw_path: &[u8] = b"/\xff?x=\xc3\x28&kubernetes-audience=probe&y=\xfe";
    let bad_path = repeat(&s, N, || vec![get_raw(raw_path, vec![])]).await;
    let kept = new_path(&bad_path).as_deref() == Some(&b"/\xff?x=\xc3\x28&y=\xfe"[..]);
    reliability::check(
        "ext-non-utf8",
        &verdict(
            &s,
            &rss,
            "ext-non-utf8",
            &[
                outcome(&s.api, &bad_audience),
                outcome(&s.api, &bad_path),
                format!("path {}", if kept { "kept" } else { "changed" }),
            ],
        )
        .await,
    );

    // NUL bytes: in the audience (raw and escaped), and in another value.
    let nul_audience = repeat(&s, N, || vec![get_raw(b"/", vec![aud(b"pro\0be")])]).await;
    let nul_escaped = repeat(&s, N, || {
        vec![get_raw(b"/?kubernetes-audience=pro%00be", vec![])]
    })
    .await;
    let nul_elsewhere = repeat(&s, N, || {
        vec![get_raw(
            b"/\0?kubernetes-audience=probe",
            vec![header("x-other", b"a\0b")],
        )]
    })
    .await;
    reliability::check(
        "ext-nul",
        &verdict(
            &s,
            &rss,
            "ext-nul",
            &[
                outcome(&s.api, &nul_audience),
                outcome(&s.api, &nul_escaped),
                outcome(&s.api, &nul_elsewhere),
            ],
        )
        .await,
    );

    // A 1 MiB header value: another header (token), the audience (refused).
    let mib = vec![b'a'; 1 << 20];
    let big_other = repeat(&s, N, || {
        vec![get_raw(
            b"/?kubernetes-audience=probe",
            vec![header("x-big", &mib)],
        )]
    })
    .await;
    let big_audience = repeat(&s, N, || vec![get_raw(b"/", vec![aud(&mib)])]).await;
    reliability::check(
        "ext-1mib-header",
        &verdict(
            &s,
            &rss,
            "ext-1mib-header",
            &[outcome(&s.api, &big_other), outcome(&s.api, &big_audience)],
        )
        .await,
    );

    // 10,000 query parameters with the audience in the middle: the other
    // 10,000 survive byte for byte and in order.
    let others: Vec<String> = (0..10_000)
        .map(|i| format!("p{i}=%{:02X}{i}", i % 256))
        .collect();
    let (before, after) = others.split_at(5_000);
    let long_path = format!(
        "/q?{}&kubernetes-audience=probe&{}",
        before.join("&"),
        after.join("&")
    );
    let many = repeat(&s, N, || vec![get_raw(long_path.as_bytes(), vec![])]).await;
    let survived = new_path(&many) == Some(format!("/q?{}", others.join("&")).into_bytes());
    reliability::check(
        "ext-10k-params",
        &verdict(
            &s,
            &rss,
            "ext-10k-params",
            &[
                outcome(&s.api, &many),
                format!("others {}", if survived { "kept" } else { "changed" }),
            ],
        )
        .await,
    );

    // The audience repeated: the same value (one audience), two values.
    let same = repeat(&s, N, || {
        vec![get_raw(
            b"/?kubernetes-audience=probe&kubernetes-audience=%70robe",
            vec![aud(b"probe"), aud(b"probe")],
        )]
    })
    .await;
    let differ = repeat(&s, N, || {
        vec![get_raw(
            b"/?kubernetes-audience=probe&kubernetes-audience=other",
            vec![],
        )]
    })
    .await;
    reliability::check(
        "ext-aud-repeated",
        &verdict(
            &s,
            &rss,
            "ext-aud-repeated",
            &[outcome(&s.api, &same), outcome(&s.api, &differ)],
        )
        .await,
    );

    // Percent-encoded value and name: decoded once.
    let encoded = repeat(&s, N, || {
        vec![get_raw(b"/?kubernetes%2Daudience=%70%72obe", vec![])]
    })
    .await;
    // Double-encoded: decoded once only, so `%2570robe` names `%70robe`.
    let double = repeat(&s, N, || {
        vec![get_raw(b"/?kubernetes-audience=%2570robe", vec![])]
    })
    .await;
    reliability::check(
        "ext-aud-encoded",
        &verdict(&s, &rss, "ext-aud-encoded", &[outcome(&s.api, &encoded)]).await,
    );
    reliability::check(
        "ext-aud-double",
        &verdict(&s, &rss, "ext-aud-double", &[outcome(&s.api, &double)]).await,
    );

    // Empty: `=` with nothing, a bare name, an empty header.
    let empty_value = repeat(&s, N, || vec![get_raw(b"/?kubernetes-audience=", vec![])]).await;
    let bare = repeat(&s, N, || vec![get_raw(b"/?kubernetes-audience&x", vec![])]).await;
    let empty_header = repeat(&s, N, || vec![get_raw(b"/", vec![aud(b"")])]).await;
    reliability::check(
        "ext-aud-empty",
        &verdict(
            &s,
            &rss,
            "ext-aud-empty",
            &[
                outcome(&s.api, &empty_value),
                outcome(&s.api, &bare),
                outcome(&s.api, &empty_header),
            ],
        )
        .await,
    );

    // request_headers twice on one stream.
    let twice = repeat(&s, N, || {
        vec![
            get_raw(b"/?kubernetes-audience=probe", vec![]),
            get_raw(b"/?kubernetes-audience=second", vec![]),
        ]
    })
    .await;
    reliability::check(
        "ext-headers-twice",
        &verdict(&s, &rss, "ext-headers-twice", &[outcome(&s.api, &twice)]).await,
    );
}

/// Messages the processor's protobuf decoder must refuse, sent on the
/// `Process` method as if they were `ProcessingRequest`s.
mod garbage {
    /// `request_headers` (field 2) as a varint: the wrong wire type.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WrongWireType {
        #[prost(uint64, tag = "2")]
        pub request_headers: u64,
    }

    /// `request_headers` (field 2) holding arbitrary bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawHeaders {
        #[prost(bytes = "vec", tag = "2")]
        pub request_headers: Vec<u8>,
    }

    /// `request_headers.headers.headers[0].key` as bytes: a header name that
    /// is not UTF-8 (prost refuses it in a `string` field).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BadKey {
        #[prost(message, optional, tag = "2")]
        pub request_headers: Option<Headers>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Headers {
        #[prost(message, optional, tag = "1")]
        pub headers: Option<Map>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Map {
        #[prost(message, repeated, tag = "1")]
        pub headers: Vec<Value>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
    }
}

/// Sends `message` (any prost type) on `Process` and reads the answers.
async fn send_garbage<M: prost::Message + Default + Send + Sync + 'static>(
    channel: &Channel,
    message: M,
) -> Result<Vec<ProcessingResponse>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<M, ProcessingResponse>::default();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
    );
    let request = tonic::Request::new(tokio_stream::iter(vec![message]));
    let mut answers = grpc.streaming(request, path, codec).await?.into_inner();
    let mut all = Vec::new();
    while let Some(answer) = answers.message().await? {
        all.push(answer);
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_end_only_their_stream() {
    let s = setup().await;
    assert_eq!(still_up(&s.proc, &s.api).await, "up");
    let rss = RssBound::new(s.proc.pid(), RSS_MARGIN_MIB);
    let channel = connect(&s.proc.grpc).await;
    let mut seen = Vec::new();
    for round in 0..20 {
        let outcomes = [
            send_garbage(&channel, garbage::WrongWireType { request_headers: 7 }).await,
            send_garbage(
                &channel,
                garbage::RawHeaders {
                    request_headers: vec![0x0a, 0xff, 0xff, 0xff],
                },
            )
            .await,
            send_garbage(
                &channel,
                garbage::BadKey {
                    request_headers: Some(garbage::Headers {
                        headers: Some(garbage::Map {
                            headers: vec![garbage::Value {
                                key: b"\xff\xfe:path".to_vec(),
                            }],
                        }),
                    }),
                },
            )
            .await,
        ]
        .map(|result| outcome(&s.api, &result));
        if round == 0 {
            seen = outcomes.to_vec();
        }
        assert_eq!(outcomes.to_vec(), seen, "a repeat answered otherwise");
    }
    // The connection that carried them still serves a normal request.
    let normal = exchange(
        &channel,
        vec![get_raw(b"/?kubernetes-audience=probe", vec![])],
    )
    .await;
    seen.push(format!("then {}", outcome(&s.api, &normal)));
    reliability::check(
        "ext-undecodable",
        &verdict(&s, &rss, "ext-undecodable", &seen).await,
    );
}
