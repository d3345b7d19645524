//! The Envoy external processor (`envoy.service.ext_proc.v3.ExternalProcessor`).
//!
//! Envoy opens one `Process` stream per HTTP request. With the shipped
//! configuration it sends a single `request_headers` message; the processor
//! resolves the audience, fetches the token and answers with a header
//! mutation or an immediate response. Every other phase is answered with a
//! pass-through, so a misconfigured Envoy is never left waiting. A message
//! without a phase ends the stream with `INVALID_ARGUMENT`.

pub mod response;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};
use futures_util::Stream;
use tonic::{Status, Streaming};

use crate::audience::{self, RequestParts, Rules};
use crate::intercept::{Host, InterceptHosts};
use crate::tokens::TokenSource;
use crate::tokens::cache::TokenCache;
use wire::{Answer, ExtProcServer, Injection};

/// What to do when no token can be had for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnTokenError {
    /// Refuse the request: Envoy answers 503 with the reason (fail closed).
    Deny,
    /// Forward the request without a token (fail open).
    Allow,
}

/// The processor. Cheap to clone.
pub struct ExtProc<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for ExtProc<S> {
    fn clone(&self) -> Self {
        ExtProc {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S> {
    rules: Rules,
    tokens: TokenCache<S>,
    token_header: Arc<str>,
    audience_header: Arc<str>,
    on_token_error: OnTokenError,
    intercept: InterceptHosts,
}

/// Header the processor sets on a CONNECT request whose host is intercepted;
/// the shipped Envoy config routes such tunnels to the TLS-terminating
/// internal listener. It never leaves Envoy (a terminated CONNECT forwards
/// only its payload), and a client-sent one is removed.
pub const INTERCEPT_MARKER: &str = "x-kube-audience-proxy-intercept";

/// gRPC metadata set by the intercepting listener's ext_proc filter: the
/// request arrived inside intercepted TLS, so its `:authority` must match
/// the SNI the certificate was minted for.
pub const LISTENER_METADATA: &str = "x-kube-audience-proxy-listener";

/// The Envoy attribute holding the TLS server name (SNI).
pub const SNI_ATTRIBUTE: &str = "connection.requested_server_name";

/// What a stream knows before its first message (from the gRPC metadata).
#[derive(Clone, Debug, Default)]
pub struct StreamContext {
    /// Audience named by Envoy configuration.
    pub audience: Option<Bytes>,
    /// The request came through the intercepting (TLS) listener.
    pub intercepted: bool,
}

/// Most audience-header entries kept per request; beyond it, only whether a
/// further value differs is recorded (which makes the request ambiguous).
const MAX_AUDIENCE_HEADERS: usize = 8;

impl<S: TokenSource> ExtProc<S> {
    /// A processor resolving audiences with `rules` and tokens from `tokens`.
    pub fn new(
        rules: Rules,
        tokens: TokenCache<S>,
        on_token_error: OnTokenError,
        intercept: InterceptHosts,
    ) -> ExtProc<S> {
        ExtProc {
            inner: Arc::new(Inner {
                audience_header: Arc::from(rules.header.as_str()),
                rules,
                tokens,
                token_header: Arc::from("authorization"),
                on_token_error,
                intercept,
            }),
        }
    }

    /// The tonic service to add to a server.
    pub fn into_service(self) -> ExtProcServer<S> {
        ExtProcServer::new(self)
    }

    /// Answers one message of a stream. `Err` ends the stream.
    pub async fn handle(
        &self,
        message: ProcessingRequest,
        context: &StreamContext,
    ) -> Result<Answer, Status> {
        match message.request {
            Some(Phase::RequestHeaders(headers)) => {
                let sni = context
                    .intercepted
                    .then(|| sni(&message.attributes, &headers));
                Ok(self
                    .request_headers(&headers, context.audience.as_deref(), sni)
                    .await)
            }
            Some(Phase::ResponseHeaders(_)) => Ok(response::response_headers().into()),
            Some(Phase::RequestBody(_)) => Ok(response::request_body().into()),
            Some(Phase::ResponseBody(_)) => Ok(response::response_body().into()),
            Some(Phase::RequestTrailers(_)) => Ok(response::request_trailers().into()),
            Some(Phase::ResponseTrailers(_)) => Ok(response::response_trailers().into()),
            None => Err(Status::invalid_argument(
                "ProcessingRequest carries no request phase (request_headers, request_body, ...)",
            )),
        }
    }

    /// `sni` is `Some` for requests that arrived inside intercepted TLS
    /// (the server name, empty when the client sent none).
    async fn request_headers(
        &self,
        headers: &HttpHeaders,
        metadata: Option<&[u8]>,
        sni: Option<&str>,
    ) -> Answer {
        let inner = &*self.inner;
        let mut path: Option<&[u8]> = None;
        let mut method: &[u8] = b"";
        let mut authority: &[u8] = b"";
        let mut marked = false;
        let mut audience_values: [&[u8]; MAX_AUDIENCE_HEADERS] = [&[]; MAX_AUDIENCE_HEADERS];
        let mut audience_count = 0;
        for header in headers.headers.iter().flat_map(|map| map.headers.iter()) {
            if header.key == ":path" {
                path = Some(header_bytes(header));
            } else if header.key == ":method" {
                method = header_bytes(header);
            } else if header.key == ":authority" {
                authority = header_bytes(header);
            } else if header.key == INTERCEPT_MARKER {
                marked = true;
            } else if header.key.eq_ignore_ascii_case(&inner.rules.header) {
                let value = header_bytes(header);
                if audience_count < MAX_AUDIENCE_HEADERS {
                    audience_values[audience_count] = value;
                    audience_count += 1;
                } else if value != audience_values[0] {
                    // Past the bound only a differing value matters: keep
                    // it, so the request is refused as ambiguous.
                    audience_values[MAX_AUDIENCE_HEADERS - 1] = value;
                }
            }
        }
        if method == b"CONNECT" {
            return self.connect(authority, marked).into();
        }
        if let Some(sni) = sni
            && let Err(reason) = authority_matches_sni(authority, sni)
        {
            tracing::info!(%reason, "refused a request whose host differs from its TLS server name (421)");
            return response::misdirected(&reason).into();
        }
        let parts = RequestParts {
            header_values: &audience_values[..audience_count],
            path,
            metadata,
        };
        let resolution = match inner.rules.resolve(parts) {
            Ok(resolution) => resolution,
            Err(rejection) => {
                tracing::info!(%rejection, "refused a request");
                return response::refuse(&rejection).into();
            }
        };
        let remove = resolution.remove_header.then_some(&inner.audience_header);
        let Some((audience, source)) = resolution.audience else {
            tracing::debug!("no audience: passing the request through");
            return response::request_headers(response::Mutation::default()).into();
        };
        match inner.tokens.get(&audience).await {
            Ok(token) => {
                tracing::debug!(%audience, source = source.as_str(), "injecting a token");
                Answer::Inject(Injection {
                    header: inner.token_header.clone(),
                    token,
                    path: resolution.new_path,
                    remove: remove.cloned(),
                })
            }
            Err(error) => match inner.on_token_error {
                OnTokenError::Deny => {
                    tracing::warn!(%audience, %error, "no token: refusing the request (503)");
                    response::token_unavailable(audience.as_str(), &error).into()
                }
                OnTokenError::Allow => {
                    tracing::warn!(%audience, %error, "no token: forwarding without one (--on-token-error allow)");
                    response::request_headers(response::Mutation {
                        remove: remove.map(|r| &**r),
                        path: resolution.new_path,
                    })
                    .into()
                }
            },
        }
    }
}

impl<S: TokenSource> ExtProc<S> {
    /// A CONNECT: mark intercepted hosts so Envoy re-routes the tunnel to the
    /// TLS-terminating listener; strip a client-sent marker. No token is
    /// ever added to a CONNECT.
    fn connect(
        &self,
        authority: &[u8],
        marked: bool,
    ) -> envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse {
        let host = std::str::from_utf8(authority)
            .ok()
            .and_then(Host::from_authority)
            .map(|(host, _)| host);
        let intercept = host.is_some_and(|h| self.inner.intercept.matches(&h));
        tracing::debug!(authority = %String::from_utf8_lossy(authority), intercept, "CONNECT");
        response::connect(INTERCEPT_MARKER, intercept, marked)
    }
}

/// The SNI Envoy reports for this request (empty if absent). Envoy 1.40 puts
/// attributes in `ProcessingRequest.attributes`; older versions in the
/// headers message. Both are keyed by the filter name.
fn sni<'a>(
    request_attributes: &'a std::collections::HashMap<
        String,
        envoy_types::pb::google::protobuf::Struct,
    >,
    headers: &'a HttpHeaders,
) -> &'a str {
    use envoy_types::pb::google::protobuf::value::Kind;
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

/// The answers of one Process stream.
pub type AnswerStream = Pin<Box<dyn Stream<Item = Result<Answer, Status>> + Send>>;

impl<S: TokenSource> ExtProc<S> {
    /// Serves one Process stream (one HTTP request): answers each message in
    /// order until Envoy closes its side.
    pub fn process_stream(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> tonic::Response<AnswerStream> {
        let context = StreamContext {
            audience: request
                .metadata()
                .get(audience::METADATA_KEY)
                .map(|v| Bytes::copy_from_slice(v.as_bytes())),
            intercepted: request
                .metadata()
                .get(LISTENER_METADATA)
                .is_some_and(|v| v.as_bytes() == b"intercept"),
        };
        let inbound = request.into_inner();
        let state = Some((inbound, self.clone(), context));
        let stream = futures_util::stream::unfold(state, |state| async move {
            let (mut inbound, processor, context) = state?;
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    // Envoy closed its side: the HTTP request is done.
                    Ok(None) => return None,
                    // A broken stream or an undecodable message: end the
                    // stream with that status (a gone client never reads it).
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "ext_proc stream failed");
                        return Some((Err(status), None));
                    }
                };
                if message.observability_mode {
                    // Envoy ignores answers in observability mode.
                    continue;
                }
                return match processor.handle(message, &context).await {
                    Ok(answer) => Some((Ok(answer), Some((inbound, processor, context)))),
                    Err(status) => Some((Err(status), None)),
                };
            }
        });
        tonic::Response::new(Box::pin(stream))
    }
}
