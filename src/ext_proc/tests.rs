//! Every outcome of a `request_headers` message, through the processor
//! (scan, decide, token lookup, respond/inject) with a fake token source: no network.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use super::decision::{Decision, Injection, Policy, Request, Verdict};
use super::response::Mutation;
use super::*;
use crate::allowlist::Allowlist;
use crate::apiserver::ApiServerAudiences;
use crate::audience::{Audience, Rejection, Source};
use crate::destination::DestinationRules;
use crate::local::LocalDestinations;
use crate::secret::Token;
use crate::tokens::cache::Limits;
use crate::tokens::{Error, IssuedToken};

/// Mints `tok.<audience>`, except for the audience `broken` (403 from the
/// API server); counts the TokenRequests.
#[derive(Clone, Default)]
struct Fake {
    mints: Arc<AtomicUsize>,
}

impl TokenSource for Fake {
    async fn mint(&self, audience: &Audience) -> Result<IssuedToken, Error> {
        self.mints.fetch_add(1, Ordering::SeqCst);
        if audience.as_str() == "broken" {
            return Err(Error::Forbidden);
        }
        Ok(IssuedToken {
            token: Token::new(format!("tok.{audience}")).ok_or(Error::BadResponse("token"))?,
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        })
    }
}

fn rules(default: Option<&str>) -> Rules {
    Rules {
        header: "x-kubernetes-audience".into(),
        parameter: "kubernetes-audience".into(),
        default: default.map(|d| Audience::parse(d.as_bytes(), Source::Default).unwrap()),
        allowlist: Allowlist::new(["node-exporter", "from-route", "fallback", "broken", "a*"])
            .unwrap(),
        destinations: DestinationRules::default(),
    }
}

fn processor(default: Option<&str>, on_token_error: OnTokenError) -> (ExtProc<Fake>, Fake) {
    processor_with_rules(default, on_token_error, &[])
}

/// A processor with these `--audience-rule`s.
fn processor_with_rules(
    default: Option<&str>,
    on_token_error: OnTokenError,
    audience_rules: &[&str],
) -> (ExtProc<Fake>, Fake) {
    processor_with(
        default,
        on_token_error,
        audience_rules,
        LocalDestinations::Refuse,
    )
}

fn processor_with(
    default: Option<&str>,
    on_token_error: OnTokenError,
    audience_rules: &[&str],
    local: LocalDestinations,
) -> (ExtProc<Fake>, Fake) {
    let fake = Fake::default();
    let limits = Limits {
        max_audiences: 100,
        idle_timeout: Duration::from_secs(3600),
        max_in_flight: 8,
        request_timeout: Duration::from_secs(4),
    };
    let intercept = InterceptHosts::new(["*.intercept.test", "10.0.0.1"]).unwrap();
    let rules = Rules {
        destinations: DestinationRules::new(audience_rules, None).unwrap(),
        ..rules(default)
    };
    let processor = ExtProc::new(
        rules,
        TokenCache::new(fake.clone(), limits),
        on_token_error,
        intercept,
        local,
        Some(ApiServerAudiences::new(["https://10.96.0.1:443"])),
    );
    (processor, fake)
}

fn message(headers: &[(&str, &[u8])], sni: Option<&str>) -> ProcessingRequest {
    let headers = headers
        .iter()
        .map(|(key, raw)| HeaderValue {
            key: (*key).to_owned(),
            value: String::new(),
            raw_value: raw.to_vec(),
        })
        .collect();
    let mut attributes = HashMap::new();
    if let Some(sni) = sni {
        let value = Value {
            kind: Some(Kind::StringValue(sni.to_owned())),
        };
        let fields = HashMap::from([(SNI_ATTRIBUTE.to_owned(), value)]);
        attributes.insert("envoy.filters.http.ext_proc".to_owned(), Struct { fields });
    }
    ProcessingRequest {
        request: Some(Phase::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            ..Default::default()
        })),
        attributes,
        ..Default::default()
    }
}

/// An answer reduced to what Envoy acts on.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// CONTINUE: headers set (raw values), headers removed, route re-chosen.
    Continue {
        set: Vec<(String, String)>,
        remove: Vec<String>,
        reroute: bool,
    },
    /// Envoy answers the client itself.
    Immediate { status: i32, details: String },
}

fn outcome(response: ProcessingResponse) -> Outcome {
    match response.response {
        Some(Response::RequestHeaders(headers)) => {
            let common = headers.response.unwrap();
            assert_eq!(common.status, 0, "CONTINUE");
            let mutation = common.header_mutation.unwrap_or_default();
            if common.clear_route_cache {
                assert!(!mutation.set_headers.is_empty() || !mutation.remove_headers.is_empty());
            }
            let set = mutation
                .set_headers
                .into_iter()
                .map(|option| {
                    assert_eq!(
                        option.append_action,
                        HeaderAppendAction::OverwriteIfExistsOrAdd as i32
                    );
                    let header = option.header.unwrap();
                    assert!(header.value.is_empty(), "raw_value only");
                    (header.key, String::from_utf8(header.raw_value).unwrap())
                })
                .collect();
            Outcome::Continue {
                set,
                remove: mutation.remove_headers,
                reroute: common.clear_route_cache,
            }
        }
        Some(Response::ImmediateResponse(immediate)) => Outcome::Immediate {
            status: immediate.status.unwrap().code,
            details: immediate.details,
        },
        other => panic!("not a request_headers answer: {other:?}"),
    }
}

fn forward(set: &[(&str, &str)], remove: &[&str]) -> Outcome {
    Outcome::Continue {
        set: set
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        remove: remove.iter().map(|r| (*r).to_owned()).collect(),
        reroute: false,
    }
}

fn refused(status: i32, details: &str) -> Outcome {
    Outcome::Immediate {
        status,
        details: format!("kube_audience_proxy_{details}"),
    }
}

const AUD: &str = "x-kubernetes-audience";

struct Case {
    name: &'static str,
    default: Option<&'static str>,
    on_token_error: OnTokenError,
    context: StreamContext,
    sni: Option<&'static str>,
    headers: Vec<(&'static str, &'static [u8])>,
    expect: Outcome,
    token_requests: usize,
    /// `--audience-rule`s.
    audience_rules: &'static [&'static str],
}

fn case(name: &'static str, headers: &[(&'static str, &'static [u8])], expect: Outcome) -> Case {
    Case {
        name,
        default: None,
        on_token_error: OnTokenError::Deny,
        context: StreamContext::default(),
        sni: None,
        headers: headers.to_vec(),
        expect,
        token_requests: 0,
        audience_rules: &[],
    }
}

fn get(path: &'static str) -> Vec<(&'static str, &'static [u8])> {
    vec![
        (":method", b"GET"),
        (":authority", b"svc.monitoring:9100"),
        (":path", path.as_bytes()),
    ]
}

fn with(
    mut headers: Vec<(&'static str, &'static [u8])>,
    extra: &[(&'static str, &'static [u8])],
) -> Vec<(&'static str, &'static [u8])> {
    headers.extend_from_slice(extra);
    headers
}

fn inside_tls(authority: &'static str) -> Vec<(&'static str, &'static [u8])> {
    vec![
        (":method", b"GET"),
        (":authority", authority.as_bytes()),
        (":path", b"/"),
    ]
}

fn intercepted() -> StreamContext {
    StreamContext {
        audience: None,
        intercepted: true,
    }
}

fn cases() -> Vec<Case> {
    let too_long: &'static str = "a".repeat(1025).leak();
    let mut ambiguous_late = get("/");
    ambiguous_late.extend(std::iter::repeat_n((AUD, &b"node-exporter"[..]), 9));
    ambiguous_late.push((AUD, b"a2"));
    vec![
        case("no audience", &get("/metrics"), forward(&[], &[])),
        Case {
            token_requests: 1,
            ..case(
                "header",
                &with(get("/metrics"), &[(AUD, b"node-exporter")]),
                forward(&[("authorization", "Bearer tok.node-exporter")], &[AUD]),
            )
        },
        Case {
            token_requests: 1,
            ..case(
                "repeated equal header values",
                &with(
                    get("/"),
                    &[(AUD, b"node-exporter"), (AUD, b"node-exporter")],
                ),
                forward(&[("authorization", "Bearer tok.node-exporter")], &[AUD]),
            )
        },
        Case {
            token_requests: 1,
            ..case(
                "query parameter, path rewritten",
                &get("/m?x=1&kubernetes-audience=node-exporter&y"),
                forward(
                    &[
                        ("authorization", "Bearer tok.node-exporter"),
                        (":path", "/m?x=1&y"),
                    ],
                    &[],
                ),
            )
        },
        Case {
            token_requests: 1,
            context: StreamContext {
                audience: Some(Bytes::from_static(b"from-route")),
                intercepted: false,
            },
            ..case(
                "Envoy metadata",
                &get("/"),
                forward(&[("authorization", "Bearer tok.from-route")], &[]),
            )
        },
        Case {
            token_requests: 1,
            default: Some("fallback"),
            ..case(
                "default audience",
                &get("/"),
                forward(&[("authorization", "Bearer tok.fallback")], &[]),
            )
        },
        case(
            "empty",
            &with(get("/"), &[(AUD, b"")]),
            refused(400, "empty_audience"),
        ),
        case(
            "too long",
            &get(too_long_path(too_long)),
            refused(400, "audience_too_long"),
        ),
        case(
            "malformed",
            &with(get("/"), &[(AUD, b"a\x01b")]),
            refused(400, "malformed_audience"),
        ),
        case(
            "malformed escape",
            &get("/?kubernetes-audience=a%zz"),
            refused(400, "malformed_audience"),
        ),
        case(
            "ambiguous",
            &with(get("/"), &[(AUD, b"a1"), (AUD, b"a2")]),
            refused(400, "ambiguous_audience"),
        ),
        case(
            "ambiguous after many equal values",
            &ambiguous_late,
            refused(400, "ambiguous_audience"),
        ),
        case(
            "not allowed",
            &with(get("/"), &[(AUD, b"elsewhere")]),
            refused(403, "audience_not_allowed"),
        ),
        case(
            "CONNECT to an intercepted host",
            &[
                (":method", b"CONNECT"),
                (":authority", b"api.intercept.test:443"),
                (AUD, b"node-exporter"),
            ],
            Outcome::Continue {
                set: vec![(INTERCEPT_MARKER.to_owned(), "1".to_owned())],
                remove: vec![],
                reroute: true,
            },
        ),
        case(
            "CONNECT to an intercepted IP",
            &[(":method", b"CONNECT"), (":authority", b"10.0.0.1:443")],
            Outcome::Continue {
                set: vec![(INTERCEPT_MARKER.to_owned(), "1".to_owned())],
                remove: vec![],
                reroute: true,
            },
        ),
        case(
            "CONNECT tunnelled, client marker removed",
            &[
                (":method", b"CONNECT"),
                (":authority", b"other.test:443"),
                (INTERCEPT_MARKER, b"1"),
            ],
            Outcome::Continue {
                set: vec![],
                remove: vec![INTERCEPT_MARKER.to_owned()],
                reroute: true,
            },
        ),
        case(
            "CONNECT tunnelled",
            &[(":method", b"CONNECT"), (":authority", b"other.test:443")],
            forward(&[], &[]),
        ),
        Case {
            context: intercepted(),
            sni: Some("api.intercept.test"),
            ..case(
                "inside TLS, host differs from the SNI",
                &with(
                    inside_tls("other.intercept.test"),
                    &[(AUD, b"node-exporter")],
                ),
                refused(421, "misdirected_request"),
            )
        },
        Case {
            context: intercepted(),
            ..case(
                "inside TLS without SNI, host name",
                &inside_tls("api.intercept.test"),
                refused(421, "misdirected_request"),
            )
        },
        Case {
            context: intercepted(),
            ..case(
                "inside TLS without SNI, IP",
                &inside_tls("10.0.0.1:443"),
                forward(&[], &[]),
            )
        },
        Case {
            context: intercepted(),
            sni: Some("API.intercept.test"),
            token_requests: 1,
            ..case(
                "inside TLS, host matches the SNI",
                &with(inside_tls("api.intercept.test:443"), &[(AUD, b"a1")]),
                forward(&[("authorization", "Bearer tok.a1")], &[AUD]),
            )
        },
        Case {
            token_requests: 1,
            ..case(
                "no token, deny",
                &with(get("/"), &[(AUD, b"broken")]),
                refused(503, "token_unavailable"),
            )
        },
        Case {
            token_requests: 1,
            on_token_error: OnTokenError::Allow,
            ..case(
                "no token, allow: header still removed",
                &with(get("/"), &[(AUD, b"broken")]),
                forward(&[], &[AUD]),
            )
        },
        Case {
            token_requests: 1,
            on_token_error: OnTokenError::Allow,
            ..case(
                "no token, allow: parameter still removed",
                &get("/p?kubernetes-audience=broken&x=1"),
                forward(&[(":path", "/p?x=1")], &[]),
            )
        },
    ]
}

/// Destination rules: what they supply, and the binding (a refusal makes
/// no TokenRequest). `get` requests go to `svc.monitoring:9100`.
fn rule_cases() -> Vec<Case> {
    let bearer = |audience: &str| {
        (
            "authorization",
            format!("Bearer tok.{audience}").leak() as &str,
        )
    };
    vec![
        Case {
            audience_rules: &["svc.monitoring:9100=node-exporter"],
            token_requests: 1,
            ..case(
                "rule: supplies its audience to a request naming none",
                &get("/metrics"),
                forward(&[bearer("node-exporter")], &[]),
            )
        },
        Case {
            audience_rules: &["*.monitoring=a.{host}"],
            token_requests: 1,
            ..case(
                "rule: template expanded with the host",
                &get("/"),
                forward(&[bearer("a.svc.monitoring")], &[]),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=node-exporter"],
            token_requests: 1,
            ..case(
                "rule: case and trailing dot of the authority do not matter",
                &[
                    (":method", b"GET"),
                    (":authority", b"SVC.Monitoring.:9100"),
                    (":path", b"/"),
                ],
                forward(&[bearer("node-exporter")], &[]),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=node-exporter"],
            token_requests: 1,
            ..case(
                "rule: a named audience the rule admits",
                &get("/m?kubernetes-audience=node-exporter"),
                forward(&[bearer("node-exporter"), (":path", "/m")], &[]),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=node-exporter"],
            ..case(
                "rule: a named audience the rule does not admit",
                &with(get("/"), &[(AUD, b"a1")]),
                refused(403, "audience_not_bound"),
            )
        },
        Case {
            audience_rules: &["*.monitoring=*"],
            token_requests: 1,
            ..case(
                "rule: * admits any named audience",
                &with(get("/"), &[(AUD, b"a1")]),
                forward(&[bearer("a1")], &[AUD]),
            )
        },
        Case {
            audience_rules: &["*.monitoring=*"],
            ..case("rule: * supplies none", &get("/"), forward(&[], &[]))
        },
        Case {
            audience_rules: &["*.monitoring=*"],
            ..case(
                "rule: * is still subject to the allowlist",
                &with(get("/"), &[(AUD, b"elsewhere")]),
                refused(403, "audience_not_allowed"),
            )
        },
        Case {
            audience_rules: &["svc.monitoring:9101=node-exporter"],
            ..case(
                "rule: another port is another destination",
                &with(get("/"), &[(AUD, b"node-exporter")]),
                refused(403, "audience_not_bound"),
            )
        },
        Case {
            audience_rules: &["other.test=node-exporter"],
            ..case(
                "rule: no audience and no rule for the host passes through",
                &get("/"),
                forward(&[], &[]),
            )
        },
        Case {
            audience_rules: &["other.test=node-exporter"],
            ..case(
                "rule: a query parameter audience for an unruled host",
                &get("/?kubernetes-audience=node-exporter"),
                refused(403, "audience_not_bound"),
            )
        },
        Case {
            audience_rules: &["other.test=from-route"],
            context: StreamContext {
                audience: Some(Bytes::from_static(b"from-route")),
                intercepted: false,
            },
            ..case(
                "rule: an Envoy route audience is bound too",
                &get("/"),
                refused(403, "audience_not_bound"),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=from-route"],
            context: StreamContext {
                audience: Some(Bytes::from_static(b"from-route")),
                intercepted: false,
            },
            token_requests: 1,
            ..case(
                "rule: an Envoy route audience the rule admits",
                &get("/"),
                forward(&[bearer("from-route")], &[]),
            )
        },
        Case {
            audience_rules: &["other.test=fallback"],
            default: Some("fallback"),
            ..case(
                "rule: the default audience is bound too",
                &get("/"),
                refused(403, "audience_not_bound"),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=*"],
            default: Some("fallback"),
            token_requests: 1,
            ..case(
                "rule: the default audience where * admits it",
                &get("/"),
                forward(&[bearer("fallback")], &[]),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=node-exporter"],
            default: Some("fallback"),
            token_requests: 1,
            ..case(
                "rule: a rule's audience comes before the default",
                &get("/"),
                forward(&[bearer("node-exporter")], &[]),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=https://{host}"],
            ..case(
                "rule: a template expanded outside the allowlist",
                &get("/"),
                refused(403, "audience_not_allowed"),
            )
        },
        Case {
            audience_rules: &["https://api.intercept.test=node-exporter"],
            context: intercepted(),
            sni: Some("api.intercept.test"),
            token_requests: 1,
            ..case(
                "rule: https:// inside intercepted TLS",
                &inside_tls("api.intercept.test"),
                forward(&[bearer("node-exporter")], &[]),
            )
        },
        Case {
            audience_rules: &["https://svc.monitoring=node-exporter"],
            ..case(
                "rule: https:// refuses plain HTTP",
                &with(get("/"), &[(AUD, b"node-exporter")]),
                refused(403, "audience_not_bound"),
            )
        },
        Case {
            audience_rules: &["https://svc.monitoring=node-exporter"],
            ..case(
                "rule: https:// supplies nothing over plain HTTP",
                &get("/"),
                forward(&[], &[]),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=node-exporter"],
            ..case(
                // The local-destination check reads the host first and
                // refuses what it cannot read (the rules' own handling of
                // such a host is in destination::tests).
                "rule: an authority that is no host is refused before the rules",
                &[
                    (":method", b"GET"),
                    (":authority", b"bad host"),
                    (":path", b"/"),
                    (AUD, b"node-exporter"),
                ],
                refused(400, "unreadable_destination"),
            )
        },
        Case {
            audience_rules: &["svc.monitoring=node-exporter"],
            ..case(
                "rule: a CONNECT is routed, never given a token",
                &[
                    (":method", b"CONNECT"),
                    (":authority", b"other.test:443"),
                    (AUD, b"node-exporter"),
                ],
                forward(&[], &[]),
            )
        },
    ]
}

fn too_long_path(audience: &'static str) -> &'static str {
    format!("/?kubernetes-audience={audience}").leak()
}

#[tokio::test]
async fn every_outcome_of_request_headers() {
    for case in cases().into_iter().chain(rule_cases()) {
        let (processor, fake) =
            processor_with_rules(case.default, case.on_token_error, case.audience_rules);
        let answer = processor
            .handle(message(&case.headers, case.sni), &case.context)
            .await
            .unwrap_or_else(|status| panic!("{}: {status}", case.name));
        assert_eq!(outcome(answer), case.expect, "{}", case.name);
        assert_eq!(
            fake.mints.load(Ordering::SeqCst),
            case.token_requests,
            "{}: TokenRequests",
            case.name
        );
    }
}

#[tokio::test]
async fn a_message_without_a_phase_is_an_invalid_argument() {
    let (processor, _) = processor(None, OnTokenError::Deny);
    let status = processor
        .handle(ProcessingRequest::default(), &StreamContext::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn the_scan_keeps_every_audience_value_and_reads_value_as_a_fallback() {
    let mut headers: Vec<HeaderValue> = (0..20)
        .map(|i| HeaderValue {
            key: "X-Kubernetes-Audience".into(),
            value: String::new(),
            raw_value: format!("a{i}").into_bytes(),
        })
        .collect();
    headers.push(HeaderValue {
        key: ":authority".into(),
        value: "host:80".into(),
        raw_value: Vec::new(),
    });
    let headers = HttpHeaders {
        headers: Some(HeaderMap { headers }),
        ..Default::default()
    };
    let attributes = HashMap::new();
    let context = StreamContext::default();
    let request = Request::scan(&headers, &attributes, &context, AUD);
    assert_eq!(request.audience_headers.len(), 20);
    assert_eq!(request.audience_headers[19], b"a19");
    assert_eq!(request.authority, b"host:80");
    assert_eq!(request.sni, None, "not intercepted: no SNI check");
}

#[test]
fn the_decision_is_pure() {
    let policy = Policy {
        rules: rules(None),
        intercept: InterceptHosts::default(),
        local: LocalDestinations::Refuse,
        apiserver: None,
    };
    let request = Request {
        method: b"GET",
        authority: b"svc:80",
        path: Some(b"/p?kubernetes-audience=a1"),
        audience_headers: vec![b"a1"],
        ..Request::default()
    };
    assert_eq!(
        policy.decide(&request),
        Decision::Inject(Injection {
            audience: Audience::parse(b"a1", Source::Header).unwrap(),
            source: Source::Header,
            mutation: Mutation {
                remove: Some(AUD),
                path: Some(b"/p".to_vec()),
            },
        })
    );
    let ambiguous = Request {
        audience_headers: vec![b"a1", b"a2"],
        ..request
    };
    assert_eq!(
        policy.decide(&ambiguous),
        Decision::Answer(Verdict::Refuse(Rejection::Ambiguous {
            from: Source::Header
        }))
    );
}

// === local destinations ===

mod local;
