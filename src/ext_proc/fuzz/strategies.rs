//! What the ext_proc properties generate: requests whose parts are often
//! meaningful (local, intercepted and ruled hosts, audiences Envoy or a
//! client could send) and as often arbitrary bytes, as Envoy's messages.

use std::collections::HashMap;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::ext_proc::{INTERCEPT_MARKER, SNI_ATTRIBUTE, StreamContext};

/// Bytes that are often meaningful: hosts (local, intercepted, ruled),
/// audiences, and arbitrary bytes.
fn authority() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            "upstream.test",
            "a.rules.test",
            "a.rules.test:8080",
            "A.Intercept.Test",
            "b.intercept.test:443",
            "10.0.0.1",
            "10.1.2.3:80",
            "127.0.0.1",
            "localhost:80",
            "[::1]:443",
            "[::ffff:127.0.0.1]",
            "169.254.169.254",
            "2130706433",
            "0x7f.1",
            "metadata.google.internal",
            "",
            ":80",
            "[",
            "a b",
            "kubernetes.default.svc",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        "[a-zA-Z0-9.:\\[\\]%@/-]{0,24}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..24),
    ]
}

fn audience_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            "aud",
            "broken",
            "fallback",
            "https://kubernetes.default.svc",
            "https://a.intercept.test",
            "",
            "%41",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        vec(any::<u8>(), 0..16),
    ]
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        audience_bytes().prop_map(|a| {
            let mut p = b"/p?x=1&kubernetes-audience=".to_vec();
            p.extend(a);
            p
        }),
        vec(any::<u8>(), 0..48),
    ]
}

fn method() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec!["GET", "CONNECT", "POST", "connect", ""])
            .prop_map(|s| s.as_bytes().to_vec()),
        vec(any::<u8>(), 0..8),
    ]
}

/// Parts of one request, owned (a [`Request`] borrows them).
#[derive(Clone, Debug)]
pub(super) struct Parts {
    pub(super) method: Vec<u8>,
    pub(super) authority: Vec<u8>,
    pub(super) path: Option<Vec<u8>>,
    pub(super) marked: bool,
    pub(super) audience_headers: Vec<Vec<u8>>,
    pub(super) metadata: Option<Vec<u8>>,
    pub(super) sni: Option<String>,
}

pub(super) fn parts() -> impl Strategy<Value = Parts> {
    (
        method(),
        authority(),
        proptest::option::of(path()),
        any::<bool>(),
        vec(audience_bytes(), 0..3),
        proptest::option::of(audience_bytes()),
        proptest::option::of(prop_oneof![
            Just(String::new()),
            authority().prop_map(|a| String::from_utf8_lossy(&a).into_owned()),
        ]),
    )
        .prop_map(
            |(method, authority, path, marked, audience_headers, metadata, sni)| Parts {
                method,
                authority,
                path,
                marked,
                audience_headers,
                metadata,
                sni,
            },
        )
}

/// The same parts as Envoy's `request_headers` message and stream context.
pub(super) fn message(parts: &Parts, observability: bool) -> (ProcessingRequest, StreamContext) {
    let header = |key: &str, raw: &[u8]| HeaderValue {
        key: key.to_owned(),
        value: String::new(),
        raw_value: raw.to_vec(),
    };
    let mut headers = vec![
        header(":method", &parts.method),
        header(":authority", &parts.authority),
    ];
    if let Some(path) = &parts.path {
        headers.push(header(":path", path));
    }
    if parts.marked {
        headers.push(header(INTERCEPT_MARKER, b"1"));
    }
    headers.extend(
        parts
            .audience_headers
            .iter()
            .map(|v| header("X-Kubernetes-Audience", v)),
    );
    let mut attributes = HashMap::new();
    if let Some(sni) = &parts.sni {
        let fields = HashMap::from([(
            SNI_ATTRIBUTE.to_owned(),
            Value {
                kind: Some(Kind::StringValue(sni.clone())),
            },
        )]);
        attributes.insert("envoy.filters.http.ext_proc".to_owned(), Struct { fields });
    }
    let request = ProcessingRequest {
        request: Some(Phase::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream: true,
            ..Default::default()
        })),
        attributes,
        observability_mode: observability,
        ..Default::default()
    };
    let context = StreamContext {
        audience: parts.metadata.clone().map(Bytes::from),
        intercepted: parts.sni.is_some(),
    };
    (request, context)
}

/// A message of any phase, with arbitrary contents.
pub(super) fn any_message() -> impl Strategy<Value = (ProcessingRequest, StreamContext)> {
    prop_oneof![
        4 => (parts(), any::<bool>()).prop_map(|(p, o)| message(&p, o)),
        1 => Just((ProcessingRequest::default(), StreamContext::default())),
        1 => vec(any::<u8>(), 0..32).prop_map(|body| (
            ProcessingRequest {
                request: Some(Phase::RequestBody(HttpBody { body, end_of_stream: true, ..Default::default() })),
                ..Default::default()
            },
            StreamContext::default(),
        )),
        1 => Just((
            ProcessingRequest {
                request: Some(Phase::ResponseTrailers(HttpTrailers::default())),
                ..Default::default()
            },
            StreamContext::default(),
        )),
    ]
}
