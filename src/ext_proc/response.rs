//! Pure builders for the answers the processor sends Envoy.
//!
//! Header values are always written to `raw_value`: Envoy 1.40 ignores
//! `value` in mutations (it would set the header to an empty string).
//!
//! Refusals become an `ImmediateResponse` (Envoy answers the client itself,
//! the upstream never sees the request): 400 for a malformed audience, 403
//! for one outside the allowlist, not bound to the destination by the
//! destination rules or for a local destination, 503 when no token can be
//! had.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, TrailersResponse, processing_response::Response,
};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};

use crate::audience::Rejection;
use crate::local::LocalRefusal;
use crate::secret::Token;
use crate::tokens;

/// The header the token is written into (overwriting any the client sent).
pub(crate) const TOKEN_HEADER: &str = "authorization";

/// What to change in the request headers besides the token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Mutation<'a> {
    /// Header to remove (the audience header).
    pub remove: Option<&'a str>,
    /// New `:path` (without the audience parameter).
    pub path: Option<Vec<u8>>,
}

/// A `request_headers` answer without a token: CONTINUE, with the mutation
/// if there is one.
pub(crate) fn request_headers(mutation: Mutation<'_>) -> ProcessingResponse {
    continue_with(None, mutation)
}

/// A `request_headers` answer that sets `authorization: Bearer <token>`
/// (overwriting a client-sent one) and applies `mutation`. The one place a
/// token leaves the processor.
pub(crate) fn inject(token: &Token, mutation: Mutation<'_>) -> ProcessingResponse {
    let bearer = overwrite(TOKEN_HEADER, token.bearer_header_value().to_vec());
    continue_with(Some(bearer), mutation)
}

fn continue_with(token: Option<HeaderValueOption>, mutation: Mutation<'_>) -> ProcessingResponse {
    let set_headers: Vec<_> = token
        .into_iter()
        .chain(mutation.path.map(|path| overwrite(":path", path)))
        .collect();
    let remove_headers: Vec<_> = mutation.remove.map(str::to_owned).into_iter().collect();
    let header_mutation = if set_headers.is_empty() && remove_headers.is_empty() {
        None
    } else {
        Some(HeaderMutation {
            set_headers,
            remove_headers,
        })
    };
    request_headers_response(CommonResponse {
        header_mutation,
        ..Default::default()
    })
}

fn request_headers_response(common: CommonResponse) -> ProcessingResponse {
    wrap(Response::RequestHeaders(HeadersResponse {
        response: Some(common),
    }))
}

/// A header set to `raw_value`, replacing any value it had. Envoy reads only
/// `raw_value` (a mutation with `value` sets the header empty).
fn overwrite(key: &str, raw_value: Vec<u8>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value,
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// The answer to a CONNECT: set the intercept marker (and re-route) for an
/// intercepted host; otherwise remove a client-sent marker (and re-route,
/// since the route may have been chosen with it).
pub(crate) fn connect(marker: &str, intercept: bool, client_marked: bool) -> ProcessingResponse {
    let header_mutation = if intercept {
        Some(HeaderMutation {
            set_headers: vec![overwrite(marker, b"1".to_vec())],
            remove_headers: Vec::new(),
        })
    } else if client_marked {
        Some(HeaderMutation {
            set_headers: Vec::new(),
            remove_headers: vec![marker.to_owned()],
        })
    } else {
        None
    };
    request_headers_response(CommonResponse {
        clear_route_cache: header_mutation.is_some(),
        header_mutation,
        ..Default::default()
    })
}

/// Envoy answers 421: the request's host is not the one the TLS
/// certificate was minted for.
pub(crate) fn misdirected(reason: &str) -> ProcessingResponse {
    immediate(
        StatusCode::MisdirectedRequest,
        reason,
        "kube_audience_proxy_misdirected_request",
    )
}

/// Envoy answers 403 (400 when the host cannot be read): the destination is
/// on the proxy's own machine or network link.
pub(crate) fn local_destination(refusal: &LocalRefusal) -> ProcessingResponse {
    let (status, details) = match refusal {
        LocalRefusal::Local { .. } => (
            StatusCode::Forbidden,
            "kube_audience_proxy_local_destination",
        ),
        LocalRefusal::Unreadable { .. } => (
            StatusCode::BadRequest,
            "kube_audience_proxy_unreadable_destination",
        ),
    };
    immediate(status, &refusal.to_string(), details)
}

/// The HTTP status for an audience refusal.
pub(crate) fn rejection_status(rejection: &Rejection) -> StatusCode {
    match rejection {
        Rejection::Empty { .. }
        | Rejection::TooLong { .. }
        | Rejection::Malformed { .. }
        | Rejection::Ambiguous { .. } => StatusCode::BadRequest,
        Rejection::NotAllowed { .. } => StatusCode::Forbidden,
        Rejection::NotBound { .. } => StatusCode::Forbidden,
        Rejection::ApiServerAudience { .. } => StatusCode::Forbidden,
    }
}

/// Envoy answers the client with 400/403: the audience is refused.
pub(crate) fn refuse(rejection: &Rejection) -> ProcessingResponse {
    let details = match rejection {
        Rejection::Empty { .. } => "kube_audience_proxy_empty_audience",
        Rejection::TooLong { .. } => "kube_audience_proxy_audience_too_long",
        Rejection::Malformed { .. } => "kube_audience_proxy_malformed_audience",
        Rejection::Ambiguous { .. } => "kube_audience_proxy_ambiguous_audience",
        Rejection::NotAllowed { .. } => "kube_audience_proxy_audience_not_allowed",
        Rejection::NotBound { .. } => "kube_audience_proxy_audience_not_bound",
        Rejection::ApiServerAudience { .. } => "kube_audience_proxy_apiserver_audience",
    };
    immediate(rejection_status(rejection), &rejection.to_string(), details)
}

/// Envoy answers the client with 503: no token could be had. While the
/// audience backs off, `retry-after` says (in whole seconds, rounded up)
/// when asking again can help.
pub(crate) fn token_unavailable(audience: &str, error: &tokens::Error) -> ProcessingResponse {
    let reason = format!("no token for audience {audience:?}: {error}");
    let mut answer = immediate(
        StatusCode::ServiceUnavailable,
        &reason,
        "kube_audience_proxy_token_unavailable",
    );
    if let (Some(retry_in), Some(Response::ImmediateResponse(immediate))) =
        (error.retry_in(), answer.response.as_mut())
    {
        let seconds = tokens::whole_seconds(retry_in).to_string();
        immediate
            .headers
            .get_or_insert_with(HeaderMutation::default)
            .set_headers
            .push(overwrite("retry-after", seconds.into_bytes()));
    }
    answer
}

fn immediate(status: StatusCode, reason: &str, details: &str) -> ProcessingResponse {
    let mut body = Vec::with_capacity(reason.len() + 22);
    body.extend_from_slice(b"kube-audience-proxy: ");
    body.extend_from_slice(reason.as_bytes());
    body.push(b'\n');
    wrap(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: status as i32,
        }),
        headers: Some(HeaderMutation {
            set_headers: vec![overwrite(
                "content-type",
                b"text/plain; charset=utf-8".to_vec(),
            )],
            remove_headers: Vec::new(),
        }),
        body,
        grpc_status: None,
        details: details.to_owned(),
    }))
}

/// Pass-through answers for the phases this processor does not act on, so a
/// misconfigured Envoy that sends them is answered instead of left hanging.
pub(crate) fn response_headers() -> ProcessingResponse {
    wrap(Response::ResponseHeaders(HeadersResponse::default()))
}

/// See [`response_headers`].
pub(crate) fn request_body() -> ProcessingResponse {
    wrap(Response::RequestBody(BodyResponse::default()))
}

/// See [`response_headers`].
pub(crate) fn response_body() -> ProcessingResponse {
    wrap(Response::ResponseBody(BodyResponse::default()))
}

/// See [`response_headers`].
pub(crate) fn request_trailers() -> ProcessingResponse {
    wrap(Response::RequestTrailers(TrailersResponse::default()))
}

/// See [`response_headers`].
pub(crate) fn response_trailers() -> ProcessingResponse {
    wrap(Response::ResponseTrailers(TrailersResponse::default()))
}

fn wrap(response: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::{Audience, Source};

    fn mutation_of(resp: &ProcessingResponse) -> &HeaderMutation {
        match &resp.response {
            Some(Response::RequestHeaders(h)) => h
                .response
                .as_ref()
                .unwrap()
                .header_mutation
                .as_ref()
                .unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn mutations_use_raw_value_and_overwrite() {
        let resp = request_headers(Mutation {
            remove: Some("x-kubernetes-audience"),
            path: Some(b"/p?x=1".to_vec()),
        });
        let m = mutation_of(&resp);
        assert_eq!(m.remove_headers, ["x-kubernetes-audience"]);
        let set: Vec<_> = m
            .set_headers
            .iter()
            .map(|o| {
                let h = o.header.as_ref().unwrap();
                assert!(
                    h.value.is_empty(),
                    "value must stay empty; Envoy reads raw_value"
                );
                assert_eq!(
                    o.append_action,
                    HeaderAppendAction::OverwriteIfExistsOrAdd as i32
                );
                (h.key.as_str(), h.raw_value.as_slice())
            })
            .collect();
        assert_eq!(set, [(":path", &b"/p?x=1"[..])]);
    }

    #[test]
    fn the_token_overwrites_authorization_before_the_path() {
        let token = Token::new("abc.def".into()).unwrap();
        let resp = inject(
            &token,
            Mutation {
                remove: Some("x-kubernetes-audience"),
                path: Some(b"/p".to_vec()),
            },
        );
        let m = mutation_of(&resp);
        let set: Vec<_> = m
            .set_headers
            .iter()
            .map(|o| {
                let h = o.header.as_ref().unwrap();
                assert!(h.value.is_empty(), "raw_value only");
                assert_eq!(
                    o.append_action,
                    HeaderAppendAction::OverwriteIfExistsOrAdd as i32
                );
                (h.key.as_str(), h.raw_value.as_slice())
            })
            .collect();
        assert_eq!(
            set,
            [
                (TOKEN_HEADER, &b"Bearer abc.def"[..]),
                (":path", &b"/p"[..])
            ]
        );
        assert_eq!(m.remove_headers, ["x-kubernetes-audience"]);
    }

    #[test]
    fn no_mutation_means_plain_continue() {
        let resp = request_headers(Mutation::default());
        let Some(Response::RequestHeaders(h)) = resp.response else {
            panic!()
        };
        let common = h.response.unwrap();
        assert_eq!(common.status, 0, "CONTINUE");
        assert!(common.header_mutation.is_none());
    }

    #[test]
    fn refusals_map_to_statuses() {
        let q = Source::QueryParameter;
        let aud = Audience::parse(b"x", q).unwrap();
        let cases = [
            (Rejection::Empty { from: q }, 400),
            (Rejection::TooLong { from: q }, 400),
            (Rejection::Malformed { from: q }, 400),
            (Rejection::Ambiguous { from: q }, 400),
            (
                Rejection::NotAllowed {
                    audience: aud.clone(),
                },
                403,
            ),
            (
                Rejection::NotBound {
                    audience: aud.clone(),
                    host: "http://h:80".into(),
                },
                403,
            ),
            (Rejection::ApiServerAudience { audience: aud }, 403),
        ];
        for (rejection, code) in cases {
            let Some(Response::ImmediateResponse(i)) = refuse(&rejection).response else {
                panic!()
            };
            assert_eq!(i.status.unwrap().code, code);
            let body = String::from_utf8(i.body).unwrap();
            assert_eq!(body, format!("kube-audience-proxy: {rejection}\n"));
            assert!(!i.details.contains(' '));
        }
        let Some(Response::ImmediateResponse(i)) =
            token_unavailable("aud", &tokens::Error::Forbidden).response
        else {
            panic!()
        };
        assert_eq!(i.status.unwrap().code, 503);
        assert!(String::from_utf8(i.body).unwrap().contains("403 Forbidden"));
    }

    #[test]
    fn a_backing_off_audience_gets_retry_after_in_whole_seconds() {
        let retry_after = |error: &tokens::Error| {
            let Some(Response::ImmediateResponse(i)) = token_unavailable("aud", error).response
            else {
                panic!()
            };
            assert_eq!(i.status.unwrap().code, 503);
            let headers = i.headers.unwrap().set_headers;
            let found: Vec<_> = headers
                .iter()
                .filter_map(|o| o.header.as_ref())
                .filter(|h| h.key == "retry-after")
                .map(|h| String::from_utf8(h.raw_value.clone()).unwrap())
                .collect();
            (found, String::from_utf8(i.body).unwrap())
        };
        let backing_off = |millis| tokens::Error::BackingOff {
            cause: Box::new(tokens::Error::RateLimited {
                retry_after: Some(std::time::Duration::from_secs(5)),
            }),
            retry_in: std::time::Duration::from_millis(millis),
        };
        let (header, body) = retry_after(&backing_off(4_200));
        assert_eq!(header, ["5"], "rounded up");
        assert!(body.contains("429 Too Many Requests"), "{body}");
        assert!(body.contains("asks again in 5 s"), "{body}");
        assert_eq!(retry_after(&backing_off(5_000)).0, ["5"]);
        assert_eq!(retry_after(&backing_off(1)).0, ["1"]);
        // No window, no header.
        assert!(
            retry_after(&tokens::Error::Server { status: 500 })
                .0
                .is_empty()
        );
    }
}
