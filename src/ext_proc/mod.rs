//! The Envoy external processor (`envoy.service.ext_proc.v3.ExternalProcessor`).
//!
//! Envoy opens one `Process` stream per HTTP request. With the shipped
//! configuration it sends a single `request_headers` message; the processor
//! resolves the audience, fetches the token and answers with a header
//! mutation or an immediate response. Every other phase is answered with a
//! pass-through, so a misconfigured Envoy is never left waiting. A message
//! without a phase ends the stream with `INVALID_ARGUMENT`.

pub mod response;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use futures_util::Stream;
use tonic::{Status, Streaming};

use crate::audience::{self, RequestParts, Rules};
use crate::tokens::TokenSource;
use crate::tokens::cache::TokenCache;

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
    token_header: String,
    on_token_error: OnTokenError,
}

/// Most audience-header entries looked at in one request (more is refused
/// as ambiguous anyway; this only bounds the work).
const MAX_AUDIENCE_HEADERS: usize = 8;

impl<S: TokenSource> ExtProc<S> {
    /// A processor resolving audiences with `rules` and tokens from `tokens`.
    pub fn new(rules: Rules, tokens: TokenCache<S>, on_token_error: OnTokenError) -> ExtProc<S> {
        ExtProc {
            inner: Arc::new(Inner {
                rules,
                tokens,
                token_header: "authorization".to_owned(),
                on_token_error,
            }),
        }
    }

    /// The tonic service to add to a server.
    pub fn into_service(self) -> ExternalProcessorServer<ExtProc<S>> {
        ExternalProcessorServer::new(self)
    }

    /// Answers one message of a stream. `Err` ends the stream.
    pub async fn handle(
        &self,
        message: ProcessingRequest,
        metadata: Option<&[u8]>,
    ) -> Result<ProcessingResponse, Status> {
        match message.request {
            Some(Phase::RequestHeaders(headers)) => {
                Ok(self.request_headers(&headers, metadata).await)
            }
            Some(Phase::ResponseHeaders(_)) => Ok(response::response_headers()),
            Some(Phase::RequestBody(_)) => Ok(response::request_body()),
            Some(Phase::ResponseBody(_)) => Ok(response::response_body()),
            Some(Phase::RequestTrailers(_)) => Ok(response::request_trailers()),
            Some(Phase::ResponseTrailers(_)) => Ok(response::response_trailers()),
            None => Err(Status::invalid_argument(
                "ProcessingRequest carries no request phase (request_headers, request_body, ...)",
            )),
        }
    }

    async fn request_headers(
        &self,
        headers: &HttpHeaders,
        metadata: Option<&[u8]>,
    ) -> ProcessingResponse {
        let inner = &*self.inner;
        let mut path: Option<&[u8]> = None;
        let mut audience_values: [&[u8]; MAX_AUDIENCE_HEADERS] = [&[]; MAX_AUDIENCE_HEADERS];
        let mut audience_count = 0;
        for header in headers.headers.iter().flat_map(|map| map.headers.iter()) {
            if header.key == ":path" {
                path = Some(header_bytes(header));
            } else if header.key.eq_ignore_ascii_case(&inner.rules.header)
                && audience_count < MAX_AUDIENCE_HEADERS
            {
                audience_values[audience_count] = header_bytes(header);
                audience_count += 1;
            }
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
                return response::refuse(&rejection);
            }
        };
        let remove = resolution
            .remove_header
            .then_some(inner.rules.header.as_str());
        let Some((audience, source)) = resolution.audience else {
            tracing::debug!("no audience: passing the request through");
            return response::request_headers(response::Mutation::default());
        };
        match inner.tokens.get(&audience).await {
            Ok(token) => {
                tracing::debug!(%audience, source = source.as_str(), "injecting a token");
                response::request_headers(response::Mutation {
                    token: Some((&inner.token_header, &token)),
                    remove,
                    path: resolution.new_path,
                })
            }
            Err(error) => match inner.on_token_error {
                OnTokenError::Deny => {
                    tracing::warn!(%audience, %error, "no token: refusing the request (503)");
                    response::token_unavailable(audience.as_str(), &error)
                }
                OnTokenError::Allow => {
                    tracing::warn!(%audience, %error, "no token: forwarding without one (--on-token-error allow)");
                    response::request_headers(response::Mutation {
                        token: None,
                        remove,
                        path: resolution.new_path,
                    })
                }
            },
        }
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

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: TokenSource> ExternalProcessor for ExtProc<S> {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        let metadata: Option<Bytes> = request
            .metadata()
            .get(audience::METADATA_KEY)
            .map(|v| Bytes::copy_from_slice(v.as_bytes()));
        let inbound = request.into_inner();
        let state = Some((inbound, self.clone(), metadata));
        let stream = futures_util::stream::unfold(state, |state| async move {
            let (mut inbound, processor, metadata) = state?;
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
                return match processor.handle(message, metadata.as_deref()).await {
                    Ok(answer) => Some((Ok(answer), Some((inbound, processor, metadata)))),
                    Err(status) => Some((Err(status), None)),
                };
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
