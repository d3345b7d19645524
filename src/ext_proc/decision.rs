//! The per-request decision, in three steps the stream loop chains:
//!
//! 1. [`Request::scan`]: one pass over Envoy's header message, borrowing
//!    the few values the decision reads;
//! 2. [`Policy::decide`]: pure, what to do with the request (forward, inject
//!    a token, refuse, route a CONNECT, 421), from the request and the
//!    configuration alone; the destination rules' binding is checked here,
//!    after the audience is resolved, before any token is asked for;
//! 3. [`respond`] answers a [`Verdict`] at once; an [`Injection`] first
//!    asks the token cache, then [`inject`] turns the token (or the failure
//!    and the `--on-token-error` policy) into Envoy's answer. Both are pure
//!    but for their log line.
//!
//! Checks on the destination belong in [`Policy::decide`], which already sees
//! the `:authority` and, inside intercepted TLS, the SNI. The first of them
//! refuses local destinations ([`crate::local`]), before anything else.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingResponse};
use envoy_types::pb::google::protobuf::Struct;
use envoy_types::pb::google::protobuf::value::Kind;

use super::response::{self, Mutation};
use super::{INTERCEPT_MARKER, OnTokenError, SNI_ATTRIBUTE, StreamContext};
use crate::apiserver::ApiServerAudiences;
use crate::audience::{Audience, Rejection, RequestParts, Rules, Source};
use crate::destination::Destination;
use crate::intercept::{Host, InterceptHosts};
use crate::local::{self, LocalDestinations, LocalRefusal};
use crate::secret::Token;
use crate::tokens;

/// The parts of one request the decision reads, borrowed from Envoy's
/// message (no header is copied).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Request<'a> {
    /// `:method`: a CONNECT is routed, never given a token.
    pub method: &'a [u8],
    /// `:authority`: the destination, checked against the SNI.
    pub authority: &'a [u8],
    /// `:path`, where the audience query parameter is looked for.
    pub path: Option<&'a [u8]>,
    /// The client sent the intercept marker itself; it is never trusted.
    pub marked: bool,
    /// Every audience header value, in order. All are kept, however many,
    /// so any two different values make the request ambiguous.
    pub audience_headers: Vec<&'a [u8]>,
    /// The per-route audience Envoy sent in the stream's gRPC metadata.
    pub metadata_audience: Option<&'a [u8]>,
    /// `Some` when the request arrived inside intercepted TLS: the server
    /// name the certificate was minted for (empty when the client sent no
    /// SNI).
    pub sni: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// Scans a `request_headers` message once. `audience_header` is the
    /// configured header name, compared case-insensitively.
    pub(crate) fn scan(
        headers: &'a HttpHeaders,
        attributes: &'a HashMap<String, Struct>,
        stream: &'a StreamContext,
        audience_header: &str,
    ) -> Request<'a> {
        let mut request = Request {
            metadata_audience: stream.audience.as_deref(),
            sni: stream.intercepted.then(|| sni(attributes, headers)),
            ..Request::default()
        };
        for header in headers.headers.iter().flat_map(|map| map.headers.iter()) {
            if header.key == ":path" {
                request.path = Some(header_bytes(header));
            } else if header.key == ":method" {
                request.method = header_bytes(header);
            } else if header.key == ":authority" {
                request.authority = header_bytes(header);
            } else if header.key == INTERCEPT_MARKER {
                request.marked = true;
            } else if header.key.eq_ignore_ascii_case(audience_header) {
                request.audience_headers.push(header_bytes(header));
            }
        }
        request
    }
}

/// What the processor does with a request: answer at once, or get a token
/// first (only then is the cache asked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision<'a> {
    /// Answer without a token.
    Answer(Verdict<'a>),
    /// Forward with a token for the audience, audience markers removed.
    Inject(Injection<'a>),
}

/// A decision that needs no token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict<'a> {
    /// No audience: forward the request untouched.
    PassThrough,
    /// 400/403: the audience is malformed, ambiguous, not allowed, or not
    /// bound to the destination.
    Refuse(Rejection),
    /// A CONNECT (never given a token): mark a tunnel to an intercepted host
    /// so Envoy re-routes it to the TLS-terminating listener; strip a
    /// client-sent marker from any other.
    Connect {
        /// The CONNECT target, for the log line.
        authority: &'a [u8],
        /// The target is an `--intercept-host`.
        intercept: bool,
        /// The client sent the marker.
        client_marked: bool,
    },
    /// 421: inside intercepted TLS, the request names a host other than the
    /// one the certificate was minted for; the reason says which.
    Misdirected(String),
    /// 403 (400 for an unreadable host): the destination is on this machine
    /// or its network link, and `--allow-local-destinations` is off.
    LocalDestination(LocalRefusal),
}

/// A request that gets a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Injection<'a> {
    pub audience: Audience,
    /// Where the audience came from (logged).
    pub source: Source,
    /// The audience header and parameter to remove, with or without a token.
    pub mutation: Mutation<'a>,
}

/// The configuration the decision applies.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    /// How a request names its audience, which audiences are allowed, and
    /// (destination rules) where each may go.
    pub rules: Rules,
    /// Which CONNECT targets are intercepted.
    pub intercept: InterceptHosts,
    /// Whether requests to local destinations are refused.
    pub local: LocalDestinations,
    /// The API server's own audiences, refused; `None` with
    /// `--allow-apiserver-audience`. Shared with discovery, which adds the
    /// issuer once it is known (a read lock per injection).
    pub apiserver: Option<ApiServerAudiences>,
}

impl Policy {
    /// Decides what to do with `request`. Pure: no I/O, no clock (the
    /// API server's audiences are read from shared memory).
    pub(crate) fn decide<'a>(&'a self, request: &Request<'a>) -> Decision<'a> {
        // First: a plain request or a CONNECT to this machine goes nowhere,
        // whatever else it carries.
        if self.local == LocalDestinations::Refuse
            && let Err(refusal) = local::check_authority(request.authority)
        {
            return Decision::Answer(Verdict::LocalDestination(refusal));
        }
        if request.method == b"CONNECT" {
            let intercept = std::str::from_utf8(request.authority)
                .ok()
                .and_then(Host::from_authority)
                .is_some_and(|(host, _)| self.intercept.matches(&host));
            return Decision::Answer(Verdict::Connect {
                authority: request.authority,
                intercept,
                client_marked: request.marked,
            });
        }
        if let Some(sni) = request.sni
            && let Err(reason) = authority_matches_sni(request.authority, sni)
        {
            return Decision::Answer(Verdict::Misdirected(reason));
        }
        // The destination, for the destination rules (read only if any).
        let destination = if self.rules.destinations.is_empty() {
            None
        } else {
            Destination::from_authority(request.authority, request.sni.is_some())
        };
        let parts = RequestParts {
            header_values: &request.audience_headers,
            path: request.path,
            metadata: request.metadata_audience,
            destination,
        };
        let resolution = match self.rules.resolve(parts) {
            Ok(resolution) => resolution,
            Err(rejection) => return Decision::Answer(Verdict::Refuse(rejection)),
        };
        // Without an audience there is nothing to remove: a header or a
        // parameter that was present either named one or was refused.
        let Some((audience, source)) = resolution.audience else {
            return Decision::Answer(Verdict::PassThrough);
        };
        if let Some(refused) = &self.apiserver
            && refused.refuses(audience.as_str())
        {
            return Decision::Answer(Verdict::Refuse(Rejection::ApiServerAudience { audience }));
        }
        // The binding: with destination rules, whatever the audience's
        // source, a token goes only where a rule admits it.
        if let Err(rejection) =
            self.rules
                .destinations
                .bind(destination.as_ref(), request.authority, &audience)
        {
            return Decision::Answer(Verdict::Refuse(rejection));
        }
        let mutation = Mutation {
            remove: resolution
                .remove_header
                .then_some(self.rules.header.as_str()),
            path: resolution.new_path,
        };
        Decision::Inject(Injection {
            audience,
            source,
            mutation,
        })
    }
}

/// Envoy's answer to a request that needs no token.
pub(crate) fn respond(verdict: Verdict<'_>) -> ProcessingResponse {
    match verdict {
        Verdict::PassThrough => {
            tracing::debug!("no audience: passing the request through");
            response::request_headers(Mutation::default())
        }
        Verdict::Refuse(rejection) => {
            tracing::info!(%rejection, "refused a request");
            response::refuse(&rejection)
        }
        Verdict::Connect {
            authority,
            intercept,
            client_marked,
        } => {
            tracing::debug!(authority = %String::from_utf8_lossy(authority), intercept, "CONNECT");
            response::connect(INTERCEPT_MARKER, intercept, client_marked)
        }
        Verdict::Misdirected(reason) => {
            tracing::info!(%reason, "refused a request whose host differs from its TLS server name (421)");
            response::misdirected(&reason)
        }
        Verdict::LocalDestination(refusal) => {
            tracing::info!(%refusal, "refused a request to a local destination");
            response::local_destination(&refusal)
        }
    }
}

/// Envoy's answer to an injection, given what the cache returned. With no
/// token, `on_token_error` decides between 503 and forwarding without one
/// (the audience markers are removed either way).
pub(crate) fn inject(
    injection: Injection<'_>,
    token: Result<Token, Arc<tokens::Error>>,
    on_token_error: OnTokenError,
) -> ProcessingResponse {
    let audience = &injection.audience;
    match (token, on_token_error) {
        (Ok(token), _) => {
            tracing::debug!(%audience, source = injection.source.as_str(), "injecting a token");
            response::inject(&token, injection.mutation)
        }
        (Err(error), OnTokenError::Deny) => {
            tracing::warn!(%audience, %error, "no token: refusing the request (503)");
            response::token_unavailable(audience.as_str(), &error)
        }
        (Err(error), OnTokenError::Allow) => {
            tracing::warn!(%audience, %error, "no token: forwarding without one (--on-token-error allow)");
            response::request_headers(injection.mutation)
        }
    }
}

/// The SNI Envoy reports for this request (empty if absent). Envoy 1.40 puts
/// attributes in `ProcessingRequest.attributes`; older versions in the
/// headers message. Both are keyed by the filter name.
fn sni<'a>(request_attributes: &'a HashMap<String, Struct>, headers: &'a HttpHeaders) -> &'a str {
    request_attributes
        .values()
        .chain(headers.attributes.values())
        .find_map(|s| match s.fields.get(SNI_ATTRIBUTE)?.kind.as_ref()? {
            Kind::StringValue(v) => Some(v.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A request inside intercepted TLS may only go to the host its certificate
/// was minted for: the SNI, or, for a client without SNI, an IP literal
/// (the SNI-less certificate holds only the intercepted IPs).
fn authority_matches_sni(authority: &[u8], sni: &str) -> Result<(), String> {
    let authority = String::from_utf8_lossy(authority);
    let Some((host, _)) = Host::from_authority(&authority) else {
        return Err(format!(
            "the request's host {authority:?} is not a valid host"
        ));
    };
    if sni.is_empty() {
        return match host {
            Host::Ip(_) => Ok(()),
            Host::Name(name) => Err(format!(
                "the request is for {name:?} but the TLS connection carried no server name (SNI)"
            )),
        };
    }
    match Host::parse(sni) {
        Some(sni_host) if sni_host.same_as(&host) => Ok(()),
        _ => Err(format!(
            "the request is for {authority:?} but the TLS connection was opened for {sni:?}"
        )),
    }
}

/// A header's value: Envoy sends it in `raw_value`; `value` is read only as
/// a fallback for other data planes.
fn header_bytes(header: &HeaderValue) -> &[u8] {
    if header.raw_value.is_empty() {
        header.value.as_bytes()
    } else {
        &header.raw_value
    }
}
