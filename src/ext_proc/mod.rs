//! The Envoy external processor (`envoy.service.ext_proc.v3.ExternalProcessor`),
//! served by envoy-types' generated server.
//!
//! Envoy opens one `Process` stream per HTTP request. With the shipped
//! configuration it sends a single `request_headers` message; the processor
//! decides what to do with it ([`decision`]), fetches a token if the decision
//! needs one and answers with a header mutation or an immediate response
//! ([`response`]). Every other phase is answered with a pass-through, so a
//! misconfigured Envoy is never left waiting. A message without a phase ends
//! the stream with `INVALID_ARGUMENT`.

pub(crate) mod decision;
#[cfg(test)]
mod fuzz;
pub(crate) mod outcome;
pub(crate) mod response;
#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures_util::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use crate::apiserver::ApiServerAudiences;
use crate::audience::{self, Rules};
use crate::intercept::InterceptHosts;
use crate::local::LocalDestinations;
use crate::metrics::Metrics;
use crate::tokens::TokenSource;
use crate::tokens::cache::TokenCache;
use decision::{Decision, Policy, Request};

/// What to do when no token can be had for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnTokenError {
    /// Refuse the request: Envoy answers 503 with the reason (fail closed).
    Deny,
    /// Forward the request without a token (fail open).
    Allow,
}

/// The processor. Cheap to clone: every stream holds one.
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
    policy: Policy,
    tokens: TokenCache<S>,
    on_token_error: OnTokenError,
    /// Counts decisions and open streams (the cache's metrics).
    metrics: Arc<Metrics>,
}

/// Header the processor sets on a CONNECT request whose host is intercepted;
/// the shipped Envoy config routes such tunnels to the TLS-terminating
/// internal listener. It never leaves Envoy (a terminated CONNECT forwards
/// only its payload), and a client-sent one is removed.
pub(crate) const INTERCEPT_MARKER: &str = "x-kube-audience-proxy-intercept";

/// gRPC metadata set by the intercepting listener's ext_proc filter: the
/// request arrived inside intercepted TLS, so its `:authority` must match
/// the SNI the certificate was minted for.
pub(crate) const LISTENER_METADATA: &str = "x-kube-audience-proxy-listener";

/// The Envoy attribute holding the TLS server name (SNI).
pub(crate) const SNI_ATTRIBUTE: &str = "connection.requested_server_name";

/// What a stream knows before its first message (from the gRPC metadata).
#[derive(Clone, Debug, Default)]
pub struct StreamContext {
    /// Audience named by Envoy configuration (per route).
    pub audience: Option<Bytes>,
    /// The request came through the intercepting (TLS) listener.
    pub intercepted: bool,
}

impl StreamContext {
    /// Reads the context from the initial metadata of a `Process` call.
    pub fn from_metadata(metadata: &MetadataMap) -> StreamContext {
        StreamContext {
            audience: metadata
                .get(audience::METADATA_KEY)
                .map(|v| Bytes::copy_from_slice(v.as_bytes())),
            intercepted: metadata
                .get(LISTENER_METADATA)
                .is_some_and(|v| v.as_bytes() == b"intercept"),
        }
    }
}

impl<S: TokenSource> ExtProc<S> {
    /// A processor resolving audiences with `rules` and tokens from
    /// `tokens`, refusing the `apiserver` audiences (`None`: allowed).
    pub fn new(
        rules: Rules,
        tokens: TokenCache<S>,
        on_token_error: OnTokenError,
        intercept: InterceptHosts,
        local: LocalDestinations,
        apiserver: Option<ApiServerAudiences>,
    ) -> ExtProc<S> {
        ExtProc {
            inner: Arc::new(Inner {
                policy: Policy {
                    rules,
                    intercept,
                    local,
                    apiserver,
                },
                metrics: tokens.metrics().clone(),
                tokens,
                on_token_error,
            }),
        }
    }

    /// The token cache (for the prefetch tasks and readiness).
    pub(crate) fn token_cache(&self) -> &TokenCache<S> {
        &self.inner.tokens
    }

    /// The per-audience token gauges, read from this processor's cache.
    pub(crate) fn token_gauges(&self) -> crate::tokens::cache::gauges::TokenGauges {
        self.inner.tokens.gauges()
    }

    /// The tonic service to add to a server.
    pub fn into_service(self) -> ExternalProcessorServer<ExtProc<S>> {
        ExternalProcessorServer::new(self)
    }

    /// Answers one message of a stream. `Err` ends the stream.
    pub async fn handle(
        &self,
        message: ProcessingRequest,
        context: &StreamContext,
    ) -> Result<ProcessingResponse, Status> {
        match message.request {
            Some(Phase::RequestHeaders(ref headers)) => {
                let started = std::time::Instant::now();
                let inner = &*self.inner;
                let request = Request::scan(
                    headers,
                    &message.attributes,
                    context,
                    &inner.policy.rules.header,
                );
                let (answer, outcome) = match inner.policy.decide(&request) {
                    Decision::Answer(verdict) => {
                        let outcome = outcome::of_verdict(&verdict);
                        (decision::respond(verdict), outcome)
                    }
                    Decision::Inject(injection) => {
                        let token = inner.tokens.get(&injection.audience).await;
                        let outcome = outcome::of_injection(token.is_ok(), inner.on_token_error);
                        (
                            decision::inject(injection, token, inner.on_token_error),
                            outcome,
                        )
                    }
                };
                inner.metrics.decided(outcome, started.elapsed());
                Ok(answer)
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
}

/// The answers of one Process stream.
pub(crate) type AnswerStream =
    Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: TokenSource> ExternalProcessor for ExtProc<S> {
    type ProcessStream = AnswerStream;

    /// Serves one Process stream (one HTTP request): receives each message,
    /// answers it in order, and stops when Envoy closes its side.
    async fn process(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<AnswerStream>, Status> {
        let context = StreamContext::from_metadata(request.metadata());
        // Counted open until the answer stream is dropped (ended or reset).
        let open = self.inner.metrics.stream_opened();
        let state = Some((request.into_inner(), self.clone(), context, open));
        let stream = futures_util::stream::unfold(state, |state| async move {
            let (mut inbound, processor, context, open) = state?;
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
                    Ok(answer) => Some((Ok(answer), Some((inbound, processor, context, open)))),
                    Err(status) => Some((Err(status), None)),
                };
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
