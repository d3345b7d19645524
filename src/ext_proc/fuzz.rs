//! Property tests (proptest) for the request decision and the
//! `ProcessingRequest` handler: arbitrary requests and arbitrary prost
//! messages (structured, and decoded from arbitrary bytes) through the real
//! handler in-process, with a fake token source. `PROPTEST_CASES=N` runs
//! longer (README.md, "Fuzzing"); failures are kept in
//! `proptest-regressions/ext_proc/fuzz.txt`.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

use super::decision::{Decision, Policy, Request, inject, respond};
use super::*;
use crate::allowlist::Allowlist;
use crate::audience::{Audience, Source};
use crate::destination::DestinationRules;
use crate::local::{self, LocalDestinations};
use crate::secret::Token;
use crate::tokens::cache::Limits;
use crate::tokens::{Error, IssuedToken};

/// Mints `tok.<audience>`; the audience `broken` fails (403).
#[derive(Clone, Default)]
struct Fake;

impl TokenSource for Fake {
    async fn mint(&self, audience: &Audience) -> Result<IssuedToken, Error> {
        if audience.as_str() == "broken" {
            return Err(Error::Forbidden);
        }
        Ok(IssuedToken {
            token: Token::new(format!("tok.{audience}")).ok_or(Error::BadResponse("token"))?,
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        })
    }
}

/// Configurations under test: local destinations refused without rules
/// (the shipped default), and allowed with destination rules.
fn rules(with_rules: bool) -> Rules {
    let destinations = if with_rules {
        DestinationRules::new(
            [
                "*.rules.test=aud",
                "10.0.0.0/8=*",
                "https://*.intercept.test={host}",
            ],
            None,
        )
        .expect("valid rules")
    } else {
        DestinationRules::default()
    };
    Rules {
        header: "x-kubernetes-audience".into(),
        parameter: "kubernetes-audience".into(),
        default: Some(Audience::parse(b"fallback", Source::Default).expect("valid")),
        allowlist: Allowlist::default(),
        destinations,
    }
}

fn intercept() -> InterceptHosts {
    InterceptHosts::new(["*.intercept.test", "10.0.0.1"]).expect("valid patterns")
}

fn local_for(with_rules: bool) -> LocalDestinations {
    if with_rules {
        LocalDestinations::Allow
    } else {
        LocalDestinations::Refuse
    }
}

fn policy(with_rules: bool) -> Policy {
    Policy {
        rules: rules(with_rules),
        intercept: intercept(),
        local: local_for(with_rules),
        apiserver: Some(ApiServerAudiences::new(["https://kubernetes.default.svc"])),
    }
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
});

/// The two processors (index: with rules), built once for every case.
static PROCESSORS: LazyLock<[ExtProc<Fake>; 2]> = LazyLock::new(|| {
    let _runtime = RUNTIME.enter();
    [false, true].map(|with_rules| {
        let limits = Limits {
            max_audiences: 64,
            idle_timeout: Duration::from_secs(3600),
            max_in_flight: 8,
            request_timeout: Duration::from_secs(4),
        };
        ExtProc::new(
            rules(with_rules),
            TokenCache::new(Fake, limits),
            OnTokenError::Deny,
            intercept(),
            local_for(with_rules),
            Some(ApiServerAudiences::new(["https://kubernetes.default.svc"])),
        )
    })
});

mod strategies;
use strategies::{Parts, any_message, message, parts};

// === What an answer carries ===

/// Every header an answer sets, wherever it sets it.
fn set_headers(answer: &ProcessingResponse) -> Vec<(&str, &[u8])> {
    let mutation = match &answer.response {
        Some(Response::RequestHeaders(h)) => {
            h.response.as_ref().and_then(|c| c.header_mutation.as_ref())
        }
        Some(Response::ImmediateResponse(i)) => i.headers.as_ref(),
        _ => None,
    };
    mutation
        .map(|m| {
            m.set_headers
                .iter()
                .filter_map(|o| o.header.as_ref())
                .map(|h| (h.key.as_str(), h.raw_value.as_slice()))
                .collect()
        })
        .unwrap_or_default()
}

fn carries_token(answer: &ProcessingResponse) -> bool {
    set_headers(answer).iter().any(|(key, value)| {
        key.eq_ignore_ascii_case("authorization") || value.windows(4).any(|w| w == b"tok.")
    })
}

fn is_immediate(answer: &ProcessingResponse) -> bool {
    matches!(answer.response, Some(Response::ImmediateResponse(_)))
}

proptest! {
    /// The decision on any request: no panic; a refusal never carries a
    /// token; a token only for a non-CONNECT request to a destination that
    /// is not local (when local destinations are refused), for an audience
    /// the API-server check and the rules' binding admit.
    #[test]
    fn decisions_never_misdirect_a_token(parts in parts(), with_rules in any::<bool>()) {
        let policy = policy(with_rules);
        let (message, context) = message(&parts, false);
        let Some(Phase::RequestHeaders(headers)) = &message.request else {
            unreachable!("built as request_headers");
        };
        let request = Request::scan(headers, &message.attributes, &context, &policy.rules.header);
        match policy.decide(&request) {
            Decision::Answer(verdict) => {
                let answer = respond(verdict);
                prop_assert!(!carries_token(&answer));
            }
            Decision::Inject(injection) => {
                prop_assert!(parts.method != b"CONNECT");
                if policy.local == LocalDestinations::Refuse {
                    prop_assert!(local::check_authority(&parts.authority).is_ok());
                }
                let audience = injection.audience.clone();
                prop_assert!(audience.as_str() != "https://kubernetes.default.svc");
                if with_rules {
                    let destination = crate::destination::Destination::from_authority(
                        &parts.authority,
                        parts.sni.is_some(),
                    );
                    prop_assert!(destination.is_some_and(|d| policy.rules.destinations.admits(&d, &audience)));
                }
                let failed: Result<Token, Arc<Error>> = Err(Arc::new(Error::Forbidden));
                let denied = inject(injection.clone(), failed.clone(), OnTokenError::Deny);
                prop_assert!(is_immediate(&denied) && !carries_token(&denied));
                let allowed = inject(injection.clone(), failed, OnTokenError::Allow);
                prop_assert!(!carries_token(&allowed));
                // (Any audience text, `\u{a0}` too, but a token is ASCII.)
                let token = Token::new("tok.x".to_owned()).expect("a token");
                let given = inject(injection, Ok(token), OnTokenError::Deny);
                prop_assert!(carries_token(&given) && !is_immediate(&given));
            }
        }
    }

    /// The real handler on any message: it answers in time (or ends the
    /// stream with a status for a message without a phase), never panics,
    /// never puts a token in an immediate response, and never gives one to
    /// a CONNECT or, with local destinations refused, a local destination.
    #[test]
    fn handler_answers_any_message((message, context) in any_message(), with_rules in any::<bool>()) {
        let processor = &PROCESSORS[usize::from(with_rules)];
        let (method, authority) = request_target(&message);
        let no_phase = message.request.is_none();
        let result = RUNTIME.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), processor.handle(message, &context)).await
        });
        let result = result.map_err(|_| TestCaseError::fail("no answer within 10 s"))?;
        match result {
            Err(status) => {
                prop_assert!(no_phase, "only a message without a phase ends the stream: {:?}", status.code());
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            }
            Ok(answer) => {
                prop_assert!(!no_phase);
                if carries_token(&answer) {
                    prop_assert!(!is_immediate(&answer));
                    prop_assert!(method.as_deref() != Some(&b"CONNECT"[..]));
                    if !with_rules {
                        prop_assert!(local::check_authority(&authority.unwrap_or_default()).is_ok());
                    }
                }
            }
        }
    }

    /// Arbitrary bytes decoded as a `ProcessingRequest`: whatever prost
    /// accepts, the handler answers as above (no panic, in time).
    #[test]
    fn handler_answers_any_decoded_bytes(bytes in vec(any::<u8>(), 0..256), with_rules in any::<bool>()) {
        let Ok(message) = ProcessingRequest::decode(bytes.as_slice()) else {
            return Ok(());
        };
        let processor = &PROCESSORS[usize::from(with_rules)];
        let no_phase = message.request.is_none();
        let result = RUNTIME.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                processor.handle(message, &StreamContext::default()),
            )
            .await
        });
        let result = result.map_err(|_| TestCaseError::fail("no answer within 10 s"))?;
        prop_assert_eq!(result.is_err(), no_phase);
    }
}

/// The `:method` and `:authority` of a `request_headers` message as the
/// handler reads them: the last of each, `raw_value`, else `value`.
fn request_target(message: &ProcessingRequest) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let Some(Phase::RequestHeaders(headers)) = &message.request else {
        return (None, None);
    };
    let find = |key: &str| {
        headers
            .headers
            .iter()
            .flat_map(|m| m.headers.iter())
            .rfind(|h| h.key == key)
            .map(|h| {
                if h.raw_value.is_empty() {
                    h.value.as_bytes().to_vec()
                } else {
                    h.raw_value.clone()
                }
            })
    };
    (find(":method"), find(":authority"))
}

// === Regression cases found by the properties above ===

/// Found by `decisions_never_misdirect_a_token`: an audience that is a
/// single no-break space (`\u{a0}`, not a control character) is a valid
/// audience and is injected like any other (the property's own token
/// fixture could not hold it; the decision was right).
#[test]
fn a_no_break_space_audience_is_an_audience() {
    let policy = policy(false);
    let parts = Parts {
        method: b"POST".to_vec(),
        authority: b"10.0.0.1".to_vec(),
        path: None,
        marked: false,
        audience_headers: vec![b"\xc2\xa0".to_vec()],
        metadata: None,
        sni: None,
    };
    let (message, context) = message(&parts, false);
    let Some(Phase::RequestHeaders(headers)) = &message.request else {
        unreachable!("built as request_headers");
    };
    let request = Request::scan(headers, &message.attributes, &context, &policy.rules.header);
    let Decision::Inject(injection) = policy.decide(&request) else {
        panic!("a header audience for a remote host is injected");
    };
    assert_eq!(injection.audience.as_str(), "\u{a0}");
}
